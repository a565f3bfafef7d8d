"""``FeedForwardNetworkPSClassificationModel``: a trained network as a Spark ML Model.

    model.transform(df)          # + rawPrediction (logits), probability (softmax), prediction (double)
    model.summary                # what the fit did (a model returned by fit only)
    model.save(path); FeedForwardNetworkPSClassificationModel.load(path)
"""
from __future__ import annotations

import numpy as np
from pyspark.ml import Model
from pyspark.ml.linalg import DenseVector
from pyspark.ml.util import MLReadable, MLWritable

from .data import check_schema
from .params import MODEL_SETTABLE, FeedForwardNetworkPSParams, add_setters
from .persistence import ModelReader, ModelWriter
from .predict import transform_frame
from .summary import FeedForwardNetworkPSTrainingSummary


class FeedForwardNetworkPSClassificationModel(Model, FeedForwardNetworkPSParams, MLReadable, MLWritable):
    """Trained network: ``transform`` adds rawPrediction (logits), probability and prediction columns.

    ``weights``: the flat parameter vector (for each layer W row-major, then b) as a DenseVector.
    """

    def __init__(self, weights=None, layers=None):
        super().__init__()
        self._weights = None if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
        if layers is not None:
            self._set(layers=list(layers))
        self.trainingStats = None

    @property
    def weights(self) -> DenseVector:
        return DenseVector(self._weights.astype(np.float64))

    @property
    def hasSummary(self) -> bool:
        """True for a model returned by ``fit``; False for a loaded model or one built from weights."""
        return self.trainingStats is not None

    @property
    def summary(self) -> FeedForwardNetworkPSTrainingSummary:
        """Loss and accuracy per epoch, per-worker figures and curves of the fit that made this model."""
        if not self.hasSummary:
            raise RuntimeError(f"No training summary available for this {type(self).__name__}: only a model "
                               f"returned by fit() has one, not a loaded model or one built from weights")
        cached = getattr(self, "_summary", None)
        if cached is None or cached._stats is not self.trainingStats:
            cached = self._summary = FeedForwardNetworkPSTrainingSummary(self.trainingStats)
        return cached

    @property
    def numFeatures(self) -> int:
        return int(self.getLayers()[0])

    @property
    def numClasses(self) -> int:
        return int(self.getLayers()[-1])

    def _net(self):
        from core import FeedForwardNetwork

        return FeedForwardNetwork(self.getLayers(), backend="numpy")

    def predictProbability(self, value) -> DenseVector:
        """Class probabilities of one feature vector."""
        x = np.asarray(value.toArray() if hasattr(value, "toArray") else value, dtype=np.float32)[None, :]
        return DenseVector(self._net().predict_proba(self._weights, x)[0].astype(np.float64))

    def predict(self, value) -> float:
        """Predicted class index (as a float, like Spark) of one feature vector."""
        return float(np.argmax(self.predictProbability(value).toArray()))

    def _transform(self, dataset):
        if self._weights is None:
            raise ValueError("this model has no weights: train it with fit() or load() a saved one")
        check_schema(dataset.schema, self.getFeaturesCol(), None)
        for param, column in (("rawPredictionCol", self.getRawPredictionCol()),
                              ("probabilityCol", self.getProbabilityCol()), ("predictionCol", self.getPredictionCol())):
            if column and column in dataset.columns:      # MLlib's classifiers refuse it too ("already exists")
                raise ValueError(f"column {column!r} already exists in the input; drop it, or set {param} to another "
                                 f"name (or to '' for no such column)")
        return transform_frame(dataset, self._weights, self.getLayers(), self.getFeaturesCol(),
                               self.getRawPredictionCol(), self.getProbabilityCol(), self.getPredictionCol())

    def copy(self, extra=None):
        that = super().copy(extra)
        that._weights = self._weights
        return that

    @classmethod
    def read(cls):
        return ModelReader(cls)

    @classmethod
    def load(cls, path):
        return cls.read().load(path)

    def write(self):
        return ModelWriter(self)

    def save(self, path):
        self.write().save(path)


add_setters(FeedForwardNetworkPSClassificationModel, MODEL_SETTABLE)
