"""CuPy GPU backend: cuBLAS GEMMs, fused elementwise kernels, and a warp-per-row softmax-NLL kernel.

Kernels are module-level objects that CuPy compiles on first launch (never at import). Type placeholders
(``T``) give float32 and float64 from one source. The RawKernels (softmax-NLL) exist because one pass
must produce the row max, argmax, log-sum-exp and gradient together; they assert C-contiguity because raw
kernels ignore strides.

Beyond the op-by-op path (the verified default):
* ``precision`` "tf32"/"bf16": cublasGemmEx with float32 data and the compute types
  CUBLAS_COMPUTE_32F_FAST_TF32 / CUBLAS_COMPUTE_32F_FAST_16BF: tensor cores round the inputs, accumulate in
  float32 (the NumPy reference's ``gemm`` emulates the same on the CPU).
* recorded windows (:mod:`core.windows`): :meth:`CupyOps.capture_graph` records a step on a side stream into a
  ``cupy.cuda.Graph``; while recording (and while warming up for it) GEMMs and column sums go straight to
  cuBLAS with caller-owned outputs, so nothing allocates from the memory pool, and the loss and correct count
  are summed on the device (``softmax_nll_grad_sum``). A recording that allocates anyway is thrown away.
* host transfers: page-locked buffers and device->host copies on a side stream (``copy_to_host_async``), so
  a worker's exchange overlaps its next window.
"""
from __future__ import annotations

import contextlib
import functools
import time

import cupy
import numpy as np
from cupy.cuda import runtime

try:                                   # CuPy >= 9 keeps the thin cuBLAS wrapper here
    from cupy_backends.cuda.libs import cublas
except ImportError:  # pragma: no cover - older layouts
    from cupy.cuda import cublas

from .numpy_ops import NumpyOps, RowSoftmaxNLL, Transfer

# cuBLAS / CUDA enums (cublas_api.h, library_types.h); numbers, so no attribute of a CuPy version is assumed
_CUDA_R_32F, _CUDA_R_64F = 0, 1
_COMPUTE_32F, _COMPUTE_64F, _COMPUTE_32F_FAST_16BF, _COMPUTE_32F_FAST_TF32 = 68, 70, 75, 77
_OP_N, _OP_T = 0, 1
_GEMM_DEFAULT = -1
_POINTER_MODE_HOST = 0
_MEMCPY_H2D = getattr(runtime, "memcpyHostToDevice", 1)
_MEMCPY_D2H = getattr(runtime, "memcpyDeviceToHost", 2)
COMPUTE_TYPES = {"fp32": _COMPUTE_32F, "tf32": _COMPUTE_32F_FAST_TF32, "bf16": _COMPUTE_32F_FAST_16BF}
_ONE = {np.dtype(np.float32): np.ones(1, np.float32), np.dtype(np.float64): np.ones(1, np.float64)}
_ZERO = {np.dtype(np.float32): np.zeros(1, np.float32), np.dtype(np.float64): np.zeros(1, np.float64)}

@functools.lru_cache(maxsize=None)
def _libcublas():
    """libcublas as loaded into this process (by CuPy), through ctypes: CuPy's own wrapper refuses every cuBLAS
    call during stream capture ("currently unsupported"), while cuBLAS itself records fine into a graph given
    a workspace of its own (cublasSetWorkspace), so a recorded step calls it directly."""
    import ctypes

    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcublas.so" in line and "Lt" not in line.split("/")[-1]}
    lib = ctypes.CDLL(sorted(paths)[0]) if paths else ctypes.CDLL("libcublas.so")
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib.cublasSetStream_v2.argtypes = [vp, vp]
    lib.cublasSetPointerMode_v2.argtypes = [vp, i]
    lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
    lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
    for fn in (lib.cublasSetStream_v2, lib.cublasSetPointerMode_v2, lib.cublasSetWorkspace_v2, lib.cublasGemmEx):
        fn.restype = i
    return lib


def _checked(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


_bias_add = cupy.ElementwiseKernel("T b", "T y", "y = y + b", "ffps_bias_add")
_bias_relu = cupy.ElementwiseKernel("T b", "T y", "T v = y + b; y = v > (T)0 ? v : (T)0", "ffps_bias_relu")
_relu_backward = cupy.ElementwiseKernel("T y", "T g", "if (!(y > (T)0)) g = (T)0", "ffps_relu_backward")
_sgd = cupy.ElementwiseKernel("T g, T lr", "T w", "w = w - lr * g", "ffps_sgd")
_momentum = cupy.ElementwiseKernel(
    "T g, T lr, T mu, bool nesterov", "T w, T v",
    "T vi = mu * v + g; v = vi; w = w - lr * (nesterov ? g + mu * vi : vi)", "ffps_momentum")
_finite_all = cupy.ReductionKernel("T x", "bool y", "isfinite(x)", "a && b", "y = a", "true", "ffps_all_finite")
# a recorded step reads its batch through the epoch's permutation at a device-side offset, and advances it
_gather_rows = cupy.ElementwiseKernel(
    "raw T X, raw int64 order, raw int64 offset, int64 width", "T xb",
    "const long long r = order[offset[0] + i / width]; xb = X[r * width + i % width]", "ffps_gather_rows")
_gather_labels = cupy.ElementwiseKernel(
    "raw I y, raw int64 order, raw int64 offset", "I yb", "yb = y[order[offset[0] + i]]", "ffps_gather_labels")
_advance = cupy.ElementwiseKernel("int64 rows", "int64 offset", "offset = offset + rows", "ffps_advance")

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


_SOFTMAX_NLL_SUM_SOURCE = r"""
template<typename T>
__global__ void ffps_softmax_nll_sum_rows(const T* z, const int* labels, T* out, double* sums,
                                          const int m, const int c, const T scale) {
    // ffps_softmax_nll_rows with the gradient always written and, instead of per-row outputs that the host
    // would sum, the block's loss and correct count added to sums[0], sums[1] (one atomic pair per block).
    __shared__ double block_loss[32];
    __shared__ double block_ok[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long warps_per_block = blockDim.x >> 5;
    const long long first = (long long)blockIdx.x * warps_per_block + warp;
    const long long stride = (long long)gridDim.x * warps_per_block;
    double loss = 0.0, ok = 0.0;     // lane 0's sums over this warp's rows
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
            loss += (double)(log(total) - (z_label - best));
            ok += arg == label ? 1.0 : 0.0;
        }
        const T inv = scale / total;
        T* orow = out + row * c;
        for (int q = lane; q < c; q += 32) {
            const T g = exp(zr[q] - best) * inv;
            orow[q] = q == label ? g - scale : g;
        }
        __syncwarp();
    }
    if (lane == 0) { block_loss[warp] = loss; block_ok[warp] = ok; }
    __syncthreads();
    if (threadIdx.x == 0) {
        double bl = 0.0, bo = 0.0;
        for (int k = 0; k < (int)warps_per_block; ++k) { bl += block_loss[k]; bo += block_ok[k]; }
        atomicAdd(&sums[0], bl);
        atomicAdd(&sums[1], bo);
    }
}
"""


@functools.lru_cache(maxsize=None)
def _softmax_nll_sum_kernel(dtype_name: str):
    """Compiled on first use, once per dtype."""
    ctype = {"float32": "float", "float64": "double"}[dtype_name]
    name = f"ffps_softmax_nll_sum_rows<{ctype}>"
    module = cupy.RawModule(code=_SOFTMAX_NLL_SUM_SOURCE, options=("-std=c++14",), name_expressions=[name])
    return module.get_function(name)


class _CudaTransfer(Transfer):
    """A copy queued on a stream; ``wait`` blocks on its completion event (polling when given a timeout)."""

    def __init__(self, event, keep):
        self.event, self._keep = event, keep

    @property
    def done(self) -> bool:
        return self.event.done

    def wait(self, timeout: float | None = None) -> None:
        if timeout is None:
            self.event.synchronize()
        else:
            deadline = time.monotonic() + timeout
            while not self.event.done:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"a device<->host copy did not finish within {timeout}s")
                time.sleep(20e-6)
        self._keep = None


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
    sparse_rows = False     # CSR features train on the CPU backends; a GPU takes dense rows
    ROWS_PER_BLOCK = 8           # 256 threads = 8 warps, one row each
    MAX_BLOCKS = 65535

    def __init__(self, device: int | None = None):
        self.device = cupy.cuda.Device(device if device is not None else cupy.cuda.runtime.getDevice())
        self.device.use()
        self.device_id = self.device.id
        self._recording = False        # True while a step is recorded or warmed up for recording
        self._side_streams: dict = {}
        self._ones: dict = {}          # (m, dtype) -> ones (1, m): column sums as a GEMM

    def _stream(self, name):
        """A non-blocking stream of this backend's own (capture, copies): never the legacy default stream."""
        stream = self._side_streams.get(name)
        if stream is None:
            with self.device:
                stream = self._side_streams[name] = cupy.cuda.Stream(non_blocking=True)
        return stream

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

    # ------------------------------------------------------- training windows
    def gather_batch(self, X, y, order, offset, xb, yb):
        if not (X.flags.c_contiguous and xb.flags.c_contiguous):
            return super().gather_batch(X, y, order, offset, xb, yb)
        _gather_rows(X, order, offset, np.int64(X.shape[1]), xb)
        _gather_labels(y, order, offset, yb)

    def advance_offset(self, offset, rows):
        _advance(np.int64(rows), offset)

    @contextlib.contextmanager
    def _recordable(self):
        previous, self._recording = self._recording, True
        try:
            yield
        finally:
            self._recording = previous

    def recording_problem(self) -> str | None:
        return None

    def run_recordable(self, body):
        """Run ``body()`` once, for real, with the kernels and buffers a recording of it uses: compiles and
        allocates what the recording must not."""
        with self._recordable():
            body()

    def capture_graph(self, body, repeat: int):
        """``repeat`` calls of ``body()`` recorded by CUDA stream capture (relaxed mode) on a side stream into a
        ``cupy.cuda.Graph`` -> (graph, None), or (None, why) when capture failed or the step allocated device
        memory while recorded (a pool block the graph would keep using after the pool handed it on)."""
        stream = self._stream("capture")
        pool = cupy.get_default_memory_pool()
        used = pool.used_bytes()
        graph = None
        try:
            with self._recordable(), stream:
                stream.begin_capture()
                try:
                    for _ in range(repeat):
                        body()
                finally:
                    graph = stream.end_capture()
        except Exception as exc:  # noqa: BLE001 - any CUDA/CuPy error means: run this window op by op
            return None, f"CUDA stream capture failed ({type(exc).__name__}: {exc})"
        if pool.used_bytes() != used:
            return None, (f"the step allocated {pool.used_bytes() - used} bytes from CuPy's memory pool while "
                          "recorded; the graph would write into memory the pool may hand to other arrays")
        return graph, None

    def launch_graph(self, graph):
        graph.launch(stream=cupy.cuda.get_current_stream())

    # ------------------------------------------------------ host transfers
    def pinned_empty(self, shape, dtype) -> np.ndarray:
        import cupyx

        return cupyx.empty_pinned(shape, dtype=dtype)

    def copy_to_host_async(self, x, out) -> Transfer:
        """Device ``x`` -> host ``out`` on a side stream, after the work queued so far on the current stream;
        the current stream does not wait for it. Until ``wait()`` returns, ``x`` must not be written (the
        worker double-buffers what it sends) and ``out`` not read."""
        if not isinstance(x, cupy.ndarray) or not isinstance(out, np.ndarray):
            return super().copy_to_host_async(x, out)
        if not (x.flags.c_contiguous and out.flags.c_contiguous) or x.nbytes != out.nbytes or x.dtype != out.dtype:
            raise ValueError(f"copy_to_host_async needs contiguous arrays of one size and dtype, got {x.shape} "
                             f"{x.dtype} -> {out.shape} {out.dtype}")
        side = self._stream("copy")
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(cupy.cuda.get_current_stream())
        side.wait_event(ready)
        runtime.memcpyAsync(out.ctypes.data, x.data.ptr, x.nbytes, _MEMCPY_D2H, side.ptr)
        done = cupy.cuda.Event(disable_timing=True)
        done.record(side)
        return _CudaTransfer(done, (x, out))

    def copy_from_host_async(self, dst, host) -> Transfer:
        """Host ``host`` -> device ``dst`` on the current stream (so later work sees it); from page-locked
        memory the host does not wait. ``host`` may be rewritten after ``wait()``."""
        if not isinstance(dst, cupy.ndarray) or not isinstance(host, np.ndarray):
            return super().copy_from_host_async(dst, host)
        host = np.ascontiguousarray(host, dtype=dst.dtype)
        if not dst.flags.c_contiguous or dst.nbytes != host.nbytes:
            raise ValueError(f"copy_from_host_async needs a contiguous destination of {host.nbytes} bytes, got "
                             f"{dst.shape} {dst.dtype}")
        stream = cupy.cuda.get_current_stream()
        runtime.memcpyAsync(dst.data.ptr, host.ctypes.data, dst.nbytes, _MEMCPY_H2D, stream.ptr)
        done = cupy.cuda.Event(disable_timing=True)
        done.record(stream)
        return _CudaTransfer(done, (dst, host))

    # ------------------------------------------------------------ linear algebra
    def gemm(self, a, b, out=None, trans_a=False, trans_b=False, precision="fp32"):
        """cuBLAS through cupy.matmul; transposed operands are views, passed to cuBLAS as transpose flags.
        tf32/bf16, and every GEMM of a recorded step: cublasGemmEx with the precision's compute type."""
        if precision == "fp32" and not self._recording:
            return cupy.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)
        if precision != "fp32" and a.dtype != np.float32:
            raise ValueError(f"precision={precision!r} needs float32 operands, got {a.dtype}")
        compute = COMPUTE_TYPES[precision] if a.dtype == np.float32 else _COMPUTE_64F
        return self._gemm_ex(a, b, out, trans_a, trans_b, compute)

    def _gemm_ex(self, a, b, out, trans_a, trans_b, compute):
        """out (m, n) <- op(a) @ op(b) for C-contiguous float32/float64 a, b, out, through cublasGemmEx.

        cuBLAS is column-major: a row-major (r, c) buffer is the column-major (c, r) transpose, so row-major
        C = op(A) op(B) is computed as column-major C^T = op(B)^T op(A)^T, each leading dimension being the
        row length of the stored buffer. Allocates only ``out`` when not given (never while recording)."""
        m = a.shape[1] if trans_a else a.shape[0]
        k = a.shape[0] if trans_a else a.shape[1]
        n = b.shape[0] if trans_b else b.shape[1]
        if (b.shape[1] if trans_b else b.shape[0]) != k:
            raise ValueError(f"gemm shapes do not match: {a.shape}{'^T' if trans_a else ''} @ "
                             f"{b.shape}{'^T' if trans_b else ''}")
        if out is None:
            out = cupy.empty((m, n), dtype=a.dtype)
        if not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous) or \
                not a.dtype == b.dtype == out.dtype or out.shape != (m, n):
            raise ValueError("cublasGemmEx path needs C-contiguous operands of one dtype and an output of shape "
                             f"{(m, n)}; got {a.shape} {a.dtype}, {b.shape} {b.dtype}, {out.shape} {out.dtype}")
        data_type = _CUDA_R_32F if a.dtype == np.float32 else _CUDA_R_64F
        handle = cupy.cuda.device.get_cublas_handle()
        one, zero = _ONE[a.dtype], _ZERO[a.dtype]
        args = (_OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k, one.ctypes.data, b.data.ptr,
                data_type, b.shape[1], a.data.ptr, data_type, a.shape[1], zero.ctypes.data, out.data.ptr,
                data_type, n, compute, _GEMM_DEFAULT)
        if self._recording:                    # CuPy's wrapper refuses calls during capture: cuBLAS directly
            lib = _libcublas()
            self._own_workspace(handle, lib)
            _checked(lib.cublasSetStream_v2(handle, cupy.cuda.get_current_stream().ptr), "cublasSetStream")
            _checked(lib.cublasSetPointerMode_v2(handle, _POINTER_MODE_HOST), "cublasSetPointerMode")
            _checked(lib.cublasGemmEx(handle, *args), "cublasGemmEx")
            return out
        cublas.setPointerMode(handle, _POINTER_MODE_HOST)
        cublas.gemmEx(handle, *args)
        return out

    def _own_workspace(self, handle, lib) -> None:
        """A cuBLAS workspace that outlives every recorded graph (set once per handle, before any capture
        needs it: cuBLAS must not allocate while a stream is captured)."""
        done = self.__dict__.setdefault("_workspaces", {})
        if handle not in done:
            ws = cupy.empty(32 << 20, dtype=cupy.uint8)
            _checked(lib.cublasSetWorkspace_v2(handle, ws.data.ptr, ws.nbytes), "cublasSetWorkspace")
            done[handle] = ws

    def _column_sums(self, g, out):
        """out (n,) <- column sums of g (m, n), as ones (1, m) @ g: cuBLAS, with no reduction temporaries."""
        key = (g.shape[0], g.dtype)
        ones = self._ones.get(key)
        if ones is None:
            ones = self._ones[key] = cupy.ones((1, g.shape[0]), dtype=g.dtype)
        compute = _COMPUTE_32F if g.dtype == np.float32 else _COMPUTE_64F
        self._gemm_ex(ones, g, out.reshape(1, -1), False, False, compute)
        return out

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
        if self._recording:
            return self._column_sums(g, out)
        cupy.sum(g, axis=0, out=out)
        return out

    def relu_backward_bias_grad(self, g, y, out):
        _relu_backward(y, g)
        if self._recording:
            return self._column_sums(g, out)
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

    def softmax_nll_grad_sum(self, z, labels, scale, out, sums):
        """One fused pass: dL/dz into ``out``; the batch's loss sum and correct count added to ``sums`` (2,)
        float64 on the device (no host read: a recorded step's softmax)."""
        if not (z.flags.c_contiguous and out.flags.c_contiguous and sums.flags.c_contiguous):
            raise ValueError("softmax_nll needs C-contiguous logits, output and sums (raw kernel ignores strides)")
        if sums.dtype != np.float64 or sums.shape != (2,):
            raise ValueError(f"sums must be a (2,) float64 array, got {sums.shape} {sums.dtype}")
        m, c = z.shape
        labels = cupy.ascontiguousarray(labels, dtype=cupy.int32)
        blocks = min(self.MAX_BLOCKS, (m + self.ROWS_PER_BLOCK - 1) // self.ROWS_PER_BLOCK)
        kernel = _softmax_nll_sum_kernel(z.dtype.name)
        kernel((blocks,), (32 * self.ROWS_PER_BLOCK,),
               (z, labels, out, sums, np.int32(m), np.int32(c), z.dtype.type(scale)))

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
