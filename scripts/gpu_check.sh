#!/usr/bin/env bash
# One command for a GPU machine (no package registry needed): build genkern._C for the local GPU
# against the torch already installed, run the whole test suite on the GPU (CUDA C++ and Triton,
# real Triton, not the interpreter), end-to-end sampling, then the benchmark report. Logs and results
# go to $1.
#   bash scripts/gpu_check.sh OUT_DIR        (or: make gpu-check OUT=OUT_DIR)
# A session's lease is 15 minutes of device time, the machine's start (a minute or two) included, and
# one call runs at most 10 minutes. So the default is one call that does what the issue asks, in order
# of need, under one deadline; the most elastic stage (bench: it keeps what it measured) goes last:
#   device run, timeout_s 590, carry [".gpu-prebuilt"]:  bash scripts/gpu_check.sh $OUT
#     build ~80 s (a few seconds with .gpu-prebuilt, below), tests ~150-170 s (8 xdist workers),
#     e2e <= 210 s, bench: the rest of DEADLINE
#   then, while the machine is warm (30 s) and 3+ minutes of the lease are left, without building again
#   (genkern/_C.so and its editable install stay on a warm machine), carrying .gpu-prebuilt again:
#     STAGES=candidates DEADLINE=<what is left less ~40 s> bash scripts/gpu_check.sh $OUT
#   .gpu-prebuilt: `make gpu-env-check` on the CPU machine before the lease leaves it there
#   and give the machine back. "sanitize" and "ncu" need a lease of their own.
# Knobs (environment):
#   STAGES        which stages to run, in order (default "build tests e2e bench"; also "candidates"
#                 (scripts/gpu_candidates), "sanitize" and "ncu" (below))
#   DEADLINE      seconds from the start of this script (default 570) within which every stage ends:
#                 each stage runs under the smaller of its own limit and what is left; a stage with
#                 under 30 s left is skipped and named, and the exit status says so
#   BENCH_ARGS    extra arguments for `python -m bench` (e.g. --no-compile, --ops group_norm_silu)
#   TEST_ARGS     extra arguments for pytest (e.g. -k cuda); by default the CPU cases of
#                 tests/test_large_tensors.py are left to CI (~65 s of page faults and CPU references
#                 that would only repeat it here); TEST_ARGS replaces that default. tests.log ends with
#                 the 30 slowest tests (where the stage's time goes)
#   TEST_WORKERS  pytest-xdist workers when xdist is installed (default 8)
#   TEST_TIMEOUT, BENCH_TIMEOUT  seconds per stage (defaults 220 and 300, both under DEADLINE); torch.compile's
#                 max-autotune makes the full bench longer than any lease, and the report then keeps what
#                 it measured (every op's first cases: it runs round-robin over the ops) and names the
#                 cases it did not reach
#   GENKERN_CXX  the C++ compiler (default /usr/bin/g++ when present; why: below the environment report)
#   E2E_ARGS      arguments for `python -m bench.e2e` (default: the issue's 256-image cifar10 run, eager,
#                 genkern, genkern+graphs and, last, genkern+compile+graphs (its ~1-minute compile paid
#                 by the prebuilt build's saving), --profile: one step of each, GPU time by op class);
#                 E2E_TIMEOUT seconds (default 210); e2e.json is rewritten after each contender, so a
#                 stage cut short keeps the contenders it finished
#   CANDIDATES_TIMEOUT  seconds for the candidates stage (default 300)
#   SANITIZE_TOOLS    compute-sanitizer tools for the sanitize stage (default "memcheck racecheck":
#                 out-of-bounds accesses and shared-memory races; synccheck and initcheck may be added);
#                 SANITIZE_TIMEOUT seconds per tool (default 110). The stage runs
#                 tests/test_kernel_paths.py's GPU cases (every kernel of genkern._C, each launch path
#                 once, small shapes; the Triton kernels at the same shapes) under each tool, the caching
#                 allocator off so that memcheck sees each tensor's own bounds
#   NCU_TIMEOUT   seconds for the ncu stage (default 180): Nsight Compute's counters (speed of light,
#                 memory, occupancy, launch, warp state and scheduler sections) for genkern's CUDA
#                 kernels in the benchmark's cases of 64 MB or more (scripts/ncu_workload.py), clocks
#                 left alone;
#                 ncu.log is the report, ncu.md a row per kernel
#                 The candidates, sanitize and ncu stages need the build stage, in this call or an
#                 earlier one on the same machine.
# Output: env.txt build.log tests.log bench.log cuda.{json,md,png} e2e.{log,json} candidates.json
# sanitize.log ncu.{log,md}. The device tool brings back at most 8 files: where a call leaves more, they
# are packed into OUT_DIR/gpu_check.tar.gz at exit (tar xzf it here) and only the tarball stays.
set -uo pipefail
out=$(mkdir -p "${1:-gpu_check_out}" && cd "${1:-gpu_check_out}" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGES=${STAGES:-build tests e2e bench}
DEADLINE=${DEADLINE:-570}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0
triton_entries() { ls "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" 2>/dev/null | wc -l; }
pack() {
  local files
  files=$(cd "$out" && find . -maxdepth 1 -type f ! -name gpu_check.tar.gz -printf '%P\n' | sort)
  if [ "$(echo "$files" | grep -c .)" -gt 8 ]; then
    (cd "$out" && tar czf gpu_check.tar.gz $files && rm -f $files)
    echo "packed $(echo $files) into $out/gpu_check.tar.gz"
  fi
}
trap 'echo "Triton cache: ${triton_at_start:-?} entries at the start, $(triton_entries) at the end (the difference: compiled here)" >> "$out/env.txt"; pack' EXIT
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
  nproc
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# What make gpu-env-check built ahead against this torch and Triton, where the call carried it
# (the device tool's `carry: [".gpu-prebuilt"]`; scripts/gpu_prebuilt.py): the Triton cache and the
# candidates' library for every stage, genkern._C for the build stage, each only where it matches the
# tree. Without the editable install genkern is imported from the tree.
prebuilt=${GENKERN_PREBUILT:-.gpu-prebuilt}
took_extension=1
if [ -f "$prebuilt/manifest.json" ]; then
  install=()
  [[ " $STAGES " == *" build "* ]] && install=(--install-extension)
  exports=$($PY scripts/gpu_prebuilt.py use "$prebuilt" "${install[@]}" 2>"$out/prebuilt.log")
  took_extension=$?
  tee -a "$out/env.txt" < "$out/prebuilt.log"
  rm -f "$out/prebuilt.log"
  eval "$exports"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
triton_at_start=$(triton_entries)

# The GPU image's default CXX (/opt/gcc/bin/g++, a wrapper) put its own copy of libstdc++'s stream
# code into genkern/_C.so: the first error message formatted there (a C++ TORCH_CHECK) crashed in
# std::ostream (seen on an H100 machine, 2026-11-22). The distribution's compiler links libstdc++
# dynamically, as torch does. Every stage that compiles (build, candidates) uses it.
for cc in /usr/bin/g++ /usr/bin/c++; do
  if [ -z "${GENKERN_CXX:-}" ] && [ -x "$cc" ]; then GENKERN_CXX=$cc; fi
done
if [ -n "${GENKERN_CXX:-}" ]; then export CXX=$GENKERN_CXX CC=${GENKERN_CC:-/usr/bin/gcc}; fi

# Seconds a stage may run: the smaller of its own limit ($1) and what is left before DEADLINE. Each runs
# under `timeout -k 10`: a process that ignores the signal is killed 10 s later. pytest gets SIGINT, on
# which it still prints its failures and summary; bench and bench.e2e keep what they measured.
left() { echo $((DEADLINE - SECONDS)); }
limit() { local l; l=$(left); echo $(( $1 < l ? $1 : l )); }

for stage in $STAGES; do
  t0=$SECONDS
  if [ "$(left)" -lt 30 ]; then
    echo "== $stage: SKIPPED, $(left) s left before DEADLINE=$DEADLINE"
    status=1
    continue
  fi
  case $stage in
    build)
      if [ $took_extension -eq 0 ] &&
         $PY -c "import sys, genkern._extension as e; print(e.STATUS); sys.exit(not e.has_cuda_kernels())" > "$out/build.log" 2>&1; then
        echo "genkern._C: prebuilt by make gpu-env-check, loaded" | tee -a "$out/env.txt"
      else
        [ $took_extension -eq 0 ] && echo "genkern._C: the prebuilt one did not load ($(tail -1 "$out/build.log")): building"
        GENKERN_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout -k 10 $(limit 300) $PY -m pip install -e . --no-build-isolation --no-deps -v \
          > "$out/build.log" 2>&1 || { echo "BUILD FAILED (see build.log)"; tail -60 "$out/build.log"; exit 1; }
      fi
      cat genkern/_build_info.json >> "$out/env.txt"
      $PY -c "import genkern; print(genkern.backends(include_unavailable=True))" 2>&1 | tee -a "$out/env.txt"
      ;;
    tests)
      xdist=()
      $PY -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
      timeout=()
      $PY -c "import pytest_timeout" 2>/dev/null && timeout=(--timeout 300)
      timeout -k 10 -s INT $(limit ${TEST_TIMEOUT:-220}) $PY -m pytest tests -q -ra -p no:cacheprovider --durations=30 \
        "${xdist[@]}" "${timeout[@]}" \
        ${TEST_ARGS:--k "not (test_large_tensors and cpu)"} \
        > "$out/tests.log" 2>&1 || status=1
      grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -40
      grep -E "passed|failed" "$out/tests.log" | tail -1
      grep -q "^!.* KeyboardInterrupt" "$out/tests.log" && echo "tests CUT SHORT at the stage's time limit" && status=1
      ;;
    bench)
      timeout -k 10 $(limit ${BENCH_TIMEOUT:-300}) $PY -m bench --out "$out" ${BENCH_ARGS:-} > "$out/bench.log" 2>&1 || status=1
      grep -v "bench:" "$out/bench.log" | tail -80
      ;;
    e2e)
      timeout -k 10 $(limit ${E2E_TIMEOUT:-210}) $PY -m bench.e2e --device cuda --json "$out/e2e.json" \
        ${E2E_ARGS:---impls eager,genkern,genkern+graphs,genkern+compile+graphs --profile} > "$out/e2e.log" 2>&1 || status=1
      tail -40 "$out/e2e.log"
      ;;
    candidates)
      # kernels not yet in genkern._C, checked and timed against the shipped ones
      # (scripts/gpu_candidates/README.md); needs the build stage first, in this call or an earlier one
      timeout -k 10 $(limit ${CANDIDATES_TIMEOUT:-300}) $PY scripts/gpu_candidates/run.py "$out" 2>&1 || status=1
      ;;
    sanitize)
      cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
      one=$(mktemp)
      : > "$out/sanitize.log"
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
        extra=()
        # padding after every allocation: an access just past a tensor lands in it and is reported
        [ "$tool" = memcheck ] && extra=(--padding 512)
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 $(limit ${SANITIZE_TIMEOUT:-110}) "$cs" --tool "$tool" "${extra[@]}" \
          --error-exitcode 9 --print-limit 20 \
          $PY -m pytest tests/test_kernel_paths.py -q -p no:cacheprovider -k "test_path_matches_reference and cuda" \
          > "$one" 2>&1
        rc=$?
        # all skipped (no CUDA backend) checks nothing: a failure too
        [ $rc -ne 0 ] || ! grep -qE "[0-9]+ passed" "$one" && status=1
        { echo "== compute-sanitizer --tool $tool"; cat "$one"; } >> "$out/sanitize.log"
        echo "$tool: exit $rc; $(grep -E "(ERROR|RACECHECK) SUMMARY" "$one" | tail -1);" \
          "$(grep -E "(passed|failed|skipped|error).* in [0-9.]+s" "$one" | tail -1)" | tee -a "$out/sanitize.log"
      done
      rm -f "$one"
      ;;
    ncu)
      ncu_bin=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | tail -1)
      # only genkern's kernels (not the inputs' randn or autograd's fills); the clocks as found
      timeout -k 10 $(limit ${NCU_TIMEOUT:-180}) "$ncu_bin" --clock-control none --kernel-name-base demangled \
        --kernel-name regex:genkern::cuda --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
        $PY scripts/ncu_workload.py > "$out/ncu.log" 2>&1 || status=1
      grep -E "^(case |==ERROR==|==WARNING==)" "$out/ncu.log" | head -20
      $PY scripts/ncu_workload.py --summary "$out/ncu.log" | tee "$out/ncu.md"
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "== $stage: $((SECONDS - t0)) s"
done
exit $status
