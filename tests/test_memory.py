"""The memory estimate from a Plan, and the guard `compile --smoke` and `train` run before
building anything: real modules, real AdamW state, real subprocesses under an address-space
limit that proves the refused model was never allocated."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blockdsl
from blockdsl.graph import estimate_memory
from blockdsl.lower import build_from_plan, random_batch
from blockdsl.train import autocast, make_adamw, param_groups

ROOT = Path(__file__).resolve().parent.parent
TINY = sorted((ROOT / "specs" / "tiny").glob("*.block"))
LIMIT = 4 * 1024**3  # address space of the CLI subprocesses: far below what the spec asks


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockdsl.cli", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=_limit_address_space,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin", "BLOCKDSL_CACHE": str(cwd / "cache")})


@pytest.fixture
def huge(tmp_path: Path) -> Path:
    """The tiny GPT with d_ff=2**28: 412 billion parameters, 1.5 TiB of fp32 weights."""
    text = (ROOT / "specs/tiny/gpt.block").read_text().replace("d_ff=344", "d_ff=2**28")
    assert "2**28" in text
    spec = tmp_path / "huge.block"
    spec.write_text(text)
    return spec


def _saved_bytes(model: torch.nn.Module, plan, precision: str) -> int:  # noqa: ANN001
    """Bytes of the distinct non-parameter storages autograd saves in one forward."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        sizes[st.data_ptr()] = max(sizes.get(st.data_ptr(), 0), st.nbytes())
        return t

    dev = torch.device("cpu")
    x, y = random_batch(plan, 2, dev, generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision, dev):
        out = model(x)
        torch.nn.functional.cross_entropy(out.logits.flatten(0, -2).float(), y.flatten())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in sizes.items() if k not in params)


@pytest.mark.parametrize("spec", TINY, ids=lambda p: p.stem)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_estimate_against_the_built_module(spec: Path, precision: str) -> None:
    torch.manual_seed(0)
    plan = blockdsl.resolve(spec)
    model = build_from_plan(plan, device="cpu", precision=precision)
    numel = sum(p.numel() for p in model.parameters())
    est = estimate_memory(plan, 2, precision=precision)
    # weights, gradients and AdamW state: exact
    assert est.weights == numel * (6 if precision == "bf16" else 4)  # + autocast's bf16 copies
    x, y = random_batch(plan, 2, torch.device("cpu"))
    out = model(x)
    (torch.nn.functional.cross_entropy(out.logits.flatten(0, -2).float(), y.flatten())
     + sum(out.aux.values())).backward()
    assert est.grads == sum(p.grad.numel() * p.grad.element_size()
                            for p in model.parameters() if p.grad is not None) == numel * 4
    opt = make_adamw(param_groups(model, 0.1), 1e-3, (0.9, 0.95), torch.device("cpu"))
    opt.step()
    moments = sum(v.numel() * v.element_size() for s in opt.state.values()
                  for k, v in s.items() if k != "step")
    assert est.optimizer == moments == numel * 8
    assert estimate_memory(plan, 2, precision=precision, optimizer=False).optimizer == 0
    # activations: what autograd really saved (plus the bf16 weight copies, which the
    # estimate books under weights) lies between 1x and 2.5x of the estimate
    measured = _saved_bytes(model, plan, precision)
    predicted = est.activations + est.weights - numel * 4
    assert measured <= predicted <= 2.5 * measured


def test_estimate_scales_with_batch_and_attention_path() -> None:
    plan = blockdsl.resolve(ROOT / "specs/tiny/gpt.block")
    a, b = estimate_memory(plan, 2), estimate_memory(plan, 4)
    assert b.weights == a.weights and b.activations > 1.9 * a.activations
    # the explicit-softmax path (CPU bf16 default at seq <= 512) saves the T x T scores
    cpu = estimate_memory(plan, 2, precision="bf16", device_type="cpu")
    gpu = estimate_memory(plan, 2, precision="bf16", device_type="cuda")
    heads, layers, seq = 4, 4, 128
    scores = 2 * heads * seq * seq * (4 + 2)  # batch x heads x T x T, fp32 scores + bf16 probs
    # once per layer, and perhaps once more in the largest layer's backward term
    assert layers * scores <= cpu.activations - gpu.activations <= (layers + 1) * scores


def test_compile_smoke_refuses_without_allocating(huge: Path, tmp_path: Path) -> None:
    p = _cli("compile", str(huge), "--smoke", "--device", "cpu", "--out", str(tmp_path / "o"),
             cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and "allocate" not in p.stderr
    first = p.stderr.splitlines()[0]
    assert first.startswith(f"{huge}:3:1: error: compile --smoke of model gpt_tiny needs about ")
    assert "TiB at batch 2 x seq 128 (fp32: weights 1.50 TiB, gradients 1.50 TiB, activations" in first
    assert "available on cpu (MemAvailable" in first or "cgroup" in first
    assert "--force" in p.stderr and "--batch" in p.stderr
    # --force skips the guard: the allocator then fails, reported as one located error
    p = _cli("compile", str(huge), "--smoke", "--force", "--device", "cpu",
             "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "needs about" not in p.stderr and "ran out of memory on cpu" in p.stderr


def test_tiny_spec_still_smokes_under_the_limit(tmp_path: Path) -> None:
    p = _cli("compile", str(ROOT / "specs/tiny/gpt.block"), "--smoke", "--json", "--device",
             "cpu", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    import json

    smoke = json.loads(p.stdout)["smoke"]
    est = smoke["memory_estimate"]
    assert smoke["finite"] and est["weights"] == est["grads"] == 824_448 * 4


def test_train_refuses_without_allocating(huge: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = _cli("train", str(huge), "--steps", "2", "--out", str(out), cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and "allocate" not in p.stderr
    first = p.stderr.splitlines()[0]
    assert first.startswith(f"{huge}:3:1: error: train of model gpt_tiny needs about ")
    assert "at batch 16 x seq 128 (bf16: weights 2.25 TiB, gradients 1.50 TiB, AdamW state 3.00 TiB" in first
    # the hint names the flags as the CLI convention spells them (not --batch-size/--seq-len)
    assert "use a smaller --batch (or a larger --accum) or --seq, or pass --force" in p.stderr
    assert not out.exists()


def test_memory_estimate_uses_the_dispatch_rule_of_resolve_impl() -> None:
    """The torch-free estimate counts "auto" as the backend `resolve_impl` picks on each side
    of the CPU threshold, in fp32 and in bf16 (where the fused kernel builds, as it does here:
    "fused" below it, "grouped_mm"/"sort" above)."""
    from blockdsl.nn import dispatch
    from blockdsl.primitives import memory

    assert memory.SMALL_EXPERT_WEIGHT == dispatch.SMALL_EXPERT_WEIGHT
    cpu = torch.device("cpu")
    picks = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for w in (dispatch.SMALL_EXPERT_WEIGHT, dispatch.SMALL_EXPERT_WEIGHT + 1):
            picked = dispatch.resolve_impl("auto", cpu, dtype, 1, w)
            picks[precision, w] = picked
            assert memory.dispatch_saves_rows("auto", w, "cpu", precision) == \
                memory.dispatch_saves_rows(picked, w, "cpu", precision), (precision, w, picked)
    small = dispatch.SMALL_EXPERT_WEIGHT
    assert picks["fp32", small] == "fused" and picks["bf16", small] == "fused"
    assert picks["fp32", small + 1] in ("grouped_mm", "sort")