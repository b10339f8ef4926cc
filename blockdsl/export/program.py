"""`torch.export` of a lowered model with dynamic batch (and, for LMs, sequence length), and
`--format pt2`: `torch.export.save` of it.

The example input is 8 rows of 16 tokens (or 8 images), not 1 or 2: the exporter
specialises any size that is 0 or 1 in the example, and expert-choice routing's
per-expert capacity C = ceil(S * factor / E) is 1 at small batches, which would pin the
program to that batch. Sizes are `Dim.AUTO`: torch.export keeps each dynamic unless the
model needs it fixed, and records the range it proved (printed by the CLI, kept in the
program's `range_constraints`): e.g. expert choice over the batch needs C >= 2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

EXAMPLE_BATCH = 8
EXAMPLE_SEQ = 16


def example_input(model: nn.Module, batch: int = EXAMPLE_BATCH, seq: int = EXAMPLE_SEQ,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch the model takes: token ids [batch, min(seq, context)] or images."""
    io = model.io
    dev = next(model.parameters()).device
    if io.task == "lm":
        t = min(seq, io.seq or seq)
        return torch.randint(0, io.vocab, (batch, t), generator=generator).to(dev)
    shape = (batch, io.channels, io.image_size, io.image_size)
    return torch.randn(*shape, generator=generator).to(dev)


def export_program(model: nn.Module, x: torch.Tensor | None = None) -> torch.export.ExportedProgram:
    """The model as an ExportedProgram (eval mode; MoE layers through the custom op).

    Its output is a `ModelOutput` (logits, aux) like the model's own. The model is left
    as it was (mode and dispatch settings restored).
    """
    from torch.export import Dim

    from blockdsl.nn.traceable import traceable

    x = example_input(model) if x is None else x
    dims = {0: Dim.AUTO} if model.io.task != "lm" else {0: Dim.AUTO, 1: Dim.AUTO}
    was_training = model.training
    model.eval()
    try:
        with traceable(model), torch.no_grad():
            return torch.export.export(model, (x,), dynamic_shapes={"x": dims})
    finally:
        model.train(was_training)


def write(model: nn.Module, out: Path) -> list[Path]:
    """out/model.pt2 (the exported program), plus the weights and spec as every format."""
    from blockdsl.export.weights import save_weights

    ep = export_program(model)
    path = out / "model.pt2"
    torch.export.save(ep, str(path))
    return [path, save_weights(model, out)]
