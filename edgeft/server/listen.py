"""Listening: bind the port before the model loads, then run the app under uvicorn until stopped."""

from __future__ import annotations

import socket

from ..engine import Engine
from ..errors import InputError
from .app import Server, ServerConfig


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before serving, so a busy port is an EdgeftError with a hint, not a uvicorn exit."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"cannot resolve host '{host}': {e}", "use an IP address such as 127.0.0.1") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                         "pick another --port (0 picks a free one), or stop what uses it") from None
    sock.set_inheritable(True)
    return sock


def serve(engine: Engine, config: ServerConfig, sock: socket.socket, *, log_level: str = "info") -> None:
    """Run until Ctrl-C / SIGTERM on an already bound socket."""
    import uvicorn

    srv = Server(engine, config)

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            srv.begin_shutdown()
            super().handle_exit(sig, frame)

    ucfg = uvicorn.Config(srv.app(), log_level=log_level, access_log=log_level == "debug",
                          timeout_graceful_shutdown=5, lifespan="on", server_header=False)
    _Uvicorn(ucfg).run(sockets=[sock])
