"""Server and client over real sockets on random loopback ports: correctness, load, security, bad input."""
import os
import random
import re
import threading
import time

import numpy as np
import pytest
import zmq

from core import FeedForwardNetwork
from ps import ParameterClient, ParameterServer, PSError, Reason, ServerUnavailable, StaleUpdate, Status
from ps import checkpoint as ckpt
from ps.protocol import FLAG_JSON, FLOAT32, HEADER, MAGIC, MAX_JSON_BYTES, PROTOCOL_VERSION, Header
try:
    from tests.ps_helpers import header_for, port_of, push_frames, raw_socket, request, run_threads, server
except ImportError:  # pytest run without the repository root on sys.path
    from ps_helpers import header_for, port_of, push_frames, raw_socket, request, run_threads, server

pytestmark = pytest.mark.timeout(120)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fails", [False, True])
def test_the_update_kernel_is_warmed_up_beside_serving_and_a_failed_warm_up_harms_nothing(fails, monkeypatch):
    """start() warms the optimizer's update kernel up on a thread of its own (the first push no longer waits for
    numba to load it); the optimizer itself is untouched, and a warm-up that raises is only logged: the
    server serves and applies pushes as before."""
    from core.optimizers import Optimizer

    calls = []

    def warm_up(self):
        calls.append((self.t, threading.current_thread().name))
        if fails:
            raise RuntimeError("no kernel today")
    monkeypatch.setattr(Optimizer, "warm_up", warm_up)
    with server(np.arange(16, dtype=np.float32), learning_rate=0.5, secure=False) as s:
        with ParameterClient(s.client_config(), worker_id=0, timeout=5) as c:
            c.pull()
            r = c.push(np.ones(16, np.float32), want_weights=True)
            np.testing.assert_array_equal(r.weights, np.arange(16, dtype=np.float32) - 0.5)
        assert s.running and s.stats()["applied"] == 1
    for t in threading.enumerate():
        if t.name == "ps-warm-up":
            t.join(30)
    assert calls == [(0, "ps-warm-up")]


@pytest.mark.parametrize("secure", [True, False])
def test_pull_push_round_trip(secure):
    w0 = np.arange(16, dtype=np.float32)
    with server(w0, learning_rate=0.5, secure=secure) as s:
        assert s.address.startswith("tcp://127.0.0.1:")
        with ParameterClient(s.client_config(), worker_id=1, timeout=5) as c:
            v, w = c.pull()
            assert v == 0 and np.array_equal(w, w0)
            r = c.push(np.ones(16, np.float32), loss=0.7, accuracy=0.25, batch_size=8, want_weights=True)
            assert (r.version, r.step, r.duplicate) == (1, 1, False)
            np.testing.assert_array_equal(r.weights, w0 - 0.5)
            assert c.stats()["workers"]["1"]["loss"] == 0.7
        np.testing.assert_array_equal(s.weights(), w0 - 0.5)
        st = s.stats()
        assert st["applied"] == 1 and st["rejected_total"] == 0
        assert s.history()[0]["worker"] == 1 and s.history()[0]["batch_size"] == 8


@pytest.mark.parametrize("kw,message", [
    (dict(secure="no"), "secure must be True or False, got 'no'"),          # was taken as True
    (dict(hwm=-1), "hwm must be an integer >= 0, got -1"),
    (dict(max_connections=0), "max_connections must be an integer >= 1, got 0"),   # was the default
    (dict(handshake_timeout=-1), "handshake_timeout must be a positive number of seconds up to 2147483, got -1"),
    (dict(layers=[4, 8, 3]), r"layers \[4, 8, 3\] have 67 parameters, the initial weights 16"),
])
def test_server_options_are_checked_by_name_before_anything_starts(kw, message):
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(ValueError, match=message):
        ParameterServer(np.zeros(16, np.float32), progress=False, **kw)
    assert {t.name for t in threading.enumerate()} == before


@pytest.mark.parametrize("value", ["abc", "0", "-1"])
def test_a_bad_io_thread_count_in_the_environment_is_named(value, monkeypatch):
    from ps.server import io_threads_for

    monkeypatch.setenv("FFPS_PS_IO_THREADS", value)
    with pytest.raises(ValueError, match=f"FFPS_PS_IO_THREADS must be a positive number of threads, got '{value}'"):
        io_threads_for()


def test_client_arguments_are_checked_by_name_and_a_closed_client_says_so():
    """Header fields out of their wire range failed in struct.pack ('i' format requires ...), kind='bogus'
    with a KeyError, and any call on a closed client with 'Socket operation on non-socket'."""
    with server(num_workers=2) as s:
        cfg = s.client_config()
        for kw, message in ((dict(worker_id=2**40), "worker_id must be an integer in 0..2147483647, got 1099511627776"),
                            (dict(worker_id=-1), "worker_id must be an integer in 0..2147483647, got -1"),
                            (dict(attempt="1"), "attempt must be an integer in 0..2147483647, got '1'"),
                            (dict(timeout=-1), "timeout must be a positive number of seconds up to 2147483, "
                                               "got -1"),
                            (dict(timeout=3e6), "timeout must be a positive number of seconds up to 2147483, "
                                                "got 3000000.0"),
                            (dict(retries=-1), "retries must be an integer in 0..1000, got -1"),
                            (dict(hwm=-1), "hwm must be an integer in 0..2147483647, got -1")):
            with pytest.raises(ValueError, match=re.escape(message)):
                ParameterClient(cfg, **{"worker_id": 0, **kw})
        with pytest.raises(ValueError, match="the client config's address 'garbage' is not an endpoint a client "
                                             r"can connect to \(tcp://HOST:PORT\): Invalid argument"):
            ParameterClient({**cfg, "address": "garbage"}, worker_id=0)
        ParameterClient(cfg, worker_id=np.int64(1), timeout=np.float32(5.0), hwm=np.int32(8)).close()  # numpy numbers
        c = ParameterClient(cfg, worker_id=0)
        g = np.zeros(16, np.float32)
        for kw, message in ((dict(batch_size=2**40), "batch_size must be an integer in 0..2147483647"),
                            (dict(epoch=70_000), "epoch must be an integer in 0..65535, got 70000"),
                            (dict(epoch=-1), "epoch must be an integer in 0..65535, got -1"),
                            (dict(kind="bogus"), "kind must be one of gradient, elastic, local_weights, got 'bogus'"),
                            (dict(step=-3), "step must be an integer in 0..")):
            with pytest.raises(ValueError, match=re.escape(message)):
                c.push(g, **kw)
        # what is pushed: a float32 vector of the model's size (a list failed with 'no attribute size', a float16
        # vector reached the server as half the bytes)
        for bad, message in (([0.0] * 16, "got list;"),
                             (np.zeros(16, np.float64), "got a float64 array of shape (16,)"),
                             (np.zeros(16, np.float16), "got a float16 array of shape (16,)"),
                             (np.zeros((4, 4), np.float32), "got a float32 array of shape (4, 4)"),
                             (np.zeros(15, np.float32), "push of 15 values, the model has 16")):
            with pytest.raises(ValueError, match=re.escape(message)):
                c.push(bad)
        from ps.protocol import Entries
        with pytest.raises(ValueError, match="a local_weights push takes the whole weight vector, not"):
            c.push(Entries(np.array([1], np.int64), np.ones(1, np.float32), 16), kind="local_weights")
        version, w = c.pull()
        with pytest.raises(ValueError, match="read-only"):
            w[0] = 1.0                                   # a view of the received frame, as the docstring says
        c.close()
        with pytest.raises(RuntimeError, match=r"this ParameterClient \(worker 0\) is closed: make a new one"):
            c.pull()
        assert s.stats()["applied"] == 0 and s.stats()["rejected_total"] == 0     # nothing bad reached the wire


@pytest.mark.timeout(60)
def test_sync_equals_single_process_sgd_on_concatenated_batches():
    net = FeedForwardNetwork([64, 100, 10], backend="numpy")
    rng = np.random.default_rng(1)
    p, steps, lr, sizes = 3, 8, 0.2, [16, 24, 8]
    data = [[(rng.random((m, 64), dtype=np.float32), rng.integers(0, 10, m)) for m in sizes] for _ in range(steps)]
    w0 = net.init_params(0)
    ref = w0.copy()
    for batches in data:
        X = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        ref -= np.float32(lr) * net.loss_and_grad(ref, X, y)[1]
    with server(w0, mode="sync", learning_rate=lr, num_workers=p, layers=net.layers, barrier_timeout=20) as s:
        cfg = s.client_config()

        def worker(i):
            wnet = FeedForwardNetwork([64, 100, 10], backend="numpy")
            with ParameterClient(cfg, worker_id=i, timeout=10) as c:
                _, w = c.pull()
                for batches in data:
                    X, y = batches[i]
                    loss, g = wnet.loss_and_grad(w, X, y)
                    w = c.push(g, loss=loss, batch_size=len(y), want_weights=True).weights
        run_threads([lambda i=i: worker(i) for i in range(p)])
        st = s.stats()
        assert st["version"] == steps and st["rounds"] == steps and st["applied"] == p * steps
        np.testing.assert_allclose(s.weights(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.timeout(120)
def test_load_8_workers_1000_pushes_each():
    P, n_workers, pushes, lr = 1000, 8, 1000, 0.01
    w0 = np.random.default_rng(2).standard_normal(P).astype(np.float32)
    grads = {i: np.random.default_rng(100 + i).standard_normal((pushes, P)).astype(np.float32)
             for i in range(n_workers)}
    with server(w0, mode="async", learning_rate=lr, num_workers=n_workers) as s:
        cfg = s.client_config()

        def worker(i):
            with ParameterClient(cfg, worker_id=i, timeout=20) as c:
                for k in range(pushes):
                    c.push(grads[i][k], batch_size=1)
        run_threads([lambda i=i: worker(i) for i in range(n_workers)], timeout=110)
        st = s.stats()
        assert st["applied"] == n_workers * pushes == st["version"]
        assert all(st["workers"][str(i)]["applied"] == pushes for i in range(n_workers))
        assert st["rejected_total"] == 0, (st["rejected"], st["dropped_replies"])
        total = sum(g.astype(np.float64).sum(axis=0) for g in grads.values())
        np.testing.assert_allclose(s.weights(), w0 - lr * total, rtol=0, atol=2e-4)


def _fuzz_messages(cfg, rng, n, P, session=0):
    """n messages that must all be refused (each a list of frames). ``session``: the registered worker 0's,
    so the messages reach the checks behind the session gate (a key holder who also stole the session)."""
    good = dict(worker_id=0, attempt=1, step=1, session=session)
    wrong = [
        lambda: [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200))).replace(MAGIC, b"XXXX")],
        lambda: [header_for(cfg, 2, **good).pack()[:rng.randrange(0, HEADER.size)]],
        lambda: [header_for(cfg, 2, **good).pack() + b"\0" * rng.randrange(1, 9)],
        lambda: [b"XXXX" + header_for(cfg, 2, **good).pack()[4:]],
        lambda: [header_for(cfg, 2, version=rng.choice([v for v in (0, 1, 2, 7, 65535) if v != PROTOCOL_VERSION]),
                            **good).pack()],
        lambda: [Header(op=2, job_id=os.urandom(16), fingerprint=cfg["fingerprint"], **good).pack()],
        lambda: [header_for(cfg, 2, **good).pack().replace(cfg["fingerprint"].to_bytes(8, "little"), os.urandom(8))],
        lambda: [header_for(cfg, rng.choice([0, 8, 9, 100, 127, 200, 255]), **good).pack()],
        lambda: [header_for(cfg, 3, dtype=FLOAT32, n_values=P, **good).pack()],                   # no payload
        lambda: push_frames(cfg, np.ones(P), **good) + [b"extra"],                                  # 2 payloads
        lambda: [header_for(cfg, 2, **good).pack(), b"unexpected"],                                # pull + payload
        lambda: push_frames(cfg, np.ones(rng.choice([0, 1, P - 1, P + 1, 3 * P])), **good),        # wrong size
        lambda: [header_for(cfg, 3, dtype=rng.choice([0, 2, 9]), n_values=P, **good).pack(),
                 np.ones(P, np.float32).tobytes()],                                                # wrong dtype
        lambda: [header_for(cfg, 3, dtype=FLOAT32, n_values=P // 2, **good).pack(),
                 np.ones(P // 2, np.float64).tobytes()],                                           # float64 bytes
        lambda: push_frames(cfg, np.where(np.arange(P) == rng.randrange(P), rng.choice([np.nan, np.inf, -np.inf]),
                                          1.0), **good),
        lambda: push_frames(cfg, np.ones(P), **dict(good, loss=float("nan"))),
        lambda: push_frames(cfg, np.ones(P), **dict(good, accuracy=2.0)),
        lambda: push_frames(cfg, np.ones(P), **dict(good, step=0)),                                 # bad step
        lambda: push_frames(cfg, np.ones(P), **dict(good, wversion=10**6)),                         # future base
        lambda: push_frames(cfg, np.ones(P), worker_id=0, attempt=0, step=5),                       # superseded
        lambda: push_frames(cfg, np.ones(P), worker_id=rng.choice([1, 2, -1, 99]), attempt=0, step=1),  # unknown
        lambda: push_frames(cfg, np.ones(P), **dict(good, step=-3)),
        lambda: push_frames(cfg, np.ones(P), **dict(good, flags=8)),                                # wrong mode
        lambda: push_frames(cfg, np.ones(P), **dict(good, step=rng.choice([18, 50, 10**9]))),       # step gap
        lambda: push_frames(cfg, np.ones(P), **dict(good, session=rng.getrandbits(64))),            # not its session
        lambda: [header_for(cfg, 7, **good).pack()],                                               # STOP
        lambda: [header_for(cfg, 1, worker_id=rng.choice([5, 99, -7])).pack()],                    # hello, bad id
        lambda: [header_for(cfg, 1, worker_id=0, attempt=0).pack()],                               # superseded hello
        lambda: [header_for(cfg, 2, worker_id=0, attempt=7).pack()],                      # unregistered attempt
        lambda: [header_for(cfg, 4, flags=FLAG_JSON, **good).pack(),                               # barrier report:
                 rng.choice([b"{not json", b"\xff\xfe", b"[1, 2]", b"3", b"[" * 5000 + b"]" * 5000,   # not an object,
                             b'{"a": "' + b"x" * (MAX_JSON_BYTES + 1) + b'"}'])],                   # deep, too big
        lambda: [header_for(cfg, 4, **good).pack(), b'{"rows": 1}'],                               # JSON without flag
        lambda: [header_for(cfg, 4, flags=FLAG_JSON, **good).pack(), b"{}", b"{}"],                # 2 payloads
    ]
    return [rng.choice(wrong)() for _ in range(n)]


@pytest.mark.timeout(120)
def test_fuzz_authenticated_and_stranger():
    P = 64
    w0 = np.random.default_rng(3).standard_normal(P).astype(np.float32)
    with server(w0, mode="async", optimizer="momentum", num_workers=3) as s:
        cfg = s.client_config()
        c = ParameterClient(cfg, worker_id=0, attempt=1, timeout=5)      # registered: attempt 1 owns worker 0
        c.push(np.ones(P, np.float32))                                   # step 1 applied: later step 1 = duplicate
        before_w, before = s.weights(), s.stats()
        velocity = s.engine.optimizer.state["velocity"].copy()
        ctx, sock = raw_socket(cfg)
        n = 10_000
        statuses = {}
        for frames in _fuzz_messages(cfg, random.Random(0), n, P, session=c.session):
            h, _ = request(sock, frames)
            assert h.status != Status.OK, frames[0][:40]
            statuses[Reason(h.code).name] = statuses.get(Reason(h.code).name, 0) + 1
        after = s.stats()
        assert after["received"] - before["received"] == n
        assert after["rejected_total"] - before["rejected_total"] == n
        assert after["applied"] == before["applied"] and after["version"] == before["version"]
        assert np.array_equal(s.weights(), before_w) and s.weights().tobytes() == before_w.tobytes()
        assert np.array_equal(s.engine.optimizer.state["velocity"], velocity)
        assert len(statuses) >= 12, statuses
        # the server still serves the legitimate worker
        assert c.pull()[0] == 1
        c.close()
        sock.close()
        ctx.term()

        for keys in ("none", "random"):                                  # strangers never reach the server
            ctx, sock = raw_socket(cfg, keys=keys)
            base = s.stats()
            sent = 0
            for frames in _fuzz_messages(cfg, random.Random(1), n, P):
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass
            assert not sock.poll(1000), "a stranger got a reply"
            st = s.stats()
            assert st["received"] == base["received"] and st["version"] == base["version"]
            assert s.weights().tobytes() == before_w.tobytes()
            sock.close()
            ctx.term()
        assert s.stats()["zap_denied"] >= 1                              # the random-key stranger was refused


@pytest.mark.timeout(60)
def test_client_without_job_keys_cannot_pull_or_push():
    """A plain client waits out its tries; a client with other CURVE keys is told at the refused handshake
    (it waited out every try of every request too: 5 x the timeout for a HELLO)."""
    from ps import AuthenticationRefused

    with server(np.ones(16, np.float32)) as s:
        cfg = s.client_config()
        foreign = {**cfg, **dict(zip(("client_public", "client_secret"), zmq.curve_keypair()))}
        with pytest.raises(AuthenticationRefused, match=r"refused this client's CURVE keys \(ZAP status 400\) at "
                                                        r"HELLO: the client config is another job's"):
            ParameterClient(foreign, worker_id=0, timeout=5, retries=2)
        assert s.stats()["zap_denied"] >= 1
        for bad, said in (({**cfg, "secure": False}, "no reply from the parameter server .* {op} after {n} tries"),
                          (foreign, "refused this client's CURVE keys .* at {op}")):
            with pytest.raises(ServerUnavailable, match=said.format(op="HELLO", n=2)):
                ParameterClient(bad, worker_id=0, timeout=0.5, retries=1)
            c = ParameterClient(bad, worker_id=0, timeout=0.3, retries=0, register=False)
            with pytest.raises(ServerUnavailable, match=said.format(op="PULL", n=1)):
                c.pull()
            with pytest.raises(ServerUnavailable, match=said.format(op="PUSH", n=1)):
                c.push(np.ones(16, np.float32))
            c.close()
        assert s.stats()["received"] == 0 and s.stats()["applied"] == 0


@pytest.mark.timeout(30)
def test_server_gone_gives_clear_error():
    s = server()
    c = ParameterClient(s.client_config(), worker_id=0, timeout=0.3, retries=2)
    s.stop()
    with pytest.raises(ServerUnavailable, match="PULL after 3 tries of 0.3s"):
        c.pull()
    c.close()


@pytest.mark.timeout(30)
def test_a_send_that_blocks_counts_within_its_try():
    """The give-up is timeout x (retries + 1), as documented, also when the queue to the server is full (a host
    whose handshake never comes: here a TCP listener that never speaks, and a queue of one message). A send
    that blocked for a whole timeout before its try's wait began made 4 tries of 0.5 s take 3.5 s."""
    import socket

    deaf = socket.socket()
    deaf.bind(("127.0.0.1", 0))
    deaf.listen(4)
    s = server()
    cfg = {**s.client_config(), "address": f"tcp://127.0.0.1:{deaf.getsockname()[1]}"}
    s.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable, match="HELLO after 4 tries of 0.5s"):
            ParameterClient(cfg, worker_id=0, timeout=0.5, retries=3, hwm=1)
        waited = time.monotonic() - t0
    finally:
        deaf.close()
    assert waited < 4 * 0.5 + 0.75, f"4 tries of 0.5 s took {waited:.2f} s"


@pytest.mark.timeout(30)
def test_an_address_nobody_listens_at_is_said_without_waiting_out_the_tries():
    """A wrong port (psPort, or a server that stopped before the worker came) refuses every connect: that is
    said at once, not after 3 tries of 20 s, the wait of an unanswered request (which this test would exceed)."""
    s = server()
    cfg = s.client_config()
    s.stop()
    said = (rf"to HELLO: nothing accepts connections at {cfg['address']}: \d+ connects failed \(refused or "
            r"unreachable\) in [\d.]+s; no server listens there")
    with pytest.raises(ServerUnavailable, match=said):
        ParameterClient(cfg, worker_id=0, timeout=20, retries=2)


@pytest.mark.timeout(30)
def test_staleness_bound_stale_reply_then_pull_and_retry():
    with server(mode="async", staleness=0, learning_rate=1.0) as s:
        cfg = s.client_config()
        a, b = ParameterClient(cfg, worker_id=0), ParameterClient(cfg, worker_id=1)
        a.pull(), b.pull()
        a.push(np.ones(16, np.float32))
        with pytest.raises(StaleUpdate, match="1 updates old"):
            b.push(np.ones(16, np.float32))                 # computed on version 0, server at 1, bound 0
        assert b.step == 0
        b.pull()
        assert b.push(np.ones(16, np.float32)).step == 1
        st = s.stats()
        assert st["rejected"] == {"stale": 1} and st["applied"] == 2
        np.testing.assert_array_equal(s.weights(), -2 * np.ones(16))
        a.close(), b.close()


@pytest.mark.timeout(30)
def test_sync_dead_worker_gives_clear_error_within_timeout():
    with server(mode="sync", num_workers=2, barrier_timeout=1.0) as s:
        cfg = s.client_config()
        a = ParameterClient(cfg, worker_id=0, timeout=2)
        ParameterClient(cfg, worker_id=1).close()           # registers, then "dies" before pushing
        # the server's round deadline (1 s) answers, not the client's own timeout (2 s: ServerUnavailable)
        with pytest.raises(PSError, match=r"BARRIER_TIMEOUT.*workers \[1\]") as e:
            a.push(np.ones(16, np.float32))
        assert e.value.reason == Reason.BARRIER_TIMEOUT
        np.testing.assert_array_equal(s.weights(), np.zeros(16))
        a.close()


@pytest.mark.timeout(30)
def test_gather_barrier_exchanges_reports_by_worker_id():
    with server(mode="async", num_workers=3) as s:
        cfg = s.client_config()
        clients = [ParameterClient(cfg, worker_id=w, timeout=10) for w in range(3)]
        got = {}

        def gather(w):
            got[w] = clients[w].gather(-1, {"rows": 10 * w, "worker": w, "nested": {"ok": [w]}})
        run_threads([lambda w=w: gather(w) for w in (2, 0, 1)], timeout=20)
        expected = [{"rows": 10 * w, "worker": w, "nested": {"ok": [w]}} for w in range(3)]
        assert got == {0: expected, 1: expected, 2: expected}
        assert s.stats()["version"] == 0 and s.weights().tobytes() == np.zeros(16, np.float32).tobytes()
        for c in clients:
            c.close()


@pytest.mark.timeout(30)
def test_restarted_worker_resumes_without_double_apply():
    with server(mode="async", learning_rate=1.0) as s:
        cfg = s.client_config()
        c0 = ParameterClient(cfg, worker_id=0, attempt=0)
        for _ in range(5):
            c0.push(np.ones(16, np.float32))
        c1 = ParameterClient(cfg, worker_id=0, attempt=1)  # a retried task
        assert c1.step == 5                                 # resumes after the last applied step
        with pytest.raises(PSError) as e:
            c0.push(np.ones(16, np.float32))                # the old attempt is fenced off
        assert e.value.reason == Reason.SUPERSEDED_ATTEMPT
        r = c1.push(np.ones(16, np.float32), step=5)        # replaying step 5: acknowledged, not applied
        assert r.duplicate and r.step == 5
        assert c1.push(np.ones(16, np.float32)).step == 6
        st = s.stats()["workers"]["0"]
        assert st["applied"] == st["last_step"] == 6 and st["attempt"] == 1
        np.testing.assert_array_equal(s.weights(), -6 * np.ones(16))
        c0.close(), c1.close()


def _sync_run(cfg, steps, first_step=1, attempt=0):
    """Two sync workers whose gradients depend on the weights: g_i = 0.1 w + (i + 1) * step."""
    def worker(i):
        with ParameterClient(cfg, worker_id=i, attempt=attempt, timeout=10) as c:
            assert c.step == first_step - 1
            _, w = c.pull()
            for k in range(first_step, steps + 1):
                g = (0.1 * w + (i + 1) * k).astype(np.float32)
                w = c.push(g, batch_size=4, want_weights=True).weights
    run_threads([lambda i=i: worker(i) for i in range(2)])


@pytest.mark.timeout(60)
def test_checkpoint_resume_equals_uninterrupted_sync_run(tmp_path):
    w0 = np.linspace(-1, 1, 16, dtype=np.float32)
    opts = dict(mode="sync", num_workers=2, optimizer="momentum", learning_rate=0.05, layers=[3, 4])
    with server(w0, **opts) as s:
        _sync_run(s.client_config(), 20)
        want = s.weights()
    d = str(tmp_path / "ckpt")
    with server(w0, checkpoint_dir=d, checkpoint_every=10, checkpoint_on_stop=False, **opts) as s:
        _sync_run(s.client_config(), 13)                   # "crash" after step 13: last checkpoint at 10
    arrays, meta = ckpt.load(ckpt.latest(d))
    assert meta["version"] == 10 and meta["workers"]["1"]["last_step"] == 10 and "opt_velocity" in arrays
    with server(w0, checkpoint_dir=d, resume=True, **opts) as s:
        assert s.version == 10
        _sync_run(s.client_config(), 20, first_step=11, attempt=1)
        np.testing.assert_allclose(s.weights(), want, rtol=1e-6, atol=1e-6)
        assert s.stats()["workers"]["0"]["applied"] == 20


def test_checkpoint_files_are_atomic_and_pickle_free(tmp_path):
    d = str(tmp_path)
    for v in range(5):
        ckpt.save(d, {"weights": np.full(4, v, np.float32)}, {"version": v, "mode": "async"}, keep=2)
    names = sorted(os.listdir(d))
    assert names == ["ckpt-000000000003.npz", "ckpt-000000000004.npz"]      # no temp files left behind
    arrays, meta = ckpt.load(ckpt.latest(d))
    assert meta["version"] == 4 and arrays["weights"][0] == 4
    (tmp_path / "ckpt-000000000009.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable ffps checkpoint"):
        ckpt.load(ckpt.latest(d))


@pytest.mark.timeout(60)
def test_ssp_conformance_with_random_delays():
    """Worker i pushes -e_i (lr 1), so pulled w[j] is worker j's clock: every read at clock c must see
    every other worker at clock >= c - s."""
    p, slack, clocks = 4, 2, 25
    with server(np.zeros(p, np.float32), mode="async", num_workers=p, learning_rate=1.0, ssp_slack=slack,
                barrier_timeout=20) as s:
        cfg = s.client_config()
        seen = []

        def worker(i):
            rng = random.Random(i)
            e = np.zeros(p, np.float32)
            e[i] = -1.0
            with ParameterClient(cfg, worker_id=i, timeout=10) as c:
                for clock in range(clocks):
                    _, w = c.pull(clock=clock)
                    seen.append((i, clock, w.copy()))
                    time.sleep(rng.uniform(0, 0.01) * (1 + 3 * (i == 0)))   # worker 0 is slow
                    c.push(e)
                c.bye()
        run_threads([lambda i=i: worker(i) for i in range(p)])
        assert len(seen) == p * clocks
        for i, clock, w in seen:
            others = np.delete(w, i)
            assert (others >= clock - slack).all(), (i, clock, w)
        fast_lead = max(w[i] - np.delete(w, i).min() for i, _, w in seen)
        assert fast_lead <= slack + 1


def test_stop_from_several_threads_at_once(tmp_path):
    """One stop does the work (and the final checkpoint, once); the others wait for it: none fails on a
    half-stopped server (3 of 4 got AttributeError on _thread before)."""
    s = server(checkpoint_dir=str(tmp_path), num_workers=1, learning_rate=1.0)
    with ParameterClient(s.client_config(), worker_id=0) as c:
        c.push(np.ones(s.engine.num_params, np.float32))
    start, errors = threading.Barrier(4), []

    def stop():
        start.wait(10)
        try:
            s.stop()
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            errors.append(repr(exc))
    threads = [threading.Thread(target=stop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and not s.running
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["ckpt-000000000001.npz"]
    assert s.stats()["checkpoint"]["written"] == 1


def test_stop_answers_every_waiting_request_server_stopping():
    """A sync round, a barrier and an SSP-held pull each wait on a worker that never comes: stop() answers
    them SERVER_STOPPING at once instead of leaving their clients to time out."""
    got = {}

    def wait_for(name, cfg, wid, call):
        with ParameterClient(cfg, worker_id=wid, timeout=20, retries=0) as c:
            try:
                call(c)
                got[name] = "answered"
            except PSError as exc:
                got[name] = exc.reason

    sync = server(mode="sync", num_workers=2, barrier_timeout=60)
    bar = server(mode="async", num_workers=2, barrier_timeout=60)
    ssp = server(mode="async", num_workers=2, ssp_slack=0, barrier_timeout=60)
    with ParameterClient(ssp.client_config(), worker_id=1, timeout=5) as slow:
        slow.pull()                                     # registered at clock 0; worker 0 runs ahead below
        threads = [threading.Thread(target=wait_for, args=a, daemon=True) for a in (
            ("round", sync.client_config(), 0, lambda c: c.push(np.ones(16, np.float32), batch_size=1)),
            ("barrier", bar.client_config(), 0, lambda c: c.barrier(5)),
            ("ssp", ssp.client_config(), 0, lambda c: (c.push(np.ones(16, np.float32), batch_size=1),
                                                      c.pull())))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (sync.engine.round and bar.engine.barrier
                                                   and ssp.engine.waiting_pulls):
            time.sleep(0.02)
        for s in (sync, bar, ssp):
            s.stop()
        for t in threads:
            t.join(10)
    assert got == {"round": Reason.SERVER_STOPPING, "barrier": Reason.SERVER_STOPPING,
                   "ssp": Reason.SERVER_STOPPING}


# -------------------------------------------------------------------------------- transport settings
def test_queue_depth_holds_about_a_mebibyte_of_the_models_messages():
    from ps.protocol import QUEUE_BYTES, queue_depth

    digits = 64 * 100 + 100 + 100 * 10 + 10
    assert queue_depth(digits) == QUEUE_BYTES // (4 * digits + HEADER.size) == 34
    assert queue_depth(16) == 1000 and queue_depth(10_000_000) == 8 == queue_depth(269_322)
    depths = [queue_depth(n) for n in (1, 100, 7510, 100_000, 1_000_000)]
    assert depths == sorted(depths, reverse=True)
    w = np.zeros(digits, np.float32)
    with server(w, secure=False) as s, ParameterClient(s.client_config(), worker_id=0, timeout=5) as c:
        assert s.hwm == 34
        assert c.sock.getsockopt(zmq.RCVHWM) == c.sock.getsockopt(zmq.SNDHWM) == 34
        for _ in range(3 * 34):          # past several half-depths: the reader's go-on commands are sent
            r = c.push(np.full(digits, 1e-3, np.float32), want_weights=True)
        assert r.version == 3 * 34 and s.stats()["dropped_replies"] == 0
    with server(np.zeros(16, np.float32), hwm=3, secure=False) as s:
        assert s.hwm == 3


def test_the_connection_guard_watches_on_its_own_thread_and_stops_with_the_server():
    """The serving thread waits on its socket alone; connections are counted while no request comes."""
    import socket

    s = server(secure=False)
    guards = [t for t in threading.enumerate() if t.name == "ps-connection-guard"]
    assert len(guards) == 1 and guards[0].is_alive()
    with socket.create_connection(("127.0.0.1", port_of(s.address)), timeout=5):
        deadline = time.monotonic() + 10
        while s.stats()["connections"]["accepted"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.stats()["connections"]["accepted"] == 1 and s.stats()["received"] == 0
    s.stop()
    guards[0].join(5)
    assert not guards[0].is_alive()


@pytest.mark.timeout(30)
def test_a_reply_later_than_the_receive_wait_still_arrives():
    """The client's receive waits RESEND_CHECK_S at a time: a reply that takes several of those (an SSP read
    held for a slower worker) is still taken, within the request's own timeout."""
    with server(np.zeros(16, np.float32), num_workers=2, mode="async", ssp_slack=0, secure=False,
                barrier_timeout=20) as s:
        cfg = s.client_config()
        with ParameterClient(cfg, worker_id=0, timeout=5) as a, ParameterClient(cfg, worker_id=1, timeout=5) as b:
            a.push(np.ones(16, np.float32))
            out = {}
            t = threading.Thread(target=lambda: out.setdefault("pull", a.pull(clock=1)))
            t.start()
            time.sleep(3 * ParameterClient.RESEND_CHECK_S)
            assert "pull" not in out                   # held: worker 1 is a step behind
            b.push(np.ones(16, np.float32))
            t.join(10)
            assert out["pull"][0] == 2


def test_the_connection_guard_never_shuts_a_reused_descriptor_for_its_old_connection():
    """Cap 1, fd 3 open. fd 5 is accepted over the cap, closed, and reused by a newer connection, all before
    the guard reads: only the newest connection on fd 5 is refused (shut once); a connection whose own
    DISCONNECTED follows in the batch is only counted."""
    from ps.security import ConnectionGuard

    A, D = zmq.EVENT_ACCEPTED, zmq.EVENT_DISCONNECTED
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        guard = ConnectionGuard(sock, limit=1)
        assert guard.account([(A, 3)]) == [] and guard.open == {3}
        assert guard.account([(A, 5), (D, 5), (A, 5)]) == [5]
        assert guard.account([(A, 7), (D, 7)]) == []                 # refused and gone: nothing to shut
        assert guard.account([(D, 3), (A, 5), (A, 9), (D, 9)]) == []   # 3 left: 5 fits, 9 was refused and left
        assert guard.open == {5}
        assert guard.stats() == {"open": 1, "peak": 1, "accepted": 2, "refused": 4, "limit": 1}
        guard.close()
    finally:
        sock.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("w,says", [(np.float32(1.0), r"shape \(\)"), (np.zeros((2, 3), np.float32), r"shape \(2, 3\)"),
                                    (np.zeros(0, np.float32), r"shape \(0,\)"),
                                    (np.array([1.0, np.nan, np.inf], np.float32), r"2 value\(s\) NaN/inf"),
                                    # finite in float64, inf once the server stores it as float32
                                    (np.array([1e40, 0.0, 1.0]), r"1 value\(s\) beyond float32's range \(.*1e\+40\)"),
                                    (np.array(["1", "2"]), None)])
def test_bad_initial_weights_are_refused_by_name_before_anything_starts(w, says):
    before = {t.name for t in threading.enumerate()}
    expected = f"initial weights must be a finite non-empty 1-D vector.*, got .*{says}" if says else \
        "initial weights must be real numbers, got dtype <U1"
    with pytest.raises(ValueError, match=expected):
        ParameterServer(w, secure=False, progress=False)
    assert {t.name for t in threading.enumerate()} == before
