"""Model scoring by Arrow batches: one pandas UDF per batch computes logits, softmax and argmax.

The UDF captures plain locals only, never the model: the layer sizes and the flat float32 weights -- as bytes
inside the UDF itself for a model of at most EMBEDDED_MAX_BYTES, and on Spark Connect, which has no broadcasts
(the plan carries them to the server: a model must stay below the Connect server's message limit,
``spark.connect.grpc.maxInboundMessageSize``, 128 MiB by default); through one broadcast per model and session
for a larger model on a classic session. A broadcast's file stays in the driver's temp directory as long as
the session: 33 fits of digits models in one driver, each scored, left a 30 KB file each.
"""
import logging
from typing import Iterator

import numpy as np

log = logging.getLogger("spark.predict")

OUT_PREFIX = "__ffps_out"


def private_name(columns) -> str:
    """The scoring struct's column: a name none of ``columns`` (the input's and the outputs') holds, whatever
    the case (one of the user's would be written over and dropped)."""
    taken, k = {c.lower() for c in columns if c}, 0
    while f"{OUT_PREFIX}{k or ''}" in taken:
        k += 1
    return f"{OUT_PREFIX}{k or ''}"


LISTS_RESULT_TYPE = "struct<raw:array<double>,prob:array<double>,pred:double>"
# PySpark hands a pandas UDF's array<double> results to Arrow through a Python list per row (3.5: one call
# per element), half of transform's time on 1M rows of 2 classes; a double field per class goes to Arrow as
# the column it is, and the JVM builds the vectors from the 2C fields. Measured faster up to 256 classes.
PER_CLASS_MAX = 256


def result_type(classes):
    """The scoring UDF's struct: raw (centred logits), probabilities (a field per class: r0.., p0..; lists above
    PER_CLASS_MAX classes) and the prediction."""
    if classes > PER_CLASS_MAX:
        return LISTS_RESULT_TYPE
    fields = [f"r{i}:double" for i in range(classes)] + [f"p{i}:double" for i in range(classes)]
    return "struct<" + ",".join(fields + ["pred:double"]) + ">"


def result_frame(raw, prob, pred, per_class):
    """The UDF's batch of :func:`result_type`: raw, prob (m, C) float64, pred (m,) float64."""
    import pandas as pd

    if not per_class:
        return pd.DataFrame({"raw": list(raw), "prob": list(prob), "pred": pred})
    columns = {f"r{i}": raw[:, i] for i in range(raw.shape[1])}
    columns.update({f"p{i}": prob[:, i] for i in range(prob.shape[1])})
    columns["pred"] = pred
    return pd.DataFrame(columns)


def result_vector(column, key, classes):
    """The DenseVector column of ``key`` ("raw" or "prob") out of the UDF's struct ``column``."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    if classes > PER_CLASS_MAX:
        return array_to_vector(F.col(f"{column}.{key}"))
    return array_to_vector(F.array(*[F.col(f"{column}.{key[0]}{i}") for i in range(classes)]))


def logits_and_probabilities(net, w, X):
    """X (m, d0) float32 -> (rawPrediction: the logits less their row mean (m, C) float64, probabilities (m, C)
    float64).

    Softmax does not see the shift, so the probabilities are the logits'. Centred, a binary model's
    rawPrediction[1] is half the log-odds of class 1, the score BinaryClassificationEvaluator reads by default:
    raw logit[1] alone ranks rows by something else (a digits 3-vs-8 model: AUC 0.36 on the logits, 0.55 on
    the probability; MLlib's MLP has the same trap, 0.55 against 0.97)."""
    logits = np.array(net.forward_device(w, X)[-1], dtype=np.float64)   # copy out of the net's workspace
    raw = logits - logits.mean(axis=1, keepdims=True)
    e = np.exp(raw - raw.max(axis=1, keepdims=True))
    return raw, e / e.sum(axis=1, keepdims=True)


def predicted_classes(prob, thresholds=None):
    """prob (m, C) -> the predicted class per row: the argmax, or with ``thresholds`` the argmax of p / t (a
    threshold of 0 wins its class every row), MLlib's rule."""
    if thresholds is None:
        return prob.argmax(axis=1)
    t = np.asarray(thresholds, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(t == 0, np.inf, prob / np.where(t == 0, 1.0, t))
    return scaled.argmax(axis=1)


# below PySpark's 1 MiB threshold above which it broadcasts a UDF's pickled command itself
EMBEDDED_MAX_BYTES = 256 << 10


def weights_for_executors(dataset, weights):
    """The weights as the UDF will read them: little-endian float32 bytes (Connect, or at most
    EMBEDDED_MAX_BYTES), else a broadcast."""
    from .session import is_connect

    w = np.ascontiguousarray(weights, dtype="<f4")
    if is_connect(dataset) or w.nbytes <= EMBEDDED_MAX_BYTES:
        return w.tobytes()
    return dataset.sparkSession.sparkContext.broadcast(w)


def classic_context(dataset):
    """The running SparkContext of ``dataset``'s classic session (what a broadcast belongs to); None on Spark
    Connect."""
    from .session import is_connect

    if is_connect(dataset):
        return None
    sc = dataset.sparkSession.sparkContext
    return sc if sc._jsc is not None else None


COLUMNAR_INPUT = "spark.sql.execution.arrow.pythonUDF.columnarInput.enabled"


def keep_vector_frames_on_the_row_path(dataset) -> bool:
    """Spark 4.3 hands a pandas UDF over a columnar scan (Parquet) its input as columnar batches built from
    every column of the scan, and cannot build them for a Vector (UDT) column: any frame read from Parquet with
    a Vector in it failed with UNSUPPORTED_DATATYPE. For such a frame this turns that input path off in the
    session (COLUMNAR_INPUT: an optimisation for Arrow-backed sources) and says so once -> whether it did.
    Sessions without that path (Spark 3.5) are left alone."""
    from pyspark.sql.types import UserDefinedType

    if not any(isinstance(f.dataType, UserDefinedType) for f in dataset.schema.fields):
        return False
    spark = dataset.sparkSession
    try:
        current = spark.conf.get(COLUMNAR_INPUT)
    except Exception:  # noqa: BLE001 - no such conf in this Spark: nothing to turn off
        return False
    if str(current).strip().lower() != "true":
        return False
    spark.conf.set(COLUMNAR_INPUT, "false")
    log.info("ffps: set %s=false in this session: Spark %s's columnar input to pandas UDFs cannot carry Vector "
             "columns (UNSUPPORTED_DATATYPE on frames read from Parquet)", COLUMNAR_INPUT, spark.version)
    return True


def transform_frame(dataset, w_bc, layers, features_col, raw_col, prob_col, pred_col, thresholds=None):
    """dataset + the non-empty output columns (rawPrediction, probability: DenseVector; prediction: double),
    with the ML attributes MLlib's classifiers give them (vector sizes; prediction nominal over the classes).
    ``w_bc``: the weights as :func:`weights_for_executors` gives them."""
    import pandas as pd     # annotations below are evaluated here: pandas_udf reads them
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    from .data import VectorRows, reads_arrays, vector_arrays

    layers = [int(d) for d in layers]
    width = layers[0]
    keep_vector_frames_on_the_row_path(dataset)

    # the Vector column goes in as it is: a pandas UDF gets it as Spark stores it (type, size, indices, values),
    # so sparse rows are scored sparse (vector_to_array made every HashingTF row 1 MiB of float32 in the JVM);
    # narrow vectors on Spark 4 go as vector_to_array's arrays, which it hands over ~8x faster (reads_arrays)
    arrays = reads_arrays(dataset.sparkSession, width)

    classes = layers[-1]
    per_class = classes <= PER_CLASS_MAX       # decided here: the executors' module may not see a change of it

    def scored(batches, add):
        from core import FeedForwardNetwork

        net = FeedForwardNetwork(layers, backend="numpy")
        w = w_bc.value if hasattr(w_bc, "value") else np.frombuffer(w_bc, dtype="<f4")
        for batch in batches:
            if len(batch) == 0:
                yield result_frame(np.empty((0, classes)), np.empty((0, classes)), np.empty(0), per_class)
                continue
            rows = VectorRows(width)
            add(rows, batch)
            among = f"in a batch of {len(batch)} row{'s' * (len(batch) > 1)}"     # other batches may hold more
            if rows.nulls:
                raise ValueError(f"featuresCol {features_col!r} has null vectors ({rows.nulls} {among}); drop or "
                                 f"impute them before transform")
            if rows.min_width != width or rows.max_width != width:
                bad = rows.max_width if rows.max_width != width else rows.min_width
                raise ValueError(f"feature vectors have width {bad} but the model expects {width}")
            if rows.bad:                     # else argmax would name a class for a row of NaN logits
                raise ValueError(f"featuresCol {features_col!r} has rows with NaN or infinite values ({rows.bad} "
                                 f"{among}, after conversion to float32); clean or impute them before transform")
            raw, prob = logits_and_probabilities(net, w, rows.matrix(len(batch), sparse_ok=True))
            pred = predicted_classes(prob, thresholds).astype(np.float64)
            yield result_frame(raw, prob, pred, per_class)

    @pandas_udf(result_type(classes))
    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        return scored(batches, VectorRows.add_pandas)

    @pandas_udf(result_type(classes))
    def score_arrays(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        return scored(batches, VectorRows.add_pandas_arrays)

    vector_attrs = {"ml_attr": {"num_attrs": classes}}
    struct_col = private_name([*dataset.columns, raw_col, prob_col, pred_col])
    out = dataset.withColumn(struct_col, score_arrays(vector_arrays(features_col)) if arrays
                             else score(F.col(features_col)))
    # withMetadata, not alias(metadata=): Spark Connect drops an alias's metadata inside withColumn
    if raw_col:
        out = out.withColumn(raw_col, result_vector(struct_col, "raw", classes)).withMetadata(raw_col, vector_attrs)
    if prob_col:
        out = out.withColumn(prob_col, result_vector(struct_col, "prob", classes)).withMetadata(prob_col, vector_attrs)
    if pred_col:
        out = out.withColumn(pred_col, F.col(struct_col + ".pred")).withMetadata(pred_col, {
            "ml_attr": {"type": "nominal", "num_vals": classes}})
    return out.drop(struct_col)
