"""pixel_norm, minibatch_stddev and the gradient penalties on every backend against float64 references
(forward, backward, double backward), and a WGAN-GP critic step with fused layers equal to eager layers."""
import pytest
import torch
from torch import nn

import genkern
from _util import DTYPES, KERNEL_BACKENDS, assert_close, make_input, require_backend

ALL_BACKENDS = KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")]


def eager_pixel_norm(x, eps=1e-8):
    """ProGAN's PixelNorm as written in the paper's code."""
    return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + eps)


def eager_minibatch_stddev(x, group_size=4, num_channels=1):
    """StyleGAN2's MinibatchStdLayer.forward, line for line."""
    N, C, H, W = x.shape
    G = min(group_size, N)
    F = num_channels
    c = C // F
    y = x.reshape(G, -1, F, c, H, W)
    y = y - y.mean(dim=0)
    y = y.square().mean(dim=0)
    y = (y + 1e-8).sqrt()
    y = y.mean(dim=[2, 3, 4])
    y = y.reshape(-1, F, 1, 1)
    y = y.repeat(G, 1, H, W)
    return torch.cat([x, y], dim=1)


def eager_wgan_gp(g, weight=10.0, target=1.0):
    return weight * ((g.reshape(g.shape[0], -1).norm(2, dim=1) - target) ** 2).mean()


def _grads(fn, x, dtype, device, channels_last=False):
    """(y, dx) of fn at x (a float64 master copy) evaluated in dtype on device."""
    xi = x.to(dtype=dtype, device=device)
    if channels_last:
        xi = xi.to(memory_format=torch.channels_last)
    xi = xi.detach().requires_grad_()
    y = fn(xi)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
    (dx,) = torch.autograd.grad(y, xi, g)
    return xi, y, dx, g


# --------------------------------------------------------------------------------------------------
# pixel norm

PN_SHAPES = [(4, 33), (2, 20, 5, 7), (3, 7, 1, 1), (1, 512, 4, 4), (2, 9, 8, 8), (2, 5, 6, 8), (2, 3, 4, 5, 2)]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_pixel_norm(backend, device, dtype, shape, channels_last):
    require_backend(backend, device)
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a 4-D layout")
    x = make_input(shape, torch.float64, "cpu", mean=0.7, std=1.3)
    with genkern.use_backend(backend):
        xi, y, dx, g = _grads(genkern.pixel_norm, x, dtype, device, channels_last)
    xr = x.clone().requires_grad_()
    yr = eager_pixel_norm(xr)
    (dxr,) = torch.autograd.grad(yr, xr, g.double().cpu())
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, yr, dtype, "pixel_norm forward")
    assert_close(dx, dxr, dtype, "pixel_norm backward", scale=dxr.abs().max().item())


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_pixel_norm_module_and_eps(backend, device):
    require_backend(backend, device)
    x = torch.zeros(2, 5, 3, 3, device=device)
    with genkern.use_backend(backend):
        y = genkern.nn.PixelNorm(eps=1e-4)(x)
    assert torch.equal(y, torch.zeros_like(y))   # all-zero vector: eps keeps it finite


# --------------------------------------------------------------------------------------------------
# minibatch stddev

MB_CASES = [((8, 6, 3, 5), 4, 2), ((1, 5, 2, 2), 1, 1), ((4, 7, 1, 1), 4, 1), ((3, 8, 4, 4), 4, 1),
            ((6, 20, 4, 4), 2, 4), ((32, 16, 4, 4), 4, 1),
            # NCHW runs of c P = 4477 values: the CPU kernels cut them into chunks (4096 and a tail)
            ((4, 74, 11, 11), 4, 2)]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MB_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-G{c[1]}-F{c[2]}")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_minibatch_stddev(backend, device, dtype, case, channels_last):
    require_backend(backend, device)
    shape, G, F = case
    x = make_input(shape, torch.float64, "cpu", mean=-1.5, std=0.8)
    with genkern.use_backend(backend):
        xi, y, dx, g = _grads(lambda t: genkern.minibatch_stddev(t, G, F), x, dtype, device, channels_last)
    xr = x.clone().requires_grad_()
    yr = eager_minibatch_stddev(xr, G, F)
    (dxr,) = torch.autograd.grad(yr, xr, g.double().cpu())
    assert y.shape == (shape[0], shape[1] + F, shape[2], shape[3]) and y.dtype == dtype
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, yr, dtype, "minibatch_stddev forward")
    assert_close(dx, dxr, dtype, "minibatch_stddev backward", scale=dxr.abs().max().item())


# --------------------------------------------------------------------------------------------------
# penalties

@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", [1.0, None], ids=["wgan-gp", "r1"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradient_norm_penalty(backend, device, dtype, target, channels_last):
    require_backend(backend, device)
    x = make_input((5, 3, 9, 7), torch.float64, "cpu", mean=0.1, std=0.3)
    with genkern.use_backend(backend):
        xi, loss, dg, gl = _grads(lambda t: genkern.gradient_norm_penalty(t, 10.0, target), x, dtype, device,
                                  channels_last)
    xr = x.clone().requires_grad_()
    ref = 10.0 * (xr.reshape(5, -1).norm(dim=1) ** 2).mean() if target is None else eager_wgan_gp(xr)
    (dgr,) = torch.autograd.grad(ref, xr, gl.double().cpu())
    assert loss.dim() == 0
    assert_close(loss, ref, torch.float32 if dtype == torch.float32 else dtype, "penalty")
    assert_close(dg, dgr, dtype, "penalty backward", scale=dgr.abs().max().item())


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_penalty_zero_gradient_sample(backend, device):
    """A sample whose gradient is exactly zero: the norm's subgradient 0, not eager's NaN."""
    require_backend(backend, device)
    g = torch.randn(3, 4, 5, device=device)
    g[1] = 0
    g.requires_grad_()
    with genkern.use_backend(backend):
        loss = genkern.gradient_norm_penalty(g, 10.0, 1.0)
        (dg,) = torch.autograd.grad(loss, g)
    assert torch.isfinite(dg).all() and torch.equal(dg[1], torch.zeros_like(dg[1]))
    norms = g.detach().reshape(3, -1).norm(dim=1)
    assert loss.item() == pytest.approx(10.0 * ((norms - 1) ** 2).mean().item(), rel=1e-5)


# (N, ...) shapes for gradient_penalty_and_grad: many small samples (one task per sample), one sample
# (fewer samples than threads) and samples beyond half a core's cache (both take the two-kernel path)
AND_GRAD_SHAPES = [(9, 3, 7, 5), (1, 4, 6, 6), (3, 2, 300, 300)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", [1.0, None], ids=["wgan-gp", "r1"])
@pytest.mark.parametrize("shape", AND_GRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradient_penalty_and_grad(dtype, target, shape, channels_last):
    """The CPU op that computes the penalty's gradient in its forward: (loss, norms, dg) against the float64
    reference and its autograd gradient, and bit for bit what gradient_penalty and its backward give."""
    require_backend("cpu", "cpu")
    ops = torch.ops.genkern
    x = make_input(shape, torch.float64, "cpu", channels_last, mean=0.05, std=0.02)
    g = x.to(dtype)
    loss, norms, dg = ops.gradient_penalty_and_grad(g, 10.0, target)
    xr = g.double().requires_grad_()  # the values the op was given: loss and norms are float32 of those
    ref = 10.0 * (xr.reshape(shape[0], -1).norm(dim=1) ** 2).mean() if target is None else eager_wgan_gp(xr)
    (dgr,) = torch.autograd.grad(ref, xr)
    assert dg.dtype == dtype and dg.stride() == g.stride()
    assert_close(loss, ref, torch.float32, "penalty")
    assert_close(norms, xr.detach().reshape(shape[0], -1).norm(dim=1), torch.float32, "norms")
    assert_close(dg, dgr, dtype, "dg", scale=dgr.abs().max().item())
    loss2, norms2 = ops.gradient_penalty(g, 10.0, target)
    dg2 = ops.gradient_penalty_backward(torch.ones(()), g, norms2, 10.0, target)
    assert torch.equal(loss, loss2) and torch.equal(norms, norms2) and torch.equal(dg, dg2)


def _ran(fn, op_name):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name == op_name for e in prof.events())


def test_penalty_backward_takes_the_gradient_from_the_forward():
    """On the CPU a recorded penalty computes dg in its forward; loss.backward() hands it over (no backward
    kernel), any other d loss runs the backward kernel, a retained graph gives the same dg twice, and
    create_graph stays differentiable. Each against the float64 reference."""
    require_backend("cpu", "cpu")
    x = make_input((6, 3, 8, 8), torch.float64, "cpu", mean=0.05, std=0.02)
    xr = x.clone().requires_grad_()
    (dgr,) = torch.autograd.grad(eager_wgan_gp(xr), xr)
    g = x.float().requires_grad_()
    with genkern.use_backend("cpu"):
        loss = genkern.gradient_norm_penalty(g, 10.0, 1.0)
        assert _ran(lambda: loss.backward(retain_graph=True), "genkern::gradient_penalty_backward") is False
        assert_close(g.grad, dgr, torch.float32, "dg handed over", scale=dgr.abs().max().item())
        assert _ran(lambda: loss.backward(), "genkern::gradient_penalty_backward") is False
        assert_close(g.grad, 2 * dgr, torch.float32, "retained graph, second backward", scale=dgr.abs().max().item())
        g.grad = None
        loss = genkern.gradient_norm_penalty(g, 10.0, 1.0)
        assert _ran(lambda: (2.5 * loss).backward(), "genkern::gradient_penalty_backward") is True
        assert_close(g.grad, 2.5 * dgr, torch.float32, "d loss = 2.5", scale=dgr.abs().max().item())
        (d1,) = torch.autograd.grad(genkern.gradient_norm_penalty(g, 10.0, 1.0), g, create_graph=True)
    assert d1.requires_grad
    (d1r,) = torch.autograd.grad(eager_wgan_gp(xr), xr, create_graph=True)
    v = torch.randn(x.shape, dtype=torch.float64)
    (d2,) = torch.autograd.grad(d1, g, v.float())
    (d2r,) = torch.autograd.grad(d1r, xr, v)
    assert_close(d2, d2r, torch.float32, "create_graph: second derivative", scale=d2r.abs().max().item())
    with torch.no_grad(), genkern.use_backend("cpu"):  # nothing recorded: the plain forward only
        assert _ran(lambda: genkern.gradient_norm_penalty(g, 10.0, 1.0), "genkern::gradient_penalty_and_grad") is False


# --------------------------------------------------------------------------------------------------
# double backward

def _second_order(fn, inputs, dtype, device):
    """d/d inputs of <d fn / d inputs . v, w>: exercises the backward's own backward."""
    leaves = [t.to(dtype=dtype, device=device).detach().requires_grad_() for t in inputs]
    y = fn(*leaves)
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(y.shape, dtype=torch.float64, generator=gen).to(dtype=dtype, device=device)
    firsts = torch.autograd.grad(y, leaves, v, create_graph=True)
    ws = [torch.randn(f.shape, dtype=torch.float64, generator=gen).to(dtype=dtype, device=device) for f in firsts]
    s = sum((f * w).sum() for f, w in zip(firsts, ws))
    # the size of the first-order terms: second-order values can be their small difference
    return torch.autograd.grad(s, leaves), max(f.abs().max().item() for f in firsts)


DOUBLE_CASES = {
    "pixel_norm": (lambda x: genkern.pixel_norm(x), lambda x: eager_pixel_norm(x), [(3, 10, 4, 4)]),
    "minibatch_stddev": (lambda x: genkern.minibatch_stddev(x, 2, 2), lambda x: eager_minibatch_stddev(x, 2, 2),
                         [(4, 6, 3, 3)]),
    "penalty": (lambda g: genkern.gradient_norm_penalty(g, 10.0, 1.0), eager_wgan_gp, [(4, 3, 5, 5)]),
    "group_norm_silu": (lambda x, w, b: genkern.group_norm_silu(x, 2, w, b),
                        lambda x, w, b: nn.functional.silu(nn.functional.group_norm(x, 2, w, b)),
                        [(2, 6, 4, 4), (6,), (6,)]),
}


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("name", list(DOUBLE_CASES))
def test_double_backward_matches_eager(backend, device, name):
    require_backend(backend, device)
    fused, eager, shapes = DOUBLE_CASES[name]
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(s, dtype=torch.float64, generator=gen) * 0.8 + 0.3 for s in shapes]
    with genkern.use_backend(backend):
        got, _ = _second_order(fused, inputs, torch.float32, device)
    want, first = _second_order(eager, inputs, torch.float64, "cpu")
    for a, b in zip(got, want):
        assert_close(a, b, torch.float32, f"{name} second order", scale=max(b.abs().max().item(), first))


@pytest.mark.parametrize("name", list(DOUBLE_CASES))
def test_gradgradcheck_float64(name):
    """float64 runs on the reference backend (the kernels are fp32/fp16/bf16): gradgradcheck there."""
    fused, _, shapes = DOUBLE_CASES[name]
    gen = torch.Generator().manual_seed(5)
    inputs = [(torch.randn(s, dtype=torch.float64, generator=gen) * 0.8 + 0.3).requires_grad_() for s in shapes]
    assert torch.autograd.gradcheck(fused, inputs)
    assert torch.autograd.gradgradcheck(fused, inputs)


# --------------------------------------------------------------------------------------------------
# a WGAN-GP critic step

class _EagerPixelNorm(nn.Module):
    def forward(self, x):
        return eager_pixel_norm(x)


class _EagerMbstd(nn.Module):
    def forward(self, x):
        return eager_minibatch_stddev(x, 4, 1)


class _EagerGNSiLU(nn.GroupNorm):
    def forward(self, x):
        return nn.functional.silu(super().forward(x))


def _critic(fused):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        genkern.nn.GroupNormSiLU(2, 8) if fused else _EagerGNSiLU(2, 8),
        nn.Conv2d(8, 8, 3, padding=1),
        genkern.nn.PixelNorm() if fused else _EagerPixelNorm(),
        genkern.nn.MinibatchStdDev(4, 1) if fused else _EagerMbstd(),
        nn.Conv2d(9, 4, 3, padding=1, stride=2), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_wgan_gp_critic_step_equals_eager(backend, device, channels_last):
    require_backend(backend, device)
    torch.manual_seed(0)
    fused, eager = _critic(True).to(device), _critic(False).to(device)
    eager.load_state_dict(fused.state_dict())
    real, fake = torch.randn(8, 3, 8, 8, device=device), torch.randn(8, 3, 8, 8, device=device)
    if channels_last:
        real, fake = (t.to(memory_format=torch.channels_last) for t in (real, fake))
    with genkern.use_backend(backend):
        loss = (fused(fake).mean() - fused(real).mean()
                + genkern.gradient_penalty(fused, real, fake, 10.0, generator=torch.Generator().manual_seed(4)))
        got = torch.autograd.grad(loss, list(fused.parameters()))
    eps = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(4)).to(device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_()
    (g,) = torch.autograd.grad(eager(x_hat).sum(), x_hat, create_graph=True)
    loss_e = eager(fake).mean() - eager(real).mean() + eager_wgan_gp(g)
    want = torch.autograd.grad(loss_e, list(eager.parameters()))
    for (name, _), a, b in zip(fused.named_parameters(), got, want):
        assert_close(a, b, torch.float32, f"critic grad {name}", scale=b.abs().max().item())


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_r1_penalty_step_equals_eager(backend, device):
    require_backend(backend, device)
    torch.manual_seed(0)
    fused, eager = _critic(True).to(device), _critic(False).to(device)
    eager.load_state_dict(fused.state_dict())
    real = torch.randn(8, 3, 8, 8, device=device)
    with genkern.use_backend(backend):
        x = real.clone().requires_grad_()
        got = torch.autograd.grad(genkern.r1_penalty(fused(x), x, gamma=5.0), list(fused.parameters()),
                                  allow_unused=True)   # the last bias does not move d D / d x
    x = real.clone().requires_grad_()
    (g,) = torch.autograd.grad(eager(x).sum(), x, create_graph=True)
    want = torch.autograd.grad(2.5 * g.pow(2).reshape(8, -1).sum(1).mean(), list(eager.parameters()),
                               allow_unused=True)
    assert [a is None for a in got] == [b is None for b in want]
    for a, b in zip(got, want):
        if b is not None:
            assert_close(a, b, torch.float32, "R1 critic grad", scale=b.abs().max().item())


# --------------------------------------------------------------------------------------------------
# registration, bad input

OPS = {"cpu": "", "cuda": "", "triton": "_triton"}


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck(backend, device, channels_last):
    require_backend(backend, device)
    sfx = OPS[backend]
    ops = torch.ops.genkern
    x = make_input((4, 6, 3, 5), torch.float32, device, channels_last)
    y, r = getattr(ops, "pixel_norm" + sfx)(x, 1e-8)
    torch.library.opcheck(getattr(ops, "pixel_norm" + sfx).default, (x, 1e-8))
    torch.library.opcheck(getattr(ops, "pixel_norm" + sfx + "_backward").default, (torch.randn_like(x), x, r))
    torch.library.opcheck(getattr(ops, "minibatch_stddev" + sfx).default, (x, 2, 3, 1e-8))
    go = torch.randn(4, 9, 3, 5, device=device)
    torch.library.opcheck(getattr(ops, "minibatch_stddev" + sfx + "_backward").default, (go, x, 2, 3, 1e-8))
    for target in (1.0, None):
        loss, norms = getattr(ops, "gradient_penalty" + sfx)(x, 10.0, target)
        torch.library.opcheck(getattr(ops, "gradient_penalty" + sfx).default, (x, 10.0, target))
        torch.library.opcheck(getattr(ops, "gradient_penalty" + sfx + "_backward").default,
                              (torch.ones((), device=device), x, norms, 10.0, target))
        if backend == "cpu":
            torch.library.opcheck(ops.gradient_penalty_and_grad.default, (x.requires_grad_(), 10.0, target))
            x = x.detach()


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.values[0] != "triton" or p.values[1] == "cuda"])
def test_torch_compile_fullgraph(backend, device):
    require_backend(backend, device)
    block = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), genkern.nn.PixelNorm(), genkern.nn.MinibatchStdDev(2, 1),
                          nn.Conv2d(9, 2, 1)).to(device)
    x = torch.randn(4, 4, 6, 6, device=device)
    torch._dynamo.reset()
    with genkern.use_backend(backend):
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True)(x)
        pen = torch.compile(lambda g: genkern.gradient_norm_penalty(g, 10.0, 1.0), fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(pen, eager_wgan_gp(x), rtol=1e-5, atol=1e-4)


def test_bad_inputs():
    x = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="batch size N=6 must be divisible by the group size G=min"):
        genkern.minibatch_stddev(x, group_size=4)
    with pytest.raises(ValueError, match="channels C=4 must be divisible by num_channels=3"):
        genkern.minibatch_stddev(x, group_size=3, num_channels=3)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        genkern.minibatch_stddev(torch.randn(4, 4))
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        genkern.minibatch_stddev(x, group_size=0)
    with pytest.raises(ValueError, match="eps"):
        genkern.pixel_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match=r"\(N, C, \*\)"):
        genkern.pixel_norm(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point"):
        genkern.pixel_norm(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="weight must be a finite number"):
        genkern.gradient_norm_penalty(x, float("nan"))
    with pytest.raises(ValueError, match="same shape"):
        genkern.gradient_penalty(nn.Identity(), x, x[:3])
    with pytest.raises(ValueError, match="requires_grad=True"):
        genkern.r1_penalty(x.sum(), x, 1.0)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_raw_op_bad_inputs(backend, device):
    require_backend(backend, device)
    sfx = OPS[backend]
    x = torch.randn(6, 4, 3, 3, device=device)
    with pytest.raises((ValueError, RuntimeError), match="divisible"):
        getattr(torch.ops.genkern, "minibatch_stddev" + sfx)(x, 4, 1, 1e-8)
    with pytest.raises((ValueError, RuntimeError), match="eps"):
        getattr(torch.ops.genkern, "pixel_norm" + sfx)(x, float("inf"))
    with pytest.raises((ValueError, TypeError, RuntimeError), match="grad must be .*float"):
        getattr(torch.ops.genkern, "gradient_penalty" + sfx)(x.int(), 1.0, None)
    if device == "cuda":  # the kernels read these through pointers: CPU tensors must be refused, by name
        op = lambda name: getattr(torch.ops.genkern, name + sfx + "_backward")  # noqa: E731
        with pytest.raises(ValueError, match="norms is on cpu but grad is on cuda"):
            op("gradient_penalty")(torch.ones((), device=device), x, torch.ones(6), 1.0, 1.0)
        with pytest.raises(ValueError, match="rstd is on cpu but x is on cuda"):
            op("pixel_norm")(torch.ones_like(x), x, torch.ones(6 * 9))
        with pytest.raises(ValueError, match="grad_y is on cpu but x is on cuda"):
            op("pixel_norm")(torch.ones(6, 4, 3, 3), x, torch.ones(6 * 9, device=device))
        with pytest.raises(ValueError, match="grad_out is on cpu but x is on cuda"):
            op("minibatch_stddev")(torch.ones(6, 5, 3, 3), x, 2, 1, 1e-8)
    if backend == "cpu":
        with pytest.raises(TypeError, match="gradient_penalty_and_grad: grad must be .*float"):
            torch.ops.genkern.gradient_penalty_and_grad(x.int(), 1.0, None)
        with pytest.raises(ValueError, match="weight must be finite"):
            torch.ops.genkern.gradient_penalty_and_grad(x, float("inf"), None)
