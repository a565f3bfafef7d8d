"""Shared helpers for the ps tests (not a conftest: plain functions imported by test modules)."""
from __future__ import annotations

import select
import socket
import threading

import numpy as np
import zmq

from ps import ParameterClient, ParameterServer
from ps.engine import Engine
from ps.protocol import FLOAT32, Header, Op, ProtocolError, unpack_header


def server(w=None, **kw) -> ParameterServer:
    """A started server of ``w`` (default 16 zeros), no progress line; ``kw`` as ParameterServer takes them."""
    kw.setdefault("progress", False)
    return ParameterServer(np.zeros(16, np.float32) if w is None else w, **kw).start()


class SessionEngine(Engine):
    """The engine as these tests drive it: a request whose header carries session 0 (the messages built
    below) gets the session its (worker, attempt) registered with, as the real client sends it. A test of
    foreign sessions sets one explicitly."""

    def handle(self, token, frames, now=None):
        try:
            h = unpack_header(frames[0])
        except ProtocolError:
            return super().handle(token, frames, now)
        info = self.workers.get(h.worker_id)
        if h.session == 0 and h.op != Op.HELLO and info is not None and info.attempt == h.attempt:
            frames = [h.replace(session=info.session or 0).pack()] + list(frames[1:])
        return super().handle(token, frames, now)


def raw_socket(cfg, keys="job"):
    """A DEALER connected to cfg's server. keys: 'job' (the job's client keys), 'none', or 'random'."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 1000)
    if keys == "job" and cfg.get("secure"):
        s.curve_serverkey = cfg["server_public"]
        s.curve_publickey, s.curve_secretkey = cfg["client_public"], cfg["client_secret"]
    elif keys == "random":
        pub, sec = zmq.curve_keypair()
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = cfg["server_public"], pub, sec
    s.connect(cfg["address"])
    return ctx, s


def header_for(cfg, op, **kw) -> Header:
    return Header(op=int(op), job_id=bytes.fromhex(cfg["job_id"]), fingerprint=cfg["fingerprint"], **kw)


def request(sock, frames, timeout=5.0):
    """Send frames, wait for one reply -> (Header, payload bytes or None). Raises TimeoutError."""
    sock.send_multipart(frames)
    if not sock.poll(int(timeout * 1000)):
        raise TimeoutError("no reply")
    reply = sock.recv_multipart()
    return unpack_header(reply[0]), (reply[1] if len(reply) > 1 else None)


def push_frames(cfg, grad, **kw):
    h = header_for(cfg, 3, dtype=FLOAT32, n_values=grad.size, **kw)
    return [h.pack(), grad.astype(np.float32).tobytes()]


def run_threads(fns, timeout=60.0):
    """Run callables in threads; re-raise the first exception; fail if one is still running at ``timeout``."""
    errors, threads = [], []

    def wrap(fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    for fn in fns:
        t = threading.Thread(target=wrap, args=(fn,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


_DIGITS = None


def digits():
    """(Xtr, Xte, ytr, yte): sklearn digits / 16, stratified 70/30 split, random_state=0 (cached)."""
    global _DIGITS
    if _DIGITS is None:
        from core.datasets import load_digits_split
        _DIGITS = load_digits_split(0)
    return _DIGITS


def port_of(address: str) -> int:
    """The port of a tcp://host:port address."""
    return int(address.rsplit(":", 1)[1])


class ReplyCutter:
    """A TCP relay in front of a server at tcp://127.0.0.1:PORT that forwards both ways, except that once
    ``cut()`` says so it drops one connection at the server's next bytes to the client instead of forwarding
    them: the request went through, its reply dies with the connection. ``address`` is the relay's;
    ``cuts`` counts the connections it dropped; ``with`` closes it."""

    def __init__(self, server_address: str, cut):
        self.target = ("127.0.0.1", port_of(server_address))
        self.cut, self.cuts, self.armed = cut, 0, True
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._relay, args=(client,), daemon=True)
            t.start()
            self._threads.append(t)

    def _relay(self, client):
        upstream = socket.create_connection(self.target, timeout=5)
        peer = {client: upstream, upstream: client}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select(list(peer), [], [], 0.1)
                for src in readable:
                    data = src.recv(1 << 16)
                    if not data:
                        return
                    if src is upstream and self.armed and self.cut():
                        self.armed = False
                        self.cuts += 1
                        return                        # the reply never reaches the client
                    peer[src].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.listener.close()
        for t in self._threads:
            t.join(5)


def rss_mb(pid=None) -> float:
    """Resident memory of a process (this one by default), MB, from /proc."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/<pid>/status")


def curve_greeting() -> bytes:
    """The 64-byte ZMTP 3.0 greeting of a peer that asks for the CURVE mechanism (no key needed to send it)."""
    return b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\0") + b"\0" + b"\0" * 31


def serve_main(argv) -> int:
    """``python -m tests.ps_helpers serve OUT [--nofile SOFT[,HARD]] [--max-connections N] [--handshake S]``

    A secure 16-parameter server in its own process (the fd limit set first), its client config pickled to
    OUT; it serves until stdin closes, then writes ``server.stats()`` as JSON to OUT.stats."""
    import argparse
    import json
    import pickle
    import resource
    import sys

    from ps import ParameterServer

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--nofile", default=None)
    ap.add_argument("--max-connections", type=int, default=None)
    ap.add_argument("--handshake", type=float, default=5.0)
    a = ap.parse_args(argv)
    if a.nofile:
        soft, _, hard = a.nofile.partition(",")
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (int(soft), int(hard) if hard else resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    with ParameterServer(np.zeros(16, np.float32), num_workers=2, progress=False, handshake_timeout=a.handshake,
                         max_connections=a.max_connections) as s:
        with open(a.out + ".tmp", "wb") as f:
            pickle.dump(s.client_config(), f)
        import os
        os.replace(a.out + ".tmp", a.out)
        sys.stdin.read()                     # until the test closes our stdin
        stats = s.stats()
    with open(a.out + ".stats", "w") as f:
        json.dump(stats, f)
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        sys.exit(serve_main(sys.argv[2:]))
    sys.exit("usage: python -m tests.ps_helpers serve OUT [--nofile SOFT[,HARD]] ...")


def raw_push(w0, dtype, payload: bytes, n_values: int):
    """One PUSH of ``payload`` as raw frames (dtype code, n_values as given) to a fresh async server holding
    ``w0``, from a registered worker 0 -> (reply header, reply text, the server's weights after, its applied
    count)."""
    with ParameterServer(w0, mode="async", num_workers=1, progress=False).start() as s:
        cfg = s.client_config()
        c = ParameterClient(cfg, worker_id=0, attempt=1, timeout=5)
        ctx, sock = raw_socket(cfg)
        try:
            h, text = request(sock, [header_for(cfg, 3, worker_id=0, attempt=1, step=1, dtype=dtype,
                                                n_values=n_values, session=c.session).pack(), payload])
            return h, text, s.weights(), s.stats()["applied"]
        finally:
            sock.close(linger=0)
            ctx.term()
            c.close()


def sparse_frame(index, values) -> np.ndarray:
    """A SPARSE32 payload as given, in order or not (the tests' malformed frames): the k ``index`` as uint32,
    then their k float32 ``values``. ps.protocol.entries_frame builds the ones ffps sends."""
    frame = np.empty(2 * len(index), dtype=np.uint32)
    frame[:len(index)] = index
    frame[len(index):] = np.asarray(values, dtype=np.float32).view(np.uint32)
    return frame
