"""Compile every Triton kernel of genkern for the H100 (sm_90) without a GPU: each op's forward and backward
in float32, float16 and bfloat16, NCHW and channels-last, at the tests' odd shapes and the benchmark's large
ones, through the same Python launch code as on a GPU, with Triton's real compiler (TTIR -> TTGIR -> LLVM IR
-> PTX -> cubin by ptxas) instead of the interpreter that CI tests them with.

    python scripts/triton_compile_check.py          (make gpu-env-check runs it with the GPU machine's Triton)

Why: the interpreter accepts code that the compiler rejects and the other way round (Triton 3.6's
interpreter cannot iterate a range() bound computed by tl.minimum, its compiler can), and a kernel that
fails to compile on the GPU machine costs a lease. Nothing runs: every launch compiles its
specialisation and returns (Triton's warmup), so the outputs are garbage and are not looked at; a
compile error names the kernel and the call.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET = GPUTarget("cuda", 90, 32)  # the H100: compute capability 9.0, warps of 32


class CompileOnlyDriver:
    """What JITFunction.run asks of Triton's driver before a launch: a device, a stream and the target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED: dict = {}  # kernel name -> number of specialisations compiled
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    before = len(self.device_caches[0][0]) if 0 in self.device_caches else 0
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    after = len(self.device_caches[0][0])
    name = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.__name__}"
    COMPILED[name] = COMPILED.get(name, 0) + (after - before)
    return kernel


def cases():
    """(label, thunk) for every launch path of genkern/triton, at shapes where the block sizes and Triton's
    integer specialisations (1, multiples of 16) differ."""
    from genkern.triton import ddpm_step, gradient_penalty, group_norm_silu, minibatch_stddev, pixel_norm
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def t(shape, dtype, cl=False):
        x = torch.empty(shape, dtype=dtype)  # never read: nothing runs
        return x.contiguous(memory_format=torch.channels_last) if cl else x

    out = []
    for dtype in dtypes:
        d = str(dtype).replace("torch.", "")
        # GroupNorm+SiLU: every shape and layout with SiLU and an affine; the other activations and no affine
        # (constexpr branches) at one shape
        gn_cases = [(shape, G, cl, "silu", True) for shape, G in (((2, 64, 7, 7), 32), ((3, 6, 5, 5), 3),
                                                                  ((2, 96, 12, 12), 1), ((32, 512, 64, 64), 32),
                                                                  ((1, 32, 1, 1), 8)) for cl in (False, True)]
        gn_cases += [((2, 64, 7, 7), 32, cl, act, affine) for cl in (False, True) for act, affine in
                     (("gelu", True), ("none", True), ("silu", False))]
        for shape, G, cl, act, affine in gn_cases:
            def gn(shape=shape, G=G, cl=cl, act=act, affine=affine, dtype=dtype):
                x = t(shape, dtype, cl)
                w, b = (torch.empty(shape[1], dtype=dtype), torch.empty(shape[1], dtype=dtype)) if affine else (None, None)
                y, mean, rstd = group_norm_silu.forward(x, w, b, G, 1e-5, act)
                group_norm_silu.backward(torch.empty_like(y), x, w, b, mean, rstd, G, act)
            out.append((f"group_norm_silu {shape} G={G} {d} {'cl' if cl else 'nchw'} {act} affine={affine}", gn))
        for shape in ((2, 3, 5, 5), (4, 512, 8, 8), (32, 512, 64, 64), (2, 7, 1, 1)):
            for cl in (False, True):
                def pn(shape=shape, cl=cl, dtype=dtype):
                    x = t(shape, dtype, cl)
                    y, r = pixel_norm.forward(x, 1e-8)
                    pixel_norm.backward(torch.empty_like(y), x, r)
                out.append((f"pixel_norm {shape} {d} {'cl' if cl else 'nchw'}", pn))
        for shape, G, F in (((4, 3, 5, 5), 4, 1), ((6, 10, 3, 3), 3, 2), ((64, 512, 32, 32), 4, 1), ((2, 16, 1, 1), 2, 1)):
            for cl in (False, True):
                def mb(shape=shape, G=G, F=F, cl=cl, dtype=dtype):
                    x = t(shape, dtype, cl)
                    y = minibatch_stddev.forward(x, G, F, 1e-8)
                    minibatch_stddev.backward(torch.empty_like(y), x, G, F, 1e-8)
                out.append((f"minibatch_stddev {shape} G={G} F={F} {d} {'cl' if cl else 'nchw'}", mb))
        for shape in ((4, 3, 8, 8), (16, 3, 32, 32), (3, 5)):
            for target in (1.0, None):
                def gp(shape=shape, target=target, dtype=dtype):
                    g = t(shape, dtype)
                    loss, norms = gradient_penalty.forward(g, 10.0, target)
                    gradient_penalty.backward(torch.ones((), dtype=torch.float32), g, norms, 10.0, target)
                out.append((f"gradient_penalty {shape} {d} target={target}", gp))
        # the sampling step: its constexpr flags (guidance, clip, recompute, noise source, inpainting mask) at one
        # shape, the usual call (in-kernel noise, clip) at an odd and a large one
        step_cases = [((4, 3, 8, 8), cfg, noise_kind, masked) for cfg in (None, 7.5)
                      for noise_kind in ("philox", "tensor", "none") for masked in (False, True)]
        step_cases += [(shape, None, "philox", False) for shape in ((64, 3, 256, 256), (3, 5, 7))]
        for shape, cfg, noise_kind, masked in step_cases:
            def st(shape=shape, cfg=cfg, noise_kind=noise_kind, masked=masked, dtype=dtype):
                x = t(shape, dtype)
                m = t((2 * shape[0],) + shape[1:], dtype) if cfg else t(shape, dtype)
                noise = t(shape, dtype) if noise_kind == "tensor" else None
                seed = 1234 if noise_kind == "philox" else None
                mask, known = (t(shape, dtype), t(shape, dtype)) if masked else (None, None)
                sigma = 0.0 if noise_kind == "none" else 0.1
                for pred, clip, recompute in (("epsilon", 1.0, True), ("v_prediction", None, False)):
                    ddpm_step.ddpm_step(m, x, noise, mask, known, pred, 0.9, 0.43, clip, recompute,
                                        0.3, 0.2, 0.5, sigma, 0.8, 0.1 if masked else 0.0, cfg, seed, 3)
            out.append((f"ddpm_step {shape} {d} cfg={cfg} noise={noise_kind} masked={masked}", st))

        def an(dtype=dtype):
            x = t((4, 3, 8, 8), dtype)
            ddpm_step.add_noise(x, torch.empty_like(x), torch.ones(4), torch.ones(4))
        out.append((f"add_noise {d}", an))
    return out


def main():
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = _compile_only
    t0 = time.perf_counter()
    failed = []
    todo = cases()
    for label, fn in todo:
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (every failure is reported, then the run fails)
            failed.append(label)
            print(f"FAILED {label}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    total = sum(COMPILED.values())
    print(f"triton {triton.__version__}, target sm_{TARGET.arch}: {total} specialisations of {len(COMPILED)} kernels "
          f"compiled from {len(todo)} calls in {time.perf_counter() - t0:.0f} s "
          f"({', '.join(f'{k} {v}' for k, v in sorted(COMPILED.items()))})")
    if failed:
        print(f"{len(failed)} of {len(todo)} calls FAILED to compile")
        sys.exit(1)


if __name__ == "__main__":
    main()
