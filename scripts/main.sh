#!/usr/bin/env bash
# Set up .venv (if needed), then run the main job on its embedded defaults: an
# architecture search over Brainformer-style blocks (search/brainformer.block), 200
# trials, a local journal-file study store in studies/, trained on the offline default
# corpus. Extra arguments go to `blockdsl search` (e.g. --budget 20 for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/blockdsl search --budget 200 "$@"
