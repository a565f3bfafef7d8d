"""Single-process mini-batch training: the loop each parameter-server worker runs between exchanges.

Data is uploaded to the backend once; each epoch draws a seeded permutation, gathers the rows once on the
device, and then walks contiguous batch views, so a step does no host<->device traffic except the scalar
loss and correct count.

Steps run in windows (:meth:`MinibatchTrainer.run_window`: batches ``first .. first+count-1`` of the epoch,
optionally summing their gradients into an accumulator for the parameter server); the loss and correct count
are read once per window (:meth:`MinibatchTrainer.take_sums`). With ``cuda_graphs=True`` a backend that can
record a window (cupy: a CUDA graph, :mod:`core.windows`) replays it as one launch with the batches gathered
on the device; elsewhere, and wherever recording fails, the steps run op by op as they always did.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .network import DeviceData, FeedForwardNetwork
from .optimizers import local_optimizer
from .sparse import CsrRows, sorted_unique
from .validation import check_int, check_seed
from .windows import GraphWindows


class TrainingDiverged(FloatingPointError):
    """Loss or parameters became NaN/inf: lower the learning rate."""


@dataclass
class EpochStats:
    epoch: int
    loss: float          # mean training NLL over the epoch's mini-batches (weighted by rows)
    accuracy: float      # training accuracy over the epoch, from the same forward passes
    samples: int
    seconds: float
    samples_per_s: float
    val_loss: float | None = None
    val_accuracy: float | None = None


# A sparse batch steps row by row where its columns are at most this share of the first layer's inputs; above
# it the whole-vector passes were quicker (numba, 2-core VM, an epoch of 12k rows, batch 32, row by row / whole:
# [4096, 64, 2] at 6 / 15 / 28 / 48 % of the rows 0.022 / 0.034 / 0.053 / 0.088 s against 0.041 / 0.045 / 0.049
# / 0.059 s; [784, 256, 256, 10] 0.087 / 0.095 / 0.109 / 0.133 s against 0.096 / 0.097 / 0.102 / 0.106 s).
ROWS_STEP_SHARE = 0.25


class MinibatchTrainer:
    """Seeded mini-batch training of ``net`` over NumPy or device-resident data.

    >>> trainer = MinibatchTrainer(net, batch_size=64, learning_rate=0.1, seed=0)
    >>> w, history = trainer.fit(X, y, epochs=20)
    """

    def __init__(self, net: FeedForwardNetwork, batch_size=64, learning_rate=0.1, optimizer="sgd",
                 momentum=0.9, seed=0, cuda_graphs=False, ragged_share=True):
        check_int("batch_size", batch_size)
        for name, value in (("cuda_graphs", cuda_graphs), ("ragged_share", ragged_share)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.net = net
        self.batch_size = int(batch_size)
        self.optimizer = local_optimizer(net, optimizer, learning_rate, momentum)
        self.rng = np.random.default_rng(check_seed(seed))
        self.grad = net.ops.empty((net.num_params,), net.dtype)
        self.cuda_graphs = bool(cuda_graphs)
        # an epoch's ragged last batch steps by its share of a batch (_weigh_ragged); off where the rows are
        # weighed elsewhere (sync: the server's batch-size-weighted mean of the workers' pushes)
        self._ragged_share = bool(ragged_share)
        self._epoch_rows = 0          # rows of the current epoch (begin_epoch)
        self._shuffled = None
        self._windows: GraphWindows | None = None
        self._epoch = None            # how the current epoch's batches are read: "views" or "order"
        self._order = None            # the epoch's permutation on the device ("order")
        self._loose = None            # batch buffers of the op-by-op steps of an "order" epoch
        self._host_sums = [0.0, 0]
        self._rows = 0
        self._entries = None          # track_entries: the columns of each sparse step since take_entries

    # ------------------------------------------------------------------ epochs and windows
    def steps_per_epoch(self, n_rows: int) -> int:
        """Batches per pass over ``n_rows`` rows (the last one ragged when batch_size does not divide it)."""
        return -(-int(n_rows) // self.batch_size)

    @property
    def graphs(self) -> GraphWindows | None:
        """The recorded windows in use, or None (cuda_graphs off, or the backend cannot record: then
        ``graph_problem`` says why)."""
        if not self.cuda_graphs:
            return None
        if self._windows is None:
            self._windows = GraphWindows(self)
        return self._windows if self._windows.problem is None else None

    @property
    def graph_problem(self) -> str | None:
        """Why windows run op by op although cuda_graphs is on (None: they are recorded, or graphs are off)."""
        return None if self._windows is None else self._windows.problem

    def begin_epoch(self, data: DeviceData) -> None:
        """Draw the epoch's seeded permutation and lay out its batches: a shuffled copy of the rows walked in
        views, or (graphs) the permutation on the device, where each recorded step gathers its batch."""
        ops = self.net.ops
        self.net.check_data(data)       # a DeviceData of another network would send the kernels out of bounds
        self._epoch_rows = data.n_rows
        perm = self.rng.permutation(data.n_rows).astype(np.int64)
        windows = self.graphs
        if windows is not None:
            windows.set_order(perm)
            self._epoch, self._order = "order", windows.order
            return
        if isinstance(data.X, CsrRows):      # sparse rows: gathered anew, O(nnz); the labels as dense ones
            ys = self._shuffled[1] if self._shuffled is not None and \
                self._shuffled[1].shape == data.y.shape else ops.empty(data.y.shape, data.y.dtype)
            self._shuffled = (data.X.take(perm), ops.take_rows(data.y, perm, out=ys))
            self._epoch = "views"
            return
        order = ops.asarray(perm)
        if self._shuffled is None or self._shuffled[0].shape != data.X.shape:
            self._shuffled = (ops.empty(data.X.shape, self.net.dtype), ops.empty(data.y.shape, data.y.dtype))
        Xs, ys = self._shuffled
        ops.take_rows(data.X, order, out=Xs)
        ops.take_rows(data.y, order, out=ys)
        self._epoch = "views"

    def batch(self, data: DeviceData, index: int):
        """(X_batch, y_batch) device arrays of batch ``index`` of the current epoch."""
        start, stop = index * self.batch_size, min((index + 1) * self.batch_size, data.n_rows)
        if self._epoch == "views":
            Xs, ys = self._shuffled
            return Xs[start:stop], ys[start:stop]
        ops, m = self.net.ops, stop - start
        if self._loose is None or self._loose[0].shape[0] != m:
            self._loose = (ops.empty((m, data.X.shape[1]), self.net.dtype), ops.empty((m,), data.y.dtype))
        xb, yb = self._loose
        ops.take_rows(data.X, self._order[start:stop], out=xb)
        ops.take_rows(data.y, self._order[start:stop], out=yb)
        return xb, yb

    def batches(self, data: DeviceData):
        """One epoch of (X_batch, y_batch) device views in a fresh seeded order; last batch may be ragged."""
        self.begin_epoch(data)
        for index in range(self.steps_per_epoch(data.n_rows)):
            yield self.batch(data, index)

    def step(self, w, Xb, yb, accumulate=None, update=True) -> tuple[float, int]:
        """One step on device arrays: the gradient, added to ``accumulate`` if given, and (``update``) an
        optimizer step in place on ``w`` -> (loss_sum over the batch, n_correct).

        A sparse batch's gradient (plain SGD) is zero outside the first layer's rows of its columns and the
        layers after: where those rows are at most ROWS_STEP_SHARE of the layer's, the gradient, update and
        window sum read and write them only, not the whole vector (a [262144, 16, 2] step of 32 text rows:
        ~1.5 % of the entries). Where a batch touches more, a whole pass (a fill, one fused update) is quicker."""
        first = self.net.layout[0]                 # at offset 0; the later layers from its bias on
        rows = None
        if isinstance(Xb, CsrRows) and self.optimizer.plain_sgd and (
                self._entries is not None or Xb.nnz <= 2 * ROWS_STEP_SHARE * first.d_in):   # else too many, mostly
            rows = Xb.columns()
        if self._entries is not None:
            self._entries.append(rows)             # None: a dense step, any entry may have changed
        if rows is not None and rows.size <= ROWS_STEP_SHARE * first.d_in:
            return self._rows_step(w, Xb, yb, rows, accumulate, update)
        loss_sum, correct = self.net.gradient_device(w, Xb, yb, self.grad)
        self._weigh_ragged(Xb.shape[0])
        if accumulate is None:
            if update:
                self.optimizer.step(w, self.grad)
        elif update:
            self.optimizer.step_accumulating(w, self.grad, accumulate)
        else:
            accumulate += self.grad
        return loss_sum, correct

    def batch_share(self, m: int, n_rows: int) -> float | None:
        """The share of a batch that a step on ``m`` rows of an epoch of ``n_rows`` takes: m / batch_size for the
        ragged last batch of an epoch of several batches, else None (a whole batch, or an epoch that is one
        batch: full-batch descent keeps its rate)."""
        B = self.batch_size
        return m / B if self._ragged_share and m < B < n_rows else None

    def _weigh_ragged(self, m: int) -> None:
        """The gradient of a ragged batch (the epoch's last, m < batch_size rows) is the mean over its m rows:
        scaled by m / batch_size, each row of an epoch moves the weights as much as any other. At full weight the
        few rows of a tail (3 of 32: digits' 1797 rows over 2 workers) made the last step of a fit a large noisy
        one: 3 in 12 async fits ended at 1.7x the loss of the others, none with an even split."""
        share = self.batch_share(m, self._epoch_rows)
        if share is not None:
            self.grad *= share

    def _rows_step(self, w, Xb, yb, rows, accumulate, update) -> tuple[float, int]:
        first = self.net.layout[0]
        loss_sum, correct = self.net.gradient_device(w, Xb, yb, self.grad, rows=rows)
        self._weigh_ragged(Xb.shape[0])
        if update:
            self.optimizer.step_rows(w, self.grad, rows, first.d_out, first.b_start, accumulate)
        elif accumulate is not None:
            block = slice(0, first.b_start)
            accumulate[block].reshape(-1, first.d_out)[rows] += self.grad[block].reshape(-1, first.d_out)[rows]
            accumulate[first.b_start:] += self.grad[first.b_start:]
        return loss_sum, correct

    def track_entries(self) -> None:
        """From now on remember which entries the steps change, for :meth:`take_entries`."""
        self._entries = []

    def take_entries(self, keep: bool = False) -> np.ndarray | None:
        """The flat entries (sorted, unique) the steps since the last call could change, or None when one of
        them was dense (any entry), they cover more than ROWS_STEP_SHARE of the first layer's rows, or tracking
        is off; resets unless ``keep``. A parameter-server worker sends and receives those of a sparse window
        instead of the whole vector."""
        steps = self._entries
        if steps is None:
            return None
        if not keep:
            self._entries = []
        if not steps or any(rows is None for rows in steps):
            return None
        rows = sorted_unique(np.concatenate(steps))
        if rows.size > ROWS_STEP_SHARE * self.net.layout[0].d_in:
            return None             # most of the vector: as entries (8 bytes each) it would not be any smaller
        return self.net.entries_of_rows(rows)

    def run_window(self, w, data: DeviceData, first: int, count: int, accumulate=None, update=True) -> int:
        """Batches ``first .. first+count-1`` of the current epoch (:meth:`begin_epoch`): each computes its
        gradient, adds it to ``accumulate`` (a device vector, optional: the parameter server's window sum)
        and, with ``update``, takes a local optimizer step on ``w``. Recorded and replayed as one launch where
        the backend can (cuda_graphs), else op by op. Loss and correct count wait in :meth:`take_sums`.
        -> rows trained."""
        if self._epoch is None:
            raise RuntimeError("run_window needs an epoch: call begin_epoch(data) first")
        done = 0
        windows = self.graphs if self._epoch == "order" else None
        if windows is not None:
            done = windows.run(w, data, first, count, accumulate, update)
        sums = self._host_sums
        for index in range(first + done, first + count):
            loss_sum, correct = self.step(w, *self.batch(data, index), accumulate, update)
            sums[0] += loss_sum
            sums[1] += correct
        rows = min((first + count) * self.batch_size, data.n_rows) - first * self.batch_size
        self._rows += rows
        return rows

    def take_sums(self) -> tuple[float, int, int]:
        """(loss sum, correct count, rows) of the steps since the last call; resets them. With recorded
        windows this is the one device->host read of a window."""
        loss_sum, correct = self._host_sums
        if self._windows is not None:
            dev_loss, dev_correct = self._windows.take_sums()
            loss_sum, correct = loss_sum + dev_loss, correct + dev_correct
        rows, self._host_sums, self._rows = self._rows, [0.0, 0], 0
        return loss_sum, correct, rows

    def run_epoch(self, w, data: DeviceData, epoch: int) -> EpochStats:
        t0 = time.perf_counter()
        self.begin_epoch(data)
        self.run_window(w, data, 0, self.steps_per_epoch(data.n_rows))
        loss_sum, correct, n = self.take_sums()
        self.net.ops.synchronize()
        dt = time.perf_counter() - t0
        if not math.isfinite(loss_sum) or not self.net.ops.all_finite(w):
            raise TrainingDiverged(f"training diverged in epoch {epoch}: mean loss {loss_sum / n!r}; "
                                   f"lower the learning rate (now {self.optimizer.lr})")
        return EpochStats(epoch, loss_sum / n, correct / n, n, dt, n / dt if dt > 0 else float("inf"))

    def fit(self, X, y=None, epochs=10, w0=None, validation=None, callback=None):
        """Train for ``epochs`` passes -> (final weights as NumPy, list[EpochStats]).

        X: (n, d0) array or DeviceData; y: (n,) labels; w0: initial flat vector (default init_params(seed=0));
        validation: optional (X_val, y_val) evaluated after each epoch; callback(stats) after each epoch.
        """
        epochs = check_int("epochs", epochs)
        net = self.net
        data = X if isinstance(X, DeviceData) else net.upload(X, y)
        if data.y is None:
            raise ValueError("training needs labels: pass y, or DeviceData made with labels")
        val = None
        if validation is not None:
            if not isinstance(validation, (DeviceData, tuple, list)) or \
                    not isinstance(validation, DeviceData) and len(validation) != 2:
                raise ValueError(f"validation must be (X_val, y_val) or DeviceData with labels, got "
                                 f"{type(validation).__name__}")
            val = validation if isinstance(validation, DeviceData) else net.upload(*validation)
        if w0 is None:                  # drawn here: finite, and nobody else holds it
            w = net.ops.asarray(net.init_params(0))
        else:
            w = net.device_params(w0)
            if w is w0:  # never train in place on the caller's array
                w = net.ops.asarray(w.copy())
        history = []
        for epoch in range(1, int(epochs) + 1):
            stats = self.run_epoch(w, data, epoch)
            if val is not None:
                stats.val_loss, stats.val_accuracy = net.evaluate(w, val)
            history.append(stats)
            if callback is not None:
                callback(stats)
        # this fit's own vector: on the CPU it is the result (a copy of a [262144, 256, 2] model's 268 MB took
        # longer than its epoch), from a device one copy to the host
        return (w if isinstance(w, np.ndarray) else net.ops.to_host(w)), history
