"""The numba backend's jitted kernels, in a module of their own: the per-op backend (:mod:`.numba_ops`) and the
one-call step (:mod:`.numba_step`) both call them, and neither imports the other's internals.

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

from .threads import cap_numba_threads

cap_numba_threads()            # a cap set before numba loaded (limit_cpu_threads) holds for its pool too

# Fast-math that keeps NaN/inf semantics: no 'nnan'/'ninf', so a diverging loss is still seen as NaN.
FASTMATH_FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}
PARALLEL_MIN_ELEMENTS = 1 << 15   # below this, the serial kernel wins on 2 cores (bench/step_bench.py)
POLY_EXP_MIN_CLASSES = 32         # narrower logit rows barely fill the vector loop: NumPy's exp is as fast


def _jit_pair(fn, fastmath=FASTMATH_FLAGS):
    """Serial and parallel compilations of one kernel body (prange is plain range when serial). Without the
    GIL: a sharded parameter server updates its slices in as many threads at once."""
    serial = numba.njit(cache=True, fastmath=fastmath, parallel=False, nogil=True)(fn)
    parallel = numba.njit(cache=True, fastmath=fastmath, parallel=True, nogil=True)(fn)
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


# Each update twice: in place, and into another buffer (the parameter server's). One kernel for both would
# write through an ``out`` that may alias ``w``: LLVM's run-time alias check then takes the scalar loop, 4x
# slower on a 7.5k vector (4.3 vs 1.1 us), which is a sixth of a digits step.
def _sgd(w, g, lr):
    for i in prange(w.shape[0]):
        w[i] -= lr * g[i]


def _sgd_into(w, g, lr, out):
    for i in prange(w.shape[0]):
        out[i] = w[i] - lr * g[i]


def _sgd_accumulate(w, g, lr, acc):
    for i in prange(w.shape[0]):
        gi = g[i]
        acc[i] += gi
        w[i] -= lr * gi


def _sgd_rows(w, g, rows, width, tail, lr, acc, add):
    """_sgd_accumulate (``add``: else the plain update; acc is then not read) on rows ``rows`` (unique) of the
    (-1, width) block w[:tail] and on all of w[tail:]."""
    for k in prange(rows.shape[0]):
        base = rows[k] * width
        for j in range(width):
            gi = g[base + j]
            if add:
                acc[base + j] += gi
            w[base + j] -= lr * gi
    for i in prange(tail, w.shape[0]):
        gi = g[i]
        if add:
            acc[i] += gi
        w[i] -= lr * gi


def _momentum(w, v, g, lr, mu, nesterov):
    for i in prange(w.shape[0]):
        vi = mu * v[i] + g[i]
        v[i] = vi
        w[i] -= lr * (g[i] + mu * vi if nesterov else vi)


def _momentum_into(w, v, g, lr, mu, nesterov, out):
    for i in prange(w.shape[0]):
        vi = mu * v[i] + g[i]
        v[i] = vi
        out[i] = w[i] - lr * (g[i] + mu * vi if nesterov else vi)


def _sgd_screened(w, g, lr, out):
    """out = w - lr g in one pass, returning (sum(g*g), sum(out*0)): the first is NaN/inf when g holds one,
    the second NaN when out does (x*0 is 0 for finite x; no 'nnan'/'ninf' flag lets LLVM fold it away). The
    parameter server's screen, update and check of a pushed gradient in one read of g."""
    s = np.float32(0.0)
    z = np.float32(0.0)
    zero = np.float32(0.0)
    for i in range(w.shape[0]):
        gi = g[i]
        s += gi * gi
        oi = w[i] - lr * gi
        out[i] = oi
        z += oi * zero
    return s, z


def _sgd_entries_screened(w, index, values, lr):
    """The SGD step of a sparse push on w's entries ``index``: 0 when written; 1 (a NaN/inf value) or 2 (a
    non-finite result) with nothing written. Two reads of the k entries and no temporaries: a gather, an
    update into a copy and a scatter took 0.12 ms for 48k entries of a [262144, 16, 2] window (fresh pages)."""
    for p in range(index.shape[0]):
        v = values[p]
        if not math.isfinite(v):
            return 1
        if not math.isfinite(w[index[p]] - lr * v):
            return 2
    for p in range(index.shape[0]):
        i = index[p]
        w[i] = w[i] - lr * values[p]
    return 0


def _copy_entries(dst, src, index):
    """dst[index] = src[index] without the gathered temporary."""
    for p in range(index.shape[0]):
        i = index[p]
        dst[i] = src[i]


def _expand_runs(words, r, n, out):
    """The indices of a RUNS32 payload (words: r, r starts, r lengths, then the values) into ``out`` (k,),
    checked: 0 when every run holds at least one index, the runs increase with a gap between them, end by
    ``n`` and cover exactly k indices; else 1 (a run out of order, empty or out of range) or 2 (the count)."""
    k = out.shape[0]
    pos = 0
    last = -1                       # the previous run's end (exclusive); a run must start after it
    for j in range(r):
        start = np.int64(words[1 + j])
        length = np.int64(words[1 + r + j])
        if length < 1 or start <= last or start + length > n:
            return 1
        if pos + length > k:
            return 2
        for i in range(length):
            out[pos + i] = start + i
        pos += length
        last = start + length
    return 0 if pos == k else 2


def _union_sorted(a, b, out):
    """The union of the strictly increasing a and b into ``out`` (at least len(a) + len(b)) -> its length."""
    i = j = k = 0
    while i < a.shape[0] and j < b.shape[0]:
        x, y = a[i], b[j]
        if x <= y:
            out[k] = x
            i += 1
            if x == y:
                j += 1
        else:
            out[k] = y
            j += 1
        k += 1
    while i < a.shape[0]:
        out[k] = a[i]
        i += 1
        k += 1
    while j < b.shape[0]:
        out[k] = b[j]
        j += 1
        k += 1
    return k


def _gather_entries(src, index, out):
    """out = src[index] without NumPy's index conversion (a uint32 index is cast to intp first)."""
    for p in range(index.shape[0]):
        out[p] = src[index[p]]


def _scatter_entries(dst, index, values):
    """dst[index] = values."""
    for p in range(index.shape[0]):
        dst[index[p]] = values[p]


def _count_runs(index):
    """The runs of consecutive values in ``index`` (strictly increasing)."""
    if index.shape[0] == 0:
        return 0
    r = 1
    for p in range(1, index.shape[0]):
        if index[p] != index[p - 1] + 1:
            r += 1
    return r


def _fill_runs(index, starts, lengths):
    """The starts and lengths of ``index``'s runs (as :func:`_count_runs` counts them)."""
    j = 0
    starts[0] = index[0]
    run = 1
    for p in range(1, index.shape[0]):
        if index[p] == index[p - 1] + 1:
            run += 1
        else:
            lengths[j] = run
            j += 1
            starts[j] = index[p]
            run = 1
    lengths[j] = run


def _csr_gemm(indptr, indices, values, W, out):
    """out (m, n) = CSR rows @ W (k, n); ``indptr`` (m + 1,) holds absolute offsets (a row view's)."""
    m, n = out.shape
    zero = out.dtype.type(0)
    for r in prange(m):
        for j in range(n):
            out[r, j] = zero
        for p in range(indptr[r], indptr[r + 1]):
            c = indices[p]
            v = values[p]
            for j in range(n):
                out[r, j] += v * W[c, j]


def _csr_gemm_t_add(indptr, indices, values, G, out):
    """out (k, n) += (CSR rows)^T @ G (m, n): a scatter of each stored value's row of G. Serial: two rows may
    write one column's row of out. The caller zeroes out first."""
    m, n = G.shape
    for r in range(m):
        for p in range(indptr[r], indptr[r + 1]):
            c = indices[p]
            v = values[p]
            for j in range(n):
                out[c, j] += v * G[r, j]


def _all_finite(x):
    for i in range(x.shape[0]):
        if not math.isfinite(x[i]):
            return False
    return True


KERNELS = {name: _jit_pair(fn) for name, fn in [
    ("bias_relu", _bias_relu), ("bias_add", _bias_add), ("relu_backward", _relu_backward),
    ("bias_grad_partials", _bias_grad_partials), ("relu_backward_partials", _relu_backward_partials),
    ("softmax_shift_rows", _softmax_shift_rows),
    ("softmax_finish_rows", _softmax_finish_rows),
    ("softmax", _softmax), ("momentum", _momentum), ("momentum_into", _momentum_into), ("csr_gemm", _csr_gemm)]}
# no 'reassoc' here: it would fold (t + shifter) - shifter back into t
KERNELS["softmax_exp_rows_f32"] = _jit_pair(_softmax_exp_rows_f32, fastmath=FASTMATH_FLAGS - {"reassoc"})
# no 'contract' in either SGD kernel: out is exactly NumPy's w - lr * g, with or without the screen (the server
# may take either path for the same update); 'reassoc' lets the screen's sum vectorise and keeps NaN/inf
KERNELS["sgd"] = _jit_pair(_sgd, fastmath={"reassoc"})
KERNELS["sgd_into"] = _jit_pair(_sgd_into, fastmath={"reassoc"})
KERNELS["sgd_accumulate"] = _jit_pair(_sgd_accumulate, fastmath={"reassoc"})
KERNELS["sgd_rows"] = _jit_pair(_sgd_rows, fastmath={"reassoc"})
all_finite_jit = numba.njit(cache=True, nogil=True)(_all_finite)
csr_gemm_t_add = numba.njit(cache=True, fastmath=FASTMATH_FLAGS, nogil=True)(_csr_gemm_t_add)
sgd_screened = numba.njit(cache=True, fastmath={"reassoc"}, boundscheck=False, nogil=True)(_sgd_screened)
# no fastmath: the step is exactly NumPy's w - lr * g on the entries, and isfinite must not be folded away
sgd_entries_screened = numba.njit(cache=True, nogil=True)(_sgd_entries_screened)
copy_entries_jit = numba.njit(cache=True, nogil=True)(_copy_entries)
expand_runs_jit = numba.njit(cache=True, nogil=True)(_expand_runs)
count_runs_jit = numba.njit(cache=True, nogil=True)(_count_runs)
union_sorted_jit = numba.njit(cache=True, nogil=True)(_union_sorted)
gather_entries_jit = numba.njit(cache=True, nogil=True)(_gather_entries)
scatter_entries_jit = numba.njit(cache=True, nogil=True)(_scatter_entries)
fill_runs_jit = numba.njit(cache=True, nogil=True)(_fill_runs)
