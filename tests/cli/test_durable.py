"""`plinius train --durable-dir`: restore after a "reboot", PM wins, bad options, failed copies."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import pytest

from plinius.crypto import MasterKey
from plinius.mirror import DurableCopy, Mirror, _durable
from tests.cli.conftest import sealed_job
from tests.conftest import assert_one_line_error, run_cli


@pytest.fixture
def job(shm_dir: Path, tmp_path: Path) -> dict[str, Path]:
    disk = tmp_path / "durable"
    disk.mkdir()
    return {**sealed_job(shm_dir), "disk": disk}


def _train(job: dict[str, Path], steps: int, *extra: str) -> list[str]:
    return [
        "train", "--key", str(job["key"]), "--data", str(job["data"]),
        "--mirror", str(job["mirror"]), "--model", "cnn-tiny", "--batch-size", "32",
        "--threads", "1", "--steps", str(steps), *extra,
    ]  # fmt: skip


def _model_bits(job: dict[str, Path], mirror: Path) -> dict[str, bytes]:
    key = MasterKey.load(job["key"])
    with Mirror(mirror, key, readonly=True) as m:
        return {k: v.numpy().tobytes() for k, v in m.read_tensors().items()}


def _fail_from_copy(n: int) -> pytest.MonkeyPatch:
    """Make the n-th durable copy and later ones fail (ENOSPC); no copy is skipped."""
    real_write, real_after = _durable._write_file, DurableCopy.after_commit
    calls: list[int] = []

    def flaky(path: Path, data: memoryview, size: int) -> None:
        calls.append(1)
        if len(calls) >= n:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data, size)

    def waiting(self: DurableCopy, mirror: Mirror, step: int, *, force: bool = False) -> bool:
        self.wait()  # deterministic: the previous copy is written before the next is due
        return real_after(self, mirror, step, force=force)

    mp = pytest.MonkeyPatch()
    mp.setattr(_durable, "_write_file", flaky)
    mp.setattr(DurableCopy, "after_commit", waiting)
    return mp


def test_reboot_loses_the_steps_after_the_copy_and_retrains_them(job: dict[str, Path]) -> None:
    ref = job["dir"] / "ref.plm"
    args = _train(job, 10)
    args[args.index("--mirror") + 1] = str(ref)
    assert run_cli(*args).exit_code == 0
    # Train 10 steps copying every 4: copies of steps 4, 8 (if not skipped) and 10.
    # Make the copy of step 10 fail so that the disk holds step 8 (or 4).
    durable = ["--durable-dir", str(job["disk"]), "--durable-every", "4"]
    mp = _fail_from_copy(3)  # steps 4 and 8 are copied, 10 (the last) fails
    try:
        r = run_cli(*_train(job, 10, *durable))
    finally:
        mp.undo()
    assert r.exit_code == 0, r.output
    assert r.stderr.count("warning: cannot write the durable copy") == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("plinius-durable")]
    assert "No space left on device" in r.stderr
    key = MasterKey.load(job["key"])
    with Mirror(job["disk"] / "m.plm", key, readonly=True) as m:
        lost_after = m.info().step
    assert lost_after == 8
    # The reboot: the PM mirror is gone.
    job["mirror"].unlink()
    r = run_cli(*_train(job, 10, *durable))
    assert r.exit_code == 0, r.output
    line = f"restored step 8 from the durable copy {job['disk'] / 'm.plm'} (written "
    assert line in r.stderr
    assert "; steps after 8 are lost and will be trained again" in r.stderr
    assert "resumed after step 8 of 10" in r.stdout
    assert _model_bits(job, job["mirror"]) == _model_bits(job, ref)


def test_the_pm_mirror_wins_when_both_exist(job: dict[str, Path]) -> None:
    durable = ["--durable-dir", str(job["disk"]), "--durable-every", "2"]
    mp = _fail_from_copy(2)  # the copy holds step 2, the PM mirror step 4
    try:
        assert run_cli(*_train(job, 4, *durable)).exit_code == 0
    finally:
        mp.undo()
    key = MasterKey.load(job["key"])
    with Mirror(job["disk"] / "m.plm", key, readonly=True) as m:
        assert m.info().step == 2
    r = run_cli(*_train(job, 4, *durable))
    assert r.exit_code == 0, r.output
    assert "restored" not in r.output
    assert "resumed after step 4 of 4" in r.stdout


def test_bad_durable_options(job: dict[str, Path]) -> None:
    r = run_cli(*_train(job, 2, "--durable-dir", str(job["disk"] / "missing")))
    assert_one_line_error(r, "durable directory", "does not exist")
    assert not job["mirror"].exists()
    r = run_cli(*_train(job, 2, "--durable-every", "3"))
    assert_one_line_error(r, "--durable-every needs --durable-dir", code=2)
    # The copy would be the mirror itself.
    r = run_cli(*_train(job, 2, "--durable-dir", str(job["dir"])))
    assert_one_line_error(r, "--mirror", "is --durable-dir", "or a file it keeps", code=2)
    # A file option that is the copy, a temporary file of it, or the directory itself.
    for events in (job["disk"] / "m.plm", job["disk"] / ".m.plm.0123abcd.tmp", job["disk"]):
        r = run_cli(*_train(job, 2, "--durable-dir", str(job["disk"]), "--events", str(events)))
        assert_one_line_error(r, "--events", "is --durable-dir", code=2)
    assert sorted(job["disk"].iterdir()) == [] and not job["mirror"].exists()
    # Other files may live there.
    r = run_cli(*_train(job, 2, "--durable-dir", str(job["disk"]), "--events",
                        str(job["disk"] / "e.jsonl")))  # fmt: skip
    assert r.exit_code == 0, r.output


def test_events_record_the_restore(job: dict[str, Path], tmp_path: Path) -> None:
    durable = ["--durable-dir", str(job["disk"]), "--durable-every", "2"]
    assert run_cli(*_train(job, 4, *durable)).exit_code == 0
    job["mirror"].unlink()
    events = tmp_path / "ev.jsonl"
    r = run_cli(*_train(job, 4, *durable, "--events", str(events)))
    assert r.exit_code == 0, r.output
    assert "restored step 4 from the durable copy" in r.stderr
    kinds = [json.loads(line) for line in events.read_text().splitlines()]
    restored = [e for e in kinds if e["event"] == "durable_restored"]
    assert restored and restored[0]["step"] == 4


def test_with_a_counter_the_older_copy_is_refused_with_what_to_do(job: dict[str, Path]) -> None:
    ctr = job["dir"] / "ctr"
    durable = ["--durable-dir", str(job["disk"]), "--durable-every", "2"]
    mp = _fail_from_copy(2)  # the copy holds step 2; the counter went on to step 4's value
    try:
        r = run_cli(*_train(job, 4, *durable, "--counter", f"file:{ctr}"))
    finally:
        mp.undo()
    assert r.exit_code == 0, r.output
    job["mirror"].unlink()
    r = run_cli(*_train(job, 4, *durable, "--counter", f"file:{ctr}"))
    assert_one_line_error(
        r, "durable copy", "older than the freshness counter allows", "new counter"
    )
    assert not job["mirror"].exists()
