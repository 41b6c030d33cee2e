"""scripts/gpu_prebuilt.py: what a GPU lease takes from the prebuilt folder and what it builds again.

On a temporary tree with stand-in libraries (files whose bytes are checked, not loaded): a prebuilt
piece is taken only when torch and the hash of its sources match, and the Triton cache's index files
are pointed at the cache's new place."""
import json
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import gpu_prebuilt  # noqa: E402


def make_tree(root):
    """A tree with the files the two builds read, a stand-in _C and a Triton cache entry whose index
    names its files by absolute path, as Triton writes it."""
    for rel, text in [("setup.py", "setup()\n"), ("pyproject.toml", "[project]\n"), ("csrc/ops.cpp", "int f();\n"),
                      ("csrc/cuda/k.cu", "__global__ void k() {}\n"), ("scripts/gpu_candidates/c.cu", "// c\n"),
                      ("scripts/gpu_candidates/README.md", "notes\n"), ("genkern/_C.so", "library bytes"),
                      ("genkern/_build_info.json", json.dumps({"torch": torch.__version__}))]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    lib = root / "candidates.so"
    lib.write_text("candidate bytes")
    entry = root / ".triton" / "ABC123"
    entry.mkdir(parents=True)
    for name in ("k.cubin", "k.json", "k.ptx"):
        (entry / name).write_text(name)
    (entry / "__grp__k.json").write_text(json.dumps({"child_paths": {n: str(entry / n) for n in
                                                                     ("k.cubin", "k.json", "k.ptx")}}))
    return lib


@pytest.fixture
def prebuilt(tmp_path):
    built = tmp_path / "built"
    lib = make_tree(built)
    dest = tmp_path / "prebuilt"
    gpu_prebuilt.save(str(dest), str(built), str(built / ".triton"), str(lib))
    # the lease's tree: the same sources, no library yet
    lease = tmp_path / "lease"
    shutil.copytree(built, lease, ignore=shutil.ignore_patterns("_C.so", "_build_info.json", ".triton"))
    return dest, lease


def test_saved_folder_holds_what_a_cache_hit_reads(prebuilt):
    dest, _ = prebuilt
    m = json.loads((dest / "manifest.json").read_text())
    assert m["torch"] == torch.__version__ and m["triton_entries"] == 1
    assert (dest / "genkern" / "_C.so").read_text() == "library bytes"
    assert (dest / "candidates" / "genkern_candidates.so").read_text() == "candidate bytes"
    assert sorted(os.listdir(dest / "triton" / "ABC123")) == ["__grp__k.json", "k.cubin", "k.json"]  # no IR
    assert not os.path.exists(str(dest) + ".tmp")


def test_matching_tree_takes_everything(prebuilt, capsys):
    dest, lease = prebuilt
    assert gpu_prebuilt.use(str(dest), True, str(lease)) == 0
    assert (lease / "genkern" / "_C.so").read_text() == "library bytes"
    exports = dict(line.removeprefix("export ").split("=", 1) for line in capsys.readouterr().out.split("\n") if line)
    assert exports["TRITON_CACHE_DIR"] == str(dest / "triton")
    assert exports["GENKERN_CANDIDATES_LIB"] == str(dest / "candidates" / "genkern_candidates.so")
    grp = json.loads((dest / "triton" / "ABC123" / "__grp__k.json").read_text())["child_paths"]
    # the index now names the files where they lie, and only those that were kept
    assert grp == {n: str(dest / "triton" / "ABC123" / n) for n in ("k.cubin", "k.json")}


def test_without_install_the_library_stays_put(prebuilt):
    dest, lease = prebuilt
    assert gpu_prebuilt.use(str(dest), False, str(lease)) == 1
    assert not (lease / "genkern" / "_C.so").exists()


@pytest.mark.parametrize("changed,takes_extension,takes_candidates", [
    ("csrc/cuda/k.cu", False, False),
    ("setup.py", False, True),
    ("scripts/gpu_candidates/c.cu", True, False),
    ("scripts/gpu_candidates/README.md", True, True),  # not a source: the builds do not read it
])
def test_changed_sources_are_built_again(prebuilt, capsys, changed, takes_extension, takes_candidates):
    dest, lease = prebuilt
    with open(lease / changed, "a") as f:
        f.write("// edited\n")
    assert gpu_prebuilt.use(str(dest), True, str(lease)) == (0 if takes_extension else 1)
    assert (lease / "genkern" / "_C.so").exists() == takes_extension
    assert ("GENKERN_CANDIDATES_LIB" in capsys.readouterr().out) == takes_candidates


def test_other_torch_builds_everything_again(prebuilt, capsys):
    dest, lease = prebuilt
    m = json.loads((dest / "manifest.json").read_text())
    m["torch"] = "0.0.1+other"
    (dest / "manifest.json").write_text(json.dumps(m))
    assert gpu_prebuilt.use(str(dest), True, str(lease)) == 1
    captured = capsys.readouterr()
    assert not (lease / "genkern" / "_C.so").exists()
    assert "GENKERN_CANDIDATES_LIB" not in captured.out and "TRITON_CACHE_DIR" in captured.out
    assert "built against torch 0.0.1+other" in captured.err


def test_missing_folder_takes_nothing(tmp_path, capsys):
    assert gpu_prebuilt.use(str(tmp_path / "absent"), True, str(tmp_path)) == 1
    assert capsys.readouterr().out == ""
