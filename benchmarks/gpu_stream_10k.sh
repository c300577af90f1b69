#!/usr/bin/env bash
# The full 10 000-edit stream on SmolLM2 on one GPU (benchmarks/bench_stream.py): one command.
#
#   benchmarks/gpu_stream_10k.sh [STORE_DIR] [extra bench_stream flags...]
#
# Needs: a Python with this project installed (pip install -e .[worker]) and a CUDA build of
# torch==2.13.0 (PYTHON=/path/to/python to choose it; default .venv/bin/python, else python3),
# and SmolLM2 converted under $MEMOIR_CACHE (default ./.cache/memoir: run
# `memoir generate --model smollm2 hi` once where the network is reachable and copy the
# `smollm2` folder over). Resumable: run it again after a stop and it continues from its
# ledger (STORE_DIR, default .cache/bench_stream/smollm2-cuda). Results:
# benchmarks/results/bench_stream_smollm2_cuda.json and .png, progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
STORE="${1:-.cache/bench_stream/smollm2-cuda}"
shift || true
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export MEMOIR_CACHE="${MEMOIR_CACHE:-$PWD/.cache/memoir}"
"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no CUDA GPU: install a CUDA build of torch==2.13.0")
print("GPU:", torch.cuda.get_device_name(), file=sys.stderr)
PY
if [ ! -f "$MEMOIR_CACHE/smollm2/config.json" ]; then
  echo "note: no converted SmolLM2 under $MEMOIR_CACHE: the first load fetches it (needs the network)" >&2
fi
exec "$PYTHON" -m benchmarks.bench_stream --model smollm2 --edits 10000 \
  --points 100,300,1000,2000,3000,5000,7000,10000 --device cuda --threads 4 \
  --store "$STORE" --name bench_stream_smollm2_cuda "$@"
