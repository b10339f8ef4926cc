"""Architecture search: a `.block` space's choices become Optuna suggestions, every trial
runs resolve -> lower -> (paired timing) -> train, and the winners are written back out as
`.block` text.

Design choices, each for a reason (the module that holds each says more):
- Define-by-run (`arch.suggest`): the resolver asks a `chooser` for each choice it meets,
  and the chooser is Optuna's `trial.suggest_*`. A choice inside a call that was not
  selected is never asked, so conditional choices need no bookkeeping; a variable holding
  a choice is one parameter.
- Identical architectures are trained once (`arch.arch_hash`, `dedup`): workers agree on
  who trains a repeated architecture with Lamport's bakery protocol over trial attributes.
- Constraints cost no training when the IR can decide them, and only a short *paired*
  timing when they cannot (`constraints`, `timing`).
- The start design is the baseline's neighbourhood (`arch.neighbourhood`): in the default
  space random points are almost all slower than the baseline, so a short search that
  starts at random trains almost nothing; measured in docs/search.md.
- Each trial trains for a fixed budget and reports at rungs, where `pruning` may stop it
  (`worker`).
- Storage: a journal file by default, any RDB URL for many machines (`storage`); a killed
  worker's trial is failed and re-enqueued (`liveness`). Only `optuna_glue` touches
  Optuna's private attributes.

The package, one job a module, in pipeline order: `space` (the space file and settings),
`arch` (choices, hashes, start design), `constraints`, `storage` (+ `journal`),
`liveness`, `dedup`, `pruning`, `timing`, `samplers`, `worker` (one worker's trial loop),
`results` (reading a study), `plots`, `output` (result files), `run` (the setup sequence,
N workers, `search`). This module only re-exports their public names, so `from blockdsl
import search as S; S.search(...)` keeps working; it imports Optuna but not torch.
"""

from __future__ import annotations

from blockdsl.search.arch import (
    OPTION_SUFFIX,
    arch_hash,
    arch_summary,
    baseline_point,
    canonical_text,
    neighbourhood,
    suggest,
)
from blockdsl.search.constraints import DASHBOARD_CONSTRAINTS, write_constraints
from blockdsl.search.dedup import claim_architecture
from blockdsl.search.errors import SearchError, TrialFailed
from blockdsl.search.liveness import others_running, reap_stale, worker_identity
from blockdsl.search.optuna_glue import ATTR
from blockdsl.search.output import write_results
from blockdsl.search.plots import plot_study
from blockdsl.search.pruning import ParetoRungPruner, RungPruner, dominates
from blockdsl.search.results import (
    TrialRow,
    baseline_trial,
    beats,
    best_trials,
    budget_done,
    counted_trials,
    summarize,
    trial_rows,
)
from blockdsl.search.run import (
    Outcome,
    Setup,
    conclude,
    prepare,
    quiet_optuna,
    run,
    run_worker,
    run_workers,
    search,
)
from blockdsl.search.samplers import BaselineBlindSampler, make_sampler
from blockdsl.search.space import (
    DEFAULT_SPACE,
    METRICS,
    STATIC_METRICS,
    STUDY_DIR,
    TIMED_METRICS,
    TRAIN_VARIABLES,
    TRAINED_METRICS,
    SearchConfig,
    Space,
    bind_train_variables,
    default_space_path,
    describe_budget,
    load_space,
    make_config,
    new_study_name,
    setting_problem,
)
from blockdsl.search.storage import (
    MAX_RETRIES,
    create_study,
    default_storage_path,
    is_url,
    load_study_info,
    open_storage,
    redact,
)
from blockdsl.search.timing import StepTimes, paired_step_times
from blockdsl.search.worker import Event, Worker

__all__ = [
    "ATTR", "DASHBOARD_CONSTRAINTS", "DEFAULT_SPACE", "MAX_RETRIES", "METRICS", "OPTION_SUFFIX",
    "STATIC_METRICS", "STUDY_DIR", "TIMED_METRICS", "TRAINED_METRICS", "TRAIN_VARIABLES",
    "BaselineBlindSampler", "Event", "Outcome", "ParetoRungPruner", "RungPruner",
    "SearchConfig", "SearchError", "Setup", "Space", "StepTimes", "TrialFailed", "TrialRow",
    "Worker", "arch_hash", "arch_summary", "baseline_point", "baseline_trial",
    "beats", "best_trials", "bind_train_variables", "budget_done", "canonical_text",
    "claim_architecture", "conclude", "counted_trials", "create_study", "default_space_path",
    "default_storage_path", "describe_budget", "dominates", "is_url", "load_space", "load_study_info",
    "make_config", "make_sampler", "neighbourhood", "new_study_name", "open_storage",
    "others_running", "paired_step_times", "plot_study", "prepare", "quiet_optuna", "reap_stale",
    "redact", "run", "run_worker", "run_workers", "search", "setting_problem", "suggest",
    "summarize", "trial_rows", "worker_identity", "write_constraints", "write_results",
]
