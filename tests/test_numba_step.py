"""The numba backend's one-call training step (core/backends/numba_step.py): the same numbers as its per-op
path and the float64 reference for every kind of net it meets, its fall-backs, and its machine code loaded
back from numba's on-disk cache in a fresh process (where NumPy's BLAS sits at another address)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core import FeedForwardNetwork
from core.backends import numba_problem
from tests.conftest import DTYPES, tolerance

pytestmark = pytest.mark.skipif(numba_problem() is not None, reason=str(numba_problem()))
ROOT = Path(__file__).resolve().parents[1]

# (layers, batch): no hidden layer; digits; the seed net with 100 classes (float32 polynomial exp); a batch of
# one; a deep narrow net whose activations exceed PARALLEL_MIN_ELEMENTS (the per-op path goes parallel there)
NETS = [([5, 3], 7), ([64, 100, 10], 128), ([6, 50, 200, 50, 100], 70), ([4, 9, 33], 1),
        ([3, 40, 40, 40, 2], 1000)]


def nets(layers, dtype):
    from core.backends.numba_ops import NumbaOps

    return (FeedForwardNetwork(layers, backend=NumbaOps(), dtype=dtype),
            FeedForwardNetwork(layers, backend=NumbaOps(fuse_step=False), dtype=dtype))


def test_numpy_blas_is_found_so_the_fused_step_runs():
    from core.backends.numba_ops import NumbaOps
    from core.backends.numba_step import blas_problem

    assert blas_problem() is None
    assert NumbaOps().fuse_step and NumbaOps().fuse_problem is None
    off = NumbaOps(fuse_step=False)
    assert not off.fuse_step and "fuse_step=False" in off.fuse_problem


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers,batch", NETS, ids=lambda v: str(v))
def test_fused_step_matches_per_op_path_and_reference(layers, batch, dtype):
    rng = np.random.default_rng(len(layers) * 100 + batch)
    fused, per_op = nets(layers, dtype)
    ref = FeedForwardNetwork(layers, backend="numpy", dtype="float64")
    w = ref.init_params(seed=3)
    w[rng.permutation(w.size)[: w.size // 3]] += 0.1                 # non-zero biases too
    X, y = rng.standard_normal((batch, layers[0])), rng.integers(0, layers[-1], batch)

    Xd = fused.upload(X, y)
    wd = fused.ops.asarray(w, dtype)
    grad = np.full(fused.num_params, np.nan, dtype)                    # every entry must be written
    acts, deltas, acts_flat, deltas_flat = fused._workspace(batch)
    got = fused.ops.dense_stack_gradient(fused._dims, wd, Xd.X, Xd.y, grad, acts_flat, deltas_flat)
    assert got is not NotImplemented, "the fused step declined a contiguous, same-dtype batch"

    grad2 = np.empty_like(grad)
    want = per_op.gradient_device(wd, Xd.X, Xd.y, grad2)
    _, _, acts_flat2, deltas_flat2 = per_op._workspace(batch)
    rtol, atol = tolerance(dtype)
    assert got[1] == want[1]
    assert got[0] == pytest.approx(want[0], rel=rtol)
    scale = np.abs(grad2).max()
    np.testing.assert_allclose(grad, grad2, rtol=rtol, atol=atol * scale)
    # the workspaces end alike: hidden activations, dL/dz where the logits were, and the hidden deltas
    np.testing.assert_allclose(acts_flat, acts_flat2, rtol=rtol, atol=atol * max(1, np.abs(acts_flat2).max()))
    np.testing.assert_allclose(deltas_flat, deltas_flat2, rtol=rtol, atol=atol * max(1e-30, scale))

    ref_loss, ref_grad, ref_correct = ref.loss_grad_and_correct(w, X, y)
    assert got[0] / batch == pytest.approx(ref_loss, rel=rtol)
    assert got[1] == ref_correct
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol * 10, atol=atol * 10 * np.abs(ref_grad).max())


def test_training_with_the_fused_step_follows_the_per_op_path():
    """Twenty SGD steps on digits-shaped data: both paths walk the same weights (float64, so exactly enough
    to see any slip in the flat layout or the workspaces between steps)."""
    rng = np.random.default_rng(7)
    fused, per_op = nets([64, 30, 20, 10], "float64")
    X, y = rng.standard_normal((96, 64)), rng.integers(0, 10, 96)
    w1 = fused.init_params(1)
    w2 = w1.copy()
    g1, g2 = np.empty_like(w1), np.empty_like(w2)
    for step in range(20):
        rows = slice(32 * (step % 3), 32 * (step % 3 + 1))            # batch sizes share one workspace
        l1 = fused.gradient_device(w1, X[rows], y[rows].astype(np.int32), g1)
        l2 = per_op.gradient_device(w2, X[rows], y[rows].astype(np.int32), g2)
        assert l1[1] == l2[1] and l1[0] == pytest.approx(l2[0], rel=1e-12)
        w1 -= 0.1 * g1
        w2 -= 0.1 * g2
    np.testing.assert_allclose(w1, w2, rtol=1e-10, atol=1e-12)
    assert not np.allclose(w1, fused.init_params(1))


def test_fused_step_declines_what_it_cannot_take(monkeypatch):
    """Mixed dtypes, a strided batch or (with a free thread pool) a big one: NotImplemented, and the network's
    per-op path computes it."""
    from core.backends.numba_ops import NumbaOps

    ops = NumbaOps()
    net = FeedForwardNetwork([6, 8, 4], backend=ops)
    w = net.init_params(0)
    grad = np.empty_like(w)
    _, _, acts, deltas = net._workspace(5)
    X = np.ones((5, 12), np.float32)[:, ::2]                           # (5, 6), not contiguous
    y = np.zeros(5, np.int32)
    assert ops.dense_stack_gradient(net._dims, w, X, y, grad, acts, deltas) is NotImplemented
    assert ops.dense_stack_gradient(net._dims, w, X.astype(np.float64), y, grad, acts, deltas) is NotImplemented
    loss, correct = net.gradient_device(w, X, y, grad)
    # a batch whose activations pass FUSED_STEP_MAX_ELEMENTS is left to the parallel per-op kernels, where
    # they may run in parallel (BLAS single-threaded); beside a threaded BLAS the one call takes it
    import numba

    import core.backends.threads
    from core.backends.numba_ops import FUSED_STEP_MAX_ELEMENTS

    rows = FUSED_STEP_MAX_ELEMENTS // 12 + 1
    _, _, big_acts, big_deltas = net._workspace(rows)
    Xbig, ybig = np.ones((rows, 6), np.float32), np.zeros(rows, np.int32)
    for blas in (1, 2):
        monkeypatch.setattr(core.backends.threads, "_blas_threads", blas)
        got = ops.dense_stack_gradient(net._dims, w, Xbig, ybig, np.empty_like(w), big_acts, big_deltas)
        assert (got is NotImplemented) == (numba.get_num_threads() > 1 and blas == 1), blas
    ref = FeedForwardNetwork([6, 8, 4], backend="numpy")
    want_loss, want_grad, want_correct = ref.loss_grad_and_correct(w, np.ascontiguousarray(X), y)
    assert loss / 5 == pytest.approx(want_loss, rel=1e-5) and correct == want_correct
    np.testing.assert_allclose(grad, want_grad, rtol=2e-4, atol=1e-6)


CHILD = """
import json, sys
import numpy as np
from core import FeedForwardNetwork
from core.backends.numba_step import dense_stack_gradient
rng = np.random.default_rng(11)
out = {}
for dtype in ("float32", "float64"):
    net = FeedForwardNetwork([6, 50, 40], backend="numba", dtype=dtype)
    loss, grad, correct = net.loss_grad_and_correct(net.init_params(2), rng.standard_normal((64, 6)),
                                                    rng.integers(0, 40, 64))
    out[dtype] = [loss, correct, float(np.abs(grad).sum())]
out["cache_hits"] = sum(dense_stack_gradient.stats.cache_hits.values())
print(json.dumps(out))
"""


def test_cached_machine_code_links_to_this_process_blas():
    """The step is compiled once and cached on disk; a new process must link the cached code to its own
    NumPy BLAS (registered by name at start-up), not to an address baked in by the process that compiled it.
    The second child runs entirely from the cache and must give the first child's (and this process's) numbers."""
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[1]["cache_hits"] >= 2, runs[1]
    rng = np.random.default_rng(11)
    for dtype in ("float32", "float64"):
        ref = FeedForwardNetwork([6, 50, 40], backend="numpy", dtype="float64")
        loss, grad, correct = ref.loss_grad_and_correct(ref.init_params(2), rng.standard_normal((64, 6)),
                                                        rng.integers(0, 40, 64))
        rtol = tolerance(dtype)[0]
        for run in runs:
            assert run[dtype][1] == correct
            assert run[dtype][0] == pytest.approx(loss, rel=rtol)
            assert run[dtype][2] == pytest.approx(float(np.abs(grad).sum()), rel=rtol * 10)


@pytest.mark.parametrize("fuse", [True, False], ids=["one-call", "per-op"])
def test_threads_sharing_the_backend_get_their_own_results(fuse):
    """The backend object is shared (get_backend caches it) and the one-call step releases the GIL: two
    threads training their own nets at once must not share scratch buffers (row losses, exp bits)."""
    import threading

    from core.backends.numba_ops import NumbaOps

    ops = NumbaOps(fuse_step=fuse)
    jobs = []
    for t, (layers, batch) in enumerate([([6, 50, 200, 50, 100], 256), ([10, 64, 40], 100)]):
        rng = np.random.default_rng(t)
        net = FeedForwardNetwork(layers, backend=ops)
        data = net.upload(rng.standard_normal((batch, layers[0])), rng.integers(0, layers[-1], batch))
        w = net.init_params(t)
        want_grad = np.empty_like(w)
        want = net.gradient_device(w, data.X, data.y, want_grad)
        jobs.append((net, data, w, want, want_grad))
    problems = []
    start = threading.Barrier(2, timeout=30)

    def work(net, data, w, want, want_grad):
        grad = np.empty_like(w)
        start.wait()
        for _ in range(3000):
            got = net.gradient_device(w, data.X, data.y, grad)
            if got != want or not np.array_equal(grad, want_grad):
                problems.append((net.layers, got, want))
                return

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    assert problems == []


def test_a_blas_without_ilp64_gemm_is_reported_not_registered():
    """A library that lacks the symbols (the C library here; Accelerate-linked NumPy on macOS is the real
    case) yields a sentence naming what is missing, and the backend keeps the per-op path."""
    import ctypes
    import ctypes.util

    from core.backends.numba_step import register_gemm

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    problem = register_gemm(libc)
    assert problem is not None and "scipy_cblas_sgemm64_" in problem and "op by op" in problem
