"""MLflow tracking of fit against a local file store under a tmp dir: params, per-epoch metrics, the model
artifact and load_model; when tracking is (not) wanted; mlflow absent; a logging failure keeps the model."""
import logging
import sys

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")

from tests.spark_helpers import digits_df, spark  # noqa: E402, F401 - fixtures

from spark import FeedForwardNetworkPSClassifier  # noqa: E402
from spark.params import TRAINING_PARAMS as _TRAINING_PARAMS  # noqa: E402
from spark.tracking import load_model  # noqa: E402

pytestmark = pytest.mark.timeout(600)

EPOCHS = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A file tracking store under a tmp dir for this module; the tracking URI is reset afterwards."""
    # a directory that does not exist yet: the file store creates experiment 0 only in a new root
    uri = (tmp_path_factory.mktemp("tracking") / "mlruns").as_uri()
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")     # mlflow 3.x refuses file stores without it
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.setenv("MLFLOW_TRACKING_URI", uri)            # recorded so undo() restores the caller's value
    mlflow.set_tracking_uri(uri)
    yield mlflow.MlflowClient(uri)
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mp.undo()


def runs(client, name=None):
    """Runs of the default experiment, optionally only those named ``name``."""
    return [r for r in client.search_runs(experiment_ids=["0"]) if name is None or r.info.run_name == name]


@pytest.fixture(scope="module")
def tracked(store, digits_df):
    clf = FeedForwardNetworkPSClassifier(layers=[64, 32, 10], maxIter=EPOCHS, blockSize=32, stepSize=0.1, seed=2,
                                         numWorkers=2, backend="numba", mlflowTracking=True)
    model = clf.fit(digits_df[0])
    (run,) = runs(store, name=clf.uid)
    return clf, model, run


def small_fit(digits_df, **kw):
    """A one-pass, one-worker fit on digits: enough to exercise when and how a fit is logged."""
    clf = FeedForwardNetworkPSClassifier(layers=[64, 10], maxIter=1, blockSize=64, numWorkers=1, backend="numpy",
                                         **kw)
    return clf, clf.fit(digits_df[0])


def test_params_are_the_estimators(tracked):
    clf, _, run = tracked
    expected = {name: str(clf.getOrDefault(name)) for name in _TRAINING_PARAMS if clf.isDefined(name)}
    assert run.data.params == expected
    assert {"layers", "maxIter", "stepSize", "blockSize", "seed", "mode", "numWorkers"} <= set(expected)
    assert run.data.params["layers"] == "[64, 32, 10]" and run.data.params["maxIter"] == str(EPOCHS)
    assert run.info.status == "FINISHED" and run.data.tags["ffps.model_uid"] == clf.uid


def test_one_metric_point_per_epoch_and_final_metrics(store, tracked):
    _, model, run = tracked
    for key, values in (("loss", model.summary.objectiveHistory), ("accuracy", model.summary.accuracyHistory)):
        points = sorted(store.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in points] == list(range(1, EPOCHS + 1))
        np.testing.assert_allclose([m.value for m in points], values, rtol=1e-12)
    final = run.data.metrics
    assert final["training_seconds"] == pytest.approx(model.trainingStats["seconds"])
    assert final["samples_per_s"] > 0 and final["rejected_pushes"] == 0 and final["attempts"] == 1


def test_model_artifact_loads_with_the_same_predictions(store, tracked, digits_df, tmp_path):
    _, model, run = tracked
    names = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert {"model", "training_summary.png"} <= names
    assert {"model/metadata", "model/data"} <= {a.path for a in store.list_artifacts(run.info.run_id, "model")}
    test = digits_df[1]
    want = np.array([r.probability.toArray() for r in model.transform(test).select("probability").collect()])
    for uri in (run.info.run_id, f"runs:/{run.info.run_id}/model"):
        loaded = load_model(uri, dst_path=str(tmp_path / uri.replace(":", "_").replace("/", "_")))
        got = np.array([r.probability.toArray() for r in loaded.transform(test).select("probability").collect()])
        np.testing.assert_array_equal(got, want)
        assert loaded.uid == model.uid and not loaded.hasSummary


def test_active_run_takes_the_fit_and_a_second_fit_gets_a_child_run(store, digits_df):
    with mlflow.start_run(run_name="outer") as outer:
        first, _ = small_fit(digits_df)                       # mlflowTracking unset: follows the active run
        second, _ = small_fit(digits_df, stepSize=0.05)
        assert mlflow.active_run().info.run_id == outer.info.run_id
    parent = store.get_run(outer.info.run_id)
    assert parent.data.params["stepSize"] == "0.1" and parent.data.tags["ffps.model_uid"] == first.uid
    (child,) = runs(store, name=second.uid)
    assert child.data.tags["mlflow.parentRunId"] == outer.info.run_id and child.data.params["stepSize"] == "0.05"


@pytest.mark.parametrize("parallelism", [1, 2])
def test_a_crossvalidators_fold_fits_are_child_runs_of_the_callers_run(store, digits_df, parallelism):
    """PySpark's CrossValidator fits its folds in pool threads, and MLflow's active run is per thread: inside
    ``with mlflow.start_run()`` the fold fits were not logged at all (with mlflowTracking=True: top-level runs
    without a parent). Now each fold is a child run of the caller's; the final refit takes the run itself."""
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

    clf = FeedForwardNetworkPSClassifier(layers=[64, 10], maxIter=1, blockSize=64, numWorkers=1, backend="numpy")
    cv = CrossValidator(estimator=clf, estimatorParamMaps=ParamGridBuilder().addGrid(clf.stepSize, [0.1]).build(),
                        evaluator=MulticlassClassificationEvaluator(), numFolds=2, parallelism=parallelism,
                        seed=3)
    with mlflow.start_run(run_name="tuning") as outer:
        cv.fit(digits_df[0])
    children = [r for r in runs(store) if r.data.tags.get("mlflow.parentRunId") == outer.info.run_id]
    assert len(children) == 2 and all(r.data.params["stepSize"] == "0.1" for r in children)
    assert store.get_run(outer.info.run_id).data.tags["ffps.model_uid"] == clf.uid    # the refit on all rows


def test_no_logging_without_an_active_run_or_when_switched_off(store, digits_df):
    before = len(runs(store))
    small_fit(digits_df)                                      # unset and no active run
    with mlflow.start_run(run_name="off") as off:
        small_fit(digits_df, mlflowTracking=False)
    assert len(runs(store)) == before + 1                     # only the "off" run itself
    assert store.get_run(off.info.run_id).data.params == {}


def test_mlflow_absent_fit_works_and_logs_nothing(store, digits_df, monkeypatch, caplog):
    before = len(runs(store))
    monkeypatch.setitem(sys.modules, "mlflow", None)         # find_spec -> None, import -> ImportError
    with caplog.at_level(logging.WARNING, logger="spark.tracking"):
        _, model = small_fit(digits_df, mlflowTracking=True)
    monkeypatch.undo()
    assert model.weights is not None and model.hasSummary
    assert "mlflow is not installed (pip install ffps[mlflow])" in caplog.text
    assert len(runs(store)) == before


def test_logging_failure_still_returns_the_model(store, digits_df, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(mlflow, "log_metrics", broken)
    with caplog.at_level(logging.WARNING, logger="spark.tracking"):
        clf, model = small_fit(digits_df, mlflowTracking=True)
    assert model.hasSummary and len(model.weights) == 64 * 10 + 10
    assert "ConnectionError: tracking server unreachable" in caplog.text
    assert mlflow.active_run() is None                       # the run it opened was closed
    (run,) = runs(store, name=clf.uid)
    assert run.info.status == "FAILED"



def test_app_mlflow_flag_logs_the_fit(store, spark, tmp_path, capsys):
    from spark.app import main
    from tests.test_spark_app import sample_data

    before = {r.info.run_id for r in runs(store)}
    assert main(["--mode", "train", "--dir", str(tmp_path / "m"), sample_data(), "--epochs", "2", "--batch-size",
                 "16", "--backend", "numpy", "--mlflow"]) == 0
    (run,) = [r for r in runs(store) if r.info.run_id not in before]
    assert run.data.params["maxIter"] == "2" and run.info.status == "FINISHED"
    assert len(store.get_metric_history(run.info.run_id, "loss")) == 2
