"""The training loop one worker runs against the server, for every mode (DESIGN.md rules).

Local steps use the core trainer (any backend: numpy, numba, cupy with a device ordinal); the client
moves float32 host vectors. Exchange ``s`` (1, 2, ...) covers local steps ``(s-1)*tau+1 .. s*tau`` of a
deterministic batch sequence (seeded per worker), so a restarted worker (attempt + 1) skips exactly the
exchanges the server already applied for it and no mini-batch is applied twice.
"""
from __future__ import annotations

import time

import numpy as np

from .client import ParameterClient, StaleUpdate


def batch_stream(trainer, data, epochs):
    """(local step k = 1.., X_batch, y_batch) over ``epochs`` seeded passes."""
    k = 0
    for _ in range(epochs):
        for Xb, yb in trainer.batches(data):
            k += 1
            yield k, Xb, yb


def run_worker(cfg: dict, worker_id: int, X: np.ndarray, y: np.ndarray, *, layers, epochs=10, batch_size=64,
               backend="numpy", device=None, attempt=0, seed=0, timeout=10.0, on_step=None,
               step_delay=0.0, cpu_threads=None, start_together=False, client=None) -> dict:
    """Train on this shard (X (n, d0), y (n,)) against the server in ``cfg`` -> summary dict.

    cpu_threads: this worker's share of the machine's cores for BLAS/numba (None leaves the defaults);
    workers sharing a machine must not each spin up a thread per core.
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

    mode, tau = cfg["mode"], int(cfg["tau"])
    lr, alpha = float(cfg["learning_rate"]), float(cfg["alpha"])
    net = FeedForwardNetwork(layers, backend=backend, device=device)
    ops = net.ops
    local_opt = "nesterov" if mode == "eamsgd" else "sgd"
    trainer = MinibatchTrainer(net, batch_size=batch_size, learning_rate=lr, optimizer=local_opt,
                               momentum=cfg.get("momentum", 0.9), seed=seed * 1000 + worker_id)
    data = net.upload(X, y)
    t_ready = time.perf_counter()
    if client is None:
        client = ParameterClient(cfg, worker_id=worker_id, attempt=attempt, timeout=timeout)
    t0 = time.perf_counter()
    resume_after = client.step
    host = np.empty(net.num_params, dtype=np.float32)
    acc = ops.zeros((net.num_params,), net.dtype)
    stats = {"worker_id": worker_id, "attempt": attempt, "resumed_after": resume_after, "pushes": 0,
             "stale": 0, "duplicates": 0, "local_steps": 0, "samples": 0, "tau": tau, "epochs": int(epochs),
             # batches trainer.batches yields per pass: exchange s ends in epoch ceil(s * tau / steps_per_epoch)
             "steps_per_epoch": len(range(0, data.n_rows, batch_size))}
    try:
        if start_together:
            m = min(batch_size, data.n_rows)        # load/compile the kernels before lining up
            net.gradient_device(ops.zeros((net.num_params,), net.dtype), data.X[:m], data.y[:m], trainer.grad)
            client.barrier(0)
            t0 = time.perf_counter()
        version, wh = client.pull()
        w = ops.asarray(np.array(wh, copy=True))
        window = {"loss": 0.0, "correct": 0, "rows": 0, "steps": 0}

        def exchange(step):
            """Send window ``step``'s update (gradient sum, local weights or elastic difference); take new weights."""
            nonlocal version, w
            rows = window["rows"]
            metrics = dict(loss=window["loss"] / rows, accuracy=window["correct"] / rows, batch_size=rows)
            if mode in ("sync", "async"):
                try:
                    r = client.push(ops.to_host(acc, out=host), base_version=version, step=step,
                                    want_weights=cfg.get("ssp_slack") is None, **metrics)
                except StaleUpdate:
                    stats["stale"] += 1
                    r = None
                if r is not None and r.weights is not None:
                    version, wh = r.version, r.weights
                else:
                    version, wh = client.pull()
                w[...] = ops.asarray(wh)   # one copy out of the reply's read-only view
                acc[...] = 0
            elif mode == "easgd":
                r = client.push(ops.to_host(w, out=host), base_version=version, step=step, kind="local_weights",
                                **metrics)
                center = ops.asarray(r.weights)   # a view, used before the next request
                w -= net.dtype.type(alpha) * (w - center)         # x_i <- x_i - a (x_i - c_old)
                version = r.version
            else:                                                 # async-easgd, eamsgd
                version, ch = client.pull()
                center = ops.asarray(ch)
                e = net.dtype.type(alpha) * (w - center)
                w -= e
                client.push(ops.to_host(e, out=host), base_version=version, step=step, kind="elastic", **metrics)
            stats["pushes"] += 1
            stats["samples"] += rows
            window.update(loss=0.0, correct=0, rows=0, steps=0)

        k = 0
        for k, Xb, yb in batch_stream(trainer, data, epochs):
            if (k - 1) // tau < resume_after:
                continue                                   # this exchange was applied by an earlier attempt
            if on_step is not None:
                on_step(k)
            if step_delay:
                time.sleep(step_delay)
            if mode in ("sync", "async"):
                ls, c = net.gradient_device(w, Xb, yb, trainer.grad)
                acc += trainer.grad
                if mode == "async" and tau > 1:
                    trainer.optimizer.step(w, trainer.grad)   # DOWNPOUR: local progress inside the window
            else:
                ls, c = trainer.step(w, Xb, yb)               # local SGD / Nesterov step on x_i
            window["loss"] += ls
            window["correct"] += c
            window["rows"] += Xb.shape[0]
            window["steps"] += 1
            stats["local_steps"] += 1
            if window["steps"] == tau:
                exchange((k - 1) // tau + 1)
        if window["steps"]:
            exchange((k - 1) // tau + 1)                   # the last, shorter window: no batch goes unsent
        client.bye()
    finally:
        client.close()
    stats.update(seconds=time.perf_counter() - t0, start_wait_s=t0 - t_ready, last_step=client.step,
                 backend=net.backend_name)
    return stats
