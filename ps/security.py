"""CURVE security of the parameter server: per-job key pairs and a ZAP handler that admits one client key.

    curve = CurveServer(ctx)          # fresh server and client key pairs, ZAP handler started
    curve.secure(router)              # the ROUTER becomes a CURVE server
    cfg.update(curve.client_keys())   # what a worker needs to connect
    secure_client(dealer, cfg)        # worker side
"""
from __future__ import annotations

import logging

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
