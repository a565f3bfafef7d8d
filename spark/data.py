"""Input checks and the Arrow -> NumPy path of the training tasks.

The driver checks the schema before any job. The data are checked where they are read, in the training
stage, before any update: each task reads its partition (Arrow record batches; the Vector column arrives as
Spark stores it, a struct of type, size, indices and values, read without per-row Python objects) into one
float32 matrix, or into sparse rows (:class:`core.sparse.CsrRows`) where the vectors are sparse, reports
what it found (rows, widths, nulls, NaN/inf rows, label range) through the parameter server's gather
barrier, and every task judges all reports alike: vector width == layers[0], labels integral in 0..C-1, no
null, NaN or infinity. A separate checking job would read and convert every row a second time (about 2 s of
a 10 s fit of 100k x 784 rows on 2 cores).
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

import numpy as np

from core.sparse import CsrRows, offsets, value_rows

log = logging.getLogger("spark.data")

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


# Spark 3.5 hands a Python task its rows in Arrow batches of spark.sql.execution.arrow.maxRecordsPerBatch rows
# (10,000 by default), whatever their size; Spark 4 also bounds a batch's bytes. Dense float32 rows of a wide
# Vector (HashingTF's default 2^18 features: 1 MiB a row) make a batch of gigabytes: the JVM thread writing it
# died of an OutOfMemoryError (direct buffer memory) and the task waited for it forever. 10,000 x 10,000
# features (400 MB) went through with a 2 GB driver; 2,000 x 2^16 (0.5 GB, doubled while growing) did not.
MAX_BATCH_BYTES = 256 << 20
RECORDS_PER_BATCH = "spark.sql.execution.arrow.maxRecordsPerBatch"
DEFAULT_RECORDS = 10_000


def declared_width(schema, features_col: str) -> int | None:
    """The Vector column's width from its ML attributes (VectorAssembler, HashingTF, CountVectorizer, the libsvm
    reader set them), or None when the column carries none."""
    attrs = schema[features_col].metadata.get("ml_attr") or {}
    n = attrs.get("num_attrs")
    return int(n) if isinstance(n, int) and n > 0 else None


def check_width(schema, features_col: str, expected: int, what: str,
                fix: str = "set layers[0] to the feature width") -> None:
    """Before any job: the width the column's ML attributes declare against ``expected`` (layers[0]).
    ``what``: how the error names ``expected``; ``fix``: what to do about it. A column without attributes is
    checked row by row where the tasks read it."""
    width = declared_width(schema, features_col)
    if width is not None and width != expected:
        raise ValueError(f"featuresCol {features_col!r} has vectors of size {width} (its ML attributes) but "
                         f"{what} is {expected}; {fix}")


def check_output_columns(columns, params: dict) -> None:
    """{param: column name} of the output columns: none may be in the input already, nor name another's column
    (MLlib's classifiers refuse both, "already exists"), at fit as at transform; '' names no column. Names are
    compared regardless of case, as Spark resolves them by default (spark.sql.caseSensitive=false): a
    probabilityCol 'X' beside a predictionCol 'x' was written over without a word."""
    held = {c.lower(): c for c in columns}
    for param, column in params.items():
        if column and column.lower() in held:
            same = "" if held[column.lower()] == column else f" (as {held[column.lower()]!r}: Spark matches names " \
                                                               f"regardless of case)"
            raise ValueError(f"column {column!r} already exists in the input{same}; drop it, or set {param} to "
                             f"another name (or to '' for no such column)")
    named = {}
    for param, column in params.items():     # one output written over another would lose it without a word
        if column and column.lower() in named:
            raise ValueError(f"{named[column.lower()]} and {param} both name the column {column!r} (names are "
                             f"matched regardless of case); give each its own name (or '' for no such column)")
        named.setdefault(column.lower(), param)


def _rows_per_batch(records: str) -> int:
    """The rows a maxRecordsPerBatch setting puts in a batch; no limit (-1, 0: whole partitions) is judged as the
    default's batch."""
    return int(records) if int(records) > 0 else DEFAULT_RECORDS


# Bytes per feature of a dense row in the Arrow batches: fit and transform read the Vector column as Spark
# stores it, and a DenseVector's values are float64.
FEATURE_BYTES = 8


def batch_rows_bound(spark, features_col: str, width: int, records: str | None = None) -> tuple[str, int] | None:
    """Spark 3.5, rows ``width`` features wide (layers[0], which every row must match): -> (``records``, by
    default the session's maxRecordsPerBatch; the most rows a batch of dense rows may hold within
    MAX_BATCH_BYTES) when a batch at that setting would be larger, else None (Spark 4, or narrow rows). Sparse
    rows are smaller, but nothing says before the rows are read which a column holds. A row over the bound on
    its own is refused."""
    if int(str(spark.version).split(".")[0]) >= 4:
        return None
    row_bytes = FEATURE_BYTES * width
    if row_bytes > MAX_BATCH_BYTES:
        raise ValueError(f"featuresCol {features_col!r} is {width} features wide: one dense float64 (a DenseVector's "
                         f"values) row is {row_bytes >> 20} MiB, over the {MAX_BATCH_BYTES >> 20} MiB Spark 3.5 can "
                         f"send a Python task in one Arrow batch; use fewer features (e.g. a smaller HashingTF "
                         f"numFeatures), or Spark 4")
    if records is None:
        records = str(spark.conf.get(RECORDS_PER_BATCH, str(DEFAULT_RECORDS)))
    allowed = MAX_BATCH_BYTES // row_bytes
    return (records, allowed) if _rows_per_batch(records) > allowed else None


def _why(width: int, records: str, allowed: int) -> str:
    per_batch = f"{records} rows" if int(records) > 0 else "whole partitions (-1: no row limit)"
    rows = _rows_per_batch(records)
    return (f"{width} features of float64 are {FEATURE_BYTES * width / 2**20:.2f} MiB a dense row, and Spark 3.5 "
            f"sends Python tasks Arrow batches of {per_batch} ({RECORDS_PER_BATCH}): "
            f"{rows * FEATURE_BYTES * width / 2**30:.1f} GiB at {rows} "
            f"rows, over ffps's bound of {MAX_BATCH_BYTES >> 20} MiB (the JVM could not allocate such a batch and "
            f"the task waited forever)")


_bounds_lock = threading.Lock()
_bounded: dict = {}     # session -> [its maxRecordsPerBatch before the first fit that bounded it, bounds in force]


@contextmanager
def batches_bounded_while_fitting(spark, features_col: str, width: int):
    """While a fit of rows ``width`` features wide runs its jobs: Spark 3.5's maxRecordsPerBatch at most
    :func:`batch_rows_bound`'s rows, then the session's own value again. Fits that run at once in one session
    (CrossValidator's parallelism) keep the smallest bound in force until the last of them ends."""
    with _bounds_lock:
        entry = _bounded.get(spark)        # a fit running already: the session's own value is the one it kept
        bound = batch_rows_bound(spark, features_col, width, None if entry is None else entry[0])
        if bound is not None:
            entry = _bounded.setdefault(spark, [bound[0], []])
            entry[1].append(bound[1])
            spark.conf.set(RECORDS_PER_BATCH, str(min(entry[1])))
    if bound is None:
        yield
        return
    allowed = bound[1]
    log.info("ffps: %s; this fit sets it to %d while it runs", _why(width, entry[0], allowed), allowed)
    try:
        yield
    finally:
        with _bounds_lock:
            entry[1].remove(allowed)
            spark.conf.set(RECORDS_PER_BATCH, str(min(entry[1])) if entry[1] else entry[0])
            if not entry[1]:
                del _bounded[spark]


def bound_batches_for_scoring(spark, features_col: str, width: int) -> None:
    """Before ``transform`` of rows ``width`` features wide: Spark 3.5's maxRecordsPerBatch lowered in the
    session when a batch would exceed MAX_BATCH_BYTES (the transformed frame runs later, at the session's
    setting then), said once per change in the log."""
    with _bounds_lock:
        entry = _bounded.get(spark)     # fits running: the value they give back when they end is lowered too
        bound = batch_rows_bound(spark, features_col, width, None if entry is None else entry[0])
        if bound is None:
            return
        records, allowed = bound
        if entry is not None:
            entry[0] = str(allowed)
        spark.conf.set(RECORDS_PER_BATCH, str(allowed if entry is None else min(allowed, *entry[1])))
    log.warning("ffps: %s; transform set it to %d in this session (other Arrow work of the session gets batches "
                "of at most that many rows)", _why(width, records, allowed), allowed)


# Spark 4 hands mapInArrow a Vector column's struct at ~9 us a row, whatever its width (local[2], 1M cached rows
# of 20 features: 4.4 s a task just to drain its 500k rows, against 0.2 s on Spark 3.5), while its JVM
# vector_to_array costs ~0.9 us a row there (0.45 s). Narrow vectors go as float32 arrays on Spark 4 (a sparse
# one arrives dense: at this width a dense row is at most 2 kB); wider ones keep the struct, whose sparse rows
# stay sparse (20,000 HashingTF rows of 2^18 features: 30-34 s through vector_to_array, 1.4-2.2 s as structs).
ARRAY_READ_MAX_WIDTH = 512


def reads_arrays(spark, width: int) -> bool:
    """Whether a fit of rows ``width`` features wide reads its Vector column as arrays (:func:`prepared`)."""
    return int(width) <= ARRAY_READ_MAX_WIDTH and int(str(spark.version).split(".")[0]) >= 4


def vector_arrays(features_col: str):
    """vector_to_array(features_col, "float32"), null for a null vector (vector_to_array itself fails on one,
    where the readers name the nulls as a data problem)."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    col = F.col(features_col)
    return F.when(col.isNull(), F.lit(None).cast("array<float>")).otherwise(vector_to_array(col, "float32"))


def prepared(dataset, features_col: str, label_col: str | None, arrays: bool = False):
    """DataFrame of (features, label double) under private names. The Vector column goes as it is: mapInArrow
    hands it over as its struct (type, size, indices, values), sparse rows stay sparse, and no JVM conversion
    runs (48k dense rows of 784 on Spark 3.5: 0.42-0.6 s, vector_to_array 0.6-0.85 s); with ``arrays``
    (:func:`reads_arrays`) as vector_to_array's float32 array instead. :meth:`VectorRows.add_arrow` reads
    either."""
    from pyspark.sql import functions as F

    if arrays:
        cols = [vector_arrays(features_col).alias(FEATURES)]
    else:
        cols = [F.col(features_col).alias(FEATURES)]
    if label_col is not None:
        cols.append(F.col(label_col).cast("double").alias(LABEL))
    return dataset.select(*cols)


def nonfinite_rows(X) -> int:
    """Rows of X (m, d) holding NaN or an infinity. One float32 sum screens them (NaN and inf propagate); the
    exact count runs only when the sum is not finite, which a finite X can also cause by overflowing."""
    if not X.size:
        return 0
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(X.sum(dtype=np.float32))
    return 0 if np.isfinite(total) else int(np.count_nonzero(~np.isfinite(X).all(axis=1)))


def partition_report(y, *, rows: int, null_features: int, min_width, max_width, null_labels: int,
                     bad_features: int = 0) -> dict:
    """What one training task found in its partition: the facts :func:`data_problem` judges, JSON-ready.

    y (rows,) float64 labels with NaN for nulls; bad_features: rows holding NaN or an infinity (as float32).
    """
    bad = int(bad_features)
    known = y[~np.isnan(y)]                                  # NaN here is null or NaN: neither has a range
    odd = y[y != np.floor(y)]                                # NaN (null or not) and fractional labels
    fractional = int(odd.size) - int(null_labels)
    frac = odd[~np.isnan(odd)]
    return {"rows": int(rows), "null_features": int(null_features), "min_width": min_width,
            "max_width": max_width, "bad_features": bad, "null_labels": int(null_labels),
            # NaN (not null) and fractional labels; floor(inf) == inf, so infinities show up in the range
            "fractional_labels": fractional,
            # one of them for the message: a fractional value where there is one, else a NaN
            "fractional_example": repr(float(frac[0])) if frac.size else ("NaN" if fractional else None),
            "min_label": float(known.min()) if known.size else None,
            "max_label": float(known.max()) if known.size else None,
            "gpu_dense_bytes": None}    # set where backend='cupy' would make too many sparse rows dense


def data_problem(reports: list, width: int, num_classes: int, features_col: str, label_col: str) -> str | None:
    """Every training task's :func:`partition_report` (by worker) -> the first problem, as a message, or None.

    Each task judges the same gathered reports, so all of them reach the same verdict without a Spark job.
    """
    num_workers = len(reports)

    def merged(key, combine):
        values = [r[key] for r in reports if r[key] is not None]   # min/max are None in an all-null partition
        return combine(values) if values else None
    row = {key: merged(key, combine) for key, combine in (
        ("null_features", sum), ("bad_features", sum), ("null_labels", sum), ("fractional_labels", sum),
        ("min_width", min), ("max_width", max), ("min_label", min), ("max_label", max),
        ("fractional_example", lambda found: next((v for v in found if v != "NaN"), found[0])))}
    counts = [r["rows"] for r in reports]
    n = sum(counts)
    if n == 0:
        return "the training DataFrame has no rows"
    if row["null_features"]:
        return f"featuresCol {features_col!r} has {row['null_features']} null value(s); drop or impute them"
    if row["min_width"] != width or row["max_width"] != width:
        bad = row["max_width"] if row["max_width"] != width else row["min_width"]
        return (f"featuresCol {features_col!r} has vectors of size {bad} but layers[0] is {width}; "
                f"set layers[0] to the feature width")
    if row["bad_features"]:
        return (f"featuresCol {features_col!r} has {row['bad_features']} row(s) with NaN or infinite values "
                f"(after conversion to float32); clean or impute them")
    if row["null_labels"]:
        return f"labelCol {label_col!r} has {row['null_labels']} null value(s)"
    if row["fractional_labels"]:
        return (f"labelCol {label_col!r} has {row['fractional_labels']} value(s) that are not integral class "
                f"indices (NaN or fractional, e.g. {row['fractional_example']}); labels must be "
                f"0..{num_classes - 1}")
    lo, hi = row["min_label"], row["max_label"]
    if lo < 0 or hi > num_classes - 1:
        bad = lo if lo < 0 else hi
        return (f"labelCol {label_col!r} has label {bad:g} outside 0..{num_classes - 1} "
                f"(layers[-1] = {num_classes} classes)")
    if n < num_workers:
        return f"numWorkers={num_workers} exceeds the {n} training rows; use fewer workers"
    dense = [(r["gpu_dense_bytes"], r["rows"]) for r in reports if r.get("gpu_dense_bytes")]
    if dense:
        size, rows = max(dense)
        return (f"featuresCol {features_col!r} holds sparse vectors and backend='cupy' trains dense rows: a "
                f"partition of {rows} rows x {width} features is {size / 2**30:.1f} GiB dense, over the "
                f"{GPU_DENSE_MAX_BYTES / 2**30:.0f} GiB a GPU task makes dense; set backend='auto' (such partitions "
                f"train on the CPU by their sparse rows) or 'numba', or spread the rows over more workers")
    return None


LABEL_COUNTS_MAX = 1024   # classes up to which a task reports its rows per class (a JSON list within the
                          # barrier report's 64 KiB)
SPLIT_MISSING_ROWS = 20   # rows a random split would put in a partition's absent classes, at least, and
SPLIT_SIGMAS = 10         # this many standard deviations above what a random split leaves absent


def label_counts(y, num_classes: int) -> list | None:
    """A partition's rows per class 0..num_classes-1 (others, the data check's business, left out), or None
    past LABEL_COUNTS_MAX classes."""
    if num_classes > LABEL_COUNTS_MAX:
        return None
    known = y[(y >= 0) & (y < num_classes) & (y == np.floor(y))]       # NaN fails every comparison
    return np.bincount(known.astype(np.int64), minlength=num_classes).tolist()


def label_split(counts: list) -> str | None:
    """Rows per class of each partition (:func:`label_counts`, by worker) -> why the partitions hold different
    classes, or None: the input was partitioned, sorted or bucketed by label, and each worker would train on
    its own classes (digits split by label over 2 async workers: 0.73 accuracy, 0.98 shuffled).

    A partition is judged by the rows a random split would put in the classes it lacks: e rows expected of a
    class go missing with chance about e^-e, so a random split leaves sum(e e^-e) rows' worth absent, with
    variance sum(e^2 e^-e (1 - e^-e)). At least SPLIT_MISSING_ROWS of them, and SPLIT_SIGMAS standard
    deviations above that, is no chance: one class of 20 expected rows missing, or 100 classes sorted into 8
    partitions (each holds 13 of them, none expected above 10 rows), but not many rare classes."""
    if len(counts) < 2 or any(c is None for c in counts):
        return None
    k = np.asarray(counts, dtype=np.float64)
    rows, per_class = k.sum(axis=1), k.sum(axis=0)
    if rows.sum() == 0:
        return None
    expected = np.outer(rows, per_class) / rows.sum()
    lost = np.exp(-expected)
    chance = (expected * lost).sum(axis=1)
    spread = np.sqrt((expected ** 2 * lost * (1 - lost)).sum(axis=1))
    missing = np.where(k == 0, expected, 0.0).sum(axis=1)
    odd = (missing >= SPLIT_MISSING_ROWS) & (missing - chance > SPLIT_SIGMAS * spread)
    if not odd.any():
        return None
    w = int(np.argmax(np.where(odd, missing, -1.0)))
    absent = np.flatnonzero((k[w] == 0) & (per_class > 0))
    c = int(absent[np.argmax(expected[w, absent])])
    return (f"the training partitions hold different classes: partition {w} of {int(rows[w])} rows has no row of "
            f"{absent.size} class{'es' * (absent.size > 1)} where a random split puts about {missing[w]:.0f} "
            f"(class {c}: {int(per_class[c])} rows, about {expected[w, c]:.0f} expected there), so each worker "
            f"would train on its own classes")


UNEVEN_SHARE = 0.01    # round modes: cutting every shard to the smallest may drop at most this share of the rows


def rows_cut(counts: list) -> int:
    """The rows a mode whose shards must be equal leaves out: each partition is cut to the smallest."""
    return sum(counts) - len(counts) * min(counts)


def uneven_partitions(counts: list, equal_shards: bool) -> str | None:
    """Why the training partitions, as they are, would not train on all the data -> a sentence, or None: an
    empty partition leaves its worker nothing to do, and a mode whose shards must be equal (sync, easgd) cuts
    every one to the smallest, dropping rows. The driver then shuffles the rows into numWorkers partitions
    and trains again (:class:`spark.training.UnevenPartitions`), as it does for :func:`label_split`."""
    if min(counts) == 0:
        return f"a training partition is empty (rows per partition: {counts})"
    dropped = rows_cut(counts)
    if equal_shards and dropped > max(len(counts), UNEVEN_SHARE * sum(counts)):
        return (f"the training partitions are uneven (rows per partition: {counts}) and this mode cuts each to "
                f"the smallest: {dropped} of {sum(counts)} rows would go unused")
    return None


# Sparse rows train as CSR (core.sparse) where at most this share of a partition's features is non-zero; denser
# ones as one dense matrix. A numba epoch of [784,256,256,10], [692,100,2] or [4096,64,2] took 0.45-0.79x
# the dense time at 2-5 % stored, 0.71-1.08x at 10 %, 1.19-1.54x at 20 % (2-core VM).
SPARSE_MAX_DENSITY = 0.1

# cupy trains dense rows: a GPU worker makes its sparse partition dense up to this many bytes (float32). Past
# it, backend='auto' trains that partition on the CPU by its sparse rows and 'cupy' is refused before training
# (20,000 HashingTF documents of 2^18 features are 19.5 GiB dense: the executor's Python died allocating them).
GPU_DENSE_MAX_BYTES = 2 << 30


def rows_for_the_gpu(X, requested: str):
    """A partition read with sparse_ok, for a worker whose backend resolved to cupy, and the backend setting
    ``requested`` -> (X, the backend it trains on, None) or, where ``requested`` is 'cupy' and the rows are too
    many to make dense, (None, 'cupy', their dense bytes): the report's refusal."""
    from core.backends import cpu_backend_name

    if not isinstance(X, CsrRows):
        return X, "cupy", None
    dense = 4 * X.shape[0] * X.shape[1]
    if dense <= GPU_DENSE_MAX_BYTES:            # VectorRows' CSR rows come from SparseVectors: unique columns
        return X.toarray(unique_columns=True).astype(np.float32, copy=False), "cupy", None
    if str(requested).strip().lower() == "auto":
        return X, cpu_backend_name(), None
    return None, "cupy", dense


class VectorRows:
    """Vectors as they are read, batch by batch: dense float32 blocks while every vector is dense and ``width``
    wide, else CSR parts (lengths, columns, values) for every row, stored zeros dropped; nulls, widths and rows
    holding NaN or an infinity counted. The training tasks add Arrow batches (:meth:`add_arrow`), the scoring
    UDF pandas ones (:meth:`add_pandas`); both hold a Vector as Spark stores it: (type 0 sparse / 1 dense,
    size, indices, values)."""

    def __init__(self, width: int):
        self.width = width
        self.dense: list = []          # (n, width) float32 blocks
        self.parts: list = []          # (lengths (n,), columns (nnz,) int64, values (nnz,) float32)
        self.min_width = self.max_width = None
        self.nulls = self.bad = 0

    def _widths(self, lo, hi):
        if lo is not None:
            self.min_width = lo if self.min_width is None else min(self.min_width, lo)
            self.max_width = hi if self.max_width is None else max(self.max_width, hi)

    def add_arrow(self, feats) -> None:
        """One Arrow batch's Vector column: a struct (a null vector is a null struct), or vector_to_array's list
        of floats (a null vector is a null list)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if pa.types.is_list(feats.type) or pa.types.is_large_list(feats.type):
            self._add_arrays(feats.is_null().to_numpy(zero_copy_only=False),
                             pc.list_value_length(feats).fill_null(0).to_numpy(zero_copy_only=False),
                             feats.flatten().to_numpy(zero_copy_only=False))
            return
        kind, size, indices, values = feats.flatten()          # the struct's nulls carried into each field
        self.add(kind.fill_null(-1).to_numpy(zero_copy_only=False), size.fill_null(0).to_numpy(zero_copy_only=False),
                 pc.list_value_length(values).fill_null(0).to_numpy(zero_copy_only=False),
                 values.flatten().to_numpy(zero_copy_only=False), indices.flatten().to_numpy(zero_copy_only=False))

    def add_pandas(self, frame) -> None:
        """One pandas batch of a Vector column, as a pandas UDF gets it: a frame of type, size, indices, values
        (per-row arrays; a null vector's row all null)."""
        import pandas as pd

        kind = pd.to_numeric(frame["type"]).fillna(-1).to_numpy(dtype=np.int64)
        size = pd.to_numeric(frame["size"]).fillna(0).to_numpy(dtype=np.int64)
        values = [np.zeros(0) if kind[r] < 0 else v for r, v in enumerate(frame["values"])]
        sparse = [v for r, v in enumerate(frame["indices"]) if kind[r] == 0]
        self.add(kind, size, np.fromiter((len(v) for v in values), np.int64, len(values)),
                 np.concatenate(values) if values else np.zeros(0),
                 np.concatenate(sparse) if sparse else np.zeros(0, np.int64))

    def add_pandas_arrays(self, series) -> None:
        """One pandas batch of vector_to_array's arrays, as a pandas UDF gets them (a null vector: None)."""
        null = series.isna().to_numpy()
        values = [np.zeros(0, np.float32) if null[r] else v for r, v in enumerate(series.to_numpy())]
        self._add_arrays(null, np.fromiter((len(v) for v in values), np.int64, len(values)),
                         np.concatenate(values) if values else np.zeros(0))

    def _add_arrays(self, null, lengths, flat) -> None:
        """Rows of vector_to_array's arrays: dense rows of ``lengths`` values (``flat``), where not ``null``."""
        self.add(np.where(null, -1, 1), lengths, lengths, flat, np.zeros(0, np.int64))

    def add(self, kind, size, lengths, flat, sparse_indices) -> None:
        """Rows given as arrays: kind (n,) 0 sparse / 1 dense / < 0 null, size (n,) (a sparse row's width),
        lengths (n,) values stored per row, flat (nnz,) those values, sparse_indices: the sparse rows' columns."""
        kind, lengths = np.asarray(kind), np.asarray(lengths, dtype=np.int64)
        valid, dense = kind >= 0, kind == 1
        self.nulls += int((~valid).sum())
        widths = np.where(dense, lengths, size)[valid]
        self._widths(int(widths.min()) if widths.size else None, int(widths.max()) if widths.size else None)
        with np.errstate(over="ignore"):             # beyond float32's range: inf, counted as a bad row
            flat = np.asarray(flat).astype(np.float32)
        if dense.all() and (widths == self.width).all() and not self.parts:
            block = flat.reshape(len(lengths), self.width)
            self.bad += nonfinite_rows(block)
            self.dense.append(block)
            return
        self._to_parts()
        columns = np.empty(len(flat), dtype=np.int64)
        dense_at = np.repeat(dense, lengths)
        if dense_at.any():            # a dense row's values sit at columns 0..len-1
            starts = np.repeat(offsets(lengths)[:-1], lengths)
            columns[dense_at] = (np.arange(len(flat), dtype=np.int64) - starts)[dense_at]
        if not dense_at.all():
            columns[~dense_at] = sparse_indices
        if columns.size and columns.max() >= self.width:     # a SparseVector's indices are below its size
            self._widths(int(columns.max()) + 1, int(columns.max()) + 1)
        screen = float(flat.sum(dtype=np.float32)) if flat.size else 0.0
        if not np.isfinite(screen):
            self.bad += int(np.unique(value_rows(lengths)[~np.isfinite(flat)]).size)
        self._part(lengths, columns, flat)

    def _part(self, lengths, columns, values) -> None:
        """Rows as CSR parts, without their stored zeros (a dense row's, mostly): they add nothing to a product."""
        keep = values != 0
        if not keep.all():
            lengths = np.bincount(value_rows(lengths)[keep], minlength=len(lengths)).astype(np.int64)
            columns, values = columns[keep], values[keep]
        self.parts.append((lengths, columns, values))

    def _to_parts(self) -> None:
        """The dense blocks read so far as CSR parts (a partition whose vectors are not all dense)."""
        for block in self.dense:
            n = block.shape[0]
            self._part(np.full(n, self.width, dtype=np.int64), np.tile(np.arange(self.width, dtype=np.int64), n),
                       block.reshape(-1))
        self.dense = []

    def matrix(self, rows: int, sparse_ok: bool):
        """-> (n, width) float32, or CsrRows where sparse rows are welcome and sparse enough."""
        if not self.parts:      # block by block, each freed once copied: the pages of X fill as the blocks go
            blocks, self.dense = self.dense[::-1], []              # (concatenate held both whole: 2x at peak)
            X = np.empty((sum(len(b) for b in blocks), self.width), dtype=np.float32)
            at = 0
            while blocks:
                block = blocks.pop()
                X[at:at + len(block)] = block
                at += len(block)
            return X
        lengths = np.concatenate([p[0] for p in self.parts])
        columns = np.concatenate([p[1] for p in self.parts])
        values = np.concatenate([p[2] for p in self.parts])
        self.parts = []
        if sparse_ok and len(values) <= SPARSE_MAX_DENSITY * rows * self.width:
            return CsrRows(offsets(lengths), columns.astype(np.int32), values, self.width)
        X = np.zeros((rows, self.width), dtype=np.float32)
        X[value_rows(lengths), columns] = values
        return X


def read_partition(batches, width: int, sparse_ok: bool = True):
    """Arrow record batches (features Vector struct, label double) -> (X, y (n,) float64 with NaN for nulls,
    :func:`partition_report`). X: (n, width) float32; or, with ``sparse_ok`` (a CPU backend), CsrRows where
    the vectors are sparse and at most SPARSE_MAX_DENSITY of the features are non-zero; or None when a null or
    a vector of another width keeps the rows from forming one matrix (the report says why).
    """
    ys = []
    read = VectorRows(width)
    rows = null_labels = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        rows += batch.num_rows
        feats, labels = batch.column(0), batch.column(1)
        null_labels += labels.null_count
        # a copy: a view of the batch's labels would hold its whole body, the float64 features included, until
        # the read ends
        ys.append(np.array(labels.to_numpy(zero_copy_only=False), dtype=np.float64))
        read.add_arrow(feats)
    y = np.concatenate(ys) if ys else np.empty(0)
    whole = read.nulls == 0 and read.min_width in (None, width) and read.max_width in (None, width)
    X = read.matrix(rows, sparse_ok) if whole else None
    report = partition_report(y, rows=rows, null_features=read.nulls, min_width=read.min_width,
                              max_width=read.max_width, null_labels=null_labels, bad_features=read.bad)
    return X, y, report
