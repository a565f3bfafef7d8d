"""ZeroMQ transport of the parameter server: a ROUTER socket served by one background thread.

The thread owns the socket; all state lives in :class:`ps.engine.Engine` (pure, no sockets), guarded by a
lock so ``weights()`` / ``stats()`` can be read from the driver thread. Security is on by default
(:mod:`ps.security`: per-job CURVE keys, a ZAP handler admitting only the job's client key); ``secure=False``
turns it off and logs a warning. When to checkpoint is :class:`ps.checkpoint.CheckpointSchedule`'s.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid

import numpy as np
import zmq

from . import checkpoint as ckpt
from .engine import Engine
from .progress import ProgressLine, epoch_line
from .protocol import PROTOCOL_VERSION, ZERO_COPY_MIN, model_fingerprint
from .security import CurveServer
from .spec import TrainingSpec

log = logging.getLogger("ps.server")


def _bind_url(bind: str) -> str:
    if bind.startswith("tcp://") and bind.rsplit(":", 1)[-1] == "0":
        return bind.rsplit(":", 1)[0] + ":*"          # ZeroMQ's spelling of "any free port"
    return bind


class ParameterServer:
    """``ParameterServer(w, mode="async", optimizer="sgd", learning_rate=0.1, num_workers=2)``.

    w: initial flat weights (P,) (copied to float32). The training settings are one
    :class:`ps.spec.TrainingSpec`: pass ``spec=``, or its fields as keyword arguments (mode, optimizer,
    learning_rate, num_workers, layers, tau, staleness, ssp_slack, alpha, local_momentum, barrier_timeout,
    ...). ``client_config()`` hands the spec to the workers. checkpoint_dir with checkpoint_every (updates)
    and/or checkpoint_seconds; resume=True starts from the latest checkpoint there. on_epoch(figures): called on
    the serving thread once per completed epoch with its figures (:mod:`ps.convergence`: epoch, loss,
    accuracy, rows, samples_per_s, staleness, relative_change); default: one INFO line on this module's logger.
    """

    def __init__(self, w, mode=None, optimizer=None, learning_rate=None, num_workers=None,
                 bind="tcp://127.0.0.1:0", secure=True, *, spec: TrainingSpec | None = None, checkpoint_dir=None,
                 checkpoint_every=None, checkpoint_seconds=None, resume=False, checkpoint_on_stop=True,
                 progress=None, hwm=8, on_epoch=None, **spec_fields):
        given = {k: v for k, v in dict(mode=mode, optimizer=optimizer, learning_rate=learning_rate,
                                       num_workers=num_workers).items() if v is not None}
        given.update(spec_fields)
        if spec is None:
            spec = TrainingSpec(**given)
        elif given:
            raise TypeError(f"pass either spec= or its fields, not both (got {sorted(given)})")
        w = np.asarray(w)
        self.spec, self.bind, self.secure, self.hwm = spec, bind, bool(secure), int(hwm)
        self.job_id = uuid.uuid4().bytes
        self.fingerprint = model_fingerprint(w.shape[0], "float32", spec.layers)
        self.engine = Engine(w, spec, job_id=self.job_id, fingerprint=self.fingerprint)
        self.checkpoints = None
        self.resumed_from = None
        if checkpoint_dir:
            self.checkpoints = ckpt.CheckpointSchedule(checkpoint_dir, checkpoint_every, checkpoint_seconds,
                                                       checkpoint_on_stop)
            if resume and ckpt.latest(checkpoint_dir):
                self.resumed_from = ckpt.latest(checkpoint_dir)
                self.engine.restore(*ckpt.load(self.resumed_from))
                log.info("resumed from %s at version %d", self.resumed_from, self.engine.version)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._error = None
        self._progress_enabled = progress
        self.on_epoch = on_epoch if on_epoch is not None else self._log_epoch
        self.address = None
        self.curve = None
        self.dropped_replies = 0

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def num_workers(self) -> int:
        return self.spec.num_workers

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ParameterServer":
        if self._thread is not None:
            raise RuntimeError("server already started")
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        if self.secure:
            self.curve = CurveServer(self.ctx)
            self.curve.secure(sock)
        else:
            log.warning("SECURITY OFF: parameter server at %s accepts unauthenticated, unencrypted clients; "
                        "use secure=False only on a trusted network", self.bind)
        host = self.bind.split("//", 1)[-1].rsplit(":", 1)[0]
        if host in ("*", "0.0.0.0", "[::]", "::"):
            log.warning("parameter server binds all interfaces (%s) as asked", self.bind)
        try:
            sock.bind(_bind_url(self.bind))
        except zmq.ZMQError as exc:
            self._close_ctx(sock)
            raise OSError(f"cannot bind parameter server to {self.bind!r}: {exc}") from exc
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        enabled = self._progress_enabled if self._progress_enabled is not None else os.isatty(2)
        self.progress = ProgressLine(bool(enabled))
        if self.checkpoints is not None:
            self.checkpoints.start(self.engine.version)
        self._thread = threading.Thread(target=self._serve, name="ps-server", daemon=True)
        self._thread.start()
        return self

    def _close_ctx(self, sock):
        sock.close(linger=0)
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (waiting workers get SERVER_STOPPING), write a final checkpoint if configured."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"parameter server thread did not stop within {timeout}s")
        self._thread = None
        cp = self.checkpoints
        try:
            if cp is not None and cp.on_stop and self.engine.version != cp.version:
                self.save_checkpoint(timeout)
            elif cp is not None:
                cp.writer.flush(timeout)          # the last periodic snapshot is on disk when stop returns
        except (OSError, TimeoutError) as exc:
            raise RuntimeError(f"parameter server stopped, but its last checkpoint to {cp.directory!r} "
                               f"was not written: {exc!r}") from exc
        finally:
            if cp is not None:
                cp.close(timeout)
            self.progress.close(self.stats())

    def __enter__(self):
        return self.start() if self._thread is None else self

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ public views
    def client_config(self) -> dict:
        """Small picklable dict a worker needs: the address, the ids (job, model fingerprint, size), the client
        keys and the training spec."""
        if self.address is None:
            raise RuntimeError("start() the server before asking for its client config")
        cfg = {"address": self.address, "job_id": self.job_id.hex(), "fingerprint": self.fingerprint,
               "num_params": self.engine.num_params, "protocol": PROTOCOL_VERSION, "secure": self.secure,
               "spec": self.spec}
        if self.curve is not None:
            cfg.update(self.curve.client_keys())
        return cfg

    def weights(self) -> np.ndarray:
        with self._lock:
            return self.engine.weights.copy()

    @property
    def version(self) -> int:
        return self.engine.version

    def stats(self) -> dict:
        with self._lock:
            s = self.engine.stats()
        s["dropped_replies"] = self.dropped_replies
        s["zap_denied"] = self.curve.denied if self.curve is not None else 0
        if self._error is not None:
            s["error"] = repr(self._error)
        if self.checkpoints is not None:
            s["checkpoint"] = self.checkpoints.stats()
        return s

    def history(self) -> list[dict]:
        """Per-push records: time, worker, step, version, loss, accuracy, batch_size, staleness, samples_per_s."""
        with self._lock:
            return list(self.engine.history)

    def fence_below(self, attempt: int) -> int:
        """From now on refuse requests of attempts older than ``attempt``; drop those waiting (see Engine)."""
        with self._lock:
            return self.engine.fence_below(attempt)

    def save_checkpoint(self, timeout: float = 60.0) -> str:
        """Checkpoint the current state now and wait until it is on disk -> its path (or a newer one's, if the
        serving thread queued a newer snapshot meanwhile). Raises what the write raised."""
        cp = self.checkpoints
        if cp is None:
            raise ValueError("no checkpoint_dir was given to this server")
        with self._lock:                          # a copy of the state, taken here
            arrays, meta = self.engine.snapshot()
        if cp.writer is None:                     # not serving: write here
            return cp.save(arrays, meta)
        cp.submit(arrays, meta)
        return cp.writer.flush(timeout)

    # ------------------------------------------------------------------ serving thread
    def _send(self, token, header, payload) -> None:
        frames = [token, header.pack()]
        big = isinstance(payload, np.ndarray) and payload.nbytes >= ZERO_COPY_MIN
        if payload is not None:
            frames.append(memoryview(payload).cast("B") if isinstance(payload, np.ndarray) else payload)
        try:
            tracker = self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=not big, track=big)
        except zmq.ZMQError as exc:  # peer gone (EHOSTUNREACH) or its queue full (EAGAIN): never block
            self.dropped_replies += 1
            log.debug("reply to %r dropped: %s", token, exc)
            return
        if big:
            self.engine.pool.track(payload, tracker)

    def _serve(self) -> None:
        sock, poller = self._sock, zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set() and not self.engine.stop_requested:
                if poller.poll(50):
                    for _ in range(64):               # drain a burst, then look at timers
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        with self._lock:
                            replies = self.engine.handle(frames[0].bytes, frames[1:])
                        for r in replies:
                            self._send(*r)
                        self._maybe_checkpoint()
                with self._lock:
                    replies = self.engine.tick()
                for r in replies:
                    self._send(*r)
                self._maybe_checkpoint()
                self._report_epochs()
                if self.progress.enabled:
                    self.progress.update(self.stats())
            with self._lock:                          # nobody waits forever on a stopped server
                replies = self.engine.drain()
            for r in replies:
                self._send(*r)
        except Exception as exc:  # noqa: BLE001 - keep the error for stats() / stop(), log it loudly
            self._error = exc
            log.exception("parameter server thread failed")
        finally:
            self._close_ctx(sock)

    def _report_epochs(self) -> None:
        with self._lock:
            completed = self.engine.convergence.pop_completed()
        for figures in completed:
            try:
                self.on_epoch(figures)
            except Exception:  # noqa: BLE001 - a reporting hook must not stop the server
                log.exception("on_epoch hook failed")

    def _log_epoch(self, f: dict) -> None:
        log.info("%s", epoch_line(f, self.spec.epochs))

    def _maybe_checkpoint(self) -> None:
        cp = self.checkpoints
        if cp is not None and cp.due(self.engine.version):
            with self._lock:                      # copy the state here; the writer's thread saves it
                arrays, meta = self.engine.snapshot()
            cp.submit(arrays, meta)

    def __repr__(self):
        return f"ParameterServer(mode={self.mode!r}, address={self.address!r}, secure={self.secure})"
