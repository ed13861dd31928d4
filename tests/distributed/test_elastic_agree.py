"""The agreement of an elastic job (no processes started): what it accepts, what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from plinius.dist import SetMember, agree
from plinius.dist import _agree_machines as agree_machines  # the decision itself, unexported
from plinius.errors import ConfigError, IntegrityError, RollbackError

WHERE = Path("/s")


def _member(
    rank: int,
    held: tuple[int | None, ...],
    world: int = 2,
    job: str = "j1",
    replicas: int = 0,
) -> SetMember:
    ident = {"job": job, "world_size": world, "local_rank": rank, "node": 0, "replicas": replicas}
    saved = bool(held) and held[0] is not None
    gen = -1 if not held else (held[0] or 0)
    return SetMember(Path(f"/s/local-{rank}.plm"), rank, gen, held, ident if saved else None)


def test_another_world_is_the_survivors_newest_common_step() -> None:
    # scale-down: one survivor of a 2-process set, now alone
    assert agree([_member(0, (7, 6))], 1, WHERE, elastic=True) == 7
    # scale-up: the survivor (world 1) and a newcomer with nothing
    members = [_member(0, (9, 8), world=1), _member(1, ())]
    assert agree(members, 2, WHERE, elastic=True) == 9
    # the first commit of the new world torn: one file ahead goes back
    members = [_member(0, (10, 9), world=2), _member(1, (9, 8), world=1)]
    assert agree(members, 2, WHERE, elastic=True) == 9
    with pytest.raises(ConfigError, match="elastic=True"):
        agree([_member(0, (7, 6))], 1, WHERE)


def test_elastic_still_refuses_what_no_crash_makes() -> None:
    with pytest.raises(RollbackError, match="further apart than a crash"):
        agree([_member(0, (9, 8)), _member(1, (4, 3))], 3, WHERE, elastic=True)
    with pytest.raises(IntegrityError, match="mixes jobs"):
        agree([_member(0, (5, 4)), _member(1, (5, 4), job="j2")], 3, WHERE, elastic=True)
    swapped = _member(1, (5, 4))
    assert swapped.identity is not None
    swapped.identity["local_rank"] = 0
    with pytest.raises(IntegrityError, match="swapped or copied"):
        agree([_member(0, (5, 4)), swapped], 1, WHERE, elastic=True)


def test_which_processes_are_seeded_and_when_the_world_counts_as_resized() -> None:
    two = ["a:/m", "b:/m"]
    # the same world, nothing lost: the usual agreement
    members = [_member(0, (5, 4)), _member(1, (5, 4))]
    assert agree_machines(members, two, 2, WHERE, 0, True) == (5, set(), False)
    # another world: resized, the process without a file seeded
    members = [_member(0, (5, 4), world=1), _member(1, ())]
    assert agree_machines(members, two, 2, WHERE, 0, True) == (5, {1}, True)
    # a lost machine without replicas: resized (its generators cannot be restored)
    members = [_member(0, (5, 4)), _member(1, ())]
    assert agree_machines(members, two, 2, WHERE, 0, True) == (5, {1}, True)
    # ... with replicas: the exact path, as without elastic
    members = [_member(0, (5, 4), replicas=1), _member(1, ())]
    assert agree_machines(members, two, 2, WHERE, 1, True) == (5, {1}, False)
    # without elastic, a set across machines needs replicas
    with pytest.raises(ConfigError, match="replicas"):
        agree_machines([_member(0, (5, 4)), _member(1, (5, 4))], two, 2, WHERE, 0, False)
