"""Shared test setup: which backends run here, the per-dtype tolerances, and the gpu marker's skip."""
import numpy as np
import pytest

from core.backends import available_backends, cupy_problem

# Backends exercised by parity tests: what this machine can run, plus cupy (skipped, marked gpu) where absent.
BACKENDS = ["numpy", "numba", "cupy"]
DTYPES = ["float32", "float64"]
# Tolerances against the float64 NumPy reference, kept in one place: (rtol, atol) per dtype.
TOLERANCES = {"float32": (2e-4, 2e-5), "float64": (1e-10, 1e-12)}


def tolerance(dtype):
    return TOLERANCES[np.dtype(dtype).name]


def backend_param(name):
    """pytest.param for a backend: cupy carries the gpu mark and skips cleanly without a usable GPU."""
    marks = []
    if name == "cupy":
        marks.append(pytest.mark.gpu)
    if name not in available_backends():
        reason = cupy_problem() if name == "cupy" else f"{name} not available"
        marks.append(pytest.mark.skip(reason=reason))
    return pytest.param(name, marks=marks, id=name)


BACKEND_PARAMS = [backend_param(b) for b in BACKENDS]


@pytest.fixture(scope="session")
def digits_split():
    """scikit-learn's digits (real data), scaled to [0, 1], 70/30 stratified split with seed 0."""
    from core.datasets import load_digits_split

    return load_digits_split(seed=0)
