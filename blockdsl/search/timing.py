"""Step time, measured *paired*: candidate and baseline steps interleaved in the same
process, so load on a shared machine (and the worker's thread count) cancels out of the
ratio the constraints and the paired clock use. Torch is imported inside the functions:
the rest of the search (and `blockdsl check`) must not pay for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


@dataclass
class StepTimes:
    """Seconds per training step: medians of wall clock and this process's CPU time, and the
    fastest step (the least disturbed by other load)."""

    cand: float
    ref: float
    cand_cpu: float
    ref_cpu: float
    cand_min: float = 0.0
    ref_min: float = 0.0

    @property
    def ratio(self) -> float:
        return self.cand / self.ref


def paired_step_times(model: nn.Module, ref: nn.Module | None, batch: tuple[Any, Any],
                      precision: str, steps: int = 4, warmup: int = 1,
                      stop_ratio: float | None = None) -> StepTimes:
    """Seconds per training step of `model` and of `ref`, their steps interleaved.

    Interleaving makes the ratio robust to load that changes over seconds (a shared
    machine, another worker). With `stop_ratio`, timing stops after two pairs once even
    the candidate's fastest step is slower than `stop_ratio` times the reference's slowest:
    a clearly infeasible candidate costs three steps, not the full count. The candidate's
    weights are restored afterwards, so timing does not train it. Each step is the one
    training step every caller runs (`blockdsl.train.step.step`, clipped at 1.0 as a
    trial's training is) with the optimizer training builds (`train.optim.make_adamw` over
    the same parameter groups: fused AdamW where torch has it), so what is timed is what
    is trained. (It was a plain multi-tensor AdamW, slower per parameter: that taxed
    models with more stored parameters, MoE ones, beyond what their training pays.)
    """
    from blockdsl.train.config import TrainConfig
    from blockdsl.train.optim import make_adamw, param_groups
    from blockdsl.train.step import step

    device = next(model.parameters()).device
    x, y = batch[0].to(device), batch[1].to(device)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    models = [model] + ([ref] if ref is not None else [])
    dflt = TrainConfig()
    opts = [make_adamw(param_groups(m, dflt.weight_decay), 1e-4, dflt.betas, device)
            for m in models]
    wall: list[list[float]] = [[] for _ in models]
    cpu: list[list[float]] = [[] for _ in models]
    try:
        for i in range(warmup + steps):
            order = list(range(len(models)))
            for j in (order if i % 2 == 0 else order[::-1]):
                t0, c0 = time.perf_counter(), time.process_time()
                step(models[j], x, y, precision=precision, device=device, optimizer=opts[j], clip=1.0)
                if i >= warmup:
                    wall[j].append(time.perf_counter() - t0)
                    cpu[j].append(time.process_time() - c0)
            if (stop_ratio is not None and ref is not None and len(wall[0]) >= 2
                    and min(wall[0]) > stop_ratio * max(wall[1])):
                break
    finally:
        model.load_state_dict(saved)
        for m in models:
            m.zero_grad(set_to_none=True)

    def med(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    j = 1 if ref is not None else 0
    return StepTimes(med(wall[0]), med(wall[j]), med(cpu[0]), med(cpu[j]), min(wall[0]), min(wall[j]))
