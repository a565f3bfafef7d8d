"""Backend selection (names, env var, auto, explicit-unavailable errors), import hygiene, and interface
conformance: every backend method keeps the reference signature (checked from source for cupy, so CPU-only
CI verifies the GPU backend's interface too)."""
import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import BackendUnavailable, available_backends, get_backend, resolve_backend_name
from core.backends import cupy_problem
from core.backends.numpy_ops import NumpyOps

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_OPS = [n for n, f in vars(NumpyOps).items() if callable(f) and not n.startswith("_")]


def test_names_resolve(monkeypatch):
    monkeypatch.delenv("FFPS_BACKEND", raising=False)
    assert resolve_backend_name("numpy") == "numpy"
    assert resolve_backend_name(" NUMBA ") == "numba"
    assert resolve_backend_name("auto") == ("cupy" if cupy_problem() is None else "numba")
    assert resolve_backend_name(None) == resolve_backend_name("auto")
    assert get_backend("numpy").name == "numpy" and get_backend("numba").name == "numba"
    assert get_backend("numba") is get_backend("numba")  # one instance (kernel caches) per process


def test_environment_variable_selects(monkeypatch):
    monkeypatch.setenv("FFPS_BACKEND", "numpy")
    assert get_backend().name == "numpy"
    monkeypatch.setenv("FFPS_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"unknown backend 'cuda' \(from \$FFPS_BACKEND\); choose one of auto, cupy"):
        get_backend()


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown backend 'torch'; choose one of auto, cupy, numba, numpy"):
        get_backend("torch")


@pytest.mark.skipif(cupy_problem() is None, reason="cupy works here: nothing to refuse")
def test_explicit_cupy_without_gpu_is_an_error_not_a_fallback():
    with pytest.raises(BackendUnavailable, match="backend 'cupy' requested but cupy") as info:
        get_backend("cupy")
    assert "pip install" in str(info.value) or "CUDA" in str(info.value)


def test_available_lists_reference_first():
    names = available_backends()
    assert names[0] == "numpy" and "numba" in names


def test_import_compiles_nothing_and_loads_no_accelerator():
    code = ("import sys, core, core.backends, core.network, core.trainer, core.cli;"
            "bad = [m for m in ('numba', 'cupy', 'pyspark') if m in sys.modules];"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_no_cupy_or_numba_import_outside_backends():
    offenders = []
    for path in list((ROOT / "core").rglob("*.py")) + list((ROOT / "ps").rglob("*.py")) + \
            list((ROOT / "spark").rglob("*.py")):
        if "backends" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("cupy", "numba") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def _signature_from_source(path: Path, class_name: str) -> dict:
    """Method name -> list of (arg name, has default) for a class, read with ast (no import needed)."""
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    out = {}
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef):
            args = [a.arg for a in fn.args.args]
            n_defaults = len(fn.args.defaults)
            out[fn.name] = [(a, i >= len(args) - n_defaults) for i, a in enumerate(args)]
    return out


def _reference_signature(name):
    sig = inspect.signature(getattr(NumpyOps, name))
    return [(p.name, p.default is not inspect.Parameter.empty) for p in sig.parameters.values()]


@pytest.mark.parametrize("module,class_name", [("numba_ops.py", "NumbaOps"), ("cupy_ops.py", "CupyOps")])
def test_backend_methods_keep_reference_signatures(module, class_name):
    methods = _signature_from_source(ROOT / "core" / "backends" / module, class_name)
    overridden = [m for m in methods if m in PUBLIC_OPS]
    assert len(overridden) >= 8, f"{class_name} overrides suspiciously few ops: {overridden}"
    for name in overridden:
        assert methods[name] == _reference_signature(name), f"{class_name}.{name} signature differs"
    extra_public = [m for m in methods if not m.startswith("_") and m not in PUBLIC_OPS]
    assert extra_public == [], f"{class_name} adds public ops the reference lacks: {extra_public}"


@pytest.mark.parametrize("name", available_backends())
def test_loaded_backends_match_reference_signatures(name):
    ops = get_backend(name)
    for op in PUBLIC_OPS:
        got = inspect.signature(getattr(type(ops), op))
        assert got == inspect.signature(getattr(NumpyOps, op)), f"{name}.{op}"


def test_overrides_return_their_results():
    """An override that forgets `return` would hand back None: call each through the numba backend."""
    import numpy as np

    ops = get_backend("numba")
    y = np.ones((4, 3), np.float32)
    b = np.ones(3, np.float32)
    assert ops.bias_add(y.copy(), b) is not None and ops.bias_relu(y.copy(), b) is not None
    assert ops.relu_backward(y.copy(), y) is not None
    assert ops.bias_grad(y, np.empty(3, np.float32)) is not None
    assert ops.relu_backward_bias_grad(y.copy(), y, np.empty(3, np.float32)) is not None
    assert ops.softmax(y) is not None and ops.softmax_nll_backward(y, np.zeros(4, np.int32), 0.25, y.copy()) is not None
    assert ops.sgd_update(b.copy(), b, 0.1) is not None
    assert ops.momentum_update(b.copy(), b.copy(), b, 0.1, 0.9) is not None
    assert ops.relu(y) is not None and ops.gemm(y, y.T) is not None


def test_limit_cpu_threads_caps_blas_and_numba():
    code = ("import core, numba, numpy;"
            "from threadpoolctl import threadpool_info;"
            "core.get_backend('numba'); core.limit_cpu_threads(1);"
            "print(sorted({i['num_threads'] for i in threadpool_info()}), numba.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[1]", "1"]


def test_a_cap_set_before_numba_loads_holds_and_numpy_workers_never_load_it():
    """limit_cpu_threads imported numba wherever it was installed: a numpy worker under a small
    spark.executor.pyspark.memory failed in that import. numba now loads with the backend, under the cap."""
    code = ("import sys, core; core.limit_cpu_threads(1); core.get_backend('numpy');"
            "print('numba' in sys.modules); core.get_backend('numba'); import numba; print(numba.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NUMBA_NUM_THREADS": "2"})      # a pool of 2 on any machine
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "1"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_limit_cpu_threads_rejects_bad_counts(bad):
    from core import limit_cpu_threads

    with pytest.raises(ValueError, match="thread count must be an integer >= 1"):
        limit_cpu_threads(bad)
