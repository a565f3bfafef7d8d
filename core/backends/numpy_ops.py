"""The NumPy reference backend: the living definition of every op.

Every other backend subclasses :class:`NumpyOps` and overrides only what it speeds up; anything it does not
handle falls through with ``return super().op(...)``. Ops work on arrays of the backend's own kind ("device
arrays"; plain NumPy here) and write into caller-provided outputs where the signature has ``out`` so the
training step allocates nothing. Shapes: m rows (batch), d_in/d_out features, C classes.
"""
from __future__ import annotations

import math
import threading

import numpy as np

from ..sparse import offsets, sorted_unique

# GEMM input precisions: float32 operands rounded to this many explicit mantissa bits before the product; the
# products and sums stay float32 (fp32 accumulation), as tensor cores do. fp32 keeps all 23 bits (no rounding).
PRECISION_MANTISSA_BITS = {"fp32": 23, "tf32": 10, "bf16": 7}
PRECISIONS = tuple(PRECISION_MANTISSA_BITS)


def round_to_precision(x, precision: str) -> np.ndarray:
    """float32 values rounded to ``precision``'s mantissa (round to nearest, ties to even) -> new float32 array.

    tf32 keeps 10 mantissa bits, bf16 7 (the float32 exponent range either way, so nothing overflows that
    float32 holds, except a value within half an ulp of float32's maximum, which rounds to inf as the hardware
    rounds it). NaN stays NaN, +-inf stays +-inf. fp32 returns a float32 copy unchanged.
    """
    bits = PRECISION_MANTISSA_BITS[precision]
    arr = np.array(x, dtype=np.float32, copy=True)
    drop = 23 - bits
    if drop == 0:
        return arr
    u = arr.view(np.uint32)
    lsb = (u >> np.uint32(drop)) & np.uint32(1)               # ties go to the even neighbour
    rounded = (u + np.uint32((1 << (drop - 1)) - 1) + lsb) & np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
    nan = np.isnan(arr)
    out = rounded.view(np.float32)
    if nan.any():                                             # a NaN's payload may round to the inf pattern
        out[nan] = np.nan
    return out


class NumpyOps:
    """Reference implementation, float32 and float64. Slow paths are fine here: clarity is the point."""

    name = "numpy"

    # ----------------------------------------------------------------- memory
    def asarray(self, x, dtype=None):
        """Host or device array -> C-contiguous array of this backend (no copy when already one)."""
        return np.ascontiguousarray(x, dtype=dtype)

    def to_host(self, x, out=None):
        """Device array -> NumPy array (``out`` reused when given)."""
        if out is None:
            return np.array(x, copy=True)
        np.copyto(out, x)
        return out

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def is_device_array(self, x) -> bool:
        """True when ``x`` already lives where this backend computes (no upload needed)."""
        return isinstance(x, np.ndarray)

    def take_rows(self, x, index, out=None):
        """Gather rows: (n, ...) [index (k,)] -> (k, ...); an index outside -n..n-1 raises IndexError."""
        if out is None:
            return np.take(x, index, axis=0)
        # Into ``out``, np.take's default mode gathers into a fresh temporary and copies that over: an allocation
        # (page faults for a batch of a wide net) and a second pass per batch. The range is checked here instead
        # and the rows go straight into ``out`` (128 x 784 float32 rows: ~62 -> ~28 us, 2-core VM).
        n = x.shape[0]
        if index.size and (index.min() < -n or index.max() >= n):
            raise IndexError(f"row index out of range for {n} rows: {index.min()}..{index.max()}")
        return np.take(x, index, axis=0, out=out, mode="wrap")

    def all_finite(self, x) -> bool:
        """True when no element is NaN or +-inf."""
        return bool(np.isfinite(x).all())

    def synchronize(self):
        """Wait for queued device work (no-op on the CPU)."""

    def _scratch(self, name, shape, dtype):
        """A reusable work buffer of ``shape`` for backends' internal use: one grow-only allocation per
        (name, dtype) and thread, so the hot path allocates nothing and odd batch sizes add no buffers.
        Per thread: the backend object is shared (get_backend caches it) and the numba step runs without
        the GIL, so two threads training at once would otherwise overwrite each other's row losses.
        Called several times per step: math.prod, not np.prod (9 us on a tuple: 15 % of a digits step)."""
        pool = self._per_thread("scratch")
        n = math.prod(shape)
        key = (name, dtype)
        buf = pool.get(key)
        if buf is None or buf.size < n:
            buf = pool[key] = self.empty((max(n, 1),), dtype)
        return buf[:n].reshape(shape)

    def _per_thread(self, name) -> dict:
        """A dict of this backend object's own for the calling thread (scratch buffers, cached call args)."""
        local = self.__dict__.get("_thread_local")
        if local is None:
            local = self.__dict__.setdefault("_thread_local", threading.local())
        found = getattr(local, name, None)
        if found is None:
            found = {}
            setattr(local, name, found)
        return found

    # ------------------------------------------------------------ linear algebra
    def gemm(self, a, b, out=None, trans_a=False, trans_b=False, precision="fp32"):
        """(m, k) @ (k, n) -> (m, n), with either operand optionally transposed first.

        precision "tf32" / "bf16" (float32 operands only): both operands rounded to that many mantissa bits
        (:func:`round_to_precision`), then multiplied and summed in float32: what a tensor core computes with
        float32 accumulation, up to the order of the sums. This is the definition the GPU path is checked against.
        """
        if precision != "fp32":
            if a.dtype != np.float32 or b.dtype != np.float32:
                raise ValueError(f"precision={precision!r} needs float32 operands, got {a.dtype} and {b.dtype}")
            a, b = round_to_precision(a, precision), round_to_precision(b, precision)
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        return np.matmul(a, b, out=out)

    # ----------------------------------------------------- sparse first layer
    sparse_rows = True      # trains core.sparse.CsrRows features (host arrays; the CPU backends)

    def _sparse_operands(self, X, B, precision):
        """(the rows' stored values, B) as the product reads them: rounded to ``precision`` as :meth:`gemm`
        rounds its operands."""
        values = X.values[X.indptr[0]:X.indptr[-1]]
        if precision != "fp32":
            values, B = round_to_precision(values, precision), round_to_precision(B, precision)
        return values, B

    def sparse_gemm(self, X, W, out, precision="fp32"):
        """out (m, n) = X @ W for CSR rows X (m, k) (:class:`core.sparse.CsrRows`) and W (k, n): the first
        layer's forward on sparse features, nnz x n multiply-adds."""
        values, W = self._sparse_operands(X, W, precision)
        out.fill(0)
        np.add.at(out, X.row_ids(), values[:, None] * W[X.indices[X.indptr[0]:X.indptr[-1]]])
        return out

    def sparse_gemm_t(self, X, G, out, precision="fp32", rows=None):
        """out (k, n) = X^T @ G for CSR rows X (m, k) and G (m, n): the first layer's weight gradient, zero
        in every row of a column no row of X holds. ``rows``: X's columns (``X.columns()``); then only those
        rows of ``out`` are written, the others keep what they held (for a caller that reads only these)."""
        values, G = self._sparse_operands(X, G, precision)
        if rows is None:
            out.fill(0)
        else:
            out[rows] = 0
        np.add.at(out, X.indices[X.indptr[0]:X.indptr[-1]], values[:, None] * G[X.row_ids()])
        return out

    # -------------------------------------------------------------- dense layer
    def bias_add(self, y, b):
        """In place: y (m, n) += b (n,)."""
        y += b
        return y

    def bias_relu(self, y, b):
        """In place: y (m, n) <- max(0, y + b). The hidden layer's forward after its GEMM."""
        y += b
        np.maximum(y, 0, out=y)
        return y

    def relu(self, x, out=None):
        """max(0, x), elementwise."""
        return np.maximum(x, 0, out=out)

    def relu_backward(self, g, y):
        """In place: g <- g * [y > 0]. ``y`` is the ReLU output (y > 0 exactly where its input was > 0)."""
        g *= y > 0
        return g

    def bias_grad(self, g, out):
        """Column sums: g (m, n) -> out (n,)."""
        np.sum(g, axis=0, out=out)
        return out

    def relu_backward_bias_grad(self, g, y, out):
        """relu_backward(g, y) in place, then its column sums into out (n,): the hidden layer's backward
        after the GEMM that produced g. Backends fuse the two into one pass."""
        self.relu_backward(g, y)
        return self.bias_grad(g, out)

    # ----------------------------------------------------------- softmax + NLL
    def softmax(self, z, out=None):
        """Row-wise softmax (m, C) -> (m, C), max-shifted so large logits do not overflow."""
        shifted = z - z.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        e /= e.sum(axis=1, keepdims=True)
        if out is None:
            return e
        out[...] = e
        return out

    def softmax_nll(self, z, labels):
        """Summed NLL and correct count: z (m, C), labels (m,) int -> (sum_p NLL_p as float, n_correct int).

        NLL_p = log sum_q exp(z'_pq) - z'_{p,y_p} with z' = z - max_row(z). Correct: argmax_row(z) == y.
        Returns the *sum* over rows (not the mean) so batches of different sizes combine exactly.
        """
        rows = np.arange(z.shape[0])
        shifted = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(shifted).sum(axis=1))
        loss_sum = float((lse - shifted[rows, labels]).sum(dtype=np.float64))
        n_correct = int((z.argmax(axis=1) == labels).sum())
        return loss_sum, n_correct

    def softmax_nll_backward(self, z, labels, scale, out):
        """dL/dz = (softmax(z) - onehot(y)) * scale -> out (m, C); scale is 1/m for the mean loss."""
        self.softmax(z, out=out)
        out[np.arange(z.shape[0]), labels] -= 1
        out *= scale
        return out

    def softmax_nll_grad(self, z, labels, scale, out):
        """Forward and backward in one call: returns (loss_sum, n_correct), writes dL/dz into ``out``.

        Backends fuse this into one pass; the reference simply calls the two ops. ``out`` may alias ``z``.
        """
        loss_sum, n_correct = self.softmax_nll(z, labels)
        self.softmax_nll_backward(z, labels, scale, out)
        return loss_sum, n_correct

    def softmax_nll_grad_sum(self, z, labels, scale, out, sums):
        """``softmax_nll_grad`` whose loss sum and correct count are added to ``sums`` (2,) float64, a backend
        array, instead of being returned: nothing is read back to the host, so a GPU step need not wait."""
        loss_sum, n_correct = self.softmax_nll_grad(z, labels, scale, out)
        sums[0] += loss_sum
        sums[1] += n_correct

    # ------------------------------------------------------------- whole step
    def dense_stack_gradient(self, dims, w, X, y, grad, acts, deltas, precision="fp32"):
        """Forward, softmax-NLL and backward of the whole Dense-ReLU stack in one call, for a backend that
        fuses the step: returns (loss_sum, n_correct) and fills ``grad`` (mean loss) and the flat workspaces
        ``acts`` (m * sum(dims[1:])) and ``deltas`` (m * sum(dims[1:-1])). ``dims``: layer sizes, int64;
        ``precision``: the GEMMs' (see :meth:`gemm`).
        Here, and wherever it returns ``NotImplemented``, the network composes the per-layer ops above
        (``FeedForwardNetwork.gradient_device``): that composition is the definition."""
        return NotImplemented

    # ------------------------------------------------------- training windows
    # A window of steps gathers each batch from the data through a device-side permutation and offset, so a
    # backend that records a step once (CUDA graphs) can replay it with no host work per step.
    def gather_batch(self, X, y, order, offset, xb, yb):
        """xb (m, d) <- X[order[o:o+m]], yb (m,) <- y[order[o:o+m]] with o = offset[0]: one batch of a
        shuffled epoch, read where ``offset`` (a (1,) int64 backend array) points."""
        o = int(offset[0])
        index = order[o:o + xb.shape[0]]
        np.take(X, index, axis=0, out=xb)
        np.take(y, index, axis=0, out=yb)

    def advance_offset(self, offset, rows):
        """offset[0] += rows, where the offset lives (no host read on a GPU)."""
        offset[0] += rows

    def run_recordable(self, body):
        """Run ``body()`` once, for real, the way a recording of it would run (the GPU compiles its kernels and
        allocates its buffers now, as recording forbids both)."""
        body()

    def recording_problem(self) -> str | None:
        """None when :meth:`capture_graph` can record steps here; else a sentence saying why not."""
        return f"the {self.name} backend computes on the CPU: there is no launch cost to save"

    def capture_graph(self, body, repeat: int):
        """Record ``repeat`` back-to-back calls of ``body()`` as one launch -> (graph, None), or (None, a
        sentence saying why this backend cannot). Only device work may happen in ``body``: no host reads."""
        return None, self.recording_problem()

    def launch_graph(self, graph):
        """Run a graph made by :meth:`capture_graph` (queued behind earlier work; returns at once on a GPU)."""
        raise NotImplementedError(f"the {self.name} backend makes no graphs")

    # ------------------------------------------------------ host transfers
    def pinned_empty(self, shape, dtype) -> np.ndarray:
        """A host array the device can copy to and from asynchronously (page-locked on a GPU)."""
        return np.empty(shape, dtype=dtype)

    def copy_to_host_async(self, x, out) -> "Transfer":
        """Start copying device ``x`` into host ``out`` -> a :class:`Transfer`; ``out`` is valid after
        ``wait()``. Work queued later may change ``x`` only if the backend orders it after the copy (it does)."""
        np.copyto(out, x)
        return Transfer()

    def copy_from_host_async(self, dst, host) -> "Transfer":
        """Start copying host ``host`` into device ``dst``, ordered before any later device work -> a
        :class:`Transfer`; ``host`` may be overwritten after ``wait()``."""
        np.copyto(dst, host)
        return Transfer()

    # --------------------------------------------------------------- optimizers
    # Every update rule once, with one convention (PyTorch's): the momentum velocity accumulates gradients,
    # the learning rate scales the step, so a schedule may change lr between steps without rescaling any
    # state. New weights go to ``out`` (None: ``w`` in place; the parameter server passes a buffer that is
    # not in flight); state arrays are updated in place. core.optimizers wraps these with schedules.
    def sgd_update(self, w, g, lr, out=None):
        """out <- w - lr g."""
        step = np.multiply(g, w.dtype.type(lr), out=self._scratch("opt_step", g.shape, g.dtype))
        return np.subtract(w, step, out=w if out is None else out)

    def sgd_update_rows(self, w, g, rows, width, tail, lr, acc=None):
        """``sgd_update_accumulate`` (``acc`` optional) in place on rows ``rows`` (sorted, unique) of the
        (-1, width) block ``w[:tail]`` and on all of ``w[tail:]``: a sparse batch's step, whose gradient is
        zero in the first layer's other rows, reads and writes those only."""
        t = w.dtype.type(lr)
        G = g[:tail].reshape(-1, width)[rows]
        if acc is not None:
            acc[:tail].reshape(-1, width)[rows] += G
            acc[tail:] += g[tail:]
        G *= t
        w[:tail].reshape(-1, width)[rows] -= G
        self.sgd_update(w[tail:], g[tail:], lr)
        return w

    def sgd_update_accumulate(self, w, g, lr, acc):
        """acc <- acc + g, then w <- w - lr g, both in place (a worker's step inside an exchange window)."""
        acc += g
        return self.sgd_update(w, g, lr)

    quiet_screened_sgd = False      # sgd_update_screened runs NumPy ufuncs: an overflow warns

    def sgd_update_screened(self, w, g, lr, out):
        """``sgd_update`` into ``out``, screened -> None, or "gradient" when g holds NaN/inf, or "result" when
        g is finite but the new weights are not. ``out`` (not ``w``) is a scratch buffer until the caller
        commits it."""
        if not self.all_finite(g):
            return "gradient"
        self.sgd_update(w, g, lr, out=out)
        return None if self.all_finite(out) else "result"

    def sgd_entries_screened(self, w, index, values, lr):
        """A sparse push's SGD step in place on w's entries ``index`` (``values`` there, zero elsewhere),
        screened as :meth:`sgd_update_screened` -> None (written), "gradient" or "result" (nothing written)."""
        if not self.all_finite(values):
            return "gradient"
        with np.errstate(over="ignore", invalid="ignore"):      # an overflow is looked for below
            new = w[index] - w.dtype.type(lr) * values
        if not self.all_finite(new):
            return "result"
        w[index] = new
        return None

    def copy_entries(self, dst, src, index):
        """dst[index] = src[index] (host vectors)."""
        dst[index] = src[index]

    def union_sorted(self, arrays) -> np.ndarray:
        """The sorted union of strictly increasing index arrays (one dtype: int64 where they differ), a new array
        (never one of them: an index may be a view of a frame that the client's next request releases)."""
        arrays = [a for a in arrays if a.size]
        if len(arrays) < 2:
            return arrays[0].copy() if arrays else np.empty(0, dtype=np.int64)
        return self._union_of(arrays)

    def _union_of(self, arrays) -> np.ndarray:
        """:meth:`union_sorted` of two or more non-empty arrays."""
        return sorted_unique(np.concatenate(arrays))

    def gather_entries(self, src, index, out=None) -> np.ndarray:
        """src[index] (into ``out`` where given)."""
        return np.take(src, index, out=out)

    def scatter_entries(self, dst, index, values) -> None:
        """dst[index] = values."""
        dst[index] = values

    def count_runs(self, index) -> int:
        """The runs of consecutive values in ``index`` (strictly increasing): 0 for none."""
        return int(np.count_nonzero(np.diff(index) != 1)) + 1 if index.size else 0

    def fill_runs(self, index, starts, lengths) -> None:
        """The starts and lengths of ``index``'s runs, into ``starts`` and ``lengths`` (count_runs of them)."""
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        starts[0], starts[1:] = index[0], index[breaks]
        ends = np.empty(breaks.size + 1, dtype=np.int64)
        ends[:-1], ends[-1] = index[breaks - 1], index[-1]
        lengths[:] = ends + 1 - starts

    def expand_runs(self, words, r: int, n: int, k: int) -> np.ndarray:
        """The k indices (int64) of a RUNS32 payload's ``words`` (r, r starts, r lengths, then k values), or a
        ValueError saying what is wrong: an empty run, runs out of order or without a gap, past ``n``, or runs
        that do not cover exactly k indices."""
        starts, lengths = words[1:1 + r].astype(np.int64), words[1 + r:1 + 2 * r].astype(np.int64)
        ends = starts + lengths
        if r and (lengths.min() < 1 or ends[-1] > n or (r > 1 and not (starts[1:] > ends[:-1]).all())):
            raise ValueError(f"each run must hold at least one index, the runs must increase with gaps between "
                             f"them and end by {n}")
        if int(lengths.sum()) != k:
            raise ValueError(f"its runs cover {int(lengths.sum())} indices, it holds {k} values")
        firsts = offsets(lengths)[:-1]                           # each run's first position among the values
        return np.repeat(starts - firsts, lengths) + np.arange(k, dtype=np.int64)

    def momentum_update(self, w, v, g, lr, momentum, nesterov=False, out=None):
        """v <- momentum v + g; out <- w - lr v (Nesterov: out <- w - lr (g + momentum v))."""
        t = w.dtype.type
        v *= t(momentum)
        v += g
        step = self._scratch("opt_step", g.shape, g.dtype)
        if nesterov:
            np.multiply(v, t(momentum), out=step)
            step += g
        else:
            step[...] = v
        step *= t(lr)
        return np.subtract(w, step, out=w if out is None else out)

    def adagrad_update(self, w, sum_sq, g, lr, eps, out=None):
        """sum_sq <- sum_sq + g^2; out <- w - lr g / (sqrt(sum_sq) + eps)."""
        t = w.dtype.type
        sum_sq += g * g
        step = np.sqrt(sum_sq, out=self._scratch("opt_step", g.shape, g.dtype))
        step += t(eps)
        np.divide(g, step, out=step)
        step *= t(lr)
        return np.subtract(w, step, out=w if out is None else out)

    def adam_update(self, w, m, v, g, lr, beta1, beta2, eps, t, out=None):
        """Adam's step t (1, 2, ...): m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
        out <- w - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)."""
        T = w.dtype.type
        m *= T(beta1)
        m += T(1 - beta1) * g
        v *= T(beta2)
        v += T(1 - beta2) * (g * g)
        step = np.divide(v, T(1 - beta2 ** t), out=self._scratch("opt_step", g.shape, g.dtype))
        np.sqrt(step, out=step)
        step += T(eps)
        np.divide(m, step, out=step)
        step *= T(lr / (1 - beta1 ** t))
        return np.subtract(w, step, out=w if out is None else out)


class Transfer:
    """A host<->device copy in flight; ``wait()`` returns once it is done (at once for the CPU backends)."""

    def wait(self, timeout: float | None = None) -> None:
        return None

    @property
    def done(self) -> bool:
        return True


class RowSoftmaxNLL:
    """The three softmax-NLL ops for a backend whose fused row kernel is
    ``_softmax_nll_rows(z, labels, scale, out, write_grad) -> (loss_sum, n_correct)``; mix in before NumpyOps."""

    def softmax_nll(self, z, labels):
        return self._softmax_nll_rows(z, labels, 1.0, None, False)

    def softmax_nll_backward(self, z, labels, scale, out):
        self._softmax_nll_rows(z, labels, scale, out, True)
        return out

    def softmax_nll_grad(self, z, labels, scale, out):
        """Loss, correct count and dL/dz from one fused pass (``out`` may alias ``z``)."""
        return self._softmax_nll_rows(z, labels, scale, out, True)
