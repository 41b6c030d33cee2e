"""Every CUDA kernel of genkern._C, each launch path once, at small shapes against the float64 reference.

The host code picks a kernel by shape, layout, dtype and GPU (GroupNorm+SiLU alone has one-pass cluster
kernels on Hopper, an NCHW vector path, a generic path and two backward paths), so a test suite can pass
while one branch never runs. Each case here names the branch it takes and the kernels that branch
launches; on a GPU `test_path_launches_its_kernels` checks the names against what the profiler saw, and
`test_every_cuda_kernel_has_a_path` checks (here too) that every `__global__` in csrc/cuda is named by a
case. The same cases are the workload of `scripts/gpu_check.sh`'s `sanitize` stage, which runs
`test_path_matches_reference` on the GPU under compute-sanitizer (memcheck and racecheck; synccheck and
initcheck on request): small enough for its 10-100x slowdown, large enough to reach the multi-CTA clusters, the
multi-chunk two-pass kernels and the unvectorised tails. Every kernel backend runs every case (the Triton
kernels, under the sanitizer too, take their own paths through the same shapes); in CI the CPU kernels
and the Triton interpreter check the cases and their references.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import genkern
from _util import KERNEL_BACKENDS, assert_close, make_input, require_backend
from test_ddpm_step import _inputs as step_inputs
from test_gan_ops import _grads
from test_group_norm_silu import check as check_group_norm_silu

CSRC_CUDA = Path(__file__).resolve().parents[1] / "csrc" / "cuda"

# The GroupNorm+SiLU kernel sets (csrc/cuda/group_norm_silu.cu): forward and backward on clusters
# (Hopper), the two-pass forward on NCHW vectors ([flat]) or any layout, the two-pass backward.
GN_CLUSTER_FWD = {"cluster_forward_kernel"}
GN_CLUSTER_BWD = {"cluster_backward_kernel", "param_grads_kernel"}
GN_FLAT_FWD = {"stats_kernel[flat]", "apply_kernel[flat]"}
GN_GENERIC_FWD = {"stats_kernel", "apply_kernel"}
GN_TWO_PASS_BWD = {"grad_sums_kernel", "grad_coef_kernel", "grad_apply_kernel", "param_grads_kernel"}


@dataclass(frozen=True)
class KernelPath:
    id: str
    run: Callable[[str, str], None]            # (backend, device): run the op and assert against the reference
    kernels: Callable[[bool], set]             # (hopper) -> the genkern kernels a CUDA run launches
    why: str                                   # what makes the host take this path


def _fixed(names):
    return lambda hopper: set(names)


def _gn(shape, G, dtype, channels_last, act):
    return lambda backend, device: check_group_norm_silu(backend, device, shape, G, dtype, channels_last, act)


def _gan_op(fn, shape, dtype, channels_last, out_dtype=None, mean=-1.0, std=0.8):
    """fn on `backend` against fn on the reference backend in float64, forward and backward."""
    def run(backend, device):
        master = make_input(shape, torch.float64, "cpu", mean=mean, std=std)
        with genkern.use_backend(backend):
            _, y, dx, gy = _grads(fn, master, dtype, device, channels_last)
        xr = master.clone().requires_grad_()
        with genkern.use_backend("reference"):
            yr = fn(xr)
        (dxr,) = torch.autograd.grad(yr, xr, gy.double().cpu())
        assert_close(y, yr, out_dtype or dtype, "forward")
        assert_close(dx, dxr, dtype, "backward", scale=dxr.abs().max().item())
    return run


def _step(shape, dtype, noise_tensor=False, inpaint=False, **kw):
    """ddpm_step against the reference backend in float64 on the same (rounded) inputs (the same
    in-kernel noise stream for seed=)."""
    def run(backend, device):
        m, x, z = step_inputs(shape, dtype, device, cfg=kw.get("guidance_scale") is not None)
        extra = {"noise": z} if noise_tensor else {}
        if inpaint:
            extra["known"] = torch.randn(shape, device=device).to(dtype)
            extra["mask"] = (torch.rand(shape, device=device) > 0.5).to(dtype)
        args = {**kw, **extra}
        with genkern.use_backend(backend):
            out = genkern.ddpm_step(m, x, 0.3, 0.4, **args)
        with genkern.use_backend("reference"):
            ref = genkern.ddpm_step(m.double().cpu(), x.double().cpu(), 0.3, 0.4,
                                    **{k: v.double().cpu() if torch.is_tensor(v) else v for k, v in args.items()})
        assert out.dtype == dtype
        assert_close(out, ref, dtype, "ddpm_step", scale=3.0)
    return run


def _add_noise(shape, dtype):
    def run(backend, device):
        gen = torch.Generator().manual_seed(3)
        x0, z = (torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype) for _ in range(2))
        abar = torch.rand(shape[0], dtype=torch.float64, generator=gen)
        sa, s1 = abar.sqrt().float(), (1 - abar).sqrt().float()
        with genkern.use_backend(backend):
            out = genkern.add_noise(x0.to(device), z.to(device), sa.to(device), s1.to(device))
        bcast = (-1,) + (1,) * (len(shape) - 1)
        ref = sa.double().view(bcast) * x0.double() + s1.double().view(bcast) * z.double()
        assert_close(out, ref, dtype, "add_noise", scale=1.0)
    return run


f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

PATHS = [
    # GroupNorm+SiLU. Cluster sizes are for an H100 (132 SMs); clusters need sm_90.
    KernelPath("gn-cluster-nchw-f32", _gn((2, 64, 32, 32), 4, f32, False, "silu"),
          lambda h: GN_CLUSTER_FWD | GN_CLUSTER_BWD if h else GN_FLAT_FWD | GN_TWO_PASS_BWD,
          "64 KB groups, 8 of them: split into clusters of 4 CTAs (forward and backward), 16-byte packs"),
    KernelPath("gn-cluster-cl-bf16-gelu", _gn((2, 64, 16, 16), 8, bf16, True, "gelu"),
          lambda h: GN_CLUSTER_FWD | GN_CLUSTER_BWD if h else GN_GENERIC_FWD | GN_TWO_PASS_BWD,
          "channels-last, 8 channels per group = one 16-byte pack per pixel"),
    KernelPath("gn-cluster-nchw-f16-scalar", _gn((3, 32, 7, 7), 8, f16, False, "none"),
          lambda h: GN_CLUSTER_FWD | GN_CLUSTER_BWD if h else GN_GENERIC_FWD | GN_TWO_PASS_BWD,
          "H*W = 49 is no multiple of the pack: one-element packs (and no NCHW vector path off Hopper)"),
    KernelPath("gn-cl-two-pass-backward", _gn((2, 48, 8, 8), 2, f32, True, "silu"),
          lambda h: (GN_CLUSTER_FWD if h else GN_GENERIC_FWD) | GN_TWO_PASS_BWD,
          "channels-last with 24 channels per group: 6 packs per pixel do not divide the cluster block, "
          "so the backward takes the two-pass kernels (grad_sums' shared-memory channel sums)"),
    KernelPath("gn-two-pass-flat", _gn((1, 32, 128, 128), 1, f32, False, "silu"),
          _fixed(GN_FLAT_FWD | GN_TWO_PASS_BWD),
          "one 2 MB group: too large for 8 CTAs of 64 KB; NCHW, H*W a multiple of 4: 32 chunks of vectors"),
    KernelPath("gn-two-pass-cl-bf16", _gn((1, 64, 72, 72), 1, bf16, True, "silu"),
          _fixed(GN_GENERIC_FWD | GN_TWO_PASS_BWD),
          "one 648 KB group in channels-last: the generic two-pass kernels over 21 chunks of pixels"),
    # pixel norm: strided channel columns (NCHW) or contiguous rows (channels-last, H*W = 1)
    KernelPath("pixel-norm-nchw-f32", _gan_op(genkern.pixel_norm, (4, 24, 9, 9), f32, False),
          _fixed({"forward_cols", "backward_cols"}), "NCHW: a thread per pixel walks C strided values"),
    KernelPath("pixel-norm-cl-bf16", _gan_op(genkern.pixel_norm, (4, 40, 5, 5), bf16, True),
          _fixed({"forward_rows", "backward_rows"}), "channels-last: a warp per pixel's contiguous C values"),
    KernelPath("pixel-norm-1x1-f16", _gan_op(genkern.pixel_norm, (8, 512, 1, 1), f16, False),
          _fixed({"forward_rows", "backward_rows"}), "H*W = 1 (a latent vector): rows even in NCHW"),
    # minibatch stddev
    KernelPath("mbstd-nchw-f32", _gan_op(lambda t: genkern.minibatch_stddev(t, 4, 2), (8, 12, 5, 5), f32, False),
          _fixed({"forward_kernel", "backward_kernel"}), "NCHW, groups of 4, two statistic channels"),
    KernelPath("mbstd-cl-bf16", _gan_op(lambda t: genkern.minibatch_stddev(t, 3, 1), (6, 16, 4, 4), bf16, True),
          _fixed({"forward_kernel", "backward_kernel"}), "channels-last, groups of 3"),
    # gradient penalties: per-sample sums of squares, one finalize block, the scaled gradient
    KernelPath("penalty-wgan-gp-f32",
          _gan_op(lambda t: genkern.gradient_norm_penalty(t, 10.0, 1.0), (6, 3, 20, 20), f32, False, f32, 0.05, 0.1),
          _fixed({"sumsq_kernel", "finalize_kernel", "scale_kernel"}), "one chunk per sample"),
    KernelPath("penalty-r1-bf16-chunks",
          _gan_op(lambda t: genkern.gradient_norm_penalty(t, 5.0, None), (3, 8, 32, 32), bf16, True, bf16, 0.05, 0.1),
          _fixed({"sumsq_kernel", "finalize_kernel", "scale_kernel"}),
          "8192 values per sample: two chunks each; channels-last"),
    # the sampling step: 4-element vectors with in-kernel noise, and the scalar tail with everything on
    KernelPath("step-philox-vec-f32", _step((2, 3, 16, 16), f32, seed=7, offset=11),
          _fixed({"ddpm_step_kernel"}), "numel % 4 == 0, aligned: vector loads; Philox noise"),
    KernelPath("step-cfg-inpaint-bf16-scalar",
          _step((3, 3, 5, 7), bf16, method="ddim", eta=1.0, prediction_type="v_prediction", clip_sample_range=1.0,
                guidance_scale=3.0, noise_tensor=True, inpaint=True),
          _fixed({"ddpm_step_kernel"}), "315 elements: scalar accesses; guidance, noise tensor, mask and known"),
    KernelPath("add-noise-f16", _add_noise((4, 3, 8, 8), f16), _fixed({"add_noise_kernel"}), "per-sample coefficients"),
]

@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.id)
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_path_matches_reference(backend, device, path):
    require_backend(backend, device)
    path.run(backend, device)


def kernel_key(name: str):
    """A profiler kernel name -> its genkern kernel's name (with [flat] for the FlatGeometry overloads),
    or None for another library's kernel. Takes demangled and mangled names."""
    m = re.search(r"genkern::cuda::(?:\(anonymous namespace\)::)?(\w+)", name)
    if m:
        base = m.group(1)
    else:
        m = re.search(r"N7genkern4cuda(?:12_GLOBAL__N_1)?(\d+)", name)
        if not m:
            return None
        start = m.end()
        base = name[start:start + int(m.group(1))]
    return base + ("[flat]" if "FlatGeometry" in name else "")


def test_kernel_key():
    assert kernel_key("void genkern::cuda::(anonymous namespace)::stats_kernel<float>(float const*, float*, "
                      "genkern::cuda::(anonymous namespace)::FlatGeometry)") == "stats_kernel[flat]"
    assert kernel_key("_ZN7genkern4cuda12_GLOBAL__N_116grad_coef_kernelEPKfS3_S3_PfS4_NS1_8GeometryE") == \
        "grad_coef_kernel"
    assert kernel_key("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") is None


@pytest.mark.cuda
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.id)
def test_path_launches_its_kernels(path):
    require_backend("cuda", "cuda")
    from torch.profiler import ProfilerActivity, profile
    path.run("cuda", "cuda")  # once before, so that lazy loading and first-call work stay out of the trace
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        path.run("cuda", "cuda")
        torch.cuda.synchronize()
    seen = {kernel_key(e.name) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    seen.discard(None)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert seen == path.kernels(hopper), f"{path.id} ({path.why}): launched {sorted(seen)}"


def cuda_kernel_names():
    """Every __global__ function defined in csrc/cuda."""
    names = set()
    for f in sorted(CSRC_CUDA.glob("*.cu*")):
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", f.read_text()))
    return names


def test_every_cuda_kernel_has_a_path():
    defined = cuda_kernel_names()
    assert len(defined) >= 15, f"the parser found only {sorted(defined)}"
    named = {k.split("[")[0] for p in PATHS for hopper in (False, True) for k in p.kernels(hopper)}
    assert defined <= named, f"kernels no path runs: {sorted(defined - named)}"
    assert named <= defined, f"paths name kernels csrc/cuda does not define: {sorted(named - defined)}"
    flat = {k for p in PATHS for k in p.kernels(True) if k.endswith("[flat]")}
    assert flat == GN_FLAT_FWD, "an H100 must run the NCHW vector path too"
