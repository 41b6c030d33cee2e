"""Loading genkern._C, the compiled extension, without ever failing `import genkern`.

Importing never compiles. If the extension is missing, was built against another torch, or cannot be
loaded, genkern warns once (saying why and how to build) and the `cpu`/`cuda` backends are absent;
everything still runs on the `reference` backend (and `triton`, where Triton can run).
"""
from __future__ import annotations

import importlib
import json
import os
import warnings

import torch

BUILD_HINT = "build it with `pip install -e . --no-build-isolation` (or `make build`) in the genkern checkout"

_HERE = os.path.dirname(os.path.abspath(__file__))


def _read_build_info() -> dict | None:
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _missing_cpu_flags(needed: list[str]) -> list[str]:
    """The flags of `needed` that this CPU's /proc/cpuinfo does not list (none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return []
    return [flag for flag in needed if flag not in flags] if flags else []


def _load() -> tuple[bool, str, dict]:
    if os.environ.get("GENKERN_DISABLE_EXTENSION", "") == "1":
        return False, "disabled by GENKERN_DISABLE_EXTENSION=1", {}
    info = _read_build_info() or {}
    built_for = info.get("torch")
    if built_for and built_for != torch.__version__:
        # An ABI mismatch shows up as an undefined symbol at best; say what it really is.
        return False, (f"genkern._C was built against torch {built_for} but torch {torch.__version__} "
                       f"is installed; rebuild: {BUILD_HINT}"), info
    missing = _missing_cpu_flags(info.get("cpu_isa_flags", []))
    if missing:
        # checked before loading: the first vector instruction would kill the process (SIGILL)
        return False, (f"genkern._C was built for {info.get('cpu_isa')} but this CPU lacks "
                       f"{', '.join(missing)}; rebuild it here (GENKERN_CPU_ISA=avx512|avx2|none selects "
                       f"the ISA): {BUILD_HINT}"), info
    try:
        importlib.import_module("genkern._C")
    except ImportError as e:
        if "No module named" in str(e):
            return False, f"genkern._C is not built; {BUILD_HINT}", info
        return False, f"genkern._C failed to load ({e}); rebuild: {BUILD_HINT}", info
    except OSError as e:
        return False, f"genkern._C failed to load ({e}); rebuild: {BUILD_HINT}", info
    return True, "loaded", info


LOADED, STATUS, BUILD_INFO = _load()
if not LOADED and os.environ.get("GENKERN_DISABLE_EXTENSION", "") != "1":
    warnings.warn(f"genkern: compiled kernels unavailable, using the reference backend: {STATUS}",
                  RuntimeWarning, stacklevel=2)


def has_cuda_kernels() -> bool:
    return LOADED and bool(BUILD_INFO.get("cuda"))
