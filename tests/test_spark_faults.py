"""A training task's Python worker dies mid-fit: the driver relaunches the barrier stage and the fit completes
with no mini-batch applied twice and the accuracy of a fault-free run."""
import collections

import pytest

from tests.spark_helpers import accuracy, digits_df, kill_python_worker, spark  # noqa: F401 - fixtures

from spark import FeedForwardNetworkPSClassifier

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("mode,step_size", [("async", 0.1), ("sync", 0.3)])
def test_killed_python_worker_is_retried_without_double_updates(digits_df, mode, step_size, monkeypatch):
    train, test = digits_df
    clf = FeedForwardNetworkPSClassifier(layers=[64, 100, 10], maxIter=40, blockSize=32, stepSize=step_size,
                                         seed=1, mode=mode, numWorkers=2, backend="numba", maxRetries=2)
    kill_python_worker(monkeypatch, 1, 150)   # worker 1's Python process calls os._exit at local step 150, attempt 0
    model = clf.fit(train)
    stats = model.trainingStats
    assert stats["attempts"] == 2, "the barrier stage should have been relaunched once"
    workers = stats["workers"]
    assert workers[1]["attempt"] == 1 and workers[1]["resumed_after"] >= 149
    steps_per_worker = {w: r["last_step"] for w, r in workers.items()}
    # every (worker, step) the server applied appears once: nothing applied twice, nothing skipped
    applied = collections.Counter((h["worker"], h["step"]) for h in stats["history"])
    assert max(applied.values()) == 1
    for w, last in steps_per_worker.items():
        assert sorted(s for (ww, s) in applied if ww == w) == list(range(1, last + 1))
    assert stats["server"]["workers"]["1"]["attempt"] == 1
    assert accuracy(model.transform(test)) >= 0.96
