"""The training tasks' read and data verdict without Spark: Arrow batches -> (X, y, report) -> problem."""
import numpy as np
import pytest

from spark.data import data_problem, label_counts, label_split, read_partition, uneven_partitions
from tests.spark_helpers import vector_batch


def batch(rows, labels):
    return vector_batch(rows, labels)


def verdict(*partitions, width=3, classes=3):
    reports = [read_partition(iter(p), width)[2] for p in partitions]
    return data_problem(reports, width, classes, "features", "label")


def test_read_concatenates_batches_into_one_float32_matrix():
    X, y, report = read_partition(iter([batch([[1, 2, 3], [4, 5, 6]], [0, 1]), batch([], []),
                                        batch([[7, 8, 9]], [2])]), 3)
    assert X.dtype == np.float32 and X.flags.c_contiguous and X.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert y.tolist() == [0, 1, 2]
    assert report == {"rows": 3, "null_features": 0, "min_width": 3, "max_width": 3, "bad_features": 0,
                      "null_labels": 0, "fractional_labels": 0, "fractional_example": None, "min_label": 0.0,
                      "max_label": 2.0, "gpu_dense_bytes": None}
    assert verdict([batch([[1, 2, 3]], [0])], [batch([[1, 2, 3]], [2])]) is None


@pytest.mark.parametrize("partitions,message", [
    (([batch([[1, 2, 3]], [0])], [batch([[1, 2, 3, 4]], [1])]), "has vectors of size 4 but layers[0] is 3"),
    (([batch([[1, 2, 3], None], [0, 1])], [batch([[1, 2, 3]], [1])]), "'features' has 1 null value(s)"),
    (([batch([[1, 2, 3]], [0])], [batch([[1, np.inf, 3], [np.nan, 0, 0]], [1, 1])]), "has 2 row(s) with NaN"),
    (([batch([[1, 2, 3]], [None])], [batch([[1, 2, 3]], [1])]), "labelCol 'label' has 1 null value(s)"),
    (([batch([[1, 2, 3]], [0.5])], [batch([[1, 2, 3]], [np.nan])]),
     "has 2 value(s) that are not integral class indices (NaN or fractional, e.g. 0.5)"),
    (([batch([[1, 2, 3]], [np.nan])], [batch([[1, 2, 3]], [1])]),
     "1 value(s) that are not integral class indices (NaN or fractional, e.g. NaN)"),
    (([batch([[1, 2, 3]], [0])], [batch([[1, 2, 3]], [np.inf])]), "has label inf outside 0..2"),
    (([batch([[1, 2, 3]], [-2])], [batch([[1, 2, 3]], [1])]), "has label -2 outside 0..2"),
    (([batch([[1, 2, 3]], [0])], []), "numWorkers=2 exceeds the 1 training rows"),
    (([], []), "the training DataFrame has no rows"),
])
def test_every_task_reaches_the_same_verdict(partitions, message):
    """Whichever partition holds the problem, the gathered reports name it (each task judges all of them)."""
    assert message in verdict(*partitions)
    assert message in verdict(*reversed(partitions))


def test_partitions_that_would_not_train_on_all_rows_are_told_apart_from_bad_data():
    """An empty partition is no data problem (the driver shuffles the rows); neither are uneven ones, except where
    the mode cuts every shard to the smallest and more than 1 % (and more than one row per worker) would go."""
    assert verdict([batch([[1, 2, 3], [1, 2, 3]], [0, 1])], []) is None
    assert uneven_partitions([2, 0], equal_shards=False) == "a training partition is empty (rows per partition: [2, 0])"
    assert uneven_partitions([627, 8], equal_shards=False) is None          # async: each worker takes its own
    assert uneven_partitions([627, 8], equal_shards=True) == (
        "the training partitions are uneven (rows per partition: [627, 8]) and this mode cuts each to the smallest: "
        "619 of 635 rows would go unused")
    assert uneven_partitions([500, 496], equal_shards=True) is None         # 4 of 996 rows: under 1 %
    assert uneven_partitions([3, 2], equal_shards=True) is None             # one row per worker: under the bar


def test_partitions_that_hold_different_classes_are_told_from_a_random_split():
    """A partition lacking classes where a random split would put 20 or more rows, far more than chance leaves
    out: the input was partitioned or sorted by label. Random splits of the same rows (many rare classes too),
    small partitions and a lone worker pass."""
    import re

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 1800).astype(np.float64)
    for seed in range(20):                        # random splits, 2 and 8 ways
        shuffled = np.random.default_rng(seed).permutation(y)
        for ways in (2, 8):
            assert label_split([label_counts(p, 10) for p in np.array_split(shuffled, ways)]) is None
    for seed in range(20):                        # rare classes go missing by chance: 1000 classes, skewed sizes
        r = np.random.default_rng(seed)
        rare = np.minimum(r.zipf(1.5, 5000), 1000).astype(np.float64) - 1
        assert label_split([label_counts(p, 1000) for p in np.array_split(r.permutation(rare), 8)]) is None
    low, high = y[y < 5], y[y >= 5]
    said = label_split([label_counts(low, 10), label_counts(high, 10)])
    w = re.match(r"the training partitions hold different classes: partition ([01]) of (\d+) rows has no row of 5 "
                 r"classes where a random split puts about (\d+) \(class (\d): (\d+) rows, about (\d+) expected "
                 r"there\), so each worker would train on its own classes$", said)
    assert w, said
    part, rows, c = int(w[1]), int(w[2]), int(w[4])
    assert rows == [low, high][part].size and (c >= 5) == (part == 0) and int(w[5]) == (y == c).sum()
    sorted_rows = np.sort(y)                      # sorted by label, then cut in two: overlapping ranges
    assert "hold different classes" in label_split([label_counts(p, 10) for p in np.array_split(sorted_rows, 2)])
    many = np.repeat(np.arange(100), 80).astype(np.float64)      # 100 classes sorted into 8: none expects 20 rows
    assert "has no row of 87 classes" in label_split([label_counts(p, 100) for p in np.array_split(many, 8)])
    assert label_split([label_counts(low[:20], 10), label_counts(high[:20], 10)]) is None   # about 4 a class
    assert label_split([label_counts(y, 10)]) is None
    assert label_split([None, label_counts(y, 10)]) is None
    assert label_counts(np.array([0.0, 2.0, 2.0, np.nan, 1.5, -1.0, 3.0, 7.0]), 4) == [1, 0, 2, 1]
    assert label_counts(y, 1025) is None          # past LABEL_COUNTS_MAX classes nothing is reported


def test_a_partition_is_read_without_holding_its_arrow_batches(tmp_path):
    """The labels were kept as views of each batch, which held every batch's body (the float64 features) until
    the read ended, and the blocks were concatenated whole: 100k x 784 rows peaked at 1278 MB above the start
    for a 299 MB matrix, now 513 MB. Here: batches read from a file, as a task gets them, through a pool of its
    own, hold at most about two batches at once."""
    import pyarrow as pa

    rows, per, width = 8 * 500, 500, 64
    rng = np.random.default_rng(1)
    feats, labels = rng.random((per, width)), rng.integers(0, 10, per).astype(float)
    one = batch(feats.tolist(), labels.tolist())
    path = str(tmp_path / "rows.arrow")
    with pa.OSFile(path, "wb") as f, pa.ipc.new_stream(f, one.schema) as out:
        for _ in range(rows // per):
            out.write_batch(one)
    pool = pa.proxy_memory_pool(pa.default_memory_pool())

    def batches():
        with pa.OSFile(path, memory_pool=pool) as f:         # each batch's body is a buffer of this pool
            yield from pa.ipc.open_stream(f)
    X, y, report = read_partition(batches(), width)
    assert X.shape == (rows, width) and report["rows"] == rows
    np.testing.assert_array_equal(X, np.tile(feats.astype(np.float32), (rows // per, 1)))
    np.testing.assert_array_equal(y, np.tile(labels, rows // per))
    assert pool.max_memory() < 3 * one.nbytes, (pool.max_memory(), one.nbytes)


def test_a_row_of_float32_overflow_counts_as_infinite():
    X, _, report = read_partition(iter([batch([[1, 3e38, 3e38], [1, 2, 3]], [0, 1])]), 3)
    assert report["bad_features"] == 0     # 3e38 is finite in float32 (the quick sum overflows: counted exactly)
    overflow = batch([[1.0, 1e300, 3.0]], [0.0])          # a DenseVector's float64 beyond float32's range
    assert read_partition(iter([overflow]), 3)[2]["bad_features"] == 1
    assert read_partition(iter([batch([("sparse", 3, [1], [1e300])], [0.0])]), 3)[2]["bad_features"] == 1


def test_sparse_vectors_stay_sparse_where_they_are_sparse():
    """Rows of HashingTF-like vectors: CSR rows on a CPU backend, the same matrix dense for the GPU or where a
    partition is dense enough (the CSR product loses to BLAS above SPARSE_MAX_DENSITY)."""
    from core.sparse import CsrRows
    from spark.data import SPARSE_MAX_DENSITY

    width = 40
    rows = [("sparse", width, [i % width, (7 * i + 3) % width], [1.0 + i, -2.0]) for i in range(30)]
    expected = np.zeros((30, width), np.float32)
    for i, (_, _, cols, vals) in enumerate(rows):
        expected[i, cols] = vals
    first, second = batch(rows[:12], [0] * 12), batch(rows[12:], [1] * 18)
    X, y, report = read_partition(iter([first, second]), width)
    assert isinstance(X, CsrRows) and X.shape == (30, width) and X.nnz == 60 and X.dtype == np.float32
    np.testing.assert_array_equal(X.toarray(), expected)
    assert y.tolist() == [0] * 12 + [1] * 18
    assert report["min_width"] == report["max_width"] == width and report["bad_features"] == 0
    X, _, _ = read_partition(iter([first, second]), width, sparse_ok=False)
    assert isinstance(X, np.ndarray) and X.flags.c_contiguous
    np.testing.assert_array_equal(X, expected)
    dense_enough = [("sparse", 4, [0, 2], [1.0, 2.0])] * 5          # 50 % stored
    assert 0.5 > SPARSE_MAX_DENSITY
    X, _, _ = read_partition(iter([batch(dense_enough, [0] * 5)]), 4)
    np.testing.assert_array_equal(X, np.tile(np.float32([1, 0, 2, 0]), (5, 1)))


def test_dense_and_sparse_vectors_mix_in_one_partition():
    """VectorAssembler writes each row dense or sparse, whichever is smaller: a partition may hold both, in any
    order of batches."""
    from core.sparse import CsrRows

    width = 50
    dense_rows = [[float(j == i) for j in range(width)] for i in range(3)]
    sparse_rows = [("sparse", width, [5 + i], [3.0]) for i in range(20)]
    expected = np.zeros((23, width), np.float32)
    expected[[0, 1, 2], [0, 1, 2]] = 1
    expected[np.arange(3, 23), np.arange(5, 25)] = 3
    for order in ([batch(dense_rows, [0] * 3), batch(sparse_rows, [1] * 20)],
                  [batch(dense_rows + sparse_rows[:1], [0] * 4), batch(sparse_rows[1:], [1] * 19)]):
        X, _, report = read_partition(iter(order), width)
        assert isinstance(X, CsrRows) and report["max_width"] == width
        np.testing.assert_array_equal(X.toarray(), expected)


@pytest.mark.parametrize("rows,message", [
    ([("sparse", 4, [0], [1.0]), ("sparse", 3, [0], [1.0])], "has vectors of size 4 but layers[0] is 3"),
    ([("sparse", 3, [0], [1.0]), None], "'features' has 1 null value(s)"),
    ([("sparse", 3, [0, 2], [np.nan, np.inf]), ("sparse", 3, [1], [np.inf]), [1, 2, 3]], "has 2 row(s) with NaN"),
])
def test_sparse_vectors_get_the_same_verdicts(rows, message):
    X, _, report = read_partition(iter([batch(rows, [0] * len(rows))]), 3)
    assert message in data_problem([report], 3, 3, "features", "label")
    assert X is None or report["bad_features"]


@pytest.mark.parametrize("missing", [np.nan, None])     # a null vector's fields: NaN on Spark 3.5, None on 4
def test_the_scoring_udf_reads_pandas_vectors_as_the_tasks_read_arrow_ones(missing):
    """A pandas UDF gets a Vector column as a frame of its fields, one array per row: the same rows as the same
    matrix, sparse rows sparse, nulls counted."""
    import pandas as pd

    from core.sparse import CsrRows
    from spark.data import VectorRows

    rows = [("sparse", 40, [3, 17], [1.0, -2.0]), [0.0] * 39 + [5.0], ("sparse", 40, [39], [4.0])]
    frame = pd.DataFrame({"type": [0, 1, 0], "size": [40, missing, 40],
                          "indices": [np.array([3, 17], np.int32), None, np.array([39], np.int32)],
                          "values": [np.array([1.0, -2.0]), np.array(rows[1]), np.array([4.0])]})
    read = VectorRows(40)
    read.add_pandas(frame)
    X = read.matrix(3, sparse_ok=True)
    assert isinstance(X, CsrRows) and X.nnz == 4 and read.nulls == 0 and read.min_width == read.max_width == 40
    arrow, _, _ = read_partition(iter([batch(rows, [0, 1, 0])]), 40)
    np.testing.assert_array_equal(X.toarray(), arrow.toarray())
    nulls = VectorRows(40)
    nulls.add_pandas(pd.DataFrame({"type": [missing, 1], "size": [missing, missing], "indices": [None, None],
                                   "values": [None, np.arange(40.0)]}))
    assert nulls.nulls == 1 and nulls.min_width == nulls.max_width == 40


def array_batch(rows, labels):
    """A training task's Arrow batch as vector_to_array(features, "float32") gives it (a null vector: null)."""
    import pyarrow as pa

    return pa.RecordBatch.from_arrays([pa.array(rows, pa.list_(pa.float32())), pa.array(labels, pa.float64())],
                                      names=["f", "label"])


def test_arrays_read_as_the_vectors_do():
    """Spark 4 hands narrow vectors over as vector_to_array's arrays (reads_arrays): the same matrix, labels and
    report as the struct, and the same verdicts on nulls, widths and NaN rows."""
    rows, labels = [[1, 2, 3], [4, 5, 6], [7, 8, 9]], [0, 1, 2]
    for cut in (1, 2):                                   # a batch boundary anywhere, an empty batch between
        X, y, report = read_partition(iter([array_batch(rows[:cut], labels[:cut]), array_batch([], []),
                                            array_batch(rows[cut:], labels[cut:])]), 3)
        Xs, ys, reports = read_partition(iter([batch(rows, labels)]), 3)
        assert X.dtype == np.float32 and X.flags.c_contiguous
        np.testing.assert_array_equal(X, Xs)
        assert y.tolist() == ys.tolist() and report == reports
    sliced = array_batch(rows, labels).slice(1, 2)       # a batch that views its arrays from an offset
    assert read_partition(iter([sliced]), 3)[0].tolist() == [[4, 5, 6], [7, 8, 9]]
    for arrays, message in (([[1, 2, 3, 4]], "has vectors of size 4 but layers[0] is 3"),
                            ([None], "'features' has 1 null value(s)"),
                            ([[1, np.inf, 3]], "has 1 row(s) with NaN")):
        assert message in verdict([array_batch([[1, 2, 3]], [0])], [array_batch(arrays, [1])])


def test_narrow_vectors_read_as_arrays_on_spark_4_only():
    from types import SimpleNamespace

    from spark.data import ARRAY_READ_MAX_WIDTH, reads_arrays

    assert reads_arrays(SimpleNamespace(version="4.3.0"), 20)
    assert reads_arrays(SimpleNamespace(version="4.0.1"), ARRAY_READ_MAX_WIDTH)
    assert not reads_arrays(SimpleNamespace(version="4.3.0"), ARRAY_READ_MAX_WIDTH + 1)    # sparse stays sparse
    assert not reads_arrays(SimpleNamespace(version="3.5.9"), 20)


def test_pandas_arrays_read_as_the_scoring_udf_gets_them():
    import pandas as pd

    from spark.data import VectorRows

    rows = VectorRows(3)
    rows.add_pandas_arrays(pd.Series([np.array([1, 2, 3], np.float32), None, np.array([4, 5, np.nan], np.float32)]))
    assert rows.nulls == 1 and rows.bad == 1 and (rows.min_width, rows.max_width) == (3, 3)
    rows = VectorRows(3)
    rows.add_pandas_arrays(pd.Series([np.array([1, 2, 3], np.float32), np.array([4, 5, 6], np.float32)]))
    np.testing.assert_array_equal(rows.matrix(2, sparse_ok=True), [[1, 2, 3], [4, 5, 6]])
    short = VectorRows(3)
    short.add_pandas_arrays(pd.Series([np.array([1, 2], np.float32)]))
    assert (short.min_width, short.max_width) == (2, 2)
