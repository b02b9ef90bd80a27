"""The ASGI middleware in front of every endpoint: the Host check (a server on loopback answers only to a
loopback name, so a DNS-rebinding page cannot reach it), the Origin check (a request from a web page is
refused unless --allow-origin names its origin), the API key (every path but /health, which says less
without it), and the response counters of /metrics."""

from __future__ import annotations

import hmac
import ipaddress
import json

from fedrouter.serving.batcher import Service
from fedrouter.serving.endpoints import label_of
from fedrouter.serving.schemas import ApiError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """Whether `host` (as given to --host) is this machine only: localhost, 127.0.0.0/8, ::1."""
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


AUTHORIZED = "fedrouter.authorized"  # the ASGI scope key Guard sets: the request carries the key (or none is needed)


def host_name(host: str) -> str:
    """The name in a Host header without its port ('[::1]:8000' -> '::1'), lower case. (Starlette's
    TrustedHostMiddleware cuts at the first colon, which an IPv6 address holds.)"""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware, in front of everything: the Host check (a server on loopback answers only to a
    loopback name: a DNS-rebinding page cannot reach it), the Origin check (a request from a web page is
    refused unless --allow-origin names its origin), the API key (every path but /health, which says less
    without it), and the response counters."""

    def __init__(self, app, service: Service, api_key: str | None, allow_origins: tuple[str, ...] = (),
                 hosts: tuple[str, ...] | None = None):
        self.app, self.service = app, service
        self.key = api_key.encode() if api_key else None
        self.origins = set(allow_origins)
        self.hosts = set(hosts) if hosts is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = label_of(path)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.service.metrics.response(label, message["status"])
            await send(message)

        headers = dict(scope["headers"])
        if self.hosts is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.hosts:
                err = ApiError(421, f"this server answers on {', '.join(sorted(self.hosts))} only, not Host {host or '(none)'}",
                               code="invalid_host")
                return await send_json(counted, 421, err.body())
        origin = headers.get(b"origin")
        if origin is not None and "*" not in self.origins and origin.decode("latin-1") not in self.origins:
            err = ApiError(403, f"requests from web pages (Origin {origin.decode('latin-1')}) are refused; start the "
                                "server with --allow-origin ORIGIN to let that page call it", code="origin_not_allowed")
            return await send_json(counted, 403, err.body())
        if origin is not None and scope["method"] == "OPTIONS":  # an allowed origin's preflight: CORS answers it, keyless
            return await self.app(scope, receive, counted)
        authorized = True
        if self.key is not None:
            header = headers.get(b"authorization", b"")
            given = header[7:].strip() if header[:7].lower() == b"bearer " else None
            authorized = given is not None and hmac.compare_digest(given, self.key)
            if not authorized and path != "/health":
                message = ("Incorrect API key provided." if given is not None else
                           "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
                err = ApiError(401, message, code="invalid_api_key")
                return await send_json(counted, 401, err.body(), {"www-authenticate": "Bearer"})
        scope[AUTHORIZED] = authorized
        return await self.app(scope, receive, counted)


async def send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
