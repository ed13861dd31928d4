"""The mirror: bitwise round trips, growth, save_async, read-only, mismatch, freshness."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from plinius import mirror as mirror_mod
from plinius.counters import FileCounter
from plinius.crypto import MasterKey
from plinius.errors import (
    ConfigError,
    RollbackError,
    StateMismatchError,
    StorageError,
)
from plinius.mirror import Mirror, MirrorInfo, PendingSave, RNGState
from plinius.mirror._codec import TORCH_DTYPES
from plinius.testing import CrashSimRegion


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _snapshot(state: dict[str, Any]) -> dict[str, bytes]:
    """Every tensor of a state, by flattened name, as bytes."""
    from plinius.mirror._flatten import flatten

    _, srcs = flatten(state)
    return {s.name: bytes(s.data) for s in srcs}


class Net(torch.nn.Module):
    """BatchNorm, an embedding tied to the output layer, a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.conv = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(8)
        self.out = torch.nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x).transpose(1, 2)
        h = self.bn(self.conv(h)).mean(-1)
        return self.out(h)


def _job(opt_name: str = "adam", seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    net = Net()
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    elif opt_name == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, amsgrad=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=100)
    return {
        "model": net,
        "optim": opt,
        "sched": sched,
        "scaler": torch.amp.GradScaler("cpu"),
        "rng": RNGState(),
        "epoch": 0,
        "hist": [],
        "extra": {"ema": torch.zeros(4), 7: (1, 2.0, "x")},
    }


def _train(state: dict[str, Any], steps: int = 2) -> None:
    for _ in range(steps):
        x = torch.randint(0, 20, (4, 5))
        loss = state["model"](x).square().mean()
        state["optim"].zero_grad()
        loss.backward()
        state["optim"].step()
        state["sched"].step()
        state["epoch"] += 1
        state["hist"].append(float(loss.detach()))
        state["extra"]["ema"].add_(torch.rand(4))


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_full_training_state_round_trips_bit_for_bit(
    shm_dir: Path, key: MasterKey, opt_name: str
) -> None:
    state = _job(opt_name)
    path = shm_dir / "job.plm"
    with Mirror(path, key) as m:
        assert m.restore(state) is None
        _train(state)
        m.save(state, step=2)
        _train(state)
        m.save(state, step=4)
        info = m.info()
    want = _snapshot(state)
    want_plain = (state["epoch"], list(state["hist"]), state["sched"].state_dict())
    after = (torch.rand(3), np.random.rand(), __import__("random").random())

    fresh = _job(opt_name, seed=1)
    with Mirror(path, key) as m:
        assert m.restore(fresh) == 4
        assert m.info() == info
    assert _snapshot(fresh) == want
    assert (fresh["epoch"], fresh["hist"], fresh["sched"].state_dict()) == want_plain
    assert fresh["extra"][7] == (1, 2.0, "x") and type(fresh["extra"][7][1]) is float
    # the RNG went back to where it was at the save, so the next draws repeat
    assert torch.equal(torch.rand(3), after[0]) and np.random.rand() == after[1]
    # tied weights stay tied, parameters are the same objects, training goes on
    assert fresh["model"].out.weight is fresh["model"].emb.weight
    assert fresh["optim"].param_groups[0]["params"][0] is fresh["model"].emb.weight
    rng = RNGState().state_dict()
    _train(fresh)
    RNGState().load_state_dict(rng)  # the same batches for both
    _train(state)
    assert _snapshot(fresh) == _snapshot(state)


def test_info_reports_the_committed_generation(shm_dir: Path, key: MasterKey) -> None:
    path = shm_dir / "a.plm"
    with Mirror(path, key) as m:
        i0 = m.info()
        assert (i0.generation, i0.step, i0.num_tensors, i0.saved_at) == (0, None, 0, None)
        m.save({"t": torch.zeros(10), "n": 1}, step=7)
        i1 = m.info()
    assert isinstance(i1, MirrorInfo)
    assert (i1.generation, i1.step, i1.num_tensors, i1.tensor_bytes) == (1, 7, 1, 40)
    assert i1.saved_at is not None and i1.file_bytes == path.stat().st_size
    assert i1.path == str(path) and len(i1.region_id) == 32 and not i1.is_pmem
    assert i1.counter_expected is None and "no freshness counter" in i1.counter_bound


def _random_tensor(
    dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator
) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    raw = t.reshape(-1).view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    if dtype == torch.bool:
        t = t.view(torch.uint8).bitwise_and_(1).view(torch.bool)
    return t


_DTYPES = sorted(
    n for n in TORCH_DTYPES if not n.startswith(("q", "bits")) and n not in ("quint4x2", "quint2x4")
)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("save_async", [False, True])
def test_every_cpu_dtype_and_odd_shapes_round_trip(
    shm_dir: Path, key: MasterKey, save_async: bool
) -> None:
    g = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {n: _random_tensor(TORCH_DTYPES[n], (3, 5), g) for n in _DTYPES}
    base = torch.randn(6, 4, generator=g)
    state["noncontig"] = base.t()  # a view with strides (1, 4)
    state["zero"] = torch.empty(0, 3)
    state["scalar"] = torch.tensor(2.5)
    state["np"] = np.arange(10, dtype=np.float32).reshape(2, 5)
    state["np_int"] = np.array([1, 2, 3], dtype=">i8")  # big-endian: bytes kept as they are
    want = _snapshot(state)
    with Mirror(shm_dir / "d.plm", key) as m:
        if save_async:  # its capture copies every tensor that is not a parameter
            m.save_async(state, step=1).wait()
        else:
            m.save(state, step=1)
    target = {
        k: (np.zeros_like(v) if isinstance(v, np.ndarray) else torch.zeros_like(v))
        for k, v in state.items()
    }
    target["noncontig"] = torch.zeros(6, 4).t()
    keep = target["noncontig"]
    with Mirror(shm_dir / "d.plm", key) as m:
        assert m.restore(target) == 1
    assert _snapshot(target) == want
    assert target["noncontig"] is keep and torch.equal(keep, base.t())
    assert target["np_int"].dtype == np.dtype(">i8") and list(target["np_int"]) == [1, 2, 3]


def test_a_thousand_tensors_and_a_growing_manifest(shm_dir: Path, key: MasterKey) -> None:
    path = shm_dir / "many.plm"
    small = {"ts": [torch.full((3,), float(i)) for i in range(10)]}
    big = {"ts": [torch.full((i % 7 + 1,), float(i)) for i in range(1200)]}
    with Mirror(path, key) as m:
        m.save(small, step=1)
        m.save(big, step=2)  # 120x more entries: the body moves to a larger pair
        m.save(big, step=3)
        size = path.stat().st_size
        m.save(big, step=4)
        assert path.stat().st_size == size  # steady state: the layout is reused
    target = {"ts": [torch.zeros(i % 7 + 1) for i in range(1200)]}
    with Mirror(path, key) as m:
        assert m.restore(target) == 4
        assert len(m.committed_state_names()) == 1200
    assert all(
        torch.equal(t, torch.full((i % 7 + 1,), float(i))) for i, t in enumerate(target["ts"])
    )


def test_large_tensors_are_sealed_in_chunks(
    shm_dir: Path, key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror_mod, "CHUNK_BYTES", 1000)
    t = torch.randn(2600)  # 10400 bytes: 11 chunks, the last one short
    path = shm_dir / "c.plm"
    with Mirror(path, key) as m:
        m.save({"t": t, "z": torch.empty(0)}, step=1)
        assert len(m._manifest.entries[0].tags) == 11
    # the chunk size is recorded: a different setting still reads it back
    monkeypatch.setattr(mirror_mod, "CHUNK_BYTES", 64 << 20)
    target = {"t": torch.zeros(2600), "z": torch.empty(0)}
    with Mirror(path, key) as m:
        m.restore(target)
        m.verify()
        m.save(target, step=2)  # the same tensor, now in one chunk, fits its old slots
    assert torch.equal(target["t"], t)


def test_parallel_and_serial_saves_read_each_other(shm_dir: Path, key: MasterKey) -> None:
    state = {"a": torch.randn(3 << 20), "b": torch.randn(1 << 20)}  # above PARALLEL_MIN_BYTES
    with Mirror(shm_dir / "p.plm", key, threads=2) as m:
        m.save(state, step=1)
    target = {"a": torch.zeros(3 << 20), "b": torch.zeros(1 << 20)}
    with Mirror(shm_dir / "p.plm", key, threads=1) as m:
        m.restore(target)
    assert torch.equal(target["a"], state["a"]) and torch.equal(target["b"], state["b"])


def test_state_that_changes_shape_and_grows(shm_dir: Path, key: MasterKey) -> None:
    path = shm_dir / "g.plm"
    with Mirror(path, key) as m:
        m.save({"w": torch.ones(4), "x": 1}, step=1)
        m.save({"w": torch.ones(400), "x": 2}, step=2)  # a new, larger pair
        m.save({"w": torch.full((2,), 3.0), "x": 3}, step=3)  # shrinks into its pair
        m.save({"w": torch.full((2,), 4.0), "x": 4}, step=4)
    target: dict[str, Any] = {"w": torch.zeros(2), "x": None}
    with Mirror(path, key) as m:
        assert m.restore(target) == 4
    assert target == {"w": target["w"], "x": 4} and target["w"].tolist() == [4.0, 4.0]


def test_restore_model_loads_only_the_model(shm_dir: Path, key: MasterKey) -> None:
    state = _job()
    _train(state)
    with Mirror(shm_dir / "m.plm", key) as m:
        m.save(state, step=2)
    net = Net()
    with Mirror(shm_dir / "m.plm", key, readonly=True) as m:
        assert m.restore_model(net) == 2
        with pytest.raises(StateMismatchError, match="no 'ema' entry"):
            m.restore_model(net, "ema")
    assert all(
        torch.equal(a, b)
        for a, b in zip(net.state_dict().values(), state["model"].state_dict().values())
    )


def test_read_tensors_and_verify(shm_dir: Path, key: MasterKey) -> None:
    state = {"model": torch.nn.Linear(3, 2), "other": torch.ones(2), "arr": np.ones(3, np.int16)}
    with Mirror(shm_dir / "r.plm", key) as m:
        m.save(state, step=1)
        got = m.read_tensors("model.")
        assert sorted(got) == ["model.bias", "model.weight"]
        assert torch.equal(got["model.weight"], state["model"].weight.detach())
        assert m.read_tensors()["arr"].dtype == torch.int16
        v = m.verify()
        assert v.verified and v.generation == 1
        names = [t.name for t in m.committed_tensors()]
        assert names == m.committed_state_names() == ["model.weight", "model.bias", "other", "arr"]


# ---------------------------------------------------------------- save_async
def test_save_async_captures_what_a_forward_pass_changes(shm_dir: Path, key: MasterKey) -> None:
    state = _job("sgd")
    _train(state)
    path = shm_dir / "async.plm"
    with Mirror(path, key) as m:
        want = _snapshot(state)
        want_epoch = state["epoch"]
        pending = m.save_async(state, step=2)
        assert isinstance(pending, PendingSave) and pending.step == 2
        # what the caller may do before waiting: a forward pass (BN statistics),
        # plain values, tensors outside modules and optimizers
        state["model"](torch.randint(0, 20, (4, 5)))
        state["epoch"] += 100
        state["extra"]["ema"].fill_(-1)
        torch.rand(5)
        pending.wait()
        assert pending.done()
    fresh = _job("sgd", seed=3)
    with Mirror(path, key) as m:
        assert m.restore(fresh) == 2
    assert _snapshot(fresh) == want and fresh["epoch"] == want_epoch


def test_a_second_save_waits_for_the_first(shm_dir: Path, key: MasterKey) -> None:
    with Mirror(shm_dir / "w.plm", key) as m:
        p1 = m.save_async({"t": torch.ones(1 << 16)}, step=1)
        p2 = m.save_async({"t": torch.full((1 << 16,), 2.0)}, step=2)
        assert p1.done()
        p2.wait()
        assert m.info().generation == 2
    target = {"t": torch.zeros(1 << 16)}
    with Mirror(shm_dir / "w.plm", key) as m:
        assert m.restore(target) == 2 and target["t"][0] == 2.0


def test_a_failed_background_save_is_reported_once(
    shm_dir: Path, key: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = Mirror(shm_dir / "f.plm", key)
    real = m._save_locked

    def broken(*a: Any) -> None:
        raise StorageError("disk on fire")

    monkeypatch.setattr(m, "_save_locked", broken)
    pending = m.save_async({"t": torch.ones(2)}, step=1)
    with pytest.raises(StorageError, match="disk on fire"):
        pending.wait()
    monkeypatch.setattr(m, "_save_locked", real)
    m.save({"t": torch.ones(2)}, step=2)  # already reported: not raised again
    monkeypatch.setattr(m, "_save_locked", broken)
    m.save_async({"t": torch.ones(2)}, step=3)
    with pytest.raises(StorageError, match="disk on fire"):
        m.save({"t": torch.ones(2)}, step=4)  # not yet reported: the next call raises it
    m.close()
    m.close()  # idempotent
    with pytest.raises(ConfigError, match="closed"):
        m.info()


# ---------------------------------------------------------------- modes, locks, errors
def test_readonly_mirror_restores_but_never_writes(shm_dir: Path, key: MasterKey) -> None:
    path = shm_dir / "ro.plm"
    with Mirror(path, key) as m:
        m.save({"t": torch.ones(3)}, step=5)
    before = path.read_bytes()
    with Mirror(path, key, readonly=True) as m:
        t = {"t": torch.zeros(3)}
        assert m.restore(t) == 5
        with pytest.raises(ConfigError, match="read-only"):
            m.save(t, step=6)
        with pytest.raises(ConfigError, match="read-only"):
            m.save_async(t, step=6)
    assert path.read_bytes() == before
    with pytest.raises(StorageError, match="does not exist"):
        Mirror(shm_dir / "missing.plm", key, readonly=True)


def test_one_writer_at_a_time(shm_dir: Path, key: MasterKey) -> None:
    path = shm_dir / "lock.plm"
    with Mirror(path, key):
        with pytest.raises(StorageError, match="in use"):
            Mirror(path, key)
        with pytest.raises(StorageError, match="in use"):
            Mirror(path, key, readonly=True)
    with Mirror(path, key, readonly=True), Mirror(path, key, readonly=True):
        pass  # readers share


def test_bad_arguments(shm_dir: Path, key: MasterKey) -> None:
    with pytest.raises(ConfigError, match="MasterKey"):
        Mirror(shm_dir / "x.plm", b"k" * 32)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="counter_every"):
        Mirror(shm_dir / "x.plm", key, counter_every=0)
    with pytest.raises(StorageError, match="does not exist"):
        Mirror(shm_dir / "no" / "x.plm", key)
    with Mirror(shm_dir / "x.plm", key) as m:
        for bad in (1.0, True, "3", 1 << 63):
            with pytest.raises(ConfigError, match="step"):
                m.save({}, step=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="not supported"):
            m.save({"x": object()}, step=1)
        assert m.info().generation == 0


def test_mismatch_is_raised_before_anything_is_written(shm_dir: Path, key: MasterKey) -> None:
    path = shm_dir / "mm.plm"
    state = {"model": torch.nn.Linear(4, 3), "b": torch.ones(2), "n": 1}
    with Mirror(path, key) as m:
        m.save(state, step=1)
    target: dict[str, Any] = {"model": torch.nn.Linear(4, 3), "b": torch.ones(5), "n": 0}
    before = _snapshot(target)
    with Mirror(path, key) as m, pytest.raises(StateMismatchError, match=r"b: saved float32\[2\]"):
        m.restore(target)
    assert _snapshot(target) == before and target["n"] == 0
    with Mirror(path, key) as m, pytest.raises(StateMismatchError, match="'n'"):
        m.restore({"model": torch.nn.Linear(4, 3), "b": torch.ones(2)})


def test_region_like_objects_are_used_as_they_are(key: MasterKey) -> None:
    region = CrashSimRegion(0)
    with Mirror(region, key) as m:
        m.save({"t": torch.arange(5.0)}, step=3)
    image = region.image()
    t = {"t": torch.zeros(5)}
    with Mirror(CrashSimRegion.from_image(image), key) as m:
        assert m.restore(t) == 3 and m.info().path is None
    assert t["t"].tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- freshness counter
def _counted(path: Path, counter: FileCounter, **kw: Any) -> Mirror:
    return Mirror(path, MasterKey(b"k" * 32), counter=counter, **kw)


def test_counter_advances_with_every_commit(shm_dir: Path) -> None:
    c = FileCounter(shm_dir / "ctr")
    path = shm_dir / "c.plm"
    with _counted(path, c) as m:
        assert c.read() == 0 and m.info().counter_expected == 0
        for step in range(1, 4):
            m.save({"t": torch.full((2,), float(step))}, step=step)
        assert c.read() == 3 and m.info().counter_expected == 3
        assert "every commit" in m.info().counter_bound


def test_a_rolled_back_copy_is_refused(shm_dir: Path) -> None:
    c = FileCounter(shm_dir / "ctr")
    path = shm_dir / "c.plm"
    with _counted(path, c) as m:
        m.save({"t": torch.ones(2)}, step=1)
    old = path.read_bytes()
    with _counted(path, c) as m:
        m.save({"t": torch.ones(2)}, step=2)
    path.write_bytes(old)  # the host puts the older, authentic file back
    with pytest.raises(RollbackError, match="older copy"):
        _counted(path, c)
    with pytest.raises(RollbackError, match="older copy"):
        _counted(path, c, readonly=True)
    # without the counter the old file is authentic: that is what the counter is for
    with Mirror(path, MasterKey(b"k" * 32)) as m:
        assert m.info().step == 1


def test_a_deleted_mirror_is_refused_while_the_counter_is_above_zero(shm_dir: Path) -> None:
    c = FileCounter(shm_dir / "ctr")
    path = shm_dir / "c.plm"
    with _counted(path, c) as m:
        m.save({"t": torch.ones(2)}, step=1)
    path.unlink()
    with pytest.raises(RollbackError, match="fresh counter"):
        _counted(path, c)
    assert not path.exists()
    with pytest.raises(RollbackError, match="fresh counter"):
        _counted(CrashSimRegion(0), c)  # type: ignore[arg-type]
    with _counted(path, FileCounter(shm_dir / "new-ctr")) as m:  # a new job, explicitly
        assert m.info().generation == 0


def test_crash_between_commit_and_counter_advance_is_accepted(shm_dir: Path) -> None:
    c = FileCounter(shm_dir / "ctr")
    path = shm_dir / "c.plm"
    with _counted(path, c) as m:
        m.save({"t": torch.ones(2)}, step=1)
        m.save({"t": torch.ones(2)}, step=2)
    (shm_dir / "ctr").write_text("1\n")  # the increment after commit 2 never happened
    with _counted(path, c, readonly=True) as m:
        assert m.info().step == 2
    assert c.read() == 1  # a read-only open never advances the counter
    with _counted(path, c) as m:
        assert m.info().step == 2
    assert c.read() == 2
    (shm_dir / "ctr").write_text("0\n")  # more than one behind: not a crash
    with pytest.raises(RollbackError, match="reset or belongs to another job"):
        _counted(path, c)


def test_counter_every_k_commits_states_the_bound(shm_dir: Path) -> None:
    c = FileCounter(shm_dir / "ctr")
    with _counted(shm_dir / "c.plm", c, counter_every=3) as m:
        seen = []
        for step in range(1, 8):
            m.save({"t": torch.ones(1)}, step=step)
            seen.append(c.read())
        assert seen == [0, 0, 1, 1, 1, 2, 2]
        assert "at most 2 commits" in m.info().counter_bound
    with _counted(shm_dir / "c2.plm", FileCounter(shm_dir / "ctr2"), counter_every=None,
                  counter_interval_s=3600) as m:  # fmt: skip
        m.save({"t": torch.ones(1)}, step=1)
        assert "3600 seconds" in m.info().counter_bound and m.info().counter_expected == 0
    with pytest.raises(ConfigError, match="counter_every or counter_interval_s"):
        _counted(shm_dir / "c3.plm", c, counter_every=None)


def test_wearing_counter_on_every_commit_warns(shm_dir: Path) -> None:
    class Wearing(FileCounter):
        wears = True

    with pytest.warns(UserWarning, match="wears it out"):
        _counted(shm_dir / "w.plm", Wearing(shm_dir / "ctr")).close()


def test_floats_keep_their_bits_through_a_mirror(shm_dir: Path, key: MasterKey) -> None:
    vals = [math.inf, -0.0, math.nan, 1e-310]
    with Mirror(shm_dir / "f.plm", key) as m:
        m.save({"v": vals}, step=0)
    t: dict[str, Any] = {"v": None}
    with Mirror(shm_dir / "f.plm", key) as m:
        assert m.restore(t) == 0
    assert [repr(x) for x in t["v"]] == [repr(x) for x in vals]
    assert math.copysign(1, t["v"][1]) == -1


def test_mirror_file_mode_is_private(shm_dir: Path, key: MasterKey) -> None:
    with Mirror(shm_dir / "p.plm", key):
        pass
    assert os.stat(shm_dir / "p.plm").st_mode & 0o077 == 0
