"""``FeedForwardNetworkPSClassificationModel``: a trained network as a Spark ML Model.

    model.transform(df)          # + rawPrediction (centred logits), probability (softmax), prediction (double)
    model.summary                # what the fit did (a model returned by fit only)
    model.save(path); FeedForwardNetworkPSClassificationModel.load(path)
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from pyspark.ml import Model
from pyspark.ml.linalg import DenseVector
from pyspark.ml.util import MLReadable, MLWritable

from core.validation import check_layers

from .data import bound_batches_for_scoring, check_output_columns, check_schema, check_width
from .metrics import FeedForwardNetworkPSSummary
from .params import (MODEL_SETTABLE, FeedForwardNetworkPSParams, add_setters, check_model_weights, check_thresholds,
                     output_columns)
from .persistence import ModelReader, ModelWriter
from .predict import (classic_context, logits_and_probabilities, predicted_classes, transform_frame,
                      weights_for_executors)
from .summary import FeedForwardNetworkPSTrainingSummary


# networks for the one-row methods (predict & co.), per thread and layer sizes: building one per call was most
# of predict's time (48 us against a 5 us forward on digits), and a network's workspace must not be shared
# between serving threads
_ROW_NETS = threading.local()
_ROW_NETS_HELD = 4
ROW_NET_MAX_ROWS = 256         # rows whose workspace a held network keeps


def row_network(layers):
    """This thread's numpy network of ``layers`` (a few of the latest layer sizes are held per thread)."""
    from core import FeedForwardNetwork

    key = tuple(int(n) for n in layers)
    nets = getattr(_ROW_NETS, "nets", None)
    if nets is None:
        nets = _ROW_NETS.nets = OrderedDict()
    net = nets.get(key)
    if net is None:
        net = nets[key] = FeedForwardNetwork(list(key), backend="numpy")
        while len(nets) > _ROW_NETS_HELD:
            nets.popitem(last=False)
    else:
        nets.move_to_end(key)
    return net


class TrainingFrame:
    """The frame a model was fitted on, for its summary's classification figures: copying a model (``copy``,
    ``copy.deepcopy``) shares or drops it, and pickling leaves it out (a DataFrame does neither)."""

    def __init__(self, frame):
        self.frame = frame

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        return {"frame": None}


class FeedForwardNetworkPSClassificationModel(Model, FeedForwardNetworkPSParams, MLReadable, MLWritable):
    """Trained network: ``transform`` adds rawPrediction (centred logits), probability and prediction columns.

    ``weights``: the flat parameter vector (for each layer W row-major, then b) as a DenseVector.
    """

    def __init__(self, weights=None, layers=None):
        super().__init__()
        self._weights = None if weights is None else check_model_weights(weights, layers)
        if layers is not None:
            self._set(layers=check_layers(layers))
        self.trainingStats = None

    def __getstate__(self):
        """Pickled (a broadcast, a UDF's closure) without what lives in this session only: the training summary
        (it holds DataFrames) and the weights' broadcast; the summary's figures per epoch come back with
        ``trainingStats``."""
        state = dict(self.__dict__)
        state.update(_summary=None, _broadcast=None)
        return state

    def __repr__(self):
        """As MLlib's models print: the uid and the sizes (a Pipeline's stages list shows them)."""
        if not self.isDefined("layers"):
            return f"{type(self).__name__}: uid={self.uid}"
        return (f"{type(self).__name__}: uid={self.uid}, layers={list(self.getLayers())}, "
                f"numClasses={self.numClasses}, numFeatures={self.numFeatures}")

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
            held = getattr(self, "_training_frame", None)
            frozen = self._summary_model()      # the columns and thresholds of now, whatever is set on self later
            cached = self._summary = FeedForwardNetworkPSTrainingSummary(
                self.trainingStats, None if held is None or held.frame is None else
                (lambda: frozen.transform(held.frame)), frozen.getLabelCol(), frozen.getPredictionCol())
        return cached

    def evaluate(self, dataset) -> FeedForwardNetworkPSSummary:
        """Accuracy, weighted and per-label precision, recall, F-measure and false positive rate of this model on
        ``dataset`` (labelCol must be there), as MLlib's ``MultilayerPerceptronClassificationModel.evaluate``."""
        check_schema(dataset.schema, self.getFeaturesCol(), self.getLabelCol())
        scorer = self._summary_model()
        return FeedForwardNetworkPSSummary(scorer.transform(dataset), scorer.getLabelCol(), scorer.getPredictionCol())

    def _summary_model(self):
        """A copy that scores for a summary's figures: with predictionCol '' (no such column) it writes a
        temporary one, ``prediction_<uid>``, as MLlib's summaries do."""
        if self.getPredictionCol():
            return self.copy()
        return self.copy({self.predictionCol: f"prediction_{self.uid}"})

    @property
    def numFeatures(self) -> int:
        return int(self.getLayers()[0])

    @property
    def numClasses(self) -> int:
        return int(self.getLayers()[-1])

    def _thresholds(self):
        return check_thresholds(self.getOrDefault("thresholds") if self.isDefined("thresholds") else None,
                                self.numClasses)

    def _one_row(self, value):
        """(raw: centred logits (1, C), probabilities (1, C)) of one feature vector, checked like transform's rows."""
        from core import FeedForwardNetwork
        from core.validation import check_features

        layers = self.getLayers()
        x = np.asarray(value.toArray() if hasattr(value, "toArray") else value)
        x = check_features(x.reshape(1, -1) if x.ndim == 1 else x, int(layers[0]), np.dtype(np.float32))
        # a block of many rows gets a network of its own: a thread's held one would keep its workspace
        net = row_network(layers) if x.shape[0] <= ROW_NET_MAX_ROWS else FeedForwardNetwork(layers, backend="numpy")
        return logits_and_probabilities(net, self._weights, x)

    def predictRaw(self, value) -> DenseVector:
        """Raw prediction (the logits less their mean) of one feature vector, as in the rawPrediction column."""
        return DenseVector(self._one_row(value)[0][0])

    def predictProbability(self, value) -> DenseVector:
        """Class probabilities of one feature vector."""
        return DenseVector(self._one_row(value)[1][0])

    def predict(self, value) -> float:
        """Predicted class index (as a float, like Spark) of one feature vector; thresholds apply as in transform."""
        return float(predicted_classes(self._one_row(value)[1], self._thresholds())[0])

    def _transform(self, dataset):
        if self._weights is None:
            raise ValueError("this model has no weights: train it with fit() or load() a saved one")
        check_schema(dataset.schema, self.getFeaturesCol(), None)
        check_width(dataset.schema, self.getFeaturesCol(), self.numFeatures, "the model's layers[0]",
                    "score vectors of the model's width, or fit a model on these")
        check_output_columns(dataset.columns, output_columns(self))
        bound_batches_for_scoring(dataset.sparkSession, self.getFeaturesCol(), self.numFeatures)
        return transform_frame(dataset, self._executor_weights(dataset), self.getLayers(), self.getFeaturesCol(),
                               self.getRawPredictionCol(), self.getProbabilityCol(), self.getPredictionCol(),
                               self._thresholds())

    def _executor_weights(self, dataset):
        """The weights as the scoring UDF reads them (:func:`spark.predict.weights_for_executors`), made once per
        model and session: a broadcast per transform left a copy of the weights in the driver's temp directory
        each time (a streaming foreachBatch over a 7 MiB model: 213 MiB after 30 micro-batches)."""
        sc = classic_context(dataset)               # None on Connect: its bytes go inside each plan
        held = getattr(self, "_broadcast", None)
        if sc is not None and held is not None and held[0] is self._weights and held[1] is sc:
            return held[2]
        value = weights_for_executors(dataset, self._weights)
        if sc is not None and not isinstance(value, bytes):     # small weights ride inside the UDF
            self._broadcast = (self._weights, sc, value)
        return value

    def copy(self, extra=None):
        """A model of the same weights with ``extra`` params set. Its summary keeps the fit's figures per epoch
        but not the training frame (other params would score it otherwise): its classification figures come
        from ``evaluate(df)``."""
        that = super().copy(extra)
        that._weights, that._broadcast = self._weights, getattr(self, "_broadcast", None)   # same weights
        that._summary = that._training_frame = None
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
