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
