"""The parameter server's state machine: registry, fencing, de-duplication, rounds, SSP waits. No sockets.

``Engine.handle(token, frames, now)`` takes one request (the ROUTER identity as an opaque ``token`` and the
remaining frames) and returns the replies to send as ``(token, Header, payload)`` tuples, where payload is
None, bytes, or a float32 weights array that the transport may send zero-copy. ``Engine.tick(now)`` expires
barriers and SSP waits. Every rejection leaves weights and optimizer state untouched and is counted in
``stats()["rejected"]`` by reason.

Retry safety: a worker registers with (worker_id, attempt); the HELLO reply's ``step`` is the last step the
server applied for it, so a restarted worker resumes after it, and its ``session`` binds the registration to
the client that made it: every later request must carry it (FOREIGN_SESSION otherwise), so no other client can
push or pull as that (worker, attempt). Requests from an older attempt are fenced off (SUPERSEDED_ATTEMPT);
steps are contiguous: a push for a step already taken gets DUPLICATE and changes nothing, one beyond the next
step gets STEP_GAP (with an adaptive window, ``spec.window_max``, a push may cover up to window_max // tau
windows, its step the last of them; one beyond those gets STEP_GAP), and a STALE push leaves its step open for
the recomputed push. Every update's result is checked: a non-finite one is rolled back (weights and optimizer
state), answered NON_FINITE_UPDATE and counted, and its step is used up so the worker can go on. No client may
STOP the server (FORBIDDEN); the process that started it stops it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from core.optimizers import Verdict

from . import rules
from .changes import ChangeLog
from .convergence import ConvergenceMonitor
from .protocol import (FLAG_DELTA_OK, FLAG_ELASTIC, FLAG_EPOCH_LAST, FLAG_JSON, FLAG_LOCAL_WEIGHTS, FLAG_STOP,
                       FLAG_TEXT, FLAG_WANT_WEIGHTS, FLOAT32, HELD_VERSION, MAX_JSON_BYTES, SPARSE_MIN_VALUES,
                       Entries, Header, Op, ProtocolError, Reason, Status, check_metrics, entries_frame, read_push,
                       unpack_header)
from .spec import TrainingSpec

_OPS = {int(op): op for op in Op}
HELLO, PULL, PUSH, STOP = Op.HELLO, Op.PULL, Op.PUSH, Op.STOP    # looked up per request: module names are cheaper

PAYLOAD_FRAMES = {Op.PUSH: (1, 2), Op.BARRIER: (0, 1), Op.REPORT: (1,)}   # payload frames an op may carry
MAX_FAILURE_REPORTS = 64     # REPORTs kept; later ones are answered and dropped


def push_kind(flags: int) -> str:
    """The ``kind`` of ``ParameterClient.push`` that sets these push flags."""
    return "elastic" if flags & FLAG_ELASTIC else "local_weights" if flags & FLAG_LOCAL_WEIGHTS else "gradient"


@dataclass
class WorkerInfo:
    attempt: int = 0
    token: object = None       # the ROUTER identity of the registered client's connection (replies go there)
    session: int | None = None  # the registration's secret; None until a HELLO (or after a restore)
    last_step: int = 0         # last step applied for this worker (across attempts)
    applied: int = 0           # pushes applied
    rejected: int = 0
    samples: int = 0
    loss: float = float("nan")
    accuracy: float = float("nan")
    staleness: int = 0
    samples_per_s: float = 0.0
    last_time: float | None = None
    done: bool = False

    def public(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("token", "session", "last_time")}


class BufferPool:
    """Weight buffers (P,) float32; one is current, others are free once every send of them has finished.

    The transport registers a ZeroMQ MessageTracker per zero-copy send (``track``); ``acquire`` never
    returns a buffer with an unfinished tracker, so weights in flight are never overwritten.
    """

    def __init__(self, w0: np.ndarray, max_free: int = 3):
        self.current = np.array(w0, dtype=np.float32, copy=True)
        self._trackers: dict[int, list] = {}
        self._all: dict[int, np.ndarray] = {id(self.current): self.current}
        self.max_free = max_free

    def track(self, buf: np.ndarray, tracker) -> None:
        """A zero-copy send of ``buf`` is in flight; arrays of no pool's (a delta reply's) need no watch: the
        frame keeps them alive, and nothing writes to them."""
        if tracker is not None and not tracker.done and id(buf) in self._all:
            self._trackers.setdefault(id(buf), []).append(tracker)

    def in_flight(self, buf: np.ndarray) -> bool:
        """Whether a zero-copy send of ``buf`` has not finished: it may not be written to."""
        return self._busy(id(buf))

    def _busy(self, key: int) -> bool:
        ts = self._trackers.get(key)
        if not ts:
            return False
        ts = [t for t in ts if not t.done]
        if ts:
            self._trackers[key] = ts
            return True
        del self._trackers[key]
        return False

    def acquire(self, exclude=()) -> np.ndarray:
        """A buffer that is neither current, in ``exclude``, nor in flight; keeps at most ``max_free`` idle."""
        skip = (id(self.current), *map(id, exclude))
        first, idle = None, 0
        for k in list(self._all):
            if k in skip or self._busy(k):
                continue
            if first is None:
                first = k
            elif idle < self.max_free - 1:
                idle += 1
            else:
                del self._all[k]
        if first is not None:
            return self._all[first]
        buf = np.empty_like(self.current)
        self._all[id(buf)] = buf
        return buf


HISTORY_FIELDS = ("time", "worker", "attempt", "step", "version", "loss", "accuracy", "batch_size", "staleness",
                  "samples_per_s")


@dataclass
class Round:
    """One synchronous round (sync gradients, easgd exchange or a barrier): a contribution per worker."""
    deadline: float
    entries: dict = field(default_factory=dict)   # worker -> (token, header, array or its Entries or None)


def check_initial_weights(w0) -> np.ndarray:
    """The initial weight vector as float32 (the server keeps float32), or ValueError naming what is wrong with
    it: a value that is finite in float64 but beyond float32's range would be served as inf."""
    given = np.asarray(w0)
    if given.ndim != 1 or given.size == 0:
        raise ValueError(f"initial weights must be a finite non-empty 1-D vector, got shape {given.shape}")
    if given.dtype.kind not in "biuf":
        raise ValueError(f"initial weights must be real numbers, got dtype {given.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        w = given.astype(np.float32)
    bad = w.size - int(np.isfinite(w).sum())
    if bad:
        first = given[~np.isfinite(w)][0]
        why = "NaN/inf" if not np.isfinite(first) else f"beyond float32's range ({first!r})"
        raise ValueError(f"initial weights must be a finite non-empty 1-D vector of float32, got {bad} value(s) "
                         f"{why} among {w.size}")
    return w


class Engine:
    """Server state for one job run by ``spec`` (a :class:`ps.spec.TrainingSpec`). ``optimizer``: the update
    rule of gradient pushes, by default the spec's on :func:`core.backends.host_ops`."""

    def __init__(self, w0, spec: TrainingSpec, *, job_id, fingerprint, optimizer=None, history_limit=100_000):
        w0 = check_initial_weights(w0)
        if optimizer is None:
            from core.backends import host_ops
            from core.optimizers import make_optimizer

            optimizer = make_optimizer(spec.optimizer, w0.shape[0], spec.learning_rate, spec.schedule,
                                       ops=host_ops(), **spec.optimizer_options)
        self.spec, self.mode, self.num_workers = spec, spec.rule, spec.num_workers
        self.job_id, self.fingerprint = job_id, fingerprint
        self.pool = BufferPool(w0)
        self.num_params = w0.shape[0]
        self.optimizer = optimizer
        # fixed for the job, looked up once (per push they cost as much as the update of a small model)
        self._screen_on_read = not self.mode.screens_payload(optimizer)
        # NumPy's floating-point warnings are silenced around an update: an overflow is checked for and rolled
        # back. Plain SGD on a compiled backend runs one fused kernel that raises none, and there the
        # np.errstate (~3 % of a small push's round trip in one process, 2-core VM) is left out.
        quiet = not self._screen_on_read and getattr(optimizer.ops, "quiet_screened_sgd", False)
        self._update_guard = contextlib.nullcontext if quiet else functools.partial(np.errstate, over="ignore",
                                                                                      invalid="ignore")
        self._push_codes = spec.push_dtype_codes
        # windows one push may cover: 1, or with an adaptive window (spec.window_max) up to window_max // tau
        self._span = max(1, spec.window_max // spec.tau) if spec.window_max else 1
        self._entries_in_place = self.mode.updates_entries(optimizer)
        # Where an update changes only the entries a sparse push carried, a client holding an earlier version
        # may be sent just the entries changed since (ps.changes): a vector this large is the only one a sparse
        # push can come for.
        self.changes = ChangeLog(self.num_params) if (self.num_params >= SPARSE_MIN_VALUES
                                                      and self.mode.changes_only_pushed(optimizer)) else None
        self.ssp = None if spec.ssp_slack is None else rules.SSPClocks(self.num_workers, spec.ssp_slack)
        self.barrier_timeout = spec.barrier_timeout
        self.version = 0
        self.workers: dict[int, WorkerInfo] = {}
        self.round: Round | None = None           # sync gradient / easgd round
        self.barrier: Round | None = None
        self.barrier_step = None
        self.waiting_pulls: list = []             # SSP: (deadline, token, header)
        self.min_attempt = 0                      # requests of older attempts are fenced off (fence_below)
        self.counters = {"received": 0, "applied": 0, "pulls": 0, "rounds": 0, "stale_pushes": 0,
                         "non_finite_updates": 0, "delta_replies": 0}
        self.failures: list = []                  # REPORTs of failed tasks, first come first (at most 64)
        self.rejected: dict[str, int] = {}
        self.history: deque = deque(maxlen=history_limit)   # tuples of HISTORY_FIELDS (history_records)
        self.t_start = time.time()
        # epochs and the tol decision (ps/convergence.py); a dead worker holds no decision in async modes
        self.convergence = ConvergenceMonitor(self.num_workers, spec.epochs, spec.tol, now=time.monotonic(),
                                              silence_s=spec.barrier_timeout,
                                              ignore_silent=self.mode.tol_ignores_silent_workers)

    # ------------------------------------------------------------------ helpers
    @property
    def weights(self) -> np.ndarray:
        return self.pool.current

    def _gap_message(self, h: Header, info) -> str:
        if self._span == 1:
            return (f"push for step {h.step}, but worker {h.worker_id}'s next step is {info.last_step + 1}: steps "
                    f"are contiguous")
        return (f"push for step {h.step}, but worker {h.worker_id}'s next step is {info.last_step + 1}: a push "
                f"covers at most {self._span} windows (window_max {self.spec.window_max}, tau {self.spec.tau})")

    def _reject(self, token, h: Header | None, reason: Reason, msg: str, status=Status.ERROR):
        self.rejected[reason.name.lower()] = self.rejected.get(reason.name.lower(), 0) + 1
        if h is not None and h.worker_id in self.workers:
            self.workers[h.worker_id].rejected += 1
        base = h if h is not None else Header(op=0)
        rh = base.reply(status, reason, flags=FLAG_TEXT, wversion=self.version)
        return [(token, rh, msg.encode())]

    def _ok(self, token, h: Header, weights=False, held=None, **kw):
        """An OK reply, with the weights where asked: the entries changed since the version the client holds
        (``held``, default the request's wversion) where it offers that (FLAG_DELTA_OK) and the log can tell."""
        if weights or (h.flags & FLAG_WANT_WEIGHTS):
            w = self.weights
            changed = self.changes.since(h.wversion if held is None else held, self.version) if (
                h.flags & FLAG_DELTA_OK and self.changes is not None) else None
            if changed is not None:        # what changed since the version the client holds, new values
                self.counters["delta_replies"] += 1
                frame, code = entries_frame(changed, source=w)
                return (token, h.reply(Status.OK, wversion=self.version, dtype=code, n_values=w.shape[0], **kw),
                        frame)
            return (token, h.reply(Status.OK, wversion=self.version, dtype=FLOAT32, n_values=w.shape[0], **kw), w)
        return (token, h.reply(Status.OK, wversion=self.version, **kw), None)

    def _commit(self, new: np.ndarray, touched=None) -> None:
        """``new`` becomes the weights; ``touched``: the index arrays of the sparse pushes it applied, when the
        update changed only those entries (else None: any entry may have changed)."""
        self.pool.current = new
        self.version += 1
        self.counters["applied"] += 1
        if self.changes is not None:
            self.changes.record(self.version, touched)

    # ------------------------------------------------------------------ entry points
    def handle(self, token, frames, now=None) -> list:
        """One request -> replies. ``frames``: header then payload frames (bytes, memoryview or zmq.Frame)."""
        now = time.monotonic() if now is None else now
        self.counters["received"] += 1
        try:
            raw = frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]
            h = unpack_header(raw)
        except ProtocolError as exc:
            return self._reject(token, None, exc.reason, str(exc))
        except Exception as exc:  # noqa: BLE001 - anything unparseable is malformed input, never a crash
            return self._reject(token, None, Reason.MALFORMED, f"unparseable header: {exc}")
        try:
            replies = self._dispatch(token, h, frames[1:], now)
        except ProtocolError as exc:
            replies = self._reject(token, h, exc.reason, str(exc),
                                   Status.STALE if exc.reason == Reason.STALE else Status.ERROR)
        return self._converged(replies, now)

    def _converged(self, replies: list, now) -> list:
        """Complete the epochs every worker is past (tol may decide to stop); once stopped, every reply says
        so (FLAG_STOP) and no SSP read waits any longer."""
        conv = self.convergence
        conv.check(now)
        if not conv.stop_requested:
            return replies
        if self.waiting_pulls:
            replies = replies + self._serve_waiting(now)
        return [(tok, rh.replace(flags=rh.flags | FLAG_STOP), pl) for tok, rh, pl in replies]

    def _dispatch(self, token, h: Header, payload, now):
        if h.job_id != self.job_id:
            raise ProtocolError(Reason.WRONG_JOB, f"job id {h.job_id.hex()} is not this server's job")
        if h.fingerprint != self.fingerprint:
            raise ProtocolError(Reason.WRONG_FINGERPRINT, f"model fingerprint {h.fingerprint:#x} does not match "
                                                          f"the server's {self.fingerprint:#x}")
        op = _OPS.get(h.op)          # a dict, not Op(h.op): the enum's call costs as much as a check below
        if op is None:
            raise ProtocolError(Reason.UNKNOWN_OP, f"unknown op {h.op}")
        allowed = PAYLOAD_FRAMES.get(op, (0,))
        if len(payload) not in allowed:
            raise ProtocolError(Reason.BAD_FRAME_COUNT, f"{op.name} takes {' or '.join(map(str, allowed))} "
                                                        f"payload frame(s), got {len(payload)}")
        if op is STOP:
            raise ProtocolError(Reason.FORBIDDEN, "clients cannot stop the parameter server; the process that "
                                                  "started it stops it (server.stop())")
        if h.attempt < self.min_attempt:
            raise ProtocolError(Reason.SUPERSEDED_ATTEMPT, f"attempt {h.attempt} was superseded: the server now "
                                                           f"accepts attempts >= {self.min_attempt}")
        if op is HELLO:
            replies = self._hello(token, h)
            self.convergence.rejoin(h.worker_id, now)
            return replies
        info = self._known(h)
        self.convergence.heard_from(h.worker_id, now)
        if op is PUSH:               # the ops by how often they come
            return self._push(token, h, info, payload, now)
        if op is PULL:
            return self._pull(token, h, info, now)
        if op is Op.STATS:
            return [(token, h.reply(Status.OK, wversion=self.version, flags=FLAG_JSON),
                     json.dumps(self.stats()).encode())]
        if op is Op.REPORT:
            return self._report(token, h, payload[0])
        if op is Op.BARRIER:
            return self._barrier(token, h, payload[0] if payload else None, now)
        info.done = True                                   # BYE
        self.convergence.retire(h.worker_id)
        if self.ssp is not None:
            self.ssp.retire(h.worker_id)
        return [self._ok(token, h)] + self._serve_waiting(now)

    def _known(self, h: Header) -> WorkerInfo:
        info = self.workers.get(h.worker_id)
        if info is None:
            raise ProtocolError(Reason.UNKNOWN_WORKER, f"worker {h.worker_id} has not registered (send HELLO)")
        if h.attempt != info.attempt:
            reason = Reason.SUPERSEDED_ATTEMPT if h.attempt < info.attempt else Reason.UNKNOWN_WORKER
            raise ProtocolError(reason, f"worker {h.worker_id} attempt {h.attempt} is not the registered "
                                        f"attempt {info.attempt}")
        if info.session is None:
            raise ProtocolError(Reason.UNKNOWN_WORKER, f"worker {h.worker_id} has not registered since the server "
                                                       f"restored it (send HELLO)")
        if h.session != info.session:
            raise ProtocolError(Reason.FOREIGN_SESSION, f"worker {h.worker_id} attempt {h.attempt} is registered "
                                                        f"to another client (the request's session does not match)")
        return info

    def _hello(self, token, h: Header):
        wid = h.worker_id
        if not 0 <= wid < self.num_workers:
            raise ProtocolError(Reason.UNKNOWN_WORKER, f"worker id {wid} is outside 0..{self.num_workers - 1}")
        if h.attempt < 0:
            raise ProtocolError(Reason.BAD_FIELD, f"attempt must be >= 0, got {h.attempt}")
        info = self.workers.get(wid)
        if info is not None:
            if h.attempt < info.attempt:
                raise ProtocolError(Reason.SUPERSEDED_ATTEMPT,
                                    f"worker {wid} attempt {h.attempt} was superseded by attempt {info.attempt}")
            if h.attempt == info.attempt and info.session is not None and h.session != info.session:
                raise ProtocolError(Reason.DUPLICATE_WORKER,
                                    f"worker {wid} attempt {h.attempt} is already registered from another client")
        else:
            info = self.workers[wid] = WorkerInfo()
        replies = []
        if h.attempt > info.attempt or info.session is None:      # a new registration: fence, take a session
            replies += self._fence(wid)
            info.session = h.session or secrets.randbits(64) or 1   # the client's proposal, or one of ours
        # else: the registered client again (its session matches), e.g. after its connection was re-made
        info.attempt, info.token, info.done = h.attempt, token, False
        if self.ssp is not None:
            self.ssp.retired[wid] = False
        return replies + [self._ok(token, h, step=info.last_step, session=info.session)]

    def _fence(self, wid: int):
        """A newer attempt registered: drop the old attempt's pending round contributions and waits."""
        out = []
        for tok, oh in self._drop_waiting(lambda hh: hh.worker_id == wid):
            out += self._reject(tok, oh, Reason.SUPERSEDED_ATTEMPT, f"worker {wid} re-registered")
        return out

    def _drop_waiting(self, match) -> list:
        """Remove the round and barrier entries and SSP-held pulls whose request header ``match``es ->
        their (token, header) pairs, for the caller to answer or count."""
        dropped = []
        for rnd in (self.round, self.barrier):
            for wid in [w for w, (_, hh, _) in (rnd.entries.items() if rnd else ()) if match(hh)]:
                tok, hh, _ = rnd.entries.pop(wid)
                dropped.append((tok, hh))
        keep = []
        for item in self.waiting_pulls:
            if match(item[2]):
                dropped.append((item[1], item[2]))
            else:
                keep.append(item)
        self.waiting_pulls = keep
        return dropped

    # ------------------------------------------------------------------ pull (with SSP waits)
    def _pull(self, token, h, info, now):
        if self.ssp is not None and not self.ssp.can_read(h.worker_id, h.step):
            self.waiting_pulls.append((now + self.barrier_timeout, token, h))
            return []
        self.counters["pulls"] += 1
        return [self._ok(token, h, weights=True)]

    def _serve_waiting(self, now):
        out, keep = [], []
        for deadline, token, h in self.waiting_pulls:
            if self.ssp.can_read(h.worker_id, h.step) or self.convergence.stop_requested:
                self.counters["pulls"] += 1
                out.append(self._ok(token, h, weights=True))
            elif now >= deadline:
                lag = self.ssp.laggards(h.worker_id, h.step)
                out += self._reject(token, h, Reason.BARRIER_TIMEOUT,
                                    f"SSP read at clock {h.step} waited {self.barrier_timeout}s for workers {lag}")
            else:
                keep.append((deadline, token, h))
        self.waiting_pulls = keep
        return out

    # ------------------------------------------------------------------ push
    def _push(self, token, h, info, frames, now):
        frame, held = frames[0], h.wversion
        if len(frames) > 1:                 # the version of the weights the client holds, where not the base
            if len(frames[1]) != HELD_VERSION.size:
                raise ProtocolError(Reason.BAD_PAYLOAD, f"a push's held-version frame has {len(frames[1])} bytes, "
                                                        f"not {HELD_VERSION.size}")
            held = HELD_VERSION.unpack(frames[1])[0]
        carries = h.flags & (FLAG_ELASTIC | FLAG_LOCAL_WEIGHTS)
        if carries != self.mode.push_flag:
            takes = push_kind(self.mode.push_flag)
            raise ProtocolError(Reason.WRONG_MODE, f"a push of kind={push_kind(carries)!r} does not fit mode "
                                                   f"{self.mode.name!r}: it takes kind={takes!r}")
        check_metrics(h)
        if h.step <= 0:
            raise ProtocolError(Reason.BAD_FIELD, f"step must be >= 1, got {h.step}")
        if h.wversion < 0 or h.wversion > self.version:
            raise ProtocolError(Reason.BAD_FIELD, f"push claims weights version {h.wversion}, server is at "
                                                  f"{self.version}")
        # plain SGD in async mode screens NaN/inf in the same pass as the update (into a scratch buffer)
        arr = read_push(h, frame, self.num_params, check_finite=self._screen_on_read, accept=self._push_codes)
        if h.step <= info.last_step:
            # a retransmit of a push already taken (or a retried task replaying a step): acknowledge, change nothing
            self.rejected["duplicate_step"] = self.rejected.get("duplicate_step", 0) + 1
            info.rejected += 1
            return [(token, h.reply(Status.DUPLICATE, Reason.DUPLICATE_STEP, wversion=self.version,
                                    step=info.last_step), None)]
        if h.step > info.last_step + self._span:
            raise ProtocolError(Reason.STEP_GAP, self._gap_message(h, info))
        self.convergence.seen(h.worker_id, h.epoch, bool(h.flags & FLAG_EPOCH_LAST), now)
        if self.mode.rounds:
            return self._round_push(token, h, info, arr, now)
        stale = rules.staleness(h.wversion, self.version)
        if rules.is_stale(h.wversion, self.version, self.spec.staleness):
            self.counters["stale_pushes"] += 1             # the step stays open: pull, recompute, push it again
            raise ProtocolError(Reason.STALE, f"push computed on version {h.wversion} is {stale} updates old "
                                              f"(bound {self.spec.staleness}); pull and recompute")
        sparse = isinstance(arr, Entries)
        if sparse and self._entries_in_place:                    # a sparse push: on its entries only
            new = self._weights_to_update()
            verdict = self.mode.apply_entries(self, new, arr.index, arr.values)
        else:
            new = self.pool.acquire()
            with self._update_guard():                       # an overflow is checked for and rolled back
                verdict = self.mode.apply_push(self, self.weights, _whole(arr), new)
        if verdict is Verdict.BAD_GRADIENT:
            raise ProtocolError(Reason.NON_FINITE, "payload contains NaN or inf; the update was not applied")
        if verdict is Verdict.BAD_RESULT:
            return self._rolled_back([(token, h, info)], now)
        self._commit(new, [arr.index] if sparse else None)
        self._record(h, info, stale, now)
        reply = [self._ok(token, h, step=info.last_step, held=held)]
        return reply if self.ssp is None else reply + self._advance_ssp(h, info, now)

    def _weights_to_update(self) -> np.ndarray:
        """The weights, for an update in place; a copy of them while a reply is still sending them."""
        w = self.weights
        if not self.pool.in_flight(w):
            return w
        new = self.pool.acquire()
        np.copyto(new, w)
        return new

    def _use_up(self, h, info) -> None:
        """Step h.step of this worker was refused for good (its update was not finite): the next push may be
        h.step + 1."""
        info.last_step = h.step
        if self.ssp is not None:
            self.ssp.advance(h.worker_id, info.last_step)

    def _advance_ssp(self, h, info, now) -> list:
        if self.ssp is None:
            return []
        self.ssp.advance(h.worker_id, info.last_step)
        return self._serve_waiting(now)

    def _rolled_back(self, members, now) -> list:
        """An update whose result was not finite: nothing committed (the mode rolled back any optimizer
        state), the steps of its members [(token, header, info)] used up, each told NON_FINITE_UPDATE."""
        self.counters["non_finite_updates"] += 1
        out = []
        for tok, h, info in members:
            self._use_up(h, info)
            out += self._reject(tok, h, Reason.NON_FINITE_UPDATE,
                                f"the update of step {h.step} made the weights non-finite; it was rolled back "
                                f"(lower the learning rate if this repeats)")
        if self.ssp is not None:
            out += self._serve_waiting(now)
        return out

    def _round_push(self, token, h, info, arr, now):
        if h.wversion != self.version:
            raise ProtocolError(Reason.STALE, f"sync push computed on version {h.wversion}, round is at "
                                              f"{self.version}; pull and recompute")
        if self.round is None:
            self.round = Round(deadline=now + self.barrier_timeout)
        prev = self.round.entries.get(h.worker_id)
        if prev is not None and prev[1].step != h.step:
            raise ProtocolError(Reason.BAD_FIELD, f"worker {h.worker_id} already pushed step {prev[1].step} "
                                                  f"in this round, now step {h.step}")
        self.round.entries[h.worker_id] = (token, h, arr)   # a retransmit replaces the earlier copy
        if len(self.round.entries) < self.num_workers:
            return []
        entries, self.round = self.round.entries, None
        pushes = [(hh, a) for _, hh, a in entries.values()]
        old = self.weights
        sparse = all(isinstance(a, Entries) for _, a in pushes)
        if sparse and self._entries_in_place:                    # every push sparse: on their entries only
            new = self._weights_to_update()
            verdict = self.mode.apply_round_entries(self, new, pushes)
        else:
            new = self.pool.acquire()
            with np.errstate(over="ignore", invalid="ignore"):
                verdict = self.mode.apply_round(self, old, [(hh, _whole(a)) for hh, a in pushes], new)
        if not verdict:
            return self._rolled_back([(tok, hh, self.workers[wid]) for wid, (tok, hh, _) in entries.items()], now)
        self._commit(new, [a.index for _, a in pushes] if sparse else None)
        self.counters["applied"] += len(entries) - 1          # every contribution counts as applied
        self.counters["rounds"] += 1
        reply = self.mode.round_reply(old)                    # easgd: the center the exchange used
        out = []
        for wid, (tok, hh, _) in entries.items():
            winfo = self.workers[wid]
            self._record(hh, winfo, 0, now)
            if reply is not None:
                out.append((tok, hh.reply(Status.OK, wversion=self.version, step=winfo.last_step, dtype=FLOAT32,
                                          n_values=reply.shape[0]), reply))
            else:
                out.append(self._ok(tok, hh, step=winfo.last_step))
        return out

    def _record(self, h, info, stale, now):
        info.last_step, info.applied = h.step, info.applied + 1
        info.samples += h.batch_size
        info.loss, info.accuracy, info.staleness = h.loss, h.accuracy, stale
        if info.last_time is not None and now > info.last_time:
            info.samples_per_s = h.batch_size / (now - info.last_time)
        info.last_time = now
        self.history.append((time.time() - self.t_start, h.worker_id, h.attempt, h.step, self.version, h.loss,
                             h.accuracy, h.batch_size, stale, info.samples_per_s))
        self.convergence.applied(h.epoch, h.loss, h.accuracy, h.batch_size, stale, now)

    # ------------------------------------------------------------------ failure reports
    def _report(self, token, h, frame):
        """A training task failed: keep its JSON account (type, message, frame, host, ...) for the driver."""
        report = _json_report(h, frame, "REPORT")
        if len(self.failures) < MAX_FAILURE_REPORTS:
            self.failures.append({"worker": h.worker_id, "attempt": h.attempt, **report})
        return [self._ok(token, h)]

    # ------------------------------------------------------------------ barrier and timeouts
    def _barrier(self, token, h, frame, now):
        report = None if frame is None else _json_report(h, frame, "BARRIER")
        if self.barrier is not None and self.barrier_step != h.step:
            raise ProtocolError(Reason.BAD_FIELD, f"barrier {h.step} while barrier {self.barrier_step} is open")
        if self.barrier is None:
            self.barrier, self.barrier_step = Round(deadline=now + self.barrier_timeout), h.step
        self.barrier.entries[h.worker_id] = (token, h, report)   # a retransmit replaces the earlier entry
        if len(self.barrier.entries) < self.num_workers:
            return []
        entries, self.barrier = self.barrier.entries, None
        if all(r is None for _, _, r in entries.values()):
            return [self._ok(tok, hh) for tok, hh, _ in entries.values()]
        gathered = json.dumps([entries[w][2] for w in range(self.num_workers)]).encode()
        return [(tok, hh.reply(Status.OK, wversion=self.version, flags=FLAG_JSON), gathered)
                for tok, hh, _ in entries.values()]

    def fence_below(self, attempt: int) -> int:
        """Refuse every request of an attempt older than ``attempt`` from now on, and drop the waiting ones.

        For launchers that relaunch all workers at once with the next attempt number (a Spark barrier stage):
        called before the relaunch, it keeps a task of the failed attempt that is still alive from holding a
        barrier or round entry the new attempt would count. The dropped requests get no reply (their
        clients time out). -> number of requests dropped.
        """
        self.min_attempt = max(self.min_attempt, int(attempt))
        dropped = len(self._drop_waiting(lambda hh: hh.attempt < attempt))
        if self.round is not None and not self.round.entries:
            self.round = None
        if self.barrier is not None and not self.barrier.entries:
            self.barrier = None
        self.rejected["superseded_attempt"] = self.rejected.get("superseded_attempt", 0) + dropped
        return dropped

    def next_attempt(self) -> int:
        """The attempt number a launcher starting over after a restore should use: above every recorded one."""
        return max((w.attempt for w in self.workers.values()), default=-1) + 1

    def drain(self) -> list:
        """The server is stopping: error replies (SERVER_STOPPING) to every waiting round, barrier and SSP pull,
        so nobody waits out a timeout on a stopped server."""
        out = []
        for tok, hh in self._drop_waiting(lambda hh: True):
            out += self._reject(tok, hh, Reason.SERVER_STOPPING, "parameter server is stopping")
        self.round = self.barrier = None
        return out

    def tick(self, now=None) -> list:
        """Expire rounds, barriers and SSP waits whose deadline passed -> error replies to those waiting."""
        now = time.monotonic() if now is None else now
        out = []
        for name in ("round", "barrier"):
            rnd = getattr(self, name)
            if rnd is not None and now >= rnd.deadline:
                missing = sorted(set(range(self.num_workers)) - set(rnd.entries))
                setattr(self, name, None)
                for tok, hh, _ in rnd.entries.values():
                    out += self._reject(tok, hh, Reason.BARRIER_TIMEOUT,
                                        f"{'sync round' if name == 'round' else 'barrier'} timed out after "
                                        f"{self.barrier_timeout}s waiting for workers {missing}; "
                                        f"the update was not applied")
        if self.waiting_pulls:
            out += self._serve_waiting(now)
        return self._converged(out, now)

    # ------------------------------------------------------------------ introspection / checkpoints
    def history_records(self) -> list[dict]:
        """The per-push history as dicts of HISTORY_FIELDS (kept as tuples: one is appended per push)."""
        return [dict(zip(HISTORY_FIELDS, r)) for r in self.history]

    def _current(self) -> dict:
        """{worker: WorkerInfo} of the workers registered (HELLO) in the current attempt (at or above the fence)."""
        return {w: i for w, i in self.workers.items() if i.session is not None and i.attempt >= self.min_attempt}

    def registered(self) -> int:
        """How many workers registered in the current attempt."""
        return len(self._current())

    def stalled(self, now: float) -> list[tuple[int, float]]:
        """Asynchronous modes: [(worker, seconds silent)] of the workers registered in the current attempt that
        have sent nothing for longer than the round timeout (spec.barrier_timeout) while another worker of this
        attempt has finished: a frozen or lost task, which nothing else would end (a round mode's round times
        out instead). Empty while no worker has finished: a slow peer still trains."""
        if self.mode.rounds:
            return []
        current = self._current()
        if not any(i.done for i in current.values()):
            return []
        heard, limit = self.convergence.heard, self.spec.barrier_timeout
        return [(w, now - heard[w]) for w, i in sorted(current.items())
                if not i.done and 0 <= w < len(heard) and now - heard[w] > limit]

    def stats(self) -> dict:
        return {"mode": self.mode.name, "version": self.version, "num_workers": self.num_workers,
                **self.counters, "rejected": dict(self.rejected),
                "rejected_total": sum(self.rejected.values()),
                "optimizer_steps": getattr(self.optimizer, "t", 0), "failures": list(self.failures),
                "convergence": self.convergence.stats(),
                "workers": {str(k): v.public() for k, v in sorted(self.workers.items())}}

    def snapshot(self) -> tuple[dict, dict]:
        """(arrays, metadata) for a checkpoint: weights, optimizer state, per-worker progress, version."""
        sd = self.optimizer.state_dict()
        arrays = {"weights": self.weights.copy(), **{f"opt_{k}": v for k, v in sd["arrays"].items()}}
        meta = {"version": self.version, "mode": self.mode.name, "layers": list(self.spec.layers or []) or None,
                "optimizer": getattr(self.optimizer, "name", "sgd"), "optimizer_rule": self.spec.optimizer,
                "optimizer_t": sd["t"], "fingerprint": self.fingerprint, "num_params": self.num_params,
                "counters": self.counters, "convergence": self.convergence.state(),
                "workers": {str(k): {"last_step": v.last_step, "attempt": v.attempt, "applied": v.applied,
                                     "samples": v.samples} for k, v in self.workers.items()}}
        return arrays, meta

    def restore(self, arrays: dict, meta: dict) -> None:
        if meta["mode"] != self.mode.name:
            raise ValueError(f"it was made by a mode={meta['mode']!r} run; this run's mode is {self.mode.name!r}")
        # its state would be missing, or dropped without a word; the rule's name tells nesterov from momentum
        # (one optimizer class), the class's name is all a checkpoint written before it says
        key, ours = ("optimizer_rule", self.spec.optimizer) if "optimizer_rule" in meta else \
            ("optimizer", getattr(self.optimizer, "name", "sgd"))
        if meta.get(key, ours) != ours:
            raise ValueError(f"it was made by an optimizer={meta[key]!r} run; this run's optimizer is {ours!r}")
        if meta["fingerprint"] != self.fingerprint:
            made = f"layers {meta['layers']}" if meta.get("layers") else f"{meta.get('num_params')} parameters"
            mine = f"layers {list(self.spec.layers)}" if self.spec.layers else f"{self.num_params} parameters"
            raise ValueError(f"it was made for {made}; this run has {mine}")
        w = arrays["weights"]
        if w.shape != (self.num_params,):
            raise ValueError(f"checkpoint weights have shape {w.shape}, expected ({self.num_params},)")
        self.pool.current[...] = w
        self.optimizer.load_state_dict({"t": meta["optimizer_t"],
                                        "arrays": {k[4:]: v for k, v in arrays.items() if k.startswith("opt_")}})
        self.version = int(meta["version"])
        if self.changes is not None:
            self.changes.record(self.version, None)
        self.counters.update(meta.get("counters", {}))
        if "convergence" in meta:
            self.convergence.load_state(meta["convergence"], time.monotonic())
        for k, v in meta["workers"].items():
            # the old attempts are gone: the next HELLO of any attempt >= the recorded one is accepted
            self.workers[int(k)] = WorkerInfo(attempt=v["attempt"], token=None, last_step=v["last_step"],
                                              applied=v["applied"], samples=v["samples"])
            if self.ssp is not None:
                self.ssp.advance(int(k), v["last_step"])


def _whole(arr):
    """A push's vector made whole (a sparse payload's :class:`Entries`)."""
    return arr.toarray() if isinstance(arr, Entries) else arr


def _json_report(h: Header, frame, op_name: str) -> dict:
    """A BARRIER's or REPORT's payload: one JSON object of at most MAX_JSON_BYTES, else
    ProtocolError(BAD_PAYLOAD)."""
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if not h.flags & FLAG_JSON:
        raise ProtocolError(Reason.BAD_PAYLOAD, f"a {op_name} payload must be JSON (FLAG_JSON)")
    if len(buf) > MAX_JSON_BYTES:
        raise ProtocolError(Reason.BAD_PAYLOAD, f"{op_name} report of {len(buf)} bytes exceeds {MAX_JSON_BYTES}")
    try:
        report = json.loads(bytes(buf).decode("utf-8"))
    except (ValueError, RecursionError) as exc:             # UnicodeDecodeError is a ValueError; deep nesting
        raise ProtocolError(Reason.BAD_PAYLOAD, f"{op_name} report is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(report, dict):
        raise ProtocolError(Reason.BAD_PAYLOAD, f"{op_name} report must be a JSON object, got "
                                                f"{type(report).__name__}")
    return report
