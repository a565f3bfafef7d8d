"""Persistence, Pipeline and CrossValidator on local[2]; loading what is not an ffps model is a clear error."""
import os
import re
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


def test_estimator_save_load_round_trip(spark, tmp_path):
    clf = FeedForwardNetworkPSClassifier(layers=[4, 8, 3], mode="eamsgd", communicationWindow=8, rho=0.5,
                                         initialWeights=[0.1] * (4 * 8 + 8 + 8 * 3 + 3), backend="numpy")
    clf.save(str(tmp_path / "clf"))
    back = FeedForwardNetworkPSClassifier.load(str(tmp_path / "clf"))
    assert back.uid == clf.uid
    for name in ("layers", "mode", "communicationWindow", "rho", "initialWeights", "backend", "seed"):
        assert back.getOrDefault(name) == clf.getOrDefault(name), name
    model = FeedForwardNetworkPSClassificationModel(weights=np.zeros(4 * 3 + 3, np.float32), layers=[4, 3])
    model.save(str(tmp_path / "model"))
    with pytest.raises(ValueError, match=r"holds a saved 'spark\.model\.FeedForwardNetworkPSClassificationModel', "
                                         r"not the estimator spark\.estimator\.FeedForwardNetworkPSClassifier; a "
                                         r"trained model loads with its model class's load\(\)"):
        FeedForwardNetworkPSClassifier.load(str(tmp_path / "model"))      # it gave a model without weights
    with pytest.raises(ValueError, match="is not a saved ffps estimator: no readable Spark ML metadata"):
        FeedForwardNetworkPSClassifier.load(str(tmp_path / "nothing"))


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


def small_model(seed=0):
    layers = [4, 16, 3]
    w = np.random.default_rng(seed).standard_normal(4 * 16 + 16 + 16 * 3 + 3).astype(np.float32)
    return FeedForwardNetworkPSClassificationModel(weights=w, layers=layers), w


def test_a_model_that_could_not_score_is_refused_when_built_loaded_or_saved(spark, tmp_path):
    """Weights against layers when the model is built and loaded (a 5-value model of 131 parameters loaded and
    failed inside an executor at transform); a save checks the model and the path before anything is deleted:
    the old model stays, and an existing path without overwrite() is refused as MLlib refuses it."""
    Model = FeedForwardNetworkPSClassificationModel
    good, w = small_model()
    with pytest.raises(ValueError, match=r"weights have 5 values but layers \[4, 16, 3\] have 131 parameters"):
        Model(weights=w[:5], layers=[4, 16, 3])
    with pytest.raises(ValueError, match="weights contain NaN or infinite values"):
        Model(weights=np.where(np.arange(w.size) == 7, np.nan, w), layers=[4, 16, 3])
    path = str(tmp_path / "m")
    good.save(path)
    # data/ of a 5-value model under metadata that agrees with it (as a writer without the check left it)
    meta = [os.path.join(path, "metadata", n) for n in os.listdir(os.path.join(path, "metadata"))
            if n.startswith("part-")][0]
    shutil.rmtree(os.path.join(path, "data"))
    spark.createDataFrame([([4, 16, 3], bytearray(w[:5].tobytes()))], "layers array<int>, weights binary") \
        .write.parquet(os.path.join(path, "data"))
    text = open(meta).read()
    with open(meta, "w") as f:
        f.write(text.replace('"numParams":131', '"numParams":5'))
    os.remove(os.path.join(path, "metadata", f".{os.path.basename(meta)}.crc"))
    with pytest.raises(ValueError, match=r"is damaged: weights have 5 values but layers \[4, 16, 3\] have 131"):
        Model.load(path)
    good.write().overwrite().save(path)
    wrong_thresholds = good.copy()
    wrong_thresholds.set(wrong_thresholds.thresholds, [1.0, 2.0])       # Params.set passes by the setter's check
    for bad, message in ((Model(layers=[4, 16, 3]), "this model has no weights to save"),
                         (wrong_thresholds, r"thresholds must have one value per class \(3")):
        with pytest.raises(ValueError, match=message):
            bad.write().overwrite().save(path)
    np.testing.assert_array_equal(Model.load(path).weights.toArray(), w)           # the old model is still there
    for existing in (path, str(tmp_path)):                                           # a model; anyone's directory
        with pytest.raises(FileExistsError, match=r"already exists\. To overwrite it, use write\(\)\.overwrite\(\)"):
            good.save(existing)
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_an_overwrite_that_fails_midway_keeps_the_old_model(spark, tmp_path, monkeypatch):
    """Classic sessions: the new model is written beside the path and swapped in whole. A write that failed after
    its metadata (a full disk, a lost executor) had already deleted the old model, as Spark ML's writers do."""
    from pyspark.sql import DataFrameWriter

    Model = FeedForwardNetworkPSClassificationModel
    old, w = small_model()
    new = Model(weights=w * 2, layers=[4, 16, 3])
    path = str(tmp_path / "m")
    old.save(path)
    parquet = DataFrameWriter.parquet

    def disk_full(self, target, *a, **kw):
        raise OSError(f"No space left on device: {target}")

    monkeypatch.setattr(DataFrameWriter, "parquet", disk_full)
    with pytest.raises(OSError, match="No space left on device: .*m.ffps-.*saving/data"):
        new.write().overwrite().save(path)
    monkeypatch.setattr(DataFrameWriter, "parquet", parquet)
    np.testing.assert_array_equal(Model.load(path).weights.toArray(), w)
    assert sorted(os.listdir(tmp_path)) == ["m"]                  # nothing written beside it is left
    new.write().overwrite().save(path)
    np.testing.assert_array_equal(Model.load(path).weights.toArray(), w * 2)
    assert sorted(os.listdir(tmp_path)) == ["m"]

    # another writer takes the path between the renames: nothing is lost, and the error says where each model is
    from spark import persistence

    real, calls = persistence._rename, []

    def interloper(fs, src, dst):
        calls.append(str(dst))
        if len(calls) == 2:
            os.makedirs(path)
        return real(fs, src, dst)
    monkeypatch.setattr(persistence, "_rename", interloper)
    with pytest.raises(OSError, match=r"could not be moved into its place \(.* exists\), nor the old one back "
                                      r"\(.* exists\): the old model is at (\S+), the new one at (\S+)") as err:
        old.write().overwrite().save(path)
    kept, fresh = re.search(r"the old model is at (\S+), the new one at (\S+)$", str(err.value)).groups()
    np.testing.assert_array_equal(Model.load(kept).weights.toArray(), w * 2)
    np.testing.assert_array_equal(Model.load(fresh).weights.toArray(), w)


def test_model_and_estimator_pickle_and_repeated_transforms_share_one_broadcast(spark, digits_df):
    """A model goes into a UDF's closure or sc.broadcast: it pickles (a Param's converter was a closure), its
    summary's DataFrames stay behind; transforms of one model reuse one broadcast of the weights (each made a
    new one, a copy of the weights in the driver's temp directory that lasted as long as the session)."""
    import copy
    import pickle

    from pyspark.sql import functions as F

    train, test = digits_df
    est = FeedForwardNetworkPSClassifier(layers=[64, 16, 10], maxIter=2, blockSize=32, seed=1, numWorkers=2,
                                         mode="sync", optimizer="adam", backend="numpy")
    again = pickle.loads(pickle.dumps(est))
    assert again.getMode() == "sync" and again.getOptimizer() == "adam"
    m = est.fit(train)
    assert m.summary.accuracy > 0                      # the summary now holds DataFrames
    back = pickle.loads(pickle.dumps(m))
    np.testing.assert_array_equal(back.weights.toArray(), m.weights.toArray())
    assert back.summary.objectiveHistory == m.summary.objectiveHistory
    first = test.first().features
    predict = F.udf(lambda v: m.predict(v), "double")          # the model in a UDF's closure
    rows = m.transform(test).withColumn("udf", predict("features")).select("prediction", "udf").collect()
    assert all(r.prediction == r.udf for r in rows) and back.predict(first) == m.predict(first)
    assert spark.sparkContext.broadcast(m).value.predict(first) == m.predict(first)
    copy.deepcopy(m)
    temp = spark.sparkContext._temp_dir
    before = set(os.listdir(temp))
    for other in (m, m, m.copy().setPredictionCol("p")):        # 4.8 KB of weights: inside the UDF, no broadcast
        other.transform(test).select(other.getPredictionCol()).collect()
    assert set(os.listdir(temp)) == before
    layers = [64, 1100, 10]                                       # 330 KB: one broadcast, shared by every transform
    big = FeedForwardNetworkPSClassificationModel(layers=layers, weights=np.random.default_rng(0).standard_normal(
        sum((a + 1) * b for a, b in zip(layers, layers[1:]))).astype(np.float32))
    expected = [big.predict(r.features) for r in test.select("features").collect()]
    for make in (lambda: big, lambda: big, lambda: big.copy().setPredictionCol("p")):   # copied after a transform
        other = make()
        got = other.transform(test).select(other.getPredictionCol()).collect()
        assert [r[0] for r in got] == expected
    assert len(set(os.listdir(temp)) - before) == 1
