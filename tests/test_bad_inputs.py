"""Bad input gets a clear error naming the argument, on the public function and on the raw ops."""
import math

import pytest
import torch

import genkern
from _util import KERNEL_BACKENDS, require_backend

X = lambda: torch.randn(2, 8, 4, 4)  # noqa: E731


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_groups=3), ValueError, "num_groups"),
    (dict(num_groups=0), ValueError, "num_groups"),
    (dict(num_groups=2.0), ValueError, "num_groups"),
    (dict(num_groups=True), ValueError, "num_groups"),
    (dict(weight=torch.ones(7)), ValueError, "weight must have shape"),
    (dict(bias=torch.ones(8, 1)), ValueError, "bias must have shape"),
    (dict(weight=torch.ones(8, dtype=torch.int64)), TypeError, "weight must be a floating-point"),
    (dict(weight=torch.ones(8, device="meta")), ValueError, "weight is on meta"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps=math.inf), ValueError, "eps"),
    (dict(eps=-1e-5), ValueError, "eps"),
    (dict(activation="relu"), ValueError, "activation"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, match):
    args = dict(num_groups=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        genkern.group_norm_silu(X(), **args)


@pytest.mark.parametrize("x,exc,match", [
    (torch.randn(8), ValueError, r"x must have shape \(N, C, \*\)"),
    (torch.tensor(1.0), ValueError, r"x must have shape \(N, C, \*\)"),
    (torch.ones(2, 8, 4, 4, dtype=torch.int32), TypeError, "x must be a floating-point"),
    ([[1.0]], TypeError, "x must be a torch.Tensor"),
])
def test_bad_x(x, exc, match):
    with pytest.raises(exc, match=match):
        genkern.group_norm_silu(x, 4)


def test_module_rejects_bad_activation_at_construction():
    with pytest.raises(ValueError, match="activation"):
        genkern.nn.GroupNormSiLU(4, 8, activation="tanh")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_raw_op_checks_its_arguments(backend, device):
    """Direct torch.ops callers (who bypass the Python checks) get errors too, not crashes."""
    require_backend(backend, device)
    suffix = "_triton" if backend == "triton" else ""
    op = getattr(torch.ops.genkern, "group_norm_silu" + suffix)
    x = torch.randn(2, 8, 4, 4, device=device)
    w = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="num_groups"):
        op(x, w, None, 3, 1e-5, "silu")
    with pytest.raises(ValueError, match="weight must have shape"):
        op(x, torch.ones(5, device=device), None, 4, 1e-5, "silu")
    with pytest.raises(ValueError, match="activation"):
        op(x, w, None, 4, 1e-5, "swish")
    with pytest.raises(ValueError, match="eps"):
        op(x, w, None, 4, float("nan"), "silu")
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        op(x.double(), None, None, 4, 1e-5, "silu")
    y, mean, rstd = op(x, w, None, 4, 1e-5, "silu")
    bwd = getattr(torch.ops.genkern, "group_norm_silu" + suffix + "_backward")
    with pytest.raises(ValueError, match="grad_y must match x"):
        bwd(torch.randn(2, 8, 4, 5, device=device), x, w, None, mean, rstd, 4, "silu")
    with pytest.raises(ValueError, match="mean and rstd"):
        bwd(torch.randn_like(x), x, w, None, mean[:1], rstd, 4, "silu")
    if x.is_cuda:  # the kernels read these through pointers: CPU tensors must be refused, not dereferenced
        with pytest.raises(ValueError, match="rstd is on cpu but x is on cuda"):
            bwd(torch.randn_like(x), x, w, None, mean, rstd.cpu(), 4, "silu")
        with pytest.raises(ValueError, match="grad_y is on cpu but x is on cuda"):
            bwd(torch.randn_like(x).cpu(), x, w, None, mean, rstd, 4, "silu")
