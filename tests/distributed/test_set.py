"""A mirror set's files checked against each other, as the processes do on restart.

Sets are built here with the same files a job writes (one ``keep_previous``
mirror per process, each recording the set identity), then attacked: another
job's file, swapped files, a rolled-back file, a missing one, another world
size. Each is refused with the file named; crash states are accepted.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from plinius.crypto import MasterKey
from plinius.dist import SetMember, agree, describe_set, member_path
from plinius.errors import ConfigError, FormatError, IntegrityError, RollbackError
from plinius.mirror import Mirror

from ..conftest import assert_one_line_error, run_cli


def _member(rank: int, held: tuple[int | None, ...], job: str = "j1", world: int = 2) -> SetMember:
    ident = {"job": job, "world_size": world, "local_rank": rank, "node": 0}
    saved = bool(held) and held[0] is not None
    gen = -1 if not held else (held[0] or 0)
    return SetMember(Path(f"/s/local-{rank}.plm"), rank, gen, held, ident if saved else None)


WHERE = Path("/s")


def test_the_newest_step_all_hold_is_chosen() -> None:
    assert agree([_member(0, (5, 4)), _member(1, (5, 4))], 2, WHERE) == 5
    # one process committed 5, the other not yet: back to 4
    assert agree([_member(0, (5, 4)), _member(1, (4, 3))], 2, WHERE) == 4
    # a crash during the first save: back to nothing
    assert agree([_member(0, (1, None)), _member(1, (None,))], 2, WHERE) is None
    # a new set: every file missing
    assert agree([_member(0, ()), _member(1, ())], 2, WHERE) is None


def test_a_file_further_behind_than_a_crash_leaves_it_is_a_rollback() -> None:
    with pytest.raises(RollbackError, match=r"local-1\.plm was rolled back"):
        agree([_member(0, (9, 8)), _member(1, (4, 3))], 2, WHERE)
    with pytest.raises(RollbackError, match=r"local-1\.plm was rolled back"):
        agree([_member(0, (9,)), _member(1, (8, 7))], 2, WHERE)  # 9's previous is not held


def test_a_missing_file_is_a_rollback_when_others_hold_steps() -> None:
    with pytest.raises(RollbackError, match=r"local-1\.plm of the mirror set /s is missing"):
        agree([_member(0, (5, 4)), _member(1, ())], 2, WHERE)


def test_another_jobs_file_swapped_files_and_another_world_size() -> None:
    with pytest.raises(IntegrityError, match=r"local-1\.plm belong\(s\) to another job"):
        agree([_member(0, (5, 4)), _member(1, (5, 4), job="j2")], 2, WHERE)
    swapped = SetMember(
        Path("/s/local-1.plm"), 1, 5, (5, 4), {"job": "j1", "world_size": 2, "local_rank": 0}
    )
    with pytest.raises(IntegrityError, match="holds the state of process local-0, not local-1"):
        agree([_member(0, (5, 4)), swapped], 2, WHERE)
    with pytest.raises(ConfigError, match="written by 2 processes, this job has 3"):
        agree([_member(0, (5, 4)), _member(1, (5, 4)), _member(2, ())], 3, WHERE)


# ------------------------------------------------------------ real files
def _state(step: int, rank: int, job: str, world: int = 2) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(64, generator=g)},
        "rank_rng": torch.full((4,), float(rank * 1000 + step)),
        "dist": {"job": job, "world_size": world, "local_rank": rank, "node": 0},
    }


def _write_set(where: Path, key: MasterKey, steps: list[int], job: str = "j1") -> None:
    where.mkdir(parents=True, exist_ok=True)
    for rank in range(2):
        with Mirror(member_path(where, rank), key, keep_previous=True) as m:
            for s in steps:
                m.save(_state(s, rank, job), step=s)


def test_describe_set_reads_each_file_and_the_global_step(shm_dir: Path, key: MasterKey) -> None:
    where = shm_dir / "job.plm"
    _write_set(where, key, [1, 2, 3])
    # one process a step ahead (it committed 4, the other did not)
    with Mirror(member_path(where, 0), key, keep_previous=True) as m:
        m.save(_state(4, 0, "j1"), step=4)
    members, step = describe_set(where, key)
    assert [s.held for s in members] == [(4, 3), (3, 2)]
    assert step == 3


def test_describe_set_refuses_what_no_crash_makes(shm_dir: Path, key: MasterKey) -> None:
    where, other = shm_dir / "job.plm", shm_dir / "other.plm"
    _write_set(where, key, [1, 2, 3])
    _write_set(other, key, [1, 2, 3], job="j2")
    old = shm_dir / "old"
    _write_set(old, key, [1])
    # another job's file in place of process 1's
    shutil.copy(member_path(other, 1), member_path(where, 1))
    with pytest.raises(IntegrityError, match="another job"):
        describe_set(where, key)
    # process 1's file replaced by process 0's (same job)
    _write_set(where, key, [4, 5])
    shutil.copy(member_path(where, 0), member_path(where, 1))
    with pytest.raises(IntegrityError, match="local-0, not local-1"):
        describe_set(where, key)
    # process 1's file rolled back to an old copy of its own
    shutil.rmtree(where)
    _write_set(where, key, [1, 2, 3])
    shutil.copy(member_path(old, 1), member_path(where, 1))
    with pytest.raises(RollbackError, match="rolled back"):
        describe_set(where, key)
    # process 1's file missing
    member_path(where, 1).unlink()
    with pytest.raises(RollbackError, match="missing"):
        describe_set(where, key)


def test_an_empty_directory_is_no_set(shm_dir: Path, key: MasterKey) -> None:
    with pytest.raises(FormatError, match="not a mirror set"):
        describe_set(shm_dir, key)


def test_single_process_train_on_a_set_is_refused(shm_dir: Path) -> None:
    from ..cli.conftest import sealed_job

    job = sealed_job(shm_dir)
    where = shm_dir / "set.plm"
    _write_set(where, MasterKey.load(job["key"]), [1])
    before = {p.name: p.read_bytes() for p in where.iterdir()}
    res = run_cli(
        "train", "--key", job["key"], "--data", job["data"], "--mirror", where,
        "--model", "mlp", "--steps", "3",
    )  # fmt: skip
    assert_one_line_error(res, "mirror set of a multi-process job", "torchrun")
    assert {p.name: p.read_bytes() for p in where.iterdir()} == before


def test_ls_lists_a_set_with_its_globally_committed_step(shm_dir: Path, key: MasterKey) -> None:
    import json

    key_path = shm_dir / "k.key"
    key.save(key_path)
    where = shm_dir / "job.plm"
    _write_set(where, key, [1, 2, 3])
    with Mirror(member_path(where, 0), key, keep_previous=True) as m:
        m.save(_state(4, 0, "j1"), step=4)  # one process a save ahead
    (shm_dir / "plain-dir").mkdir()  # a directory that is no set is skipped
    res = run_cli("ls", shm_dir, "--key", key_path, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    (row,) = [r for r in doc["files"] if r["name"] == "job.plm"]
    assert row["kind"] == "mirror-set" and row["step"] == 3 and row["authenticated"]
    assert "plain-dir" in doc["skipped"]


def test_several_machines_sharing_the_agents_store_are_refused_before_joining(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the agents' store shared, a replacement machine would hang forever in
    torch's rendezvous: init says what to set instead, before any connection."""
    from plinius import dist as pdist

    env = {
        "LOCAL_RANK": "0",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "1",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "9",  # nothing listens: a connection attempt would fail, not hang
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1") as err:
        pdist.init("gloo")
    assert getattr(err.value, "reported_by", None) == 0  # said once, by rank 0
    assert not torch.distributed.is_initialized()
