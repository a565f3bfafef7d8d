"""Classic sessions and Spark Connect sessions: the one place that tells them apart.

A classic session (py4j) has a SparkContext on the driver, RDDs and JVM handles. A Spark Connect session
(``SparkSession.builder.remote(...)``, pyspark >= 4.0 with ``pyspark[connect]``) is a gRPC client: DataFrames
only, and this Python process is not the Spark driver. ffps needs, from either: the master and the driver's
host (to bind the parameter server), the partition count of the input, a way to ship the weights to
``transform`` and to read and write model metadata. Classic sessions keep their faster paths (a broadcast, the
partition count from the JVM); a Connect session gets DataFrame-only ones.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket

log = logging.getLogger("spark.session")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "ip6-localhost")


def session_of(obj):
    """The SparkSession of a DataFrame, or ``obj`` itself when it is a session."""
    return getattr(obj, "sparkSession", obj)


def is_connect(obj) -> bool:
    """True when ``obj`` (a DataFrame or a SparkSession) belongs to a Spark Connect session."""
    try:
        from pyspark.sql.connect.session import SparkSession as ConnectSession
    except Exception:  # noqa: BLE001 - pyspark without Connect (or its dependencies): nothing can be Connect
        return False
    return isinstance(session_of(obj), ConnectSession)


def require_connect_support(obj) -> None:
    """Spark Connect needs pyspark >= 4.0 (barrier ``mapInArrow``); else a ValueError saying so."""
    import pyspark

    if is_connect(obj) and int(pyspark.__version__.split(".")[0]) < 4:
        raise ValueError(f"ffps on Spark Connect needs pyspark >= 4.0 (barrier mapInArrow), this is pyspark "
                         f"{pyspark.__version__}; use a classic session or upgrade pyspark")


_LOCAL = re.compile(r"local(\[\s*(?P<n>\*|\d+)\s*(,\s*\d+\s*)?\])?")
_LOCAL_CLUSTER = re.compile(r"local-cluster\[\s*(?P<w>\d+)\s*,\s*(?P<c>\d+)\s*,\s*\d+\s*\]")


def local_task_slots(master: str, task_cpus=1) -> int | None:
    """Tasks a local master can run at once: its cores // spark.task.cpus (``local[*]``: this machine's cores);
    None for a cluster manager, whose executors come and go, or a master this does not parse."""
    cpus = max(1, int(task_cpus or 1))
    m = _LOCAL.fullmatch(master.strip())
    if m:
        n = m["n"] or "1"
        return (os.cpu_count() or 1 if n == "*" else int(n)) // cpus
    m = _LOCAL_CLUSTER.fullmatch(master.strip())
    if m:
        return int(m["w"]) * (int(m["c"]) // cpus)
    return None


def conf(spark, key: str, default=None):
    """A Spark conf value from either kind of session (Connect reads it from the server)."""
    if is_connect(spark):
        return spark.conf.get(key, default)
    return spark.sparkContext.getConf().get(key, default)


def hadoop_path(spark, path: str):
    """(Hadoop FileSystem, Path) of ``path`` through a classic session's JVM; None on Spark Connect (no JVM
    handle in this process)."""
    jvm = getattr(spark, "_jvm", None)
    if jvm is None:
        return None
    p = jvm.org.apache.hadoop.fs.Path(path)
    return p.getFileSystem(spark._jsc.hadoopConfiguration()), p


def master(spark) -> str:
    return spark.sparkContext.master if not is_connect(spark) else (conf(spark, "spark.master", "") or "")


def connect_server_host(spark) -> str | None:
    """The host of the Spark Connect server this session talks to (None for a classic session)."""
    if not is_connect(spark):
        return None
    return getattr(getattr(spark, "client", None), "host", None)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def num_partitions(dataset) -> int | None:
    """The input's partition count where it is cheap to know (classic: from the JVM, no job, no Python RDD);
    None on Spark Connect, which exposes no partitions without running a job."""
    if is_connect(dataset):
        return None
    return dataset._jdf.rdd().getNumPartitions()


def barrier_chain_problem(dataset, limit: int = 1000) -> str | None:
    """Classic sessions: why Spark would refuse the frame's own partitions in a barrier stage, or None (also on
    Connect, and past ``limit`` RDDs). Spark's rule (DAGScheduler's checkBarrierStageWithRDDChainPattern): every
    RDD of the stage, up to its shuffles, has the stage's partition count; a coalesce, a union or a limit breaks
    it. Known before the stage, the rows are shuffled up front: Spark's refusal logs a stack trace at WARN."""
    if is_connect(dataset):
        return None
    try:
        top = dataset._jdf.rdd()
        n = top.getNumPartitions()
        todo, seen = [top], {top.id()}
        while todo and len(seen) < limit:
            rdd = todo.pop()
            deps = rdd.dependencies().iterator()
            while deps.hasNext():
                dep = deps.next()
                if dep.getClass().getName() == "org.apache.spark.ShuffleDependency":     # the stage's edge
                    continue
                parent = dep.rdd()
                if parent.getNumPartitions() != n:
                    return (f"its {rdd.getClass().getSimpleName()} of {rdd.getNumPartitions()} partitions reads a "
                            f"{parent.getClass().getSimpleName()} of {parent.getNumPartitions()} in the same stage")
                if parent.id() not in seen:          # a shared parent (a self-union) is walked once
                    seen.add(parent.id())
                    todo.append(parent)
    except Exception:  # noqa: BLE001 - an RDD py4j cannot walk: Spark's own refusal still reshuffles
        log.debug("ffps: the input's RDDs could not be walked", exc_info=True)
    return None


def set_job_description(spark, text: str | None) -> str | None:
    """Label the next jobs in the Spark UI (classic sessions; Connect has no SparkContext to label them) -> the
    description it replaced, for the caller to give back (one of the caller's own, as under setJobGroup, was
    left unset after a fit)."""
    if is_connect(spark):
        return None
    sc = spark.sparkContext
    before = sc.getLocalProperty("spark.job.description")
    sc.setJobDescription(text)
    return before


def tag_jobs(spark, tag: str) -> None:
    """Tag the jobs this thread starts from now on (classic: a SparkContext job tag; Connect: an operation tag),
    so that :func:`cancel_tagged` stops exactly them, whatever job group the caller (CrossValidator, a user)
    set."""
    if is_connect(spark):
        spark.addTag(tag)
    else:
        spark.sparkContext.addJobTag(tag)


def untag_jobs(spark, tag: str) -> None:
    if is_connect(spark):
        spark.removeTag(tag)
    else:
        spark.sparkContext.removeJobTag(tag)


def cancel_tagged(spark, tag: str) -> None:
    """Cancel the running jobs tagged ``tag`` (classic) or interrupt its operations (Connect)."""
    if is_connect(spark):
        spark.interruptTag(tag)
    else:
        spark.sparkContext.cancelJobsWithTag(tag)
