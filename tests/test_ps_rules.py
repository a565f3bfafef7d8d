"""Update rules, optimizers, protocol and the engine state machine, without sockets."""
import json
import math
import re

import numpy as np
import pytest

from core.optimizers import Schedule, make_optimizer, steady_gain
from ps import rules
from ps.protocol import (FLAG_ELASTIC, FLAG_JSON, FLOAT32, HEADER, MAGIC, PROTOCOL_VERSION, Header, Op, ProtocolError,
                         Reason, Status, model_fingerprint, read_array, request_header, unpack_header)
from ps.modes import AUTO_WINDOW_MAX
from ps.spec import TrainingSpec
try:
    from tests.ps_helpers import SessionEngine
except ImportError:  # pytest run without the repository root on sys.path
    from ps_helpers import SessionEngine

pytestmark = pytest.mark.timeout(60)
RNG = np.random.default_rng(0)


def vec(n=7, scale=1.0):
    return (RNG.standard_normal(n) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------------ optimizers
def test_sgd_matches_formula():
    w, g = vec(), vec()
    opt = make_optimizer("sgd", 7, 0.3)
    out = opt.step(w, g, out=np.empty_like(w))
    np.testing.assert_allclose(out, w - 0.3 * g, rtol=1e-6)
    assert opt.t == 1


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_hand_loop(nesterov):
    w0, gs = vec(), [vec() for _ in range(4)]
    opt = make_optimizer("momentum", 7, 0.1, momentum=0.8, nesterov=nesterov)
    w, ref, v = w0.copy(), w0.astype(np.float64), np.zeros(7)
    for g in gs:
        w = opt.step(w, g, out=w)
        v = 0.8 * v + g
        ref = ref - 0.1 * ((g + 0.8 * v) if nesterov else v)
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,options,gain", [
    ("sgd", {}, 1.0), ("momentum", {}, 10.0), ("momentum", {"momentum": 0.5, "step_size": 3}, 2.0),
    ("nesterov", {"momentum": 0.75}, 4.0)])
def test_steady_gain_is_how_far_a_step_moves_once_the_gradient_has_stayed_the_same(name, options, gain):
    """The pipelined worker scales its own progress by it (ps/modes.py): measured here as the step after 300
    updates with one constant gradient, in units of lr * g."""
    assert steady_gain(name, options) == pytest.approx(gain)
    opt = make_optimizer(name, 7, 0.01, **{k: v for k, v in options.items() if k != "step_size"})
    w, g = np.zeros(7, np.float64), vec().astype(np.float64)
    for _ in range(300):
        before = w.copy()
        w = opt.step(w, g, out=w)
    np.testing.assert_allclose((before - w) / (0.01 * g), gain, rtol=1e-6)


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_adaptive_rules_have_no_steady_gain_to_scale_by(name):
    assert steady_gain(name, {"eps": 1e-7}) == 1.0


def test_adagrad_matches_hand_loop():
    w0, gs = vec(), [vec() for _ in range(4)]
    opt = make_optimizer("adagrad", 7, 0.5, eps=1e-8)
    w, ref, G = w0.copy(), w0.astype(np.float64), np.zeros(7)
    for g in gs:
        w = opt.step(w, g, out=np.empty_like(w))
        G += g.astype(np.float64) ** 2
        ref = ref - 0.5 * g / (np.sqrt(G) + 1e-8)
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)


def test_adam_matches_hand_loop():
    w0, gs = vec(), [vec() for _ in range(5)]
    opt = make_optimizer("adam", 7, 0.01)
    w, ref, m, v = w0.copy(), w0.astype(np.float64), np.zeros(7), np.zeros(7)
    for t, g in enumerate(gs, 1):
        w = opt.step(w, g, out=w)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g.astype(np.float64) ** 2
        ref = ref - 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)


def test_optimizer_state_round_trip():
    a = make_optimizer("adam", 7, 0.01)
    w = vec()
    for _ in range(3):
        a.step(w, vec(), out=w)
    b = make_optimizer("adam", 7, 0.01)
    b.load_state_dict(a.state_dict())
    g = vec()
    np.testing.assert_array_equal(a.step(w, g, out=np.empty_like(w)), b.step(w, g, out=np.empty_like(w)))


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam"])
def test_warming_an_optimizer_up_changes_nothing_of_it(name):
    """warm_up runs the rule's checked update on a twin (the server does it on a thread beside the serving
    one): this optimizer's state arrays, step counter and later updates are as if it had not happened."""
    from core.backends import host_ops

    ops = host_ops()
    a, b = (make_optimizer(name, 7, 0.01, ops=ops) for _ in range(2))
    w, g0 = vec(), vec()
    a.step(w.copy(), g0, out=np.empty_like(w))
    b.step(w.copy(), g0, out=np.empty_like(w))
    before = {k: v.copy() for k, v in a.state.items()}
    a.warm_up()
    assert a.t == 1 and a.num_params == 7
    for k, v in a.state.items():
        np.testing.assert_array_equal(v, before[k])
    g = vec()
    np.testing.assert_array_equal(a.step(w, g, out=np.empty_like(w)), b.step(w, g, out=np.empty_like(w)))


def test_schedules():
    assert Schedule(0.1)(1000) == 0.1
    s = Schedule(0.1, "step", step_size=10, gamma=0.5)
    assert s(9) == 0.1 and s(10) == 0.05 and s(25) == 0.025
    assert math.isclose(Schedule(0.1, "inverse_time", decay=0.5)(4), 0.1 / 3)
    c = Schedule(0.1, "cosine", total_steps=100, lr_min=0.01)
    assert math.isclose(c(0), 0.1) and math.isclose(c(50), 0.055) and math.isclose(c(100), 0.01)
    assert math.isclose(c(500), 0.01)
    opt = make_optimizer("sgd", 3, 1.0, schedule="step", step_size=1, gamma=0.5)
    w = np.zeros(3, np.float32)
    for _ in range(3):
        opt.step(w, np.ones(3, np.float32), out=w)
    np.testing.assert_allclose(w, -(1 + 0.5 + 0.25))


def test_bad_optimizer_arguments_name_the_value():
    with pytest.raises(ValueError, match="'rmsprop'"):
        make_optimizer("rmsprop", 3)
    with pytest.raises(ValueError, match="-1"):
        make_optimizer("sgd", 3, -1)
    with pytest.raises(ValueError, match="beta1"):
        make_optimizer("sgd", 3, beta1=0.9)
    with pytest.raises(ValueError, match="'linear'"):
        Schedule(0.1, "linear")


# ------------------------------------------------------------------------------------------------ rules
def test_weighted_mean_is_concatenated_batch_mean():
    grads = [vec() for _ in range(3)]
    out = rules.weighted_mean(grads, [2, 3, 5], out=np.empty(7, np.float32))
    ref = (2 * grads[0].astype(np.float64) + 3 * grads[1] + 5 * grads[2]) / 10
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    out = rules.weighted_mean(grads, [0, 0, 0], out=np.empty(7, np.float32))
    np.testing.assert_allclose(out, np.mean(grads, axis=0), rtol=1e-6, atol=1e-7)


def test_easgd_exchange_matches_formula_and_conserves_sum():
    xs = [vec(50, 3).astype(np.float64) for _ in range(4)]
    c = vec(50).astype(np.float64)
    a = 0.9 / 4
    new_xs, new_c = rules.easgd_exchange(xs, c, a)
    for x, nx in zip(xs, new_xs):
        np.testing.assert_allclose(nx, x - a * (x - c))
    np.testing.assert_allclose(new_c, c + a * sum(x - c for x in xs))
    np.testing.assert_allclose(sum(new_xs) + new_c, sum(xs) + c, rtol=0, atol=1e-12)
    server = rules.easgd_center_update(c.astype(np.float32), [x.astype(np.float32) for x in xs], a,
                                       out=np.empty(50, np.float32))
    np.testing.assert_allclose(server, new_c, rtol=1e-5, atol=1e-5)


def test_async_easgd_halves():
    x, c = vec(), vec()
    e = rules.elastic_difference(x, c, 0.25)
    np.testing.assert_allclose(e, 0.25 * (x - c), rtol=1e-6)
    np.testing.assert_allclose(rules.apply_elastic(c, e, out=np.empty_like(c)) + (x - e), x + c, rtol=1e-5, atol=1e-6)


def test_staleness_rule():
    assert rules.staleness(3, 7) == 4
    assert not rules.is_stale(3, 7, None)
    assert not rules.is_stale(3, 7, 4)
    assert rules.is_stale(3, 8, 4)


def test_ssp_clocks():
    s = rules.SSPClocks(3, slack=1)
    assert s.can_read(0, 1)             # c - s = 0: nobody needs to have ticked
    assert s.laggards(0, 2) == [1, 2]
    s.advance(1, 1)
    s.advance(2, 1)
    assert s.can_read(0, 2) and not s.can_read(0, 3)
    s.retire(1)
    s.advance(2, 2)
    assert s.can_read(0, 3)
    with pytest.raises(ValueError, match="SSP slack must be an integer >= 0, got -1"):
        rules.SSPClocks(2, -1)


# ------------------------------------------------------------------------------------------------ protocol
WIRE_ORDER = ("magic version op status code flags seq job_id worker_id attempt fingerprint wversion step loss "
              "accuracy batch_size dtype epoch n_values session").split()     # the module docstring's layout


def test_every_header_field_sits_at_its_documented_place_on_the_wire():
    values = dict(op=3, status=2, code=13, flags=33, seq=4_000_000_000, job_id=bytes(range(16)), worker_id=7,
                  attempt=5, fingerprint=2**64 - 3, wversion=123_456, step=654_321, loss=1.5, accuracy=0.25,
                  batch_size=96, dtype=2, epoch=65_535, n_values=7510, session=2**63 + 11)
    h = Header(**values)
    assert HEADER.unpack(h.pack()) == (MAGIC, PROTOCOL_VERSION) + tuple(values[f] for f in WIRE_ORDER[2:])
    built = request_header(values["op"], values["job_id"], values["worker_id"], values["attempt"],
                           values["fingerprint"], values["seq"], values["session"], flags=33, wversion=123_456,
                           step=654_321, loss=1.5, accuracy=0.25, batch_size=96, dtype=2, n_values=7510,
                           epoch=65_535)
    assert built == h._replace(status=0, code=0)          # a request carries no status or code
    r = h.reply(Status.STALE, Reason.STALE, flags=4, wversion=9)
    assert (r.op, r.status, r.code, r.flags, r.wversion, r.dtype, r.n_values) == (0x83, 2, 13, 4, 9, 0, 0)
    assert (r.seq, r.job_id, r.worker_id, r.attempt, r.fingerprint, r.step, r.epoch, r.session) == \
        (h.seq, h.job_id, h.worker_id, h.attempt, h.fingerprint, h.step, h.epoch, h.session)


def test_header_round_trip_and_rejections():
    h = Header(op=Op.PUSH, job_id=b"j" * 16, worker_id=3, attempt=2, fingerprint=2**63 + 5, wversion=9, step=11,
               loss=0.5, accuracy=0.75, batch_size=64, dtype=FLOAT32, n_values=10, seq=77)
    assert HEADER.size == len(h.pack()) == 104
    assert unpack_header(h.pack()) == h
    with pytest.raises(ProtocolError) as e:
        unpack_header(h.pack()[:-1])
    assert e.value.reason == Reason.MALFORMED
    with pytest.raises(ProtocolError) as e:
        unpack_header(Header(op=1, version=99).pack())
    assert e.value.reason == Reason.VERSION_MISMATCH
    with pytest.raises(ProtocolError) as e:
        read_array(h, np.zeros(9, np.float32).tobytes(), 10)
    assert e.value.reason == Reason.BAD_PAYLOAD
    bad = np.zeros(10, np.float32)
    bad[3] = np.nan
    with pytest.raises(ProtocolError) as e:
        read_array(h, bad.tobytes(), 10)
    assert e.value.reason == Reason.NON_FINITE
    for value in (np.inf, -np.inf):
        bad[3] = value
        with pytest.raises(ProtocolError) as e:
            read_array(h, bad.tobytes(), 10)
        assert e.value.reason == Reason.NON_FINITE
    huge = np.full(10, 3e38, np.float32)   # finite, but its squares (the fast screen) overflow
    huge[::2] *= -1
    np.testing.assert_array_equal(read_array(h, huge.tobytes(), 10), huge)
    assert model_fingerprint(10, layers=[2, 3]) != model_fingerprint(10, layers=[3, 2])


# ------------------------------------------------------------------------------------------------ engine
JOB, FP = b"J" * 16, 1234


def engine(mode="async", n=2, lr=1.0, **kw):
    spec = TrainingSpec(mode=mode, num_workers=n, learning_rate=lr, **kw)
    return SessionEngine(np.zeros(4, np.float32), spec, job_id=JOB, fingerprint=FP)


def msg(op, wid=0, attempt=0, payload=None, **kw):
    h = Header(op=int(op), job_id=JOB, fingerprint=FP, worker_id=wid, attempt=attempt,
               dtype=FLOAT32 if payload is not None else 0, n_values=0 if payload is None else payload.size, **kw)
    return [h.pack()] + ([payload.tobytes()] if payload is not None else [])


def status(replies):
    return [(unpack_header(r[1].pack()).status, r[1].code) for r in replies]


def test_engine_fencing_duplicates_and_resume():
    e = engine()
    one = np.ones(4, np.float32)
    assert status(e.handle(b"a", msg(Op.HELLO, 0, 0))) == [(Status.OK, 0)]
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=1))) == [(Status.OK, 0)]
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=1))) == [(Status.DUPLICATE, Reason.DUPLICATE_STEP)]
    assert status(e.handle(b"z", msg(Op.HELLO, 0, 0))) == [(Status.ERROR, Reason.DUPLICATE_WORKER)]
    r = e.handle(b"b", msg(Op.HELLO, 0, 1))                      # restarted task
    assert status(r) == [(Status.OK, 0)] and r[0][1].step == 1   # learns its last applied step
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=2))) == [(Status.ERROR, Reason.SUPERSEDED_ATTEMPT)]
    assert status(e.handle(b"b", msg(Op.PUSH, 0, 1, one, step=2))) == [(Status.OK, 0)]
    assert status(e.handle(b"c", msg(Op.PUSH, 1, 0, one, step=1))) == [(Status.ERROR, Reason.UNKNOWN_WORKER)]
    assert status(e.handle(b"c", msg(Op.HELLO, 5, 0))) == [(Status.ERROR, Reason.UNKNOWN_WORKER)]
    np.testing.assert_array_equal(e.weights, -2 * one)
    s = e.stats()
    assert s["applied"] == 2 and s["workers"]["0"]["last_step"] == 2 and s["workers"]["0"]["applied"] == 2
    assert s["rejected"] == {"duplicate_step": 1, "duplicate_worker": 1, "superseded_attempt": 1,
                             "unknown_worker": 2}


def test_engine_staleness_bound_rejects_with_stale():
    e = engine(staleness=1)
    one = np.ones(4, np.float32)
    for wid, tok in ((0, b"a"), (1, b"b")):
        e.handle(tok, msg(Op.HELLO, wid))
    for step in (1, 2):
        assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=step, wversion=e.version))) == [(Status.OK, 0)]
    before = e.weights.copy()
    r = e.handle(b"b", msg(Op.PUSH, 1, 0, one, step=1, wversion=0))   # 2 versions old > bound 1
    assert status(r) == [(Status.STALE, Reason.STALE)]
    np.testing.assert_array_equal(e.weights, before)
    assert e.stats()["rejected"]["stale"] == 1
    assert status(e.handle(b"b", msg(Op.PUSH, 1, 0, one, step=1, wversion=1))) == [(Status.OK, 0)]


def test_engine_sync_round_and_timeout():
    e = engine("sync", barrier_timeout=5.0)
    e.handle(b"a", msg(Op.HELLO, 0))
    e.handle(b"b", msg(Op.HELLO, 1))
    g0, g1 = np.full(4, 1, np.float32), np.full(4, 4, np.float32)
    assert e.handle(b"a", msg(Op.PUSH, 0, 0, g0, step=1, batch_size=3), now=0.0) == []   # waits for worker 1
    r = e.handle(b"b", msg(Op.PUSH, 1, 0, g1, step=1, batch_size=1), now=1.0)
    assert sorted(x[0] for x in r) == [b"a", b"b"] and e.version == 1
    np.testing.assert_allclose(e.weights, -(3 * 1 + 1 * 4) / 4)
    before = e.weights.copy()
    assert e.handle(b"a", msg(Op.PUSH, 0, 0, g0, step=2, wversion=1, batch_size=3), now=2.0) == []
    assert e.tick(now=6.0) == []
    r = e.tick(now=7.1)
    assert status(r) == [(Status.ERROR, Reason.BARRIER_TIMEOUT)] and b"[1]" in r[0][2]
    np.testing.assert_array_equal(e.weights, before)


def test_engine_fence_below_drops_a_failed_attempts_barrier_entry():
    """A relaunched barrier stage: worker 1 of attempt 0 still waits at the data barrier when attempt 1 starts.
    Without the fence, worker 0 of attempt 1 would complete that barrier with attempt 0's stale entry."""
    e = engine(barrier_timeout=30.0)
    for wid, tok in ((0, b"a0"), (1, b"b0")):
        e.handle(tok, msg(Op.HELLO, wid, 0))
    report = [json.dumps({"rows": 5}).encode()]
    assert e.handle(b"b0", msg(Op.BARRIER, 1, 0, step=-1, flags=FLAG_JSON) + report) == []
    assert e.fence_below(1) == 1 and e.barrier is None
    assert status(e.handle(b"b0", msg(Op.PULL, 1, 0))) == [(Status.ERROR, Reason.SUPERSEDED_ATTEMPT)]
    assert status(e.handle(b"b0", msg(Op.HELLO, 1, 0))) == [(Status.ERROR, Reason.SUPERSEDED_ATTEMPT)]
    e.handle(b"a1", msg(Op.HELLO, 0, 1))
    assert e.handle(b"a1", msg(Op.BARRIER, 0, 1, step=-1, flags=FLAG_JSON) + [b'{"rows": 7}']) == []   # waits for 1
    e.handle(b"b1", msg(Op.HELLO, 1, 1))
    replies = e.handle(b"b1", msg(Op.BARRIER, 1, 1, step=-1, flags=FLAG_JSON) + [b'{"rows": 8}'])
    assert sorted(r[0] for r in replies) == [b"a1", b"b1"]
    assert all(json.loads(r[2]) == [{"rows": 7}, {"rows": 8}] for r in replies)
    assert e.stats()["rejected"]["superseded_attempt"] == 3      # the dropped entry and the two refusals


def test_engine_wrong_mode_push():
    e = engine("async")
    e.handle(b"a", msg(Op.HELLO, 0))
    r = e.handle(b"a", msg(Op.PUSH, 0, 0, np.ones(4, np.float32), step=1, flags=FLAG_ELASTIC))
    assert status(r) == [(Status.ERROR, Reason.WRONG_MODE)]
    assert "kind='elastic' does not fit mode 'async': it takes kind='gradient'" in r[0][-1].decode()
    assert e.version == 0


def test_stalled_names_a_worker_silent_past_the_round_timeout_after_a_peer_finished():
    """What the driver cancels a training stage for (spark.training.StallWatch): in an asynchronous mode, a worker
    of the current attempt silent for longer than barrier_timeout once a peer of that attempt has finished."""
    e = engine("async", n=3, barrier_timeout=5.0)
    for w in (0, 1, 2):
        e.handle(b"%d" % w, msg(Op.HELLO, w), now=100.0)
    assert e.stalled(200.0) == [] and e.registered() == 3    # nobody finished: a slow peer still trains
    e.handle(b"0", msg(Op.BYE, 0), now=101.0)
    e.handle(b"1", msg(Op.PUSH, 1, 0, np.ones(4, np.float32), step=1), now=103.0)
    assert e.stalled(104.0) == []
    assert e.stalled(107.5) == [(2, 7.5)]                    # silent since 100; worker 1 since 103
    assert [w for w, _ in e.stalled(110.0)] == [1, 2]
    e.fence_below(1)                                         # a relaunched stage: the old attempt is not judged
    assert e.stalled(200.0) == [] and e.registered() == 0
    e.handle(b"0b", msg(Op.HELLO, 0, 1), now=201.0)
    e.handle(b"0b", msg(Op.BYE, 0, 1), now=201.0)
    assert e.stalled(300.0) == []                            # 1 and 2 have not registered in attempt 1 yet
    e.handle(b"2b", msg(Op.HELLO, 2, 1), now=301.0)
    assert e.stalled(307.0) == [(2, 6.0)]
    sync = engine("sync", n=2, barrier_timeout=5.0)           # a round times out by itself
    sync.handle(b"0", msg(Op.HELLO, 0), now=0.0)
    sync.handle(b"1", msg(Op.HELLO, 1), now=0.0)
    sync.handle(b"0", msg(Op.BYE, 0), now=1.0)
    assert sync.stalled(100.0) == []


def test_fused_sgd_step_equals_step_and_screens_nan_inf():
    """The server's one-pass SGD update: same weights as step(); NaN/inf gradients change nothing."""
    from core.backends import host_ops

    rng = np.random.default_rng(3)
    w = rng.standard_normal(100_003).astype(np.float32)
    g = rng.standard_normal(w.size).astype(np.float32)
    ref = make_optimizer("sgd", w.size, learning_rate=0.05)                      # the NumPy reference
    fused = make_optimizer("sgd", w.size, learning_rate=0.05, ops=host_ops())    # the server's ops
    want = ref.step(w, g, out=np.empty_like(w))
    out = np.empty_like(w)
    assert fused.step_screened(w, g, out) and fused.t == 1
    np.testing.assert_array_equal(out, want)
    w0 = w.copy()
    for bad in (np.nan, np.inf, -np.inf):
        gb = g.copy()
        gb[77_777] = bad
        assert not fused.step_screened(w, gb, np.empty_like(w))
        assert fused.t == 1
    np.testing.assert_array_equal(w, w0)
    huge = np.full(w.size, 1e20, np.float32)               # finite, but its squares overflow float32
    assert fused.step_screened(w, huge, out) and fused.t == 2
    with pytest.raises(TypeError, match="keeps state"):
        make_optimizer("adam", w.size).step_screened(w, g, out)


# ------------------------------------------------------------------------------------------------ hardening
def test_engine_binds_each_registration_to_its_session():
    e = engine()
    one = np.ones(4, np.float32)
    r = e.handle(b"a", msg(Op.HELLO, 0, 0))
    session = r[0][1].session
    assert status(r) == [(Status.OK, 0)] and session != 0
    # another client holding the job's keys but not the session: nothing it sends as worker 0 is taken
    for op, payload, kw in ((Op.PUSH, one, dict(step=1)), (Op.PULL, None, {}), (Op.STATS, None, {}),
                            (Op.BYE, None, {}), (Op.BARRIER, None, dict(step=3))):
        assert status(e.handle(b"z", msg(op, 0, 0, payload, session=session ^ 1, **kw))) == \
            [(Status.ERROR, Reason.FOREIGN_SESSION)], op
    assert status(e.handle(b"z", msg(Op.HELLO, 0, 0))) == [(Status.ERROR, Reason.DUPLICATE_WORKER)]
    assert e.version == 0 and not e.workers[0].done
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=1))) == [(Status.OK, 0)]   # the real step 1
    # the registered client again, from a new connection: same session, its progress kept
    r = e.handle(b"a2", msg(Op.HELLO, 0, 0, session=session))
    assert status(r) == [(Status.OK, 0)] and r[0][1].session == session and r[0][1].step == 1
    assert e.workers[0].token == b"a2"


def test_engine_steps_are_contiguous():
    e = engine(lr=1.0)
    one = np.ones(4, np.float32)
    e.handle(b"a", msg(Op.HELLO, 0))
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=1))) == [(Status.OK, 0)]
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=101, wversion=1))) == \
        [(Status.ERROR, Reason.STEP_GAP)]
    assert e.version == 1 and e.workers[0].last_step == 1
    np.testing.assert_array_equal(e.weights, -one)
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=2, wversion=1))) == [(Status.OK, 0)]
    np.testing.assert_array_equal(e.weights, -2 * one)
    assert e.stats()["rejected"] == {"step_gap": 1}


def test_engine_push_of_an_adaptive_window_covers_up_to_window_max_over_tau_windows():
    e = engine(lr=1.0, tau=4, window_max=16)                 # a push may cover 16 // 4 = 4 windows
    one = np.ones(4, np.float32)
    e.handle(b"a", msg(Op.HELLO, 0))
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=4))) == [(Status.OK, 0)]   # windows 1..4
    r = e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=9, wversion=1))                   # 5..9: five windows
    assert status(r) == [(Status.ERROR, Reason.STEP_GAP)]
    assert "covers at most 4 windows (window_max 16, tau 4)" in r[0][2].decode()
    assert e.version == 1 and e.workers[0].last_step == 4
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=5, wversion=1))) == [(Status.OK, 0)]
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=8, wversion=2))) == [(Status.OK, 0)]
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, one, step=6, wversion=3))) == \
        [(Status.DUPLICATE, Reason.DUPLICATE_STEP)]
    np.testing.assert_array_equal(e.weights, -3 * one)
    fixed = engine(lr=1.0, tau=4)                           # a window the user set: contiguous steps
    fixed.handle(b"a", msg(Op.HELLO, 0))
    assert status(fixed.handle(b"a", msg(Op.PUSH, 0, 0, one, step=2))) == [(Status.ERROR, Reason.STEP_GAP)]


def test_spec_window_max_is_adaptive_only_for_a_default_window_in_the_asynchronous_modes():
    assert TrainingSpec(mode="async").window_max == AUTO_WINDOW_MAX
    assert TrainingSpec(mode="async-easgd").window_max == AUTO_WINDOW_MAX
    assert TrainingSpec(mode="eamsgd", pipeline=True).window_max == AUTO_WINDOW_MAX
    for fixed in (dict(mode="async", tau=4), dict(mode="async", staleness=2), dict(mode="async", ssp_slack=1),
                  dict(mode="sync"), dict(mode="easgd")):
        assert TrainingSpec(**fixed).window_max == 0, fixed
    spec = TrainingSpec(mode="async")
    assert spec.replace(backend="numpy").window_max == AUTO_WINDOW_MAX          # kept through a copy
    assert spec.replace(mode="sync").window_max == 0 and spec.replace(mode="sync").tau == 1
    assert spec.replace(mode="sync").replace(mode="async").window_max == AUTO_WINDOW_MAX
    assert TrainingSpec(mode="async", tau=8, window_max=32).window_max == 32
    for bad, words in ((dict(mode="sync", window_max=8), "applies to the asynchronous modes"),
                       (dict(mode="easgd", tau=2, window_max=8), "not mode='easgd'"),
                       (dict(mode="async", tau=8, window_max=4), "must be 0 or at least the window tau=8, got 4"),
                       (dict(mode="async", window_max=-1), "window_max must be"),
                       (dict(mode="async", window_max=16, staleness=1), "does not combine with a staleness bound")):
        with pytest.raises(ValueError, match=re.escape(words)):
            TrainingSpec(**bad)


def test_engine_every_op_honours_registration_and_fencing():
    e = engine()
    e.handle(b"a", msg(Op.HELLO, 0, 0))
    for wid in (0, -5):                                   # nobody stops the server remotely
        assert status(e.handle(b"x", msg(Op.STOP, wid, 0))) == [(Status.ERROR, Reason.FORBIDDEN)]
    for op, kw in ((Op.STATS, {}), (Op.PULL, {}), (Op.BYE, {}), (Op.BARRIER, dict(step=2))):
        assert status(e.handle(b"u", msg(op, 1, 0, **kw))) == [(Status.ERROR, Reason.UNKNOWN_WORKER)], op
    assert status(e.handle(b"a", msg(Op.STATS, 0, 0)))[0][0] == Status.OK
    e.fence_below(1)
    for op in (Op.STATS, Op.PULL, Op.BYE, Op.HELLO):
        assert status(e.handle(b"a", msg(op, 0, 0))) == [(Status.ERROR, Reason.SUPERSEDED_ATTEMPT)], op


@pytest.mark.parametrize("mode,optimizer,pushes_until_overflow", [
    ("async", "sgd", 3), ("async", "momentum", 2), ("async-easgd", "sgd", 2), ("sync", "sgd", 2)])
def test_engine_rolls_back_an_update_whose_result_is_not_finite(mode, optimizer, pushes_until_overflow):
    """Finite pushes whose update overflows float32: rolled back (weights and optimizer state), answered
    NON_FINITE_UPDATE, counted, the step used up; the next step is applied."""
    n = 2 if mode == "sync" else 1
    e = engine(mode, n=n, lr=0.5 if mode != "sync" else 1.0, optimizer=optimizer)
    huge = np.full(4, 3e38, np.float32)
    flags = FLAG_ELASTIC if mode == "async-easgd" else 0
    for wid in range(n):
        e.handle(bytes([wid]), msg(Op.HELLO, wid))

    def push(step, g):
        replies = []
        for wid in range(n):
            replies += e.handle(bytes([wid]), msg(Op.PUSH, wid, 0, g, step=step, wversion=e.version, flags=flags))
        return status(replies)

    for step in range(1, pushes_until_overflow):
        assert push(step, huge) == [(Status.OK, 0)] * n
    weights, state = e.weights.copy(), {k: v.copy() for k, v in e.optimizer.state.items()}
    version, t = e.version, e.optimizer.t
    assert push(pushes_until_overflow, huge) == [(Status.ERROR, Reason.NON_FINITE_UPDATE)] * n
    assert e.version == version and e.optimizer.t == t and np.isfinite(e.weights).all()
    np.testing.assert_array_equal(e.weights, weights)
    for k, v in e.optimizer.state.items():
        np.testing.assert_array_equal(v, state[k])
    assert e.stats()["non_finite_updates"] == 1
    assert all(w.last_step == pushes_until_overflow for w in e.workers.values())
    assert push(pushes_until_overflow + 1, np.full(4, 1e-3, np.float32)) == [(Status.OK, 0)] * n
    assert e.version == version + 1 and np.isfinite(e.weights).all()


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_an_overflowing_push_raises_no_warning_on_either_server_backend(backend):
    """The engine silences NumPy's overflow warnings around an update only where NumPy runs it: with the
    numba ops the fused SGD kernel runs bare, and neither may warn (here: fail) on an update that overflows."""
    from core.backends import get_backend

    spec = TrainingSpec(mode="async", num_workers=1, learning_rate=0.5)
    opt = make_optimizer("sgd", 4, learning_rate=0.5, ops=get_backend(backend))
    e = SessionEngine(np.zeros(4, np.float32), spec, job_id=JOB, fingerprint=FP, optimizer=opt)
    e.handle(b"a", msg(Op.HELLO))
    huge = np.full(4, 3e38, np.float32)
    for step in (1, 2):                                    # 0 -> -1.5e38 -> -3e38: finite
        assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, huge, step=step, wversion=e.version))) == [(Status.OK, 0)]
    assert status(e.handle(b"a", msg(Op.PUSH, 0, 0, huge, step=3, wversion=e.version))) == \
        [(Status.ERROR, Reason.NON_FINITE_UPDATE)]                      # -4.5e38 overflows: rolled back
    np.testing.assert_array_equal(e.weights, np.full(4, -3e38, np.float32))


def test_fused_screen_tells_a_bad_gradient_from_a_bad_result():
    from core.backends import host_ops
    from core.optimizers import Verdict

    w = np.full(100_003, -3e38, np.float32)
    opt = make_optimizer("sgd", w.size, learning_rate=1.0, ops=host_ops())
    g = np.zeros_like(w)
    g[5] = 3e38                                           # finite, but w - g overflows at index 5
    assert opt.step_screened(w, g, np.empty_like(w)) is Verdict.BAD_RESULT and opt.t == 0
    g[5] = np.nan
    assert opt.step_screened(w, g, np.empty_like(w)) is Verdict.BAD_GRADIENT and opt.t == 0
    ref = make_optimizer("sgd", w.size, learning_rate=1.0)
    g[5] = 3e38
    with np.errstate(over="ignore"):           # as the engine calls NumPy updates: the overflow is the point
        assert ref.step_screened(w, g, np.empty_like(w)) is Verdict.BAD_RESULT  # the NumPy reference agrees


def test_the_weighted_mean_of_sparse_vectors_is_the_dense_mean_on_their_union():
    rng = np.random.default_rng(8)
    n = 500
    parts = []
    for k in range(3):
        index = np.sort(rng.choice(n, 40 + 10 * k, replace=False)).astype(np.uint32)
        parts.append((index, rng.standard_normal(index.size).astype(np.float32)))
    dense = []
    for index, values in parts:
        v = np.zeros(n, np.float32)
        v[index] = values
        dense.append(v)
    for weights in ([32, 32, 7], [0, 0, 0]):                 # all-zero weights: the plain mean
        union, mean = rules.weighted_mean_entries(parts, weights)
        want = rules.weighted_mean(dense, weights, out=np.empty(n, np.float32))
        np.testing.assert_array_equal(union, np.unique(np.concatenate([i for i, _ in parts])))
        np.testing.assert_array_equal(mean, want[union])       # bit for bit
        assert not np.delete(want, union).any()
