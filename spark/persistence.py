"""Saving and loading the model: Spark ML metadata plus the weights written through Spark.

Layout under PATH (any URI Spark can write: file, HDFS, S3, ...):
``metadata/``  DefaultParamsWriter's JSON (class, timestamp, sparkVersion, uid, paramMap, defaultParamMap) with
               ``ffpsFormat`` and ``numParams`` added, one line of text;
``data/``      Parquet, one row: layers array<int>, weights binary (little-endian float32, flat layout).
A directory that is not an ffps model, or a damaged one, raises ValueError naming the path and the problem.
Models saved when the model class lived in ``spark.estimator`` load as well (Pipelines find the class there too).

Both parts are written and read through the DataFrame reader and writer of the session, so the same code runs
on a classic session (Spark 3.5 and 4) and on Spark Connect (no SparkContext there): the metadata line is
the one ``DefaultParamsWriter.saveMetadata`` writes, and a model saved either way loads either way.
"""
from __future__ import annotations

import json
import logging
import time
import uuid

import numpy as np
from pyspark.ml.util import DefaultParamsReader, MLReader, MLWriter

from .failures import short_error
from .params import check_model_weights
from .session import hadoop_path, is_connect

FORMAT_VERSION = 1
log = logging.getLogger("spark.persistence")


class ModelWriter(MLWriter):
    def __init__(self, instance):
        super().__init__()
        self.instance = instance

    def save(self, path: str) -> None:
        """Check the model, then the path, before anything is deleted or written: a model that could not be
        loaded again is refused with the old one still in place, and an existing path without ``overwrite()``
        is refused as MLlib's writers refuse it (an empty directory, or anyone's data, included; on Spark Connect
        an existing model, through its writers' "error" mode)."""
        model = self.instance
        if model._weights is None:
            raise ValueError("this model has no weights to save: train it with fit() or load() a saved one")
        check_model_weights(model._weights, model.getLayers() if model.isDefined("layers") else None)
        if not model.isDefined("layers"):
            raise ValueError("this model has no layers to save: build it with layers=[...]")
        model._thresholds()
        fs_path = hadoop_path(self.sparkSession, path)     # None on Connect: its "error" mode refuses a model
        exists = fs_path is not None and fs_path[0].exists(fs_path[1])
        if not self.shouldOverwrite and exists:
            raise FileExistsError(exists_message(path))
        if self.shouldOverwrite and exists:
            self._replace(path, *fs_path)
            return
        super().save(path)

    def _replace(self, path: str, fs, target) -> None:
        """Overwrite on a classic session: the new model is written beside PATH, and only once it is whole does
        it take PATH's place (renames; the old one is deleted last). A write that fails midway (a full disk, a
        lost executor) leaves the old model in place, where deleting it first, as Spark ML's writers do, lost
        it; a rename that fails says where each model is. Spark Connect has no file system handle here: its
        writers replace metadata/ and data/ in turn."""
        stem = path.rstrip("/") + f".ffps-{uuid.uuid4().hex[:12]}"
        fresh, old = stem + ".saving", stem + ".replaced"
        fresh_path, old_path = (hadoop_path(self.sparkSession, p)[1] for p in (fresh, old))
        try:
            self.saveImpl(fresh)
        except BaseException:
            _delete(fs, fresh_path)
            raise
        why = _rename(fs, target, old_path)
        if why is not None:
            where = f"the old model is at {old}" if fs.exists(old_path) else f"{path} is as it was"
            _delete(fs, fresh_path)
            raise OSError(f"cannot overwrite {path}: it could not be moved aside to {old} ({why}); {where}; the new "
                          f"model was not saved")
        why = _rename(fs, fresh_path, target)
        if why is not None:
            back = _rename(fs, old_path, target)
            if back is None:
                _delete(fs, fresh_path)
                raise OSError(f"cannot overwrite {path}: the new model could not be moved into its place ({why}); "
                              f"the old model is back at {path}")
            raise OSError(f"cannot overwrite {path}: the new model could not be moved into its place ({why}), nor "
                          f"the old one back ({back}): the old model is at {old}, the new one at {fresh}")
        _delete(fs, old_path)

    def _handleOverwrite(self, path: str) -> None:
        # classic: Spark's own (it deletes PATH through the JVM); Connect has no JVM handle here, and
        # saveImpl's writers replace metadata/ and data/ themselves
        if not is_connect(self.sparkSession):
            super()._handleOverwrite(path)

    def saveImpl(self, path: str) -> None:
        model, spark = self.instance, self.sparkSession
        w = np.ascontiguousarray(model.weights.toArray(), dtype="<f4")   # float32 -> float64 -> float32: exact
        mode = "overwrite" if self.shouldOverwrite else "error"      # Connect knows "error", not "errorifexists"
        meta = metadata_json(model, spark.version, {"ffpsFormat": FORMAT_VERSION, "numParams": int(w.size)})
        try:
            spark.createDataFrame([(meta,)], "value string").coalesce(1).write.mode(mode).text(_join(path, "metadata"))
        except Exception as exc:  # noqa: BLE001 - Connect: AnalysisException [PATH_ALREADY_EXISTS]
            if "PATH_ALREADY_EXISTS" in str(exc):
                raise FileExistsError(exists_message(path)) from None
            raise
        frame = spark.createDataFrame([(list(model.getLayers()), bytearray(w.tobytes()))],
                                      "layers array<int>, weights binary")
        frame.coalesce(1).write.mode(mode).parquet(_join(path, "data"))


def _rename(fs, src, dst) -> str | None:
    """Rename ``src`` to ``dst``, which must not exist (Hadoop moves a directory into an existing one) -> None, or
    why it did not happen whole."""
    try:
        if fs.exists(dst):
            return f"{dst} exists"
        if not fs.rename(src, dst):
            return "the file system refused the rename"
        if fs.exists(src):
            return f"{src} was left behind"
    except Exception as exc:  # noqa: BLE001 - Py4J's errors: S3A/GCS renames copy and can fail midway
        return short_error(exc)
    return None


def _delete(fs, p) -> None:
    """Delete ``p`` (recursively); a failure is a debug line, never the error at hand."""
    try:
        fs.delete(p, True)
    except Exception:  # noqa: BLE001
        log.debug("ffps: could not delete %s", p, exc_info=True)


def exists_message(path: str) -> str:
    return f"Path {path} already exists. To overwrite it, use write().overwrite().save(path)"


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def metadata_json(instance, spark_version: str, extra: dict) -> str:
    """The metadata line of ``DefaultParamsWriter.saveMetadata``: class, timestamp, sparkVersion, uid, paramMap
    (values set), defaultParamMap (defaults), plus ``extra``."""
    meta = {"class": f"{type(instance).__module__}.{type(instance).__name__}",
            "timestamp": int(round(time.time() * 1000)), "sparkVersion": spark_version, "uid": instance.uid,
            "paramMap": {p.name: v for p, v in instance._paramMap.items()},
            "defaultParamMap": {p.name: v for p, v in instance._defaultParamMap.items()}, **extra}
    return json.dumps(meta, separators=(",", ":"))


def load_metadata(spark, path: str) -> dict:
    """The metadata JSON under PATH/metadata (as DefaultParamsReader.loadMetadata reads it)."""
    first = spark.read.text(_join(path, "metadata")).first()
    if first is None:
        raise ValueError("metadata/ is empty")
    return json.loads(first[0])


class EstimatorReader(DefaultParamsReader):
    """The estimator's reader. DefaultParamsReader builds whatever class the metadata names: a saved model's path
    gave a model without weights (MLlib's estimators refuse it)."""

    def load(self, path: str):
        expected = f"{self.cls.__module__}.{self.cls.__name__}"
        try:
            metadata = load_metadata(self.sparkSession, path)
        except Exception as exc:  # noqa: BLE001 - missing dir, no metadata, unreadable JSON
            raise ValueError(f"{path!r} is not a saved ffps estimator: no readable Spark ML metadata "
                             f"({short_error(exc)})") from None
        if metadata.get("class") != expected:
            model = "; a trained model loads with its model class's load()" if "Model" in str(metadata.get("class")) \
                else ""
            raise ValueError(f"{path!r} holds a saved {metadata.get('class')!r}, not the estimator {expected}{model}")
        instance = self.cls()                   # DefaultParamsReader.load's steps, on the metadata read once
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        return instance


class ModelReader(MLReader):
    def __init__(self, cls):
        super().__init__()
        self.cls = cls

    def load(self, path: str):
        expected = f"{self.cls.__module__}.{self.cls.__name__}"
        accepted = {expected, f"spark.estimator.{self.cls.__name__}"}   # saved before spark/model.py existed
        try:
            metadata = load_metadata(self.sparkSession, path)
        except Exception as exc:  # noqa: BLE001 - missing dir, no metadata, unreadable JSON
            raise ValueError(f"{path!r} is not a saved ffps model: no readable Spark ML metadata "
                             f"({short_error(exc)})") from None
        if metadata.get("class") not in accepted or metadata.get("ffpsFormat") != FORMAT_VERSION:
            raise ValueError(f"{path!r} holds a saved {metadata.get('class')!r}, not an ffps model ({expected}, "
                             f"format {FORMAT_VERSION})")
        try:
            rows = self.sparkSession.read.parquet(_join(path, "data")).collect()
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"ffps model at {path!r} is damaged: its weights (data/) cannot be read "
                             f"({short_error(exc)})") from None
        if len(rows) != 1 or not {"layers", "weights"} <= set(rows[0].asDict()):
            raise ValueError(f"ffps model at {path!r} is damaged: data/ should hold one row with layers and weights")
        layers, blob = list(rows[0]["layers"]), bytes(rows[0]["weights"])
        w = np.frombuffer(blob, dtype="<f4").astype(np.float32) if len(blob) % 4 == 0 else None
        if w is None or w.size != metadata.get("numParams"):
            raise ValueError(f"ffps model at {path!r} is damaged: {len(blob)} bytes of weights, expected "
                             f"{4 * int(metadata.get('numParams') or 0)}")
        try:
            instance = self.cls(weights=w, layers=layers)      # weights against layers, finite
        except ValueError as exc:
            raise ValueError(f"ffps model at {path!r} is damaged: {exc}") from None
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        if list(instance.getLayers()) != layers:
            raise ValueError(f"ffps model at {path!r} is damaged: metadata layers {instance.getLayers()} differ "
                             f"from data layers {layers}")
        return instance
