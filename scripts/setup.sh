#!/usr/bin/env bash
# Create .venv in the repository root and install blockdsl with its test extras.
# torch is pinned to the CPU wheel 2.13.0 in pyproject.toml (an unpinned torch pulls a
# multi-GB CUDA build). Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.blockdsl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing blockdsl and its dependencies into .venv (log: .venv/pip.log)"
  # compat mode puts a plain path entry on sys.path: faster interpreter start than the
  # import-hook finder, which keeps `blockdsl check` instant.
  if ! .venv/bin/python -m pip install -e ".[test,vision,postgres]" \
       --config-settings editable_mode=compat > .venv/pip.log 2>&1; then
    tail -n 40 .venv/pip.log
    echo "setup: pip failed; the full log is .venv/pip.log" >&2
    exit 1
  fi
  .venv/bin/python -c "import torch, blockdsl; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  touch "$stamp"
fi
# Bytecode for the package, hash-checked (an edited file is never run stale). Where
# PYTHONDONTWRITEBYTECODE is set, Python would otherwise recompile blockdsl's source on
# every start: about 15% of a cold `blockdsl check`.
.venv/bin/python -m compileall -q --invalidation-mode checked-hash blockdsl > /dev/null
# The fused CPU MoE kernel, compiled once here (~30 s, cached by torch per machine) rather
# than inside the first training step or test; where it cannot build, blockdsl warns and
# uses its "bmm" dispatch instead.
.venv/bin/python -c "from blockdsl.nn.dispatch import fused; fused.extension()"
