"""ffps on a Spark Connect session, run in a subprocess of its own (``python -m tests.connect_job OUT.json``).

``SparkSession.builder.remote("local[2]")`` starts a local Spark Connect server (a JVM driver with local[2]
executors) and hands back a Connect client: no SparkContext, no RDDs, no JVM handles in this process. A
process holds one kind of session, so this runs apart from the classic local[2] session the other Spark tests
share. Every step writes what it saw into the JSON report; tests/test_spark_connect.py asserts on it.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

CONFS = {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1", "spark.ui.enabled": "false",
         "spark.ui.showConsoleProgress": "false", "spark.sql.shuffle.partitions": "2",
         "spark.default.parallelism": "2", "spark.driver.memory": "2g",
         "spark.scheduler.barrier.maxConcurrentTasksCheck.interval": "1s",
         "spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures": "3",
         "spark.connect.grpc.binding.address": "127.0.0.1"}       # the local Connect server on loopback only


def connect_session():
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # A local Connect server listens on the fixed port 15002 unless SPARK_TESTING is set: then pyspark binds an
    # ephemeral port and its client asks the JVM which one (pyspark's own switch for parallel test runs,
    # SPARK-42272). This process exists only for this job.
    os.environ["SPARK_TESTING"] = "1"
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.remote("local[2]").appName("ffps-connect-tests")
    for k, v in CONFS.items():
        builder = builder.config(k, v)
    with warnings.catch_warnings():      # static confs are taken at server start, then refused as runtime confs
        warnings.simplefilter("ignore")
        return builder.getOrCreate()


def frames(spark):
    from pyspark.ml.linalg import Vectors

    from core.datasets import load_digits_split

    Xtr, Xte, ytr, yte = load_digits_split(seed=0)

    def frame(X, y):
        return spark.createDataFrame([(i, float(lab), Vectors.dense(row)) for i, (row, lab) in enumerate(zip(X, y))],
                                     ["id", "label", "features"])
    return frame(Xtr, ytr), frame(Xte, yte), Xte


def accuracy(frame) -> float:
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator

    return MulticlassClassificationEvaluator(metricName="accuracy").evaluate(frame)


def probabilities(frame):
    return np.array([r.probability.toArray() for r in frame.orderBy("id").select("probability").collect()])


def step(report, name):
    """Decorator: run one check, record its result (or its error) under ``name``."""
    def run(fn):
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - the test names the failed step and shows the error
            report[name] = {"error": f"{type(exc).__name__}: {exc}"[:3000], "trace": traceback.format_exc()[-3000:]}
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        return fn
    return run


def main(out_path: str) -> None:
    from spark import FeedForwardNetworkPSClassificationModel, FeedForwardNetworkPSClassifier
    from spark.session import is_connect

    report = {}
    t0 = time.perf_counter()
    spark = connect_session()
    report["start_seconds"] = round(time.perf_counter() - t0, 1)
    import pyspark

    report["pyspark"] = pyspark.__version__
    train, test, Xte = frames(spark)
    report["is_connect"] = is_connect(train)
    tmp = tempfile.mkdtemp(prefix="ffps-connect-")
    atexit.register(shutil.rmtree, tmp, True)          # this job runs in a process of its own
    state = {}

    def clf(**kw):
        base = dict(layers=[64, 32, 10], maxIter=20, blockSize=32, stepSize=0.1, seed=3, numWorkers=2,
                    mode="async", backend="numpy", tol=0.0)
        base.update(kw)
        return FeedForwardNetworkPSClassifier(**base)

    @step(report, "fit")
    def _():
        model = state["model"] = clf().fit(train)
        out = model.transform(test)
        first = out.orderBy("id").first()
        return {"accuracy": accuracy(out), "columns": out.columns, "attempts": model.trainingStats["attempts"],
                "shard_rows": [model.trainingStats["workers"][w]["rows"] for w in (0, 1)],
                "rows": model.trainingStats["rows"],
                "driver_side_agrees": bool(np.allclose(model.predictProbability(first.features).toArray(),
                                                       first.probability.toArray(), rtol=1e-5)),
                "epochs": model.summary.totalIterations, "stop_reason": model.summary.stopReason,
                "metadata": {c: out.schema[c].metadata for c in ("rawPrediction", "probability", "prediction")},
                "summary_accuracy": model.summary().accuracy, "evaluate_accuracy": model.evaluate(test).accuracy,
                "thresholded": sorted({r.prediction for r in model.copy().setThresholds([1.0] * 9 + [0.0])
                                       .transform(test).select("prediction").collect()})}

    @step(report, "save_load")
    def _():
        model, path = state["model"], os.path.join(tmp, "model")
        model.save(path)
        loaded = FeedForwardNetworkPSClassificationModel.load(path)
        try:
            model.save(path)
            again = "saved twice without overwrite"
        except Exception as exc:  # noqa: BLE001
            again = str(exc)[:500]
        model.write().overwrite().save(path)
        reloaded = FeedForwardNetworkPSClassificationModel.load(path)
        return {"same_weights": bool(np.array_equal(loaded.weights.toArray(), model.weights.toArray())),
                "same_uid": loaded.uid == model.uid, "layers": loaded.getLayers(),
                "same_predictions": bool(np.array_equal(probabilities(loaded.transform(test)),
                                                        probabilities(model.transform(test)))),
                "second_save_error": again,
                "overwritten_loads": bool(np.array_equal(reloaded.weights.toArray(), model.weights.toArray()))}

    @step(report, "pipeline")
    def _():
        from pyspark.ml import Pipeline, PipelineModel
        from pyspark.ml.feature import StandardScaler

        pipeline = Pipeline(stages=[StandardScaler(inputCol="features", outputCol="scaled"),
                                    clf(featuresCol="scaled", maxIter=10, stepSize=0.05)])
        fitted = pipeline.fit(train)
        path = os.path.join(tmp, "pipeline")
        fitted.save(path)
        loaded = PipelineModel.load(path)
        return {"last_stage": type(loaded.stages[-1]).__name__, "accuracy": accuracy(loaded.transform(test)),
                "same_predictions": bool(np.array_equal(probabilities(loaded.transform(test)),
                                                        probabilities(fitted.transform(test))))}

    @step(report, "cross_validator")
    def _():
        from pyspark.ml.evaluation import MulticlassClassificationEvaluator
        from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

        est = clf(maxIter=6)
        grid = ParamGridBuilder().addGrid(est.stepSize, [0.001, 0.1]).build()
        cv = CrossValidator(estimator=est, estimatorParamMaps=grid, numFolds=2, seed=0,
                            evaluator=MulticlassClassificationEvaluator(metricName="accuracy"))
        cv_model = cv.fit(train)
        return {"avg_metrics": list(cv_model.avgMetrics), "best_step_size": cv_model.bestModel.getStepSize(),
                "best_accuracy": accuracy(cv_model.bestModel.transform(test))}

    @step(report, "tol")
    def _():
        model = clf(maxIter=40, tol=0.2).fit(train)
        s = model.summary
        return {"stop_reason": s.stopReason, "message": s.stopMessage, "epochs": s.totalIterations,
                "convergence": model.trainingStats["server"]["convergence"]}

    @step(report, "sparse")
    def _():
        from core.datasets import load_digits_split
        from tests.spark_helpers import SPARSE_DIGITS_WIDTH, sparse_digit_vectors

        Xtr, _, ytr, _ = load_digits_split(seed=0)
        rows = spark.createDataFrame([(float(lab), v) for v, lab in zip(sparse_digit_vectors(Xtr), ytr)],
                                     ["label", "features"])
        model = clf(layers=[SPARSE_DIGITS_WIDTH, 32, 10], maxIter=3).fit(rows)
        return {"sparse_rows": [model.trainingStats["workers"][w]["sparse_rows"] for w in (0, 1)],
                "rows": model.trainingStats["rows"], "loss": model.summary.objectiveHistory,
                "train_accuracy": accuracy(model.transform(rows))}        # scored sparse by the UDF

    @step(report, "bad_data")
    def _():
        from pyspark.ml.linalg import Vectors

        bad = spark.createDataFrame([(0.0, Vectors.dense([1.0, 2.0])), (1.0, Vectors.dense([1.0, 2.0]))],
                                    ["label", "features"])
        try:
            clf(layers=[3, 3], numWorkers=1, maxIter=1).fit(bad)
            return {"error": None}
        except ValueError as exc:
            return {"error": str(exc)}

    spark.stop()
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.connect_job OUT.json")
    main(sys.argv[1])
