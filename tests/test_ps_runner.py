"""Spark-free runner: worker processes (spawn) train digits in every mode; killed workers; restarts."""
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from core import FeedForwardNetwork
from core.datasets import hashed_text
from ps.runner import Runner, WorkerFailed, run

try:
    from tests.ps_helpers import digits
except ImportError:  # pytest run without the repository root on sys.path
    from ps_helpers import digits

LAYERS = [64, 100, 10]


def accuracy(weights):
    _, Xte, _, yte = digits()
    return FeedForwardNetwork(LAYERS, backend="numpy").evaluate(weights, Xte, yte)[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,opts", [
    ("sync", dict(workers=2, learning_rate=0.2)),
    ("async", dict(workers=4, learning_rate=0.1)),
    ("async", dict(workers=3, learning_rate=0.1, tau=2, staleness=6)),
    ("async", dict(workers=2, learning_rate=0.1, staleness=0)),   # workers refuse each other in turn: every fit
                                                                   # failed after 4 recomputations in a row
    ("easgd", dict(workers=2, learning_rate=0.1, tau=4)),
    ("async-easgd", dict(workers=3, learning_rate=0.2, tau=4)),   # 0.957-0.972 over seeds 0-3
    ("eamsgd", dict(workers=2, learning_rate=0.05, tau=4, local_momentum=0.9)),
], ids=["sync", "async", "async-staleness", "async-staleness-0", "easgd", "async-easgd", "eamsgd"])
def test_every_mode_trains_digits_to_95_percent(mode, opts):
    Xtr, _, ytr, _ = digits()
    res = run(Xtr, ytr, LAYERS, mode=mode, backend="numpy", epochs=20, batch_size=32, timeout=100, **opts)
    acc = accuracy(res.weights)
    assert acc >= 0.95, (mode, acc, res.stats["rejected"])
    assert res.stats["applied"] > 0 and len(res.history) > 0
    assert all(math.isfinite(h["loss"]) for h in res.history)
    if "staleness" in opts:
        assert max(h["staleness"] for h in res.history) <= opts["staleness"]
    if opts.get("staleness") == 0:
        assert sum(w["stale"] for w in res.workers.values()) > 0       # the recomputations were needed


@pytest.mark.timeout(120)
def test_sparse_rows_train_in_the_workers_as_dense_rows_do():
    """A scipy.sparse X reaches each worker process as CSR rows (an .npz shard) and trains as its dense copy:
    sync with two workers is deterministic, so the weights agree up to the order of the sums."""
    import scipy.sparse as sp

    Xtr, _, ytr, _ = digits()
    Xtr = np.where(Xtr > 0.5, Xtr, 0).astype(np.float32)             # about 30 % of the pixels kept
    runs = [run(X, ytr, LAYERS, mode="sync", backend=backend, epochs=3, batch_size=32, learning_rate=0.2,
                workers=2, timeout=100) for X, backend in ((sp.csr_matrix(Xtr), "numba"), (Xtr, "numba"))]
    np.testing.assert_allclose(runs[0].weights, runs[1].weights, rtol=1e-4, atol=1e-5)
    assert accuracy(runs[0].weights) >= 0.85


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,workers,shards", [("async", 1, 1), ("async", 1, 2), ("sync", 2, 1)])
def test_a_wide_sparse_model_exchanges_entries_and_trains_as_its_dense_rows(mode, workers, shards):
    """Text rows on a model past SPARSE_MIN_VALUES (per shard) take the sparse way end to end: steps on their
    entries, pushes of those entries, updates (and sync rounds) in place on the server, replies of the changed
    entries (each shard its own), weights copied back by entries. One async worker, and sync, are
    deterministic: they end where their dense rows do."""
    layers = [1 << 14, 8, 2]
    X, y = hashed_text(1600, width=1 << 14, words=20, vocabulary=6000)
    Xs, y, Xte, yte = X[:1200], y[:1200], X[1200:], y[1200:]
    runs = [run(X, y, layers, mode=mode, backend="numba", epochs=3, batch_size=32, learning_rate=0.1,
                workers=workers, tau=4 if mode == "async" else 0, shards=shards, timeout=100)
            for X in (Xs, Xs.toarray())]
    np.testing.assert_allclose(runs[0].weights, runs[1].weights, rtol=1e-4, atol=1e-6)
    stats = runs[0].stats["shards"] if shards > 1 else [runs[0].stats]
    assert [s["delta_replies"] for s in stats] == [s["applied"] for s in stats]    # every push answered so
    assert FeedForwardNetwork(layers, backend="numpy").evaluate(runs[0].weights, Xte, yte)[1] > 0.9


def _kill_when(runner, worker, min_step, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = runner.server.stats()["workers"].get(str(worker))
        if st and st["last_step"] >= min_step:
            os.kill(runner.pids()[worker], signal.SIGKILL)
            return st["last_step"]
        time.sleep(0.02)
    raise AssertionError(f"worker {worker} never reached step {min_step}")


def exchanges(runner, worker, epochs, batch_size):
    """A worker's exchanges in a whole run: its batches of all epochs in windows of tau (the last one shorter)."""
    return math.ceil(epochs * math.ceil(runner.shard_rows[worker] / batch_size) / runner.spec.tau)


@pytest.mark.timeout(120)
def test_async_goes_on_when_a_worker_is_killed():
    Xtr, _, ytr, _ = digits()
    r = Runner(Xtr, ytr, LAYERS, mode="async", workers=2, epochs=6, batch_size=32, tolerate_failures=True,
               worker_options=dict(step_delay=0.01)).start()
    _kill_when(r, 1, 5)
    res = r.join(timeout=100)
    assert 0 in res.workers and 1 not in res.workers and 1 in res.failed
    assert r.spec.tau == 4                             # the default window: an exchange every 4 batches
    assert res.workers[0]["last_step"] == exchanges(r, 0, 6, 32)
    assert "exited with code -9" in res.failed[1][0]


@pytest.mark.timeout(120)
def test_sync_killed_worker_gives_clear_error_within_timeout():
    Xtr, _, ytr, _ = digits()
    r = Runner(Xtr, ytr, LAYERS, mode="sync", workers=2, epochs=20, batch_size=32, barrier_timeout=2.0,
               worker_options=dict(step_delay=0.005)).start()
    _kill_when(r, 1, 3)
    # the survivor's barrier wait (2 s) ends the run, not the join's deadline: had the worker hung past it,
    # join would raise TimeoutError, which this does not accept
    with pytest.raises(WorkerFailed, match=r"(?s)worker 0.*BARRIER_TIMEOUT.*workers \[1\]"):
        r.join(timeout=30)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("data", ["digits", "hashed text"])
def test_restarted_worker_resumes_without_double_apply(data):
    """Also for a wide sparse model, whose exchanges go by entries and delta replies: the restarted worker's
    new client holds no weights, so its first pull is the whole vector."""
    if data == "digits":
        (Xtr, Xte, ytr, yte), layers, backend = digits(), LAYERS, "numpy"
    else:
        X, y = hashed_text(1600, width=1 << 14, words=20, vocabulary=6000)
        (Xtr, Xte, ytr, yte), layers, backend = (X[:1200], X[1200:], y[:1200], y[1200:]), [1 << 14, 8, 2], "numba"
    epochs, bs = 6, 32
    r = Runner(Xtr, ytr, layers, mode="async", workers=2, epochs=epochs, batch_size=bs, max_restarts=1,
               backend=backend, worker_options=dict(step_delay=0.01)).start()
    killed_at = _kill_when(r, 1, 10)
    res = r.join(timeout=100)
    per_worker = {i: exchanges(r, i, epochs, bs) for i in range(2)}
    w1 = res.stats["workers"]["1"]
    assert w1["attempt"] == 1 and res.workers[1]["attempt"] == 1
    assert res.workers[1]["resumed_after"] >= killed_at
    # every exchange applied exactly once across both attempts
    assert w1["applied"] == w1["last_step"] == per_worker[1]
    assert res.stats["workers"]["0"]["applied"] == per_worker[0]
    assert res.stats["applied"] == sum(per_worker.values())
    assert not os.path.exists(r.data_dir)          # the shards' files go with the run
    assert FeedForwardNetwork(layers, backend="numpy").evaluate(res.weights, Xte, yte)[1] > 0.9
    assert (res.stats["delta_replies"] > 0) is (data != "digits")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["async", "easgd"])
def test_a_last_window_shorter_than_tau_is_pushed(mode):
    """9 batches per shard with tau=4: windows of 4, 4 and 1 steps; every training row reaches the server."""
    Xtr, _, ytr, _ = digits()
    n = 2 * 576                                  # two equal shards of 576 rows = 9 batches of 64
    res = run(Xtr[:n], ytr[:n], LAYERS, mode=mode, workers=2, backend="numpy", epochs=1, batch_size=64,
              learning_rate=0.1, tau=4, timeout=100)
    assert res.stats["applied"] == 6                                       # 3 exchanges per worker
    assert sum(r["batch_size"] for r in res.history) == n
    assert [r["samples"] for r in sorted(res.workers.values(), key=lambda r: r["worker_id"])] == [576, 576]
    last = {r["worker"]: r for r in res.history}
    assert {w: (r["step"], r["batch_size"]) for w, r in last.items()} == {0: (3, 64), 1: (3, 64)}


@pytest.mark.timeout(180)
def test_a_worker_that_dies_while_starting_fails_the_run_instead_of_hanging_it(tmp_path):
    # A script without the __main__ guard: each spawned child re-runs it while importing it and dies there,
    # before reading its start-up arguments. With a shard among those arguments (a ~230 kB digits shard, more
    # than a pipe holds), Process.start() in the parent waited for ever on the full pipe.
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from core.datasets import load_digits_split
        from ps.runner import run
        Xtr, _, ytr, _ = load_digits_split()
        run(Xtr, ytr, [64, 100, 10], workers=2, epochs=1, secure=False, timeout=60)
    """))
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the runner hung: {exc.stderr!r:.2000}") from None
    assert proc.returncode != 0
    assert "WorkerFailed" in proc.stderr and "exited with code 1" in proc.stderr, proc.stderr[-3000:]
    assert "bootstrapping phase" in proc.stderr        # multiprocessing's own words reach the user


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_a_bad_thread_count_is_refused_before_anything_is_written(bad, tmp_path, monkeypatch):
    import re
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))     # where the runner would write its shards
    Xtr, _, ytr, _ = digits()
    with pytest.raises(ValueError, match=re.escape(f"threads_per_worker must be an integer >= 1, got {bad!r}")):
        Runner(Xtr, ytr, LAYERS, workers=2, threads_per_worker=bad)
    assert list(tmp_path.iterdir()) == []


def test_more_worker_processes_than_cores_is_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    Xtr, _, ytr, _ = digits()
    for workers in (3, 2):
        caplog.clear()
        Runner(Xtr[:200], ytr[:200], LAYERS, workers=workers)._cleanup()
        warned = [m for m in caplog.messages if "worker processes on 2 cores" in m]
        assert warned == (["3 worker processes on 2 cores take turns on them: every worker's exchange waits while "
                           "its peers are descheduled; use at most 2 workers on this machine"] if workers == 3 else [])


def test_more_blas_threads_than_cores_is_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    Xtr, _, ytr, _ = digits()
    for workers, threads in ((2, 2), (4, 1), (1, 2)):     # only the first puts 4 BLAS threads on 2 cores
        caplog.clear()
        r = Runner(Xtr[:200], ytr[:200], LAYERS, workers=workers, threads_per_worker=threads)
        r._cleanup()
        warned = [m for m in caplog.messages if "threads on 2 cores" in m]
        if (workers, threads) == (2, 2):
            assert warned == ["2 workers x 2 threads on 2 cores: BLAS threads beyond the cores wait on each other "
                              "(a step can take 5-50x longer); use threads_per_worker <= 1"]
        else:
            assert warned == []


@pytest.mark.parametrize("make,message", [
    (lambda X, y: (np.where(np.arange(X.size).reshape(X.shape) == 3 * 64 + 5, np.nan, X), y),
     "non-finite value nan at row 3, column 5"),
    (lambda X, y: (X, y[:-1]), "labels for"),
    (lambda X, y: (X[:3], y[:3]), "3 rows cannot feed 4 workers"),
    (lambda X, y: (X[:, :10], y), "10 features per row but layers\\[0\\] is 64"),
    (lambda X, y: (X, y + 5), "outside 0..9"),
    (lambda X, y: (__import__("scipy.sparse").sparse.csr_matrix(X[:, :10]), y), "10 features per row but layers"),
])
def test_bad_data_is_refused_in_the_parent_before_anything_starts(make, message, tmp_path, monkeypatch):
    """The workers found these after their peers had waited out the barrier (20-30 s), and a 1-D X was
    named by its shard's shape: the runner checks the user's arrays itself, before the server or any file."""
    import tempfile
    import threading

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    Xtr, _, ytr, _ = digits()
    X, y = make(Xtr, ytr)
    threads = set(threading.enumerate())
    with pytest.raises(ValueError, match=message):
        Runner(X, y, LAYERS, workers=4)
    assert list(tmp_path.iterdir()) == [] and set(threading.enumerate()) == threads
    with pytest.raises(ValueError, match="layers is not set"):
        Runner(Xtr, ytr)
    with pytest.raises(ValueError, match="devices lists 1 device\\(s\\) for 4 workers"):
        Runner(Xtr, ytr, LAYERS, workers=4, devices=[0])


def test_the_runner_command_line_reads_the_backend_variable_and_checks_devices(monkeypatch, capsys):
    from ps import runner

    monkeypatch.setenv("FFPS_BACKEND", "bogus")
    with pytest.raises(SystemExit):
        runner.main(["--epochs", "1"])
    assert "$FFPS_BACKEND='bogus' is not a backend" in capsys.readouterr().err
    monkeypatch.delenv("FFPS_BACKEND")
    with pytest.raises(SystemExit):
        runner.main(["--devices", "0", "--workers", "2"])
    assert "--devices lists 1 device(s) for --workers 2" in capsys.readouterr().err
