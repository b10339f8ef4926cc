#!/usr/bin/env bash
# The one command behind this folder's results (see README.md). Rerunning it resumes;
# delete results/ to start over. Set BLOCKDSL to the blockdsl executable if not on PATH.
set -euo pipefail
cd "$(dirname "$0")"
exec nice -n 10 "${BLOCKDSL:-blockdsl}" compare brainformer.block --steps 400 --seeds 4 --workers 2 --eval-every 50 --out results "$@"
