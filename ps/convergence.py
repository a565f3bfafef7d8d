"""When training stops: per-epoch figures of the applied pushes and the ``tol`` decision. No sockets.

Each push says the epoch of its exchange (the pass over the worker's shard that the exchange's last local
step belongs to) and flags the worker's last push of that epoch (:mod:`ps.protocol`). The monitor sums the
applied pushes per epoch (row-weighted loss and accuracy, staleness, rows) and calls epoch ``e`` complete
when every worker is past it: it sent its last push of ``e`` (applied or refused as stale) or one of a later
epoch, or said BYE, or -- in modes whose workers do not meet in rounds -- it has been silent for longer than
``silence_s``, so a dead worker does not hold the decision. Epochs complete in order. At each completed
epoch ``e >= 2``, with L(e) the epoch's mean training loss::

    relative change = |L(e-1) - L(e)| / max(|L(e-1)|, 1e-12)

and when that is below ``tol`` (> 0) training stops: the decision is final, the engine marks every reply
from then on with FLAG_STOP, and workers end at their next exchange. ``tol = 0`` never stops early; an epoch
that had no applied push (loss undefined) never triggers it. The completed epoch ``epochs`` (maxIter) ends
training as planned.
"""
from __future__ import annotations

import math

TINY = 1e-12        # a zero previous loss does not divide by zero


class ConvergenceMonitor:
    """Epoch bookkeeping of one job: ``num_workers`` workers, ``epochs`` planned passes, ``tol`` (0 = off).

    ignore_silent: a worker silent for more than ``silence_s`` seconds counts as past every epoch (the
    asynchronous modes; round modes cannot go on without every worker anyway). ``now``: monotonic seconds.
    """

    def __init__(self, num_workers: int, epochs: int, tol: float = 0.0, *, silence_s: float = 30.0,
                 ignore_silent: bool = True, now: float = 0.0):
        self.num_workers, self.epochs, self.tol = int(num_workers), int(epochs), float(tol)
        self.silence_s, self.ignore_silent = float(silence_s), bool(ignore_silent)
        self.sums: dict[int, list] = {}        # epoch -> [rows, loss*rows, accuracy*rows, staleness, pushes]
        self.finished = [0] * self.num_workers  # the last epoch each worker is past
        self.retired = [False] * self.num_workers
        self.heard = [now] * self.num_workers   # last request time per worker (creation time until then)
        self.completed: list[dict] = []         # one dict per completed epoch, in order
        self._t_last = None                     # when the previous epoch completed (else the first push)
        self._unreported = 0                    # completed epochs that pop_completed has not handed out yet
        self.stop_reason = None                 # "tol" or "max_iter" once decided
        self.stop_epoch = None
        self.relative_change = None
        self.furthest_at_stop = None            # the furthest epoch any worker was past when tol decided

    @property
    def stop_requested(self) -> bool:
        """True once tol decided that training stops early."""
        return self.stop_reason == "tol"

    # ------------------------------------------------------------------ what the engine tells it
    def _known(self, worker) -> bool:
        return 0 <= worker < self.num_workers

    def heard_from(self, worker: int, now: float) -> None:
        if self._known(worker):
            self.heard[worker] = now

    def rejoin(self, worker: int, now: float) -> None:
        """A (re)registered worker (HELLO): it is training again."""
        if self._known(worker):
            self.retired[worker] = False
            self.heard[worker] = now

    def retire(self, worker: int) -> None:
        """BYE: the worker finished; it holds no epoch."""
        if self._known(worker):
            self.retired[worker] = True

    def seen(self, worker: int, epoch: int, last: bool, now: float) -> None:
        """A valid push for ``epoch`` (0 = not given: ignored); ``last``: the worker's last push of it."""
        if not self._known(worker):
            return
        self.heard[worker] = now
        if epoch > 0:
            self.finished[worker] = max(self.finished[worker], epoch if last else epoch - 1)

    def applied(self, epoch: int, loss: float, accuracy: float, rows: int, staleness: int, now: float) -> None:
        """An applied push: ``loss`` and ``accuracy`` are means over its ``rows``."""
        if epoch <= 0:
            return
        s = self.sums.setdefault(epoch, [0, 0.0, 0.0, 0, 0])
        s[0] += rows
        s[1] += loss * rows
        s[2] += accuracy * rows
        s[3] += staleness
        s[4] += 1
        if self._t_last is None:
            self._t_last = now

    # ------------------------------------------------------------------ decisions
    def _past(self, worker: int, epoch: int, now: float) -> bool:
        return (self.finished[worker] >= epoch or self.retired[worker]
                or (self.ignore_silent and now - self.heard[worker] > self.silence_s))

    def check(self, now: float) -> bool:
        """Complete every epoch all workers are past; decide on tol -> True when an epoch completed."""
        done = False
        while self.stop_reason is None:
            e = len(self.completed) + 1
            if e > self.epochs or e not in self.sums or \
                    not all(self._past(w, e, now) for w in range(self.num_workers)):
                break
            self._complete(e, now)
            done = True
        return done

    def _complete(self, e: int, now: float) -> None:
        rows, loss, acc, stale, pushes = self.sums[e]
        figures = {"epoch": e, "loss": loss / rows if rows else float("nan"),
                   "accuracy": acc / rows if rows else float("nan"), "rows": rows, "pushes": pushes,
                   "staleness": stale / pushes if pushes else 0.0, "relative_change": None}
        seconds = now - self._t_last if self._t_last is not None else 0.0
        figures["samples_per_s"] = rows / seconds if seconds > 0 else None
        self._t_last = now
        if self.completed:
            prev = self.completed[-1]["loss"]
            if math.isfinite(prev) and math.isfinite(figures["loss"]):
                figures["relative_change"] = abs(prev - figures["loss"]) / max(abs(prev), TINY)
        self.completed.append(figures)
        rel = figures["relative_change"]
        if self.tol > 0 and rel is not None and rel < self.tol:
            self.stop_reason, self.stop_epoch, self.relative_change = "tol", e, rel
            self.furthest_at_stop = max(self.finished)
        elif e == self.epochs:
            self.stop_reason, self.stop_epoch = "max_iter", e

    def pop_completed(self) -> list[dict]:
        """Epochs completed since the last call (for one log line each)."""
        new = self.completed[self._unreported:]
        self._unreported = len(self.completed)
        return [dict(f) for f in new]

    def message(self) -> str | None:
        """Why training stopped, in words (None while it runs)."""
        if self.stop_reason == "tol":
            return (f"converged: the mean training loss changed by {self.relative_change:.3g} (relative) from "
                    f"epoch {self.stop_epoch - 1} to {self.stop_epoch}, below tol={self.tol:g}")
        if self.stop_reason == "max_iter":
            return f"ran all {self.epochs} epochs (maxIter)"
        return None

    # ------------------------------------------------------------------ stats and checkpoints
    def stats(self) -> dict:
        return {"tol": self.tol, "epochs": self.epochs, "stop_reason": self.stop_reason,
                "stop_epoch": self.stop_epoch, "relative_change": self.relative_change, "message": self.message(),
                "furthest_at_stop": self.furthest_at_stop, "completed": [dict(f) for f in self.completed]}

    def state(self) -> dict:
        """JSON-ready state for a checkpoint (the sums and decisions, not the liveness timers)."""
        return {"sums": {str(k): v for k, v in self.sums.items()}, "finished": list(self.finished),
                "completed": [dict(f) for f in self.completed], "stop_reason": self.stop_reason,
                "stop_epoch": self.stop_epoch, "relative_change": self.relative_change,
                "furthest_at_stop": self.furthest_at_stop}

    def load_state(self, state: dict, now: float) -> None:
        self.sums = {int(k): list(v) for k, v in state["sums"].items()}
        self.finished = [int(v) for v in state["finished"]][:self.num_workers]
        self.completed = [dict(f) for f in state["completed"]]
        self._unreported = len(self.completed)
        self.stop_reason, self.stop_epoch = state["stop_reason"], state["stop_epoch"]
        self.relative_change = state["relative_change"]
        self.furthest_at_stop = state.get("furthest_at_stop")     # absent in checkpoints written before it
        self.heard = [now] * self.num_workers
        self._t_last = now


def exchange_epoch(step: int, tau: int, steps_per_epoch: int, epochs: int) -> tuple[int, bool]:
    """Exchange ``step`` (1, 2, ...) of a worker -> (its epoch, whether it is the worker's last push of it).

    The exchange covers local steps (step-1)*tau+1 .. step*tau, the last window cut at epochs*steps_per_epoch;
    it belongs to the epoch of its last step (a window across an epoch boundary counts in the later epoch).
    """
    total = epochs * steps_per_epoch

    def epoch_of(s):
        return math.ceil(min(s * tau, total) / steps_per_epoch)
    e = epoch_of(step)
    last = step * tau >= total or epoch_of(step + 1) != e
    return e, last


def last_window_of_epoch(step: int, tau: int, steps_per_epoch: int, epochs: int) -> int:
    """The last window (of ``tau`` local steps, numbered as :func:`exchange_epoch`'s steps) of the epoch that
    window ``step`` belongs to: a push covering several windows ends there at the latest, so that every epoch
    still ends one of a worker's pushes (its FLAG_EPOCH_LAST)."""
    total = epochs * steps_per_epoch
    e, _ = exchange_epoch(step, tau, steps_per_epoch, epochs)
    return -(-total // tau) if e >= epochs else max(step, e * steps_per_epoch // tau)
