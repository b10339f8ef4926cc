"""The search: choices as Optuna parameters, dedup, constraints, pruning, storage, kill/resume.

The end-to-end test runs the real CLI in subprocesses on a tiny space (about a second of
training per trial) with the default journal storage, SIGKILLs the worker mid-trial and
resumes the study. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from blockdsl import search as S
from blockdsl.lang.errors import BlockError
from blockdsl.lang.parse import load_module
from blockdsl.lang.resolve import resolve

ROOT = Path(__file__).resolve().parent.parent

# A tiny space: two slots over {attention, FFN} with a tied FFN width. Seven distinct
# architectures, so a handful of trials is bound to repeat one.
TINY = """
model dense {
  d = 32
  stem tokens(vocab=256, context=32, pos=learned)
  head lm(tie=true)
  block cell {
    s0 mha(heads=2, bias=false) norm=pre
    s1 mlp(d_ff=64, act=gelu, bias=false) norm=pre
  }
  repeat 2 cell
}
space tiny extends dense {
  f = {64 | 128}
  block cell {
    slots 2 of {mha(heads={2 | 4}, bias=false) | mlp(d_ff=f, act=gelu, bias=false)} norm=pre
  }
  baseline dense
  minimize val_loss
  budget search(trials=7, seconds=1, batch_size=8, eval_batches=2, prune_startup=2, heartbeat=1)
}
"""


@pytest.fixture(autouse=True)
def _quiet() -> None:
    S.quiet_optuna()


def _space(tmp_path: Path, text: str = TINY, name: str = "tiny.block") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _study(directions: list[str] | None = None) -> optuna.Study:
    return optuna.create_study(directions=directions or ["minimize"])


# ----------------------------------------------------------------------------- the space


def test_default_space_reads_its_directives() -> None:
    sp = S.load_space(ROOT / "search" / "brainformer.block")
    assert sp.name == "brainformer" and sp.baseline == "dense_baseline"
    assert sp.objectives == [("val_loss", "minimize")]
    assert [c[3] for c in sp.constraints] == ["step_time <= 1.0 * baseline"]
    assert sp.budget["trials"] == 200 and sp.trained_metric == "val_loss"
    cfg = S.make_config(sp, seconds=2.5)
    assert cfg.trials == 200 and cfg.seconds == 2.5


@pytest.mark.parametrize("file", ["brainformer.block", "widenet.block", "moeut.block"])
def test_shipped_spaces_resolve_and_their_baselines_too(file: str) -> None:
    sp = S.load_space(ROOT / "search" / file)
    plan = sp.resolve_baseline()
    assert plan.layers
    trial = _study(sp.directions).ask()
    cand = sp.resolve(chooser=lambda c: S.suggest(trial, c))
    assert cand.layers and trial.params


def test_choices_become_optuna_distributions(tmp_path: Path) -> None:
    text = TINY.replace("  f = {64 | 128}", "  f = {64 .. 256 step 32}\n  lr = {1e-4 .. 1e-2 log}")
    sp = S.load_space(_space(tmp_path, text))
    study = _study()
    study.enqueue_trial({"cell.s0": "mlp"})
    trial = study.ask()
    plan = sp.resolve(chooser=lambda c: S.suggest(trial, c))
    train_vars = S.bind_train_variables(sp, plan, lambda c: S.suggest(trial, c))
    dists = trial.distributions
    assert isinstance(dists["cell.s0"], CategoricalDistribution)
    assert dists["cell.s0"].choices == ("mha", "mlp")
    assert dists["f"] == IntDistribution(64, 256, step=32)
    # a training hyper-parameter: not used by the model, still one choice of the search
    assert dists["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert train_vars == {"lr": trial.params["lr"]}
    assert S.arch_hash(plan, train_vars) != S.arch_hash(plan, {"lr": 0.5})


def test_conditional_choice_exists_only_when_its_call_is_selected(tmp_path: Path) -> None:
    sp = S.load_space(_space(tmp_path))
    study = _study()
    for s0 in ("mha", "mlp"):
        study.enqueue_trial({"cell.s0": s0, "cell.s1": "mlp"})
        trial = study.ask()
        sp.resolve(chooser=lambda c, t=trial: S.suggest(t, c))
        assert ("cell.s0.heads" in trial.params) == (s0 == "mha")
        study.tell(trial, 1.0)


def test_a_variable_holding_a_choice_is_one_parameter(tmp_path: Path) -> None:
    sp = S.load_space(_space(tmp_path))
    study = _study()
    study.enqueue_trial({"cell.s0": "mlp", "cell.s1": "mlp", "f": 128})
    trial = study.ask()
    plan = sp.resolve(chooser=lambda c: S.suggest(trial, c))
    assert [k for k in trial.params if k.startswith("f")] == ["f"]
    assert {la.args["d_ff"] for la in plan.layers} == {128}


def test_equal_architectures_hash_equal_whatever_the_choices_are_called(tmp_path: Path) -> None:
    sp = S.load_space(_space(tmp_path))
    base = sp.resolve_baseline()
    same = sp.resolve(assignment={"cell.s0": "mha", "cell.s0.heads": 2, "cell.s1": "mlp", "f": 64})
    other = sp.resolve(assignment={"cell.s0": "mha", "cell.s0.heads": 4, "cell.s1": "mlp", "f": 64})
    assert S.arch_hash(base) == S.arch_hash(same)
    assert S.arch_hash(base) != S.arch_hash(other)
    assert S.arch_summary(same) == "d=32 (mha mlp)x2"
    shared = resolve(load_module(TINY.replace("repeat 2 cell", "repeat 2 cell groups=1")), "dense")
    assert S.arch_summary(shared) == "d=32 (mha mlp)x2 (2 unique)"


def test_the_rendered_winner_compiles_on_its_own(tmp_path: Path) -> None:
    from blockdsl.lang.render import render

    sp = S.load_space(_space(tmp_path))
    plan = sp.resolve(assignment={"cell.s0": "mlp", "cell.s1": "mha", "cell.s1.heads": 4, "f": 128})
    text = render(plan, name="winner")
    again = resolve(load_module(text), "winner")
    assert S.arch_hash(again) == S.arch_hash(plan)


def test_an_unknown_objective_is_named(tmp_path: Path) -> None:
    with pytest.raises(BlockError, match="unknown objective metric 'accuracy'") as e:
        S.load_space(_space(tmp_path, TINY.replace("minimize val_loss", "minimize accuracy")))
    assert (e.value.span.line, e.value.span.col) == (18, 12)  # at the metric's name


@pytest.mark.parametrize("line,what", [("minimize val_los",
                                        "18:12: error: unknown objective metric 'val_los'"),
                                       ("step_tme <= 1.0 * baseline",
                                        "18:3: error: unknown constraint metric 'step_tme'")])
def test_check_names_an_unknown_metric_where_it_stands(tmp_path: Path, line: str, what: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from blockdsl.cli import main

    space = _space(tmp_path, TINY.replace("  minimize val_loss", "  " + line))
    assert main(["check", str(space)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{space}:{what}") and "did you mean" in err


# ----------------------------------------------------------------------------- pruning


def _rung_trial(rung_loss: float, pre: list[float]) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.COMPLETE, values=[rung_loss, *pre],
                        user_attrs={"rungs": {"1": rung_loss}, "pre_values": pre})


def test_pareto_rung_pruner_stops_only_dominated_trials() -> None:
    pruner = S.ParetoRungPruner(startup=3)
    refs = [_rung_trial(2.0, [100.0]), _rung_trial(2.5, [50.0]), _rung_trial(3.0, [10.0])]
    assert pruner.should_prune([2.6, 120.0], 1, refs)  # worse and bigger than trial 0
    assert not pruner.should_prune([2.6, 40.0], 1, refs)  # smaller than all but one, which is worse
    assert not pruner.should_prune([1.9, 500.0], 1, refs)  # best loss: on the front
    assert not pruner.should_prune([9.0, 5.0], 1, refs)  # smallest: on the front
    assert not pruner.should_prune([2.6, 120.0], 2, refs)  # nobody reached rung 2
    assert not S.ParetoRungPruner(startup=4).should_prune([2.6, 120.0], 1, refs)
    assert not S.ParetoRungPruner(startup=3, margin=0.7).should_prune([2.6, 120.0], 1, refs)


def test_dominance_is_strict() -> None:
    assert S.dominates([1, 1], [1, 2]) and not S.dominates([1, 2], [1, 2])
    assert not S.dominates([1, 3], [2, 2])


# ----------------------------------------------------------------------------- protocol


def _journal(tmp_path: Path, name: str = "s") -> optuna.Study:
    storage = S.open_storage(str(tmp_path / f"{name}.journal"), name)
    return optuna.create_study(study_name=name, storage=storage)


def test_budget_counts_neither_replaced_nor_surplus_trials() -> None:
    ts = [create_trial(state=TrialState.COMPLETE, value=1.0),
          create_trial(state=TrialState.FAIL),
          create_trial(state=TrialState.FAIL, user_attrs={"status": "surplus"}),
          create_trial(state=TrialState.WAITING, user_attrs={"retry_of": 1})]
    for i, t in enumerate(ts):
        t.number = i
    assert [t.number for t in S.counted_trials(ts)] == [0, 3]


def test_bakery_lets_exactly_one_of_two_concurrent_trials_train(tmp_path: Path) -> None:
    study = _journal(tmp_path)
    outcome: dict[int, object] = {}
    barrier = threading.Barrier(2)

    def run() -> None:
        trial = study.ask()
        barrier.wait()
        src = S.claim_architecture(study, trial, "same-arch", poll=0.05)
        outcome[trial.number] = src
        if src is None:  # the owner "trains", then publishes its result
            time.sleep(0.3)
            trial.set_user_attr("status", "trained")
            study.tell(trial, 1.0)
        else:
            trial.set_user_attr("status", "copy")
            study.tell(trial, src.value)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    owners = [n for n, src in outcome.items() if src is None]
    assert len(outcome) == 2 and len(owners) == 1
    copier = next(n for n in outcome if n not in owners)
    assert outcome[copier].number == owners[0]


def test_a_trial_of_a_dead_worker_is_failed_and_retried(tmp_path: Path) -> None:
    study = _journal(tmp_path)
    trial = study.ask()
    trial.suggest_categorical("x", ["a", "b"])
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = {**S.worker_identity(), "pid": proc.pid, "start": "0"}
    study._storage.set_trial_system_attr(trial._trial_id, S.ATTR + "worker", dead)
    alive = study.ask()  # this process: must survive the reaping
    study._storage.set_trial_system_attr(alive._trial_id, S.ATTR + "worker", S.worker_identity())
    assert S.reap_stale(study, grace=3600) == [trial.number]
    trials = study.get_trials()
    assert trials[trial.number].state == TrialState.FAIL
    assert trials[trial.number].user_attrs["status"] == "lost"
    assert trials[alive.number].state == TrialState.RUNNING
    retry = trials[-1]
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == trial.number
    assert retry.system_attrs["fixed_params"] == trial.params
    assert S.reap_stale(study, grace=3600) == []


def test_a_silent_remote_worker_is_reaped_after_the_grace_period(tmp_path: Path) -> None:
    study = _journal(tmp_path)
    trial = study.ask()
    remote = {"host": "elsewhere", "boot": "x", "pid": 1, "start": "1"}
    study._storage.set_trial_system_attr(trial._trial_id, S.ATTR + "worker", remote)
    study._storage.set_trial_system_attr(trial._trial_id, S.ATTR + "heartbeat", time.time() - 100)
    assert S.reap_stale(study, grace=3600) == []
    assert S.reap_stale(study, grace=30) == [trial.number]


# ----------------------------------------------------------------------------- in process


def test_constraints_known_from_the_ir_cost_no_training(tmp_path: Path) -> None:
    # The baseline is the smallest architecture: every other one breaks the params bound.
    text = TINY.replace("  minimize val_loss", "  minimize val_loss\n  params <= 1.0 * baseline")
    text = text.replace("trials=7", "trials=4")
    # Random points: the neighbourhood start would try the swaps with equal parameters.
    study = S.search(_space(tmp_path, text), study="c", root=tmp_path, seconds=0.5, threads=1,
                     start="random")
    trials = study.get_trials()
    assert len(trials) == 4
    base, rest = trials[0], trials[1:]
    assert base.user_attrs["role"] == "baseline" and base.user_attrs["status"] == "trained"
    for t in rest:
        status = t.user_attrs["status"]
        assert status in ("infeasible", "copy"), status
        assert "steps" not in t.user_attrs or status == "copy"
        assert t.state == TrialState.COMPLETE and max(t.constraints.values()) > 0
    assert S.best_trials(study) == []  # nothing feasible beats nothing
    assert S.summarize(study)["baseline"]["number"] == 0


# ----------------------------------------------------------------------------- end to end


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "blockdsl.cli", "search", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trials(journal: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = S.open_storage(str(journal), name)
    return optuna.load_study(study_name=name, storage=storage).get_trials()


@pytest.mark.slow  # worker processes that train: 20-45 s
def test_kill_a_worker_mid_trial_then_resume(tmp_path: Path) -> None:
    space = _space(tmp_path)
    journal = tmp_path / "studies" / "e2e.journal"
    proc = _cli(str(space), "--study", "e2e", "--no-live", "--threads", "1", cwd=tmp_path)
    victim = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if not journal.exists():
                continue
            ts = _trials(journal, "e2e")
            done = [t for t in ts if t.state.is_finished()]
            training = [t for t in ts if t.state == TrialState.RUNNING
                        and S.ATTR + "ticket" in t.system_attrs]
            if len(done) >= 2 and training:
                victim = training[0].number
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert victim is not None, proc.stdout.read() if proc.stdout else ""
    before = {t.number: (t.state, t.values) for t in _trials(journal, "e2e") if t.state.is_finished()}

    out = _cli("--study", "e2e", "--no-live", "--json", cwd=tmp_path).communicate(timeout=180)[0]
    summary = json.loads(out.strip().splitlines()[-1])
    ts = _trials(journal, "e2e")
    for n, (state, values) in before.items():  # no finished trial lost or changed
        assert (ts[n].state, ts[n].values) == (state, values)
    killed = ts[victim]
    assert killed.state == TrialState.FAIL and killed.user_attrs["status"] == "lost"
    retries = [t for t in ts if t.user_attrs.get("retry_of") == victim]
    assert len(retries) == 1 and retries[0].state.is_finished()
    counted = S.counted_trials(ts)
    assert len(counted) == 7 and all(t.state.is_finished() for t in ts)
    trained: dict[str, int] = {}
    for t in ts:  # no architecture trained twice
        if t.user_attrs.get("status") in ("trained", "pruned"):
            h = t.user_attrs["arch_hash"]
            trained[h] = trained.get(h, 0) + 1
    assert trained and max(trained.values()) == 1
    assert any(t.user_attrs.get("status") == "copy" for t in ts)
    assert summary["counted"] == 7 and summary["baseline"]["number"] == 0
    best = tmp_path / summary["files"]["blocks"][0]  # paths are relative to the run's folder
    assert best.exists() and (tmp_path / summary["files"]["plot"]).exists()
    resolve(load_module(best))  # the winner compiles on its own
    show = subprocess.run([sys.executable, "-m", "blockdsl.cli", "search", "show", "e2e"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert show.returncode == 0 and "baseline" in show.stdout


def test_a_paired_clock_trial_is_evaluated_at_every_rung(tmp_path: Path) -> None:
    """Rungs are fractions of the step budget: measuring progress against the wall-clock
    guard (10x the budget) once put every evaluation at rung 1."""
    study = S.search(_space(tmp_path, TINY.replace("trials=7", "trials=1")), study="r",
                     root=tmp_path, baseline_steps=40, threads=1)
    base = S.baseline_trial(study)
    assert base is not None and base.user_attrs["status"] == "trained"
    assert sorted(base.user_attrs["rungs"]) == ["1", "2", "3"]  # 25%, 50%, 75% of 4 rungs


def test_multi_objective_search_writes_the_pareto_set(tmp_path: Path) -> None:
    text = TINY.replace("  minimize val_loss", "  minimize val_loss\n  minimize params")
    text = text.replace("trials=7", "trials=5")
    # Every trial trains exactly 20 steps (a large baseline budget capped by `steps`), so
    # which trials train, prune and form the front does not depend on the machine's load.
    study = S.search(_space(tmp_path, text), study="mo", root=tmp_path, baseline_steps=1000,
                     steps=20, threads=1, prune_startup=1)
    assert isinstance(study.sampler.base, optuna.samplers.NSGAIISampler)
    assert len(study.directions) == 2
    for t in study.get_trials():
        if t.user_attrs.get("status") in ("trained", "pruned"):
            assert t.user_attrs["pre_values"] == [t.user_attrs["params"]]
    summary = S.write_results(study, tmp_path / "out")
    assert summary["best"] and all(Path(f).exists() for f in summary["files"]["blocks"])
    assert all("/pareto/" in f for f in summary["files"]["blocks"])
    assert (tmp_path / "out" / "pareto.png").exists()
    for f in summary["files"]["blocks"]:
        resolve(load_module(Path(f)))


@pytest.mark.slow  # worker processes that train: 20-45 s
def test_local_workers_share_the_journal(tmp_path: Path) -> None:
    space = _space(tmp_path, TINY.replace("trials=7", "trials=6"))
    out = subprocess.run(
        [sys.executable, "-m", "blockdsl.cli", "search", str(space), "--study", "w2", "--workers",
         "2", "--no-live", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    ts = _trials(tmp_path / "studies" / "w2.journal", "w2")
    counted = S.counted_trials(ts)
    assert len(counted) == 6 and all(t.state.is_finished() for t in ts)
    pids = {t.system_attrs[S.ATTR + "worker"]["pid"] for t in counted}
    assert len(pids) == 2
    hashes = [t.user_attrs["arch_hash"] for t in ts if t.user_attrs.get("status") in ("trained", "pruned")]
    assert len(hashes) == len(set(hashes))


@pytest.mark.slow  # worker processes that train: 15-30 s
def test_the_library_runs_worker_processes_too(tmp_path: Path) -> None:
    """`search.run(..., workers=2)` is what the CLI's --workers 2 calls: one setup, then two
    worker processes on the one journal study (before, only the CLI could start them)."""
    space = _space(tmp_path, TINY.replace("trials=7", "trials=4"))
    S.quiet_optuna()
    study = S.run(space, study="lib2", root=tmp_path, workers=2, threads=1)
    counted = S.counted_trials(study.get_trials())
    assert len(counted) == 4 and all(t.state.is_finished() for t in counted)
    assert len({t.system_attrs[S.ATTR + "worker"]["pid"] for t in counted}) == 2
    assert (tmp_path / "lib2.journal").is_file()  # root= is the studies folder


def test_a_failing_candidate_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    # heads=3 does not divide d=32: the resolver's BlockError fails that trial only.
    sp = S.load_space(_space(tmp_path, TINY.replace("mha(heads={2 | 4}", "mha(heads={3 | 2}")))
    cfg = S.make_config(sp, seconds=0.3, threads=1, trials=3)
    study = S.create_study(sp, cfg, S.open_storage(None, "f", cfg, tmp_path), "f")
    study.enqueue_trial({"cell.s0": "mha", "cell.s0.heads": 3, "cell.s1": "mlp", "f": 64})
    study.enqueue_trial({"cell.s0": "mlp", "cell.s1": "mlp", "f": 64})
    S.Worker(sp, study, cfg).run()
    base, bad, good = study.get_trials()
    assert base.user_attrs["role"] == "baseline" and base.state == TrialState.COMPLETE
    assert bad.state == TrialState.FAIL and bad.user_attrs["status"] == "failed"
    assert "heads" in bad.user_attrs["fail_reason"]
    assert good.state in (TrialState.COMPLETE, TrialState.PRUNED)
    row = next(r for r in S.trial_rows(study) if r.number == bad.number)
    assert row.status == "failed" and "heads" in row.note
