"""Numba CPU backend: GEMMs stay in BLAS (NumPy's), the memory-bound ops are jitted and fused.

Each fused kernel exists twice, serial and ``parallel=True`` (prange over rows): on small arrays the cost of
waking the thread pool exceeds the work, so the dispatcher picks by element count. Reductions over rows use
per-thread partial buffers merged afterwards: no prange iteration ever accumulates into a shared slice.
Jitting is lazy (no signatures), so importing this module compiles nothing; ``cache=True`` keeps the machine
code between processes.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from .numpy_ops import NumpyOps, RowSoftmaxNLL

# Fast-math that keeps NaN/inf semantics: no 'nnan'/'ninf', so a diverging loss is still seen as NaN.
FASTMATH_FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}
PARALLEL_MIN_ELEMENTS = 1 << 15   # below this, the serial kernel wins on 2 cores (bench/step_bench.py)
# The one-call step (numba_step.py) runs its elementwise kernels serially. On 2 cores it is as fast as the
# per-op path or faster at every size measured (1.00-1.05x from 134k to 2.1M activation elements per step),
# but its serial passes do not scale with cores while the GEMMs do (an estimate, not measured: on 16 cores the
# mnist step's ~50 MB of serial passes, ~5 ms, would sit beside ~11 ms of GEMM). So steps above this size
# keep the parallel per-op kernels.
FUSED_STEP_MAX_ELEMENTS = 1 << 18
POLY_EXP_MIN_CLASSES = 32         # narrower logit rows barely fill the vector loop: NumPy's exp is as fast


def _jit_pair(fn, fastmath=FASTMATH_FLAGS):
    """Serial and parallel compilations of one kernel body (prange is plain range when serial)."""
    serial = numba.njit(cache=True, fastmath=fastmath, parallel=False)(fn)
    parallel = numba.njit(cache=True, fastmath=fastmath, parallel=True)(fn)
    return serial, parallel


def _bias_relu(y, b):
    m, n = y.shape
    zero = y.dtype.type(0)   # a typed zero: a literal 0 would unify float32 with int64 into float64
    for i in prange(m):
        for j in range(n):
            v = y[i, j] + b[j]
            y[i, j] = v if v > 0 else zero


def _bias_add(y, b):
    m, n = y.shape
    for i in prange(m):
        for j in range(n):
            y[i, j] += b[j]


def _relu_backward(g, y):
    m, n = g.shape
    zero = g.dtype.type(0)
    for i in prange(m):
        for j in range(n):
            g[i, j] = g[i, j] if y[i, j] > 0 else zero  # a select, not a branch: vectorizes


def _bias_grad_partials(g, partials):
    """partials (T, n): row block t of g summed into partials[t]; blocks are disjoint across threads.
    With T == 1 the caller passes out[None, :] and no merge is needed. Each block sums into a fresh local
    array: LLVM then knows it aliases nothing and vectorizes the row loop."""
    m, n = g.shape
    blocks = partials.shape[0]
    step = (m + blocks - 1) // blocks
    for t in prange(blocks):
        acc = np.zeros(n, dtype=partials.dtype)
        for i in range(t * step, min(m, (t + 1) * step)):
            for j in range(n):
                acc[j] += g[i, j]
        partials[t, :] = acc


def _relu_backward_partials(g, y, partials):
    """Fused: g <- g * [y > 0] and its column sums per row block, in one pass over g."""
    m, n = g.shape
    zero = g.dtype.type(0)
    blocks = partials.shape[0]
    step = (m + blocks - 1) // blocks
    for t in prange(blocks):
        acc = np.zeros(n, dtype=partials.dtype)
        for i in range(t * step, min(m, (t + 1) * step)):
            for j in range(n):
                v = g[i, j] if y[i, j] > 0 else zero
                g[i, j] = v
                acc[j] += v
        partials[t, :] = acc


@numba.njit(inline="always", cache=True)
def _row_max_and_label(z, p, labels, row_loss, row_ok):
    """Row p of logits z: its max (returned), whether its argmax is the label (row_ok[p]), and
    -z'_{p,y_p} = max - z[p, y_p] (row_loss[p]). Inlined into the softmax kernels."""
    zmax = z[p, 0]
    arg = 0
    for q in range(1, z.shape[1]):
        if z[p, q] > zmax:
            zmax = z[p, q]
            arg = q
    label = labels[p]
    row_ok[p] = 1 if arg == label else 0
    row_loss[p] = zmax - z[p, label]
    return zmax


def _softmax_shift_rows(z, labels, out, row_loss, row_ok):
    """Pass 1 per row p: max, argmax hit, -z'_{p,y_p} into row_loss, z' = z - max into out (may alias z)."""
    m, c = z.shape
    for p in prange(m):
        zmax = _row_max_and_label(z, p, labels, row_loss, row_ok)
        for q in range(c):
            out[p, q] = z[p, q] - zmax


def _softmax_finish_rows(e, labels, scale, row_loss, row_ok, write_grad):
    """Pass 2 per row, on e = exp(z'): NLL = log(sum e) - z'_y; optionally e <- (e / sum e - onehot) * scale.
    Returns (summed NLL, correct count)."""
    m, c = e.shape
    loss_sum = 0.0
    correct = 0
    for p in prange(m):
        total = 0.0
        for q in range(c):
            total += e[p, q]
        loss_sum += row_loss[p] + math.log(total)
        correct += row_ok[p]
        if write_grad:
            inv = scale / total
            for q in range(c):
                e[p, q] *= inv
            e[p, labels[p]] -= scale
    return loss_sum, correct


def _softmax_exp_rows_f32(z, labels, kbits, row_loss, row_ok):
    """float32 pass 1 per row p, in place: max, argmax hit, -z'_{p,y_p}, then z <- exp(z - max) (one array:
    an output that may alias the input makes LLVM fall back to scalar code when it does). exp is a
    Cephes-style polynomial LLVM vectorises (NumPy's float32 exp runs its scalar loop without AVX-512:
    2.5 ns per value here). Relative error < 1e-7 for z' >= -87; below, where exp
    underflows, it gives ~1e-38 instead of 0 (a tiny term beside the row's max term, exp(0) = 1).
    NaN propagates: a NaN logit makes its row's sum, so its loss, NaN. The row sums are left to
    :func:`_softmax_finish_rows`, compiled with 'reassoc' so they vectorise (this kernel must not be)."""
    m, c = z.shape
    log2e = np.float32(1.4426950408889634)
    ln2_hi, ln2_lo = np.float32(0.693359375), np.float32(-2.12194440e-4)
    lowest, zero = np.float32(-87.0), np.float32(0.0)
    shifter = np.float32(12582912.0)      # 1.5 * 2**23: (t + shifter) - shifter rounds t to an integer
    bits = z.view(np.int32)
    for p in prange(m):
        zmax = _row_max_and_label(z, p, labels, row_loss, row_ok)
        for q in range(c):
            v = z[p, q] - zmax
            v = lowest if v < lowest else v                # keeps NaN (NaN < x is False)
            k = (v * log2e + shifter) - shifter
            k = k if k == k else zero                      # no float -> int conversion of NaN below
            f = v - k * ln2_hi - k * ln2_lo                # f in [-ln2/2, ln2/2]
            f2 = f * f
            # e^f = 1 + f + f^2 P(f), P of degree 5 (Cephes expf) in Estrin's form: 3 dependent FMAs, not
            # Horner's 6, so the vectorised loop is not bound by FMA latency
            lo_ = np.float32(5.0000001201e-1) + np.float32(1.6666665459e-1) * f
            mid = np.float32(4.1665795894e-2) + np.float32(8.3334519073e-3) * f
            hi_ = np.float32(1.3981999507e-3) + np.float32(1.9875691500e-4) * f
            poly = lo_ + f2 * (mid + f2 * hi_)
            z[p, q] = np.float32(1.0) + f + f2 * poly
            kbits[p, q] = np.int32(k) << 23
        for q in range(c):
            bits[p, q] += kbits[p, q]                      # times 2^k: add k to the exponent field


def _softmax(z, out):
    m, c = z.shape
    for p in prange(m):
        zmax = z[p, 0]
        for q in range(1, c):
            zmax = max(zmax, z[p, q])
        total = 0.0
        for q in range(c):
            e = math.exp(z[p, q] - zmax)
            out[p, q] = e
            total += e
        inv = 1.0 / total
        for q in range(c):
            out[p, q] *= inv


def _sgd(w, g, lr):
    for i in prange(w.shape[0]):
        w[i] -= lr * g[i]


def _momentum(w, v, g, lr, mu, nesterov):
    for i in prange(w.shape[0]):
        vi = mu * v[i] - lr * g[i]
        v[i] = vi
        w[i] += mu * vi - lr * g[i] if nesterov else vi


def _sgd_screened(w, g, lr, out):
    """out = w - lr g in one pass, returning sum(g*g): NaN/inf when g holds one (the parameter server's
    screen and update of a pushed gradient in one read of g)."""
    s = np.float32(0.0)
    for i in range(w.shape[0]):
        gi = g[i]
        s += gi * gi
        out[i] = w[i] - lr * gi
    return s


def _all_finite(x):
    for i in range(x.shape[0]):
        if not math.isfinite(x[i]):
            return False
    return True


_KERNELS = {name: _jit_pair(fn) for name, fn in [
    ("bias_relu", _bias_relu), ("bias_add", _bias_add), ("relu_backward", _relu_backward),
    ("bias_grad_partials", _bias_grad_partials), ("relu_backward_partials", _relu_backward_partials),
    ("softmax_shift_rows", _softmax_shift_rows),
    ("softmax_finish_rows", _softmax_finish_rows),
    ("softmax", _softmax), ("sgd", _sgd), ("momentum", _momentum)]}
# no 'reassoc' here: it would fold (t + shifter) - shifter back into t
_KERNELS["softmax_exp_rows_f32"] = _jit_pair(_softmax_exp_rows_f32, fastmath=FASTMATH_FLAGS - {"reassoc"})
_all_finite_jit = numba.njit(cache=True)(_all_finite)
# reassoc only: vectorises the sum and keeps NaN/inf semantics; no contract, so out == NumPy's w - lr * g
sgd_screened = numba.njit(cache=True, fastmath={"reassoc"}, boundscheck=False)(_sgd_screened)


def _kernel(name, size):
    serial, parallel = _KERNELS[name]
    return parallel if size >= PARALLEL_MIN_ELEMENTS else serial


class NumbaOps(RowSoftmaxNLL, NumpyOps):
    """CPU backend: BLAS GEMMs from NumPy plus fused, jitted elementwise and row-wise kernels."""

    name = "numba"

    def __init__(self, fuse_step: bool = True):
        self.threads = numba.get_num_threads()
        self.fuse_step, self.fuse_problem = False, "turned off (fuse_step=False)"
        if fuse_step:
            from .numba_step import blas_problem, dense_stack_gradient   # registers NumPy's CBLAS gemm
            self.fuse_problem = blas_problem()     # None, or why each step goes op by op
            self.fuse_step = self.fuse_problem is None
            self._fused_step = dense_stack_gradient

    def all_finite(self, x) -> bool:
        x = np.asarray(x)
        if x.dtype.kind != "f" or not x.flags.c_contiguous:
            return super().all_finite(x)
        return bool(_all_finite_jit(x.reshape(-1)))

    def bias_add(self, y, b):
        _kernel("bias_add", y.size)(y, b)
        return y

    def bias_relu(self, y, b):
        _kernel("bias_relu", y.size)(y, b)
        return y

    def relu_backward(self, g, y):
        _kernel("relu_backward", g.size)(g, y)
        return g

    def _column_sums(self, kernel, args, g, out):
        if g.size < PARALLEL_MIN_ELEMENTS or self.threads == 1:
            _KERNELS[kernel][0](*args, out.reshape(1, -1))   # one block, straight into out
            return out
        partials = self._scratch("partials", (self.threads, g.shape[1]), g.dtype)
        _KERNELS[kernel][1](*args, partials)
        np.sum(partials, axis=0, out=out)
        return out

    def bias_grad(self, g, out):
        return self._column_sums("bias_grad_partials", (g,), g, out)

    def relu_backward_bias_grad(self, g, y, out):
        return self._column_sums("relu_backward_partials", (g, y), g, out)

    def _softmax_nll_rows(self, z, labels, scale, out, write_grad):
        """Softmax-NLL in two jitted row passes: shift + argmax + label logit + exp (float32 with at least
        POLY_EXP_MIN_CLASSES classes: a polynomial LLVM vectorises; otherwise NumPy's exp in place between
        the passes, as LLVM cannot vectorise math.exp without SVML), then sum/log/gradient."""
        m = z.shape[0]
        row_loss = self._scratch("row_loss", (m,), np.float64)
        row_ok = self._scratch("row_ok", (m,), np.int32)
        e = out if write_grad else self._scratch("exp", z.shape, z.dtype)
        if z.dtype == np.float32 and z.shape[1] >= POLY_EXP_MIN_CLASSES:
            kbits = self._scratch("exp_bits", z.shape, np.int32)
            if e is not z:
                np.copyto(e, z)
            _kernel("softmax_exp_rows_f32", z.size)(e, labels, kbits, row_loss, row_ok)
        else:
            _kernel("softmax_shift_rows", z.size)(z, labels, e, row_loss, row_ok)
            np.exp(e, out=e)
        loss_sum, correct = _kernel("softmax_finish_rows", z.size)(e, labels, z.dtype.type(scale), row_loss,
                                                                  row_ok, write_grad)
        return float(loss_sum), int(correct)

    def dense_stack_gradient(self, dims, w, X, y, grad, acts, deltas):
        """The whole step as one jitted call (:mod:`.numba_step`) when NumPy's CBLAS gemm was found and the
        layers are small enough (FUSED_STEP_MAX_ELEMENTS) or numba has one thread."""
        if not (self.fuse_step and X.dtype == w.dtype == grad.dtype and X.flags.c_contiguous
                and w.flags.c_contiguous and grad.flags.c_contiguous):
            return NotImplemented
        if acts.size > FUSED_STEP_MAX_ELEMENTS and numba.get_num_threads() > 1:
            return NotImplemented
        args = self._step_args(X.shape[0], int(dims[-1]), X.dtype)
        loss_sum, correct = self._fused_step(dims, w, X, y, grad, acts, deltas, *args)
        return float(loss_sum), int(correct)

    def _step_args(self, m, classes, dtype):
        """The one-call step's trailing arguments for a batch of m rows: (scale, row_loss, row_ok, exp bits,
        poly_exp), looked up once per (m, classes, dtype) and thread (the scratch views the per-op softmax
        uses too; looking them up each call cost a third of a batch-32 digits step); a few sizes are kept."""
        cache = self._per_thread("step_args")
        key = (m, classes, dtype)
        args = cache.get(key)
        if args is None:
            poly_exp = dtype == np.float32 and classes >= POLY_EXP_MIN_CLASSES
            args = (dtype.type(1.0 / m), self._scratch("row_loss", (m,), np.float64),
                    self._scratch("row_ok", (m,), np.int32),
                    self._scratch("exp_bits", (m, classes) if poly_exp else (1, 1), np.int32), poly_exp)
            while len(cache) >= 8:
                cache.pop(next(iter(cache)))
            cache[key] = args
        return args

    def softmax(self, z, out=None):
        if out is None:
            out = np.empty_like(z)
        _kernel("softmax", z.size)(z, out)
        return out

    def sgd_update(self, w, g, lr):
        _kernel("sgd", w.size)(w, g, w.dtype.type(lr))
        return w

    def momentum_update(self, w, v, g, lr, momentum, nesterov=False):
        t = w.dtype.type
        _kernel("momentum", w.size)(w, v, g, t(lr), t(momentum), bool(nesterov))
        return w
