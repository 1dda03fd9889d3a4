"""Who may talk to the server: the ASGI guard in front of every route, and the loopback test
that decides whether it checks the Host header."""

from __future__ import annotations

import hmac

from .errors import ApiError, _bad

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
OPEN_PATHS = ("/health",)   # the only routes that need no API key


class _Guard:
    """ASGI middleware, before any route runs: the Host check (a server on loopback answers only
    to loopback names, so a web page cannot reach it through DNS rebinding), the API key on every
    route but /health (constant-time compare), and the body size limit from Content-Length."""

    def __init__(self, app, api_key: str | None, max_body: int, allowed_hosts: frozenset[str] | None = None):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.lower(), v)
        if self.allowed_hosts is not None and _host_name(headers.get(b"host", b"")) not in self.allowed_hosts:
            err = ApiError(403, "this server answers only to requests for localhost / 127.0.0.1",
                           code="host_not_allowed")
            return await err.response()(scope, receive, send)
        if self.key is not None and scope.get("path") not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(token, self.key):
                err = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                return await _bad("bad Content-Length header").response()(scope, receive, send)
            if n > self.max_body:
                err = ApiError(413, f"request body is larger than {self.max_body} bytes", code="request_too_large")
                return await err.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def _host_name(host: bytes) -> str:
    """The name in a Host header, without port or IPv6 brackets."""
    h = host.decode("latin-1").strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
