"""The one place that reaches into Optuna's private attributes.

Optuna's public API has no way to name a trial to its storage (`trial._trial_id`), a
study to its storage (`study._study_id`, `study._storage`), or to read a study's trials
the way its samplers do (`study._get_trials`, which may use the study's cache). The search
needs all of them: the bakery protocol and the heartbeat write system attributes on a
*running* trial, a reaper fails another worker's trial, a copy looks an earlier trial up
by number. Keeping every such access here means an Optuna upgrade that renames one breaks
one small module, not twenty call sites; nothing else in `blockdsl.search` touches a
name with a leading underscore on an Optuna object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

ATTR = "blockdsl:"  # prefix of the protocol's system attributes


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (not its number, which counts within the study)."""
    return trial._trial_id


def study_id(study: optuna.Study) -> int:
    return study._study_id


def storage_of(study: optuna.Study) -> BaseStorage:
    return study._storage


def all_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial straight from the storage, not copied: the protocol reads them often."""
    return storage_of(study).get_all_trials(study_id(study), deepcopy=False)


def cached_trials(study: optuna.Study, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
    """`study._get_trials`, the variant Optuna's samplers call (it may use the cache)."""
    return study._get_trials(*args, **kwargs)


def fresh(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> FrozenTrial:
    """The trial as the storage holds it now (attributes written since it was read)."""
    return storage_of(study).get_trial(trial_id(trial))


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    st = storage_of(study)
    return st.get_trial(st.get_trial_id_from_study_id_trial_number(study_id(study), number))


def set_system_attr(study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str,
                    value: Any) -> None:
    """A system attribute on a trial, running or not (Optuna's Trial has no public setter
    for system attributes; the bakery and the worker identity need them)."""
    storage_of(study).set_trial_system_attr(trial_id(trial), key, value)


def set_trial_system_attr(trial: optuna.Trial, key: str, value: Any) -> None:
    """The same through a running trial's own storage (no study at hand)."""
    trial.storage.set_trial_system_attr(trial_id(trial), key, value)


def fail_trial(study: optuna.Study, trial: FrozenTrial, attrs: dict[str, Any]) -> None:
    """Set user attributes on another worker's trial and mark it FAIL. Raises Optuna's
    UpdateFinishedTrialError (or RuntimeError) when it finished meanwhile."""
    from optuna.trial import TrialState

    st, tid = storage_of(study), trial_id(trial)
    for k, v in attrs.items():
        st.set_trial_user_attr(tid, k, v)
    st.set_trial_state_values(tid, TrialState.FAIL)


class FilteredStudy:
    """A study whose trials are filtered by `keep`, for handing to a sampler.

    Optuna's samplers read trials through the study's private `_get_trials` as well as the
    public `get_trials` / `trials`, so the view must filter all three; everything else is
    the study's own.
    """

    def __init__(self, study: optuna.Study, keep: Callable[[FrozenTrial], bool]):
        self._study, self._keep = study, keep

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        return [t for t in cached_trials(self._study, *args, **kwargs) if self._keep(t)]

    def get_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        return [t for t in self._study.get_trials(*args, **kwargs) if self._keep(t)]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


def journal_lock_base() -> type:
    """Optuna's journal lock interface: `JournalFileBackend(lock_obj=...)` takes any
    subclass of it, but `optuna.storages.journal` (5.0) does not re-export it."""
    from optuna.storages.journal._file import BaseJournalFileLock

    return BaseJournalFileLock
