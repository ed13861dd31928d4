"""One freshness counter for a mirror set: the check, and the protocol at every crash point.

The protocol runs here in one process, without torchrun: each process's mirror
is a real member file (``keep_previous``, :class:`~plinius.mirror.SetFreshness`),
and the saves follow the step gate's order (a save of step k+1 starts only
once every process committed k), in every order of the processes within a
step. A snapshot of the files and the counter is taken after every event a
crash can cut at: each commit, and the owner's counter advance (made in its
save, before its commit). Every snapshot must open without a RollbackError
(no false alarm), at the newest step all files hold; every older snapshot put
back under a newer counter (the whole set, or one file of it) must be refused
once the counter moved past it. The same under real torchrun and SIGKILL:
``test_setcounter_torchrun.py``.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from plinius import dist
from plinius.counters import FileCounter
from plinius.crypto import MasterKey
from plinius.dist import SetMember, check_set_counter, describe_set, member_path
from plinius.errors import ConfigError, IntegrityError, RollbackError
from plinius.mirror import Mirror, SetFreshness

WHERE = Path("/set")
ROLLED_BACK = "older than its freshness counter allows|holds no step every process committed"


def _m(rank: int, held: tuple[int | None, ...], counters: tuple[int | None, ...]) -> SetMember:
    ident = {"job": "j", "world_size": 2, "local_rank": rank}
    return SetMember(WHERE / f"local-{rank}.plm", rank, 3, held, ident, counters)


def test_the_counter_at_the_steps_value_or_one_below_is_accepted() -> None:
    members = [_m(0, (6, 5), (6, 5)), _m(1, (5, 4), (5, 4))]
    assert check_set_counter(members, 5, 5, WHERE) == 5
    assert check_set_counter(members, 5, 4, WHERE) == 5  # the advance a crash interrupted


def test_a_counter_past_the_step_is_a_rollback_naming_the_older_files() -> None:
    members = [_m(0, (5, 4), (5, 4)), _m(1, (5, 4), (5, 4))]
    with pytest.raises(RollbackError, match=r"^the whole mirror set /set is older"):
        check_set_counter(members, 5, 7, WHERE)
    one = [_m(0, (6, 5), (6, 5)), _m(1, (5, 4), (5, 4))]
    with pytest.raises(RollbackError, match=r"^/set/local-1.plm of the mirror set /set is older"):
        check_set_counter(one, 5, 6, WHERE)


def test_a_counter_far_behind_is_another_jobs() -> None:
    members = [_m(0, (5, 4), (5, 4)), _m(1, (5, 4), (5, 4))]
    with pytest.raises(RollbackError, match="only at 3: the counter was reset or belongs"):
        check_set_counter(members, 5, 3, WHERE)


def test_a_set_with_nothing_saved_needs_a_counter_never_advanced() -> None:
    assert check_set_counter([], None, 0, WHERE) == 0
    with pytest.raises(RollbackError, match="holds no step every process committed"):
        check_set_counter([], None, 2, WHERE)


def test_a_set_written_without_a_counter() -> None:
    members = [_m(0, (5, 4), (None, None)), _m(1, (5, 4), (None, None))]
    assert check_set_counter(members, 5, 0, WHERE) == 0  # it starts being protected now
    with pytest.raises(RollbackError, match="last written without a freshness counter"):
        check_set_counter(members, 5, 3, WHERE)


def test_files_recording_different_values_for_one_step_were_mixed() -> None:
    members = [_m(0, (5, 4), (5, 4)), _m(1, (5, 4), (9, 8))]
    with pytest.raises(IntegrityError, match="record different freshness-counter values"):
        check_set_counter(members, 5, 5, WHERE)


def test_a_set_member_refuses_a_counter_of_its_own() -> None:
    with pytest.raises(ConfigError, match="give the counter to the mirror set"):
        Mirror(
            "/nonexistent/x.plm", MasterKey.generate(), keep_previous=True, counter=FileCounter("c")
        )
    with pytest.raises(ConfigError, match="set_freshness is for a member of a mirror set"):
        Mirror(
            "/nonexistent/x.plm",
            MasterKey.generate(),
            set_freshness=SetFreshness(None, 1, label="x"),
        )


# ------------------------------------------------------------ the protocol, crash by crash
class _Watched(FileCounter):
    """A file counter that calls ``after`` once each advance is durable."""

    def __init__(self, path: Path, after: Callable[[], None]) -> None:
        super().__init__(path)
        self.after = after

    def increment(self) -> int:
        value = super().increment()
        self.after()
        return value


class _Sim:
    """``n`` processes' member files and the set's counter, saved in the step gate's order."""

    def __init__(self, where: Path, key: MasterKey, n: int, every: int) -> None:
        self.where, self.key, self.n = where, key, n
        self.snapshots: list[tuple[str, dict[str, bytes], int]] = []
        self.counter = _Watched(where.parent / "counter", lambda: self.snap("advanced"))
        where.mkdir()
        self.mirrors = []
        for r in range(n):
            fresh = SetFreshness(self.counter if r == 0 else None, every, label=f"local-{r}")
            m = Mirror(member_path(where, r), key, keep_previous=True, set_freshness=fresh)
            fresh.resume_at(0)
            self.mirrors.append(m)

    def state(self, rank: int, step: int) -> dict[str, Any]:
        ident = {"job": "sim", "world_size": self.n, "local_rank": rank}
        ident.update(local_world_size=self.n, node=0, replicas=0)
        return {"w": torch.full((64,), float(step)), "dist": ident}

    def snap(self, what: str) -> None:
        files = {p.name: p.read_bytes() for p in sorted(self.where.iterdir())}
        self.snapshots.append((what, files, self.counter.read()))

    def save(self, step: int, order: tuple[int, ...]) -> None:
        for r in order:
            self.mirrors[r].save(self.state(r, step), step=step)
            self.snap(f"step {step} committed by local-{r}")

    def close(self) -> None:
        for m in self.mirrors:
            m.close()


def _put(files: dict[str, bytes], counter: int, into: Path) -> FileCounter:
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    for name, data in files.items():
        (into / name).write_bytes(data)
    c = FileCounter(into.parent / f"{into.name}.counter")
    if counter:
        c.path.write_text(f"{counter}\n")
    else:
        c.path.unlink(missing_ok=True)
    return c


@pytest.fixture
def scratch() -> Iterator[Path]:
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="plinius-setctr-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(("n", "every"), [(2, 1), (3, 1), (2, 3)])
def test_no_crash_point_is_a_false_rollback_and_every_older_set_is_refused(
    scratch: Path, n: int, every: int
) -> None:
    key = MasterKey.generate()
    sim = _Sim(scratch / "set", key, n, every)
    orders = list(itertools.permutations(range(n)))
    try:
        sim.snap("new")
        for step in range(1, 9):
            sim.save(step, orders[step % len(orders)])  # every order of the processes in turn
    finally:
        sim.close()
    agreed: list[int] = []
    newest_1: list[int] = []  # the newest step of local-1's file in each snapshot
    probe = scratch / "probe"
    for i, (what, files, value) in enumerate(sim.snapshots):
        try:
            _, step = describe_set(probe, key, counter=_put(files, value, probe))
        except RollbackError as exc:  # pragma: no cover - the failure being tested for
            pytest.fail(
                f"a crash {what} (snapshot {i}, counter {value}) reads as a rollback: {exc}"
            )
        held = []
        for name in sorted(files):
            with Mirror(probe / name, key, readonly=True) as m:
                newest = m.held_steps()[0]
                held.append(0 if newest is None else newest)
        assert (step or 0) == min(held), what
        agreed.append(step or 0)
        newest_1.append(held[1])
    checked = 0
    for (a, (_, old, _)), (b, (_, _, now)) in itertools.combinations(enumerate(sim.snapshots), 2):
        # Closer than that, an older copy is what a crash leaves (the window).
        if agreed[b] - agreed[a] >= 2 * every:
            # The whole set put back under the newer counter: only the counter can tell.
            with pytest.raises(RollbackError, match=ROLLED_BACK):
                describe_set(probe, key, counter=_put(old, now, probe))
            checked += 1
        if agreed[b] - newest_1[a] >= 2:
            # One file of it put back: refused too, naming it.
            newer = dict(sim.snapshots[b][1])
            newer["local-1.plm"] = old["local-1.plm"]
            with pytest.raises(RollbackError, match=r"local-1\.plm"):
                describe_set(probe, key, counter=_put(newer, now, probe))
            checked += 1
    assert checked > 20


def _reports(**extra: Any) -> list[dict[str, Any]]:
    return [{"uses_counter": True, "counter": 0, "machine_local": False, **extra} for _ in range(2)]


def test_a_counter_kept_in_one_machine_is_refused_for_a_set_across_machines() -> None:
    # Refused before any collective: every process finds it in the same reports.
    fresh = SetFreshness(FileCounter("/nonexistent/c"), 1, label="x")
    two = ["host-a:/pm", "host-b:/pm"]
    with pytest.raises(ConfigError, match=r"kept in one machine \(a TPM\)"):
        dist._resume_counter(fresh, _reports(machine_local=True), [], two, None, WHERE)
    reports = _reports()
    reports[1]["uses_counter"] = False
    with pytest.raises(ConfigError, match="only some processes of the job were given"):
        dist._resume_counter(fresh, reports, [], two[:1] * 2, None, WHERE)
