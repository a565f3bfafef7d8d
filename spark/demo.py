"""Digits on Spark local[*]: train ffps, evaluate, save, load, predict, beside MLlib's MLPC on the same split.

    python -m spark.demo [--master local[2]] [--backend numba] [--epochs 40] [--trainer easgd]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from core.cli import add_flag
from ps.modes import MODE_NAMES


def digits_frames(spark):
    """sklearn digits / 16, 70/30 stratified (random_state=0) -> cached (train, test) DataFrames."""
    from pyspark.ml.linalg import Vectors

    from core.datasets import load_digits_split

    Xtr, Xte, ytr, yte = load_digits_split(seed=0)

    def frame(X, y):
        df = spark.createDataFrame([(float(lab), Vectors.dense(row)) for row, lab in zip(X, y)],
                                   ["label", "features"]).repartition(2).cache()
        df.count()
        return df
    return frame(Xtr, ytr), frame(Xte, yte)


def evaluator():
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator

    return MulticlassClassificationEvaluator(metricName="accuracy")


def fit_mllib(train, test, max_iter=100):
    """MLlib MultilayerPerceptronClassifier l-bfgs [64, 100, 10] -> (fit seconds, test accuracy)."""
    from pyspark.ml.classification import MultilayerPerceptronClassifier

    mlp = MultilayerPerceptronClassifier(layers=[64, 100, 10], maxIter=max_iter, blockSize=128, seed=1,
                                         solver="l-bfgs")
    t0 = time.perf_counter()
    model = mlp.fit(train)
    return time.perf_counter() - t0, evaluator().evaluate(model.transform(test))


def fit_ffps(train, test, backend="numba", epochs=40, mode="async", step_size=0.1, workers=2, window=1):
    """ffps [64, 100, 10] -> (model, fit seconds, test accuracy)."""
    from spark import FeedForwardNetworkPSClassifier

    clf = FeedForwardNetworkPSClassifier(layers=[64, 100, 10], maxIter=epochs, blockSize=32, stepSize=step_size,
                                         seed=1, mode=mode, numWorkers=workers, backend=backend,
                                         communicationWindow=window)
    t0 = time.perf_counter()
    model = clf.fit(train)
    return model, time.perf_counter() - t0, evaluator().evaluate(model.transform(test))


def session(master):
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(master).appName("ffps-demo").config("spark.ui.enabled", "false")
             .config("spark.driver.host", "127.0.0.1").config("spark.sql.shuffle.partitions", "2")
             .config("spark.driver.memory", "4g").config("spark.ui.showConsoleProgress", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--master", default="local[*]")
    ap.add_argument("--backend", default="numba", choices=("auto", "numba", "numpy", "cupy"))
    ap.add_argument("--epochs", type=int, default=40)
    add_flag(ap, "--trainer", "--mode", choices=MODE_NAMES, default="async", help="parameter-server mode")
    add_flag(ap, "--learning-rate", "--lr", "--step-size", type=float, default=0.1, help="stepSize")
    add_flag(ap, "--window", "--tau", type=int, default=4, help="communicationWindow")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    spark = session(a.master)
    from spark import FeedForwardNetworkPSClassificationModel

    train, test = digits_frames(spark)
    print(f"digits: {train.count()} train / {test.count()} test rows on {spark.sparkContext.master}", flush=True)
    fit_ffps(train, test, a.backend, epochs=1, mode=a.trainer, workers=a.workers)      # warm-up: JIT, workers
    model, secs, acc = fit_ffps(train, test, a.backend, a.epochs, a.trainer, a.learning_rate, a.workers, a.window)
    print(f"ffps  {a.trainer} [64,100,10] {a.epochs} passes, {a.workers} workers: fit {secs:6.2f} s  "
          f"test accuracy {acc:.4f}", flush=True)
    m_secs, m_acc = fit_mllib(train, test)
    print(f"MLlib MLPC l-bfgs [64,100,10] maxIter 100:        fit {m_secs:6.2f} s  test accuracy {m_acc:.4f}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ffps-digits")
        model.save(path)
        loaded = FeedForwardNetworkPSClassificationModel.load(path)
        again = evaluator().evaluate(loaded.transform(test))
        print(f"saved to {path}, loaded back: test accuracy {again:.4f}")
        loaded.transform(test).select("label", "prediction", "probability").show(5, truncate=60)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
