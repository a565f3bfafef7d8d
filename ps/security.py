"""CURVE security of the parameter server: per-job key pairs and a ZAP handler that admits one client key.

    curve = CurveServer(ctx)          # fresh server and client key pairs, ZAP handler started
    curve.secure(router)              # the ROUTER becomes a CURVE server
    cfg.update(curve.client_keys())   # what a worker needs to connect
    secure_client(dealer, cfg)        # worker side
"""
from __future__ import annotations

import functools
import logging
import threading

import zmq
from zmq.auth.thread import ThreadAuthenticator


class _OnlyKey:
    """ZAP credentials provider: admit exactly one CURVE public key (z85)."""

    def __init__(self, z85_key: bytes):
        self.key = z85_key
        self.denied = 0

    def callback(self, domain, key):
        ok = key == self.key
        self.denied += not ok
        return ok


class CurveServer:
    """Fresh key pairs for the server and the job's clients; a ZAP handler on ``ctx`` admitting only the
    client key. ``denied`` counts the handshakes it refused; ``stop()`` before terminating the context."""

    def __init__(self, ctx: zmq.Context):
        self.server_public, self._server_secret = zmq.curve_keypair()
        self.client_public, self._client_secret = zmq.curve_keypair()
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("ps.zap"))
        self._auth.start()
        self._zap = _OnlyKey(self.client_public)
        self._auth.configure_curve_callback("*", credentials_provider=self._zap)

    def secure(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey, sock.curve_publickey = self._server_secret, self.server_public
        sock.curve_server = True

    def client_keys(self) -> dict:
        return {"server_public": self.server_public, "client_public": self.client_public,
                "client_secret": self._client_secret}

    @property
    def denied(self) -> int:
        return self._zap.denied

    def stop(self) -> None:
        self._auth.stop()


def secure_client(sock: zmq.Socket, cfg: dict) -> None:
    """Make ``sock`` a CURVE client of the server in ``cfg`` (a no-op for an insecure server)."""
    if cfg.get("secure"):
        sock.curve_serverkey = cfg["server_public"]
        sock.curve_publickey, sock.curve_secretkey = cfg["client_public"], cfg["client_secret"]


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit -> the soft limit now. Every peer of
    the server holds a descriptor: a soft limit of 1,024 (a common default) let 1,100 idle TCP connections lock
    new workers out."""
    try:
        import resource
    except ImportError:                         # not POSIX: nothing to raise
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class ConnectionGuard:
    """Caps the open connections of a server socket at ``limit``, from its monitor's events: a connection
    accepted beyond the cap is shut down at once (libzmq then drops it cleanly), so peers can never take the
    process's last descriptors. Peers that never finish their handshake go after the socket's HANDSHAKE_IVL
    anyway, so idle connections hold a slot for seconds, not for ever. ``poll()`` handles pending events;
    ``start()`` does it on a thread of the guard's own, which owns the monitor socket (the server's socket is
    never touched there), so the serving thread waits on its one socket alone."""

    WAIT_MS = 50              # the guard thread looks at its stop flag this often

    def __init__(self, sock: zmq.Socket, limit: int):
        self.limit = int(limit)
        self.monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._sock = sock
        self.open: set = set()
        self.accepted = self.refused = self.peak = 0
        self._thread = None
        self._stop = threading.Event()

    def poll(self) -> None:
        """Handle the pending events: all of them are read first, so that a descriptor already closed and
        reused by a newer connection (its DISCONNECTED and a new ACCEPTED wait behind) is never shut down for
        the connection it used to be."""
        from zmq.utils.monitor import recv_monitor_message

        events = []
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            events.append((event["event"], event["value"]))
        for fd in self.account(events):
            _shut_down(fd)

    def account(self, events: list) -> list:
        """Count a batch of (event, fd) in order -> the descriptors to shut down: those refused whose last
        event in the batch is that refusal (an earlier connection on a reused descriptor is gone already)."""
        last = {fd: i for i, (_, fd) in enumerate(events)}
        shut = []
        for i, (event, fd) in enumerate(events):
            if event == zmq.EVENT_DISCONNECTED:
                self.open.discard(fd)
            elif len(self.open) >= self.limit:
                self.refused += 1
                if last[fd] == i:
                    shut.append(fd)
            else:
                self.accepted += 1
                self.open.add(fd)
                self.peak = max(self.peak, len(self.open))
        return shut

    def start(self) -> "ConnectionGuard":
        self._thread = threading.Thread(target=self._run, name="ps-connection-guard", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.monitor.poll(self.WAIT_MS):
                self.poll()

    def stats(self) -> dict:
        return {"open": len(self.open), "peak": self.peak, "accepted": self.accepted, "refused": self.refused,
                "limit": self.limit}

    def close(self) -> None:
        """Stop the thread, then the monitor (call it from the thread that owns the server's socket)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10 * self.WAIT_MS / 1000)
        self._sock.disable_monitor()
        self.monitor.close(linger=0)


def _shut_down(fd: int) -> None:
    """End the TCP connection on ``fd`` without closing the descriptor, which libzmq owns."""
    import socket

    try:
        conn = socket.socket(fileno=fd)
    except OSError:                              # gone already, or not a socket any more
        return
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        conn.detach()


CURVE_SLOW_RATIO = 15.0   # CURVE / plain round trip: ~4-9x with libsodium's fast code, 29-43x with the slow wheels


@functools.lru_cache(maxsize=1)
def curve_round_trips(nbytes: int = 1 << 20, reps: int = 3, rounds: int = 3) -> tuple[float, float]:
    """(plain, CURVE) seconds of an ``nbytes`` DEALER/ROUTER round trip over loopback, best of ``reps``;
    measured once per process (about 30 ms with a fast CURVE). A ratio above :data:`CURVE_SLOW_RATIO` is
    measured again, up to ``rounds`` times in all, and the lowest ratio kept: a busy machine gave a fast CURVE
    34x now and then, a slow fallback stays slow every time."""
    best = None
    for _ in range(rounds):
        pair = _curve_round_trips_once(nbytes, reps)
        if best is None or pair[1] / pair[0] < best[1] / best[0]:
            best = pair
        if best[1] <= CURVE_SLOW_RATIO * best[0]:
            break
    return best


def _curve_round_trips_once(nbytes: int, reps: int) -> tuple[float, float]:
    import threading
    import time

    def round_trip(secure: bool) -> float:
        ctx = zmq.Context()
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        try:
            for s in (router, dealer):
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.RCVTIMEO, 10_000)
                s.setsockopt(zmq.SNDTIMEO, 10_000)
            if secure:
                server_public, server_secret = zmq.curve_keypair()
                client_public, client_secret = zmq.curve_keypair()
                router.curve_secretkey, router.curve_publickey, router.curve_server = \
                    server_secret, server_public, True
                dealer.curve_serverkey, dealer.curve_publickey, dealer.curve_secretkey = \
                    server_public, client_public, client_secret
            router.bind("tcp://127.0.0.1:*")
            dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))

            def echo():
                try:
                    for _ in range(reps + 1):
                        router.send_multipart(router.recv_multipart(copy=False), copy=False)
                except zmq.ZMQError:
                    pass
            th = threading.Thread(target=echo, daemon=True)
            th.start()
            payload = bytes(nbytes)
            best = float("inf")
            for i in range(reps + 1):
                t0 = time.perf_counter()
                dealer.send(payload, copy=False)
                dealer.recv(copy=False)
                if i:                                # the first carries the handshake
                    best = min(best, time.perf_counter() - t0)
            th.join(10)
            return best
        finally:
            router.close(0)
            dealer.close(0)
            ctx.term()

    return round_trip(False), round_trip(True)


FAST_CURVE_WHEELS = (27, 3)    # pyzmq's wheels from this release on bundle libsodium's fast code
_curve_said = []               # curve_speed_warning's messages already given in this process


def curve_speed_problem() -> str | None:
    """None when CURVE encrypts at libsodium's speed here; else a sentence with the measurement and the fix."""
    try:
        plain, curve = curve_round_trips()
    except zmq.ZMQError as exc:
        return f"could not measure CURVE's speed ({exc})"
    if curve <= CURVE_SLOW_RATIO * plain:
        return None
    said = (f"CURVE is slow in this pyzmq ({zmq.__version__}): a 1 MB round trip took {curve * 1e3:.1f} ms "
            f"encrypted against {plain * 1e3:.1f} ms plain ({curve / plain:.0f}x; ~5x is normal). ")
    if tuple(int(p) for p in zmq.__version__.split(".")[:2] if p.isdigit()) < FAST_CURVE_WHEELS:
        return said + "Wheels before 27.3 encrypt with a slow fallback: pip install 'pyzmq>=27.3'"
    return said + ("This pyzmq is recent enough, so its libzmq was probably built without libsodium (a source "
                   "build or a system libzmq): install pyzmq's own wheel (pip install --force-reinstall "
                   "--only-binary pyzmq pyzmq), or the machine was too busy to measure")


def curve_speed_warning() -> str | None:
    """:func:`curve_speed_problem`, said once per process: every secure server started checks, one warns."""
    problem = curve_speed_problem()
    if problem is None or problem in _curve_said:
        return None
    _curve_said.append(problem)
    return problem
