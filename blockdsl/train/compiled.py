"""`train --compile`: the whole model compiled as one graph for the training step.

`compile_for_training` routes MoE layers through the traceable dispatch
(`nn/traceable.py`) and compiles with `fullgraph=True`: every shipped primitive traces
(the aux losses leave as outputs, see `nn/aux.py`), so a graph break is a bug to see,
not a slowdown to miss. Evaluation, checkpoints and exports keep using the eager module
(the compiled one shares its parameters), so nothing recompiles for eval mode.

The default (`compile_default`) follows benchmarks/compile.py, measured per device type
(see `MEASURED`): off where compiling did not pay.
"""

from __future__ import annotations

import torch
from torch import nn

# Measured on this CPU (2 cores, quiet; torch 2.13; benchmarks/compile.py, medians of
# interleaved rounds, eager/compiled step time; table in README "Taking a model
# elsewhere"): dense models 1.03-1.35x (tiny GPT fp32 1.24, bf16 1.35; 10.7M GPT fp32 1.03,
# bf16 1.29), MoE models 0.68-0.91x (the traceable "sort" dispatch replaces "bmm", and
# now the faster "fused");
# compiling took 3-26 s warm, 19-70 s cold, which a run of the default 300 steps does not
# earn back (~550 steps at the tiny GPT's best case): off on CPU.
MEASURED = {"cpu": False}


def compile_default(device: torch.device) -> bool:
    """Whether `train` compiles when not told: only on a device type where the benchmark
    showed compiled steps faster. CUDA was not measured here (no GPU), so it stays off
    there too until someone runs benchmarks/compile.py on one."""
    return MEASURED.get(device.type, False)


def compile_for_training(model: nn.Module) -> nn.Module:
    """A compiled view of `model` sharing its parameters (MoE dispatch made traceable)."""
    from blockdsl.nn.traceable import make_traceable

    make_traceable(model)
    return torch.compile(model, fullgraph=True)
