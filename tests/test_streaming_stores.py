"""The CPU kernels' streaming-store paths (csrc/cpu/vec.h: store_out), which the other tests' small
tensors never reach: a subprocess with GENKERN_LLC_BYTES=1024 makes every output stream, and the ops
that use them are compared there with the float64 reference."""
import os
import subprocess
import sys
import textwrap

import pytest

import genkern

SCRIPT = textwrap.dedent("""
    import torch, genkern
    torch.manual_seed(0)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2}

    def check(got, want, dtype, what):
        torch.testing.assert_close(got.double(), want.double(), atol=tol[dtype], rtol=tol[dtype], msg=what)

    for dtype in (torch.float32, torch.bfloat16):
        # pixel norm: NCHW chunks with a ragged tail, the <= 64-position tile, channels-last rows, latents
        for shape, cl in (((3, 37, 5, 7), False), ((4, 20, 8, 8), False), ((2, 40, 3, 5), True), ((6, 70), False)):
            x = torch.randn(shape, dtype=torch.float64)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            xk = x.to(dtype).requires_grad_()
            with genkern.use_backend("cpu"):
                y = genkern.pixel_norm(xk)
            dy = torch.randn(shape, dtype=torch.float64)
            (dx,) = torch.autograd.grad(y, xk, dy.to(dtype))
            xr = xk.detach().double().requires_grad_()
            yr = genkern.reference.pixel_norm(xr)
            (dxr,) = torch.autograd.grad(yr, xr, dy.to(dtype).double())
            check(y, yr, dtype, f"pixel_norm {shape} {dtype}")
            check(dx, dxr, dtype, f"pixel_norm backward {shape} {dtype}")
        # GroupNorm+SiLU forward and backward: NCHW groups and channels-last samples, tiny units that
        # each thread takes whole and larger ones that the threads share (beyond the 1 KB "cache")
        for shape, G, cl in (((4, 8, 2, 2), 4, False), ((3, 16, 9, 11), 4, False), ((4, 8, 2, 2), 4, True),
                             ((3, 32, 5, 7), 8, True)):
            x = torch.randn(shape, dtype=torch.float64)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            xk = x.to(dtype).requires_grad_()
            wk, bk = (torch.randn(shape[1]).requires_grad_() for _ in range(2))
            with genkern.use_backend("cpu"):
                y = genkern.group_norm_silu(xk, G, wk, bk)
            dy = torch.randn(shape, dtype=torch.float64).to(dtype)
            got = torch.autograd.grad(y, (xk, wk, bk), dy)
            xr, wr, br = (t.detach().double().requires_grad_() for t in (xk, wk, bk))
            yr = genkern.reference.group_norm_silu(xr, G, wr, br)
            want = torch.autograd.grad(yr, (xr, wr, br), dy.double())
            check(y, yr, dtype, f"group_norm_silu {shape} {cl} {dtype}")
            for g, r, name in zip(got, want, ("dx", "dweight", "dbias")):
                check(g, r, dtype, f"group_norm_silu {name} {shape} {cl} {dtype}")
        # sampling step with a given noise tensor, and add_noise
        shape = (3, 3, 17, 19)
        m, x, z = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
        kw = dict(clip_sample_range=1.0, noise=z.to(dtype))
        with genkern.use_backend("cpu"):
            got = genkern.ddpm_step(m.to(dtype), x.to(dtype), 0.4, 0.45, **kw)
        want = genkern.ddpm_step(m.to(dtype).double(), x.to(dtype).double(), 0.4, 0.45,
                                 clip_sample_range=1.0, noise=z.to(dtype).double())
        check(got, want, dtype, f"ddpm_step {dtype}")
        a, b = torch.rand(3), torch.rand(3)
        with genkern.use_backend("cpu"):
            got = genkern.add_noise(x.to(dtype), z.to(dtype), a, b)
        want = genkern.add_noise(x.to(dtype).double(), z.to(dtype).double(), a.double(), b.double())
        check(got, want, dtype, f"add_noise {dtype}")
    print("ok")
""")


def test_streamed_outputs_match_reference():
    if "cpu" not in genkern.backends("cpu"):
        pytest.skip("the CPU kernels are not built")
    env = dict(os.environ, GENKERN_LLC_BYTES="1024")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
