"""The adaptive window (TrainingSpec.window_max): a push may cover several windows of tau steps, numbered in
windows, so resumes and epoch boundaries hold; the pacer's choice from its worker's timing."""
import numpy as np
import pytest

from ps.convergence import exchange_epoch, last_window_of_epoch
from ps.spec import TrainingSpec
from ps.worker import WindowPacer, run_worker

try:
    from tests.ps_helpers import digits, server
except ImportError:  # pytest run without the repository root on sys.path
    from ps_helpers import digits, server

pytestmark = pytest.mark.timeout(120)
LAYERS = [64, 100, 10]


def test_the_pacer_aims_at_a_fifth_of_the_time_grows_at_most_twofold_and_stays_in_bounds():
    p = WindowPacer(tau=4, window_max=64)
    assert p.windows == 1
    # 1 ms a step, 4 ms a wait: 16 steps a push keep the wait at a fifth, but the first growth is twofold
    assert p.observe(4, 0.004, 0.004) == 2
    assert p.observe(8, 0.008, 0.004) == 4
    assert p.observe(16, 0.016, 0.004) == 4                  # 16 steps: steady
    for _ in range(6):                                       # exchanges 50x a step: up to the bound, 64 steps
        p.observe(16, 0.016, 0.05)
    assert p.windows == 16
    for _ in range(8):                                       # exchanges cheap again: back to one window
        p.observe(64, 0.064, 0.0)
    assert p.windows == 1
    assert WindowPacer(tau=4, window_max=64).observe(4, 0.0, 0.001) == 2    # steps too fast to time: grow
    assert WindowPacer(tau=4, window_max=6).observe(4, 0.004, 1.0) == 1     # 6 // 4: one window at most
    q = WindowPacer(tau=3, window_max=64)
    assert q.observe(0, 0.0, 1.0) == 1                       # a push without steps says nothing
    assert q.step_s is None


def test_the_last_window_of_an_epoch_matches_exchange_epoch():
    for tau, spe, epochs in ((4, 16, 3), (4, 20, 2), (3, 4, 3), (2, 5, 2), (7, 3, 4), (1, 1, 2)):
        total = -(-epochs * spe // tau)
        for s in range(1, total + 1):
            e = exchange_epoch(s, tau, spe, epochs)[0]
            last = max(t for t in range(1, total + 1) if exchange_epoch(t, tau, spe, epochs)[0] == e)
            assert last_window_of_epoch(s, tau, spe, epochs) == last, (tau, spe, epochs, s)
            assert exchange_epoch(last, tau, spe, epochs)[1]


def forced(monkeypatch, first, then):
    """Make every WindowPacer start at ``first`` windows and choose the values of ``then`` in turn (its last
    one from there on) instead of timing."""
    init = WindowPacer.__init__
    seq = iter(then)

    def start(self, tau, window_max):
        init(self, tau, window_max)
        self.windows = min(first, self.most)

    def observe(self, steps, compute_s, wait_s):
        self.windows = min(next(seq, then[-1]), self.most)
        return self.windows
    monkeypatch.setattr(WindowPacer, "__init__", start)
    monkeypatch.setattr(WindowPacer, "observe", observe)


def train(spec, X, y, **kw):
    """One worker (in this process) against a real server -> (final weights, history, server stats, worker stats)."""
    with server(spec.initial_weights(), spec=spec) as s:
        stats = run_worker(s.client_config(), 0, X, y, **kw)
        return s.weights(), s.history(), s.stats(), stats


def one_worker(batch_size=4, num_workers=1, **fields):
    return TrainingSpec(layers=LAYERS, mode="async", num_workers=num_workers, epochs=3, batch_size=batch_size,
                        learning_rate=0.05, backend="numpy", seed=5, **fields)


def test_pushes_of_two_windows_train_exactly_as_a_window_twice_as_long(monkeypatch):
    Xtr, _, ytr, _ = digits()
    X, y = Xtr[:512], ytr[:512]                               # 128 batches of 4 a pass: 32 windows of 4
    forced(monkeypatch, 2, [2])
    adaptive = one_worker(window_max=64)
    assert adaptive.tau == 4 and adaptive.window_max == 64
    w_2, hist_2, stats_2, worker_2 = train(adaptive, X, y)
    w_8, hist_8, _, _ = train(one_worker(tau=8), X, y)
    assert [r["step"] for r in hist_2] == list(range(2, 97, 2))        # numbered in windows of 4 steps
    assert [r["step"] for r in hist_8] == list(range(1, 49))
    assert [r["batch_size"] for r in hist_2] == [r["batch_size"] for r in hist_8] == [32] * 48
    np.testing.assert_array_equal(w_2, w_8)
    # the bound: the spec's 64 steps, cut to a quarter of a pass (32 steps)
    assert worker_2["longest_push"] == 8 and worker_2["window_max"] == 32 and worker_2["tau"] == 4
    assert stats_2["workers"]["0"]["last_step"] == 96 and worker_2["local_steps"] == 384
    forced(monkeypatch, 1, [1])
    w_1, _, _, worker_1 = train(one_worker(window_max=64), X, y)
    np.testing.assert_array_equal(w_1, train(one_worker(tau=4), X, y)[0])   # one window a push: the fixed run
    assert worker_1["longest_push"] == 4 and worker_1["pushes"] == 96


def test_the_share_of_a_push_of_several_windows_among_k_workers():
    from ps.modes import get_mode

    scale = get_mode("async").push_scale
    assert [scale(one_worker(), m) for m in (1, 2, 9)] == [1.0, 1.0, 1.0]          # one worker: no peers
    two, four = one_worker(num_workers=2), one_worker(num_workers=4)
    assert [scale(two, m) for m in (1, 2, 3, 16)] == [1.0] + [2 ** -0.5] * 3
    assert [scale(four, m) for m in (1, 2, 3, 4, 16)] == [1.0, 2 ** -0.5, 3 ** -0.5, 0.5, 0.5]
    for elastic in ("async-easgd", "eamsgd"):                # they push elastic differences, not sums
        assert get_mode(elastic).push_scale(four, 8) == 1.0


@pytest.mark.parametrize("sparse", [False, True])
def test_among_four_workers_a_push_of_four_windows_carries_half_its_sum(monkeypatch, sparse):
    """The same worker, alone, under num_workers=1 and 4: the first push (one window) is the same, the
    second (four windows, from the same weights) is exactly half of it with three peers expected; a sparse
    window's entries likewise."""
    import scipy.sparse as sp

    from ps.client import ParameterClient
    from ps.protocol import Entries

    Xtr, _, ytr, _ = digits()
    X, y, layers = Xtr[:512], ytr[:512], LAYERS
    if sparse:                 # 10 of 4096 columns a row: a window's sum touches few entries
        rng = np.random.default_rng(3)
        cols = np.sort(rng.choice(4096, (512, 10)), axis=1)
        X = sp.csr_matrix((rng.random(5120, dtype=np.float32), cols.ravel(), np.arange(0, 5121, 10)), (512, 4096))
        layers = [4096, 8, 10]
    push = ParameterClient.push
    pushed = []

    def record(self, array, *args, **kw):
        if isinstance(array, Entries):
            pushed[-1].append((array.index.copy(), np.array(array.values, copy=True)))
        else:
            pushed[-1].append((None, np.array(array, copy=True)))
        return push(self, array, *args, **kw)
    monkeypatch.setattr(ParameterClient, "push", record)
    for workers in (1, 4):
        forced(monkeypatch, 1, [4])
        pushed.append([])
        train(one_worker(window_max=64, num_workers=workers).replace(layers=tuple(layers)), X, y)
    (i1, a1), (i2, a2) = pushed[0][0], pushed[1][0]
    np.testing.assert_array_equal(a1, a2)
    (i1, a1), (i2, a2) = pushed[0][1], pushed[1][1]
    assert (i1 is not None) == sparse and (i1 is None or np.array_equal(i1, i2))
    assert np.abs(a1).sum() > 0
    np.testing.assert_array_equal(a2, a1 * np.float32(0.5))


def test_a_shard_of_few_steps_a_pass_keeps_one_window_a_push(monkeypatch):
    """16 steps a pass: a quarter of a pass is one window, so no push covers more (the pacer is not used)."""
    Xtr, _, ytr, _ = digits()
    forced(monkeypatch, 4, [4])
    w, hist, _, worker = train(one_worker(batch_size=32, window_max=64), Xtr[:512], ytr[:512])
    assert [r["step"] for r in hist] == list(range(1, 13)) and worker["longest_push"] == 4
    assert worker["window_max"] == 4
    np.testing.assert_array_equal(w, train(one_worker(batch_size=32, tau=4), Xtr[:512], ytr[:512])[0])


@pytest.mark.parametrize("mode,pipeline", [("async", False), ("async", True), ("async-easgd", False),
                                           ("eamsgd", True)])
def test_a_push_never_crosses_an_epoch_and_every_epoch_is_closed(monkeypatch, mode, pipeline):
    Xtr, _, ytr, _ = digits()
    X, y = Xtr[:640], ytr[:640]                               # 160 batches of 4 a pass, windows of 3 across passes
    forced(monkeypatch, 1, [3, 16, 1, 5, 2] * 20)
    spec = TrainingSpec(layers=LAYERS, mode=mode, num_workers=1, epochs=4, batch_size=4, learning_rate=0.05,
                        tau=3, window_max=48, backend="numpy", seed=1, pipeline=pipeline)
    _, hist, stats, worker = train(spec, X, y)
    steps = [r["step"] for r in hist]
    assert steps == sorted(set(steps)) and steps[-1] == -(-4 * 160 // 3)
    gaps = [b - a for a, b in zip([0] + steps, steps)]
    assert max(gaps) == 40 // 3 and worker["window_max"] == 40       # a quarter of a pass: 13 windows of 3
    for a, b in zip([0] + steps, steps):                      # windows a+1 .. b all lie in one epoch
        assert exchange_epoch(a + 1, 3, 160, 4)[0] == exchange_epoch(b, 3, 160, 4)[0]
    assert sum(r["batch_size"] for r in hist) == 4 * 640 and worker["local_steps"] == 640
    assert [e["epoch"] for e in stats["convergence"]["completed"]] == [1, 2, 3, 4]
    assert worker["pushes"] == len(hist) < -(-640 // 3)


def test_a_restarted_worker_resumes_after_the_last_push_it_covered(monkeypatch):
    """Killed in the middle of a three-window push: the restarted attempt skips exactly the windows the server
    applied and trains the same weights, bit for bit, as a run that was never interrupted."""
    Xtr, _, ytr, _ = digits()
    X, y = Xtr[:512], ytr[:512]
    spec = one_worker(window_max=64)

    class Killed(Exception):
        pass

    def die_at(step):
        def hook(k):
            if k == step:
                raise Killed()
        return hook

    # the uninterrupted run's pushes: windows 1 | 2-4 | 5 | 6-8 | 9-11 | 12 | ...; the killed attempt's: 1 | 2-4,
    # then it dies in 5-7, and the restarted attempt's pacer starts again at one window: 5 | 6-8 | ...
    forced(monkeypatch, 1, [3, 1, 3])
    w_whole, hist_whole, _, _ = train(spec, X, y, on_step=lambda k: None)
    forced(monkeypatch, 1, [3])
    with server(spec.initial_weights(), spec=spec) as s:
        cfg = s.client_config()
        with pytest.raises(Killed):
            run_worker(cfg, 0, X, y, on_step=die_at(20))      # steps 17..19 of window 5 done, not pushed
        assert s.stats()["workers"]["0"]["last_step"] == 4
        forced(monkeypatch, 1, [3])
        second = run_worker(cfg, 0, X, y, attempt=1, on_step=lambda k: None)
        w_resumed, hist = s.weights(), s.history()
    assert second["resumed_after"] == 4
    assert sum(r["batch_size"] for r in hist) == 3 * 512      # every row of every pass applied once
    assert [r["step"] for r in hist] == [r["step"] for r in hist_whole]
    np.testing.assert_array_equal(w_resumed, w_whole)


def test_a_window_cut_to_a_short_pass_cuts_the_adaptive_bound_with_it():
    from ps.worker import window_within_an_epoch

    cut = window_within_an_epoch(TrainingSpec(mode="async"), 3)          # 3 steps a pass, window 4
    assert (cut.tau, cut.window_max) == (3, 3)
    fixed = window_within_an_epoch(TrainingSpec(mode="async", tau=8), 3)
    assert (fixed.tau, fixed.window_max) == (3, 0)
    assert window_within_an_epoch(TrainingSpec(mode="async"), 40).window_max == 64


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_workers_ragged_batch_goes_at_its_share_unless_the_server_weighs_rows(mode):
    """One worker, 150 rows in batches of 64 (a tail of 22), window 1: async's server applies each pushed
    gradient, so the tail goes at 22/64 of its mean, as MinibatchTrainer's; sync's server weighs each push by
    its rows (the concatenated batch of a round), so the worker pushes the tail's mean whole. Against float64
    loops of the same seeded batches."""
    from core import FeedForwardNetwork

    Xtr, _, ytr, _ = digits()
    X, y, B, lr = Xtr[:150], ytr[:150], 64, 0.3
    spec = TrainingSpec(layers=[64, 16, 10], mode=mode, num_workers=1, epochs=3, batch_size=B, learning_rate=lr,
                        backend="numpy", seed=2, tau=1)
    w0 = spec.initial_weights()
    w = train(spec, X, y)[0]
    ref = FeedForwardNetwork([64, 16, 10], backend="numpy", dtype="float64")
    ends = {}
    for share in (True, False):
        rng, v = np.random.default_rng(spec.seed * 1000), w0.astype(np.float64)
        for _ in range(spec.epochs):
            order = rng.permutation(len(y))
            for start in range(0, len(y), B):
                rows = order[start:start + B]
                v = v - lr * (len(rows) / B if share else 1.0) * ref.loss_and_grad(v, X[rows], y[rows])[1]
        ends[share] = v
    np.testing.assert_allclose(w, ends[mode == "async"], rtol=1e-3, atol=2e-5)
    assert np.abs(w - ends[mode != "async"]).max() > 100 * 2e-5
