"""Shared test setup: which backends run here, the per-dtype tolerances, the gpu marker's skip, and the
one_spark_line marker's deselection."""
import os

import numpy as np
import pytest

from core.backends import available_backends, cupy_problem

# Backends exercised by parity tests: what this machine can run, plus cupy (skipped, marked gpu) where absent.
BACKENDS = ["numpy", "numba", "cupy"]
DTYPES = ["float32", "float64"]
# Tolerances against the float64 NumPy reference, kept in one place: (rtol, atol) per dtype.
TOLERANCES = {"float32": (2e-4, 2e-5), "float64": (1e-10, 1e-12)}


# Reduced-precision GEMMs (FeedForwardNetwork(precision=...)) against the float64 reference, in one place:
# relative error of the mean loss and relative norm of the gradient's error, float32 weights. Measured on the
# digits, seed and [784,256,10] nets with the NumPy emulation (2026-12): loss 3e-9 / 7e-6 / 1.6e-4, gradient
# 2.6e-7 / 1.2e-2 / 2.8e-2 (ReLU masks that flip with the rounding dominate); the bounds leave ~3x room for
# the GPU's own rounding and summation order.
PRECISION_TOLERANCES = {"fp32": {"loss": 1e-6, "grad": 2e-5},
                        "tf32": {"loss": 1e-4, "grad": 4e-2},
                        "bf16": {"loss": 1e-3, "grad": 1e-1}}


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


# Set by ./dev test for the Spark 3.5 line when the Spark 4 line runs after it: the one_spark_line tests start
# a Spark application of their own (tens of seconds each, the same code path on both lines) and run there once.
ONE_LINE_ENV = "FFPS_ONE_SPARK_LINE_TESTS_ELSEWHERE"


def pytest_collection_modifyitems(config, items):
    if os.environ.get(ONE_LINE_ENV) != "1":
        return
    elsewhere = [item for item in items if item.get_closest_marker("one_spark_line")]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if item not in elsewhere]
