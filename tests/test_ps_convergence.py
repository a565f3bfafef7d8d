"""tol: epoch boundaries from the pushes, the stop decision in the engine (no sockets), and every mode stopping
early with real worker processes (ps.runner)."""
import numpy as np
import pytest

from ps.convergence import ConvergenceMonitor, exchange_epoch
from ps.protocol import FLAG_EPOCH_LAST, FLAG_STOP, FLOAT32, Header, Op, Status
from ps.runner import run
from ps.spec import TrainingSpec

try:
    from tests.ps_helpers import SessionEngine, digits
except ImportError:  # pytest run without the repository root on sys.path
    from ps_helpers import SessionEngine, digits

pytestmark = pytest.mark.timeout(120)
JOB, FP = b"J" * 16, 99


def test_exchange_epoch_windows_across_boundaries_and_a_short_last_window():
    # 4 local steps per pass, tau = 3, 3 passes: exchanges end at local steps 3, 6, 9, 12 -> epochs 1, 2, 3, 3
    got = [exchange_epoch(s, 3, 4, 3) for s in (1, 2, 3, 4)]
    assert got == [(1, True), (2, True), (3, False), (3, True)]
    # 5 steps per pass, tau = 2, 2 passes: 10 steps, exchanges end at 2, 4, 6, 8, 10 -> epochs 1, 1, 2, 2, 2
    assert [exchange_epoch(s, 2, 5, 2) for s in range(1, 6)] == [(1, False), (1, True), (2, False), (2, False),
                                                                 (2, True)]
    # 3 steps per pass, tau = 2, 1 pass: the second window holds the third step only
    assert [exchange_epoch(s, 2, 3, 1) for s in (1, 2)] == [(1, False), (1, True)]


def feed(m, worker, epoch, loss, rows=10, last=True, now=0.0):
    m.seen(worker, epoch, last, now)
    m.applied(epoch, loss, 0.5, rows, 0, now)


def test_the_monitor_records_how_far_the_fastest_worker_was_when_tol_decided():
    """Asynchronous workers run apart: worker 0 is past epoch 5 when worker 1 completes epoch 3, the epoch
    tol stops at; the stats say so (the workers' last epochs are bounded by it, not by the stop epoch)."""
    m = ConvergenceMonitor(2, epochs=10, tol=0.2)
    for e, loss in enumerate([2.0, 1.0, 0.95, 0.5, 0.4], start=1):
        feed(m, 0, e, loss)
    for e, loss in enumerate([2.0, 1.0, 0.95], start=1):
        feed(m, 1, e, loss)
        m.check(0.0)
    assert m.stop_epoch == 3 and m.stats()["furthest_at_stop"] == 5
    feed(m, 1, 4, 0.5)
    m.check(0.0)
    assert m.stats()["furthest_at_stop"] == 5, "recorded once, at the decision"
    restored = ConvergenceMonitor(2, epochs=10, tol=0.2)
    restored.load_state(m.state(), 0.0)
    assert restored.stats()["furthest_at_stop"] == 5, "a resumed server keeps it"


def test_monitor_stops_at_the_first_epoch_whose_relative_change_is_below_tol():
    m = ConvergenceMonitor(2, epochs=10, tol=0.05)
    for e, (l0, l1) in enumerate([(2.0, 1.0), (1.0, 0.6), (0.8, 0.7), (0.76, 0.72)], start=1):
        feed(m, 0, e, l0, rows=30)
        assert not m.check(0.0), "an epoch is complete only when every worker is past it"
        feed(m, 1, e, l1, rows=10)
        assert m.check(0.0)
    losses = [f["loss"] for f in m.completed]
    assert losses == pytest.approx([1.75, 0.9, 0.775, 0.75])    # row-weighted over both workers
    rel = [f["relative_change"] for f in m.completed]
    assert rel[0] is None and rel[1:] == pytest.approx([0.85 / 1.75, 0.125 / 0.9, 0.025 / 0.775])
    assert m.stop_requested and m.stop_reason == "tol" and m.stop_epoch == 4
    assert m.relative_change == pytest.approx(0.025 / 0.775)
    assert "below tol=0.05" in m.message() and "epoch 3 to 4" in m.message()
    feed(m, 0, 5, 0.1)
    feed(m, 1, 5, 0.1)
    assert not m.check(0.0) and len(m.completed) == 4, "the decision is final"


def test_monitor_without_tol_runs_every_epoch_and_says_so():
    m = ConvergenceMonitor(1, epochs=2, tol=0.0)
    feed(m, 0, 1, 1.0)
    feed(m, 0, 2, 1.0)                       # no change at all: tol = 0 still never stops early
    m.check(0.0)
    assert m.stop_reason == "max_iter" and not m.stop_requested and m.message() == "ran all 2 epochs (maxIter)"
    assert [f["epoch"] for f in m.pop_completed()] == [1, 2] and m.pop_completed() == []


def test_a_silent_worker_holds_no_decision_in_async_modes_but_does_in_round_modes():
    for ignore_silent, expect in ((True, True), (False, False)):
        m = ConvergenceMonitor(2, epochs=5, tol=0.5, silence_s=10.0, ignore_silent=ignore_silent, now=0.0)
        feed(m, 0, 1, 1.0, now=1.0)
        feed(m, 1, 1, 1.0, last=False, now=1.0)   # worker 1 pushed within epoch 1, then died
        feed(m, 0, 2, 0.9, now=2.0)
        assert not m.check(5.0)                    # not silent long enough yet
        assert m.check(11.5) is expect
        assert m.stop_requested is expect          # 0.1 / 1.0 < 0.5 over epochs 1 -> 2
    m = ConvergenceMonitor(2, epochs=5, tol=0.5, now=0.0)
    feed(m, 0, 1, 1.0)
    m.retire(1)                                    # BYE: the worker is done, it holds nothing
    assert m.check(0.0) and m.completed[0]["rows"] == 10


def test_an_epoch_whose_pushes_were_all_refused_never_triggers_tol():
    m = ConvergenceMonitor(1, epochs=5, tol=0.5)
    feed(m, 0, 1, 1.0)
    m.seen(0, 2, True, 0.0)                        # its only push of epoch 2 was refused (stale)
    m.applied(3, 1.0, 0.5, 10, 0, 0.0)
    m.seen(0, 3, True, 0.0)
    m.check(0.0)
    assert [f["epoch"] for f in m.completed] == [1], "epoch 2 has no figures: the monitor waits, it never guesses"


# ------------------------------------------------------------------------------------------------ engine
def engine(mode, tol, n=2, **kw):
    spec = TrainingSpec(mode=mode, num_workers=n, learning_rate=0.1, epochs=10, tol=tol, **kw)
    return SessionEngine(np.zeros(4, np.float32), spec, job_id=JOB, fingerprint=FP)


def push(wid, step, epoch, loss, wversion=0, flags=FLAG_EPOCH_LAST, rows=8):
    h = Header(op=int(Op.PUSH), job_id=JOB, fingerprint=FP, worker_id=wid, step=step, epoch=epoch, loss=loss,
               batch_size=rows, wversion=wversion, flags=flags, dtype=FLOAT32, n_values=4)
    return [h.pack(), np.ones(4, np.float32).tobytes()]


def hello(e, wid, now=0.0):
    e.handle(b"w%d" % wid, [Header(op=int(Op.HELLO), job_id=JOB, fingerprint=FP, worker_id=wid).pack()], now=now)


def test_sync_round_that_completes_the_converged_epoch_tells_every_worker_to_stop():
    e = engine("sync", tol=0.01)
    hello(e, 0)
    hello(e, 1)
    for step, loss in enumerate([1.0, 0.5, 0.499], start=1):     # one step per epoch: 0.001 / 0.5 < 0.01 at 3
        assert e.handle(b"w0", push(0, step, step, loss, wversion=e.version)) == []
        replies = e.handle(b"w1", push(1, step, step, loss, wversion=e.version))
        stop = [bool(h.flags & FLAG_STOP) for _, h, _ in replies]
        assert stop == [step == 3] * 2, step
    conv = e.stats()["convergence"]
    assert conv["stop_reason"] == "tol" and conv["stop_epoch"] == 3
    assert conv["relative_change"] == pytest.approx(0.001 / 0.5)
    assert [f["loss"] for f in conv["completed"]] == pytest.approx([1.0, 0.5, 0.499])
    assert e.version == 3, "the round that completed the epoch was applied"


def test_async_ssp_wait_is_released_with_the_stop_flag_and_later_replies_carry_it():
    e = engine("async", tol=0.5, ssp_slack=0)
    hello(e, 0)
    hello(e, 1)
    e.handle(b"w0", push(0, 1, 1, 1.0))
    e.handle(b"w1", push(1, 1, 1, 1.0, wversion=1))               # epoch 1 complete, loss 1.0
    e.handle(b"w0", push(0, 2, 2, 0.9, wversion=2))
    pull = Header(op=int(Op.PULL), job_id=JOB, fingerprint=FP, worker_id=0, step=2).pack()
    assert e.handle(b"w0", [pull]) == [], "worker 0 at clock 2 waits for worker 1 (slack 0)"
    replies = e.handle(b"w1", push(1, 2, 2, 0.9, wversion=3))     # epoch 2 complete: 0.1 < 0.5 -> stop
    by_token = {tok: h for tok, h, _ in replies}
    assert set(by_token) == {b"w0", b"w1"} and all(h.flags & FLAG_STOP for h in by_token.values())
    assert by_token[b"w0"].status == Status.OK and by_token[b"w0"].n_values == 4   # the held pull got weights
    later = e.handle(b"w0", [Header(op=int(Op.PULL), job_id=JOB, fingerprint=FP, worker_id=0, step=9).pack()])
    assert later[0][1].flags & FLAG_STOP and later[0][1].status == Status.OK


def test_async_dead_worker_does_not_block_the_decision():
    e = engine("async", tol=0.5, barrier_timeout=5.0)
    hello(e, 0, now=0.0)
    hello(e, 1, now=0.0)
    e.handle(b"w0", push(0, 1, 1, 1.0), now=1.0)
    e.handle(b"w1", push(1, 1, 1, 1.0, flags=0, wversion=1), now=1.0)   # worker 1 dies inside epoch 1
    e.handle(b"w0", push(0, 2, 2, 0.9, wversion=2), now=2.0)
    assert e.tick(now=4.0) == [] and e.stats()["convergence"]["completed"] == []
    e.tick(now=6.5)                                                      # worker 1 silent for > 5 s
    conv = e.stats()["convergence"]
    assert [f["epoch"] for f in conv["completed"]] == [1, 2] and conv["stop_reason"] == "tol"
    reply = e.handle(b"w0", push(0, 3, 3, 0.8, wversion=3), now=7.0)
    assert reply[0][1].flags & FLAG_STOP


def test_convergence_state_survives_a_checkpoint():
    e = engine("async", tol=0.0, n=1)
    hello(e, 0)
    e.handle(b"w0", push(0, 1, 1, 1.0))
    arrays, meta = e.snapshot()
    again = engine("async", tol=0.0, n=1)
    again.restore(arrays, meta)
    assert again.stats()["convergence"]["completed"][0]["loss"] == 1.0


@pytest.mark.parametrize("tol", [-1.0, float("nan"), True])
def test_bad_tol_is_refused_with_its_value(tol):
    with pytest.raises(ValueError, match=r"tol must be a number >= 0 \(0 = never stop early\), got"):
        TrainingSpec(tol=tol)


# ------------------------------------------------------------------------------------------------ every mode
@pytest.mark.parametrize("mode,opts", [
    ("sync", dict(workers=2, learning_rate=0.2)),
    ("async", dict(workers=2, learning_rate=0.1)),
    ("easgd", dict(workers=2, learning_rate=0.1, tau=4)),
    ("async-easgd", dict(workers=2, learning_rate=0.2, tau=4)),
    ("eamsgd", dict(workers=2, learning_rate=0.05, tau=4, local_momentum=0.9)),
])
def test_every_mode_stops_when_the_epoch_loss_stops_changing(mode, opts):
    """tol = 0.2: the digits loss falls by more than 20 % per pass only in the first few passes, so every
    mode stops long before its 30 passes, at the first epoch whose relative change is below tol."""
    Xtr, _, ytr, _ = digits()
    res = run(Xtr, ytr, [64, 100, 10], mode=mode, backend="numpy", epochs=30, batch_size=32, tol=0.2, timeout=100,
              **opts)
    conv = res.stats["convergence"]
    assert conv["stop_reason"] == "tol", conv
    rel = [f["relative_change"] for f in conv["completed"]]
    first = next(i for i, r in enumerate(rel) if r is not None and r < 0.2)
    assert conv["stop_epoch"] == first + 1 < 30
    assert all(w["stopped_by_server"] for w in res.workers.values()), (conv, res.workers)
    per_pass = {w: -(-len(Xtr) // opts["workers"] // 32) for w in res.workers}     # about, per worker
    for w, r in res.workers.items():
        # a worker ends at its next exchange: at most a few epochs past the decision (async), never all 30
        assert r["local_steps"] < 30 * per_pass[w] * 0.5, (w, r["local_steps"])


def test_every_epoch_completes_when_a_pass_is_shorter_than_the_window():
    """75 rows per worker at batch 32 is 3 steps a pass, under the window of 4: an exchange counts in the epoch
    of its last step, so epoch 1 ended none, and the server completed no epoch of the fit (no progress lines,
    no objective history, tol never checked). The worker exchanges every pass's worth of steps instead."""
    Xtr, _, ytr, _ = digits()
    res = run(Xtr[:150], ytr[:150], [64, 16, 10], mode="async", backend="numpy", epochs=5, batch_size=32,
              workers=2, tau=4, timeout=100)
    conv = res.stats["convergence"]
    assert [f["epoch"] for f in conv["completed"]] == [1, 2, 3, 4, 5] and conv["stop_reason"] == "max_iter", conv
    assert all(f["rows"] == 150 for f in conv["completed"])
    assert all((w["tau"], w["pushes"]) == (3, 5) for w in res.workers.values()), res.workers
