"""Params: Spark's names and ours, defaults, doc strings, converters, keyword-only constructors, copy."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("pyspark")

from spark import FeedForwardNetworkPSClassificationModel, FeedForwardNetworkPSClassifier  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPARK_NAMES = ["layers", "maxIter", "stepSize", "blockSize", "seed", "tol", "initialWeights", "featuresCol",
               "labelCol", "predictionCol", "probabilityCol", "rawPredictionCol"]
OURS = ["mode", "optimizer", "communicationWindow", "rho", "momentum", "maxStaleness", "numWorkers", "backend",
        "useGpu", "psHost", "psPort", "checkpointDir", "checkpointInterval", "secure", "maxRetries",
        "workerTimeout", "roundTimeout", "precision", "cudaGraphs", "pipelineExchange", "wireDtype"]


def test_constructs_with_no_arguments_and_declares_every_param():
    clf = FeedForwardNetworkPSClassifier()
    model = FeedForwardNetworkPSClassificationModel()
    for name in SPARK_NAMES + OURS:
        for obj in (clf, model):
            p = obj.getParam(name)
            assert len(p.doc) > 10, f"{name} needs a real doc string"
    text = clf.explainParams()
    assert "communicationWindow: local mini-batch steps between exchanges" in text


def test_defaults():
    clf = FeedForwardNetworkPSClassifier()
    assert clf.getMaxIter() == 100 and clf.getStepSize() == 0.1 and clf.getBlockSize() == 64
    assert clf.getMode() == "async" and clf.getNumWorkers() == 2 and clf.getBackend() == "auto"
    assert clf.getSecure() is True and clf.getFeaturesCol() == "features" and clf.getLabelCol() == "label"
    assert not clf.isDefined(clf.layers) and not clf.isDefined(clf.rho)


def test_keyword_only_and_type_conversion():
    with pytest.raises(TypeError, match="forces keyword arguments"):
        FeedForwardNetworkPSClassifier([64, 10])
    clf = FeedForwardNetworkPSClassifier(layers=(64.0, 10), maxIter=3.0, useGpu=True)
    assert clf.getLayers() == [64, 10] and clf.getMaxIter() == 3 and clf.getUseGpu() is True
    with pytest.raises(TypeError, match='param "layers". Could not convert 64,10 to list of ints'):
        FeedForwardNetworkPSClassifier(layers="64,10")
    with pytest.raises(TypeError, match='param "maxIter". Could not convert 2.5 to int'):
        FeedForwardNetworkPSClassifier(maxIter=2.5)


def test_setters_and_copy_are_independent():
    clf = FeedForwardNetworkPSClassifier(layers=[4, 3])
    assert clf.setMode("sync") is clf and clf.getMode() == "sync"
    clf.setNumWorkers(3).setCommunicationWindow(1)
    other = clf.copy({clf.stepSize: 0.5})
    assert other.getStepSize() == 0.5 and clf.getStepSize() == 0.1
    assert other.uid == clf.uid and other.getNumWorkers() == 3
    other.setLayers([4, 8, 3])
    assert clf.getLayers() == [4, 3]


def test_one_table_gives_every_param_its_getter_setter_argument_and_default():
    import inspect

    from spark.params import COLUMN_PARAMS, PARAMS

    clf = FeedForwardNetworkPSClassifier()
    sig = inspect.signature(FeedForwardNetworkPSClassifier.__init__)
    for name in list(COLUMN_PARAMS) + list(PARAMS):
        cap = name[0].upper() + name[1:]
        assert callable(getattr(clf, "get" + cap)) and callable(getattr(clf, "set" + cap)), name
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        if clf.hasDefault(name):
            assert sig.parameters[name].default == clf.getOrDefault(name), name
    assert sig.parameters["maxIter"].default == 100 and sig.parameters["mode"].default == "async"
    # the default seed is the same in every process (pyspark's is hash() of the class name, salted per process)
    code = "from spark import FeedForwardNetworkPSClassifier as F; print(F().getSeed())"
    seeds = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONHASHSEED": salt}).stdout.strip() for salt in ("1", "2")}
    assert seeds == {str(clf.getSeed())}
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['stepsize'\]"):
        FeedForwardNetworkPSClassifier(stepsize=0.1)
    model = FeedForwardNetworkPSClassificationModel()
    assert callable(model.setPredictionCol) and not hasattr(model, "setLabelCol") and not hasattr(model, "setMode")
    assert model.getMode() == "async"                  # the model keeps (and reads) the same Params


def test_choice_lists_are_core_and_ps_own():
    from core.backends import BACKEND_NAMES
    from core.optimizers import OPTIMIZERS
    from ps.modes import MODE_NAMES

    clf = FeedForwardNetworkPSClassifier()
    for name, choices in (("mode", MODE_NAMES), ("optimizer", OPTIMIZERS), ("backend", BACKEND_NAMES)):
        for value in choices:
            clf.set(clf.getParam(name), value)
            assert clf.getOrDefault(name) == value


def test_issue13_params_reach_the_training_spec():
    from spark.params import training_spec

    clf = FeedForwardNetworkPSClassifier(layers=[4, 8, 3])
    spec = training_spec(clf)
    assert (spec.precision, spec.cuda_graphs, spec.pipeline, spec.wire_dtype) == ("fp32", False, False, "float32")
    clf = FeedForwardNetworkPSClassifier(layers=[4, 8, 3], precision="bf16", cudaGraphs=True,
                                         pipelineExchange=True, wireDtype="bfloat16")
    spec = training_spec(clf)
    assert (spec.precision, spec.cuda_graphs, spec.pipeline, spec.wire_dtype) == ("bf16", True, True, "bfloat16")
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16, got 'fp8'"):
        FeedForwardNetworkPSClassifier(precision="fp8")
    with pytest.raises(ValueError, match="^pipelineExchange applies to the asynchronous modes"):
        training_spec(FeedForwardNetworkPSClassifier(layers=[4, 3], mode="sync", pipelineExchange=True))
    with pytest.raises(ValueError, match="^wireDtype='float16' does not apply to mode='easgd'"):
        training_spec(FeedForwardNetworkPSClassifier(layers=[4, 3], mode="easgd", wireDtype="float16"))
