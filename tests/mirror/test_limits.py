"""States a default Python process could not save or read back (issue 17, items 13 and 14).

A state nested too deep, one that contains itself, an integer too long for
Python's decimal conversion: each is refused at save time with a clear
``ConfigError`` naming where it is (or, for integers, saved exactly), and the
previous generation stays committed and restorable, even by a fresh process
that runs with Python's default limits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from plinius.crypto import MasterKey
from plinius.errors import ConfigError, FormatError, PliniusError
from plinius.mirror import Mirror
from plinius.mirror import _format as fmt
from plinius.mirror._codec import MAX_DEPTH, decode_plain, encode_plain

_SRC = str(Path(__file__).resolve().parents[2] / "src")


def _nested(depth: int) -> dict[str, Any]:
    """``{"d": {"d": ... {"d": 1}}}``: ``depth`` dicts, one in another."""
    v: Any = 1
    for _ in range(depth):
        v = {"d": v}
    return v  # type: ignore[no-any-return]


def _committed(path: Path, key: MasterKey) -> dict[str, Any]:
    """A mirror at ``path`` with generation 1 committed (step 7)."""
    state = {"w": torch.arange(4.0), "n": 3}
    with Mirror(path, key) as m:
        m.save(state, step=7)
    return state


def _restores_in_a_fresh_process(path: Path, key: MasterKey, generation: int = 1) -> None:
    """A new default Python process (recursion limit 1000) restores the state of
    :func:`_committed` exactly, as ``generation``."""
    kfile = path.with_suffix(".key")
    key.save(kfile)
    script = textwrap.dedent(
        f"""
        import sys, torch
        from plinius.crypto import MasterKey
        from plinius.mirror import Mirror
        assert sys.getrecursionlimit() == 1000
        t = {{"w": torch.zeros(4), "n": 0}}
        with Mirror({str(path)!r}, MasterKey.load({str(kfile)!r}), readonly=True) as m:
            assert m.info().generation == {generation}, m.info()
            assert m.restore(t) == 7
        assert t["w"].tolist() == [0.0, 1.0, 2.0, 3.0] and t["n"] == 3, t
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": _SRC}
    env.pop("PYTHONINTMAXSTRDIGITS", None)
    r = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.fixture
def high_recursion_limit() -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


# ---------------------------------------------------------------- item 13
def _self_list() -> list[Any]:
    a: list[Any] = []
    a.append(a)
    return a


def _self_dict() -> dict[str, Any]:
    d: dict[str, Any] = {"x": 1}
    d["me"] = {"again": [d]}
    return d


class _Loop:
    """A Stateful object whose state_dict() holds itself."""

    def state_dict(self) -> dict[str, Any]:
        return {"me": self}

    def load_state_dict(self, sd: dict[str, Any]) -> None:  # pragma: no cover
        pass


@pytest.mark.parametrize("use_async", [False, True], ids=["save", "save_async"])
@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: {"deep": _nested(330)}, r"deep(\.d){9}"),
        (lambda: {"loop": _self_list()}, r"loop\.0 is loop itself"),
        (lambda: {"cfg": _self_dict()}, r"cfg\.me\.again\.0 is cfg itself"),
        (lambda: {"obj": _Loop()}, r"obj\.me is obj itself"),
        (
            lambda: {"k": {(((((1,),),),),): 1} | {_nested_tuple(400): 2}},
            r"cannot save k(\[0\]){5}",
        ),
    ],
    ids=["330-deep", "self-list", "self-dict", "self-stateful", "deep-key"],
)
def test_a_state_too_deep_or_containing_itself_is_refused_and_nothing_is_lost(
    shm_dir: Path, key: MasterKey, make: Any, needle: str, use_async: bool
) -> None:
    path = shm_dir / "m.plm"
    _committed(path, key)
    with Mirror(path, key) as m:
        with pytest.raises(ConfigError, match=needle) as ei:
            if use_async:
                m.save_async(make(), step=8).wait()
            else:
                m.save(make(), step=8)
        msg = str(ei.value)
        assert "\n" not in msg and len(msg) < 400, msg
        assert m.info().generation == 1
        m.save({"w": torch.arange(4.0), "n": 3}, step=7)  # the mirror is still usable
    _restores_in_a_fresh_process(path, key, generation=2)


def _nested_tuple(depth: int) -> Any:
    v: Any = 0
    for _ in range(depth):
        v = (v,)
    return v


def test_the_messages_say_what_to_do(shm_dir: Path, key: MasterKey) -> None:
    with Mirror(shm_dir / "m.plm", key) as m:
        with pytest.raises(ConfigError) as ei:
            m.save({"deep": _nested(MAX_DEPTH + 5)}, step=1)
        assert f"more than {MAX_DEPTH} levels" in str(ei.value)
        assert "flatten" in str(ei.value) or "fewer levels" in str(ei.value)
        with pytest.raises(ConfigError) as ei:
            m.save({"loop": _self_list()}, step=1)
        assert "contains itself" in str(ei.value) and "cannot be saved" in str(ei.value)


def test_the_deepest_state_allowed_round_trips(shm_dir: Path, key: MasterKey) -> None:
    # The top-level dict is level 1; MAX_DEPTH - 1 more dicts below it is the most.
    state = {"deep": _nested(MAX_DEPTH - 1), "t": torch.ones(2)}
    path = shm_dir / "m.plm"
    with Mirror(path, key) as m:
        m.save(state, step=1)
        with pytest.raises(ConfigError, match=f"more than {MAX_DEPTH} levels"):
            m.save({"deep": _nested(MAX_DEPTH), "t": torch.ones(2)}, step=2)
    target: dict[str, Any] = {"deep": None, "t": torch.zeros(2)}
    with Mirror(path, key, readonly=True) as m:
        assert m.restore(target) == 1
    assert target["deep"] == state["deep"]


_BIG = [10**4300 - 1, 10**4300, -(10**4300), 7**20000, -(3**50000) + 1, 2**100000]


@pytest.mark.parametrize("use_async", [False, True], ids=["save", "save_async"])
def test_integers_of_any_size_are_saved_exactly(
    shm_dir: Path, key: MasterKey, use_async: bool
) -> None:
    path = shm_dir / "m.plm"
    state: dict[str, Any] = {
        "big": list(_BIG),
        "keys": {v: i for i, v in enumerate(_BIG)},
        "t": torch.ones(3),
    }
    with Mirror(path, key) as m:
        if use_async:
            m.save_async(state, step=2).wait()
        else:
            m.save(state, step=2)
    target: dict[str, Any] = {"big": None, "keys": None, "t": torch.zeros(3)}
    with Mirror(path, key, readonly=True) as m:
        assert m.restore(target) == 2
    assert target["big"] == _BIG and all(type(v) is int for v in target["big"])
    assert list(target["keys"]) == _BIG


def test_integers_within_the_decimal_limit_keep_their_encoding() -> None:
    # Byte-identical to what every earlier version wrote: a JSON integer.
    for v in (0, -1, 2**63, 10**4300 - 1, -(10**4300) + 1):
        assert encode_plain(v) == {"t": "int", "v": v}
    node = encode_plain(10**4300)
    assert node["t"] == "bigint" and node["v"] == format(10**4300, "x")
    assert encode_plain(-(10**4300))["v"] == "-" + format(10**4300, "x")
    for v in _BIG:
        assert decode_plain(json.loads(json.dumps(encode_plain(v)))) == v


@pytest.mark.parametrize("bad", ["", "-", "0x1f", "1F", " 1f", "1_f", "+1f", 5, None, "-0"])
def test_a_malformed_bigint_node_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match="bigint"):
        decode_plain({"t": "bigint", "v": bad})


def test_huge_integers_in_messages_do_not_break_them(shm_dir: Path, key: MasterKey) -> None:
    with Mirror(shm_dir / "m.plm", key) as m:
        with pytest.raises(ConfigError, match="step must be an int"):
            m.save({}, step=10**5000)
        with pytest.raises(ConfigError, match="not supported"):
            m.save({"x": {10**5000: object()}}, step=1)
        with pytest.raises(ConfigError, match="top-level keys must be strings"):
            m.save({10**5000: 1}, step=1)  # type: ignore[dict-item]


# ---------------------------------------------------------------- item 14
def test_a_state_saved_under_a_raised_recursion_limit_is_refused_at_save(
    shm_dir: Path, key: MasterKey, high_recursion_limit: None
) -> None:
    path = shm_dir / "m.plm"
    _committed(path, key)
    with Mirror(path, key) as m:
        for depth in (MAX_DEPTH + 1, 1000):
            with pytest.raises(ConfigError, match=f"more than {MAX_DEPTH} levels"):
                m.save({"deep": _nested(depth)}, step=8)
            with pytest.raises(ConfigError, match=f"more than {MAX_DEPTH} levels"):
                m.save_async({"deep": _nested(depth)}, step=8).wait()
        assert m.info().generation == 1
    _restores_in_a_fresh_process(path, key)


def _deep_node(depth: int) -> dict[str, Any]:
    """The skeleton node of :func:`_nested` (``depth`` dicts), built without recursion."""
    n: dict[str, Any] = {"t": "int", "v": 1}
    for _ in range(depth):
        n = {"t": "dict", "items": [[{"t": "str", "v": "d"}, n]]}
    return n


def _forge_body(path: Path, key: MasterKey, skeleton: dict[str, Any]) -> None:
    """Commit a generation whose body holds ``skeleton``, as an older plinius could have
    (under a raised recursion limit), or a forger holding the key."""
    from plinius.mirror._file import commit, grow_to, save_aead, write_manifest

    with Mirror(path, key) as m:
        m.save({"w": torch.arange(4.0)}, step=9)
        man, region = m._manifest, m._region
        text = fmt.encode_body(skeleton, man.entries)
        alloc = fmt.Allocator(man)
        off, other, cap = alloc.place_body(len(text) + 16)
        grow_to(region, alloc.end)
        gen, slot = man.root.generation + 1, 1 - man.slot
        root = dataclasses.replace(
            man.root, generation=gen, body_off=off, body_other=other, body_cap=cap,
            extent_end=region.size,
        )  # fmt: skip
        salt = os.urandom(16)
        aead = save_aead(m._mirror_key, salt)
        write_manifest(region, aead, m._sb.region_id, root, slot, text, salt)
        commit(region, gen, slot)


@pytest.mark.parametrize("limit", [1000, 20000], ids=["default-limit", "raised-limit"])
@pytest.mark.parametrize("depth", [MAX_DEPTH, 300, 1000, 3000])
def test_reading_a_body_nested_too_deep_is_a_clear_error(
    shm_dir: Path, key: MasterKey, depth: int, limit: int, high_recursion_limit: None
) -> None:
    path = shm_dir / "m.plm"
    sk = {
        "t": "dict",
        "items": [
            [{"t": "str", "v": "w"}, {"t": "tensor", "i": 0}],
            [{"t": "str", "v": "deep"}, _deep_node(depth)],
        ],
    }
    _forge_body(path, key, sk)
    sys.setrecursionlimit(limit)
    with pytest.raises(FormatError, match=f"deeper than the {MAX_DEPTH} levels") as ei:
        Mirror(path, key, readonly=True)
    assert "\n" not in str(ei.value)
    assert isinstance(ei.value, PliniusError)


def test_a_mismatch_naming_huge_integer_keys_is_still_a_clear_error(
    shm_dir: Path, key: MasterKey
) -> None:
    from plinius.errors import StateMismatchError

    path = shm_dir / "m.plm"
    with Mirror(path, key) as m:
        m.save({"d": {10**5000: torch.ones(1)}}, step=1)
    with Mirror(path, key) as m, pytest.raises(StateMismatchError, match="an integer of"):
        m.restore({"d": {-(10**5000): torch.ones(1)}})


def test_a_recursion_limit_lowered_below_what_a_state_needs_is_a_clear_error(
    shm_dir: Path, key: MasterKey
) -> None:
    path = shm_dir / "m.plm"
    _committed(path, key)
    old = sys.getrecursionlimit()
    with Mirror(path, key) as m:
        try:
            sys.setrecursionlimit(len(_stack()) + 60)
            with pytest.raises(ConfigError, match="recursion limit"):
                m.save({"deep": _nested(MAX_DEPTH - 1)}, step=8)
        finally:
            sys.setrecursionlimit(old)
        assert m.info().generation == 1


def _stack() -> list[Any]:
    import inspect

    return inspect.stack(0)
