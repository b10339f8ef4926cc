"""`python -m blockdsl.cli`: the same as the `blockdsl` command."""

import sys

from blockdsl.cli import main

sys.exit(main())
