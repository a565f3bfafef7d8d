"""Executor side of ``fit``: the function one barrier task runs, and the driver's run-with-retries loop.

Each barrier task reads its partition as Arrow batches into one contiguous float32 matrix, cuts it to the
common shard size where the mode needs one (sizes counted by the driver), takes its GPU from
``TaskContext.resources()`` and runs :func:`ps.worker.run_worker` against the driver's parameter server.
Only plain locals are captured, never an estimator: the closure is pickled to the executors.
"""
from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("spark.training")

RESULT_SCHEMA = "worker long, stats string"


def make_train_function(cfg: dict, layers: list, *, epochs: int, batch_size: int, backend: str, seed: int,
                        timeout: float, attempt: int, equal_shards: bool, shard_rows: list, fault=None):
    """-> ``train(batches)`` for ``mapInArrow``: Arrow batches of (features list<float>, label) -> one row.

    equal_shards: sync/easgd rounds need every worker to take the same number of steps, so all shards are
    cut to the smallest one. shard_rows: rows of each partition, counted by the driver's data check (no
    barrier ``allGather``: each costs about a second in Spark 3.5). fault: test-only (worker, local_step):
    that worker's Python process exits at that step on attempt 0, as if the executor's Python worker were
    killed.
    """
    width = int(layers[0])
    layers = [int(d) for d in layers]
    shard_rows = [int(n) for n in shard_rows]

    def train(batches):
        import os

        import pyarrow as pa
        from pyspark import BarrierTaskContext

        from core import resolve_backend_name
        from ps.worker import run_worker
        from spark.data import arrow_to_arrays
        from spark.gpu import task_gpu

        t_start = time.time()
        ctx = BarrierTaskContext.get()
        worker = ctx.partitionId()
        X, y = arrow_to_arrays(batches, width)
        t_read = time.time()
        if equal_shards:
            if len(y) != shard_rows[worker]:
                raise RuntimeError(f"partition {worker} has {len(y)} rows but the driver counted "
                                   f"{shard_rows[worker]}: the training data changed between check and training")
            n = min(shard_rows)
            X, y = X[:n], y[:n]
        address, ordinal = task_gpu(ctx.resources())
        name = resolve_backend_name(backend)
        device = ordinal if name == "cupy" else None
        on_step = None
        if fault is not None and attempt == 0 and int(fault[0]) == worker:
            kill_at = int(fault[1])

            def on_step(k):
                if k == kill_at:
                    os._exit(17)
        # the task's CPU share bounds BLAS/numba threads: executors run several tasks side by side
        stats = run_worker(cfg, worker, X, y, layers=layers, epochs=epochs, batch_size=batch_size, backend=name,
                           device=device, attempt=attempt, seed=seed, timeout=timeout, on_step=on_step,
                           cpu_threads=max(1, int(ctx.cpus())), start_together=True)
        stats.update(task_start=t_start, read_s=t_read - t_start, rows=int(len(y)), shard_rows=shard_rows,
                     gpu_address=address, cuda_ordinal=ordinal,
                     device=device, pid=os.getpid(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        yield pa.RecordBatch.from_arrays([pa.array([worker], pa.int64()), pa.array([json.dumps(stats)])],
                                         names=["worker", "stats"])

    return train


def _short(exc: BaseException) -> str:
    """First informative line of a (possibly Java) exception."""
    text = str(exc)
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("at ", "An error occurred while calling")):
            return line[:500]
    return type(exc).__name__


class UnsupportedBarrierChain(RuntimeError):
    """Spark refused the input's RDD chain (e.g. coalesce or limit without a shuffle) in a barrier stage."""


def run_barrier_stage(prep, make_fn, *, num_workers: int, max_retries: int, use_gpu: bool, server,
                      description: str = "ffps training"):
    """Run the training stage, relaunching it (attempt + 1) after a failure -> (worker results, attempts).

    A failed task aborts a barrier stage's job, so the retry is the driver's: the server keeps its state,
    new attempts re-register, resume after their last applied step, and fence off the old attempt's pushes.
    """
    from .gpu import with_gpu_profile

    sc = prep.sparkSession.sparkContext
    errors = []
    for attempt in range(max_retries + 1):
        rdd = prep.mapInArrow(make_fn(attempt), RESULT_SCHEMA).rdd.barrier().mapPartitions(lambda rows: rows)
        if use_gpu:
            rdd = with_gpu_profile(rdd, sc.master)
        sc.setJobDescription(f"{description} (attempt {attempt})")
        t0 = time.perf_counter()
        try:
            rows = rdd.collect()
        except Exception as exc:  # noqa: BLE001 - Py4JJavaError and friends: the stage failed
            if "BarrierJobUnsupportedRDDChainException" in str(exc):
                raise UnsupportedBarrierChain(_short(exc)) from None      # nothing ran: the caller reshuffles
            errors.append(f"attempt {attempt}: {_short(exc)}")
            if not server.running:
                raise RuntimeError(f"parameter server stopped during training: {server.stats().get('error')}; "
                                   + "; ".join(errors)) from exc
            log.warning("training stage failed after %.1fs (%s); %s", time.perf_counter() - t0, _short(exc),
                        "retrying" if attempt < max_retries else "giving up")
            continue
        finally:
            sc.setJobDescription(None)
        results = {int(r.worker): json.loads(r.stats) for r in rows}
        if sorted(results) != list(range(num_workers)):
            raise RuntimeError(f"expected results from workers 0..{num_workers - 1}, got {sorted(results)}")
        return results, attempt + 1
    raise RuntimeError(f"training failed in all {max_retries + 1} attempts of the barrier stage: "
                       + "; ".join(errors) + ". If the stage waited for slots, numWorkers may exceed the "
                       "cluster's free task slots (or GPUs).")
