"""Persistence, Pipeline and CrossValidator on local[2]; loading what is not an ffps model is a clear error."""
import os
import shutil

import numpy as np
import pytest

from tests.spark_helpers import accuracy, digits_df, spark  # noqa: F401 - fixtures

from spark import FeedForwardNetworkPSClassificationModel, FeedForwardNetworkPSClassifier

pytestmark = pytest.mark.timeout(600)


def probabilities(frame):
    return np.array([r.probability.toArray() for r in frame.orderBy("id").select("probability").collect()])


@pytest.fixture(scope="module")
def model(digits_df):
    return FeedForwardNetworkPSClassifier(layers=[64, 32, 10], maxIter=15, blockSize=32, seed=2,
                                          backend="numba").fit(digits_df[0])


def test_model_save_load_round_trip(model, digits_df, tmp_path):
    from pyspark.sql import functions as F

    test = digits_df[1].withColumn("id", F.monotonically_increasing_id())
    path = str(tmp_path / "model")
    model.save(path)
    loaded = FeedForwardNetworkPSClassificationModel.load(path)
    assert loaded.uid == model.uid
    assert loaded.getLayers() == [64, 32, 10] and loaded.getMaxIter() == 15 and loaded.getMode() == "async"
    np.testing.assert_array_equal(loaded.weights.toArray(), model.weights.toArray())
    np.testing.assert_array_equal(probabilities(loaded.transform(test)), probabilities(model.transform(test)))
    with pytest.raises(Exception, match="already exists"):
        model.save(path)
    model.write().overwrite().save(path)       # overwrite works like every Spark ML writer


def test_estimator_save_load_round_trip(tmp_path):
    clf = FeedForwardNetworkPSClassifier(layers=[4, 8, 3], mode="eamsgd", communicationWindow=8, rho=0.5,
                                         initialWeights=[0.1] * (4 * 8 + 8 + 8 * 3 + 3), backend="numpy")
    clf.save(str(tmp_path / "clf"))
    back = FeedForwardNetworkPSClassifier.load(str(tmp_path / "clf"))
    assert back.uid == clf.uid
    for name in ("layers", "mode", "communicationWindow", "rho", "initialWeights", "backend", "seed"):
        assert back.getOrDefault(name) == clf.getOrDefault(name), name


def test_pipeline_fit_save_load_identical_predictions(spark, digits_split, tmp_path):
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.feature import StandardScaler, VectorAssembler

    Xtr, Xte, ytr, yte = digits_split
    cols = [f"p{i}" for i in range(64)]

    def frame(X, y):
        return spark.createDataFrame([(i, float(lab), *map(float, row)) for i, (row, lab) in enumerate(zip(X, y))],
                                     ["id", "label", *cols])
    train, test = frame(Xtr, ytr), frame(Xte, yte)
    pipeline = Pipeline(stages=[
        VectorAssembler(inputCols=cols, outputCol="raw"),
        StandardScaler(inputCol="raw", outputCol="features"),
        FeedForwardNetworkPSClassifier(layers=[64, 32, 10], maxIter=15, blockSize=32, stepSize=0.05, seed=4,
                                       backend="numba"),
    ])
    fitted = pipeline.fit(train)
    path = str(tmp_path / "pipeline")
    fitted.save(path)
    loaded = PipelineModel.load(path)
    assert isinstance(loaded.stages[-1], FeedForwardNetworkPSClassificationModel)
    before, after = fitted.transform(test), loaded.transform(test)
    np.testing.assert_array_equal(probabilities(after), probabilities(before))
    assert accuracy(after) >= 0.9
    # the unfitted pipeline round-trips too
    pipeline.save(str(tmp_path / "unfitted"))
    assert isinstance(Pipeline.load(str(tmp_path / "unfitted")).getStages()[-1], FeedForwardNetworkPSClassifier)


def test_cross_validator_over_layers_and_step_size(digits_df):
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

    clf = FeedForwardNetworkPSClassifier(maxIter=8, blockSize=32, seed=5, backend="numba")
    grid = (ParamGridBuilder().addGrid(clf.layers, [[64, 10], [64, 32, 10]])
            .addGrid(clf.stepSize, [0.001, 0.1]).build())
    cv = CrossValidator(estimator=clf, estimatorParamMaps=grid, numFolds=2, seed=0,
                        evaluator=MulticlassClassificationEvaluator(metricName="accuracy"))
    cv_model = cv.fit(digits_df[0])
    assert len(cv_model.avgMetrics) == 4
    best = cv_model.bestModel
    assert isinstance(best, FeedForwardNetworkPSClassificationModel)
    assert best.getStepSize() == 0.1                 # a step size of 0.001 barely moves in 8 passes
    chosen = grid[int(np.argmax(cv_model.avgMetrics))]   # the best model carries the winning grid point's params
    assert best.getLayers() == chosen[clf.layers] and best.getStepSize() == chosen[clf.stepSize]
    assert accuracy(best.transform(digits_df[1])) >= 0.9


def test_loading_something_else_is_a_clear_error(spark, model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is not a saved ffps model: no readable Spark ML metadata"):
        FeedForwardNetworkPSClassificationModel.load(str(empty))
    with pytest.raises(ValueError, match="is not a saved ffps model"):
        FeedForwardNetworkPSClassificationModel.load(str(tmp_path / "missing"))
    from pyspark.ml.feature import VectorAssembler

    other = str(tmp_path / "assembler")
    VectorAssembler(inputCols=["a"], outputCol="v").save(other)
    with pytest.raises(ValueError, match="holds a saved 'org.apache.spark.ml.feature.VectorAssembler', not an ffps"):
        FeedForwardNetworkPSClassificationModel.load(other)


def test_a_model_saved_under_the_old_module_path_loads(spark, model, tmp_path, digits_df):
    """Models saved before the model class moved from spark.estimator to spark.model: alone and in a Pipeline."""
    import json

    from pyspark.ml import PipelineModel

    path = str(tmp_path / "old")
    PipelineModel(stages=[model]).save(path)
    stage_dir = os.path.join(path, "stages", os.listdir(os.path.join(path, "stages"))[0])
    for name in os.listdir(os.path.join(stage_dir, "metadata")):
        if name.startswith("part-"):
            meta_file = os.path.join(stage_dir, "metadata", name)
            meta = json.loads(open(meta_file).read())
            assert meta["class"] == "spark.model.FeedForwardNetworkPSClassificationModel"
            meta["class"] = "spark.estimator.FeedForwardNetworkPSClassificationModel"
            with open(meta_file, "w") as f:
                f.write(json.dumps(meta))
            os.remove(os.path.join(stage_dir, "metadata", f".{name}.crc"))     # Hadoop checks it
    alone = FeedForwardNetworkPSClassificationModel.load(stage_dir)
    np.testing.assert_array_equal(alone.weights.toArray(), model.weights.toArray())
    again = PipelineModel.load(path).stages[0]
    assert isinstance(again, FeedForwardNetworkPSClassificationModel)
    np.testing.assert_array_equal(again.weights.toArray(), model.weights.toArray())


def test_loading_a_damaged_model_is_a_clear_error(spark, model, tmp_path):
    path = str(tmp_path / "m")
    model.save(path)
    shutil.rmtree(os.path.join(path, "data"))
    with pytest.raises(ValueError, match="is damaged: its weights .data/. cannot be read"):
        FeedForwardNetworkPSClassificationModel.load(path)
    # weights of the wrong length (as if truncated)
    spark.createDataFrame([([64, 32, 10], bytearray(b"\0" * 12))], "layers array<int>, weights binary") \
        .write.parquet(os.path.join(path, "data"))
    with pytest.raises(ValueError, match="is damaged: 12 bytes of weights"):
        FeedForwardNetworkPSClassificationModel.load(path)
    # metadata that is not JSON
    path2 = str(tmp_path / "m2")
    model.save(path2)
    for name in os.listdir(os.path.join(path2, "metadata")):
        if name.startswith("part-"):
            with open(os.path.join(path2, "metadata", name), "w") as f:
                f.write("{not json")
    with pytest.raises(ValueError, match="is not a saved ffps model: no readable Spark ML metadata"):
        FeedForwardNetworkPSClassificationModel.load(path2)
