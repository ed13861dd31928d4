"""The save's fast paths give exactly what the general paths give.

A save reuses the last save's work where the state's structure is unchanged:
the flatten memo (skeleton pieces), the allocator's same-layout placement, the
manifest body encoder's cached JSON, the inlined one-piece encryption. Each is
checked here against the general path it short-cuts, across structure changes.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from plinius.crypto import MasterKey
from plinius.errors import ConfigError
from plinius.mirror import Mirror, RNGState
from plinius.mirror import _format as fmt
from plinius.mirror._codec import TORCH_DTYPES
from plinius.mirror._flatten import FlattenMemo, flatten, torch_src


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    )


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    opt.step()
    opt.zero_grad()


def _flat(state: dict[str, Any], memo: FlattenMemo | None, capture: bool = False) -> Any:
    skel, srcs = flatten(state, memo=memo, capture=capture)
    return (
        json.dumps(skel),
        [(s.name, s.kind, s.dtype, s.shape, s.nbytes, bytes(s.data)) for s in srcs],
    )


@pytest.mark.parametrize("capture", [False, True])
def test_memo_gives_the_same_skeleton_and_tensors_as_a_fresh_flatten(capture: bool) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    memo = FlattenMemo()
    state: dict[str, Any] = {"model": model, "optim": opt, "epoch": 0}

    def check() -> None:
        assert _flat(state, memo, capture) == _flat(state, None, capture)

    check()  # no optimizer state yet
    _step(model, opt)
    check()  # Adam's moments appeared
    check()  # the same structure again: the memo is used
    state["epoch"] = 1.5
    _step(model, opt)
    check()  # a plain value changed type and the tensors changed
    model.register_buffer("extra", torch.arange(3))
    check()  # a module gained a buffer
    del state["epoch"]
    state["rng"] = RNGState()
    check()  # entries before and after the memoised ones changed
    state = {"first": torch.ones(2), **state}
    check()  # every tensor index moved


def test_memo_is_kept_per_object_and_place() -> None:
    a, b = _model(), _model()
    memo = FlattenMemo()
    for state in ({"a": a, "b": b}, {"a": b, "b": a}, {"b": a}, {"a": a, "b": b}):
        assert _flat(state, memo) == _flat(state, None)


def test_memo_falls_back_for_optimizer_state_that_is_not_all_tensors() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: buffers are None
    _step(model, opt)
    memo = FlattenMemo()
    state = {"model": model, "optim": opt}
    for _ in range(3):
        assert _flat(state, memo) == _flat(state, None)
        _step(model, opt)


def test_memo_holds_no_tensors() -> None:
    model = _model()
    memo = FlattenMemo()
    flatten({"model": model}, memo=memo)
    held = [m.node for m in memo.entries.values()]
    assert memo.entries and "Tensor" not in repr(held) and "array" not in repr(held)


def test_names_stay_unique_when_a_memoised_name_is_taken() -> None:
    model = torch.nn.Linear(2, 2)
    memo = FlattenMemo()
    flatten({"m": model}, memo=memo)
    # A plain tensor named like the module's weight, flattened first.
    _, srcs = flatten({"m.weight": torch.ones(1), "m": model}, memo=memo)
    names = [s.name for s in srcs]
    assert len(set(names)) == len(names) == 3


def _makeable_dtypes() -> list[str]:
    """The dtypes whose dense CPU tensors torch can allocate and view as bytes."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, dtype in sorted(TORCH_DTYPES.items()):
            try:
                torch.zeros(6, dtype=dtype).view(torch.uint8)
            except (RuntimeError, TypeError):
                continue  # quantized and sub-byte dtypes: refused or not dense
            out.append(name)
    return out


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("name", _makeable_dtypes())
def test_the_fast_tensor_view_matches_the_general_one(name: str) -> None:
    dtype = TORCH_DTYPES[name]
    t = torch.zeros(3, 2, dtype=dtype)
    raw = t.view(torch.uint8)
    top = 2 if dtype == torch.bool else 256  # a bool byte is 0 or 1
    raw.copy_(torch.randint(0, top, raw.shape, dtype=torch.uint8))
    fast = torch_src(t, "t", copy=False)
    slow = torch_src(t, "t", copy=True)  # the general path: a staged copy
    assert (fast.dtype, fast.shape, fast.nbytes) == (slow.dtype, slow.shape, slow.nbytes)
    assert bytes(fast.data) == bytes(slow.data) == raw.numpy().tobytes()
    assert fast.dtype == str(t.dtype).removeprefix("torch.")


def test_a_parameter_that_requires_grad_is_viewed_without_a_copy() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    src = torch_src(p, "p", copy=False)
    assert src.data.ctypes.data == p.data_ptr() and bytes(src.data) == p.detach().numpy().tobytes()


def _entry(name: str, n: int, slots: tuple[int, int], cur: int, chunks: int = 1) -> fmt.Entry:
    return fmt.Entry(
        name, "torch", "uint8", (n,), n, slots, fmt.round_up(n + 16 * chunks, fmt.ALIGN), cur,
        [os.urandom(16) for _ in range(chunks)],
    )  # fmt: skip


def test_the_body_encoder_matches_encode_body() -> None:
    enc = fmt.BodyEncoder()
    skel: dict[str, Any] = {"t": "dict", "items": [[{"t": "str", "v": 'é"\\'}, {"t": "none"}]]}
    layouts = [
        [],
        [_entry("a", 10, (4096, 8192), 0)],
        [_entry("a", 10, (4096, 8192), 1), _entry("b\u2603", 5, (12288, 16384), 0, chunks=3)],
        [_entry("b\u2603", 5, (12288, 16384), 1, chunks=3)],
    ]
    for entries in layouts * 2:
        for e in entries:
            e.tags = [os.urandom(16) for _ in e.tags]
        assert enc.encode(skel, entries) == fmt.encode_body(skel, entries)
        skel = {
            "t": "dict",
            "items": [*skel["items"], [{"t": "int", "v": 1}, {"t": "bool", "v": True}]],
        }


def _placements(committed: fmt.Manifest, wants: list[tuple[str, int]]) -> Any:
    a = fmt.Allocator(committed)
    placed = a.place_tensors(wants)
    body = a.place_body(3000)
    return placed, body, a.end


def test_the_same_layout_placement_matches_the_general_one() -> None:
    entries = [
        _entry("a", 100, (fmt.DATA_START, fmt.DATA_START + 8192), 0),
        _entry("b", 5000, (fmt.DATA_START + 4096, fmt.DATA_START + 12288), 1),
    ]
    root = fmt.Root(
        generation=3, step=3, saved_at=0.0, counter_expected=0, uses_counter=False,
        counter_every=0, counter_interval_s=0.0, body_off=fmt.DATA_START + 20480, body_len=100,
        body_other=fmt.DATA_START + 24576, body_cap=4096, body_tag=bytes(16), num_tensors=2,
        tensor_bytes=5100, extent_end=fmt.DATA_START + 28672, chunk_bytes=1 << 20,
    )  # fmt: skip
    m = fmt.Manifest(root, 0, {"t": "dict", "items": []}, entries)
    same = [("a", 116), ("b", 5016)]
    fast = _placements(m, same)
    # The general path: the same wants in another order (the fast path needs the same order).
    slow_placed, slow_body, slow_end = _placements(m, same[::-1])
    assert fast[0] == slow_placed[::-1] and fast[1:] == (slow_body, slow_end)
    assert fast[0] == [(e.slots, e.cap, 1 - e.cur) for e in entries]


def test_saves_after_structure_changes_restore_exactly(shm_dir: Path, key: MasterKey) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state: dict[str, Any] = {"model": model, "optim": opt, "step": 0}
    with Mirror(shm_dir / "m.plm", key) as mirror:
        for i in range(6):
            if i == 2:
                model.register_buffer("extra", torch.arange(4.0))
            if i == 4:
                state["more"] = np.arange(3)
            _step(model, opt)
            state["step"] = i
            mirror.save(state, step=i)
            want = _flat(state, None)
            fresh = _model()
            if i >= 2:
                fresh.register_buffer("extra", torch.zeros(4))
            fopt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
            target: dict[str, Any] = {"model": fresh, "optim": fopt, "step": None}
            if i >= 4:
                target["more"] = np.zeros(3, dtype=np.int64)
            assert mirror.restore(target) == i
            assert _flat(target, None) == want


def test_memo_reuses_views_of_the_same_memory_and_only_those() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    memo = FlattenMemo()
    state = {"m": model, "o": opt}
    _, first = flatten(state, memo=memo)
    _, second = flatten(state, memo=memo)
    assert all(a.data is b.data for a, b in zip(first, second))  # the views were reused

    # Another tensor in the parameter (the old storage is freed), another
    # momentum buffer: the next flatten must read the new memory.
    with torch.no_grad():
        model.weight.data = torch.full((2, 3), 7.0)
    opt.state[model.bias]["momentum_buffer"] = torch.full((2,), 5.0)
    _, third = flatten(state, memo=memo)
    by_name = {s.name: s for s in third}
    assert bytes(by_name["m.weight"].data) == torch.full((2, 3), 7.0).numpy().tobytes()
    assert (
        bytes(by_name["o.state.1.momentum_buffer"].data) == torch.full((2,), 5.0).numpy().tobytes()
    )
    assert by_name["m.weight"].data.ctypes.data == model.weight.data_ptr()
    assert _flat(state, memo) == _flat(state, None)

    # A transposed view of a square tensor has the same pointer, dtype and
    # shape but other bytes in order: never the cached view.
    sq = torch.nn.Linear(2, 2, bias=False)
    s2 = {"sq": sq}
    flatten(s2, memo=memo)
    with torch.no_grad():
        sq.weight.data = sq.weight.data.t()
    assert _flat(s2, memo) == _flat(s2, None)


def test_a_closed_mirror_holds_no_views(shm_dir: Path, key: MasterKey) -> None:
    model = torch.nn.Linear(3, 2)
    m = Mirror(shm_dir / "v.plm", key)
    m.save({"m": model}, step=1)
    assert m._memo.entries  # white box: the views of the last save are kept while open
    m.close()
    assert not m._memo.entries


class _KeyedModule(torch.nn.Module):
    """A module whose state_dict key is whatever ``self.k`` is (a custom state_dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.k: Any = 1
        self.t = torch.ones(2)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:  # type: ignore[override]
        return {self.k: self.t}

    def load_state_dict(self, sd: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return None


def test_memo_never_mixes_keys_that_are_equal_but_of_other_types() -> None:
    mod = _KeyedModule()
    memo = FlattenMemo()
    state = {"m": mod}
    for k in (1, True, 1.0, 1, -0.0, 0.0, "1"):
        mod.k = k
        assert _flat(state, memo) == _flat(state, None), k


def test_a_sparse_tensor_in_a_memoised_place_is_refused_cleanly() -> None:
    model = torch.nn.BatchNorm1d(3)
    memo = FlattenMemo()
    flatten({"m": model}, memo=memo)
    model.running_mean = model.running_mean.to_sparse()
    for capture in (False, True):
        with pytest.raises(ConfigError, match=r"sparse|not supported"):
            flatten({"m": model}, memo=memo, capture=capture)


def test_capture_drops_the_views_it_does_not_use() -> None:
    model = torch.nn.BatchNorm1d(3)
    memo = FlattenMemo()
    flatten({"m": model}, memo=memo)  # a synchronous save: every view kept
    flatten({"m": model}, memo=memo, capture=True)  # buffers copied: their views dropped
    (m,) = memo.entries.values()
    kept = [n for n, v in zip(m.names, m.views) if v is not None]
    assert kept == ["m.weight", "m.bias"]
