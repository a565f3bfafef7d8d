"""ffps numeric core: dense / ReLU / softmax-NLL on a flat parameter vector, behind one backend interface.

Never imports pyspark; cupy and numba are imported only inside ``core/backends``.
"""
from .backends import BackendUnavailable, available_backends, get_backend, limit_cpu_threads, resolve_backend_name
from .network import DeviceData, FeedForwardNetwork, param_layout
from .optimizers import local_optimizer, make_optimizer
from .trainer import EpochStats, MinibatchTrainer, TrainingDiverged

__all__ = ["BackendUnavailable", "DeviceData", "EpochStats", "FeedForwardNetwork", "MinibatchTrainer",
           "TrainingDiverged", "available_backends", "get_backend", "limit_cpu_threads", "local_optimizer",
           "make_optimizer", "param_layout", "resolve_backend_name"]
