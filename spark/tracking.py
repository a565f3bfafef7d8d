"""MLflow tracking of ``fit``: params, per-epoch loss and accuracy, final figures, the model and its curves.

When a fit is logged: the estimator Param ``mlflowTracking`` decides.

* unset (the default): only when an MLflow run is active, as in ``with mlflow.start_run(): clf.fit(df)``.
  A fit never imports mlflow for this check (no run can be active unless the caller imported it).
* ``True``: always, into the active run or else a new run named after the estimator uid, under the current
  tracking URI and experiment (``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME`` or
  ``mlflow.set_tracking_uri`` / ``mlflow.set_experiment``). Without mlflow installed: a warning.
* ``False``: never.

An active run takes the first fit logged into it; a later fit while the same run is active (a loop over
settings, a CrossValidator) gets a nested child run, so the params of different fits do not collide. A fit in
a thread without a run of its own (a CrossValidator's folds run in a pool) gets a child run of the one run
active in another thread of the process. Without
mlflow (``pip install ffps[mlflow]``) nothing is imported and nothing happens. A logging failure (tracking
server down, a param clash, ...) is logged as a warning: ``fit`` always returns the trained model.

What is logged: params = every defined training param of the estimator (``str`` of the value, cut to MLflow's
6000 characters); metrics = ``loss`` and ``accuracy`` per epoch (step = epoch, from ``model.summary``),
``training_seconds``, ``samples_per_s`` (applied rows / training seconds), ``rejected_pushes``,
``attempts``; artifacts = ``model/`` (written by the model's own ``save()``) and, with matplotlib,
``training_summary.png``; tag ``ffps.model_uid``.

Scoring later (needs a SparkSession)::

    from spark.tracking import load_model
    model = load_model(run_id)          # or "runs:/<run_id>/model", or any artifact URI of a model/ directory

The model is written to, and read back from, a temp directory on the driver through Spark; on a multi-node
cluster that needs a driver-local master (``local[*]``) or a filesystem the executors share.

mlflow-skinny 3.x: the default tracking URI is ``sqlite:///mlflow.db`` in the working directory (``./mlruns`` where
that directory exists), which needs sqlalchemy and alembic (not part of mlflow-skinny; ``ffps[mlflow]`` installs
them); a local ``file:`` store works only with ``MLFLOW_ALLOW_FILE_STORE=true``.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import sys
import tempfile
import threading
import time

log = logging.getLogger("spark.tracking")

_TAG = "ffps.model_uid"
_MAX_PARAM_CHARS = 6000          # MLflow's limit on a param value


def _wanted(estimator) -> bool:
    if estimator.isDefined(estimator.mlflowTracking):
        if not estimator.getMlflowTracking():
            return False
        if importlib.util.find_spec("mlflow") is None:
            log.warning("mlflowTracking=True but mlflow is not installed (pip install ffps[mlflow]): this fit "
                        "is not logged")
            return False
        return True
    mlflow = sys.modules.get("mlflow")
    if getattr(mlflow, "active_run", None) is None:
        return False
    return mlflow.active_run() is not None or _run_of_another_thread() is not None


_started: set = set()             # ids of the runs _log has open (a fold's child run, in its pool thread)
_started_lock = threading.RLock()        # held while a run starts or ends, so no fit sees it half-open


def _run_of_another_thread() -> str | None:
    """The id of the run active in another thread of this process, where exactly one is (a thread's outermost
    run; the child runs ffps itself has open for other fits left out), else None. MLflow keeps the active run
    per thread, and a CrossValidator fits its folds in pool threads: inside ``with mlflow.start_run():
    cv.fit(df)`` the fold fits saw no run and were not logged. Read from MLflow's thread-local run stack
    (mlflow.tracking.fluent, 2.x-3.x); where that is not there, None."""
    try:
        from mlflow.tracking import fluent

        stacks = fluent._active_run_stack.get_all_thread_values().values()
        with _started_lock:
            ids = {stack[0].info.run_id for stack in stacks if stack} - _started
    except Exception:  # noqa: BLE001 - another MLflow's internals: no parent found, as before
        return None
    return next(iter(ids)) if len(ids) == 1 else None


def training_params(estimator) -> dict:
    """{name: str(value)} of every defined training param, as logged."""
    from .params import TRAINING_PARAMS

    return {name: str(estimator.getOrDefault(name))[:_MAX_PARAM_CHARS] for name in TRAINING_PARAMS
            if estimator.isDefined(name)}


def log_fit(estimator, model) -> None:
    """Log this fit to MLflow when ``mlflowTracking`` asks for it (see the module docstring); never raises."""
    try:
        if _wanted(estimator):
            _log(estimator, model)
    except Exception as exc:  # noqa: BLE001 - tracking must never cost the caller the trained model
        log.warning("logging the fit of %s to MLflow failed (%s: %s); the model is returned, not logged",
                    estimator.uid, type(exc).__name__, exc)


def _log(estimator, model) -> None:
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    active = mlflow.active_run()
    own = active is None or _TAG in client.get_run(active.info.run_id).data.tags
    with _started_lock:
        parent = _run_of_another_thread() if active is None else None   # a CrossValidator's fold, in a pool thread
        run = mlflow.start_run(run_name=estimator.uid, nested=True, parent_run_id=parent) if own else active
        if own:
            _started.add(run.info.run_id)
    status = "FAILED"
    try:
        mlflow.set_tag(_TAG, model.uid)
        mlflow.log_params(training_params(estimator))
        summary = model.summary
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[Metric(key, e[key], now, e["epoch"]) for e in summary.epochs()
                                                   for key in ("loss", "accuracy")])
        stats = model.trainingStats
        samples = sum(r["batch_size"] for r in stats["history"])
        mlflow.log_metrics({"training_seconds": summary.trainingSeconds,
                            "samples_per_s": samples / summary.trainingSeconds if summary.trainingSeconds else 0.0,
                            "rejected_pushes": stats["server"].get("rejected_total", 0),
                            "attempts": stats["attempts"]})
        with tempfile.TemporaryDirectory(prefix="ffps-mlflow-") as tmp:
            path = os.path.join(tmp, "model")
            model.save(pathlib.Path(path).as_uri())     # file:// so a non-local default FS is not used
            mlflow.log_artifacts(path, "model")
            if importlib.util.find_spec("matplotlib") is not None:
                mlflow.log_artifact(summary.plot(os.path.join(tmp, "training_summary.png")))
        status = "FINISHED"
    finally:
        with _started_lock:
            _started.discard(run.info.run_id)
            if own:
                mlflow.end_run(status)


def load_model(model_uri: str, dst_path: str | None = None):
    """A model logged by ``fit`` -> ``FeedForwardNetworkPSClassificationModel`` (needs a SparkSession).

    model_uri: a run id (its ``model`` artifact), ``runs:/<run_id>/model`` or any artifact URI of the model
    directory. dst_path: local directory to download into (default: a new temp directory).
    """
    if importlib.util.find_spec("mlflow") is None:
        raise ImportError("load_model needs mlflow, which is not installed: pip install ffps[mlflow]")
    import mlflow

    from .model import FeedForwardNetworkPSClassificationModel

    if ":" not in model_uri and "/" not in model_uri:          # a bare run id
        local = mlflow.artifacts.download_artifacts(run_id=model_uri, artifact_path="model", dst_path=dst_path)
    else:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path)
    return FeedForwardNetworkPSClassificationModel.load(pathlib.Path(local).as_uri())
