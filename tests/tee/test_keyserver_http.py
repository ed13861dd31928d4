"""The key server's HTTP layer under attack: slow and idle clients, connection floods, and
refusals that must each leave one audit line.

Every server here is `plinius keyserver` as a subprocess (``ts.keyserver_process``, which
always stops and reaps it) or the real uvicorn server in a thread of this process (stopped
and joined by ``_in_process``). Clients connect over loopback only, from several 127.0.0.x
source addresses so that per-address limits can be exercised; every socket is closed.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from plinius.crypto import MasterKey
from plinius.tee.audit import AuditLog
from plinius.tee.keyserver import KeyServer
from plinius.tee.policy import Policy
from tests.fixtures import tee_support as ts

HEADER_TIMEOUT = 5.0  # what the server promises (tee._http.HEADER_TIMEOUT)
PER_CLIENT = 16  # tee._http.MAX_CONNECTIONS_PER_CLIENT


def _addr(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _connect(addr: tuple[str, int], source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(addr, timeout=10, source_address=(source, 0))


def _read_until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection (or ``deadline``): data, closed."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def _answer(raw: bytes) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of a raw HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _raw(addr: tuple[str, int], request: bytes, source: str = "127.0.0.1") -> bytes:
    with _connect(addr, source) as s:
        s.sendall(request)
        data, closed = _read_until_closed(s, time.monotonic() + 10)
        assert closed, data
        return data


def _get(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _server(
    tmp_path: Path, cls: type[KeyServer] = KeyServer, **kwargs: Any
) -> tuple[KeyServer, Path]:
    audit = tmp_path / "audit.jsonl"
    server = cls(
        MasterKey.generate(),
        Policy.parse(ts.SIM_POLICY),
        Ed25519PrivateKey.generate(),
        audit_log=AuditLog(audit),
        **kwargs,
    )
    return server, audit


def _refusals(events: list[dict[str, Any]], code: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "refusal" and e.get("code") == code]


@contextlib.contextmanager
def _sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


# -- Item 8: slow and idle clients ---------------------------------------------------------


def test_slow_clients_cannot_starve_legitimate_requests(tmp_path: Path) -> None:
    """80 slow clients (40 idle, 40 trickling a header byte a second) from 10 addresses."""
    with ts.keyserver_process(tmp_path / "ks") as srv, _sockets() as slow:
        addr = _addr(srv.url)
        opened_at = time.monotonic()
        for i in range(80):
            slow.append(_connect(addr, f"127.0.0.{2 + i % 10}"))
        trickling = slow[40:]  # and slow[:40] stay idle
        for s in trickling:
            s.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(1.0):
                for s in trickling:
                    with contextlib.suppress(OSError):
                        s.send(b"a")

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            time.sleep(1.0)  # the server has accepted them all; the trickle is going
            latencies = []
            for _ in range(5):
                for method, path in (("GET", "/v1/info"), ("POST", "/v1/nonce")):
                    start = time.monotonic()
                    status, body = _get(srv.url + path, method, b"{}" if method == "POST" else None)
                    latencies.append(time.monotonic() - start)
                    assert status == 200, (path, status, body)
            assert max(latencies) < 3.0, latencies
            # ... while every slow client was still connected.
            readable, _, _ = select.select(slow, [], [], 0)
            assert readable == []
            # Then the server closes each of them once the header timeout has passed.
            deadline = opened_at + HEADER_TIMEOUT + 5
            for s in slow:
                data, closed = _read_until_closed(s, deadline)
                assert closed, "a slow client was not closed"
                if data:
                    assert data.startswith(b"HTTP/1.1 408 "), data
            assert time.monotonic() - opened_at >= HEADER_TIMEOUT - 0.5
        finally:
            stop.set()
            thread.join()
        events = srv.events()
        assert len(_refusals(events, "idle_timeout")) == 40
        assert len(_refusals(events, "header_timeout")) == 40
        line = _refusals(events, "header_timeout")[0]
        assert line["status"] == 408 and line["client"].startswith("127.0.0.")
        assert line["path"] == "/v1/info"


def test_one_client_address_cannot_take_every_connection(tmp_path: Path) -> None:
    with ts.keyserver_process(tmp_path / "ks") as srv, _sockets() as held:
        addr = _addr(srv.url)
        for _ in range(PER_CLIENT):
            held.append(_connect(addr, "127.0.0.20"))
        extra = _connect(addr, "127.0.0.20")
        held.append(extra)
        data, closed = _read_until_closed(extra, time.monotonic() + 3)
        assert closed, "the connection over the per-client cap was kept"
        status, body = _answer(data)
        assert (status, body["error"]) == (503, "too_many_connections_from_client")
        # Other addresses are served meanwhile.
        assert _get(srv.url + "/v1/info")[0] == 200
        line = _refusals(srv.events(), "too_many_connections_from_client")
        assert len(line) == 1 and line[0]["client"] == "127.0.0.20"
        assert line[0]["status"] == 503


# -- Item 9: every refusal leaves one audit line --------------------------------------------


def test_every_http_level_refusal_is_audited(tmp_path: Path) -> None:
    with ts.keyserver_process(tmp_path / "ks") as srv:
        addr = _addr(srv.url)
        cases: list[tuple[bytes, int, str, str | None]] = [
            # request, status, code, path in the audit line
            (
                b"GET /v2/anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                404,
                "not_found",
                "/v2/anything",
            ),
            (
                b"GET /v1/release HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                405,
                "method_not_allowed",
                "/v1/release",
            ),
            (
                b"POST /v1/nonce HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Length: 2000\r\n\r\n" + b"x" * 2000,
                413,
                "too_large",
                "/v1/nonce",
            ),
            (
                b"POST /v1/nonce HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"x" * 2000 + b"\r\n0\r\n\r\n",
                413,
                "too_large",
                "/v1/nonce",
            ),
            (b"THIS IS NOT HTTP\r\n\r\n", 400, "bad_http", None),
            (b"GET /v1/\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_http", None),
            (
                b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
                431,
                "headers_too_large",
                "/v1/info",
            ),
        ]
        for i, (request, status, code, path) in enumerate(cases):
            source = f"127.0.0.{30 + i}"
            data = _raw(addr, request, source)
            assert data.startswith(f"HTTP/1.1 {status} ".encode()), (i, data[:200])
            lines = [e for e in srv.events() if e.get("client") == source]
            assert len(lines) == 1, (i, lines)
            assert lines[0]["event"] == "refusal" and lines[0]["status"] == status
            assert lines[0]["code"] == code and lines[0].get("path") == path, (i, lines)
        assert srv.key.raw_bytes().hex() not in srv.audit.read_text()


def test_audited_paths_are_bounded_and_escaped(tmp_path: Path) -> None:
    hostile = '/"\\}{%0a' * 10 + "x" * 10_000  # quotes, backslashes, braces; 10 KB
    method = "M" * 5000
    with ts.keyserver_process(tmp_path / "ks") as srv:
        for request in (f"GET {hostile}", f"{method} /v1/info"):
            data = _raw(
                _addr(srv.url),
                f"{request} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
            )
            assert data.startswith((b"HTTP/1.1 404 ", b"HTTP/1.1 405 "))
        text = srv.audit.read_text()
        assert text.count("\n") == 2 and all(len(line) < 1024 for line in text.splitlines())
        first, second = srv.events()
        assert first["code"] == "not_found" and first["path"].startswith('/"\\}{%0a/')
        assert first["path"].endswith("...") and len(first["path"]) <= 203
        assert second["code"] == "method_not_allowed" and len(second["method"]) <= 19


def test_a_full_nonce_store_answers_busy_and_is_audited(tmp_path: Path) -> None:
    server, audit = _server(tmp_path, max_nonces=1)
    with ts.keyserver_thread(server) as url:
        assert _get(url + "/v1/nonce", "POST", b"{}")[0] == 200
        status, body = _get(url + "/v1/nonce", "POST", b"{}")
        assert status == 503 and json.loads(body)["error"] == "busy"
    (line,) = _events(audit)
    assert (line["status"], line["code"], line["path"]) == (503, "busy", "/v1/nonce")
    assert line["client"] == "127.0.0.1" and line["method"] == "POST"
    server.audit.close()


def test_refusals_of_the_counter_endpoint_and_internal_errors_are_audited(
    tmp_path: Path,
) -> None:
    class Crashing(KeyServer):
        def routes(self) -> list[BaseRoute]:
            async def boom(request: Request) -> Response:
                raise RuntimeError("a bug")

            return [*super().routes(), Route("/v1/boom", boom, methods=["GET"])]

    server, audit = _server(tmp_path, Crashing)
    with ts.keyserver_thread(server) as url:
        status, body = _get(url + "/v1/counter", "POST", b"{}")  # no --counter-dir
        assert status == 404 and json.loads(body)["error"] == "counters_disabled"
        assert _get(url + "/v1/boom")[0] == 500
        addr = _addr(url)
        # A client that goes away in the middle of its body.
        with _connect(addr) as s:
            s.sendall(b"POST /v1/nonce HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.5)
        deadline = time.monotonic() + 5
        while len(_events(audit)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    codes = [(e["status"], e["code"], e["path"]) for e in _events(audit)]
    assert codes == [
        (404, "counters_disabled", "/v1/counter"),
        (500, "internal", "/v1/boom"),
        (400, "disconnected", "/v1/nonce"),
    ]
    server.audit.close()


def test_when_every_connection_is_taken_the_longest_waiting_one_makes_room(
    tmp_path: Path,
) -> None:
    server, audit = _server(tmp_path)
    with ts.keyserver_thread(server, connections=6, per_client=3) as url, _sockets() as held:
        addr = _addr(url)
        for i in range(6):
            held.append(_connect(addr, f"127.0.0.{2 + i // 3}"))
            time.sleep(0.05)  # so that held[0] is the one that waited longest
        assert _get(url + "/v1/info")[0] == 200
        data, closed = _read_until_closed(held[0], time.monotonic() + 3)
        assert closed and _answer(data) == (503, {"error": "evicted", "reason": ANY_REASON})
        assert select.select(held[1:], [], [], 0)[0] == []  # the others are still there
    (line,) = _refusals(_events(audit), "evicted")
    assert line["client"] == "127.0.0.2" and line["status"] == 503
    server.audit.close()


def test_when_every_connection_is_busy_a_new_one_is_refused(tmp_path: Path) -> None:
    server, audit = _server(tmp_path)
    with ts.keyserver_thread(server, connections=4, per_client=4) as url, _sockets() as held:
        addr = _addr(url)
        for _ in range(4):  # each waits for a body in the application: not evictable
            held.append(_connect(addr))
            held[-1].sendall(b"POST /v1/release HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        time.sleep(2.0)  # their heads are in: they are in the application
        with _connect(addr, "127.0.0.2") as extra:
            data, closed = _read_until_closed(extra, time.monotonic() + 3)
        assert closed and _answer(data)[0] == 503
        assert _answer(data)[1]["error"] == "too_many_connections"
    assert len(_refusals(_events(audit), "too_many_connections")) == 1
    server.audit.close()


def test_keep_alive_and_pipelining_work_as_before(tmp_path: Path) -> None:
    import http.client

    server, audit = _server(tmp_path)
    with ts.keyserver_thread(server, header_timeout=1.0) as url:
        host, port = _addr(url)
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            for _ in range(3):  # one connection, three requests, each well within the timeout
                conn.request("GET", "/v1/info")
                assert conn.getresponse().read() and conn.sock is not None
                conn.request("POST", "/v1/nonce", b"{}")
                assert json.loads(conn.getresponse().read())["nonce"]
        finally:
            conn.close()
        with _connect((host, port)) as s:  # two pipelined requests in one packet
            s.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
            data, closed = _read_until_closed(s, time.monotonic() + 4)
        # Both answered; then, idle after an answer, closed quietly after the timeout.
        assert closed and data.count(b"HTTP/1.1 200 OK") == 2
    assert _events(audit) == []  # nothing refused, nothing logged
    server.audit.close()


def test_the_header_timeout_also_runs_between_requests(tmp_path: Path) -> None:
    server, audit = _server(tmp_path)
    with ts.keyserver_thread(server, header_timeout=1.0) as url, _sockets() as held:
        addr = _addr(url)
        # A first request answered, then the next one's head trickled.
        held.append(_connect(addr, "127.0.0.2"))
        held[-1].sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/nonce HTTP/1.1\r\n")
        # A body the application never reads (GET), trickled after the answer.
        held.append(_connect(addr, "127.0.0.3"))
        held[-1].sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        start = time.monotonic()
        while time.monotonic() - start < 3.5:
            for s in held:
                with contextlib.suppress(OSError):
                    s.send(b"a")
            time.sleep(0.2)
        for s in held:
            data, closed = _read_until_closed(s, time.monotonic() + 0.5)
            assert closed and data.startswith(b"HTTP/1.1 200 OK"), data
    lines = _refusals(_events(audit), "header_timeout")
    assert sorted(e["client"] for e in lines) == ["127.0.0.2", "127.0.0.3"]
    server.audit.close()


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY_REASON: Any = _Any()


def test_clients_are_counted_by_address_and_ipv6_by_prefix() -> None:
    from plinius.tee._http import client_key as _client_key

    assert _client_key("192.0.2.7") == "192.0.2.7"
    assert _client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert _client_key("2001:db8:1:2::1") == _client_key("2001:db8:1:2:ffff::9")
    assert _client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert _client_key("2001:db8:1:3::1") != _client_key("2001:db8:1:2::1")


def test_clip_bounds_client_chosen_values() -> None:
    from plinius.tee.audit import clip

    assert clip(b"/v1/\xff\n") == "/v1/\\xff\n"
    assert clip("x" * 1000) == "x" * 200 + "..."
    assert clip("short") == "short"
