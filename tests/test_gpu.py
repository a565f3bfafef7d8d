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


# ---------------------------------------------------------------- issue 13: cuBLAS compute types, graphs, copies
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_ex_equals_cupy_matmul(trans_a, trans_b, dtype):
    """The cublasGemmEx path (recorded steps, tf32/bf16) against cupy.matmul for every transpose pair."""
    import cupy

    from core.backends.cupy_ops import _COMPUTE_32F, _COMPUTE_64F

    ops = get_backend("cupy")
    rng = np.random.default_rng(5)
    a = cupy.asarray(rng.standard_normal((37, 53) if not trans_a else (53, 37)), dtype=dtype)
    b = cupy.asarray(rng.standard_normal((53, 29) if not trans_b else (29, 53)), dtype=dtype)
    out = cupy.empty((37, 29), dtype=dtype)
    ops._gemm_ex(a, b, out, trans_a, trans_b, _COMPUTE_32F if dtype == "float32" else _COMPUTE_64F)
    want = cupy.matmul(a.T if trans_a else a, b.T if trans_b else b)
    rtol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(cupy.asnumpy(out), cupy.asnumpy(want), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_tensor_core_gemm_is_as_close_as_the_emulation(precision):
    """cuBLAS's tf32/bf16 compute types round the inputs like the reference's emulation, to within a few ulps
    of the reduced mantissa (the hardware may round differently from round-to-nearest-even)."""
    import cupy

    ops = get_backend("cupy")
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((256, 512)).astype(np.float32), rng.standard_normal((512, 128)).astype(np.float32)
    got = cupy.asnumpy(ops.gemm(cupy.asarray(a), cupy.asarray(b), precision=precision))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    emulated = NumpyOps().gemm(a, b, precision=precision)
    err_gpu = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    err_ref = np.linalg.norm(emulated - exact) / np.linalg.norm(exact)
    assert 1e-6 < err_gpu < 4 * err_ref, (err_gpu, err_ref)


def _cupy_trainer(graphs, precision="fp32", optimizer="momentum", seed=3):
    from core import MinibatchTrainer

    net = FeedForwardNetwork([64, 100, 10], backend="cupy", precision=precision)
    return MinibatchTrainer(net, batch_size=32, learning_rate=0.1, optimizer=optimizer, seed=seed,
                            cuda_graphs=graphs)


def test_recorded_windows_follow_the_op_by_op_trajectory(digits_split):
    """3 epochs of digits, 40 batches each (39 of 32 rows, one of 9): the CUDA-graph trainer stays within
    float32 rounding of the op-by-op one, and it really recorded (no fallback)."""
    Xtr, _, ytr, _ = digits_split
    runs = []
    for graphs in (False, True):
        trainer = _cupy_trainer(graphs)
        w, history = trainer.fit(Xtr, ytr, epochs=3)
        runs.append((w, history, trainer))
    (w0, h0, _), (w1, h1, t1) = runs
    assert t1.graph_problem is None and t1.graphs is not None
    assert t1.optimizer.t == 3 * 40
    np.testing.assert_allclose(w1, w0, rtol=1e-3, atol=1e-4)
    for a, b in zip(h0, h1):
        assert b.loss == pytest.approx(a.loss, rel=1e-4) and abs(b.accuracy - a.accuracy) <= 2 / len(ytr)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_recorded_windows_reach_96_percent_on_digits(precision, digits_split):
    Xtr, Xte, ytr, yte = digits_split
    trainer = _cupy_trainer(True, precision=precision, seed=0)
    w, _ = trainer.fit(Xtr, ytr, epochs=30)
    assert trainer.graph_problem is None
    acc = trainer.net.evaluate(w, Xte, yte)[1]
    assert acc >= 0.96, f"cupy graphs {precision}: {acc:.4f}"


def test_recorded_window_with_accumulator_matches_op_by_op(digits_split):
    """The worker's window (gradient sums, local steps) recorded: equal to op by op within float32 rounding."""
    import cupy

    Xtr, _, ytr, _ = digits_split
    out = []
    for graphs in (False, True):
        trainer = _cupy_trainer(graphs, optimizer="sgd")
        net = trainer.net
        data = net.upload(Xtr, ytr)
        w = net.device_params(net.init_params(0)).copy()
        acc = cupy.zeros(net.num_params, cupy.float32)
        trainer.begin_epoch(data)
        for first in range(0, 40, 4):
            trainer.run_window(w, data, first, 4, accumulate=acc, update=True)
        loss, correct, rows = trainer.take_sums()
        out.append((cupy.asnumpy(w), cupy.asnumpy(acc), loss, correct, rows))
    (w0, a0, l0, c0, r0), (w1, a1, l1, c1, r1) = out
    assert r0 == r1 == len(ytr)
    np.testing.assert_allclose(w1, w0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a1, a0, rtol=1e-3, atol=1e-4)
    assert l1 == pytest.approx(l0, rel=1e-5) and abs(c1 - c0) <= 2


def test_capture_allocates_nothing_from_the_pool(digits_split):
    import cupy

    Xtr, _, ytr, _ = digits_split
    trainer = _cupy_trainer(True)
    trainer.fit(Xtr[:640], ytr[:640], epochs=1)            # warm: kernels compiled, buffers allocated
    pool = cupy.get_default_memory_pool()
    before = pool.used_bytes()
    trainer.fit(Xtr[:640], ytr[:640], epochs=2)
    assert trainer.graph_problem is None
    assert pool.used_bytes() - before < 1 << 20           # only fit's own per-call buffers, no per-step growth


def test_summing_softmax_kernel_matches_the_reference():
    import cupy

    ops = get_backend("cupy")
    rng = np.random.default_rng(7)
    for m, c in ((1000, 10), (37, 1000), (ops.MAX_BLOCKS * ops.ROWS_PER_BLOCK + 99, 3)):
        z = rng.standard_normal((m, c)).astype(np.float32) * 4
        labels = rng.integers(0, c, m).astype(np.int32)
        sums = cupy.zeros(2, cupy.float64)
        out = cupy.empty((m, c), cupy.float32)
        ops.softmax_nll_grad_sum(cupy.asarray(z), cupy.asarray(labels), 1.0 / m, out, sums)
        ops.softmax_nll_grad_sum(cupy.asarray(z), cupy.asarray(labels), 1.0 / m, out, sums)   # adds twice
        want_loss, want_correct = NumpyOps().softmax_nll(z.astype(np.float64), labels)
        got = cupy.asnumpy(sums)
        assert got[0] == pytest.approx(2 * want_loss, rel=1e-5) and got[1] == 2 * want_correct
        ref = NumpyOps().softmax_nll_backward(z.astype(np.float64), labels, 1.0 / m, np.empty((m, c)))
        np.testing.assert_allclose(cupy.asnumpy(out), ref, rtol=1e-4, atol=1e-9)


def test_async_copies_round_trip_through_pinned_memory():
    import cupy

    ops = get_backend("cupy")
    host = ops.pinned_empty((1 << 20,), np.float32)
    assert isinstance(host, np.ndarray)
    x = cupy.arange(1 << 20, dtype=cupy.float32)
    ops.copy_to_host_async(x, host).wait(timeout=10)
    np.testing.assert_array_equal(host, np.arange(1 << 20, dtype=np.float32))
    host *= 2
    y = cupy.empty_like(x)
    ops.copy_from_host_async(y, host).wait(timeout=10)
    np.testing.assert_array_equal(cupy.asnumpy(y), 2 * np.arange(1 << 20, dtype=np.float32))
    with pytest.raises(ValueError, match="one size and dtype"):
        ops.copy_to_host_async(x, np.empty(3, np.float32))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["async", "async-easgd"])
def test_runner_with_every_gpu_option_trains_digits(mode, digits_split):
    """Two cupy workers on one GPU with recorded windows, the pipelined exchange and bfloat16 gradient frames:
    every exchange applied once, digits >= 95 %, and the workers really recorded their windows."""
    import math

    from ps.runner import run

    Xtr, Xte, ytr, yte = digits_split
    tau = 4
    res = run(Xtr, ytr, [64, 100, 10], mode=mode, workers=2, backend="cupy", devices=[0, 0], epochs=20,
              batch_size=32, learning_rate=0.1 if mode == "async" else 0.2, tau=tau, cuda_graphs=True,
              pipeline=True, wire_dtype="bfloat16", timeout=240)
    acc = FeedForwardNetwork([64, 100, 10], backend="numpy").evaluate(res.weights, Xte, yte)[1]
    assert acc >= 0.95, (mode, acc)
    n = len(ytr)
    want = sum(math.ceil(20 * math.ceil((b - a) / 32) / tau) for a, b in ((0, n // 2), (n // 2, n)))
    assert res.stats["applied"] == want and res.stats["rejected_total"] == 0
    assert all(r["graphs"] and r["graph_problem"] is None for r in res.workers.values()), res.workers
