"""The pluggable quote verifier: loading, the dcap-qvl adapter's control flow, refusal without one.

dcap-qvl itself is not installed here (and no hardware quotes or Intel collateral
exist), so the adapter is driven through a stand-in module with the same entry
point (``get_collateral_and_verify``, sync or async, returning ``status``).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from plinius.errors import AttestationError, ConfigError
from plinius.tee.verify import DcapQvlVerifier, load_verifier, require_verified


def fake_qvl(monkeypatch: pytest.MonkeyPatch, result: Any) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []
    mod = types.ModuleType("dcap_qvl")

    def get_collateral_and_verify(*args: Any) -> Any:
        calls.append(args)
        if isinstance(result, Exception):
            raise result
        return result

    mod.get_collateral_and_verify = get_collateral_and_verify  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dcap_qvl", mod)
    return calls


def test_no_verifier_refuses_hardware_evidence() -> None:
    assert load_verifier(None) is None and load_verifier("none") is None
    with pytest.raises(AttestationError, match="never accepted unverified"):
        require_verified(None, "tdx", b"q", b"")


def test_dcap_qvl_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dcap_qvl", None)  # import fails
    with pytest.raises(ConfigError, match="pip install dcap-qvl"):
        load_verifier("dcap-qvl")


def test_dcap_qvl_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    report = types.SimpleNamespace(status="SWHardeningNeeded", advisory_ids=["INTEL-SA-00615"])
    calls = fake_qvl(monkeypatch, report)
    v = load_verifier("dcap-qvl", pccs_url="https://pccs.example")
    r = require_verified(v, "sgx-dcap", b"quote", b"")
    assert (r.verifier, r.tcb_status, r.advisory_ids) == (
        "dcap-qvl",
        "SWHardeningNeeded",
        ("INTEL-SA-00615",),
    )
    assert calls == [(b"quote", "https://pccs.example")]


def test_dcap_qvl_async_result(monkeypatch: pytest.MonkeyPatch) -> None:
    async def later() -> Any:
        return types.SimpleNamespace(status="UpToDate")

    calls = fake_qvl(monkeypatch, later())
    assert DcapQvlVerifier().verify("tdx", b"q", b"").tcb_status == "UpToDate"
    assert calls == [(b"q", "https://api.trustedservices.intel.com")]  # Intel's PCS by default


@pytest.mark.parametrize(
    ("result", "kind", "match"),
    [
        (ValueError("bad signature"), "tdx", "verification failed .*bad signature"),
        (types.SimpleNamespace(status=""), "tdx", "no TCB status"),
        (types.SimpleNamespace(status="UpToDate"), "sev-snp", "cannot verify sev-snp"),
    ],
)
def test_dcap_qvl_failures(
    monkeypatch: pytest.MonkeyPatch, result: Any, kind: str, match: str
) -> None:
    fake_qvl(monkeypatch, result)
    with pytest.raises(AttestationError, match=match):
        DcapQvlVerifier().verify(kind, b"q", b"")


def test_module_factory_verifier() -> None:
    v = load_verifier("tests.fixtures.tee_support:AcceptingVerifier")
    assert v is not None and v.name == "accepting"
    assert require_verified(v, "tdx", b"q", b"").tcb_status == "UpToDate"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nonsense", "unknown verifier"),
        ("no_such_module_xyz:f", "cannot load verifier"),
        ("tests.fixtures.tee_support:nothing", "cannot load verifier"),
        ("tests.fixtures.tee_support:tsm_tree", "factory .* failed"),
        ("types:SimpleNamespace", "did not return a verifier"),
    ],
)
def test_bad_verifier_specs(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_verifier(spec)
