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

# Measured on this CPU (2 cores shared, load 3-5; torch 2.13; benchmarks/compile.py,
# medians of interleaved rounds, eager/compiled step time; table in README "Taking a
# model elsewhere"): fp32 tiny GPT 1.63x (1.19-2.45), tiny MoEUT 1.54x (0.76-2.29), 10.7M
# GPT 1.13x (0.48-1.70); bf16 tiny MoEUT 0.50x (0.17-1.63); compiling took 10-70 s. In
# the default precision (bf16) it does not reliably pay, and a short run never earns the
# compile time back: off on CPU.
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
