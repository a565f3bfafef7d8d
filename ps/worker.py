"""The training loop one worker runs against the server, for every mode (DESIGN.md rules).

What differs between modes (the local step, the exchange) is the mode object's (:mod:`ps.modes`); every
setting comes from the server's training spec in ``cfg``. Local steps use the core trainer (any backend:
numpy, numba, cupy with a device ordinal); the client moves float32 host vectors. Exchange ``s`` (1, 2, ...)
covers local steps ``(s-1)*tau+1 .. s*tau`` of a deterministic batch sequence (seeded per worker), so a
restarted worker (attempt + 1) skips exactly the exchanges the server already applied for it and no
mini-batch is applied twice. Each push names the epoch it ends in; a reply with the server's stop decision
(``tol``) ends the loop after that exchange.
"""
from __future__ import annotations

import time

import numpy as np

from .convergence import exchange_epoch
from .shards import connect


def batch_stream(trainer, data, epochs):
    """(local step k = 1.., X_batch, y_batch) over ``epochs`` seeded passes."""
    k = 0
    for _ in range(epochs):
        for Xb, yb in trainer.batches(data):
            k += 1
            yield k, Xb, yb


class WorkerLoop:
    """One worker's state between the mode's hooks: ``w`` (its weights on the backend), ``acc`` (summed
    gradients of the window), ``version`` (of the weights last received), ``stats``."""

    def __init__(self, spec, net, trainer, client, stats):
        self.spec, self.net, self.ops, self.trainer, self.client, self.stats = (
            spec, net, net.ops, trainer, client, stats)
        self.host = np.empty(net.num_params, dtype=np.float32)
        self.acc = self.ops.zeros((net.num_params,), net.dtype)
        self.w = None
        self.version = 0
        self.window_batches = []        # copies of the window's batches, where the mode may recompute it

    def to_host(self, x) -> np.ndarray:
        """A device vector copied into the one host buffer the client sends from."""
        return self.ops.to_host(x, out=self.host)


def run_worker(cfg: dict, worker_id: int, X: np.ndarray, y: np.ndarray, *, device=None, attempt=0,
               on_step=None, step_delay=0.0, cpu_threads=None, start_together=False, client=None) -> dict:
    """Train on this shard (X (n, d0), y (n,)) against the server in ``cfg``, by its spec -> summary dict.

    device: CUDA ordinal (cupy). cpu_threads: this worker's share of the machine's cores for BLAS/numba (None
    leaves the defaults); workers sharing a machine must not each spin up a thread per core.
    start_together: wait at the server's barrier 0 until every worker is ready (data uploaded, kernels
    loaded) before the first pull, so no worker races through its shard while a peer is still starting;
    for launchers that start all workers at once (a Spark barrier stage), never for a lone restarted worker.
    on_step(local_step): optional hook; step_delay: seconds of sleep per local step (fault tests use it to
    keep training running long enough to kill a worker mid-way). client: a registered ParameterClient of
    this (worker_id, attempt) to use instead of opening one; run_worker closes it when training ends.
    """
    from core import FeedForwardNetwork, MinibatchTrainer, limit_cpu_threads  # the only ps module that trains

    if cpu_threads is not None:
        limit_cpu_threads(cpu_threads)
    spec = cfg["spec"]
    mode, tau = spec.rule, spec.tau
    net = FeedForwardNetwork(list(spec.layers), backend=spec.backend, device=device)
    trainer = MinibatchTrainer(net, batch_size=spec.batch_size, learning_rate=spec.learning_rate,
                               optimizer=mode.local_optimizer, momentum=spec.local_momentum,
                               seed=spec.seed * 1000 + worker_id)
    data = net.upload(X, y)
    t_ready = time.perf_counter()
    if client is None:
        client = connect(cfg, worker_id=worker_id, attempt=attempt, timeout=spec.worker_timeout)
    t0 = time.perf_counter()
    resume_after = client.step
    stats = {"worker_id": worker_id, "attempt": attempt, "resumed_after": resume_after, "pushes": 0,
             "stale": 0, "rejected_updates": 0, "duplicates": 0, "local_steps": 0, "samples": 0, "tau": tau, "epochs": spec.epochs,
             # batches trainer.batches yields per pass: exchange s ends in epoch ceil(s * tau / steps_per_epoch)
             "steps_per_epoch": len(range(0, data.n_rows, spec.batch_size))}
    loop = WorkerLoop(spec, net, trainer, client, stats)
    try:
        if start_together:
            m = min(spec.batch_size, data.n_rows)        # load/compile the kernels before lining up
            net.gradient_device(net.ops.zeros((net.num_params,), net.dtype), data.X[:m], data.y[:m], trainer.grad)
            client.barrier(0)
            t0 = time.perf_counter()
        loop.version, wh = client.pull()
        loop.w = net.ops.asarray(np.array(wh, copy=True))
        window = {"loss": 0.0, "correct": 0, "rows": 0, "steps": 0}

        keep = mode.keeps_window(spec)
        spe = stats["steps_per_epoch"]

        def exchange(step):
            rows = window["rows"]
            epoch, last = exchange_epoch(step, tau, spe, spec.epochs)
            mode.exchange(loop, step, dict(loss=window["loss"] / rows, accuracy=window["correct"] / rows,
                                           batch_size=rows, epoch=epoch, last_of_epoch=last))
            stats["pushes"] += 1
            stats["samples"] += rows
            window.update(loss=0.0, correct=0, rows=0, steps=0)
            loop.window_batches.clear()

        k = 0
        for k, Xb, yb in batch_stream(trainer, data, spec.epochs):
            if (k - 1) // tau < resume_after:
                continue                                   # this exchange was applied by an earlier attempt
            if on_step is not None:
                on_step(k)
            if step_delay:
                time.sleep(step_delay)
            if keep:                                       # views die with the next epoch's shuffle
                loop.window_batches.append((Xb.copy(), yb.copy()))
            ls, c = mode.local_step(loop, Xb, yb)
            window["loss"] += ls
            window["correct"] += c
            window["rows"] += Xb.shape[0]
            window["steps"] += 1
            stats["local_steps"] += 1
            if window["steps"] == tau:
                exchange((k - 1) // tau + 1)
                if client.stop_requested:              # the server decided (tol): end after this exchange
                    break
        if window["steps"] and not client.stop_requested:
            exchange((k - 1) // tau + 1)                   # the last, shorter window: no batch goes unsent
        client.bye()
    finally:
        client.close()
    stats.update(seconds=time.perf_counter() - t0, start_wait_s=t0 - t_ready, last_step=client.step,
                 backend=net.backend_name, stopped_by_server=client.stop_requested)
    return stats
