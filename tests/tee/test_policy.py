"""Release policies: parsing (a malformed policy names its problem) and decisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from plinius.errors import AttestationError, ConfigError
from plinius.tee.evidence import SimulatedReport
from plinius.tee.policy import Policy
from plinius.tee.quotes import parse_sgx_quote, parse_snp_report, parse_tdx_quote
from plinius.tee.verify import VerificationResult
from tests.fixtures import tee_support as ts

OK = VerificationResult("test", "UpToDate")
E = "11" * 32


def test_full_policy_parses(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        f"""
allow_simulation = false
allow_debug = true
accepted_tcb_status = ["UpToDate", "SWHardeningNeeded"]
[sgx]
mrenclave = ["{E}"]
mrsigner = ["{"22" * 32}"]
isv_prodid = 1
min_isv_svn = 2
[tdx]
mrtd = ["{"33" * 48}"]
rtmr0 = ["{"40" * 48}"]
[sev-snp]
measurement = ["{"55" * 48}"]
"""
    )
    p = Policy.load(path)
    assert p.allow_debug and not p.allow_simulation
    assert p.accepted_tcb_status == {"UpToDate", "SWHardeningNeeded"}
    assert p.sgx is not None and p.sgx.mrenclave == {bytes.fromhex(E)} and p.sgx.min_isv_svn == 2
    assert p.tdx is not None and p.tdx.rtmrs[0] is not None and p.tdx.rtmrs[1] is None
    assert p.check(parse_sgx_quote(ts.sgx_quote(debug=True)), OK).startswith("sgx")
    assert p.check(parse_tdx_quote(ts.tdx_quote()), OK).startswith("tdx")
    assert p.check(parse_snp_report(ts.snp_report()), OK).startswith("sev-snp")
    with pytest.raises(AttestationError, match="allow_simulation"):
        p.check(SimulatedReport("simulation", bytes(32), bytes(64)), None)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("allow_simulation = ", "not valid TOML"),
        ("[sgx]\nmrenclave = []", "allow_simulation is missing"),
        ('allow_simulation = "yes"', "allow_simulation must be true or false"),
        ("allow_simulation = true\nallow_simulaton = false", "allow_simulaton is not a known key"),
        ("allow_simulation = false\n[sgx]\nisv_prodid = 1", r"\[sgx\] needs mrenclave"),
        ('allow_simulation = false\n[sgx]\nmrenclave = ["abcd"]', "not 32 bytes in hex"),
        ("allow_simulation = false\n[sgx]\nmrenclave = []", "non-empty list"),
        (f'allow_simulation = false\n[sgx]\nmrenclave = ["{E}"]\nisv_prodid = -1', "0 to 65535"),
        (f'allow_simulation = false\n[sgx]\nmrenclave = ["{E}"]\nmrsinger = ["{E}"]', "mrsinger"),
        (f'allow_simulation = false\n[tdx]\nmrtd = ["{"33" * 48}"]\nrtmr0 = []', "rtmr0 must be"),
        ("allow_simulation = false\n[tdx]\n", r"\[tdx\] needs mrtd"),
        ("allow_simulation = false\n[sev-snp]\n", "needs measurement"),
        ("allow_simulation = false\nsgx = 3", "must be a table"),
        ("allow_simulation = false\n[simulation]\n", "needs allow_simulation = true"),
        ("allow_simulation = false\naccepted_tcb_status = [1]", "list of strings"),
    ],
)
def test_malformed_policies_name_the_problem(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Policy.parse(text)


def test_unreadable_and_binary_policies(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy"):
        Policy.load(tmp_path / "missing.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        Policy.load(tmp_path / "bin.toml")


def test_hardware_claims_need_a_verdict() -> None:
    p = Policy.parse(f'allow_simulation = false\n[sgx]\nmrenclave = ["{E}"]')
    with pytest.raises(AttestationError, match="not verified"):
        p.check(parse_sgx_quote(ts.sgx_quote()), None)


def test_mrsigner_only_policy() -> None:
    p = Policy.parse(f'allow_simulation = false\n[sgx]\nmrsigner = ["{"22" * 32}"]')
    p.check(parse_sgx_quote(ts.sgx_quote(mrenclave=b"\x01" * 32)), OK)
    with pytest.raises(AttestationError, match="MRSIGNER"):
        p.check(parse_sgx_quote(ts.sgx_quote(mrsigner=b"\x01" * 32)), OK)


def test_debug_tds_and_guests_are_refused_by_default() -> None:
    p = Policy.parse(
        f'allow_simulation = false\n[tdx]\nmrtd = ["{"33" * 48}"]\n'
        f'[sev-snp]\nmeasurement = ["{"55" * 48}"]'
    )
    with pytest.raises(AttestationError, match="debug"):
        p.check(parse_tdx_quote(ts.tdx_quote(debug=True)), OK)
    with pytest.raises(AttestationError, match="debug"):
        p.check(parse_snp_report(ts.snp_report(debug=True)), OK)
