"""Input checks on the driver and the Arrow -> NumPy path on the executors.

The driver checks the schema without running anything, then the data in one aggregate job, before any
training job: vector width == layers[0], labels integral in 0..C-1, no null, NaN or infinity. Executors
receive Arrow record batches (``features`` as ``array<float>`` via ``vector_to_array``), flatten them
without per-row Python objects and concatenate them into one contiguous float32 matrix.
"""
from __future__ import annotations

import numpy as np

FEATURES, LABEL = "__ffps_features", "__ffps_label"


def _check_column(schema, param: str, col: str, accept, need: str) -> None:
    names = schema.fieldNames()
    if col not in names:
        raise ValueError(f"{param} {col!r} is not a column of the DataFrame; columns: {names}")
    dtype = schema[col].dataType
    if not isinstance(dtype, accept):
        raise ValueError(f"{param} {col!r} must be {need}, got {dtype.simpleString()}")


def check_schema(schema, features_col: str, label_col: str | None) -> None:
    """Columns exist with the right types, else ValueError naming the column and its type."""
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import NumericType

    _check_column(schema, "featuresCol", features_col, VectorUDT,
                  "a Vector column (pyspark.ml.linalg, e.g. from VectorAssembler)")
    if label_col is not None:
        _check_column(schema, "labelCol", label_col, NumericType,
                      "numeric (class indices 0..C-1, e.g. from StringIndexer)")


def prepared(dataset, features_col: str, label_col: str | None):
    """DataFrame of (features array<float>, label double) under private names."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    cols = [vector_to_array(F.col(features_col), "float32").alias(FEATURES)]
    if label_col is not None:
        cols.append(F.col(label_col).cast("double").alias(LABEL))
    return dataset.select(*cols)


def check_data(prep, width: int, num_classes: int, num_workers: int, features_col: str,
               label_col: str) -> list[int]:
    """One aggregate job over the prepared frame -> rows per partition; ValueError naming the first problem.

    The per-partition counts travel to the training tasks, so sync and easgd can cut every shard to the same
    length without a barrier ``allGather`` (each costs about a second in Spark 3.5).
    """
    from pyspark.sql import functions as F

    f, y = F.col(FEATURES), F.col(LABEL)
    # Spark orders NaN above +inf, so array_max is NaN or +inf when any element is; array_min is -inf when
    # any is. Both are code-generated: about 3x faster than an interpreted exists(lambda) per element.
    hi, lo = F.array_max(f), F.array_min(f)
    bad_value = F.isnan(hi) | (hi == F.lit(float("inf"))) | (lo == F.lit(float("-inf")))
    parts = prep.groupBy(F.spark_partition_id().alias("part")).agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(f.isNull().cast("long")).alias("null_features"),
        F.min(F.size(f)).alias("min_width"), F.max(F.size(f)).alias("max_width"),
        F.sum(bad_value.cast("long")).alias("bad_features"),
        F.sum(y.isNull().cast("long")).alias("null_labels"),
        F.min(y).alias("min_label"), F.max(y).alias("max_label"),
        F.sum((F.isnan(y) | (y != F.floor(y))).cast("long")).alias("fractional_labels"),
    ).collect()
    counts = [0] * num_workers                  # the caller made (or found) exactly num_workers partitions
    for p in parts:
        if p["part"] >= num_workers:
            raise RuntimeError(f"the prepared training data has a partition {p['part']}; expected "
                               f"{num_workers} partitions")
        counts[p["part"]] = p["n"]

    def merged(key, combine):
        values = [p[key] for p in parts if p[key] is not None]   # min/max are None in an all-null partition
        return combine(values) if values else None
    row = {key: merged(key, combine) for key, combine in (
        ("null_features", sum), ("bad_features", sum), ("null_labels", sum), ("fractional_labels", sum),
        ("min_width", min), ("max_width", max), ("min_label", min), ("max_label", max))}
    n = sum(counts)
    if n == 0:
        raise ValueError("the training DataFrame has no rows")
    if row["null_features"]:
        raise ValueError(f"featuresCol {features_col!r} has {row['null_features']} null value(s); drop or impute them")
    if row["min_width"] != width or row["max_width"] != width:
        bad = row["max_width"] if row["max_width"] != width else row["min_width"]
        raise ValueError(f"featuresCol {features_col!r} has vectors of size {bad} but layers[0] is {width}; "
                         f"set layers[0] to the feature width")
    if row["bad_features"]:
        raise ValueError(f"featuresCol {features_col!r} has {row['bad_features']} row(s) with NaN or infinite "
                         f"values (after conversion to float32); clean or impute them")
    if row["null_labels"]:
        raise ValueError(f"labelCol {label_col!r} has {row['null_labels']} null value(s)")
    if row["fractional_labels"]:
        raise ValueError(f"labelCol {label_col!r} has {row['fractional_labels']} value(s) that are not integral "
                         f"class indices (NaN or fractional); labels must be 0..{num_classes - 1}")
    lo, hi = row["min_label"], row["max_label"]
    if lo < 0 or hi > num_classes - 1:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labelCol {label_col!r} has label {bad:g} outside 0..{num_classes - 1} "
                         f"(layers[-1] = {num_classes} classes)")
    if n < num_workers:
        raise ValueError(f"numWorkers={num_workers} exceeds the {n} training rows; use fewer workers")
    if min(counts) == 0:
        raise ValueError(f"a training partition is empty (rows per partition: {counts}); repartition the data")
    return counts


def arrow_to_arrays(batches, width: int, with_labels: bool = True):
    """Arrow record batches (features list<float>, label double) -> X (n, width) float32, y (n,) int32.

    Each batch's list column is flattened (no per-row objects) and the batches are concatenated once.
    """
    xs, ys = [], []
    for batch in batches:
        if batch.num_rows == 0:
            continue
        flat = batch.column(0).flatten().to_numpy(zero_copy_only=False)
        if flat.shape[0] != batch.num_rows * width:
            raise ValueError(f"feature vectors in this partition are not all of width {width}")
        xs.append(flat.reshape(batch.num_rows, width))
        if with_labels:
            ys.append(batch.column(1).to_numpy(zero_copy_only=False))
    X = np.ascontiguousarray(np.concatenate(xs) if xs else np.empty((0, width)), dtype=np.float32)
    if not with_labels:
        return X, None
    y = (np.concatenate(ys) if ys else np.empty(0)).astype(np.int32)
    return X, y
