"""Helpers shared by the tests: which (backend, device) pairs can run here, and dtype tolerances."""
import pytest
import torch

import genkern

# (backend, device): every kernel backend on every device it runs on. CUDA pairs carry the `cuda`
# mark and are skipped without a GPU; Triton on CPU runs under TRITON_INTERPRET=1 (tests/conftest.py).
KERNEL_BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interpret", marks=pytest.mark.triton),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[pytest.mark.cuda, pytest.mark.triton]),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Error allowed relative to the float64 reference, for results stored in each dtype.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def require_backend(backend: str, device: str) -> None:
    why = genkern._backend.unavailable_reason(backend, device)
    if why is not None:
        pytest.skip(f"{backend} on {device}: {why}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                 scale: float = 0.0) -> None:
    """|actual - expected| <= tol * (|expected| + max|expected|/10 + scale + 1e-3) with tol from the
    dtype: relative per element, but not tighter than the rounding of the tensor's typical magnitude
    (`scale`: the magnitude of the terms that cancel to give `expected`, where that is larger)."""
    tol = TOL[dtype]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = (e.abs().max().item() / 10 if e.numel() else 0.0) + scale + 1e-3
    err = (a - e).abs()
    bound = tol * (e.abs() + scale)
    worst = (err - bound).max().item() if e.numel() else -1
    assert worst <= 0, (f"{what}: max error {err.max().item():.3g} exceeds tolerance "
                        f"(tol {tol}, max |expected| {e.abs().max().item():.3g})")


def make_input(shape, dtype, device, channels_last=False, mean=-2.3, std=0.5):
    """Non-zero-mean input so that variance bugs show, optionally channels-last."""
    x = (mean + std * torch.randn(shape, dtype=torch.float64)).to(dtype=dtype, device=device)
    if channels_last:
        if x.dim() == 4:
            x = x.to(memory_format=torch.channels_last)
        elif x.dim() == 5:
            x = x.to(memory_format=torch.channels_last_3d)
        else:  # (N, C, L) stored as (N, L, C)
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x
