"""Backend selection, and import without (or with a stale) compiled extension."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import genkern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backends_lists_what_can_run():
    avail = genkern.backends("cpu")
    assert "reference" in avail and all(v == "available" for v in avail.values())
    full = genkern.backends("cpu", include_unavailable=True)
    assert set(full) == {"cuda", "triton", "cpu", "reference"}
    assert full["cuda"].startswith("unavailable: ")
    if genkern._extension.LOADED:
        assert list(avail)[0] == "cpu", "the compiled CPU kernels are the default on CPU"


def test_default_backend_is_the_fastest_available():
    expected = "cpu" if genkern._extension.LOADED else "reference"
    assert genkern._backend.select("cpu") == expected


def test_use_backend_context_manager_and_global_setter():
    assert genkern.current_backend() is None
    with genkern.use_backend("reference"):
        assert genkern.current_backend() == "reference"
        with genkern.use_backend("triton"):
            assert genkern.current_backend() == "triton"
        assert genkern.current_backend() == "reference"
    assert genkern.current_backend() is None
    genkern.use_backend("reference")
    try:
        assert genkern.current_backend() == "reference"
    finally:
        genkern.use_backend(None)
    assert genkern.current_backend() is None


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        genkern.use_backend("tpu")


def test_forced_backend_that_cannot_run_says_why():
    x = torch.randn(2, 4, 3, 3)
    with genkern.use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' was requested but cannot run"):
        genkern.group_norm_silu(x, 2)


def _python(code, env_extra, cwd):
    env = dict(os.environ, **env_extra)
    env.pop("GENKERN_BACKEND", None)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_env_var_selects_backend(tmp_path):
    r = _python("import genkern; print(genkern.current_backend())", {"GENKERN_BACKEND": "reference"}, ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"


CHECK_FALLBACK = """
import sys, warnings, torch, torch.nn.functional as F
# an editable install's finder would find genkern._C in the checkout, beside our copy: drop it
sys.meta_path = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import genkern
msgs = [str(m.message) for m in w if "genkern" in str(m.message)]
print(len(msgs)); print(msgs[0] if msgs else "")
x = -2.3 + 0.5 * torch.randn(2, 8, 4, 4)
assert list(genkern.backends("cpu"))[0] == "reference"
assert torch.allclose(genkern.group_norm_silu(x, 4), F.silu(F.group_norm(x, 4)), atol=1e-5)
print("ok")
"""


def _copy_package(tmp_path, keep_extension):
    dst = tmp_path / "genkern"
    shutil.copytree(os.path.join(ROOT, "genkern"), dst,
                    ignore=shutil.ignore_patterns("__pycache__", *([] if keep_extension else ["_C*.so", "_C*.pyd"])))
    return dst


def test_import_without_extension_falls_back_with_one_warning(tmp_path):
    _copy_package(tmp_path, keep_extension=False)
    r = _python(CHECK_FALLBACK, {"PYTHONPATH": str(tmp_path)}, str(tmp_path))
    assert r.returncode == 0, r.stderr
    count, msg, ok = r.stdout.strip().splitlines()
    assert count == "1" and "not built" in msg and "--no-build-isolation" in msg and ok == "ok"


def test_extension_built_for_another_torch_is_reported_as_such(tmp_path):
    dst = _copy_package(tmp_path, keep_extension=True)
    info_path = dst / "_build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["torch"] = "1.0.0"
    info_path.write_text(json.dumps(info))
    r = _python(CHECK_FALLBACK, {"PYTHONPATH": str(tmp_path)}, str(tmp_path))
    assert r.returncode == 0, r.stderr
    count, msg, ok = r.stdout.strip().splitlines()
    assert count == "1" and "built against torch 1.0.0" in msg and torch.__version__ in msg


def test_extension_built_for_a_cpu_feature_this_cpu_lacks_is_not_loaded(tmp_path):
    # loading it would end the process with SIGILL at the first vector instruction
    dst = _copy_package(tmp_path, keep_extension=True)
    info_path = dst / "_build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.update(cpu_isa="avx512", cpu_isa_flags=["avx512f", "no_such_cpu_flag"])
    info_path.write_text(json.dumps(info))
    r = _python(CHECK_FALLBACK, {"PYTHONPATH": str(tmp_path)}, str(tmp_path))
    assert r.returncode == 0, r.stderr
    count, msg, ok = r.stdout.strip().splitlines()
    assert count == "1" and "built for avx512" in msg and "no_such_cpu_flag" in msg and "GENKERN_CPU_ISA" in msg
    assert ok == "ok"
