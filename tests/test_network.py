"""FeedForwardNetwork: flat layout, init, whole-network parity per backend, batch invariance, stability,
device-resident data, and every bad-input error."""
import numpy as np
import pytest

from core import DeviceData, FeedForwardNetwork, param_layout
from core.backends.numpy_ops import NumpyOps
from tests.conftest import BACKEND_PARAMS, DTYPES, tolerance

LAYERS = [6, 50, 200, 50, 10]


def test_flat_layout_matches_design():
    """W_i row-major (d_i x d_{i+1}) then b_i, layer after layer; num_params = sum(d_i*d_{i+1} + d_{i+1})."""
    net = FeedForwardNetwork([3, 4, 2], backend="numpy")
    assert net.num_params == 3 * 4 + 4 + 4 * 2 + 2
    flat = np.arange(net.num_params, dtype=np.float32)
    (W0, b0), (W1, b1) = net.unflatten(flat)
    np.testing.assert_array_equal(W0, np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(b0, [12, 13, 14, 15])
    np.testing.assert_array_equal(W1, np.arange(16, 24).reshape(4, 2))
    np.testing.assert_array_equal(b1, [24, 25])
    assert W0.base is flat and b1.base is flat  # views, not copies
    assert [(s.w_start, s.b_start, s.end) for s in param_layout([3, 4, 2])] == [(0, 12, 16), (16, 24, 26)]


def test_forward_matches_explicit_formula():
    rng = np.random.default_rng(0)
    net = FeedForwardNetwork([5, 7, 3], backend="numpy", dtype="float64")
    w = rng.standard_normal(net.num_params)
    X = rng.standard_normal((4, 5))
    (W0, b0), (W1, b1) = net.unflatten(w)
    z = np.maximum(X @ W0 + b0, 0) @ W1 + b1
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(net.predict_proba(w, X), p, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_init_params_same_on_every_backend(backend):
    ref = FeedForwardNetwork(LAYERS, backend="numpy").init_params(seed=5)
    w = FeedForwardNetwork(LAYERS, backend=backend).init_params(seed=5)
    np.testing.assert_array_equal(w, ref)
    assert w.dtype == np.float32 and w.shape == (ref.size,)
    net = FeedForwardNetwork(LAYERS, backend="numpy")
    (W0, b0) = net.unflatten(w)[0]
    assert np.all(b0 == 0) and abs(W0.std() - np.sqrt(2 / 6)) < 0.1
    assert not np.array_equal(w, FeedForwardNetwork(LAYERS, backend=backend).init_params(seed=6))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_init_params_drawn_in_chunks_are_one_draw_per_layer(monkeypatch, dtype):
    """init_params draws a layer's normals a chunk at a time (no whole float64 copy of a wide model): the values
    are those of one float64 draw per layer, rounded once to the network's dtype."""
    import core.network

    monkeypatch.setattr(core.network, "INIT_CHUNK", 7)            # every layer spans several chunks
    net = FeedForwardNetwork([6, 50, 20, 10], backend="numpy", dtype=dtype)
    rng = np.random.default_rng(3)
    want = np.zeros(net.num_params)
    for s in net.layout:
        want[s.w_start:s.b_start] = rng.standard_normal(s.d_in * s.d_out) * np.sqrt(2.0 / s.d_in)
    w = net.init_params(seed=3)
    assert w.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(w, want.astype(dtype))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_network_parity_with_float64_reference(backend, dtype):
    rng = np.random.default_rng(1)
    ref = FeedForwardNetwork(LAYERS, backend="numpy", dtype="float64")
    net = FeedForwardNetwork(LAYERS, backend=backend, dtype=dtype)
    w = ref.init_params(seed=1)
    X, y = rng.standard_normal((256, 6)), rng.integers(0, 10, 256)
    want_loss, want_grad, want_correct = ref.loss_grad_and_correct(w, X, y)
    loss, grad, correct = net.loss_grad_and_correct(w, X, y)
    rtol, atol = tolerance(dtype)
    assert loss == pytest.approx(want_loss, rel=rtol)
    assert correct == want_correct
    assert grad.dtype == np.dtype(dtype)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol * 10, atol=atol * np.abs(want_grad).max() * 10)
    np.testing.assert_allclose(net.predict_proba(w, X), ref.predict_proba(w, X), rtol=rtol * 10, atol=atol)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_batch_invariance(backend):
    rng = np.random.default_rng(2)
    net = FeedForwardNetwork(LAYERS, backend=backend)
    w = net.init_params(seed=3)
    X = rng.standard_normal((23, 6))
    whole = net.predict_proba(w, X)
    rows = np.vstack([net.predict_proba(w, X[i:i + 1]) for i in range(23)])
    np.testing.assert_allclose(whole, rows, rtol=1e-5, atol=1e-7)
    chunked = net.predict_proba(w, X, chunk_rows=5)
    np.testing.assert_allclose(whole, chunked, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(whole.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(net.predict(w, X), whole.argmax(axis=1))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits_stay_finite(backend, dtype):
    """Logits of magnitude 1e4: max-shifted softmax gives finite loss and gradient, no NaN, no inf."""
    net = FeedForwardNetwork([2, 3], backend=backend, dtype=dtype)
    w = np.zeros(net.num_params)
    W, b = net.unflatten(w)[0]
    W[:] = [[1e4, -1e4, 0.0], [0.0, 0.0, 1e4]]
    X = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])
    y = np.array([0, 1, 2, 1])
    loss, grad, correct = net.loss_grad_and_correct(w, X, y)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    # row 1 is 2e4 away from its label, row 2 1e4, rows 0 and 3 are right: mean loss = 3e4 / 4
    assert loss == pytest.approx(3e4 / 4, rel=1e-4)
    assert correct == 2
    P = net.predict_proba(w, X)
    assert np.all(np.isfinite(P)) and np.allclose(P.sum(axis=1), 1)


class CountingOps(NumpyOps):
    """The real reference backend, counting uploads of feature-sized arrays."""

    def __init__(self):
        self.uploads = 0

    def asarray(self, x, dtype=None):
        if np.ndim(x) == 2:
            self.uploads += 1
        return super().asarray(x, dtype)


def test_device_resident_data_is_not_uploaded_again():
    ops = CountingOps()
    net = FeedForwardNetwork([6, 8, 3], backend=ops)
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((50, 6)), rng.integers(0, 3, 50)
    data = net.upload(X, y)
    assert isinstance(data, DeviceData) and ops.uploads == 1
    w = net.init_params(0)
    first = net.loss_and_grad(w, data)
    for _ in range(5):
        again = net.loss_and_grad(w, data)
    net.predict_proba(w, data)
    net.evaluate(w, data)
    assert ops.uploads == 1
    assert first[0] == again[0]
    np.testing.assert_array_equal(first[1], net.loss_and_grad(w, X, y)[1])
    assert ops.uploads == 2  # the plain NumPy call did upload


def test_grad_written_into_preallocated_buffer():
    net = FeedForwardNetwork([6, 8, 3], backend="numpy")
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((10, 6)), rng.integers(0, 3, 10)
    out = np.full(net.num_params, np.nan, dtype=np.float32)
    loss, grad = net.loss_and_grad(net.init_params(1), X, y, out=out)
    assert grad is out and np.all(np.isfinite(out))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_device_data_of_another_network_is_refused_before_any_kernel_reads_it(backend):
    """Compiled kernels trust DeviceData: numba's read past the rows and indexed past the classes (a random
    loss, then a corrupted heap). Each entry point refuses data uploaded for other layers or another backend."""
    from core import MinibatchTrainer

    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((40, 4)).astype(np.float32), np.arange(40) % 10
    ten = FeedForwardNetwork([4, 8, 10], backend=backend).upload(X, y)          # labels up to 9
    three = FeedForwardNetwork([4, 8, 3], backend=backend)
    w3 = three.init_params(0)
    labels = r"labels up to 9, this network has 3 classes \(labels 0..2\)"
    for call in (lambda: three.loss_and_grad(w3, ten), lambda: three.evaluate(w3, ten),
                 lambda: MinibatchTrainer(three).fit(ten, epochs=1),
                 lambda: MinibatchTrainer(three).fit(X, y % 3, epochs=1, validation=ten)):
        with pytest.raises(ValueError, match=labels):
            call()
    wide = FeedForwardNetwork([6, 8, 10], backend=backend)
    width = r"float32 features of shape \(40, 4\), this network takes float32 rows of width layers\[0\] = 6"
    for call in (lambda: wide.loss_and_grad(wide.init_params(0), ten), lambda: wide.predict_proba(
            wide.init_params(0), ten), lambda: MinibatchTrainer(wide).fit(ten, epochs=1)):
        with pytest.raises(ValueError, match=width):
            call()
    with pytest.raises(ValueError, match="float32 features .* this network takes float64 rows"):
        FeedForwardNetwork([4, 8, 10], backend=backend, dtype="float64").predict_proba(np.zeros(130), ten)
    if backend != "numpy":
        with pytest.raises(ValueError, match=f"uploaded on the {three.backend_name} backend, this network runs on "
                                             f"numpy"):
            FeedForwardNetwork([4, 8, 3], backend="numpy").predict_proba(w3, three.upload(X, y % 3))
    # data of the same shape from a network with more classes is fine while its labels fit
    fits = FeedForwardNetwork([4, 8, 10], backend=backend).upload(X, y % 3)
    assert np.isfinite(three.loss_and_grad(w3, fits)[0])
    with pytest.raises(ValueError, match="validation must be \\(X_val, y_val\\) or DeviceData .* got ndarray"):
        MinibatchTrainer(three).fit(X, y % 3, epochs=1, validation=X)


def test_seeds_are_reduced_as_the_spec_reduces_them():
    """init_params(seed=-1) and MinibatchTrainer(seed=-1) failed in numpy ('expected non-negative integer');
    Spark's seeds are signed hashes. Every integer is taken modulo 2**32, as TrainingSpec takes it."""
    from core import MinibatchTrainer
    from ps.spec import TrainingSpec

    net = FeedForwardNetwork([4, 5, 3], backend="numpy")
    np.testing.assert_array_equal(net.init_params(-1), net.init_params(2**32 - 1))
    assert TrainingSpec(layers=[4, 5, 3], seed=-1).seed == 2**32 - 1
    a, b = MinibatchTrainer(net, seed=-1), MinibatchTrainer(net, seed=2**32 - 1)
    assert a.rng.integers(1 << 30) == b.rng.integers(1 << 30)
    for bad in (None, 1.5, "3", True):
        with pytest.raises(ValueError, match=f"seed must be an integer, got {bad!r}"):
            net.init_params(bad)
        with pytest.raises(ValueError, match=f"seed must be an integer, got {bad!r}"):
            TrainingSpec(seed=bad)


@pytest.mark.parametrize("chunk_rows", [0, -1, 2.5, True])
def test_chunk_rows_must_be_a_positive_integer(small, chunk_rows):
    net, w, X, y = small
    for call in (lambda: net.predict_proba(w, X, chunk_rows=chunk_rows),
                 lambda: net.evaluate(w, X, y, chunk_rows=chunk_rows)):
        with pytest.raises(ValueError, match=f"chunk_rows must be an integer >= 1, got {chunk_rows!r}"):
            call()


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("layers,match", [
    ([10], "at least two"), ([], "at least two"), ([4, 0, 3], "size 0 at position 1"),
    ([4, -2, 3], "size -2 at position 1"), ([4, 2.5, 3], "2.5 at position 1 .* not an integer"),
    ([4, 1], "number of classes"), (5, "list of layer sizes"), ([4, "a", 3], "'a' at position 1"),
    ("64,100,10", r"layers must be a list of layer sizes such as \[64, 100, 10\], got '64,100,10'"),
])
def test_bad_layers(layers, match):
    with pytest.raises(ValueError, match=match):
        FeedForwardNetwork(layers, backend="numpy")


def test_bad_dtype_and_backend():
    with pytest.raises(ValueError, match="dtype must be one of .*'float16'"):
        FeedForwardNetwork([4, 3], backend="numpy", dtype="float16")
    with pytest.raises(ValueError, match="dtype must be one of .*'bogus'"):
        FeedForwardNetwork([4, 3], backend="numpy", dtype="bogus")
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        FeedForwardNetwork([4, 3], backend="tensorflow")


@pytest.fixture
def small():
    net = FeedForwardNetwork([4, 5, 3], backend="numpy")
    rng = np.random.default_rng(6)
    return net, net.init_params(0), rng.standard_normal((6, 4)), rng.integers(0, 3, 6)


@pytest.mark.parametrize("make_X,match", [
    (lambda X: X[:, :3], "3 features per row but layers\\[0\\] is 4"),
    (lambda X: X.ravel(), "2-D array .* 1-D"),
    (lambda X: X[None], "2-D array .* 3-D"),
    (lambda X: X[:0], "no rows"),
    (lambda X: np.where(np.arange(4) == 2, np.nan, X), "non-finite value nan at row 0, column 2"),
    (lambda X: np.where(np.arange(4) == 1, np.inf, X), "non-finite value inf at row 0, column 1"),
    (lambda X: X.astype(str), "must be numeric"),
])
def test_bad_features(small, make_X, match):
    net, w, X, y = small
    with pytest.raises(ValueError, match=match):
        net.loss_and_grad(w, make_X(X), y)


@pytest.mark.parametrize("make_y,match", [
    (lambda y: np.where(np.arange(6) == 4, 3, y), "label 3 at row 4 is outside 0..2"),
    (lambda y: np.where(np.arange(6) == 1, -1, y), "label -1 at row 1 is outside 0..2"),
    (lambda y: np.where(np.arange(6) == 2, 1.5, y), "label 1.5 at row 2 is not an integer"),
    (lambda y: np.where(np.arange(6) == 0, np.nan, y), "label nan at row 0 is not an integer"),
    (lambda y: y[:5], "got 5 labels for 6 rows"),
    (lambda y: y.astype(str), "must be integers"),
    (lambda y: np.stack([y, y]), "1-D array"),
])
def test_bad_labels(small, make_y, match):
    net, w, X, y = small
    with pytest.raises(ValueError, match=match):
        net.loss_and_grad(w, X, make_y(y))


def test_float_labels_that_are_integral_are_accepted(small):
    net, w, X, y = small
    a = net.loss_and_grad(w, X, y.astype(np.float64))
    b = net.loss_and_grad(w, X, y)
    assert a[0] == b[0]


@pytest.mark.parametrize("make_w,match", [
    (lambda w: w[:-1], r"shape \(43,\), got \(42,\)"),
    (lambda w: np.where(np.arange(w.size) == 7, np.nan, w), "non-finite value nan at index 7"),
    (lambda w: np.where(np.arange(w.size) == 30, -np.inf, w), "non-finite value -inf at index 30"),
])
def test_bad_params(small, make_w, match):
    net, w, X, y = small
    with pytest.raises(ValueError, match=match):
        net.loss_and_grad(make_w(w), X, y)
    with pytest.raises(ValueError, match=match):
        net.predict_proba(make_w(w), X)


def test_missing_labels(small):
    net, w, X, _ = small
    with pytest.raises(ValueError, match="labels are required"):
        net.loss_and_grad(w, X)
