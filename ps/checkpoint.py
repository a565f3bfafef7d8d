"""Atomic binary checkpoints of the server state: ``ckpt-<version>.npz`` holding arrays and JSON metadata.

Format: a NumPy ``.npz`` (no pickle: read with ``allow_pickle=False``) with the float32 arrays (``weights``,
``opt_<name>`` optimizer state) and ``__meta__``, the UTF-8 bytes of a JSON object (version, mode, optimizer
step, fingerprint, per-worker last step / attempt). Written to a temporary file in the same directory,
flushed and fsynced, then ``os.replace``d over the final name and the directory fsynced: a crash leaves
either the old checkpoint or the new one, never a torn file.

:class:`CheckpointWriter` does the writing on a thread of its own, so the server thread only copies the state
(the copy is what ``Engine.snapshot`` makes) instead of waiting on the disk: a 10M-parameter Adam state (three
40 MB arrays) took 470-500 ms to save on the 2-core VM, during which no worker was served.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import tempfile
import threading
import time

import numpy as np

from core.validation import check_int

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^ckpt-(\d{12})\.npz$")
META_KEY = "__meta__"


def save(directory: str, arrays: dict, meta: dict, keep: int = 3) -> str:
    """Write one checkpoint atomically -> its path. Keeps the newest ``keep`` checkpoints."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"ckpt-{int(meta['version']):012d}.npz")
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload[META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        try:
            os.unlink(old)
        except FileNotFoundError:   # pruned by another saver of the same directory
            pass
    return path


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint paths in ``directory``, oldest first (by version)."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if PATTERN.match(n))
    return [os.path.join(directory, n) for n in names]


def latest(directory: str) -> str | None:
    paths = list_checkpoints(directory)
    return paths[-1] if paths else None


def load(path: str) -> tuple[dict, dict]:
    """-> (arrays, metadata). Raises ValueError naming the file if it is not a valid checkpoint."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable ffps checkpoint (an .npz archive of arrays): {exc}") from exc
    if META_KEY not in arrays or "weights" not in arrays:
        raise ValueError(f"{path} lacks {META_KEY!r} or 'weights'; not an ffps checkpoint")
    meta = json.loads(arrays.pop(META_KEY).tobytes().decode())
    return arrays, meta


LOCK_NAME = ".lock"


class DirectoryLock:
    """An exclusive lock on ``directory/.lock`` (``flock``: the kernel drops it when its holder dies), held by
    the one server that checkpoints into the directory: a second server there would prune the first one's
    checkpoints and mix its own among them, and a resume would pick whichever version number is higher."""

    def __init__(self, directory: str):
        path = os.path.join(directory, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"checkpoint_dir {directory!r} is in use by another running parameter server "
                             f"(process {holder}); give each server a directory of its own") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # closing the descriptor drops the flock
            self._fd = None


def remove_partial_writes(directory: str) -> int:
    """Delete the temporary files of writes that never finished (a server killed mid-save) -> how many; only
    while holding the directory's lock, when no live writer can own one."""
    removed = 0
    for name in os.listdir(directory):
        if name.startswith(".ckpt-") and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _check_schedule(every, seconds) -> None:
    if every is not None:
        check_int("checkpoint_every", every)
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not math.isfinite(seconds) or seconds <= 0):
        raise ValueError(f"checkpoint_seconds must be a positive number of seconds, got {seconds!r}")


class CheckpointSchedule:
    """When a server checkpoints: every ``every`` updates and/or ``seconds`` while serving, and once more at
    stop (``on_stop``) if anything changed. The caller copies its state (``snapshot()`` under its own lock)
    and passes it to :meth:`submit` (serving: the writer thread saves it) or :meth:`save` (not serving).

    The directory is made and tried with a small write here, so a path that cannot be written fails when the
    server is built, not at the first checkpoint (logged) or at stop. While serving, the schedule holds the
    directory's :class:`DirectoryLock`."""

    def __init__(self, directory: str, every=None, seconds=None, on_stop: bool = True):
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"checkpoint_dir {directory!r} exists and is not a directory")
        _check_schedule(every, seconds)
        try:
            os.makedirs(directory, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ValueError(f"checkpoint_dir {directory!r} cannot be written: {exc}") from None
        self.directory, self.every, self.seconds, self.on_stop = directory, every, seconds, bool(on_stop)
        self.version, self._time = None, time.monotonic()     # version of the last snapshot taken
        self.writer = None
        self._lock = None
        self._final_stats = None

    def start(self, version: int) -> None:
        """Serving begins at ``version``: take the directory's lock (ValueError when another server holds it),
        clear partial writes of a killed predecessor, start the writer thread."""
        self._lock = DirectoryLock(self.directory)
        removed = remove_partial_writes(self.directory)
        if removed:
            log.info("removed %d unfinished checkpoint write(s) from %s", removed, self.directory)
        self.version, self._time = version, time.monotonic()
        self.writer = CheckpointWriter(self.directory)

    def due(self, version: int) -> bool:
        if version == self.version:
            return False
        return bool((self.every and version - self.version >= self.every)
                    or (self.seconds and time.monotonic() - self._time >= self.seconds))

    def _taken(self, meta) -> None:
        self.version, self._time = meta["version"], time.monotonic()

    def submit(self, arrays: dict, meta: dict) -> None:
        self.writer.submit(arrays, meta)
        self._taken(meta)

    def save(self, arrays: dict, meta: dict) -> str:
        path = save(self.directory, arrays, meta)
        self._taken(meta)
        return path

    def close(self, timeout: float) -> None:
        """Write what is pending and stop the writer; its counters stay in :meth:`stats`. Drops the lock, unless
        the writer is still writing after ``timeout`` (TimeoutError): then no other server may take the directory
        until it is done (or this process ends)."""
        if self.writer is not None:
            self.writer.close(timeout)
            self._final_stats, self.writer = self.writer.stats(), None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def stats(self):
        return self.writer.stats() if self.writer is not None else self._final_stats


class CheckpointNotWritten(RuntimeError):
    """A server stopped, but its last checkpoint could not be written (a full disk, a lost mount). Everything
    else is done: the server is stopped and its weights are readable, so a trainer can still hand back the
    model and say that a resume would start from an older checkpoint."""


class CheckpointWriter:
    """Saves submitted snapshots on a background thread, newest first in importance: at most one snapshot
    waits, and a newer one replaces it (counted as ``skipped``). A failed write is logged, counted and kept
    in ``last_error``; the caller decides whether it is fatal (:meth:`flush` raises it).

    ``save_fn(directory, arrays, meta, keep) -> path``: this module's :func:`save` when None.
    """

    IDLE_WAIT_S = 1.0     # an idle writer's wait is bounded too: it looks again at least this often

    def __init__(self, directory: str, keep: int = 3, save_fn=None):
        self.directory, self.keep = directory, int(keep)
        self._save = save_fn if save_fn is not None else save
        self._cond = threading.Condition()
        self._pending = None               # (arrays, meta) waiting for the thread
        self._busy = self._last_failed = False
        self._closed = False
        self.written = self.skipped = self.errors = 0
        self.last_path = self.last_error = None
        self._thread = threading.Thread(target=self._run, name="ps-checkpoint", daemon=True)
        self._thread.start()

    def submit(self, arrays: dict, meta: dict) -> None:
        """Queue a snapshot (the caller's copies: the writer reads them later) without waiting."""
        with self._cond:
            if self._closed:
                raise RuntimeError("checkpoint writer is closed")
            if self._pending is not None:
                self.skipped += 1
            self._pending = (arrays, meta)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait(self.IDLE_WAIT_S)   # woken by submit/close; the timeout only bounds the wait
                if self._pending is None:
                    return
                (arrays, meta), self._pending = self._pending, None
                self._busy = True
            path = error = None
            try:
                path = self._save(self.directory, arrays, meta, self.keep)
            except Exception as exc:  # noqa: BLE001 - a full disk must not kill the thread; flush() re-raises
                error = exc
                log.error("checkpoint of version %s to %s failed: %r", meta.get("version"), self.directory, exc)
            with self._cond:
                self._busy, self._last_failed = False, error is not None
                if error is None:
                    self.written, self.last_path = self.written + 1, path
                else:
                    self.errors, self.last_error = self.errors + 1, error
                self._cond.notify_all()

    def flush(self, timeout: float) -> str | None:
        """Wait until every submitted snapshot is written -> the newest path. Raises TimeoutError when the disk
        is slower than ``timeout``, and the last write's error when the last write failed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"checkpoint writer still busy after {timeout}s ({self.directory})")
                self._cond.wait(left)
            if self._last_failed:
                raise self.last_error
            return self.last_path

    def stats(self) -> dict:
        with self._cond:
            return {"written": self.written, "skipped": self.skipped, "errors": self.errors,
                    "last_path": self.last_path,
                    "last_error": None if self.last_error is None else repr(self.last_error)}

    def close(self, timeout: float = 30.0) -> None:
        """Write what is pending, then stop the thread (errors are left in stats; flush() first to see them)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"checkpoint writer did not finish within {timeout}s ({self.directory})")
