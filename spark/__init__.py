"""ffps on Spark ML: ``FeedForwardNetworkPSClassifier`` / ``FeedForwardNetworkPSClassificationModel``.

pyspark is imported lazily (on first use of these names), so ``ffps train`` runs without Spark or Java.
"""
__all__ = ["FeedForwardNetworkPSClassifier", "FeedForwardNetworkPSClassificationModel"]


def __getattr__(name):
    if name == "FeedForwardNetworkPSClassifier":
        from .estimator import FeedForwardNetworkPSClassifier

        return FeedForwardNetworkPSClassifier
    if name == "FeedForwardNetworkPSClassificationModel":
        from .model import FeedForwardNetworkPSClassificationModel

        return FeedForwardNetworkPSClassificationModel
    raise AttributeError(f"module 'spark' has no attribute {name!r}")
