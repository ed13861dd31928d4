"""The key server's HTTP layer: bounded bodies, audited refusals, a guard on every connection.

What :func:`plinius.tee.keyserver.serve` puts between the network and the
protocol logic (:class:`~plinius.tee.keyserver.KeyServer`, which knows nothing
of HTTP): ``read_body`` (size and time bounds), ``AuditRefusals`` (a Starlette
middleware that audits every non-2xx answer the handlers did not audit
themselves), and ``GuardedH11Protocol`` with its ``ConnectionGuard`` (header and
idle timeouts, connections per client address and in all, eviction). The
limits and what they defend are in ``keyserver``'s module docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import resource
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import PliniusError
from ._wire import MAX_MESSAGE_BYTES, Refusal
from .audit import AuditLog, clip

__all__ = [
    "HEADER_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_CONNECTIONS_PER_CLIENT",
    "MAX_HEAD_BYTES",
    "REQUEST_TIMEOUT",
    "AuditRefusals",
    "GuardedH11Protocol",
    "Limits",
    "Server",
    "client_key",
    "json_response",
    "read_body",
    "uvicorn_server",
]

REQUEST_TIMEOUT = 10.0
HEADER_TIMEOUT = 5.0
MAX_HEAD_BYTES = 16 * 1024
MAX_CONNECTIONS = 512
MAX_CONNECTIONS_PER_CLIENT = 16


def json_response(status: int, body: dict[str, Any]) -> Response:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


async def read_body(
    request: Request, limit: int = MAX_MESSAGE_BYTES, timeout: float = REQUEST_TIMEOUT
) -> bytes:
    """Read a request body, bounded in size and time.

    Args:
        request: the Starlette request.
        limit: the most bytes accepted.
        timeout: the most seconds to wait for the whole body.

    Returns:
        The body.

    Raises:
        Refusal: 400 for a bad Content-Length, 413 past ``limit``, 408 past ``timeout``,
            400 ``disconnected`` when the client goes away first.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refusal(400, "bad_request", "invalid Content-Length")
        if int(declared) > limit:
            raise Refusal(413, "too_large", f"requests are at most {limit} bytes")
    buf = bytearray()

    async def collect() -> None:
        async for chunk in request.stream():
            buf.extend(chunk)
            if len(buf) > limit:  # chunked bodies have no Content-Length to check first
                raise Refusal(413, "too_large", f"requests are at most {limit} bytes")

    try:
        await asyncio.wait_for(collect(), timeout)
    except TimeoutError as exc:
        raise Refusal(408, "timeout", "the request body was not received in time") from exc
    except ClientDisconnect as exc:
        raise Refusal(
            400, "disconnected", "the client closed the connection before its body ended"
        ) from exc
    return bytes(buf)


AUDITED = "plinius.audited"  # in an ASGI scope: the handler audited its refusal itself
_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    500: "internal",
    503: "busy",
}


class AuditRefusals:
    """ASGI middleware: one audit line for every non-2xx answer not already audited.

    Release and counter refusals are audited by the protocol logic (with the job,
    the nonce, ...); everything else the application answers (404, 405, a 413 or
    ``busy`` on ``/v1/nonce``, an internal error) is audited here. The code is the
    answer's ``error``, else one derived from the status.
    """

    def __init__(self, app: Any, audit: AuditLog) -> None:
        self.app, self.audit = app, audit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0
        body = bytearray()

        async def watch(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not 200 <= status < 300:
                body.extend(message.get("body", b"")[: 1024 - len(body)])
                if not message.get("more_body", False):
                    self._audit(scope, status, bytes(body))  # before the client hears of it
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if status == 0:  # the error handler outside answers 500
                self._audit(scope, 500, b"")
            raise

    def _audit(self, scope: Any, status: int, body: bytes) -> None:
        if scope.get(AUDITED):
            return
        code, reason = _CODES.get(status, "error"), ""
        with contextlib.suppress(ValueError):  # a status without a name
            reason = HTTPStatus(status).phrase
        with contextlib.suppress(ValueError, RecursionError):
            answer = json.loads(body)
            if isinstance(answer, dict) and isinstance(answer.get("error"), str):
                code, reason = answer["error"], str(answer.get("reason", ""))
        client = scope.get("client")
        audit_refusal(
            self.audit,
            client[0] if client else "unknown",
            Refusal(status, clip(code, 40), clip(reason)),
            path=clip(scope.get("raw_path") or scope["path"]),
            method=clip(scope["method"], 16),
        )


def audit_refusal(
    audit: AuditLog,
    client: str,
    refusal: Refusal,
    *,
    path: str | None = None,
    method: str | None = None,
) -> None:
    """One audit line for a refusal of the HTTP layer (best effort, not fsynced)."""
    event: dict[str, Any] = {
        "event": "refusal",
        "status": refusal.status,
        "code": refusal.code,
        "reason": refusal.reason,
        "client": clip(client, 64),
    }
    if path is not None:
        event["path"] = path
    if method is not None:
        event["method"] = method
    with contextlib.suppress(PliniusError):  # the refusal stands even if unlogged
        audit.write(event, sync=False)


def client_key(host: str) -> str:
    """What the per-client limit counts by: the address; for IPv6, its /64."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


class ConnectionGuard:
    """The connections of one server: how many in all and per client, and which wait.

    A connection *waits* from when it is made, and again from each answer on it,
    until its next request line and headers are complete; each connection has
    ``limits.header_timeout`` seconds of waiting at a time. Used on the event loop
    only.
    """

    def __init__(self, limits: Limits, audit: AuditLog) -> None:
        self.limits, self.audit = limits, audit
        self.members: set[GuardedH11Protocol] = set()
        self.per_client: dict[str, int] = {}
        self.waiting: OrderedDict[GuardedH11Protocol, None] = OrderedDict()  # oldest first

    def admit(self, conn: GuardedH11Protocol) -> Refusal | None:
        """Count ``conn`` in, or say why it is refused (it is then not counted)."""
        if self.per_client.get(conn.key, 0) >= self.limits.per_client:
            return Refusal(
                503,
                "too_many_connections_from_client",
                f"at most {self.limits.per_client} connections at once per client address",
            )
        if len(self.members) >= self.limits.connections:
            if not self.waiting:
                return Refusal(
                    503, "too_many_connections", "the server is at its connection limit; retry"
                )
            oldest = next(iter(self.waiting))
            oldest.expire(evicted=True)
            self.leave(oldest)
        self.members.add(conn)
        self.per_client[conn.key] = self.per_client.get(conn.key, 0) + 1
        return None

    def leave(self, conn: GuardedH11Protocol) -> None:
        """Count ``conn`` out (once; refused connections were never in)."""
        self.waiting.pop(conn, None)
        if conn in self.members:
            self.members.discard(conn)
            left = self.per_client[conn.key] - 1
            if left:
                self.per_client[conn.key] = left
            else:
                del self.per_client[conn.key]


_REQUEST_LINE = re.compile(rb"[!-~]{1,16} ([!-~]+)")


class _HeadWatch(h11.Connection):
    """An h11 connection that tells its protocol when a request's head is complete."""

    def __init__(self, owner: GuardedH11Protocol, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self._owner = owner

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self._owner.protocol_error(exc)
            raise
        if isinstance(event, h11.Request):
            self._owner.head_complete(event)
        return event


class GuardedH11Protocol(H11Protocol):  # type: ignore[misc]
    """uvicorn's h11 protocol under a :class:`ConnectionGuard`.

    uvicorn has no timeout for a request's head (its keep-alive timer starts only
    after an answer, and any byte stops it), counts every connection towards one
    global limit and audits nothing; this adds the header timeout, the limits per
    client and in all, and an audit line for every refusal it or uvicorn makes.
    ``guard`` is set on a subclass made for each server.
    """

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _HeadWatch(self, self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES)
        self.host = self.key = "unknown"
        self._timer: asyncio.TimerHandle | None = None
        self._after_answer = False  # waiting for a second or later request
        self._received = 0  # bytes received while waiting
        self._head = b""  # their first bytes, for the path in an audit line
        self._error: Refusal | None = None
        self._error_path: str | None = None

    # -- uvicorn's hooks --

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.client:
            self.host = str(self.client[0])
            self.key = client_key(self.host)
        refusal = self.guard.admit(self)
        if refusal is not None:
            self.refuse(refusal)
        else:
            self._arm(after_answer=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.leave(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._received += len(data)
            self._head += data[: 256 - len(self._head)]
        super().data_received(data)

    def on_response_complete(self) -> None:
        # Armed first: the super call may start a pipelined request (which disarms).
        if not self.transport.is_closing():
            self._arm(after_answer=True)
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        refusal = self._error or Refusal(400, "bad_http", "the request is not valid HTTP/1.1")
        self.refuse(refusal, self._error_path)

    # -- from _HeadWatch --

    def head_complete(self, event: h11.Request) -> None:
        """A request line and headers arrived: stop the clock; refuse an oversized head."""
        self._disarm()
        size = len(event.method) + len(event.target)
        size += sum(len(name) + len(value) + 4 for name, value in event.headers)
        if size > MAX_HEAD_BYTES:  # h11 checks only heads that arrive in pieces
            self._error, self._error_path = self._too_large(), clip(event.target)
            raise h11.RemoteProtocolError("request head too large", 431)

    def protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        """h11 refused what the client sent (uvicorn then calls :meth:`send_400_response`)."""
        if self._error is not None:  # raised by head_complete
            return
        if exc.error_status_hint == 431:
            self._error, self._error_path = self._too_large(), self._head_path()
        else:
            self._error = Refusal(400, "bad_http", f"not valid HTTP/1.1: {clip(str(exc), 100)}")

    @staticmethod
    def _too_large() -> Refusal:
        return Refusal(
            431,
            "headers_too_large",
            f"the request line and headers must be at most {MAX_HEAD_BYTES} bytes",
        )

    # -- the guard's --

    def expire(self, *, evicted: bool = False) -> None:
        """The waiting time is over (or the guard needs the room): close, saying why."""
        after_answer, received, path = self._after_answer, self._received, self._head_path()
        self._disarm()
        if self.transport.is_closing():
            return
        if after_answer and not received:  # an idle keep-alive connection: a normal close
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()
            return
        seconds = f"{self.guard.limits.header_timeout:g}"
        if evicted:
            refusal = Refusal(
                503,
                "evicted",
                "the server is at its connection limit and this connection had sent no "
                "complete request; retry",
            )
        elif not received:
            refusal = Refusal(408, "idle_timeout", f"no request within {seconds} s")
        else:
            refusal = Refusal(
                408,
                "header_timeout",
                f"the request line and headers did not arrive within {seconds} s",
            )
        self.refuse(refusal, path)

    def refuse(self, refusal: Refusal, path: str | None = None) -> None:
        """Audit ``refusal``, answer it (JSON, as the application would) and close."""
        self._disarm()
        if self.transport.is_closing():
            return
        audit_refusal(self.guard.audit, self.host, refusal, path=path)
        body = json.dumps({"error": refusal.code, "reason": refusal.reason}).encode()
        head = (
            f"HTTP/1.1 {refusal.status} {HTTPStatus(refusal.status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "cache-control: no-store\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()

    # -- waiting --

    def _arm(self, *, after_answer: bool) -> None:
        self._disarm()
        self._after_answer, self._received, self._head = after_answer, 0, b""
        self._timer = self.loop.call_later(self.guard.limits.header_timeout, self.expire)
        self.guard.waiting[self] = None

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.guard.waiting.pop(self, None)

    def _head_path(self) -> str | None:
        match = _REQUEST_LINE.match(self._head)
        return clip(match.group(1)) if match else None


@dataclass(frozen=True)
class Limits:
    """The connection limits :func:`serve` enforces (see the module docstring)."""

    connections: int = MAX_CONNECTIONS
    per_client: int = MAX_CONNECTIONS_PER_CLIENT
    header_timeout: float = HEADER_TIMEOUT

    @classmethod
    def for_this_process(cls) -> Limits:
        """The defaults, with fewer connections when the open-file limit is lower."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return cls()
        # Room for the listening socket, the audit log, counter files, the threads.
        return cls(connections=max(1, min(MAX_CONNECTIONS, soft - 64)))


def uvicorn_server(
    app: ASGIApp,
    audit: AuditLog,
    limits: Limits,
    started: Callable[[], None],
    *,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
) -> Server:
    """The uvicorn server :func:`serve` runs (tests run it in a thread, with other limits)."""
    guard = ConnectionGuard(limits, audit)
    protocol = type("KeyServerH11Protocol", (GuardedH11Protocol,), {"guard": guard})
    config = uvicorn.Config(
        app,
        http=protocol,
        ws="none",  # a WebSocket upgrade would leave the connection guard
        loop="asyncio",
        lifespan="off",
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # the audit log records the real peer, not a header
        server_header=False,
        limit_concurrency=None,  # the connection guard limits connections, and audits
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,  # the guard checks complete heads
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
    )
    return Server(config, started)


class Server(uvicorn.Server):  # type: ignore[misc]
    """A uvicorn server that reports when it really accepts connections."""

    def __init__(self, config: uvicorn.Config, started: Callable[[], None]) -> None:
        super().__init__(config)
        self._started_callback = started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            self._started_callback()
