"""Validation: mean loss (and bits per byte or accuracy) over fixed batches, sharded by rank."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockdsl.taskio import io_of
from blockdsl.train.device import autocast
from blockdsl.train.dist import Dist


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[Tensor, Tensor]], precision: str,
             device: torch.device, dist: Dist | None = None,
             byte_level: bool = False,
             bytes_per_token: float | None = None) -> dict[str, float]:
    """Mean validation loss (and bits per byte or accuracy); batches are sharded by rank.

    Bits per byte = nats per token / ln 2 / bytes per token: 1 for byte-level text, the
    validation text's measured ratio for tokenized data (its meta.json), so runs on bytes
    and on any tokenizer compare on one scale.
    """
    dist = dist or Dist(device=device)
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64)  # loss sum, count, correct
    with autocast(precision, device):
        for i, (x, y) in enumerate(batches):
            if i % dist.world != dist.rank:
                continue
            x, y = x.to(device), y.to(device)
            logits = model(x).logits.float().flatten(0, -2)
            t = y.flatten()
            stats[0] += F.cross_entropy(logits, t, reduction="sum").item()
            stats[1] += t.numel()
            stats[2] += (logits.argmax(-1) == t).sum().item()
    model.train(was_training)
    stats = dist.all_reduce_sum(stats)
    loss = float(stats[0] / stats[1])
    metrics = {"val_loss": loss}
    if byte_level and bytes_per_token is None:
        bytes_per_token = 1.0
    if bytes_per_token is not None:
        metrics["val_bpb"] = loss / math.log(2) / bytes_per_token
    if io_of(model).task == "classify":
        metrics["val_acc"] = float(stats[2] / stats[1])
    return metrics
