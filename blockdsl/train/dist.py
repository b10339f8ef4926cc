"""Data parallel under torchrun without DistributedDataParallel.

Gradients are averaged across ranks with one flat all-reduce per step instead of
wrapping the model in DistributedDataParallel: routed models (MoE, expert choice) can
leave a parameter unused in a step, which DDP's reducer only tolerates with an extra
graph walk every step, and `ModelOutput` needs no special handling.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from blockdsl.train.device import resolve_device


def on_flat_grads(params: list[nn.Parameter], fn: Callable[[Tensor], object]) -> None:
    """Run `fn` in place on all of `params`' gradients as one flat tensor (one collective
    instead of one per parameter), then copy the result back; a missing gradient counts
    as zero."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    fn(flat)
    for g, new in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(new)


@dataclass
class Dist:
    """Rank and world of this process; a process group is set up when torchrun launched us."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @classmethod
    def setup(cls, device_name: str) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=resolve_device(device_name))
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name)
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), device, owns)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum over ranks in place; small CPU tensors travel via the device for NCCL."""
        if self.world > 1:
            import torch.distributed as dist

            buf = t.to(self.device) if self.device.type == "cuda" else t
            dist.all_reduce(buf)
            if buf is not t:
                t.copy_(buf)
        return t

    def broadcast_module(self, model: nn.Module) -> None:
        """Start every rank from rank 0's weights, however the model was initialised."""
        if self.world > 1:
            import torch.distributed as dist

            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(t.data, 0)

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """One flat all-reduce of all gradients (a missing gradient counts as zero)."""
        if self.world == 1 or not params:
            return
        on_flat_grads(params, lambda flat: self.all_reduce_sum(flat).div_(self.world))

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
