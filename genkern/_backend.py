"""Backend selection: which implementation of an op runs for a given tensor.

Backends, fastest first where several exist for a device:
  cuda       CUDA C++ kernels in genkern._C            (CUDA tensors)
  triton     Triton kernels in genkern/triton/        (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  cpu        C++ kernels in genkern._C (at::vec + at::parallel_for)   (CPU tensors)
  reference  plain PyTorch in genkern/reference/      (any tensor; the numerical oracle)

The default for a device is the first available backend in DEFAULT_ORDER, an order measured with
`python -m bench` (see the README's backend table). Force one with `genkern.use_backend(name)`,
as a context manager or a global setter, or with the environment variable GENKERN_BACKEND.
Under torch.compile the choice is read when a function is traced and fixed in the compiled graph.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")

# Measured order per device type (CPU: bench/results/cpu.json; CUDA: bench/results/h100.json, where the
# CUDA C++ kernels beat Triton in nearly every case, mostly on host-side launch cost).
DEFAULT_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

_forced: str | None = None


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device_type: str) -> str | None:
    """None if backend `name` can run on tensors of `device_type`, else why not."""
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):
        if not _extension.LOADED:
            return _extension.STATUS
        if name != device_type:
            return f"the {name} backend runs on {name} tensors only, not {device_type}"
        if name == "cuda":
            if not _extension.has_cuda_kernels():
                why = _extension.BUILD_INFO.get("cuda_skipped_because") or "built without CUDA"
                return f"genkern._C has no CUDA kernels ({why})"
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is available"
        if device_type == "cpu":
            return None if _triton_interpret() else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        return f"Triton does not run on {device_type} tensors"
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def backends(device: str | torch.device | None = None, *, include_unavailable: bool = False) -> dict:
    """The backends that can run on `device` (default: CUDA if present, else CPU).

    Returns {name: "available"} for each usable backend, fastest first; with
    include_unavailable=True also {name: "unavailable: <why>"} for the others.
    """
    dev = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    order = list(DEFAULT_ORDER.get(dev, ("reference",)))
    order += [b for b in BACKENDS if b not in order]
    out = {}
    for name in order:
        why = unavailable_reason(name, dev)
        if why is None:
            out[name] = "available"
        elif include_unavailable:
            out[name] = f"unavailable: {why}"
    return out


def current_backend() -> str | None:
    """The forced backend, or None when the default (fastest available) is used."""
    return _forced


# select()'s answers by (forced backend, device type). Every op call asks, and the walk below costs ~5 us
# when its code is cold (between two big kernels). Triton's answers are not kept: on CPU tensors they
# depend on TRITON_INTERPRET, which is read each time; the other backends cannot come or go.
_SELECTED: dict = {}


@torch.compiler.assume_constant_result
def select(device_type: str) -> str:
    """The backend to run for tensors on `device_type`; raises if a forced one cannot run there."""
    key = (_forced, device_type)
    name = _SELECTED.get(key)
    if name is None:
        name = _select(device_type)
        if name != "triton":
            _SELECTED[key] = name
    return name


def select_for(t: torch.Tensor) -> str:
    """select() for tensor t's device. The device type is read through is_cuda / is_cpu: t.device.type
    formats the name through a C++ string stream and costs ~17 us when that code is cold (every op
    call between two big kernels), is_cuda ~1 us."""
    return select("cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type)


def _select(device_type: str) -> str:
    if _forced is not None:
        why = unavailable_reason(_forced, device_type)
        if why is not None:
            raise RuntimeError(f"genkern backend {_forced!r} was requested but cannot run here: {why}")
        return _forced
    for name in DEFAULT_ORDER.get(device_type, ("reference",)):
        if unavailable_reason(name, device_type) is None:
            return name
    return "reference"


class use_backend:
    """Force a backend: `genkern.use_backend("triton")` sets it globally; used as
    `with genkern.use_backend("cpu"): ...` it applies to the block and then restores the previous
    choice. `use_backend(None)` goes back to the default."""

    def __init__(self, name: str | None):
        global _forced
        self._previous = _forced
        _forced = None if name is None else _check_name(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _forced
        _forced = self._previous
        return False


_env = os.environ.get("GENKERN_BACKEND", "").strip()
if _env:
    use_backend(_env)
