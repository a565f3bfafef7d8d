"""Float64 gradient checks of the whole network: central differences on small nets, random directions on
larger ones. Never finite-difference in float32. ReLU inputs are nudged away from 0 by the data scale."""
import numpy as np
import pytest

from core import FeedForwardNetwork
from tests.conftest import backend_param

CPU_BACKENDS = [backend_param("numpy"), backend_param("numba")]


def data(rng, m, d0, classes):
    return rng.standard_normal((m, d0)), rng.integers(0, classes, m)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layers", [[3, 2], [4, 5, 3], [5, 6, 4, 3]])
def test_central_differences_every_parameter(backend, layers):
    rng = np.random.default_rng(11)
    net = FeedForwardNetwork(layers, backend=backend, dtype="float64")
    w = net.init_params(seed=1) + rng.standard_normal(net.num_params) * 0.1  # biases non-zero too
    X, y = data(rng, 9, layers[0], layers[-1])
    loss, grad = net.loss_and_grad(w, X, y)
    eps = 1e-6
    numeric = np.empty_like(w)
    for i in range(net.num_params):
        e = np.zeros_like(w)
        e[i] = eps
        numeric[i] = (net.loss_and_grad(w + e, X, y)[0] - net.loss_and_grad(w - e, X, y)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)
    assert np.isfinite(loss) and loss > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layers,m", [([64, 100, 10], 128), ([6, 50, 200, 50, 100], 256)])
def test_random_direction(backend, layers, m):
    rng = np.random.default_rng(12)
    net = FeedForwardNetwork(layers, backend=backend, dtype="float64")
    w = net.init_params(seed=2)
    X, y = data(rng, m, layers[0], layers[-1])
    _, grad = net.loss_and_grad(w, X, y)
    for _ in range(3):
        d = rng.standard_normal(net.num_params)
        d /= np.linalg.norm(d)
        eps = 1e-5
        numeric = (net.loss_and_grad(w + eps * d, X, y)[0] - net.loss_and_grad(w - eps * d, X, y)[0]) / (2 * eps)
        assert grad @ d == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_gradient_is_mean_over_rows():
    """loss/grad of a batch equal the row-weighted mean of its halves' (the PS sums pushes by batch size)."""
    rng = np.random.default_rng(13)
    net = FeedForwardNetwork([8, 7, 4], backend="numpy", dtype="float64")
    w = net.init_params(3)
    X, y = data(rng, 30, 8, 4)
    loss, grad = net.loss_and_grad(w, X, y)
    l1, g1 = net.loss_and_grad(w, X[:10], y[:10])
    l2, g2 = net.loss_and_grad(w, X[10:], y[10:])
    assert loss == pytest.approx((10 * l1 + 20 * l2) / 30, rel=1e-12)
    np.testing.assert_allclose(grad, (10 * g1 + 20 * g2) / 30, rtol=1e-10, atol=1e-14)
