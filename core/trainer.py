"""Single-process mini-batch training: the loop each parameter-server worker runs between exchanges.

Data is uploaded to the backend once; each epoch draws a seeded permutation, gathers the rows once on the
device, and then walks contiguous batch views, so a step does no host<->device traffic except the scalar
loss and correct count.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .network import DeviceData, FeedForwardNetwork
from .optimizers import local_optimizer


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


class MinibatchTrainer:
    """Seeded mini-batch training of ``net`` over NumPy or device-resident data.

    >>> trainer = MinibatchTrainer(net, batch_size=64, learning_rate=0.1, seed=0)
    >>> w, history = trainer.fit(X, y, epochs=20)
    """

    def __init__(self, net: FeedForwardNetwork, batch_size=64, learning_rate=0.1, optimizer="sgd",
                 momentum=0.9, seed=0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.net = net
        self.batch_size = int(batch_size)
        self.optimizer = local_optimizer(net, optimizer, learning_rate, momentum)
        self.rng = np.random.default_rng(seed)
        self.grad = net.ops.empty((net.num_params,), net.dtype)
        self._shuffled = None

    def batches(self, data: DeviceData):
        """One epoch of (X_batch, y_batch) device views in a fresh seeded order; last batch may be ragged."""
        ops = self.net.ops
        order = ops.asarray(self.rng.permutation(data.n_rows).astype(np.int64))
        if self._shuffled is None or self._shuffled[0].shape != data.X.shape:
            self._shuffled = (ops.empty(data.X.shape, self.net.dtype), ops.empty(data.y.shape, data.y.dtype))
        Xs, ys = self._shuffled
        ops.take_rows(data.X, order, out=Xs)
        ops.take_rows(data.y, order, out=ys)
        for start in range(0, data.n_rows, self.batch_size):
            yield Xs[start:start + self.batch_size], ys[start:start + self.batch_size]

    def step(self, w, Xb, yb) -> tuple[float, int]:
        """One SGD step on device arrays, in place on ``w`` -> (loss_sum over the batch, n_correct)."""
        loss_sum, correct = self.net.gradient_device(w, Xb, yb, self.grad)
        self.optimizer.step(w, self.grad)
        return loss_sum, correct

    def run_epoch(self, w, data: DeviceData, epoch: int) -> EpochStats:
        t0 = time.perf_counter()
        loss_sum, correct = 0.0, 0
        for Xb, yb in self.batches(data):
            ls, c = self.step(w, Xb, yb)
            loss_sum += ls
            correct += c
        self.net.ops.synchronize()
        dt = time.perf_counter() - t0
        n = data.n_rows
        if not math.isfinite(loss_sum) or not self.net.ops.all_finite(w):
            raise TrainingDiverged(f"training diverged in epoch {epoch}: mean loss {loss_sum / n!r}; "
                                   f"lower the learning rate (now {self.optimizer.lr})")
        return EpochStats(epoch, loss_sum / n, correct / n, n, dt, n / dt if dt > 0 else float("inf"))

    def fit(self, X, y=None, epochs=10, w0=None, validation=None, callback=None):
        """Train for ``epochs`` passes -> (final weights as NumPy, list[EpochStats]).

        X: (n, d0) array or DeviceData; y: (n,) labels; w0: initial flat vector (default init_params(seed=0));
        validation: optional (X_val, y_val) evaluated after each epoch; callback(stats) after each epoch.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        net = self.net
        data = X if isinstance(X, DeviceData) else net.upload(X, y)
        if data.y is None:
            raise ValueError("training needs labels: pass y, or DeviceData made with labels")
        val = None
        if validation is not None:
            val = validation if isinstance(validation, DeviceData) else net.upload(*validation)
        w = net.device_params(net.init_params(0) if w0 is None else w0)
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
        return net.ops.to_host(w), history
