"""``FeedForwardNetworkPSClassifier`` (Estimator) and ``FeedForwardNetworkPSClassificationModel``.

    clf = FeedForwardNetworkPSClassifier(layers=[64, 100, 10], maxIter=30, stepSize=0.1, blockSize=64,
                                         seed=1, mode="async", numWorkers=2, backend="auto")
    model = clf.fit(df)          # featuresCol: Vector, labelCol: numeric class index 0..C-1
    model.transform(df)          # + rawPrediction (logits), probability (softmax), prediction (double)

``fit`` checks the params and the schema (before any job), starts the parameter server on the driver, runs
one barrier stage of ``numWorkers`` tasks (relaunched by the driver after a failure) whose tasks check the
data they read before any update, and returns the server's final weights in a model.
``tol`` is accepted for compatibility with MultilayerPerceptronClassifier; training always runs ``maxIter``
passes over the data.
"""
from __future__ import annotations

import logging
import math
import socket
import time

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.linalg import DenseVector
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable, MLReadable, MLWritable

from core.validation import check_layers

from .data import check_schema, prepared
from .params import FeedForwardNetworkPSParams
from .persistence import ModelReader, ModelWriter
from .predict import transform_frame
from .summary import FeedForwardNetworkPSTrainingSummary
from .tracking import log_fit
from .training import UnsupportedBarrierChain, make_train_function, run_barrier_stage

log = logging.getLogger("spark.estimator")

_TRAINING_PARAMS = ("layers", "initialWeights", "maxIter", "stepSize", "blockSize", "seed", "tol", "mode",
                    "optimizer", "communicationWindow", "rho", "momentum", "maxStaleness", "numWorkers", "backend",
                    "useGpu", "psHost", "psPort", "secure", "checkpointDir", "checkpointInterval", "maxRetries",
                    "workerTimeout", "roundTimeout", "forceRepartition", "mlflowTracking")
_COLUMN_PARAMS = ("featuresCol", "labelCol", "predictionCol", "probabilityCol", "rawPredictionCol")


def _add_setters(cls, names):
    for name in names:
        def setter(self, value, _name=name):
            return self._set(**{_name: value})
        setter.__name__ = "set" + name[0].upper() + name[1:]
        setter.__doc__ = f"Sets the value of :py:attr:`{name}`."
        setattr(cls, setter.__name__, setter)
    return cls


def _ps_bind(sc, host: str, port: int) -> str:
    """tcp://IP:PORT for the server: 127.0.0.1 in local modes, else the driver's address (or psHost)."""
    if not host:
        host = "127.0.0.1" if sc.master.startswith("local") else \
            sc.getConf().get("spark.driver.host", socket.gethostname())
    try:
        ip = socket.gethostbyname(host)
    except OSError as exc:
        raise ValueError(f"psHost {host!r} does not resolve to an address ({exc}); set psHost to an IP of the "
                         f"driver that executors can reach") from None
    return f"tcp://{ip}:{int(port)}"


class FeedForwardNetworkPSClassifier(Estimator, FeedForwardNetworkPSParams, DefaultParamsReadable,
                                     DefaultParamsWritable):
    """Feed-forward network classifier (Dense -> ReLU -> ... -> softmax) trained by a parameter server.

    Same column conventions as Spark's MultilayerPerceptronClassifier. ``maxIter`` = passes over the data,
    ``blockSize`` = mini-batch rows per worker step, ``stepSize`` = learning rate. See ``explainParams()``.
    """

    @keyword_only
    def __init__(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                 probabilityCol="probability", rawPredictionCol="rawPrediction", layers=None, initialWeights=None,
                 maxIter=100, stepSize=0.1, blockSize=64, seed=None, tol=1e-6, mode="async", optimizer="sgd",
                 communicationWindow=1, rho=None, momentum=0.9, maxStaleness=-1, numWorkers=2, backend="auto",
                 useGpu=False, psHost="", psPort=0, secure=True, checkpointDir="", checkpointInterval=100,
                 maxRetries=2, workerTimeout=30.0, roundTimeout=120.0, forceRepartition=False,
                 mlflowTracking=None):
        super().__init__()
        self._fault = None            # test-only: (worker, local step) whose Python worker exits on attempt 0
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                  probabilityCol="probability", rawPredictionCol="rawPrediction", layers=None, initialWeights=None,
                  maxIter=100, stepSize=0.1, blockSize=64, seed=None, tol=1e-6, mode="async", optimizer="sgd",
                  communicationWindow=1, rho=None, momentum=0.9, maxStaleness=-1, numWorkers=2, backend="auto",
                  useGpu=False, psHost="", psPort=0, secure=True, checkpointDir="", checkpointInterval=100,
                  maxRetries=2, workerTimeout=30.0, roundTimeout=120.0, forceRepartition=False,
                  mlflowTracking=None):
        """Sets params for this classifier (keyword arguments only)."""
        kwargs = {k: v for k, v in self._input_kwargs.items() if v is not None}
        return self._set(**kwargs)

    # ------------------------------------------------------------------ validation
    def _checked_settings(self) -> dict:
        """Every scalar setting checked, with the offending value named -> plain dict of locals."""
        if not self.isDefined(self.layers):
            raise ValueError("layers is not set: give the layer sizes, e.g. layers=[num_features, 100, num_classes]")
        s = {name: self.getOrDefault(name) for name in _TRAINING_PARAMS if self.isDefined(name)}
        s["layers"] = check_layers(s["layers"])
        limits = {"numWorkers": 1, "maxIter": 1, "blockSize": 1, "communicationWindow": 1, "maxRetries": 0,
                  "checkpointInterval": 1, "maxStaleness": -1, "psPort": 0}
        for name, lo in limits.items():
            if s[name] < lo:
                raise ValueError(f"{name} must be >= {lo}, got {s[name]!r}")
        for name in ("stepSize", "workerTimeout", "roundTimeout"):
            if not (math.isfinite(s[name]) and s[name] > 0):
                raise ValueError(f"{name} must be a positive number, got {s[name]!r}")
        if not 0 <= s["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1), got {s['momentum']!r}")
        if "rho" in s and not (math.isfinite(s["rho"]) and s["rho"] > 0):
            raise ValueError(f"rho must be a positive number, got {s['rho']!r}")
        if s["mode"] == "sync" and s["communicationWindow"] != 1:
            raise ValueError(f"communicationWindow must be 1 in sync mode, got {s['communicationWindow']}")
        if s["maxStaleness"] >= 0 and s["mode"] != "async":
            raise ValueError(f"maxStaleness applies to mode='async' only, got maxStaleness={s['maxStaleness']} "
                             f"with mode={s['mode']!r}")
        if s["psPort"] > 65535:
            raise ValueError(f"psPort must be 0..65535, got {s['psPort']}")
        from core.network import param_layout

        num_params = param_layout(s["layers"])[-1].end
        if "initialWeights" in s:
            w0 = np.asarray(s["initialWeights"], dtype=np.float32)
            if w0.shape != (num_params,):
                raise ValueError(f"initialWeights has {w0.size} values but layers {s['layers']} have "
                                 f"{num_params} parameters")
            if not np.isfinite(w0).all():
                raise ValueError("initialWeights contains NaN or infinite values")
            s["w0"] = w0
        return s

    # ------------------------------------------------------------------ fit
    def _fit(self, dataset):
        s = self._checked_settings()
        features_col, label_col = self.getFeaturesCol(), self.getLabelCol()
        check_schema(dataset.schema, features_col, label_col)
        layers, nw = s["layers"], s["numWorkers"]
        sc = dataset.sparkSession.sparkContext
        bind = _ps_bind(sc, s["psHost"], s["psPort"])
        if "w0" not in s:
            from core import FeedForwardNetwork

            s["w0"] = FeedForwardNetwork(layers, backend="numpy").init_params(int(s["seed"]) % (2 ** 32))
        # one partition per worker: shuffled (round-robin) unless the frame already has numWorkers partitions,
        # as xgboost.spark does; a frame whose lineage Spark will not run in a barrier stage (coalesce, limit)
        # is shuffled too
        shuffle = s["forceRepartition"] or dataset._jdf.rdd().getNumPartitions() != nw   # no Python RDD needed
        try:
            model, stats = self._train(self._prepared(dataset, shuffle), s, bind)
        except UnsupportedBarrierChain as exc:
            if shuffle:
                raise
            log.info("ffps: the input's partitions cannot run in a barrier stage (%s); shuffling them", exc)
            model, stats = self._train(self._prepared(dataset, True), s, bind)
        stats["rows"] = sum(stats["workers"][0]["partition_rows"])     # every worker holds the gathered counts
        model.trainingStats = stats
        model._resetUid(self.uid)
        model = self._copyValues(model)
        log_fit(self, model)      # to MLflow when wanted (spark/tracking.py); a logging failure only warns
        return model

    def _prepared(self, dataset, shuffle):
        """(features array<float>, label) under private names, in numWorkers partitions when ``shuffle``.

        Nothing is cached: the training stage reads the rows once into NumPy (a relaunched stage reads the
        shuffle's output again), and its tasks check the data as they read it.
        """
        prep = prepared(dataset, self.getFeaturesCol(), self.getLabelCol())
        return prep.repartition(self.getNumWorkers()) if shuffle else prep

    def _train(self, prep, s, bind):
        from ps import ParameterServer

        layers, nw, mode = s["layers"], s["numWorkers"], s["mode"]
        opt_options = {"momentum": s["momentum"]} if s["optimizer"] in ("momentum", "nesterov") else None
        server = ParameterServer(
            s["w0"], mode=mode, optimizer=s["optimizer"], learning_rate=s["stepSize"], num_workers=nw, bind=bind,
            secure=s["secure"], layers=layers, staleness=None if s["maxStaleness"] < 0 else s["maxStaleness"],
            tau=s["communicationWindow"], alpha=s["stepSize"] * s["rho"] if "rho" in s else None,
            momentum=s["momentum"], optimizer_options=opt_options, barrier_timeout=s["roundTimeout"],
            checkpoint_dir=s["checkpointDir"] or None,
            checkpoint_every=s["checkpointInterval"] if s["checkpointDir"] else None, progress=None)
        server.start()
        cfg = server.client_config()
        # plain locals only: this closure is pickled to every executor
        kw = dict(epochs=s["maxIter"], batch_size=s["blockSize"], backend=s["backend"],
                  seed=int(s["seed"]) % (2 ** 31), timeout=s["workerTimeout"], equal_shards=mode in ("sync", "easgd"),
                  features_col=self.getFeaturesCol(), label_col=self.getLabelCol(), fault=self._fault)

        def make_fn(attempt):
            return make_train_function(cfg, layers, attempt=attempt, **kw)

        log.info("ffps: training %s on %d workers, mode=%s, server %s", layers, nw, mode, server.address)
        t0 = time.perf_counter()
        try:
            workers, attempts = run_barrier_stage(prep, make_fn, num_workers=nw, max_retries=s["maxRetries"],
                                                  use_gpu=s["useGpu"] or s["backend"] == "cupy", server=server)
        finally:
            server.stop()
        seconds = time.perf_counter() - t0
        w = server.weights()
        if not np.isfinite(w).all():
            raise FloatingPointError(f"training diverged (non-finite weights) with stepSize={s['stepSize']}; "
                                     f"lower stepSize")
        stats = {"seconds": seconds, "attempts": attempts, "workers": workers, "server": server.stats(),
                 "history": server.history()}
        return FeedForwardNetworkPSClassificationModel(weights=w, layers=layers), stats


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


_add_setters(FeedForwardNetworkPSClassifier, _TRAINING_PARAMS + _COLUMN_PARAMS)
_add_setters(FeedForwardNetworkPSClassificationModel, _COLUMN_PARAMS[:1] + _COLUMN_PARAMS[2:])
