"""The data owner's key server: releases the master key to attested code only.

The protocol logic (:class:`KeyServer`) is plain Python and knows nothing of
HTTP; :meth:`KeyServer.app` puts it behind a Starlette application and
:func:`serve` runs that with uvicorn. New endpoints (for example a per-job
freshness counter) are added by extending :meth:`KeyServer.routes`.

Endpoints (JSON in and out; errors are ``{"error": CODE, "reason": TEXT}`` with
a 4xx or 5xx status):

* ``POST /v1/nonce`` -> ``{"version", "nonce", "expires_in"}``
* ``POST /v1/release`` ``{"version", "job_id", "nonce", "client_public_key",
  "evidence"}`` -> ``{"payload", "signature"}`` (see :mod:`.protocol`)
* ``GET /v1/info`` -> ``{"version", "public_key"}``
* ``POST /v1/counter`` ``{"version", "job_id", "op", "nonce", ["target"], "mac"}``
  -> ``{"payload", "signature"}``: the per-job freshness counters (see
  :mod:`.counter_service`; only when the server was given a :class:`.counter_service.CounterStore`)

Limits (see :func:`serve`): a request line and headers of at most 16 KiB (else
431 ``headers_too_large``), all received within 5 s of connecting or of the
previous answer on a kept-alive connection (else 408 ``idle_timeout`` when
nothing came, ``header_timeout`` when part did, and the connection is closed);
request bodies of at most 64 KiB (413), read within 10 s (408); at most 16
connections at once per client address (an IPv6 client: per /64) and 512 in
all (fewer when the open-file limit is lower), else 503
``too_many_connections_from_client`` or ``too_many_connections``; when all are
taken, the connection that has waited longest without a complete request is
closed (503 ``evicted``) to make room; 10,000 outstanding nonces (503 ``busy``).

Every release and every non-2xx answer is written to the audit log (JSON lines,
never the key): one line with the client's address, the path when it is known
(at most 200 characters), the status and a code, also for what Starlette or
the HTTP layer refuse (404, 405, malformed HTTP, the limits and timeouts). A
kept-alive connection closed because it stayed idle after an answer is not a
refusal and is not logged. Releases and counter advances are fsynced before
they happen; the HTTP layer's refusal lines are not, so that a flood cannot
stall the server on the disk.

Not defended: a flood from many addresses can still take all connections (each
for at most 5 s while it waits for a request, 10 s while it sends a body), and
every refused connection is a line (small, but the log grows with the flood);
with TLS, a handshake is bounded only by asyncio's own 60 s and a connection is
counted from the end of its handshake.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..crypto import MasterKey
from ..errors import ConfigError, PliniusError
from ._http import (
    AUDITED,
    AuditRefusals,
    Limits,
    json_response,
    read_body,
    uvicorn_server,
)
from ._wire import MAX_MESSAGE_BYTES, Refusal, bad_request, decode_hex
from .audit import AuditLog
from .counter_service import MAX_COUNTER_REQUEST, CounterService, CounterStore
from .evidence import Evidence, parse_evidence
from .policy import Policy
from .protocol import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    RELEASE_DOMAIN,
    check_job_id,
    public_key_hex,
    report_data_binding,
    seal_release_response,
    sign_json,
    wrap_master_key,
)
from .verify import QuoteVerifier, require_verified

__all__ = ["DEFAULT_PORT", "AuditLog", "KeyServer", "NonceStore", "serve"]

DEFAULT_PORT = 8470
DEFAULT_NONCE_TTL = 60.0
MAX_OUTSTANDING_NONCES = 10_000


class NonceStore:
    """One-time nonces that expire after ``ttl`` seconds; at most ``capacity`` outstanding.

    Spent and expired nonces are remembered (boundedly) only to tell the
    client why it was refused; an unknown nonce is refused all the same.

    Args:
        ttl: seconds a nonce lives.
        capacity: the most outstanding nonces (and remembered spent ones).
        clock: monotonic seconds (injectable for tests).

    Raises:
        ConfigError: ``ttl`` or ``capacity`` is not positive.
    """

    def __init__(
        self,
        ttl: float = DEFAULT_NONCE_TTL,
        capacity: int = MAX_OUTSTANDING_NONCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or capacity <= 0:
            raise ConfigError("the nonce lifetime and capacity must be positive")
        self.ttl, self.capacity, self._clock = ttl, capacity, clock
        self._live: OrderedDict[bytes, float] = OrderedDict()  # nonce -> expiry, oldest first
        self._spent: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        while self._live:
            nonce, expiry = next(iter(self._live.items()))
            if expiry > now:
                break
            del self._live[nonce]

    def issue(self) -> bytes:
        """A new random nonce, outstanding until spent or expired.

        Returns:
            32 bytes.

        Raises:
            Refusal: 503 ``busy`` when ``capacity`` nonces are outstanding.
        """
        with self._lock:
            now = self._clock()
            self._expire(now)
            if len(self._live) >= self.capacity:
                raise Refusal(503, "busy", "too many outstanding nonces; try again later")
            nonce = secrets.token_bytes(NONCE_SIZE)
            self._live[nonce] = now + self.ttl
            return nonce

    def spend(self, nonce: bytes) -> None:
        """Use ``nonce`` up: it is never accepted again.

        Args:
            nonce: the nonce a request names.

        Raises:
            Refusal: 403 ``nonce_unknown``, ``nonce_replayed`` or ``nonce_expired``.
        """
        with self._lock:
            now = self._clock()
            expiry = self._live.pop(nonce, None)
            if expiry is None:
                if nonce in self._spent:
                    raise Refusal(403, "nonce_replayed", "this nonce was already used")
                raise Refusal(403, "nonce_unknown", "unknown or expired nonce; ask for a new one")
            self._spent[nonce] = None
            while len(self._spent) > self.capacity:
                self._spent.popitem(last=False)
            if expiry <= now:
                raise Refusal(403, "nonce_expired", "the nonce expired; ask for a new one")


_REQUEST_FIELDS = {"version", "job_id", "nonce", "client_public_key", "evidence"}


class KeyServer:
    """Releases ``master_key`` to evidence that ``policy`` allows.

    ``identity`` signs every release; clients are configured with its public
    key. ``verifier`` checks hardware quotes (None: hardware evidence is
    refused). ``clock`` is injectable for tests of nonce expiry.
    ``counters``: where per-job freshness counters persist (None: the
    counter endpoint refuses every request, saying how to enable it).

    Args:
        master_key: the key released.
        policy: the owner's allow-list of evidence.
        identity: the Ed25519 key that signs every answer.
        verifier: checks hardware quotes (None: hardware evidence is refused).
        nonce_ttl: seconds a nonce lives.
        audit_log: where releases and refusals go (None: nowhere).
        max_nonces: the most outstanding nonces.
        clock: monotonic seconds (injectable for tests).
        counters: the per-job counter store (None: the endpoint is off).

    Raises:
        ConfigError: a non-positive ``nonce_ttl`` or ``max_nonces``.
    """

    def __init__(
        self,
        master_key: MasterKey,
        policy: Policy,
        identity: Ed25519PrivateKey,
        *,
        verifier: QuoteVerifier | None = None,
        nonce_ttl: float = DEFAULT_NONCE_TTL,
        audit_log: AuditLog | None = None,
        max_nonces: int = MAX_OUTSTANDING_NONCES,
        clock: Callable[[], float] = time.monotonic,
        counters: CounterStore | None = None,
    ) -> None:
        self._master = master_key
        self.policy = policy
        self._identity = identity
        self.verifier = verifier
        self.nonces = NonceStore(nonce_ttl, max_nonces, clock)
        self.audit = audit_log or AuditLog(None)
        self.counters = (
            CounterService(master_key, counters, self.sign, self.audit)
            if counters is not None
            else None
        )

    @property
    def public_key_hex(self) -> str:
        """The identity public key clients must be configured with."""
        return public_key_hex(self._identity)

    def sign(self, payload: dict[str, Any], domain: bytes) -> dict[str, str]:
        """Sign a response of another kind (for endpoints added to :meth:`routes`).

        Args:
            payload: the JSON object to sign.
            domain: the message kind's own domain (see :func:`.protocol.sign_json`).

        Returns:
            The signed message.

        Raises:
            ValueError: ``domain`` is the key-release domain, reserved for releases.
        """
        if domain == RELEASE_DOMAIN:
            raise ValueError("the key-release domain is reserved for key releases")
        return sign_json(self._identity, payload, domain)

    # -- protocol -----------------------------------------------------------

    def issue_nonce(self) -> tuple[int, dict[str, Any]]:
        """Answer ``POST /v1/nonce``; never raises.

        Returns:
            The HTTP status and JSON body (``version``, ``nonce``, ``expires_in``,
            or a 503 refusal).
        """
        try:
            nonce = self.nonces.issue()
        except Refusal as r:
            return r.status, {"error": r.code, "reason": r.reason}
        return 200, {
            "version": PROTOCOL_VERSION,
            "nonce": nonce.hex(),
            "expires_in": self.nonces.ttl,
        }

    def release(self, body: bytes, client: str = "unknown") -> tuple[int, dict[str, Any]]:
        """Answer ``POST /v1/release``; audited either way, never raises.

        Args:
            body: the request body.
            client: the peer's address, for the audit log.

        Returns:
            The HTTP status and JSON body: the signed release, or
            ``{"error", "reason"}`` (also when the release cannot be audited:
            an unaudited release does not happen).
        """
        event: dict[str, Any] = {"client": client}
        try:
            response = self._release(body, event)
        except Refusal as r:
            self.audit_refusal(event, r)
            return r.status, {"error": r.code, "reason": r.reason}
        except Exception as exc:  # a bug, say in a plugged-in verifier: refuse, and say so
            bug = Refusal(500, "internal", f"internal error: {type(exc).__name__}")
            self.audit_refusal({**event, "detail": str(exc)[:500]}, bug)
            return bug.status, {"error": bug.code, "reason": bug.reason}
        # Fail closed: a release that cannot be audited does not happen.
        try:
            self.audit.write({"event": "release", **event})
        except PliniusError as exc:
            return 500, {"error": "audit", "reason": f"the key server cannot audit: {exc}"}
        return 200, response

    def audit_refusal(self, event: dict[str, Any], r: Refusal) -> None:
        with contextlib.suppress(PliniusError):  # the refusal stands even if unlogged
            self.audit.write(
                {
                    "event": "refusal",
                    "status": r.status,
                    "code": r.code,
                    "reason": r.reason,
                    **event,
                }
            )

    def _release(self, body: bytes, event: dict[str, Any]) -> dict[str, Any]:
        if len(body) > MAX_MESSAGE_BYTES:
            raise Refusal(413, "too_large", f"requests are at most {MAX_MESSAGE_BYTES} bytes")
        try:
            req = json.loads(body)
        except (ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit int
            raise Refusal(400, "bad_request", "the request is not JSON") from exc
        if not isinstance(req, dict) or set(req) != _REQUEST_FIELDS:
            raise Refusal(
                400,
                "bad_request",
                f"the request needs exactly: {', '.join(sorted(_REQUEST_FIELDS))}",
            )
        if type(req["version"]) is not int or req["version"] != PROTOCOL_VERSION:
            raise Refusal(400, "bad_version", f"unsupported protocol version {req['version']!r}")
        try:
            job_id = check_job_id(req["job_id"])
        except ConfigError as exc:
            raise Refusal(400, "bad_request", str(exc)) from exc
        event["job_id"] = job_id
        nonce = decode_hex(req["nonce"], NONCE_SIZE, name="nonce", error=bad_request)
        client_pub = decode_hex(
            req["client_public_key"], 32, name="client_public_key", error=bad_request
        )
        event["nonce"] = nonce.hex()
        # The nonce is spent before the evidence is looked at: one attempt per nonce.
        self.nonces.spend(nonce)
        try:
            evidence = Evidence.from_json(req["evidence"])
            event["evidence"] = evidence.kind
            event["platform"] = evidence.platform
            claims = parse_evidence(evidence)
            verdict = None
            if not evidence.simulated:
                verdict = require_verified(
                    self.verifier, evidence.kind, evidence.blob, evidence.auxblob
                )
                event["tcb_status"] = verdict.tcb_status
            event["matched"] = self.policy.check(claims, verdict)
        except PliniusError as exc:
            raise Refusal(403, "attestation", str(exc)) from exc
        if claims.report_data != report_data_binding(nonce, client_pub, job_id):
            raise Refusal(
                403,
                "binding",
                "the evidence's report data does not bind this nonce, public key and job id",
            )
        try:
            wrapped = wrap_master_key(self._master, client_pub, job_id=job_id, nonce=nonce)
        except PliniusError as exc:
            raise Refusal(400, "bad_request", str(exc)) from exc
        event["key_fingerprint"] = self._master.fingerprint.hex()
        payload = {
            "type": "key-release",
            "version": PROTOCOL_VERSION,
            "job_id": job_id,
            "nonce": nonce.hex(),
            "client_public_key": client_pub.hex(),
            "evidence": evidence.kind,
            "key_fingerprint": self._master.fingerprint.hex(),
            "issued_at": int(time.time()),
            **wrapped,
        }
        return seal_release_response(self._identity, payload)

    def counter(self, body: bytes, client: str = "unknown") -> tuple[int, dict[str, Any]]:
        """Answer ``POST /v1/counter`` (see :mod:`.counter_service`); never raises.

        Args:
            body: the request body.
            client: the peer's address, for the audit log.

        Returns:
            The HTTP status and JSON body (404 ``counters_disabled`` without a store).
        """
        if self.counters is None:
            return 404, {
                "error": "counters_disabled",
                "reason": "this key server keeps no freshness counters; "
                "start it with --counter-dir DIR",
            }
        return self.counters.handle(body, client)

    # -- HTTP ---------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """The Starlette routes; extend this list to add endpoints."""
        return [
            Route("/v1/info", self._http_info, methods=["GET"]),
            Route("/v1/nonce", self._http_nonce, methods=["POST"]),
            Route("/v1/release", self._http_release, methods=["POST"]),
            Route("/v1/counter", self._http_counter, methods=["POST"]),
        ]

    def app(self) -> Starlette:
        """The Starlette application serving :meth:`routes`."""

        async def http_error(request: Request, exc: Exception) -> Response:
            status = exc.status_code if isinstance(exc, HTTPException) else 500
            code = {404: "not_found", 405: "method_not_allowed"}.get(status, "error")
            reason = exc.detail if isinstance(exc, HTTPException) else "internal error"
            return json_response(status, {"error": code, "reason": reason})

        return Starlette(
            routes=self.routes(),
            middleware=[Middleware(AuditRefusals, audit=self.audit)],
            exception_handlers={HTTPException: http_error, Exception: http_error},
        )

    async def _http_info(self, request: Request) -> Response:
        return json_response(200, {"version": PROTOCOL_VERSION, "public_key": self.public_key_hex})

    async def _http_nonce(self, request: Request) -> Response:
        try:
            await read_body(request, limit=1024)
        except Refusal as r:
            return json_response(r.status, {"error": r.code, "reason": r.reason})
        return json_response(*self.issue_nonce())

    async def _http_release(self, request: Request) -> Response:
        client = request.client.host if request.client else "unknown"
        request.scope[AUDITED] = True  # release() audits its every refusal itself
        try:
            body = await read_body(request)
        except Refusal as r:
            self.audit_refusal({"client": client}, r)
            return json_response(r.status, {"error": r.code, "reason": r.reason})
        # Verification may block (a verifier fetching collateral): off the event loop.
        return json_response(*await run_in_threadpool(self.release, body, client))

    async def _http_counter(self, request: Request) -> Response:
        client = request.client.host if request.client else "unknown"
        if self.counters is not None:  # which audits its every refusal itself
            request.scope[AUDITED] = True
        try:
            body = await read_body(request, limit=MAX_COUNTER_REQUEST)
        except Refusal as r:
            if self.counters is not None:
                self.counters.refuse({"client": client}, r)
            return json_response(r.status, {"error": r.code, "reason": r.reason})
        # fsync of the counter state and the audit log block: off the event loop.
        return json_response(*await run_in_threadpool(self.counter, body, client))


def serve(
    server: KeyServer,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``server`` with uvicorn until SIGINT/SIGTERM.

    Each connection is guarded (see the module docstring): its request line and
    headers must arrive within :data:`HEADER_TIMEOUT` seconds of connecting or of
    the previous answer; at most :data:`MAX_CONNECTIONS_PER_CLIENT` connections per
    client address and :data:`MAX_CONNECTIONS` in all (fewer when the open-file
    limit is lower). Behind a proxy every client has the proxy's address.

    Args:
        server: the protocol logic.
        host: the address to listen on.
        port: the port (0: any free one).
        tls_cert: a PEM certificate for https (with ``tls_key``).
        tls_key: its PEM private key.
        on_ready: called with the URL once the socket accepts connections
            (with the real port when ``port`` is 0).

    Raises:
        ConfigError: only one of ``tls_cert``/``tls_key``, an unloadable
            certificate, or the address cannot be bound.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    if tls_cert is not None and tls_key is not None:
        try:  # fail here, with a clear message, rather than inside uvicorn
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate or key: {exc}") from exc
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    scheme = "https" if tls_cert is not None else "http"
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"{scheme}://{shown}:{sock.getsockname()[1]}"
    uv = uvicorn_server(
        server.app(),
        server.audit,
        Limits.for_this_process(),
        lambda: on_ready(url) if on_ready else None,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    uv.run(sockets=[sock])
