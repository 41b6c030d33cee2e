"""Build genkern._C: C++ CPU kernels always, CUDA C++ kernels when a toolkit and a CUDA torch exist.

Environment switches (all optional):
  GENKERN_CUDA=0|1        0 skips CUDA; 1 makes a missing toolkit an error; unset = auto.
  CUDA_HOME               the CUDA toolkit; found automatically from nvcc or /usr/local/cuda.
  TORCH_CUDA_ARCH_LIST    GPU architectures; default "8.0;9.0+PTX" when no GPU is visible.
  GENKERN_CPU_ISA=avx512|avx2|none
                          the vector ISA of the CPU kernels; default: the best this CPU supports.
  MAX_JOBS                parallel compile jobs (ninja).

torch must already be installed: build with `pip install -e . --no-build-isolation`.
"""
import glob
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _die(msg):
    sys.stderr.write("\n" + "=" * 78 + "\n" + msg.strip() + "\n" + "=" * 78 + "\n\n")
    raise SystemExit(1)


try:
    import torch
except ImportError:
    _die(
        "genkern builds a PyTorch extension, so torch must be installed before genkern is built.\n"
        "Install torch first, then build without pip's isolated build environment:\n\n"
        "    pip install torch\n"
        "    pip install -e . --no-build-isolation\n\n"
        "(or simply run `make test` / `make bench`, which set up a venv and do both)."
    )


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and (
        os.path.isfile(os.path.join(path, "bin", "nvcc"))
    )


def _find_cuda_home():
    """The real CUDA toolkit. `nvcc` on PATH may be a wrapper script (as on our dev machines), from
    which torch would guess /usr/local; so follow the script or fall back to the usual places."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if _is_toolkit(os.environ[var]) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode(errors="ignore").replace('"', " ").split():
                    if tok.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


def _cuda_wanted():
    flag = os.environ.get("GENKERN_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        _die(f"GENKERN_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return None, "GENKERN_CUDA=0"
    reason = None
    home = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    else:
        home = _find_cuda_home()
        if home is None:
            reason = ("no CUDA toolkit found (set CUDA_HOME to the toolkit folder that holds "
                      "bin/nvcc and include/cuda_runtime.h)")
    if reason and flag == "1":
        _die(f"GENKERN_CUDA=1 but CUDA kernels cannot be built: {reason}.")
    return home, reason


# The CPU flags each ISA needs: the build's -m flags follow from them, and genkern/_extension.py
# refuses to load a build whose flags the running CPU lacks (it would die of SIGILL instead).
CPU_ISA_FLAGS = {
    "avx512": ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"],
    "avx2": ["avx2", "fma", "f16c"],
    "none": [],
}


def _cpu_isa():
    wanted = os.environ.get("GENKERN_CPU_ISA", "").strip().lower()
    if wanted:
        if wanted not in CPU_ISA_FLAGS:
            _die(f"GENKERN_CPU_ISA={wanted!r}: expected one of {', '.join(CPU_ISA_FLAGS)}.")
        return wanted
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return "none"
    return next(isa for isa, need in CPU_ISA_FLAGS.items() if set(need) <= flags)


cuda_home, cuda_skip_reason = _cuda_wanted()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

cpu_isa = _cpu_isa()
cxx_flags = ["-O3", "-fopenmp", "-fvisibility=hidden"] + [f"-m{flag}" for flag in CPU_ISA_FLAGS[cpu_isa]]
if cpu_isa != "none":
    # at::vec picks its AVX-512 / AVX2 specialisations from CPU_CAPABILITY_* (its inline namespace
    # keeps them apart from torch's own copies); csrc/cpu/simd.h follows the same macros.
    cxx_flags += [f"-DCPU_CAPABILITY={cpu_isa.upper()}", f"-DCPU_CAPABILITY_{cpu_isa.upper()}"]
define_macros = []

sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
include_dirs = [os.path.join(ROOT, "csrc")]
if cuda_home:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("GENKERN_WITH_CUDA", "1"))
    ext = CUDAExtension(
        "genkern._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math",
                                                         "-lineinfo", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"], py_limited_api=True,
    )
else:
    ext = CppExtension(
        "genkern._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"], py_limited_api=True,
    )

# Import-time checks read this instead of loading a possibly stale binary. Written by the build itself,
# beside the library it describes, so that a setup.py run that builds nothing (pip's metadata step, a
# `--dry-run`) leaves the last build's record alone.
build_info = {
    "torch": torch.__version__,
    "cuda": bool(cuda_home),
    "cuda_version": torch.version.cuda if cuda_home else None,
    "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda_home else None,
    "cuda_skipped_because": cuda_skip_reason,
    "cpu_isa": cpu_isa,
    "cpu_isa_flags": CPU_ISA_FLAGS[cpu_isa],
}


class BuildWithInfo(BuildExtension.with_options(no_python_abi_suffix=True)):
    def run(self):
        super().run()
        # beside the library: in the tree (in place, as editable installs build) or in build_lib (a wheel)
        target = os.path.join(ROOT if self.inplace else os.path.abspath(self.build_lib), "genkern")
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "_build_info.json"), "w") as f:
            json.dump(build_info, f, indent=1)
        print(f"genkern build: {build_info}")


setup(
    packages=find_packages(include=["genkern", "genkern.*"]),
    package_data={"genkern": ["_build_info.json"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildWithInfo},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
