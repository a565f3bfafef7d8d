"""Numba CPU backend: GEMMs stay in BLAS (NumPy's), the memory-bound ops are the jitted, fused kernels of
:mod:`.numba_kernels`, and a small training step runs as one jitted call (:mod:`.numba_step`).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from .numba_kernels import (KERNELS, PARALLEL_MIN_ELEMENTS, POLY_EXP_MIN_CLASSES, all_finite_jit,
                            copy_entries_jit, count_runs_jit, csr_gemm_t_add, expand_runs_jit, fill_runs_jit,
                            gather_entries_jit, scatter_entries_jit, sgd_entries_screened, sgd_screened,
                            union_sorted_jit)
from .numpy_ops import NumpyOps, RowSoftmaxNLL
from .threads import blas_threads

# The one-call step (numba_step.py) runs its elementwise kernels serially. On 2 cores it is as fast as the
# per-op path or faster at every size measured (1.00-1.05x from 134k to 2.1M activation elements per step),
# but its serial passes do not scale with cores while the GEMMs do (an estimate, not measured: on 16 cores the
# mnist step's ~50 MB of serial passes, ~5 ms, would sit beside ~11 ms of GEMM). So steps above this size
# keep the parallel per-op kernels.
FUSED_STEP_MAX_ELEMENTS = 1 << 18


class NumbaOps(RowSoftmaxNLL, NumpyOps):
    """CPU backend: BLAS GEMMs from NumPy plus fused, jitted elementwise and row-wise kernels.

    parallel=False keeps every kernel serial: for a process whose cores belong to others (the parameter
    server beside its workers), where waking a thread pool per update would take cores from the training.
    """

    name = "numba"

    def __init__(self, fuse_step: bool = True, parallel: bool = True):
        self.parallel = bool(parallel)
        self.threads = numba.get_num_threads() if parallel else 1
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
        return bool(all_finite_jit(x.reshape(-1)))

    def _pool_free(self) -> bool:
        """Whether numba's thread pool may run parallel kernels here: it has threads, and BLAS (which owns the
        cores otherwise) is single-threaded. See core.backends' thread model."""
        return self.parallel and numba.get_num_threads() > 1 and blas_threads() == 1

    def _kernel(self, name, size):
        serial, parallel = KERNELS[name]
        return parallel if size >= PARALLEL_MIN_ELEMENTS and self._pool_free() else serial

    def bias_add(self, y, b):
        self._kernel("bias_add", y.size)(y, b)
        return y

    def bias_relu(self, y, b):
        self._kernel("bias_relu", y.size)(y, b)
        return y

    def relu_backward(self, g, y):
        self._kernel("relu_backward", g.size)(g, y)
        return g

    def _column_sums(self, kernel, args, g, out):
        if g.size < PARALLEL_MIN_ELEMENTS or self.threads == 1 or not self._pool_free():
            KERNELS[kernel][0](*args, out.reshape(1, -1))   # one block, straight into out
            return out
        partials = self._scratch("partials", (self.threads, g.shape[1]), g.dtype)
        KERNELS[kernel][1](*args, partials)
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
            self._kernel("softmax_exp_rows_f32", z.size)(e, labels, kbits, row_loss, row_ok)
        else:
            self._kernel("softmax_shift_rows", z.size)(z, labels, e, row_loss, row_ok)
            np.exp(e, out=e)
        finish = self._kernel("softmax_finish_rows", z.size)
        loss_sum, correct = finish(e, labels, z.dtype.type(scale), row_loss, row_ok, write_grad)
        return float(loss_sum), int(correct)

    def _sparse_jit(self, X, B, out, precision) -> bool:
        return precision == "fp32" and X.dtype == B.dtype == out.dtype and B.flags.c_contiguous \
            and out.flags.c_contiguous and X.indices.dtype == np.int32 and X.indptr.dtype == np.int64

    def sparse_gemm(self, X, W, out, precision="fp32"):
        if not self._sparse_jit(X, W, out, precision):
            return super().sparse_gemm(X, W, out, precision)
        self._kernel("csr_gemm", X.nnz * out.shape[1])(X.indptr, X.indices, X.values, W, out)
        return out

    def sparse_gemm_t(self, X, G, out, precision="fp32", rows=None):
        if not self._sparse_jit(X, G, out, precision):
            return super().sparse_gemm_t(X, G, out, precision, rows)
        if rows is None:
            out.fill(0)
        else:
            out[rows] = 0
        csr_gemm_t_add(X.indptr, X.indices, X.values, G, out)
        return out

    def dense_stack_gradient(self, dims, w, X, y, grad, acts, deltas, precision="fp32"):
        """The whole step as one jitted call (:mod:`.numba_step`) when NumPy's CBLAS gemm was found and the
        layers are small enough (FUSED_STEP_MAX_ELEMENTS) or the per-op path's kernels could not run in
        parallel anyway. Reduced-precision GEMMs (tf32, bf16) go op by op through the reference's rounding
        ``gemm``: the CPU has no such units, and the emulation is for tests and parity, not speed."""
        if precision != "fp32":
            return NotImplemented
        if not (self.fuse_step and X.dtype == w.dtype == grad.dtype and X.flags.c_contiguous
                and w.flags.c_contiguous and grad.flags.c_contiguous):
            return NotImplemented
        if acts.size > FUSED_STEP_MAX_ELEMENTS and self._pool_free():
            return NotImplemented                  # the per-op path's parallel kernels have the cores
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
        self._kernel("softmax", z.size)(z, out)
        return out

    def sgd_update(self, w, g, lr, out=None):
        if out is None or out is w:
            self._kernel("sgd", w.size)(w, g, w.dtype.type(lr))
            return w
        self._kernel("sgd_into", w.size)(w, g, w.dtype.type(lr), out)
        return out

    def sgd_update_accumulate(self, w, g, lr, acc):
        """One pass: acc += g and w -= lr g (NumPy: two, and a call each)."""
        self._kernel("sgd_accumulate", w.size)(w, g, w.dtype.type(lr), acc)
        return w

    def sgd_update_rows(self, w, g, rows, width, tail, lr, acc=None):
        if not (w.flags.c_contiguous and g.flags.c_contiguous and w.dtype == g.dtype):
            return super().sgd_update_rows(w, g, rows, width, tail, lr, acc)
        size = rows.size * width + w.size - tail
        self._kernel("sgd_rows", size)(w, g, np.asarray(rows, dtype=np.int64), width, tail, w.dtype.type(lr),
                                       w if acc is None else acc, acc is not None)
        return w

    # sgd_update_screened of float32 vectors is one compiled pass plus math.isfinite: no NumPy floating-point
    # warnings, so a caller need not silence them around it (the server's np.errstate per push)
    quiet_screened_sgd = True

    def sgd_update_screened(self, w, g, lr, out):
        """One fused pass: the update, the sum of g*g (NaN/inf gives a bad g away; a finite g whose squares
        overflow is told apart by a second look only then) and the sum of out*0 (NaN for a non-finite result)."""
        if w.dtype != np.float32 or g.dtype != np.float32:
            return super().sgd_update_screened(w, g, lr, out)
        g_screen, out_screen = sgd_screened(w, g, np.float32(lr), out)
        if not math.isfinite(g_screen) and not np.isfinite(g).all():
            return "gradient"
        return None if math.isfinite(out_screen) else "result"

    def sgd_entries_screened(self, w, index, values, lr):
        if not (w.dtype == values.dtype == np.float32 and w.flags.c_contiguous and w.flags.writeable):
            return super().sgd_entries_screened(w, index, values, lr)
        verdict = sgd_entries_screened(w, index, values, np.float32(lr))
        return None if verdict == 0 else "gradient" if verdict == 1 else "result"

    def copy_entries(self, dst, src, index):
        if dst.dtype != src.dtype or dst.ndim != 1 or src.ndim != 1 or not dst.flags.writeable:
            return super().copy_entries(dst, src, index)
        copy_entries_jit(dst, src, index)

    def _union_of(self, arrays) -> np.ndarray:
        if len({a.dtype for a in arrays}) > 1:
            arrays = [a.astype(np.int64, copy=False) for a in arrays]
        merged = arrays[0]
        for other in arrays[1:]:       # pairwise: a reply's union spans the few pushes since the version held
            out = np.empty(merged.size + other.size, dtype=merged.dtype)
            merged = out[:union_sorted_jit(merged, other, out)]
        return merged

    def gather_entries(self, src, index, out=None) -> np.ndarray:
        if out is None:
            out = np.empty(index.size, dtype=src.dtype)
        if src.ndim != 1 or out.dtype != src.dtype:
            return super().gather_entries(src, index, out)
        gather_entries_jit(src, index, out)
        return out

    def scatter_entries(self, dst, index, values) -> None:
        if dst.ndim != 1 or dst.dtype != values.dtype or not dst.flags.writeable:
            return super().scatter_entries(dst, index, values)
        scatter_entries_jit(dst, index, values)

    def count_runs(self, index) -> int:
        return int(count_runs_jit(index))

    def fill_runs(self, index, starts, lengths) -> None:
        fill_runs_jit(index, starts, lengths)

    def expand_runs(self, words, r: int, n: int, k: int) -> np.ndarray:
        out = np.empty(k, dtype=np.int64)
        verdict = expand_runs_jit(words, r, n, out)
        if verdict:
            return super().expand_runs(words, r, n, k)      # says what is wrong
        return out

    def momentum_update(self, w, v, g, lr, momentum, nesterov=False, out=None):
        t = w.dtype.type
        if out is None or out is w:
            self._kernel("momentum", w.size)(w, v, g, t(lr), t(momentum), bool(nesterov))
            return w
        self._kernel("momentum_into", w.size)(w, v, g, t(lr), t(momentum), bool(nesterov), out)
        return out
