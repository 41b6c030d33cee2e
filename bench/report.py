"""`python -m bench`: every op at the reference models' shapes, forward and forward+backward, eager
PyTorch vs torch.compile of the same code vs each genkern backend, in one process, interleaved.

Writes bench/results/<device>.json, .md and .png, and prints the table."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import sys
import time

import torch

import genkern

from . import bench_ddpm_step, bench_gan_ops, bench_group_norm_silu, targets
from .harness import copy_yardstick, device_name, saved_bytes, steady_cpu_allocator, time_interleaved

OPS = {"group_norm_silu": bench_group_norm_silu, "ddpm_step": bench_ddpm_step, **bench_gan_ops.OPS}
HERE = os.path.dirname(os.path.abspath(__file__))


def _progress(total):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc="bench", unit="case", file=sys.stderr)
    except ImportError:
        class _Plain:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                print(f"  {s}", file=sys.stderr, flush=True)

            def close(self):
                pass
        return _Plain()


def _fmt_shape(shape):
    return "x".join(map(str, shape))


def run_order(plan):
    """The positions of `plan` (op-major: each op's cases, forward then forward+backward) in the order they
    run on a GPU: every op's first entry, then every op's second, and so on. A time limit
    (scripts/gpu_check.sh stops the bench after BENCH_TIMEOUT, torch.compile's autotuning taking minutes)
    then leaves each op measured at its first cases, instead of the last ops at none: the first H100 runs
    never reached the gradient penalty. The CPU runs op-major, as in every earlier session, so that its
    figures stay comparable with theirs; nothing cuts a CPU run short."""
    first, seen, keys = {}, {}, []
    for op, _, _ in plan:
        first.setdefault(op, len(first))
        keys.append((seen.get(op, 0), first[op]))  # (its place among its op's entries, the op's place)
        seen[op] = seen.get(op, 0) + 1
    return sorted(range(len(plan)), key=keys.__getitem__)


def run(ops, device, quick, with_compile, budget_s):
    plan = [(op, case, backward) for op in ops for case in OPS[op].cases(quick, device)
            for backward in getattr(OPS[op], "PASSES", (False, True))]
    bar = _progress(len(plan))
    by_entry, errors = [[] for _ in plan], []
    impls = {op: OPS[op].implementations(device, with_compile) for op in ops}
    try:
        for i in (run_order(plan) if device == "cuda" else range(len(plan))):
            _run_entry(*plan[i], impls, device, budget_s, bar, by_entry[i], errors)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (a time limit): keep and write what was measured
        errors.append(dict(case="-", impl="-", error="interrupted: the cases after this were not run"))
    bar.close()
    return [row for rows in by_entry for row in rows], errors  # reported op-major, as planned


_COPY = "copy (yardstick)"  # timed with the contenders, not reported as one


def _run_entry(op, case, backward, impls, device, budget_s, bar, rows, errors):
    """Times one (op, case, pass) entry of the plan; its rows go to `rows`, failed contenders to `errors`."""
    mod = OPS[op]
    label = f"{op} {_fmt_shape(case['shape'])} {'fwd+bwd' if backward else 'fwd'}"
    bar.set_postfix_str(label)
    t_entry = time.perf_counter()
    fns, traffic, tensors = mod.case_callables(impls[op], device=device, backward=backward, **case)
    first_call = {}
    for name in list(fns):  # a contender that fails is reported and left out, not the whole run
        try:
            t0 = time.perf_counter()
            fns[name]()
            first_call[name] = time.perf_counter() - t0  # torch.compile compiles (and autotunes) here
        except Exception as e:  # noqa: BLE001
            errors.append(dict(case=label, impl=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(f"\n{label} {name} FAILED: {errors[-1]['error']}", file=sys.stderr, flush=True)
            del fns[name]
    if "eager" not in fns:
        bar.update(1)
        return
    copy_fn, copy_bytes = copy_yardstick(tensors[0])
    times = time_interleaved({**fns, _COPY: copy_fn}, device, budget_s=budget_s)
    copy_bw = copy_bytes / times.pop(_COPY)
    eager_t, compile_t = times["eager"], times.get("torch.compile")
    # saved-for-backward bytes only mean something for ops with a backward pass
    for name, t in times.items():
        saved = None
        if backward and name != "torch.compile":
            saved = saved_bytes(fns[name])
        rows.append(dict(
            op=op + (" cfg" if case.get("cfg") else ""), shape=_fmt_shape(case["shape"]), groups=case.get("G"),
            layout="channels_last" if case.get("channels_last") else "nchw",
            dtype=str(case["dtype"]).replace("torch.", ""), pass_="fwd+bwd" if backward else "fwd",
            impl=name, ms=t * 1e3, gbps=traffic / t / 1e9, copy_gbps=copy_bw / 1e9,
            frac_copy=traffic / t / copy_bw, vs_eager=eager_t / t,
            vs_compile=(compile_t / t) if compile_t else None,
            saved_mb=None if saved is None else saved / 2**20, first_call_s=first_call[name]))
    # the entry's wall time, compiling and warm-up included (on a GPU mostly torch.compile's autotuning):
    # what a time-limited run (scripts/gpu_check.sh) has to plan for
    entry_s = time.perf_counter() - t_entry
    for row in rows:
        row["entry_s"] = entry_s
    bar.update(1)


COLUMNS = [("op", "op", "{}"), ("shape", "shape", "{}"), ("layout", "layout", "{}"), ("dtype", "dtype", "{}"),
           ("pass_", "pass", "{}"), ("impl", "impl", "{}"), ("ms", "ms", "{:.3f}"), ("gbps", "GB/s", "{:.1f}"),
           ("frac_copy", "% copy", "{:.0%}"), ("vs_eager", "vs eager", "{:.2f}x"),
           ("vs_compile", "vs compile", "{:.2f}x"), ("saved_mb", "saved MB", "{:.1f}")]


def _cell(row, key, fmt):
    v = row[key]
    return "-" if v is None else fmt.format(v)


def table_text(rows):
    cells = [[h for _, h, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_markdown(rows):
    out = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(out)


def environment(device):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(date=datetime.date.today().isoformat(), device=device, device_name=device_name(device),
                torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                threads=torch.get_num_threads(), genkern=genkern.__version__,
                backends=list(genkern.backends(device)),
                cpu_isa=genkern._extension.BUILD_INFO.get("cpu_isa"))  # what the CPU kernels were built for


def chart(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return False
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "eager"]
    cases = list(dict.fromkeys((r["op"], r["shape"], r["layout"], r["dtype"], r["pass_"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(cases)), 5))
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        vals = [next((r["vs_eager"] for r in rows if (r["op"], r["shape"], r["layout"], r["dtype"], r["pass_"]) == c
                      and r["impl"] == impl), 0) for c in cases]
        ax.bar([i + k * width for i in range(len(cases))], vals, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(cases))])
    ax.set_xticklabels(["\n".join([c[0], c[1], c[2] + " " + c[3], c[4]]) for c in cases], fontsize=7,
                       rotation=25, ha="right")
    ax.set_ylabel("speedup vs eager PyTorch")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def time_spent_text(rows):
    """Where the run's wall time went: the entries' total and each contender's first calls (compiling)."""
    first = {}
    for r in rows:
        first[r["impl"]] = first.get(r["impl"], 0.0) + r["first_call_s"]
    entries = sum(r["entry_s"] for r in rows if r["impl"] == "eager")  # one eager row per entry
    return (f"time spent: {entries:.1f} s in {sum(r['impl'] == 'eager' for r in rows)} entries; first calls "
            "(compiling, warm-up): " + ", ".join(f"{k} {v:.1f} s" for k, v in first.items()))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--full", action="store_true", help="more shapes, layouts and dtypes")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for minutes on CPU)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case (min 15 runs each)")
    p.add_argument("--raw-allocator", action="store_true",
                   help="leave glibc malloc as it is (default: keep freed memory, see harness.steady_cpu_allocator)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    steady = False if args.raw_allocator else steady_cpu_allocator()
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; choose from {list(OPS)}")
    env = environment(args.device)
    env["steady_cpu_allocator"] = steady
    print(f"genkern bench on {env['device_name']}: torch {env['torch']}, triton {env['triton']}, "
          f"backends {env['backends']}", flush=True)
    rows, errors = run(ops, args.device, not args.full, not args.no_compile, args.budget)
    text = table_text(rows)
    print(text)
    for e in errors:
        print(f"FAILED: {e['case']} {e['impl']}: {e['error']}")
    print("\n" + time_spent_text(rows))
    checks = targets.check(rows, args.device, genkern._backend.select(args.device))
    print("\n" + targets.summary_text(checks))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.device)
    with open(stem + ".json", "w") as f:
        json.dump(dict(environment=env, rows=rows, errors=errors, targets=checks), f, indent=1)
    title = f"genkern on {env['device_name']} ({env['date']}, torch {env['torch']})"
    with open(stem + ".md", "w") as f:
        f.write(f"# {title}\n\nGB/s from each op's bytes-moved model; % copy = that over a device copy of the "
                f"same size timed in the same interleaved rounds as the contenders; saved MB = tensors kept for backward. "
                f"Steady CPU allocator: {steady}.\n\n")
        f.write(table_markdown(rows) + "\n\n" + targets.summary_markdown(checks) + "\n")
    made_png = chart(rows, stem + ".png", title)
    if errors:
        with open(stem + ".md", "a") as f:
            f.write("\nFailed contenders:\n\n" + "\n".join(f"- {e['case']} {e['impl']}: {e['error']}"
                                                          for e in errors) + "\n")
    print(f"\nwrote {stem}.json, {stem}.md" + (f", {stem}.png" if made_png else ""))


if __name__ == "__main__":
    main()
