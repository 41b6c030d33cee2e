#!/usr/bin/env bash
# One command for a GPU machine (no package registry needed): build genkern._C for the local GPU
# against the torch already installed, run the whole test suite on the GPU (CUDA C++ and Triton,
# real Triton, not the interpreter), then the benchmark report. Logs and results go to $1.
#   bash scripts/gpu_check.sh OUT_DIR        (or: make gpu-check OUT=OUT_DIR)
set -uo pipefail
out=${1:-gpu_check_out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} | tee "$out/env.txt"
unset TRITON_INTERPRET
status=0
GENKERN_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -e . --no-build-isolation --no-deps -v > "$out/build.log" 2>&1 \
  || { echo "BUILD FAILED (see $out/build.log)"; tail -40 "$out/build.log"; exit 1; }
cat genkern/_build_info.json | tee -a "$out/env.txt"
$PY -m pytest tests -q -ra -p no:cacheprovider --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1 || status=1
tail -25 "$out/tests.log"
$PY -m bench --out "$out" ${BENCH_ARGS:-} > "$out/bench.log" 2>&1 || status=1
tail -40 "$out/bench.log"
exit $status
