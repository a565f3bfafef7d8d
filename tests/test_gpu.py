"""CuPy-specific checks (marker gpu): skipped cleanly without a usable GPU, real on the device machine.
Parity, gradients-vs-reference and digits on cupy run through the backend-parametrized modules."""
import numpy as np
import pytest

from core import FeedForwardNetwork, get_backend, resolve_backend_name
from core.backends import cupy_problem
from core.backends.numpy_ops import NumpyOps

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(cupy_problem() is not None, reason=str(cupy_problem()))]


def test_auto_prefers_cupy_when_a_gpu_is_usable(monkeypatch):
    monkeypatch.delenv("FFPS_BACKEND", raising=False)
    assert resolve_backend_name("auto") == "cupy"


def test_device_ordinal_is_used():
    import cupy

    ops = get_backend("cupy", device=0)
    assert ops.device_id == 0
    x = ops.asarray(np.ones(3))
    assert isinstance(x, cupy.ndarray) and x.device.id == 0


def test_softmax_kernel_grid_stride_wraps():
    """More rows than MAX_BLOCKS * ROWS_PER_BLOCK: the row loop must wrap, every row written."""
    ops = get_backend("cupy")
    m = ops.MAX_BLOCKS * ops.ROWS_PER_BLOCK + 12345
    rng = np.random.default_rng(0)
    z = rng.standard_normal((m, 3)).astype(np.float32)
    labels = rng.integers(0, 3, m).astype(np.int32)
    out = ops.asarray(np.full((m, 3), np.nan, np.float32))
    loss, correct = ops.softmax_nll_grad(ops.asarray(z), ops.asarray(labels), 1.0 / m, out)
    ref = NumpyOps()
    want_loss, want_correct = ref.softmax_nll(z.astype(np.float64), labels)
    assert loss == pytest.approx(want_loss, rel=1e-5) and correct == want_correct
    got = ops.to_host(out)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref.softmax_nll_backward(z.astype(np.float64), labels, 1.0 / m,
                                                             np.empty((m, 3))), rtol=1e-4, atol=1e-12)


def test_wide_classes_row_longer_than_a_warp():
    ops = get_backend("cupy")
    rng = np.random.default_rng(1)
    z = rng.standard_normal((37, 1000)) * 5
    labels = rng.integers(0, 1000, 37).astype(np.int32)
    ref = NumpyOps()
    want = ref.softmax_nll(z, labels)
    got = ops.softmax_nll(ops.asarray(z), ops.asarray(labels))
    assert got[0] == pytest.approx(want[0], rel=1e-10) and got[1] == want[1]


def test_gpu_gradient_matches_float64_reference_on_mnist_shape():
    rng = np.random.default_rng(2)
    ref = FeedForwardNetwork([784, 256, 10], backend="numpy", dtype="float64")
    net = FeedForwardNetwork([784, 256, 10], backend="cupy")
    w = ref.init_params(0)
    X, y = rng.random((512, 784)), rng.integers(0, 10, 512)
    l0, g0 = ref.loss_and_grad(w, X, y)
    l1, g1 = net.loss_and_grad(w, X, y)
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert np.linalg.norm(g1 - g0) / np.linalg.norm(g0) < 1e-5
