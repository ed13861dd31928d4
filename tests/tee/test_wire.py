"""Whitespace-padded hex on the wire: ``bytes.fromhex`` skips whitespace.

Before issue 12 four of the five hex decoders checked a field's *length* and
then called ``bytes.fromhex``: a field of the right length padded with spaces
passed the check and decoded to fewer bytes than the protocol says (a 31-byte
nonce, a 63-byte report data). Each test below sends such a field to one entry
point that accepted it then, and checks that it is refused at parsing now, with
that endpoint's usual error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from plinius._hexutil import hex_exact
from plinius.crypto import MasterKey
from plinius.errors import AttestationError, ConfigError, KeyReleaseError
from plinius.tee import _wire, detect_platform, request_master_key
from plinius.tee.audit import AuditLog
from plinius.tee.counter_service import CounterStore, counter_auth_key, counter_request
from plinius.tee.evidence import Evidence, collect_evidence
from plinius.tee.keyserver import KeyServer
from plinius.tee.policy import Policy
from plinius.tee.protocol import (
    parse_server_public_key,
    public_key_hex,
    report_data_binding,
    unwrap_master_key,
    wrap_master_key,
)


def padded(hex_text: str) -> str:
    """Same length, whitespace inside: ``bytes.fromhex`` decodes one byte less."""
    return hex_text[:10] + "  " + hex_text[12:]


def test_padding_really_fooled_a_length_check() -> None:
    text = padded("ab" * 32)
    assert len(text) == 64 and len(bytes.fromhex(text)) == 31  # the old decoders' blind spot


@pytest.mark.parametrize(
    "text",
    [
        padded("ab" * 4),
        " " + "ab" * 3 + "a",
        "ab" * 3 + "a\n",
        "\tab" + "ab" * 2 + "a",
        "0x" + "ab" * 3,
        "+" + "ab" * 3 + "a",
        "ab" * 3 + "g0",
        "ab" * 3,
        "ab" * 5,
        "ab" * 3 + "\u0660\u0661",  # Arabic-Indic digits: not hex
    ],
)
def test_hex_exact_takes_hex_digits_only(text: str) -> None:
    with pytest.raises(ValueError):
        hex_exact(text, 4)


def test_hex_exact_takes_both_cases() -> None:
    assert hex_exact("aBcD0f19", 4) == bytes.fromhex("abcd0f19")


# --- the key server: a release request -----------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> KeyServer:
    return KeyServer(
        MasterKey.generate(),
        Policy.parse("allow_simulation = true\n"),
        Ed25519PrivateKey.generate(),
        audit_log=AuditLog(tmp_path / "audit.jsonl"),
    )


def _release_request(server: KeyServer, tmp_path: Path) -> tuple[dict[str, Any], bytes]:
    _, issued = server.issue_nonce()
    nonce = bytes.fromhex(issued["nonce"])
    pub = X25519PrivateKey.generate().public_key().public_bytes_raw()
    sim = detect_platform(tmp_path / "no-attestation", tmp_path / "no-tsm")
    evidence = collect_evidence(sim, report_data_binding(nonce, pub, "job"))
    req = {
        "version": 1,
        "job_id": "job",
        "nonce": nonce.hex(),
        "client_public_key": pub.hex(),
        "evidence": evidence.to_json(),
    }
    return req, nonce


@pytest.mark.parametrize("field", ["nonce", "client_public_key"])
def test_release_request_with_padded_hex_is_a_bad_request(
    server: KeyServer, tmp_path: Path, field: str
) -> None:
    req, nonce = _release_request(server, tmp_path)
    req[field] = padded(req[field])
    status, body = server.release(json.dumps(req).encode(), "test")
    # Before: parsed as 31 bytes, refused later as an unknown nonce (403) or a bad key.
    assert (status, body["error"]) == (400, "bad_request"), body
    assert body["reason"] == f"{field} is not valid hex"
    assert nonce in server.nonces._live  # refused before the nonce is looked at


@pytest.mark.parametrize("field", ["report_data", "measurement"])
def test_evidence_with_padded_hex_is_refused(server: KeyServer, tmp_path: Path, field: str) -> None:
    req, _ = _release_request(server, tmp_path)
    evidence = req["evidence"]
    evidence[field] = padded(evidence[field])
    # Before: an Evidence with 63 bytes of report data or a 31-byte measurement.
    with pytest.raises(AttestationError, match=f"evidence field {field} is not valid hex"):
        Evidence.from_json(evidence)
    status, body = server.release(json.dumps(req).encode(), "test")
    assert (status, body["error"]) == (403, "attestation")
    assert f"evidence field {field} is not valid hex" in body["reason"]


# --- the client: the key server's answers ----------------------------------------------------


def test_client_refuses_a_padded_nonce(
    server: KeyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []

    def post(self: Any, url: str, data: bytes) -> tuple[int, dict[str, Any]]:
        sent.append(url)
        return 200, {"version": 1, "nonce": padded("ab" * 32), "expires_in": 60}

    monkeypatch.setattr(_wire.Http, "post", post)
    sim = detect_platform(tmp_path / "no-attestation", tmp_path / "no-tsm")
    # Before: the client bound evidence to a 31-byte nonce and sent it.
    with pytest.raises(KeyReleaseError, match="the key server sent no valid nonce"):
        request_master_key("http://ks", server.public_key_hex, job_id="job", platform=sim)
    assert sent == ["http://ks/v1/nonce"]


@pytest.mark.parametrize("field", ["server_ephemeral_public_key", "wrap_nonce", "wrapped_key"])
def test_client_refuses_padded_hex_in_a_wrapped_key(field: str) -> None:
    client = X25519PrivateKey.generate()
    nonce = bytes(32)
    fields = wrap_master_key(
        MasterKey.generate(), client.public_key().public_bytes_raw(), job_id="job", nonce=nonce
    )
    fields[field] = padded(fields[field])
    with pytest.raises(KeyReleaseError, match=f"field {field} is not valid hex"):
        unwrap_master_key(client, fields, job_id="job", nonce=nonce)


def test_a_padded_server_public_key_is_refused() -> None:
    key = public_key_hex(Ed25519PrivateKey.generate())
    assert parse_server_public_key(f" {key}\n")  # a pasted line, as before
    with pytest.raises(ConfigError, match="64 hex digits"):
        parse_server_public_key(key[:10] + " " + key[10:])
    with pytest.raises(ConfigError, match="64 hex digits"):
        parse_server_public_key(padded(key))


# --- the key server: a counter request (already strict; kept so) -----------------------------


@pytest.mark.parametrize("field", ["nonce", "mac"])
def test_counter_request_with_padded_hex_is_a_bad_request(tmp_path: Path, field: str) -> None:
    key = MasterKey.generate()
    store = CounterStore(tmp_path / "counters")
    server = KeyServer(
        key,
        Policy.parse("allow_simulation = true\n"),
        Ed25519PrivateKey.generate(),
        audit_log=AuditLog(tmp_path / "audit.jsonl"),
        counters=store,
    )
    try:
        req = counter_request(
            counter_auth_key(key, "job"), job_id="job", op="read", nonce=bytes(32)
        )
        assert server.counter(json.dumps(req).encode())[0] == 200
        req[field] = padded(req[field])
        status, body = server.counter(json.dumps(req).encode())
        assert (status, body["error"]) == (400, "bad_request"), body
        assert body["reason"] == f"{field} is not valid hex"
    finally:
        store.close()
