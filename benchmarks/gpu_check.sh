#!/usr/bin/env bash
# The GPU check, in one call on a CUDA machine (under 8 minutes):
#   bash benchmarks/gpu_check.sh        # results under $OUT (default /tmp/gpu_check)
# It installs SparseScope from this checkout (wheels carried in .whl/ when the machine has
# no package index; else a shim on PYTHONPATH over the installed torch and libraries), then
# prints and writes as JSON:
#   1. probe / bare forward, bf16, a Llama-3-8B-shaped synthetic model (2 layers): dense,
#      and with --sparsify threshold:0.5 (probed sparse / bare sparse); bytes moved to the
#      host and bytes stored per token;
#   2. the kernel A/B table of benchmarks/kernel_ab/ (shipped vs candidate kernel).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

if [ -d .whl ]; then
  $PY -m pip install -q --no-index --find-links .whl -e . || echo "pip install from .whl failed"
fi
if ! $PY -c "import sparsescope.probes" 2>/dev/null; then  # no install: map the folders
  shim=$(mktemp -d)/shim
  mkdir -p "$shim/sparsescope"
  cp sparsescope/__init__.py "$shim/sparsescope/"
  for part in app probes kernels store analysis; do ln -sfn "$PWD/$part" "$shim/sparsescope/$part"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY - <<'PY'
import importlib
missing = [m for m in ("torch", "triton", "transformers", "transformer_lens", "duckdb", "pyarrow",
                       "numba", "typer", "rich", "streamlit") if importlib.util.find_spec(m) is None]
print("missing packages:", ", ".join(missing) or "none")
PY

probe() {  # name, extra args
  timeout 110 $PY -m sparsescope.app.cli bench probe --model synthetic:llama-3-8b --device cuda \
    --dtype bfloat16 --tokens 16384 --batch-size 16 --seq-len 128 --repeats 3 \
    --json "$OUT/probe_$1.json" "${@:2}" 2>&1 | grep -v Warning
}
probe dense
probe sparse --sparsify threshold:0.5
timeout 230 $PY benchmarks/kernel_ab/ab.py "$OUT/kernel_ab.json" 2>&1 | grep -v Warning | tail -40
ls -l "$OUT"
