"""The benchmark's large cases, each run once on genkern's CUDA backend, for Nsight Compute.

scripts/gpu_check.sh's `ncu` stage runs this under `ncu` (hardware counters: DRAM throughput against
peak, achieved occupancy, where warps stall), so that a GPU session learns why a kernel sits under its
bandwidth target, not only that it does. The cases are `python -m bench`'s own GPU cases (each op's
`cases` and `case_callables`, forward + backward where the op has one), those moving at least --min-mb
(the memory-bound ones the roofline targets judge). ncu replays each kernel it profiles with the caches
flushed, so no warm-up is needed, and a kernel name filter (namespace genkern::cuda) keeps the input
set-up (randn, copies) and autograd's own kernels out of the report.
Cases run in the order printed below; ncu reports kernels in launch order. `--summary LOG` turns ncu's
text report into one table row per kernel (time, DRAM and SM throughput, occupancy, registers, cycles
between issues, and the first stall its rules name).

    python scripts/ncu_workload.py [--device cuda] [--min-mb 64]
    python scripts/ncu_workload.py --summary ncu.log
"""
import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import kernel_backends  # noqa: E402
from bench.report import OPS, _fmt_shape  # noqa: E402


def cases(device, min_bytes):
    """(label, zero-argument callable) for each benchmark case on genkern's default backend for `device`
    that moves at least min_bytes."""
    impl = f"genkern[{kernel_backends(device)[0]}]"
    for op, mod in OPS.items():
        fused = {impl: mod.implementations(device, with_compile=False)[impl]}
        backward = max(getattr(mod, "PASSES", (False, True)))
        for case in mod.cases(True, device):
            fns, traffic, _ = mod.case_callables(fused, device=device, backward=backward, **case)
            if traffic >= min_bytes:
                extra = " ".join(f"{k}={v}" for k, v in case.items() if k != "shape")
                yield f"{op} {_fmt_shape(case['shape'])} {extra} {'fwd+bwd' if backward else 'fwd'}", fns[impl]


# (column, metric name in ncu's report, unit or None for any): the first match in a kernel's sections
SUMMARY = [("us", "Duration", None), ("DRAM %", "DRAM Throughput", "%"), ("SM %", "Compute (SM) Throughput", "%"),
           ("occ %", "Achieved Occupancy", "%"), ("theo %", "Theoretical Occupancy", "%"),
           ("regs", "Registers Per Thread", None), ("cyc/issue", "Warp Cycles Per Issued Instruction", None)]
_HEADER = re.compile(r"^  (\S.*?) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)")
_METRIC = re.compile(r"^    (\S.*?)\s{2,}(\S+)\s+([-\d.,]+)\s*$")
_STALL = re.compile(r"stalled (.{0,120}?)\. This stall type represents about ([\d.]+)%")


def short_name(name: str) -> str:
    """'void genkern::cuda::(anonymous namespace)::k<float, (genkern::Activation)0>(const float *, ...)'
    -> 'k<float, (Activation)0>'."""
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"genkern::(cuda::)?(\(anonymous namespace\)::)?", "", name)
    depth = 0
    for i, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0 and i > 0:
            return name[:i]
    return name


def summarize(text: str) -> str:
    kernels = []
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            kernels.append({"kernel": short_name(h.group(1)), "text": [],
                            "grid": "x".join(g for g in h.groups()[1:4] if g != "1") or "1"})
            continue
        if not kernels:
            continue
        k = kernels[-1]
        k["text"].append(line.strip())
        m = _METRIC.match(line)
        if m:
            name, unit, value = m.groups()
            for col, metric, want in SUMMARY:
                if name == metric and (want is None or unit == want) and col not in k:
                    k[col] = value + ("" if col != "us" or unit == "us" else f" {unit}")
    for k in kernels:  # the rules' prose wraps over lines
        s = _STALL.search(" ".join(k.pop("text")))
        if s:
            k["stall"] = f"{s.group(1)} ({s.group(2)}%)"
    cols = ["kernel", "grid"] + [c for c, _, _ in SUMMARY] + ["stall"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(str(k.get(c, "-")) for c in cols) + " |" for k in kernels]
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda; cpu runs the CPU benchmark's cases")
    p.add_argument("--min-mb", type=float, default=64, help="only cases moving at least this many MB")
    p.add_argument("--summary", metavar="LOG", help="summarize an ncu text report instead")
    args = p.parse_args(argv)
    if args.summary:
        print(summarize(Path(args.summary).read_text(errors="replace")))
        return
    for i, (label, run) in enumerate(cases(args.device, args.min_mb * 2**20), 1):
        print(f"case {i}: {label}", flush=True)
        run()
        if args.device == "cuda":
            torch.cuda.synchronize()


if __name__ == "__main__":
    main()
