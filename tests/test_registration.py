"""Dispatcher registration: opcheck on every op, torch.compile(fullgraph=True) with no graph break."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genkern
from _util import KERNEL_BACKENDS, make_input, require_backend

FORWARD_OPS = {"cpu": "group_norm_silu", "cuda": "group_norm_silu", "triton": "group_norm_silu_triton"}


def _args(device, channels_last, dtype=torch.float32, affine=True):
    x = make_input((2, 8, 5, 6), dtype, device, channels_last).requires_grad_()
    w = torch.randn(8, device=device, requires_grad=True) if affine else None
    b = torch.randn(8, device=device, requires_grad=True) if affine else None
    return x, w, b


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_opcheck_forward(backend, device, channels_last, affine):
    require_backend(backend, device)
    op = getattr(torch.ops.genkern, FORWARD_OPS[backend]).default
    x, w, b = _args(device, channels_last, affine=affine)
    torch.library.opcheck(op, (x, w, b, 4, 1e-5, "silu"))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck_backward(backend, device, channels_last):
    require_backend(backend, device)
    fwd = getattr(torch.ops.genkern, FORWARD_OPS[backend]).default
    bwd = getattr(torch.ops.genkern, FORWARD_OPS[backend] + "_backward").default
    x, w, b = _args(device, channels_last)
    _, mean, rstd = fwd(x.detach(), w.detach(), b.detach(), 4, 1e-5, "gelu")
    dy = torch.randn_like(x)
    torch.library.opcheck(bwd, (dy, x.detach(), w.detach(), b.detach(), mean, rstd, 4, "gelu"))


class ResBlock(nn.Module):
    """The DDPM ResBlock's norm/act/conv pattern, with the fused layer."""

    def __init__(self, ch, fused=True):
        super().__init__()
        if fused:
            self.act1, self.act2 = genkern.nn.GroupNormSiLU(4, ch), genkern.nn.GroupNormSiLU(4, ch)
        else:
            self.act1 = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU())
            self.act2 = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU())
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.values[0] != "triton" or p.values[1] == "cuda"])
def test_torch_compile_fullgraph_matches_eager(backend, device):
    require_backend(backend, device)
    torch._dynamo.reset()
    fused = ResBlock(16).to(device)
    eager = ResBlock(16, fused=False).to(device)
    eager.load_state_dict({k.replace("act1.", "act1.0.").replace("act2.", "act2.0."): v
                           for k, v in fused.state_dict().items()})
    x = make_input((2, 16, 8, 8), torch.float32, device).requires_grad_()
    with genkern.use_backend(backend):
        compiled = torch.compile(fused, fullgraph=True)
        y = compiled(x)
        y.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ye = eager(x)
    ye.square().sum().backward()
    torch.testing.assert_close(y, ye, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, x.grad, atol=1e-3, rtol=1e-3)
    for (n, p), (_, q) in zip(fused.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-3, rtol=1e-3, msg=n)


def test_kernels_registered_for_their_dispatch_keys():
    import genkern._extension as ext
    if not ext.LOADED:
        pytest.skip(ext.STATUS)
    for name in ("genkern::group_norm_silu", "genkern::group_norm_silu_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        # the CUDA kernels are compiled wherever a toolkit is, even with no GPU to run them
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == ext.has_cuda_kernels()


# The public functions run a registered op through genkern/ops/_call.py's plain autograd.Function
# (eager) and torch.compile / direct torch.ops calls through the formula given to register_autograd:
# both must give the float64 reference's first and second derivatives.
def _op_cases(op_suffix, device):
    from genkern import reference as ref
    w = torch.randn(8, dtype=torch.float64, device=device)
    b = torch.randn(8, dtype=torch.float64, device=device)
    return {
        "group_norm_silu": (
            (4, 8, 3, 5), lambda x: genkern.group_norm_silu(x, 4, w.float(), b.float()),
            lambda x: getattr(torch.ops.genkern, "group_norm_silu" + op_suffix)(x, w.float(), b.float(), 4, 1e-5, "silu")[0],
            lambda x: ref.group_norm_silu(x, 4, w, b, 1e-5, "silu")),
        "pixel_norm": (
            (4, 8, 3, 5), lambda x: genkern.pixel_norm(x),
            lambda x: getattr(torch.ops.genkern, "pixel_norm" + op_suffix)(x, 1e-8)[0], lambda x: ref.pixel_norm(x)),
        "minibatch_stddev": (
            (4, 8, 3, 5), lambda x: genkern.minibatch_stddev(x, 2, 2),
            lambda x: getattr(torch.ops.genkern, "minibatch_stddev" + op_suffix)(x, 2, 2, 1e-8),
            lambda x: ref.minibatch_stddev(x, 2, 2)),
        "gradient_penalty": (
            (4, 3, 5, 5), lambda g: genkern.gradient_norm_penalty(g, 10.0, 1.0),
            lambda g: getattr(torch.ops.genkern, "gradient_penalty" + op_suffix)(g, 10.0, 1.0)[0],
            lambda g: ref.gradient_penalty(g, 10.0, 1.0)),
    }


def _first_and_second(fn, x, dy, v):
    x = x.detach().requires_grad_()
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, None if dy is None else dy.to(y.dtype), create_graph=True)
    (ggx,) = torch.autograd.grad(gx, x, v.to(gx.dtype))
    return y.double(), gx.double(), ggx.double()


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.values[0] != "triton" or p.values[1] == "cuda"])
@pytest.mark.parametrize("op", ["group_norm_silu", "pixel_norm", "minibatch_stddev", "gradient_penalty"])
def test_eager_and_registered_autograd_match_reference(backend, device, op):
    require_backend(backend, device)
    torch.manual_seed(0)
    shape, public, registered, reference = _op_cases("_triton" if backend == "triton" else "", device)[op]
    x = torch.randn(shape, dtype=torch.float64, device=device)
    y_ref = reference(x)
    dy = torch.randn_like(y_ref) if y_ref.dim() else None
    v = torch.randn_like(x)
    expected = _first_and_second(reference, x, dy, v)
    with genkern.use_backend(backend):
        for path, fn in (("eager", public), ("registered", registered)):
            got = _first_and_second(fn, x.float(), dy, v)
            for what, a, e in zip(("y", "dx", "d2x"), got, expected):
                torch.testing.assert_close(a, e, atol=2e-4, rtol=2e-4, msg=f"{op} {path} {what}")


class _DropGrad(torch.autograd.Function):
    """y.clone() whose backward returns no gradient: what reaches the op before it is undefined."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.values[0] != "triton" or p.values[1] == "cuda"])
@pytest.mark.parametrize("op", ["group_norm_silu", "pixel_norm"])
def test_undefined_output_gradient_flows_back_as_none(backend, device, op):
    """The ops' autograd keeps undefined gradients undefined (no zero fills for the statistics outputs, which
    would be a kernel launch each on a GPU), so their backward must take an undefined gradient of y."""
    require_backend(backend, device)
    x, w, b = _args(device, False)
    with genkern.use_backend(backend):
        y = genkern.group_norm_silu(x, 4, w, b) if op == "group_norm_silu" else genkern.pixel_norm(x)
        (_DropGrad.apply(y).sum() + 2 * x.sum()).backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))  # only the direct term reaches x
    assert w.grad is None and b.grad is None
