"""group_norm_silu benchmarks: eager F.silu(F.group_norm(...)), torch.compile of that, genkern backends.

Used by `python -m bench` (via CASES) and by pytest-benchmark (`pytest bench --benchmark-only`)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import genkern

from bench.harness import compiled, kernel_backends, on_backend, pytest_benchmark_run, report_dtypes
from genkern.ops.group_norm_silu import bytes_moved

OP = "group_norm_silu"

# (shape, num_groups): DDPM CIFAR-10 U-Net ResBlock shapes (ch 128, mults 1,2,2,2) and a 64x64
# Double-Conv U-Net block with one group over C x H x W; --full adds the 8x8 level of a 32x32 U-Net,
# the 7x7 level of a 28x28 (MNIST-sized) one, and a large map.
QUICK = [((16, 128, 32, 32), 32), ((16, 256, 16, 16), 32), ((8, 512, 32, 32), 32)]
FULL = QUICK + [((8, 64, 64, 64), 1), ((32, 256, 8, 8), 32), ((32, 256, 7, 7), 32), ((4, 512, 64, 64), 32)]
# GPU: a large memory-bound case (the roofline yardstick), the U-Net shapes, and a launch-bound one;
# (shape, G, channels_last options, dtypes)
GPU = [((32, 512, 64, 64), 32, (False, True), (torch.float32, torch.bfloat16)),
       ((16, 128, 32, 32), 32, (False, True), (torch.float32, torch.bfloat16)),
       ((8, 512, 32, 32), 32, (False,), (torch.float32, torch.bfloat16)),
       ((16, 256, 16, 16), 32, (False,), (torch.float32,))]


def eager(x, G, w, b):
    return F.silu(F.group_norm(x, G, w, b))


@functools.lru_cache(maxsize=None)
def compiled_eager(device: str):
    return compiled(eager, device)


def fused(x, G, w, b):
    return genkern.group_norm_silu(x, G, w, b)


def implementations(device: str, with_compile: bool = True) -> dict:
    impls = {"eager": eager}
    if with_compile:
        impls["torch.compile"] = compiled_eager(device)
    for be in kernel_backends(device):
        impls[f"genkern[{be}]"] = on_backend(be, device, fused)
    return impls


def make_inputs(shape, dtype, device, channels_last, requires_grad):
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device=device, dtype=dtype)
    b = torch.randn(shape[1], device=device, dtype=dtype)
    for t in (x, w, b):
        t.requires_grad_(requires_grad)
    return x, w, b


def case_callables(impls, shape, G, dtype, device, channels_last, backward):
    """{impl: zero-argument callable} running one forward (or forward + backward)."""
    x, w, b = make_inputs(shape, dtype, device, channels_last, backward)
    dy = torch.randn_like(x)
    out = {}
    for name, fn in impls.items():
        if backward:
            def run(fn=fn):
                x.grad = w.grad = b.grad = None
                fn(x, G, w, b).backward(dy)
        else:
            def run(fn=fn):
                with torch.no_grad():
                    return fn(x, G, w, b)
        out[name] = run
    traffic = bytes_moved(x, G, w, b) + (bytes_moved(x, G, w, b, backward=True) if backward else 0)
    return out, traffic, (x, w, b)


def cases(quick: bool, device: str):
    if device == "cuda":
        for shape, G, layouts, dtypes in GPU:
            for channels_last in layouts:
                for dtype in dtypes:
                    yield dict(shape=shape, G=G, dtype=dtype, channels_last=channels_last)
        return
    for shape, G in (QUICK if quick else FULL):
        for channels_last in ([False] if quick else [False, True]):
            # bfloat16 in NCHW only, to keep --full's time down; channels-last runs in float32
            for dtype in (report_dtypes(device, quick) if not channels_last else (torch.float32,)):
                yield dict(shape=shape, G=G, dtype=dtype, channels_last=channels_last)
    if quick:  # one channels-last case keeps that path honest in the quick report
        yield dict(shape=QUICK[0][0], G=QUICK[0][1], dtype=torch.float32, channels_last=True)


# -------------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest bench --benchmark-only --benchmark-group-by=group`

PYTEST_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", list(implementations(PYTEST_DEVICE, with_compile=True)))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape,G", QUICK, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_group_norm_silu(benchmark, impl, backward, shape, G):
    fns, traffic, _ = case_callables({impl: implementations(PYTEST_DEVICE)[impl]}, shape, G, torch.float32,
                                     PYTEST_DEVICE, False, backward)
    group = f"{OP} {'x'.join(map(str, shape))} {'fwd+bwd' if backward else 'fwd'}"
    pytest_benchmark_run(benchmark, fns[impl], group, traffic, PYTEST_DEVICE)
