"""A worker process of `blockdsl.search.run` with `workers > 1`:

    python -m blockdsl.search STUDY STORAGE INDEX SPACE_FILE SPACE

Not a command for people (that is `blockdsl search`); the arguments are positional
because only `run._run_processes` writes them. Errors end the process the way the CLI
ends it (one line on stderr; 1 for the user's mistakes, 130 for Ctrl-C, 2 otherwise), and
the driver reports a worker's non-zero status.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    # Before torch loads OpenMP (the CLI's reason: spinning threads slow small kernels
    # badly on shared cores); a value set by the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from blockdsl.exits import exit_status
    from blockdsl.search.run import quiet_optuna, run_worker

    if len(argv) != 5 or not argv[2].isdigit():
        print("usage: python -m blockdsl.search STUDY STORAGE INDEX SPACE_FILE SPACE "
              "(a worker process; people run `blockdsl search`)", file=sys.stderr)
        return 2
    study, storage, index, space_file, space_name = argv
    quiet_optuna()
    return exit_status(lambda: run_worker(study, storage, int(index), space_file, space_name),
                       internal_hint=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
