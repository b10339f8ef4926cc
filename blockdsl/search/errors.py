"""The search's two exceptions, in a module of their own because every stage raises them
(loading a space, opening a storage, running a trial) and none of those should import
another just to name its error."""

from __future__ import annotations


class SearchError(Exception):
    """A problem the user can fix (space file, storage, study name)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.cli_message = message


class TrialFailed(Exception):
    """Raised inside a trial to record it as FAIL with a reason and go on."""
