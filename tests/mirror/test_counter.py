"""A freshness counter whose first increment jumps from 0 to an arbitrary base.

A TPM NV counter index defined after any index on that TPM was deleted starts
above the highest value the deleted one had (tests/counters/test_tpm.py shows it on a
software TPM). The mirror learns that base when it creates a mirror: these
tests drive it with a fake counter that starts anywhere, and check that a new
job works, that rolled-back and deleted mirrors are still refused, that the
crash window (counter = expected - 1) is still accepted, and that a read-only
open never advances the counter.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from plinius.crypto import MasterKey
from plinius.errors import RollbackError, StorageError
from plinius.mirror import Mirror
from plinius.testing import CrashSimRegion

KEY = MasterKey(b"b" * 32)


class JumpingCounter:
    """Reads 0 until first incremented; the first increment lands on ``base``.

    ``first_increment_may_jump`` says so, as :class:`plinius.counters.tpm.TPMCounter` does.
    ``fail_next`` makes the next increment fail (after it happened, when
    ``after=True``: a lost answer, or a crash right after the counter moved).
    """

    wears = False
    trusted = True
    first_increment_may_jump = True

    def __init__(self, base: int) -> None:
        self.base = base
        self.value = 0
        self.increments = 0
        self.fail_next: str | None = None

    def read(self) -> int:
        return self.value

    def increment(self) -> int:
        if self.fail_next == "before":
            self.fail_next = None
            raise StorageError("counter unreachable")
        self.value = self.base if self.value == 0 else self.value + 1
        self.increments += 1
        if self.fail_next == "after":
            self.fail_next = None
            raise StorageError("the counter's answer was lost")
        return self.value


class SilentJumpingCounter(JumpingCounter):
    """The same counter, but it does not declare that its first increment may jump."""

    first_increment_may_jump = False


def _state(v: float) -> dict[str, Any]:
    return {"w": torch.full((8,), v)}


def _mirror(path: Path | CrashSimRegion, c: JumpingCounter, **kw: Any) -> Mirror:
    return Mirror(path, KEY, counter=c, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("base", [1, 4, 1000, 2**40])
def test_a_new_job_works_whatever_the_counter_starts_at(shm_dir: Path, base: int) -> None:
    c = JumpingCounter(base)
    path = shm_dir / "job.plm"
    with _mirror(path, c) as m:
        assert c.value == base and m.info().counter_expected == base
        assert m.restore(_state(0)) is None  # generation 0: a new job
        for step in (1, 2, 3):
            m.save(_state(step), step=step)
        assert c.value == base + 3 and m.info().counter_expected == base + 3
    with _mirror(path, c) as m:  # resuming the job needs no further advance
        s = _state(0)
        assert m.restore(s) == 3 and s["w"][0] == 3
    assert c.value == base + 3


def test_a_counter_that_does_not_jump_starts_at_one(shm_dir: Path) -> None:
    c = JumpingCounter(1)  # what a TPM that never lost an index does
    with _mirror(shm_dir / "job.plm", c) as m:
        m.save(_state(1), step=1)
        assert (c.value, c.increments, m.info().counter_expected) == (2, 2, 2)


def test_every_k_commits_from_the_learned_base(shm_dir: Path) -> None:
    c = JumpingCounter(7)
    with _mirror(shm_dir / "job.plm", c, counter_every=3) as m:
        seen = []
        for step in range(1, 8):
            m.save(_state(step), step=step)
            seen.append(c.value)
        assert seen == [7, 7, 8, 8, 8, 9, 9]
        assert "at most 2 commits" in m.info().counter_bound


def test_a_rolled_back_copy_is_refused(shm_dir: Path) -> None:
    c = JumpingCounter(4)
    path, old = shm_dir / "job.plm", shm_dir / "old.plm"
    with _mirror(path, c) as m:
        m.save(_state(1), step=1)
    shutil.copyfile(path, old)
    with _mirror(path, c) as m:
        m.save(_state(2), step=2)
    shutil.copyfile(old, path)  # the host puts the older, authentic copy back
    before = c.value
    with pytest.raises(RollbackError, match="older copy"):
        _mirror(path, c)
    with pytest.raises(RollbackError, match="older copy"):
        _mirror(path, c, readonly=True)
    assert c.value == before  # refusing never advanced the counter


def test_a_copy_of_generation_0_is_refused(shm_dir: Path) -> None:
    # The empty generation 0 expects the learned base: putting it back after a
    # save would restart training, and the counter catches it.
    c = JumpingCounter(4)
    path, old = shm_dir / "job.plm", shm_dir / "gen0.plm"
    _mirror(path, c).close()
    shutil.copyfile(path, old)
    with _mirror(path, c) as m:
        m.save(_state(1), step=1)
    shutil.copyfile(old, path)
    with pytest.raises(RollbackError, match="older copy"):
        _mirror(path, c)


@pytest.mark.parametrize("saves", [0, 2])
def test_a_deleted_mirror_is_refused(shm_dir: Path, saves: int) -> None:
    c = JumpingCounter(4)
    path = shm_dir / "job.plm"
    with _mirror(path, c) as m:
        for step in range(1, saves + 1):
            m.save(_state(step), step=step)
    path.unlink()  # the host deletes the mirror to restart training from scratch
    before = c.value
    with pytest.raises(RollbackError, match="fresh counter"):
        _mirror(path, c)
    with pytest.raises(RollbackError, match="fresh counter"):
        _mirror(CrashSimRegion(0), c)
    assert not path.exists() and c.value == before


def test_the_crash_window_after_a_commit_is_accepted(shm_dir: Path) -> None:
    c = JumpingCounter(4)
    path = shm_dir / "job.plm"
    with _mirror(path, c) as m:
        m.save(_state(1), step=1)
        c.fail_next = "before"  # the commit of step 2 happens, its advance does not
        with pytest.raises(StorageError, match="unreachable"):
            m.save(_state(2), step=2)
    assert c.value == 5  # generation 2 expects 6
    with _mirror(path, c, readonly=True) as m:
        assert m.info().step == 2
    assert c.value == 5  # a read-only open never advances the counter
    with _mirror(path, c) as m:
        assert m.info().step == 2 and m.info().counter_expected == 6
    assert c.value == 6  # the writable open finished the advance
    c.value = 4  # two behind is not a crash: a reset or another job's counter
    with pytest.raises(RollbackError, match="reset or belongs to another job"):
        _mirror(path, c)


def test_a_read_only_open_never_learns_the_base(shm_dir: Path) -> None:
    c = JumpingCounter(4)
    with pytest.raises(StorageError, match="does not exist"):
        _mirror(shm_dir / "none.plm", c, readonly=True)
    assert (c.value, c.increments) == (0, 0)


def test_a_crash_while_learning_the_base_leaves_no_mirror(shm_dir: Path) -> None:
    c = JumpingCounter(4)
    path = shm_dir / "job.plm"
    c.fail_next = "after"  # the counter moved, then the creation died
    with pytest.raises(StorageError, match="answer was lost"):
        _mirror(path, c)
    assert list(shm_dir.iterdir()) == []  # no mirror, no temporary file
    # Indistinguishable from a deleted mirror, so refused like one; nothing
    # was trained yet, and the job starts again with a fresh counter.
    with pytest.raises(RollbackError, match="fresh counter"):
        _mirror(path, c)
    with _mirror(path, JumpingCounter(9)) as m:
        assert m.info().counter_expected == 9


def test_a_counter_unreachable_at_creation_leaves_nothing(shm_dir: Path) -> None:
    c = JumpingCounter(4)
    c.fail_next = "before"
    with pytest.raises(StorageError, match="unreachable"):
        _mirror(shm_dir / "job.plm", c)
    assert list(shm_dir.iterdir()) == [] and c.value == 0
    with _mirror(shm_dir / "job.plm", c) as m:  # nothing moved: the same job can start
        assert m.info().counter_expected == 4


def test_an_undeclared_jump_is_named_as_such(shm_dir: Path) -> None:
    c = SilentJumpingCounter(4)
    path = shm_dir / "job.plm"
    with _mirror(path, c) as m:
        assert m.info().counter_expected == 0  # the base could not be learned
        with pytest.raises(RollbackError, match="first_increment_may_jump"):
            m.save(_state(1), step=1)


def test_the_tpm_counter_declares_that_it_may_jump() -> None:
    tpm = pytest.importorskip("plinius.counters.tpm")
    assert tpm.TPMCounter.first_increment_may_jump is True


@pytest.mark.filterwarnings("ignore:advancing a wearing counter")
def test_a_new_job_on_a_tpm_whose_new_indices_start_high(shm_dir: Path) -> None:
    """The bug on a real (software) TPM: after an index was deleted, a new job's
    counter starts above 0, and the mirror must neither block the job nor
    stop catching a rollback."""
    from plinius.counters.tpm import TPMCounter
    from tests.counters import test_tpm as tpm_tests  # its swtpm helpers skip without swtpm

    with tpm_tests._swtpm() as tpm:
        old_job = TPMCounter.for_key(KEY, tpm.tcti, index=0x01500100)
        for _ in range(3):
            old_job.increment()
        tpm_tests._raw_undefine(tpm.tcti, old_job.index)  # the host deletes it
        c = TPMCounter.for_key(KEY, tpm.tcti, index=0x01500101)  # the new job's index
        assert c.read() == 0
        path, old = shm_dir / "job.plm", shm_dir / "old.plm"
        with Mirror(path, KEY, counter=c, counter_every=1) as m:
            assert m.info().counter_expected == c.read() == 4  # learned, not 1
            m.save(_state(1), step=1)
        shutil.copyfile(path, old)
        with Mirror(path, KEY, counter=c, counter_every=1) as m:
            m.save(_state(2), step=2)
        assert c.read() == 6
        shutil.copyfile(old, path)
        with pytest.raises(RollbackError, match="older copy"):
            Mirror(path, KEY, counter=c, counter_every=1)
