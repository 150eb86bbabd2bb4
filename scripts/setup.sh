#!/usr/bin/env bash
# Set up fxpipe on a bare machine: torch (the CPU build when torch is missing), then fxpipe
# itself with its test extras. Safe to run again; it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: torch not found; installing the CPU build (torch==2.13.0)"
  # A pinned version is served from the local wheel cache here; an unpinned 'torch' would
  # pull a multi-GB CUDA build.
  "$PY" -m pip install -q "torch==2.13.0"
fi
extras=${FXPIPE_EXTRAS:-test}
"$PY" -m pip install -q -e ".[${extras}]"
"$PY" -c "import fxpipe, torch; print(f'setup: fxpipe {fxpipe.__version__} with torch {torch.__version__} ready')"
