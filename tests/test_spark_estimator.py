"""The estimator on local[2]: every mode learns digits, transform's columns, and each bad input's error."""
import logging
import re

import numpy as np
import pytest

from tests.spark_helpers import accuracy, digits_df, spark  # noqa: F401 - fixtures

from spark import FeedForwardNetworkPSClassificationModel, FeedForwardNetworkPSClassifier

pytestmark = pytest.mark.timeout(600)

MODE_SETTINGS = {   # 2 workers, blockSize 32: settings with a margin above 96% on this split
    "sync": dict(stepSize=0.3, maxIter=40),
    "async": dict(stepSize=0.1, maxIter=40),
    "easgd": dict(stepSize=0.2, communicationWindow=2, maxIter=60),
    "async-easgd": dict(stepSize=0.2, communicationWindow=2, maxIter=60),
    "eamsgd": dict(stepSize=0.01, communicationWindow=2, momentum=0.9, maxIter=60),
}


def make(**kw):
    base = dict(layers=[64, 100, 10], maxIter=30, blockSize=32, seed=1, numWorkers=2, backend="numba")
    base.update(kw)
    return FeedForwardNetworkPSClassifier(**base)


@pytest.fixture(scope="module")
def async_model(digits_df):
    return make(mode="async").fit(digits_df[0])


@pytest.mark.parametrize("mode", list(MODE_SETTINGS))
def test_each_mode_learns_digits(digits_df, mode):
    train, test = digits_df
    model = make(mode=mode, **MODE_SETTINGS[mode]).fit(train)
    acc = accuracy(model.transform(test))
    stats = model.trainingStats
    assert stats["attempts"] == 1
    assert sorted(stats["workers"]) == [0, 1]
    assert stats["server"]["applied"] > 0
    assert acc >= 0.96, f"mode {mode}: test accuracy {acc:.4f}"
    assert stats["warnings"] == []                      # it learned: no word about chance level


def test_a_model_that_learned_nothing_is_said(spark, caplog):
    """Features that say nothing about the labels: the fit succeeds, and says its loss stayed at chance level
    (the best it can do is the class shares, 0.25 / 0.5 / 0.25: loss 1.04 against ln 3 = 1.10). A seed of its
    own (Spark's default seed hashes a string: it differs per process) and 12 epochs, so the loss has settled
    at that floor (over 4 epochs, one process's initial weights gave a loss falling every epoch from 1.31)."""
    import logging

    data = small(spark, labels=(0.0, 1.0, 2.0, 1.0) * 10)
    with caplog.at_level(logging.WARNING, logger="spark.estimator"):
        model = FeedForwardNetworkPSClassifier(layers=[3, 8, 3], maxIter=12, blockSize=4, numWorkers=1, tol=0.0,
                                               seed=0, backend="numpy").fit(data)
    (warning,) = model.trainingStats["warnings"]
    assert "learned next to nothing: the mean training loss of epoch 12 is" in warning
    assert "against ln(3) = 1.099 for a uniform guess among 3 classes" in warning and "stepSize (0.1)" in warning
    assert "Features that say little about the labels" in warning     # the loss neither overshot nor still falls
    assert [r.message for r in caplog.records if r.name == "spark.estimator"] == [f"ffps: {warning}"]


def test_not_learned_needs_two_epochs_near_chance():
    from spark.estimator import not_learned

    epoch = [{"epoch": 1, "loss": 17.3}, {"epoch": 2, "loss": 2.178}]
    assert "epoch 2 is 2.178, against ln(10) = 2.303" in not_learned(epoch, 10, 0.1)
    assert not_learned(epoch[:1], 10, 0.1) is None                     # one epoch: too early to say
    assert not_learned(epoch[:1] + [{"epoch": 2, "loss": 2.0}], 10, 0.1) is None    # below 0.9 ln 10 = 2.07
    assert not_learned(epoch[:1] + [{"epoch": 2, "loss": float("nan")}], 10, 0.1) is None


def test_not_learned_advice_follows_the_losses():
    """Losses measured on digits ([64, 32, 10], 2 workers): raw pixels overshoot, a small stepSize is still
    falling at the end, a flat loss gets the general advice."""
    from spark.estimator import not_learned

    def said(losses, step):
        return not_learned([{"epoch": i + 1, "loss": v} for i, v in enumerate(losses)], 10, step)

    raw = said([8.906, 2.087, 2.232], 0.1)                          # overshoot first, then near chance
    assert "(8.906) far above chance" in raw and "or lower stepSize" in raw and "raise" not in raw
    slow = said([2.596, 2.469, 2.365, 2.291, 2.234, 2.187, 2.145, 2.109], 0.003)
    assert "still falls every epoch (2.596 in the first): too small a stepSize (0.003) for 8 epochs" in slow
    assert "raise stepSize or maxIter" in slow and "lower stepSize" not in slow
    flat = said([2.31, 2.25, 2.26, 2.25], 0.1)                      # not falling every epoch
    assert "Features that say little about the labels" in flat and "try another stepSize" in flat
    crawling = said([2.31, 2.30, 2.295], 0.1)                       # falling, by less than 1 % of ln 10 at the end
    assert "Features that say little about the labels" in crawling
    # raw digits, 100 passes, 0.2 accuracy: the loss went back up, short of the chance band
    back = said([9.65, 1.58, 1.54, 1.22, 0.77, 1.13, 2.14, 2.01, 2.02], 0.1)
    assert back.startswith("training went back: the mean training loss fell to 0.770 in epoch 5 and ended at "
                           "2.020 in epoch 9") and "StandardScaler) or lower stepSize (0.1)" in back
    assert said([1.9, 0.40, 0.31, 0.30, 0.33], 0.1) is None         # async noise near the floor: no warning
    assert said([0.9, 0.05, 0.02, 0.1], 0.1) is None                # 5x the lowest, but 0.08 < 0.1 ln 10 above it


def test_the_pipelined_exchange_learns_digits(digits_df):
    """pipelineExchange: each task pushes and pulls window k on a thread while window k+1 computes."""
    train, test = digits_df
    model = make(mode="async", stepSize=0.1, maxIter=40, communicationWindow=4, pipelineExchange=True).fit(train)
    workers = model.trainingStats["workers"].values()
    assert all(w["pipelined"] and w["pushes"] > 0 for w in workers)
    assert model.trainingStats["server"]["rejected_total"] == 0
    acc = accuracy(model.transform(test))
    assert acc >= 0.96, f"pipelined: test accuracy {acc:.4f}"


def test_transform_columns_like_spark_probabilistic_classifiers(async_model, digits_df):
    test = digits_df[1]
    out = async_model.transform(test)
    assert out.columns == test.columns + ["rawPrediction", "probability", "prediction"]
    rows = out.select("rawPrediction", "probability", "prediction").collect()
    raw = np.array([r.rawPrediction.toArray() for r in rows])
    prob = np.array([r.probability.toArray() for r in rows])
    pred = np.array([r.prediction for r in rows])
    assert raw.shape == prob.shape == (test.count(), 10)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-9)
    np.testing.assert_array_equal(pred, raw.argmax(axis=1))
    np.testing.assert_allclose(raw.sum(axis=1), 0.0, atol=1e-9)             # the logits less their row mean
    e = np.exp(raw - raw.max(axis=1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(axis=1, keepdims=True), prob, rtol=1e-9)
    # the driver-side single-vector API agrees with the distributed transform
    first = test.first()
    assert async_model.predict(first.features) == pred[0]
    np.testing.assert_allclose(async_model.predictProbability(first.features).toArray(), prob[0], rtol=1e-5)
    np.testing.assert_allclose(async_model.predictRaw(first.features).toArray(), raw[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="3 features per row but layers\\[0\\] is 64"):
        async_model.predict([1.0, 2.0, 3.0])


def test_one_row_methods_from_serving_threads_agree_with_the_reference():
    """predict & co. keep a network per thread and layer sizes: 4 threads at once, two models of different sizes
    in turn, each answer equal to the float64 reference of its own model and row. (A block of 128 rows, of which
    the methods answer for the first, keeps each forward long enough for a shared workspace to be overwritten.)"""
    from concurrent.futures import ThreadPoolExecutor

    from core import FeedForwardNetwork

    rng = np.random.default_rng(3)
    models, rows, expected = [], [], []
    for layers in ([64, 256, 256, 10], [64, 32, 32, 3]):
        ref = FeedForwardNetwork(layers, backend="numpy", dtype="float64")
        w = ref.init_params(seed=len(layers)).astype(np.float32)
        X = rng.normal(size=(400, 64)).astype(np.float32)
        models.append(FeedForwardNetworkPSClassificationModel(weights=w, layers=layers))
        rows.append(X)
        expected.append(ref.predict_proba(w.astype(np.float64), X.astype(np.float64)))

    def score(k):
        i, r = k % 2, k // 2 % 272
        block = rows[i][r:r + 128]
        return i, r, models[i].predictProbability(block).toArray(), models[i].predict(block)

    with ThreadPoolExecutor(4) as pool:
        for i, r, prob, pred in pool.map(score, range(240)):
            np.testing.assert_allclose(prob, expected[i][r], rtol=1e-4, atol=1e-6)
            assert pred == float(expected[i][r].argmax())


def test_scores_go_out_per_class_or_as_lists_alike(async_model, digits_df, monkeypatch):
    """Up to PER_CLASS_MAX classes the scoring UDF returns a double field per class (Arrow takes the columns
    as they are); above, lists. Both give the same vectors, sizes and predictions."""
    import spark.predict as predict

    test = digits_df[1]
    assert predict.result_type(10).count(":double") == 21
    assert predict.result_type(predict.PER_CLASS_MAX + 1) == predict.LISTS_RESULT_TYPE

    def scores():
        out = async_model.transform(test)
        return out, [(tuple(r.rawPrediction.toArray()), tuple(r.probability.toArray()), r.prediction)
                     for r in out.select("rawPrediction", "probability", "prediction").collect()]
    per_class, fields = scores()
    monkeypatch.setattr(predict, "PER_CLASS_MAX", 9)                  # 10 classes: lists
    lists, listed = scores()
    assert fields == listed and len(fields) == test.count()
    assert per_class.schema == lists.schema
    plans = [str(frame._jdf.queryExecution().analyzed()) for frame in (per_class, lists)]   # the path each took
    assert re.search(r"__ffps_out#\d+\.r9\b", plans[0]) and ".raw" not in plans[0]
    assert re.search(r"__ffps_out#\d+\.raw\b", plans[1]) and ".r9" not in plans[1]


def test_thresholds_pick_the_largest_probability_over_threshold(async_model, digits_df, tmp_path):
    """MLlib's rule: the class with the largest p / t; a 0 threshold wins its class; one per class."""
    test = digits_df[1]
    t = [1.0] * 10
    t[3] = 0.02                                           # class 3 is predicted far more often
    m = async_model.copy().setThresholds(t)
    rows = m.transform(test).select("probability", "prediction").collect()
    prob = np.array([r.probability.toArray() for r in rows])
    pred = np.array([r.prediction for r in rows])
    np.testing.assert_array_equal(pred, (prob / np.array(t)).argmax(axis=1))
    assert (pred == 3).sum() > (prob.argmax(axis=1) == 3).sum()       # they changed the answer
    assert m.predict(test.first().features) == pred[0]
    m.save(str(tmp_path / "m"))
    back = FeedForwardNetworkPSClassificationModel.load(str(tmp_path / "m"))
    assert back.getThresholds() == t and back.predict(test.first().features) == pred[0]
    zero = [1.0] * 10
    zero[7] = 0.0
    assert {r.prediction for r in async_model.copy().setThresholds(zero).transform(test).collect()} == {7.0}
    for bad, message in (([1.0] * 9, "thresholds must have one value per class \\(10, layers\\[-1\\]\\), got 9"),
                         ([0.0, 0.0] + [1.0] * 8, "at most one 0"), ([-1.0] + [1.0] * 9, "values >= 0")):
        with pytest.raises(ValueError, match=message):               # when set, not at the next transform
            async_model.copy().setThresholds(bad)
        with pytest.raises(ValueError, match=message):               # a fit says so before any job
            make(thresholds=bad).fit(test)
    wrong = async_model.copy()
    wrong.set(wrong.thresholds, [1.0] * 9)                           # Params.set passes by the setter's check
    with pytest.raises(ValueError, match="one value per class"):
        wrong.transform(test)


def test_output_columns_carry_mllibs_ml_attributes(async_model, digits_df):
    """The vector sizes and the nominal prediction, as MLlib's MLPC sets them: VectorAssembler with
    handleInvalid='keep' over the probability column (stacking) needs the size."""
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.feature import VectorAssembler

    train, test = digits_df
    ours = async_model.transform(test)
    mllib = MultilayerPerceptronClassifier(layers=[64, 10], maxIter=1, seed=1).fit(train).transform(test)
    for column in ("rawPrediction", "probability", "prediction"):
        assert ours.schema[column].metadata == mllib.schema[column].metadata != {}, column
    stacked = VectorAssembler(inputCols=["probability"], outputCol="stack", handleInvalid="keep").transform(ours)
    assert stacked.first().stack.size == 10


def test_solver_gd_is_taken_and_l_bfgs_is_refused_by_name():
    assert FeedForwardNetworkPSClassifier(solver="gd").getSolver() == "gd"
    with pytest.raises(ValueError, match="solver 'l-bfgs' is not available: ffps trains by mini-batch gradient"):
        FeedForwardNetworkPSClassifier(solver="l-bfgs")
    text = FeedForwardNetworkPSClassifier().explainParams()
    assert "blockSize: rows of each mini-batch step of a worker" in text and "thresholds:" in text


def test_transform_of_a_frame_read_from_parquet(async_model, digits_df, tmp_path):
    """A Vector column read back from Parquet: Spark 4.3 fed pandas UDFs over such a scan through a columnar
    path that cannot carry Vectors (UNSUPPORTED_DATATYPE); the predictions match the in-memory frame's."""
    from spark.predict import keep_vector_frames_on_the_row_path

    test = digits_df[1]
    test.write.parquet(str(tmp_path / "test.parquet"))
    back = test.sparkSession.read.parquet(str(tmp_path / "test.parquet"))

    def predictions(frame):      # rows come back from Parquet in another order: keyed by their features
        rows = async_model.transform(frame).select("features", "prediction").collect()
        return sorted((tuple(r.features.toArray()), r.prediction) for r in rows)
    assert predictions(back) == predictions(test)
    assert keep_vector_frames_on_the_row_path(back.select("label")) is False    # no Vector column: no change


def test_output_columns_can_be_renamed_or_dropped(async_model, digits_df):
    m = async_model.copy({async_model.rawPredictionCol: "", async_model.predictionCol: "yhat"})
    assert m.transform(digits_df[1]).columns == digits_df[1].columns + ["probability", "yhat"]
    assert async_model.getPredictionCol() == "prediction"   # copy did not touch the original


@pytest.mark.parametrize("column,param", [("prediction", "predictionCol"), ("probability", "probabilityCol"),
                                          ("rawPrediction", "rawPredictionCol")])
def test_an_output_column_already_in_the_input_is_refused(async_model, digits_df, column, param):
    """As MLlib's classifiers ('requirement failed: Column prediction already exists'): nothing is overwritten,
    and the error comes before any job."""
    from pyspark.sql import functions as F

    scored = digits_df[1].withColumn(column, F.lit(1.0))
    with pytest.raises(ValueError, match=f"column '{column}' already exists in the input; drop it, or set {param}"):
        async_model.transform(scored)
    renamed = async_model.copy({getattr(async_model, param): column + "2"})
    assert column + "2" in renamed.transform(scored).columns
    with pytest.raises(ValueError, match=f"column '{column}' already exists in the input; drop it, or set {param}"):
        make(maxIter=1).fit(scored)      # at fit too, as MLlib: the model could not score its training frame


def test_two_outputs_of_one_name_are_refused_and_an_input_of_the_private_name_kept(async_model, digits_df):
    """predictionCol == probabilityCol wrote one over the other without a word (MLlib refuses it); the scoring
    struct's own column once took a user's column of its name and dropped it."""
    from pyspark.sql import functions as F

    test = digits_df[1]
    for same in ({"predictionCol": "x", "probabilityCol": "x"}, {"rawPredictionCol": "x", "probabilityCol": "X"}):
        first, second = [p for p in ("rawPredictionCol", "probabilityCol", "predictionCol") if p in same]
        with pytest.raises(ValueError, match=f"^{first} and {second} both name the column '[xX]'"):
            async_model.copy({getattr(async_model, k): v for k, v in same.items()}).transform(test)
        with pytest.raises(ValueError, match=f"^{first} and {second} both name the column '[xX]'"):
            make(maxIter=1, **same).fit(test)
    with pytest.raises(ValueError, match="column 'FEATURES' already exists in the input \\(as 'features': Spark"):
        async_model.copy({async_model.predictionCol: "FEATURES"}).transform(test)
    both = test.withColumn("__ffps_out", F.lit(7.0)).withColumn("__FFPS_OUT1", F.lit(8.0))
    out = async_model.transform(both)
    assert out.columns == both.columns + ["rawPrediction", "probability", "prediction"]
    assert {(r["__ffps_out"], r["__FFPS_OUT1"]) for r in out.select("__ffps_out", "__FFPS_OUT1").collect()} \
        == {(7.0, 8.0)}
    mine = [r.prediction for r in out.select("prediction").collect()]
    assert mine == [r.prediction for r in async_model.transform(test).select("prediction").collect()]
    named = async_model.copy({async_model.predictionCol: "__ffps_out"}).transform(test)   # an output's name
    assert named.columns == test.columns + ["rawPrediction", "probability", "__ffps_out"]
    assert [r["__ffps_out"] for r in named.select("__ffps_out").collect()] == mine


def test_a_binary_models_raw_prediction_ranks_rows_as_its_probability(spark):
    """BinaryClassificationEvaluator scores by rawPrediction[1] by default: centred, it is half the log-odds, so
    the area under ROC is the probability's (on the logits themselves a weak model ranked rows otherwise)."""
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.linalg import Vectors

    from core import FeedForwardNetwork

    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 6))
    y = (X[:, 0] + 0.8 * rng.normal(size=300) > 0).astype(float)
    frame = spark.createDataFrame([(float(t), Vectors.dense(r)) for r, t in zip(X, y)], ["label", "features"])
    w = rng.normal(size=FeedForwardNetwork([6, 4, 2], backend="numpy").num_params).astype(np.float32)
    w[-2:] = [3.0, -2.0]                           # biases far apart: logit[1] alone ranks rows by other means
    out = FeedForwardNetworkPSClassificationModel(weights=w, layers=[6, 4, 2]).transform(frame)
    rows = out.select("rawPrediction", "probability").collect()
    raw = np.array([r.rawPrediction.toArray() for r in rows])
    prob = np.array([r.probability.toArray() for r in rows])
    np.testing.assert_allclose(raw[:, 1], 0.5 * np.log(prob[:, 1] / prob[:, 0]), rtol=1e-6, atol=1e-9)
    by_raw = BinaryClassificationEvaluator().evaluate(out)
    by_prob = BinaryClassificationEvaluator(rawPredictionCol="probability").evaluate(out)
    assert by_raw == pytest.approx(by_prob, abs=1e-12)


def test_summaries_of_a_model_without_a_prediction_column_use_a_temporary_one(async_model, digits_df):
    """predictionCol '' (no such column): summary() and evaluate() score with prediction_<uid>, as MLlib's."""
    train, test = digits_df
    quiet = make(maxIter=3, predictionCol="").fit(train)
    named = quiet.copy({quiet.predictionCol: "p"})
    assert quiet.summary().accuracy == named.evaluate(train).accuracy > 0.5
    assert quiet.summary().predictionCol == f"prediction_{quiet.uid}"
    assert quiet.evaluate(test).weightedFMeasure() == named.evaluate(test).weightedFMeasure()
    assert quiet.getPredictionCol() == "" and not {"prediction", "p"} & set(quiet.transform(test).columns)


def test_model_carries_params_and_weights(async_model):
    assert async_model.numFeatures == 64 and async_model.numClasses == 10
    assert len(async_model.weights) == 64 * 100 + 100 + 100 * 10 + 10
    assert async_model.getMode() == "async" and async_model.getLayers() == [64, 100, 10]
    assert "maxIter" in async_model.explainParams()
    assert repr(async_model) == (f"FeedForwardNetworkPSClassificationModel: uid={async_model.uid}, "
                                 f"layers=[64, 100, 10], numClasses=10, numFeatures=64")     # as MLlib's models
    empty = FeedForwardNetworkPSClassificationModel()
    assert repr(empty) == f"FeedForwardNetworkPSClassificationModel: uid={empty.uid}"


def test_initial_weights_are_used(spark, digits_df):
    # zero epochs of effect: with stepSize tiny the model stays at the given initial weights
    w0 = np.random.RandomState(0).standard_normal(64 * 10 + 10).astype(np.float32) * 0.01
    model = FeedForwardNetworkPSClassifier(layers=[64, 10], maxIter=1, stepSize=1e-30, initialWeights=w0.tolist(),
                                           numWorkers=1, backend="numpy").fit(digits_df[0])
    np.testing.assert_allclose(model.weights.toArray(), w0, rtol=1e-6)


# ---------------------------------------------------------------- bad inputs: clear errors before training
def frame(spark, rows, schema="label double, features vector"):
    from pyspark.ml.linalg import VectorUDT  # noqa: F401 - the DDL type name needs the UDT registered
    from pyspark.sql.types import DoubleType, StructField, StructType

    if schema == "label double, features vector":
        schema = StructType([StructField("label", DoubleType()), StructField("features", VectorUDT())])
    return spark.createDataFrame(rows, schema)


def small(spark, labels=(0.0, 1.0, 2.0, 1.0), width=3, value=0.5):
    from pyspark.ml.linalg import Vectors

    return frame(spark, [(lab, Vectors.dense([value] * width)) for lab in labels])


BAD_PARAMS = [
    (dict(layers=None), "layers is not set"),
    (dict(layers=[3]), "at least two sizes"),
    (dict(layers=[3, 0, 3]), "must be positive"),
    (dict(numWorkers=0), "numWorkers must be an integer >= 1, got 0"),
    (dict(maxIter=0), "maxIter must be an integer >= 1, got 0"),
    (dict(blockSize=0), "blockSize must be an integer >= 1, got 0"),
    (dict(stepSize=-1.0), "stepSize must be a positive number, got -1.0"),
    (dict(momentum=1.5), "momentum must be in [0, 1), got 1.5"),
    (dict(mode="sync", communicationWindow=3), "communicationWindow must be 1 in sync mode, got 3"),
    (dict(mode="easgd", maxStaleness=2), "maxStaleness applies to mode='async' only"),
    (dict(mode="easgd", optimizer="momentum"), "optimizer='momentum' applies to the gradient modes (sync, async)"),
    (dict(mode="sync", rho=0.5), "rho=0.5 applies to the elastic modes (easgd, async-easgd, eamsgd), not mode='sync'"),
    (dict(momentum=0.5), "momentum=0.5 applies to optimizer='momentum' or 'nesterov' and to mode='eamsgd', not "
                         "optimizer='sgd' in mode='async'"),
    (dict(checkpointInterval=20), "checkpointInterval=20 needs checkpointDir: without a directory no checkpoint "
                                  "is written"),
    (dict(initialWeights=[0.0] * 5), "initialWeights has 5 values but layers [3, 3] have 12 parameters"),
    (dict(psHost="no-such-host.invalid"), "psHost 'no-such-host.invalid' does not resolve"),
    (dict(psHost="0.0.0.0"), "psHost '0.0.0.0' is a wildcard: executors connect to psHost"),
    (dict(psHost="::1"), "psHost '::1' looks like an IPv6 address, which the parameter server does not support"),
    (dict(psHost="10.0.0.7:40123"), "psHost '10.0.0.7:40123' has a port: psHost takes the address alone; set psPort"),
    (dict(numWorkers=3), "numWorkers=3 needs 3 training tasks running at once (a barrier stage), but master "
                         "'local[2]' runs at most 2 (spark.task.cpus=1); set numWorkers to 2 or less"),
]


@pytest.mark.parametrize("params,message", BAD_PARAMS, ids=[m for _, m in BAD_PARAMS])
def test_bad_params_fail_before_any_job(spark, params, message):
    kw = dict(layers=[3, 3], numWorkers=1, backend="numpy")
    kw.update(params)
    if kw["layers"] is None:
        del kw["layers"]
    clf = FeedForwardNetworkPSClassifier(**kw)
    tracker = spark.sparkContext.statusTracker()
    jobs_before = set(tracker.getJobIdsForGroup())
    with pytest.raises(ValueError) as err:
        clf.fit(small(spark))
    assert message in str(err.value)
    assert set(tracker.getJobIdsForGroup()) == jobs_before, "a Spark job ran before the error"


def test_a_fixed_ps_port_taken_by_a_concurrent_fit_says_so(spark, monkeypatch):
    """CrossValidator(parallelism=2) under a fixed psPort: the second fit could not bind, with nothing saying
    that the other fit held the port. The clash is staged here: the port taken by a socket, a fit beside."""
    import socket

    from spark import estimator

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        clf = FeedForwardNetworkPSClassifier(layers=[3, 3], numWorkers=1, backend="numpy", psPort=port)
        with pytest.raises(OSError, match="cannot bind parameter server") as alone:
            clf.fit(small(spark))
        assert "another ffps fit" not in str(alone.value)
        monkeypatch.setattr(estimator.FITS, "concurrent", lambda: True)
        with pytest.raises(OSError, match="another ffps fit runs in this process .* each fit's server needs a port "
                                          "of its own: leave psPort at 0"):
            clf.fit(small(spark))


def test_bad_choice_params_fail_at_set_time():
    with pytest.raises(ValueError, match="mode must be one of .* got 'downpour'"):
        FeedForwardNetworkPSClassifier(mode="downpour")
    with pytest.raises(ValueError, match="backend must be one of .* got 'tpu'"):
        FeedForwardNetworkPSClassifier(backend="tpu")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        FeedForwardNetworkPSClassifier(optimizer="lbfgs")
    # not a string: pyspark 3.5's own converter failed on NumPy 2 with "np.string_ was removed"
    with pytest.raises(TypeError, match="mode must be a string, one of sync, .*; got 3"):
        FeedForwardNetworkPSClassifier(mode=3)
    with pytest.raises(TypeError, match="psHost must be a string, got 10"):
        FeedForwardNetworkPSClassifier(psHost=10)
    with pytest.raises(TypeError, match="solver must be a string, one of gd; got 1"):
        FeedForwardNetworkPSClassifier().setSolver(1)


def test_bad_columns(spark):
    from pyspark.ml.linalg import Vectors

    clf = FeedForwardNetworkPSClassifier(layers=[3, 3], numWorkers=1, backend="numpy")
    df = small(spark)
    with pytest.raises(ValueError, match="featuresCol 'feats' is not a column"):
        clf.copy({clf.featuresCol: "feats"}).fit(df)
    with pytest.raises(ValueError, match="labelCol 'y' is not a column"):
        clf.copy({clf.labelCol: "y"}).fit(df)
    arrays = spark.createDataFrame([(0.0, [1.0, 2.0, 3.0])], "label double, features array<double>")
    with pytest.raises(ValueError, match="must be a Vector column .* got array<double>"):
        clf.fit(arrays)
    strings = spark.createDataFrame([("a", Vectors.dense([1.0, 2.0, 3.0]))], ["label", "features"])
    with pytest.raises(ValueError, match="labelCol 'label' must be numeric .* got string"):
        clf.fit(strings)


@pytest.mark.parametrize("kind,message", [
    ("width", "has vectors of size 4 but layers[0] is 3"),
    ("label_range", "has label 3 outside 0..2 (layers[-1] = 3 classes)"),
    ("negative_label", "has label -1 outside 0..2"),
    ("fractional_label", "1 value(s) that are not integral class indices (NaN or fractional, e.g. 0.5)"),
    ("nan_label", "1 value(s) that are not integral class indices (NaN or fractional, e.g. NaN)"),
    ("nan_feature", "row(s) with NaN or infinite values"),
    ("inf_feature", "row(s) with NaN or infinite values"),
    ("float32_overflow", "row(s) with NaN or infinite values"),
    ("null_label", "labelCol 'label' has 1 null value(s)"),
    ("null_feature", "featuresCol 'features' has 1 null value(s)"),
    ("bad_row_in_other_partition", "has 1 row(s) with NaN or infinite values"),
    ("empty", "has no rows"),
    ("too_few_rows", "numWorkers=2 exceeds the 1 training rows"),
])
def test_bad_data(spark, kind, message, caplog):
    from pyspark.ml.linalg import Vectors

    v = Vectors.dense
    workers = 1
    rows = {
        "width": [(0.0, v([1.0, 2.0, 3.0])), (1.0, v([1.0, 2.0, 3.0, 4.0]))],
        "label_range": [(0.0, v([1.0, 2.0, 3.0])), (3.0, v([1.0, 2.0, 3.0]))],
        "negative_label": [(-1.0, v([1.0, 2.0, 3.0]))],
        "fractional_label": [(0.5, v([1.0, 2.0, 3.0])), (1.0, v([1.0, 2.0, 3.0]))],
        "nan_label": [(float("nan"), v([1.0, 2.0, 3.0]))],
        "nan_feature": [(0.0, v([1.0, float("nan"), 3.0]))],
        "inf_feature": [(0.0, v([1.0, float("-inf"), 3.0]))],
        "float32_overflow": [(0.0, v([1.0, 1e300, 3.0]))],
        "null_label": [(None, v([1.0, 2.0, 3.0]))],
        "null_feature": [(0.0, v([1.0, 2.0, 3.0])), (1.0, None)],
        "bad_row_in_other_partition": [(0.0, v([1.0, 2.0, 3.0]))] * 7 + [(1.0, v([1.0, float("nan"), 3.0]))],
        "empty": [],
        "too_few_rows": [(0.0, v([1.0, 2.0, 3.0]))],
    }[kind]
    if kind in ("too_few_rows", "bad_row_in_other_partition"):
        workers = 2                       # the NaN row lands in one partition; both tasks must stop
    clf = FeedForwardNetworkPSClassifier(layers=[3, 3], numWorkers=workers, backend="numpy", maxIter=1)
    with caplog.at_level("WARNING", logger="spark.training"), pytest.raises(ValueError) as err:
        clf.fit(frame(spark, rows))
    assert message in str(err.value)
    # the training tasks found it before any update and returned: the stage did not fail and was not relaunched
    assert "training stage failed" not in caplog.text


@pytest.mark.parametrize("vector,message", [
    (None, r"featuresCol 'features' has null vectors \(1 in a batch of [12] rows?\); drop or impute them before"),
    ([1.0, float("nan"), 3.0], r"has rows with NaN or infinite values \(1 in a batch of [12] rows?, after conversion"),
    ([1.0, 1e300, 3.0], r"has rows with NaN or infinite values \(1 in a batch of [12] rows?, after conversion"),
    ([1.0, 2.0], "feature vectors have width 2 but the model expects 3"),
])
def test_transform_bad_features_are_clear_errors(spark, vector, message):
    from pyspark.ml.linalg import Vectors

    model = FeedForwardNetworkPSClassificationModel(weights=np.zeros(12, np.float32), layers=[3, 3])
    rows = [(0.0, Vectors.dense([1.0, 2.0, 3.0])), (1.0, None if vector is None else Vectors.dense(vector))]
    with pytest.raises(Exception) as err:
        model.transform(frame(spark, rows)).collect()
    assert re.search(message, str(err.value))


def test_a_declared_width_is_checked_before_any_job(spark, monkeypatch):
    """The Vector column's ML attributes (VectorAssembler, HashingTF, libsvm) give its width: a wrong layers[0]
    was said only after every row had been made dense in the tasks."""
    from pyspark.ml.feature import VectorAssembler

    from spark import estimator

    jobs = []
    monkeypatch.setattr(estimator, "prepared", lambda *a: jobs.append(a))      # every training job starts here
    small = VectorAssembler(inputCols=["a", "b"], outputCol="features").transform(
        spark.createDataFrame([(0.0, 1.0, 2.0), (1.0, 3.0, 4.0)], ["label", "a", "b"]))
    with pytest.raises(ValueError, match=r"featuresCol 'features' has vectors of size 2 \(its ML attributes\) but "
                                         r"layers\[0\] is 3; set layers\[0\] to the feature width"):
        FeedForwardNetworkPSClassifier(layers=[3, 4, 2]).fit(small)
    model = FeedForwardNetworkPSClassificationModel(weights=np.zeros(12, np.float32), layers=[3, 3])
    with pytest.raises(ValueError, match="has vectors of size 2 .* but the model's layers\\[0\\] is 3; score vectors "
                                         "of the model's width, or fit a model on these"):
        model.transform(small)
    assert jobs == []


RECORDS = "spark.sql.execution.arrow.maxRecordsPerBatch"


def test_wide_rows_get_arrow_batches_the_jvm_can_send(spark, monkeypatch, caplog):
    """Spark 3.5 sent Python tasks Arrow batches of 10,000 rows whatever their bytes: at HashingTF's default 2^18
    features, 10 GiB of dense float32 a batch. The JVM's writer died (OutOfMemoryError) and the fit and the
    transform waited forever; with ML attributes they were refused and told to lower maxRecordsPerBatch, and
    a column without them (built in Python, array_to_vector) still hung. Now layers[0] sets the bound: a fit
    lowers the conf while its jobs run and gives the session its value back, and transform lowers it in the
    session (the transformed frame runs later) and says so. Narrow rows leave it alone whatever it is."""
    from pyspark.ml.feature import HashingTF
    from pyspark.ml.linalg import Vectors
    from pyspark.sql import functions as F

    from spark import training

    width = 2**18
    with_attrs = HashingTF(inputCol="words", outputCol="features").transform(          # numFeatures 2^18
        spark.createDataFrame([(float(i % 2), [f"w{i}", "x"]) for i in range(8)], ["label", "words"]))
    no_attrs = spark.createDataFrame([(float(i % 2), Vectors.sparse(width, [i, 7 + i], [1.0, 2.0]))
                                      for i in range(8)], ["label", "features"])
    seen = []
    run = training.run_barrier_stage

    def watched(prep, *a, **k):
        seen.append(spark.conf.get(RECORDS))
        return run(prep, *a, **k)
    monkeypatch.setattr(training, "run_barrier_stage", watched)
    spark35 = int(spark.version.split(".")[0]) < 4
    for records in ("10000", "-1"):                    # -1: whole partitions, judged as the default's batch
        spark.conf.set(RECORDS, records)
        try:
            for frame in (with_attrs, no_attrs):
                seen.clear()
                model = FeedForwardNetworkPSClassifier(layers=[width, 2], maxIter=2, blockSize=4, numWorkers=1,
                                                       stepSize=0.1, seed=3).fit(frame)
                # fit and transform read the Vector as Spark stores it: a DenseVector's float64 values, 2 MiB a row
                assert seen == (["128"] if spark35 else [records]) and spark.conf.get(RECORDS) == records
                assert model.trainingStats["rows"] == 8
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="spark.data"):
                    scored = model.transform(frame)
                assert spark.conf.get(RECORDS) == ("128" if spark35 else records)
                assert ("transform set it to 128 in this session" in caplog.text) == spark35
                assert scored.select(F.count("prediction")).first()[0] == 8
                spark.conf.set(RECORDS, records)
        finally:
            spark.conf.unset(RECORDS)
    narrow = FeedForwardNetworkPSClassificationModel(weights=np.zeros(8, np.float32), layers=[3, 2])
    spark.conf.set(RECORDS, "-1")
    try:
        narrow.transform(small(spark))
        assert spark.conf.get(RECORDS) == "-1"
    finally:
        spark.conf.unset(RECORDS)


def test_fits_at_once_keep_the_smallest_bound_until_the_last_ends(spark):
    """CrossValidator's parallelism runs fits side by side in one session: a fit that ends first must not give
    back the session's value while a wider one still runs, and a transform meanwhile keeps its lowering."""
    from spark.data import batches_bounded_while_fitting, bound_batches_for_scoring

    if int(spark.version.split(".")[0]) >= 4:
        pytest.skip("Spark 4 bounds an Arrow batch's bytes itself: ffps leaves the conf alone there")
    spark.conf.set(RECORDS, "5000")
    try:
        with batches_bounded_while_fitting(spark, "features", 2**18):
            assert spark.conf.get(RECORDS) == "128"
            with batches_bounded_while_fitting(spark, "features", 2**20):
                assert spark.conf.get(RECORDS) == "32"
                with batches_bounded_while_fitting(spark, "features", 1000):       # narrow: within every bound
                    assert spark.conf.get(RECORDS) == "32"
            assert spark.conf.get(RECORDS) == "128"
            bound_batches_for_scoring(spark, "features", 2**19)                 # 64 for the session from now
            assert spark.conf.get(RECORDS) == "64"
        assert spark.conf.get(RECORDS) == "64"
        with pytest.raises(ValueError, match=r"featuresCol 'f' is 100000000 features wide: one dense float64 \(a "
                                             r"DenseVector's values\) row is 762 MiB"):
            with batches_bounded_while_fitting(spark, "f", 10**8):
                pass
        assert spark.conf.get(RECORDS) == "64"
    finally:
        spark.conf.unset(RECORDS)


def test_model_without_weights_is_a_clear_error(spark):
    with pytest.raises(ValueError, match="no weights"):
        FeedForwardNetworkPSClassificationModel(layers=[3, 3]).transform(small(spark))


def test_partitions_are_kept_unless_their_count_differs_or_repartition_is_forced(digits_df):
    """A frame with numWorkers partitions trains on them as they are (xgboost.spark's rule); otherwise, with
    forceRepartition, or when Spark cannot run its lineage in a barrier stage, rows are shuffled round-robin
    into numWorkers even partitions."""
    from pyspark.sql import functions as F

    train = digits_df[0]
    chained = train.limit(400).repartition(4).coalesce(2)      # 2 partitions through a coalesce: no barrier stage
    # 2 partitions of 300 + 100 rows behind a shuffle (barrier-compatible), cut by a range shuffle on a 0/1 key
    # (Spark 4 plans a union of two coalesce(1) frames as one partition, so that recipe no longer works)
    keyed = train.limit(400).withColumn("k", F.when(F.monotonically_increasing_id() < 300, 0).otherwise(1))
    uneven = keyed.repartitionByRange(2, "k").drop("k")
    assert uneven.rdd.getNumPartitions() == chained.rdd.getNumPartitions() == 2
    assert sorted(uneven.rdd.glom().map(len).collect()) == [100, 300]

    def shard_rows(model):
        return [model.trainingStats["workers"][w]["rows"] for w in (0, 1)]
    kept = make(maxIter=1).fit(uneven)
    assert sorted(shard_rows(kept)) == [100, 300] and kept.trainingStats["reshuffled"] is None
    assert shard_rows(make(maxIter=1, forceRepartition=True).fit(uneven)) == [200, 200]
    assert shard_rows(make(maxIter=1).fit(uneven.coalesce(1))) == [200, 200]
    assert shard_rows(make(maxIter=1).fit(chained)) == [200, 200]     # coalesce in a barrier stage: shuffled


def test_a_lineage_spark_would_refuse_in_a_barrier_stage_is_shuffled_up_front(digits_df, monkeypatch):
    """A coalesce (or union) under numWorkers partitions: Spark refused the stage with a stack trace at WARN and
    the fit shuffled after. Its RDDs show it before any stage now."""
    from spark import training
    from spark.session import barrier_chain_problem

    train = digits_df[0]
    chained = train.limit(400).repartition(4).coalesce(2)
    assert barrier_chain_problem(chained) == ("its CoalescedRDD of 2 partitions reads a ShuffledRowRDD of 4 in the "
                                              "same stage")
    assert barrier_chain_problem(train.repartition(2)) is None and barrier_chain_problem(train) is None
    stages = []
    real = training.run_barrier_stage
    monkeypatch.setattr(training, "run_barrier_stage", lambda *a, **kw: stages.append(1) or real(*a, **kw))
    model = make(maxIter=1).fit(chained)
    assert len(stages) == 1, "a stage Spark refused ran first"
    assert model.trainingStats["reshuffled"] == ("the input's partitions cannot run in a barrier stage (its "
                                                 "CoalescedRDD of 2 partitions reads a ShuffledRowRDD of 4 in the "
                                                 "same stage)")
    monkeypatch.setattr("spark.estimator.barrier_chain_problem", lambda dataset: None)   # unseen: Spark refuses
    stages.clear()
    model = make(maxIter=1).fit(chained)
    assert len(stages) == 2 and "cannot run in a barrier stage" in model.trainingStats["reshuffled"]


def test_partitions_that_would_leave_rows_unused_are_shuffled(digits_df):
    """sync and easgd cut every shard to the smallest: on partitions of 300 and 100 rows they trained on 200 of
    400, silently (and on 16 of 635 for a frame range-partitioned by label: test accuracy 0.44 against MLlib's
    0.96). An empty partition failed every mode. Both are shuffled into even partitions now, and said."""
    from pyspark.sql import functions as F

    train = digits_df[0].limit(400)
    keyed = train.withColumn("k", F.when(F.monotonically_increasing_id() < 300, 0).otherwise(1))
    uneven = keyed.repartitionByRange(2, "k").drop("k")
    empty = train.repartition(2, F.lit(0))                      # every row hashed to one of the 2 partitions
    assert sorted(uneven.rdd.glom().map(len).collect()) == [100, 300]
    assert sorted(empty.rdd.glom().map(len).collect()) == [0, 400]
    for frame, mode, why in ((uneven, "sync", "rows per partition: [300, 100]) and this mode cuts each to the "
                                              "smallest: 200 of 400 rows would go unused"),
                             (uneven, "easgd", "200 of 400 rows would go unused"),
                             (empty, "async", "a training partition is empty (rows per partition: [0, 400]")):
        model = make(maxIter=1, mode=mode).fit(frame)
        stats = model.trainingStats
        assert why in stats["reshuffled"], (mode, stats["reshuffled"])
        assert [stats["workers"][w]["rows"] for w in (0, 1)] == [200, 200] and stats["rows"] == 400


def test_partitions_split_by_label_are_shuffled_where_each_worker_moves_the_model(digits_df):
    """A frame hash-partitioned by label into numWorkers partitions trained each async worker on its own classes
    (digits, [64,32,10]: 0.73 accuracy against 0.98 shuffled, no word said). Now shuffled and said; sync, whose
    every update is the mean of a batch from each worker, keeps them."""
    train, test = digits_df
    by_label = train.repartition(2, "label")
    classes = [{int(r.label) for r in part} for part in by_label.rdd.glom().collect()]
    assert len(classes) == 2 and classes[0].isdisjoint(classes[1]), classes
    model = make(mode="async", maxIter=10).fit(by_label)
    assert "the training partitions hold different classes" in model.trainingStats["reshuffled"]
    assert accuracy(model.transform(test)) >= 0.95
    kept = make(mode="sync", maxIter=1).fit(by_label)
    assert kept.trainingStats["reshuffled"] is None
    sizes = [len(part) for part in by_label.rdd.glom().collect()]
    assert [kept.trainingStats["workers"][w]["rows"] for w in (0, 1)] == [min(sizes)] * 2      # cut, under 1 %
    assert kept.trainingStats["unused_rows"] == sum(sizes) - 2 * min(sizes) and kept.trainingStats["rows"] == 1257
    assert model.trainingStats["unused_rows"] == 0                    # async trains every row


def test_an_unreachable_parameter_server_is_a_clear_error_not_a_hang(digits_df, monkeypatch, caplog):
    """Executors that cannot connect to the server (a wrong psHost, a firewall, a remote Spark Connect server)
    fail at registration with a message naming the address and psHost, and the stage is not relaunched: a
    relaunch would only wait again."""
    import socket

    from spark import training

    with socket.socket() as s:                      # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    real = training.make_train_function

    def elsewhere(cfg, **kw):
        return real(dict(cfg, address=dead), **kw)
    monkeypatch.setattr(training, "make_train_function", elsewhere)
    clf = make(maxIter=1, workerTimeout=1.0, maxRetries=2)
    with caplog.at_level("WARNING", logger="spark.training"), pytest.raises(RuntimeError) as err:
        clf.fit(digits_df[0])
    text = str(err.value)
    assert f"could not reach the parameter server at {dead}" in text and "set psHost" in text
    assert "retrying" not in caplog.text


def test_a_fit_whose_last_checkpoint_fails_still_returns_its_model(digits_df, tmp_path, monkeypatch, caplog):
    """A checkpoint disk that fills during a fit: the finished fit raised and its weights were lost. The model
    is returned, and the fit says (log and trainingStats warnings) that a resume would start further back."""
    from ps import checkpoint as ckpt
    from tests.test_ps_checkpoint import FlakyDisk

    monkeypatch.setattr(ckpt, "save", FlakyDisk(fail=range(2, 10_000)))   # the server runs in this driver
    d = str(tmp_path / "ck")
    with caplog.at_level("WARNING", logger="spark.estimator"):
        m = make(layers=[64, 16, 10], maxIter=3, mode="async", checkpointDir=d, checkpointInterval=5,
                 backend="numpy").fit(digits_df[0])
    assert np.isfinite(m.weights.toArray()).all() and m.evaluate(digits_df[1]).accuracy > 0.5
    said = [w for w in m.trainingStats["warnings"] if "was not written" in w]
    assert len(said) == 1 and ckpt.latest(d) in said[0] and "model.save" in caplog.text


def test_use_gpu_without_a_gpu_and_security_off_are_said(digits_df, async_model, caplog):
    """useGpu=True where the tasks got no GPU (a local master hands out none) trained on the CPU without a word;
    a fit with security off said so only in the log, at start, naming port 0."""
    with caplog.at_level("WARNING"):
        m = make(layers=[64, 16, 10], maxIter=1, mode="async", backend="numpy", useGpu=True, secure=False) \
            .fit(digits_df[0])
    said = [w for w in m.trainingStats["warnings"] if w.startswith("useGpu=True, but no GPU reached the training "
                                                                  "tasks (the training tasks trained on numpy)")]
    assert len(said) == 1 and said[0] in caplog.text
    (insecure,) = [w for w in m.trainingStats["warnings"] if w.startswith("SECURITY OFF (secure=False, --insecure): "
                                                                         "the parameter server at tcp://127.0.0.1:")]
    assert ":0 " not in insecure and caplog.text.count("SECURITY OFF") == 1 and insecure in caplog.text
    assert not [w for w in async_model.trainingStats["warnings"] if "useGpu" in w]      # useGpu not asked


def test_epoch_lines_name_their_fit_while_fits_run_side_by_side(caplog):
    """CrossValidator(parallelism > 1) fits several models at once: while it does, each epoch line says
    which fit it is; a fit alone logs the line as ever."""
    import logging

    from spark.estimator import Fits, epoch_logger

    fits = Fits()
    figures = dict(epoch=1, loss=0.5, accuracy=0.75, samples_per_s=1234, staleness=0.5)
    with caplog.at_level(logging.INFO, logger="spark.estimator"):
        with fits.running() as a:
            epoch_logger(4, a, fits)(figures)
            with fits.running() as b:
                epoch_logger(4, a, fits)(figures)
                epoch_logger(4, b, fits)(figures)
            epoch_logger(4, a, fits)(figures)
    line = "ffps epoch 1/4 loss 0.5000 accuracy 0.7500 1234 samples/s staleness 0.5"
    assert [r.getMessage() for r in caplog.records] == [line, line + " (fit 1)", line + " (fit 2)", line]
    assert [r.ffps_fit for r in caplog.records] == [1, 1, 2, 1]
    assert not fits.concurrent()


def test_a_fit_that_mostly_waited_on_exchanges_hints_at_a_longer_window():
    from ps.spec import TrainingSpec
    from spark.estimator import exchange_bound

    def workers(wait, loop, tau=4, pushes=240, longest=4):
        return {k: {"exchange_s": wait, "seconds": loop, "tau": tau, "pushes": pushes, "longest_push": longest}
                for k in (0, 1)}

    spec = TrainingSpec(layers=[4, 3, 2], mode="async")
    assert exchange_bound(workers(6.2, 9.9), spec) == (
        "the workers waited on the parameter server for 63 % of their training time (6.2 of 9.9 s each, 240 "
        "exchanges): a longer communicationWindow (it was 4) exchanges less often; try 16. Small networks and "
        "wide sparse ones (HashingTF) gain the most")
    assert exchange_bound(workers(0.03, 0.05), spec) is None          # most of the time, but no time to speak of
    assert exchange_bound(workers(1.2, 3.0), spec) is None            # a second, but not most of the time
    assert exchange_bound(workers(6.2, 9.9), TrainingSpec(layers=[4, 3, 2], mode="sync")) is None  # window 1
    assert exchange_bound({}, spec) is None
    assert exchange_bound(workers(6.2, 9.9, longest=64), spec) == (       # the automatic window at its bound
        "the workers waited on the parameter server for 63 % of their training time (6.2 of 9.9 s each, 240 "
        "exchanges): a longer communicationWindow (the automatic window grew from 4 to 64 local steps a push) "
        "exchanges less often; try 256. Small networks and wide sparse ones (HashingTF) gain the most")
