"""ffps parameter server: a ZeroMQ ROUTER on the driver, DEALER clients in the workers.

Layers: :mod:`ps.protocol` (wire format), :mod:`ps.spec` (the one training spec), :mod:`ps.modes` (one
object per trainer mode) over :mod:`ps.rules` (pure update math; optimizers are :mod:`core.optimizers`),
:mod:`ps.engine` (state machine, no sockets), :mod:`ps.server` / :mod:`ps.client` / :mod:`ps.security`
(transport), :mod:`ps.checkpoint`, :mod:`ps.worker` and :mod:`ps.runner` (Spark-free training). Never imports
pyspark, cupy or numba.
"""
from .client import (AuthenticationRefused, ParameterClient, PSError, PushResult, ServerUnavailable, StaleUpdate,
                     UpdateRejected)
from .modes import MODE_NAMES as MODES
from .protocol import PROTOCOL_VERSION, Op, Reason, Status, model_fingerprint
from .server import ParameterServer
from .spec import TrainingSpec

__all__ = ["AuthenticationRefused", "MODES", "PROTOCOL_VERSION", "Op", "PSError", "ParameterClient", "ParameterServer",
           "PushResult", "Reason", "ServerUnavailable", "StaleUpdate", "Status", "TrainingSpec", "UpdateRejected",
           "model_fingerprint"]
