"""What a GPU lease would otherwise compile first, built ahead on a CPU machine against the GPU machine's
torch and Triton: genkern._C for sm_90, the kernel candidates' library, and Triton's cache of every
genkern Triton kernel's sm_90 cubins. `make gpu-env-check` saves them into .gpu-prebuilt/ (ignored by
git); a lease carries the folder (the device tool's `carry: [".gpu-prebuilt"]`) and scripts/gpu_check.sh
takes from it what still matches the tree, building the rest as before.

    python scripts/gpu_prebuilt.py save DEST --tree T --triton-cache C --candidates-lib L
    python scripts/gpu_prebuilt.py use SRC [--install-extension]    # prints shell exports; see gpu_check.sh

Why: a lease is 15 minutes of device time, its machine's start included, and the build stage took ~80 s
of it, the Triton JIT more inside the tests and the bench; every second saved there goes to the bench.
Each piece is taken only where it can be the same as a build there: the same torch version (the C++
ABI), the GPU's architecture among those built for, the same sources (a hash of everything its build
reads), and for _C a library that loads. Triton
checks its own cache: an entry's key hashes Triton's sources and libtriton, ptxas's version, the
kernel's source and specialisation and the options (libdevice by content), nothing of the machine, so a
different Triton there only misses. Its index files name their entries by absolute path, which `use`
rewrites for the folder's new place.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what each build reads, relative to the tree's root: the files under these paths with these suffixes
# (run.py: the candidates' compiler flags; not their README)
EXTENSION_INPUTS = ["setup.py", "pyproject.toml", "csrc"]
CANDIDATE_INPUTS = ["csrc", "scripts/gpu_candidates"]
SOURCE_SUFFIXES = (".py", ".toml", ".cpp", ".cu", ".cuh", ".h")


def sources_hash(tree: str, inputs: list[str]) -> str:
    """sha256 over the relative paths and contents of the source files under `inputs`."""
    files = []
    for entry in inputs:
        path = os.path.join(tree, entry)
        if os.path.isfile(path):
            files.append(entry)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            files += [os.path.relpath(os.path.join(dirpath, f), tree) for f in filenames
                      if f.endswith(SOURCE_SUFFIXES)]
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(tree, rel), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def save(dest: str, tree: str, triton_cache: str, candidates_lib: str) -> None:
    import torch
    import triton

    tmp = dest.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "genkern"))
    for f in glob.glob(os.path.join(tree, "genkern", "_C*.so")) + [os.path.join(tree, "genkern", "_build_info.json")]:
        shutil.copy2(f, os.path.join(tmp, "genkern"))
    if candidates_lib:
        os.makedirs(os.path.join(tmp, "candidates"))
        shutil.copy2(candidates_lib, os.path.join(tmp, "candidates", "genkern_candidates.so"))
    # the host code's debug info is two thirds of _C (29 -> 10 MB) and a lease's tree may carry 64 MiB;
    # the kernels (.nv_fatbin, -lineinfo included) are not debug sections
    strip = shutil.which("strip")
    for lib in glob.glob(os.path.join(tmp, "*", "*.so")) if strip else []:
        # where it fails the library stays as it was, only larger
        subprocess.run([strip, "--strip-debug", lib], check=False, capture_output=True)
    # only what a cache hit reads: the index files, the metadata and the cubins (not the IRs and PTX)
    kept = 0
    for entry in sorted(os.listdir(triton_cache)):
        src = os.path.join(triton_cache, entry)
        if not os.path.isdir(src):
            continue
        os.makedirs(os.path.join(tmp, "triton", entry))
        for name in os.listdir(src):
            if name.startswith("__grp__") or name.endswith((".json", ".cubin")):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, "triton", entry, name))
        kept += 1
    manifest = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "extension_sources": sources_hash(tree, EXTENSION_INPUTS),
        "candidate_sources": sources_hash(tree, CANDIDATE_INPUTS) if candidates_lib else None,
        "triton_entries": kept,
    }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dest) for f in fs)
    print(f"gpu-prebuilt: saved {dest} ({size / 2**20:.1f} MiB: genkern._C, "
          f"{'the candidates, ' if candidates_lib else ''}{kept} Triton cache entries)")


def _rewrite_triton_index(cache: str) -> int:
    """Point the cache's index files (__grp__*.json, absolute paths) at the cache's new place."""
    n = 0
    for grp in glob.glob(os.path.join(cache, "*", "__grp__*.json")):
        with open(grp) as f:
            data = json.load(f)
        # the cubins' and metadata's own entries, in the folder the index lies in; the IRs were not kept
        here = {name: os.path.join(os.path.dirname(grp), os.path.basename(p))
                for name, p in data.get("child_paths", {}).items()}
        data["child_paths"] = {name: p for name, p in here.items() if os.path.exists(p)}
        with open(grp, "w") as f:
            json.dump(data, f)
        n += 1
    return n


def use(src: str, install_extension: bool, tree: str = ROOT) -> int:
    """Take what matches: print `export ...` lines for the shell (the Triton cache, the candidates'
    library), reasons to stderr; with install_extension, copy genkern._C into the tree when it matches.
    Exit 0 when genkern._C was taken (the build stage may skip its build), 1 otherwise."""
    import torch

    def say(msg: str) -> None:
        print(f"gpu-prebuilt: {msg}", file=sys.stderr)

    try:
        with open(os.path.join(src, "manifest.json")) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        say(f"none usable ({e})")
        return 1
    exports = []
    cache = os.path.join(src, "triton")
    if os.path.isdir(cache):
        n = _rewrite_triton_index(cache)
        exports.append(f"export TRITON_CACHE_DIR={shlex.quote(os.path.abspath(cache))}")
        say(f"Triton cache of {n} kernel specialisations (built with Triton {m.get('triton')}; misses compile as usual)")
    took_extension = False
    archs = [a.replace("+PTX", "") for a in (m.get("cuda_arch_list") or "").replace(",", ";").split(";")]
    here = "{}.{}".format(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    if m.get("torch") != torch.__version__:
        say(f"built against torch {m.get('torch')}, this is {torch.__version__}: building here")
    elif here is not None and here not in archs:
        say(f"built for sm {m.get('cuda_arch_list')}, this GPU is {here}: building here")
    else:
        lib = os.path.join(src, "candidates", "genkern_candidates.so")
        if os.path.isfile(lib) and m.get("candidate_sources") == sources_hash(tree, CANDIDATE_INPUTS):
            exports.append(f"export GENKERN_CANDIDATES_LIB={shlex.quote(os.path.abspath(lib))}")
            say("candidates' library taken")
        elif os.path.isfile(lib):
            say("candidates' sources changed since the prebuild: they build as usual")
        if install_extension and m.get("extension_sources") != sources_hash(tree, EXTENSION_INPUTS):
            say("genkern._C's sources changed since the prebuild: building here")
        elif install_extension:
            for f in glob.glob(os.path.join(src, "genkern", "*")):
                shutil.copy2(f, os.path.join(tree, "genkern"))
            took_extension = True
            say(f"genkern._C taken (torch {m['torch']}, arch {m.get('cuda_arch_list')})")
    print("\n".join(exports))
    return 0 if took_extension else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("dest")
    s.add_argument("--tree", required=True, help="the built copy of the tree")
    s.add_argument("--triton-cache", required=True)
    s.add_argument("--candidates-lib", default="")
    u = sub.add_parser("use")
    u.add_argument("src")
    u.add_argument("--install-extension", action="store_true", help="copy genkern._C into the tree if it matches")
    a = p.parse_args()
    if a.cmd == "save":
        save(a.dest, a.tree, a.triton_cache, a.candidates_lib)
        return 0
    return use(a.src, a.install_extension)


if __name__ == "__main__":
    sys.exit(main())
