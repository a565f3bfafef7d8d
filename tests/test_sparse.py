"""Sparse feature rows (core.sparse.CsrRows, scipy.sparse) on the CPU backends: the sparse first layer against
the dense float64 reference, training that matches dense training step for step, and the input checks."""
import numpy as np
import pytest
import scipy.sparse as sp

from core import FeedForwardNetwork, MinibatchTrainer
from core.sparse import CsrRows, check_sparse_features
from core.trainer import ROWS_STEP_SHARE
from tests.conftest import backend_param

CPU_BACKENDS = [backend_param("numpy"), backend_param("numba")]


def sparse_rows(rng, m, d0, per_row, dtype=np.float64):
    """m rows of d0 columns with ``per_row`` stored values each, one column stored twice in every row (duplicates
    add up, as in scipy), and one empty row."""
    cols = rng.integers(0, d0, (m, per_row))
    cols[:, -1] = cols[:, 0]
    vals = rng.standard_normal((m, per_row))
    indptr = np.arange(m + 1, dtype=np.int64) * per_row
    indptr[3:] -= per_row                       # row 2 holds nothing
    keep = np.ones((m, per_row), bool)
    keep[2] = False
    return CsrRows(indptr, cols[keep].astype(np.int32), vals[keep].astype(dtype), d0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layers", [[40, 3], [40, 12, 5], [300, 16, 8, 4]])
def test_sparse_gradient_matches_the_dense_float64_reference(backend, layers):
    rng = np.random.default_rng(21)
    X = sparse_rows(rng, 37, layers[0], 6)
    y = rng.integers(0, layers[-1], 37)
    ref = FeedForwardNetwork(layers, backend="numpy", dtype="float64")
    w = ref.init_params(seed=4) + rng.standard_normal(ref.num_params) * 0.05
    loss_ref, grad_ref, correct_ref = ref.loss_grad_and_correct(w, X.toarray(), y)
    net = FeedForwardNetwork(layers, backend=backend, dtype="float64")
    loss, grad, correct = net.loss_grad_and_correct(w, X, y)
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-10, atol=1e-13)
    assert correct == correct_ref
    W0 = grad[:layers[0] * layers[1]].reshape(layers[0], layers[1])
    untouched = np.setdiff1d(np.arange(layers[0]), X.indices)
    assert untouched.size and not W0[untouched].any()       # columns no row holds get no gradient
    # float32 as it trains, against the same reference
    net32 = FeedForwardNetwork(layers, backend=backend)
    loss32, grad32, _ = net32.loss_grad_and_correct(w, X, y)
    assert loss32 == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(grad32, grad_ref, rtol=2e-3, atol=2e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_row_view_reads_only_its_rows(backend):
    """Batches are views whose indptr starts inside the arrays: the kernels read absolute offsets."""
    rng = np.random.default_rng(22)
    X = sparse_rows(rng, 50, 30, 4)
    y = rng.integers(0, 3, 50)
    net = FeedForwardNetwork([30, 9, 3], backend=backend, dtype="float64")
    w = net.init_params(seed=5)
    view = X[17:41]
    assert view.indptr[0] > 0 and view.shape == (24, 30)
    loss, grad = net.loss_and_grad(w, view, y[17:41])
    loss_d, grad_d = net.loss_and_grad(w, X.toarray()[17:41], y[17:41])
    assert loss == pytest.approx(loss_d, rel=1e-12)
    np.testing.assert_allclose(grad, grad_d, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(net.predict_proba(w, view), net.predict_proba(w, X.toarray()[17:41]), rtol=1e-6)


def test_reduced_precision_rounds_the_sparse_product_as_the_dense_one():
    rng = np.random.default_rng(23)
    X = sparse_rows(rng, 20, 25, 5, dtype=np.float32)
    y = rng.integers(0, 4, 20)
    for precision, bits in (("tf32", 10), ("bf16", 7)):
        net = FeedForwardNetwork([25, 7, 4], backend="numpy", precision=precision)
        w = net.init_params(seed=6)
        loss, grad = net.loss_and_grad(w, X, y)
        loss_d, grad_d = net.loss_and_grad(w, X.toarray(), y)
        # the sums run in another order, so a later layer's rounded input may differ by one unit of `bits`
        assert loss == pytest.approx(loss_d, rel=2.0 ** -bits)
        assert np.abs(grad - grad_d).max() <= 4 * 2.0 ** -bits * np.abs(grad_d).max()
    exact = FeedForwardNetwork([25, 7, 4], backend="numpy")
    assert not np.array_equal(net.loss_and_grad(w, X, y)[1], exact.loss_and_grad(w, X, y)[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_training_follows_dense_training(backend):
    """Same seed, same batches: the epochs' losses and the final weights agree with training on X.toarray()."""
    rng = np.random.default_rng(24)
    Xs = sp.random(260, 400, density=0.03, random_state=7, format="csr", dtype=np.float32)
    y = (np.asarray(Xs[:, :200].sum(axis=1)).ravel() > np.asarray(Xs[:, 200:].sum(axis=1)).ravel()).astype(int)
    net = FeedForwardNetwork([400, 16, 2], backend=backend)
    runs = []
    for X in (Xs, Xs.toarray()):
        trainer = MinibatchTrainer(net, batch_size=32, learning_rate=0.5, seed=3)
        runs.append(trainer.fit(X, y, epochs=6))
    (w_s, hist_s), (w_d, hist_d) = runs
    np.testing.assert_allclose([h.loss for h in hist_s], [h.loss for h in hist_d], rtol=1e-4)
    np.testing.assert_allclose(w_s, w_d, rtol=1e-3, atol=1e-5)
    assert hist_s[-1].loss < 0.8 * hist_s[0].loss and hist_s[-1].accuracy > 0.8
    assert net.evaluate(w_s, Xs, y)[1] == pytest.approx(net.evaluate(w_s, Xs.toarray(), y)[1])
    del rng


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_sparse_step_updates_and_sums_only_its_entries_as_the_dense_step_would(backend):
    """Steps on batches of different columns (the first layer's gradient rows of the earlier batch are stale
    in the trainer's buffer): weights and window sum equal the dense steps' in float64, and every entry outside
    the batches' columns' rows and the later layers is untouched."""
    rng = np.random.default_rng(25)
    layers = [600, 5, 4, 3]
    X = sparse_rows(rng, 24, layers[0], 4)
    assert X.columns().size <= ROWS_STEP_SHARE * 600                # row by row, and reported as entries
    y = rng.integers(0, 3, 24)
    states = []
    for rows in (X, X.toarray()):
        net = FeedForwardNetwork(layers, backend=backend, dtype="float64")
        trainer = MinibatchTrainer(net, batch_size=8, learning_rate=0.3, seed=1)
        trainer.track_entries()
        w, acc = net.init_params(seed=2).astype(np.float64), np.zeros(net.num_params)
        w0 = w.copy()
        for a in (0, 8, 16):
            trainer.step(w, rows[a:a + 8], y[a:a + 8], accumulate=acc)
        states.append((w, acc, trainer.take_entries(), w0))
    (w_s, acc_s, entries, w0), (w_d, acc_d, dense_entries, _) = states
    np.testing.assert_allclose(w_s, w_d, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(acc_s, acc_d, rtol=1e-12, atol=1e-15)
    assert dense_entries is None                                   # a dense step may change any entry
    np.testing.assert_array_equal(entries, net.entries_of_rows(X.columns()))
    outside = np.ones(net.num_params, bool)
    outside[entries] = False
    assert outside.sum() == (600 - X.columns().size) * 5
    np.testing.assert_array_equal(w_s[outside], w0[outside])
    assert not acc_s[outside].any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_sparse_batch_over_a_quarter_of_the_rows_steps_whole_and_a_window_over_it_reports_no_entries(backend):
    rng = np.random.default_rng(26)
    X = sparse_rows(rng, 16, 40, 6)
    y = rng.integers(0, 3, 16)
    assert X[:8].columns().size > ROWS_STEP_SHARE * 40
    net = FeedForwardNetwork([40, 6, 3], backend=backend, dtype="float64")
    ws = []
    for rows in (X, X.toarray()):
        trainer = MinibatchTrainer(net, batch_size=8, learning_rate=0.3)
        trainer.track_entries()
        w, acc = net.init_params(seed=3).astype(np.float64), np.zeros(net.num_params)
        trainer.step(w, rows[:8], y[:8], accumulate=acc)
        trainer.step(w, rows[8:], y[8:], accumulate=acc)
        assert trainer.take_entries() is None                   # most rows, or a dense batch: the whole vector
        ws.append((w, acc))
    np.testing.assert_allclose(ws[0][0], ws[1][0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ws[0][1], ws[1][1], rtol=1e-12, atol=1e-15)


def test_entries_of_rows_and_the_partial_gradient_rows():
    net = FeedForwardNetwork([6, 2, 3], backend="numpy")
    # W1 is 6 x 2 at 0..11, b1 12..13, W2 2 x 3 at 14..19, b2 20..22
    np.testing.assert_array_equal(net.entries_of_rows(np.array([1, 4])), [2, 3, 8, 9, *range(12, 23)])
    X = CsrRows(np.array([0, 1, 2]), np.array([1, 4], np.int32), np.array([2.0, 3.0], np.float32), 6)
    G = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    out = np.full((6, 2), 9.0, np.float32)                          # stale rows of an earlier step
    net.ops.sparse_gemm_t(X, G, out, rows=X.columns())
    np.testing.assert_array_equal(out, [[9, 9], [2, 4], [9, 9], [9, 9], [9, 12], [9, 9]])
    trainer = MinibatchTrainer(net, batch_size=2, optimizer="momentum")
    trainer.track_entries()
    trainer.step(net.init_params(0), X, np.array([0, 1]))
    assert trainer.take_entries() is None                           # momentum steps every entry: a dense step
    with pytest.raises(TypeError, match="momentum keeps state"):
        trainer.optimizer.step_rows(np.zeros(23, np.float32), np.zeros(23, np.float32), np.arange(3), 2, 12)
    assert MinibatchTrainer(net).take_entries() is None             # not tracking


def test_take_slice_and_copy_keep_the_rows():
    rng = np.random.default_rng(25)
    X = sparse_rows(rng, 30, 12, 3)
    dense = X.toarray()
    order = rng.permutation(30)
    np.testing.assert_array_equal(X.take(order).toarray(), dense[order])
    view = X[5:19]
    np.testing.assert_array_equal(view.toarray(), dense[5:19])
    kept = view.copy()
    assert kept.indptr[0] == 0 and kept.nnz == view.nnz
    np.testing.assert_array_equal(kept.toarray(), dense[5:19])
    np.testing.assert_array_equal(X[7:7].toarray(), dense[7:7])
    with pytest.raises(IndexError, match="row index out of range"):
        X.take([0, 30])
    with pytest.raises(TypeError, match="row slices"):
        X[::2]


def test_bad_sparse_input_is_refused_naming_the_value():
    net = FeedForwardNetwork([10, 4, 2], backend="numpy")
    good = sp.csr_matrix(np.eye(3, 10))
    with pytest.raises(ValueError, match="12 features per row but layers\\[0\\] is 10"):
        net.upload(sp.csr_matrix((3, 12)), [0, 1, 0])
    nan = good.copy()
    nan.data[1] = np.nan
    with pytest.raises(ValueError, match="non-finite value nan at row 1, column 1"):
        net.upload(nan, [0, 1, 0])
    with pytest.raises(ValueError, match="no rows"):
        net.upload(sp.csr_matrix((0, 10)), [])
    with pytest.raises(ValueError, match="column index 10 at row 1, outside 0..9"):
        check_sparse_features(CsrRows(np.array([0, 1, 2]), np.array([3, 10]), np.ones(2), 10), 10, np.float32)
    with pytest.raises(ValueError, match="inconsistent"):
        check_sparse_features(CsrRows(np.array([0, 2, 1]), np.array([3, 1]), np.ones(2), 10), 10, np.float32)
    with pytest.raises(ValueError, match="got 2 labels for 3 rows"):
        net.upload(good, [0, 1])
    data = net.upload(good.tocoo(), [0, 1, 0])       # any scipy format, kept sparse
    assert isinstance(data.X, CsrRows) and data.X.dtype == np.float32
    assert good.data[0] == 1.0                        # the caller's matrix is not written


def test_a_dense_only_path_names_a_sparse_matrix():
    from core.validation import check_features

    with pytest.raises(ValueError, match=r"X is a sparse matrix \(csr_matrix, shape \(3, 10\)\) and this path "
                                         r"takes dense rows: pass X.toarray\(\)"):
        check_features(sp.csr_matrix(np.eye(3, 10)), 10, np.float32)


@pytest.mark.parametrize("backend", [backend_param("cupy")])
def test_the_gpu_backend_refuses_sparse_rows_with_the_fix(backend):
    net = FeedForwardNetwork([10, 4, 2], backend=backend)
    with pytest.raises(ValueError, match="cupy backend takes dense rows: pass X.toarray"):
        net.upload(sp.csr_matrix(np.eye(3, 10)), [0, 1, 0])


def test_dense_rows_add_duplicate_columns_unless_told_each_column_comes_once():
    X = CsrRows(np.array([0, 3, 5]), np.array([1, 4, 1, 0, 2], np.int32),
                np.array([2.0, 3.0, 5.0, 7.0, 1.0], np.float32), 6)
    np.testing.assert_array_equal(X.toarray(), sp.csr_matrix((X.values, X.indices, X.indptr), shape=(2, 6)).toarray())
    assert X.toarray()[0, 1] == 7.0                           # 2 + 5: scipy's meaning
    unique = CsrRows(np.array([0, 2, 3]), np.array([1, 4, 0], np.int32), np.array([2.0, 3.0, 7.0], np.float32), 6)
    np.testing.assert_array_equal(unique.toarray(unique_columns=True), unique.toarray())
    view = CsrRows(unique.indptr[1:], unique.indices, unique.values, 6)       # rows from a later offset
    np.testing.assert_array_equal(view.toarray(unique_columns=True), [[7.0, 0, 0, 0, 0, 0]])
