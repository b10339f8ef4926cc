"""Running a comparison's (model, seed) runs: here, or in worker processes; resumably.

Each run is an ordinary `train` run in `<out>/runs/<label>/seed-<s>/` (metrics.jsonl,
checkpoints every evaluation), trained from the comparison's saved spec with its resume
machinery. A run counts as finished only once its `result.json` is written (atomically,
after training returns normally), so after a kill: finished runs are kept as they are, the
interrupted one resumes from its last checkpoint (the loop makes a resumed run see the
same batches as an uninterrupted one), and runs not yet started start.

Why worker processes rather than threads: a run is CPU-bound torch and Python work, and
each process sets its own intra-op thread count (part of what makes numbers repeat). A
worker whose driver dies (killed) notices that its parent changed and stops as if given
Ctrl-C: its checkpoint is written and nothing trains on unobserved.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from blockdsl import files as fileio
from blockdsl.compare.setup import CompareConfig, CompareError, Entrant
from blockdsl.train.checkpoint import LATEST, checkpoint_folders

RESULT = "result.json"
Done = Callable[[str, int, dict[str, Any]], None]


def run_dir(out: Path, label: str, seed: int) -> Path:
    return Path(out) / "runs" / label / f"seed-{seed}"


def seeds_of(cfg: CompareConfig) -> list[int]:
    return list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))


def read_result(folder: Path) -> dict[str, Any] | None:
    """A finished run's result, or None (not finished, or its file is damaged)."""
    with contextlib.suppress(OSError, ValueError):
        r = json.loads((folder / RESULT).read_text())
        if isinstance(r, dict) and "val" in r:
            return r
    return None


def train_one(cfg: CompareConfig, label: str, seed: int) -> dict[str, Any] | None:
    """Train (or resume) one run to its budget and write its result.json; None when it was
    interrupted (Ctrl-C), leaving its checkpoint to resume from."""
    import torch

    from blockdsl.train.config import TrainConfig
    from blockdsl.train.spec import train_spec

    folder = run_dir(cfg.out, label, seed)
    has_ckpt = (folder / LATEST).exists() or bool(checkpoint_folders(folder))
    if folder.exists() and not has_ckpt:
        shutil.rmtree(folder)  # killed before its first checkpoint: nothing to keep
    threads = cfg.run_threads()
    torch.set_num_threads(threads)
    tc = TrainConfig(
        data=cfg.data, steps=cfg.steps, tokens=cfg.tokens, seconds=cfg.seconds,
        batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, warmup=cfg.warmup,
        weight_decay=cfg.weight_decay, precision=cfg.precision, eval_every=cfg.eval_every,
        eval_batches=cfg.eval_batches, seed=seed, out=folder, resume=has_ckpt,
        ckpt_every=cfg.eval_every, keep_checkpoints=1, device=cfg.device, quiet=True,
        progress=False, name=label, compile=cfg.compile,
    )
    spec = Path(cfg.out) / "specs" / f"{label}.block"
    r = train_spec(spec, None, tc, default_steps=cfg.steps or 1).result
    if r.stopped_by == "interrupt":
        return None
    result = {
        "label": label, "seed": seed, "threads": threads, "resumed": has_ckpt,
        "steps": r.steps, "tokens": r.tokens, "train_seconds": r.train_seconds,
        "val": r.val,
        "evals": [{"step": s, **{k: m[k] for k in ("val_loss", "tokens", "train_seconds")
                                 if k in m}} for s, m in r.evals],
    }
    fileio.atomic_write(folder / RESULT, (json.dumps(result, indent=1) + "\n").encode())
    return result


def pending(cfg: CompareConfig, ents: list[Entrant]) -> tuple[dict, list[tuple[str, int]]]:
    """({(label, seed): result} of finished runs, [(label, seed)] still to run), seed-major
    so that an early stop leaves every model with the same number of seeds."""
    done, todo = {}, []
    for seed in seeds_of(cfg):
        for e in ents:
            r = read_result(run_dir(cfg.out, e.label, seed))
            if r is not None:
                done[(e.label, seed)] = r
            else:
                todo.append((e.label, seed))
    return done, todo


def run_all(cfg: CompareConfig, todo: list[tuple[str, int]], on_done: Done) -> None:
    """Run `todo` here (workers 1) or in `cfg.workers` processes. Ctrl-C stops every run
    at a checkpoint and re-raises KeyboardInterrupt; failed runs raise CompareError once
    the others have finished."""
    if cfg.workers <= 1:
        for label, seed in todo:
            r = train_one(cfg, label, seed)
            if r is None:
                raise KeyboardInterrupt
            on_done(label, seed, r)
        return
    _run_processes(cfg, todo, on_done)


def _run_processes(cfg: CompareConfig, todo: list[tuple[str, int]], on_done: Done) -> None:
    queue, live, failed = list(todo), [], []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(cfg.run_threads())}
    try:
        while queue or live:
            while queue and len(live) < cfg.workers:
                label, seed = queue.pop(0)
                log = run_dir(cfg.out, label, seed).with_name(f"seed-{seed}.log")
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("wb") as fh:
                    p = subprocess.Popen(
                        [sys.executable, "-m", "blockdsl.compare", str(cfg.out), label,
                         str(seed), str(cfg.run_threads())],
                        env=env, stdout=subprocess.DEVNULL, stderr=fh)
                live.append((p, label, seed, log))
            time.sleep(0.2)
            for item in [x for x in live if x[0].poll() is not None]:
                live.remove(item)
                p, label, seed, log = item
                r = read_result(run_dir(cfg.out, label, seed))
                if p.returncode == 0 and r is not None:
                    on_done(label, seed, r)
                elif p.returncode == 130:
                    raise KeyboardInterrupt
                else:
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
                    failed.append(f"{label} seed {seed} (exit {p.returncode}: {tail[0]})")
    except KeyboardInterrupt:
        for p, *_ in live:  # they stop at a checkpoint; wait for them to write it
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, *_ in live:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    if failed:
        raise CompareError(f"{len(failed)} run(s) failed: " + "; ".join(failed)
                           + " (full messages in the .log next to each run folder)")


def worker_main(out: str, label: str, seed: str, threads: str) -> int:
    """`python -m blockdsl.compare OUT LABEL SEED THREADS`: train one run of the comparison
    in `OUT`; exit 0 when finished, 130 when stopped (its checkpoint kept)."""
    from blockdsl.compare.setup import SETUP_FILE
    from blockdsl.exits import exit_status

    def run() -> int:
        identity = json.loads((Path(out) / SETUP_FILE).read_text())["identity"]
        cfg = replace(CompareConfig(**identity), out=Path(out), threads=int(threads))
        _stop_when_orphaned()
        return 0 if train_one(cfg, label, int(seed)) is not None else 130

    return exit_status(run, internal_hint=False)


def _stop_when_orphaned() -> None:
    """Send ourselves SIGINT (the loop's clean stop) once the driver that started us is
    gone, so a killed `blockdsl compare` leaves no run training unobserved."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()
