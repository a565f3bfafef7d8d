"""Wire protocol of the ffps parameter server: one fixed-layout binary header, then raw frames.

PROTOCOL (version 2)
--------------------
Every message is a ZeroMQ multipart message ``[header, payload?]`` (the ROUTER adds/strips the peer identity).

* ``header``: exactly ``HEADER.size`` (= 104) bytes, little-endian, layout ``HEADER_FORMAT``::

    magic 4s "FFPS" | version u16 | op u8 | status u8 | code u16 | flags u16 | seq u32 | job_id 16s
    worker_id i32 | attempt i32 | fingerprint u64 | wversion i64 | step i64 | loss f64 | accuracy f64
    batch_size i32 | dtype u8 | pad 1x | epoch u16 | n_values i64 | session u64

  ``wversion``: in a push, the weights version the update was computed on; in a reply, the server's version
  after handling the request. ``step``: the worker's exchange counter (1, 2, ...; across attempts), contiguous:
  a push of step s is taken only when step s - 1 was (applied, or refused as a non-finite update; a STALE
  refusal leaves step s - 1 open for the worker's recomputed push). Steps count windows of the spec's tau
  local steps; with an adaptive window (the spec's ``window_max``) a push covering windows s .. s+m-1 carries
  step s+m-1 (m at most window_max // tau) and is taken when step s - 1 was.
  ``seq``: a per-client request number echoed in the reply so late replies to a retried request are
  discarded. ``session``: the token that binds this (worker, attempt) to one client. The client proposes a
  random one in its first HELLO (0: the server picks one), so a HELLO sent again after a lost connection is
  still the same client's; the HELLO reply carries the session the server took, and every later request of
  that client carries it.
  ``epoch``: in a push, the pass over the worker's shard that the exchange's last local step belongs to (1, 2,
  ...; 0 = not given), with ``FLAG_EPOCH_LAST`` on the worker's last push of that epoch: the server's ``tol``
  decision (:mod:`ps.convergence`) needs the epoch boundaries. A reply with ``FLAG_STOP`` says the server
  decided that training stops (``tol``): the worker ends after this exchange.
* Compatibility: the header stays ``HEADER.size`` bytes. Version 2 took version 1's 8 reserved bytes for
  ``session`` and 2 of its 3 pad bytes for ``epoch`` (so at most 65,535 passes); a field carved out of unused
  bytes bumps ``PROTOCOL_VERSION``, and peers of different versions refuse each other with VERSION_MISMATCH:
  server and workers come from one install, and a version-1 peer would ignore both sessions and the stop.
* ``payload`` (optional, at most one frame): ``n_values`` raw values of ``dtype`` (1 = float32; in a PUSH of
  a gradient or an elastic difference also 2 = bfloat16, the upper 16 bits of a float32, rounded to nearest
  even, or 3 = IEEE float16, when the job's spec sets ``wire_dtype``; or 4 = sparse: k uint32 indices in
  strictly increasing order, then their k float32 values; or 5 = runs: r, then the r uint32 starts and r
  lengths of runs of consecutive indices (increasing, with gaps between), then their k float32 values; for
  4 and 5 ``n_values`` is still the vector's length, and the sender takes the smaller where it is at most half
  the dense frame), C order, no header of its own. A reply's weights
  (PULL, or PUSH with ``FLAG_WANT_WEIGHTS``) are float32, or, where the request set ``FLAG_DELTA_OK`` (the
  client holds the weights of the request's ``wversion`` exactly, from an earlier reply of this server), may be
  sparse: the entries that changed since that version with their new values (:mod:`ps.changes`). A PUSH
  whose window started from older weights than the client holds (pipelined) names the version it holds in a
  last frame of 8 bytes (``HELD_VERSION``, int64); ``wversion`` stays the window's base; or, in
  STATS replies and ERROR replies, UTF-8 JSON / text (``flags`` says which); or,
  in a BARRIER request, a small UTF-8 JSON object (``FLAG_JSON``, at most ``MAX_JSON_BYTES``).
  A frame stays below ``MAX_FRAME_BYTES`` (2 GB is ZeroMQ's practical ceiling per frame).

Requests (op): HELLO, PULL, PUSH (gradient, elastic difference, or local weights for synchronous EASGD;
``flags & FLAG_WANT_WEIGHTS`` asks for the new weights in the reply), BARRIER, STATS, BYE, REPORT (a failed
task's JSON account of its exception); STOP is refused: the process that started a server stops it. A reply
carries ``op | REPLY`` and ``status`` OK / ERROR / STALE / DUPLICATE; ERROR and STALE name a ``Reason`` code.
A BARRIER (``step`` = the barrier's id) is released when every worker reached it; when any of them sent a JSON
object, every reply carries the JSON array of what each worker sent, by worker id (null where none): a
gather of small reports (row counts, data checks) without a Spark ``allGather``.
Arrays above ``ZERO_COPY_MIN`` bytes go out with ``copy=False`` and are read with ``np.frombuffer``; a sender
never writes to a buffer until its ``MessageTracker`` is done. No pickle anywhere on the wire.
"""
from __future__ import annotations

import enum
import hashlib
import json
import math
import struct
from typing import NamedTuple

import numpy as np
import zmq

from core.backends import host_ops
from core.backends.numpy_ops import round_to_precision

PROTOCOL_VERSION = 2
MAGIC = b"FFPS"
HEADER_FORMAT = "<4sHBBHHI16siiQqqddiBxHqQ"
HEADER = struct.Struct(HEADER_FORMAT)
ZERO_COPY_MIN = 64 * 1024          # pyzmq copies smaller frames anyway
MAX_FRAME_BYTES = 2**31 - 2**20    # stay well under ZeroMQ's 2 GB per frame
MAX_JSON_BYTES = 64 * 1024         # a BARRIER request's report
DTYPE_CODES = {1: np.dtype("<f4"), 2: np.dtype("<u2"), 3: np.dtype("<f2")}   # 2: bfloat16 bit patterns
FLOAT32, BFLOAT16, FLOAT16, SPARSE32, RUNS32 = 1, 2, 3, 4, 5
SPARSE_CODES = (SPARSE32, RUNS32)     # the two frames of a vector's entries (entries_frame picks the smaller)
# A push whose vector is mostly zeros (a sparse first layer's gradient) goes as its non-zero entries
# (entries_frame: index-value pairs, or runs of consecutive indices and their values), when that is at most half
# the dense frame. Vectors below SPARSE_MIN_VALUES, or whose sample of every SPARSE_SAMPLE_STEP-th value is over
# SPARSE_SAMPLE_MAX non-zero, go dense without a full scan.
SPARSE_MIN_VALUES = 1 << 16
SPARSE_SAMPLE_STEP, SPARSE_SAMPLE_MAX = 61, 0.25
WIRE_DTYPES = {"float32": FLOAT32, "bfloat16": BFLOAT16, "float16": FLOAT16}
FLOAT16_MAX = float(np.finfo(np.float16).max)

FLAG_WANT_WEIGHTS = 1   # request: reply with the weights after this request
FLAG_JSON = 2           # reply payload is UTF-8 JSON
FLAG_TEXT = 4           # reply payload is UTF-8 text (an error message)
FLAG_ELASTIC = 8        # push payload is an elastic difference (async-easgd / eamsgd)
FLAG_LOCAL_WEIGHTS = 16  # push payload is the worker's local weights (synchronous easgd exchange)
FLAG_EPOCH_LAST = 32    # push: the worker's last push of its ``epoch``
FLAG_STOP = 64          # reply: the server decided to stop training (tol); finish after this exchange
FLAG_DELTA_OK = 128     # PULL / PUSH: the client holds the weights of version ``wversion`` (or of a PUSH's
#                         HELD_VERSION frame): the reply may be what changed since
HELD_VERSION = struct.Struct("<q")   # a PUSH's optional last frame: the version of the weights the client holds
REPLY = 0x80


class Op(enum.IntEnum):
    HELLO = 1
    PULL = 2
    PUSH = 3
    BARRIER = 4
    STATS = 5
    BYE = 6
    STOP = 7          # refused (FORBIDDEN): kept so an old client gets a clear answer
    REPORT = 8        # a failed training task's account of its exception (JSON)


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1
    STALE = 2        # push computed on weights that are too old: pull, recompute, push again
    DUPLICATE = 3    # this (worker, step) was already applied: nothing done, safe to move on


class Reason(enum.IntEnum):
    """Why a message was rejected; stats count rejections by ``name``."""
    NONE = 0
    MALFORMED = 1            # not a parseable header (short, long, bad magic)
    VERSION_MISMATCH = 2
    WRONG_JOB = 3
    WRONG_FINGERPRINT = 4
    UNKNOWN_OP = 5
    BAD_FRAME_COUNT = 6
    BAD_PAYLOAD = 7          # payload size or dtype does not match the model
    NON_FINITE = 8           # NaN or inf in a pushed array or metric
    UNKNOWN_WORKER = 9
    DUPLICATE_WORKER = 10
    SUPERSEDED_ATTEMPT = 11
    DUPLICATE_STEP = 12
    STALE = 13
    BARRIER_TIMEOUT = 14
    WRONG_MODE = 15          # e.g. an elastic push to a gradient-mode server
    BAD_FIELD = 16           # a header field out of range (negative batch size, ...)
    SERVER_STOPPING = 17
    NON_FINITE_UPDATE = 18   # a finite push whose update overflowed: rolled back, the step is used up
    STEP_GAP = 19            # a push for a step beyond the next one: steps are contiguous
    FOREIGN_SESSION = 20     # the request does not carry the session of the registered (worker, attempt)
    FORBIDDEN = 21           # an op this server does not take from clients (STOP)


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``reason`` says how."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = Reason(reason)


class Header(NamedTuple):
    """One message header (immutable). A NamedTuple, not a dataclass: the server builds two per request, and a
    frozen dataclass of 20 fields costs ~10 µs to build where a tuple costs ~1 µs. The fields are in wire order
    (``HEADER_FORMAT``), so a header packs as ``HEADER.pack(*h)`` and parses as ``Header._make(HEADER.unpack(b))``:
    one C call each way, about a quarter of a field-by-field copy (a small request builds or reads four)."""
    magic: bytes = MAGIC
    version: int = PROTOCOL_VERSION
    op: int = 0
    status: int = 0                 # Status.OK
    code: int = 0                   # Reason.NONE
    flags: int = 0
    seq: int = 0
    job_id: bytes = bytes(16)
    worker_id: int = -1
    attempt: int = 0
    fingerprint: int = 0
    wversion: int = 0
    step: int = 0
    loss: float = 0.0
    accuracy: float = 0.0
    batch_size: int = 0
    dtype: int = 0
    epoch: int = 0
    n_values: int = 0
    session: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(*self)

    def replace(self, **changes) -> "Header":
        """A copy with ``changes``."""
        return self._replace(**changes)

    def reply(self, status=Status.OK, code=Reason.NONE, *, flags=0, dtype=0, n_values=0, wversion=None, step=None,
              session=None) -> "Header":
        """A reply header echoing this request's identity fields and seq."""
        (magic, version, op, _status, _code, _flags, seq, job_id, worker_id, attempt, fingerprint, wv, st, loss,
         accuracy, batch_size, _dtype, epoch, _n, sess) = self
        return _make_header((magic, version, (op | REPLY) & 0xFF, status, code, flags, seq, job_id, worker_id,
                             attempt, fingerprint, wv if wversion is None else wversion,
                             st if step is None else step, loss, accuracy, batch_size, dtype, epoch, n_values,
                             sess if session is None else session))


_make_header = Header._make


def request_header(op, job_id, worker_id, attempt, fingerprint, seq, session, flags=0, wversion=0, step=0,
                   loss=0.0, accuracy=0.0, batch_size=0, dtype=0, n_values=0, epoch=0) -> Header:
    """A request's header, positionally: a client builds one per request, and the NamedTuple's keyword
    constructor costs four times this."""
    return _make_header((MAGIC, PROTOCOL_VERSION, op, 0, 0, flags, seq & 0xFFFFFFFF, job_id, worker_id, attempt,
                         fingerprint, wversion, step, loss, accuracy, batch_size, dtype, epoch, n_values, session))


# zmq's send flags as plain ints: its flag enums cost more per call than a small request's header
NOBLOCK, SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)


def recv_frames(sock, flags: int = 0) -> list:
    """One message as zero-copy frames. Like ``recv_multipart(copy=False)``, but it reads each frame's own
    more-flag instead of asking the socket (RCVMORE) between frames: a message costs a few microseconds less,
    which is much of a small request's whole cost."""
    frame = sock.recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(flags, copy=False)
        frames.append(frame)
    return frames


def unpack_header(buf) -> Header:
    """Parse a header frame (bytes / memoryview) -> Header, or raise ProtocolError(MALFORMED / VERSION_MISMATCH)."""
    if len(buf) != HEADER.size:
        raise ProtocolError(Reason.MALFORMED, f"header must be {HEADER.size} bytes, got {len(buf)}")
    h = _make_header(HEADER.unpack(buf))
    if h.magic != MAGIC:
        raise ProtocolError(Reason.MALFORMED, f"bad magic {h.magic!r}, expected {MAGIC!r}")
    if h.version != PROTOCOL_VERSION:
        raise ProtocolError(Reason.VERSION_MISMATCH,
                            f"protocol version {h.version} is not supported (this side speaks {PROTOCOL_VERSION})")
    return h


def array_frame(arr: np.ndarray) -> tuple[memoryview | bytes, int]:
    """A contiguous float32 vector -> (buffer to send, n_values). Refuses anything the peer could misread."""
    if not isinstance(arr, np.ndarray) or arr.ndim != 1:
        raise ValueError(f"expected a 1-D numpy array, got {type(arr).__name__} "
                         f"with shape {getattr(arr, 'shape', None)}")
    if arr.dtype not in (np.float32, np.float16, np.uint16, np.uint32):
        raise ValueError(f"arrays on the wire are float32 (or the 16-bit and sparse frames of encode_push), got "
                         f"{arr.dtype}; convert with .astype(np.float32)")
    if arr.nbytes > MAX_FRAME_BYTES:
        raise ValueError(f"{arr.nbytes} bytes is too large for one frame (max {MAX_FRAME_BYTES})")
    arr = np.ascontiguousarray(arr)
    return memoryview(arr).cast("B"), arr.shape[0]


def to_bfloat16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (n,) -> bfloat16 bit patterns (n,) uint16: the upper half of each float32 rounded as the bf16
    GEMM precision rounds it (:func:`core.backends.numpy_ops.round_to_precision`: to nearest, ties to even; NaN
    stays NaN, inf stays inf, a value within half a bf16 ulp of float32's maximum becomes inf)."""
    high = round_to_precision(x, "bf16").view(np.uint32) >> np.uint32(16)
    out = np.empty(high.shape, np.uint16) if out is None else out
    np.copyto(out, high, casting="unsafe")
    return out


def from_bfloat16(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns (n,) uint16 -> float32 (n,), exactly (every bf16 is a float32)."""
    out = np.empty(bits.shape, np.float32) if out is None else out
    out.view(np.uint32)[...] = bits.astype(np.uint32) << np.uint32(16)
    return out


def encode_array(arr: np.ndarray, wire_dtype: str = "float32") -> tuple[np.ndarray, int]:
    """A float32 vector as it goes on the wire -> (array to send, dtype code). bfloat16 / float16 halve the
    bytes of a gradient or elastic difference; a vector float16 cannot hold (|value| > 65504) goes as float32
    (the server takes both), so the narrowing never turns a finite value into inf."""
    code = WIRE_DTYPES.get(wire_dtype)
    if code is None:
        raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {wire_dtype!r}")
    if code == BFLOAT16:
        return to_bfloat16(arr), code
    if code == FLOAT16:
        with np.errstate(invalid="ignore"):
            peak = float(np.max(np.abs(arr))) if arr.size else 0.0
        if peak <= FLOAT16_MAX or not math.isfinite(peak):        # non-finite: let the server refuse it
            return arr.astype(np.float16), code
    return arr, FLOAT32


class Entries(NamedTuple):
    """A vector of ``size`` float32 values that is zero outside ``index`` (sorted, unique): a sparse window's
    gradient sum, pushed without being made whole (:func:`encode_push`)."""
    index: np.ndarray
    values: np.ndarray
    size: int

    @property
    def shape(self) -> tuple[int]:
        return (self.size,)

    def toarray(self) -> np.ndarray:
        out = np.zeros(self.size, dtype=np.float32)
        out[self.index] = self.values
        return out

    def slice(self, a: int, b: int) -> "Entries":
        """Entries [a, b) of the vector, indexed from a (a shard's slice)."""
        lo, hi = np.searchsorted(self.index, [a, b])
        return Entries(self.index[lo:hi] - a, self.values[lo:hi], b - a)


def encode_push(arr, wire_dtype: str = "float32") -> tuple[np.ndarray, int]:
    """A pushed float32 vector (gradient, elastic difference) as it goes on the wire -> (array to send, dtype
    code): its non-zero entries (:func:`entries_frame`) where they take at most half the bytes of
    :func:`encode_array`'s frame, else that frame. ``arr`` may be :class:`Entries`: then they go as they are,
    without a scan."""
    if isinstance(arr, Entries):
        frame, code = entries_frame(arr.index, arr.values)
        if frame.nbytes <= 2 * arr.size:
            return frame, code
        arr = arr.toarray()
    dense, code = encode_array(arr, wire_dtype)
    sample = arr[::SPARSE_SAMPLE_STEP]
    if arr.size >= SPARSE_MIN_VALUES and np.count_nonzero(sample) <= SPARSE_SAMPLE_MAX * sample.size:
        index = np.flatnonzero(arr != 0)        # via a bool mask: 1.2 ms for 4.2M floats, 8.6 ms on the floats
        if 4 * index.size <= dense.nbytes // 2:                 # the values alone fit: worth a frame
            frame, sparse_code = entries_frame(index, source=arr)
            if frame.nbytes <= dense.nbytes // 2:
                return frame, sparse_code
    return dense, code


def entries_frame(index: np.ndarray, values: np.ndarray | None = None, *, source: np.ndarray | None = None
                  ) -> tuple[np.ndarray, int]:
    """The k entries ``index`` (strictly increasing) with their ``values`` (or those of the vector ``source``
    there, gathered straight into the frame) as the smaller of two payloads -> (uint32 words, dtype code):
    SPARSE32, k indices then k values (8 bytes an entry); or RUNS32, the r runs of consecutive indices (r, then
    r starts, then r lengths) then the k values. A first layer's entries come in rows of its width (16 floats
    for [262144, 16, 2]): as runs, 4.5 bytes an entry."""
    ops, k = host_ops(), index.size
    r = ops.count_runs(index)
    if 1 + 2 * r >= k:
        frame = np.empty(2 * k, dtype=np.uint32)
        frame[:k] = index
        code, at = SPARSE32, k
    else:
        frame = np.empty(1 + 2 * r + k, dtype=np.uint32)
        frame[0] = r
        ops.fill_runs(index, frame[1:1 + r], frame[1 + r:1 + 2 * r])
        code, at = RUNS32, 1 + 2 * r
    out = frame[at:].view(np.float32)
    if source is not None:
        ops.gather_entries(source, index, out)
    else:
        out[:] = values
    return frame, code


def sparse_parts(buf, n_expected: int, code: int = SPARSE32) -> tuple[np.ndarray, np.ndarray]:
    """A SPARSE32 or RUNS32 payload -> (indices, values float32; of SPARSE32 read-only views of ``buf``), or
    ProtocolError(BAD_PAYLOAD) naming what is wrong: its length, an index out of order or out of range."""
    if code == RUNS32:
        return _runs_parts(buf, n_expected)
    if len(buf) % 8 or len(buf) // 8 > n_expected // 2:
        raise ProtocolError(Reason.BAD_PAYLOAD, f"sparse payload of {len(buf)} bytes: it must hold k (index, value) "
                                                f"pairs of 8 bytes, at most {n_expected // 2} for {n_expected} values")
    k = len(buf) // 8
    words = np.frombuffer(buf, dtype="<u4")
    index, values = words[:k], words[k:].view("<f4")
    if k and (int(index[-1]) >= n_expected or (k > 1 and not (index[1:] > index[:-1]).all())):
        raise ProtocolError(Reason.BAD_PAYLOAD, f"sparse payload indices must increase strictly and stay below "
                                                f"{n_expected}; the last is {int(index[-1])}")
    return index, values


def _runs_parts(buf, n: int) -> tuple[np.ndarray, np.ndarray]:
    words = np.frombuffer(buf, dtype="<u4") if len(buf) % 4 == 0 else None
    if words is None or not words.size or 1 + 2 * int(words[0]) > words.size:
        raise ProtocolError(Reason.BAD_PAYLOAD, f"runs payload of {len(buf)} bytes: it must hold 4-byte words, "
                                                f"the run count r, r starts, r lengths, then the values")
    r = int(words[0])
    values = words[1 + 2 * r:].view("<f4")
    try:
        return host_ops().expand_runs(words, r, n, values.size), values
    except ValueError as exc:
        raise ProtocolError(Reason.BAD_PAYLOAD, f"runs payload: {exc}") from None


def read_array(header: Header, frame, n_expected: int, check_finite=True, accept=(FLOAT32,)) -> np.ndarray:
    """The payload frame of ``header`` as a read-only float32 view (zero-copy) of exactly ``n_expected`` values.

    ``accept``: the dtype codes this message may carry (float32 always; sparse and a 16-bit code where the
    job's spec allows them). A 16-bit or sparse payload is widened into a new float32 array: the server adds it
    in float32."""
    arr = read_push(header, frame, n_expected, check_finite, accept)
    return arr.toarray() if isinstance(arr, Entries) else arr


def read_push(header: Header, frame, n_expected: int, check_finite=True, accept=(FLOAT32,)):
    """:func:`read_array`, but a sparse payload comes back as :class:`Entries` (views of the frame), not made
    whole: what a sparse push can change is its index."""
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if header.dtype in SPARSE_CODES and header.dtype in accept:
        if header.n_values != n_expected:
            raise ProtocolError(Reason.BAD_PAYLOAD, f"sparse payload for n_values={header.n_values}, model needs "
                                                    f"{n_expected}")
        index, values = sparse_parts(buf, n_expected, header.dtype)
        if check_finite:
            _screened(values)                   # the zeros between them are finite
        return Entries(index, values, n_expected)
    dt = DTYPE_CODES.get(header.dtype) if header.dtype in accept else None
    if dt is None:
        names = {**{c: n for n, c in WIRE_DTYPES.items()}, SPARSE32: "sparse", RUNS32: "runs"}
        allowed = " or ".join(f"{names[c]} (code {c})" for c in accept)
        raise ProtocolError(Reason.BAD_PAYLOAD, f"payload dtype code {header.dtype} is not {allowed}")
    if header.n_values != n_expected or len(buf) != n_expected * dt.itemsize:
        raise ProtocolError(Reason.BAD_PAYLOAD,
                            f"payload has {len(buf)} bytes / n_values={header.n_values}, model needs "
                            f"{n_expected} {dt.name if header.dtype != BFLOAT16 else 'bfloat16'} values "
                            f"({n_expected * dt.itemsize} bytes)")
    arr = np.frombuffer(buf, dtype=dt)
    if header.dtype == BFLOAT16:
        arr = from_bfloat16(arr)
    elif header.dtype == FLOAT16:
        arr = arr.astype(np.float32)
    return _screened(arr) if check_finite else arr


def _screened(arr: np.ndarray) -> np.ndarray:
    """``arr``, or ProtocolError(NON_FINITE). One BLAS dot product a.a is a fast NaN/inf screen (NaN and inf
    propagate; ~2.5x faster than a pairwise sum); only if it is not finite do we look element-wise, so a square
    that merely overflowed does not reject finite data."""
    with np.errstate(over="ignore", invalid="ignore"):
        screen = float(np.dot(arr, arr))
    if not math.isfinite(screen) and not np.isfinite(arr).all():
        raise ProtocolError(Reason.NON_FINITE, "payload contains NaN or inf; the update was not applied")
    return arr


QUEUE_BYTES = 1 << 20      # what one connection's queue may hold, each way, before its sender waits or fails


def queue_depth(num_params: int) -> int:
    """Messages one connection may queue each way (ZeroMQ's SNDHWM / RCVHWM) for a model of ``num_params``
    float32 values: about ``QUEUE_BYTES`` of them, at least 8, at most 1,000. A reader tells the writer it may
    go on every half-depth messages read, a command between threads: at depth 8 that was one per two
    round trips, a wake-up of the I/O thread as dear as a small request's own work."""
    return int(min(1000, max(8, QUEUE_BYTES // (4 * max(1, int(num_params)) + HEADER.size))))


def max_message_bytes(num_params: int) -> int:
    """The largest frame a legitimate peer sends for a model of ``num_params`` float32 values (weights, or a
    JSON report), with room for CURVE's per-message overhead: the server's ZMQ_MAXMSGSIZE. A peer that
    announces more is disconnected before anything is buffered, keyless or not."""
    return max(4 * int(num_params), MAX_JSON_BYTES, HEADER.size) + 4096


def model_fingerprint(num_params: int, dtype="float32", layers=None, shard=None) -> int:
    """64-bit hash of (layer sizes, dtype, num_params, shard): a push for another model, or another shard's
    slice of it, is refused. ``shard``: (index, count) of a sharded server's slice, None for a whole vector."""
    info = {"layers": list(map(int, layers)) if layers is not None else None,
            "dtype": np.dtype(dtype).name, "num_params": int(num_params)}
    if shard is not None:
        info["shard"] = [int(shard[0]), int(shard[1])]
    desc = json.dumps(info, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(desc.encode(), digest_size=8).digest(), "little")


def check_metrics(h: Header) -> None:
    """Metrics in a push must be finite and sane; raise ProtocolError otherwise."""
    if not (math.isfinite(h.loss) and math.isfinite(h.accuracy)):
        raise ProtocolError(Reason.NON_FINITE, f"loss={h.loss!r} accuracy={h.accuracy!r} must be finite")
    if h.batch_size < 0 or not (0.0 <= h.accuracy <= 1.0):
        raise ProtocolError(Reason.BAD_FIELD, f"batch_size={h.batch_size} must be >= 0 and "
                                              f"accuracy={h.accuracy} in [0, 1]")
