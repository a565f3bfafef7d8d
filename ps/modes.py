"""The trainer modes as objects: one class per mode owns everything that differs between modes.

What a worker does between and at exchanges, what it pushes, what the server does with a push or a round, and
how the data is sharded. The update math is :mod:`ps.rules` (and the optimizers of :mod:`core.optimizers`),
called from here, so the tested math is the math that runs. A new mode is one class and one registry line.

    mode = get_mode("easgd")
    mode.rounds            # True: the server combines one push per worker per step; shards are cut equal
    mode.push_flag         # what a push carries on the wire (0 = a gradient)

Worker hooks take the worker's loop (:class:`ps.worker.WorkerLoop`: ``net``, ``trainer``, ``client``,
``spec``, ``w`` on the backend, ``acc``, ``version``, ``stats``, ``to_host``); server hooks take the
:class:`ps.engine.Engine` and host float32 vectors. Bounded staleness (reject) and SSP (wait) are policies the
asynchronous modes take from the spec (``staleness``, ``ssp_slack``).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from core.optimizers import Verdict

from . import rules
from .client import StaleUpdate, UpdateRejected
from .protocol import FLAG_ELASTIC, FLAG_LOCAL_WEIGHTS, Reason


class Mode:
    """Base of every mode; see the module docstring for the hooks."""
    name: ClassVar[str]
    push_flag: ClassVar[int] = 0            # 0: a gradient; FLAG_ELASTIC; FLAG_LOCAL_WEIGHTS
    rounds: ClassVar[bool] = False          # the server waits for one push per worker per step
    local_optimizer: ClassVar[str] = "sgd"  # the rule of a worker's own steps
    windowed: ClassVar[bool] = True         # tau (local steps between exchanges) may exceed 1
    bounded_staleness: ClassVar[bool] = False   # takes a staleness bound (a push too old is refused)

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
    def equal_shards(self) -> bool:
        """Round modes need every worker to take the same number of steps: shards are cut to one size."""
        return self.rounds

    # ---------------------------------------------------------------- worker
    def keeps_window(self, spec) -> bool:
        """Whether the worker must keep copies of the window's batches (to recompute it)."""
        return False

    def local_step(self, loop, Xb, yb) -> tuple[float, int]:
        """One mini-batch between exchanges -> (loss sum, correct count). Default: a local optimizer step."""
        return loop.trainer.step(loop.w, Xb, yb)

    def exchange(self, loop, step: int, metrics: dict) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- server
    def screens_payload(self, optimizer) -> bool:
        """True when :meth:`apply_push` itself refuses NaN/inf, so reading the payload need not look."""
        return False

    def apply_push(self, engine, w: np.ndarray, payload: np.ndarray, out: np.ndarray) -> Verdict:
        """Apply one push on arrival: new weights into ``out`` -> APPLIED, BAD_GRADIENT (the payload held
        NaN/inf: only where :meth:`screens_payload`) or BAD_RESULT (non-finite weights; any optimizer state
        rolled back)."""
        raise NotImplementedError

    def apply_round(self, engine, w: np.ndarray, entries: list, out: np.ndarray) -> Verdict:
        """Combine a full round, ``entries`` = [(header, payload)] one per worker: new weights into ``out``
        -> APPLIED or BAD_RESULT (as :meth:`apply_push`)."""
        raise NotImplementedError

    def round_reply(self, w_old: np.ndarray):
        """The array each member of a completed round gets back (None: weights only if it asked)."""
        return None


class _GradientMode(Mode):
    """Workers push summed gradients; the server's optimizer applies them."""
    stale_retries = 3          # recomputations of one window before a worker gives up on a staleness bound

    def local_progress(self, tau: int) -> bool:
        """Whether a worker also steps its own copy of the weights inside a window."""
        return False

    def local_step(self, loop, Xb, yb):
        grad = loop.trainer.grad
        loss_sum, correct = loop.net.gradient_device(loop.w, Xb, yb, grad)
        loop.acc += grad
        if self.local_progress(loop.spec.tau):
            loop.trainer.optimizer.step(loop.w, grad)
        return loss_sum, correct

    def exchange(self, loop, step, metrics):
        for stale in range(self.stale_retries + 1):
            if stale:                          # pull and recompute the window on the weights it gets
                loop.stats["stale"] += 1
                loop.version, wh = loop.client.pull()
                loop.w[...] = loop.ops.asarray(wh)
                metrics = {**metrics, **self._recompute(loop)}     # the epoch it ends in stays
            try:
                r = loop.client.push(loop.to_host(loop.acc), base_version=loop.version, step=step,
                                     want_weights=loop.spec.ssp_slack is None, **metrics)
                break
            except StaleUpdate:
                if stale == self.stale_retries:
                    raise StaleUpdate(Reason.STALE, f"step {step} was stale {stale + 1} times in a row: the "
                                                    f"staleness bound {loop.spec.staleness} is too tight for "
                                                    f"{loop.spec.num_workers} workers; raise it") from None
            except UpdateRejected:             # the server rolled the update back: go on from its weights
                loop.stats["rejected_updates"] += 1
                r = None
                break
        if r is not None and r.weights is not None:
            loop.version, wh = r.version, r.weights
        else:
            loop.version, wh = loop.client.pull()
        loop.w[...] = loop.ops.asarray(wh)   # one copy out of the reply's read-only view
        loop.acc[...] = 0

    def _recompute(self, loop) -> dict:
        """The window again, from its saved batches -> its metrics."""
        loop.acc[...] = 0
        loss = correct = rows = 0
        for Xb, yb in loop.window_batches:
            ls, c = self.local_step(loop, Xb, yb)
            loss, correct, rows = loss + ls, correct + c, rows + Xb.shape[0]
        return dict(loss=loss / rows, accuracy=correct / rows, batch_size=rows)

    def keeps_window(self, spec) -> bool:
        """A bounded-staleness push may be refused and its window recomputed: the worker keeps its batches."""
        return spec.staleness is not None


class Sync(_GradientMode):
    name = "sync"
    rounds = True
    windowed = False

    def apply_round(self, engine, w, entries, out):
        g = rules.weighted_mean([a for _, a in entries], [h.batch_size for h, _ in entries], out=np.empty_like(w))
        return engine.optimizer.step_checked(w, g, out)


class Async(_GradientMode):
    name = "async"
    bounded_staleness = True

    def local_progress(self, tau):
        return tau > 1                         # DOWNPOUR: local progress inside the window

    def screens_payload(self, optimizer):
        return optimizer.screens_in_step

    def apply_push(self, engine, w, payload, out):
        return engine.optimizer.step_checked(w, payload, out)


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

    def exchange(self, loop, step, metrics):
        loop.version, center = loop.client.pull()
        e = rules.elastic_difference(loop.w, loop.ops.asarray(center), loop.spec.alpha)
        loop.w -= e
        try:
            loop.client.push(loop.to_host(e), base_version=loop.version, step=step, kind="elastic", **metrics)
        except UpdateRejected:                 # the center's update was rolled back
            loop.stats["rejected_updates"] += 1

    def apply_push(self, engine, w, payload, out):
        rules.apply_elastic(w, payload, out=out)
        return _finite(engine, out)


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
