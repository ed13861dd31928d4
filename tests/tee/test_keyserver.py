"""The key server's protocol logic, driven in-process as an attacker would drive it.

Hardware evidence comes from prepared trees (Gramine's /dev/attestation and the
kernel's configfs-tsm, laid out as documented; see ``tests.fixtures.tee_support``)
and is accepted only through a stand-in verifier, since no SGX or TDX hardware
and no Intel collateral exist here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from plinius.crypto import MasterKey
from plinius.errors import AttestationError, KeyReleaseError
from plinius.tee import Platform, collect_evidence, detect_platform, simulation_measurement
from plinius.tee._wire import Refusal
from plinius.tee.audit import AuditLog
from plinius.tee.keyserver import KeyServer, NonceStore
from plinius.tee.policy import Policy
from plinius.tee.protocol import (
    open_release_response,
    report_data_binding,
    unwrap_master_key,
)
from plinius.tee.verify import VerificationResult
from tests.fixtures import tee_support as ts

SIM_POLICY = "allow_simulation = true\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeVerifier:
    """Stands in for dcap-qvl: accepts every quote with a chosen TCB status."""

    name = "fake"

    def __init__(self, status: str = "UpToDate") -> None:
        self.status = status
        self.seen: list[str] = []

    def verify(self, kind: str, blob: bytes, auxblob: bytes) -> VerificationResult:
        self.seen.append(kind)
        return VerificationResult(self.name, self.status)


class Harness:
    def __init__(self, tmp_path: Path, policy: str, verifier: Any = None, ttl: float = 30) -> None:
        self.key = MasterKey.generate()
        self.identity = Ed25519PrivateKey.generate()
        self.clock = Clock()
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.audit_path = tmp_path / "audit.jsonl"
        self.server = KeyServer(
            self.key,
            Policy.parse(policy),
            self.identity,
            verifier=verifier,
            nonce_ttl=ttl,
            audit_log=AuditLog(self.audit_path),
            clock=self.clock,
        )
        self.sim = detect_platform(tmp_path / "no-attestation", tmp_path / "no-tsm")

    def nonce(self) -> bytes:
        status, body = self.server.issue_nonce()
        assert status == 200
        return bytes.fromhex(body["nonce"])

    def request(
        self,
        platform: Platform | None = None,
        *,
        job_id: str = "job-1",
        nonce: bytes | None = None,
        bind_pub: bytes | None = None,
        bind_job: str | None = None,
        edit: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[dict[str, Any], X25519PrivateKey, bytes]:
        nonce = self.nonce() if nonce is None else nonce
        priv = X25519PrivateKey.generate()
        pub = priv.public_key().public_bytes_raw()
        rd = report_data_binding(nonce, bind_pub or pub, bind_job or job_id)
        evidence = collect_evidence(platform or self.sim, rd)
        req = {
            "version": 1,
            "job_id": job_id,
            "nonce": nonce.hex(),
            "client_public_key": pub.hex(),
            "evidence": evidence.to_json(),
        }
        if edit:
            edit(req)
        return req, priv, nonce

    def send(self, req: dict[str, Any] | bytes) -> tuple[int, dict[str, Any]]:
        body = req if isinstance(req, bytes) else json.dumps(req).encode()
        return self.server.release(body, "127.0.0.1")

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


def refused(result: tuple[int, dict[str, Any]], status: int, code: str, reason: str = "") -> None:
    got_status, body = result
    assert (got_status, body["error"]) == (status, code), body
    assert reason in body["reason"]


def test_release_in_simulation(tmp_path: Path) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    req, priv, nonce = h.request()
    status, body = h.send(req)
    assert status == 200
    payload = open_release_response(h.identity.public_key(), body)
    assert payload["job_id"] == "job-1" and payload["nonce"] == nonce.hex()
    assert unwrap_master_key(priv, payload, job_id="job-1", nonce=nonce) == h.key
    [event] = h.audit()
    assert event["event"] == "release" and event["job_id"] == "job-1"
    assert h.key.raw_bytes().hex() not in h.audit_path.read_text()


def test_replayed_nonce_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    req, _, _ = h.request()
    assert h.send(req)[0] == 200
    refused(h.send(req), 403, "nonce_replayed")
    assert [e["event"] for e in h.audit()] == ["release", "refusal"]


def test_expired_nonce_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path, SIM_POLICY, ttl=30)
    req, _, _ = h.request()
    h.clock.now += 30.5
    refused(h.send(req), 403, "nonce_expired")


def test_unknown_nonce_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    req, _, _ = h.request(nonce=bytes(32))
    refused(h.send(req), 403, "nonce_unknown")


def test_another_public_key_than_the_bound_one_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    # The evidence binds the victim's key; the attacker sends its own to get the key.
    victim = X25519PrivateKey.generate().public_key().public_bytes_raw()
    req, _, _ = h.request(bind_pub=victim)
    refused(h.send(req), 403, "binding", "does not bind")


def test_another_job_than_the_bound_one_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    req, _, _ = h.request(job_id="job-2", bind_job="job-1")
    refused(h.send(req), 403, "binding")


def test_simulated_evidence_without_allow_simulation_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path, "allow_simulation = false\n")
    req, _, _ = h.request()
    refused(h.send(req), 403, "attestation", "allow_simulation")
    assert h.audit()[0]["code"] == "attestation"


def test_policy_mismatch_is_refused(tmp_path: Path) -> None:
    other = "ab" * 32
    h = Harness(tmp_path, SIM_POLICY + f'[simulation]\nmeasurement = ["{other}"]\n')
    req, _, _ = h.request()
    refused(h.send(req), 403, "attestation", "is not allowed by the policy")
    ours = simulation_measurement().hex()
    h2 = Harness(tmp_path / "2", SIM_POLICY + f'[simulation]\nmeasurement = ["{ours}"]\n')
    assert h2.send(h2.request()[0])[0] == 200


def _gramine(tmp_path: Path, emu: ts.Emulator, **quote_fields: Any) -> Platform:
    emu.gramine_quote = lambda rd: ts.sgx_quote(4, report_data=rd, **quote_fields)
    return detect_platform(ts.gramine_tree(tmp_path / "attestation"), tmp_path / "no-tsm")


SGX_POLICY = f"""allow_simulation = false
[sgx]
mrenclave = ["{"11" * 32}"]
isv_prodid = 1
min_isv_svn = 3
"""


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> ts.Emulator:
    return ts.Emulator(monkeypatch)


def test_hardware_evidence_without_a_verifier_is_refused(tmp_path: Path, emu: ts.Emulator) -> None:
    h = Harness(tmp_path, SGX_POLICY)
    req, _, _ = h.request(_gramine(tmp_path, emu))
    refused(h.send(req), 403, "attestation", "never accepted unverified")


def test_verified_sgx_evidence_is_released(tmp_path: Path, emu: ts.Emulator) -> None:
    verifier = FakeVerifier()
    h = Harness(tmp_path, SGX_POLICY, verifier)
    req, priv, nonce = h.request(_gramine(tmp_path, emu))
    status, body = h.send(req)
    assert status == 200 and verifier.seen == ["sgx-dcap"]
    payload = open_release_response(h.identity.public_key(), body)
    assert unwrap_master_key(priv, payload, job_id="job-1", nonce=nonce) == h.key
    assert h.audit()[0]["tcb_status"] == "UpToDate"


@pytest.mark.parametrize(
    ("fields", "status", "reason"),
    [
        ({"mrenclave": b"\x12" * 32}, "UpToDate", "MRENCLAVE"),
        ({"isv_prodid": 2}, "UpToDate", "product id 2"),
        ({"isv_svn": 2}, "UpToDate", "below the minimum 3"),
        ({"debug": True}, "UpToDate", "debug"),
        ({}, "OutOfDate", "TCB status 'OutOfDate'"),
    ],
)
def test_sgx_policy_refusals(
    tmp_path: Path, emu: ts.Emulator, fields: dict[str, Any], status: str, reason: str
) -> None:
    h = Harness(tmp_path, SGX_POLICY, FakeVerifier(status))
    req, _, _ = h.request(_gramine(tmp_path, emu, **fields))
    refused(h.send(req), 403, "attestation", reason)


def test_tdx_evidence_is_released_and_checked(tmp_path: Path, emu: ts.Emulator) -> None:
    policy = f'allow_simulation = false\n[tdx]\nmrtd = ["{"33" * 48}"]\nrtmr3 = ["{"43" * 48}"]\n'
    platform = detect_platform(tmp_path / "none", ts.tsm_tree(tmp_path / "tsm"))
    h = Harness(tmp_path, policy, FakeVerifier())
    assert h.send(h.request(platform)[0])[0] == 200
    emu.tsm_report = lambda rd: ts.tdx_quote(report_data=rd, rtmrs=(bytes(48),) * 4)
    refused(h.send(h.request(platform)[0]), 403, "attestation", "RTMR3")
    # No [sgx] table: SGX evidence is refused even from a verified quote.
    refused(h.send(h.request(_gramine(tmp_path, emu))[0]), 403, "attestation", "no [sgx] table")


def test_sev_snp_evidence(tmp_path: Path, emu: ts.Emulator) -> None:
    emu.tsm_provider = "sev_guest"
    emu.tsm_report = lambda rd: ts.snp_report(report_data=rd)
    platform = detect_platform(tmp_path / "none", ts.tsm_tree(tmp_path / "tsm"))
    policy = f'allow_simulation = false\n[sev-snp]\nmeasurement = ["{"55" * 48}"]\n'
    h = Harness(tmp_path, policy, FakeVerifier())
    assert h.send(h.request(platform)[0])[0] == 200
    # A nonce issued by another key server is worthless here.
    other = Harness(tmp_path / "other", policy, FakeVerifier())
    refused(h.send(other.request(platform)[0]), 403, "nonce_unknown")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(req: dict[str, Any]) -> None:
        target = req
        *parents, last = path.split(".")
        for p in parents:
            target = target[p]
        target[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "status", "code", "reason"),
    [
        (_set("version", 2), 400, "bad_version", "version 2"),
        (_set("job_id", "../etc"), 400, "bad_request", "job id"),
        (_set("job_id", "x" * 129), 400, "bad_request", "job id"),
        (_set("nonce", "zz" * 32), 400, "bad_request", "nonce is not valid hex"),
        (_set("client_public_key", "00"), 400, "bad_request", "client_public_key"),
        (_set("evidence", "junk"), 403, "attestation", "JSON object"),
        (_set("evidence.kind", "tdx"), 403, "attestation", "unexpected evidence fields"),
        (_set("evidence.platform", "tdx"), 403, "attestation", "does not produce simulated"),
        (_set("extra", 1), 400, "bad_request", "exactly"),
        (_set("client_public_key", "00" * 32), 400, "bad_request", "X25519"),
    ],
    ids=[
        "version",
        "job-path",
        "job-long",
        "nonce-hex",
        "pubkey-short",
        "evidence-type",
        "evidence-kind",
        "evidence-platform",
        "extra-field",
        "low-order-key",
    ],
)
def test_malformed_requests_are_refused(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], status: int, code: str, reason: str
) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    # The all-zero public key is bound honestly, so only the X25519 check can catch it.
    bind = bytes(32) if _probe(edit) == "00" * 32 else None
    req, _, _ = h.request(edit=edit, bind_pub=bind)
    refused(h.send(req), status, code, reason)
    [event] = h.audit()
    assert event["event"] == "refusal" and event["code"] == code


def _probe(edit: Callable[[dict[str, Any]], None]) -> Any:
    req: dict[str, Any] = {"evidence": {}}
    edit(req)
    return req.get("client_public_key")


@pytest.mark.parametrize("body", [b"", b"not json", b"[1,2]", b"\xff\xfe", b"[" * 60_000], ids=str)
def test_non_json_bodies_are_refused(tmp_path: Path, body: bytes) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    status, reply = h.send(body)
    assert status in (400, 413) and reply["error"] in ("bad_request", "too_large")


def test_oversized_request_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    refused(h.send(b" " * (64 * 1024 + 1)), 413, "too_large")


def test_nonce_store_is_bounded() -> None:
    clock = Clock()
    store = NonceStore(ttl=10, capacity=3, clock=clock)
    for _ in range(3):
        store.issue()
    with pytest.raises(Refusal) as info:
        store.issue()
    assert info.value.status == 503
    clock.now += 11  # expired nonces make room again
    store.issue()


def test_response_signed_by_another_server_is_rejected(tmp_path: Path) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    _, body = h.send(h.request()[0])
    with pytest.raises(KeyReleaseError, match="not signed by the configured"):
        open_release_response(Ed25519PrivateKey.generate().public_key(), body)


def test_tampered_response_is_rejected(tmp_path: Path) -> None:
    import base64

    h = Harness(tmp_path, SIM_POLICY)
    _, body = h.send(h.request()[0])
    payload = bytearray(base64.b64decode(body["payload"]))
    for i in (0, len(payload) // 2, len(payload) - 1):
        bad = bytearray(payload)
        bad[i] ^= 0x01
        tampered = {**body, "payload": base64.b64encode(bad).decode()}
        with pytest.raises(KeyReleaseError):
            open_release_response(h.identity.public_key(), tampered)
    sig = bytearray(bytes.fromhex(body["signature"]))
    sig[5] ^= 0x80
    with pytest.raises(KeyReleaseError):
        open_release_response(h.identity.public_key(), {**body, "signature": sig.hex()})
    with pytest.raises(KeyReleaseError):
        open_release_response(h.identity.public_key(), {**body, "extra": "x"})


def test_wrapped_key_opens_only_for_its_job_and_nonce(tmp_path: Path) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    req, priv, nonce = h.request()
    payload = open_release_response(h.identity.public_key(), h.send(req)[1])
    with pytest.raises(KeyReleaseError, match="failed authentication"):
        unwrap_master_key(priv, payload, job_id="job-2", nonce=nonce)
    with pytest.raises(KeyReleaseError, match="failed authentication"):
        unwrap_master_key(priv, payload, job_id="job-1", nonce=bytes(32))
    with pytest.raises(KeyReleaseError, match="failed authentication"):
        unwrap_master_key(X25519PrivateKey.generate(), payload, job_id="job-1", nonce=nonce)


def test_unauditable_release_does_not_happen(tmp_path: Path) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    h.server.audit.close()
    h.server.audit._fd = 999_999  # a descriptor that no longer works: writes fail
    status, body = h.send(h.request()[0])
    assert status == 500 and "payload" not in body


def test_other_signed_messages_never_pass_as_releases(tmp_path: Path) -> None:
    from plinius.tee.protocol import RELEASE_DOMAIN, open_signed_json

    h = Harness(tmp_path, SIM_POLICY)
    counter = h.server.sign({"type": "counter", "value": 3}, b"plinius/v1/counter\0")
    assert open_signed_json(h.identity.public_key(), counter, b"plinius/v1/counter\0") == {
        "type": "counter",
        "value": 3,
    }
    with pytest.raises(KeyReleaseError, match="not signed by the configured"):
        open_release_response(h.identity.public_key(), counter)
    with pytest.raises(ValueError, match="reserved"):
        h.server.sign({}, RELEASE_DOMAIN)


def test_version_must_be_the_integer_one(tmp_path: Path) -> None:
    h = Harness(tmp_path, SIM_POLICY)
    refused(h.send(h.request(edit=_set("version", True))[0]), 400, "bad_version")


def test_a_crashing_verifier_refuses(tmp_path: Path, emu: ts.Emulator) -> None:
    class Broken:
        name = "broken"

        def verify(self, kind: str, blob: bytes, auxblob: bytes) -> VerificationResult:
            raise RuntimeError("collateral cache corrupted")

    h = Harness(tmp_path, SGX_POLICY, Broken())
    refused(h.send(h.request(_gramine(tmp_path, emu))[0]), 500, "internal", "RuntimeError")
    assert "collateral cache corrupted" in h.audit()[0]["detail"]


def test_attestation_errors_are_key_release_errors() -> None:
    assert issubclass(KeyReleaseError, AttestationError)


def _route_client_to(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Send the real client's requests to the in-process server; returns the responses."""
    from plinius.tee import _wire

    responses: list[dict[str, Any]] = []

    def post(self: Any, url: str, data: bytes) -> tuple[int, dict[str, Any]]:
        if url.endswith("/v1/nonce"):
            return h.server.issue_nonce()
        status, body = h.server.release(data, "test")
        responses.append(body)
        return status, body

    monkeypatch.setattr(_wire.Http, "post", post)
    return responses


def test_confidential_vm_asks_the_server_on_every_start(
    tmp_path: Path, emu: ts.Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plinius.tee import obtain_master_key

    policy = f'allow_simulation = false\n[tdx]\nmrtd = ["{"33" * 48}"]\n'
    h = Harness(tmp_path, policy, FakeVerifier())
    _route_client_to(h, monkeypatch)
    tdx = detect_platform(tmp_path / "none", ts.tsm_tree(tmp_path / "tsm"))
    for _ in range(2):
        got = obtain_master_key(
            "http://ks",
            h.server.public_key_hex,
            job_id="j",
            sealed_key_path=tmp_path / "s",
            platform=tdx,
        )
        assert got == (h.key, "released")
    assert not (tmp_path / "s").exists()
    assert [e["event"] for e in h.audit()] == ["release", "release"]


def test_client_refuses_a_genuine_response_to_another_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plinius.tee import _wire, request_master_key

    h = Harness(tmp_path, SIM_POLICY)
    responses = _route_client_to(h, monkeypatch)
    assert (
        request_master_key("http://ks", h.server.public_key_hex, job_id="j", platform=h.sim)
        == h.key
    )
    old = responses[0]
    # A man in the middle replays the server's earlier, genuinely signed answer.
    monkeypatch.setattr(
        _wire.Http,
        "post",
        lambda self, url, data: h.server.issue_nonce() if url.endswith("nonce") else (200, old),
    )
    with pytest.raises(KeyReleaseError, match=r"does not match this request \(nonce\)"):
        request_master_key("http://ks", h.server.public_key_hex, job_id="j", platform=h.sim)


def test_client_reports_the_servers_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from plinius.tee import request_master_key

    h = Harness(tmp_path, "allow_simulation = false\n")
    _route_client_to(h, monkeypatch)
    with pytest.raises(KeyReleaseError, match=r"refused \(403 attestation\): simulated evidence"):
        request_master_key("http://ks", h.server.public_key_hex, job_id="j", platform=h.sim)
