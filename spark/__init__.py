"""ffps on Spark ML: ``FeedForwardNetworkPSClassifier`` / ``FeedForwardNetworkPSClassificationModel``.

pyspark is imported lazily (on first use of these names), so ``ffps train`` runs without Spark or Java.
"""
__all__ = ["FeedForwardNetworkPSClassifier", "FeedForwardNetworkPSClassificationModel"]


def __getattr__(name):
    if name in __all__:
        from . import estimator

        return getattr(estimator, name)
    raise AttributeError(f"module 'spark' has no attribute {name!r}")
