"""Flattening the state into a JSON skeleton and tensors, and matching it on restore."""

from __future__ import annotations

import json
import math
import random
import struct
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plinius.errors import ConfigError, StateMismatchError
from plinius.mirror._codec import decode_plain, encode_plain
from plinius.mirror._flatten import flatten
from plinius.mirror._restore import SavedTensor, plan_restore
from plinius.rng import RNGState


def _same(a: Any, b: Any) -> bool:
    """Equal, with exactly the same types at every level (and NaN bits equal)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, complex):
        return _same(a.real, b.real) and _same(a.imag, b.imag)
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a) == list(b) and all(
            _same(k1, k2) and _same(a[k1], b[k2]) for k1, k2 in zip(a, b)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _roundtrip(v: Any) -> Any:
    return decode_plain(json.loads(json.dumps(encode_plain(v))))


@pytest.mark.parametrize(
    "value",
    [
        1,
        1.0,
        True,
        False,
        None,
        0,
        -(2**80),
        2**100,
        -0.0,
        math.inf,
        -math.inf,
        math.nan,
        struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\xff")[0],  # a NaN with a payload
        1 + 2j,
        "héllo \ud800",
        b"\x00\xff",
        (1, (2, [3.0, {"a": None}])),
        [(), [], {}],
        {1: "int key", "1": "str key", 1.5: "float key", None: 0, (1, 2): "tuple key"},
        OrderedDict([("b", 1), ("a", 2)]),
        np.float32(1.5),
        np.int64(-3),
        np.bool_(True),
        torch.float16,
        torch.Size([2, 3]),
    ],
)
def test_plain_values_round_trip_with_their_types(value: Any) -> None:
    assert _same(_roundtrip(value), value)


def test_one_is_not_one_point_oh_nor_true() -> None:
    out = _roundtrip([1, 1.0, True])
    assert [type(x) for x in out] == [int, float, bool]


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text()
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.integers() | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(_plain)
def test_any_plain_value_round_trips_exactly(value: Any) -> None:
    assert _same(_roundtrip(value), value)


@pytest.mark.parametrize(
    "bad",
    [object(), {1, 2}, np.array([object()]), type("X", (int,), {})(3)],
    ids=["object", "set", "object-array", "int-subclass"],
)
def test_unsupported_values_are_refused_with_their_path(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"extra\.x"):
        flatten({"extra": {"x": bad}})


def test_state_must_be_a_dict_with_string_keys() -> None:
    with pytest.raises(ConfigError, match="must be a dict"):
        flatten([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="strings"):
        flatten({1: 2})  # type: ignore[dict-item]


def test_flatten_views_tensor_memory_without_copying() -> None:
    t = torch.arange(6, dtype=torch.float32)
    m = torch.nn.Linear(2, 2)
    skel, srcs = flatten({"t": t, "m": m})
    assert srcs[0].data.ctypes.data == t.data_ptr() and srcs[0].nbytes == 24
    assert srcs[1].data.ctypes.data == m.weight.data_ptr()
    assert [s.name for s in srcs] == ["t", "m.weight", "m.bias"]
    assert json.loads(json.dumps(skel)) == skel  # the skeleton is plain JSON


def test_capture_copies_buffers_but_not_parameters_or_optimizer_state() -> None:
    m = torch.nn.BatchNorm1d(3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    t = torch.ones(2)
    _, srcs = flatten({"m": m, "o": opt, "t": t}, capture=True)
    ptr = {s.name: s.data.ctypes.data for s in srcs}
    assert ptr["m.weight"] == m.weight.data_ptr()  # a parameter: read in the background
    assert ptr["m.running_mean"] != m.running_mean.data_ptr()  # a buffer: copied now
    assert ptr["t"] != t.data_ptr()
    buf = opt.state[m.weight]["momentum_buffer"]
    assert ptr["o.state.0.momentum_buffer"] == buf.data_ptr()


def test_non_contiguous_and_conjugate_tensors_are_staged() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    c = torch.randn(3, dtype=torch.complex64).conj()
    _, srcs = flatten({"t": t, "c": c})
    assert bytes(srcs[0].data) == t.contiguous().numpy().tobytes()
    assert bytes(srcs[1].data) == c.resolve_conj().numpy().tobytes()


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantized_tensors_are_refused() -> None:
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(ConfigError, match="quantized"):
        flatten({"q": q})


def _saved(state: dict[str, Any]) -> tuple[dict[str, Any], list[SavedTensor]]:
    skel, srcs = flatten(state)
    return skel, [SavedTensor(s.name, s.kind, s.dtype, s.shape, s.nbytes) for s in srcs]


def _mismatch(saved_state: dict[str, Any], target: dict[str, Any]) -> str:
    skel, tensors = _saved(saved_state)
    with pytest.raises(StateMismatchError) as ei:
        plan_restore(skel, tensors, target)
    return str(ei.value)


def test_mismatches_are_named() -> None:
    msg = _mismatch({"a": torch.zeros(2), "b": 1}, {"a": torch.zeros(2), "c": 1})
    assert "'b'" in msg and "'c'" in msg and "nothing was written" in msg
    msg = _mismatch({"a": torch.zeros(2, 3)}, {"a": torch.zeros(3, 2)})
    assert "a: saved float32[2, 3], target float32[3, 2]" in msg
    msg = _mismatch({"a": torch.zeros(2)}, {"a": torch.zeros(2, dtype=torch.float64)})
    assert "float64" in msg
    msg = _mismatch({"a": {"x": torch.zeros(1)}}, {"a": {"y": torch.zeros(1)}})
    assert "a: saved keys missing from the target: 'x'" in msg
    msg = _mismatch({"a": [torch.zeros(1)]}, {"a": [torch.zeros(1), torch.zeros(1)]})
    assert "list of 1" in msg
    msg = _mismatch({"a": None}, {"a": torch.zeros(1)})
    assert "target holds tensors" in msg
    msg = _mismatch({"m": torch.nn.Linear(2, 3)}, {"m": torch.nn.Linear(2, 4)})
    assert "m.weight" in msg and "m.bias" in msg
    msg = _mismatch({"m": torch.nn.Linear(2, 3)}, {"m": torch.nn.Sequential(torch.nn.Linear(2, 3))})
    assert "'0.weight'" in msg
    msg = _mismatch({"m": torch.nn.Linear(2, 3)}, {"m": torch.optim.SGD([torch.zeros(1)], lr=1)})
    assert "m: saved a torch.nn.modules.linear.Linear" in msg


def test_at_most_five_differences_are_listed() -> None:
    saved = {f"k{i}": torch.zeros(1) for i in range(10)}
    target = {f"k{i}": torch.zeros(2) for i in range(10)}
    msg = _mismatch(saved, target)
    assert msg.count("saved float32") == 5 and "and 5 more" in msg


def test_optimizer_groups_must_match_but_fresh_state_is_created() -> None:
    p = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))]
    opt = torch.optim.Adam(p)
    sum(x.sum() for x in p).backward()  # type: ignore[union-attr]
    opt.step()
    other = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))])
    msg = _mismatch({"o": opt}, {"o": other})
    assert "o.param_groups: saved groups of [2] parameters, target [1]" in msg
    fresh = torch.optim.Adam(
        [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    )
    skel, tensors = _saved({"o": opt})
    plan = plan_restore(skel, tensors, {"o": fresh})
    assert len(plan.dsts) == len(tensors)  # moments are created for the fresh optimizer


def test_a_failed_match_writes_nothing() -> None:
    src = {"a": torch.ones(3), "b": torch.ones(2)}
    target = {"a": torch.zeros(3), "b": torch.zeros(5)}
    _mismatch(src, target)
    assert target["a"].sum() == 0


def test_rng_state_round_trips_every_generator() -> None:
    g = torch.Generator().manual_seed(5)
    rng = RNGState(generators={"sampler": g})
    sd = rng.state_dict()
    draws = (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=g).item(),
    )
    rng.load_state_dict(sd)
    again = (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=g).item(),
    )
    assert draws == again
    assert "sampler" in repr(rng)
