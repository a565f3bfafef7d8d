"""Executor side of ``fit``: the function one barrier task runs, and the driver's run-with-retries loop.

Each barrier task reads its partition as Arrow batches into one float32 matrix (or sparse rows), exchanges a
report of it with the other tasks through the server (rows, data checks), cuts it to the common shard size
where the mode needs one, takes its GPU from ``TaskContext.resources()`` and runs
:func:`ps.worker.run_worker` against the driver's parameter server.
Only plain locals are captured, never an estimator: the closure is pickled to the executors.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import numpy as np

from .failures import (CRASHED, TrainingCancelled, TrainingFailed, cancel_reason, cancelled, from_reports,
                       from_spark_error, interrupted, root_cause, short_error)

log = logging.getLogger("spark.training")

RESULT_SCHEMA = "worker long, stats string"


DATA_BARRIER = -1     # the gather barrier where tasks exchange their partition reports (ps.worker uses 0)
UNREACHABLE = "FFPS_PS_UNREACHABLE"   # marks a task that could not reach the server: relaunching cannot help


def make_train_function(cfg: dict, *, attempt: int, features_col: str, label_col: str, on_step=None,
                        may_reshuffle: bool = False):
    """-> ``train(batches)`` for ``mapInArrow``: Arrow batches of (features list<float>, label) -> one row.

    ``cfg``: the server's client config; its training spec says the rest (layers, epochs, batch size,
    backend, seed, timeouts, mode). Each task reads its partition, registers with the server and exchanges a
    report of its data at the server's gather barrier (no Spark ``allGather``: each costs about a second in
    Spark 3.5); every task judges all reports alike (:func:`spark.data.data_problem`), so bad data stop every
    task before any update and the row returned carries the message (``data_error``) for the driver to raise.
    Round modes need every worker to take the same number of steps, so all shards are cut to the smallest.
    may_reshuffle: the partitions are the input's own (the driver did not shuffle them), so a cut that would
    leave rows unused, or partitions that hold different classes where each worker's steps move the model,
    stop the tasks and the driver shuffles (:func:`spark.data.uneven_partitions`, :func:`spark.data.label_split`);
    after the driver's round-robin shuffle a few rows per worker may differ, and the cut goes ahead. An empty
    partition stops the tasks either way.
    on_step(worker, local_step): optional, picklable; called before each local step of each task.
    """
    spec = cfg["spec"]
    layers = [int(d) for d in spec.layers]
    width = layers[0]

    def train(batches):
        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        worker, sessions = ctx.partitionId(), []
        try:
            yield from train_task(ctx, worker, batches, sessions.append)
        except Exception as exc:                     # say why on the driver, then fail the task as before
            from spark.failures import report_to_server

            if UNREACHABLE not in str(exc):          # a server it could not reach would cost one more timeout
                report_to_server(cfg, worker, attempt, sessions[-1] if sessions else None, exc, ctx)
            raise

    def train_task(ctx, worker, batches, keep_session):
        import os

        import pyarrow as pa

        from core import resolve_backend_name
        from ps.client import AuthenticationRefused, ServerUnavailable
        from ps.shards import connect
        from spark.data import (data_problem, label_counts, label_split, read_partition, rows_for_the_gpu,
                                uneven_partitions)

        t_start = time.time()
        X, y, report = read_partition(batches, width)
        mix = may_reshuffle and spec.rule.shards_must_mix           # whether label_split judges the partitions
        report["label_counts"] = label_counts(y, layers[-1]) if mix else None
        backend, declined = resolve_backend_name(spec.backend), None
        if backend == "cupy" and X is not None:     # sparse vectors stay sparse on the CPU; a GPU takes dense rows
            X, backend, report["gpu_dense_bytes"] = rows_for_the_gpu(X, spec.backend)
            if backend != "cupy":
                declined = (f"{X.shape[0]} sparse rows of {X.shape[1]} features would be "
                            f"{4 * X.shape[0] * X.shape[1] / 2**30:.1f} GiB dense for cupy: trained on {backend} by "
                            f"their sparse rows")
        t_read = time.time()
        try:
            client = connect(cfg, worker_id=worker, attempt=attempt, timeout=spec.worker_timeout)
        except AuthenticationRefused as exc:
            raise RuntimeError(f"{UNREACHABLE}: {exc}") from None
        except ServerUnavailable as exc:
            import socket

            raise RuntimeError(f"{UNREACHABLE}: the training task on executor host {socket.gethostname()!r} "
                               f"could not reach the parameter server at {cfg['address']} ({exc}). Executors must be "
                               f"able to connect to that address: set psHost to an address of the driver (or, on "
                               f"Spark Connect, of the client machine) that they can reach, and psPort to an open "
                               f"port") from None
        keep_session(client.session)
        try:
            reports = client.gather(DATA_BARRIER, report)
            stats = {"worker_id": worker, "attempt": attempt, "rows": report["rows"],
                     "partition_rows": [r["rows"] for r in reports]}
            problem = data_problem(reports, width, layers[-1], features_col, label_col)
            uneven = None if problem else uneven_partitions(stats["partition_rows"],
                                                              spec.rule.equal_shards and may_reshuffle)
            if uneven is None and problem is None and mix:
                uneven = label_split([r["label_counts"] for r in reports])
            # no BYE where nothing trains: the driver drops this server (a resumed one completed the restored,
            # half-summed epoch when every worker retired, and logged it as trained)
            if uneven is not None:
                stats["uneven"] = uneven               # the driver shuffles the rows and trains again
            elif problem is None:
                if spec.rule.equal_shards:
                    n = min(stats["partition_rows"])
                    X, y = X[:n], y[:n]
                stats.update(train_shard(ctx, worker, X, y, client, backend, declined))
            else:
                stats["data_error"] = problem
        finally:
            client.close()
        stats.update(task_start=t_start, read_s=t_read - t_start, pid=os.getpid(),
                     cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        yield pa.RecordBatch.from_arrays([pa.array([worker], pa.int64()), pa.array([json.dumps(stats)])],
                                         names=["worker", "stats"])

    def train_shard(ctx, worker, X, y, client, backend, declined):
        """``backend``: what this worker trains on; ``declined``: why not on its GPU (rows_for_the_gpu)."""
        from ps.worker import run_worker
        from spark.gpu import task_gpu

        address, ordinal = task_gpu(ctx.resources())
        device = ordinal if backend == "cupy" else None
        worker_cfg = cfg if declined is None else {**cfg, "spec": spec.replace(backend=backend)}
        step_hook = None if on_step is None else (lambda k: on_step(worker, k))
        # the task's CPU share bounds BLAS/numba threads: executors run several tasks side by side
        stats = run_worker(worker_cfg, worker, X, y.astype(np.int32), device=device, attempt=attempt,
                           on_step=step_hook, cpu_threads=max(1, int(ctx.cpus())), start_together=True, client=client)
        stats.update(rows=int(len(y)), gpu_address=address, cuda_ordinal=ordinal, device=device,
                     sparse_rows=not isinstance(X, np.ndarray), gpu_declined=declined)
        return stats

    return train


# Spark's refusals of the stage itself: every attempt fails the same way, so none is retried
NOT_RETRIED = {
    "BarrierJobRunWithDynamicAllocationException":
        "Spark runs no barrier stage (the training stage) with dynamic allocation on: set "
        "spark.dynamicAllocation.enabled=false for the application that trains",
    "No executor resource configs were specified for the following task configs: gpu":
        "the training stage asks for one GPU per task (useGpu, or backend='cupy') and no executor of this cluster "
        "has GPU resources: set spark.executor.resource.gpu.amount and its discovery script (spark/README.md), or "
        "train without useGpu",
}


SLOTS_CHECK_FAILED = "BarrierJobSlotsNumberCheckFailed"   # Spark gave up waiting for the stage's slots


def _too_few_slots(num_workers: int, use_gpu: bool) -> str:
    need = f"{num_workers} task slots" + (" with a GPU each" if use_gpu else "")
    return (f"training needs {need} at once (numWorkers={num_workers}, one barrier stage) and the cluster did "
            f"not offer them while Spark waited (spark.scheduler.barrier.maxConcurrentTasksCheck.interval x "
            f".maxFailures); lower numWorkers or add executors{' or GPUs' if use_gpu else ''}. Not retried: a "
            f"relaunch would wait the same way")


def _unreachable(exc: BaseException) -> str:
    """The task's own message about the unreachable server, out of the (Java or Connect) error text."""
    text = str(exc)
    start = text.index(UNREACHABLE) + len(UNREACHABLE) + 2
    return "training stopped: " + text[start:].split("\n", 1)[0].strip()


class UnsupportedBarrierChain(RuntimeError):
    """Spark refused the input's RDD chain (e.g. coalesce or limit without a shuffle) in a barrier stage."""


class UnevenPartitions(RuntimeError):
    """The partitions as they are would leave a worker without rows or rows unused
    (:func:`spark.data.uneven_partitions`), or hold different classes (:func:`spark.data.label_split`); nothing
    was trained. The caller shuffles them."""


def _maybe_the_input(exc, failure) -> bool:
    """Whether a failed attempt may be its input's own failure: nothing says why (the JVM failed computing the
    rows), a Python error outside ffps's code (a UDF before it), or ffps's read of the rows broke (Spark 4 cuts
    the Arrow stream). A crashed Python worker or an error in ffps's own code explains itself."""
    if CRASHED in str(exc):
        return False
    return failure is None or not failure.in_ffps() or "in read_partition" in failure.frame


def input_error(prep) -> str | None:
    """The root cause when the prepared input fails to compute (a stage before ffps: VectorAssembler on a null,
    a failing cast or UDF), else None: a plain job over every prepared column, after a failed first attempt
    that nothing else explains (the barrier stage's own error says only that a task failed). It must fail
    twice with the same cause: a local master gives a task one try, and a passing failure is retried as before."""
    from pyspark.sql import functions as F

    from .session import set_job_description

    causes = []
    try:
        before = set_job_description(prep.sparkSession, "ffps: computing the input after a failed training attempt")
    except Exception:  # noqa: BLE001 - a session stopped meanwhile: the failure at hand says more
        return None
    try:
        for _ in range(2):
            try:
                prep.select(F.sum(F.hash(*prep.columns))).collect()
                return None
            except Exception as exc:  # noqa: BLE001 - Py4JJavaError, Connect's SparkException, PythonException
                causes.append(root_cause(exc))
    finally:
        restore_job_description(prep.sparkSession, before)
    return causes[0] if causes[0] == causes[1] else None


def restore_job_description(spark, before: str | None) -> None:
    """Give the job description back in a ``finally``: on a SparkContext stopped meanwhile that fails, and its
    error ('NoneType' object has no attribute 'setJobDescription') would replace the one at hand."""
    from .session import set_job_description

    try:
        set_job_description(spark, before)
    except Exception:  # noqa: BLE001 - the failure at hand says more
        log.debug("ffps: restoring the job description failed", exc_info=True)


def collect_or_cancel(stage, spark, tag: str) -> list:
    """``stage.collect()`` under a job tag of its own. Whatever ends the call early (an error, Ctrl-C in the
    driver, a cancelled job) cancels the stage's jobs before it propagates: barrier tasks left running hold
    every task slot until their server is gone for 3 x workerTimeout, and the next fit waited for them (91 s)."""
    from .session import cancel_tagged, tag_jobs, untag_jobs

    tag_jobs(spark, tag)
    try:
        return stage.collect()
    except BaseException:
        try:
            cancel_tagged(spark, tag)
        except Exception:  # noqa: BLE001 - the original error says more; this one goes to the debug log
            log.debug("ffps: cancelling the training stage's jobs failed", exc_info=True)
        raise
    finally:
        try:
            untag_jobs(spark, tag)
        except Exception:  # noqa: BLE001 - as above
            log.debug("ffps: removing the training stage's job tag failed", exc_info=True)


class StallWatch:
    """While a training stage runs, asks the server every ``period`` seconds for stalled workers
    (:meth:`ps.engine.Engine.stalled`: in an asynchronous mode, registered but silent for longer than roundTimeout
    after a peer finished) and cancels the stage's jobs (``tag``) when there are: Spark would wait for a frozen
    task forever (a SIGSTOPped worker held an async fit for 143 s, until it was resumed), while a failed stage is
    relaunched. ``reason`` says why it cancelled (None: it did not). Where no task has reached the server after
    ``note_s`` seconds, it logs once that the stage may be waiting for task slots (a fit whose slots another job
    held waited 74 s without a word)."""

    NOTE_S = 30.0

    def __init__(self, server, spark, tag: str, num_workers: int = 1, period: float = 1.0, note_s: float | None = None):
        self.server, self.spark, self.tag, self.period = server, spark, tag, period
        self.num_workers, self.note_s = num_workers, self.NOTE_S if note_s is None else note_s
        self.reason = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ffps-stall-watch", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _watch(self) -> None:
        from .session import cancel_tagged

        t0, noted = time.perf_counter(), False
        while not self._stop.wait(self.period):
            if not noted and time.perf_counter() - t0 >= self.note_s:
                noted = True
                self._note_waiting(time.perf_counter() - t0)
            try:
                stalled = self.server.stalled()
            except Exception:  # noqa: BLE001 - a stopped server: the stage fails on its own
                return
            if not stalled:
                continue
            silent = ", ".join(f"worker {w} for {s:.0f}s" for w, s in stalled)
            self.reason = (f"{silent} sent the parameter server nothing, longer than roundTimeout, after a peer "
                           f"had finished: a frozen or lost task (or a window that takes longer than roundTimeout: "
                           f"raise it); the stage was cancelled")
            try:
                cancel_tagged(self.spark, self.tag)
            except Exception:  # noqa: BLE001 - the stage may have ended meanwhile
                log.debug("ffps: cancelling a stalled training stage failed", exc_info=True)
            return

    def _note_waiting(self, waited: float) -> None:
        try:
            reached = self.server.registered() > 0
        except Exception:  # noqa: BLE001 - a stopped server: the stage fails on its own
            return
        if not reached:
            log.warning("ffps: no training task has reached the parameter server after %.0fs: the barrier stage "
                        "starts its %d tasks only when %d task slots are free at once (another job may hold them), "
                        "or the tasks are still reading their partitions", waited, self.num_workers,
                        self.num_workers)


def run_barrier_stage(prep, make_fn, *, num_workers: int, max_retries: int, use_gpu: bool, server,
                      description: str = "ffps training", first_attempt: int = 0):
    """Run the training stage, relaunching it (attempt + 1) after a failure -> (worker results, attempts).

    A failed task aborts a barrier stage's job, so the retry is the driver's: the server keeps its state,
    new attempts re-register, resume after their last applied step, and fence off the old attempt's pushes.
    A failure that repeats on every attempt (see :mod:`spark.failures`) is raised at once, as TrainingFailed
    naming the task's Python exception. first_attempt: above the attempts a restored checkpoint recorded.
    """
    from .gpu import gpu_stage
    from .session import conf, master, set_job_description

    spark = prep.sparkSession
    errors, failure = [], None

    def said_next(how, reason):         # the attempt (and its start, t0) of the loop below
        log.warning("training stage %s after %.1fs (%s); %s", how, time.perf_counter() - t0, reason,
                    "retrying" if attempt < first_attempt + max_retries else "giving up")

    for attempt in range(first_attempt, first_attempt + max_retries + 1):
        if attempt > first_attempt:
            server.fence_below(attempt)        # a straggling task of the failed attempt can hold no barrier
        # mapInArrow's own barrier mode: no Python RDD stage after it (about 0.1 s less per fit than
        # .rdd.barrier().mapPartitions); .rdd only where a GPU ResourceProfile must be attached
        stage = gpu_stage(prep, make_fn(attempt), RESULT_SCHEMA, master(spark)) if use_gpu else \
            prep.mapInArrow(make_fn(attempt), RESULT_SCHEMA, barrier=True)
        before = set_job_description(spark, f"{description} (attempt {attempt})")
        t0 = time.perf_counter()
        tag = f"ffps-training-{uuid.uuid4().hex}"
        watch = StallWatch(server, spark, tag, num_workers)
        try:
            with watch:
                rows = collect_or_cancel(stage, spark, tag)
        except Exception as exc:  # noqa: BLE001 - Py4JJavaError and friends: the stage failed
            if watch.reason is not None:    # cancelled by the watch, not the user: relaunched like a failure
                errors.append(f"attempt {attempt}: {watch.reason}")
                said_next("stalled", watch.reason)
                continue
            if cancelled(exc):          # the user stopped it: a relaunch would train on, and return a model
                said = (f"training cancelled in attempt {attempt} after {time.perf_counter() - t0:.1f}s: "
                        f"{cancel_reason(exc)}")
                raise (KeyboardInterrupt(said) if interrupted(exc) else TrainingCancelled(said)) from exc
            if "BarrierJobUnsupportedRDDChainException" in str(exc):
                raise UnsupportedBarrierChain(short_error(exc)) from None      # nothing ran: the caller reshuffles
            if UNREACHABLE in str(exc):                                     # a relaunch would wait again
                raise TrainingFailed(_unreachable(exc), None, len(errors) + 1) from None
            if SLOTS_CHECK_FAILED in str(exc):                              # so would this one
                raise TrainingFailed(_too_few_slots(num_workers, use_gpu), None, len(errors) + 1) from None
            refused = [words for marker, words in NOT_RETRIED.items() if marker in str(exc)]
            if refused:
                raise TrainingFailed(f"{refused[0]}. Not retried: Spark refuses every attempt the same way",
                                     None, len(errors) + 1) from None
            failure = from_reports(server.stats().get("failures", []), attempt) or from_spark_error(exc)
            reason = failure.describe() if failure is not None else short_error(exc)
            errors.append(f"attempt {attempt}: {reason}")
            if not server.running:
                raise TrainingFailed(f"parameter server stopped during training: {server.stats().get('error')}; "
                                     + "; ".join(errors), failure, len(errors)) from exc
            if failure is not None and failure.deterministic:
                raise TrainingFailed(f"training failed: {reason}. Not retried: a {failure.type} fails every "
                                     f"attempt the same way", failure, len(errors)) from None
            broken = input_error(prep) if attempt == first_attempt and _maybe_the_input(exc, failure) else None
            if broken:                                                      # computed again, it failed again
                raise TrainingFailed(f"the input DataFrame fails before ffps reads it: {broken.rstrip('.')}. Not "
                                     f"retried: the stages before ffps fail every attempt the same way", None,
                                     len(errors)) from None
            said_next("failed", reason)
            continue
        finally:
            restore_job_description(spark, before)
        if not rows:                           # an empty frame can have no partitions, so no task ran
            raise ValueError("the training DataFrame has no rows")
        results = {int(r.worker): json.loads(r.stats) for r in rows}
        if sorted(results) != list(range(num_workers)):
            raise RuntimeError(f"expected results from workers 0..{num_workers - 1}, got {sorted(results)}")
        problems = [r["data_error"] for r in results.values() if "data_error" in r]
        if problems:
            raise ValueError(problems[0])      # every task judged the same reports: one message
        uneven = [r["uneven"] for r in results.values() if "uneven" in r]
        if uneven:
            raise UnevenPartitions(uneven[0])
        return results, attempt - first_attempt + 1
    tries = max_retries + 1
    said = (f"training failed in all {tries} attempts of the barrier stage: " if tries > 1 else
            "training failed in its one attempt of the barrier stage (maxRetries=0: not relaunched): ")
    try:
        cap = conf(spark, "spark.executor.pyspark.memory")
    except Exception:  # noqa: BLE001 - a session stopped meanwhile: the failure at hand says more
        cap = None
    hint = why_none_trained(cap, server.registered(), errors)
    raise TrainingFailed(said + "; ".join(errors) + hint, failure, tries)


def why_none_trained(cap: str | None, registered: bool, errors: list) -> str:
    """A hint for a stage whose every attempt failed: where the Python workers crashed under a cap on their
    memory (or raised MemoryError), the cap (libzmq aborted creating a thread under
    spark.executor.pyspark.memory=300m and 512m, numba's import raised MemoryError under 768m; 1g trained);
    where no task reached the server, the slots it may have waited for. cap: spark.executor.pyspark.memory;
    registered: whether any task reached the server."""
    starved = any(CRASHED in e or "MemoryError" in e for e in errors)
    if cap and starved:
        return (f". spark.executor.pyspark.memory={cap} caps each Python worker's address space, and a worker "
                f"that dies at once (or runs out of memory) is what a cap too small for a training task looks like "
                f"(its sockets' threads and numba's compiler need room): raise it (1g trained digits where 300m, "
                f"512m and 768m failed) or unset it")
    if registered or starved:
        return ""
    return (". No task reached the parameter server: if the stage waited for slots, numWorkers may exceed the "
            "cluster's free task slots (or GPUs)")
