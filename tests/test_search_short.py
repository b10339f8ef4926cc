"""Short searches a newcomer runs first: the start design, what the run says it found, the
history plot when nothing but the baseline trained, the training budget's unit, and how
optuna-dashboard reads the stored trials.

Everything goes through the real CLI in a subprocess on the tiny space of test_search.py
(a few training steps per trial), with the default journal storage.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from blockdsl import search as S
from tests.test_search import TINY

ROOT = Path(__file__).resolve().parent.parent

# Parameters equal the baseline's for the attention/FFN swaps and more heads; a wider FFN
# (f=128) has more, so the start design leaves it out (the IR already says it is infeasible)
# and has three neighbours to train.
PARAMS_BOUND = TINY.replace("  minimize val_loss", "  minimize val_loss\n  params <= 1.0 * baseline")
# Nothing but the baseline is feasible: the history plot and the verdict of an empty search.
NOTHING = TINY.replace("  minimize val_loss", "  minimize val_loss\n  params <= 0.5 * baseline"
                       ).replace("heartbeat=1)", "heartbeat=1, pace=0.05)")


def _run(tmp_path: Path, *args: str, text: str = TINY) -> subprocess.CompletedProcess:
    (tmp_path / "tiny.block").write_text(text)
    return subprocess.run([sys.executable, "-m", "blockdsl.cli", "search", "tiny.block",
                           "--no-live", "--threads", "1", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def _study(tmp_path: Path, name: str) -> optuna.Study:
    storage = S.open_storage(str(tmp_path / "studies" / f"{name}.journal"), name)
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    tmp = tmp_path_factory.mktemp("short")
    r = _run(tmp, "--study", "short", "--budget", "5", "--baseline-steps", "3", "--json",
             text=PARAMS_BOUND)
    assert r.returncode == 0, r.stderr
    return tmp, json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.fixture(scope="module")
def empty_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("empty")
    r = _run(tmp, "--study", "none", "--budget", "4", "--seconds", "0.3", text=NOTHING)
    assert r.returncode == 0, r.stderr
    return tmp, r.stdout


def test_the_start_design_is_the_baselines_neighbourhood(short_run: tuple[Path, dict, str]) -> None:
    tmp, summary, _ = short_run
    trials = _study(tmp, "short").get_trials()
    assert [t.user_attrs.get("role") for t in trials[:4]] == ["baseline"] + ["start"] * 3
    point, dist = S.baseline_point(S.load_space(tmp / "tiny.block"))
    assert dist == 0  # the baseline is a point of this space
    hashes = {trials[0].user_attrs["arch_hash"]}
    for t in trials[1:4]:
        changed = {k for k in t.params if point.get(k) != t.params[k]}
        assert len(changed - (set(t.params) - set(point))) == 1, t.params  # one change
        assert t.user_attrs["arch_hash"] not in hashes  # new architectures only
        assert t.user_attrs["status"] in ("trained", "pruned")  # all three feasible
        hashes.add(t.user_attrs["arch_hash"])
    assert summary["searched"] == 4 and summary["feasible_trained"] >= 3


def test_the_start_design_fits_in_a_budget_smaller_than_it(tmp_path: Path) -> None:
    """Neighbours enqueued past the budget were picked up and closed as "surplus" trials."""
    r = _run(tmp_path, "--study", "two", "--budget", "2", "--baseline-steps", "3")
    assert r.returncode == 0, r.stderr
    trials = _study(tmp_path, "two").get_trials()
    assert [t.user_attrs.get("role") for t in trials] == ["baseline", "start"]
    assert all(t.user_attrs.get("status") != "surplus" for t in trials)


def test_the_run_says_what_it_found(short_run: tuple[Path, dict, str]) -> None:
    _, s, _ = short_run
    assert (f"{s['feasible_trained']} of 4 searched trials trained a new block within "
            "params <= 1.0 * baseline") in s["verdict"]
    if s["beats_baseline"]:
        assert "; best block: trial" in s["verdict"] and s["files"]["blocks"]
    else:
        assert s["verdict"].startswith("no searched block beat the baseline (trial 0), so no "
                                       "best.block: ")
        assert s["files"]["blocks"] == []
    shows = s["files"]["plot_shows"]
    assert shows["trained"] + shows["pruned"] == s["feasible_trained"]


def test_baseline_steps_is_the_training_budget(short_run: tuple[Path, dict, str]) -> None:
    tmp, summary, stderr = short_run
    assert "3 baseline steps of training each" in stderr
    assert summary["baseline"]["steps"] == 3
    for t in _study(tmp, "short").get_trials()[1:]:
        if "step_budget" in t.user_attrs:  # k times faster: k times the steps
            want = max(1, round(3 / max(0.05, t.user_attrs["step_time_ratio"])))
            assert t.user_attrs["step_budget"] == want


def _dashboard_trials(journal: Path, name: str) -> list[dict]:
    """The trial list as optuna-dashboard's own app serves it to its frontend."""
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard._app import create_app

    storage = S.open_storage(str(journal), name)
    env: dict = {}
    setup_testing_defaults(env)
    env.update(REQUEST_METHOD="GET",
               PATH_INFO=f"/api/studies/{storage.get_study_id_from_name(name)}")
    got: list[str] = []
    body = b"".join(create_app(storage)(env, lambda status, headers, exc=None: got.append(status)))
    assert got[0].startswith("200"), body[:300]
    return json.loads(body)["trials"]


def test_optuna_dashboard_shows_infeasible_trials_as_infeasible(
        short_run: tuple[Path, dict, str], empty_run: tuple[Path, str]) -> None:
    """The dashboard marks a trial infeasible by its `constraints` list (a positive value);
    Optuna 5's `constraints:<name>` attributes alone left that list empty, so it showed
    every infeasible trial as a completed result of ln 256."""
    pytest.importorskip("optuna_dashboard")
    seen = {True: 0, False: 0}
    for journal, name in ((short_run[0] / "studies" / "short.journal", "short"),
                          (empty_run[0] / "studies" / "none.journal", "none")):
        trials = _study(journal.parent.parent, name).get_trials()
        for t in _dashboard_trials(journal, name):
            ours = trials[t["number"]]
            infeasible = any(v > 0 for v in ours.constraints.values())
            assert len(t["constraints"]) == 1, t  # one per constraint of the space
            assert (t["constraints"][0] > 0) == infeasible, (t["number"], ours.user_attrs)
            status = ours.user_attrs["status"]
            if status == "infeasible" or ours.user_attrs.get("copied_status") == "infeasible":
                assert infeasible
            seen[infeasible] += 1
    assert seen[True] >= 3 and seen[False] >= 4  # both kinds were checked


def test_nothing_feasible_says_why_and_still_plots_what_it_tried(empty_run: tuple[Path, str]) -> None:
    tmp, stdout = empty_run
    out = " ".join(stdout.split())
    # --seconds with the space's fixed pace: steps, and the header says so.
    assert "6 baseline steps of training each (0.3 s at the space's pace of 0.05 s/step" in out
    assert ("found: no best.block: none of the 3 searched trials trained a block (3 broke "
            "params <= 0.5 * baseline)") in out
    s = json.loads((tmp / "studies" / "none" / "summary.json").read_text())
    assert s["baseline"]["steps"] == 6 and s["best"] == [] and s["beats_baseline"] is False
    assert not (tmp / "studies" / "none" / "best.block").exists()
    assert s["files"]["plot_shows"] == {"trained": 0, "pruned": 0, "repeats": 0,
                                        "infeasible": 3, "baseline": 1}
    assert (tmp / "studies" / "none" / "history.png").stat().st_size > 10_000


def test_a_bad_step_budget_is_one_line_and_exit_1(tmp_path: Path) -> None:
    r = _run(tmp_path, "--study", "bad", "--baseline-steps", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("blockdsl search: error: argument "
                                                 "--baseline-steps: expected a positive integer, got 0")
    # The same in a space's budget line, where argparse does not look.
    r = _run(tmp_path, "--study", "bad2", text=TINY.replace("heartbeat=1)", "heartbeat=1, baseline_steps=0)"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("tiny.block:19:") and first.endswith(
        "error: budget setting baseline_steps=0 must be an integer >= 1")


def test_the_default_space_contains_its_baseline() -> None:
    """The default space's start design begins at the baseline itself: one-change neighbours
    of it, none of them the baseline, all different, in a seeded order."""
    sp = S.load_space(ROOT / "search" / "brainformer.block")
    point, dist = S.baseline_point(sp)
    assert dist == 0 and point["d"] == 48 and point["n_slots"] == 6
    nb = S.neighbourhood(sp, 10, seed=0)
    assert len(nb) == 10 and len({json.dumps(p, sort_keys=True) for p in nb}) == 10
    assert point not in nb and nb == S.neighbourhood(sp, 10, seed=0)


def test_a_budget_of_the_baseline_alone_says_nothing_was_searched() -> None:
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study()
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=2.5,
                                 user_attrs={"status": "trained", "role": "baseline"}))
    s = S.summarize(study)
    assert (s["searched"], s["feasible_trained"], s["beats_baseline"]) == (0, 0, False)
    assert s["verdict"] == ("no best.block: the budget ran the baseline only, nothing was "
                            "searched (raise --budget)")
