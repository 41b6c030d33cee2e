"""group_norm_silu: every kernel backend against the float64 reference, forward and backward."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import genkern
from _util import DTYPES, KERNEL_BACKENDS, assert_close, make_input, require_backend

ACTS = {"silu": F.silu, "gelu": F.gelu, "none": lambda u: u}

# (shape, num_groups): U-Net-like, C not a multiple of the vector width, H*W = 1 with groups = C and
# batch 1, one group over everything (3-D input), a 5-D input, 65 small groups (the CPU hands them
# out in runs of 4 on two threads: the last run is partial), 4x4 maps, and 7x7 maps with 16 channels
# per group. Maps under 128 values with two or more channels per group (all but the 1x1 shape) take
# the CPU's short-rows path: a group's rows in one run, vectors straddling rows; the 7x7 groups span
# several of its 256-value chunks.
SHAPES = [
    ((2, 64, 8, 8), 32),
    ((2, 6, 5, 7), 3),
    ((1, 10, 1, 1), 10),
    ((3, 12, 9), 1),
    ((2, 8, 3, 4, 5), 4),
    ((5, 26, 3, 3), 13),
    ((3, 12, 4, 4), 3),
    ((2, 64, 7, 7), 4),
]


def group_norm_f64(x, G, w, b, eps):
    """GroupNorm in float64 from its definition (F.group_norm refuses N * H * W == 1)."""
    N, C = x.shape[:2]
    xg = x.reshape(N, G, -1)
    mu = xg.mean(-1, keepdim=True)
    var = ((xg - mu) ** 2).mean(-1, keepdim=True)
    u = ((xg - mu) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    return u * (1 if w is None else w.reshape(shape)) + (0 if b is None else b.reshape(shape))


def reference(x, G, w, b, eps, act):
    """float64 eager PyTorch."""
    d = lambda t: None if t is None else t.detach().double().cpu().requires_grad_()  # noqa: E731
    xr, wr, br = d(x), d(w), d(b)
    return ACTS[act](group_norm_f64(xr, G, wr, br, eps)), (xr, wr, br)


@pytest.mark.parametrize("shape,G", SHAPES[:2] + SHAPES[3:])
def test_float64_formula_agrees_with_torch_group_norm(shape, G):
    x = make_input(shape, torch.float64, "cpu")
    w, b = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    torch.testing.assert_close(group_norm_f64(x, G, w, b, 1e-5), F.group_norm(x, G, w, b, 1e-5))
    torch.testing.assert_close(genkern.reference.group_norm_silu(x, G, w, b, 1e-5, "silu"),
                               F.silu(F.group_norm(x, G, w, b, 1e-5)))


def run(backend, x, G, w, b, eps, act, dy):
    with genkern.use_backend(backend):
        y = genkern.group_norm_silu(x, G, w, b, eps, act)
        inputs = [t for t in (x, w, b) if t is not None]
        grads = torch.autograd.grad(y, inputs, dy)
    return y, grads


def check(backend, device, shape, G, dtype, channels_last, act, affine=True, eps=1e-5, unaligned_dy=False):
    require_backend(backend, device)
    C = shape[1]
    x = make_input(shape, dtype, device, channels_last).requires_grad_()
    w = (1 + 0.5 * torch.randn(C, device=device)).requires_grad_() if affine else None
    b = (0.5 * torch.randn(C, device=device)).requires_grad_() if affine else None
    dy = torch.randn(shape, device=device).to(dtype)
    if unaligned_dy:  # same values, one element past an aligned address
        dy = torch.cat([dy.new_zeros(1), dy.flatten()])[1:].view(shape)
    y, grads = run(backend, x, G, w, b, eps, act, dy)
    yr, inputs = reference(x, G, w, b, eps, act)
    ref_grads = torch.autograd.grad(yr, [t for t in inputs if t is not None], dy.double().cpu())
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last and x.dim() >= 4:
        assert y.stride() == x.stride(), "output must keep the input's memory format"
    assert_close(y, yr, dtype, "y")
    # dx = rstd * w * du - (group means): its rounding is relative to rstd * |w| * |dy|, which is
    # far larger than dx itself when a group is (nearly) constant, e.g. one value per group.
    xg = x.detach().double().cpu().reshape(shape[0], G, -1)
    rstd_max = (xg.var(-1, unbiased=False) + eps).rsqrt().max().item()
    w_max = 1.0 if w is None else w.abs().max().item()
    dx_terms = rstd_max * w_max * dy.abs().max().item() / 10
    for name, g, gr in zip(["dx", "dweight", "dbias"], grads, ref_grads):
        assert g.dtype == (dtype if name == "dx" else torch.float32)
        assert_close(g, gr, dtype, name, scale=dx_terms if name == "dx" else 0.0)


ALL_BACKENDS = KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("shape,G", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_matches_float64_reference(backend, device, shape, G, dtype, channels_last):
    check(backend, device, shape, G, dtype, channels_last, "silu")


# Groups large enough that the GPU kernels split each one across blocks: across a thread-block
# cluster of 2 to 8 CTAs (the one-pass Hopper path), or across chunks of the two-pass path when a
# group exceeds what a cluster holds (the last shape). Too large for the Triton interpreter.
LARGE = [((2, 32, 64, 64), 1), ((1, 64, 32, 32), 4), ((3, 96, 16, 16), 2), ((1, 256, 64, 64), 1)]


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.id != "triton-interpret"])
@pytest.mark.parametrize("shape,G", LARGE, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_large_groups(backend, device, shape, G, dtype, channels_last):
    check(backend, device, shape, G, dtype, channels_last, "silu")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("act", ["gelu", "none"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_other_activations(backend, device, act, channels_last):
    check(backend, device, (2, 12, 5, 6), 4, torch.float32, channels_last, act)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_without_affine(backend, device, channels_last):
    check(backend, device, (2, 8, 4, 4), 2, torch.float32, channels_last, "silu", affine=False)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_silu_across_its_range(backend, device, channels_last):
    # weight 0 makes u = bias exactly, so y = silu(bias[c]) and dbias[c] = sum(dy) * silu'(bias[c]):
    # the kernels' own SiLU and its derivative, from the saturated tails (and the exponential's clamp
    # at |u| ~ 87) through 0, against float64: within 1e-6 relative for |u| <= 16; beyond, where
    # |silu| < 2e-6, the CPU kernel's float32 t = -u log2(e) carries up to 2^-18 |t| of rounding into
    # exp (README: CPU SiLU), so 5e-6.
    require_backend(backend, device)
    u = torch.cat([torch.linspace(-100.0, 100.0, 41), torch.tensor([0.0, 1e-30, -1e-30, -3e-4, 5e-3, -0.7,
                                                                  0.7, -20.5, -87.0, -87.5, -88.5, 87.5])])
    x = torch.randn(2, u.numel(), 3, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.zeros(u.numel(), requires_grad=True)
    b = u.clone().requires_grad_()
    dy = torch.rand(x.shape) + 0.5
    with genkern.use_backend(backend):
        y = genkern.group_norm_silu(x.to(device), 1, w.to(device), b.to(device))
        y.backward(dy.to(device))
    ud = u.double().requires_grad_()
    ref = F.silu(ud)
    ref.backward(torch.ones_like(ud))
    y_c = y.detach().double().cpu().mean((0, 2, 3))  # every element of a channel is silu(u[c])
    rtol = torch.where(u.abs() <= 16, 1e-6, 5e-6).double()
    err = (y_c - ref.detach()).abs()
    assert (err <= rtol * ref.detach().abs() + 1e-30).all(), (err / ref.detach().abs()).max()
    db_ref = ud.grad * dy.double().sum((0, 2, 3))
    err = (b.grad.double() - db_ref).abs()
    assert (err <= (rtol + 2e-6) * db_ref.abs() + 1e-30).all(), (err / db_ref.abs()).max()


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_large_mean_small_variance(backend, device):
    # mean 1000, std 1e-2: E[x^2] - E[x]^2 would cancel completely in float32
    require_backend(backend, device)
    x = (1000 + 1e-2 * torch.randn(2, 8, 16, 16, dtype=torch.float64)).float().to(device)
    with genkern.use_backend(backend):
        y = genkern.group_norm_silu(x, 4, eps=1e-6)
    yr = F.silu(F.group_norm(x.double().cpu(), 4, eps=1e-6))
    # float32 storage of x already perturbs x - mean by ~6e-5 / 1e-2 relative: allow for that
    assert (y.double().cpu() - yr).abs().max().item() < 2e-2


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_non_dense_input(backend, device):
    require_backend(backend, device)
    base = make_input((2, 16, 10, 12), torch.float32, device)
    x = base[:, ::2, 1:9, ::3]  # strided view, neither NCHW- nor channels-last-dense
    with genkern.use_backend(backend):
        y = genkern.group_norm_silu(x, 4)
    assert_close(y, F.silu(F.group_norm(x.double().cpu(), 4)), torch.float32, "y")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_unaligned_grad(backend, device):
    # vectorised kernels must notice that dy is not 16-byte aligned although x is
    check(backend, device, (2, 32, 16, 16), 8, torch.float32, False, "silu", unaligned_dy=True)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_mixed_precision_parameters(backend, device):
    # bf16 activations with float32 weight/bias (as in autocast-free mixed-precision models)
    check(backend, device, (2, 8, 6, 6), 4, torch.bfloat16, False, "silu")


def test_reference_gradcheck_float64():
    x = make_input((2, 6, 3, 3), torch.float64, "cpu").requires_grad_()
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: genkern.reference.group_norm_silu(x, 3, w, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_kernels_float32(backend, device, channels_last):
    """Finite differences of the kernel's own forward against its analytic backward (float32, so
    with float32-sized tolerances; the float64 comparison above is the tight check)."""
    require_backend(backend, device)
    x = make_input((2, 4, 3, 3), torch.float32, device, channels_last).requires_grad_()
    w = (1 + 0.5 * torch.randn(4, device=device)).requires_grad_()
    b = torch.randn(4, device=device).requires_grad_()

    def fn(x, w, b):
        with genkern.use_backend(backend):
            return genkern.group_norm_silu(x, 2, w, b)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-2, atol=2e-2, rtol=2e-2, fast_mode=False)


def test_float64_runs_on_reference():
    x = make_input((2, 4, 3, 3), torch.float64, "cpu")
    y = genkern.group_norm_silu(x, 2)
    assert y.dtype == torch.float64
    assert torch.allclose(y, F.silu(F.group_norm(x, 2)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_empty_input(backend, device):
    require_backend(backend, device)
    x = torch.empty(0, 8, 4, 4, device=device, requires_grad=True)
    w = torch.ones(8, device=device, requires_grad=True)
    with genkern.use_backend(backend):
        y = genkern.group_norm_silu(x, 4, w, None)
        y.sum().backward()
    assert y.shape == x.shape
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16), ("cpu", torch.float32),
                                          pytest.param("cuda", torch.float16, marks=pytest.mark.cuda),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda)])
def test_autocast_follows_group_norm_policy(device, dtype):
    x = make_input((2, 8, 4, 4), dtype, device)
    gn = torch.nn.GroupNorm(4, 8).to(device)
    fused = genkern.nn.GroupNormSiLU(4, 8).to(device)
    fused.load_state_dict(gn.state_dict())
    with torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else dtype):
        expected = F.silu(gn(x))
        got = fused(x)
    assert got.dtype == expected.dtype
    assert_close(got, expected.double(), expected.dtype, "autocast")


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("grad,forced,triton,expected", [(True, None, True, ["triton"]), (True, None, False, []),
                                                         (False, None, True, ["cuda"]), (True, "cuda", True, ["cuda"])],
                         # "interpret": the case that runs the Triton interpreter, which make gpu-env-check
                         # leaves out (Triton 3.6's cannot run these kernels; see scripts/gpu_env_check.sh)
                         ids=["grad-triton-interpret", "grad-no-triton", "no-grad", "forced-cuda"])
def test_deterministic_mode_keeps_the_cuda_backward_out(monkeypatch, deterministic, grad, forced, triton, expected):
    """The routing alone, on the CPU: select() is made to answer "cuda" and the cuda call runs the cpu
    kernels instead. Where a gradient will be taken and no backend is forced, deterministic mode runs
    the op on triton (here the interpreter) or, without Triton, the reference (no kernel call); the
    result still matches float64."""
    op = importlib.import_module("genkern.ops.group_norm_silu")  # the module (genkern.ops exports the function)
    calls = []
    real_call, real_unavailable = op.call_kernel, op._backend.unavailable_reason

    def spy(name, backend, *args):
        calls.append(backend)
        return real_call(name, "cpu" if backend == "cuda" else backend, *args)

    monkeypatch.setattr(op, "call_kernel", spy)
    monkeypatch.setattr(op._backend, "select_for", lambda t: "cuda")
    monkeypatch.setattr(op._backend, "current_backend", lambda: forced)
    # "cuda" stands for the device here: the triton backend is there when it runs on these CPU tensors
    monkeypatch.setattr(op._backend, "unavailable_reason",
                        lambda name, device: "left out by the test" if name == "triton" and not triton
                        else real_unavailable(name, "cpu" if device == "cuda" else device))
    require_backend("cpu", "cpu")
    if "triton" in expected:
        require_backend("triton", "cpu")
    x = make_input((2, 16, 4, 4), torch.float32, "cpu").requires_grad_(grad)
    w = (1 + 0.5 * torch.randn(16)).requires_grad_(grad)
    b = (0.5 * torch.randn(16)).requires_grad_(grad)
    y = genkern.group_norm_silu(x, 4, w, b)
    assert calls == expected, calls  # [] where the reference ran
    yr, inputs = reference(x, 4, w, b, 1e-5, "silu")
    assert_close(y, yr, torch.float32, "y")
    if grad:
        dy = torch.randn(x.shape)
        for name, g, gr in zip(["dx", "dweight", "dbias"], torch.autograd.grad(y, (x, w, b), dy),
                               torch.autograd.grad(yr, inputs, dy.double())):
            assert_close(g, gr, torch.float32, name)


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_mode_reproduces_gradients_bitwise(deterministic, channels_last, dtype):
    """Shapes whose CUDA backward adds channel sums through atomics (clusters of 4 CTAs on Hopper):
    under deterministic mode two backward passes agree to the bit, and with the float64 reference."""
    shape, G = (4, 64, 32, 32), 4
    x = make_input(shape, dtype, "cuda", channels_last).requires_grad_()
    w = (1 + 0.5 * torch.randn(64, device="cuda")).requires_grad_()
    b = (0.5 * torch.randn(64, device="cuda")).requires_grad_()
    dy = torch.randn(shape, device="cuda").to(dtype)
    runs = [torch.autograd.grad(genkern.group_norm_silu(x, G, w, b), (x, w, b), dy) for _ in range(3)]
    for later in runs[1:]:
        for name, g0, g in zip(["dx", "dweight", "dbias"], runs[0], later):
            assert torch.equal(g0, g), f"{name} differs between two runs"
    yr, inputs = reference(x, G, w, b, 1e-5, "silu")
    for name, g, gr in zip(["dx", "dweight", "dbias"], runs[0], torch.autograd.grad(yr, inputs, dy.double().cpu())):
        assert_close(g, gr, dtype, name, scale=10.0 if name == "dx" else 0.0)


@pytest.mark.cuda
def test_forced_cuda_backward_alerts_in_deterministic_mode(deterministic):
    """The CUDA backward's atomics (channels-last: on the cluster and the two-pass path alike) under
    deterministic mode: an error naming the op, or a warning under warn_only, as ATen's own
    nondeterministic ops do."""
    require_backend("cuda", "cuda")
    x = make_input((2, 64, 16, 16), torch.float32, "cuda", channels_last=True).requires_grad_()
    with genkern.use_backend("cuda"):
        y = genkern.group_norm_silu(x, 8)
    with pytest.raises(RuntimeError, match="group_norm_silu_backward.*deterministic"):
        y.backward(torch.ones_like(y), retain_graph=True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="group_norm_silu_backward"):
        y.backward(torch.ones_like(y))
    assert torch.isfinite(x.grad).all()
