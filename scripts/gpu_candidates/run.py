"""Build, check and time the GPU kernel candidates of scripts/gpu_candidates against the shipped kernels,
in one call on a GPU machine (after scripts/gpu_check.sh's build stage has built genkern._C):

    python scripts/gpu_candidates/run.py [OUT_DIR]
    python scripts/gpu_candidates/run.py --build-only    # compile and load them, no GPU needed
                                                         # (scripts/gpu_env_check.sh, against torch 2.11)

Checks (fresh random inputs with a non-zero mean, outputs allocated over NaN-filled memory): each
candidate against the float64 reference (genkern/reference) in forward and backward, at the timed shapes
and at odd ones; the references and errors are computed on the GPU (in float64 on the CPU, the 67M-element
cases alone would take much of the stage's time limit). Timing: CUDA events around bursts of calls replayed
from CUDA graphs, contenders interleaved in a shuffled order each round, median of the rounds, inputs
rotated among enough copies to leave the L2 cold; a copy of the same bytes timed in the same rounds is the yardstick. Prints each
candidate's checks and table; OUT_DIR gets them as candidates.json, rewritten after each candidate. A
candidate that raises is reported there and the others still run.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import traceback

import torch
import torch.utils.cpp_extension as cpp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import genkern  # noqa: E402,F401  (loads genkern._C: the shipped ops timed against)
from genkern import reference as R  # noqa: E402

SOURCES = ["pixel_norm_tile.cu", "minibatch_stddev_flat.cu", "group_norm_silu_tuning.cu",
           "group_norm_silu_cl_groups.cu"]
# (tile_bytes, 16-byte accesses): the pixel norm NCHW variants of pixel_norm_tile.cu
PIXEL_NORM_VARIANTS = [(64, False), (64, True), (128, True)]
TIMED = [(32, 512, 64, 64), (16, 512, 32, 32), (64, 512, 8, 8)]
ODD = [(3, 7, 5, 5), (2, 300, 9, 9), (5, 512, 8, 8), (2, 1000, 4, 4), (1, 3, 1, 2)]
DTYPES = [torch.float32, torch.bfloat16]
# minibatch_stddev_flat.cu: (shape, group_size, num_channels, channels_last)
MBSTD_TIMED = [((64, 512, 32, 32), 4, 1, False), ((64, 512, 32, 32), 4, 1, True), ((32, 512, 4, 4), 4, 1, False)]
MBSTD_ODD = [((4, 3, 5, 5), 4, 1, False), ((6, 10, 3, 3), 3, 2, False), ((8, 64, 4, 4), 4, 1, True),
             ((8, 63, 4, 4), 2, 1, True), ((2, 16, 1, 1), 2, 1, False), ((16, 32, 8, 8), 4, 2, True)]
# group_norm_silu_tuning.cu and group_norm_silu_cl_groups.cu: (shape, num_groups, channels_last, activation).
# The shipped one-pass kernels take min_blocks 3 and 64 KB slices (48 KB per tensor backward); the tuning
# candidates (name: (min_blocks, forward and backward slice bytes, 0 = shipped)) try 1 and 2, and half the
# slices (twice the CTAs: a bfloat16 group of 128 KB took 2, 2048 CTAs in 5.2 waves of 396 at 32x512x64x64).
# The channels-last groups-per-cluster candidate picks its own (0: rows of 128 bytes) or takes 2. The cifar10
# U-Net's channels-last maps (C = 128: 8-byte group rows in bfloat16; 256) close the timed list.
GN_TUNING = {"min1": (1, 0, 0), "min2": (2, 0, 0), "half_slices": (3, 32 << 10, 24 << 10)}
GN_GROUPS_PER_CLUSTER = (0, 2)
GN_TIMED = [((32, 512, 64, 64), 32, False, "silu"), ((32, 512, 64, 64), 32, True, "silu"),
            ((16, 256, 32, 32), 32, False, "silu"), ((16, 256, 32, 32), 32, True, "silu"),
            ((128, 128, 32, 32), 32, True, "silu"), ((128, 256, 16, 16), 32, True, "silu")]
GN_ODD = [((3, 6, 5, 5), 3, False, "silu"), ((2, 64, 7, 7), 32, True, "silu"), ((4, 32, 8, 8), 8, True, "gelu"),
          ((4, 32, 8, 8), 8, False, None), ((1, 512, 64, 64), 32, False, "silu"), ((2, 96, 12, 12), 1, True, "silu"),
          ((3, 64, 5, 7), 32, True, "silu"), ((2, 128, 9, 9), 16, True, "silu"), ((1, 128, 64, 64), 32, True, "silu")]
# what a candidate's refusal of a shape says (not a failure); anything else raised is one
GN_REFUSALS = ("group_norm_silu_tuning", "group_norm_silu_cl_groups")


def gn_refused(e: RuntimeError) -> bool:
    """True when e is a GroupNorm candidate refusing a shape; any other error is raised again."""
    if not any(r in str(e) for r in GN_REFUSALS):
        raise e
    return True


def gn_variants():
    """GroupNorm+SiLU candidates: name -> (forward(x, w, b, G, eps, act), backward(dy, x, w, b, mean, rstd, G, act))."""
    cand = torch.ops.genkern_candidates
    variants = {}
    for name, (mb, fwd_bytes, bwd_bytes) in GN_TUNING.items():
        variants[name] = (
            lambda x, w, b, G, eps, act, mb=mb, sb=fwd_bytes: cand.group_norm_silu_tuning(x, w, b, G, eps, act, mb, sb),
            lambda dy, x, w, b, m, r, G, act, mb=mb, sb=bwd_bytes: cand.group_norm_silu_tuning_backward(
                dy, x, w, b, m, r, G, act, mb, sb))
    for gpc in GN_GROUPS_PER_CLUSTER:
        variants[f"groups{gpc or 'auto'}"] = (
            lambda x, w, b, G, eps, act, gpc=gpc: cand.group_norm_silu_cl_groups(x, w, b, G, eps, act, gpc),
            lambda dy, x, w, b, m, r, G, act, gpc=gpc: cand.group_norm_silu_cl_groups_backward(dy, x, w, b, m, r, G,
                                                                                               act, gpc))
    return variants


TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def build():
    """Compile the candidates into one library and load it (for TORCH_CUDA_ARCH_LIST, else the GPU's arch)."""
    prebuilt = os.environ.get("GENKERN_CANDIDATES_LIB")
    if prebuilt:  # built by make gpu-env-check from these sources (scripts/gpu_prebuilt.py checked)
        torch.ops.load_library(prebuilt)
        return
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "{}.{}".format(*torch.cuda.get_device_capability())
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    cpp.load(name="genkern_candidates", sources=[os.path.join(HERE, f) for f in SOURCES],
             extra_include_paths=[os.path.join(ROOT, "csrc")],
             # setup.py's nvcc flags, so that a candidate and the shipped kernel it races compile alike
             extra_cuda_cflags=["-O3", "--use_fast_math", "--expt-relaxed-constexpr"],
             is_python_module=False, verbose=False)


def poison():
    """Fill the caching allocator's free memory with NaN, so that an element a kernel leaves unwritten
    shows in the checks."""
    free = torch.cuda.mem_get_info()[0]
    big = torch.full(((free // 2) // 4,), float("nan"), device="cuda")
    small = [torch.full((n,), float("nan"), device="cuda") for n in (256, 4096, 65536, 262143) for _ in range(8)]
    del big, small


def cuda_input(shape, dtype, channels_last=False):
    """A random input with a non-zero mean (so that variance bugs show), on the GPU."""
    x = (torch.randn(shape, device="cuda") * 0.8 - 1.3).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def rel_err(got, want):
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_pixel_norm(shape, dtype):
    """Each variant against the float64 reference (computed once). Returns {variant: result}."""
    x = cuda_input(shape, dtype)
    dy = torch.randn(shape, device="cuda").to(dtype)
    x64 = x.double().requires_grad_()
    want = R.pixel_norm(x64, 1e-8)
    (want_dx,) = torch.autograd.grad(want, x64, dy.double())
    want_rstd = (x64.detach().pow(2).mean(1) + 1e-8).rsqrt().reshape(-1)
    results = {}
    for variant in PIXEL_NORM_VARIANTS:
        try:
            poison()
            y, rstd = torch.ops.genkern_candidates.pixel_norm_tile(x, 1e-8, *variant)
            poison()
            dx = torch.ops.genkern_candidates.pixel_norm_tile_backward(dy, x, rstd, *variant)
            torch.cuda.synchronize()
        except RuntimeError as e:  # a variant that cannot take this shape says so; that is not a failure
            if "pixel_norm_tile" not in str(e):
                raise  # anything else (a CUDA error) is
            results[variant] = f"refused: {str(e).splitlines()[0][:80]}"
            continue
        errs = (rel_err(y, want.detach()), rel_err(dx, want_dx), rel_err(rstd.view(-1), want_rstd))
        results[variant] = "ok" if max(errs) <= TOL[dtype] else \
            f"FAILED rel err y {errs[0]:.2e} dx {errs[1]:.2e} rstd {errs[2]:.2e}"
    return results


def time_rounds(fns: dict, rounds=30, burst_ms=2.0):
    """Median ms per call of each fn: a burst of calls (~burst_ms) captured as one CUDA graph, so that the
    host's launch cost stays out of small cases, replayed between CUDA events in every round."""
    graphs, reps = {}, {}
    for k, f in fns.items():
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            f()
        e.record()
        e.synchronize()
        reps[k] = max(1, min(200, int(burst_ms / max(s.elapsed_time(e) / 10, 1e-3))))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps[k]):
                f()
        graphs[k] = g
    samples = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            graphs[k].replay()
            e.record()
            e.synchronize()
            samples[k].append(s.elapsed_time(e) / reps[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def rotating(make, nbytes):
    """Enough copies of make()'s tensors that cycling through them leaves the 50 MB L2 cold."""
    sets = [make() for _ in range(max(1, min(8, (256 << 20) // max(nbytes, 1))))]
    state = {"i": 0}

    def next_set():
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]
    return next_set


def time_pixel_norm(shape, dtype):
    nbytes = torch.Size(shape).numel() * dtype.itemsize

    def make():
        x = cuda_input(shape, dtype)
        dy = torch.randn(shape, device="cuda").to(dtype)
        _, rstd = torch.ops.genkern.pixel_norm(x, 1e-8)
        return x, dy, rstd, torch.empty_like(x)
    nxt = rotating(make, 2 * nbytes)
    ops = torch.ops.genkern
    cand = torch.ops.genkern_candidates
    copy = lambda: (lambda s: s[3].copy_(s[0]))(nxt())  # noqa: E731  (the same yardstick in both passes)
    fwd = {"shipped": lambda: ops.pixel_norm(nxt()[0], 1e-8), "copy": copy}
    bwd = {"shipped": lambda: (lambda s: ops.pixel_norm_backward(s[1], s[0], s[2]))(nxt()), "copy": copy}
    for v in PIXEL_NORM_VARIANTS:
        name = f"tile{v[0]}{'v16' if v[1] else ''}"
        fwd[name] = lambda v=v: cand.pixel_norm_tile(nxt()[0], 1e-8, *v)
        bwd[name] = lambda v=v: (lambda s: cand.pixel_norm_tile_backward(s[1], s[0], s[2], *v))(nxt())
    return timed_rows("pixel_norm", "x".join(map(str, shape)), dtype, fwd, bwd, nbytes)


def check_minibatch_stddev(shape, G, F, channels_last, dtype):
    """Both access widths against the float64 reference (computed once). Returns {vec: result}."""
    x = cuda_input(shape, dtype, channels_last)
    gout = torch.randn((shape[0], shape[1] + F, *shape[2:]), device="cuda").to(dtype)
    x64 = x.double().requires_grad_()
    want = R.minibatch_stddev(x64, G, F, 1e-8)
    (want_dx,) = torch.autograd.grad(want, x64, gout.double())
    results = {}
    for vec in (False, True):
        poison()
        out = torch.ops.genkern_candidates.minibatch_stddev_flat(x, G, F, 1e-8, vec)
        poison()
        dx = torch.ops.genkern_candidates.minibatch_stddev_flat_backward(gout, x, G, F, 1e-8, vec)
        torch.cuda.synchronize()
        errs = (rel_err(out, want.detach()), rel_err(dx, want_dx))
        results[vec] = "ok" if max(errs) <= TOL[dtype] else f"FAILED rel err out {errs[0]:.2e} dx {errs[1]:.2e}"
    return results


def time_minibatch_stddev(shape, G, F, channels_last, dtype):
    nbytes = torch.Size(shape).numel() * dtype.itemsize

    def make():
        x = cuda_input(shape, dtype, channels_last)
        gout = torch.randn((shape[0], shape[1] + F, *shape[2:]), device="cuda").to(dtype)
        if channels_last:
            gout = gout.to(memory_format=torch.channels_last)
        return x, gout, torch.empty_like(x)
    nxt = rotating(make, 2 * nbytes)
    ops, cand = torch.ops.genkern, torch.ops.genkern_candidates
    copy = lambda: (lambda s: s[2].copy_(s[0]))(nxt())  # noqa: E731  (the same yardstick in both passes)
    fwd = {"shipped": lambda: ops.minibatch_stddev(nxt()[0], G, F, 1e-8), "copy": copy}
    bwd = {"shipped": lambda: (lambda s: ops.minibatch_stddev_backward(s[1], s[0], G, F, 1e-8))(nxt()),
           "copy": copy}
    for vec in (False, True):
        name = "flatv16" if vec else "flat"
        fwd[name] = lambda vec=vec: cand.minibatch_stddev_flat(nxt()[0], G, F, 1e-8, vec)
        bwd[name] = lambda vec=vec: (lambda s: cand.minibatch_stddev_flat_backward(s[1], s[0], G, F, 1e-8, vec))(nxt())
    label = "x".join(map(str, shape)) + ("cl" if channels_last else "")
    return timed_rows("minibatch_stddev", label, dtype, fwd, bwd, nbytes)


def gn_params(C, dtype):
    return (torch.randn(C, device="cuda") * 0.5 + 1).to(dtype), (torch.randn(C, device="cuda") * 0.3).to(dtype)


def check_group_norm_silu(shape, G, channels_last, act, dtype):
    """Each variant's kernels against the float64 reference (computed once): y, mean, rstd, and dx,
    dweight, dbias. Returns {variant: "ok" | "refused: ..." | "FAILED ..."}."""
    act = act or "none"
    x = cuda_input(shape, dtype, channels_last)
    w, b = gn_params(shape[1], dtype)
    dy = torch.randn(shape, device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    want = R.group_norm_silu(x64, G, w64, b64, 1e-5, act)
    wants = (want.detach(), *torch.autograd.grad(want, (x64, w64, b64), dy.double()))
    xg = x64.detach().reshape(shape[0], G, -1)
    wants = wants[:1] + (xg.mean(-1), (xg.var(-1, unbiased=False) + 1e-5).rsqrt()) + wants[1:]
    shipped = torch.ops.genkern.group_norm_silu(x, w, b, G, 1e-5, act)
    shipped += torch.ops.genkern.group_norm_silu_backward(dy, x, w, b, shipped[1], shipped[2], G, act)
    results = {}
    for name, (fwd, bwd) in gn_variants().items():
        try:
            poison()
            got = fwd(x, w, b, G, 1e-5, act)
            poison()
            got += bwd(dy, x, w, b, got[1], got[2], G, act)
            torch.cuda.synchronize()
        except RuntimeError as e:  # a shape the variant does not take says so; that is not a failure
            gn_refused(e)
            results[name] = f"refused: {str(e).splitlines()[0][:80]}"
            continue
        errs = [rel_err(g, wnt) for g, wnt in zip(got, wants)]
        layout_ok = got[0].is_contiguous(memory_format=torch.channels_last) == channels_last or shape[2] * shape[3] == 1
        # min_blocks: the same arithmetic as the shipped kernels, so the same bits are expected (a difference is
        # reported); other slices or groups per cluster: sums in another order
        same = all(torch.equal(g, s) for g, s in zip(got, shipped)) or not name.startswith("min")
        # dbias and dweight sum N*HW terms of both signs in float32: 1e-4 of their norm for float32
        if max(errs) <= max(TOL[dtype], 1e-4) and layout_ok:
            results[name] = "ok" if same else "ok, but not bit-identical to the shipped kernels"
        else:
            names = ("y", "mean", "rstd", "dx", "dweight", "dbias")
            results[name] = ("FAILED rel err " + " ".join(f"{n} {e:.2e}" for n, e in zip(names, errs))
                             + ("" if layout_ok else " layout"))
    return results


def time_group_norm_silu(shape, G, channels_last, act, dtype):
    act = act or "none"
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def make():
        x = cuda_input(shape, dtype, channels_last)
        w, b = gn_params(shape[1], dtype)
        dy = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
        _, mean, rstd = torch.ops.genkern.group_norm_silu(x, w, b, G, 1e-5, act)
        return x, w, b, dy, mean, rstd, torch.empty_like(x)
    nxt = rotating(make, 2 * nbytes)
    ops = torch.ops.genkern
    copy = lambda: (lambda s: s[6].copy_(s[0]))(nxt())  # noqa: E731  (the same yardstick in both passes)
    fwd = {"shipped": lambda: (lambda s: ops.group_norm_silu(s[0], s[1], s[2], G, 1e-5, act))(nxt()), "copy": copy}
    bwd = {"shipped": lambda: (lambda s: ops.group_norm_silu_backward(s[3], s[0], s[1], s[2], s[4], s[5], G, act))(
        nxt()), "copy": copy}
    for name, (f, bk) in gn_variants().items():
        for fns, call in ((fwd, lambda s, f=f: f(s[0], s[1], s[2], G, 1e-5, act)),
                          (bwd, lambda s, bk=bk: bk(s[3], s[0], s[1], s[2], s[4], s[5], G, act))):
            try:  # a variant that refuses the shape is left out of the timing
                call(nxt())
            except RuntimeError as e:
                if gn_refused(e):
                    continue
            fns[name] = lambda call=call: call(nxt())
    label = "x".join(map(str, shape)) + ("cl" if channels_last else "")
    return timed_rows("group_norm_silu", label, dtype, fwd, bwd, nbytes)


def timed_rows(op, label, dtype, fwd, bwd, nbytes):
    """Rows of the table: each contender's ms, GB/s (forward moves 2 tensors, backward 3) and the fraction
    of the copy's GB/s timed in the same rounds."""
    rows = []
    for pass_, fns, moved in (("fwd", fwd, 2 * nbytes), ("bwd", bwd, 3 * nbytes)):
        with torch.no_grad():
            ms = time_rounds(fns)
        copy_gbps = 2 * nbytes / ms["copy"] / 1e6
        for k, t in ms.items():
            if k != "copy":
                gbps = moved / t / 1e6
                rows.append(dict(op=op, shape=label, dtype=str(dtype).split(".")[1], pass_=pass_, impl=k, ms=t,
                                 gbps=gbps, frac_copy=gbps / copy_gbps))
    return rows


def run_cases(timed, odd, check, time_case, label):
    """One candidate: check(*case, dtype) -> {variant: result} for every case (the odd ones in float16
    too), time_case(*case, dtype) -> rows for the timed ones. Returns ({label: result}, rows)."""
    checks = {}
    for case in timed + odd:
        for dtype in DTYPES + ([torch.float16] if case in odd else []):
            for variant, res in check(*case, dtype).items():
                checks[label(case, dtype, variant)] = res
    return checks, [r for case in timed for dtype in DTYPES for r in time_case(*case, dtype)]


def layout(cl):
    return "cl" if cl else "nchw"


# GroupNorm+SiLU first: its kernels ship with a budget the GPU has not judged yet
CANDIDATES = [
    ("group_norm_silu_tuning.cu + group_norm_silu_cl_groups.cu", lambda: run_cases(
        GN_TIMED, GN_ODD, check_group_norm_silu, time_group_norm_silu,
        lambda c, d, v: f"{c[0]} G={c[1]} {layout(c[2])} {c[3]} {d} {v}")),
    ("minibatch_stddev_flat.cu", lambda: run_cases(
        MBSTD_TIMED, MBSTD_ODD, check_minibatch_stddev, time_minibatch_stddev,
        lambda c, d, v: f"{c[0]} G={c[1]} F={c[2]} {layout(c[3])} {d} vec={v}")),
    ("pixel_norm_tile.cu", lambda: run_cases(
        [(s,) for s in TIMED], [(s,) for s in ODD], check_pixel_norm, time_pixel_norm,
        lambda c, d, v: f"{c[0]} {d} tile{v[0]}{'v16' if v[1] else ''}")),
]


def main():
    if sys.argv[1:] == ["--build-only"]:
        build()
        ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("genkern_candidates::"))
        print(f"candidates {'loaded (prebuilt)' if os.environ.get('GENKERN_CANDIDATES_LIB') else 'built'} from {', '.join(SOURCES)}: {len(ops)} ops ({', '.join(o.split('::')[1] for o in ops)})")
        return
    out = sys.argv[1] if len(sys.argv) > 1 else None
    build()
    torch.manual_seed(0)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, failed=False, rows=[], checks={},
                  errors={})
    for source, run_candidate in CANDIDATES:
        # each candidate on its own: one that crashes or fails leaves the others' figures, and the JSON is
        # rewritten after each, so that a stage cut short by its time limit keeps what it measured
        print(f"\n{source}:", flush=True)
        try:
            checks, rows = run_candidate()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["errors"][source] = f"{type(e).__name__}: {e}"[:500]
            result["failed"] = True
            checks, rows = {}, []
        bad = {k: v for k, v in checks.items() if v != "ok"}
        result["failed"] |= any(v.startswith("FAILED") for v in bad.values())
        result["checks"][source] = bad
        for k, v in bad.items():
            print(f"  {k}: {v}")
        print(f"  checks: {len(checks) - len(bad)} of {len(checks)} ok", flush=True)
        if rows:
            print(f"  {'op':16} {'shape':16} {'dtype':9} {'pass':4} {'impl':10} {'ms':>8} {'GB/s':>7} {'% copy':>7}")
        for r in rows:
            print(f"  {r['op']:16} {r['shape']:16} {r['dtype']:9} {r['pass_']:4} {r['impl']:10} {r['ms']:8.4f} "
                  f"{r['gbps']:7.0f} {100 * r['frac_copy']:6.0f}%", flush=True)
        result["rows"] += rows
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "candidates.json"), "w") as f:
                json.dump(result, f, indent=1)
    sys.exit(1 if result["failed"] else 0)


if __name__ == "__main__":
    main()
