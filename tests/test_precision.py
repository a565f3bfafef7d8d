"""GEMM input precision (fp32 / tf32 / bf16): the NumPy reference's rounding defines it, every backend computes
gradients within the stated tolerances of the float64 reference, and each precision trains digits to 96 %."""
import numpy as np
import pytest

from core import FeedForwardNetwork, MinibatchTrainer
from core.backends.numpy_ops import PRECISIONS, NumpyOps, round_to_precision
from tests.conftest import BACKEND_PARAMS, PRECISION_TOLERANCES

REF = NumpyOps()
NETS = [([64, 100, 10], 128), ([6, 50, 200, 50, 100], 256), ([784, 256, 10], 256)]


def f32(bits):
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


@pytest.mark.parametrize("precision,kept", [("tf32", 10), ("bf16", 7)])
def test_rounding_keeps_the_mantissa_bits_and_ties_to_even(precision, kept):
    drop = 23 - kept
    one = 1.0
    ulp = 2.0 ** -kept                       # spacing of the kept mantissa just above 1
    x = np.array([one + ulp, one + ulp / 2, one + 1.5 * ulp, one + ulp / 2 + 2.0 ** -23, -(one + 1.5 * ulp),
                  3.0, 0.0, -0.0], dtype=np.float32)
    got = round_to_precision(x, precision)
    want = np.array([one + ulp, one, one + 2 * ulp, one + ulp, -(one + 2 * ulp), 3.0, 0.0, -0.0], np.float32)
    np.testing.assert_array_equal(got, want)             # 1 + ulp/2 is a tie: to 1 (even); 1 + 1.5 ulp: to 1 + 2 ulp
    assert np.signbit(got[-1])
    bits = got.view(np.uint32)
    assert not (bits & np.uint32((1 << drop) - 1)).any(), "dropped mantissa bits must be zero"
    rng = np.random.default_rng(0)
    r = rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000)
    rel = np.abs(round_to_precision(r, precision).astype(np.float64) - r) / np.abs(r)
    assert rel.max() <= 2.0 ** -(kept + 1) * (1 + 1e-6)  # round to nearest: at most half an ulp


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_rounding_keeps_nan_and_inf_and_overflows_like_the_hardware(precision):
    big = np.finfo(np.float32).max
    x = np.array([np.nan, np.inf, -np.inf, f32(0x7FC00001), big, -big], np.float32)
    got = round_to_precision(x, precision)
    assert np.isnan(got[0]) and np.isnan(got[3])
    assert got[1] == np.inf and got[2] == -np.inf
    assert got[4] == np.inf and got[5] == -np.inf          # within half an ulp of the top: rounds up to inf
    assert round_to_precision(x[:1], "fp32").dtype == np.float32


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
def test_reference_gemm_is_rounded_operands_times_in_float32(precision, trans_a, trans_b):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 30) if not trans_a else (30, 40)).astype(np.float32)
    b = rng.standard_normal((30, 20) if not trans_b else (20, 30)).astype(np.float32)
    got = REF.gemm(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)
    ra, rb = round_to_precision(a, precision), round_to_precision(b, precision)
    want = (ra.T if trans_a else ra) @ (rb.T if trans_b else rb)
    np.testing.assert_array_equal(got, want)
    exact = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    bound = {"fp32": 1e-6, "tf32": 2.0 ** -10, "bf16": 2.0 ** -7}[precision]
    assert err < bound
    if precision != "fp32":
        assert err > 1e-6, "a reduced precision must actually round"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layers,m", NETS, ids=["digits", "seed", "mnist-ish"])
def test_gradient_within_the_stated_tolerance_of_float64(backend, precision, layers, m):
    rng = np.random.default_rng(2)
    ref = FeedForwardNetwork(layers, backend="numpy", dtype="float64")
    net = FeedForwardNetwork(layers, backend=backend, precision=precision)
    w = ref.init_params(1)
    X, y = rng.standard_normal((m, layers[0])), rng.integers(0, layers[-1], m)
    loss0, g0 = ref.loss_and_grad(w, X, y)
    loss, g = net.loss_and_grad(w, X, y)
    tol = PRECISION_TOLERANCES[precision]
    assert abs(loss - loss0) / loss0 < tol["loss"]
    assert np.linalg.norm(g - g0) / np.linalg.norm(g0) < tol["grad"]
    if precision != "fp32":        # the rounding really happened (on a GPU: the tensor-core compute type)
        _, g32 = FeedForwardNetwork(layers, backend=backend).loss_and_grad(w, X, y)
        assert np.linalg.norm(g - g32) / np.linalg.norm(g0) > 1e-6


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_numba_follows_the_reference_emulation(precision):
    """numba takes the per-op path for reduced precision (the one-call step is fp32 only) with the same
    rounding GEMM: it matches the NumPy emulation to float32 rounding, far closer than to float64."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(3)
    layers = [64, 100, 10]
    nets = [FeedForwardNetwork(layers, backend=b, precision=precision) for b in ("numpy", "numba")]
    w = nets[0].init_params(0)
    X, y = rng.standard_normal((64, 64)), rng.integers(0, 10, 64)
    dims, acts = np.asarray(layers, np.int64), np.empty(64 * 110, np.float32)
    assert nets[1].ops.dense_stack_gradient(dims, w, X.astype(np.float32), y.astype(np.int32), np.empty_like(w),
                                            acts, np.empty(6400, np.float32), precision) is NotImplemented
    (l0, g0), (l1, g1) = (n.loss_and_grad(w, X, y) for n in nets)
    assert l1 == pytest.approx(l0, rel=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_digits_reaches_96_percent_in_each_precision(backend, precision, digits_split):
    Xtr, Xte, ytr, yte = digits_split
    net = FeedForwardNetwork([64, 100, 10], backend=backend, precision=precision)
    trainer = MinibatchTrainer(net, batch_size=32, learning_rate=0.1, optimizer="momentum", seed=0)
    w, _ = trainer.fit(Xtr, ytr, epochs=30)
    acc = net.evaluate(w, Xte, yte)[1]
    assert acc >= 0.96, f"{backend} {precision}: digits test accuracy {acc:.4f} < 0.96"


@pytest.mark.parametrize("kwargs,match", [
    (dict(precision="fp16"), "precision must be one of fp32, tf32, bf16, got 'fp16'"),
    (dict(precision=None), "precision must be one of fp32, tf32, bf16, got None"),
    (dict(precision="bf16", dtype="float64"), "precision='bf16' rounds float32 GEMM inputs and needs dtype "
                                              "float32, got dtype float64"),
])
def test_bad_precision_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeedForwardNetwork([4, 3], backend="numpy", **kwargs)


def test_reference_gemm_refuses_reduced_precision_on_float64():
    with pytest.raises(ValueError, match="precision='tf32' needs float32 operands, got float64"):
        REF.gemm(np.ones((2, 2)), np.ones((2, 2)), precision="tf32")


def test_precision_is_in_the_repr():
    assert "precision='tf32'" in repr(FeedForwardNetwork([4, 3], backend="numpy", precision="tf32"))
    assert "precision" not in repr(FeedForwardNetwork([4, 3], backend="numpy"))
