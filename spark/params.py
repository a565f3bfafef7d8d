"""The Params of :class:`FeedForwardNetworkPSClassifier` and its model: declared once, in one table.

Spark's own names where they exist (``layers``, ``maxIter``, ``stepSize``, ``blockSize``, ``seed``, ``tol``,
``initialWeights``, the column params) with the meaning they have in ``MultilayerPerceptronClassifier``;
the parameter-server options (``mode``, ``optimizer``, ``communicationWindow``, ...) are ours. Each row of
:data:`PARAMS` gives a Param its doc string, type converter and default; the getters, the setters and the
constructors' keyword arguments are generated from it. The choice lists are core's and ps's own.
:func:`training_spec` turns the values into the :class:`ps.spec.TrainingSpec` of a fit, checking every one.
"""
from __future__ import annotations

import inspect
import math
import socket
import zlib

import numpy as np
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (HasBlockSize, HasFeaturesCol, HasLabelCol, HasMaxIter, HasPredictionCol,
                                     HasProbabilityCol, HasRawPredictionCol, HasSeed, HasStepSize, HasTol)

from core.backends import BACKEND_NAMES
from core.backends.numpy_ops import PRECISIONS
from core.network import param_layout
from core.optimizers import OPTIMIZERS
from core.validation import check_int, check_layers
from ps.modes import AUTO_WINDOW_MAX, DEFAULT_WINDOW, MODE_NAMES
from ps.protocol import WIRE_DTYPES
from ps.spec import TrainingSpec

T = TypeConverters


class _choice:
    """A Param's type converter for a fixed set of names. A class, not a closure: a Param holds its converter,
    and the estimator and the model must pickle (broadcast, a UDF's closure, Spark Connect's ML cache)."""

    def __init__(self, name, choices):
        self.name, self.choices = name, tuple(choices)

    def __call__(self, value):
        if not isinstance(value, str):    # pyspark 3.5's toString fails on NumPy 2 with an AttributeError
            raise TypeError(f"{self.name} must be a string, one of {', '.join(self.choices)}; got {value!r}")
        if value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")
        return value


class _text:
    """A free-text Param's converter: a str, else a TypeError naming the Param (pyspark 3.5's toString failed
    on NumPy 2 with an AttributeError)."""

    def __init__(self, name):
        self.name = name

    def __call__(self, value):
        if not isinstance(value, str):
            raise TypeError(f"{self.name} must be a string, got {value!r}")
        return value


def _solver(value):
    if value == "l-bfgs":
        raise ValueError("solver 'l-bfgs' is not available: ffps trains by mini-batch gradient descent on a parameter "
                         "server (solver='gd'); drop solver, or use MLlib's MultilayerPerceptronClassifier for "
                         "L-BFGS")
    return _choice("solver", ("gd",))(value)


def _thresholds(value) -> list[float]:
    """The Param's converter: MLlib's rule for the values (finite, >= 0, at most one 0), so a bad list is refused
    when it is set, not at the next transform."""
    t = T.toListFloat(value)
    if not all(math.isfinite(v) and v >= 0 for v in t) or t.count(0.0) > 1:
        raise ValueError(f"thresholds must be finite values >= 0 with at most one 0, got {t}")
    return t


def check_thresholds(thresholds, num_classes: int) -> list[float] | None:
    """MLlib's rule for ``thresholds``: one value >= 0 per class, at most one of them 0 -> the list (None: unset)."""
    if thresholds is None:
        return None
    t = _thresholds(thresholds)
    if len(t) != num_classes:
        raise ValueError(f"thresholds must have one value per class ({num_classes}, layers[-1]), got {len(t)}: {t}")
    return t


def check_model_weights(weights, layers) -> np.ndarray:
    """The flat weights as the model keeps them (contiguous float32), checked against ``layers``: a model that
    cannot score is refused when it is built or loaded, not inside an executor at the first transform."""
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.ndim != 1:
        raise ValueError(f"weights must be a flat vector, got shape {w.shape}")
    if layers is not None:
        sizes = check_layers(layers)
        expected = param_layout(sizes)[-1].end
        if w.size != expected:
            raise ValueError(f"weights have {w.size} values but layers {sizes} have {expected} parameters")
    if not np.isfinite(w).all():
        raise ValueError("weights contain NaN or infinite values")
    return w


# name -> (doc, converter, default); doc None: a Spark shared param (its doc and converter are Spark's);
# default None: unset until the user sets it
PARAMS = {
    "layers": ("sizes of the layers from input to output: layers[0] = feature vector width, layers[-1] = number of "
               "classes, e.g. [780, 100, 10]", T.toListInt, None),
    "initialWeights": ("initial flat weight vector (for each layer W row-major then b); default: He-normal from "
                       "seed", T.toListFloat, None),
    "maxIter": ("passes over the data (>= 1): each worker trains on its partition maxIter times, unless tol stops "
                "it earlier", T.toInt, 100),
    "stepSize": (None, None, 0.1),
    "blockSize": ("rows of each mini-batch step of a worker (>= 1): the SGD batch size, so unlike MLlib's MLPC "
                  "(where it only stacks rows for speed; default 128) it changes what is learned",
                  T.toInt, 64),
    "solver": ("the optimization algorithm: gd, mini-batch gradient descent on the parameter server (MLlib's "
               "MLPC also has l-bfgs, its default; not available here)", _solver, "gd"),
    "thresholds": ("thresholds in multi-class classification to adjust the probability of predicting each class: "
                   "one value >= 0 per class (layers[-1]), at most one of them 0; the class with the largest p/t "
                   "is predicted, where p is its probability and t its threshold (as MLlib's classifiers)",
                   _thresholds, None),
    # HasSeed's default is hash() of the class name, which Python salts per process: the same script trained
    # another model each run (MLlib's Python wrappers too; Scala's MLlib uses the name's stable hashCode)
    "seed": (None, None, zlib.crc32(b"FeedForwardNetworkPSClassifier")),
    "tol": ("stop when the relative change of the epoch's mean training loss falls below tol (>= 0; 0 = always "
            "run maxIter passes); checked at each epoch boundary by the parameter server", T.toFloat, 1e-6),
    "mode": ("how workers combine their work on the parameter server: sync (averaged gradients, one step per "
             "round), async (DOWNPOUR), easgd, async-easgd, eamsgd (elastic averaging)",
             _choice("mode", MODE_NAMES), "async"),
    "optimizer": ("update rule the server applies to gradient pushes (sync, async): " + ", ".join(OPTIMIZERS),
                  _choice("optimizer", OPTIMIZERS), "sgd"),
    "communicationWindow": ("local mini-batch steps between exchanges with the server (tau); 0 = auto: 1 in sync "
                            "mode (where it must be 1); in the others %d, and a worker whose exchanges take more "
                            "than a fifth of its time covers several windows in one push, up to %d steps (not with "
                            "maxStaleness); a window set here stays fixed. A worker whose pass over its shard has "
                            "fewer steps exchanges once a pass" % (DEFAULT_WINDOW, AUTO_WINDOW_MAX), T.toInt, 0),
    "rho": ("elastic modes: moving rate alpha = stepSize * rho; unset = the EASGD default alpha = 0.9 / "
            "numWorkers", T.toFloat, None),
    "momentum": ("momentum: of the server optimizer 'momentum'/'nesterov', and delta of eamsgd's local Nesterov "
                 "steps (0 <= momentum < 1)", T.toFloat, 0.9),
    "maxStaleness": ("async only: reject a push computed on weights more than this many updates old (the worker "
                     "pulls and recomputes); -1 = unbounded", T.toInt, -1),
    "numWorkers": ("training tasks in the barrier stage (each needs a free task slot; >= 1)", T.toInt, 2),
    "backend": ("compute backend of the training tasks: auto (cupy with a GPU, else numba), cupy, numba, numpy",
                _choice("backend", BACKEND_NAMES), "auto"),
    "precision": ("GEMM input precision of the training tasks: fp32, tf32 (10-bit mantissa) or bf16 (7-bit); "
                  "products summed in float32, weights, optimizer and loss float32; tensor cores with cupy, "
                  "emulated (slowly) on CPUs", _choice("precision", PRECISIONS), "fp32"),
    "cudaGraphs": ("cupy: record each window of local steps as one CUDA graph, with the loss read once per "
                   "window (falls back to op-by-op steps where recording is impossible)", T.toBoolean, False),
    "pipelineExchange": ("asynchronous modes: push and pull window k while window k+1 computes (other "
                         "workers' updates arrive one exchange later: staleness one higher; a worker keeps its "
                         "own progress across the exchange in flight, scaled by a momentum optimizer's gain). "
                         "adam loses a little accuracy to it", T.toBoolean, False),
    "wireDtype": ("frames of gradient and elastic-difference pushes: float32, bfloat16 or float16 (half the "
                  "bytes; the server adds them in float32)", _choice("wireDtype", tuple(WIRE_DTYPES)), "float32"),
    "useGpu": ("ask Spark for one GPU per training task (a stage-level ResourceProfile where the cluster manager "
               "supports it); implied by backend='cupy'", T.toBoolean, False),
    "psHost": ("address the parameter server binds and the training tasks connect to; empty = 127.0.0.1 in "
               "local mode, else spark.driver.host. On Spark Connect the server runs in the client process: "
               "empty works only with a local Connect server and a local master; else give an address of the "
               "client machine that the executors can reach", _text("psHost"), ""),
    "psPort": ("parameter server TCP port; 0 = any free port (with psShards > 1 shard k listens on psPort + k)",
               T.toInt, 0),
    "psShards": ("slices of the weight vector the parameter server serves with a socket, thread and core each, "
                 "so the encryption and the update of a large model run in parallel; 0 = auto: 1 below 1M "
                 "parameters, else up to 4 and half the driver's cores", T.toInt, 0),
    "secure": ("encrypt and authenticate parameter-server traffic with per-job CURVE keys; turn off only on a "
               "trusted network", T.toBoolean, True),
    "checkpointDir": ("driver-local directory for parameter-server checkpoints; empty = none", _text("checkpointDir"),
                      ""),
    "checkpointInterval": ("server updates between checkpoints when checkpointDir is set (>= 1)", T.toInt, 100),
    "resume": ("continue from the newest checkpoint in checkpointDir (a fit whose driver died): weights, "
               "optimizer state and every worker's last applied step; refused for a checkpoint of other layers "
               "or another mode. Without it a fit refuses a checkpointDir that already holds checkpoints",
               T.toBoolean, False),
    "maxRetries": ("times the driver relaunches the barrier training stage after a failure; workers resume after "
                   "their last applied step (>= 0)", T.toInt, 2),
    "workerTimeout": ("seconds a worker waits for one server reply before retrying (> 0)", T.toFloat, 30.0),
    "roundTimeout": ("seconds a sync/easgd round may wait for the slowest worker; in the asynchronous modes, "
                     "seconds a worker may stay silent after its peers finished before its stage is cancelled and "
                     "relaunched (> 0)", T.toFloat, 120.0),
    "forceRepartition": ("shuffle the training rows into numWorkers partitions even when the DataFrame already "
                         "has numWorkers partitions (it is always shuffled otherwise, and where its partitions "
                         "turn out empty, too uneven for sync/easgd, or split by label outside sync); set it when "
                         "partitions are not random samples of the data in other ways", T.toBoolean, False),
    "mlflowTracking": ("log the fit to MLflow (params, per-epoch loss and accuracy, the model): true = always, "
                       "into the active run or else a new run named after the estimator uid; false = never; "
                       "unset (the default) = only when an MLflow run is active", T.toBoolean, None),
}
TRAINING_PARAMS = tuple(PARAMS)
COLUMN_PARAMS = {"featuresCol": "features", "labelCol": "label", "predictionCol": "prediction",
                 "probabilityCol": "probability", "rawPredictionCol": "rawPrediction"}
MODEL_SETTABLE = ("featuresCol", "predictionCol", "probabilityCol", "rawPredictionCol", "thresholds")
# the TrainingSpec settings under their Spark names, for error messages
SPEC_NAMES = {"num_workers": "numWorkers", "epochs": "maxIter", "batch_size": "blockSize",
              "learning_rate": "stepSize", "tau": "communicationWindow", "local_momentum": "momentum",
              "staleness": "maxStaleness", "barrier_timeout": "roundTimeout", "worker_timeout": "workerTimeout",
              "tol": "tol", "cuda_graphs": "cudaGraphs", "pipeline": "pipelineExchange", "wire_dtype": "wireDtype"}


def _camel(name: str) -> str:
    return name[0].upper() + name[1:]


class FeedForwardNetworkPSParams(HasFeaturesCol, HasLabelCol, HasPredictionCol, HasProbabilityCol,
                                 HasRawPredictionCol, HasMaxIter, HasStepSize, HasBlockSize, HasSeed, HasTol):
    """Params of the estimator and the model (the model keeps the values it was trained with)."""

    def __init__(self, *args):
        super().__init__(*args)
        self._setDefault(**{k: d for k, (_, _, d) in PARAMS.items() if d is not None})


for _name, (_doc, _convert, _) in PARAMS.items():
    if _doc is not None:
        setattr(FeedForwardNetworkPSParams, _name, Param(Params._dummy(), _name, _doc, typeConverter=_convert))
    if not hasattr(FeedForwardNetworkPSParams, "get" + _camel(_name)):
        setattr(FeedForwardNetworkPSParams, "get" + _camel(_name),
                lambda self, _n=_name: self.getOrDefault(_n))


def output_columns(p: Params) -> dict:
    """{param: column} of the columns transform adds (rawPredictionCol, probabilityCol, predictionCol)."""
    return {"rawPredictionCol": p.getRawPredictionCol(), "probabilityCol": p.getProbabilityCol(),
            "predictionCol": p.getPredictionCol()}


def add_setters(cls, names):
    """``setX(value)`` for each Param name, returning self (as Spark's own setters do)."""
    for name in names:
        def setter(self, value, _name=name):
            if _name == "thresholds" and value is not None and self.isDefined("layers"):
                check_thresholds(value, self.getOrDefault("layers")[-1])      # the length, once classes are known
            return self._set(**{_name: value})
        setter.__name__ = "set" + _camel(name)
        setter.__doc__ = f"Sets the value of :py:attr:`{name}`."
        setattr(cls, setter.__name__, setter)
    return cls


def keyword_signature(names) -> inspect.Signature:
    """The keyword-only signature of a constructor taking these Params (defaults from the table), for help()."""
    defaults = {**COLUMN_PARAMS, **{k: d for k, (_, _, d) in PARAMS.items()}}
    return inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(n)) for n in names])


# ------------------------------------------------------------------------------------------------ checking
def training_spec(p: Params) -> TrainingSpec:
    """Every training setting of ``p`` checked, with the offending Param and value named -> the fit's spec."""
    if not p.isDefined("layers"):
        raise ValueError("layers is not set: give the layer sizes, e.g. layers=[num_features, 100, num_classes]")
    get = p.getOrDefault
    layers = check_layers(get("layers"))
    for name, low in (("maxRetries", 0), ("checkpointInterval", 1), ("psPort", 0), ("maxStaleness", -1),
                      ("psShards", 0)):
        check_int(name, get(name), low)
    if get("psPort") > 65535:
        raise ValueError(f"psPort must be 0..65535, got {get('psPort')}")
    if get("resume") and not get("checkpointDir"):
        raise ValueError("resume=True needs checkpointDir: the directory whose newest checkpoint the fit continues")
    if p.isSet(p.checkpointInterval) and not get("checkpointDir"):     # it was ignored without a word
        raise ValueError(f"checkpointInterval={get('checkpointInterval')} needs checkpointDir: without a directory "
                         f"no checkpoint is written")
    alpha = None
    if p.isDefined("rho"):
        rho = get("rho")
        if not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"rho must be a positive number, got {rho!r}")
        alpha = get("stepSize") * rho
    optimizer_options = {"momentum": get("momentum")} if get("optimizer") in ("momentum", "nesterov") else {}
    spec = TrainingSpec.build(
        SPEC_NAMES, layers=layers, mode=get("mode"), num_workers=get("numWorkers"), epochs=get("maxIter"),
        batch_size=get("blockSize"), learning_rate=get("stepSize"), optimizer=get("optimizer"),
        optimizer_options=optimizer_options, tau=get("communicationWindow"), alpha=alpha,
        local_momentum=get("momentum"), staleness=None if get("maxStaleness") < 0 else get("maxStaleness"),
        barrier_timeout=get("roundTimeout"), worker_timeout=get("workerTimeout"), backend=get("backend"),
        seed=get("seed"), tol=get("tol"), precision=get("precision"), cuda_graphs=get("cudaGraphs"),
        pipeline=get("pipelineExchange"), wire_dtype=get("wireDtype"))
    # a setting the chosen mode never reads is refused, as maxStaleness in sync is, not ignored
    if p.isDefined("rho") and spec.rule.pushes_gradients:
        raise ValueError(f"rho={get('rho')!r} applies to the elastic modes (easgd, async-easgd, eamsgd), not "
                         f"mode={get('mode')!r}")
    if p.isSet(p.momentum) and not optimizer_options and spec.rule.local_optimizer == "sgd":
        raise ValueError(f"momentum={get('momentum')!r} applies to optimizer='momentum' or 'nesterov' and to "
                         f"mode='eamsgd', not optimizer={get('optimizer')!r} in mode={get('mode')!r}")
    if p.isDefined("thresholds"):
        check_thresholds(get("thresholds"), layers[-1])
    if get("psShards") > spec.num_params:
        raise ValueError(f"psShards must be at most the {spec.num_params} parameters, got {get('psShards')}")
    if p.isDefined("initialWeights"):
        w0 = np.asarray(get("initialWeights"), dtype=np.float32)
        if w0.shape != (spec.num_params,):
            raise ValueError(f"initialWeights has {w0.size} values but layers {layers} have {spec.num_params} "
                             f"parameters")
        if not np.isfinite(w0).all():
            raise ValueError("initialWeights contains NaN or infinite values")
    return spec


def initial_weights(p: Params, spec: TrainingSpec) -> np.ndarray:
    """initialWeights when set, else He-normal from the spec's seed."""
    if p.isDefined("initialWeights"):
        return np.asarray(p.getOrDefault("initialWeights"), dtype=np.float32)
    return spec.initial_weights()


def ps_bind(master: str, driver_host: str | None, host: str, port: int, connect_server: str | None = None) -> str:
    """tcp://IP:PORT for the server: psHost, else 127.0.0.1 in local modes, else the driver's address.

    connect_server: the Spark Connect server's host when the session is a Connect client. The parameter server
    then runs in this client process, not on the driver: without psHost that works only when the Connect server
    is on this machine with a local master (its executors are local too); otherwise a ValueError says to set
    psHost, instead of tasks waiting on an address they cannot reach.
    """
    if not host and connect_server is not None:
        from .session import is_loopback

        if not (master.startswith("local") and is_loopback(connect_server)):
            raise ValueError(
                f"this is a Spark Connect session to the server at {connect_server!r} (master {master!r}): the "
                f"parameter server runs here, in the client process, and the cluster's executors must connect to "
                f"it. Set psHost to an address of this machine that the executors can reach (and psPort to a port "
                f"open to them). Where executors cannot open connections to the client (serverless or NAT'ed "
                f"notebooks), ffps cannot train over Spark Connect: run the fit in a classic session on the driver")
        host = "127.0.0.1"
    if host in ("0.0.0.0", "*"):
        raise ValueError(f"psHost {host!r} is a wildcard: executors connect to psHost, so it must be an address of "
                         f"the driver they can reach (e.g. its LAN IP); the server binds that address")
    if host.count(":") == 1:
        raise ValueError(f"psHost {host!r} has a port: psHost takes the address alone; set psPort for the port")
    if ":" in host:
        raise ValueError(f"psHost {host!r} looks like an IPv6 address, which the parameter server does not support; "
                         f"give an IPv4 address or a host name of the driver")
    if not host:
        host = "127.0.0.1" if master.startswith("local") else (driver_host or socket.gethostname())
    try:
        ip = socket.gethostbyname(host)
    except OSError as exc:
        raise ValueError(f"psHost {host!r} does not resolve to an address ({exc}); set psHost to an IP of the "
                         f"driver that executors can reach") from None
    return f"tcp://{ip}:{int(port)}"
