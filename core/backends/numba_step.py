"""The numba backend's whole training step in one jitted call, GEMMs included.

A step of the per-op path is about 25 Python calls (11 GEMMs through ``np.matmul`` and the fused kernels of
:mod:`.numba_ops`); on the small nets the calls themselves cost as much as the elementwise work. Here the
forward, the softmax-NLL and the backward run in one compiled function that calls the same kernels and, for
the GEMMs, the very CBLAS ``gemm`` NumPy's matmul uses (found in the library NumPy is linked against, so there
is one BLAS and one BLAS thread pool in the process, not two: a second OpenBLAS, such as SciPy's, would spin
its own threads beside NumPy's on the same cores).

The BLAS entry points are registered with LLVM under fixed names (``ffps_cblas_sgemm``/``_dgemm``) before
anything calls them, so cached machine code (``cache=True``) links to this process's addresses.
Where NumPy's BLAS exposes no ILP64 CBLAS gemm, :func:`blas_problem` says so and the backend keeps the per-op
path, which computes the same thing.

Numba's cache checks only this file's time stamp: after editing a kernel in numba_kernels.py, touch this file
(or clear its ``__pycache__``) or the cached step keeps the old kernel. tests/test_numba_step.py compares
the two paths and fails if they drift apart.
"""
from __future__ import annotations

import ctypes
import functools

import numba
import numpy as np
from llvmlite import binding as llvm
from numba import types
from numba.extending import overload

from .numba_kernels import KERNELS

_CANDIDATES = ("scipy_cblas_{}gemm64_", "cblas_{}gemm64_")   # ILP64 CBLAS, as NumPy >= 2 wheels ship it
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def _numpy_core_library():
    try:
        from numpy._core import _multiarray_umath as core
    except ImportError:   # NumPy 1.x
        from numpy.core import _multiarray_umath as core
    return ctypes.CDLL(core.__file__)   # dlsym on it searches the libraries it links: NumPy's BLAS


@functools.lru_cache(maxsize=None)
def blas_problem() -> str | None:
    """None when NumPy's own CBLAS sgemm/dgemm are registered for jitted code; else why not."""
    try:
        lib = _numpy_core_library()
    except OSError as exc:
        return f"NumPy's core library could not be opened ({exc})"
    return register_gemm(lib)


def register_gemm(lib) -> str | None:
    """Register ``lib``'s ILP64 CBLAS sgemm/dgemm under the names jitted code calls -> None, or, where
    ``lib`` (with what it links) has none, a sentence saying so and nothing registered."""
    for pattern in _CANDIDATES:
        try:
            found = {kind: getattr(lib, pattern.format(kind)) for kind in "sd"}
        except AttributeError:
            continue
        for kind, fn in found.items():
            llvm.add_symbol(f"ffps_cblas_{kind}gemm", ctypes.cast(fn, ctypes.c_void_p).value)
        return None
    return (f"NumPy's BLAS exports none of {', '.join(p.format('s') for p in _CANDIDATES)} "
            "(an ILP64 CBLAS gemm): the numba backend computes each step op by op")


blas_problem()   # register at import: cached code that calls the symbols may be loaded by any later call


def _cblas_type(real):
    i32, i64, ptr = types.int32, types.int64, types.uintp
    return types.ExternalFunction(f"ffps_cblas_{'s' if real is types.float32 else 'd'}gemm", types.void(
        i32, i32, i32, i64, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64))


_sgemm, _dgemm = _cblas_type(types.float32), _cblas_type(types.float64)


def gemm_into(a, b, c, trans_a, trans_b):
    """c <- op(a) @ op(b) for C-contiguous 2-D a, b, c of one float dtype (jitted code only)."""
    raise TypeError("gemm_into is callable from jitted code only")


@overload(gemm_into, jit_options={"cache": True})
def _gemm_into(a, b, c, trans_a, trans_b):
    fn, real = (_sgemm, np.float32) if c.dtype == types.float32 else (_dgemm, np.float64)

    def impl(a, b, c, trans_a, trans_b):
        m, n = c.shape
        k = a.shape[0] if trans_a else a.shape[1]
        # row-major: the leading dimension of a stored (rows, cols) operand is cols, transposed or not
        fn(np.int32(ROW_MAJOR), np.int32(TRANS if trans_a else NO_TRANS), np.int32(TRANS if trans_b else NO_TRANS),
           m, n, k, real(1.0), a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], real(0.0), c.ctypes.data, n)
    return impl


# the serial compilations only: a parallel kernel here leaves numba's OpenMP threads spinning while the next
# GEMM wakes the BLAS threads on the same cores (2 cores: seed-net steps of 8 ms instead of 0.5, every time)
_bias_relu, _bias_add = KERNELS["bias_relu"][0], KERNELS["bias_add"][0]
_bias_grad, _relu_bwd = KERNELS["bias_grad_partials"][0], KERNELS["relu_backward_partials"][0]
_shift, _finish = KERNELS["softmax_shift_rows"][0], KERNELS["softmax_finish_rows"][0]
_exp_f32 = KERNELS["softmax_exp_rows_f32"][0]


@numba.njit(cache=True, nogil=True)
def dense_stack_gradient(dims, w, X, y, grad, acts, deltas, scale, row_loss, row_ok, kbits, poly_exp):
    """One forward + backward of Dense-ReLU-...-Dense-softmax-NLL: the per-op path of
    ``FeedForwardNetwork.gradient_device`` as one call. dims (L+1,) int64 layer sizes; w, grad flat vectors
    of the flat layout (core/network.py); acts/deltas flat workspaces (m * sum(dims[1:]), m * sum(dims[1:-1])); row_loss
    (m,) float64, row_ok (m,) int32 and kbits (m, C) int32 (float32 with ``poly_exp``) scratch. Returns
    (summed NLL, correct count); grad holds the mean loss's gradient."""
    m = X.shape[0]
    L = dims.shape[0] - 1
    w_at = np.empty(L + 1, np.int64)     # layer i's W starts at w_at[i], its b at w_at[i] + d_i * d_{i+1}
    a_at = np.empty(L + 1, np.int64)     # activation i (layer i's output) starts at a_at[i] in acts
    w_at[0] = 0
    a_at[0] = 0
    for i in range(L):
        w_at[i + 1] = w_at[i] + dims[i] * dims[i + 1] + dims[i + 1]
        a_at[i + 1] = a_at[i] + m * dims[i + 1]

    h = X
    for i in range(L):
        d_in, d_out = dims[i], dims[i + 1]
        b_at = w_at[i] + d_in * d_out
        a = acts[a_at[i]:a_at[i + 1]].reshape(m, d_out)
        gemm_into(h, w[w_at[i]:b_at].reshape(d_in, d_out), a, False, False)
        if i < L - 1:
            _bias_relu(a, w[b_at:b_at + d_out])
        else:
            _bias_add(a, w[b_at:b_at + d_out])
        h = a

    g = h                                 # the logits, overwritten by dL/dz
    if poly_exp:
        _exp_f32(g, y, kbits, row_loss, row_ok)
    else:
        _shift(g, y, g, row_loss, row_ok)
        np.exp(g, g)
    loss_sum, correct = _finish(g, y, scale, row_loss, row_ok, True)

    for i in range(L - 1, -1, -1):
        d_in, d_out = dims[i], dims[i + 1]
        b_at = w_at[i] + d_in * d_out
        inputs = X if i == 0 else acts[a_at[i - 1]:a_at[i]].reshape(m, d_in)
        gemm_into(inputs, g, grad[w_at[i]:b_at].reshape(d_in, d_out), True, False)
        if i == L - 1:
            _bias_grad(g, grad[b_at:b_at + d_out].reshape(1, d_out))
        if i > 0:
            # deltas hold one (m, d) block per hidden layer, at the same offsets as their activations
            prev = deltas[a_at[i - 1]:a_at[i]].reshape(m, d_in)
            gemm_into(g, w[w_at[i]:b_at].reshape(d_in, d_out), prev, False, True)
            _relu_bwd(prev, inputs, grad[w_at[i] - d_in:w_at[i]].reshape(1, d_in))   # b_{i-1}'s gradient
            g = prev
    return loss_sum, correct
