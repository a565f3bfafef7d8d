"""The server's open doors closed, over real sockets: memory before authentication, idle connections,
impersonation, remote STOP, overflowing updates, all-interfaces binds."""
import json
import math
import os
import pickle
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ps import ParameterClient, ParameterServer, PSError, Reason, Status, UpdateRejected
from ps.protocol import Op
try:
    from tests.ps_helpers import (ReplyCutter, curve_greeting, header_for, port_of, push_frames, raw_socket,
                                  request, rss_mb, server)
except ImportError:  # pytest run without the repository root on sys.path
    from ps_helpers import (ReplyCutter, curve_greeting, header_for, port_of, push_frames, raw_socket, request,
                            rss_mb, server)

pytestmark = pytest.mark.timeout(120)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------------------- memory before the handshake
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_a_keyless_peer_claiming_a_1_gib_frame_costs_the_server_no_memory():
    """A ZMTP greeting naming CURVE, a frame header announcing 1 GiB, then 256 MiB of zeros: the server drops
    the peer at the header (MAXMSGSIZE) instead of buffering the frame (it grew by 256 MB before)."""
    with server(np.zeros(1000, np.float32), secure=True) as s:
        before = rss_mb()
        attacker = socket.create_connection(("127.0.0.1", port_of(s.address)), timeout=5)
        sent = 0
        try:
            attacker.sendall(curve_greeting() + b"\x06" + (1 << 30).to_bytes(8, "big"))
            chunk = b"\0" * (1 << 20)
            for _ in range(256):
                attacker.sendall(chunk)
                sent += 1
        except OSError:
            pass                                   # the server hung up: the point
        finally:
            attacker.close()
        time.sleep(0.3)
        grown = rss_mb() - before
        assert grown < 64, f"server grew by {grown:.0f} MB after {sent} MiB of a claimed 1 GiB frame"
        with ParameterClient(s.client_config(), worker_id=0, timeout=5) as c:   # and still serves workers
            assert c.pull()[0] == 0


def test_a_key_holder_sending_an_oversized_frame_is_dropped_unanswered():
    with server(np.zeros(1000, np.float32), secure=True) as s:
        cfg = s.client_config()
        with ParameterClient(cfg, worker_id=0, timeout=5) as c:
            ctx, sock = raw_socket(cfg)
            before = rss_mb()
            sock.send_multipart([header_for(cfg, Op.PUSH, worker_id=0, step=1, dtype=1, n_values=1000,
                                            session=c.session).pack(), np.zeros(32 << 20, np.float32)])
            assert not sock.poll(2000), "an oversized frame must not be answered"
            assert rss_mb() - before < 64 + 128           # the sender's own 128 MB frame, nothing of the server's
            sock.close()
            ctx.term()
            assert s.version == 0 and c.push(np.ones(1000, np.float32)).step == 1


# -------------------------------------------------------------------------------- idle connections
def _serve_in_subprocess(tmp_path, *args):
    out = str(tmp_path / "cfg.pkl")
    proc = subprocess.Popen([sys.executable, "-m", "tests.ps_helpers", "serve", out, *args], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not os.path.exists(out):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server process did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    with open(out, "rb") as f:
        return proc, pickle.load(f), out


def _stop_subprocess(proc, out):
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()[-2000:]
    with open(out + ".stats") as f:
        return json.load(f)


@pytest.mark.parametrize("nofile,extra", [("1024", []), ("1024,1024", ["--handshake", "4",
                                                                       "--max-connections", "300"])],
                         ids=["soft-limit-1024", "hard-limit-1024"])
def test_idle_connections_do_not_lock_out_a_new_worker(tmp_path, nofile, extra):
    """1,100 silent TCP connections to a server started with 1,024 open files: a new worker registers within
    its timeout. Soft limit: the server raises it. Hard limit too: it caps its connections below the limit
    and drops peers that never finish their handshake (after 4 s here), so the worker gets in then."""
    proc, cfg, out = _serve_in_subprocess(tmp_path, "--nofile", nofile, *extra)
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", port_of(cfg["address"])), timeout=5))
        with ParameterClient(cfg, worker_id=0, timeout=15.0, retries=0) as c:
            assert c.pull()[0] == 0
    finally:
        for sk in idle:
            sk.close()
        stats = _stop_subprocess(proc, out)
    if extra:
        conn = stats["connections"]
        assert conn["limit"] == 300 and conn["peak"] <= 300 and conn["refused"] > 0, conn


# -------------------------------------------------------------------------------- requests lost with a connection
def test_a_hello_whose_reply_died_with_its_connection_is_sent_again_and_registers_the_same_client():
    """The server registers the HELLO, then the connection drops before the reply gets through. The client
    sends the HELLO again on the re-made connection at once (it waited out its whole try before) and the
    server knows it for the same client (before, the second try was refused as DUPLICATE_WORKER)."""
    with server(secure=True, learning_rate=1.0) as s:
        with ReplyCutter(s.address, cut=lambda: "0" in s.stats()["workers"]) as relay:
            cfg = dict(s.client_config(), address=relay.address)
            with ParameterClient(cfg, worker_id=0, timeout=5.0, retries=1) as c:
                assert relay.cuts == 1
                assert c.session == s.engine.workers[0].session
                assert c.push(np.ones(16, np.float32)).step == 1
            np.testing.assert_array_equal(s.weights(), -np.ones(16))


def test_a_push_whose_reply_died_with_its_connection_is_applied_once():
    """The reply to step 1 is lost with its connection: the client sends step 1 again on the new one, the
    server answers DUPLICATE, and the client takes that as its step (no second application, no error)."""
    with server(secure=True, learning_rate=1.0) as s:
        with ReplyCutter(s.address, cut=lambda: s.version >= 1) as relay:
            cfg = dict(s.client_config(), address=relay.address)
            with ParameterClient(cfg, worker_id=0, timeout=5.0, retries=0) as c:
                r = c.push(np.ones(16, np.float32))
                assert relay.cuts == 1 and r.step == 1 and c.step == 1
                assert c.push(np.ones(16, np.float32)).step == 2
            assert s.version == 2
            np.testing.assert_array_equal(s.weights(), -2 * np.ones(16))


# -------------------------------------------------------------------------------- impersonation, steps, STOP
def test_no_other_client_can_push_or_pull_as_a_registered_worker():
    with server(learning_rate=1.0) as s:
        cfg = s.client_config()
        with ParameterClient(cfg, worker_id=0, timeout=5) as real:
            with pytest.raises(PSError) as err:
                ParameterClient(cfg, worker_id=0, timeout=5)         # HELLO as the same (worker, attempt)
            assert err.value.reason == Reason.DUPLICATE_WORKER
            ctx, sock = raw_socket(cfg)                             # the job's keys, but not the session
            for frames in (push_frames(cfg, np.ones(16), worker_id=0, step=1),
                           [header_for(cfg, Op.PULL, worker_id=0).pack()]):
                h, _ = request(sock, frames)
                assert (h.status, h.code) == (Status.ERROR, Reason.FOREIGN_SESSION)
            sock.close()
            ctx.term()
            assert s.version == 0
            assert real.push(np.ones(16, np.float32)).step == 1     # the real worker's step 1 is applied
            np.testing.assert_array_equal(s.weights(), -np.ones(16))


def test_a_client_never_takes_a_duplicate_of_its_own_unsent_step_as_success():
    """If another client got hold of the session and pushed step 2 first, the real worker's step 2 is an
    error, not a silent 'already applied'."""
    with server(learning_rate=1.0) as s:
        cfg = s.client_config()
        with ParameterClient(cfg, worker_id=0, timeout=5) as real:
            real.push(np.ones(16, np.float32))
            thief = ParameterClient(cfg, worker_id=0, timeout=5, register=False)
            thief.session, thief.version = real.session, 1
            assert thief.push(np.full(16, 5, np.float32), step=2).step == 2
            with pytest.raises(PSError, match="taken before this client sent it") as err:
                real.push(np.ones(16, np.float32))
            assert err.value.reason == Reason.DUPLICATE_STEP
            thief.close()


def test_no_client_stops_the_server():
    with server() as s:
        cfg = s.client_config()
        with ParameterClient(cfg, worker_id=0, timeout=5) as c:
            ctx, sock = raw_socket(cfg)
            for kw in (dict(worker_id=0, session=c.session), dict(worker_id=-5)):
                h, payload = request(sock, [header_for(cfg, Op.STOP, **kw).pack()])
                assert (h.status, h.code) == (Status.ERROR, Reason.FORBIDDEN) and b"server.stop()" in payload
            sock.close()
            ctx.term()
            time.sleep(0.2)
            assert s.running and c.pull()[0] == 0


def test_an_overflowing_update_is_rolled_back_and_training_goes_on():
    with server(learning_rate=0.5) as s:
        with ParameterClient(s.client_config(), worker_id=0, timeout=5) as c:
            huge = np.full(16, 3e38, np.float32)
            c.push(huge), c.push(huge)
            with pytest.raises(UpdateRejected, match="rolled back"):
                c.push(huge)
            np.testing.assert_array_equal(s.weights(), np.full(16, -3e38, np.float32))
            assert c.push(np.ones(16, np.float32)).step == 4
            st = s.stats()
            assert st["non_finite_updates"] == 1 and st["rejected"]["non_finite_update"] == 1
            assert np.isfinite(s.weights()).all() and st["version"] == 3


# -------------------------------------------------------------------------------- all-interfaces binds
def test_an_all_interfaces_bind_advertises_a_routable_address(monkeypatch, caplog):
    import logging

    from ps import server as server_module

    assert server_module._bind_url("tcp://0.0.0.0:0") == "tcp://0.0.0.0:*"       # ZeroMQ's "any free port"
    # A test listens on loopback only: the socket's bind is moved there; everything else runs as for 0.0.0.0
    binds = []
    monkeypatch.setattr(server_module, "_bind_url",
                        lambda url: binds.append(url) or "tcp://127.0.0.1:*")
    with caplog.at_level(logging.WARNING, logger="ps.server"):
        with server(bind="tcp://0.0.0.0:0", advertise_host="127.0.0.1") as s:
            assert binds == ["tcp://0.0.0.0:0"]
            assert s.address.startswith("tcp://127.0.0.1:") and port_of(s.address) > 0
            with ParameterClient(s.client_config(), worker_id=0, timeout=5) as c:
                assert c.pull()[0] == 0
    assert any("binds all interfaces (tcp://0.0.0.0:0) as asked; workers connect to 127.0.0.1" in r.message
               for r in caplog.records)
    monkeypatch.undo()
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "192.0.2.7")   # TEST-NET: never contacted
    s = ParameterServer(np.zeros(4, np.float32), bind="tcp://0.0.0.0:0", progress=False)
    assert s.advertise_host == "192.0.2.7"
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "127.0.1.1")
    with pytest.raises(ValueError, match=r"binds all interfaces \(tcp://0.0.0.0:0\).*loopback address "
                                         r"127.0.1.1.*advertise_host"):
        ParameterServer(np.zeros(4, np.float32), bind="tcp://0.0.0.0:0")


# -------------------------------------------------------------------------------- CURVE at libsodium speed
def test_a_secure_server_warns_once_when_curve_is_slow(monkeypatch, caplog):
    import logging

    from ps import security

    plain, curve = security.curve_round_trips()                       # this process's pyzmq, measured
    assert all(math.isfinite(t) and t > 0 for t in (plain, curve)), (plain, curve)   # times, not their order
    monkeypatch.setattr(security, "curve_round_trips", lambda: (0.7e-3, 45e-3))   # a pre-27.3 wheel's figures
    monkeypatch.setattr(security, "_curve_said", [])
    monkeypatch.setattr(security.zmq, "__version__", "27.1.0")
    with caplog.at_level(logging.WARNING, logger="ps.server"):
        for secure in (True, True, False):                             # said once; nothing to say without CURVE
            with server(secure=secure):
                pass
    slow = [r.message for r in caplog.records if "CURVE is slow" in r.message]
    assert len(slow) == 1 and "64x" in slow[0] and "pip install 'pyzmq>=27.3'" in slow[0]
    # the same figures with a recent pyzmq: not advice to install what is installed
    monkeypatch.setattr(security.zmq, "__version__", "27.3.0")
    recent = security.curve_speed_problem()
    assert "built without libsodium" in recent and "pyzmq>=27.3" not in recent
    monkeypatch.setattr(security, "curve_round_trips", lambda: (0.7e-3, 4e-3))    # 27.3's
    assert security.curve_speed_problem() is None


def test_a_slow_curve_measurement_is_taken_again_before_it_is_believed(monkeypatch):
    """A busy machine made a fast CURVE measure 34x now and then: a ratio above the bar is measured again (up to
    three rounds), the lowest kept; a slow fallback is slow every round."""
    from ps import security

    measured = iter([(1e-3, 34e-3), (1e-3, 5e-3), (1e-3, 40e-3)])
    monkeypatch.setattr(security, "_curve_round_trips_once", lambda nbytes, reps: next(measured))
    assert security.curve_round_trips.__wrapped__() == (1e-3, 5e-3)            # stopped at the fast round
    assert next(measured) == (1e-3, 40e-3)
    rounds = []
    monkeypatch.setattr(security, "_curve_round_trips_once", lambda nbytes, reps: rounds.append(1) or
                        (1e-3, 40e-3 + len(rounds) * 1e-3))
    assert security.curve_round_trips.__wrapped__() == (1e-3, 41e-3) and len(rounds) == 3


def test_curve_connections_spread_over_io_threads_and_all_are_served(monkeypatch):
    """With more than one I/O thread (a 16-core driver gets 4), concurrent CURVE clients are each served."""
    import threading

    import zmq

    from ps import server as server_mod

    monkeypatch.setattr(server_mod.os, "cpu_count", lambda: 16)
    assert server_mod.io_threads_for() == 4 and server_mod.io_threads_for(sharded=True) == 1
    n = 4096
    with ParameterServer(np.zeros(n, np.float32), mode="async", learning_rate=1.0, num_workers=6,
                         progress=False) as s:
        assert s.ctx.get(zmq.IO_THREADS) == 4
        cfg, errors = s.client_config(), []

        def work(wid):
            try:
                with ParameterClient(cfg, worker_id=wid, timeout=20) as c:
                    for _ in range(25):
                        c.push(np.full(n, 1e-3, np.float32), batch_size=1)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads)
        assert s.stats()["applied"] == 150
        np.testing.assert_allclose(s.weights(), np.full(n, -0.15, np.float32), rtol=1e-5)
