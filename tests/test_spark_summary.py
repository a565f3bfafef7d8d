"""model.summary: per-epoch loss/accuracy from the server's push records, per-worker figures, the PNG, --plot."""
import json
import math
import os
import sys

import pytest

from tests.spark_helpers import digits_df, kill_python_worker, spark  # noqa: F401 - fixtures

from spark import FeedForwardNetworkPSClassificationModel, FeedForwardNetworkPSClassifier
from spark.summary import FeedForwardNetworkPSTrainingSummary

pytestmark = pytest.mark.timeout(600)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPOCHS, BLOCK = 5, 32


@pytest.fixture(scope="module")
def fitted(digits_df):
    clf = FeedForwardNetworkPSClassifier(layers=[64, 100, 10], maxIter=EPOCHS, blockSize=BLOCK, stepSize=0.1, seed=1,
                                         numWorkers=2, mode="async", backend="numba")
    return clf.fit(digits_df[0])


def test_objective_and_accuracy_history_one_value_per_epoch(fitted):
    s = fitted.summary
    assert fitted.hasSummary and s is fitted.summary                  # built once per fit
    assert s.totalIterations == EPOCHS
    assert len(s.objectiveHistory) == len(s.accuracyHistory) == EPOCHS
    assert all(math.isfinite(v) for v in s.objectiveHistory + s.accuracyHistory)
    assert s.objectiveHistory[-1] < 0.7 * s.objectiveHistory[0]
    assert s.accuracyHistory[-1] > s.accuracyHistory[0] and s.accuracyHistory[-1] > 0.85
    assert s.trainingSeconds == fitted.trainingStats["seconds"] > 0
    assert "5 epochs, 2 workers" in repr(s)


def test_epochs_match_an_independent_count_from_the_history(fitted):
    stats, s = fitted.trainingStats, fitted.summary
    # each worker's shard rows and the block size give its steps per pass; push s covers steps (s-1)*tau+1 ..
    # s*tau (the default window, 4) and counts in the epoch of its last step
    per_pass = {w: math.ceil(v["rows"] / BLOCK) for w, v in stats["workers"].items()}
    tau = {v["tau"] for v in stats["workers"].values()}.pop()
    assert tau == 4

    def epoch_of(r):
        return math.ceil(min(r["step"] * tau, EPOCHS * per_pass[r["worker"]]) / per_pass[r["worker"]])
    expected = {}
    for r in stats["history"]:
        e = expected.setdefault(epoch_of(r), [0, 0.0])
        e[0] += r["batch_size"]
        e[1] += r["loss"] * r["batch_size"]
    epochs = s.epochs()
    assert [e["epoch"] for e in epochs] == sorted(expected) == list(range(1, EPOCHS + 1))
    for e in epochs:
        assert e["samples"] == expected[e["epoch"]][0]
        assert abs(e["samples"] - stats["rows"]) <= tau * BLOCK * len(per_pass)   # a window across the boundary
        assert e["loss"] == pytest.approx(expected[e["epoch"]][1] / e["samples"], rel=1e-12)
    assert [e["seconds_end"] for e in epochs] == sorted(e["seconds_end"] for e in epochs)
    assert [r["epoch"] for r in s.history] == [epoch_of(r) for r in s.history]
    frame = s.toPandas()
    assert len(frame) == len(stats["history"]) and frame.groupby("epoch")["batch_size"].sum().tolist() == \
        [e["samples"] for e in epochs]


def test_one_entry_per_worker(fitted):
    workers = fitted.summary.workers()
    assert [w["worker"] for w in workers] == [0, 1]
    for w, raw in zip(workers, (fitted.trainingStats["workers"][0], fitted.trainingStats["workers"][1])):
        assert w["pushes"] == raw["pushes"] > 0 and w["attempts"] == 1
        assert w["samples"] == EPOCHS * raw["rows"]
        assert math.isfinite(w["loss"]) and 0 <= w["accuracy"] <= 1 and w["samples_per_s"] > 0
        assert 0 <= w["staleness_mean"] <= w["staleness_max"]


def mllib_figures(frame):
    """Every figure MLlib's MulticlassMetrics (what its MulticlassClassificationEvaluator computes with) gives of
    ``frame``: the reference our one-job confusion table must match. One pass over the scored rows: 46 evaluator
    calls scored them 46 times (34 s of the suite)."""
    import warnings

    from pyspark.mllib.evaluation import MulticlassMetrics

    pairs = frame.select("prediction", "label").rdd.map(lambda r: (float(r[0]), float(r[1]))).cache()
    with warnings.catch_warnings():         # pyspark's own MulticlassMetrics builds an SQLContext, deprecated in 3.0
        warnings.filterwarnings("ignore", "Deprecated in 3.0.0", FutureWarning)
        m = MulticlassMetrics(pairs)
    labels = sorted({label for _, label in pairs.collect()})
    figures = {"accuracy": m.accuracy, "weightedPrecision": m.weightedPrecision,
            "weightedRecall": m.weightedRecall, "weightedFMeasure": m.weightedFMeasure(),
            "weightedFMeasure2": m.weightedFMeasure(2.0),
            "weightedFalsePositiveRate": m.weightedFalsePositiveRate, "labels": labels,
            "precisionByLabel": [m.precision(lab) for lab in labels],
            "recallByLabel": [m.recall(lab) for lab in labels],
            "falsePositiveRateByLabel": [m.falsePositiveRate(lab) for lab in labels],
            "fMeasureByLabel": [m.fMeasure(lab) for lab in labels]}
    pairs.unpersist()
    return figures


def ours(s):
    return {"accuracy": s.accuracy, "weightedPrecision": s.weightedPrecision, "weightedRecall": s.weightedRecall,
            "weightedFMeasure": s.weightedFMeasure(), "weightedFMeasure2": s.weightedFMeasure(2.0),
            "weightedFalsePositiveRate": s.weightedFalsePositiveRate, "labels": s.labels,
            "precisionByLabel": s.precisionByLabel, "recallByLabel": s.recallByLabel,
            "falsePositiveRateByLabel": s.falsePositiveRateByLabel, "fMeasureByLabel": s.fMeasureByLabel()}


def test_summary_and_evaluate_give_mllibs_classification_figures(fitted, digits_df):
    """model.summary() (MLlib's MLPC has summary as a method) and model.evaluate(df): accuracy and the weighted
    and per-label figures of MLlib's ClassificationSummary, equal to its evaluator's on the same predictions."""
    train, test = digits_df
    s = fitted.summary()
    assert s is fitted.summary and s.labelCol == "label" and s.predictionCol == "prediction" and s.weightCol is None
    expected = mllib_figures(fitted.transform(train))
    got = ours(s)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key
    assert s.truePositiveRateByLabel == s.recallByLabel and s.weightedTruePositiveRate == s.weightedRecall
    assert s.predictions.count() == train.count() and "probability" in s.predictions.columns
    held_out = fitted.evaluate(test)
    expected = mllib_figures(fitted.transform(test))
    for key, value in ours(held_out).items():
        assert value == pytest.approx(expected[key], rel=1e-12), key
    assert 0.85 < held_out.accuracy < 1.0


def test_the_training_summary_scores_with_the_params_of_when_it_was_made(digits_df):
    """Params set on the model after its summary was made do not reach the summary's scoring (a new prediction
    column broke it, UNRESOLVED_COLUMN); a copy (other params) keeps the epochs but not the training frame; the
    model can be deep-copied (the held DataFrame could not) and the frame is not pickled."""
    import copy
    import pickle

    from spark.model import TrainingFrame

    train = digits_df[0]
    m = FeedForwardNetworkPSClassifier(layers=[64, 16, 10], maxIter=2, blockSize=32, seed=2, numWorkers=2,
                                       backend="numba").fit(train)
    s = m.summary
    assert len(s.objectiveHistory) == 2
    expected = m.evaluate(train).accuracy
    m.setPredictionCol("yhat").setThresholds([1.0] * 9 + [0.0])      # every row would now be class 9
    assert s.accuracy == pytest.approx(expected, rel=1e-12) and "prediction" in s.predictions.columns
    other = m.copy()
    assert other.summary.objectiveHistory == s.objectiveHistory
    with pytest.raises(ValueError, match="no training frame .* use model.evaluate"):
        other.summary.accuracy
    deep = copy.deepcopy(m)
    assert deep.getPredictionCol() == "yhat" and deep._training_frame.frame is m._training_frame.frame
    assert pickle.loads(pickle.dumps(TrainingFrame("a DataFrame"))).frame is None


def test_figures_when_predictions_name_classes_the_labels_lack(spark):
    """A prediction of a class no row has counts against recall only, and labels lists the true labels."""
    from pyspark.ml.linalg import Vectors

    from spark.metrics import FeedForwardNetworkPSSummary

    pairs = [(0.0, 0.0), (0.0, 2.0), (1.0, 1.0), (0.0, 1.0), (1.0, 3.0), (1.0, 1.0), (4.0, 4.0)]
    frame = spark.createDataFrame([(lab, pred, Vectors.dense([lab])) for lab, pred in pairs],
                                  ["label", "prediction", "features"])
    s = FeedForwardNetworkPSSummary(frame, "label", "prediction")
    expected = mllib_figures(frame)
    got = ours(s)
    assert s.labels == [0.0, 1.0, 4.0]
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key
    with pytest.raises(ValueError, match="labelCol 'y' is not a column of the frame"):
        FeedForwardNetworkPSSummary(frame, "y", "prediction").accuracy
    with pytest.raises(ValueError, match="the frame has no rows"):
        FeedForwardNetworkPSSummary(frame.limit(0), "label", "prediction").accuracy


def test_loaded_or_hand_built_model_has_no_summary(fitted, tmp_path):
    path = str(tmp_path / "model")
    fitted.save(path)
    for model in (FeedForwardNetworkPSClassificationModel.load(path),
                  FeedForwardNetworkPSClassificationModel(weights=fitted.weights.toArray(), layers=[64, 100, 10])):
        assert not model.hasSummary
        with pytest.raises(RuntimeError, match="No training summary available for this "
                                               "FeedForwardNetworkPSClassificationModel"):
            model.summary


def test_plot_writes_a_png(fitted, tmp_path):
    path = str(tmp_path / "curves.png")
    assert fitted.summary.plot(path) == path
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_SIGNATURE and os.path.getsize(path) > 10_000


def test_plot_without_matplotlib_says_what_to_install(fitted, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install ffps\[plot\]"):
        fitted.summary.plot(str(tmp_path / "x.png"))
    assert not os.path.exists(tmp_path / "x.png")


# ---------------------------------------------------------------- epoch assignment: windows and retries
def record(t, worker, attempt, step, loss, accuracy, rows):
    return {"time": t, "worker": worker, "attempt": attempt, "step": step, "version": 0, "loss": loss,
            "accuracy": accuracy, "batch_size": rows, "staleness": 0, "samples_per_s": 0.0}


def test_windows_across_epochs_and_a_relaunched_attempt():
    # worker 0: 4 steps per pass, tau = 3 -> pushes end at local steps 3, 6, 9, 12 -> epochs 1, 2, 3, 3;
    # it died after push 2 and its attempt 1 resumed at push 3. Worker 1: 2 steps per pass, tau = 1.
    history = [record(0.1, 0, 0, 1, 2.0, 0.2, 30), record(0.2, 1, 0, 1, 1.0, 0.5, 10),
               record(0.3, 0, 0, 2, 1.0, 0.5, 30), record(0.4, 1, 0, 2, 1.0, 0.5, 10),
               record(0.5, 1, 0, 3, 0.5, 0.7, 10), record(0.6, 1, 0, 4, 0.5, 0.7, 10),
               record(1.5, 0, 1, 3, 0.5, 0.8, 30), record(1.6, 0, 1, 4, 0.3, 0.9, 20),
               record(1.7, 1, 0, 5, 0.2, 0.9, 10), record(1.8, 1, 0, 6, 0.2, 0.9, 10)]
    stats = {"seconds": 2.0, "attempts": 2, "server": {"mode": "async"}, "history": history,
             "workers": {"0": {"steps_per_epoch": 4, "tau": 3, "epochs": 3, "stale": 0},
                         "1": {"steps_per_epoch": 2, "tau": 1, "epochs": 3, "stale": 1}}}
    s = FeedForwardNetworkPSTrainingSummary(stats)
    assert [r["epoch"] for r in s.history] == [1, 1, 2, 1, 2, 2, 3, 3, 3, 3]
    assert s.totalIterations == 3
    assert [e["samples"] for e in s.epochs()] == [50, 50, 70]
    assert s.objectiveHistory == pytest.approx([(2.0 * 30 + 2 * 10) / 50, (30 + 2 * 0.5 * 10) / 50,
                                                (0.5 * 30 + 0.3 * 20 + 2 * 0.2 * 10) / 70])
    assert s.epochs()[-1]["seconds_end"] == 1.8
    w0, w1 = s.workers()
    assert (w0["attempts"], w0["pushes"], w0["samples"]) == (2, 4, 110)
    assert w0["loss"] == pytest.approx((0.5 * 30 + 0.3 * 20) / 50)
    assert (w1["attempts"], w1["stale"]) == (1, 1)


def test_plot_axis_starts_at_the_first_update_or_counts_passes():
    history = [record(2.0 + 0.01 * i, i % 2, 0, i // 2 + 1, 1.0, 0.5, 10) for i in range(8)]
    stats = {"seconds": 2.5, "attempts": 1, "server": {"mode": "async"}, "history": history,
             "workers": {"0": {"steps_per_epoch": 2, "tau": 1, "epochs": 2, "stale": 0},
                         "1": {"steps_per_epoch": 2, "tau": 1, "epochs": 2, "stale": 0}}}
    s = FeedForwardNetworkPSTrainingSummary(stats)
    x_of, x_epoch, label = s._plot_axis()           # 70 ms of updates after 2 s of start-up: passes
    assert label == "passes over the data"
    assert [x_of(r) for r in s.history] == [0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 2.0, 2.0]
    assert [x_epoch(e) for e in s.epochs()] == [1.0, 2.0]         # each epoch's mean at the end of its pass
    slow = dict(stats, history=[dict(r, time=2.0 + 3.0 * i) for i, r in enumerate(history)])
    x_of, x_epoch, label = FeedForwardNetworkPSTrainingSummary(slow)._plot_axis()
    assert label == "seconds since the first update"
    assert x_of(slow["history"][0]) == 0.0 and x_of(slow["history"][-1]) == 21.0
    assert [x_epoch(e) for e in FeedForwardNetworkPSTrainingSummary(slow).epochs()] == [9.0, 21.0]


def test_summary_spans_a_relaunched_training_stage(digits_df, monkeypatch):
    clf = FeedForwardNetworkPSClassifier(layers=[64, 32, 10], maxIter=3, blockSize=BLOCK, stepSize=0.1, seed=1,
                                         numWorkers=2, mode="async", backend="numba", maxRetries=1)
    kill_python_worker(monkeypatch, 1, 25)    # worker 1's Python process exits at local step 25 (epoch 2), attempt 0
    model = clf.fit(digits_df[0])
    s = model.summary
    assert model.trainingStats["attempts"] == 2
    assert s.totalIterations == 3 and [e["samples"] for e in s.epochs()] == [model.trainingStats["rows"]] * 3
    w0, w1 = s.workers()
    assert w1["attempts"] == 2       # worker 0 has 1 or 2: Spark's abort of the stage may come after its last push


# ---------------------------------------------------------------- the app's --plot
def test_app_train_writes_the_plot_and_prints_the_objective_history(spark, tmp_path, capsys):
    from spark.app import main
    from tests.test_spark_app import sample_data

    png = str(tmp_path / "curves.png")
    assert main(["--mode", "train", "--dir", str(tmp_path / "m"), sample_data(), "--epochs", "4",
                 "--batch-size", "16", "--backend", "numba", "--plot", png]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["plot"] == png and len(out["objective_history"]) == 4
    with open(png, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def test_app_plot_without_matplotlib_fails_before_training(spark, tmp_path, capsys, monkeypatch):
    from spark.app import main
    from tests.test_spark_app import sample_data

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["--mode", "train", "--dir", str(tmp_path / "m"), sample_data(), "--plot", "x.png"]) == 2
    assert "pip install ffps[plot]" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m")
