"""Worker-side client: a DEALER socket with receive timeouts, bounded retries and clear errors.

    client = ParameterClient(cfg, worker_id=0)      # cfg = server.client_config(); registers (HELLO)
    version, w = client.pull()                       # w: read-only float32 (P,), valid until the next reply
    client.push(grad, loss=0.3, accuracy=0.9, batch_size=64)

Retries are safe: every request carries a sequence number (late replies to an earlier try are discarded) and
every push its step, so a retransmitted push the server already applied is answered DUPLICATE, not applied.
The HELLO reply's session token is sent with every later request: no other client can act as this
(worker, attempt), and a DUPLICATE is taken as success only for a step this client had already sent or one
taken before it registered (a retried task replaying its predecessor's steps).
"""
from __future__ import annotations

import json
import numbers
import secrets
import time
from dataclasses import dataclass

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from core.validation import check_int

from .changes import HeldWeights
from .protocol import (FLAG_DELTA_OK, FLAG_ELASTIC, FLAG_EPOCH_LAST, FLAG_JSON, FLAG_LOCAL_WEIGHTS, FLAG_STOP,
                       FLAG_TEXT, FLAG_WANT_WEIGHTS, FLOAT32, HELD_VERSION, SNDMORE, SPARSE_CODES, SPARSE_MIN_VALUES,
                       ZERO_COPY_MIN, Entries, Header, Op, ProtocolError, Reason, Status, array_frame, encode_push,
                       queue_depth, read_array, recv_frames, request_header, sparse_parts, unpack_header)
from .security import secure_client


KIND_FLAGS = {"gradient": 0, "elastic": FLAG_ELASTIC, "local_weights": FLAG_LOCAL_WEIGHTS}   # push(kind=...)


def check_pushed(array, num_params: int):
    """A push's vector as given: a 1-D float32 numpy array of ``num_params`` values, or :class:`Entries` of that
    size; anything else is refused here, naming what came, before it could be sent as other bytes."""
    if isinstance(array, Entries):
        n = array.size
    elif isinstance(array, np.ndarray) and array.dtype == np.float32 and array.ndim == 1:
        n = array.shape[0]
    else:
        shape = getattr(array, "shape", None)
        got = (f"a {array.dtype} array of shape {shape}" if isinstance(array, np.ndarray)
               else f"{type(array).__name__}" + (f" of shape {shape}" if shape is not None else ""))
        raise ValueError(f"push takes a 1-D float32 numpy array of {num_params} values (or ps.protocol.Entries), "
                         f"got {got}; convert with np.asarray(x, dtype=np.float32)")
    if n != num_params:
        raise ValueError(f"push of {n} values, the model has {num_params}")
    return array


ACCEPTED = frozenset((int(Status.OK), int(Status.DUPLICATE)))     # reply statuses that are not refusals
DUPLICATE = int(Status.DUPLICATE)       # ints, not the enum: a small request's whole cost is a few such lookups


INT32_MAX = 2**31 - 1
MAX_TIMEOUT_S = INT32_MAX // 1000       # ZeroMQ takes a socket's timeouts as int32 milliseconds


def check_timeout(name: str, value) -> float:
    """Seconds in (0, MAX_TIMEOUT_S] (any real number type), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= MAX_TIMEOUT_S:
        raise ValueError(f"{name} must be a positive number of seconds up to {MAX_TIMEOUT_S}, got {value!r}")
    return float(value)


ZAP_DENIED = 400          # the ZAP status of an authentication failure (RFC 27), not a passing error


class ServerUnavailable(ConnectionError):
    """No reply from the parameter server within the timeout, after all retries."""


class AuthenticationRefused(ServerUnavailable):
    """The server's authenticator refused this client's CURVE keys (ZAP status 400): another job's config, or
    keys changed since. Said at the failed handshake, not after every try of every request timed out."""


class PSError(RuntimeError):
    """The server refused a request; ``reason`` is a :class:`ps.protocol.Reason`."""

    def __init__(self, reason, message):
        super().__init__(f"{Reason(reason).name}: {message}")
        self.reason = Reason(reason)


class StaleUpdate(PSError):
    """The push was computed on weights too old for the staleness bound: pull, recompute, push the step again."""


class UpdateRejected(PSError):
    """The push's update made the weights non-finite: the server rolled it back and used up its step."""


@dataclass
class PushResult:
    version: int                     # server weights version after the push
    step: int                        # last step the server has applied for this worker
    duplicate: bool = False          # the step had already been applied; nothing changed
    weights: np.ndarray | None = None  # new weights (want_weights=True) or the EASGD center


class ParameterClient:
    """Client of one worker. ``timeout`` seconds per try, ``retries`` extra tries, then ServerUnavailable. Before
    its first connection, an address whose connects all fail for min(timeout, REFUSED_S) is ServerUnavailable
    at once: start the server before its clients."""

    def __init__(self, cfg: dict, worker_id: int = 0, attempt: int = 0, timeout: float = 10.0, retries: int = 2,
                 register: bool = True, hwm: int | None = None):
        self.cfg = cfg
        self.worker_id = check_int("worker_id", worker_id, 0, INT32_MAX)
        self.attempt = check_int("attempt", attempt, 0, INT32_MAX)
        self.timeout, self.retries = check_timeout("timeout", timeout), check_int("retries", retries, 0, 1000)
        if hwm is not None:
            check_int("hwm", hwm, 0, INT32_MAX)
        self._closed = False
        self.job_id, self.fingerprint = bytes.fromhex(cfg["job_id"]), int(cfg["fingerprint"])
        self.num_params = int(cfg["num_params"])
        self.spec = cfg["spec"]
        # a push waits this long per try; in the round modes (sync, easgd) the reply waits for the round too
        self._push_timeout = self.timeout + (self.spec.barrier_timeout if self.spec.rule.rounds else 0)
        self.ctx = zmq.Context()
        s = self.sock = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        hwm = queue_depth(self.num_params) if hwm is None else int(hwm)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        # a receive waits at most this long: then the client looks whether its connection was re-made
        s.setsockopt(zmq.RCVTIMEO, int(self.RESEND_CHECK_S * 1000))
        s.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
        secure_client(s, cfg)
        # A request queued while a connection fails (refused mid-handshake, say) can be lost with it: the
        # monitor tells a re-made connection, and the request is sent again on it instead of waiting out a try.
        # It also tells a refused TCP connect before any connection was made: nothing listens at the address.
        self._monitor = s.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                             | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_CONNECTED
                                             | zmq.EVENT_CONNECT_RETRIED)
        self._lost = False     # a connection went down and no new one has finished its handshake yet
        self._refused = None   # the ZAP status of a handshake the server's authenticator refused
        self._connected = False        # a TCP connection to the server was made at least once
        self._connect_refusals = 0     # refused connects before the first connection
        self._connect_t0 = time.monotonic()
        try:
            s.connect(cfg["address"])
        except zmq.ZMQError as exc:
            self.close()
            raise ValueError(f"the client config's address {cfg['address']!r} is not an endpoint a client can "
                             f"connect to (tcp://HOST:PORT): {exc}") from None
        self._seq = 0
        self.version = 0
        # Binds this (worker, attempt) to this client. Proposed here, in the first HELLO, so that the HELLO
        # can be sent again (its reply lost) and still be this client's; the server keeps the one it took.
        self.session = secrets.randbits(64) | 1
        self._registered_step = 0
        self.step = 0          # last step the server applied for this worker
        self.stop_requested = False   # a reply said the server decided to stop training (tol)
        self._last = None      # keeps the frame behind the last pulled view alive
        # the weights of the last reply, which the server may bring up to date with the entries changed since
        # (a delta reply, ps.changes): only a vector this large can get one
        self._held = HeldWeights(self.num_params) if self.num_params >= SPARSE_MIN_VALUES else None
        self.last_changed = None   # the entries the last weights returned changed (a delta reply's), or None
        self.last_base = None      # the version those changes were made after
        if register:
            try:
                self.hello()
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------------ plumbing
    def _header(self, op, **kw) -> Header:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return request_header(int(op), self.job_id, self.worker_id, self.attempt, self.fingerprint, self._seq,
                              self.session, **kw)

    def _request(self, h: Header, payload=None, timeout=None):
        """Send, wait for the reply with the same seq; retry on timeout -> (reply header, payload frame)."""
        rh, frame, _ = self._request_tries(h, payload, timeout)
        return rh, frame

    RESEND_CHECK_S = 0.1    # while a reply is late, look this often whether the connection was re-made
    REFUSED_S = 2.0         # refused this long, never connected: nothing listens, and no try would be answered

    def _nobody_listens(self, timeout: float) -> str | None:
        """Why no reply can come, when every connect so far was refused for a while, else None. A server that
        went away after a connection is waited for as before (it may come back at the same address)."""
        waited = time.monotonic() - self._connect_t0
        if self._connected or self._connect_refusals < 3 or waited < min(timeout, self.REFUSED_S):
            return None
        return (f"nothing accepts connections at {self.cfg['address']}: {self._connect_refusals} connects failed "
                f"(refused or unreachable) in {waited:.1f}s; no server listens there: a wrong address or port, or "
                f"the server has stopped")

    def _reconnected(self) -> bool:
        """Whether a connection was lost and a new one finished its handshake since the last look."""
        remade = False
        while self._monitor.poll(0):
            message = recv_monitor_message(self._monitor)
            event = message["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                if message["value"] == ZAP_DENIED:
                    self._refused = message["value"]
                continue
            if event == zmq.EVENT_CONNECTED:
                self._connected = True
                continue
            if event == zmq.EVENT_CONNECT_RETRIED:
                self._connect_refusals += not self._connected
                continue
            if event == zmq.EVENT_DISCONNECTED:
                self._lost = True
            elif self._lost:
                self._lost, remade = False, True
        return remade

    def _request_tries(self, h: Header, payload=None, timeout=None, extra=None):
        """:meth:`_request` -> (reply header, payload frame, how many times the request was sent). ``extra``: a
        small last frame after the payload (a push's held version)."""
        if self._closed:
            raise RuntimeError(f"this ParameterClient (worker {self.worker_id}) is closed: make a new one")
        timeout = self.timeout if timeout is None else timeout
        head = h.pack()
        big = payload is not None and len(payload) >= ZERO_COPY_MIN
        sent, trackers = 0, []

        sock = self.sock

        def send():
            nonlocal sent
            sent += 1
            try:
                if payload is None:
                    sock.send(head, copy=True)
                else:                           # plain ints: zmq's flag enums cost more than the header
                    sock.send(head, SNDMORE, copy=True)
                    tracker = sock.send(payload, 0 if extra is None else SNDMORE, copy=not big, track=big)
                    if extra is not None:
                        sock.send(extra, 0, copy=True)
                    if big:
                        trackers.append(tracker)
            except zmq.Again:
                pass        # queue to the server full: wait out this try as if no reply came

        for _ in range(self.retries + 1):
            deadline = time.monotonic() + timeout   # a send that blocks (queue to the server full) is in the try
            send()
            while True:
                try:            # a blocking receive (RCVTIMEO), as a bare DEALER loop: no poller in front
                    reply = recv_frames(sock)
                except zmq.Again:
                    reply = None
                    if self._reconnected() and time.monotonic() < deadline:
                        send()      # the request may have gone down with the old connection
                    nobody = self._nobody_listens(timeout)
                    if nobody:
                        raise ServerUnavailable(f"no reply from the parameter server to {Op(h.op).name}: {nobody}")
                    if self._refused is not None:
                        raise AuthenticationRefused(
                            f"the parameter server at {self.cfg['address']} refused this client's CURVE keys "
                            f"(ZAP status {self._refused}) at {Op(h.op).name}: the client config is another job's "
                            f"(keys are made per server), or its keys were changed")
                if reply is not None:
                    try:
                        rh = unpack_header(reply[0].buffer)
                    except ProtocolError:
                        rh = None
                    if rh is not None and rh.seq == h.seq and rh.op == (h.op | 0x80):   # else a late reply
                        for tracker in trackers:
                            tracker.wait(timeout)          # the caller may reuse its buffer after we return
                        return rh, (reply[1] if len(reply) > 1 else None), sent
                if time.monotonic() >= deadline:
                    break
        raise ServerUnavailable(f"no reply from the parameter server at {self.cfg['address']} to "
                                f"{Op(h.op).name} after {self.retries + 1} tries of {timeout:.1f}s: it is gone, "
                                f"overloaded, or refused this client's keys")

    def _check(self, rh: Header, frame):
        if rh.flags & FLAG_STOP:
            self.stop_requested = True
        if rh.status in ACCEPTED:
            self.version = max(self.version, rh.wversion)
            return
        text = bytes(frame.buffer).decode("utf-8", "replace") if frame is not None and rh.flags & FLAG_TEXT else ""
        code = rh.code if rh.code in Reason._value2member_map_ else Reason.MALFORMED
        if code == Reason.NON_FINITE_UPDATE:
            self.step = max(self.step, rh.step)        # the server used the step up: the next push is step + 1
            raise UpdateRejected(code, text)
        raise (StaleUpdate if rh.status == Status.STALE else PSError)(code, text)

    @property
    def held_version(self) -> int | None:
        """The version of the weights this client holds, which a request offers for a delta reply (None:
        none; the next weights come whole)."""
        return None if self._held is None else self._held.version

    def _weights(self, rh, frame, out, asked=None, hold=True):
        """The reply's weights: a whole vector, or (when the request said it holds version ``asked``) the
        entries changed since, applied to the weights held. ``hold``: they are the weights of the reply's
        version (not the EASGD center a round answers with), to be held for the next delta."""
        held = self._held
        if rh.dtype in SPARSE_CODES:
            if asked is None or held is None or held.version != asked:
                raise PSError(Reason.BAD_PAYLOAD, "the server answered with changed entries (a delta) a request "
                                                  "that did not offer one")
            try:
                if rh.n_values != self.num_params:
                    raise ProtocolError(Reason.BAD_PAYLOAD, f"n_values={rh.n_values}, the model has "
                                                            f"{self.num_params}")
                index, values = sparse_parts(getattr(frame, "buffer", frame), self.num_params, rh.dtype)
            except ProtocolError as exc:
                held.forget()
                raise PSError(exc.reason, f"the server's delta reply: {exc}") from None
            w = held.delta(rh.wversion, index, values).view()
            self.last_changed, self.last_base = index, asked
        else:
            self.last_changed = None
            w = read_array(rh, frame, self.num_params, check_finite=False)
            if held is not None:
                held.whole(rh.wversion, w, frame) if hold else held.forget()
            self._last = frame
        if out is not None:
            np.copyto(out, w)
            return out
        w.flags.writeable = False           # valid until the next request that returns weights
        return w

    # ------------------------------------------------------------------ operations
    def hello(self) -> int:
        """Register (worker_id, attempt) -> last step the server applied for this worker (resume after it)."""
        rh, frame = self._request(self._header(Op.HELLO))
        self._check(rh, frame)
        self.step, self.session = rh.step, rh.session
        self._registered_step = rh.step        # steps up to here were taken before this client: replays are fine
        return rh.step

    def pull(self, out: np.ndarray | None = None, clock: int | None = None):
        """-> (version, weights (P,) float32). Without ``out`` the weights are a read-only view, valid until
        the next pull or push that returns weights (a delta reply updates the same array); with ``out`` they
        are copied into it. ``clock`` (SSP): this worker's clock (default:
        its last applied step); the server holds the reply until the others are within the slack."""
        slack_wait = self.spec.ssp_slack is not None
        timeout = self.timeout + (self.spec.barrier_timeout if slack_wait else 0)
        held = self.held_version
        h = self._header(Op.PULL, step=self.step if clock is None else int(clock),
                         flags=0 if held is None else FLAG_DELTA_OK, wversion=held or 0)
        rh, frame = self._request(h, timeout=timeout)
        self._check(rh, frame)
        return rh.wversion, self._weights(rh, frame, out, asked=held)

    def push(self, array, loss=0.0, accuracy=0.0, batch_size=0, *, base_version=None, step=None,
             kind="gradient", want_weights=False, out=None, epoch=0, last_of_epoch=False) -> PushResult:
        """Push a gradient (or elastic difference / local weights, per ``kind``) for ``step``.

        array: float32 (P,), or :class:`ps.protocol.Entries` (zero outside its index). base_version: weights
        version it was computed on (default: last pulled). step: default last applied step + 1. epoch: the
        epoch this exchange ends in (0 = not given); last_of_epoch: this worker's last push of it (the server's
        tol decision needs both). Raises StaleUpdate / PSError on refusal; ServerUnavailable when no reply
        comes. In sync and easgd modes the reply comes when the round completes.
        """
        check_pushed(array, self.num_params)
        if kind == "local_weights":
            if isinstance(array, Entries):
                raise ValueError("a local_weights push takes the whole weight vector, not ps.protocol.Entries")
            payload, code = array, FLOAT32
        else:                               # a mostly-zero gradient goes as its non-zero entries
            payload, code = encode_push(array, self.spec.wire_dtype)
        buf = array_frame(payload)[0]        # n_values: the model's size, whatever the frame (check_pushed)
        if kind not in KIND_FLAGS:
            raise ValueError(f"kind must be one of {', '.join(KIND_FLAGS)}, got {kind!r}")
        flags = KIND_FLAGS[kind]
        base = self.version if base_version is None else base_version
        held = self.held_version if want_weights else None
        if want_weights:
            flags |= FLAG_WANT_WEIGHTS if held is None else FLAG_WANT_WEIGHTS | FLAG_DELTA_OK
        if last_of_epoch:
            flags |= FLAG_EPOCH_LAST
        step = self.step + 1 if step is None else check_int("step", step, 0, 2**63 - 1)
        if not 0 <= batch_size <= INT32_MAX or not 0 <= epoch <= 0xFFFF:      # the header's int32 and uint16
            check_int("batch_size", batch_size, 0, INT32_MAX)
            check_int("epoch", epoch, 0, 0xFFFF)
        h = self._header(Op.PUSH, flags=flags, wversion=base,
                         step=step, loss=float(loss), accuracy=float(accuracy), batch_size=int(batch_size),
                         dtype=code, n_values=self.num_params, epoch=int(epoch))
        # the weights held are of another version than the push's base (a pipelined window): say which
        extra = None if held is None or held == base else HELD_VERSION.pack(held)
        rh, frame, tries = self._request_tries(h, buf, timeout=self._push_timeout, extra=extra)
        self._check(rh, frame)
        duplicate = rh.status == DUPLICATE
        if duplicate and tries == 1 and step > self._registered_step:
            raise PSError(Reason.DUPLICATE_STEP, f"step {step} of worker {self.worker_id} was taken before this "
                                                 f"client sent it: another client pushed as this worker")
        self.step = max(self.step, rh.step)
        w = self._weights(rh, frame, out, asked=held, hold=kind != "local_weights") if (
            frame is not None and (rh.dtype == FLOAT32 or rh.dtype in SPARSE_CODES)) else None
        return PushResult(rh.wversion, rh.step, duplicate, w)

    def barrier(self, step: int) -> int:
        """Wait until every worker reached barrier ``step`` (server-side timeout) -> server version."""
        rh, frame = self._barrier(step, None)
        return rh.wversion

    def gather(self, step: int, report: dict) -> list:
        """Barrier ``step`` that also exchanges small JSON reports -> every worker's report, by worker id.

        ``report``: a JSON-serialisable dict (at most ``MAX_JSON_BYTES`` encoded); the server refuses others.
        """
        rh, frame = self._barrier(step, json.dumps(report).encode())
        if frame is None or not rh.flags & FLAG_JSON:
            raise PSError(Reason.BAD_PAYLOAD, f"barrier {step} reply carries no gathered reports")
        return json.loads(bytes(frame.buffer))

    def _barrier(self, step, payload):
        h = self._header(Op.BARRIER, step=int(step), flags=FLAG_JSON if payload is not None else 0)
        rh, frame = self._request(h, payload, timeout=self.timeout + self.spec.barrier_timeout)
        self._check(rh, frame)
        return rh, frame

    def stats(self) -> dict:
        rh, frame = self._request(self._header(Op.STATS))
        self._check(rh, frame)
        return json.loads(bytes(frame.buffer)) if rh.flags & FLAG_JSON else {}

    def bye(self) -> None:
        """Tell the server this worker is done (it stops holding SSP reads and barriers for it)."""
        rh, frame = self._request(self._header(Op.BYE))
        self._check(rh, frame)

    def report_failure(self, report: dict) -> None:
        """Tell the server why this task failed (a JSON object: exception type, message, frame, host, ...), so
        the driver can say it; at most ``MAX_JSON_BYTES`` encoded."""
        h = self._header(Op.REPORT, flags=FLAG_JSON)
        rh, frame = self._request(h, json.dumps(report).encode())
        self._check(rh, frame)

    def close(self) -> None:
        """Close the socket and its context; closing twice is harmless."""
        self._last = None
        self._closed = True
        if not self.ctx.closed:
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
            self.sock.close(linger=0)
            self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
