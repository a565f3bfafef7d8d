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
import time
import uuid

import numpy as np
import zmq

from core.validation import check_int

from . import checkpoint as ckpt
from .client import check_timeout
from .engine import Engine, check_initial_weights
from .progress import ProgressLine, epoch_line
from .protocol import (NOBLOCK, PROTOCOL_VERSION, SNDMORE, ZERO_COPY_MIN, max_message_bytes, model_fingerprint,
                       queue_depth, recv_frames)
from .security import ConnectionGuard, CurveServer, curve_speed_warning, raise_fd_limit
from .spec import TrainingSpec

log = logging.getLogger("ps.server")


def _send_reply(sock, token, head, frame, big):
    """ROUTER reply: [peer, header(, payload)], never blocking; a full or gone peer fails at the first frame
    (libzmq checks the pipe there), so a retry resends the whole message. -> the payload's tracker or None."""
    sock.send(token, NOBLOCK | SNDMORE, copy=True)
    if frame is None:
        sock.send(head, NOBLOCK, copy=True)
        return None
    sock.send(head, NOBLOCK | SNDMORE, copy=True)
    return sock.send(frame, NOBLOCK, copy=not big, track=big)


WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]", "::")


def _bind_url(bind: str) -> str:
    if bind.startswith("tcp://") and bind.rsplit(":", 1)[-1] == "0":
        return bind.rsplit(":", 1)[0] + ":*"          # ZeroMQ's spelling of "any free port"
    return bind


def _host(url: str) -> str:
    return url.split("//", 1)[-1].rsplit(":", 1)[0]


def insecure_warning(address: str) -> str:
    """What a server with security off says (the log, a fit's warnings)."""
    return (f"SECURITY OFF (secure=False, --insecure): the parameter server at {address} accepts "
            f"unauthenticated, unencrypted clients; turn security off only on a trusted network")


def io_threads_for(cores: int | None = None, sharded: bool = False) -> int:
    """ZeroMQ I/O threads of a server's context. CURVE encrypts in them, one connection per thread, so with one
    thread every worker's crypto queues behind the others': a quarter of the cores, at most 4 (a shard of a
    sharded server: 1, the shards spread it already). ``FFPS_PS_IO_THREADS`` overrides it (a driver whose cores
    the executors share)."""
    if os.environ.get("FFPS_PS_IO_THREADS"):
        value = os.environ["FFPS_PS_IO_THREADS"]
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"FFPS_PS_IO_THREADS must be a positive number of threads, got {value!r}")
        return int(value)
    cores = cores or os.cpu_count() or 1
    return 1 if sharded else max(1, min(4, cores // 4))


def advertised_host(bind: str, advertise_host: str | None) -> str | None:
    """The host workers connect to: ``advertise_host``, or for an all-interfaces bind this machine's address
    (refused when it is a loopback one: no other machine could use it); None: the bound address itself."""
    if advertise_host:
        return advertise_host
    if _host(bind) not in WILDCARD_HOSTS:
        return None
    import socket

    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError as exc:
        ip, why = None, f"this host's name does not resolve ({exc})"
    else:
        why = f"this host's name resolves to the loopback address {ip}"
    if ip is None or ip.startswith("127."):
        raise ValueError(f"the parameter server binds all interfaces ({bind}), but {why}, which workers on other "
                         f"machines cannot reach: pass advertise_host= (Spark: psHost or spark.driver.host)")
    return ip


class ParameterServer:
    """``ParameterServer(w, mode="async", optimizer="sgd", learning_rate=0.1, num_workers=2)``.

    w: initial flat weights (P,) (copied to float32). The training settings are one
    :class:`ps.spec.TrainingSpec`: pass ``spec=``, or its fields as keyword arguments (mode, optimizer,
    learning_rate, num_workers, layers, tau, staleness, ssp_slack, alpha, local_momentum, barrier_timeout,
    ...). ``client_config()`` hands the spec to the workers. checkpoint_dir with checkpoint_every (updates)
    and/or checkpoint_seconds; resume=True starts from the latest checkpoint there. on_epoch(figures): called on
    the serving thread once per completed epoch with its figures (:mod:`ps.convergence`: epoch, loss,
    accuracy, rows, samples_per_s, staleness, relative_change); default: one INFO line on this module's logger.

    Exposure: frames larger than the model's (``max_message_bytes``) drop their sender before anything is
    buffered; a peer that has not finished its handshake after ``handshake_timeout`` seconds is dropped; at
    most ``max_connections`` are open at once (default: half the process's descriptors, whose soft limit is
    raised to the hard one). advertise_host: the address handed to workers when binding all interfaces.
    hwm: messages each connection may queue each way (default :func:`ps.protocol.queue_depth`, about 1 MiB).
    """

    def __init__(self, w, mode=None, optimizer=None, learning_rate=None, num_workers=None,
                 bind="tcp://127.0.0.1:0", secure=True, *, spec: TrainingSpec | None = None, checkpoint_dir=None,
                 checkpoint_every=None, checkpoint_seconds=None, resume=False, checkpoint_on_stop=True,
                 progress=None, hwm=None, on_epoch=None, advertise_host=None, handshake_timeout=5.0,
                 max_connections=None, shard=None, **spec_fields):
        given = {k: v for k, v in dict(mode=mode, optimizer=optimizer, learning_rate=learning_rate,
                                       num_workers=num_workers).items() if v is not None}
        given.update(spec_fields)
        if spec is None:
            spec = TrainingSpec(**given)
        elif given:
            raise TypeError(f"pass either spec= or its fields, not both (got {sorted(given)})")
        w = check_initial_weights(w)          # before anything reads its shape
        self._check_options(w, spec, shard, secure, hwm, handshake_timeout, max_connections)
        self.spec, self.bind, self.secure = spec, bind, bool(secure)
        self.hwm = int(hwm) if hwm is not None else queue_depth(w.shape[0])
        self.advertise_host = advertised_host(bind, advertise_host)
        self.handshake_timeout, self.max_connections = float(handshake_timeout), max_connections
        self.job_id = uuid.uuid4().bytes
        self.shard = shard                       # (index, count) when this server holds one slice (ps.shards)
        self.io_threads = io_threads_for(sharded=shard is not None)
        self.fingerprint = model_fingerprint(w.shape[0], "float32", spec.layers, shard)
        self.engine = Engine(w, spec, job_id=self.job_id, fingerprint=self.fingerprint)
        self.checkpoints = None
        self.resumed_from = None
        if not checkpoint_dir:
            for name, value in (("checkpoint_every", checkpoint_every), ("checkpoint_seconds", checkpoint_seconds),
                                ("resume", resume or None)):
                if value is not None:
                    raise ValueError(f"{name}={value!r} needs checkpoint_dir: the directory the checkpoints go to")
        else:
            self.checkpoints = ckpt.CheckpointSchedule(checkpoint_dir, checkpoint_every, checkpoint_seconds,
                                                       checkpoint_on_stop)
            newest = ckpt.latest(checkpoint_dir)
            if newest:                   # a running server's directory: say so, not "pass resume=True"
                ckpt.DirectoryLock(checkpoint_dir).release()
            elif resume:
                log.warning("resume=True, but the checkpoint directory %r holds no checkpoint: training starts from "
                            "the initial weights (a mistyped checkpointDir?)", checkpoint_dir)
            if newest and not resume:
                raise ValueError(f"the checkpoint directory {checkpoint_dir!r} (checkpointDir, --checkpoint-dir) "
                                 f"already holds checkpoints (newest {os.path.basename(newest)}): pass resume=True "
                                 f"(--resume) to continue from it, or use an empty directory; a new run would "
                                 f"overwrite them")
            if resume and newest:
                try:
                    self.engine.restore(*ckpt.load(newest))
                except ValueError as exc:
                    raise ValueError(f"cannot resume from {newest}: {exc}") from None
                self.resumed_from = newest
                log.info("resumed from %s at version %d", newest, self.engine.version)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stopping = threading.Lock()        # one stop() at a time
        self._thread = None
        self._error = None
        self._progress_enabled = progress
        self.on_epoch = on_epoch if on_epoch is not None else self._log_epoch
        self.address = None
        self.curve = None
        self.guard = None
        self.dropped_replies = 0

    @staticmethod
    def _check_options(w, spec, shard, secure, hwm, handshake_timeout, max_connections) -> None:
        """Options ZeroMQ would refuse later with a bare 'Invalid argument' (or take silently), by name; the
        layers against the weights (a shard holds a slice of them)."""
        if spec.layers is not None and shard is None and spec.num_params != w.shape[0]:
            raise ValueError(f"layers {list(spec.layers)} have {spec.num_params} parameters, the initial weights "
                             f"{w.shape[0]}")
        if not isinstance(secure, bool):
            raise ValueError(f"secure must be True or False, got {secure!r}")
        for name, value, low in (("hwm", hwm, 0), ("max_connections", max_connections, 1)):
            if value is not None:
                check_int(name, value, low)
        check_timeout("handshake_timeout", handshake_timeout)

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
        self.ctx = zmq.Context(io_threads=self.io_threads)
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes(self.engine.num_params))
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(self.handshake_timeout * 1000))
        fds = raise_fd_limit()
        self.guard = ConnectionGuard(sock, self.max_connections or max(16, fds // 2)).start()
        if self.secure:
            self.curve = CurveServer(self.ctx)
            self.curve.secure(sock)
            slow = curve_speed_warning()             # measured and said once per process
            if slow:
                log.warning("%s", slow)
        if _host(self.bind) in WILDCARD_HOSTS:
            log.warning("parameter server binds all interfaces (%s) as asked; workers connect to %s",
                        self.bind, self.advertise_host)
        try:
            sock.bind(_bind_url(self.bind))
        except zmq.ZMQError as exc:
            self._close_ctx(sock)
            raise OSError(f"cannot bind parameter server to {self.bind!r}: {exc}") from exc
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.advertise_host:
            self.address = f"tcp://{self.advertise_host}:{self.address.rsplit(':', 1)[-1]}"
        self._sock = sock
        if not self.secure and (self.shard is None or self.shard[0] == 0):      # said once for a sharded server
            log.warning("%s", insecure_warning(self.address))
        enabled = self._progress_enabled if self._progress_enabled is not None else os.isatty(2)
        self.progress = ProgressLine(bool(enabled))
        if self.checkpoints is not None:
            try:
                self.checkpoints.start(self.engine.version)     # its directory's lock: one server per directory
            except BaseException:
                self._close_ctx(sock)
                raise
        self._thread = threading.Thread(target=self._serve, name="ps-server", daemon=True)
        self._thread.start()
        threading.Thread(target=self._warm_up, name="ps-warm-up", daemon=True).start()
        return self

    def _warm_up(self) -> None:
        """Load the update kernel before the first push needs it: numba's first kernel in a process takes ~0.7 s
        (2-core VM), which the first push, and every worker waiting on its reply, paid. On a thread of its own,
        so registrations and barriers are served meanwhile; a push that comes first waits for it as before."""
        try:
            self.engine.optimizer.warm_up()
        except Exception:  # noqa: BLE001 - the real update says what is wrong, in its own context
            log.debug("warming the update kernel up failed", exc_info=True)

    def _close_ctx(self, sock):
        if self.guard is not None:
            self.guard.close()
        sock.close(linger=0)
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (waiting workers get SERVER_STOPPING), write a final checkpoint if configured. Safe to
        call from several threads at once: one stops the server, the others wait for it (within ``timeout``)."""
        if not self._stopping.acquire(timeout=4 * timeout):   # the other stop: join, final save, close
            raise RuntimeError(f"parameter server did not stop within {4 * timeout}s (another stop() is running)")
        try:
            self._stop_locked(timeout)
        finally:
            self._stopping.release()

    def _stop_locked(self, timeout: float) -> None:
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
            written = ckpt.latest(cp.directory)          # this server's, or an earlier one's it resumed from
            raise ckpt.CheckpointNotWritten(
                f"parameter server stopped, but its last checkpoint to {cp.directory!r} was not written: {exc!r}; "
                f"a resume would start from {written or 'no checkpoint'}") from exc
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

    def next_attempt(self) -> int:
        """The attempt number a launcher should start with: 0, or above those of a restored checkpoint."""
        return self.engine.next_attempt() if self.resumed_from else 0

    @property
    def version(self) -> int:
        return self.engine.version

    def stats(self) -> dict:
        with self._lock:
            s = self.engine.stats()
        s["dropped_replies"] = self.dropped_replies
        s["zap_denied"] = self.curve.denied if self.curve is not None else 0
        s["connections"] = self.guard.stats() if self.guard is not None else None
        if self._error is not None:
            s["error"] = repr(self._error)
        if self.checkpoints is not None:
            s["checkpoint"] = self.checkpoints.stats()
        return s

    def history(self) -> list[dict]:
        """Per-push records: time, worker, step, version, loss, accuracy, batch_size, staleness, samples_per_s."""
        with self._lock:
            return self.engine.history_records()

    def registered(self) -> int:
        """:meth:`ps.engine.Engine.registered`: workers registered in the current attempt."""
        with self._lock:
            return self.engine.registered()

    def stalled(self) -> list[tuple[int, float]]:
        """:meth:`ps.engine.Engine.stalled` now: workers silent past the round timeout after a peer finished."""
        with self._lock:
            return self.engine.stalled(time.monotonic())

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
        if cp.writer is None:                     # not serving: write here
            return cp.save(*self._snapshot())
        cp.submit(*self._snapshot())
        return cp.writer.flush(timeout)

    def _snapshot(self) -> tuple[dict, dict]:
        """A copy of the state for a checkpoint, taken under the lock (the writer's thread saves it)."""
        with self._lock:
            return self.engine.snapshot()

    # ------------------------------------------------------------------ serving thread
    def _send(self, token, header, payload) -> None:
        big = False
        if isinstance(payload, np.ndarray):
            big = payload.nbytes >= ZERO_COPY_MIN
            frame = memoryview(payload).cast("B")
        else:
            frame = payload
        head = header.pack()
        try:
            try:
                tracker = _send_reply(self._sock, token, head, frame, big)
            except zmq.Again:
                # The socket learns how far its peer's pipe was read only when it processes its command
                # queue, which sends do at most once a millisecond: a peer that asks faster than that could
                # meet a pipe that looks full at HWM 8 with one reply in it (one reply in ~500 was lost so,
                # and the worker waited out its timeout). Reading EVENTS processes the commands; then a
                # second try fails only for a peer that really does not read its replies.
                self._sock.getsockopt(zmq.EVENTS)
                tracker = _send_reply(self._sock, token, head, frame, big)
        except zmq.ZMQError as exc:  # peer gone (EHOSTUNREACH) or its queue full (EAGAIN): never block
            self.dropped_replies += 1
            log.debug("reply to %r dropped: %s", token, exc)
            return
        if big:
            self.engine.pool.track(payload, tracker)

    HOUSEKEEPING_S = 0.01     # timers (deadlines, checkpoints, epoch lines, progress) at most this often
    IDLE_WAIT_S = 0.05        # with no request, the timers are looked at this often

    def _serve(self) -> None:
        # One blocking receive per request, as a bare ROUTER loop does: no poller (and its extra wake-up and
        # system calls) in front of it. The connection guard watches its monitor on its own thread.
        sock, stop = self._sock, self._stop
        sock.setsockopt(zmq.RCVTIMEO, int(self.IDLE_WAIT_S * 1000))
        next_housekeeping = 0.0
        try:
            while not stop.is_set():
                try:
                    frames = recv_frames(sock)
                except zmq.Again:                  # nothing for IDLE_WAIT_S
                    frames = None
                now = time.monotonic()
                if frames is not None:
                    with self._lock:
                        replies = self.engine.handle(frames[0].bytes, frames[1:], now)
                    for r in replies:
                        self._send(*r)
                    self._maybe_checkpoint()
                if frames is None or now >= next_housekeeping:  # per request, this would cost as much as one
                    next_housekeeping = now + self.HOUSEKEEPING_S
                    with self._lock:
                        replies = self.engine.tick(now)
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
            cp.submit(*self._snapshot())

    def __repr__(self):
        return f"ParameterServer(mode={self.mode!r}, address={self.address!r}, secure={self.secure})"
