"""ffps numeric core: dense / ReLU / softmax-NLL on a flat parameter vector, behind one backend interface.

Never imports pyspark; cupy and numba are imported only inside ``core/backends``.
"""
from .backends import BackendUnavailable, available_backends, get_backend, limit_cpu_threads, resolve_backend_name
from .network import DeviceData, FeedForwardNetwork, param_layout
from .trainer import EpochStats, LocalOptimizer, MinibatchTrainer, TrainingDiverged

__all__ = ["BackendUnavailable", "DeviceData", "EpochStats", "FeedForwardNetwork", "LocalOptimizer",
           "MinibatchTrainer", "TrainingDiverged", "available_backends", "get_backend", "limit_cpu_threads",
           "param_layout",
           "resolve_backend_name"]
