"""Backend selection. The only place that probes for the optional accelerators (cupy, numba).

``get_backend("auto" | "cupy" | "numba" | "numpy")``; ``None`` reads the ``FFPS_BACKEND`` environment variable
and defaults to ``auto``. Auto picks CuPy when a CUDA device is usable, else Numba, else NumPy. An explicit
choice that cannot load raises :class:`BackendUnavailable` saying what is missing: never a silent fallback.
Importing this module imports neither cupy nor numba and compiles nothing.
"""
from __future__ import annotations

import functools
import importlib.util
import os

from .numpy_ops import NumpyOps
from .threads import blas_threads, limit_cpu_threads

BACKEND_NAMES = ("auto", "cupy", "numba", "numpy")
ENV_VAR = "FFPS_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run on this machine."""


@functools.lru_cache(maxsize=None)
def cupy_problem() -> str | None:
    """None when CuPy can run kernels here; otherwise a sentence saying what is missing."""
    if importlib.util.find_spec("cupy") is None:
        return ("cupy is not installed; install the GPU extra: pip install 'ffps[gpu]' "
                "(cupy-cuda12x; use cupy-cuda13x for CUDA 13)")
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver/runtime missing or broken: cupy raises several types
        return f"cupy is installed but CUDA is unusable ({type(exc).__name__}: {exc})"
    if count < 1:
        return "cupy is installed but no CUDA device is visible (check CUDA_VISIBLE_DEVICES)"
    return None


@functools.lru_cache(maxsize=None)
def numba_problem() -> str | None:
    """None when Numba is importable; otherwise a sentence saying what is missing."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed: pip install numba"
    try:
        import numba  # noqa: F401
    except Exception as exc:
        return f"numba failed to import ({type(exc).__name__}: {exc})"
    return None


def has_cupy_gpu() -> bool:
    return cupy_problem() is None


def available_backends() -> list[str]:
    """Concrete backends that can run here, reference first."""
    names = ["numpy"]
    if numba_problem() is None:
        names.append("numba")
    if cupy_problem() is None:
        names.append("cupy")
    return names


def resolve_backend_name(name: str | None = None) -> str:
    """Turn 'auto'/None/env into a concrete backend name, or raise for an unknown name."""
    if name is None:
        name = os.environ.get(ENV_VAR, "") or "auto"
    key = str(name).strip().lower()
    if key not in BACKEND_NAMES:
        source = f" (from ${ENV_VAR})" if name == os.environ.get(ENV_VAR) else ""
        raise ValueError(f"unknown backend {name!r}{source}; choose one of {', '.join(BACKEND_NAMES)}")
    if key == "auto":
        return "cupy" if has_cupy_gpu() else cpu_backend_name()
    return key


def cpu_backend_name() -> str:
    """The CPU backend 'auto' takes: numba where it loads, else the NumPy reference."""
    return "numba" if numba_problem() is None else "numpy"


@functools.lru_cache(maxsize=None)
def host_ops() -> NumpyOps:
    """Ops for float32 host vectors in a process whose cores belong to its trainers (the parameter server):
    numba's serial kernels where numba loads (an update in one fused pass), else the NumPy reference."""
    if numba_problem() is None:
        from .numba_ops import NumbaOps

        return NumbaOps(fuse_step=False, parallel=False)
    return NumpyOps()


_instances: dict[tuple, NumpyOps] = {}


def get_backend(name: str | None = None, device: int | None = None) -> NumpyOps:
    """Return the ops object for ``name``; ``device`` is the CUDA ordinal for cupy (default: current)."""
    key = resolve_backend_name(name)
    cache_key = (key, device if key == "cupy" else None)
    if cache_key in _instances:
        return _instances[cache_key]
    if key == "numpy":
        ops = NumpyOps()
    elif key == "numba":
        problem = numba_problem()
        if problem:
            raise BackendUnavailable(f"backend 'numba' requested but {problem}")
        from .numba_ops import NumbaOps

        ops = NumbaOps()
    else:
        problem = cupy_problem()
        if problem:
            raise BackendUnavailable(f"backend 'cupy' requested but {problem}")
        from .cupy_ops import CupyOps

        ops = CupyOps(device=device)
    _instances[cache_key] = ops
    return ops


__all__ = ["BACKEND_NAMES", "ENV_VAR", "BackendUnavailable", "NumpyOps", "available_backends",
           "blas_threads", "get_backend", "has_cupy_gpu", "host_ops", "limit_cpu_threads", "resolve_backend_name",
           "cupy_problem", "numba_problem"]
