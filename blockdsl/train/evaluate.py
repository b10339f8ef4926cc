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
             bytes_per_token: float | None = None,
             split_rows: bool = False) -> dict[str, float]:
    """Mean validation loss (and bits per byte or accuracy); batches are sharded by rank.

    `split_rows` (sharded training: every rank must run every forward, whose collectives
    pair up across ranks): each rank takes its slice of the rows of every batch instead. A
    batch whose rows do not divide by the ranks is padded with copies of its first row,
    which are not counted (under capacity or expert-choice routing they do take part in
    that one batch's routing).

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
            valid = None
            if split_rows:
                x, y, valid = _rows_of(x, y, dist.rank, dist.world)
            elif i % dist.world != dist.rank:
                continue
            x, y = x.to(device), y.to(device)
            logits = model(x).logits.float()
            if valid is not None:
                logits, y = logits[:valid], y[:valid]
            logits, t = logits.flatten(0, -2), y.flatten()
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


def _rows_of(x: Tensor, y: Tensor, rank: int, world: int) -> tuple[Tensor, Tensor, int]:
    """This rank's equal slice of a batch padded to a multiple of `world` rows, and how
    many of its rows are real."""
    per = -(-len(x) // world)
    pad = per * world - len(x)
    if pad:
        x = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
        y = torch.cat([y, y[:1].expand(pad, *y.shape[1:])])
    lo = rank * per
    real = max(0, min(per, len(x) - pad - lo))
    return x[lo: lo + per], y[lo: lo + per], real
