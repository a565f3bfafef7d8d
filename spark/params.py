"""The Params shared by :class:`FeedForwardNetworkPSClassifier` and its model, declared once.

Spark's own names where they exist (``layers``, ``maxIter``, ``stepSize``, ``blockSize``, ``seed``, ``tol``,
``initialWeights``, the column params) with the meaning they have in ``MultilayerPerceptronClassifier``;
the parameter-server options (``mode``, ``optimizer``, ``communicationWindow``, ...) are ours.
"""
from __future__ import annotations

from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (HasBlockSize, HasFeaturesCol, HasLabelCol, HasMaxIter, HasPredictionCol,
                                     HasProbabilityCol, HasRawPredictionCol, HasSeed, HasStepSize, HasTol)

MODES = ("sync", "async", "easgd", "async-easgd", "eamsgd")
SERVER_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "adam")
BACKENDS = ("auto", "cupy", "numba", "numpy")


def _choice(name, choices):
    def convert(value):
        value = TypeConverters.toString(value)
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value
    return convert


class FeedForwardNetworkPSParams(HasFeaturesCol, HasLabelCol, HasPredictionCol, HasProbabilityCol,
                                 HasRawPredictionCol, HasMaxIter, HasStepSize, HasBlockSize, HasSeed, HasTol):
    """Params of the estimator and the model (the model keeps the values it was trained with)."""

    layers = Param(Params._dummy(), "layers",
                   "sizes of the layers from input to output: layers[0] = feature vector width, "
                   "layers[-1] = number of classes, e.g. [780, 100, 10]", typeConverter=TypeConverters.toListInt)
    initialWeights = Param(Params._dummy(), "initialWeights",
                           "initial flat weight vector (for each layer W row-major then b); default: He-normal "
                           "from seed", typeConverter=TypeConverters.toListFloat)
    mode = Param(Params._dummy(), "mode",
                 "how workers combine their work on the parameter server: sync (averaged gradients, one step "
                 "per round), async (DOWNPOUR), easgd, async-easgd, eamsgd (elastic averaging)",
                 typeConverter=_choice("mode", MODES))
    optimizer = Param(Params._dummy(), "optimizer",
                      "update rule the server applies to gradient pushes (sync, async): "
                      + ", ".join(SERVER_OPTIMIZERS), typeConverter=_choice("optimizer", SERVER_OPTIMIZERS))
    communicationWindow = Param(Params._dummy(), "communicationWindow",
                                "local mini-batch steps between exchanges with the server (tau); must be 1 in "
                                "sync mode (>= 1)", typeConverter=TypeConverters.toInt)
    rho = Param(Params._dummy(), "rho",
                "elastic modes: moving rate alpha = stepSize * rho; unset = the EASGD default alpha = 0.9 / "
                "numWorkers", typeConverter=TypeConverters.toFloat)
    momentum = Param(Params._dummy(), "momentum",
                     "momentum: of the server optimizer 'momentum'/'nesterov', and delta of eamsgd's local "
                     "Nesterov steps (0 <= momentum < 1)", typeConverter=TypeConverters.toFloat)
    maxStaleness = Param(Params._dummy(), "maxStaleness",
                         "async only: reject a push computed on weights more than this many updates old (the "
                         "worker pulls and recomputes); -1 = unbounded", typeConverter=TypeConverters.toInt)
    numWorkers = Param(Params._dummy(), "numWorkers",
                       "training tasks in the barrier stage (each needs a free task slot; >= 1)",
                       typeConverter=TypeConverters.toInt)
    backend = Param(Params._dummy(), "backend",
                    "compute backend of the training tasks: auto (cupy with a GPU, else numba), cupy, numba, "
                    "numpy", typeConverter=_choice("backend", BACKENDS))
    useGpu = Param(Params._dummy(), "useGpu",
                   "ask Spark for one GPU per training task (a stage-level ResourceProfile where the cluster "
                   "manager supports it); implied by backend='cupy'", typeConverter=TypeConverters.toBoolean)
    psHost = Param(Params._dummy(), "psHost",
                   "address the parameter server binds on the driver and workers connect to; empty = "
                   "127.0.0.1 in local mode, else spark.driver.host", typeConverter=TypeConverters.toString)
    psPort = Param(Params._dummy(), "psPort", "parameter server TCP port; 0 = any free port",
                   typeConverter=TypeConverters.toInt)
    secure = Param(Params._dummy(), "secure",
                   "encrypt and authenticate parameter-server traffic with per-job CURVE keys; turn off only "
                   "on a trusted network", typeConverter=TypeConverters.toBoolean)
    checkpointDir = Param(Params._dummy(), "checkpointDir",
                          "driver-local directory for parameter-server checkpoints; empty = none",
                          typeConverter=TypeConverters.toString)
    checkpointInterval = Param(Params._dummy(), "checkpointInterval",
                               "server updates between checkpoints when checkpointDir is set (>= 1)",
                               typeConverter=TypeConverters.toInt)
    maxRetries = Param(Params._dummy(), "maxRetries",
                       "times the driver relaunches the barrier training stage after a failure; workers resume "
                       "after their last applied step (>= 0)", typeConverter=TypeConverters.toInt)
    workerTimeout = Param(Params._dummy(), "workerTimeout",
                          "seconds a worker waits for one server reply before retrying (> 0)",
                          typeConverter=TypeConverters.toFloat)
    roundTimeout = Param(Params._dummy(), "roundTimeout",
                         "seconds a sync/easgd round may wait for the slowest worker (> 0)",
                         typeConverter=TypeConverters.toFloat)
    forceRepartition = Param(Params._dummy(), "forceRepartition",
                             "shuffle the training rows into numWorkers partitions even when the DataFrame "
                             "already has numWorkers partitions (it is always shuffled otherwise); set it when "
                             "partitions are not random samples of the data, e.g. sorted or split by label",
                             typeConverter=TypeConverters.toBoolean)
    mlflowTracking = Param(Params._dummy(), "mlflowTracking",
                           "log the fit to MLflow (params, per-epoch loss and accuracy, the model): true = "
                           "always, into the active run or else a new run named after the estimator uid; "
                           "false = never; unset (the default) = only when an MLflow run is active",
                           typeConverter=TypeConverters.toBoolean)

    def __init__(self, *args):
        super().__init__(*args)
        self._setDefault(maxIter=100, stepSize=0.1, blockSize=64, tol=1e-6, mode="async", optimizer="sgd",
                         communicationWindow=1, momentum=0.9, maxStaleness=-1, numWorkers=2, backend="auto",
                         useGpu=False, psHost="", psPort=0, secure=True, checkpointDir="", checkpointInterval=100,
                         maxRetries=2, workerTimeout=30.0, roundTimeout=120.0, forceRepartition=False)

    def getLayers(self):
        return self.getOrDefault(self.layers)

    def getInitialWeights(self):
        return self.getOrDefault(self.initialWeights)

    def getMode(self):
        return self.getOrDefault(self.mode)

    def getOptimizer(self):
        return self.getOrDefault(self.optimizer)

    def getCommunicationWindow(self):
        return self.getOrDefault(self.communicationWindow)

    def getRho(self):
        return self.getOrDefault(self.rho)

    def getMomentum(self):
        return self.getOrDefault(self.momentum)

    def getMaxStaleness(self):
        return self.getOrDefault(self.maxStaleness)

    def getNumWorkers(self):
        return self.getOrDefault(self.numWorkers)

    def getBackend(self):
        return self.getOrDefault(self.backend)

    def getUseGpu(self):
        return self.getOrDefault(self.useGpu)

    def getPsHost(self):
        return self.getOrDefault(self.psHost)

    def getPsPort(self):
        return self.getOrDefault(self.psPort)

    def getSecure(self):
        return self.getOrDefault(self.secure)

    def getCheckpointDir(self):
        return self.getOrDefault(self.checkpointDir)

    def getCheckpointInterval(self):
        return self.getOrDefault(self.checkpointInterval)

    def getMaxRetries(self):
        return self.getOrDefault(self.maxRetries)

    def getForceRepartition(self):
        return self.getOrDefault(self.forceRepartition)

    def getWorkerTimeout(self):
        return self.getOrDefault(self.workerTimeout)

    def getRoundTimeout(self):
        return self.getOrDefault(self.roundTimeout)

    def getMlflowTracking(self):
        return self.getOrDefault(self.mlflowTracking)
