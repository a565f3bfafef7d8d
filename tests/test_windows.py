"""Training windows (core/windows.py): a recorded window computes exactly what the op-by-op steps compute.

On the CPU the recording is played by a stand-in backend whose ``capture_graph`` keeps the step and whose
``launch_graph`` replays it: every part of the recorded path except CUDA itself (the device-side gather and
offset, the sums read once per window, the step counter, the ragged last batch, windows longer than one
graph, and the fallback when recording fails part-way) is checked here against the op-by-op trainer. The real
CUDA graphs are checked the same way in tests/test_gpu.py.
"""
import logging

import numpy as np
import pytest

from core import FeedForwardNetwork, MinibatchTrainer
from core.backends.numpy_ops import NumpyOps
from core.windows import MAX_GRAPH_STEPS


class ReplayOps(NumpyOps):
    """Records nothing: a "graph" is the step and its repeat count; launching runs it. ``fail_after``: the
    capture that many successful ones later fails, as a CUDA capture can."""
    name = "replay"

    def __init__(self, fail_after=None):
        self.captures, self.launches, self.fail_after = 0, 0, fail_after

    def recording_problem(self):
        return None

    def capture_graph(self, body, repeat):
        if self.fail_after is not None and self.captures >= self.fail_after:
            return None, "stand-in capture refused"
        self.captures += 1
        return (body, repeat), None

    def launch_graph(self, graph):
        body, repeat = graph
        self.launches += 1
        for _ in range(repeat):
            body()


def trained(ops, Xtr, ytr, graphs, epochs=3, batch=16, optimizer="momentum", layers=(64, 20, 10)):
    net = FeedForwardNetwork(list(layers), backend=ops, dtype="float64")
    trainer = MinibatchTrainer(net, batch_size=batch, learning_rate=0.05, optimizer=optimizer, seed=4,
                               cuda_graphs=graphs)
    w, history = trainer.fit(Xtr, ytr, epochs=epochs)
    return w, history, trainer


def test_recorded_epochs_equal_op_by_op_epochs(digits_split):
    """1257 rows in batches of 16: 78 full batches (one 64-step graph + one of 14) and a ragged one of 9."""
    Xtr, _, ytr, _ = digits_split
    ops = ReplayOps()
    w0, h0, t0 = trained("numpy", Xtr, ytr, graphs=False)
    w1, h1, t1 = trained(ops, Xtr, ytr, graphs=True)
    assert t1.graph_problem is None and t1.graphs is not None
    np.testing.assert_array_equal(w1, w0)
    assert [(h.loss, h.accuracy, h.samples) for h in h1] == [(h.loss, h.accuracy, h.samples) for h in h0]
    assert t1.optimizer.t == t0.optimizer.t == 3 * 79
    # epoch 1: one eager warm-up step, graphs of 64 and 13 steps, an eager ragged batch (a new batch size);
    # epochs 2 and 3: graphs of 64 and 14 steps and a 1-step graph of the ragged batch
    assert MAX_GRAPH_STEPS == 64 and ops.captures == 4 and ops.launches == 2 + 3 + 3


def test_windows_with_an_accumulator_equal_op_by_op(digits_split):
    """The worker's window: gradients summed into an accumulator, local steps or not, any first/count."""
    Xtr, _, ytr, _ = digits_split
    results = []
    for ops, graphs in (("numpy", False), (ReplayOps(), True)):
        net = FeedForwardNetwork([64, 20, 10], backend=ops, dtype="float64")
        trainer = MinibatchTrainer(net, batch_size=100, learning_rate=0.05, seed=9, cuda_graphs=graphs)
        data = net.upload(Xtr, ytr)
        w = net.device_params(net.init_params(0)).copy()
        acc = np.zeros(net.num_params)
        out = []
        for update in (True, False):
            trainer.begin_epoch(data)
            for first, count in ((0, 4), (4, 4), (8, 5)):        # 13 batches: 12 of 100 rows, one of 57
                acc[...] = 0
                rows = trainer.run_window(w, data, first, count, accumulate=acc, update=update)
                out.append((rows, trainer.take_sums(), acc.copy(), w.copy()))
        results.append(out)
    for (r0, s0, a0, w0), (r1, s1, a1, w1) in zip(*results):
        assert r0 == r1 and s0 == s1
        np.testing.assert_array_equal(a1, a0)
        np.testing.assert_array_equal(w1, w0)
    assert [r for r, *_ in results[0][:3]] == [400, 400, 457]


def test_capture_refused_runs_op_by_op_and_says_why(digits_split, caplog):
    Xtr, _, ytr, _ = digits_split
    w0, h0, _ = trained("numpy", Xtr, ytr, graphs=False, epochs=2)
    with caplog.at_level(logging.DEBUG, logger="core.windows"):
        w1, h1, t1 = trained(ReplayOps(fail_after=0), Xtr, ytr, graphs=True, epochs=2)
    np.testing.assert_array_equal(w1, w0)
    assert [h.loss for h in h1] == [h.loss for h in h0]
    assert t1.graph_problem == "stand-in capture refused" and t1.graphs is None
    assert "training windows run op by op: stand-in capture refused" in caplog.text


def test_capture_failing_part_way_applies_every_batch_once(digits_split):
    """The 64-step graph records, the next capture fails mid-epoch: the rest of the epoch runs op by op from
    where the graphs stopped, and later epochs op by op; no batch is skipped or applied twice."""
    Xtr, _, ytr, _ = digits_split
    w0, h0, t0 = trained("numpy", Xtr, ytr, graphs=False)
    w1, h1, t1 = trained(ReplayOps(fail_after=1), Xtr, ytr, graphs=True)
    np.testing.assert_array_equal(w1, w0)
    # the epoch's loss is summed in two parts (recorded steps, op-by-op steps): equal up to the order of sums
    assert [h.loss for h in h1] == pytest.approx([h.loss for h in h0], rel=1e-12)
    assert [h.accuracy for h in h1] == [h.accuracy for h in h0] and t1.optimizer.t == t0.optimizer.t


def test_a_learning_rate_schedule_is_not_recorded(digits_split):
    net = FeedForwardNetwork([64, 10], backend=ReplayOps(), dtype="float64")
    trainer = MinibatchTrainer(net, batch_size=64, cuda_graphs=True)
    trainer.optimizer.schedule.kind = "cosine"
    trainer._windows = None
    assert trainer.graphs is None and "follows a 'cosine' schedule" in trainer.graph_problem


def test_cpu_backends_say_why_they_record_nothing():
    net = FeedForwardNetwork([4, 3], backend="numpy")
    trainer = MinibatchTrainer(net, cuda_graphs=True)
    assert trainer.graphs is None
    assert trainer.graph_problem == "the numpy backend computes on the CPU: there is no launch cost to save"


def test_cuda_graphs_must_be_a_bool():
    with pytest.raises(ValueError, match="cuda_graphs must be True or False, got 'yes'"):
        MinibatchTrainer(FeedForwardNetwork([4, 3], backend="numpy"), cuda_graphs="yes")


def test_gather_and_advance_read_the_offset_where_it_lives():
    ops = NumpyOps()
    X = np.arange(20.0).reshape(10, 2)
    y = np.arange(10, dtype=np.int32)
    order = np.array([9, 3, 5, 1, 0, 2, 4, 6, 7, 8])
    offset = np.array([2], np.int64)
    xb, yb = np.empty((3, 2)), np.empty(3, np.int32)
    ops.gather_batch(X, y, order, offset, xb, yb)
    np.testing.assert_array_equal(yb, [5, 1, 0])
    np.testing.assert_array_equal(xb, X[[5, 1, 0]])
    ops.advance_offset(offset, 3)
    assert offset[0] == 5
