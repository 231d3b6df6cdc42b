"""What may reach the app: the host names it answers to, same-origin state changes, and the size of a body.

Example::

    >>> is_loopback("127.0.0.1"), split_host("[::1]:8765")
    (True, ('::1', '8765'))
"""
from __future__ import annotations

import ipaddress
import json

__all__ = ["LOOPBACK_NAMES", "UNSAFE_METHODS", "BodyLimit", "HostOriginGuard", "is_loopback", "refuse", "split_host"]


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine.

    Example::

        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
        (True, True, False)
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (413), by header and while streaming."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await refuse(send, 413, f"request body larger than {self.limit} bytes")
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:  # a chunked body without a length header
                    from fastapi import HTTPException

                    raise HTTPException(413, f"request body larger than {self.limit} bytes")
            return msg

        return await self.app(scope, limited, send)


#: Names a loopback-bound app answers to; serve() adds the address it binds (and --allow-host names).
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
#: Methods that change the server's state: only the app's own page (same origin) may send them.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def split_host(value: str) -> tuple[str, str | None]:
    """A Host header (or an origin's netloc) → (lower-case host name, port or None).

    Example::

        >>> split_host("[::1]:8765"), split_host("LocalHost.")
        (('::1', '8765'), ('localhost', None))
    """
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 literal
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    else:
        host, sep, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
        if not sep:
            host, port = value, None
    return host.rstrip("."), port or None


class HostOriginGuard:
    """ASGI middleware against DNS rebinding and cross-site requests.

    Every request must name one of ``allowed`` in its Host header (a page on ``attacker.example`` whose name
    was rebound to 127.0.0.1 still sends ``Host: attacker.example``). A state-changing request (POST, PUT,
    PATCH, DELETE) must come from the app's own origin: an ``Origin`` header, when the browser sends one,
    must be this very scheme, host and port, and ``Sec-Fetch-Site`` must not say another site sent it.
    Clients that are not browsers (curl, scripts) send neither header and pass.
    """

    def __init__(self, app, allowed: set[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host_header = headers.get("host", "")
        host, port = split_host(host_header)
        if host not in self.allowed:
            return await refuse(send, 400, f"Host {host_header[:80]!r} is not a name this app serves "
                                            f"({', '.join(sorted(self.allowed))}); start it with --allow-host NAME "
                                            "to add one")
        if scope["method"] in UNSAFE_METHODS:
            origin = headers.get("origin")
            site = headers.get("sec-fetch-site")
            if origin is not None:
                from urllib.parse import urlsplit

                u = urlsplit(origin)
                o_host, o_port = split_host(u.netloc)
                default = {"http": "80", "https": "443"}.get(u.scheme)
                same = (u.scheme == scope.get("scheme", "http") and o_host == host
                        and (o_port or default) == (port or default))
                if not same:
                    return await refuse(send, 403, f"a {scope['method']} from origin {origin[:80]!r} is refused: "
                                                    "only the app's own page may change its state")
            if site is not None and site not in ("same-origin", "none"):
                return await refuse(send, 403, f"a {scope['method']} sent by another site ({site}) is refused: "
                                                "only the app's own page may change its state")
        return await self.app(scope, receive, send)


async def refuse(send, status: int, detail: str) -> None:
    """Answer an ASGI request with ``status`` and ``{"detail": detail}`` (before any route runs)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
