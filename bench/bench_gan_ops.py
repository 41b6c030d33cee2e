"""GAN-op benchmarks: pixel norm and minibatch stddev at ProGAN/StyleGAN shapes (forward and
forward+backward), and the penalty part of WGAN-GP at critic-input shapes: the gradient norm, the
penalty and their backward, given the gradient. Eager = the layers as ProGAN/StyleGAN2 write them.
Used by `python -m bench` (three op modules: pixel_norm, minibatch_stddev, gradient_penalty) and by
pytest-benchmark."""
from __future__ import annotations

import functools

import pytest
import torch

import genkern

from bench.harness import compiled, kernel_backends, on_backend, pytest_benchmark_run, report_dtypes
from models.layers import eager_minibatch_stddev, eager_pixel_norm
from genkern.ops.gradient_penalty import bytes_moved as gp_bytes
from genkern.ops.minibatch_stddev import bytes_moved as mb_bytes
from genkern.ops.pixel_norm import bytes_moved as pn_bytes


def eager_penalty(g):
    return 10.0 * ((g.reshape(g.shape[0], -1).norm(2, dim=1) - 1.0) ** 2).mean()


def _impls(eager, fused, device, with_compile):
    impls = {"eager": eager}
    if with_compile:
        impls["torch.compile"] = _compiled(eager, device)
    for be in kernel_backends(device):
        impls[f"genkern[{be}]"] = on_backend(be, device, fused)
    return impls


@functools.lru_cache(maxsize=None)
def _compiled(fn, device):
    return compiled(fn, device)


def _callables(impls, x, backward):
    dy = None
    out = {}
    for name, fn in impls.items():
        if backward:
            def run(fn=fn):
                x.grad = None
                y = fn(x)
                y.backward(torch.ones_like(y) if y.dim() == 0 else _dy(y))
        else:
            def run(fn=fn):
                with torch.no_grad():
                    return fn(x)
        out[name] = run
    return out


_DY: dict = {}


def _dy(y):
    key = (tuple(y.shape), y.dtype, y.device, y.is_contiguous())
    if key not in _DY:
        _DY[key] = torch.randn_like(y)
    return _DY[key]


class _Op:
    """The module interface bench/report.py expects, for one GAN op."""

    def __init__(self, name, eager, fused, quick, full, gpu, traffic, passes=(False, True)):
        self.OP, self.eager, self.fused, self.QUICK, self.FULL, self.GPU = name, eager, fused, quick, full, gpu
        self.traffic, self.PASSES = traffic, passes

    def implementations(self, device, with_compile=True):
        return _impls(self.eager, self.fused, device, with_compile)

    def cases(self, quick, device):
        if device == "cuda":  # the first GPU shape is the large one: both layouts there
            for k, shape in enumerate(self.GPU):
                for channels_last in ((False, True) if k == 0 and len(shape) == 4 else (False,)):
                    for dtype in report_dtypes(device, quick):
                        yield dict(shape=shape, dtype=dtype, channels_last=channels_last)
            return
        for shape in (self.QUICK if quick else self.FULL):
            for dtype in report_dtypes(device, quick):
                yield dict(shape=shape, dtype=dtype, channels_last=False)
        if not quick:
            yield dict(shape=self.QUICK[0], dtype=torch.float32, channels_last=True)

    def case_callables(self, impls, shape, dtype, device, channels_last=False, backward=False, **_):
        x = torch.randn(shape, device=device, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_(backward)
        return _callables(impls, x, backward), self.traffic(x, backward), (x,)


pixel_norm = _Op("pixel_norm", eager_pixel_norm, genkern.pixel_norm,
                 quick=[(16, 512, 32, 32), (64, 512, 8, 8)], full=[(16, 512, 32, 32), (64, 512, 8, 8), (64, 512)],
                 gpu=[(32, 512, 64, 64), (64, 512, 8, 8), (256, 512)],
                 traffic=lambda x, bwd: pn_bytes(x) + (pn_bytes(x, backward=True) if bwd else 0))
minibatch_stddev = _Op("minibatch_stddev", eager_minibatch_stddev, genkern.minibatch_stddev,
                       quick=[(32, 512, 4, 4), (16, 256, 32, 32)], full=[(32, 512, 4, 4), (16, 256, 32, 32),
                                                                         (64, 512, 8, 8)],
                       gpu=[(64, 512, 32, 32), (32, 512, 4, 4)],
                       traffic=lambda x, bwd: mb_bytes(x) + (mb_bytes(x, backward=True) if bwd else 0))
# the penalty part of WGAN-GP given the gradient: forward alone, and forward + backward (what a critic step runs)
gradient_penalty = _Op("gradient_penalty", eager_penalty, lambda g: genkern.gradient_norm_penalty(g, 10.0, 1.0),
                       quick=[(64, 3, 64, 64)], full=[(64, 3, 64, 64), (64, 3, 128, 128), (32, 3, 256, 256)],
                       gpu=[(256, 3, 128, 128), (64, 3, 64, 64)],
                       traffic=lambda g, bwd: gp_bytes(g, backward=bwd))  # fwd+bwd: see bytes_moved

OPS = {"pixel_norm": pixel_norm, "minibatch_stddev": minibatch_stddev, "gradient_penalty": gradient_penalty}

# -------------------------------------------------------------------------------------------------
# pytest-benchmark

PYTEST_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_PARAMS = [(op, shape, impl) for op in OPS for shape in OPS[op].QUICK
           for impl in OPS[op].implementations(PYTEST_DEVICE, with_compile=True)]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op,shape,impl", _PARAMS, ids=[f"{o}-{'x'.join(map(str, s))}-{i}" for o, s, i in _PARAMS])
def test_gan_ops(benchmark, op, shape, impl, backward):
    mod = OPS[op]
    fns, traffic, _ = mod.case_callables({impl: mod.implementations(PYTEST_DEVICE)[impl]}, shape, torch.float32,
                                         PYTEST_DEVICE, backward=backward)
    group = f"{op} {'x'.join(map(str, shape))} {'fwd+bwd' if backward else 'fwd'}"
    pytest_benchmark_run(benchmark, fns[impl], group, traffic, PYTEST_DEVICE)
