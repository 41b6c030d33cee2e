"""Tensors of more than 2^31 elements: every kernel indexes with 64-bit offsets.

Each test builds a bfloat16 x of shape [2049, 16, 256, 256] (2^31 + 2^20 elements, 4.3 GB), NCHW or
channels-last where the kernels have a path of their own for it. Its first and last samples differ
from the others, so an offset computed in 32 bits, which wraps at element
2^31 (the last sample starts there) or at byte 2^31, would read or write the wrong sample and show. Each
test checks the first and the last sample against the float64 reference run on those samples alone, and
the reductions over the whole batch against the reference's per-sample values. Backward passes take x
itself as their incoming gradient, so that no test holds more than three tensors of this size.

Triton on CPU is not in the list: the interpreter runs each program in Python, hours at this size.
"""
import fcntl
import os
import tempfile

import pytest
import torch

from genkern import reference as R
from genkern.ops._call import kernel_op
from genkern.ops.ddpm_step import step_coefficients
from genkern.reference.philox import philox_normal

from _util import TOL, assert_close, require_backend

N, C, H, W = 2049, 16, 256, 256     # N = 3 * 683: minibatch stddev groups of 3
SAMPLE = C * H * W                  # 2^20: the last sample starts at element 2^31
DT = torch.bfloat16
GB = N * SAMPLE * 2 / 2**30

BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[pytest.mark.cuda, pytest.mark.triton]),
]


def _free_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 2**30
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


@pytest.fixture
def big_input():
    """make(device) -> x: samples 1 .. N-2 equal, samples 0 and N-1 each their own. One test of this
    module at a time on the machine, even under pytest-xdist (gpu_check.sh): each holds up to three
    tensors of this size, and the lock is taken before the memory is looked at."""
    with open(os.path.join(tempfile.gettempdir(), "genkern-large-tensors.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)

        def make(device: str, channels_last: bool = False) -> torch.Tensor:
            need = 3.2 * GB
            if _free_gb(device) < need:
                pytest.skip(f"needs {need:.0f} GB of free {device} memory for three {GB:.1f} GB tensors")
            g = torch.Generator().manual_seed(0)
            x = torch.empty((N, C, H, W), dtype=DT, device=device,
                            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            # drawn on the CPU (the same numbers everywhere), broadcast on the device
            x.copy_((torch.randn((C, H, W), generator=g) * 0.7 - 1.1).to(device, DT).expand(N, C, H, W))
            x[0] = (torch.randn((C, H, W), generator=g) + 2.0).to(device, DT)
            x[-1] = (torch.randn((C, H, W), generator=g) * 1.5 + 0.4).to(device, DT)
            return x
        yield make


# the samples each test checks: the first (its own data), one of the equal middle ones, the last
CHECK = (0, N - 2, N - 1)


def _f64(x, i):
    return x[i:i + 1].double().cpu()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_pixel_norm(backend, device, channels_last, big_input):
    require_backend(backend, device)
    x = big_input(device, channels_last)
    y, rstd = kernel_op("pixel_norm", backend)(x, 1e-8)
    for i in CHECK:
        assert_close(y[i:i + 1], R.pixel_norm(_f64(x, i)), DT, f"pixel_norm y[{i}]")
    del y
    dx = kernel_op("pixel_norm_backward", backend)(x, x, rstd)
    for i in CHECK:
        xi = _f64(x, i).requires_grad_()
        (want,) = torch.autograd.grad(R.pixel_norm(xi), xi, _f64(x, i))
        assert_close(dx[i:i + 1], want, DT, f"pixel_norm dx[{i}]")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_group_norm_silu(backend, device, channels_last, big_input):
    require_backend(backend, device)
    x = big_input(device, channels_last)
    G = 4
    w = torch.linspace(0.5, 1.5, C, device=device)
    b = torch.linspace(-0.3, 0.3, C, device=device)
    w64, b64 = w.double().cpu(), b.double().cpu()
    y, mean, rstd = kernel_op("group_norm_silu", backend)(x, w, b, G, 1e-5, "silu")
    for i in CHECK:
        assert_close(y[i:i + 1], R.group_norm_silu(_f64(x, i), G, w64, b64, 1e-5, "silu"), DT, f"y[{i}]")
        xi = _f64(x, i).reshape(G, -1)
        assert_close(mean[i], xi.mean(1), torch.float32, f"mean[{i}]")
        assert_close(rstd[i], (xi.var(1, unbiased=False) + 1e-5).rsqrt(), torch.float32, f"rstd[{i}]")
    del y
    dx, dw, db = kernel_op("group_norm_silu_backward", backend)(x, x, w, b, mean, rstd, G, "silu")
    grads = {}
    for i in CHECK:
        xi, wi, bi = _f64(x, i).requires_grad_(), w64.clone().requires_grad_(), b64.clone().requires_grad_()
        grads[i] = torch.autograd.grad(R.group_norm_silu(xi, G, wi, bi, 1e-5, "silu"), (xi, wi, bi), _f64(x, i))
        assert_close(dx[i:i + 1], grads[i][0], DT, f"dx[{i}]")
    # dweight and dbias sum over all samples: the first, N - 2 equal ones, the last
    for k, got in ((1, dw), (2, db)):
        want = grads[0][k] + (N - 2) * grads[N - 2][k] + grads[N - 1][k]
        assert_close(got, want, torch.float32, ("dw", "db")[k - 1], scale=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_minibatch_stddev(backend, device, channels_last, big_input):
    require_backend(backend, device)
    x = big_input(device, channels_last)
    out = kernel_op("minibatch_stddev", backend)(x, 3, 1, 1e-8)
    assert torch.equal(out[-1, :C], x[-1]) and torch.equal(out[0, :C], x[0])
    M = N // 3
    for i in (0, N - 1):  # sample i's group: i % M, i % M + M, i % M + 2M
        idx = [i % M, i % M + M, i % M + 2 * M]
        want = R.minibatch_stddev(x[idx].double().cpu(), 3, 1, 1e-8)
        assert_close(out[idx], want, DT, f"minibatch_stddev group of sample {i}")
    dx = kernel_op("minibatch_stddev_backward", backend)(out, x, 3, 1, 1e-8)
    for i in (0, N - 1):
        idx = [i % M, i % M + M, i % M + 2 * M]
        xi = x[idx].double().cpu().requires_grad_()
        (want,) = torch.autograd.grad(R.minibatch_stddev(xi, 3, 1, 1e-8), xi, out[idx].double().cpu())
        assert_close(dx[idx], want, DT, f"minibatch_stddev dx, group of sample {i}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ddpm_step_in_kernel_noise(backend, device, big_input):
    """The noise of element i is Philox element i: the last sample's comes from past element 2^31."""
    require_backend(backend, device)
    x = big_input(device)
    k = step_coefficients(0.5, 0.55)
    args = ("epsilon", k.sqrt_alpha_prod, k.sqrt_one_minus_alpha_prod, 1.0, False, k.coef_x0, k.coef_eps,
            k.coef_sample, k.sigma, k.known_coef, k.known_noise_coef, None)
    seed, offset = 1234, 7
    out = kernel_op("ddpm_step", backend)(x, x, None, None, None, *args, seed, offset)
    for i in CHECK:
        z = philox_normal((1, C, H, W), seed, offset, dtype=torch.float64, start=i * SAMPLE)
        want = R.ddpm_step(_f64(x, i), _f64(x, i), z, None, None, *args, None, 0)
        assert_close(out[i:i + 1], want, DT, f"ddpm_step out[{i}]", scale=k.sigma)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradient_penalty(backend, device, big_input):
    require_backend(backend, device)
    x = big_input(device)
    weight, target = 10.0, 1.0
    loss, norms = kernel_op("gradient_penalty", backend)(x, weight, target)
    ref_norms = {i: _f64(x, i).norm().item() for i in CHECK}
    for i in CHECK:
        assert abs(norms[i].item() - ref_norms[i]) <= TOL[torch.float32] * ref_norms[i], f"norm of sample {i}"
    sq = [(ref_norms[i] - target) ** 2 for i in CHECK]
    want = weight * (sq[0] + (N - 2) * sq[1] + sq[2]) / N
    assert abs(loss.item() - want) <= 1e-4 * want
    dx = kernel_op("gradient_penalty_backward", backend)(torch.ones((), device=device), x, norms, weight, target)
    for i in CHECK:
        gi = _f64(x, i).requires_grad_()
        (want,) = torch.autograd.grad(R.gradient_penalty(gi, weight, target) / N, gi)
        assert_close(dx[i:i + 1], want, DT, f"gradient_penalty dx[{i}]")


def test_gradient_penalty_and_grad_cpu(big_input):
    """The CPU's fused forward+backward (CPU only). It takes its one-pass path for samples within half a
    core's cache, so x is viewed as 8 N samples of 2^17 elements (256 KB, under every cache it sizes
    for): the first 8 and the last 8 hold x's first and last sample."""
    require_backend("cpu", "cpu")
    x = big_input("cpu").view(8 * N, C // 8, H, W)
    weight, target = 10.0, 1.0
    loss, norms, dg = kernel_op("gradient_penalty_and_grad", "cpu")(x, weight, target)
    # x's first and last samples are their own, the N - 2 between are equal: so are the 8-sample runs of
    # the view between its first and last 8; the reference norms of one run of each kind cover all
    first, middle, last = range(8), range(8 * N - 16, 8 * N - 8), range(8 * N - 8, 8 * N)
    ref = {i: x[i].double().norm().item() for i in (*first, *middle, *last)}
    for i, want in ref.items():
        assert abs(norms[i].item() - want) <= TOL[torch.float32] * want, f"norm of sample {i}"
    sq = {i: (n - target) ** 2 for i, n in ref.items()}
    want = weight * (sum(sq[i] for i in first) + (N - 2) * sum(sq[i] for i in middle)
                     + sum(sq[i] for i in last)) / (8 * N)
    assert abs(loss.item() - want) <= 1e-4 * want
    for i in (0, 7, 8 * N - 9, 8 * N - 8, 8 * N - 1):
        gi = x[i:i + 1].double().requires_grad_()
        (ref,) = torch.autograd.grad(R.gradient_penalty(gi, weight, target) / (8 * N), gi)
        assert_close(dg[i:i + 1], ref, DT, f"gradient_penalty_and_grad dg[{i}]")
