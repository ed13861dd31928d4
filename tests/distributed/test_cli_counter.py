"""``plinius train --counter`` under real torchrun, the readers' ``--counter`` on a set, and
the key from the key server (attested release) in every process.

Every error is said once, in one line, and leaves every file as it was.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import tee_support as ts

from ..cli.conftest import sealed_job
from ..conftest import run_cli
from .conftest import run
from .test_cli import _said_once, _snapshot

pytestmark = pytest.mark.slow


def _train(job: dict[str, Path], mirror: Path, steps: int, *more: str, **kw: Any) -> Any:
    args = [
        "-m", "plinius", "train", "--data", job["data"], "--mirror", mirror, "--model", "mlp",
        "--steps", str(steps), "--batch-size", "24", *more,
    ]  # fmt: skip
    return run(args, nproc=2, timeout=240, **kw)


@pytest.fixture(scope="module")
def job() -> Iterator[dict[str, Path]]:
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="plinius-dctrcli-", dir=base))
    try:
        yield sealed_job(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_train_with_a_counter_refuses_the_whole_set_put_back(job: dict[str, Path]) -> None:
    key, d = ["--key", str(job["key"])], job["dir"]
    mirror, spec = d / "ctr.plm", f"file:{d / 'ctr'}"
    res = _train(job, mirror, 6, *key, "--counter", spec)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "freshness is unprotected" not in res.stderr
    shutil.copytree(mirror, d / "kept.plm")
    res = _train(job, mirror, 12, *key, "--counter", spec)
    assert res.returncode == 0, res.stderr[-3000:]

    # The readers check the set as a whole against the same counter.
    res = run_cli("inspect", mirror, *key, "--counter", spec)
    assert res.exit_code == 0, res.output
    assert "step expects counter value 12 and the counter agrees" in res.stdout
    res = run_cli("inspect", mirror, *key, "--json")
    assert json.loads(res.stdout)["counter_expected"] == 12
    res = run_cli("export", d / "kept.plm", *key, "--counter", spec, "--out", d / "x.st")
    assert res.exit_code == 1 and "the whole mirror set" in res.stderr
    assert not (d / "x.st").exists()

    # The old set put back in place: refused once, in one line; nothing written.
    shutil.rmtree(mirror)
    shutil.copytree(d / "kept.plm", mirror)
    before = _snapshot(mirror)
    res = _train(job, mirror, 18, *key, "--counter", spec)
    _said_once(res, "older than its freshness counter allows")
    assert _snapshot(mirror) == before

    # Without its counter the job is not checked, and says so once.
    res = _train(job, mirror, 18, *key)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("this mirror's job used a freshness counter") == 1


def test_counter_options_a_set_cannot_use_are_said_once(job: dict[str, Path]) -> None:
    key, d = ["--key", str(job["key"])], job["dir"]
    spec = f"file:{d / 'ivl.ctr'}"
    res = _train(job, d / "ivl.plm", 6, *key, "--counter", spec, "--counter-interval", "5")
    _said_once(res, "--counter-interval: not supported under torchrun")
    assert not (d / "ivl.plm").exists()
    res = _train(job, d / "bad.plm", 6, *key, "--counter", "nonsense")
    _said_once(res, "--counter 'nonsense' is not understood")
    assert not (d / "bad.plm").exists()


def test_the_key_server_releases_the_key_and_keeps_the_sets_counter(
    job: dict[str, Path], tmp_path: Path
) -> None:
    # The data owner's server holds the job's key; the first process is released
    # it after attestation (simulated here: no TEE) and seals it locally, the
    # other unseals it; rank 0 advances the set's counter at the server.
    root = tmp_path / "server"
    root.mkdir()
    shutil.copy(job["key"], root / "owner.key")
    env = {
        "PLINIUS_ATTESTATION_ROOT": str(tmp_path / "none"),
        "PLINIUS_TSM_ROOT": str(tmp_path / "none"),
    }
    with ts.keyserver_process(root) as srv:
        server = ["--key-server", srv.url, "--key-server-pubkey", srv.pubkey, "--job-id", "set-1"]
        server += ["--sealed-key", str(tmp_path / "job.sealed")]
        mirror = job["dir"] / "ks.plm"
        res = _train(job, mirror, 6, *server, "--counter", "keyserver", env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        releases = [e for e in srv.events() if e["event"] == "release"]
        assert len(releases) == 1  # then sealed here: the other process unsealed it
        assert srv.counter("set-1").read() == 5  # the last save (6) is advanced by the next open
        kept = job["dir"] / "ks-kept.plm"
        shutil.copytree(mirror, kept)
        res = _train(job, mirror, 12, *server, "--counter", "keyserver", env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        res = _train(job, kept, 18, *server, "--counter", "keyserver", env=env)
        _said_once(res, "older than its freshness counter allows")
        assert len([e for e in srv.events() if e["event"] == "release"]) == 1
