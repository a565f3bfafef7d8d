"""Training windows recorded once and replayed: the trainer's steps with no host work per step.

A step of the op-by-op path is ~25 backend calls and, on a GPU, a device->host read of the loss; on small
nets the GPU then waits for Python. Here one step is written so that it needs no host input at all: the batch
is gathered on the device through the epoch's permutation (``order``) at a device-side ``offset`` that the
step itself advances, and the loss and correct count are added to device-side ``sums``. Such a step can be
recorded by the backend (CUDA stream capture into a graph, :meth:`NumpyOps.capture_graph`) ``count`` times in
a row and replayed as one launch; the host reads ``sums`` once per window.

:class:`GraphWindows` keeps the recorded graphs (per batch size, step count and step kind, a few of them),
warms every kernel up with one real step before the first recording (compilation and allocation are not
allowed while recording), and falls back to the op-by-op path where recording is impossible, saying why in a
debug log. The op-by-op path (:meth:`core.trainer.MinibatchTrainer.step`) stays the definition: the tests
compare the two.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

log = logging.getLogger("core.windows")

MAX_GRAPH_STEPS = 64     # longer windows are replayed as several launches (bounds capture time and graph size)
MAX_GRAPHS = 8           # recorded graphs kept (full windows, shorter windows at epoch ends, the ragged batch)


class GraphWindows:
    """Recorded training windows of one trainer. ``run(w, data, first, count, accumulate, update)`` runs
    batches ``first .. first+count-1`` of the current epoch (order from :meth:`set_order`) and says how many
    ran: fewer when they cannot be recorded here (the caller runs the rest op by op; :attr:`problem` says
    why, once, in a debug log)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.net = trainer.net
        self.ops = trainer.net.ops
        ops = self.ops
        self.sums = ops.zeros((2,), np.float64)                 # loss sum, correct count of the window
        self.offset = ops.zeros((1,), np.int64)                 # row of ``order`` the next batch starts at
        self.order = None                                       # (n,) int64 permutation of the epoch
        self.problem: str | None = None
        self._graphs: OrderedDict = OrderedDict()
        self._warm: set = set()
        self._batch: dict = {}                                  # m -> (xb, yb) fixed batch buffers
        schedule = trainer.optimizer.schedule
        if ops.recording_problem() is not None:
            self._give_up(ops.recording_problem())
        elif schedule.kind != "constant":
            self._give_up(f"the local optimizer's learning rate follows a {schedule.kind!r} schedule; a "
                          "recorded step would keep the rate of the step it was recorded at")

    # ------------------------------------------------------------------ setup
    def _give_up(self, why: str) -> None:
        if self.problem is None:
            log.debug("training windows run op by op: %s", why)
        self.problem = why

    def set_order(self, order_host: np.ndarray) -> None:
        """The epoch's permutation (n,) into the one device buffer every recorded step reads."""
        if self.order is None or self.order.shape[0] != order_host.shape[0]:
            self.order = self.ops.asarray(order_host.astype(np.int64))
            self._graphs.clear()                                 # recorded against the old buffer
        else:
            # queued behind the previous epoch's graphs on the same stream; the host buffer is a temporary
            self.ops.copy_from_host_async(self.order, order_host.astype(np.int64)).wait(timeout=60.0)

    def _buffers(self, m, data):
        buf = self._batch.get(m)
        if buf is None:
            buf = self._batch[m] = (self.ops.empty((m, data.X.shape[1]), self.net.dtype),
                                    self.ops.empty((m,), data.y.dtype))
        return buf

    # ------------------------------------------------------------------- steps
    def _body(self, w, data, m, accumulate, update):
        """One step that needs nothing from the host: gather, gradient (sums on the device), accumulate,
        update, advance."""
        ops, net, trainer = self.ops, self.net, self.trainer
        xb, yb = self._buffers(m, data)
        grad, optimizer, sums, offset, order = trainer.grad, trainer.optimizer, self.sums, self.offset, self.order
        share = trainer.batch_share(m, data.n_rows)           # the ragged last batch's share, as op by op

        def step():
            ops.gather_batch(data.X, data.y, order, offset, xb, yb)
            net.gradient_device(w, xb, yb, grad, sums=sums)
            if share is not None:
                grad.__imul__(share)
            if accumulate is not None:
                accumulate.__iadd__(grad)                        # in place (a closure cannot rebind it)
            if update:
                optimizer.step(w, grad)
            ops.advance_offset(offset, m)
        return step

    def run(self, w, data, first: int, count: int, accumulate=None, update=True) -> int:
        """Batches first..first+count-1 of the epoch -> how many of them ran (from ``first`` on); fewer than
        ``count`` when recording turned out impossible, and the caller runs the rest op by op."""
        if self.problem is not None:
            return 0
        B, n = self.trainer.batch_size, data.n_rows
        full = n // B                                            # batches of B rows; then one of n % B rows
        segments = []
        if first < full:
            segments.append((B, min(count, full - first)))
        if first + count > full and n % B:
            segments.append((n % B, 1))
        self.offset.fill(first * B)
        done = 0
        for m, steps in segments:
            ran = self._run_segment(w, data, m, steps, accumulate, update)
            done += ran
            if ran < steps:
                break
        return done

    def _run_segment(self, w, data, m, steps, accumulate, update) -> int:
        kind = (m, id(w), id(accumulate), bool(update), id(data.X))
        warm = (m, accumulate is not None, bool(update))
        optimizer = self.trainer.optimizer
        done = 0
        if warm not in self._warm:
            # one real step first: compiles the kernels and allocates every buffer, which recording forbids
            self.ops.run_recordable(self._body(w, data, m, accumulate, update))
            self._warm.add(warm)
            done = 1
        while done < steps:
            count = min(steps - done, MAX_GRAPH_STEPS)
            graph = self._graph(kind, count, lambda: self._body(w, data, m, accumulate, update),
                                (w, accumulate, data))
            if graph is None:
                return done
            t = optimizer.t
            self.ops.launch_graph(graph)
            optimizer.t = t + count                              # a replay runs count steps but no Python
            done += count
        return done

    def _graph(self, kind, count, make_step, keep):
        key = (kind, count)
        hit = self._graphs.get(key)
        if hit is not None:
            self._graphs.move_to_end(key)
            return hit[0]
        optimizer = self.trainer.optimizer
        t0 = optimizer.t
        graph, why = self.ops.capture_graph(make_step(), count)
        optimizer.t = t0                                         # recording ran no step
        if graph is None:
            self._give_up(why)
            return None
        # the graph holds raw pointers: keep every array it touches alive as long as it is kept
        self._graphs[key] = (graph, keep, self._batch.get(kind[0]), self.order, self.trainer.grad)
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return graph

    def take_sums(self) -> tuple[float, int]:
        """(loss sum, correct count) of the steps since the last call: the one host read per window."""
        host = self.ops.to_host(self.sums)
        self.sums[...] = 0
        return float(host[0]), int(round(float(host[1])))
