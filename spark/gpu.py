"""GPU resources of Spark 3 tasks: from ``TaskContext.resources()`` to the CUDA ordinal the backend opens.

Spark's GPU addresses are what the discovery script printed: physical ordinals (or UUIDs) of the machine.
CUDA numbers devices relative to ``CUDA_VISIBLE_DEVICES`` when that is set, so address "5" with
``CUDA_VISIBLE_DEVICES=3,5`` is CUDA device 1. Getting this wrong puts two tasks on one GPU (the bug behind
TensorFlowOnSpark #280/#437 and Horovod #3737/#3801); :func:`cuda_ordinal` is the single mapping.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("spark.gpu")

# Cluster managers that accept a task-only ResourceProfile on the training stage (Spark >= 3.4 standalone,
# >= 3.5.1 YARN and Kubernetes). Plain local mode raises, so it is skipped there.
_STAGE_LEVEL_PREFIXES = ("spark://", "local-cluster", "yarn", "k8s://")


def cuda_ordinal(address: str, visible: str | None) -> int:
    """Spark GPU ``address`` -> CUDA device ordinal, given the process's CUDA_VISIBLE_DEVICES (or None).

    Unset CUDA_VISIBLE_DEVICES: the address is the ordinal. Set: the ordinal is the address's position in
    it. An address that is not visible is an error (the task would silently use some other GPU).
    """
    address = str(address).strip()
    if visible is None:
        try:
            return int(address)
        except ValueError:
            raise ValueError(f"GPU address {address!r} is not an ordinal and CUDA_VISIBLE_DEVICES is unset; "
                             f"set CUDA_VISIBLE_DEVICES or make the discovery script print ordinals") from None
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if address in entries:
        return entries.index(address)
    raise ValueError(f"Spark assigned GPU {address!r} to this task but CUDA_VISIBLE_DEVICES={visible!r} does not "
                     f"list it; fix the executor's discovery script or CUDA_VISIBLE_DEVICES")


def task_gpu(resources: dict) -> tuple[str | None, int | None]:
    """(Spark address, CUDA ordinal) of the task's first GPU, or (None, None) when it got none.

    ``resources``: ``TaskContext.get().resources()`` (name -> ResourceInformation with ``.addresses``).
    """
    info = resources.get("gpu") if resources else None
    if info is None or not info.addresses:
        return None, None
    address = info.addresses[0]
    return address, cuda_ordinal(address, os.environ.get("CUDA_VISIBLE_DEVICES"))


def supports_stage_level_scheduling(master: str) -> bool:
    return str(master).startswith(_STAGE_LEVEL_PREFIXES)


def gpu_profile(gpus_per_task: float = 1.0, cpus_per_task: int = 1):
    """A task-only ResourceProfile asking for GPUs (``.build`` is a property in PySpark)."""
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    reqs = TaskResourceRequests().cpus(cpus_per_task).resource("gpu", gpus_per_task)
    return ResourceProfileBuilder().require(reqs).build


def with_gpu_profile(rdd, master: str):
    """``rdd.withResources(gpu_profile())`` where the cluster manager supports it; else ``rdd`` as is.

    Elsewhere (plain local, or a refusal) the spark-submit confs of spark/README.md apply.
    """
    if not supports_stage_level_scheduling(master):
        log.info("master %s has no stage-level scheduling; GPUs come from spark.task.resource.gpu.amount", master)
        return rdd
    try:
        return rdd.withResources(gpu_profile())
    except Exception as exc:  # noqa: BLE001 - e.g. dynamic allocation rules; the global confs still apply
        from .failures import short_error

        log.warning("could not attach a GPU ResourceProfile to the training stage (%s); relying on "
                    "spark.task.resource.gpu.amount", short_error(exc))
        return rdd


def gpu_stage(prep, fn, schema: str, master: str):
    """The barrier training stage with one GPU per task. Classic sessions attach the ResourceProfile to the
    stage's RDD (``.rdd.withResources``), as before; Spark Connect has no RDDs and passes it to
    ``mapInArrow(..., profile=)`` (pyspark >= 4.0). Where stage-level scheduling is unsupported the global
    ``spark.task.resource.gpu.amount`` conf applies."""
    from .session import is_connect

    if not is_connect(prep):
        return with_gpu_profile(prep.mapInArrow(fn, schema, barrier=True).rdd, master)
    if not supports_stage_level_scheduling(master):
        log.info("master %s has no stage-level scheduling; GPUs come from spark.task.resource.gpu.amount", master)
        return prep.mapInArrow(fn, schema, barrier=True)
    return prep.mapInArrow(fn, schema, barrier=True, profile=gpu_profile())


def unused_gpu_warning(backend: str, workers: dict) -> str | None:
    """What to say when ``useGpu=True`` trained on the CPU, from the workers' stats (``backend``, ``gpu_address``
    each), or None when every task trained on cupy. ``backend`` is the estimator's setting.

    Three causes ask for three fixes: no task was given a GPU (Spark's resource confs), GPUs were given to a CPU
    backend the user chose (the backend), or 'auto' found no usable cupy beside the given GPUs (the install).
    A fourth is a choice, not a fault: 'auto' trained a partition of sparse rows too large to make dense on the
    CPU (``gpu_declined`` in the worker's stats)."""
    on_cpu = sorted({str(w.get("backend")) for w in workers.values()} - {"cupy"})
    if not on_cpu:
        return None
    declined = [f"worker {k}: {w['gpu_declined']}" for k, w in sorted(workers.items()) if w.get("gpu_declined")]
    if declined:
        return (f"GPU left unused where a partition was too sparse and large to make dense (cupy trains dense rows; "
                f"{'; '.join(declined)}): fewer features (HashingTF numFeatures) or more workers keep such rows "
                f"on the GPU")
    addresses = sorted({str(w["gpu_address"]) for w in workers.values() if w.get("gpu_address") is not None})
    ran = f"the training tasks trained on {', '.join(on_cpu)}"
    if not addresses:
        return (f"useGpu=True, but no GPU reached the training tasks ({ran}): a local master hands out none unless "
                f"spark.task.resource.gpu.amount is set; on a cluster set spark.executor.resource.gpu.amount and "
                f"its discoveryScript (spark/README.md)")
    given = f"GPU{'s' if len(addresses) > 1 else ''} {', '.join(addresses)}"
    if str(backend).lower() in ("numpy", "numba"):
        return (f"useGpu=True, but backend={backend!r} trains on the CPU: {given} given to the tasks sat idle; "
                f"set backend='auto' or 'cupy'")
    return (f"useGpu=True and the tasks were given {given}, but {ran}: cupy is not importable in the executors' "
            f"Python or sees no CUDA device there; install ffps[gpu] (cupy-cuda12x) on the executors")
