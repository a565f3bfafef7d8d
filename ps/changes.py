"""Which entries of the weights changed after a version: what a delta reply sends (``FLAG_DELTA_OK``).

A text model's first layer holds millions of weights, and a window's sparse gradient touches a few percent of
them. With plain SGD or adagrad (a zero gradient leaves an entry and its state as they are) or an elastic
difference, an update changes exactly the entries its push carried. The engine logs each update's entries (a
sparse push's indices) with the version it made; a client that holds version b gets the union of the entries
logged after b, with their current values, instead of the whole vector. An update that may change any entry
(a dense push, momentum or adam, synchronous EASGD's weights, a restore) clears the log: a client holding an
older version gets the whole vector again, as it does when its version is older than the log reaches back.

    log = ChangeLog(num_params, version)
    log.record(version, [index, ...])    # the entries an update changed; None: any entry may have
    log.since(b, version)                # -> the entries changed after b (sorted, unique), or None
"""
from __future__ import annotations

from collections import deque

import numpy as np

from core.backends import host_ops


class ChangeLog:
    """The index sets of the updates after ``floor``, newest last, at most ``num_params // 2`` indices and
    ``max_entries`` sets in all (older ones are dropped and ``floor`` moves up to them)."""

    def __init__(self, num_params: int, version: int = 0, max_entries: int = 4096):
        self.num_params = int(num_params)
        self.budget = self.num_params // 2      # more indices than this cost more on the wire than the vector
        self.max_entries = int(max_entries)
        self.entries: deque = deque()           # (version, sorted unique uint32 indices), versions not decreasing
        self.held = 0                           # indices in entries
        self.floor = int(version)               # every change after floor is in entries

    def record(self, version: int, touched) -> None:
        """The update that made ``version`` changed the entries in ``touched`` (index arrays, each strictly
        increasing), or any entry (None)."""
        if touched is None:
            self.entries.clear()
            self.held, self.floor = 0, int(version)
            return
        for index in touched:
            self.entries.append((int(version), np.array(index, dtype=np.uint32)))
            self.held += index.size
        while self.entries and (self.held > self.budget or len(self.entries) > self.max_entries):
            old, index = self.entries.popleft()
            self.held -= index.size
            self.floor = max(self.floor, old)

    def since(self, version: int, current: int) -> np.ndarray | None:
        """The entries changed after ``version`` up to ``current`` (sorted, unique uint32), or None when the log
        cannot tell (``version`` older than the log reaches back, or not one of this server's) or the union
        would not be smaller than the vector on the wire."""
        if not self.floor <= version <= current:
            return None
        parts, total = [], 0
        for v, index in reversed(self.entries):
            if v <= version:
                break
            parts.append(index)
            total += index.size
            if total > self.budget:
                return None
        if len(parts) > 1:             # a merge of the sorted sets: a sort of their 2M entries took 10 ms
            merged = host_ops().union_sorted(parts)
        else:
            merged = parts[0] if parts else np.empty(0, dtype=np.uint32)
        return merged if 8 * merged.size <= 2 * self.num_params else None     # at most half the float32 frame


class HeldWeights:
    """A client's copy of the weights of one server version, which a delta reply brings up to date: the last
    whole reply's frame (read-only, no copy), or, once a delta came, an array of its own (one copy)."""

    def __init__(self, num_params: int):
        self.num_params = int(num_params)
        self.version: int | None = None      # None: nothing held; the next reply is the whole vector
        self.weights: np.ndarray | None = None
        self._frame = None                   # keeps the frame behind a whole reply's view alive
        self._own: np.ndarray | None = None

    def whole(self, version: int, weights: np.ndarray, frame) -> np.ndarray:
        """A reply carried the whole vector of ``version`` (a view of ``frame``) -> the weights held."""
        self.version, self.weights, self._frame = int(version), weights, frame
        return weights

    def delta(self, version: int, index: np.ndarray, values: np.ndarray) -> np.ndarray:
        """A reply carried the entries changed after the version held -> the weights of ``version``."""
        if self.version is None:
            raise ValueError("a delta reply came, but this client holds no weights to apply it to")
        if self.weights is not self._own:
            if self._own is None:
                self._own = np.empty(self.num_params, dtype=np.float32)
            np.copyto(self._own, self.weights)
            self.weights, self._frame = self._own, None
        host_ops().scatter_entries(self._own, index, values)
        self.version = int(version)
        return self._own

    def forget(self) -> None:
        """Hold nothing: the next reply must be the whole vector."""
        self.version, self.weights, self._frame = None, None, None
