"""Sparse Vector columns through fit: the training tasks keep them sparse (CSR rows) on the CPU backends and
train the model dense rows of the same values train."""
import numpy as np
import pytest
from pyspark.ml.linalg import Vectors

from spark import FeedForwardNetworkPSClassifier
from tests.spark_helpers import SPARSE_DIGITS_WIDTH, accuracy, spark, sparse_digit_vectors  # noqa: F401


def frame(spark, vectors, y):
    return spark.createDataFrame([(float(label), v) for v, label in zip(vectors, y)], ["label", "features"])


def test_sparse_vectors_train_as_sparse_rows_and_match_dense_training(spark, digits_split):
    Xtr, Xte, ytr, yte = digits_split
    sparse = sparse_digit_vectors(Xtr)
    train_sparse = frame(spark, sparse, ytr).cache()
    dense = [Vectors.dense(v.toArray()) for v in sparse]
    train_dense = frame(spark, dense, ytr).cache()
    est = FeedForwardNetworkPSClassifier(layers=[SPARSE_DIGITS_WIDTH, 32, 10], maxIter=12, blockSize=32,
                                         stepSize=0.5, seed=3, numWorkers=2, mode="sync", backend="numba")
    from_sparse, from_dense = est.fit(train_sparse), est.fit(train_dense)
    workers = [from_sparse.trainingStats["workers"][w] for w in (0, 1)]
    assert all(w["sparse_rows"] for w in workers)
    assert not any(from_dense.trainingStats["workers"][w]["sparse_rows"] for w in (0, 1))
    assert from_sparse.trainingStats["rows"] == len(ytr)
    # the same partitions (createDataFrame slices the rows in order), batches and order: only sums differ
    np.testing.assert_allclose(from_sparse.weights.toArray(), from_dense.weights.toArray(), rtol=1e-3, atol=1e-4)
    test = frame(spark, sparse_digit_vectors(Xte), yte)
    # the encoding drops the pixels' order of intensity: a single process reaches 0.86-0.87 on it (20 passes)
    assert accuracy(from_sparse.transform(test)) >= 0.8
    train_sparse.unpersist()
    train_dense.unpersist()


def test_bad_sparse_rows_are_refused_before_training(spark):
    rows = [(0.0, Vectors.sparse(5, [0, 3], [1.0, 2.0])), (1.0, Vectors.sparse(5, [1], [float("nan")])),
            (1.0, Vectors.sparse(6, [2], [1.0]))]
    est = FeedForwardNetworkPSClassifier(layers=[5, 2], maxIter=1, numWorkers=1, backend="numpy")
    with pytest.raises(ValueError, match="has vectors of size 6 but layers\\[0\\] is 5"):
        est.fit(spark.createDataFrame(rows, ["label", "features"]))
    with pytest.raises(ValueError, match="1 row\\(s\\) with NaN or infinite values"):
        est.fit(spark.createDataFrame(rows[:2], ["label", "features"]))


def test_transform_scores_sparse_rows_as_the_dense_ones(spark, digits_split):
    """transform hands the scoring UDF the Vector as Spark stores it: sparse rows are scored sparse, with the
    probabilities of the same rows dense, and its refusals name the row's problem."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    from spark import FeedForwardNetworkPSClassificationModel

    Xtr, Xte, ytr, yte = digits_split
    rng = np.random.default_rng(9)
    layers = [SPARSE_DIGITS_WIDTH, 12, 10]
    weights = (rng.standard_normal(SPARSE_DIGITS_WIDTH * 12 + 12 + 12 * 10 + 10) * 0.1).astype(np.float32)
    model = FeedForwardNetworkPSClassificationModel(weights=weights, layers=layers)
    sparse = sparse_digit_vectors(Xte[:200])
    dense = [Vectors.dense(v.toArray()) for v in sparse]

    def probabilities(vectors):
        out = model.transform(frame(spark, vectors, yte[:200]))
        return np.array([r[0] for r in out.select(vector_to_array("probability")).collect()])
    np.testing.assert_allclose(probabilities(sparse), probabilities(dense), rtol=1e-5, atol=1e-7)
    small_model = FeedForwardNetworkPSClassificationModel(weights=np.zeros(5 * 2 + 2, np.float32), layers=[5, 2])
    for rows, message in (([Vectors.sparse(6, [2], [1.0])], "feature vectors have width 6 but the model expects 5"),
                          ([Vectors.sparse(5, [2], [float("inf")])],
                           r"rows with NaN or infinite values \(1 in a batch of 1 row,")):
        with pytest.raises(Exception, match=message):
            small_model.transform(frame(spark, rows, [0])).select(F.count("prediction")).collect()


@pytest.mark.parametrize("mode", ["async", "sync", "async-easgd"])
def test_a_hashingtf_pipeline_trains_by_entries(spark, mode):
    """Tokenizer -> HashingTF -> ffps, as a text pipeline runs: the workers keep the rows sparse, and the
    exchanges go by entries (the server answers with the entries changed since each worker's weights; in
    async-easgd its pulls of the center)."""
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import HashingTF, Tokenizer

    rng = np.random.default_rng(4)
    words = [f"w{i}" for i in range(3000)]
    docs = [(float(i % 2), " ".join(rng.choice(words[1500:] if i % 2 else words[:1500], 20))) for i in range(1600)]
    train = spark.createDataFrame(docs[:1200], ["label", "text"])
    test = spark.createDataFrame(docs[1200:], ["label", "text"])
    pipeline = Pipeline(stages=[Tokenizer(inputCol="text", outputCol="words"),
                                HashingTF(inputCol="words", outputCol="features", numFeatures=1 << 14),
                                FeedForwardNetworkPSClassifier(layers=[1 << 14, 8, 2], maxIter=3, blockSize=32,
                                                               stepSize=0.1, seed=2, numWorkers=2, mode=mode,
                                                               backend="numba")])
    model = pipeline.fit(train)
    stats = model.stages[-1].trainingStats
    assert all(stats["workers"][w]["sparse_rows"] for w in (0, 1))
    server = stats["server"]
    # sync: every round is answered by entries; async: a worker that waited while the other pushed several
    # windows may be owed more entries than the log keeps, or than a whole vector's bytes, and gets the vector
    assert server["delta_replies"] >= (1.0 if mode == "sync" else 0.8) * server["applied"], server
    assert accuracy(model.transform(test)) > 0.9
