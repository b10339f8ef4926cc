"""How a blockdsl process ends: the one place that turns an exception into an exit status.

The `blockdsl` command and the search's worker processes end alike: a located
`BlockError` prints as its message and exits 1; an exception that carries a one-line
`cli_message` (TrainError, SearchError, JournalError) is the user's to fix: `error: ...`,
exit 1; Ctrl-C prints `interrupted` and exits 130; anything else is ours: one line and
exit 2 (`BLOCKDSL_DEBUG=1` re-raises it for the traceback).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from blockdsl.lang.errors import BlockError


def exit_status(run: Callable[[], int | None], *, internal_hint: bool = True) -> int:
    """Call `run` and return the process's exit status, printing any error as one line.

    `internal_hint` adds the line that asks a person to report an internal error (the
    command prints it; a worker process, whose stderr goes to the driver's log, need not).
    """
    try:
        return int(run() or 0)
    except BlockError as err:
        print(err.format(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the process's last line of defence
        if os.environ.get("BLOCKDSL_DEBUG"):
            raise
        msg = getattr(err, "cli_message", None)
        print(f"error: {msg or f'{type(err).__name__}: {err}'}", file=sys.stderr)
        if not msg and internal_hint:
            print("  (an internal error; set BLOCKDSL_DEBUG=1 for a traceback and report it)",
                  file=sys.stderr)
        return 1 if msg else 2
