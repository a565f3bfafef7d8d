"""Feed-forward network (Dense -> ReLU -> ... -> Dense -> softmax-NLL) over one flat parameter vector.

Flat layout (the unit the parameter server stores and ships): for each layer i in order, W_i row-major
(d_i x d_{i+1}) then b_i (d_{i+1}).
Layers are views into that vector; gradients are written into a flat buffer of the same layout. All math goes
through the backend's ops, so this module never touches cupy or numba.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .backends import get_backend
from .sparse import CsrRows, check_sparse_features, is_sparse
from .validation import (check_dtype, check_features, check_int, check_labels, check_layers, check_params,
                         check_precision, check_seed)


INIT_CHUNK = 1 << 20        # float64 normals drawn at a time by init_params (8 MB)


@dataclass(frozen=True)
class LayerSlice:
    """Where one dense layer lives in the flat vector."""
    d_in: int
    d_out: int
    w_start: int   # W occupies [w_start, b_start), row-major (d_in, d_out)
    b_start: int   # b occupies [b_start, end)
    end: int


def param_layout(layers: list[int]) -> list[LayerSlice]:
    """Offsets of every W and b in the flat vector; the last ``end`` is num_params."""
    out, pos = [], 0
    for d_in, d_out in zip(layers[:-1], layers[1:]):
        b_start = pos + d_in * d_out
        out.append(LayerSlice(d_in, d_out, pos, b_start, b_start + d_out))
        pos = b_start + d_out
    return out


class DeviceData:
    """Features (and labels) already validated and resident on the backend: reuse it to avoid re-uploads.

    It remembers what it was checked for (the backend, the width, the largest label): a network whose layers or
    backend differ refuses it (:meth:`FeedForwardNetwork.check_data`) instead of letting its compiled kernels
    read past the rows or index past the classes."""

    def __init__(self, X, y, n_rows: int, backend: str | None = None, max_label: int | None = None):
        self.X = X          # (n, d0) backend array, network dtype; or CsrRows (sparse rows, CPU backends)
        self.y = y          # (n,) backend int32 array, or None
        self.n_rows = n_rows
        self.backend = backend          # the ops name it lives on
        self.max_label = max_label      # the largest label in y (None: no labels, or no rows)

    def __len__(self):
        return self.n_rows


class FeedForwardNetwork:
    """``FeedForwardNetwork([64, 100, 10], backend="numba", dtype="float32")``.

    ``backend``: "auto" | "cupy" | "numba" | "numpy" | None (None reads $FFPS_BACKEND, default auto) or an ops
    object. ``device``: CUDA ordinal for cupy. NumPy arrays in and out at the public boundary.
    ``precision``: the GEMMs' input precision, "fp32" (default), "tf32" (10-bit mantissa) or "bf16" (7-bit):
    operands rounded, products summed in float32; weights, optimizer and loss stay float32. On a GPU the
    tensor cores do it; on the CPU the NumPy reference emulates it (slow; for tests and parity).
    """

    _WORKSPACE_SLOTS = 4  # distinct batch sizes kept (full batch, ragged last batch, predict chunks)

    def __init__(self, layers, backend=None, dtype="float32", device=None, precision="fp32"):
        self.layers = check_layers(layers)
        self.dtype = check_dtype(dtype)
        self.precision = check_precision(precision, self.dtype)
        self.ops = backend if hasattr(backend, "gemm") else get_backend(backend, device=device)
        self.layout = param_layout(self.layers)
        self.num_params = self.layout[-1].end
        self.num_classes = self.layers[-1]
        self._dims = np.asarray(self.layers, dtype=np.int64)
        self._workspaces: OrderedDict[int, tuple] = OrderedDict()   # m -> (acts, deltas, flat, flat)
        self._view_cache: dict[int, tuple] = {}
        self._entry_cache: dict[str, np.ndarray] = {}     # entries_of_rows' fixed parts

    def __repr__(self):
        extra = "" if self.precision == "fp32" else f", precision={self.precision!r}"
        return (f"FeedForwardNetwork(layers={self.layers}, backend={self.ops.name!r}, "
                f"dtype={self.dtype.name!r}{extra}, num_params={self.num_params})")

    @property
    def backend_name(self) -> str:
        return self.ops.name

    def flops_per_step(self, batch: int) -> int:
        """Forward + backward multiply-adds counted as 6 * batch * sum(d_in * d_out)."""
        return 6 * batch * sum(s.d_in * s.d_out for s in self.layout)

    # ------------------------------------------------------------------ parameters
    def init_params(self, seed: int = 0) -> np.ndarray:
        """He-normal weights (std sqrt(2 / d_in)), zero biases; drawn on the host so every backend agrees.
        Drawn in float64 a chunk at a time and rounded into the result (the same values as one draw per layer):
        a [262144, 256, 2] model's 67M weights took 1-5 s through two whole float64 copies (1 GB)."""
        rng = np.random.default_rng(check_seed(seed))
        w = np.zeros(self.num_params, dtype=self.dtype)
        chunk = np.empty(min(INIT_CHUNK, max((s.d_in * s.d_out for s in self.layout), default=0)))
        for s in self.layout:
            scale = np.sqrt(2.0 / s.d_in)
            for a in range(s.w_start, s.b_start, INIT_CHUNK):
                part = chunk[:min(INIT_CHUNK, s.b_start - a)]
                rng.standard_normal(out=part)
                part *= scale
                w[a:a + part.size] = part
        return w

    def unflatten(self, flat) -> list[tuple]:
        """Views (W (d_in, d_out), b (d_out,)) into a flat vector of this layout (host or device)."""
        return [(flat[s.w_start:s.b_start].reshape(s.d_in, s.d_out), flat[s.b_start:s.end]) for s in self.layout]

    def _views(self, flat) -> list[tuple]:
        """unflatten() remembered for the few buffers the hot path reuses (weights, gradient); keyed by
        identity, holding a reference so the id cannot be recycled while cached."""
        hit = self._view_cache.get(id(flat))
        if hit is not None and hit[0] is flat:
            return hit[1]
        views = self.unflatten(flat)
        self._view_cache[id(flat)] = (flat, views)
        while len(self._view_cache) > 3:  # weights, gradient, one more
            self._view_cache.pop(next(iter(self._view_cache)))
        return views

    # ------------------------------------------------------------------------ data
    def upload(self, X, y=None) -> DeviceData:
        """Validate once and place features/labels on the backend. Pass the result instead of X (and y).
        X: a dense (n, d0) array, or sparse rows (a scipy.sparse matrix or :class:`core.sparse.CsrRows`) on
        the CPU backends, kept sparse: the first layer reads them as a sparse product."""
        Xh = self._sparse_features(X) if is_sparse(X) else check_features(X, self.layers[0], self.dtype)
        yd = max_label = None
        if y is not None:
            yh = check_labels(y, Xh.shape[0], self.num_classes)
            max_label = int(yh.max()) if yh.size else None
            yd = self.ops.asarray(yh)
        Xd = Xh if isinstance(Xh, CsrRows) else self.ops.asarray(Xh)
        return DeviceData(Xd, yd, Xh.shape[0], self.ops.name, max_label)

    def _sparse_features(self, X) -> CsrRows:
        """Sparse rows checked for this network (width, finite values, column indices), or a ValueError: the
        GPU backend takes dense rows only."""
        if not getattr(self.ops, "sparse_rows", False):
            raise ValueError(f"sparse features train on the numba or numpy backend; the {self.ops.name} backend "
                             f"takes dense rows: pass X.toarray(), or choose backend='numba'")
        return check_sparse_features(X, self.layers[0], self.dtype)

    def check_data(self, data: DeviceData) -> DeviceData:
        """``data`` if this network may read it: uploaded on this backend, with this network's input width and
        dtype, and labels below its number of classes; else a ValueError saying which."""
        if data.backend is not None and data.backend != self.ops.name:
            raise ValueError(f"this DeviceData was uploaded on the {data.backend} backend, this network runs on "
                             f"{self.ops.name}: upload the data with this network (net.upload(X, y))")
        width = data.X.shape[1] if data.X.ndim == 2 else None
        if width != self.layers[0] or data.X.dtype != self.dtype:
            raise ValueError(f"this DeviceData holds {data.X.dtype} features of shape {tuple(data.X.shape)}, this "
                             f"network takes {self.dtype} rows of width layers[0] = {self.layers[0]}: upload the "
                             f"data with this network (net.upload(X, y))")
        if data.y is not None and data.max_label is None and data.n_rows:     # made by hand: look once
            data.max_label = int(self.ops.to_host(data.y).max())
        if data.max_label is not None and data.max_label >= self.num_classes:
            raise ValueError(f"this DeviceData has labels up to {data.max_label}, this network has "
                             f"{self.num_classes} classes (labels 0..{self.num_classes - 1}): upload the data with "
                             f"this network (net.upload(X, y))")
        return data

    def _device_features(self, X):
        if isinstance(X, DeviceData):
            return self.check_data(X).X
        if is_sparse(X):
            return self._sparse_features(X)
        if self.ops.is_device_array(X) and not isinstance(X, np.ndarray):
            if X.ndim != 2 or X.shape[1] != self.layers[0]:
                raise ValueError(f"X must have shape (rows, {self.layers[0]}), got {tuple(X.shape)}")
            if not self.ops.all_finite(X):
                raise ValueError("X contains a non-finite value (NaN or inf)")
            return self.ops.asarray(X, dtype=self.dtype)
        return self.ops.asarray(check_features(X, self.layers[0], self.dtype))

    def _device_labels(self, X, y, n_rows):
        if y is None:
            if isinstance(X, DeviceData) and X.y is not None:
                return self.check_data(X).y
            raise ValueError("labels are required: pass y, or DeviceData made with labels")
        if self.ops.is_device_array(y) and not isinstance(y, np.ndarray):
            y = self.ops.to_host(y)
        return self.ops.asarray(check_labels(y, n_rows, self.num_classes))

    def device_params(self, w):
        """A flat parameter vector (host or device) checked and placed on the backend in the network's dtype
        (no copy when it already is one)."""
        if self.ops.is_device_array(w) and not isinstance(w, np.ndarray):
            if tuple(w.shape) != (self.num_params,):
                raise ValueError(f"parameter vector must have shape ({self.num_params},), got {tuple(w.shape)}")
            if not self.ops.all_finite(w):
                raise ValueError("parameter vector contains a non-finite value (NaN or inf)")
            return self.ops.asarray(w, dtype=self.dtype)
        return self.ops.asarray(check_params(w, self.num_params, self.dtype))

    def _workspace(self, m: int):
        """Per-batch-size buffers: activations (m, d_i) for i >= 1 and deltas (m, d_i) for the hidden layers,
        as views of two flat buffers (``ops.dense_stack_gradient`` takes the flat ones) -> (acts, deltas,
        acts_flat, deltas_flat)."""
        ws = self._workspaces.get(m)
        if ws is None:
            views, flats = [], []
            for dims in (self.layers[1:], self.layers[1:-1]):
                flat = self.ops.empty((m * sum(dims),), self.dtype)
                starts = np.cumsum([0] + [m * d for d in dims])
                views.append([flat[a:b].reshape(m, d) for a, b, d in zip(starts[:-1], starts[1:], dims)])
                flats.append(flat)
            ws = (*views, *flats)
            self._workspaces[m] = ws
            while len(self._workspaces) > self._WORKSPACE_SLOTS:
                self._workspaces.popitem(last=False)
        else:
            self._workspaces.move_to_end(m)
        return ws

    # --------------------------------------------------------------- device-level
    def forward_device(self, w, X):
        """Logits for device X (m, d0) with device params -> list of activations, last = logits (m, C)."""
        ops = self.ops
        acts = self._workspace(X.shape[0])[0]
        h = X
        params = self._views(w)
        last = len(params) - 1
        precision = self.precision
        for i, (W, b) in enumerate(params):
            if i == 0 and isinstance(X, CsrRows):
                ops.sparse_gemm(X, W, out=acts[0], precision=precision)
            else:
                ops.gemm(h, W, out=acts[i], precision=precision)
            if i < last:
                ops.bias_relu(acts[i], b)
            else:
                ops.bias_add(acts[i], b)
            h = acts[i]
        return acts

    def gradient_device(self, w, X, y, grad, sums=None, rows=None):
        """One forward+backward on device arrays: writes dL/dw (mean loss) into ``grad``.

        w (P,), X (m, d0), y (m,) int32, grad (P,) -> (loss_sum over rows, n_correct). No validation, no
        allocation after the first call for a batch size: the trainer's hot path. With ``sums`` ((2,) float64
        backend array) the loss sum and correct count are added to it on the device instead, and None is
        returned: no host read, so a GPU step can be queued (or recorded in a graph) without waiting.
        ``rows`` (sparse X): ``X.columns()``; the first layer's weight gradient is then written in those rows
        only (:meth:`entries_of_rows`), the others keep stale values: for a caller that reads only those.
        """
        ops = self.ops
        m = X.shape[0]
        precision = self.precision
        _, deltas, acts_flat, deltas_flat = self._workspace(m)
        sparse = isinstance(X, CsrRows)
        fused = NotImplemented if sparse else \
            ops.dense_stack_gradient(self._dims, w, X, y, grad, acts_flat, deltas_flat, precision)
        if fused is not NotImplemented:
            if sums is None:
                return fused
            sums[0] += fused[0]
            sums[1] += fused[1]
            return None
        acts = self.forward_device(w, X)
        logits = acts[-1]
        if sums is None:
            loss_sum, n_correct = ops.softmax_nll_grad(logits, y, 1.0 / m, out=logits)  # logits now hold dL/dz
        else:
            ops.softmax_nll_grad_sum(logits, y, 1.0 / m, logits, sums)
            loss_sum = n_correct = None
        g = logits
        params = self._views(w)
        grads = self._views(grad)
        for i in range(len(params) - 1, -1, -1):
            inputs = X if i == 0 else acts[i - 1]
            gW, gb = grads[i]
            if i == 0 and sparse:
                ops.sparse_gemm_t(X, g, out=gW, precision=precision, rows=rows)
            else:
                ops.gemm(inputs, g, out=gW, trans_a=True, precision=precision)
            if i == len(params) - 1:
                ops.bias_grad(g, out=gb)  # hidden layers' bias grads come fused with their ReLU backward
            if i > 0:
                prev = deltas[i - 1]
                ops.gemm(g, params[i][0], out=prev, trans_b=True, precision=precision)
                ops.relu_backward_bias_grad(prev, acts[i - 1], out=grads[i - 1][1])
                g = prev
        return None if sums is not None else (loss_sum, n_correct)

    def entries_of_rows(self, rows) -> np.ndarray:
        """The flat indices (sorted, int64) a sparse batch's gradient can be non-zero at: the first layer's weight
        rows ``rows`` (its columns, sorted) and every parameter after that layer's weights."""
        first = self.layout[0]
        tail = self._entry_cache.get("tail")
        if tail is None:
            tail = self._entry_cache["tail"] = np.arange(first.b_start, self.num_params, dtype=np.int64)
            self._entry_cache["row"] = np.arange(first.d_out, dtype=np.int64)
        head = (np.asarray(rows, dtype=np.int64)[:, None] * first.d_out + self._entry_cache["row"]).ravel()
        return np.concatenate([head + first.w_start, tail])

    # ------------------------------------------------------------------ public API
    def loss_grad_and_correct(self, w, X, y=None, out=None):
        """Mean NLL, its gradient (like w) and the number of correct predictions, from one forward pass.

        w (P,), X (m, d0) or DeviceData, y (m,) ints in 0..C-1 -> (loss float, grad, n_correct int).
        grad is NumPy unless ``out`` (a host or backend array of shape (P,)) is given, which is filled.
        """
        wd = self.device_params(w)
        Xd = self._device_features(X)
        yd = self._device_labels(X, y, Xd.shape[0])
        if out is not None and self.ops.is_device_array(out) and out.dtype == self.dtype \
                and tuple(out.shape) == (self.num_params,):
            gd = out
        else:
            gd = self.ops.empty((self.num_params,), self.dtype)
        loss_sum, n_correct = self.gradient_device(wd, Xd, yd, gd)
        if out is None:
            grad = self.ops.to_host(gd)
        elif gd is out:
            grad = out
        else:
            grad = self.ops.to_host(gd, out=out)
        return loss_sum / Xd.shape[0], grad, n_correct

    def loss_and_grad(self, w, X, y=None, out=None):
        """(loss = mean NLL as float, grad like w). See :meth:`loss_grad_and_correct`."""
        loss, grad, _ = self.loss_grad_and_correct(w, X, y, out=out)
        return loss, grad

    def predict_proba(self, w, X, chunk_rows: int = 8192) -> np.ndarray:
        """Class probabilities (m, C) as NumPy, computed in chunks so memory stays bounded."""
        chunk_rows = check_int("chunk_rows", chunk_rows)
        wd = self.device_params(w)
        Xd = self._device_features(X)
        out = np.empty((Xd.shape[0], self.num_classes), dtype=self.dtype)
        for start in range(0, Xd.shape[0], chunk_rows):
            acts = self.forward_device(wd, Xd[start:start + chunk_rows])
            probs = self.ops.softmax(acts[-1], out=acts[-1])
            self.ops.to_host(probs, out=out[start:start + chunk_rows])
        return out

    def predict(self, w, X) -> np.ndarray:
        """Predicted class per row (m,) int64."""
        return self.predict_proba(w, X).argmax(axis=1)

    def evaluate(self, w, X, y=None, chunk_rows: int = 8192) -> tuple[float, float]:
        """(mean NLL, accuracy) over all rows, without computing gradients."""
        chunk_rows = check_int("chunk_rows", chunk_rows)
        wd = self.device_params(w)
        Xd = self._device_features(X)
        yd = self._device_labels(X, y, Xd.shape[0])
        loss_sum, correct = 0.0, 0
        for start in range(0, Xd.shape[0], chunk_rows):
            acts = self.forward_device(wd, Xd[start:start + chunk_rows])
            ls, c = self.ops.softmax_nll(acts[-1], yd[start:start + chunk_rows])
            loss_sum += ls
            correct += c
        n = Xd.shape[0]
        return loss_sum / n, correct / n
