"""Worker process entry: `python -m blockdsl.compare OUT LABEL SEED THREADS` (see runner)."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI: no spinning threads
    from blockdsl.compare.runner import worker_main

    if len(sys.argv) != 5:
        print("usage: python -m blockdsl.compare OUT LABEL SEED THREADS", file=sys.stderr)
        sys.exit(2)
    sys.exit(worker_main(*sys.argv[1:]))
