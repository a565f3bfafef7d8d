"""ffps parameter server: a ZeroMQ ROUTER on the driver, DEALER clients in the workers.

Layers: :mod:`ps.protocol` (wire format), :mod:`ps.rules` and :mod:`ps.optimizers` (pure update math),
:mod:`ps.engine` (state machine, no sockets), :mod:`ps.server` / :mod:`ps.client` (transport),
:mod:`ps.checkpoint`, :mod:`ps.worker` and :mod:`ps.runner` (Spark-free training). Never imports pyspark,
cupy or numba.
"""
from .client import ParameterClient, PSError, PushResult, ServerUnavailable, StaleUpdate
from .protocol import PROTOCOL_VERSION, Op, Reason, Status, model_fingerprint
from .rules import MODES
from .server import ParameterServer

__all__ = ["MODES", "PROTOCOL_VERSION", "Op", "PSError", "ParameterClient", "ParameterServer", "PushResult",
           "Reason", "ServerUnavailable", "StaleUpdate", "Status", "model_fingerprint"]
