"""The samplers: TPE for one objective, NSGA-II for several, random for comparison, each
blind to the baseline trial, which is no point of the space."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from blockdsl.names import SAMPLERS
from blockdsl.search import optuna_glue as glue
from blockdsl.search.errors import SearchError
from blockdsl.search.space import SearchConfig, Space


def _without_baseline(study: optuna.Study) -> Any:
    """The study as a sampler should see it: without the baseline trial, which is no point
    of the space (it has no parameters and would empty NSGA-II's intersection space)."""
    return glue.FilteredStudy(study, lambda t: t.user_attrs.get("role") != "baseline")


class BaselineBlindSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so that it never learns from (or crosses over with) the baseline."""

    def __init__(self, base: optuna.samplers.BaseSampler):
        self.base = base

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return self.base.infer_relative_search_space(_without_baseline(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        if trial.user_attrs.get("role") == "baseline":
            return {}
        return self.base.sample_relative(_without_baseline(study), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str,
                           distribution: Any) -> Any:
        return self.base.sample_independent(_without_baseline(study), trial, name, distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(_without_baseline(study), trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.base.after_trial(_without_baseline(study), trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


def make_sampler(space: Space, cfg: SearchConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    """TPE (single objective) or NSGA-II (several), blind to the baseline trial.

    `offset` shifts the seed: parallel workers (and a resumed run) must not replay one
    random sequence, or they would propose the same points.
    """
    kind = cfg.sampler
    seed = cfg.seed + offset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "auto":
            kind = "nsga2" if space.multi else "tpe"
        if kind == "tpe":
            base: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
                n_startup_trials=cfg.startup_trials, multivariate=True, group=True,
                constant_liar=True, seed=seed)
        elif kind == "nsga2":
            base = optuna.samplers.NSGAIISampler(population_size=cfg.population, seed=seed)
        elif kind == "random":
            base = optuna.samplers.RandomSampler(seed=seed)
        else:
            raise SearchError(f"unknown sampler '{cfg.sampler}' ({', '.join(SAMPLERS)})")
    return BaselineBlindSampler(base)
