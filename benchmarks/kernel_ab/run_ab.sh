set -x
mkdir -p /tmp/shim/sparsescope && cp sparsescope/__init__.py /tmp/shim/sparsescope/ && ln -sfn $PWD/kernels /tmp/shim/sparsescope/kernels
export PYTHONPATH=/tmp/shim
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 260 python3 benchmarks/kernel_ab/ab.py $OUT/ab.json 2>&1 | grep -v Warning
R=$PWD; cd /tmp && timeout 150 python3 -m pytest -q --noconftest -p no:cacheprovider -x $R/tests/test_kernels_gpu.py $R/tests/test_kernels.py 2>&1 | tail -15; cd $R
cat > /tmp/fb.py <<'PY'
import json, sys, time
from sparsescope.kernels.bench import run_bench
t = time.time(); rows = run_bench("cuda"); json.dump(rows, open(sys.argv[1], "w"), indent=1)
print("bench rows", len(rows), "seconds", time.time() - t)
PY
timeout 170 python3 /tmp/fb.py $OUT/kernel_bench_h100.json 2>&1 | tail -3
