"""`blockdsl.train.step.step`, the one training step every caller runs: its optional parts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from blockdsl import device
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


# A search-scale top-2 MoE layer's forward + backward, its minor page faults per call
# printed, in a fresh process (malloc settings are process-wide and one-way): MODE "keep"
# runs one `step()` first, which is what sets them.
_FAULTS = """
import resource, sys, torch
from blockdsl.nn.moe import TopKMoE
from blockdsl.train.step import step
import blockdsl.device as device
from tests.test_step import Tiny, batch
if sys.argv[1] == "keep":
    step(Tiny(), *batch(), precision="fp32", device=torch.device("cpu"))
    assert device._host_memory_kept is True
torch.manual_seed(0)
moe = TopKMoE(48, 48, 8, 2, activation="gelu", bias=False)
x = torch.randn(16, 64, 48, requires_grad=True)
def run(n):
    for _ in range(n):
        moe(x).square().mean().backward()
run(3)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run(10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 10)
"""


@pytest.mark.skipif(not device._glibc(), reason="glibc malloc only")
def test_the_first_step_makes_malloc_keep_freed_tensor_memory() -> None:
    """Without it, glibc returns freed activations to the OS and the next step faults them
    back in (hundreds of pages per MoE layer call, whose buffer sizes vary step to step)."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    faults = {}
    for mode in ("keep", "default"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                             text=True, cwd=root, env=env, timeout=120, check=True)
        faults[mode] = float(out.stdout.split()[-1])
    assert faults["keep"] <= max(20.0, 0.2 * faults["default"]), faults


def test_keeping_host_memory_respects_the_users_own_malloc_settings() -> None:
    code = "import blockdsl.device as d; print(d.keep_host_memory())"
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_matmul_rate_measurement_leaves_the_global_rng_alone():
    """Rank 0 alone measures the matmul rate (for MFU) before training: drawing its random
    matrices from the global RNG put rank 0's stream ahead of the others' (router noise then
    differed between ranks under expert parallelism)."""
    from blockdsl.train.device import _measure_matmul

    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    _measure_matmul(torch.device("cpu"), "fp32")
    assert torch.equal(torch.random.get_rng_state(), before)
