"""Spark test helpers: one shared local[2] session, digits DataFrames, and the local-cluster job.

The session is created once per test process (``get_spark``) and never stopped by a fixture: several
modules import the fixtures, and a SparkContext cannot be restarted cheaply. The local-cluster checks run in
a subprocess (``python -m tests.spark_helpers cluster-job OUT.json``) because a process holds one context.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import stat
import sys
import tempfile

import numpy as np
import pytest

pytest.importorskip("pyspark")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spark_conf(builder, master):
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    return (builder.master(master).appName("ffps-tests")
            .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
            .config("spark.default.parallelism", "2")
            .config("spark.scheduler.barrier.maxConcurrentTasksCheck.interval", "1s")
            .config("spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures", "3")
            .config("spark.task.maxFailures", "2").config("spark.driver.memory", "2g")
            .config("spark.python.worker.reuse", "true"))


@functools.lru_cache(maxsize=None)
def get_spark():
    from pyspark.sql import SparkSession

    spark = spark_conf(SparkSession.builder, "local[2]").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


@pytest.fixture(scope="session")
def spark():
    return get_spark()


def digits_frames(spark, Xtr, Xte, ytr, yte):
    from pyspark.ml.linalg import Vectors

    def frame(X, y):
        return spark.createDataFrame([(float(label), Vectors.dense(row)) for row, label in zip(X, y)],
                                     ["label", "features"]).cache()
    return frame(Xtr, ytr), frame(Xte, yte)


@pytest.fixture(scope="session")
def digits_df(spark, digits_split):
    """(train, test) DataFrames of sklearn digits: label double, features Vector (64), 70/30 stratified."""
    return digits_frames(spark, *digits_split)


def accuracy(frame) -> float:
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator

    return MulticlassClassificationEvaluator(metricName="accuracy").evaluate(frame)


def kill_python_worker(monkeypatch, worker: int, step: int) -> None:
    """Make worker ``worker``'s Python process exit (os._exit) at local step ``step`` of attempt 0 of the next
    fits, as if the executor's Python worker were killed: the hook goes in through make_train_function's
    on_step, and, defined in here, travels to the executors by value."""
    from spark import training

    real = training.make_train_function

    def with_fault(cfg, *, attempt, **kw):
        def on_step(w, k):
            if attempt == 0 and w == worker and k == step:
                os._exit(17)
        return real(cfg, attempt=attempt, on_step=on_step, **kw)
    monkeypatch.setattr(training, "make_train_function", with_fault)


# ---------------------------------------------------------------- local-cluster job (subprocess)
SPARSE_DIGITS_WIDTH = 64 * 16


def sparse_digit_vectors(X):
    """Digits (rows of 64 pixels in [0, 1]) one-hot encoded by intensity as SparseVectors of 1,024 features
    (pixel j at level k in 1..16 sets feature 16 j + k - 1): real data about 3 % stored, as text features are."""
    from pyspark.ml.linalg import Vectors

    levels = np.rint(np.asarray(X) * 16).astype(int)
    out = []
    for row in levels:
        pixels = np.flatnonzero(row)
        out.append(Vectors.sparse(SPARSE_DIGITS_WIDTH, (16 * pixels + row[pixels] - 1).tolist(),
                                  [1.0] * len(pixels)))
    return out


def vector_column(rows):
    """An Arrow column of Vectors as Spark's mapInArrow hands one over: struct (type int8: 0 sparse, 1 dense;
    size; indices; values float64). rows: a list of values (dense), ("sparse", size, indices, values), or None."""
    import pyarrow as pa

    kinds, sizes, indices, values = [], [], [], []
    for row in rows:
        sparse = isinstance(row, tuple)
        kinds.append(None if row is None else int(not sparse))
        sizes.append(row[1] if sparse else None)
        indices.append(list(row[2]) if sparse else None)
        values.append(None if row is None else [float(v) for v in (row[3] if sparse else row)])
    fields = [pa.array(kinds, pa.int8()), pa.array(sizes, pa.int32()), pa.array(indices, pa.list_(pa.int32())),
              pa.array(values, pa.list_(pa.float64()))]
    return pa.StructArray.from_arrays(fields, names=["type", "size", "indices", "values"],
                                      mask=pa.array([row is None for row in rows], pa.bool_()))


def vector_batch(rows, labels):
    """A training task's Arrow batch: (features Vector struct, label double)."""
    import pyarrow as pa

    return pa.RecordBatch.from_arrays([vector_column(rows), pa.array(labels, pa.float64())], names=["f", "label"])


def write_fake_gpu_script(directory: str, addresses) -> str:
    """A discovery script printing {"name": "gpu", "addresses": [...]} like docker/getGpusResources.sh."""
    path = os.path.join(directory, "fake_gpus.sh")
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\necho '" + json.dumps({"name": "gpu", "addresses": list(addresses)}) + "'\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def cluster_job(out_path: str) -> None:
    """Fit/transform/save/load on local-cluster[2,1,1024] with one fake GPU per executor -> JSON report.

    Executors see CUDA_VISIBLE_DEVICES=3,5 and the discovery script reports physical GPU "5", so the
    mapped CUDA ordinal must be 1 (not 5). The training stage asks for its GPU through a ResourceProfile.
    """
    from pyspark.sql import SparkSession

    from spark import FeedForwardNetworkPSClassificationModel, FeedForwardNetworkPSClassifier

    tmp = tempfile.mkdtemp(prefix="ffps-cluster-")
    atexit.register(shutil.rmtree, tmp, True)          # this job runs in a process of its own
    script = write_fake_gpu_script(tmp, ["5"])
    builder = spark_conf(SparkSession.builder, "local-cluster[2,1,1024]")
    spark = (builder.config("spark.worker.resource.gpu.amount", "1")
             .config("spark.worker.resource.gpu.discoveryScript", script)
             .config("spark.executor.resource.gpu.amount", "1")
             .config("spark.executor.resource.gpu.discoveryScript", script)
             .config("spark.executorEnv.CUDA_VISIBLE_DEVICES", "3,5")
             .config("spark.executorEnv.PYTHONPATH", REPO)
             .config("spark.executor.memory", "512m").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    from core.datasets import load_digits_split

    train, test = digits_frames(spark, *load_digits_split())
    clf = FeedForwardNetworkPSClassifier(layers=[64, 32, 10], maxIter=15, blockSize=32, stepSize=0.1, seed=3,
                                         numWorkers=2, mode="async", backend="numpy", useGpu=True)
    model = clf.fit(train)
    acc = accuracy(model.transform(test))
    path = os.path.join(tmp, "model")
    model.save(path)
    loaded = FeedForwardNetworkPSClassificationModel.load(path)
    same = np.array_equal(loaded.weights.toArray(), model.weights.toArray()) and loaded.getLayers() == [64, 32, 10] \
        and accuracy(loaded.transform(test)) == acc                     # the loaded model scores on the executors
    report = {"master": spark.sparkContext.master, "accuracy": acc, "same_after_load": bool(same),
              "workers": model.trainingStats["workers"], "attempts": model.trainingStats["attempts"],
              "warnings": model.trainingStats["warnings"]}
    app_id = spark.sparkContext.applicationId
    spark.stop()
    remove_work_dir(app_id)
    with open(out_path, "w") as f:
        json.dump(report, f)


def remove_work_dir(app_id: str) -> None:
    """The folder a local-cluster's workers kept for application ``app_id`` (its executors' logs and files), in
    the Spark home: the pip pyspark's package folder, where each test run left one behind."""
    from pyspark.find_spark_home import _find_spark_home

    shutil.rmtree(os.path.join(_find_spark_home(), "work", app_id), ignore_errors=True)


RESUME_FIT = dict(layers=[64, 100, 10], maxIter=12, blockSize=32, stepSize=0.3, seed=5, numWorkers=2, mode="sync",
                  backend="numpy", checkpointInterval=20)


def fit_slowly(checkpoint_dir: str) -> None:
    """The driver a resume test kills: RESUME_FIT on digits, checkpointing into ``checkpoint_dir``, each local
    step slowed by 5 ms so the test can kill it mid-fit."""
    import time

    from pyspark.sql import SparkSession

    from core.datasets import load_digits_split
    from spark import FeedForwardNetworkPSClassifier, training

    real = training.make_train_function

    def slow(cfg, **kw):
        def on_step(worker, k):
            time.sleep(0.005)
        return real(cfg, on_step=on_step, **kw)
    training.make_train_function = slow
    spark = spark_conf(SparkSession.builder, "local[2]").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    train, _ = digits_frames(spark, *load_digits_split())
    FeedForwardNetworkPSClassifier(checkpointDir=checkpoint_dir, **RESUME_FIT).fit(train)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "cluster-job":
        cluster_job(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "fit-slowly":
        fit_slowly(sys.argv[2])
    else:
        sys.exit("usage: python -m tests.spark_helpers cluster-job OUT.json | fit-slowly CHECKPOINT_DIR")
