"""Residual sublayers with norm placement, and the whole model: stem, stack, head.

Sharing is module reuse: the same primitive object may sit inside many `Residual`s,
while each `Residual` owns its own norms unless the lowering hands it shared ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from blockdsl.names import NORMS_PER_PLACEMENT, PLACEMENTS
from blockdsl.nn import aux
from blockdsl.nn.altup import AltUp, narrow, widen
from blockdsl.nn.output import ModelOutput
from blockdsl.taskio import TaskIO


class Residual(nn.Module):
    """x -> x + f(x) with the norm placed as asked.

    pre: x + f(N(x)); post: N(x + f(x)); sandwich: x + N2(f(N1(x)));
    peri (MoEUT): x + f(x, x_norm=N(x)) — the norm feeds only the projections that
    precede a softmax/sigmoid (Q, K, routers) and the values read raw x; none: x + f(x).
    """

    def __init__(self, fn: nn.Module, placement: str, norms: Sequence[nn.Module] = ()):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown norm placement {placement!r}; expected {PLACEMENTS}")
        need = NORMS_PER_PLACEMENT[placement]
        # peri's norm is optional: lowering gives none to a primitive without `x_norm=`
        if len(norms) != need and not (placement == "peri" and not norms):
            raise ValueError(f"placement {placement!r} needs {need} norm(s), got {len(norms)}")
        self.fn = fn
        self.placement = placement
        self.norms = nn.ModuleList(norms)

    def forward(self, x: Tensor) -> Tensor:
        p = self.placement
        if p == "pre":
            return x + self.fn(self.norms[0](x))
        if p == "post":
            return self.norms[0](x + self.fn(x))
        if p == "sandwich":
            return x + self.norms[1](self.fn(self.norms[0](x)))
        if p == "peri" and len(self.norms):
            return x + self.fn(x, x_norm=self.norms[0](x))
        return x + self.fn(x)


class BlockModel(nn.Module):
    """Stem -> block applications (optionally inside AltUp) -> final norm -> head.

    `io` (a `TaskIO`) says what it takes and returns. `forward` opens one aux-loss
    collector, so `ModelOutput.aux` holds every routed layer's weighted auxiliary losses
    for this pass, pooled as each regulariser needs.
    """

    def __init__(
        self,
        stem: nn.Module,
        units: Sequence[nn.Module],
        final_norm: nn.Module | None,
        head: nn.Module,
        task: str,
        altup: dict | None = None,
        io: TaskIO | None = None,
    ):
        super().__init__()
        self.stem = stem
        # The task shape training reads (sequence, vocabulary, image size, classes);
        # lowering builds it from the Plan, a hand-assembled model may give only the task.
        if io is not None and io.task != task:
            raise ValueError(f"io is for task {io.task!r}, the model for {task!r}")
        self.io = io if io is not None else TaskIO(task)
        self.altup_mode = altup["mode"] if altup else None
        if altup:
            self.altup = AltUp(list(units), K=altup["k"], selection=altup["selection"])
            self.units = None
        else:
            self.altup = None
            self.units = nn.ModuleList(units)
        self.final_norm = final_norm if final_norm is not None else nn.Identity()
        self.head = head
        # a shared layer's aux statistics pool under one key, traced or not (see aux.pool_key)
        aux.assign_pool_keys(self)

    @property
    def task(self) -> str:
        """"lm" or "classify": the task of `io`, stored once."""
        return self.io.task

    def forward(self, x: Tensor) -> ModelOutput:
        with aux.collect() as col:
            h = self.stem(x)
            if self.altup is not None:
                h = narrow(self.altup(widen(h, self.altup.K, self.altup_mode)), self.altup_mode)
            else:
                for unit in self.units:
                    h = unit(h)
            logits = self.head(self.final_norm(h))
            return ModelOutput(logits=logits, aux=col.finalize())
