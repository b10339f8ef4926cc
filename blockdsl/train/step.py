"""THE training step: forward, loss, backward, gradient reduction, clipping, update, sync.

One function, `step`, for every caller that runs a training step: the training loop,
`compile --smoke`, the search's step timing and the tuner's whole-model race. Before,
each assembled its own from `accumulate_gradients` and repeated the clipping, the
optimizer step and the device sync, so a change to one (a new aux term, a sync rule)
could silently make timed steps differ from trained ones. The optional parts are
arguments, not copies:

- `reduce_grads(params)`: averages gradients across torchrun ranks (`Dist.average_grads`);
  a hook rather than a `Dist` argument, so the step knows nothing of process groups.
- `clip`: the max global gradient norm; 0 skips clipping (and the norm is None).
  `clip_grads(params, clip)` replaces torch's `clip_grad_norm_` (sharded training forms
  the norm over ranks: `parallel.Parallel.clip_grad_norm`).
- `before_update(loss, aux, grad_norm)`: runs after the norm is known and before the
  optimizer touches the weights, so the loop's NaN stop leaves them as they were.
- `optimizer=None`: no update and no zero_grad, for callers that time (or check) forward
  and backward only; the gradients stay in `.grad` for them to read or clear.

The task loss is cross-entropy on float32 logits flattened over every position (an LM's
tokens, or a classifier's one row per image); aux losses (load balancing, ...) from the
model's output are added to it for the backward, and returned apart from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockdsl.device import keep_host_memory
from blockdsl.train.device import autocast, sync


def task_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position, computed in float32 whatever the autocast."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def accumulate_gradients(model: nn.Module, x: Tensor, y: Tensor, accum: int, precision: str,
                         device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
    """Add the gradient of the mean loss over (x, y) to `.grad`, in `accum` equal micro-batches.

    Each micro-loss is divided by `accum`, so the sum equals the full batch's mean loss and
    its gradient. Returns the detached task loss and each aux loss, averaged the same way.
    """
    micro = len(x) // accum
    step_loss = torch.zeros((), device=device)
    step_aux: dict[str, Tensor] = {}
    for m in range(accum):
        xb = x[m * micro: (m + 1) * micro].to(device, non_blocking=True)
        yb = y[m * micro: (m + 1) * micro].to(device, non_blocking=True)
        with autocast(precision, device):
            out = model(xb)
            loss_m = task_loss(out.logits, yb)
            loss = loss_m + sum(out.aux.values())
        (loss / accum).backward()
        step_loss += loss_m.detach() / accum
        for k, v in out.aux.items():
            step_aux[k] = step_aux.get(k, 0.0) + v.detach().float() / accum
    return step_loss, step_aux


@dataclass
class StepResult:
    """One step's detached task loss, its aux losses, and the gradient norm (None unclipped)."""

    loss: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)
    grad_norm: Tensor | None = None


BeforeUpdate = Callable[[Tensor, dict[str, Tensor], "Tensor | None"], None]


def step(model: nn.Module, x: Tensor, y: Tensor, *, precision: str, device: torch.device,
         accum: int = 1, optimizer: torch.optim.Optimizer | None = None,
         params: list[nn.Parameter] | None = None,
         reduce_grads: Callable[[list[nn.Parameter]], None] | None = None,
         clip: float = 0.0, before_update: BeforeUpdate | None = None,
         clip_grads: Callable[[list[nn.Parameter], float], Tensor] | None = None) -> StepResult:
    """Run one training step of `model` on the batch (x, y); see the module docstring.

    `params` (default: the model's trainable parameters) are what gradients are reduced
    and clipped over. The device is synced last, so a clock read after the call times
    the whole step on a GPU too. The first step of a process sets glibc's malloc to keep
    freed tensor memory (`blockdsl.device.keep_host_memory`: page faults otherwise cost
    CPU steps 5-10%, most with MoE).
    """
    if device.type == "cpu":
        keep_host_memory()
    loss, aux = accumulate_gradients(model, x, y, accum, precision, device)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if reduce_grads is not None:
        reduce_grads(params)
    clip_fn = clip_grads or torch.nn.utils.clip_grad_norm_
    grad_norm = clip_fn(params, clip) if clip > 0 else None
    if before_update is not None:
        before_update(loss, aux, grad_norm)
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return StepResult(loss, aux, grad_norm)
