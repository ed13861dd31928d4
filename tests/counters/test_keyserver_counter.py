"""The key server's per-job freshness counter, attacked as the host would attack it.

Most tests run against `plinius keyserver --counter-dir` as a subprocess over
loopback; the network attacker (who drops, replays, forges and redirects
answers) is played by wrapping the client's transport. A few server-side
failures (damaged state, a failing audit log) are driven in-process.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from plinius.counters import Counter, KeyServerCounter
from plinius.crypto import MasterKey
from plinius.errors import ConfigError, KeyReleaseError, RollbackError, StorageError
from plinius.tee.audit import AuditLog
from plinius.tee.counter_service import (
    COUNTER_DOMAIN,
    CounterStore,
    counter_auth_key,
    counter_request,
)
from plinius.tee.keyserver import KeyServer
from plinius.tee.policy import Policy
from plinius.tee.protocol import RELEASE_DOMAIN, public_key_hex, sign_json
from tests.conftest import run_cli
from tests.fixtures import tee_support as ts
from tests.fixtures.tee_support import KeyServerProcess as Server

Post = Callable[[bytes], tuple[int, dict[str, Any]]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with ts.keyserver_process(tmp_path_factory.mktemp("counter-server")) as srv:
        yield srv


def intercept(counter: KeyServerCounter, attack: Callable[[Post, bytes], Any]) -> None:
    """Put the network attacker between ``counter`` and the server."""
    real: Post = counter._post
    counter._post = lambda data: attack(real, data)  # type: ignore[method-assign]


def resign(server: Server, answer: dict[str, Any], **changes: Any) -> dict[str, str]:
    """A genuine answer with fields changed, signed again with the real server identity."""
    payload = json.loads(base64.b64decode(answer["payload"]))
    return sign_json(server.identity, {**payload, **changes}, COUNTER_DOMAIN)


# ------------------------------------------------------------------ the protocol
def test_counter_protocol_and_new_job_reads_zero(server: Server) -> None:
    c = server.counter("new-job")
    assert isinstance(c, Counter) and c.trusted and not c.wears
    assert c.read() == 0
    assert not (
        server.counter_dir / CounterStore.file_name("new-job")
    ).exists()  # reads create nothing


def test_increments_are_monotonic_and_audited(server: Server) -> None:
    c = server.counter("mono")
    assert [c.increment() for _ in range(4)] == [1, 2, 3, 4]
    assert c.read() == 4
    fresh = server.counter("mono")  # a new process: nothing cached, reads first
    assert fresh.increment() == 5 and c.read() == 5
    advances = [
        e for e in server.events() if e["event"] == "counter-advance" and e["job_id"] == "mono"
    ]
    assert [(e["from"], e["to"]) for e in advances] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert all(e["client"] == "127.0.0.1" for e in advances)


def test_jobs_are_isolated(server: Server) -> None:
    a, b = server.counter("iso-a"), server.counter("iso-b")
    a.increment()
    a.increment()
    assert (a.read(), b.read()) == (2, 0)
    b.increment()
    assert (a.read(), b.read()) == (2, 1)


def test_counters_survive_a_server_restart(tmp_path: Path) -> None:
    with ts.keyserver_process(tmp_path) as first:
        c = first.counter("durable")
        for _ in range(3):
            c.increment()
    assert first.proc.returncode is not None  # stopped
    # same key, identity and counter directory
    with ts.keyserver_process(tmp_path) as second:
        assert second.pubkey == first.pubkey
        c2 = second.counter("durable")
        assert c2.read() == 3 and c2.increment() == 4
        state = json.loads((tmp_path / "counters" / CounterStore.file_name("durable")).read_text())
        assert state == {"format": "plinius-counter", "version": 1, "job_id": "durable", "value": 4}
        assert not [p for p in (tmp_path / "counters").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ request authentication
def test_a_client_with_another_key_is_refused(server: Server) -> None:
    server.counter("victim").increment()
    intruder = server.counter("victim", key=MasterKey.generate())
    for op in (intruder.read, intruder.increment, lambda: intruder.advance_to(2)):
        with pytest.raises(KeyReleaseError, match=r"403 unauthorized.*master key"):
            op()
    assert server.counter("victim").read() == 1
    assert any(
        e["event"] == "counter-refusal" and e["code"] == "unauthorized" and e["job_id"] == "victim"
        for e in server.events()
    )


def test_a_mac_for_another_job_or_operation_is_refused(server: Server) -> None:
    auth_b = counter_auth_key(server.key, "job-b")
    nonce = os.urandom(32)
    req = counter_request(auth_b, job_id="job-b", op="advance", nonce=nonce, target=1)
    for edit in ({"job_id": "job-a"}, {"target": 2}, {"nonce": os.urandom(32).hex()}):
        status, body = server.post({**req, **edit})
        assert (status, body["error"]) == (403, "unauthorized"), edit
    read = counter_request(auth_b, job_id="job-b", op="read", nonce=nonce)
    status, body = server.post({**read, "op": "advance", "target": 1})
    assert (status, body["error"]) == (403, "unauthorized")
    assert server.post(req)[0] == 200  # the untouched request is fine


def test_advance_beyond_current_plus_one_is_refused(server: Server) -> None:
    c = server.counter("gap")
    c.increment()
    with pytest.raises(KeyReleaseError, match=r"409 counter_gap.*at 1"):
        c.advance_to(3)
    assert c.read() == 1
    with pytest.raises(ConfigError, match="integer from 1"):
        c.advance_to(0)


def test_a_retried_advance_is_harmless(server: Server) -> None:
    c = server.counter("retry")
    c.increment()
    auth = counter_auth_key(server.key, "retry")
    raw = json.dumps(
        counter_request(auth, job_id="retry", op="advance", nonce=os.urandom(32), target=2)
    ).encode()
    answers = [server.post(raw) for _ in range(3)]  # the same request three times
    values = [json.loads(base64.b64decode(b["payload"])) for _, b in answers]
    assert [(v["value"], v["advanced"]) for v in values] == [(2, True), (2, False), (2, False)]
    assert c.read() == 2
    assert c.advance_to(1) == 2  # an old target changes nothing


def test_a_lost_response_is_retried_without_a_double_advance(server: Server) -> None:
    c = server.counter("lost")
    c.increment()
    dropped: list[tuple[int, dict[str, Any]]] = []

    def drop_first_answer(real: Post, data: bytes) -> tuple[int, dict[str, Any]]:
        answer = real(data)  # the server did advance...
        if not dropped:
            dropped.append(answer)  # ...but the answer never arrives
            raise KeyReleaseError("connection lost") from ConnectionResetError()
        return answer

    intercept(c, drop_first_answer)
    assert c.increment() == 2 and dropped
    assert server.counter("lost").read() == 2  # not 3: the mirror would call that a rollback


def test_refusals_and_bad_answers_are_not_retried(server: Server) -> None:
    c = server.counter("no-retry")
    calls = []

    def forged(real: Post, data: bytes) -> tuple[int, dict[str, Any]]:
        calls.append(data)
        return 200, {"payload": "e30=", "signature": "00" * 64}

    intercept(c, forged)
    with pytest.raises(KeyReleaseError, match="not signed by the configured"):
        c.read()
    assert len(calls) == 1


# ------------------------------------------------------------------ response authentication
def test_a_forged_response_is_refused(server: Server) -> None:
    c = server.counter("forged")
    impostor = Ed25519PrivateKey.generate()

    def forge(real: Post, data: bytes) -> tuple[int, dict[str, Any]]:
        status, answer = real(data)
        payload = json.loads(base64.b64decode(answer["payload"]))
        return status, sign_json(impostor, {**payload, "value": 0}, COUNTER_DOMAIN)

    intercept(c, forge)
    with pytest.raises(KeyReleaseError, match="not signed by the configured"):
        c.read()


def test_a_tampered_response_is_refused(server: Server) -> None:
    server.counter("tampered").increment()
    c = server.counter("tampered")

    def tamper(real: Post, data: bytes) -> tuple[int, dict[str, Any]]:
        status, answer = real(data)
        payload = json.loads(base64.b64decode(answer["payload"]))
        edited = json.dumps({**payload, "value": 0}, sort_keys=True, separators=(",", ":"))
        return status, {**answer, "payload": base64.b64encode(edited.encode()).decode()}

    intercept(c, tamper)
    with pytest.raises(KeyReleaseError, match="not signed by the configured"):
        c.read()


def test_a_response_signed_in_another_domain_is_refused(server: Server) -> None:
    c = server.counter("domain")

    def other_domain(real: Post, data: bytes) -> tuple[int, dict[str, Any]]:
        status, answer = real(data)
        payload = json.loads(base64.b64decode(answer["payload"]))
        return status, sign_json(server.identity, payload, RELEASE_DOMAIN)

    intercept(c, other_domain)
    with pytest.raises(KeyReleaseError, match="not signed by the configured"):
        c.read()


def test_a_replayed_response_is_refused(server: Server) -> None:
    c = server.counter("replay")
    c.increment()
    recorded: list[tuple[int, dict[str, Any]]] = []

    def record(real: Post, data: bytes) -> tuple[int, dict[str, Any]]:
        recorded.append(real(data))
        return recorded[-1]

    intercept(c, record)
    assert c.read() == 1
    c.increment()  # the counter is now 2; the host replays the answer that said 1
    intercept(c, lambda real, data: recorded[0])
    with pytest.raises(KeyReleaseError, match=r"does not answer this request \(nonce\)"):
        c.read()


@pytest.mark.parametrize(
    ("field", "value"),
    [("job_id", "other-job"), ("op", "advance"), ("type", "key-release"), ("target", 9)],
)
def test_a_genuine_signature_over_another_request_is_refused(
    server: Server, field: str, value: Any
) -> None:
    # Signed by the real server and carrying this request's nonce: only the
    # other fields say it answers something else (another job's counter, say).
    c = server.counter("fields")
    intercept(c, lambda real, data: (200, resign(server, real(data)[1], **{field: value})))
    with pytest.raises(KeyReleaseError, match=rf"does not answer this request \({field}\)"):
        c.read()


def test_an_answer_below_the_target_is_refused(server: Server) -> None:
    c = server.counter("below")
    c.read()
    intercept(c, lambda real, data: (200, resign(server, real(data)[1], value=0)))
    with pytest.raises(KeyReleaseError, match="answered 0 to an advance to 1"):
        c.increment()


def test_a_counter_rolled_back_on_the_server_is_a_rollback(server: Server) -> None:
    c = server.counter("rewound")
    for _ in range(3):
        c.increment()
    state = server.counter_dir / CounterStore.file_name("rewound")
    state.write_text(json.dumps({"format": "plinius-counter", "version": 1,
                                 "job_id": "rewound", "value": 1}))  # fmt: skip
    with pytest.raises(RollbackError, match="went back from 3 to 1"):
        c.read()
    with pytest.raises(RollbackError, match="below the value 3 it signed earlier"):
        c.increment()


# ------------------------------------------------------------------ bad requests
@pytest.mark.parametrize(
    ("edit", "code"),
    [
        ({"version": "1"}, "bad_version"),
        ({"version": True}, "bad_version"),
        ({"op": "increment"}, "bad_request"),
        ({"job_id": "../etc"}, "bad_request"),
        ({"job_id": 7}, "bad_request"),
        ({"nonce": "00" * 31}, "bad_request"),
        ({"nonce": "zz" * 32}, "bad_request"),
        ({"nonce": " 0" * 32}, "bad_request"),
        ({"mac": "00" * 16}, "bad_request"),
        ({"target": 0}, "bad_request"),
        ({"target": -1}, "bad_request"),
        ({"target": True}, "bad_request"),
        ({"target": 1.0}, "bad_request"),
        ({"target": 1 << 63}, "bad_request"),
        ({"extra": 1}, "bad_request"),
    ],
)
def test_malformed_requests_are_refused(server: Server, edit: dict[str, Any], code: str) -> None:
    auth = counter_auth_key(server.key, "malformed")
    req = counter_request(auth, job_id="malformed", op="advance", nonce=os.urandom(32), target=1)
    status, body = server.post({**req, **edit})
    assert (status, body["error"]) == (400, code), body
    assert server.counter("malformed").read() == 0


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[]", b'{"op": "read"}', b"\xff\xfe", b"[" * 600]
)
def test_non_requests_are_refused(server: Server, body: bytes) -> None:
    status, answer = server.post(body)
    assert (status, answer["error"]) == (400, "bad_request")


def test_oversized_requests_are_refused(server: Server) -> None:
    auth = counter_auth_key(server.key, "big")
    req = counter_request(auth, job_id="big", op="read", nonce=os.urandom(32))
    status, body = server.post(json.dumps({**req, "pad": "x" * 2000}).encode())
    assert (status, body["error"]) == (413, "too_large")
    assert server.post(req)[0] == 200  # the server still answers


# ------------------------------------------------------------------ server side, in process
def in_process(tmp_path: Path, counters: bool = True) -> KeyServer:
    store = CounterStore(tmp_path / "counters") if counters else None
    return KeyServer(
        MasterKey.generate(),
        Policy.parse("allow_simulation = true\n"),
        Ed25519PrivateKey.generate(),
        audit_log=AuditLog(tmp_path / "audit.jsonl"),
        counters=store,
    )


def call(ks: KeyServer, job: str, op: str = "read", target: int | None = None) -> tuple[int, Any]:
    auth = counter_auth_key(ks._master, job)
    req = counter_request(auth, job_id=job, op=op, nonce=os.urandom(32), target=target)
    return ks.counter(json.dumps(req).encode(), "test")


def test_a_server_without_counter_dir_says_how_to_enable_it(tmp_path: Path) -> None:
    status, body = call(in_process(tmp_path, counters=False), "j")
    assert (status, body["error"]) == (404, "counters_disabled")
    assert "--counter-dir" in body["reason"]


def test_a_damaged_state_file_is_refused_never_zero(tmp_path: Path) -> None:
    ks = in_process(tmp_path)
    assert call(ks, "j", "advance", 1)[0] == 200
    state = tmp_path / "counters" / CounterStore.file_name("j")
    for damage in (
        b"",
        b"{",
        b'{"format": "plinius-counter"}',
        state.read_bytes().replace(b'"j"', b'"k"'),
    ):
        state.write_bytes(damage)
        status, body = call(ks, "j")
        assert (status, body["error"]) == (500, "counter_state"), damage
        assert call(ks, "j", "advance", 1)[0] == 500
    refusal = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()][-1]
    assert "damaged" in refusal["detail"] and "belongs to job 'k'" in refusal["detail"]


def test_an_advance_that_cannot_be_audited_does_not_happen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ks = in_process(tmp_path)

    def broken(event: dict[str, Any]) -> None:
        raise StorageError("disk full")

    monkeypatch.setattr(ks.audit, "write", broken)
    status, body = call(ks, "j", "advance", 1)
    assert (status, body["error"]) == (500, "audit")
    monkeypatch.undo()
    assert json.loads(base64.b64decode(call(ks, "j")[1]["payload"]))["value"] == 0


def test_a_second_server_cannot_share_the_counter_dir(tmp_path: Path) -> None:
    store = CounterStore(tmp_path / "counters")
    with pytest.raises(ConfigError, match="in use by another key server"):
        CounterStore(tmp_path / "counters")
    store.close()
    CounterStore(tmp_path / "counters").close()
    assert oct((tmp_path / "counters").stat().st_mode & 0o777) == oct(0o700)


def test_the_counter_dir_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="cannot use counter directory"):
        CounterStore(tmp_path / "file")


def test_client_configuration_errors(tmp_path: Path) -> None:
    pub = public_key_hex(Ed25519PrivateKey.generate())
    key = MasterKey.generate()
    with pytest.raises(ConfigError, match="job id"):
        KeyServerCounter("http://127.0.0.1:1", pub, job_id="../x", key=key)
    with pytest.raises(ConfigError, match="64 hex digits"):
        KeyServerCounter("http://127.0.0.1:1", "abc", job_id="j", key=key)
    with pytest.raises(ConfigError, match="MasterKey"):
        KeyServerCounter("http://127.0.0.1:1", pub, job_id="j", key=b"k" * 32)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="http://HOST:PORT"):
        KeyServerCounter("ftp://x", pub, job_id="j", key=key)


def test_an_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    pub = public_key_hex(Ed25519PrivateKey.generate())
    c = KeyServerCounter("http://127.0.0.1:9", pub, job_id="j", key=MasterKey.generate(), timeout=2)
    with pytest.raises(KeyReleaseError, match="cannot reach the key server"):
        c.read()


# ------------------------------------------------------------------ with the mirror
def test_mirror_rollback_is_caught_by_the_key_server_counter(server: Server, shm_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    from plinius.mirror import Mirror

    path = shm_dir / "job.plm"

    def mirror(**kw: Any) -> Mirror:
        return Mirror(path, server.key, counter=server.counter("mirror-job"), **kw)

    with mirror() as m:
        for step in (1, 2):
            m.save({"t": torch.full((4,), float(step))}, step=step)
    assert server.counter("mirror-job").read() == 2
    old = path.read_bytes()
    with mirror() as m:
        m.save({"t": torch.full((4,), 3.0)}, step=3)
    assert server.counter("mirror-job").read() == 3
    path.write_bytes(old)  # the host puts the older, authentic copy back
    with pytest.raises(RollbackError, match="older copy"):
        mirror()
    with pytest.raises(RollbackError, match="older copy"):
        mirror(readonly=True)
    path.unlink()  # or deletes the mirror to restart training from scratch
    with pytest.raises(RollbackError, match="counter is at 3"):
        mirror()
    assert not path.exists()
    assert server.counter("mirror-job").read() == 3  # no refused open advanced it


# ------------------------------------------------------------------ the CLI and the whole flow
def test_keyserver_cli_refuses_an_unusable_counter_dir(server: Server, tmp_path: Path) -> None:

    root = server.counter_dir.parent
    (tmp_path / "file").write_text("")
    base = ["keyserver", "--key", str(root / "owner.key"), "--policy", str(root / "policy.toml")]
    base += ["--identity", str(root / "identity.pem"), "--port", "0"]
    r = run_cli(*base, "--counter-dir", str(tmp_path / "file"))
    assert r.exit_code == 2 and "is a file" in r.output
    # the running server holds its directory: a second server must not share it
    r = run_cli(*base, "--counter-dir", str(server.counter_dir))
    assert r.exit_code == 1 and "in use by another key server" in r.output


def test_a_released_key_drives_the_counter(server: Server, tmp_path: Path) -> None:
    from plinius.tee import detect_platform, obtain_master_key

    sim = detect_platform(tmp_path / "no-attestation", tmp_path / "no-tsm")
    key, how = obtain_master_key(
        server.url, server.pubkey, job_id="released", sealed_key_path=None, platform=sim
    )
    assert how == "released"
    c = KeyServerCounter(server.url, server.pubkey, job_id="released", key=key)
    assert (c.read(), c.increment()) == (0, 1)


def test_a_server_outage_after_a_commit_is_finished_on_the_next_open(
    server: Server, shm_dir: Path
) -> None:
    torch = pytest.importorskip("torch")
    from plinius.mirror import Mirror

    path = shm_dir / "outage.plm"
    c = server.counter("outage")
    with Mirror(path, server.key, counter=c) as m:
        m.save({"t": torch.ones(2)}, step=1)

        def down(real: Post, data: bytes) -> tuple[int, dict[str, Any]]:
            raise KeyReleaseError("cannot reach the key server") from ConnectionRefusedError()

        intercept(c, down)
        with pytest.raises(KeyReleaseError, match="cannot reach"):
            m.save({"t": torch.ones(2)}, step=2)  # committed, but the counter stayed at 1
    assert server.counter("outage").read() == 1
    with Mirror(path, server.key, counter=server.counter("outage")) as m:
        assert m.info().step == 2
    assert server.counter("outage").read() == 2
