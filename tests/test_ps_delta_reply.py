"""Delta replies: a client that holds the weights of version b gets the entries changed since b, where every
update since changed only what its sparse push carried; the weights it then holds equal the server's exactly."""
import numpy as np
import pytest

from ps import ParameterClient, ParameterServer, PSError, Reason
from ps.changes import ChangeLog, HeldWeights
from ps.protocol import (FLAG_DELTA_OK, FLAG_WANT_WEIGHTS, FLOAT32, SPARSE32, SPARSE_MIN_VALUES, Header, Op,
                         encode_push, sparse_parts)
from ps.shards import ShardedServer, connect
from ps.spec import TrainingSpec
from core.datasets import hashed_text

try:
    from tests.ps_helpers import SessionEngine, run_threads, sparse_frame
except ImportError:  # pytest run without the repository root on sys.path
    from ps_helpers import SessionEngine, run_threads, sparse_frame

pytestmark = pytest.mark.timeout(120)

N = SPARSE_MIN_VALUES + 1000


def touched(n, count, seed):
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False)).astype(np.uint32)


def sparse_gradient(n, count, seed):
    g = np.zeros(n, np.float32)
    at = touched(n, count, seed)
    g[at] = np.random.default_rng(seed + 100).standard_normal(at.size)
    return g


# ---------------------------------------------------------------------------------------------- the log alone
def test_the_log_answers_the_union_of_the_sets_after_a_version():
    log = ChangeLog(1000, version=0)
    a, b, c = np.array([1, 5, 9], np.uint32), np.array([5, 7], np.uint32), np.array([0, 999], np.uint32)
    log.record(1, [a])
    log.record(2, [b])
    log.record(3, [c, a])              # a round: two workers' sets under one version
    np.testing.assert_array_equal(log.since(0, 3), [0, 1, 5, 7, 9, 999])
    np.testing.assert_array_equal(log.since(1, 3), [0, 1, 5, 7, 9, 999])
    np.testing.assert_array_equal(log.since(2, 3), [0, 1, 5, 9, 999])
    assert log.since(3, 3).size == 0                      # up to date: nothing to send
    assert log.since(4, 3) is None and log.since(-1, 3) is None   # not a version this log knows


def test_a_dense_update_and_an_overfull_log_send_older_versions_the_whole_vector():
    log = ChangeLog(1000, version=0)
    log.record(1, [np.arange(10, dtype=np.uint32)])
    log.record(2, None)                                   # any entry may have changed
    assert log.since(0, 2) is None and log.since(1, 2) is None
    assert log.since(2, 2).size == 0
    log.record(3, [np.arange(100, dtype=np.uint32)])
    np.testing.assert_array_equal(log.since(2, 3), np.arange(100))
    for v in range(4, 10):                                # 100 more each: the log keeps at most 500 indices
        log.record(v, [np.arange(100 * v, 100 * v + 100, dtype=np.uint32) % 1000])
    assert log.held <= 500 and log.floor == 4
    assert log.since(3, 9) is None                        # older than the log reaches back
    np.testing.assert_array_equal(log.since(8, 9), np.arange(900, 1000))
    assert log.since(6, 9) is None                        # 300 entries: more bytes than half the float32 frame
    np.testing.assert_array_equal(log.since(7, 9), np.arange(800, 1000))


def test_held_weights_take_a_whole_vector_then_deltas_and_refuse_a_delta_with_nothing_held():
    held = HeldWeights(6)
    with pytest.raises(ValueError, match="holds no weights"):
        held.delta(1, np.array([0], np.uint32), np.array([1.0], np.float32))
    frame = np.arange(6, dtype=np.float32)
    frame.flags.writeable = False                         # as a received frame's view
    assert held.whole(3, frame, None) is frame            # no copy
    w = held.delta(4, np.array([1, 4], np.uint32), np.array([-1.0, -4.0], np.float32))
    np.testing.assert_array_equal(w, [0, -1, 2, 3, -4, 5])
    assert held.version == 4 and np.array_equal(frame, np.arange(6))   # the frame itself is not written to
    held.forget()
    assert held.version is None


# --------------------------------------------------------------------------------------- the engine's replies
def engine(optimizer="sgd", mode="async", n=N, workers=1):
    spec = TrainingSpec(mode=mode, optimizer=optimizer, learning_rate=0.1, num_workers=workers)
    eng = SessionEngine(np.linspace(-1, 1, n, dtype=np.float32), spec, job_id=b"j" * 16, fingerprint=7)
    for wid in range(workers):
        eng.handle(b"t%d" % wid, [Header(op=Op.HELLO, job_id=b"j" * 16, fingerprint=7, worker_id=wid).pack()])
    return eng


def push(eng, g, step, base, flags=FLAG_WANT_WEIGHTS | FLAG_DELTA_OK, wid=0, dense=False):
    payload, code = (g, FLOAT32) if dense else encode_push(g)
    flags |= eng.mode.push_flag
    h = Header(op=Op.PUSH, job_id=b"j" * 16, fingerprint=7, worker_id=wid, step=step, wversion=base, flags=flags,
               batch_size=8, dtype=code, n_values=g.size)
    return eng.handle(b"t%d" % wid, [h.pack(), payload.tobytes()])


def pull(eng, held_version=None):
    flags, base = (0, 0) if held_version is None else (FLAG_DELTA_OK, held_version)
    h = Header(op=Op.PULL, job_id=b"j" * 16, fingerprint=7, worker_id=0, flags=flags, wversion=base)
    return eng.handle(b"t0", [h.pack()])[-1]


def test_the_engine_answers_a_sparse_push_with_the_changed_entries_only_when_asked():
    eng = engine()
    before = eng.weights.copy()
    g = sparse_gradient(N, 300, seed=1)
    _, rh, payload = push(eng, g, step=1, base=0)[-1]
    assert rh.dtype == SPARSE32 and rh.n_values == N and rh.wversion == 1
    index, values = sparse_parts(memoryview(payload).cast("B"), N)
    np.testing.assert_array_equal(index, np.flatnonzero(g))
    np.testing.assert_array_equal(values, eng.weights[index])
    after = before.copy()
    after[index] = values
    np.testing.assert_array_equal(after, eng.weights)     # the version-0 weights plus the delta: version 1
    _, rh, payload = push(eng, sparse_gradient(N, 300, seed=2), step=2, base=1, flags=FLAG_WANT_WEIGHTS)[-1]
    assert rh.dtype == FLOAT32 and payload is eng.weights # not offered: the whole vector
    _, rh, payload = pull(eng, held_version=0)            # two updates since version 0: their union
    index, values = sparse_parts(memoryview(payload).cast("B"), N)
    np.testing.assert_array_equal(index, np.union1d(np.flatnonzero(g), touched(N, 300, 2)))
    assert pull(eng, held_version=5)[1].dtype == FLOAT32   # a version the server never had
    assert pull(eng, held_version=2)[2].size == 0          # up to date: an empty delta
    assert eng.counters["delta_replies"] == 3


@pytest.mark.parametrize("optimizer,mode,deltas", [("sgd", "async", True), ("adagrad", "async", True),
                                                   ("momentum", "async", False), ("adam", "async", False),
                                                   ("sgd", "async-easgd", True), ("sgd", "easgd", False)])
def test_deltas_only_where_an_update_leaves_the_entries_a_push_did_not_carry(optimizer, mode, deltas):
    eng = engine(optimizer, mode)
    assert (eng.changes is not None) is deltas
    if mode == "easgd":
        return                                            # its pushes are a worker's whole weights
    before = eng.weights.copy()
    g = sparse_gradient(N, 300, seed=3)
    _, rh, _ = push(eng, g, step=1, base=0)[-1]
    unchanged = np.ones(N, bool)
    unchanged[np.flatnonzero(g)] = False
    np.testing.assert_array_equal(eng.weights[unchanged], before[unchanged])   # what the log relies on
    assert rh.dtype == (SPARSE32 if deltas else FLOAT32)


def test_a_dense_push_and_a_small_model_get_whole_vectors():
    eng = engine()
    push(eng, sparse_gradient(N, 300, seed=4), step=1, base=0)
    push(eng, sparse_gradient(N, 300, seed=5), step=2, base=1, dense=True)   # a float32 frame: any entry
    assert pull(eng, held_version=1)[1].dtype == FLOAT32
    assert pull(eng, held_version=2)[1].dtype == SPARSE32
    assert engine(n=SPARSE_MIN_VALUES - 1).changes is None


def test_a_restored_engine_sends_whole_vectors_to_versions_before_the_restore():
    eng = engine()
    push(eng, sparse_gradient(N, 300, seed=6), step=1, base=0)
    arrays, meta = eng.snapshot()
    eng.restore(arrays, meta)
    assert eng.changes.since(0, eng.version) is None and eng.changes.since(1, eng.version).size == 0


def test_a_sync_round_of_sparse_pushes_is_applied_in_place_as_the_dense_round_and_sends_the_union():
    gs = [sparse_gradient(N, 300, seed=7), sparse_gradient(N, 300, seed=8)]
    union = np.union1d(np.flatnonzero(gs[0]), np.flatnonzero(gs[1]))
    weights = []
    for dense in (False, True):
        eng = engine(mode="sync", workers=2)
        first = eng.weights
        assert push(eng, gs[0], step=1, base=0, wid=0, dense=dense) == []   # waits for the round
        replies = push(eng, gs[1], step=1, base=0, wid=1, dense=dense)
        for _, rh, payload in replies:
            assert rh.dtype == (FLOAT32 if dense else SPARSE32)     # dense pushes: any entry may have changed
            if not dense:
                np.testing.assert_array_equal(sparse_parts(memoryview(payload).cast("B"), N)[0], union)
        assert (eng.weights is first) is not dense          # sparse: in place
        weights.append(eng.weights.copy())
    np.testing.assert_array_equal(weights[0], weights[1])


# ---------------------------------------------------------------------------------------------- over sockets
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_clients_hold_exactly_the_servers_weights_through_interleaved_sparse_pushes(optimizer):
    w0 = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    with ParameterServer(w0, mode="async", optimizer=optimizer, learning_rate=0.05, num_workers=2,
                         progress=False) as srv:
        a, b = (ParameterClient(srv.client_config(), worker_id=k) for k in (0, 1))
        try:
            for c in (a, b):
                c.pull()
            order = [a, a, b, a, b, b, b, a]                 # b misses two of a's updates, then a three of b's
            for k, c in enumerate(order):
                r = c.push(sparse_gradient(N, 200, seed=10 + k), batch_size=8, want_weights=True)
                np.testing.assert_array_equal(r.weights, srv.weights())
                assert not r.weights.flags.writeable
            out = np.empty(N, np.float32)
            a.pull(out=out)
            np.testing.assert_array_equal(out, srv.weights())
            deltas = srv.stats()["delta_replies"]
            assert deltas == (len(order) + 1 if optimizer == "sgd" else 0)
        finally:
            a.close(), b.close()


def test_a_sharded_server_sends_each_slice_its_own_delta():
    n = 2 * N
    w0 = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    spec = TrainingSpec(mode="async", optimizer="sgd", learning_rate=0.05, num_workers=1)
    with ShardedServer(w0, spec=spec, shards=2, progress=False) as srv:
        c = connect(srv.client_config(), worker_id=0)
        try:
            c.pull()
            for k in range(4):
                r = c.push(sparse_gradient(n, 400, seed=20 + k), batch_size=8, want_weights=True)
                np.testing.assert_array_equal(r.weights, srv.weights())
            assert [s["delta_replies"] for s in srv.stats()["shards"]] == [4, 4]
        finally:
            c.close()


def test_a_client_refuses_a_delta_it_did_not_offer_and_a_malformed_one():
    with ParameterServer(np.zeros(N, np.float32), mode="async", learning_rate=0.1, num_workers=1,
                         progress=False) as srv:
        c = ParameterClient(srv.client_config(), worker_id=0)
        try:
            _, w = c.pull()
            frame = sparse_frame(np.array([3, 7], np.uint32), np.array([1.0, 2.0], np.float32))
            rh = Header(op=Op.PULL | 0x80, dtype=SPARSE32, n_values=N, wversion=1)
            with pytest.raises(PSError, match="did not offer"):
                c._weights(rh, memoryview(frame).cast("B"), None, asked=None)
            backwards = sparse_frame(np.array([7, 3], np.uint32), np.array([1.0, 2.0], np.float32))
            with pytest.raises(PSError, match="increase strictly") as err:
                c._weights(rh, memoryview(backwards).cast("B"), None, asked=0)
            assert err.value.reason == Reason.BAD_PAYLOAD and c._held.version is None   # holds nothing now
            c.push(sparse_gradient(N, 50, seed=30), batch_size=8)
            _, w = c.pull()                                  # asks for the whole vector again, and gets it
            np.testing.assert_array_equal(w, srv.weights())
            assert srv.stats()["delta_replies"] == 0
        finally:
            c.close()


def test_a_push_from_older_weights_than_held_names_the_held_version_and_gets_a_delta():
    """A pipelined window starts from weights one exchange older than the client holds: its push's wversion is
    that base (staleness), and a last frame names the version held, which the delta is made from."""
    with ParameterServer(np.zeros(N, np.float32), mode="async", learning_rate=0.1, num_workers=1,
                         progress=False) as srv:
        c = ParameterClient(srv.client_config(), worker_id=0)
        try:
            c.pull()
            c.push(sparse_gradient(N, 100, seed=40), batch_size=8, want_weights=True)        # holds version 1
            r = c.push(sparse_gradient(N, 100, seed=41), batch_size=8, want_weights=True, base_version=0)
            np.testing.assert_array_equal(r.weights, srv.weights())
            assert srv.stats()["delta_replies"] == 2 and r.version == 2
            assert srv.history()[-1]["staleness"] == 1           # judged by the window's base, version 0
        finally:
            c.close()
    eng = engine()
    payload, code = encode_push(sparse_gradient(N, 10, seed=42))
    h = Header(op=Op.PUSH, job_id=b"j" * 16, fingerprint=7, worker_id=0, step=1, batch_size=8, dtype=code,
               flags=FLAG_WANT_WEIGHTS | FLAG_DELTA_OK, n_values=N)
    _, rh, text = eng.handle(b"t0", [h.pack(), payload.tobytes(), b"\x01\x02"])[-1]
    assert rh.code == Reason.BAD_PAYLOAD and b"held-version frame has 2 bytes" in text and eng.version == 0


# ------------------------------------------------------------------------------- a stale window, recomputed
def _stale_run(monkeypatch, dense_recompute, stale_again):
    """One worker (run_worker, a real server, numba, staleness 0) on hashed text; a second client pushes
    a sparse gradient into the last step of windows 1 and 3, so their pushes come back STALE and are
    recomputed, and (``stale_again``) once more right after window 1's recompute pulled, so that retry is
    stale too. -> (the server's final weights, the worker's stats, the kind of vector each push sent)."""
    from ps.modes import Async
    from ps.worker import run_worker

    layers = [1 << 14, 8, 2]
    X, y = hashed_text(256, width=1 << 14, words=20, vocabulary=6000, seed=3)
    w0 = TrainingSpec(layers=layers).initial_weights()
    pushed = []
    real_push = Async._push

    def recording_push(loop, gradient, base_version, step, metrics):
        pushed.append(type(gradient).__name__)
        return real_push(loop, gradient, base_version, step, metrics)

    monkeypatch.setattr(Async, "_push", staticmethod(recording_push))
    if dense_recompute:      # the whole-vector recompute, which every sparse window took before
        monkeypatch.setattr(Async, "_push_recomputed_entries",
                            lambda self, loop, out, own: (self._push_recomputed(loop, out), None))
    with ParameterServer(w0, mode="async", learning_rate=0.1, num_workers=2, staleness=0, layers=layers,
                         batch_size=32, tau=2, epochs=1, backend="numba", progress=False) as srv:
        cfg = srv.client_config()
        other, client = ParameterClient(cfg, worker_id=1), ParameterClient(cfg, worker_id=0)
        pushes = iter(range(100))

        def interfere():
            other.pull()                               # staleness 0 holds for it too
            other.push(sparse_gradient(srv.engine.num_params, 3000, seed=50 + next(pushes)), batch_size=8)

        pulls = [0]
        real_pull = client.pull

        def pull(*a, **kw):
            reply = real_pull(*a, **kw)
            pulls[0] += 1
            if stale_again and pulls[0] == 2:          # the first recompute's pull
                interfere()
            return reply

        client.pull = pull
        try:
            stats = run_worker(cfg, 0, X, y, client=client, on_step=lambda k: k in (2, 6) and interfere())
            return srv.weights().copy(), stats, pushed
        finally:
            other.close()


@pytest.mark.parametrize("stale_again", [False, True], ids=["once", "twice"])
def test_a_stale_sparse_window_is_recomputed_by_entries_as_the_whole_vector_path_did(monkeypatch, stale_again):
    """A recompute takes the pulled weights into the worker's by the entries the delta and the window changed
    and pushes its entries: the same run, bit for bit, as the whole-vector copy and push (which cost a
    [262144, 16, 2] retry so long that a peer's pushes made every retry stale again)."""
    with monkeypatch.context() as m:
        w_dense, stats_dense, kinds_dense = _stale_run(m, True, stale_again)
    w, stats, kinds = _stale_run(monkeypatch, False, stale_again)
    retries = 3 if stale_again else 2
    assert stats["stale"] == stats_dense["stale"] == retries
    assert stats["pushes"] == stats_dense["pushes"] == 4
    assert kinds == ["Entries"] * (4 + retries)         # the windows' pushes and the recomputes' by entries
    assert sorted(kinds_dense) == ["Entries"] * 4 + ["ndarray"] * retries
    np.testing.assert_array_equal(w, w_dense)
    assert not np.array_equal(w, TrainingSpec(layers=[1 << 14, 8, 2]).initial_weights())


# ---------------------------------------------------------------------------------- pipelined, by entries
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_a_pipelined_sparse_window_is_rebased_by_entries_as_over_the_whole_vector(monkeypatch, optimizer):
    """Two pipelined workers (threads, a real server, numba) on hashed text. Every receive is checked against
    the whole-vector rebase it replaces: the worker's weights become the reply's plus gain x the next window's
    progress, measured from a whole copy of the weights taken when the window was sent. Bit for bit, while
    the send keeps its own copy up to date by entries only. (Momentum answers with whole vectors: the whole
    path, and its gain, checked by the same oracle.)"""
    from ps.modes import Async
    from ps.worker import run_worker

    layers = [1 << 14, 8, 2]
    X, y = hashed_text(1024, width=1 << 14, words=20, vocabulary=6000, seed=4)
    real_send, real_receive = Async.send, Async.receive
    snapshots, checked = {}, {"delta": 0, "whole": 0}

    def send(self, loop, step, metrics):
        out = real_send(self, loop, step, metrics)
        snapshots[id(loop)] = loop.w.copy()           # what the whole-vector send copied
        np.testing.assert_array_equal(loop.window_start, loop.w)
        return out

    def receive(self, loop, out, reply):
        w_before, start = loop.w.copy(), snapshots[id(loop)]
        wh = np.array(reply[1], copy=True)
        real_receive(self, loop, out, reply)
        moved = start - w_before
        if loop.rebase_gain != 1.0:
            moved *= loop.rebase_gain
        np.testing.assert_array_equal(loop.w, wh - moved)
        checked["delta" if loop.client.last_changed is not None else "whole"] += 1

    monkeypatch.setattr(Async, "send", send)
    monkeypatch.setattr(Async, "receive", receive)
    w0 = TrainingSpec(layers=layers).initial_weights()
    with ParameterServer(w0, mode="async", optimizer=optimizer, learning_rate=0.05, num_workers=2,
                         layers=layers, batch_size=32, tau=2, epochs=2, backend="numba", pipeline=True,
                         progress=False) as srv:
        cfg = srv.client_config()
        shards = [(X[k::2], y[k::2]) for k in (0, 1)]
        run_threads([lambda k=k: run_worker(cfg, k, *shards[k]) for k in (0, 1)], timeout=100)
        assert srv.stats()["applied"] == 2 * 16
    assert checked["delta"] + checked["whole"] == 2 * 16
    if optimizer == "sgd":
        # most receives take the entries path (a worker three pushes behind its peer is owed more entries than a
        # delta may carry and gets the whole vector; each worker's last receive has no window after it)
        assert checked["delta"] >= 16
    else:
        assert checked["delta"] == 0


# ------------------------------------------------------------------------------- async-easgd, by entries
def _easgd_run(monkeypatch, by_entries, shards):
    """One async-easgd worker (run_worker, real server(s), numba) on hashed text, in line; a second client
    pushes an elastic difference of its own before steps 3 and 7, so the center also moves where this worker
    never stepped. -> (the center at the end, the worker's stats, the kind of vector each push sent)."""
    from ps.modes import AsyncEasgd
    from ps.shards import connect, make_server
    from ps.worker import run_worker

    layers = [1 << 14, 8, 2]
    X, y = hashed_text(256, width=1 << 14, words=20, vocabulary=6000, seed=6)
    spec = TrainingSpec(layers=layers, mode="async-easgd", learning_rate=0.1, num_workers=2, batch_size=32,
                        tau=2, epochs=2, backend="numba", alpha=0.3)
    if not by_entries:        # the whole-vector exchange, which async-easgd took on sparse rows before
        monkeypatch.setattr(AsyncEasgd, "tracks_entries", lambda self, spec: False)
    kinds = []
    with make_server(spec.initial_weights(), spec=spec, shards=shards, progress=False) as srv:
        cfg = srv.client_config()
        other, client = connect(cfg, worker_id=1), connect(cfg, worker_id=0)
        real_push = client.push

        def push(array, *a, **kw):
            kinds.append(type(array).__name__)
            return real_push(array, *a, **kw)

        client.push = push
        pushes = iter(range(1, 10))

        def interfere(k):
            if k in (3, 7):
                other.pull()
                g = sparse_gradient(srv.weights().size, 2000, seed=60 + k)
                other.push(g * np.float32(1e-2), step=next(pushes), kind="elastic")
        try:
            stats = run_worker(cfg, 0, X, y, client=client, on_step=interfere)
            return srv.weights().copy(), stats, kinds
        finally:
            other.close()


@pytest.mark.parametrize("shards", [1, 2])
def test_async_easgd_exchanges_by_the_entries_where_worker_and_center_differ(monkeypatch, shards):
    """In line on sparse rows, async-easgd computes, pushes and subtracts e = alpha (x - c) on the entries
    where x and the held center can differ (every entry a window or a delta changed): the same run, bit for
    bit, as the whole-vector exchange, with every push by entries. (Without the other client's pushes the
    center would move only where this worker stepped.)"""
    with monkeypatch.context() as m:
        w_dense, stats_dense, kinds_dense = _easgd_run(m, False, shards)
    w, stats, kinds = _easgd_run(monkeypatch, True, shards)
    assert stats["pushes"] == stats_dense["pushes"] == 8
    assert kinds == ["Entries"] * 8 and kinds_dense == ["ndarray"] * 8
    np.testing.assert_array_equal(w, w_dense)
    assert not np.array_equal(w, TrainingSpec(layers=[1 << 14, 8, 2]).initial_weights())


def test_an_elastic_push_by_entries_is_applied_in_place_and_an_overflow_writes_nothing():
    eng = engine(mode="async-easgd")
    e = sparse_gradient(N, 300, seed=70)
    w0 = eng.weights.copy()
    (_, rh, _), = push(eng, e, 1, 0)
    assert rh.status == 0 and eng.version == 1
    np.testing.assert_array_equal(eng.weights, w0 + e)                      # c + e, exactly as the dense sum
    big = np.where(e != 0, np.float32(2e38), np.float32(0))
    (_, rh, _), = push(eng, big, 2, 1)                                   # c + 2e38: still finite
    assert rh.status == 0 and eng.version == 2
    before = eng.weights.copy()
    (_, rh, _), = push(eng, big, 3, 2)                                   # c + 4e38 overflows
    assert rh.status != 0 and eng.version == 2 and eng.rejected
    np.testing.assert_array_equal(eng.weights, before)
