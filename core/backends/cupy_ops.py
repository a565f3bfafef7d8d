"""CuPy GPU backend: cuBLAS GEMMs, fused elementwise kernels, and a warp-per-row softmax-NLL kernel.

Kernels are module-level objects that CuPy compiles on first launch (never at import). Type placeholders
(``T``) give float32 and float64 from one source. The single RawKernel (softmax-NLL) exists because one pass
must produce the row max, argmax, log-sum-exp and gradient together; it asserts C-contiguity because raw
kernels ignore strides.
"""
from __future__ import annotations

import functools

import cupy
import numpy as np

from .numpy_ops import NumpyOps, RowSoftmaxNLL

_bias_add = cupy.ElementwiseKernel("T b", "T y", "y = y + b", "ffps_bias_add")
_bias_relu = cupy.ElementwiseKernel("T b", "T y", "T v = y + b; y = v > (T)0 ? v : (T)0", "ffps_bias_relu")
_relu_backward = cupy.ElementwiseKernel("T y", "T g", "if (!(y > (T)0)) g = (T)0", "ffps_relu_backward")
_sgd = cupy.ElementwiseKernel("T g, T lr", "T w", "w = w - lr * g", "ffps_sgd")
_momentum = cupy.ElementwiseKernel(
    "T g, T lr, T mu, bool nesterov", "T w, T v",
    "T vi = mu * v + g; v = vi; w = w - lr * (nesterov ? g + mu * vi : vi)", "ffps_momentum")
_finite_all = cupy.ReductionKernel("T x", "bool y", "isfinite(x)", "a && b", "y = a", "true", "ffps_all_finite")

_SOFTMAX_NLL_SOURCE = r"""
template<typename T>
__global__ void ffps_softmax_nll_rows(const T* z, const int* labels, T* out, double* row_loss, int* row_ok,
                                      const int m, const int c, const T scale, const int write_grad) {
    // One warp per row, grid-stride over rows. Lanes stride over the row's columns (coalesced), then
    // shuffle-reduce max/argmax and the exponential sum. ``out`` may alias ``z``.
    const int lane = threadIdx.x & 31;
    const long long warps_per_block = blockDim.x >> 5;
    const long long first = (long long)blockIdx.x * warps_per_block + (threadIdx.x >> 5);
    const long long stride = (long long)gridDim.x * warps_per_block;
    for (long long row = first; row < m; row += stride) {
        const T* zr = z + row * c;
        T best = zr[0];
        int arg = 0;
        for (int q = lane; q < c; q += 32) {
            const T v = zr[q];
            if (v > best || (v == best && q < arg)) { best = v; arg = q; }
        }
        for (int off = 16; off > 0; off >>= 1) {
            const T ob = __shfl_xor_sync(0xffffffffu, best, off);
            const int oa = __shfl_xor_sync(0xffffffffu, arg, off);
            if (ob > best || (ob == best && oa < arg)) { best = ob; arg = oa; }
        }
        T total = 0;
        for (int q = lane; q < c; q += 32) total += exp(zr[q] - best);
        for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
        const int label = labels[row];
        const T z_label = zr[label];
        __syncwarp();  // every lane has read the row before any lane overwrites it (out may alias z)
        if (lane == 0) {
            row_loss[row] = (double)(log(total) - (z_label - best));
            row_ok[row] = arg == label ? 1 : 0;
        }
        if (write_grad) {
            const T inv = scale / total;
            T* orow = out + row * c;
            for (int q = lane; q < c; q += 32) {
                const T g = exp(zr[q] - best) * inv;
                orow[q] = q == label ? g - scale : g;
            }
        }
        __syncwarp();
    }
}
"""


@functools.lru_cache(maxsize=None)
def _softmax_nll_kernel(dtype_name: str):
    """Compiled on first use, once per dtype."""
    ctype = {"float32": "float", "float64": "double"}[dtype_name]
    name = f"ffps_softmax_nll_rows<{ctype}>"
    module = cupy.RawModule(code=_SOFTMAX_NLL_SOURCE, options=("-std=c++14",), name_expressions=[name])
    return module.get_function(name)


class CupyOps(RowSoftmaxNLL, NumpyOps):
    """GPU backend on one CUDA device (``device`` ordinal, default the current one), made current here."""

    name = "cupy"
    ROWS_PER_BLOCK = 8           # 256 threads = 8 warps, one row each
    MAX_BLOCKS = 65535

    def __init__(self, device: int | None = None):
        self.device = cupy.cuda.Device(device if device is not None else cupy.cuda.runtime.getDevice())
        self.device.use()
        self.device_id = self.device.id

    # ----------------------------------------------------------------- memory
    def asarray(self, x, dtype=None):
        return cupy.ascontiguousarray(cupy.asarray(x, dtype=dtype))

    def to_host(self, x, out=None):
        if not isinstance(x, cupy.ndarray):
            return super().to_host(x, out)
        if out is None:
            return cupy.asnumpy(x)
        x.get(out=out)
        return out

    def empty(self, shape, dtype):
        return cupy.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return cupy.zeros(shape, dtype=dtype)

    def is_device_array(self, x) -> bool:
        return isinstance(x, cupy.ndarray)

    def take_rows(self, x, index, out=None):
        return cupy.take(x, index, axis=0, out=out)

    def all_finite(self, x) -> bool:
        return bool(_finite_all(x))

    def synchronize(self):
        cupy.cuda.get_current_stream().synchronize()

    # ------------------------------------------------------------ linear algebra
    def gemm(self, a, b, out=None, trans_a=False, trans_b=False):
        """cuBLAS through cupy.matmul; transposed operands are views, passed to cuBLAS as transpose flags."""
        return cupy.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)

    # -------------------------------------------------------------- dense layer
    def bias_add(self, y, b):
        _bias_add(b, y)
        return y

    def bias_relu(self, y, b):
        _bias_relu(b, y)
        return y

    def relu(self, x, out=None):
        return cupy.maximum(x, 0, out=out)

    def relu_backward(self, g, y):
        _relu_backward(y, g)
        return g

    def bias_grad(self, g, out):
        cupy.sum(g, axis=0, out=out)
        return out

    def relu_backward_bias_grad(self, g, y, out):
        _relu_backward(y, g)
        cupy.sum(g, axis=0, out=out)
        return out

    # ----------------------------------------------------------- softmax + NLL
    def _softmax_nll_rows(self, z, labels, scale, out, write_grad):
        if not z.flags.c_contiguous or (out is not None and not out.flags.c_contiguous):
            raise ValueError("softmax_nll needs C-contiguous logits and output (raw kernel ignores strides)")
        m, c = z.shape
        labels = cupy.ascontiguousarray(labels, dtype=cupy.int32)
        row_loss = self._scratch("row_loss", (m,), cupy.float64)
        row_ok = self._scratch("row_ok", (m,), cupy.int32)
        blocks = min(self.MAX_BLOCKS, (m + self.ROWS_PER_BLOCK - 1) // self.ROWS_PER_BLOCK)
        kernel = _softmax_nll_kernel(z.dtype.name)
        kernel((blocks,), (32 * self.ROWS_PER_BLOCK,),
               (z, labels, out if write_grad else z, row_loss, row_ok, np.int32(m), np.int32(c),
                z.dtype.type(scale), np.int32(1 if write_grad else 0)))
        return float(row_loss.sum()), int(row_ok.sum())

    def softmax(self, z, out=None):
        e = cupy.exp(z - z.max(axis=1, keepdims=True))
        e /= e.sum(axis=1, keepdims=True)
        if out is None:
            return e
        out[...] = e
        return out

    # --------------------------------------------------------------- optimizers
    # in-place kernels; with ``out`` the weights are copied there first and updated in place
    def sgd_update(self, w, g, lr, out=None):
        out = self._into(w, out)
        _sgd(g, out.dtype.type(lr), out)
        return out

    def momentum_update(self, w, v, g, lr, momentum, nesterov=False, out=None):
        out = self._into(w, out)
        t = out.dtype.type
        _momentum(g, t(lr), t(momentum), bool(nesterov), out, v)
        return out

    @staticmethod
    def _into(w, out):
        if out is None or out is w:
            return w
        out[...] = w
        return out
