"""A sharded parameter server: K servers, each owning a contiguous slice of the flat vector.

One server encrypts, decrypts and updates a whole vector on one core: a 10M-parameter CURVE round trip
cost ~4.6x the plain one. Split into K slices, each with its own ROUTER socket, ZeroMQ context (so its own I/O
thread does its crypto), serving thread and engine, the crypto and the update of a large vector spread over
K cores on the server and, through K connections, on the worker too. Every rule the server applies is
elementwise (SGD, momentum, Adagrad, Adam, the elastic rules, the weighted mean of a sync round), so K slices
updated apart give the weights one server gives.

Each shard is a whole :class:`ps.server.ParameterServer` over its slice, so everything the protocol promises
holds per shard: registration sessions, fencing, contiguous steps, duplicate answers, bad-input refusals
(each shard's fingerprint names its slice, so a slice sent to the wrong shard is refused), rounds, SSP waits,
rollbacks and checkpoints (into ``checkpoint_dir/shard-<k>``). A fixed port binds shard k to port + k. A
worker's :class:`ShardedClient` sends slice k to shard k and gathers the replies; a step a shard has taken is
not sent to it again (after a STALE refusal by another shard, only that shard gets the recomputed slice).

    server = make_server(w, spec=spec, shards=4)     # a ShardedServer, or a ParameterServer for shards=1
    client = connect(server.client_config(), worker_id=0)
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from core.backends import host_ops

from .client import ParameterClient, PushResult, check_pushed
from .protocol import Entries
from .server import ParameterServer

SHARD_MIN_PARAMS = 1 << 20      # below ~4 MB a second socket costs more than its crypto saves


def auto_shards(num_params: int, cores: int | None = None) -> int:
    """Shards for a vector of ``num_params`` on a driver of ``cores``: 1 below SHARD_MIN_PARAMS, else up to 4
    and half the cores (the other half serves the connections' I/O)."""
    cores = cores or os.cpu_count() or 1
    return 1 if num_params < SHARD_MIN_PARAMS else max(1, min(4, cores // 2))


def shard_bounds(num_params: int, shards: int) -> list[tuple[int, int]]:
    """[a, b) of each shard's slice: contiguous, sizes differing by at most one."""
    if not 1 <= shards <= num_params:
        raise ValueError(f"shards must be in 1..{num_params} (the parameter count), got {shards}")
    return [(k * num_params // shards, (k + 1) * num_params // shards) for k in range(shards)]


def make_server(w, *, spec, shards=1, checkpoint_dir=None, **kw):
    """A :class:`ParameterServer` for ``shards`` == 1, else a :class:`ShardedServer` (same interface)."""
    if int(shards) == 1:
        return ParameterServer(w, spec=spec, checkpoint_dir=checkpoint_dir, **kw)
    return ShardedServer(w, spec=spec, shards=shards, checkpoint_dir=checkpoint_dir, **kw)


def connect(cfg: dict, worker_id: int = 0, attempt: int = 0, timeout: float = 10.0, retries: int = 2,
            register: bool = True):
    """The client for ``cfg`` (a server's client_config()): a ShardedClient for a sharded server."""
    cls = ShardedClient if "shards" in cfg else ParameterClient
    return cls(cfg, worker_id=worker_id, attempt=attempt, timeout=timeout, retries=retries, register=register)


class ShardedServer:
    """K :class:`ParameterServer` shards over the slices of ``w`` (see the module docstring). Same interface as
    one server; ``stats()`` and ``history()`` are shard 0's (every push reaches every shard), with each
    shard's stats under ``stats()["shards"]``."""

    def __init__(self, w, *, spec, shards, checkpoint_dir=None, progress=None, on_epoch=None, **kw):
        w = np.asarray(w, dtype=np.float32)
        self.spec, self.bounds = spec, shard_bounds(w.shape[0], int(shards))
        count = len(self.bounds)
        if checkpoint_dir:
            present = sorted(n for n in os.listdir(checkpoint_dir) if n.startswith("shard-")) \
                if os.path.isdir(checkpoint_dir) else []
            if present and present != [f"shard-{k}" for k in range(count)]:
                raise ValueError(f"checkpoint_dir {checkpoint_dir!r} holds the checkpoints of {len(present)} "
                                 f"shards ({', '.join(present)}); this server has {count}")
        bind = kw.pop("bind", "tcp://127.0.0.1:0")
        head, port = bind.rsplit(":", 1)
        quiet = lambda figures: None    # noqa: E731 - every shard sees the same epochs: shard 0 reports them
        self.shards = [ParameterServer(w[a:b], spec=spec, shard=(k, count), progress=progress if k == 0 else False,
                                       on_epoch=on_epoch if k == 0 else quiet,
                                       bind=bind if port in ("0", "*") else f"{head}:{int(port) + k}",
                                       checkpoint_dir=os.path.join(checkpoint_dir, f"shard-{k}")
                                       if checkpoint_dir else None, **kw)
                       for k, (a, b) in enumerate(self.bounds)]

    # lifecycle
    def start(self) -> "ShardedServer":
        """Start every shard; when one fails (its port taken, say), the ones already started are stopped again
        (their sockets, threads and checkpoint locks released) before the error is raised."""
        started = []
        try:
            for s in self.shards:
                s.start()
                started.append(s)
        except BaseException:
            for s in started:
                try:
                    s.stop()
                except RuntimeError:          # the start's own error is the one to see
                    pass
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        errors = []
        for s in self.shards:
            try:
                s.stop(timeout)
            except RuntimeError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self):
        return self.start() if not self.running else self

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self) -> bool:
        return all(s.running for s in self.shards)

    # views
    @property
    def address(self):
        return self.shards[0].address

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def version(self) -> int:
        return self.shards[0].version

    @property
    def resumed_from(self):
        return self.shards[0].resumed_from

    def client_config(self) -> dict:
        """Shard 0's config (address, ids, keys, spec) plus every shard's under "shards" and their slices."""
        cfg = dict(self.shards[0].client_config())
        cfg.update(shards=[s.client_config() for s in self.shards], bounds=list(self.bounds),
                   num_params=self.bounds[-1][1])
        return cfg

    def weights(self) -> np.ndarray:
        return np.concatenate([s.weights() for s in self.shards])

    def stats(self) -> dict:
        per_shard = [s.stats() for s in self.shards]
        out = dict(per_shard[0])
        out["shards"] = per_shard
        return out

    def history(self) -> list:
        return self.shards[0].history()

    def fence_below(self, attempt: int) -> int:
        return sum(s.fence_below(attempt) for s in self.shards)

    def stalled(self) -> list:
        return self.shards[0].stalled()       # every request of a worker goes to every shard

    def registered(self) -> int:
        return self.shards[0].registered()

    def next_attempt(self) -> int:
        return max(s.next_attempt() for s in self.shards)

    def save_checkpoint(self, timeout: float = 60.0) -> list:
        return [s.save_checkpoint(timeout) for s in self.shards]

    def __repr__(self):
        return (f"ShardedServer(shards={len(self.shards)}, mode={self.mode!r}, address={self.address!r}, "
                f"secure={self.shards[0].secure})")


class ShardedClient:
    """A worker's client of a :class:`ShardedServer`: one :class:`ParameterClient` (socket, context, I/O
    thread) per shard, requests to the shards in flight together. Same interface as ParameterClient."""

    def __init__(self, cfg: dict, worker_id: int = 0, attempt: int = 0, timeout: float = 10.0, retries: int = 2,
                 register: bool = True):
        self.cfg, self.worker_id, self.attempt = cfg, int(worker_id), int(attempt)
        self.timeout, self.retries = float(timeout), int(retries)
        self.bounds, self.num_params, self.spec = cfg["bounds"], int(cfg["num_params"]), cfg["spec"]
        self.parts = [ParameterClient(c, worker_id=worker_id, attempt=attempt, timeout=timeout, retries=retries,
                                      register=False) for c in cfg["shards"]]
        self._pool = ThreadPoolExecutor(max_workers=len(self.parts) - 1, thread_name_prefix="ps-shard")
        self._weights = np.empty(self.num_params, dtype=np.float32)
        self._synced = [None] * len(self.parts)   # the version of shard k's weights _weights' slice k holds
        self._took_delta = [False] * len(self.parts)   # whether the last take into slice k applied a delta
        if register:
            try:
                self.hello()
            except BaseException:
                self.close()
                raise

    def _each(self, fn, parts=None):
        """fn(k, client) for every shard (or ``parts``: indices), at once -> results in shard order."""
        parts = list(range(len(self.parts))) if parts is None else list(parts)
        if not parts:
            return []
        futures = [self._pool.submit(fn, k, self.parts[k]) for k in parts[1:]]
        outcomes = []
        try:
            outcomes.append((True, fn(parts[0], self.parts[parts[0]])))
        except Exception as exc:  # noqa: BLE001 - re-raised below, once every shard's request has ended
            outcomes.append((False, exc))
        for f in futures:                  # never leave a shard's client busy in another thread
            exc = f.exception()
            outcomes.append((exc is None, f.result() if exc is None else exc))
        for ok, value in outcomes:
            if not ok:
                raise value
        return [value for _, value in outcomes]

    @property
    def step(self) -> int:
        """The last step every shard has taken: a resumed worker goes on after it (a shard that took more
        answers DUPLICATE for those, and nothing is applied twice)."""
        return min(p.step for p in self.parts)

    @property
    def version(self) -> int:
        return self.parts[0].version

    @property
    def stop_requested(self) -> bool:
        """A shard said the server decided to stop (tol); every shard sees the same pushes and decides alike."""
        return any(p.stop_requested for p in self.parts)

    @property
    def session(self) -> int:
        return self.parts[0].session

    @property
    def last_changed(self):
        """The entries the last weights returned changed, where every shard's slice took a delta, else None."""
        parts = [p.last_changed for p in self.parts]
        if any(c is None for c in parts) or not all(self._took_delta):
            return None
        return np.concatenate([c.astype(np.int64) + a for c, (a, _) in zip(parts, self.bounds)])

    @property
    def held_version(self) -> int | None:
        """Shard 0's held version where every shard's client holds its slice's weights, else None."""
        held = [p.held_version for p in self.parts]
        return None if any(v is None for v in held) else held[0]

    def hello(self) -> int:
        self._each(lambda k, p: p.hello())
        return self.step

    def pull(self, out=None, clock=None):
        """-> (shard 0's version, the whole vector): each shard's slice copied into one buffer (``out`` if
        given)."""
        buf = self._weights if out is None else out
        self._each(lambda k, p: self._take(k, p, p.pull(clock=clock)[1], buf))
        return self.version, buf

    def _take(self, k, part, w, buf) -> None:
        """Shard k's weights ``w`` into its slice of ``buf``: only the entries its delta reply changed where the
        slice holds the version that delta was made after."""
        a, b = self.bounds[k]
        own = buf is self._weights
        changed = part.last_changed
        delta = own and changed is not None and self._synced[k] == part.last_base
        if delta:
            host_ops().copy_entries(buf[a:b], w, changed)
        else:
            buf[a:b] = w
        self._took_delta[k] = delta
        if own:
            self._synced[k] = part.held_version

    def push(self, array, loss=0.0, accuracy=0.0, batch_size=0, *, base_version=None, step=None,
             kind="gradient", want_weights=False, out=None, epoch=0, last_of_epoch=False) -> PushResult:
        """Slice k to shard k, with that shard's own base version (``base_version`` is ignored: each shard
        judges staleness by the weights it last sent this client). Shards that already took ``step`` (it was
        refused as STALE elsewhere and is being pushed again) are not sent it again."""
        entries = isinstance(check_pushed(array, self.num_params), Entries)
        step = self.step + 1 if step is None else int(step)
        todo = [k for k, p in enumerate(self.parts) if p.step < step]
        part = array.slice if entries else lambda a, b: array[a:b]
        results = self._each(lambda k, p: p.push(part(*self.bounds[k]), loss, accuracy,
                                                 batch_size, step=step, kind=kind, want_weights=want_weights,
                                                 epoch=epoch, last_of_epoch=last_of_epoch), todo)
        weights = None
        if results and all(r.weights is not None for r in results) and len(results) == len(self.parts):
            weights = self._weights if out is None else out
            for k, r in zip(todo, results):
                self._take(k, self.parts[k], r.weights, weights)
        return PushResult(self.version, self.step, all(r.duplicate for r in results), weights)

    def barrier(self, step: int) -> int:
        return self.parts[0].barrier(step)

    def gather(self, step: int, report: dict) -> list:
        return self.parts[0].gather(step, report)

    def stats(self) -> dict:
        return self.parts[0].stats()

    def bye(self) -> None:
        self._each(lambda k, p: p.bye())

    def report_failure(self, report: dict) -> None:
        self.parts[0].report_failure(report)

    def close(self) -> None:
        for p in self.parts:
            p.close()
        self._pool.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
