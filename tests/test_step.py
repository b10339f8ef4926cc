"""`blockdsl.train.step.step`, the one training step every caller runs: its optional parts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blockdsl.nn.output import ModelOutput
from blockdsl.train.step import accumulate_gradients, step

CPU = torch.device("cpu")


class Tiny(nn.Module):
    """Embedding + linear head over 16 tokens, with one aux loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        logits = self.head(self.emb(x))
        return ModelOutput(logits, {"z": 1e-2 * logits.pow(2).mean()})


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 16, (4, 6), generator=g), torch.randint(0, 16, (4, 6), generator=g)


def test_without_optimizer_it_is_forward_and_backward_only() -> None:
    x, y = batch()
    a, b = Tiny(), Tiny()
    loss, aux = accumulate_gradients(a, x, y, 2, "fp32", CPU)
    before = [p.detach().clone() for p in b.parameters()]
    out = step(b, x, y, precision="fp32", device=CPU, accum=2)
    assert torch.equal(out.loss, loss) and out.aux.keys() == aux.keys() == {"z"}
    assert out.grad_norm is None  # no clipping asked for
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), before, strict=True):
        assert torch.equal(pa.grad, pb.grad)  # the gradients stay for the caller
        assert torch.equal(pb.detach(), p0)  # and nothing was updated


def test_update_clips_reduces_and_checks_before_the_update() -> None:
    x, y = batch()
    m = Tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    seen: list[str] = []

    def reduce(params: list[nn.Parameter]) -> None:
        seen.append(f"reduce {len(params)}")

    def check(loss: torch.Tensor, aux: dict, norm: torch.Tensor | None) -> None:
        assert norm is not None and all(p.grad is not None for p in m.parameters())
        seen.append("check")

    before = [p.detach().clone() for p in m.parameters()]
    out = step(m, x, y, precision="fp32", device=CPU, optimizer=opt, reduce_grads=reduce,
               clip=1e-3, before_update=check)
    assert seen == ["reduce 3", "check"]
    assert float(out.grad_norm) > 1e-3  # the norm before clipping, as the loop logs it
    assert all(p.grad is None for p in m.parameters())  # zero_grad after the update
    moved = sum(float((p.detach() - p0).pow(2).sum()) for p, p0 in zip(m.parameters(), before,
                                                                          strict=True)) ** 0.5
    assert moved == pytest.approx(0.1 * 1e-3, rel=1e-3)  # one SGD step of the clipped gradient


def test_a_failing_check_leaves_the_weights_as_they_were() -> None:
    x, y = batch()
    m = Tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = [p.detach().clone() for p in m.parameters()]

    def refuse(*_: object) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        step(m, x, y, precision="fp32", device=CPU, optimizer=opt, before_update=refuse)
    assert all(torch.equal(p.detach(), p0) for p, p0 in zip(m.parameters(), before, strict=True))
