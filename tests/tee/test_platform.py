"""Platform detection, evidence collection and `plinius tee status` against prepared trees.

The trees are laid out as Gramine's attestation documentation (/dev/attestation:
attestation_type, user_report_data, quote, keys/_sgx_mrenclave) and the kernel's
Documentation/ABI/testing/configfs-tsm-report (report/$name/{provider,
generation, inblob, outblob, auxblob}) describe them; ``tests.fixtures.tee_support``
emulates the pseudo-files' side effects (see its docstring).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from plinius.crypto import aad
from plinius.errors import AttestationError
from plinius.tee import collect_evidence, detect_platform, simulation_measurement
from plinius.tee.evidence import Evidence, parse_evidence
from tests.conftest import run_cli
from tests.fixtures import tee_support as ts

RD = hashlib.sha512(b"report data").digest()


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> ts.Emulator:
    return ts.Emulator(monkeypatch)


def roots(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "dev-attestation", tmp_path / "tsm" / "report"


def test_nothing_is_simulation(tmp_path: Path) -> None:
    a, t = roots(tmp_path)
    p = detect_platform(a, t)
    assert p.kind == "simulation" and p.simulated and not p.secure and p.can_seal
    assert "SIMULATION" in p.description and "INSECURE" in p.sealing


def test_environment_variables_locate_the_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = roots(tmp_path)
    ts.gramine_tree(a)
    monkeypatch.setenv("PLINIUS_ATTESTATION_ROOT", str(a))
    monkeypatch.setenv("PLINIUS_TSM_ROOT", str(tmp_path / "none"))
    assert detect_platform().kind == "gramine-sgx"


def test_gramine_sgx(tmp_path: Path) -> None:
    a, t = roots(tmp_path)
    p = detect_platform(ts.gramine_tree(a), t)
    assert (p.kind, p.attestation_type, p.can_seal, p.secure) == ("gramine-sgx", "dcap", True, True)
    assert "_sgx_mrenclave" in p.sealing


def test_gramine_sgx_without_remote_attestation(tmp_path: Path) -> None:
    a, t = roots(tmp_path)
    p = detect_platform(ts.gramine_tree(a, attestation_type="none"), t)
    assert p.kind == "gramine-sgx" and p.can_seal and "remote attestation is off" in p.description
    with pytest.raises(AttestationError, match=r'sgx\.remote_attestation = "dcap"'):
        collect_evidence(p, RD)


def test_gramine_without_sgx(tmp_path: Path) -> None:
    a, t = roots(tmp_path)
    p = detect_platform(ts.gramine_tree(a, attestation_type=None, sgx_key=None), t)
    assert p.kind == "gramine-nosgx" and p.simulated and not p.secure
    ev = collect_evidence(p, RD)
    assert ev.simulated and ev.platform == "gramine-nosgx" and ev.report_data == RD


@pytest.mark.parametrize(("provider", "kind"), [("tdx_guest", "tdx"), ("sev_guest", "sev-snp")])
def test_confidential_vm(tmp_path: Path, emu: ts.Emulator, provider: str, kind: str) -> None:
    a, t = roots(tmp_path)
    emu.tsm_provider = provider
    p = detect_platform(a, ts.tsm_tree(tmp_path / "tsm"))
    assert (p.kind, p.tsm_provider, p.can_seal, p.secure) == (kind, provider, False, True)
    assert "every start" in p.sealing
    assert list(t.iterdir()) == []  # the probe instance was removed


def test_unknown_tsm_provider_is_an_error(tmp_path: Path, emu: ts.Emulator) -> None:
    emu.tsm_provider = "cca_guest"
    with pytest.raises(AttestationError, match="'cca_guest' is not supported"):
        detect_platform(tmp_path / "none", ts.tsm_tree(tmp_path / "tsm"))


def test_gramine_evidence(tmp_path: Path, emu: ts.Emulator) -> None:
    a, t = roots(tmp_path)
    emu.gramine_quote = lambda rd: ts.sgx_quote(4, report_data=rd)
    p = detect_platform(ts.gramine_tree(a), t)
    ev = collect_evidence(p, RD)
    assert (a / "user_report_data").read_bytes() == RD  # written where Gramine reads it
    assert ev.kind == "sgx-dcap" and ev.blob == (a / "quote").read_bytes()
    claims = parse_evidence(Evidence.from_json(ev.to_json()))
    assert claims.report_data == RD


def test_gramine_quote_over_other_report_data_is_refused(tmp_path: Path) -> None:
    # No emulator: the prepared quote is static, as if another thread had attested.
    a, t = roots(tmp_path)
    ts.gramine_tree(a)
    (a / "quote").write_bytes(ts.sgx_quote(report_data=bytes(64)))
    with pytest.raises(AttestationError, match="does not carry the report data"):
        collect_evidence(detect_platform(a, t), RD)


def test_gramine_epid_is_refused(tmp_path: Path) -> None:
    a, t = roots(tmp_path)
    p = detect_platform(ts.gramine_tree(a, attestation_type="epid"), t)
    assert p.kind == "gramine-sgx"
    with pytest.raises(AttestationError, match="epid, not dcap"):
        collect_evidence(p, RD)


def test_tdx_evidence(tmp_path: Path, emu: ts.Emulator) -> None:
    a, _ = roots(tmp_path)
    t = ts.tsm_tree(tmp_path / "tsm")
    p = detect_platform(a, t)
    ev = collect_evidence(p, RD)
    assert ev.kind == "tdx" and parse_evidence(ev).report_data == RD
    assert len(emu.created) == 2 and list(t.iterdir()) == []  # probe and report, both removed


def test_sev_snp_evidence(tmp_path: Path, emu: ts.Emulator) -> None:
    emu.tsm_provider = "sev_guest"
    emu.tsm_report = lambda rd: ts.snp_report(report_data=rd)
    p = detect_platform(tmp_path / "none", ts.tsm_tree(tmp_path / "tsm"))
    ev = collect_evidence(p, RD)
    assert ev.kind == "sev-snp" and ev.auxblob == b"certificate table"
    assert parse_evidence(Evidence.from_json(ev.to_json())).report_data == RD


def test_tsm_race_is_detected_by_generation(tmp_path: Path, emu: ts.Emulator) -> None:
    t = ts.tsm_tree(tmp_path / "tsm")
    p = detect_platform(tmp_path / "none", t)
    emu.extra_writes = 1  # someone else wrote to the instance in between
    with pytest.raises(AttestationError, match="written by someone else"):
        collect_evidence(p, RD)
    assert list(t.iterdir()) == []


def test_tsm_report_over_other_data_is_refused(tmp_path: Path, emu: ts.Emulator) -> None:
    emu.tsm_report = lambda rd: ts.tdx_quote(report_data=bytes(64))
    p = detect_platform(tmp_path / "none", ts.tsm_tree(tmp_path / "tsm"))
    with pytest.raises(AttestationError, match="does not carry the report data"):
        collect_evidence(p, RD)


def test_report_data_must_be_64_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        collect_evidence(detect_platform(tmp_path / "a", tmp_path / "b"), b"short")


def test_simulation_measurement_is_the_documented_hash() -> None:
    import plinius

    pkg = Path(plinius.__file__).resolve().parent
    h = hashlib.sha256(b"plinius/v1/simulation-measurement\0")
    for rel in sorted(
        p.relative_to(pkg).as_posix()
        for p in pkg.rglob("*")
        if p.suffix in (".py", ".cfg") and "__pycache__" not in p.parts
    ):
        h.update(aad(rel, (pkg / rel).read_bytes()))
    # Computed once per process; recompute to compare against files as they are now.
    simulation_measurement.cache_clear()
    assert simulation_measurement() == h.digest()


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ("nope", "JSON object"),
        ({"kind": "magic", "platform": "simulation"}, "unknown evidence kind"),
        ({"kind": "simulation", "platform": "mars"}, "unknown platform"),
        ({"kind": "simulation", "platform": "simulation", "report_data": "00"}, "say so"),
        (
            {"kind": "simulation", "simulated": True, "platform": "tdx"},
            "does not produce simulated",
        ),
        (
            {"kind": "simulation", "simulated": True, "platform": "simulation", "x": 1},
            "unexpected evidence fields: x",
        ),
        (
            {
                "kind": "simulation",
                "simulated": True,
                "platform": "simulation",
                "report_data": "zz",
            },
            "64 bytes in hex",
        ),
        ({"kind": "tdx", "platform": "gramine-sgx", "quote": ""}, "cannot come from"),
        ({"kind": "tdx", "platform": "tdx", "quote": "!!!"}, "not valid base64"),
        ({"kind": "tdx", "platform": "tdx", "quote": "A" * 50_000}, "at most"),
    ],
)
def test_malformed_evidence_json_is_refused(obj: object, match: str) -> None:
    with pytest.raises(AttestationError, match=match):
        Evidence.from_json(obj)


def _status(*args: str) -> str:
    result = run_cli("tee", "status", *args)
    assert result.exit_code == 0, result.output
    return result.output


def test_status_simulation(tmp_path: Path) -> None:
    out = _status("--attestation-root", str(tmp_path / "a"), "--tsm-root", str(tmp_path / "t"))
    assert "platform: simulation" in out and "SIMULATED" in out
    assert f"simulation measurement: {simulation_measurement().hex()}" in out
    assert "WARNING: INSECURE" in out


def test_status_gramine_sgx(tmp_path: Path) -> None:
    a = ts.gramine_tree(tmp_path / "a")
    out = _status("--attestation-root", str(a), "--tsm-root", str(tmp_path / "t"))
    assert "platform: gramine-sgx" in out and "SGX DCAP quote" in out
    assert "asked once" in out and "WARNING" not in out and "measurement" not in out


def test_status_gramine_nosgx(tmp_path: Path) -> None:
    a = ts.gramine_tree(tmp_path / "a", attestation_type=None, sgx_key=None)
    out = _status("--attestation-root", str(a), "--tsm-root", str(tmp_path / "t"))
    assert "platform: gramine-nosgx" in out and "WARNING: INSECURE" in out


@pytest.mark.parametrize(("provider", "kind"), [("tdx_guest", "tdx"), ("sev_guest", "sev-snp")])
def test_status_confidential_vm(tmp_path: Path, emu: ts.Emulator, provider: str, kind: str) -> None:
    emu.tsm_provider = provider
    t = ts.tsm_tree(tmp_path / "tsm")
    out = _status("--attestation-root", str(tmp_path / "a"), "--tsm-root", str(t))
    assert f"platform: {kind}" in out and provider in out
    assert "asked again on every start" in out and "WARNING" not in out


def test_status_unknown_provider_fails_clearly(tmp_path: Path, emu: ts.Emulator) -> None:
    emu.tsm_provider = "weird"
    t = ts.tsm_tree(tmp_path / "tsm")
    result = run_cli("tee", "status", "--attestation-root", "x", "--tsm-root", str(t))
    assert result.exit_code == 1 and "error: configfs-tsm provider 'weird'" in result.output


def test_tee_public_surface() -> None:
    import subprocess
    import sys

    import plinius.tee as tee

    assert tee.__all__ == sorted(tee.__all__)
    for name in tee.__all__:
        assert getattr(tee, name) is not None
    # The client side (inside the TEE) does not pull in the HTTP server.
    code = "import sys, plinius.tee; print('uvicorn' in sys.modules, 'starlette' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
