"""The single-process mini-batch trainer: digits accuracy, seeded reproducibility, optimizers, divergence."""
import numpy as np
import pytest

from core import FeedForwardNetwork, MinibatchTrainer, TrainingDiverged, local_optimizer
from tests.conftest import BACKEND_PARAMS


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_digits_reaches_96_percent(backend, digits_split):
    Xtr, Xte, ytr, yte = digits_split
    net = FeedForwardNetwork([64, 100, 10], backend=backend)
    trainer = MinibatchTrainer(net, batch_size=32, learning_rate=0.1, optimizer="momentum", seed=0)
    w, history = trainer.fit(Xtr, ytr, epochs=30, validation=(Xte, yte))
    _, acc = net.evaluate(w, Xte, yte)
    assert acc >= 0.96, f"{backend}: digits test accuracy {acc:.4f} < 0.96"
    assert history[-1].val_accuracy == pytest.approx(acc)
    assert history[-1].loss < history[0].loss / 5
    assert [s.epoch for s in history] == list(range(1, 31))
    assert all(s.samples == len(Xtr) for s in history)


def test_training_accuracy_comes_from_the_same_forward_pass(digits_split):
    """Epoch accuracy equals a recount of the per-batch argmax hits (weights change within the epoch)."""
    Xtr, _, ytr, _ = digits_split
    net = FeedForwardNetwork([64, 20, 10], backend="numpy", dtype="float64")
    trainer = MinibatchTrainer(net, batch_size=50, learning_rate=0.05, seed=3)
    w = net.device_params(net.init_params(0)).copy()
    data = net.upload(Xtr, ytr)
    hits, loss = 0, 0.0
    for Xb, yb in trainer.batches(data):
        P = net.predict_proba(w, Xb)
        hits += int((P.argmax(1) == yb).sum())
        loss -= float(np.log(P[np.arange(len(yb)), yb]).sum())
        trainer.step(w, Xb, yb)
    trainer2 = MinibatchTrainer(net, batch_size=50, learning_rate=0.05, seed=3)
    stats = trainer2.run_epoch(net.device_params(net.init_params(0)).copy(), data, epoch=1)
    assert stats.accuracy == hits / len(ytr)
    assert stats.loss == pytest.approx(loss / len(ytr), rel=1e-9)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_same_seed_same_weights(backend, digits_split):
    Xtr, _, ytr, _ = digits_split
    net = FeedForwardNetwork([64, 30, 10], backend=backend)
    runs = [MinibatchTrainer(net, batch_size=64, learning_rate=0.1, seed=s).fit(Xtr, ytr, epochs=2)[0]
            for s in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_numba_follows_numpy_reference_trajectory(digits_split):
    """Same seed, same batches: numba and numpy weights stay within float32 rounding over 3 epochs."""
    Xtr, _, ytr, _ = digits_split
    out = []
    for backend in ("numpy", "numba"):
        net = FeedForwardNetwork([64, 40, 10], backend=backend)
        out.append(MinibatchTrainer(net, batch_size=100, learning_rate=0.05, seed=1).fit(Xtr, ytr, epochs=3)[0])
    np.testing.assert_allclose(out[0], out[1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_the_ragged_last_batch_moves_the_weights_by_its_share_of_rows(backend, digits_split):
    """An epoch's last batch of m < B rows steps by m/B of its mean gradient (each row of the epoch counts the
    same): 1257 rows in batches of 100 end with one of 57. Against a float64 loop of the same seeded batches;
    the loop without the share ends elsewhere, by more than the tolerance."""
    Xtr, _, ytr, _ = digits_split
    B, lr, epochs = 100, 0.2, 2
    net = FeedForwardNetwork([64, 30, 10], backend=backend)
    w0 = net.init_params(seed=4)
    w, _ = MinibatchTrainer(net, batch_size=B, learning_rate=lr, seed=7).fit(Xtr, ytr, epochs=epochs, w0=w0)

    ref = FeedForwardNetwork([64, 30, 10], backend="numpy", dtype="float64")
    X64 = Xtr.astype(np.float64)
    ends = []
    for weigh in (True, False):
        rng, v = np.random.default_rng(7), w0.astype(np.float64)
        for _ in range(epochs):
            order = rng.permutation(len(ytr))
            for start in range(0, len(ytr), B):
                rows = order[start:start + B]
                _, g = ref.loss_and_grad(v, X64[rows], ytr[rows])
                v = v - lr * (len(rows) / B if weigh else 1.0) * g
        ends.append(v)
    assert len(ytr) % B == 57
    np.testing.assert_allclose(w, ends[0], rtol=1e-3, atol=2e-5)
    assert np.abs(w - ends[1]).max() > 100 * 2e-5


@pytest.mark.parametrize("batch_size", [300, 20_000])
def test_an_epoch_of_one_batch_keeps_its_rate(batch_size):
    """blockSize at or above the rows (full-batch descent): the one batch is no ragged tail and steps whole."""
    from core.datasets import load_digits_split

    X, _, y, _ = load_digits_split(seed=0)
    X, y = X[:300], y[:300]
    net = FeedForwardNetwork([64, 12, 10], backend="numpy")
    w0 = net.init_params(seed=1)
    w, _ = MinibatchTrainer(net, batch_size=batch_size, learning_rate=0.5, seed=0).fit(X, y, epochs=5, w0=w0)
    ref = FeedForwardNetwork([64, 12, 10], backend="numpy", dtype="float64")
    v = w0.astype(np.float64)
    for _ in range(5):
        v = v - 0.5 * ref.loss_and_grad(v, X.astype(np.float64), y)[1]
    np.testing.assert_allclose(w, v, rtol=1e-3, atol=2e-5)


def test_fit_leaves_callers_initial_weights_alone(digits_split):
    Xtr, _, ytr, _ = digits_split
    net = FeedForwardNetwork([64, 10], backend="numpy")
    w0 = net.init_params(0)
    keep = w0.copy()
    w, _ = MinibatchTrainer(net, batch_size=64, seed=0).fit(Xtr, ytr, epochs=1, w0=w0)
    np.testing.assert_array_equal(w0, keep)
    assert not np.array_equal(w, w0)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov"])
def test_local_optimizer_matches_formula(optimizer):
    net = FeedForwardNetwork([3, 2], backend="numpy", dtype="float64")
    opt = local_optimizer(net, optimizer, learning_rate=0.1, momentum=0.5)
    w = np.ones(net.num_params)
    g1, g2 = np.full(net.num_params, 2.0), np.full(net.num_params, -1.0)
    opt.step(w, g1)
    opt.step(w, g2)
    if optimizer == "sgd":
        want = 1 - 0.1 * 2 + 0.1 * 1
    elif optimizer == "momentum":
        v1 = -0.2
        v2 = 0.5 * v1 + 0.1
        want = 1 + v1 + v2
    else:
        v1 = -0.2
        w1 = 1 + 0.5 * v1 - 0.2
        v2 = 0.5 * v1 + 0.1
        want = w1 + 0.5 * v2 + 0.1
    np.testing.assert_allclose(w, want, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov"])
def test_a_step_inside_an_exchange_window_adds_its_gradient_and_steps_as_alone(backend, optimizer, digits_split):
    """MinibatchTrainer.step with ``accumulate`` (a parameter-server window): the window sum gains exactly the
    step's gradient, and the weights move as a step without it would (plain SGD: one fused pass on numba), with
    the schedule's counter advanced once."""
    Xtr, _, ytr, _ = digits_split
    net = FeedForwardNetwork([64, 100, 10], backend=backend)
    ops = net.ops
    X, y = ops.asarray(Xtr[:32], net.dtype), ops.asarray(ytr[:32].astype(np.int32))
    alone = MinibatchTrainer(net, batch_size=32, learning_rate=0.1, optimizer=optimizer, momentum=0.5)
    windowed = MinibatchTrainer(net, batch_size=32, learning_rate=0.1, optimizer=optimizer, momentum=0.5)
    w0 = net.init_params(0)
    w_alone, w_win = ops.asarray(w0.copy()), ops.asarray(w0.copy())
    acc = ops.asarray(np.full(net.num_params, 0.25, np.float32))
    for _ in range(2):
        alone.step(w_alone, X, y)
        windowed.step(w_win, X, y, accumulate=acc)
        grad = ops.to_host(windowed.grad)
    np.testing.assert_allclose(ops.to_host(w_win), ops.to_host(w_alone), rtol=1e-5, atol=1e-6)
    first = net.loss_and_grad(w0, Xtr[:32], ytr[:32])[1]
    np.testing.assert_allclose(ops.to_host(acc), 0.25 + first + grad, rtol=1e-4, atol=1e-5)
    assert windowed.optimizer.t == alone.optimizer.t == 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow is the point
def test_divergence_is_a_clear_error(digits_split):
    Xtr, _, ytr, _ = digits_split
    net = FeedForwardNetwork([64, 100, 10], backend="numpy")
    trainer = MinibatchTrainer(net, batch_size=32, learning_rate=1e30, seed=0)
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1.*lower the learning rate"):
        trainer.fit(Xtr * 1e3, ytr, epochs=3)


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
    ({"learning_rate": -1}, "learning_rate must be a positive finite number, got -1"),
    ({"learning_rate": float("nan")}, "learning_rate must be a positive finite number, got nan"),
    ({"optimizer": "adam"}, "optimizer must be one of .* got 'adam'"),
    ({"optimizer": "momentum", "momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
    ({"ragged_share": "yes"}, "ragged_share must be True or False, got 'yes'"),
])
def test_bad_trainer_arguments(kwargs, match):
    net = FeedForwardNetwork([4, 3], backend="numpy")
    with pytest.raises(ValueError, match=match):
        MinibatchTrainer(net, **kwargs)


def test_bad_epochs(digits_split):
    Xtr, _, ytr, _ = digits_split
    trainer = MinibatchTrainer(FeedForwardNetwork([64, 10], backend="numpy"))
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        trainer.fit(Xtr, ytr, epochs=0)
