"""The CUDA kernels issue 7 tunes, each launched once at its large benchmark shape, for Nsight Compute.

scripts/gpu_check.sh's `ncu` stage runs this under `ncu` (hardware counters: DRAM throughput against
peak, achieved occupancy, where warps stall), so that a GPU session learns why a kernel sits under its
bandwidth target, not only that it does. ncu replays each kernel it profiles with the caches flushed, so
no warm-up is needed, and a kernel name filter (namespace genkern::cuda) keeps the input set-up (randn,
copies) and autograd's own kernels out of the report.
Cases run in the order printed below; ncu reports kernels in launch order. `--summary LOG` turns ncu's
text report into one table row per kernel (time, DRAM and SM throughput, occupancy, registers, cycles
between issues, and the first stall its rules name).

    python scripts/ncu_workload.py [--device cuda]
    python scripts/ncu_workload.py --summary ncu.log
"""
import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import genkern  # noqa: E402


def _leaf(shape, dtype, device, channels_last=False, mean=-0.5):
    x = (mean + torch.randn(shape, device=device)).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_()


def _fwd_bwd(fn, x):
    y = fn(x)
    y.backward(torch.randn_like(y))


def cases(device):
    def gn(dtype, cl):
        C = 512
        w = torch.ones(C, device=device, requires_grad=True)
        b = torch.zeros(C, device=device, requires_grad=True)
        return lambda: _fwd_bwd(lambda x: genkern.group_norm_silu(x, 32, w, b),
                                _leaf((32, C, 64, 64), dtype, device, cl))

    def step():
        x = torch.randn(64, 3, 256, 256, device=device, dtype=torch.bfloat16)
        m = torch.randn_like(x)
        return lambda: genkern.ddpm_step(m, x, 0.3, 0.4, seed=1, offset=2)

    f32, bf16 = torch.float32, torch.bfloat16
    return [
        ("group_norm_silu 32x512x64x64 G=32 nchw float32 fwd+bwd", gn(f32, False)),
        ("group_norm_silu 32x512x64x64 G=32 nchw bfloat16 fwd+bwd", gn(bf16, False)),
        ("group_norm_silu 32x512x64x64 G=32 channels_last float32 fwd+bwd", gn(f32, True)),
        ("group_norm_silu 32x512x64x64 G=32 channels_last bfloat16 fwd+bwd", gn(bf16, True)),
        ("pixel_norm 32x512x64x64 nchw float32 fwd+bwd",
         lambda: _fwd_bwd(genkern.pixel_norm, _leaf((32, 512, 64, 64), f32, device))),
        ("pixel_norm 32x512x64x64 channels_last bfloat16 fwd+bwd",
         lambda: _fwd_bwd(genkern.pixel_norm, _leaf((32, 512, 64, 64), bf16, device, True))),
        ("minibatch_stddev 64x512x32x32 nchw float32 fwd+bwd",
         lambda: _fwd_bwd(genkern.minibatch_stddev, _leaf((64, 512, 32, 32), f32, device))),
        ("ddpm_step 64x3x256x256 bfloat16, in-kernel noise", step()),
        ("gradient_norm_penalty 256x3x128x128 float32 fwd+bwd",
         lambda: _fwd_bwd(lambda g: genkern.gradient_norm_penalty(g, 10.0, 1.0),
                          _leaf((256, 3, 128, 128), f32, device, mean=0.0))),
    ]


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
    p.add_argument("--device", default="cuda", help="cuda; cpu runs the same calls on the CPU kernels")
    p.add_argument("--summary", metavar="LOG", help="summarize an ncu text report instead")
    args = p.parse_args(argv)
    if args.summary:
        print(summarize(Path(args.summary).read_text(errors="replace")))
        return
    backend = "cuda" if args.device == "cuda" else "cpu"
    with genkern.use_backend(backend):
        for i, (name, run) in enumerate(cases(args.device), 1):
            print(f"case {i}: {name}", flush=True)
            run()
            if args.device == "cuda":
                torch.cuda.synchronize()


if __name__ == "__main__":
    main()
