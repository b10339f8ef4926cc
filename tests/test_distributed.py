"""FSDP2, expert parallelism and sharded checkpoints against one process, on real processes.

Real `torch.distributed` under gloo on CPU: `tests/dist_cases.py` runs under
`torchrun --standalone` (which picks a free port) with 2 and 4 processes, several cases per
launch (starting processes and importing torch costs more than the tiny runs). The
single-process references run here, through the same `train_spec` and config. Every run
uses a constant learning rate after warm-up, so a run stopped at step 10 and resumed to 20
follows the same schedule as one run of 20 steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blockdsl.names import DISPATCH_BACKENDS
from tests.dist_cases import make_config

ROOT = Path(__file__).resolve().parents[1]
ROUTED = str(ROOT / "tests/specs/dist_routed.block")
UNEVEN = str(ROOT / "tests/specs/dist_routed_uneven.block")
GPT = str(ROOT / "specs/tiny/gpt.block")
WIDENET = str(ROOT / "specs/tiny/widenet.block")
IMPLS = DISPATCH_BACKENDS  # every backend `expert_mixture` has
TOL = dict(rel=2e-4, abs=2e-4)  # fp32, different reduction orders; 20 AdamW steps
# the launches take ~1 min on an idle 2-core machine, several times that when it is shared
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _torchrun(n: int, cases: list[dict], tmp: Path, tag: str) -> list[dict]:
    spec, res = tmp / f"{tag}.json", tmp / f"{tag}-out.json"
    spec.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
         str(ROOT / "tests/dist_cases.py"), str(spec), str(res)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(res.read_text())
    for case, r in zip(cases, out, strict=True):
        assert "error" not in r, (case, r.get("trace"))
    return out


def _single(case: dict) -> dict:
    """The same case in this one process (no torchrun)."""
    from blockdsl.train.spec import train_spec

    run = train_spec(case["spec"], None, make_config(case), default_steps=case["steps"])
    return {"losses": run.result.losses, "val": run.result.val.get("val_loss")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every distributed launch of this module, once: one at 4 processes, one at 2.

    At 4 (EP 2 x DP 2): FSDP + EP 20 steps; FSDP + EP 10 steps saved, then resumed from
    copies with FSDP + EP and with plain EP x DP; a single-file checkpoint resumed with
    FSDP + EP; FSDP + EP with EP blocks that split unevenly over dp."""
    tmp = tmp_path_factory.mktemp("dist")
    saved = tmp / "saved"
    _single({"spec": ROUTED, "steps": 10, "out": str(tmp / "from-single")})  # single-file
    fsdp_ep = {"spec": ROUTED, "ep": 2, "shard": "fsdp"}
    four = _torchrun(4, [
        {**fsdp_ep, "steps": 20, "out": str(tmp / "ep2dp2")},
        {**fsdp_ep, "steps": 10, "out": str(saved)},
        {**fsdp_ep, "steps": 20, "out": str(tmp / "resume4"), "copy": str(saved),
         "resume": True},
        {"spec": ROUTED, "ep": 2, "steps": 20, "out": str(tmp / "resume4-ep"),
         "copy": str(saved), "resume": True},
        {**fsdp_ep, "steps": 20, "out": str(tmp / "from-single4"),
         "copy": str(tmp / "from-single"), "resume": True},
        {"spec": UNEVEN, "ep": 2, "shard": "fsdp", "steps": 12, "out": str(tmp / "uneven")},
        {"spec": WIDENET, "ep": 2, "steps": 6, "out": str(tmp / "widenet4")},
    ], tmp, "four")
    for name in ("resume2", "resume1", "convert"):
        shutil.copytree(saved, tmp / name)
    two = _torchrun(2, [
        {"spec": GPT, "shard": "fsdp", "steps": 20, "accum": 2, "out": str(tmp / "gpt-fsdp")},
        {"spec": ROUTED, "ep": 2, "steps": 20, "out": str(tmp / "ep2")},
        {"spec": WIDENET, "ep": 2, "shard": "fsdp", "steps": 6, "out": str(tmp / "widenet")},
        {"spec": ROUTED, "ep": 2, "steps": 20, "out": str(tmp / "resume2"), "resume": True},
        {"spec": ROUTED, "ep": 2, "shard": "fsdp", "steps": 5, "precision": "bf16",
         "out": str(tmp / "bf16")},
        *({"mixture": impl, "lopsided": lop} for impl in IMPLS for lop in (False, True)),
        {"spec": ROUTED, "ep": 2, "shard": "fsdp", "steps": 20, "out": str(tmp / "from-single"),
         "resume": True},
    ], tmp, "two")
    return {"tmp": tmp, "four": four, "two": two}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("single")
    return {name: _single({"spec": spec, "steps": steps, "out": str(tmp / name)})
            for name, spec, steps in (("gpt", GPT, 20), ("routed", ROUTED, 20),
                                      ("widenet", WIDENET, 6))} | {
        "bf16": _single({"spec": ROUTED, "steps": 5, "precision": "bf16", "out": str(tmp / "b")}),
        "uneven": _single({"spec": UNEVEN, "steps": 12, "out": str(tmp / "u")})}


def test_fsdp_dense_equals_one_process(runs: dict, single: dict) -> None:
    """With gradient accumulation (2 micro-steps per rank) against one process without:
    the same global batch and mean loss, so the same gradient."""
    got = runs["two"][0]
    assert len(got["losses"]) == 20
    assert got["losses"] == pytest.approx(single["gpt"]["losses"], **TOL)
    assert got["val"] == pytest.approx(single["gpt"]["val"], **TOL)
    # FSDP over 2 ranks: each stores about half the parameters (and so half the AdamW state)
    full = sum(p.numel() for p in _built(GPT).parameters())
    assert got["param_elems"] < 0.52 * full


def test_ep2_every_routed_primitive_equals_one_process(runs: dict, single: dict) -> None:
    """SwitchHead V/O, sigma-MoE, top-k dropless (balance + z), top-k with capacity, expert
    choice: one model, so each layer's routing and aux losses are checked in one run. At 4
    processes with FSDP, each rank holds a quarter of the experts: its EP block's rows,
    sharded again over dp (every rank's count is the same here, so rank 0's stands for all;
    the per-rank check is `test_fsdp_ep_shards_experts_on_every_rank`)."""
    ref = single["routed"]
    two, four = runs["two"][1], runs["four"][0]
    assert two["losses"] == pytest.approx(ref["losses"], **TOL)
    assert two["val"] == pytest.approx(ref["val"], **TOL)
    assert four["losses"] == pytest.approx(ref["losses"], **TOL)  # FSDP + EP 2 x DP 2
    assert four["val"] == pytest.approx(ref["val"], **TOL)
    # plain EP 2 x DP 2 (experts replicated over dp), resumed from the FSDP run's step 10
    assert runs["four"][3]["losses"] == pytest.approx(ref["losses"][10:], **TOL)
    experts = _expert_elems(_built(ROUTED))
    assert two["expert_elems"] * 2 == experts  # each EP rank holds half of every layer's experts


def test_fsdp_ep_shards_experts_on_every_rank(runs: dict) -> None:
    """FSDP + EP 2 x DP 2: every rank holds 1/4 of every routed layer's expert weights and
    of their AdamW state (exp_avg, exp_avg_sq), not its whole EP block."""
    four = runs["four"][0]
    experts = _expert_elems(_built(ROUTED))
    assert len(four["ranks"]) == 4
    for r in four["ranks"]:
        assert r["expert_elems"] * 4 == experts, r
        assert r["expert_state_elems"] == 2 * r["expert_elems"], r


def test_fsdp_ep_uneven_blocks_and_idle_ranks_equal_one_process(runs: dict, single: dict) -> None:
    """6 experts, EP 2 x DP 2: a block of 3 rows is split 2 + 1 over dp (ranks 0, 1 hold
    the first rows of their blocks, ranks 2, 3 the last). At step 11 no token reaches rank
    3's block of the capacity layer: without zeros reduce-scattered for it, rank 1 waited
    forever in that reduce-scatter (`Parallel._shard_experts`)."""
    got = runs["four"][5]
    assert got["losses"] == pytest.approx(single["uneven"]["losses"], **TOL)
    assert got["val"] == pytest.approx(single["uneven"]["val"], **TOL)
    experts = _expert_elems(_built(UNEVEN))
    held = [r["expert_elems"] for r in got["ranks"]]
    assert held == [experts // 3, experts // 3, experts // 6, experts // 6]


def test_router_noise_under_ep_x_dp_equals_one_process(runs: dict, single: dict) -> None:
    """WideNet's router draws Gaussian noise for the whole global batch on every rank: the
    ranks' RNG streams must stay identical to one process's. (They did not: rank 0 alone
    measured its matmul rate with the global RNG before training, and EP 2 x DP 2 ended
    0.0145 away from one process; without the noise it matched exactly.)"""
    got = runs["four"][-1]
    assert got["losses"] == pytest.approx(single["widenet"]["losses"], **TOL)
    assert got["val"] == pytest.approx(single["widenet"]["val"], **TOL)


def test_fsdp_with_ep_and_shared_layers_equals_one_process(runs: dict, single: dict) -> None:
    """WideNet shares its attention and MoE across layers: each shared layer is one FSDP
    unit, and its experts are split over EP ranks once."""
    got = runs["two"][2]
    assert got["losses"] == pytest.approx(single["widenet"]["losses"], **TOL)
    assert got["val"] == pytest.approx(single["widenet"]["val"], **TOL)


def test_bf16_follows_autocast_as_in_one_process(runs: dict, single: dict) -> None:
    """--precision bf16 under FSDP + EP is one process's bf16 (autocast over fp32 weights),
    up to the rounding of bf16 matmuls over different row splits."""
    got, ref = runs["two"][4], single["bf16"]
    assert got["losses"] == pytest.approx(ref["losses"], rel=5e-3)
    assert got["losses"] != pytest.approx(single["routed"]["losses"][:5], rel=1e-5)  # not fp32


def test_expert_exchange_equals_the_whole_mixture_on_every_backend(runs: dict) -> None:
    """The exchange under each dispatch backend, forward and backward (rows, gates, expert
    weights), with dropped assignments, and with ranks that have nothing to send."""
    got = runs["two"][5: 5 + 2 * len(IMPLS)]
    for case, r in zip(((i, lop) for i in IMPLS for lop in (False, True)), got, strict=True):
        assert r["err"] < 1e-4, case


def test_save_at_4_resume_at_2_and_at_1_equals_uninterrupted(runs: dict, single: dict) -> None:
    ref = single["routed"]["losses"]
    saved = runs["four"][1]
    assert saved["losses"] == pytest.approx(ref[:10], **TOL)  # FSDP + EP2 x DP2 at 4
    assert runs["four"][2]["losses"] == pytest.approx(ref[10:], **TOL)  # resumed so at 4
    assert runs["two"][3]["losses"] == pytest.approx(ref[10:], **TOL)  # resumed at 2, EP 2
    tmp = runs["tmp"]
    one = _single({"spec": ROUTED, "steps": 20, "out": str(tmp / "resume1"), "resume": True})
    assert one["losses"] == pytest.approx(ref[10:], **TOL)  # resumed in one process
    assert one["val"] == pytest.approx(single["routed"]["val"], **TOL)


def test_a_single_file_checkpoint_resumes_sharded(runs: dict, single: dict) -> None:
    """Saved by one process, resumed with FSDP + EP 2 at 2 processes and at 4 (EP 2 x DP 2,
    experts sharded over dp): each rank cuts out its part."""
    got = runs["two"][5 + 2 * len(IMPLS)]
    assert got["losses"] == pytest.approx(single["routed"]["losses"][10:], **TOL)
    got = runs["four"][4]
    assert got["losses"] == pytest.approx(single["routed"]["losses"][10:], **TOL)


def test_sharded_checkpoint_converts_to_the_single_file_format(runs: dict, single: dict) -> None:
    from blockdsl.train import checkpoint as checkpoints
    from blockdsl.train.checkpoint import to_single_file

    tmp = runs["tmp"]
    src = checkpoints.latest_checkpoint(tmp / "convert")
    assert (src / "dcp" / ".metadata").is_file()
    dest = to_single_file(src, _built(ROUTED), tmp / "converted")
    assert (dest / "model.safetensors").is_file() and not (dest / "dcp").exists()
    # the converted folder is an ordinary checkpoint: it resumes to the uninterrupted curve
    one = _single({"spec": ROUTED, "steps": 20, "out": str(tmp / "converted"), "resume": True})
    assert one["losses"] == pytest.approx(single["routed"]["losses"][10:], **TOL)


def _built(spec: str):  # noqa: ANN202
    import blockdsl

    return blockdsl.build(spec)


def _expert_elems(model) -> int:  # noqa: ANN001
    from blockdsl.train.parallel import _expert_modules, _weights_of

    return sum(getattr(m, w).numel() for m in _expert_modules(model) for w in _weights_of(m)
               if getattr(m, w) is not None)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "blockdsl.cli", "train", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_nproc_launches_a_sharded_run_and_its_checkpoint_exports(tmp_path: Path) -> None:
    from blockdsl.train.checkpoint import load_checkpoint

    run = _cli(GPT, "--nproc", "2", "--shard", "fsdp", "--steps", "2", "--batch", "4",
               "--seq", "16", "--eval-batches", "1", "--precision", "fp32", "--out", "run",
               "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])  # rank 0 prints it, once
    assert res["steps"] == 2 and res["val_loss"] > 0
    assert (tmp_path / "run/ckpt-00000002/dcp/.metadata").is_file()
    exp = _cli(GPT, "--out", "run", "--export-checkpoint", "single", cwd=tmp_path)
    assert exp.returncode == 0, exp.stderr
    state = load_checkpoint(tmp_path / "single/ckpt-00000002", _built(GPT))
    assert state["step"] == 2


def test_layout_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    bad = _cli(GPT, "--nproc", "2", "--ep", "3", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --ep 3 must divide --nproc 2")
    alone = _cli(ROUTED, "--ep", "2", "--steps", "1", "--out", "x", cwd=tmp_path)
    assert alone.returncode == 1 and "Traceback" not in alone.stderr
    assert "--ep 2 must divide the number of processes (1)" in alone.stderr
    none = _cli(GPT, "--out", "nothing", "--export-checkpoint", "y", cwd=tmp_path)
    assert none.returncode == 1 and "has no sharded checkpoint" in none.stderr


def test_search_workers_each_get_their_own_gpu() -> None:
    from blockdsl.search.run import worker_env

    base = {"PATH": "/bin"}
    assert [worker_env(i, "cuda", base, 4)["CUDA_VISIBLE_DEVICES"] for i in range(5)] == \
        ["0", "1", "2", "3", "0"]
    # a visible list is what gets divided; the CPU, one GPU and a pinned device stay as asked
    vis = {**base, "CUDA_VISIBLE_DEVICES": "2,5"}
    assert [worker_env(i, "cuda", vis, 2)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == \
        ["2", "5", "2"]
    assert worker_env(1, "cpu", base, 4) == base
    assert worker_env(1, "cuda", base, 1) == base
    assert worker_env(1, "cuda:1", base, 4) == base
