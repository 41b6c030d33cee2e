"""ddpm_step benchmarks: one DDPM reverse step (diffusers' defaults: epsilon prediction, x0 clipped to
[-1, 1], fixed_small variance), optionally with classifier-free guidance.

Contenders: the eager step (diffusers' formula, torch.randn_like noise), torch.compile of it, and the
fused genkern step with in-kernel Philox noise; "genkern[<b>]+randn" is the fused step fed a
torch.randn_like tensor, to show what the in-kernel noise itself buys.
Used by `python -m bench` and by pytest-benchmark (`pytest bench --benchmark-only`)."""
from __future__ import annotations

import functools

import pytest
import torch

import genkern

from bench.harness import compiled, kernel_backends, on_backend, pytest_benchmark_run, report_dtypes
from genkern.ops.ddpm_step import bytes_moved

OP = "ddpm_step"
PASSES = (False,)  # sampling has no backward pass

# CIFAR-10-size batch, 128x128 images, a 64x64 latent batch under guidance (w = 7.5)
QUICK = [dict(shape=(64, 3, 32, 32), cfg=False), dict(shape=(32, 3, 128, 128), cfg=False),
         dict(shape=(8, 4, 64, 64), cfg=True)]
FULL = QUICK + [dict(shape=(16, 3, 64, 64), cfg=True), dict(shape=(4, 3, 256, 256), cfg=False)]
# GPU: the 256-image CIFAR-10 batch of the end-to-end run, a latent batch under guidance, and a large
# memory-bound batch (the roofline yardstick)
GPU = [dict(shape=(256, 3, 32, 32), cfg=False), dict(shape=(32, 4, 64, 64), cfg=True),
       dict(shape=(64, 3, 256, 256), cfg=False)]

A_T, A_PREV, W = 0.4, 0.45, 7.5   # alpha_bar at t and t-1 (mid-trajectory), guidance scale


def eager(m, x, cfg):
    """The step as diffusers' DDPMScheduler computes it, plus guidance as its pipelines apply it."""
    if cfg:
        u, c = m.chunk(2)
        m = u + W * (c - u)
    beta_prod_t = 1 - A_T
    x0 = (x - beta_prod_t ** 0.5 * m) / A_T ** 0.5
    x0 = x0.clamp(-1, 1)
    cur_alpha = A_T / A_PREV
    c0 = A_PREV ** 0.5 * (1 - cur_alpha) / beta_prod_t
    ct = cur_alpha ** 0.5 * (1 - A_PREV) / beta_prod_t
    var = (1 - A_PREV) / beta_prod_t * (1 - cur_alpha)
    return c0 * x0 + ct * x + var ** 0.5 * torch.randn_like(x)


@functools.lru_cache(maxsize=None)
def compiled_eager(device: str):
    return compiled(eager, device)


def fused_fn(noise_tensor=False):
    def fn(m, x, cfg):
        z = torch.randn_like(x) if noise_tensor else None
        return genkern.ddpm_step(m, x, A_T, A_PREV, clip_sample_range=1.0, guidance_scale=W if cfg else None,
                                 noise=z, seed=None if noise_tensor else 1234, offset=500)
    return fn


def implementations(device: str, with_compile: bool = True) -> dict:
    impls = {"eager": eager}
    if with_compile:
        impls["torch.compile"] = compiled_eager(device)
    for be in kernel_backends(device):
        impls[f"genkern[{be}]"] = on_backend(be, device, fused_fn())
        impls[f"genkern[{be}]+randn"] = on_backend(be, device, fused_fn(noise_tensor=True))
    return impls


def case_callables(impls, shape, cfg, dtype, device, backward=False, **_):
    x = torch.randn(shape, device=device, dtype=dtype)
    m = torch.randn(((2 * shape[0],) if cfg else (shape[0],)) + tuple(shape[1:]), device=device, dtype=dtype)
    out = {}
    for name, fn in impls.items():
        def run(fn=fn):
            with torch.no_grad():
                return fn(m, x, cfg)
        out[name] = run
    return out, bytes_moved(x, cfg=cfg), (x, m)


def cases(quick: bool, device: str):
    for c in (GPU if device == "cuda" else QUICK if quick else FULL):
        for dtype in report_dtypes(device, quick):
            yield dict(c, dtype=dtype)


# -------------------------------------------------------------------------------------------------
# pytest-benchmark

PYTEST_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", list(implementations(PYTEST_DEVICE, with_compile=True)))
@pytest.mark.parametrize("case", QUICK, ids=lambda c: "x".join(map(str, c["shape"])) + ("-cfg" if c["cfg"] else ""))
def test_ddpm_step(benchmark, impl, case):
    fns, traffic, _ = case_callables({impl: implementations(PYTEST_DEVICE)[impl]}, dtype=torch.float32,
                                     device=PYTEST_DEVICE, **case)
    group = f"{OP} {'x'.join(map(str, case['shape']))}{' cfg' if case['cfg'] else ''}"
    pytest_benchmark_run(benchmark, fns[impl], group, traffic, PYTEST_DEVICE)
