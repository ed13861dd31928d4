"""The durable tier: a copy is one committed generation, written atomically in the background."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from plinius.counters import FileCounter
from plinius.crypto import MasterKey
from plinius.errors import ConfigError, PliniusError, RollbackError, StorageError
from plinius.mirror import DurableCopy, Mirror, _durable, describe_file, restore_durable
from plinius.train import fit


def _state(v: float, n: int = 50_000) -> dict[str, torch.Tensor]:
    return {"a": torch.full((n,), v), "b": torch.full((7,), -v)}


def _read(path: Path, key: MasterKey) -> tuple[int | None, dict[str, torch.Tensor]]:
    st = _state(0.0)
    with Mirror(path, key, readonly=True) as m:
        return m.restore(st), st


def _no_writer_threads() -> bool:
    return not any(t.name.startswith("plinius-durable") for t in threading.enumerate())


class _Gate:
    """Holds the writer thread until released, so that the mirror moves on meanwhile."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        real = _durable._write_file

        def gated(path: Path, data: memoryview, size: int) -> None:
            self.started.set()
            assert self.go.wait(10)
            real(path, data, size)

        mp.setattr(_durable, "_write_file", gated)


def test_a_copy_is_the_committed_generation_while_the_mirror_moves_on(
    shm_dir: Path, tmp_path: Path, key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate(monkeypatch)
    with Mirror(shm_dir / "m.plm", key) as m, DurableCopy(tmp_path, "m.plm", every=1) as d:
        m.save(_state(1.0), step=1)
        assert d.after_commit(m, 1)
        assert gate.started.wait(10)
        # Two more saves overwrite both slots of every pair before the copy is written.
        m.save(_state(2.0), step=2)
        m.save(_state(3.0), step=3)
        assert not d.after_commit(m, 3)  # the previous copy is still being written
        assert d.skipped == 1
        gate.go.set()
    assert _no_writer_threads()
    assert d.copies == 1 and d.failures == 0
    step, st = _read(tmp_path / "m.plm", key)
    assert step == 1
    assert torch.equal(st["a"], torch.full((50_000,), 1.0))
    assert torch.equal(st["b"], torch.full((7,), -1.0))
    # A valid mirror file: the same region id, readable by describe_file (plinius inspect).
    assert describe_file(tmp_path / "m.plm").region_id == describe_file(shm_dir / "m.plm").region_id
    with Mirror(tmp_path / "m.plm", key, readonly=True) as c:
        assert c.verify().step == 1


def test_a_failed_copy_leaves_the_previous_one_whole(
    shm_dir: Path, tmp_path: Path, key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors: list[PliniusError] = []
    with (
        Mirror(shm_dir / "m.plm", key) as m,
        DurableCopy(tmp_path, "m.plm", every=1, on_error=errors.append) as d,
    ):
        m.save(_state(1.0), step=1)
        d.after_commit(m, 1)
        d.wait()
        before = (tmp_path / "m.plm").read_bytes()
        real_fsync = os.fsync

        def dying_fsync(fd: int) -> None:  # the crash after the data, before the rename
            raise OSError(errno.EIO, "Input/output error")

        m.save(_state(2.0), step=2)
        monkeypatch.setattr(os, "fsync", dying_fsync)
        d.after_commit(m, 2)
        d.wait()
        monkeypatch.setattr(os, "fsync", real_fsync)
        m.save(_state(3.0), step=3)  # the mirror in PM is untouched by the failure
    assert (tmp_path / "m.plm").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.plm"]  # no temporary file left
    assert len(errors) == 1 and "durable copy" in str(errors[0])
    assert _read(tmp_path / "m.plm", key)[0] == 1
    assert _read(shm_dir / "m.plm", key)[0] == 3


def test_a_full_disk_is_reported_once_and_training_goes_on(
    shm_dir: Path, tmp_path: Path, key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(path: Path, data: memoryview, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_durable, "_write_file", full)
    errors: list[PliniusError] = []
    with Mirror(shm_dir / "m.plm", key) as m:
        with DurableCopy(tmp_path, "m.plm", every=1, on_error=errors.append) as d:
            for step in range(1, 4):
                m.save(_state(float(step)), step=step)
                d.after_commit(m, step)
                d.wait()
        assert d.failures == 3 and d.copies == 0
        assert m.info().step == 3
    assert len(errors) == 1
    assert isinstance(errors[0], StorageError)
    assert "free some space" in str(errors[0]) and "training goes on" in str(errors[0])


def test_a_directory_removed_under_the_writer_is_reported(
    shm_dir: Path, tmp_path: Path, key: MasterKey
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    errors: list[PliniusError] = []
    with (
        Mirror(shm_dir / "m.plm", key) as m,
        DurableCopy(disk, "m.plm", every=1, on_error=errors.append) as d,
    ):
        shutil.rmtree(disk)
        m.save(_state(1.0), step=1)
        d.after_commit(m, 1)
    assert len(errors) == 1 and "does not exist" not in str(errors[0])
    assert "cannot write the durable copy" in str(errors[0])
    assert _no_writer_threads()


def test_the_period_by_steps_and_time(shm_dir: Path, tmp_path: Path, key: MasterKey) -> None:
    d = DurableCopy(tmp_path, "m.plm", every=3)
    d.start_at(None)
    assert [s for s in range(1, 10) if d.due(s)] == [3, 4, 5, 6, 7, 8, 9]  # from step 0
    d.start_at(5)
    assert not d.due(7) and d.due(8)
    t = DurableCopy(tmp_path, "m.plm", interval_s=3600)
    assert not t.due(1000)
    d.close()
    t.close()


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({}, "every N steps or interval_s"),
        ({"every": 0}, "positive number of steps"),
        ({"interval_s": -1.0}, "positive number of seconds"),
    ],
)
def test_bad_periods(tmp_path: Path, kw: dict[str, float], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        DurableCopy(tmp_path, "m.plm", **kw)  # type: ignore[arg-type]


def test_bad_directory_and_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; create it first"):
        DurableCopy(tmp_path / "missing", "m.plm", every=1)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        DurableCopy(tmp_path / "f", "m.plm", every=1)
    with pytest.raises(ConfigError, match="must be a file name"):
        DurableCopy(tmp_path, "a/b", every=1)


def test_restore_puts_the_copy_in_place(shm_dir: Path, tmp_path: Path, key: MasterKey) -> None:
    pm = shm_dir / "m.plm"
    with Mirror(pm, key) as m, DurableCopy(tmp_path, "m.plm", every=1) as d:
        m.save(_state(1.0), step=1)
        d.after_commit(m, 1)
        m.save(_state(2.0), step=2)
    with pytest.raises(StorageError, match="persistent memory wins"):
        restore_durable(tmp_path / "m.plm", pm, key)
    pm.unlink()  # the reboot
    info = restore_durable(tmp_path / "m.plm", pm, key)
    assert info.step == 1 and info.saved_at is not None
    assert sorted(p.name for p in shm_dir.iterdir()) == ["m.plm"]
    with Mirror(pm, key) as m:  # a writable mirror again, which goes on from step 1
        assert m.restore(_state(0.0)) == 1
        m.save(_state(5.0), step=2)
    assert _read(pm, key)[0] == 2


def test_restore_refuses_a_copy_under_another_key(
    shm_dir: Path, tmp_path: Path, key: MasterKey, other_key: MasterKey
) -> None:
    with Mirror(shm_dir / "m.plm", key) as m, DurableCopy(tmp_path, "m.plm", every=1) as d:
        m.save(_state(1.0), step=1)
        d.after_commit(m, 1)
    with pytest.raises(PliniusError, match="another master key"):
        restore_durable(tmp_path / "m.plm", shm_dir / "new.plm", other_key)
    assert not (shm_dir / "new.plm").exists()


def test_with_a_counter_an_older_copy_is_a_rollback(
    shm_dir: Path, tmp_path: Path, key: MasterKey
) -> None:
    c = FileCounter(shm_dir / "ctr")
    pm = shm_dir / "m.plm"
    with Mirror(pm, key, counter=c) as m, DurableCopy(tmp_path, "m.plm", every=1) as d:
        m.save(_state(1.0), step=1)
        d.after_commit(m, 1)
        m.save(_state(2.0), step=2)  # advances the counter past what the copy expects
    pm.unlink()
    with pytest.raises(RollbackError, match="older than the freshness counter allows") as ei:
        restore_durable(tmp_path / "m.plm", pm, key, counter=c)
    assert "start it anew with a new mirror and a new counter" in str(ei.value)
    assert not pm.exists()  # nothing put in place
    assert c.read() == 2


def test_with_a_counter_a_copy_of_the_last_advance_is_accepted(
    shm_dir: Path, tmp_path: Path, key: MasterKey
) -> None:
    c = FileCounter(shm_dir / "ctr")
    pm = shm_dir / "m.plm"
    with (
        Mirror(pm, key, counter=c, counter_every=10) as m,
        DurableCopy(tmp_path, "m.plm", every=1) as d,
    ):
        m.save(_state(1.0), step=1)  # the counter advances here (1), then every 10 commits
        m.save(_state(2.0), step=2)
        d.after_commit(m, 2)
        m.save(_state(3.0), step=3)  # no advance: the copy of step 2 is still fresh
    pm.unlink()
    assert restore_durable(tmp_path / "m.plm", pm, key, counter=c).step == 2
    with Mirror(pm, key, counter=c, counter_every=10) as m:
        assert m.restore(_state(0.0)) == 2


def test_fit_copies_and_joins_its_writer(shm_dir: Path, tmp_path: Path, key: MasterKey) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    with Mirror(shm_dir / "m.plm", key) as m, DurableCopy(tmp_path, "m.plm", every=3) as d:
        fit(model, opt, loss_fn=torch.nn.functional.cross_entropy, dataset=data,  # type: ignore[arg-type]
            batch_size=8, steps=7, mirror=m, durable=d)  # fmt: skip
    assert _no_writer_threads()
    assert 1 <= d.copies <= 3  # 3, 6 unless skipped, and 7 (the last, never skipped)
    with Mirror(tmp_path / "m.plm", key, readonly=True) as c:
        assert c.info().step == 7
    with pytest.raises(ConfigError, match="needs a mirror"):
        fit(model, opt, loss_fn=torch.nn.functional.cross_entropy, dataset=data,  # type: ignore[arg-type]
            batch_size=8, steps=7, durable=DurableCopy(tmp_path, "x.plm", every=1))  # fmt: skip


def test_a_copy_killed_mid_write_leaves_the_old_copy_and_its_temp_file_is_removed(
    shm_dir: Path, tmp_path: Path, key: MasterKey
) -> None:
    with Mirror(shm_dir / "m.plm", key) as m, DurableCopy(tmp_path, "m.plm", every=1) as d:
        m.save(_state(1.0), step=1)
        d.after_commit(m, 1)
        d.wait()
        m.save(_state(2.0), step=2)
        copy = m.copy_committed()
    # What a SIGKILL during the write of step 2 leaves: half of it, under a temporary name.
    stale = tmp_path / ".m.plm.0123abcd.tmp"
    stale.write_bytes(copy.buffer[: copy.nbytes // 2].tobytes())
    other = tmp_path / ".other.plm.0123abcd.tmp"
    other.write_bytes(b"not ours")
    assert _read(tmp_path / "m.plm", key)[0] == 1  # the copy is the previous one, whole
    DurableCopy(tmp_path, "m.plm", every=1).close()  # the next job's tier tidies up
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.plm.0123abcd.tmp", "m.plm"]
