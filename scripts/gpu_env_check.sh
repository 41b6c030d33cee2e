#!/usr/bin/env bash
# The GPU machine's PyTorch, here on the CPU: build genkern._C (C++ and CUDA C++) against the torch
# that the device tool's GPU machines have, and run the test suite with it.
#   bash scripts/gpu_env_check.sh            (or: make gpu-env-check; CI runs it after make test)
# Why: nothing can be installed on the GPU machine (torch 2.11, triton 3.6, Python 3.12 there), and a
# lease is 15 minutes, so a build or import that fails there costs the whole lease. Here (and in CI)
# torch is 2.14, which compiles extensions as C++20; 2.11 compiles them as C++17, and C++20 code in
# csrc/ built here and in CI but would not have built there (found so, 2026-12-07: std::type_identity).
# A Python API newer than 2.11 would fail its tests here the same way.
# What it does: a venv (GPU_ENV_VENV, default .venv-gpu-env) with torch==GPU_TORCH and the
# torchvision of that release from PyPI (a CUDA build: ~5 GB, as on the GPU machine) and the test
# dependencies the GPU machine has (no diffusers there, so none here); a copy of the working tree, so
# that the repository's own genkern/_C.so (built against the newer torch) stays; there the editable
# build with GENKERN_CUDA=1 for sm_90 (the H100, as scripts/gpu_check.sh builds there), the kernel
# candidates' build (scripts/gpu_candidates/run.py --build-only), every Triton kernel compiled for sm_90
# by the GPU's Triton (scripts/triton_compile_check.py; nothing runs), then pytest. What it built is
# saved into .gpu-prebuilt/ for a lease to carry (scripts/gpu_prebuilt.py).
# Left out: the Triton interpreter cases (`-k "not interpret"`): Triton 3.6's interpreter cannot
# iterate range() over a bound computed by tl.minimum, which compiled Triton (the GPU's) can; CI runs
# them with Triton 3.8.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
GPU_TORCH=${GPU_TORCH:-2.11.0}
GPU_TORCHVISION=${GPU_TORCHVISION:-0.26.0}
# the GPU machine's Python is 3.12; pyenv's shim answers `command -v` even where 3.12 is not active
pick_python() {
  local c
  for c in ${GPU_PYTHON:-} python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 python3.11; do
    if [ -n "$c" ] && "$c" -c "" 2>/dev/null; then echo "$c"; return; fi
  done
}
venv=${GPU_ENV_VENV:-$root/.venv-gpu-env}
# the H100's arch and the real toolkit (/usr/local/bin/nvcc here is a wrapper), for both CUDA builds below
export MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
t0=$SECONDS

if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$GPU_TORCH')" 2>/dev/null; then
  py=$(pick_python)
  [ -n "$py" ] || { echo "gpu-env-check: need python3.12 or python3.11 (or GPU_PYTHON=...)"; exit 1; }
  rm -rf "$venv"
  "$py" -m venv "$venv"
  # setuptools<82: torch 2.11's own requirement
  if ! { "$venv/bin/pip" install --upgrade pip "setuptools<82" wheel &&
         "$venv/bin/pip" install "torch==$GPU_TORCH" "torchvision==$GPU_TORCHVISION" \
           ninja numpy pytest pytest-benchmark expecttest tqdm matplotlib scikit-learn; } > "$venv/install.log" 2>&1; then
    grep -v "^WARNING: Location" "$venv/install.log" | tail -30
    echo "gpu-env-check: INSTALL FAILED (torch==$GPU_TORCH from PyPI)"
    rm -rf "$venv"
    exit 1
  fi
fi
"$venv/bin/python" -c "import torch, triton, sys; print('gpu-env-check: Python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
echo "gpu-env-check: venv ready after $((SECONDS - t0)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# tracked and untracked-but-not-ignored files, as the device tool copies the tree to the GPU machine
git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$work"
cd "$work"
if ! GENKERN_CUDA=1 "$venv/bin/pip" install -e . --no-build-isolation --no-deps -v > build.log 2>&1; then
  # the compiler's own messages first (pip's summary says only that the build failed)
  grep -E "error( [A-Z0-9]+)?:" build.log | cut -c1-300 | awk '!seen[$0]++' | head -20
  tail -5 build.log
  echo "gpu-env-check: BUILD FAILED against torch $GPU_TORCH"
  exit 1
fi
echo "gpu-env-check: built after $((SECONDS - t0)) s"
# the candidates stage of a lease compiles scripts/gpu_candidates as torch.utils.cpp_extension.load does
TORCH_EXTENSIONS_DIR="$work/.torch_extensions" "$venv/bin/python" scripts/gpu_candidates/run.py --build-only 2>&1 \
  | grep -v "No CUDA runtime is found"
echo "gpu-env-check: candidates built after $((SECONDS - t0)) s"
# every Triton kernel through Triton's compiler for sm_90 (the tests below run them in the interpreter)
TRITON_CACHE_DIR="$work/.triton" "$venv/bin/python" scripts/triton_compile_check.py
"$venv/bin/python" -m pytest tests -q -ra -p no:cacheprovider -k "not interpret"
# what passed, saved for a lease to carry (scripts/gpu_prebuilt.py): its build stage then takes it
"$venv/bin/python" scripts/gpu_prebuilt.py save "$root/.gpu-prebuilt" --tree "$work" --triton-cache "$work/.triton" \
  --candidates-lib "$work/.torch_extensions/genkern_candidates/genkern_candidates.so"
echo "gpu-env-check: passed against torch $GPU_TORCH in $((SECONDS - t0)) s"
