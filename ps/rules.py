"""Update rules of the trainer modes (ps/README.md, "Modes"), as pure array functions and small state machines.

No sockets here: the mode objects of :mod:`ps.modes` call these on the server (NumPy) and in the workers
(NumPy or CuPy arrays: the worker halves use array operators only), and tests check them against
hand-computed references. All vectors are flat (P,); ``out`` may alias an input only where said.

* sync      -- :func:`weighted_mean` of the p gradients (weights = batch sizes), optimizer applied once.
* async     -- DOWNPOUR: each push applied on arrival; :func:`is_stale` rejects a push computed on a version
               more than ``staleness`` updates old (the worker gets STALE and must pull).
* easgd     -- :func:`easgd_exchange`: x_i <- x_i - a(x_i - c); c <- c + a * sum_i (x_i - c) (old values right).
* async-easgd / eamsgd -- worker: :func:`elastic_difference` e = a(x_i - c), x_i <- x_i - e; server c <- c + e.
* SSP       -- :class:`SSPClocks`: a read at clock c is served once every other live worker is at clock
               >= c - s (Ho et al. 2013: the read then sees every update from clocks <= c - s - 1).
"""
from __future__ import annotations

import numpy as np

from core.validation import check_int


def default_alpha(num_workers: int, beta: float = 0.9) -> float:
    """EASGD moving rate alpha = beta / p (the authors' choice, beta = 0.9)."""
    return beta / max(1, int(num_workers))


def weighted_mean(arrays, weights, out: np.ndarray) -> np.ndarray:
    """sum_i w_i a_i / sum_i w_i over p arrays (P,) -> out (P,); equal weights if all w_i are 0.

    With w_i = batch size and a_i the mean gradient of batch i this is the mean gradient of the
    concatenated batch: sync mode equals single-process SGD on it.
    """
    weights = [float(w) for w in weights]
    total = sum(weights)
    if total <= 0:
        weights, total = [1.0] * len(arrays), float(len(arrays))
    acc = np.zeros(out.shape, dtype=np.float64)
    for a, w in zip(arrays, weights):
        acc += (w / total) * a.astype(np.float64, copy=False)
    out[...] = acc
    return out


def weighted_mean_entries(parts, weights) -> tuple[np.ndarray, np.ndarray]:
    """:func:`weighted_mean` of p sparse vectors, ``parts`` = [(index (sorted, unique), values)], zero outside
    their indices -> (the union of the indices, the mean there, float32). The same float64 sums in the same
    order as the dense mean, so the same float32 result on every entry."""
    from core.backends import host_ops

    weights = [float(w) for w in weights]
    total = sum(weights)
    if total <= 0:
        weights, total = [1.0] * len(parts), float(len(parts))
    union = host_ops().union_sorted([index for index, _ in parts])
    acc = np.zeros(union.shape, dtype=np.float64)
    for (index, values), w in zip(parts, weights):
        acc[np.searchsorted(union, index)] += (w / total) * values.astype(np.float64, copy=False)
    return union, acc.astype(np.float32)


def staleness(base_version: int, current_version: int) -> int:
    """Number of updates applied since the weights a push was computed on."""
    return int(current_version) - int(base_version)


def is_stale(base_version: int, current_version: int, bound: int | None) -> bool:
    """True when a push exceeds the staleness bound (None = unbounded, plain DOWNPOUR)."""
    return bound is not None and staleness(base_version, current_version) > bound


def easgd_exchange(xs, center, alpha: float):
    """Synchronous elastic averaging step: -> (new local vectors, new center). Inputs untouched.

    x_i' = x_i - alpha (x_i - c);  c' = c + alpha sum_i (x_i - c). Conserves sum_i x_i + c exactly in exact
    arithmetic (each elastic force enters once with each sign).
    """
    diffs = [alpha * (x - center) for x in xs]
    new_xs = [x - d for x, d in zip(xs, diffs)]
    new_center = center + np.sum(diffs, axis=0)
    return new_xs, new_center.astype(center.dtype, copy=False)


def easgd_center_update(center: np.ndarray, xs, alpha: float, out: np.ndarray) -> np.ndarray:
    """Server half of :func:`easgd_exchange`: out = c + alpha sum_i (x_i - c); out must not alias center."""
    acc = np.zeros(center.shape, dtype=np.float64)
    for x in xs:
        acc += x
    acc -= len(xs) * center.astype(np.float64)
    acc *= alpha
    acc += center
    out[...] = acc
    return out


def elastic_difference(x_local, center, alpha: float):
    """Worker half of the elastic modes: e = alpha (x_i - c) (P,), in x_i's dtype and array kind. The worker
    then does x_i -= e (EASGD's x_i <- x_i - alpha (x_i - c)) and, in async-easgd and eamsgd, pushes e."""
    return x_local.dtype.type(alpha) * (x_local - center)


def apply_elastic(center: np.ndarray, e: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Server half of async EASGD: out = c + e (out may alias center)."""
    return np.add(center, e, out=out)


class SSPClocks:
    """Stale-synchronous-parallel read rule over ``num_workers`` clocks (clock = pushes applied so far).

    ``can_read(i, c)``: a read by worker i at clock c may be served iff every other live worker j has
    clock_j >= c - slack. Workers that said goodbye (``retire``) no longer hold anyone back.
    """

    def __init__(self, num_workers: int, slack: int):
        self.slack = check_int("SSP slack", slack, 0)
        self.clock = [0] * int(num_workers)
        self.retired = [False] * int(num_workers)

    def advance(self, worker: int, clock: int) -> None:
        self.clock[worker] = max(self.clock[worker], int(clock))

    def retire(self, worker: int) -> None:
        self.retired[worker] = True

    def laggards(self, worker: int, clock: int) -> list[int]:
        """Workers a read by ``worker`` at ``clock`` would still wait for."""
        need = int(clock) - self.slack
        return [j for j, c in enumerate(self.clock) if j != worker and not self.retired[j] and c < need]

    def can_read(self, worker: int, clock: int) -> bool:
        return not self.laggards(worker, clock)
