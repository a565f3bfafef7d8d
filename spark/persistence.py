"""Saving and loading the model: Spark ML metadata plus the weights written through Spark.

Layout under PATH (any URI Spark can write: file, HDFS, S3, ...):
``metadata/``  DefaultParamsWriter JSON (class, uid, params) with ``ffpsFormat`` and ``numParams`` added;
``data/``      Parquet, one row: layers array<int>, weights binary (little-endian float32, flat layout).
A directory that is not an ffps model, or a damaged one, raises ValueError naming the path and the problem.
Models saved when the model class lived in ``spark.estimator`` load as well (Pipelines find the class there too).
"""
from __future__ import annotations

import numpy as np
from pyspark.ml.util import DefaultParamsReader, DefaultParamsWriter, MLReader, MLWriter

FORMAT_VERSION = 1


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


class ModelWriter(MLWriter):
    def __init__(self, instance):
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        model = self.instance
        w = np.ascontiguousarray(model.weights.toArray(), dtype="<f4")   # float32 -> float64 -> float32: exact
        DefaultParamsWriter.saveMetadata(model, path, self.sc,
                                         extraMetadata={"ffpsFormat": FORMAT_VERSION, "numParams": int(w.size)})
        frame = self.sparkSession.createDataFrame([(list(model.getLayers()), bytearray(w.tobytes()))],
                                                  "layers array<int>, weights binary")
        frame.coalesce(1).write.parquet(path.rstrip("/") + "/data")


class ModelReader(MLReader):
    def __init__(self, cls):
        super().__init__()
        self.cls = cls

    def load(self, path: str):
        expected = f"{self.cls.__module__}.{self.cls.__name__}"
        accepted = {expected, f"spark.estimator.{self.cls.__name__}"}   # saved before spark/model.py existed
        try:
            metadata = DefaultParamsReader.loadMetadata(path, self.sc)
        except Exception as exc:  # noqa: BLE001 - missing dir, no metadata, unreadable JSON
            raise ValueError(f"{path!r} is not a saved ffps model: no readable Spark ML metadata "
                             f"({_short(exc)})") from None
        if metadata.get("class") not in accepted or metadata.get("ffpsFormat") != FORMAT_VERSION:
            raise ValueError(f"{path!r} holds a saved {metadata.get('class')!r}, not an ffps model ({expected}, "
                             f"format {FORMAT_VERSION})")
        try:
            rows = self.sparkSession.read.parquet(path.rstrip("/") + "/data").collect()
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"ffps model at {path!r} is damaged: its weights (data/) cannot be read "
                             f"({_short(exc)})") from None
        if len(rows) != 1 or not {"layers", "weights"} <= set(rows[0].asDict()):
            raise ValueError(f"ffps model at {path!r} is damaged: data/ should hold one row with layers and weights")
        layers, blob = list(rows[0]["layers"]), bytes(rows[0]["weights"])
        w = np.frombuffer(blob, dtype="<f4").astype(np.float32) if len(blob) % 4 == 0 else None
        if w is None or w.size != metadata.get("numParams"):
            raise ValueError(f"ffps model at {path!r} is damaged: {len(blob)} bytes of weights, expected "
                             f"{4 * int(metadata.get('numParams') or 0)}")
        if not np.isfinite(w).all():
            raise ValueError(f"ffps model at {path!r} is damaged: weights contain NaN or infinity")
        instance = self.cls(weights=w, layers=layers)
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        if list(instance.getLayers()) != layers:
            raise ValueError(f"ffps model at {path!r} is damaged: metadata layers {instance.getLayers()} differ "
                             f"from data layers {layers}")
        return instance
