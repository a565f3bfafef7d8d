"""ZeroMQ transport of the parameter server: a ROUTER socket served by one background thread.

The thread owns the socket; all state lives in :class:`ps.engine.Engine` (pure, no sockets), guarded by a
lock so ``weights()`` / ``stats()`` can be read from the driver thread. Security is on by default: a fresh
CURVE key pair for the server and one for the job's clients, and a ZAP handler that admits only that client
key. ``secure=False`` turns this off and logs a warning.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from . import checkpoint as ckpt
from .engine import Engine
from .optimizers import make_optimizer
from .progress import ProgressLine
from .protocol import PROTOCOL_VERSION, ZERO_COPY_MIN, Reason, model_fingerprint
from .rules import check_mode

log = logging.getLogger("ps.server")


class _OnlyKey:
    """ZAP credentials provider: admit exactly one CURVE public key (z85)."""

    def __init__(self, z85_key: bytes):
        self.key = z85_key
        self.denied = 0

    def callback(self, domain, key):
        ok = key == self.key
        self.denied += not ok
        return ok


def _bind_url(bind: str) -> str:
    if bind.startswith("tcp://") and bind.rsplit(":", 1)[-1] == "0":
        return bind.rsplit(":", 1)[0] + ":*"          # ZeroMQ's spelling of "any free port"
    return bind


class ParameterServer:
    """``ParameterServer(w, mode="async", optimizer="sgd", learning_rate=0.1, num_workers=2)``.

    w: initial flat weights (P,) (copied to float32). mode: sync | async | easgd | async-easgd | eamsgd.
    staleness: async only, reject pushes more than this many versions old (STALE reply). ssp_slack: hold a
    pull at clock c until every other worker reached clock c - slack. tau / alpha / worker_lr / momentum are
    handed to workers through ``client_config()``. barrier_timeout: seconds a sync round, barrier or SSP
    wait may last before the waiting workers get a BARRIER_TIMEOUT error. checkpoint_dir with
    checkpoint_every (updates) and/or checkpoint_seconds; resume=True starts from the latest checkpoint.
    """

    def __init__(self, w, mode="async", optimizer="sgd", learning_rate=0.1, num_workers=2,
                 bind="tcp://127.0.0.1:0", secure=True, *, layers=None, staleness=None, ssp_slack=None, tau=1,
                 alpha=None, worker_lr=None, momentum=0.99, schedule="constant", optimizer_options=None,
                 barrier_timeout=30.0, checkpoint_dir=None, checkpoint_every=None, checkpoint_seconds=None,
                 resume=False, checkpoint_on_stop=True, progress=None, hwm=8, advertise_host=None):
        check_mode(mode)
        w = np.asarray(w)
        self.mode, self.num_workers, self.bind = mode, int(num_workers), bind
        self.secure, self.hwm, self.advertise_host = bool(secure), int(hwm), advertise_host
        self.job_id = uuid.uuid4().bytes
        self.fingerprint = model_fingerprint(w.shape[0], "float32", layers)
        self.layers = None if layers is None else [int(d) for d in layers]
        opt = make_optimizer(optimizer, w.shape[0], learning_rate, schedule=schedule, **(optimizer_options or {}))
        self.engine = Engine(w, mode=mode, optimizer=opt, num_workers=num_workers, job_id=self.job_id,
                             fingerprint=self.fingerprint, staleness=staleness, ssp_slack=ssp_slack,
                             alpha=alpha, barrier_timeout=barrier_timeout)
        self.train_config = {"mode": mode, "tau": int(tau), "alpha": self.engine.alpha,
                             "learning_rate": float(learning_rate if worker_lr is None else worker_lr),
                             "momentum": float(momentum), "barrier_timeout": float(barrier_timeout),
                             "ssp_slack": ssp_slack, "num_workers": self.num_workers}
        if int(tau) < 1 or (mode == "sync" and int(tau) != 1):
            raise ValueError(f"tau must be >= 1 (and 1 in sync mode), got {tau!r} with mode={mode!r}")
        if checkpoint_dir and os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            raise ValueError(f"checkpoint_dir {checkpoint_dir!r} exists and is not a directory")
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.checkpoint_seconds, self.checkpoint_on_stop = checkpoint_seconds, bool(checkpoint_on_stop)
        self.resumed_from = None
        if resume and checkpoint_dir and ckpt.latest(checkpoint_dir):
            self.resumed_from = ckpt.latest(checkpoint_dir)
            self.engine.restore(*ckpt.load(self.resumed_from))
            log.info("resumed from %s at version %d", self.resumed_from, self.engine.version)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._error = None
        self._progress_enabled = progress
        self.address = None
        self._ckpt_version, self._ckpt_time = self.engine.version, time.monotonic()
        self._writer = None                   # background checkpoint writer while serving
        self._ckpt_stats = None               # its counters once stopped
        self.dropped_replies = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ParameterServer":
        if self._thread is not None:
            raise RuntimeError("server already started")
        self.ctx = zmq.Context()
        self.auth = None
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        if self.secure:
            self.server_public, server_secret = zmq.curve_keypair()
            self.client_public, self.client_secret = zmq.curve_keypair()
            self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("ps.zap"))
            self.auth.start()
            self._zap = _OnlyKey(self.client_public)
            self.auth.configure_curve_callback("*", credentials_provider=self._zap)
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = server_secret, self.server_public, True
        else:
            self.server_public = self.client_public = self.client_secret = None
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
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.advertise_host:
            endpoint = f"tcp://{self.advertise_host}:{endpoint.rsplit(':', 1)[-1]}"
        self.address = endpoint
        self._sock = sock
        enabled = self._progress_enabled if self._progress_enabled is not None else os.isatty(2)
        self.progress = ProgressLine(bool(enabled))
        if self.checkpoint_dir:
            self._writer = ckpt.CheckpointWriter(self.checkpoint_dir)
        self._thread = threading.Thread(target=self._serve, name="ps-server", daemon=True)
        self._thread.start()
        return self

    def _close_ctx(self, sock):
        sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
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
        try:
            if self.checkpoint_dir and self.checkpoint_on_stop and self.engine.version != self._ckpt_version:
                self.save_checkpoint(timeout)
            elif self._writer is not None:
                self._writer.flush(timeout)       # the last periodic snapshot is on disk when stop returns
        except (OSError, TimeoutError) as exc:
            raise RuntimeError(f"parameter server stopped, but its last checkpoint to {self.checkpoint_dir!r} "
                               f"was not written: {exc!r}") from exc
        finally:
            if self._writer is not None:
                self._writer.close(timeout)
                self._ckpt_stats, self._writer = self._writer.stats(), None
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
        """Small picklable dict a worker needs: address, job id, fingerprint, client keys, training options."""
        if self.address is None:
            raise RuntimeError("start() the server before asking for its client config")
        return {"address": self.address, "job_id": self.job_id.hex(), "fingerprint": self.fingerprint,
                "num_params": self.engine.num_params, "protocol": PROTOCOL_VERSION, "secure": self.secure,
                "server_public": self.server_public, "client_public": self.client_public,
                "client_secret": self.client_secret, "layers": self.layers, **self.train_config}

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
        s["zap_denied"] = self._zap.denied if self.secure and self.auth is not None else 0
        if self._error is not None:
            s["error"] = repr(self._error)
        if self.checkpoint_dir:
            s["checkpoint"] = self._writer.stats() if self._writer is not None else self._ckpt_stats
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
        if not self.checkpoint_dir:
            raise ValueError("no checkpoint_dir was given to this server")
        if self._writer is not None:
            self._submit_checkpoint()
            return self._writer.flush(timeout)
        with self._lock:                          # not serving: write here
            arrays, meta = self.engine.snapshot()
        path = ckpt.save(self.checkpoint_dir, arrays, meta)
        self._ckpt_version, self._ckpt_time = meta["version"], time.monotonic()
        return path

    def _submit_checkpoint(self) -> None:
        """Copy the state here (under the lock) and hand it to the writer's thread."""
        with self._lock:
            arrays, meta = self.engine.snapshot()
        self._writer.submit(arrays, meta)
        self._ckpt_version, self._ckpt_time = meta["version"], time.monotonic()

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
                if self.progress.enabled:
                    self.progress.update(self.stats())
            with self._lock:                          # nobody waits forever on a stopped server
                replies = self._drain_waiting()
            for r in replies:
                self._send(*r)
        except Exception as exc:  # noqa: BLE001 - keep the error for stats() / stop(), log it loudly
            self._error = exc
            log.exception("parameter server thread failed")
        finally:
            self._close_ctx(sock)

    def _drain_waiting(self):
        e, out = self.engine, []
        for tok, hh in e._drop_waiting(lambda hh: True):
            out += e._reject(tok, hh, Reason.SERVER_STOPPING, "parameter server is stopping")
        e.round = e.barrier = None
        return out

    def _maybe_checkpoint(self) -> None:
        if not self.checkpoint_dir or self.engine.version == self._ckpt_version:
            return
        due = (self.checkpoint_every and self.engine.version - self._ckpt_version >= self.checkpoint_every) or \
              (self.checkpoint_seconds and time.monotonic() - self._ckpt_time >= self.checkpoint_seconds)
        if due:
            self._submit_checkpoint()

    def __repr__(self):
        return f"ParameterServer(mode={self.mode!r}, address={self.address!r}, secure={self.secure})"


def stats_json(stats: dict) -> str:
    return json.dumps(stats, indent=1, sort_keys=True)
