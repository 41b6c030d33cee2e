"""ddpm_step / add_noise on every backend against the float64 eager formula of DESIGN.md (op 2), and
the Philox noise stream against Random123's known answers and across backends."""
import math

import pytest
import torch

import genkern
from genkern.reference.philox import philox4x32_10, philox_normal
from _util import KERNEL_BACKENDS, assert_close, require_backend

ALL_BACKENDS = KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")]
SHAPE = (2, 3, 5, 7)  # 210 elements: not a multiple of 4, of the vector width or of a block


def eager_step(m, x, a_t, a_p, *, method, variance_type="fixed_small", eta=0.0, pred="epsilon", clip=None,
               recompute=False, w=None, z=None, mask=None, known=None, last=False):
    """The step exactly as DESIGN.md and the papers write it, in float64, coefficients derived here."""
    m, x = m.double(), x.double()
    if w is not None:
        m_u, m_c = m.chunk(2)
        m = m_u + w * (m_c - m_u)
    if pred == "epsilon":
        x0 = (x - math.sqrt(1 - a_t) * m) / math.sqrt(a_t)
        eps = m
    elif pred == "sample":
        x0 = m
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    else:
        x0 = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * m
        eps = math.sqrt(a_t) * m + math.sqrt(1 - a_t) * x
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        if recompute:
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    z = torch.zeros_like(x) if z is None else z.double()
    beta_t = 1 - a_t / a_p
    if method == "ddpm":   # Ho et al. 2020, eqs. 6-7
        mean = math.sqrt(a_p) * beta_t / (1 - a_t) * x0 + math.sqrt(1 - beta_t) * (1 - a_p) / (1 - a_t) * x
        var = (1 - a_p) / (1 - a_t) * beta_t if variance_type == "fixed_small" else beta_t
        out = mean + (0.0 if last else math.sqrt(var)) * z
    else:                  # Song et al. 2021, eq. 12
        sigma = 0.0 if last else eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        out = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma ** 2) * eps + sigma * z
    if mask is not None:
        known_prev = math.sqrt(a_p) * known.double() + (0.0 if last else math.sqrt(1 - a_p)) * z
        out = mask.double() * known_prev + (1 - mask.double()) * out
    return out


def _inputs(shape, dtype, device, channels_last=False, cfg=False):
    x = torch.randn(shape, dtype=torch.float64)
    m = torch.randn(((2 * shape[0],) if cfg else (shape[0],)) + tuple(shape[1:]), dtype=torch.float64) * 1.5
    z = torch.randn(shape, dtype=torch.float64)
    out = [t.to(dtype=dtype, device=device) for t in (m, x, z)]
    if channels_last:
        out = [t.to(memory_format=torch.channels_last) for t in out]
    return out


# --------------------------------------------------------------------------------------------------
# Philox

def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32_10."""
    def run(c, k):
        return [int(v) for v in philox4x32_10([torch.tensor([x]) for x in c], k)]
    assert run([0, 0, 0, 0], (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0xA4093822, 0x299F31D0)) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def _kernel_noise(shape, seed, offset, device, dtype=torch.float32, channels_last=False):
    """The in-kernel noise itself: a DDIM step whose only non-zero term is sigma * z with sigma = 1."""
    zero = torch.zeros(shape, dtype=dtype, device=device)
    if channels_last:
        zero = zero.to(memory_format=torch.channels_last)
    # eps-prediction, m = x = 0: x0 = 0 and eps = 0, so the result is coef * 0 + sigma * z
    sigma = genkern.diffusion.step_coefficients(0.5, 0.9, method="ddim", eta=1.0).sigma
    return genkern.ddpm_step(zero, zero, 0.5, 0.9, method="ddim", eta=1.0, seed=seed, offset=offset) / sigma


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("numel", [1, 3, 4, 37, 1024, 1029, 4100])
def test_noise_matches_reference_stream(backend, device, numel):
    require_backend(backend, device)
    seed, offset = 0x1234_5678_9ABC_DEF0, 2**32 + 977   # both words of seed and offset in use
    with genkern.use_backend(backend):
        z = _kernel_noise((1, numel), seed, offset, device)
    ref = philox_normal((1, numel), seed, offset, dtype=torch.float64)
    assert_close(z, ref, torch.float32, f"noise {backend}", scale=1.0)


@pytest.mark.parametrize("start", [1, 2, 3, 4, 4098])
def test_reference_stream_slice(start):
    """philox_normal(start=s) is elements s, s + 1, ... of the whole stream, whatever s's alignment to
    Philox's groups of 4 and Box-Muller's pairs (tests of large tensors check a slice this way)."""
    whole = philox_normal((start + 37,), 99, 5, dtype=torch.float64)
    part = philox_normal((37,), 99, 5, dtype=torch.float64, start=start)
    assert torch.equal(part, whole[start:])


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_noise_follows_memory_order(backend, device):
    """Like torch.randn_like: the stream fills memory in order, so channels_last gets its own layout."""
    require_backend(backend, device)
    shape = (2, 3, 4, 5)
    with genkern.use_backend(backend):
        z = _kernel_noise(shape, 7, 3, device, channels_last=True)
    assert z.is_contiguous(memory_format=torch.channels_last)
    ref = philox_normal(shape, 7, 3, dtype=torch.float64, strides=z.stride())
    assert_close(z, ref, torch.float32, "channels_last noise", scale=1.0)


def test_noise_is_standard_normal():
    """Moments and tails of 2^20 draws (cpu kernel), and independence across offsets and seeds."""
    n = 2 ** 20
    z = _kernel_noise((1, n), 42, 0, "cpu").double().reshape(-1)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z ** 3).mean().item()) < 5 * math.sqrt(15 / n)
    assert abs((z ** 4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    assert abs((z.abs() > 2).double().mean().item() - 0.0455003) < 5 * math.sqrt(0.0455 / n)
    other = [_kernel_noise((1, 4096), 42, 1, "cpu"), _kernel_noise((1, 4096), 43, 0, "cpu")]
    for o in other:
        r = torch.corrcoef(torch.stack([z[:4096].float(), o.reshape(-1)]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(4096)


# --------------------------------------------------------------------------------------------------
# The step against the eager formula

STEP_CASES = [
    pytest.param(dict(method="ddpm", variance_type="fixed_small"), id="ddpm-small"),
    pytest.param(dict(method="ddpm", variance_type="fixed_large"), id="ddpm-large"),
    pytest.param(dict(method="ddim", eta=0.0), id="ddim-eta0"),
    pytest.param(dict(method="ddim", eta=1.0), id="ddim-eta1"),
]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("case", STEP_CASES)
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("w", [None, 3.0], ids=["nocfg", "cfg"])
def test_step_matches_eager_formula(backend, device, case, pred, clip, w):
    require_backend(backend, device)
    m, x, z = _inputs(SHAPE, torch.float32, device, cfg=w is not None)
    a_t, a_p = 0.31, 0.46
    with genkern.use_backend(backend):
        out = genkern.ddpm_step(m, x, a_t, a_p, prediction_type=pred, clip_sample_range=clip,
                                guidance_scale=w, noise=z, **case)
    ref = eager_step(m, x, a_t, a_p, pred=pred, clip=clip, w=w, z=z, **case)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, ref, torch.float32, f"{backend} {case} {pred}", scale=3.0)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_step_dtypes_and_layouts(backend, device, dtype, channels_last):
    require_backend(backend, device)
    m, x, z = _inputs((3, 4, 6, 5), dtype, device, channels_last, cfg=True)
    with genkern.use_backend(backend):
        out = genkern.ddpm_step(m, x, 0.2, 0.25, method="ddim", eta=0.5, prediction_type="v_prediction",
                                clip_sample_range=1.0, use_clipped_model_output=True, guidance_scale=2.0, noise=z)
    ref = eager_step(m, x, 0.2, 0.25, method="ddim", eta=0.5, pred="v_prediction", clip=1.0, recompute=True,
                     w=2.0, z=z)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(out, ref, dtype, f"{backend} {dtype}", scale=3.0)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_inpainting(backend, device, method):
    """RePaint: known region = the known image noised to t-1 with the same z, the rest generated."""
    require_backend(backend, device)
    m, x, z = _inputs(SHAPE, torch.float32, device)
    known = torch.randn(SHAPE, device=device)
    mask = (torch.rand(SHAPE[0], 1, SHAPE[2], SHAPE[3], device=device) > 0.5).float()  # broadcast over C
    with genkern.use_backend(backend):
        out = genkern.ddpm_step(m, x, 0.4, 0.5, method=method, eta=0.0, noise=z, mask=mask, known=known)
        last = genkern.ddpm_step(m, x, 0.4, 0.5, method=method, eta=0.0, noise=z, mask=mask, known=known,
                                 last_step=True)
    ref = eager_step(m, x, 0.4, 0.5, method=method, z=z, mask=mask.expand(SHAPE), known=known)
    assert_close(out, ref, torch.float32, "inpainting", scale=3.0)
    ref_last = eager_step(m, x, 0.4, 0.5, method=method, z=z, mask=mask.expand(SHAPE), known=known, last=True)
    assert_close(last, ref_last, torch.float32, "inpainting, last step", scale=3.0)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_in_kernel_noise_step(backend, device):
    """seed=: the step equals the eager formula fed the reference stream; last_step adds no noise."""
    require_backend(backend, device)
    m, x, _ = _inputs(SHAPE, torch.float32, device)
    with genkern.use_backend(backend):
        out = genkern.ddpm_step(m, x, 0.3, 0.35, seed=123, offset=250)
        last = genkern.ddpm_step(m, x, 0.3, 0.35, seed=123, offset=250, last_step=True)
    z = philox_normal(SHAPE, 123, 250, dtype=torch.float64).to(device)
    assert_close(out, eager_step(m, x, 0.3, 0.35, method="ddpm", z=z), torch.float32, "seeded step", scale=3.0)
    assert_close(last, eager_step(m, x, 0.3, 0.35, method="ddpm", last=True), torch.float32, "last", scale=3.0)


def test_same_seed_same_noise_across_backends():
    m, x, _ = _inputs((2, 4, 8, 8), torch.float32, "cpu")
    outs = {}
    for b in genkern.backends("cpu"):
        with genkern.use_backend(b):
            outs[b] = genkern.ddpm_step(m, x, 0.3, 0.35, seed=99, offset=7)
            assert torch.equal(outs[b], genkern.ddpm_step(m, x, 0.3, 0.35, seed=99, offset=7)), b
    ref = outs.pop("reference")
    assert outs, "no kernel backend ran"
    for b, o in outs.items():
        assert_close(o, ref.double(), torch.float32, f"{b} vs reference", scale=3.0)
    with genkern.use_backend("cpu"):
        assert not torch.allclose(genkern.ddpm_step(m, x, 0.3, 0.35, seed=99, offset=8), outs["cpu"])


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise(backend, device, dtype):
    require_backend(backend, device)
    x0 = torch.randn(4, 3, 5, 6, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    z = torch.randn(4, 3, 5, 6, device=device, dtype=dtype)
    abar = torch.tensor([0.9, 0.5, 0.1, 0.01], dtype=torch.float64, device=device)
    with genkern.use_backend(backend):
        out = genkern.add_noise(x0, z, abar.sqrt().float(), (1 - abar).sqrt().float())
    ref = abar.sqrt().view(-1, 1, 1, 1) * x0.double() + (1 - abar).sqrt().view(-1, 1, 1, 1) * z.double()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref, dtype, "add_noise", scale=1.0)


# --------------------------------------------------------------------------------------------------
# Gradients, registration

@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_backward_matches_reference(backend, device):
    require_backend(backend, device)
    m, x, z = _inputs(SHAPE, torch.float32, device, cfg=True)
    known = torch.randn(SHAPE, device=device)
    mask = (torch.rand(SHAPE, device=device) > 0.5).float()
    g = torch.randn(SHAPE, device=device)
    grads = {}
    for b in (backend, "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (m, x, z, known)]
        with genkern.use_backend(b):
            y = genkern.ddpm_step(leaves[0], leaves[1], 0.3, 0.4, method="ddim", eta=0.7, clip_sample_range=1.0,
                                  use_clipped_model_output=True, guidance_scale=1.5, noise=leaves[2], mask=mask,
                                  known=leaves[3])
        grads[b] = torch.autograd.grad(y, leaves, g)
    for got, want, name in zip(grads[backend], grads["reference"], ("model_output", "sample", "noise", "known")):
        assert_close(got, want.double(), torch.float32, f"grad {name}", scale=3.0)


def test_gradcheck_reference_float64():
    m = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda m, x, z: genkern.ddpm_step(
        m, x, 0.3, 0.4, prediction_type="v_prediction", guidance_scale=2.0, noise=z), (m, x, z))


def _op_args(device, channels_last=False, seed=None):
    m, x, z = _inputs((2, 3, 4, 5), torch.float32, device, channels_last, cfg=True)
    known = torch.randn_like(x)
    mask = (torch.rand_like(x) > 0.5).float()
    return (m, x, None if seed is not None else z, mask, known, "v_prediction", 0.6, 0.8, 1.0, True, 0.7, 0.5, 0.1,
            0.3, 0.75, 0.66, 2.5, seed, 11)


STEP_OPS = {"cpu": "ddpm_step", "cuda": "ddpm_step", "triton": "ddpm_step_triton"}


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("seed", [None, 5], ids=["noise-tensor", "philox"])
def test_opcheck(backend, device, channels_last, seed):
    require_backend(backend, device)
    op = getattr(torch.ops.genkern, STEP_OPS[backend]).default
    torch.library.opcheck(op, _op_args(device, channels_last, seed))
    add = getattr(torch.ops.genkern, STEP_OPS[backend].replace("ddpm_step", "add_noise")).default
    x0 = torch.randn(3, 2, 4, 4, device=device)
    torch.library.opcheck(add, (x0, torch.randn_like(x0), torch.rand(3, device=device), torch.rand(3, device=device)))


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.values[0] != "triton" or p.values[1] == "cuda"])
def test_torch_compile_fullgraph(backend, device):
    require_backend(backend, device)
    m, x, z = _inputs((2, 3, 8, 8), torch.float32, device, cfg=True)

    def step(m, x, z):
        x = genkern.ddpm_step(m, x, 0.3, 0.4, method="ddim", eta=1.0, guidance_scale=4.0, noise=z)
        return genkern.ddpm_step(torch.cat([x, x]), x, 0.4, 0.5, guidance_scale=4.0, seed=3, offset=1)

    torch._dynamo.reset()
    with genkern.use_backend(backend):
        eager = step(m, x, z)
        compiled = torch.compile(step, fullgraph=True)(m, x, z)
    torch.testing.assert_close(compiled, eager)


# --------------------------------------------------------------------------------------------------
# Bad input

def test_bad_inputs():
    m, x, z = _inputs(SHAPE, torch.float32, "cpu")
    with pytest.raises(ValueError, match="prediction_type"):
        genkern.ddpm_step(m, x, 0.3, 0.4, prediction_type="eps")
    with pytest.raises(ValueError, match="variance_type"):
        genkern.ddpm_step(m, x, 0.3, 0.4, variance_type="learned")
    with pytest.raises(ValueError, match="model_output"):
        genkern.ddpm_step(m[:, :2], x, 0.3, 0.4)
    with pytest.raises(ValueError, match=r"guidance_scale.*\[2B"):
        genkern.ddpm_step(m, x, 0.3, 0.4, guidance_scale=2.0)          # B rows, not 2B
    with pytest.raises(ValueError, match=r"guidance_scale.*\[2B"):
        genkern.ddpm_step(torch.cat([m, m[:1]]), x, 0.3, 0.4, guidance_scale=2.0)   # odd batch
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        genkern.ddpm_step(torch.cat([m, m]), x, 0.3, 0.4, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="noise must have"):
        genkern.ddpm_step(m, x, 0.3, 0.4, noise=z[:1])
    with pytest.raises(ValueError, match="noise or seed"):
        genkern.ddpm_step(m, x, 0.3, 0.4, noise=z, seed=1)
    with pytest.raises(ValueError, match="alpha_prod_t"):
        genkern.ddpm_step(m, x, 1.5, 0.4)
    with pytest.raises(ValueError, match="mask and known"):
        genkern.ddpm_step(m, x, 0.3, 0.4, mask=torch.ones_like(x))
    with pytest.raises(ValueError, match="mask .* does not broadcast"):
        genkern.ddpm_step(m, x, 0.3, 0.4, mask=torch.ones(3, 3), known=x)
    with pytest.raises(TypeError, match="sample"):
        genkern.ddpm_step(m, x.int(), 0.3, 0.4)
    with pytest.raises(ValueError, match="method"):
        genkern.ddpm_step(m, x, 0.3, 0.4, method="pndm")
    with pytest.raises(ValueError, match="add_noise: sqrt_alpha_prod"):
        genkern.add_noise(x, z, torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="ddpm_step: model_output is on meta but sample is on cpu"):
        genkern.ddpm_step(m.to("meta"), x, 0.3, 0.4)
    with pytest.raises(ValueError, match="ddpm_step: noise is on meta but sample is on cpu"):
        genkern.ddpm_step(m, x, 0.3, 0.4, noise=z.to("meta"))
    with pytest.raises(ValueError, match="add_noise: noise is on meta but original_samples is on cpu"):
        genkern.add_noise(x, z.to("meta"), torch.ones(3), torch.ones(3))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_raw_op_bad_inputs(backend, device):
    """Direct torch.ops callers get the same clear errors from every kernel backend."""
    require_backend(backend, device)
    op = getattr(torch.ops.genkern, STEP_OPS[backend])
    args = list(_op_args(device))
    bad = list(args)
    bad[5] = "x0"
    with pytest.raises((ValueError, RuntimeError), match="prediction_type"):
        op(*bad)
    bad = list(args)
    bad[0] = args[0][:3]
    with pytest.raises((ValueError, RuntimeError), match="model_output"):
        op(*bad)
    bad = list(args)
    bad[1] = args[1].half()
    with pytest.raises((ValueError, TypeError, RuntimeError), match="dtype|float"):
        op(*bad)
    bad = list(args)
    bad[6] = 0.0
    with pytest.raises((ValueError, RuntimeError), match="sqrt_alpha_prod"):
        op(*bad)
