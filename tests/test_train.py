"""The training loop on real text (the stdlib corpus) and real digits: no mocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from blockdsl.nn.output import ModelOutput
from blockdsl.taskio import TaskIO
from blockdsl.train import (
    TrainConfig,
    TrainError,
    accumulate_gradients,
    latest_checkpoint,
    lr_at,
    param_groups,
    seed_everything,
    train,
)

REPO = Path(__file__).resolve().parents[1]


class TinyGPT(nn.Module):
    """A conforming stand-in for a compiled spec: tied embeddings, dropout, optional aux."""

    task = "lm"

    def __init__(self, vocab: int = 256, d: int = 32, layers: int = 2, heads: int = 2,
                 seq_len: int = 32, dropout: float = 0.0, aux: bool = False) -> None:
        super().__init__()
        self.io = TaskIO("lm", seq=seq_len, vocab=vocab)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq_len, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: safetensors must cope with sharing
        self.with_aux = aux
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        h = self.blocks(self.tok(x) + self.pos[:t], mask=mask, is_causal=True)
        logits = self.head(self.norm(h))
        aux = {}
        if self.with_aux:
            aux["z"] = 1e-3 * torch.logsumexp(logits.float(), -1).pow(2).mean()
        return ModelOutput(logits, aux)


class TinyCNN(nn.Module):
    task = "classify"

    def __init__(self, image_size: int = 8, channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.io = TaskIO("classify", image_size=image_size, channels=channels,
                         classes=num_classes)
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(16 * 16, num_classes),
        )

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(self.net(x))


def gpt(seed: int = 0, **kw: object) -> TinyGPT:
    seed_everything(seed)
    return TinyGPT(**kw)  # type: ignore[arg-type]


FAST = dict(batch_size=8, lr=3e-3, warmup=5, eval_every=10, eval_batches=4, quiet=True,
            precision="fp32")


@pytest.fixture(autouse=True)
def _env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private cache; one thread, since these models are too small to gain from two and
    OpenMP barriers cost 100x when another process holds the second core."""
    monkeypatch.setenv("BLOCKDSL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_model_without_a_task_shape_is_a_train_error_not_a_crash() -> None:
    """A plain module (no `.io`, no `.task`) is the user's mistake, named as one (exit 1 in
    the CLI), as is a model whose TaskIO lacks what its data needs."""
    with pytest.raises(TrainError, match="model task None is not one of 'lm', 'classify'"):
        train(nn.Linear(2, 2), TrainConfig(steps=1, quiet=True))
    bare = TinyGPT()
    bare.io = TaskIO("lm", seq=8)  # no vocabulary
    with pytest.raises(TrainError, match="task shape has no vocab"):
        train(bare, TrainConfig(steps=1, quiet=True))


def test_val_loss_falls_on_default_corpus(tmp_path: Path) -> None:
    r = train(gpt(aux=True), TrainConfig(steps=40, out=tmp_path, flops_per_token=1e5, **FAST))
    assert r.steps == 40 and r.stopped_by == "budget"
    assert r.val["val_loss"] < r.first_val["val_loss"] - 1.0
    assert r.val["val_bpb"] == pytest.approx(r.val["val_loss"] / 0.6931471805599453)
    assert r.aux["z"] > 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {x["kind"] for x in lines} == {"train", "eval", "summary"}
    assert "aux/z" in next(x for x in lines if x["kind"] == "train")
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert r.mfu is not None and 0 < r.mfu < 1
    assert r.checkpoint is not None and latest_checkpoint(tmp_path) == r.checkpoint


def test_digits_classifier_learns() -> None:
    seed_everything(0)
    r = train(TinyCNN(), TrainConfig(steps=60, batch_size=32, lr=1e-2, warmup=5, eval_every=30,
                                      quiet=True, eval_batches=None))
    assert r.val["val_acc"] > 0.6 > r.first_val["val_acc"]


def test_same_seed_same_losses() -> None:
    cfg = TrainConfig(steps=6, **FAST)
    assert train(gpt(dropout=0.1), cfg).losses == train(gpt(dropout=0.1), cfg).losses


def test_resume_equals_straight_run(tmp_path: Path) -> None:
    cfg = dict(steps=20, **{**FAST, "precision": "bf16"})
    straight = train(gpt(dropout=0.1), TrainConfig(out=tmp_path / "a", **cfg))
    # stop the second run at step 10 through the eval callback; it checkpoints on the way out
    first = train(gpt(dropout=0.1), TrainConfig(out=tmp_path / "b", **cfg),
                  on_eval=lambda step, m: step == 10)
    assert first.stopped_by == "callback" and first.steps == 10
    resumed = train(gpt(seed=123, dropout=0.1),
                    TrainConfig(out=tmp_path / "b", resume=True, **cfg))
    assert resumed.steps == 20
    assert resumed.losses == pytest.approx(straight.losses[10:], rel=1e-6, abs=1e-7)
    assert resumed.val["val_loss"] == pytest.approx(straight.val["val_loss"], rel=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()
             if '"train"' in x]
    assert steps == [10, 20]  # one line per log window, none duplicated by the resume


def test_corrupt_checkpoint_is_named_and_kept(tmp_path: Path) -> None:
    train(gpt(), TrainConfig(steps=3, out=tmp_path, **FAST))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None
    weights = ckpt / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(TrainError, match="corrupt") as e:
        train(gpt(), TrainConfig(steps=6, out=tmp_path, resume=True, **FAST))
    assert "\n" not in str(e.value) and str(ckpt) in str(e.value)
    assert weights.read_bytes() == bytes(raw)  # nothing already written is lost


def test_existing_checkpoint_needs_resume(tmp_path: Path) -> None:
    train(gpt(), TrainConfig(steps=2, out=tmp_path, **FAST))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TrainError, match="already holds a checkpoint"):
        train(gpt(), TrainConfig(steps=2, out=tmp_path, **FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("model", "kw", "message"),
    [
        (lambda: gpt(), {"data": "/nonexistent/corpus.txt"}, "data path not found"),
        (lambda: gpt(vocab=100), {}, "vocab_size 100 is smaller than the 256 byte"),
        (lambda: gpt(), {"seq_len": 64}, "seq_len 64 must be between 1 and the model's"),
        (lambda: TinyCNN(image_size=4), {}, "image size 4 is smaller than the 8x8"),
        (lambda: TinyCNN(num_classes=5), {}, "has 10 classes but the model only 5"),
        (lambda: gpt(), {"precision": "fp16"}, "precision 'fp16' is not one of"),
        (lambda: gpt(), {"batch_size": 6, "accum": 4}, "must divide evenly"),
    ],
)
def test_bad_input_is_one_line(model, kw: dict, message: str) -> None:  # noqa: ANN001
    with pytest.raises(TrainError, match=message) as e:
        train(model(), TrainConfig(steps=1, **{**FAST, **kw}))
    assert "\n" not in str(e.value)


def test_empty_file_and_unwritable_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TrainError, match="data is empty"):
        train(gpt(), TrainConfig(steps=1, data=empty, **FAST))
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    with pytest.raises(TrainError, match="cannot write to output folder"):
        train(gpt(), TrainConfig(steps=1, out=blocker / "run", **FAST))
    assert blocker.read_text() == "keep me"


def test_wall_clock_budget_stops() -> None:
    r = train(gpt(), TrainConfig(seconds=1.0, eval_every=1000, **{
        k: v for k, v in FAST.items() if k != "eval_every"}))
    assert r.stopped_by == "budget"
    assert 1.0 <= r.train_seconds < 1.5 and r.steps > 3
    assert r.wall_seconds < 10


def test_ctrl_c_checkpoints_and_exits(tmp_path: Path) -> None:
    def interrupt(step: int, metrics: dict[str, float]) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = {**FAST, "eval_every": 2}
    r = train(gpt(), TrainConfig(steps=50, out=tmp_path, **cfg), on_eval=interrupt)
    assert r.stopped_by == "interrupt" and r.steps == 5
    assert r.checkpoint == latest_checkpoint(tmp_path) and r.checkpoint.name.endswith("5")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_callback_exception_propagates() -> None:
    class Pruned(Exception):
        pass

    def prune(step: int, metrics: dict[str, float]) -> None:
        if step == 10:
            raise Pruned

    with pytest.raises(Pruned):
        train(gpt(), TrainConfig(steps=30, **FAST), on_eval=prune)


def test_accumulation_gives_the_batch_gradient() -> None:
    from blockdsl.train.data import load_text

    x, y = load_text(None, 32).train_batch(0, 8, seed=0)
    grads = []
    for accum in (1, 2, 4):
        m = gpt(aux=True)
        loss, aux = accumulate_gradients(m, x, y, accum, "fp32", torch.device("cpu"))
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-6)
    a = train(gpt(), TrainConfig(steps=4, **FAST))
    b = train(gpt(), TrainConfig(steps=4, accum=2, **FAST))
    assert b.losses == pytest.approx(a.losses, rel=1e-4)


def test_weight_decay_groups() -> None:
    m = gpt()
    decay, no_decay = param_groups(m, 0.1)
    ids = {id(p) for p in decay["params"]}
    assert id(m.tok.weight) in ids and id(m.pos) in ids  # embeddings are matrices: decayed
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.ndim < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert id(m.norm.weight) in {id(p) for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_at(9, 0.0, cfg) == pytest.approx(1.0)
    assert lr_at(50, 0.5, cfg) == pytest.approx(0.55)
    assert lr_at(99, 1.0, cfg) == pytest.approx(0.1)


def test_precision_is_restored() -> None:
    before = torch.get_float32_matmul_precision()
    train(gpt(), TrainConfig(steps=2, **{**FAST, "precision": "fp32-medium"}))
    assert torch.get_float32_matmul_precision() == before


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from tests.test_train import TinyGPT, FAST
    from blockdsl.train import TrainConfig, seed_everything, train
    seed_everything(0)
    model = TinyGPT(aux=True)
    r = train(model, TrainConfig(steps=4, **FAST))
    rank = int(os.environ["RANK"])
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(flat, sys.argv[1] + f"/params{rank}.pt")
    json.dump({"losses": r.losses, "val": r.val}, open(sys.argv[1] + f"/r{rank}.json", "w"))
""")


def test_ddp_two_processes_match_single(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p0, p1 = (torch.load(tmp_path / f"params{r}.pt") for r in (0, 1))
    assert torch.equal(p0, p1)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    model = gpt(aux=True)
    single = train(model, TrainConfig(steps=4, **FAST))
    assert r0["losses"] == pytest.approx(single.losses, rel=1e-4)
    assert r0["val"]["val_loss"] == pytest.approx(single.val["val_loss"], rel=1e-4)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(p0, flat, rtol=1e-3, atol=1e-4)


SPEC_FAST = dict(batch_size=8, seq_len=32, lr=3e-3, warmup=5, eval_every=10, eval_batches=2,
                 quiet=True, log_every=5)


def test_compiled_tiny_gpt_trains_and_resumes(tmp_path: Path) -> None:
    import blockdsl

    def build() -> nn.Module:
        seed_everything(0)
        return blockdsl.build(REPO / "specs/tiny/gpt.block", device="cpu", precision="bf16")

    straight = train(build(), TrainConfig(steps=20, **SPEC_FAST))
    assert straight.val["val_loss"] < straight.first_val["val_loss"] - 1.0
    cfg = TrainConfig(steps=20, out=tmp_path, **SPEC_FAST)
    train(build(), cfg, on_eval=lambda step, m: step == 10)
    resumed = train(build(), TrainConfig(**{**asdict(cfg), "resume": True}))
    assert resumed.losses == pytest.approx(straight.losses[10:], rel=1e-6, abs=1e-7)


def test_cli_train_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blockdsl.cli import main

    spec = str(REPO / "specs/tiny/vit.block")
    out = tmp_path / "run"
    rc = main(["train", spec, "--steps", "6", "--batch-size", "16", "--eval-every", "3",
               "--out", str(out), "--precision", "fp32"])
    assert rc == 0
    assert "val accuracy" in capsys.readouterr().out
    assert (out / "loss.png").is_file() and latest_checkpoint(out) is not None
    rc = main(["train", spec, "--steps", "12", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "already holds a checkpoint" in err
    rc = main(["train", str(REPO / "specs/tiny/gpt.block"), "--data", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip() == f"error: data path not found: {tmp_path / 'nope'}"


# ----------------------------------------------------------------------------- diverging runs, flags


def _strict_rows(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: a bare NaN/Infinity fails the test."""
    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in {path}: not JSON")

    return [json.loads(line, parse_constant=no_constants)
            for line in path.read_text().splitlines()]


CLI_FAST = ["--batch-size", "4", "--seq-len", "32", "--warmup", "3", "--eval-batches", "1",
            "--precision", "fp32", "--quiet"]


def test_cli_huge_lr_stops_at_the_step_and_keeps_the_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blockdsl.cli import main

    spec = str(REPO / "specs/tiny/gpt.block")
    out = tmp_path / "run"
    rc = main(["train", spec, "--lr", "1e30", "--steps", "30", "--ckpt-every", "1",
               "--eval-every", "10", "--out", str(out), *CLI_FAST])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: non-finite ") and " at step 2: training diverged" in err
    assert f"the last checkpoint, {out / 'ckpt-00000001'}, is kept" in err
    # the weights that produced the NaN were never checkpointed; step 1's still load
    assert latest_checkpoint(out) == out / "ckpt-00000001"
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000001"]
    rows = _strict_rows(out / "metrics.jsonl")
    assert rows[-1] == {"kind": "error", "step": 2, "loss": None,
                        "error": err.split(": training")[0].removeprefix("error: ")}
    assert "NaN" not in (out / "metrics.jsonl").read_text()


class EvalNaNGPT(TinyGPT):
    """Trains normally, but from step `bad` on its eval-mode forward gives NaN logits
    (as a BatchNorm with corrupted running statistics would)."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = super().forward(x)
        if self.training:
            self.steps_seen += 1
        elif self.steps_seen >= self.bad:
            return ModelOutput(out.logits * float("nan"), out.aux)
        return out


def test_nan_validation_loss_stops_without_checkpointing(tmp_path: Path) -> None:
    seed_everything(0)
    with pytest.raises(TrainError) as e:
        train(EvalNaNGPT(bad=4), TrainConfig(steps=20, out=tmp_path, ckpt_every=2,
                                             **{**FAST, "eval_every": 2}))
    msg = str(e.value)
    assert msg.startswith("non-finite validation loss (nan) at step 4: training diverged")
    assert f"the last checkpoint, {tmp_path / 'ckpt-00000002'}, is kept" in msg
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000002"
    assert not (tmp_path / "ckpt-00000004").exists()
    rows = _strict_rows(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in rows] == [("eval", 0), ("eval", 2), ("error", 4)]


def test_library_run_stops_on_nan_before_the_update() -> None:
    model = gpt()
    with pytest.raises(TrainError, match=r"non-finite .* at step \d+: training diverged") as e:
        train(model, TrainConfig(steps=20, **{**FAST, "lr": 1e30, "eval_every": 100}))
    assert "\n" not in str(e.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no NaN update applied


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--lr", "nan", "a finite number > 0"), ("--lr", "-1", "a finite number > 0"),
    ("--lr", "inf", "a finite number > 0"), ("--lr", "0", "a finite number > 0"),
    ("--batch-size", "0", "an integer > 0"), ("--steps", "-5", "an integer > 0"),
    ("--batch", "0", "an integer > 0"), ("--seq", "-2", "an integer > 0"),
    ("--steps", "2.5", "an integer > 0"), ("--seq-len", "0", "an integer > 0"),
    ("--warmup", "-1", "an integer >= 0"), ("--seconds", "inf", "a finite number > 0"),
    ("--weight-decay", "nan", "a finite number >= 0"), ("--eval-every", "0", "an integer > 0"),
    ("--accum", "0", "an integer > 0"), ("--ckpt-every", "0", "an integer > 0"),
])
def test_cli_train_flags_are_validated(flag: str, value: str, expected: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from blockdsl.cli import main

    with pytest.raises(SystemExit) as exc:  # argparse's usage error, before anything runs
        main(["train", str(REPO / "specs/tiny/gpt.block"), flag, value,
              "--out", str(tmp_path / "run")])
    assert exc.value.code == 1  # a user mistake; 2 is kept for internal errors
    err = capsys.readouterr().err
    assert f"argument {flag}: expected {expected}, got '{value}'" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_library_rejects_non_finite_settings() -> None:
    for kw, msg in (({"lr": float("nan")}, "lr must be a positive finite"),
                    ({"lr": -1.0}, "lr must be a positive finite"),
                    ({"seconds": float("inf")}, "seconds must be a positive finite"),
                    ({"weight_decay": float("nan")}, "weight_decay must be a finite")):
        with pytest.raises(TrainError, match=msg):
            train(gpt(), TrainConfig(steps=1, **{**FAST, **kw}))


# ----------------------------------------------------------------------------- resuming through the CLI

RESUME_FAST = ["--batch-size", "4", "--seq-len", "32", "--warmup", "10", "--eval-batches", "1",
               "--precision", "fp32", "--quiet", "--eval-every", "7"]


def _rows(out: Path, kinds: tuple[str, ...] = ("train", "eval")) -> list[dict]:
    """Metrics rows without the wall-clock fields, which no two runs share."""
    rows = [r for r in _strict_rows(out / "metrics.jsonl") if r["kind"] in kinds]
    for r in rows:
        r.pop("tokens_per_s", None)
        r.pop("train_seconds", None)
    return rows


def test_cli_resume_mid_window_logs_what_the_straight_run_logs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """7 steps, then resume to 20, against 20 straight: the train window of steps 1-10 is
    split by the resume, yet every train row (loss, aux losses) and eval row is equal.
    Warm-up covers the first 7 steps, so the short first run's schedule is the same."""
    from blockdsl.cli import main

    spec = str(REPO / "specs/tiny/moeut.block")  # routed layers: aux losses are logged too
    assert main(["train", spec, "--steps", "20", "--out", str(tmp_path / "a"), *RESUME_FAST]) == 0
    assert main(["train", spec, "--steps", "7", "--out", str(tmp_path / "b"), *RESUME_FAST]) == 0
    assert main(["train", spec, "--steps", "20", "--out", str(tmp_path / "b"), "--resume",
                 *RESUME_FAST]) == 0
    capsys.readouterr()
    straight, resumed = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [(r["kind"], r["step"]) for r in resumed] == [
        ("eval", 0), ("eval", 7), ("train", 10), ("eval", 14), ("train", 20), ("eval", 20)]
    assert any(k.startswith("aux/") for k in resumed[2])
    assert resumed == straight  # exact: eval losses bit for bit, train windows too


def _checkpointed_run(tmp_path: Path) -> Path:
    from blockdsl.cli import main

    out = tmp_path / "run"
    assert main(["train", str(REPO / "specs/tiny/gpt.block"), "--steps", "6", "--ckpt-every",
                 "2", "--out", str(out), *RESUME_FAST]) == 0
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000004", "ckpt-00000006"]
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_cli_resume_without_latest_takes_the_newest_loadable_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blockdsl.cli import main

    spec = str(REPO / "specs/tiny/gpt.block")
    out = _checkpointed_run(tmp_path)
    capsys.readouterr()
    (out / "latest").unlink()
    weights = out / "ckpt-00000006/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-9])  # the newest is damaged
    before = _snapshot(out)
    # without --resume, a folder of checkpoints is never trained over
    rc = main(["train", spec, "--steps", "8", "--out", str(out), *RESUME_FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "already holds a checkpoint (ckpt-00000006)" in err
    assert _snapshot(out) == before
    kept = [r for r in _rows(out) if r["step"] <= 4]
    rc = main(["train", spec, "--steps", "8", "--ckpt-every", "2", "--out", str(out), "--resume",
               *[a for a in RESUME_FAST if a != "--quiet"]])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"note: {out} has no 'latest': resuming from ckpt-00000004, the newest checkpoint " \
           "that loads (skipped ckpt-00000006: " in err
    rows = _rows(out)
    assert rows[: len(kept)] == kept and [r["step"] for r in rows[len(kept):]] == [7, 8]
    assert (out / "latest").read_text() == "ckpt-00000008"
    # the damaged ckpt-6 was replaced by this run's own step-6 checkpoint
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000006", "ckpt-00000008"]
    import blockdsl
    from blockdsl.train import load_checkpoint

    assert load_checkpoint(out / "ckpt-00000006", blockdsl.build(spec, device="cpu"))["step"] == 6


def test_cli_resume_refuses_when_no_checkpoint_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blockdsl.cli import main

    out = _checkpointed_run(tmp_path)
    (out / "latest").unlink()
    for ckpt in out.glob("ckpt-*"):
        (ckpt / "meta.json").write_text("{")
    before = _snapshot(out)
    capsys.readouterr()
    rc = main(["train", str(REPO / "specs/tiny/gpt.block"), "--steps", "8", "--out", str(out),
               "--resume", *RESUME_FAST])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"error: {out} has no 'latest' and none of its checkpoints loads (ckpt-00000006: " in err
    assert "nothing was changed" in err
    assert _snapshot(out) == before  # metrics.jsonl and the checkpoints are untouched


def test_cli_resume_of_a_folder_without_checkpoints_says_it_starts_afresh(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blockdsl.cli import main

    out = tmp_path / "typo"
    rc = main(["train", str(REPO / "specs/tiny/gpt.block"), "--steps", "2", "--out", str(out),
               "--resume", *RESUME_FAST])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"note: {out} holds no checkpoint to resume: starting a new run there" in err
    assert (out / "metrics.jsonl").is_file()


@pytest.mark.parametrize("pointer", ["../../../../etc", "/etc", "ckpt-00000004/../../x",
                                     "ckpt-outside"])
def test_cli_resume_never_follows_latest_out_of_the_run_folder(
        pointer: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from blockdsl.cli import main

    out = _checkpointed_run(tmp_path)
    if pointer == "ckpt-outside":  # a well-named symlink to a real checkpoint elsewhere
        elsewhere = tmp_path / "elsewhere"
        shutil.copytree(out / "ckpt-00000006", elsewhere)
        pointer = "ckpt-00000009"
        (out / pointer).symlink_to(elsewhere)
    (out / "latest").write_text(pointer)
    before = _snapshot(out)
    capsys.readouterr()
    rc = main(["train", str(REPO / "specs/tiny/gpt.block"), "--steps", "8", "--out", str(out),
               "--resume", *RESUME_FAST])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"error: {out / 'latest'} names {pointer!r}, not a ckpt-<step> folder inside" in err
    assert "refusing to follow it" in err
    assert _snapshot(out) == before
