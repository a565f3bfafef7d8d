"""spark-submit application and the ``ffps`` console script.

    spark-submit spark/app.py --mode train    --dir MODEL DATA [--layers 4,100,3] [trainer flags] [--plot PNG]
    spark-submit spark/app.py --mode predict  --dir MODEL DATA [--output PREDICTIONS]
    spark-submit spark/app.py --mode evaluate --dir MODEL DATA
    ffps ...same flags...          (ffps train ... without --mode: the Spark-free digits demo of core.cli)

DATA: libsvm (``.txt``/``.libsvm``), Parquet or CSV (with a header): a label column plus either a Vector
features column or numeric feature columns, which are assembled. pyspark is imported only when a Spark mode
runs, so ``ffps train`` needs neither Spark nor Java.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time

if __name__ == "__main__" and not __package__:      # spark-submit spark/app.py: import the repo, not spark/
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from core.cli import add_training_flags, backend_of
from ps.spec import add_spec_flags
from spark.session import hadoop_path

FORMATS = ("auto", "libsvm", "parquet", "csv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffps", description="Train, apply or evaluate an ffps model with Spark.",
                                epilog="ffps train [--epochs N ...] (no --mode): the Spark-free digits demo, no Java "
                                       "needed")
    p.add_argument("--mode", required=True, choices=("train", "predict", "evaluate"))
    p.add_argument("--dir", required=True, help="model directory (any URI Spark can write)")
    p.add_argument("data", help="input data: libsvm, parquet or csv")
    p.add_argument("--format", choices=FORMATS, default="auto", help="data format (default: from the file name)")
    p.add_argument("--label-col", default="label")
    p.add_argument("--features-col", default="features")
    p.add_argument("--output", help="predict: write predictions here as Parquet (default: show a few rows)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what is already there: train, the model directory; predict, the --output")
    p.add_argument("--master", help="Spark master when not launched by spark-submit (default local[*])")
    t = p.add_argument_group("training (--mode train)")
    add_training_flags(t, layers=None)
    add_spec_flags(t, mode_alias=False)          # --mode is the job's here
    t.add_argument("--use-gpu", action="store_true", help="ask Spark for one GPU per training task")
    t.add_argument("--plot", metavar="PNG", help="write loss and accuracy curves here (needs matplotlib)")
    t.add_argument("--mlflow", action="store_true",
                   help="log the fit to MLflow (mlflowTracking=True; MLFLOW_TRACKING_URI picks the server)")
    s = p.add_argument_group("parameter server and recovery (--mode train)")
    s.add_argument("--ps-host", default="", help="address the parameter server binds and executors connect to "
                                                 "(psHost; default: the driver's spark.driver.host)")
    s.add_argument("--ps-port", type=int, default=0, help="its TCP port, e.g. one a firewall lets through (psPort; "
                                                          "default 0: any free port)")
    s.add_argument("--ps-shards", type=int, default=0, help="slices of the weights served in parallel (psShards; "
                                                            "default 0: auto)")
    s.add_argument("--checkpoint-dir", default="", help="driver-local directory for checkpoints (checkpointDir)")
    s.add_argument("--checkpoint-interval", type=int, default=None,
                   help="server updates between checkpoints in --checkpoint-dir (checkpointInterval, default 100)")
    s.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir (a fit whose driver died)")
    s.add_argument("--max-retries", type=int, default=2,
                   help="relaunches of the training stage after a failure (maxRetries; default %(default)s)")
    s.add_argument("--worker-timeout", type=float, default=30.0,
                   help="seconds a worker waits for one server reply (workerTimeout; default %(default)s)")
    p.add_argument("--json-out", metavar="PATH",
                   help="also write the result JSON to this local file (spark-submit merges the driver's stderr "
                        "into its stdout, so the last stdout line is the JSON, after any messages)")
    return p


def session(master=None):
    """The running SparkSession, or a new one (local[*] unless spark-submit / --master says otherwise)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder = SparkSession.builder.appName("ffps").config("spark.ui.showConsoleProgress", "false")  # ours draws
    if master:
        builder = builder.master(master)
    elif not os.environ.get("PYSPARK_GATEWAY_PORT") and "--master" not in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
        builder = builder.master("local[*]")
    spark = builder.getOrCreate()
    if not spark.sparkContext.getConf().contains("spark.log.level"):
        # Spark's INFO chatter (hundreds of lines a fit) buried ffps's epoch lines and errors; --conf
        # spark.log.level=INFO brings it back
        spark.sparkContext.setLogLevel("WARN")
    return spark


def _format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.rstrip("/").lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".txt", ".libsvm", ".svm")):
        return "libsvm"
    return "parquet"


def load_data(spark, path, fmt, label_col, features_col, num_features=None):
    """-> DataFrame with ``label_col`` (if present) and a Vector ``features_col``."""
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import NumericType

    fmt = _format(path, fmt)
    if fmt == "libsvm":
        reader = spark.read.format("libsvm")
        if num_features:
            reader = reader.option("numFeatures", str(num_features))
        df = _read(path, fmt, lambda: reader.load(path))
        if (label_col, features_col) != ("label", "features"):
            df = df.withColumnRenamed("label", label_col).withColumnRenamed("features", features_col)
        return df
    df = _read(path, fmt, lambda: spark.read.option("header", True).option("inferSchema", True).csv(path)
               if fmt == "csv" else spark.read.parquet(path))
    if features_col in df.columns and isinstance(df.schema[features_col].dataType, VectorUDT):
        return df
    inputs = [f.name for f in df.schema.fields if f.name != label_col and isinstance(f.dataType, NumericType)]
    other = [f for f in df.schema.fields if f.name != label_col and not isinstance(f.dataType, NumericType)]
    if other and inputs:          # every column besides the label is a feature: none is dropped unsaid
        raise ValueError(f"{path}: {not_numeric(df, other[0])}; every column besides {label_col!r} is a feature "
                         f"and must be numeric" + (f" (not numeric either: {[f.name for f in other[1:6]]}"
                                                   f"{' ...' if len(other) > 6 else ''})" if len(other) > 1 else ""))
    if not inputs:
        raise ValueError(f"{path}: no Vector column {features_col!r} and no numeric feature columns besides "
                         f"{label_col!r}; columns: {df.columns}")
    if num_features and len(inputs) != num_features:      # the schema says it: no job needed to refuse
        raise ValueError(f"{path}: {len(inputs)} numeric feature columns besides {label_col!r} but the model takes "
                         f"{num_features} features (columns: {inputs[:8]}{' ...' if len(inputs) > 8 else ''})")
    return VectorAssembler(inputCols=inputs, outputCol=features_col, handleInvalid="keep").transform(df)


def not_numeric(df, field) -> str:
    """What is wrong with a feature column that is not numeric: its type and its first value that is not a
    number (csv: one such cell makes the whole column text)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    said = f"column {field.name!r} is {field.dataType.simpleString()}, not numeric"
    if isinstance(field.dataType, StringType):
        quoted = "`" + field.name.replace("`", "``") + "`"
        column = F.col(quoted)        # try_cast: Spark 4's ANSI cast fails on the very value looked for
        row = df.filter(column.isNotNull() & F.expr(f"try_cast(trim({quoted}) AS DOUBLE)").isNull()).select(column) \
            .first()
        if row is not None:
            said += f": its value {row[0]!r} is not a number"
    return said


def _qualified(spark, path: str) -> str:
    """``path`` as Hadoop resolves it (scheme, authority, absolute), so two spellings of one place compare
    equal; the plain absolute path where there is no JVM at hand."""
    fs_path = hadoop_path(spark, path)
    return os.path.abspath(path) if fs_path is None else str(fs_path[0].makeQualified(fs_path[1]))


def _exists(spark, path: str) -> bool:
    fs_path = hadoop_path(spark, path)
    return os.path.exists(path) if fs_path is None else bool(fs_path[0].exists(fs_path[1]))


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_destination(spark, dest: str, flag: str, overwrite: bool, keep: dict) -> None:
    """Before anything runs: refuse to write ``dest`` where that would lose data. ``keep``: {what: path} that
    must survive (the input data, the model), whatever --overwrite says; an existing ``dest`` only with it."""
    target = _qualified(spark, dest)
    for what, path in keep.items():
        other = _qualified(spark, path)
        if _within(target, other) or _within(other, target):
            raise ValueError(f"{flag} {dest!r} would write over the {what} ({path!r}); choose another path")
    if not overwrite and _exists(spark, dest):
        raise ValueError(f"{flag} {dest!r} already exists; pass --overwrite to replace it (its contents are "
                         f"deleted) or choose another path")


def _read(path, fmt, read):
    """``read()``, with a missing or unreadable input as one ValueError naming the path (not a traceback)."""
    from spark.failures import root_cause

    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - AnalysisException (no such path, not that format), Py4J errors
        raise ValueError(f"cannot read {path!r} as {fmt}: {root_cause(exc)[:300]}") from None


def classifier(args, layers):
    """The estimator the training flags describe."""
    from spark import FeedForwardNetworkPSClassifier

    return FeedForwardNetworkPSClassifier(
        featuresCol=args.features_col, labelCol=args.label_col, layers=layers, maxIter=args.epochs,
        blockSize=args.batch_size, stepSize=args.learning_rate, mode=args.trainer, optimizer=args.server_optimizer,
        momentum=args.momentum, communicationWindow=args.window, numWorkers=args.workers, seed=args.seed,
        maxStaleness=-1 if args.staleness is None else args.staleness, backend=backend_of(args),
        useGpu=args.use_gpu, secure=not args.insecure, mlflowTracking=True if args.mlflow else None,
        tol=args.tol, precision=args.precision, cudaGraphs=args.cuda_graphs, pipelineExchange=args.pipeline,
        wireDtype=args.wire_dtype, psHost=args.ps_host, psPort=args.ps_port, psShards=args.ps_shards,
        checkpointDir=args.checkpoint_dir, resume=args.resume, maxRetries=args.max_retries,
        workerTimeout=args.worker_timeout,
        **({} if args.checkpoint_interval is None else {"checkpointInterval": args.checkpoint_interval}))


FLAG_OF_PARAM = {"maxIter": "--epochs", "blockSize": "--batch-size", "stepSize": "--learning-rate",
                 "numWorkers": "--workers", "communicationWindow": "--window", "maxStaleness": "--staleness",
                 "momentum": "--momentum", "tol": "--tol", "layers": "--layers", "psPort": "--ps-port",
                 "psShards": "--ps-shards", "checkpointInterval": "--checkpoint-interval",
                 "checkpointDir": "--checkpoint-dir",
                 "maxRetries": "--max-retries", "workerTimeout": "--worker-timeout"}
_PARAM_NAMES = re.compile(r"\b(" + "|".join(FLAG_OF_PARAM) + r")\b")


def check_training_flags(args) -> None:
    """Before Spark starts: the training flags checked as the fit checks its Params (the layers, when not
    given, come from the data later), errors naming the flag the user typed."""
    from spark.params import training_spec

    if args.checkpoint_interval is not None and not args.checkpoint_dir:
        raise ValueError(f"--checkpoint-interval {args.checkpoint_interval} needs --checkpoint-dir: without a "
                         f"directory no checkpoint is written")
    try:
        training_spec(classifier(args, args.layers or [1, 2]))
    except ValueError as exc:
        raise ValueError(_PARAM_NAMES.sub(lambda m: f"{FLAG_OF_PARAM[m[1]]} ({m[1]})", str(exc), count=1)) \
            from None


def train(spark, args) -> dict:
    from pyspark.sql import functions as F

    from spark.console import report_epochs
    from spark.data import check_schema
    from spark.estimator import check_task_slots

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install ffps[plot]")
    check_destination(spark, args.dir, "--dir", args.overwrite, {"input data": args.data})   # not after training
    check_task_slots(spark, args.workers)     # before the data is read and cached
    df = load_data(spark, args.data, args.format, args.label_col, args.features_col)
    try:
        check_schema(df.schema, args.features_col, args.label_col)  # a missing label: one line, no job
    except ValueError as exc:
        raise ValueError(str(exc).replace("labelCol", "--label-col", 1).replace("featuresCol", "--features-col", 1)) \
            from None
    df = df.cache()
    layers = args.layers
    first = df.select(args.features_col).first()      # one row: the width, before a training stage starts
    if layers is None:
        classes = int(df.agg(F.max(args.label_col)).first()[0]) + 1
        layers = [first[0].size, 100, max(classes, 2)]
    elif first is not None and first[0] is not None and first[0].size != layers[0]:
        raise ValueError(f"featuresCol {args.features_col!r} has vectors of size {first[0].size} but layers[0] is "
                         f"{layers[0]}; set --layers to start with the feature width")
    clf = classifier(args, layers)
    clf.liveServerLine = False                # report_epochs draws the one live line
    t0 = time.perf_counter()
    with report_epochs(sys.stderr):           # a line per epoch on stderr, a progress bar on a terminal
        model = clf.fit(df)
    seconds = time.perf_counter() - t0
    writer = model.write().overwrite() if args.overwrite else model.write()
    writer.save(args.dir)
    acc = _accuracy(model.transform(df), args.label_col)
    df.unpersist()
    extra = {"plot": model.summary.plot(args.plot)} if args.plot else {}
    return {"mode": "train", "layers": layers, "fit_seconds": round(seconds, 3), "train_accuracy": acc,
            "attempts": model.trainingStats["attempts"], "model": args.dir,
            "objective_history": [round(v, 5) for v in model.summary.objectiveHistory],
            "stop_reason": model.summary.stopReason, "stop_message": model.summary.stopMessage,
            "warnings": model.trainingStats.get("warnings", []), "hints": model.trainingStats.get("hints", []),
            **extra}


def _accuracy(frame, label_col) -> float:
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator

    return MulticlassClassificationEvaluator(labelCol=label_col, metricName="accuracy").evaluate(frame)


def _load(spark, args):
    from spark import FeedForwardNetworkPSClassificationModel

    model = FeedForwardNetworkPSClassificationModel.load(args.dir)
    model.setFeaturesCol(args.features_col)
    df = load_data(spark, args.data, args.format, args.label_col, args.features_col, num_features=model.numFeatures)
    return model, df


def predict(spark, args) -> dict:
    from pyspark.ml.functions import vector_to_array

    if args.output:
        check_destination(spark, args.output, "--output", args.overwrite,
                          {"input data": args.data, "model": args.dir})
    model, df = _load(spark, args)
    out = model.transform(df)
    keep = [c for c in (args.label_col,) if c in df.columns]
    result = out.select(*keep, "prediction", vector_to_array("probability").alias("probability"))
    if args.output:
        result.write.mode("overwrite" if args.overwrite else "errorifexists").parquet(args.output)
        return {"mode": "predict", "rows": result.count(), "output": args.output}
    result.show(10, truncate=80)
    return {"mode": "predict", "rows": result.count()}


def evaluate(spark, args) -> dict:
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator

    model, df = _load(spark, args)
    if args.label_col not in df.columns:
        raise ValueError(f"evaluate needs the label column {args.label_col!r}; columns: {df.columns}")
    out = model.transform(df).cache()
    metrics = {m: MulticlassClassificationEvaluator(labelCol=args.label_col, metricName=m).evaluate(out)
               for m in ("accuracy", "f1", "weightedPrecision", "weightedRecall", "logLoss")}
    return {"mode": "evaluate", "rows": out.count(), **metrics}


def run(args) -> dict:
    """The job the parsed flags name -> its result (what ``main`` prints)."""
    if args.mode == "train":
        check_training_flags(args)              # seconds before the JVM would have started
    if args.json_out:
        check_json_out(args.json_out)
    spark = session(args.master)
    return {"train": train, "predict": predict, "evaluate": evaluate}[args.mode](spark, args)


def check_json_out(path: str) -> None:
    """--json-out: a file that can be written, checked before anything runs (not after a fit)."""
    if os.path.isdir(path):
        raise ValueError(f"--json-out {path!r} is a directory; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--json-out {path!r}: its directory {folder!r} does not exist or cannot be written")


_TASK_INPUT_ERRORS = (re.compile(r"ValueError: (.+)"),        # ours, raised in a scoring task
                      re.compile(r"IllegalArgumentException: (?:requirement failed: )?(.+)"),   # Spark's readers
                      re.compile(r"NumberFormatException: (.{1,120})"))   # libsvm's reader on another format


def task_input_error(exc: BaseException) -> str | None:
    """The message of the bad-input error inside a failed Spark job's text (a ValueError a task raised, or a
    reader's IllegalArgumentException), or None when the job failed otherwise."""
    text = str(exc)
    for pattern in _TASK_INPUT_ERRORS:
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train" and "--mode" not in argv:
        from core.cli import main as core_main      # the Spark-free digits demo

        return core_main(argv)
    from spark.failures import TrainingCancelled, TrainingFailed

    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except ValueError as exc:
        print(f"ffps: error: {exc}", file=sys.stderr)
        return 2
    except (TrainingFailed, TrainingCancelled) as exc:
        print(f"ffps: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a Spark job failed: one line where the data was at fault
        message = task_input_error(exc)
        if message is None:
            raise
        if _format(args.data, args.format) == "libsvm" and "NumberFormatException" in str(exc):
            message += f" (read as libsvm{'' if args.format == 'libsvm' else ' from its name'}: --format csv or " \
                       f"parquet reads other files)"
        print(f"ffps: error: a Spark job failed on the input data: {message}", file=sys.stderr)
        return 2
    text = json.dumps(result)
    print(text)                                 # first: the result is never lost to the file's error
    if args.json_out:
        try:
            with open(args.json_out, "w") as f:
                f.write(text + "\n")
        except OSError as exc:
            print(f"ffps: error: the result is printed above, but --json-out could not be written: {exc}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
