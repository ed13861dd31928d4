"""The whole key-release protocol over loopback, with `plinius keyserver` as a subprocess.

The job runs in simulation (no TEE here); the server's policy allows simulated
evidence explicitly. Each server started here is stopped by its fixture.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from plinius.crypto import MasterKey
from plinius.errors import ConfigError, KeyReleaseError
from plinius.tee import Platform, detect_platform, obtain_master_key
from plinius.tee.protocol import public_key_hex
from tests.conftest import run_cli
from tests.fixtures import tee_support as ts
from tests.fixtures.tee_support import KeyServerProcess as Server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with ts.keyserver_process(tmp_path_factory.mktemp("keyserver")) as srv:
        yield srv


@pytest.fixture
def sim(tmp_path: Path) -> Platform:
    return detect_platform(tmp_path / "no-attestation", tmp_path / "no-tsm")


def post(url: str, data: bytes, method: str = "POST") -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_release_then_unseal(server: Server, sim: Platform, tmp_path: Path) -> None:
    sealed = tmp_path / "job.sealed"
    key, how = obtain_master_key(
        server.url, server.pubkey, job_id="job-1", sealed_key_path=sealed, platform=sim
    )
    assert (how, key) == ("released", server.key)
    assert sealed.exists() and (tmp_path / "job.sealed.simkey").exists()
    # The restart needs no network: an unreachable URL does not matter.
    key2, how2 = obtain_master_key(
        "http://127.0.0.1:9", server.pubkey, job_id="job-1", sealed_key_path=sealed, platform=sim
    )
    assert (how2, key2) == ("unsealed", server.key)
    events = [json.loads(line) for line in server.audit.read_text().splitlines()]
    assert any(e["event"] == "release" and e["job_id"] == "job-1" for e in events)
    assert server.key.raw_bytes().hex() not in server.audit.read_text()


def test_without_sealed_path_nothing_is_written(
    server: Server, sim: Platform, tmp_path: Path
) -> None:
    key, how = obtain_master_key(
        server.url, server.pubkey, job_id="job-2", sealed_key_path=None, platform=sim
    )
    assert (how, key) == ("released", server.key) and list(tmp_path.iterdir()) == []


def test_response_signed_by_another_server_is_refused(
    server: Server, sim: Platform, tmp_path: Path
) -> None:
    impostor = public_key_hex(Ed25519PrivateKey.generate())
    with pytest.raises(KeyReleaseError, match="not signed by the configured key server"):
        obtain_master_key(
            server.url, impostor, job_id="job-3", sealed_key_path=tmp_path / "s", platform=sim
        )
    assert not (tmp_path / "s").exists()


def test_http_refusals(server: Server) -> None:
    status, body = post(f"{server.url}/v1/release", b"x" * (64 * 1024 + 1))
    assert (status, body["error"]) == (413, "too_large")
    status, body = post(f"{server.url}/v1/release", b"{not json")
    assert (status, body["error"]) == (400, "bad_request")
    status, body = post(f"{server.url}/v1/release", None, method="GET")  # type: ignore[arg-type]
    assert (status, body["error"]) == (405, "method_not_allowed")
    status, body = post(f"{server.url}/v2/anything", b"{}")
    assert (status, body["error"]) == (404, "not_found")
    status, body = post(f"{server.url}/v1/nonce", b"x" * 2000)
    assert status == 413
    status, body = post(f"{server.url}/v1/info", None, method="GET")  # type: ignore[arg-type]
    assert body == {"version": 1, "public_key": server.pubkey}


def test_replay_over_http(server: Server, sim: Platform) -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from plinius.tee import collect_evidence
    from plinius.tee.protocol import report_data_binding

    _, body = post(f"{server.url}/v1/nonce", b"{}")
    nonce = bytes.fromhex(body["nonce"])
    pub = X25519PrivateKey.generate().public_key().public_bytes_raw()
    evidence = collect_evidence(sim, report_data_binding(nonce, pub, "job-4"))
    req = json.dumps(
        {
            "version": 1,
            "job_id": "job-4",
            "nonce": nonce.hex(),
            "client_public_key": pub.hex(),
            "evidence": evidence.to_json(),
        }
    ).encode()
    assert post(f"{server.url}/v1/release", req)[0] == 200
    status, body = post(f"{server.url}/v1/release", req)
    assert (status, body["error"]) == (403, "nonce_replayed")


def test_policy_refusal_reaches_the_client(tmp_path: Path, sim: Platform) -> None:
    with ts.keyserver_process(tmp_path / "srv", "allow_simulation = false\n") as srv:
        with pytest.raises(KeyReleaseError, match=r"refused .*allow_simulation"):
            obtain_master_key(
                srv.url, srv.pubkey, job_id="job-5", sealed_key_path=tmp_path / "s", platform=sim
            )
        [event] = [json.loads(line) for line in srv.audit.read_text().splitlines()]
        assert event["event"] == "refusal" and event["job_id"] == "job-5"


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plinius test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls(tmp_path: Path, sim: Platform) -> None:
    tmp_path.joinpath("tls").mkdir()
    cert, key = _self_signed(tmp_path / "tls")
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    with ts.keyserver_process(tmp_path / "srv", ts.SIM_POLICY, *tls) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        got, how = obtain_master_key(
            srv.url, srv.pubkey, job_id="job-6", sealed_key_path=None, platform=sim, tls_cafile=cert
        )
        assert (got, how) == (srv.key, "released")
        # Without the CA the certificate does not verify.
        with pytest.raises(KeyReleaseError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            obtain_master_key(
                srv.url, srv.pubkey, job_id="job-6", sealed_key_path=None, platform=sim
            )


def test_client_bad_input(sim: Platform, tmp_path: Path) -> None:
    pub = public_key_hex(Ed25519PrivateKey.generate())
    with pytest.raises(ConfigError, match="64 hex digits"):
        obtain_master_key(
            "http://127.0.0.1:9", "abc", job_id="j", sealed_key_path=None, platform=sim
        )
    with pytest.raises(ConfigError, match="must be http"):
        obtain_master_key("ftp://x", pub, job_id="j", sealed_key_path=None, platform=sim)
    with pytest.raises(ConfigError, match="job id"):
        obtain_master_key("http://127.0.0.1:9", pub, job_id="", sealed_key_path=None, platform=sim)
    with pytest.raises(KeyReleaseError, match="cannot reach the key server"):
        obtain_master_key(
            "http://127.0.0.1:9", pub, job_id="j", sealed_key_path=None, platform=sim, timeout=2
        )


def test_keyserver_cli_bad_input(tmp_path: Path) -> None:
    key = tmp_path / "owner.key"
    MasterKey.generate().save(key)
    policy = tmp_path / "policy.toml"
    policy.write_text("allow_simulation = false\n")
    ident = tmp_path / "id.pem"
    base = ["--key", str(key), "--policy", str(policy), "--identity", str(ident)]

    def run(*args: str) -> tuple[int, str]:
        r = run_cli("keyserver", *args)
        return r.exit_code, r.output

    code, out = run(
        "--key", str(tmp_path / "missing"), "--policy", str(policy), "--identity", str(ident)
    )
    assert code == 1 and "does not exist" in out
    bad_policy = tmp_path / "bad.toml"
    bad_policy.write_text("allow_simulation = true\n[sgx]\nmrenclav = []\n")
    code, out = run("--key", str(key), "--policy", str(bad_policy), "--identity", str(ident))
    assert code == 1 and "mrenclav is not a known key" in out
    junk = tmp_path / "junk.pem"
    junk.write_text("not a PEM\n")
    junk.chmod(0o600)
    code, out = run(*base, "--tls-cert", str(junk))
    assert code == 1 and "both --tls-cert and --tls-key" in out
    code, out = run(*base, "--tls-cert", str(junk), "--tls-key", str(junk))
    assert code == 1 and "cannot load the TLS" in out
    code, out = run(*base, "--verifier", "nonsense")
    assert code == 1 and "unknown verifier" in out
    code, out = run(*base, "--port", "70000")
    assert code == 2
    code, out = run(*base, "--host", "203.0.113.7")  # an address this machine does not have
    assert code == 1 and "cannot listen on 203.0.113.7" in out
    # The identity file was created 0600 by the runs above; widen it and it is refused.
    assert ident.stat().st_mode & 0o777 == 0o600
    ident.chmod(0o644)
    code, out = run(*base)
    assert code == 1 and "accessible by group or others" in out
    ident.chmod(0o600)
    code, out = run("--key", str(key), "--policy", str(policy), "--identity", str(junk))
    assert code == 1 and "not a PEM Ed25519 private key" in out
    # The key file as the identity: one file, two options (tests/cli/test_path_collisions.py).
    code, out = run("--key", str(key), "--policy", str(policy), "--identity", str(key))
    assert code == 2 and "--key and --identity name the same file" in out
