"""Every op on every available backend x {float32, float64} against the float64 NumPy reference.

Three shapes per op: small ones (serial Numba kernels, the second wide enough for the float32 softmax's
polynomial exp) and one above PARALLEL_MIN_ELEMENTS (parallel kernels), so every dispatch branch is
compared. Inputs are fresh random data, never zeros.
"""
import numpy as np
import pytest

from core import available_backends, get_backend
from core.backends.numpy_ops import NumpyOps
from tests.conftest import BACKEND_PARAMS, DTYPES, tolerance

REF = NumpyOps()
SHAPES = [(7, 5), (40, 100), (300, 130)]   # serial kernels; serial with the float32 polynomial exp; parallel


def rand(rng, shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def check(ops, dtype, got, want):
    rtol, atol = tolerance(dtype)
    got = ops.to_host(got) if ops.is_device_array(got) else np.asarray(got)
    assert got.dtype == np.dtype(dtype), f"{ops.name} returned {got.dtype}, expected {dtype}"
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol * max(1.0, np.abs(want).max()))


NUMBA_POOL = pytest.param("numba-pool", id="numba-pool",
                          marks=[] if "numba" in available_backends() else [pytest.mark.skip(reason="no numba")])


@pytest.fixture(params=BACKEND_PARAMS + [NUMBA_POOL])
def ops(request, monkeypatch):
    """Every backend; "numba-pool" is numba with BLAS single-threaded, where its parallel kernels run (beside
    a threaded BLAS they stay serial: core.backends' thread model), so both dispatch branches are compared."""
    if request.param == "numba-pool":
        import core.backends.threads

        monkeypatch.setattr(core.backends.threads, "_blas_threads", 1)
        return get_backend("numba")
    return get_backend(request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
def test_gemm(ops, dtype, trans_a, trans_b):
    rng = np.random.default_rng(1)
    m, k, n = 33, 17, 21
    a = rand(rng, (k, m) if trans_a else (m, k))
    b = rand(rng, (n, k) if trans_b else (k, n))
    want = REF.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    out = ops.empty((m, n), dtype)
    got = ops.gemm(ops.asarray(a, dtype), ops.asarray(b, dtype), out=out, trans_a=trans_a, trans_b=trans_b)
    check(ops, dtype, out, want)
    check(ops, dtype, got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", ["bias_add", "bias_relu"])
def test_bias_ops(ops, dtype, shape, op):
    rng = np.random.default_rng(2)
    y, b = rand(rng, shape), rand(rng, shape[1])
    want = getattr(REF, op)(y.copy(), b)
    yd = ops.asarray(y, dtype)
    returned = getattr(ops, op)(yd, ops.asarray(b, dtype))
    check(ops, dtype, yd, want)
    check(ops, dtype, returned, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_relu_and_backward(ops, dtype, shape):
    rng = np.random.default_rng(3)
    x, g = rand(rng, shape), rand(rng, shape)
    check(ops, dtype, ops.relu(ops.asarray(x, dtype)), REF.relu(x))
    y = REF.relu(x)
    want = REF.relu_backward(g.copy(), y)
    gd = ops.asarray(g, dtype)
    ops.relu_backward(gd, ops.asarray(y, dtype))
    check(ops, dtype, gd, want)
    assert np.all(want[y <= 0] == 0) and np.any(want != 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(1000, 3)])
def test_bias_grad(ops, dtype, shape):
    rng = np.random.default_rng(4)
    g = rand(rng, shape)
    want = REF.bias_grad(g, np.empty(shape[1]))
    out = ops.empty((shape[1],), dtype)
    ops.bias_grad(ops.asarray(g, dtype), out)
    check(ops, dtype, out, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(1000, 3)])
def test_relu_backward_bias_grad_fused(ops, dtype, shape):
    rng = np.random.default_rng(14)
    g, y = rand(rng, shape), REF.relu(rand(rng, shape))
    want_g = REF.relu_backward(g.copy(), y)
    want_b = want_g.sum(axis=0)
    gd, out = ops.asarray(g, dtype), ops.empty((shape[1],), dtype)
    returned = ops.relu_backward_bias_grad(gd, ops.asarray(y, dtype), out)
    check(ops, dtype, gd, want_g)
    check(ops, dtype, out, want_b)
    check(ops, dtype, returned, want_b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_softmax_nll_forward_backward_fused(ops, dtype, shape, scale):
    rng = np.random.default_rng(5)
    z = rand(rng, shape, scale)
    labels = rng.integers(0, shape[1], shape[0]).astype(np.int32)
    want_loss, want_correct = REF.softmax_nll(z, labels)
    want_grad = REF.softmax_nll_backward(z, labels, 1.0 / shape[0], np.empty(shape))
    zd, ld = ops.asarray(z, dtype), ops.asarray(labels)

    loss, correct = ops.softmax_nll(zd, ld)
    rtol, _ = tolerance(dtype)
    assert loss == pytest.approx(want_loss, rel=rtol, abs=rtol)
    assert correct == want_correct

    out = ops.empty(shape, dtype)
    ops.softmax_nll_backward(zd, ld, 1.0 / shape[0], out)
    check(ops, dtype, out, want_grad)

    # fused, writing the gradient over the logits themselves (the network's layout)
    loss2, correct2 = ops.softmax_nll_grad(zd, ld, 1.0 / shape[0], out=zd)
    assert loss2 == pytest.approx(want_loss, rel=rtol, abs=rtol) and correct2 == want_correct
    check(ops, dtype, zd, want_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax(ops, dtype, shape):
    z = rand(np.random.default_rng(6), shape, 10.0)
    want = REF.softmax(z)
    check(ops, dtype, ops.softmax(ops.asarray(z, dtype)), want)
    out = ops.empty(shape, dtype)
    ops.softmax(ops.asarray(z, dtype), out=out)
    check(ops, dtype, out, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [50, 40000])
def test_sgd_update(ops, dtype, n):
    rng = np.random.default_rng(7)
    w, g = rand(rng, n), rand(rng, n)
    want = REF.sgd_update(w.copy(), g, 0.05)
    wd = ops.asarray(w, dtype)
    ops.sgd_update(wd, ops.asarray(g, dtype), 0.05)
    check(ops, dtype, wd, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [50, 40000])
def test_sgd_update_accumulate_adds_the_gradient_and_steps(ops, dtype, n):
    """A worker's step inside an exchange window: acc <- acc + g and w <- w - lr g, both in place (one pass
    on numba, serial and parallel kernels)."""
    rng = np.random.default_rng(11)
    w, g, acc = rand(rng, n), rand(rng, n), rand(rng, n)
    wd, gd, accd = (ops.asarray(a.copy(), dtype) for a in (w, g, acc))   # numpy: asarray of float64 is no copy
    assert ops.sgd_update_accumulate(wd, gd, 0.05, accd) is wd
    check(ops, dtype, wd, w - 0.05 * g)
    check(ops, dtype, accd, acc + g)
    check(ops, dtype, gd, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [50, 40000])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_update(ops, dtype, n, nesterov):
    rng = np.random.default_rng(8)
    w, v, g = rand(rng, n), rand(rng, n), rand(rng, n)
    wr, vr = w.copy(), v.copy()
    REF.momentum_update(wr, vr, g, 0.05, 0.9, nesterov=nesterov)
    wd, vd = ops.asarray(w, dtype), ops.asarray(v, dtype)
    ops.momentum_update(wd, vd, ops.asarray(g, dtype), 0.05, 0.9, nesterov=nesterov)
    check(ops, dtype, wd, wr)
    check(ops, dtype, vd, vr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ["sgd", "momentum", "nesterov"])
def test_updates_into_out_leave_the_weights_alone(ops, dtype, rule):
    """The server's form of an update: new weights into ``out``, ``w`` untouched, state updated in place;
    equal to the in-place form, and to the textbook formula (v <- mu v + g; w <- w - lr v)."""
    rng = np.random.default_rng(10)
    n, lr, mu = 40000, 0.05, 0.9
    w, v, g = rand(rng, n), rand(rng, n), rand(rng, n)
    wd, vd, gd = (ops.asarray(a.copy(), dtype) for a in (w, v, g))   # numpy: asarray of float64 is no copy
    out = ops.zeros((n,), dtype)
    if rule == "sgd":
        got = ops.sgd_update(wd, gd, lr, out=out)
        want_w = w - lr * g
    else:
        got = ops.momentum_update(wd, vd, gd, lr, mu, nesterov=rule == "nesterov", out=out)
        v_new = mu * v + g
        want_w = w - lr * ((g + mu * v_new) if rule == "nesterov" else v_new)
        check(ops, dtype, vd, v_new)
    assert got is out
    check(ops, dtype, out, want_w)
    check(ops, dtype, wd, w)                                   # the weights in flight are never written


@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_ops(ops, dtype):
    rng = np.random.default_rng(9)
    x = rand(rng, (40, 6))
    xd = ops.asarray(x, dtype)
    assert ops.is_device_array(xd)
    check(ops, dtype, xd, x)
    idx = rng.permutation(40)
    check(ops, dtype, ops.take_rows(xd, ops.asarray(idx)), x[idx])
    out = ops.empty((40, 6), dtype)
    ops.take_rows(xd, ops.asarray(idx), out=out)
    check(ops, dtype, out, x[idx])
    some = ops.empty((3, 6), dtype)                       # negative indices count from the end, as in NumPy
    ops.take_rows(xd, ops.asarray(np.array([-1, 0, -40])), out=some)
    check(ops, dtype, some, x[[-1, 0, -40]])
    host = np.empty((40, 6), dtype)
    assert ops.to_host(xd, out=host) is host
    check(ops, dtype, host, x)
    assert ops.zeros((3,), dtype).sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite(ops, dtype, bad):
    x = rand(np.random.default_rng(10), 1000)
    assert ops.all_finite(ops.asarray(x, dtype)) is True
    x[777] = bad
    assert ops.all_finite(ops.asarray(x, dtype)) is False


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_nll_nan_logit_gives_nan_loss(ops, dtype):
    """A diverged network (NaN logits) must show up as a NaN loss, never as a finite one."""
    z = rand(np.random.default_rng(11), (300, 130))
    z[17, 5] = np.nan
    labels = np.zeros(300, np.int32)
    loss, _ = ops.softmax_nll(ops.asarray(z, dtype), ops.asarray(labels))
    assert np.isnan(loss)


def test_numba_float32_exp_kernel_over_its_whole_range():
    """The float32 softmax's polynomial exp against float64 exp: relative error < 3e-7 on [-87, 0] (the
    shifted logits' range), ~1e-38 instead of a smaller value below, and exp(0) = 1 exactly."""
    pytest.importorskip("numba")
    from core.backends.numba_kernels import KERNELS

    z = np.concatenate([np.linspace(-87.0, 0.0, 20001), [-88.0, -100.0, -1e4]]).astype(np.float32)[None, :]
    want = np.exp(z.astype(np.float64))
    e = z.copy()
    for kernel in KERNELS["softmax_exp_rows_f32"]:            # serial and parallel compilations
        e[...] = z
        kernel(e, np.zeros(1, np.int32), np.empty(z.shape, np.int32), np.empty(1), np.empty(1, np.int32))
        rel = np.abs(e[0, :20001] - want[0, :20001]) / want[0, :20001]
        assert rel.max() < 3e-7 and e[0, 20000] == 1.0
        assert np.all((e[0, 20001:] >= 0) & (e[0, 20001:] < 2e-38))


@pytest.mark.skipif("numba" not in available_backends(), reason="numba not installed")
def test_numba_runs_parallel_kernels_only_where_blas_is_single_threaded(monkeypatch):
    import numba

    import core.backends.threads
    from core.backends.numba_kernels import KERNELS

    ops = get_backend("numba")
    serial, parallel = KERNELS["sgd"]
    monkeypatch.setattr(core.backends.threads, "_blas_threads", 2)
    assert not ops._pool_free() and ops._kernel("sgd", 1 << 20) is serial
    monkeypatch.setattr(core.backends.threads, "_blas_threads", 1)
    if numba.get_num_threads() > 1:
        assert ops._pool_free() and ops._kernel("sgd", 1 << 20) is parallel
    assert ops._kernel("sgd", 100) is serial                           # small arrays: serial either way


@pytest.mark.parametrize("bad", [40, -41, 1000])
def test_gathering_rows_into_a_buffer_refuses_an_index_out_of_range(bad):
    """The CPU backends' gather into a batch buffer skips NumPy's temporary copy; it still raises on a bad row
    index (never wraps it around), and leaves the buffer as it was."""
    for name in [b for b in ("numpy", "numba") if b in available_backends()]:
        ops = get_backend(name)
        x = np.arange(240, dtype=np.float32).reshape(40, 6)
        out = np.full((3, 6), -7.0, np.float32)
        with pytest.raises(IndexError, match=f"out of range for 40 rows.*{bad}"):
            ops.take_rows(x, np.array([0, bad, 1]), out=out)
        assert (out == -7.0).all()


# ------------------------------------------------------------------- a sparse exchange's entries (host ops)
def host_ops_of(name):
    if name == "numpy":
        return NumpyOps()
    if "numba" not in available_backends():
        pytest.skip("no numba")
    from core.backends.numba_ops import NumbaOps

    return NumbaOps(fuse_step=False, parallel=False)


def entries(rng, n, k):
    """k sorted unique indices below n, partly in runs (rows of 16), partly scattered."""
    rows = rng.choice(n // 16, k // 32, replace=False) * 16
    runs = (rows[:, None] + np.arange(16)).ravel()
    return np.unique(np.concatenate([runs, rng.choice(n, k // 2, replace=False)]))


@pytest.mark.parametrize("host", ["numpy", "numba"])
@pytest.mark.parametrize("index_dtype", [np.int64, np.uint32])
def test_runs_of_entries_count_fill_and_expand_back(host, index_dtype):
    ops, rng = host_ops_of(host), np.random.default_rng(3)
    for index in (entries(rng, 4096, 600), np.array([5]), np.arange(10, 40), np.array([0, 2, 4, 4095])):
        index = index.astype(index_dtype)
        r = ops.count_runs(index)
        assert r == REF.count_runs(index) == 1 + int((np.diff(index.astype(np.int64)) != 1).sum())
        starts, lengths = np.empty(r, np.uint32), np.empty(r, np.uint32)
        ops.fill_runs(index, starts, lengths)
        assert lengths.sum() == index.size and (lengths >= 1).all()
        words = np.concatenate([[r], starts, lengths, np.zeros(index.size, np.uint32)]).astype(np.uint32)
        back = ops.expand_runs(words, r, 4096, index.size)
        assert back.dtype == np.int64
        np.testing.assert_array_equal(back, index)
    assert ops.count_runs(np.empty(0, np.uint32)) == 0


@pytest.mark.parametrize("host", ["numpy", "numba"])
@pytest.mark.parametrize("words,k,message", [
    ([1, 0, 0], 0, "at least one index"),              # an empty run
    ([2, 10, 0, 3, 3], 6, "increase with gaps"),       # [10,13) then [0,3)
    ([2, 0, 3, 3, 3], 6, "increase with gaps"),        # [0,3) then [3,6): no gap
    ([1, 98, 5], 5, "end by 100"),                     # past n
    ([1, 0, 5], 4, "cover 5 indices, it holds 4"),
    ([2, 0, 5, 1, 1], 3, "cover 2 indices, it holds 3"),
])
def test_malformed_runs_are_refused_with_what_is_wrong(host, words, k, message):
    with pytest.raises(ValueError, match=message):
        host_ops_of(host).expand_runs(np.array(words, np.uint32), words[0], 100, k)


@pytest.mark.parametrize("host", ["numpy", "numba"])
def test_copy_entries_and_the_sgd_step_on_entries_match_numpy_bit_for_bit(host):
    ops, rng = host_ops_of(host), np.random.default_rng(4)
    n = 50_000
    w = rng.standard_normal(n).astype(np.float32)
    index = entries(rng, n, 3000)
    values = rng.standard_normal(index.size).astype(np.float32)
    want = w.copy()
    want[index] = want[index] - np.float32(0.05) * values
    got = w.copy()
    assert ops.sgd_entries_screened(got, index, values, np.float32(0.05)) is None
    np.testing.assert_array_equal(got, want)
    dst = np.zeros(n, np.float32)
    ops.copy_entries(dst, want, index.astype(np.uint32))
    np.testing.assert_array_equal(dst[index], want[index])
    assert np.count_nonzero(dst) == np.count_nonzero(want[index])


@pytest.mark.parametrize("host", ["numpy", "numba"])
@pytest.mark.parametrize("bad,verdict", [(np.nan, "gradient"), (np.inf, "gradient"), (3e38, "result")])
def test_a_bad_sgd_step_on_entries_writes_nothing(host, bad, verdict):
    ops, rng = host_ops_of(host), np.random.default_rng(5)
    w = rng.standard_normal(1000).astype(np.float32)
    w[700] = 3e38
    index = np.array([3, 4, 5, 700, 900])
    values = np.ones(index.size, np.float32)
    values[3] = bad if verdict == "gradient" else -bad           # 3e38 + 0.5 * 3e38 overflows
    before = w.copy()
    assert ops.sgd_entries_screened(w, index, values, np.float32(0.5)) == verdict
    np.testing.assert_array_equal(w, before)


@pytest.mark.parametrize("host", ["numpy", "numba"])
def test_union_gather_and_scatter_of_entries(host):
    ops, rng = host_ops_of(host), np.random.default_rng(6)
    sets = [entries(rng, 20_000, 900).astype(dtype) for dtype in (np.uint32, np.uint32, np.int64)]
    want = np.union1d(np.union1d(sets[0], sets[1]), sets[2])
    np.testing.assert_array_equal(ops.union_sorted(sets[:2]), np.union1d(sets[0], sets[1]))
    assert ops.union_sorted(sets[:2]).dtype == np.uint32
    np.testing.assert_array_equal(ops.union_sorted(sets), want)         # mixed dtypes: int64
    one = ops.union_sorted([np.empty(0, np.int64), sets[2]])
    np.testing.assert_array_equal(one, sets[2])
    assert not np.shares_memory(one, sets[2])                          # a new array, never an argument
    assert ops.union_sorted([]).size == 0
    src = rng.standard_normal(20_000).astype(np.float32)
    np.testing.assert_array_equal(ops.gather_entries(src, sets[0]), src[sets[0]])
    dst = np.zeros(20_000, np.float32)
    ops.scatter_entries(dst, sets[1], src[sets[1]])
    np.testing.assert_array_equal(dst[sets[1]], src[sets[1]])
    assert np.count_nonzero(dst) == np.count_nonzero(src[sets[1]])
