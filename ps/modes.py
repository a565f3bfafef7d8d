"""The trainer modes as objects: one class per mode owns everything that differs between modes.

What a worker does between and at exchanges, what it pushes, what the server does with a push or a round, and
how the data is sharded. The update math is :mod:`ps.rules` (and the optimizers of :mod:`core.optimizers`),
called from here, so the tested math is the math that runs. A new mode is one class and one registry line.

    mode = get_mode("easgd")
    mode.rounds            # True: the server combines one push per worker per step; shards are cut equal
    mode.push_flag         # what a push carries on the wire (0 = a gradient)
    mode.shards_must_mix   # True but in sync: each worker's own steps move the model, so a shard of its own
                           # classes pulls it aside (spark.data.label_split then reshuffles the input)

Worker hooks take the worker's loop (:class:`ps.worker.WorkerLoop`: ``net``, ``trainer``, ``client``,
``spec``, ``w`` on the backend, ``acc``, ``version``, ``stats``, ``to_host``); server hooks take the
:class:`ps.engine.Engine` and host float32 vectors. Bounded staleness (reject) and SSP (wait) are policies the
asynchronous modes take from the spec (``staleness``, ``ssp_slack``).

The asynchronous modes split their exchange in three (``pipelines = True``): ``send`` (worker thread: queue a
device->host copy of what goes out), ``talk`` (any thread: wait for that copy, push and pull; host arrays
only) and ``receive`` (worker thread: apply the reply to the weights). ``exchange`` runs the three in a row;
with the spec's ``pipeline`` the worker runs ``talk`` of window k on a thread while it computes window k+1,
which then starts from weights one exchange older (staleness one higher; a gradient mode's ``receive`` rebases
the window computed meanwhile onto each reply, so the worker never loses its own last window, and the
elastic modes subtract what left). Round modes never pipeline: a round waits for every worker's push of the
same step. A push refused as STALE keeps its step open: ``receive`` pulls, recomputes the window from the
batches the worker kept (``keeps_window``) and pushes the step again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from core.backends.numpy_ops import Transfer
from core.optimizers import Verdict
from core.trainer import ROWS_STEP_SHARE

from . import rules
from .client import StaleUpdate, UpdateRejected
from .protocol import FLAG_ELASTIC, FLAG_LOCAL_WEIGHTS, Entries, Reason

STALE = object()      # talk's answer for a push refused as stale: receive recomputes the window
# Local steps between exchanges when the user gives none (tau 0) in a mode that may exceed 1. One exchange per
# mini-batch paid a round trip per step: async [784,256,256,10] on 48k rows, 3 passes, local[2], CURVE on fit in
# 12.8 s at window 1 and 7.7 s at 4, at the same accuracy (digits: the same, to 0.002).
DEFAULT_WINDOW = 4
# The most local steps one push of a default-window asynchronous run may cover (TrainingSpec.window_max): on
# local[2], 1M rows of 20 features through [20, 64, 64, 2], 3 passes, waited on exchanges for 70 % of the loop at
# window 4 and fit in 3.8 s, against 1.6 s at 64 (train accuracy 0.994 and 0.995).
AUTO_WINDOW_MAX = 64


@dataclass
class Outgoing:
    """One exchange in flight: its step, the push's metrics, the host buffer being filled and its copy, and
    the weights version the window was computed on."""
    step: int
    metrics: dict
    host: np.ndarray
    transfer: object
    base_version: int
    extra: dict = field(default_factory=dict)


class Mode:
    """Base of every mode; see the module docstring for the hooks."""
    name: ClassVar[str]
    push_flag: ClassVar[int] = 0            # 0: a gradient; FLAG_ELASTIC; FLAG_LOCAL_WEIGHTS
    rounds: ClassVar[bool] = False          # the server waits for one push per worker per step
    local_optimizer: ClassVar[str] = "sgd"  # the rule of a worker's own steps
    windowed: ClassVar[bool] = True         # tau (local steps between exchanges) may exceed 1
    bounded_staleness: ClassVar[bool] = False   # takes a staleness bound (a push too old is refused)
    pipelines: ClassVar[bool] = False       # may overlap an exchange with the next window (spec.pipeline)
    weighs_rows: ClassVar[bool] = False     # the server weighs each push by its rows (sync): a worker's ragged
                                            # batch goes at its mean, not at its share of a batch

    @property
    def default_tau(self) -> int:
        """Local steps between exchanges when none is given: :data:`DEFAULT_WINDOW`, or 1 where it may not
        exceed 1 (sync)."""
        return DEFAULT_WINDOW if self.windowed else 1

    @property
    def pushes_gradients(self) -> bool:
        """Workers push gradients, which the server's optimizer applies (not weights or elastic differences)."""
        return self.push_flag == 0

    @property
    def tol_ignores_silent_workers(self) -> bool:
        """tol: whether an epoch may be judged without a worker that has gone silent. Asynchronous modes: yes,
        a dead worker must not hold the decision. Round modes: no, they cannot go on without every worker."""
        return not self.rounds

    @property
    def shards_must_mix(self) -> bool:
        """Whether workers' shards must each hold a mix of the classes: a worker's own steps move the model in
        every mode but sync, whose every update is the mean of one batch from each worker (weighs_rows). Shards
        that hold different classes pull such a model back and forth."""
        return not self.weighs_rows

    @property
    def equal_shards(self) -> bool:
        """Round modes need every worker to take the same number of steps: shards are cut to one size."""
        return self.rounds

    # ---------------------------------------------------------------- worker
    def tracks_entries(self, spec) -> bool:
        """Whether a worker on sparse rows exchanges by the entries its windows change (``trainer.track_entries``):
        the gradient modes, and async-easgd in line."""
        return self.pushes_gradients

    def keeps_window(self, spec) -> bool:
        """Whether the worker must keep copies of a window's batches (to recompute it)."""
        return False

    def push_scale(self, spec, windows: int) -> float:
        """The factor on a push that covers ``windows`` windows of an adaptive window (1 for one window)."""
        return 1.0

    def local_window(self, loop, data, first: int, count: int) -> int:
        """Batches ``first .. first+count-1`` of the epoch between exchanges (loss and correct count wait in
        ``loop.trainer.take_sums``) -> rows. Default: local optimizer steps on the worker's weights."""
        return loop.trainer.run_window(loop.w, data, first, count)

    def exchange(self, loop, step: int, metrics: dict) -> None:
        """The whole exchange after a window, on the worker's thread."""
        out = self.send(loop, step, metrics)
        self.receive(loop, out, self.talk(loop, out))

    def send(self, loop, step: int, metrics: dict) -> Outgoing:
        raise NotImplementedError(f"mode {self.name!r} exchanges in one piece")

    def talk(self, loop, out: Outgoing):
        raise NotImplementedError(f"mode {self.name!r} exchanges in one piece")

    def receive(self, loop, out: Outgoing, reply) -> None:
        raise NotImplementedError(f"mode {self.name!r} exchanges in one piece")

    # ---------------------------------------------------------------- server
    def screens_payload(self, optimizer) -> bool:
        """True when :meth:`apply_push` itself refuses NaN/inf, so reading the payload need not look."""
        return False

    def changes_only_pushed(self, optimizer) -> bool:
        """True when an update changes only the entries its pushes carried (a zero entry of a push leaves that
        weight as it is): the server may then answer a client with the entries changed since its version."""
        return False

    def apply_push(self, engine, w: np.ndarray, payload: np.ndarray, out: np.ndarray) -> Verdict:
        """Apply one push on arrival: new weights into ``out`` -> APPLIED, BAD_GRADIENT (the payload held
        NaN/inf: only where :meth:`screens_payload`) or BAD_RESULT (non-finite weights; any optimizer state
        rolled back)."""
        raise NotImplementedError

    def updates_entries(self, optimizer) -> bool:
        """True when :meth:`apply_entries` can apply a sparse push on its entries alone (with ``optimizer``)."""
        return False

    def apply_entries(self, engine, w: np.ndarray, index, values) -> Verdict:
        """Apply a sparse push (``values`` at ``index``, zero elsewhere) in place on ``w``, reading and writing
        only its entries -> a Verdict as :meth:`apply_push`; nothing is written unless APPLIED."""
        raise NotImplementedError

    def apply_round(self, engine, w: np.ndarray, entries: list, out: np.ndarray) -> Verdict:
        """Combine a full round, ``entries`` = [(header, payload)] one per worker: new weights into ``out``
        -> APPLIED or BAD_RESULT (as :meth:`apply_push`)."""
        raise NotImplementedError

    def apply_round_entries(self, engine, w: np.ndarray, entries: list) -> Verdict:
        """:meth:`apply_round` of a round whose pushes are all sparse (``entries`` = [(header, Entries)]), in
        place on ``w`` and on the union of their entries only (where :meth:`updates_entries`)."""
        raise NotImplementedError

    def round_reply(self, w_old: np.ndarray):
        """The array each member of a completed round gets back (None: weights only if it asked)."""
        return None


class _GradientMode(Mode):
    """Workers push summed gradients; the server's optimizer applies them."""
    stale_retries = 3          # recomputations of one window before a worker gives up on a staleness bound, and
                               # only once they have also taken workerTimeout: with bound 0 two dense workers
                               # refused each other in turn, and 4 losses in a row came in every fit

    def _stale_tries(self, loop):
        """Attempt numbers of a window's recomputation: at least ``stale_retries``, and on until workerTimeout
        has passed since the first. Every refusal is another worker's accepted push, so the job moves on; only a
        bound too tight for the workers keeps one refused that long."""
        t0, attempt = time.monotonic(), 0
        while attempt < self.stale_retries or time.monotonic() - t0 < loop.spec.worker_timeout:
            attempt += 1
            yield attempt

    def local_progress(self, spec) -> bool:
        """Whether a worker also steps its own copy of the weights inside a window."""
        return False

    def changes_only_pushed(self, optimizer):
        return optimizer.sparse_exact

    def updates_entries(self, optimizer):
        return optimizer.sparse_exact

    def push_scale(self, spec, windows):
        """1 / sqrt(min(windows, num_workers)). The server adds every worker's summed gradients (DOWNPOUR): for
        a window of a few steps that is asynchronous SGD, but the sums of K workers' long windows are K
        trajectories from about the same weights added up, and the server's weights overshoot where they agree.
        Scaled so, K pushes add their noise up to one push's and their common direction up to sqrt(K) of it;
        one window still moves the server the whole way. Runner, 48k x 784 synthetic rows, [784,256,256,10], 3
        passes, automatic window (20-56 steps), accuracy on 10k of the rows, mean (min): 2 workers, 12 seeds,
        0.949 (0.87) with whole sums, 0.969 (0.949) so, 0.973 (0.953) with 1 / min (the workers' average, local
        SGD's); 4 workers, 4-6 seeds, 0.80 (0.64), 0.943 (0.934), 0.85 (0.82); window 4: 0.967 and 0.962."""
        return min(windows, spec.num_workers) ** -0.5 if windows > 1 else 1.0

    def local_window(self, loop, data, first, count):
        return loop.trainer.run_window(loop.w, data, first, count, accumulate=loop.acc,
                                       update=self.local_progress(loop.spec))

    def send(self, loop, step, metrics):
        """Queue the copy of the window's summed gradient and give the next window the other accumulator
        (zeroed; its own last copy finished when its exchange was received). Pipelined, also note the weights
        the next window starts from (``loop.window_start``): receive rebases that window's progress."""
        entries = loop.trainer.take_entries()
        scale = loop.push_scale
        if entries is not None:     # a sparse window (CPU, host arrays): its entries go as they are, and only
            values = loop.acc[entries]
            if scale != 1.0:
                values *= scale
            out = Outgoing(step, metrics, Entries(entries, values, loop.net.num_params), Transfer(),
                           loop.window_version, {"entries": entries})
            loop.acc[entries] = 0   # they held all of the window's sum
        else:
            if scale != 1.0:
                loop.acc *= scale
            host = loop.outbox(step)
            out = Outgoing(step, metrics, host, loop.ops.copy_to_host_async(loop.acc, host), loop.window_version)
            loop.acc, loop.spare_acc = loop.spare_acc, loop.acc
            loop.acc[...] = 0
        if loop.window_start is not None:
            behind = loop.start_behind
            if behind is None or entries is None:
                loop.window_start[...] = loop.w
            else:                   # w moved only there since: the receive's copies and this window's steps
                for index in (*behind, entries):
                    loop.ops.copy_entries(loop.window_start, loop.w, index)
            loop.start_behind = []
        return out

    def talk(self, loop, out):
        out.transfer.wait(loop.wait_timeout)
        try:
            return self._push(loop, out.host, out.base_version, out.step, out.metrics)
        except StaleUpdate:
            return STALE                       # the step stays open: receive recomputes it

    @staticmethod
    def _push(loop, gradient, base_version, step, metrics):
        """Push window ``step``'s gradient -> (version, weights) to go on from; StaleUpdate propagates. An update
        the server rolled back (UpdateRejected) is counted, and the worker goes on from the server's weights."""
        try:
            r = loop.client.push(gradient, base_version=base_version, step=step,
                                 want_weights=loop.spec.ssp_slack is None, **metrics)
        except UpdateRejected:
            loop.stats["rejected_updates"] += 1
            return loop.client.pull()
        return (r.version, r.weights) if r.weights is not None else loop.client.pull()

    def receive(self, loop, out, reply):
        """Go on from the reply's weights. Pipelined, the window computed meanwhile keeps its progress: the
        worker's weights become the reply's plus gain x (weights now - weights that window started from). Its
        gradient is on its way to the server, which will apply about that step (gain: the server optimizer's
        steady-state factor, 1 for sgd, 1 / (1 - mu) for momentum); without the rebase the next window would
        start from weights that lack the worker's own last window (DOWNPOUR one exchange behind itself),
        which cost ~0.2 of test accuracy after 3 passes in bench/scale_bench.py --pipeline. A sparse window
        answered by a delta reply copies back only its own entries and the ones the reply changed."""
        start = loop.window_start
        own = out.extra.get("entries")
        recomputed = reply is STALE
        if recomputed:
            if own is not None and start is None:
                reply, own = self._push_recomputed_entries(loop, out, own)
                recomputed = own is None
            else:
                reply = self._push_recomputed(loop, out)
        loop.forget_window(out.step)
        loop.version, wh = reply
        changed = loop.client.last_changed if own is not None and not recomputed else None
        progress = None if changed is None or start is None else loop.trainer.take_entries(keep=True)
        if changed is not None and (start is None or progress is not None):
            # The weights are the ones the client held before, but for this window's own entries (and,
            # pipelined, the next window's steps so far); the reply changed what it names: copy those sets
            # and rebase the next window's progress on its entries, not over the whole vector.
            if progress is not None:
                moved = start[progress] - loop.w[progress]          # as below, on the entries it can be in
                if loop.rebase_factor != 1.0:
                    moved *= loop.rebase_factor
            loop.ops.copy_entries(loop.w, wh, own)
            loop.ops.copy_entries(loop.w, wh, changed)
            if progress is not None:
                loop.w[progress] = wh[progress] - moved
                loop.start_behind += [own, changed]
            return
        loop.start_behind = None
        if start is not None:
            start -= loop.w                    # minus the progress of the window computed while this was away
        # one copy out of the reply's read-only view (valid until the client's next request)
        loop.ops.copy_from_host_async(loop.w, wh).wait(loop.wait_timeout)
        if start is not None:
            if loop.rebase_factor != 1.0:      # the server will move gain x the local SGD steps (momentum;
                start *= loop.rebase_factor    # times the push's scale)
            loop.w -= start

    def keeps_window(self, spec) -> bool:
        """A bounded-staleness push may be refused and its window recomputed: the worker keeps its batches."""
        return spec.staleness is not None

    def _push_recomputed_entries(self, loop, out, own):
        """:meth:`_push_recomputed` for a sparse window (in line): the weights pulled are taken into the
        worker's own by the entries the delta reply and the window changed, the window computed again there
        and its sum pushed as entries, so a retry costs about what the window did. (A whole-vector copy and
        push per retry made a retry of a [262144, 16, 2] window ~10x slower than a peer's exchange: every retry
        came back stale.) -> ((version, weights), the entries the pushed window changed: None where it stepped
        dense after all, and the caller copies the whole reply)."""
        trainer, client = loop.trainer, loop.client
        for attempt in self._stale_tries(loop):
            loop.stats["stale"] += 1
            version, wh = client.pull()
            changed = client.last_changed
            if changed is None or own is None:
                loop.ops.copy_from_host_async(loop.w, wh).wait(loop.wait_timeout)
            else:
                loop.ops.copy_entries(loop.w, wh, own)     # back from the window's local steps to the pull
                loop.ops.copy_entries(loop.w, wh, changed)
            loss = correct = rows = 0
            for Xb, yb in loop.kept_window(out.step):
                ls, c = trainer.step(loop.w, Xb, yb, accumulate=loop.acc, update=self.local_progress(loop.spec))
                loss, correct, rows = loss + ls, correct + c, rows + Xb.shape[0]
            metrics = {**out.metrics, "loss": loss / rows, "accuracy": correct / rows, "batch_size": rows}
            entries = trainer.take_entries()
            if entries is None:
                gradient = loop.to_host(loop.acc)
                loop.acc[...] = 0
            else:
                gradient = Entries(entries, loop.acc[entries], loop.net.num_params)
                loop.acc[entries] = 0
            try:
                return self._push(loop, gradient, version, out.step, metrics), entries
            except StaleUpdate:
                own = entries            # what the window's local steps moved away from the weights pulled
        raise self._too_stale(loop, out)

    def _too_stale(self, loop, out):
        return StaleUpdate(Reason.STALE, f"step {out.step} stayed stale for workerTimeout "
                                         f"({loop.spec.worker_timeout:g}s) of recomputations: the staleness bound "
                                         f"{loop.spec.staleness} is too tight for {loop.spec.num_workers} workers; "
                                         f"raise it")

    def _push_recomputed(self, loop, out):
        """Pull, compute window ``out.step`` again from its kept batches on the weights pulled, push the same
        step; as long as :meth:`_stale_tries` allows -> (version, weights) as talk returns them."""
        for attempt in self._stale_tries(loop):
            loop.stats["stale"] += 1
            version, wh = loop.client.pull()
            w = loop.ops.asarray(np.array(wh, copy=True))
            acc = loop.ops.zeros(w.shape, w.dtype)
            loss = correct = rows = 0
            for Xb, yb in loop.kept_window(out.step):
                ls, c = loop.trainer.step(w, Xb, yb, accumulate=acc, update=self.local_progress(loop.spec))
                loss, correct, rows = loss + ls, correct + c, rows + Xb.shape[0]
            metrics = {**out.metrics, "loss": loss / rows, "accuracy": correct / rows, "batch_size": rows}
            try:
                return self._push(loop, loop.to_host(acc), version, out.step, metrics)
            except StaleUpdate:
                continue
        raise self._too_stale(loop, out)


class Sync(_GradientMode):
    name = "sync"
    rounds = True
    windowed = False
    weighs_rows = True

    def apply_round(self, engine, w, entries, out):
        g = rules.weighted_mean([a for _, a in entries], [h.batch_size for h, _ in entries], out=np.empty_like(w))
        return engine.optimizer.step_checked(w, g, out)

    def apply_round_entries(self, engine, w, entries):
        index, g = rules.weighted_mean_entries([(a.index, a.values) for _, a in entries],
                                               [h.batch_size for h, _ in entries])
        return engine.optimizer.step_entries_checked(w, index, g)


class Async(_GradientMode):
    name = "async"
    bounded_staleness = True
    pipelines = True

    def local_progress(self, spec):
        # DOWNPOUR: local progress inside the window; pipelined also at tau 1, for receive to rebase it
        return spec.tau > 1 or spec.pipeline

    def screens_payload(self, optimizer):
        return optimizer.plain_sgd               # its checked update screens in the same pass

    def apply_push(self, engine, w, payload, out):
        return engine.optimizer.step_checked(w, payload, out)

    def apply_entries(self, engine, w, index, values):
        return engine.optimizer.step_entries_checked(w, index, values)


class Easgd(Mode):
    name = "easgd"
    push_flag = FLAG_LOCAL_WEIGHTS
    rounds = True

    def exchange(self, loop, step, metrics):
        try:
            r = loop.client.push(loop.to_host(loop.w), base_version=loop.version, step=step,
                                 kind="local_weights", **metrics)
        except UpdateRejected:                 # the round's center update was rolled back: no elastic move
            loop.stats["rejected_updates"] += 1
            return
        # x_i <- x_i - a (x_i - c_old), with the center the round used (a view, used before the next request)
        loop.w -= rules.elastic_difference(loop.w, loop.ops.asarray(r.weights), loop.spec.alpha)
        loop.version = r.version

    def apply_round(self, engine, w, entries, out):
        rules.easgd_center_update(w, [a for _, a in entries], engine.spec.alpha, out=out)
        return _finite(engine, out)

    def round_reply(self, w_old):
        return w_old


class AsyncEasgd(Mode):
    name = "async-easgd"
    push_flag = FLAG_ELASTIC
    pipelines = True

    def send(self, loop, step, metrics):
        """Queue the copy of the worker's weights x_i as they are at the end of the window."""
        host = loop.outbox(step)
        return Outgoing(step, metrics, host, loop.ops.copy_to_host_async(loop.w, host), loop.window_version)

    def talk(self, loop, out):
        """Pull the center c, push e = alpha (x_i - c) computed on the host copy of x_i -> (version, e)."""
        out.transfer.wait(loop.wait_timeout)
        version, center = loop.client.pull()
        e = rules.elastic_difference(np.asarray(out.host, np.float32), center, loop.spec.alpha)
        self._push_difference(loop, e, version, out.step, out.metrics)
        return version, e

    @staticmethod
    def _push_difference(loop, e, version, step, metrics) -> None:
        """Push the elastic difference ``e`` (a vector or its Entries) computed against center ``version``."""
        try:
            loop.client.push(e, base_version=version, step=step, kind="elastic", **metrics)
        except UpdateRejected:                 # the center's update was rolled back; x_i still moves toward it
            loop.stats["rejected_updates"] += 1

    def receive(self, loop, out, reply):
        """x_i <- x_i - e: what left the worker went to the center (pipelined, x_i moved on meanwhile)."""
        loop.version, e = reply
        loop.w -= loop.ops.asarray(e)

    def tracks_entries(self, spec):
        return not spec.pipeline

    def exchange(self, loop, step, metrics):
        """In line, on sparse rows: x_i and the center the client holds differ only on the entries
        ``loop.apart`` (every entry a window or a delta reply changed since the first pull; None: anywhere),
        so e = alpha (x_i - c) is zero elsewhere and is computed, pushed and subtracted there only. Where that
        set grows past ROWS_STEP_SHARE of the vector, or a reply comes whole, the whole-vector exchange."""
        own = loop.trainer.take_entries()
        if own is None or loop.apart is None:
            loop.apart = None
            return super().exchange(loop, step, metrics)
        version, center = loop.client.pull()
        changed = loop.client.last_changed
        apart = None if changed is None else loop.ops.union_sorted([loop.apart, own, changed])
        if apart is None or apart.size > ROWS_STEP_SHARE * loop.net.num_params:
            loop.apart = None                  # x_i and c may differ anywhere from now on
            e = rules.elastic_difference(loop.w, center, loop.spec.alpha)
            push, index = e, None
        else:
            loop.apart = apart
            e = rules.elastic_difference(loop.ops.gather_entries(loop.w, apart),
                                        loop.ops.gather_entries(center, apart), loop.spec.alpha)
            push, index = Entries(apart, e, loop.net.num_params), apart
        self._push_difference(loop, push, version, step, metrics)
        loop.version = version
        if index is None:
            loop.w -= e
        else:
            loop.w[index] -= e

    def changes_only_pushed(self, optimizer):
        return True                            # c + e: a zero entry of e leaves c

    def apply_push(self, engine, w, payload, out):
        rules.apply_elastic(w, payload, out=out)
        return _finite(engine, out)

    def updates_entries(self, optimizer):
        return True

    def apply_entries(self, engine, w, index, values):
        # c + e on the entries is an SGD step of rate -1 on e (exactly: c - (-1 e)); screened, nothing written
        # where a result is not finite (read_push refused NaN/inf in e)
        bad = engine.optimizer.ops.sgd_entries_screened(w, index, values, -1.0)
        if bad is None:
            return Verdict.APPLIED
        return Verdict.BAD_GRADIENT if bad == "gradient" else Verdict.BAD_RESULT


class Eamsgd(AsyncEasgd):
    name = "eamsgd"
    local_optimizer = "nesterov"


def _finite(engine, out) -> Verdict:
    return Verdict.APPLIED if engine.optimizer.ops.all_finite(out) else Verdict.BAD_RESULT


MODES = {m.name: m() for m in (Sync, Async, Easgd, AsyncEasgd, Eamsgd)}
MODE_NAMES = tuple(MODES)


def get_mode(name) -> Mode:
    """The mode object for ``name``, else ValueError naming the choices."""
    mode = MODES.get(name) if isinstance(name, str) else None
    if mode is None:
        raise ValueError(f"mode must be one of {MODE_NAMES}, got {name!r}")
    return mode
