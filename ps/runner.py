"""Spark-free runner: one server in this process, N worker processes (multiprocessing 'spawn').

    if __name__ == "__main__":      # workers are spawned: they import the script, which must not run again
        result = run(X, y, layers=[64, 100, 10], mode="async", workers=4, backend="numba", epochs=20)
        result.weights, result.history, result.stats

The settings are one :class:`ps.spec.TrainingSpec` (``spec=``, or its fields as keyword arguments), which the
server hands to every worker. Every wait has a timeout. A worker process that dies can be relaunched with
attempt + 1 (``max_restarts``); it resumes after the last step the server applied for it. CLI on digits::

    python -m ps.runner --trainer async --workers 4 --backend numba --epochs 20
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
import weakref
from dataclasses import dataclass, field

import numpy as np

from core.backends.threads import shared_threads
from core.validation import check_int

from .shards import auto_shards, make_server
from .spec import TrainingSpec

log = logging.getLogger("ps.runner")


class WorkerFailed(RuntimeError):
    """One or more workers failed and could not be restarted; the message carries their errors."""


def save_arrays(directory: str, name: str, *arrays) -> tuple[str, ...]:
    """Arrays for a spawned process, as .npy files in ``directory`` -> their paths (:func:`load_arrays`).

    Data goes to a child this way, not among its start-up arguments: multiprocessing writes those into a pipe
    from ``Process.start()``, and a child that dies before reading them all (an import that fails in it, a
    script without the ``__main__`` guard) leaves ``start()`` blocked for ever once they exceed the pipe's
    buffer (64 kB): the parent holds the pipe's read end itself until the write ends. Sparse rows
    (core.sparse.CsrRows) go as one .npz of their arrays."""
    from core.sparse import CsrRows

    paths = []
    for k, a in enumerate(arrays):
        sparse = isinstance(a, CsrRows)
        paths.append(os.path.join(directory, f"{name}-{k}.{'npz' if sparse else 'npy'}"))
        if sparse:
            np.savez(paths[-1], indptr=a.indptr, indices=a.indices, values=a.values, n_cols=a.n_cols)
        else:
            np.save(paths[-1], a)
    return tuple(paths)


def load_arrays(paths) -> tuple:
    from core.sparse import CsrRows

    def load(path):
        if not path.endswith(".npz"):
            return np.load(path)
        with np.load(path) as f:
            return CsrRows(f["indptr"], f["indices"], f["values"], int(f["n_cols"]))
    return tuple(load(path) for path in paths)


def _worker_main(out_q, cfg, worker_id, attempt, data, kw):
    from .worker import run_worker
    try:
        X, y = load_arrays(data)
        res = run_worker(cfg, worker_id, X, y, attempt=attempt, **kw)
        out_q.put(("ok", worker_id, attempt, res))
    except BaseException as exc:  # noqa: BLE001 - report every failure to the driver, then exit non-zero
        out_q.put(("error", worker_id, attempt, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1)


def shard_bounds(n: int, workers: int, equal: bool) -> list[tuple[int, int]]:
    """Row ranges [a, b) of each worker's shard; ``equal`` drops the remainder so each has n // workers rows."""
    if equal:
        per = n // workers
        return [(i * per, (i + 1) * per) for i in range(workers)]
    return [(i * n // workers, (i + 1) * n // workers) for i in range(workers)]


def shard(X, y, workers: int, equal: bool):
    """Contiguous shards of a shuffled copy, cut at :func:`shard_bounds` (sparse rows: compact copies)."""
    from core.sparse import CsrRows

    return [(X[a:b].copy() if isinstance(X, CsrRows) else np.ascontiguousarray(X[a:b]), np.ascontiguousarray(y[a:b]))
            for a, b in shard_bounds(X.shape[0], workers, equal)]


@dataclass
class RunResult:
    weights: np.ndarray
    history: list
    stats: dict
    workers: dict = field(default_factory=dict)
    seconds: float = 0.0
    samples: int = 0
    failed: dict = field(default_factory=dict)   # worker -> error lines (only with tolerate_failures)

    @property
    def samples_per_s(self) -> float:
        """Wall clock from launching the workers (process start-up included)."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_samples_per_s(self) -> float:
        """Training only: samples / the slowest worker's time from connecting to its last push."""
        t = max((r["seconds"] for r in self.workers.values()), default=0.0)
        return self.samples / t if t > 0 else 0.0


class Runner:
    """Start with ``start()``, wait with ``join(timeout)``; ``pids()`` lists live worker processes.

    ``spec``: the run's :class:`ps.spec.TrainingSpec`, or give its fields (``workers`` is ``num_workers``;
    the runner's defaults: numpy backend, 20 s barrier timeout). tolerate_failures: when at least one worker
    finished, failed workers are listed in ``RunResult.failed`` instead of raising WorkerFailed (async modes
    keep going without them). worker_options: extra keyword arguments for :func:`ps.worker.run_worker` (e.g.
    step_delay). start_together: first attempts wait for each other at the server's barrier 0 before training.
    devices: one CUDA ordinal per worker (cupy). shards: slices of the vector the server serves in parallel
    (:mod:`ps.shards`; default: :func:`ps.shards.auto_shards`). threads_per_worker: BLAS/numba threads of each
    worker process (default: the machine's cores shared out). The workers' shards are written once to a
    directory under the temporary directory (``TMPDIR``; :func:`save_arrays` says why) and removed when
    ``join`` returns, so the data needs that much room there for the run.
    """

    def __init__(self, X, y, layers=None, *, spec: TrainingSpec | None = None, workers=None, devices=None,
                 secure=True, max_restarts=0, progress=False, tolerate_failures=False, worker_options=None,
                 start_together=True, shards=None, threads_per_worker=None, **spec_fields):
        if spec is None:
            spec_fields.setdefault("backend", "numpy")
            spec_fields.setdefault("barrier_timeout", 20.0)
            spec = TrainingSpec(layers=layers, num_workers=2 if workers is None else workers, **spec_fields)
        elif layers is not None or workers is not None or spec_fields:
            raise TypeError("pass either spec= or its fields, not both")
        self.spec, self.n = spec, spec.num_workers
        self._check_threads(threads_per_worker)
        X, y = self._check_data(X, y, devices)
        self.max_restarts, self.tolerate_failures = int(max_restarts), bool(tolerate_failures)
        self.start_together = bool(start_together)
        w0 = spec.initial_weights()
        self.server = make_server(w0, spec=spec, shards=shards or auto_shards(w0.shape[0]), secure=secure,
                                  progress=progress)
        # each worker reads its shard from files (save_arrays says why), removed when the run ends
        self.data_dir = tempfile.mkdtemp(prefix="ffps-runner-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.data_dir, ignore_errors=True)
        shards = shard(X, y, self.n, equal=spec.rule.equal_shards)
        self.data = [save_arrays(self.data_dir, f"shard{i}", *xy) for i, xy in enumerate(shards)]
        self.shard_rows = [len(y_i) for _, y_i in shards]
        devices = devices if devices is not None else [None] * self.n
        # each worker process gets its share of the cores for BLAS/numba threads (oversubscribed BLAS
        # threads make small GEMMs wait whole scheduler slices)
        cpu_threads = threads_per_worker or shared_threads(self.n)
        self.kw = [dict(device=devices[i], cpu_threads=cpu_threads, **(worker_options or {}))
                   for i in range(self.n)]
        self.ctx = mp.get_context("spawn")
        self.q = self.ctx.Queue()
        self.procs: dict[int, mp.Process] = {}
        self.attempts = [0] * self.n
        self.results: dict[int, dict] = {}
        self.errors: dict[int, list] = {i: [] for i in range(self.n)}

    def _check_data(self, X, y, devices):
        """The data and devices, checked here in the parent, before the server or any worker starts (a worker
        found them after its peers had waited out the barrier, 20-30 s) -> (X float32, y int32)."""
        from core.sparse import check_sparse_features, is_sparse
        from core.validation import check_features, check_labels

        if self.spec.layers is None:
            raise ValueError("layers is not set: give the layer sizes, e.g. layers=[features, 100, classes]")
        X = (check_sparse_features if is_sparse(X) else check_features)(X, self.spec.layers[0], np.dtype(np.float32))
        y = check_labels(y, X.shape[0], self.spec.layers[-1])
        per = X.shape[0] // self.n if self.spec.rule.equal_shards else -(-X.shape[0] // self.n)
        if X.shape[0] < self.n or per == 0:
            raise ValueError(f"{X.shape[0]} rows cannot feed {self.n} workers: each needs at least one row; use "
                             f"fewer workers")
        if devices is not None and len(devices) != self.n:
            raise ValueError(f"devices lists {len(devices)} device(s) for {self.n} workers: give one per worker")
        return X, y

    def _check_threads(self, threads) -> None:
        """A bad threads_per_worker fails here, before the server or any shard file exists; more BLAS threads
        than the machine has cores is allowed, with a warning: two 2-thread workers on 2 cores trained 4.2k-26k
        samples/s against 95k with one thread each (bench/scale_bench.py, [784,256,256,10], 2-core VM): their
        steps took 8-59 ms instead of 1.1-1.5, each small GEMM waiting for a helper thread that the other
        process had descheduled. More worker processes than cores are allowed too, with a warning (64 workers
        on 2 cores took 33 s to reach a test accuracy of 0.26 on digits, an audit found, with no word)."""
        cores = os.cpu_count() or 1
        if self.n > cores:
            log.warning("%d worker processes on %d cores take turns on them: every worker's exchange waits while "
                        "its peers are descheduled; use at most %d workers on this machine", self.n, cores, cores)
        if threads is None:
            return
        check_int("threads_per_worker", threads)
        if threads > 1 and threads * self.n > cores:
            log.warning("%d workers x %d threads on %d cores: BLAS threads beyond the cores wait on each other "
                        "(a step can take 5-50x longer); use threads_per_worker <= %d", self.n, threads, cores,
                        shared_threads(self.n, cores))

    def _launch(self, i):
        # first attempts start together (spawn + imports + kernel load differ by up to a second); a
        # relaunched worker joins the others' run alone
        kw = dict(self.kw[i], start_together=self.attempts[i] == 0 and self.start_together)
        p = self.ctx.Process(target=_worker_main, name=f"ps-worker-{i}", daemon=True,
                             args=(self.q, self.cfg, i, self.attempts[i], self.data[i], kw))
        p.start()
        self.procs[i] = p

    def start(self) -> "Runner":
        self.server.start()
        self.cfg = self.server.client_config()
        self.t0 = time.perf_counter()
        for i in range(self.n):
            self._launch(i)
        return self

    def pids(self) -> dict[int, int]:
        return {i: p.pid for i, p in self.procs.items() if p.is_alive()}

    def join(self, timeout=600.0) -> RunResult:
        deadline = time.monotonic() + timeout
        try:
            while len(self.results) + sum(1 for i in range(self.n) if self._gave_up(i)) < self.n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers {sorted(set(range(self.n)) - set(self.results))} did not finish "
                                       f"within {timeout}s; server stats: {self.server.stats()}")
                self._collect(0.1)
                for i, p in list(self.procs.items()):
                    if i in self.results or p.is_alive():
                        continue
                    self._collect(0.5)                        # its last message may still be in the pipe
                    if i in self.results:
                        continue
                    if not self.errors[i] or self.errors[i][-1][0] != self.attempts[i]:
                        self.errors[i].append((self.attempts[i], f"process exited with code {p.exitcode}"))
                    if self.attempts[i] < self.max_restarts:
                        self.attempts[i] += 1
                        log.warning("worker %d died (exit %s); restarting as attempt %d", i, p.exitcode,
                                    self.attempts[i])
                        self._launch(i)
            seconds = time.perf_counter() - self.t0
        finally:
            for p in self.procs.values():
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
            self.server.stop()
            self._cleanup()
        failed = {i: e for i, e in self.errors.items() if i not in self.results}
        if failed and not (self.tolerate_failures and self.results):
            raise WorkerFailed("; ".join(f"worker {i}: " + " / ".join(f"attempt {a}: {m.splitlines()[0]}"
                                                                       for a, m in e) for i, e in failed.items()))
        return RunResult(self.server.weights(), self.server.history(), self.server.stats(), dict(self.results),
                         seconds, sum(r["samples"] for r in self.results.values()),
                         {i: [m.splitlines()[0] for _, m in e] for i, e in failed.items()})

    def _gave_up(self, i) -> bool:
        p = self.procs.get(i)
        return i not in self.results and p is not None and not p.is_alive() and \
            self.attempts[i] >= self.max_restarts and bool(self.errors[i])

    def _collect(self, wait):
        try:
            kind, i, attempt, payload = self.q.get(timeout=wait)
        except queue.Empty:
            return
        if kind == "ok":
            self.results[i] = payload
        else:
            self.errors[i].append((attempt, payload))


def run(X, y, layers=None, timeout=600.0, **kw) -> RunResult:
    """Train with a server and ``workers`` processes; see :class:`Runner` for the options."""
    return Runner(X, y, layers, **kw).start().join(timeout)


def main(argv=None) -> int:
    from core import FeedForwardNetwork
    from core.cli import add_training_flags
    from core.datasets import load_digits_split

    from .spec import add_spec_flags, spec_from_flags

    ap = argparse.ArgumentParser(description="Train the digits net with the ffps parameter server (no Spark).")
    add_training_flags(ap, layers=[64, 100, 10], epochs=20, backend_fallback="numpy")
    add_spec_flags(ap)
    ap.add_argument("--devices", default=None, help="comma-separated GPU ordinals, one per worker (cupy)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        spec = spec_from_flags(a, barrier_timeout=20.0)
        devices = [int(d) for d in a.devices.split(",")] if a.devices else None
        if devices is not None and len(devices) != spec.num_workers:
            raise ValueError(f"--devices lists {len(devices)} device(s) for --workers {spec.num_workers}: give one "
                             f"per worker")
    except ValueError as exc:
        ap.error(str(exc))
    Xtr, Xte, ytr, yte = load_digits_split()
    res = run(Xtr, ytr, spec=spec, devices=devices, secure=not a.insecure, progress=not a.no_progress)
    loss, acc = FeedForwardNetwork(list(spec.layers), backend="numpy").evaluate(res.weights, Xte, yte)
    print(f"mode={spec.mode} workers={spec.num_workers} backend={spec.backend}: test accuracy {acc:.4f} "
          f"(loss {loss:.4f}), {res.seconds:.2f}s, {res.samples_per_s:.0f} samples/s, "
          f"applied {res.stats['applied']}, rejected {res.stats['rejected_total']}; "
          f"{res.stats['convergence']['message'] or 'stopped'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
