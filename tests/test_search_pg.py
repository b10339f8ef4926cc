"""Two worker processes on two "machines" (separate `blockdsl search` drivers) share one
study in a real PostgreSQL server. `.ci/run` starts it with scripts/pg-test.sh and exports
BLOCKDSL_PG_URL; without the variable this test is skipped. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.test_search import TINY

PG_URL = os.environ.get("BLOCKDSL_PG_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,  # two worker processes that train: 20-45 s
    pytest.mark.skipif(not PG_URL, reason="BLOCKDSL_PG_URL not set (scripts/pg-test.sh starts a server)"),
]


def test_two_workers_complete_the_budget_without_duplicates(tmp_path: Path) -> None:
    import optuna
    import psycopg  # noqa: F401  (the `postgres` extra: with a server given, a missing driver fails)

    from blockdsl import search as S

    S.quiet_optuna()
    space = tmp_path / "tiny.block"
    space.write_text(TINY)
    name = f"pg-{uuid.uuid4().hex[:8]}"
    budget = 8
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "blockdsl.cli", "search", str(space), "--study", name,
           "--storage", PG_URL, "--budget", str(budget), "--threads", "1", "--no-live"]
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / f"out{i}")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)

    storage = S.open_storage(PG_URL, name)
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        counted = S.counted_trials(trials)
        assert len(counted) == budget, [(t.number, t.state, t.user_attrs) for t in trials]
        assert all(t.state.is_finished() for t in trials)
        numbers = [t.number for t in trials]
        assert len(numbers) == len(set(numbers))
        pids = {t.system_attrs[S.ATTR + "worker"]["pid"] for t in counted
                if S.ATTR + "worker" in t.system_attrs}
        assert len(pids) == 2, "both workers ran trials"
        trained: dict[str, list[int]] = {}
        for t in trials:  # no architecture trained twice, even by two workers at once
            if t.user_attrs.get("status") in ("trained", "pruned"):
                trained.setdefault(t.user_attrs["arch_hash"], []).append(t.number)
        assert trained and all(len(v) == 1 for v in trained.values()), trained
        baselines = [t for t in trials if t.user_attrs.get("role") == "baseline"]
        assert baselines and baselines[0].number == 0
    finally:
        optuna.delete_study(study_name=name, storage=storage)


def test_a_worker_killed_mid_trial_is_retried_on_resume(tmp_path: Path) -> None:
    """kill -9 of a PostgreSQL worker while it trains: the resume fails the lost trial (its
    process is gone), re-runs it, and finishes the budget. No torn tail can exist here: every
    write is a transaction."""
    import signal
    import time

    import optuna
    from optuna.trial import TrialState

    from blockdsl import search as S

    S.quiet_optuna()
    (tmp_path / "tiny.block").write_text(TINY)
    name = f"pgk-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "blockdsl.cli", "search", "--study", name, "--storage", PG_URL,
           "--budget", "4", "--threads", "1", "--no-live"]
    proc = subprocess.Popen(cmd[:4] + ["tiny.block"] + cmd[4:], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    storage = S.open_storage(PG_URL, name)
    victim = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and victim is None:
            time.sleep(0.3)
            try:
                ts = optuna.load_study(study_name=name, storage=storage).get_trials()
            except KeyError:
                continue
            training = [t for t in ts if t.state == TrialState.RUNNING
                        and S.ATTR + "ticket" in t.system_attrs]
            if any(t.state.is_finished() for t in ts) and training:
                victim = training[0].number
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert victim is not None, proc.stdout.read() if proc.stdout else ""
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        ts = optuna.load_study(study_name=name, storage=storage).get_trials()
        assert ts[victim].state == TrialState.FAIL and ts[victim].user_attrs["status"] == "lost"
        retries = [t for t in ts if t.user_attrs.get("retry_of") == victim]
        assert len(retries) == 1 and retries[0].state.is_finished()
        assert len(S.counted_trials(ts)) == 4 and all(t.state.is_finished() for t in ts)
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(KeyError):  # never created if the first run failed early
            optuna.delete_study(study_name=name, storage=storage)
