"""Timing that is fair to every contender: all implementations of a case run in one process,
interleaved (in an order shuffled every round, so that drift and thermal/turbo changes hit all alike
and each contender follows each other one about equally often), warmed up, and each reported as the
median of many runs. Plus the copy-bandwidth yardstick and the saved-bytes count (the
bytes-moved models live beside each op, as `bytes_moved`)."""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


_WAKE = None


def wake_thread_pool(device: str) -> None:
    """An untimed small parallel op before each timed CPU call. Idle OpenMP workers go to sleep, and the
    first parallel op after an idle or single-threaded stretch (another contender's long serial run)
    pays tens of microseconds to wake them; in a model an op follows other multithreaded ops. Done
    before every contender's call alike."""
    global _WAKE
    if device != "cpu":
        return
    if _WAKE is None:
        _WAKE = torch.ones(1 << 18)
    _WAKE.add_(0.0)


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, min_runs: int = 15,
                     budget_s: float = 1.0, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn; calls are interleaved, in an order shuffled every round (seeded,
    so runs repeat). On CPU each sample is one call, after wake_thread_pool. On CUDA each sample is a burst of
    back-to-back calls between two CUDA events, sized to take about a millisecond, so that a small
    kernel's time is its launch-to-launch time (what a model running it in a loop sees) and not the
    host's synchronisation latency."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    reps = {k: 1 for k in fns}
    if device == "cuda":
        for name, fn in fns.items():
            t = _cuda_burst(fn, 3) / 3
            reps[name] = max(1, min(200, int(1e-3 / max(t, 1e-7))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    rng = random.Random(0)
    start = time.perf_counter()
    while True:
        # The call before leaves its data in the caches (dirty or clean, from which level) and the thread
        # pool in its state, so each contender should follow each other one about equally often. A
        # shuffle does that; a rotation of one order does not (each name then follows the same one in
        # all rounds but the ones it opens): the bench had genkern run after torch.compile in 3 of 4
        # rounds, and write back the dirty lines of its output. Pixel norm forward 64x512x8x8, the same
        # kernel timed under two names: rotated, 0.396-0.403 ms for the one after the copy (an 8 MB
        # destination) and 0.380-0.386 for the other; shuffled, 0.387-0.393 for both.
        order = names[:]
        rng.shuffle(order)
        for name in order:
            if device == "cuda":
                samples[name].append(_cuda_burst(fns[name], reps[name]) / reps[name])
                continue
            sync(device)
            wake_thread_pool(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
        runs = len(next(iter(samples.values())))
        if runs >= min_runs and (time.perf_counter() - start > budget_s or runs >= 2000):
            break
    return {k: statistics.median(v) for k, v in samples.items()}


def _cuda_burst(fn: Callable[[], object], reps: int) -> float:
    """Seconds for `reps` back-to-back calls, timed with CUDA events."""
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def report_dtypes(device: str, quick: bool) -> tuple:
    """The dtypes a report runs its cases in: float32 alone in the quick CPU report (the issues' CPU targets
    are float32), float32 and bfloat16 otherwise. The kernels compute in float32 for bfloat16 inputs on
    every backend; a CPU without native bfloat16 runs them too, converting on load and store."""
    return (torch.float32,) if (device == "cpu" and quick) else (torch.float32, torch.bfloat16)


def compiled(fn: Callable, device: str) -> Callable:
    """torch.compile of an eager contender, as fairly as Inductor allows: on CUDA the autotuning mode
    (without CUDA graphs, which the other contenders do not get), on CPU the default. Every case is
    compiled for its own static shapes, so the recompile limit is lifted."""
    import torch._dynamo.config as dynamo_config
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 512))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    mode = "max-autotune-no-cudagraphs" if device == "cuda" else None
    return torch.compile(fn, dynamic=False, mode=mode)


def kernel_backends(device: str) -> list[str]:
    """The genkern backends worth timing on `device`, fastest first (not the reference, nor the Triton
    interpreter on CPU)."""
    import genkern
    return [b for b in genkern.backends(device) if b != "reference" and not (b == "triton" and device == "cpu")]


def on_backend(backend: str, device: str, fn: Callable) -> Callable:
    """fn with genkern's `backend` forced. The device's default backend is called as a user calls it, with
    nothing forced: `use_backend` costs a few microseconds per call that no other contender pays."""
    import genkern
    if backend == kernel_backends(device)[0] and genkern.current_backend() is None:
        return fn

    def forced(*args):
        with genkern.use_backend(backend):
            return fn(*args)
    return forced


def copy_yardstick(x: torch.Tensor) -> tuple[Callable[[], object], int]:
    """A copy of the case's input x into a tensor of its own, and the bytes it moves (read + write): the
    bandwidth yardstick. The report times it as one more contender in the case's interleaved rounds,
    so that it finds the caches as the contenders do: x where the previous contender left it, which
    read the same x. Timed alone afterwards (before 2026-11-23), on a source of its own, it was a bar
    none of the contenders was measured against: its source and destination stayed warm between calls."""
    src = x.detach()
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of tensors autograd saves for backward while running fn (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "CPU")
    except OSError:
        model = "CPU"
    return f"{model} ({torch.get_num_threads()} threads)"


def steady_cpu_allocator() -> bool:
    """Keep freed CPU memory in the process (glibc: no mmap for big blocks, no trimming), so that
    a timed call does not pay page faults for memory the previous call just gave back. Without it the
    medians of every contender swing by 2-5x with the allocator's state; GPUs get the same steadiness
    from PyTorch's caching allocator. Applies to all contenders alike; returns whether it took."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


def pytest_benchmark_run(benchmark, fn: Callable[[], object], group: str, traffic: int, device: str) -> None:
    """One pytest-benchmark case: grouped so each op's contenders sit side by side, bytes-moved recorded,
    the device synchronised inside the timed call."""
    benchmark.group = group
    benchmark.extra_info["bytes_moved"] = traffic

    def timed():
        fn()
        sync(device)

    benchmark.pedantic(timed, rounds=20, warmup_rounds=3)
