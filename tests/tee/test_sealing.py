"""Sealing the released key: round trips, and a sealed key file attacked byte by byte.

Gramine's sealing key comes from a prepared /dev/attestation tree (keys/_sgx_mrenclave,
16 bytes, as Gramine documents it).
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from plinius.crypto import MasterKey
from plinius.errors import (
    AttestationError,
    ConfigError,
    FormatError,
    IntegrityError,
    KeyFileError,
    PliniusError,
    WrongKeyError,
)
from plinius.tee import Platform, detect_platform, seal_master_key, unseal_master_key
from tests.fixtures import tee_support as ts


def sim(tmp_path: Path) -> Platform:
    return detect_platform(tmp_path / "no-attestation", tmp_path / "no-tsm")


def sgx(tmp_path: Path, key: bytes = b"\x99" * 16, name: str = "attestation") -> Platform:
    return detect_platform(ts.gramine_tree(tmp_path / name, sgx_key=key), tmp_path / "no-tsm")


def test_simulation_round_trip(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "job.sealed"
    sk = seal_master_key(sim(tmp_path), path, key, job_id="job-1")
    assert not sk.secure and "INSECURE" in sk.source
    assert unseal_master_key(sim(tmp_path), path, job_id="job-1") == key
    for p in (path, tmp_path / "job.sealed.simkey"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert key.raw_bytes() not in path.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_gramine_round_trip_and_another_enclave(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "job.sealed"
    seal_master_key(sgx(tmp_path), path, key, job_id="job-1")
    assert not (tmp_path / "job.sealed.simkey").exists()
    assert unseal_master_key(sgx(tmp_path), path, job_id="job-1") == key
    # Another enclave build (or CPU) has another MRENCLAVE sealing key.
    other = sgx(tmp_path, b"\x98" * 16, name="other")
    with pytest.raises(WrongKeyError, match="another sealing key"):
        unseal_master_key(other, path, job_id="job-1")


def test_sealed_elsewhere(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "job.sealed"
    seal_master_key(sim(tmp_path), path, key, job_id="job-1")
    with pytest.raises(WrongKeyError, match="sealed on platform simulation"):
        unseal_master_key(sgx(tmp_path), path, job_id="job-1")
    (tmp_path / "job.sealed.simkey").unlink()
    with pytest.raises(WrongKeyError, match="simkey is missing"):
        unseal_master_key(sim(tmp_path), path, job_id="job-1")


def test_wrong_job(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "job.sealed"
    seal_master_key(sim(tmp_path), path, key, job_id="job-1")
    with pytest.raises(ConfigError, match="released for job 'job-1', not 'job-2'"):
        unseal_master_key(sim(tmp_path), path, job_id="job-2")


def test_every_flipped_byte_is_caught(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "job.sealed"
    platform = sim(tmp_path)
    seal_master_key(platform, path, key, job_id="job-1")
    good = path.read_bytes()
    header_end = len(good) - 4 - 48  # ciphertext length, ciphertext and tag follow the header
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(PliniusError) as info:
            unseal_master_key(platform, path, job_id="job-1")
        if i >= header_end - 28:  # salt, nonce, ciphertext: authentication catches them
            assert isinstance(info.value, IntegrityError), i


def test_truncation_and_trailing_bytes(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "job.sealed"
    platform = sim(tmp_path)
    seal_master_key(platform, path, key, job_id="job-1")
    good = path.read_bytes()
    for n in range(8, len(good)):
        path.write_bytes(good[:n])
        with pytest.raises((IntegrityError, FormatError)):
            unseal_master_key(platform, path, job_id="job-1")
    path.write_bytes(good + b"\0")
    with pytest.raises(IntegrityError, match="trailing"):
        unseal_master_key(platform, path, job_id="job-1")


def test_not_a_sealed_file(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"hello")
    with pytest.raises(FormatError, match="not a plinius sealed key"):
        unseal_master_key(sim(tmp_path), path, job_id="j")
    path.write_bytes(bytes(5000))
    with pytest.raises(FormatError, match="too large"):
        unseal_master_key(sim(tmp_path), path, job_id="j")


def test_simulation_key_readable_by_others_is_refused(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "job.sealed"
    seal_master_key(sim(tmp_path), path, key, job_id="job-1")
    (tmp_path / "job.sealed.simkey").chmod(0o644)
    with pytest.raises(KeyFileError, match="mode 0600"):
        unseal_master_key(sim(tmp_path), path, job_id="job-1")


def test_confidential_vms_cannot_seal(
    tmp_path: Path, key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    ts.Emulator(monkeypatch)
    tdx = detect_platform(tmp_path / "none", ts.tsm_tree(tmp_path / "tsm"))
    with pytest.raises(AttestationError, match="cannot seal"):
        seal_master_key(tdx, tmp_path / "job.sealed", key, job_id="job-1")
