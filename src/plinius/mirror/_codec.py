"""The skeleton's value codec: plain values to JSON nodes and back, exactly typed (no pickle).

A saved state is a JSON *skeleton* (its structure and every plain value) plus
a list of tensors the skeleton refers to by index. Plain values keep their
exact type: 1 is not 1.0 or True, tuples stay tuples, integer dict keys stay
integers, floats are stored by their IEEE bits, integers of any size are
exact (JSON integers up to ``INT_DIGITS`` digits, longer ones in hex).
Containers nest at most ``MAX_DEPTH`` levels, so that any process can read a
skeleton back. This module also holds the
vocabulary the flattener (``_flatten``) and the restore planner
(``_restore``) share: torch dtype names, walking a skeleton, what counts as a
Stateful object, and how paths are named.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

__all__ = [
    "DTYPE_NAMES",
    "MAX_DEPTH",
    "TORCH_DTYPES",
    "Node",
    "check_tensor_refs",
    "contains_itself",
    "decode_plain",
    "describe",
    "encode_plain",
    "has_refs",
    "is_stateful",
    "join_path",
    "node_error",
    "short_path",
    "skeleton_depth",
    "stateful_kind",
    "too_deep",
    "walk_nodes",
]

Node = dict[str, Any]
_pack_d = struct.Struct("<d").pack

# How deep containers (dicts, lists, tuples, Stateful objects and their state
# dicts) may nest in a saved state, the top-level dict being level 1. Checked
# while flattening, whatever the current recursion limit, so that whatever is
# saved can be read back by a process with Python's default limit (1000): the
# JSON decoder, ``decode_plain`` and restore planning each take at most about
# three frames per level. A body nested deeper is refused on reading too.
MAX_DEPTH = 100

# Integers with at most this many decimal digits are JSON integers (what every
# version wrote). Python refuses longer decimal conversions by default
# (``sys.get_int_max_str_digits()``), both ways: longer ones are "bigint"
# nodes, in hexadecimal, which has no such limit.
INT_DIGITS = 4300
_INT_BOUND = 10**INT_DIGITS  # JSON integers lie strictly between these two
_INT_LOW = -_INT_BOUND
_BIGINT = re.compile(r"-?[1-9a-f][0-9a-f]*")

# Every torch dtype by its canonical name ("float32", "bfloat16", ...).
TORCH_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (getattr(torch, n) for n in dir(torch))
    if isinstance(d, torch.dtype)
}
# The canonical name of each torch dtype (aliases such as torch.float included).
DTYPE_NAMES: dict[torch.dtype, str] = {
    d: str(d).removeprefix("torch.") for d in TORCH_DTYPES.values()
}


def encode_plain(v: Any, path: str = "value", level: int = 1) -> Node:
    """The skeleton node of a plain value, keeping its exact type.

    Args:
        v: a plain value (str, int, float, bool, None, complex, bytes, a numpy
            scalar, a torch dtype or Size, and lists, tuples and dicts of them).
        path: where ``v`` is in the state (for messages).
        level: how deep ``v`` is in the state (the top-level dict is level 1).

    Returns:
        The node (a JSON-serialisable dict).

    Raises:
        ConfigError: ``v`` (or something in it) is of another type, or nests
            containers deeper than :data:`MAX_DEPTH`.
    """
    tv = type(v)
    if tv is str:  # the commonest first: keys, then numbers (a save encodes hundreds)
        return {"t": "str", "v": v}
    if tv is int:
        if _INT_LOW < v < _INT_BOUND:
            return {"t": "int", "v": v}
        return {"t": "bigint", "v": format(v, "x")}
    if tv is float:
        # The IEEE bits, so inf, nan (with its payload) and -0.0 round-trip exactly.
        return {"t": "float", "v": _pack_d(v).hex()}
    if v is None:
        return {"t": "none"}
    if type(v) is bool:
        return {"t": "bool", "v": v}
    if isinstance(v, np.generic):
        if v.dtype.hasobject or v.dtype.kind not in "biufcmMSV" or v.dtype.fields is not None:
            raise ConfigError(f"cannot save {path}: numpy scalar of dtype {v.dtype}")
        return {"t": "npscalar", "dtype": v.dtype.str, "v": v.tobytes().hex()}
    if type(v) is complex:
        return {"t": "complex", "v": struct.pack("<dd", v.real, v.imag).hex()}
    if type(v) is bytes:
        return {"t": "bytes", "v": v.hex()}
    if isinstance(v, torch.dtype):
        return {"t": "dtype", "v": str(v).removeprefix("torch.")}
    if type(v) is torch.Size:
        return {"t": "size", "v": list(v)}
    if type(v) in (tuple, list, dict, OrderedDict) and level > MAX_DEPTH:
        # Not a cycle check: containers that hold themselves cannot be keys,
        # and the flattener catches them among values before they come here.
        raise too_deep(path)
    if type(v) is tuple:
        return {
            "t": "tuple",
            "items": [encode_plain(x, f"{path}[{i}]", level + 1) for i, x in enumerate(v)],
        }
    if type(v) is list:
        return {
            "t": "list",
            "items": [encode_plain(x, f"{path}[{i}]", level + 1) for i, x in enumerate(v)],
        }
    if type(v) in (dict, OrderedDict):
        node: Node = {
            "t": "dict",
            "items": [
                [encode_plain(k, path, level + 1), encode_plain(x, join_path(path, k), level + 1)]
                for k, x in v.items()
            ],
        }
        if type(v) is OrderedDict:
            node["o"] = True
        return node
    if isinstance(v, torch.utils.data.DataLoader):
        # The common mistake in a hand-written loop: say what to use instead.
        raise ConfigError(
            f"cannot save {path}: a torch DataLoader has no position to mirror (and each iter() "
            "draws from torch's global generator, shifting dropout after a resume); use "
            "plinius.ResumableLoader, which is mirrored and resumes exactly"
        )
    raise ConfigError(
        f"cannot save {path}: values of type {type(v).__module__}.{type(v).__qualname__} are "
        "not supported (use tensors, numpy arrays, int, float, complex, str, bytes, bool, None, "
        "and dicts, lists or tuples of them, or objects with state_dict()/load_state_dict())"
    )


def node_error(what: str) -> ConfigError:
    """The error for a malformed skeleton (raised by the caller)."""
    return ConfigError(f"malformed state skeleton: {what}")


def short_path(path: str, keep: int = 60) -> str:
    """``path`` for a one-line message: its two ends when it is long."""
    if len(path) <= 2 * keep + 5:
        return path
    return f"{path[:keep]}...{path[-keep:]}"


def too_deep(path: str) -> ConfigError:
    """The error for a state nested deeper than :data:`MAX_DEPTH` at ``path``."""
    return ConfigError(
        f"cannot save {short_path(path)}: the state is nested more than {MAX_DEPTH} levels "
        f"deep there (plinius saves at most {MAX_DEPTH}, so that any process can read it "
        "back); flatten that part into fewer levels"
    )


def contains_itself(path: str, ancestor: str) -> ConfigError:
    """The error for a value at ``path`` that is its own ``ancestor`` (a cycle)."""
    return ConfigError(
        f"{short_path(path)} is {short_path(ancestor) or 'the state'} itself: the state "
        "contains itself and cannot be saved; remove that reference from the state"
    )


def describe(v: Any, limit: int = 80) -> str:
    """``repr(v)`` for a message: even an integer too long for a decimal repr (in hex)."""
    if type(v) is int and not _INT_LOW < v < _INT_BOUND:
        return f"an integer of {v.bit_length()} bits"
    try:
        text = repr(v)
    except (ValueError, RecursionError):  # an integer inside too long for decimal; too deep
        text = f"<{type(v).__qualname__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_plain(node: Any) -> Any:
    """The value of a plain skeleton node (inverse of :func:`encode_plain`).

    Raises:
        ConfigError: the node is malformed.
    """
    if not isinstance(node, dict) or not isinstance(node.get("t"), str):
        raise node_error("a node is not an object with a type")
    t = node["t"]
    try:
        if t == "none":
            return None
        if t == "bool" and isinstance(node["v"], bool):
            return node["v"]
        if t == "int" and type(node["v"]) is int:
            return node["v"]
        if t == "bigint":
            x = node["v"]
            if not (type(x) is str and _BIGINT.fullmatch(x)):
                raise ValueError(x)
            n = int(x, 16)
            if _INT_LOW < n < _INT_BOUND:
                raise ValueError("a bigint node holds an integer short enough for an int node")
            return n
        if t == "float":
            return struct.unpack("<d", bytes.fromhex(node["v"]))[0]
        if t == "complex":
            re, im = struct.unpack("<dd", bytes.fromhex(node["v"]))
            return complex(re, im)
        if t == "str" and isinstance(node["v"], str):
            return node["v"]
        if t == "bytes":
            return bytes.fromhex(node["v"])
        if t == "npscalar":
            dt = np.dtype(node["dtype"])
            if dt.hasobject:
                raise node_error("object numpy scalar")
            return np.frombuffer(bytes.fromhex(node["v"]), dtype=dt, count=1)[0]
        if t == "dtype" and node["v"] in TORCH_DTYPES:
            return TORCH_DTYPES[node["v"]]
        if t == "size":
            return torch.Size([int(x) for x in node["v"]])
        if t == "tuple":
            return tuple(decode_plain(x) for x in node["items"])
        if t == "list":
            return [decode_plain(x) for x in node["items"]]
        if t == "dict":
            items = [(decode_plain(k), decode_plain(v)) for k, v in node["items"]]
            return OrderedDict(items) if node.get("o") else dict(items)
    except (KeyError, TypeError, ValueError, struct.error) as exc:
        raise node_error(f"bad {t!r} node") from exc
    raise node_error(f"unknown or invalid node type {t!r}")


def is_stateful(v: Any) -> bool:
    """Whether ``v`` is saved by ``state_dict()`` and restored by ``load_state_dict()``."""
    return (
        not isinstance(v, type | torch.Tensor | Mapping)
        and callable(getattr(v, "state_dict", None))
        and callable(getattr(v, "load_state_dict", None))
    )


def stateful_kind(v: Any) -> str:
    """``"module"``, ``"optimizer"`` or ``"object"``: which matching rules a Stateful follows."""
    if isinstance(v, torch.nn.Module):
        return "module"
    if isinstance(v, torch.optim.Optimizer):
        return "optimizer"
    return "object"


def _key_str(k: Any) -> str:
    if isinstance(k, str):
        return k
    try:
        return repr(k)
    except (ValueError, RecursionError):
        # An integer too long for a decimal repr (or a tuple holding one), or too deep.
        return f"{k:#x}" if type(k) is int else f"<{type(k).__qualname__} key>"


def join_path(path: str, k: Any) -> str:
    """The dotted name of key ``k`` under ``path`` (tensor names and messages)."""
    ks = k if type(k) is str else _key_str(k)
    return f"{path}.{ks}" if path else ks


def check_tensor_refs(skeleton: Node, entries: int) -> None:
    """Check that the skeleton's tensor references are exactly ``0..entries-1``, once each."""
    seen: list[int] = []
    for node in walk_nodes(skeleton):
        if node.get("t") == "tensor":
            i = node.get("i")
            if type(i) is not int:
                raise node_error("tensor index is not an integer")
            seen.append(i)
    if sorted(seen) != list(range(entries)):
        raise node_error("tensor references do not match the tensor table")


_CONTAINERS = frozenset({"list", "tuple", "dict", "stateful"})


def skeleton_depth(node: Any) -> int:
    """How deep containers nest in a skeleton (the level :data:`MAX_DEPTH` bounds).

    Without recursion, so a skeleton of any depth is measured, not a crash.

    Raises:
        ConfigError: a node, list or dict item is malformed.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(node, 1)]
    while stack:
        n, level = stack.pop()
        if not isinstance(n, dict):
            raise node_error("a node is not an object")
        t = n.get("t")
        if t not in _CONTAINERS:
            continue
        deepest = max(deepest, level)
        if t == "stateful":
            stack.append((n.get("v"), level + 1))
            continue
        items = n.get("items")
        if not isinstance(items, list):
            raise node_error(f"{t} without items")
        if t == "dict":
            for kv in items:
                if not (isinstance(kv, list) and len(kv) == 2):
                    raise node_error("dict item is not a pair")
                stack.append((kv[0], level + 1))
                stack.append((kv[1], level + 1))
        else:
            stack.extend((x, level + 1) for x in items)
    return deepest


def walk_nodes(node: Any) -> Iterator[Node]:
    """Every node of a skeleton subtree (depth first), checking each one's shape.

    Raises:
        ConfigError: a node, list or dict item is malformed.
    """
    stack = [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, dict):
            raise node_error("a node is not an object")
        yield n
        t = n.get("t")
        if t in ("list", "tuple"):
            items = n.get("items")
            if not isinstance(items, list):
                raise node_error("list without items")
            stack.extend(items)
        elif t == "dict":
            items = n.get("items")
            if not isinstance(items, list):
                raise node_error("dict without items")
            for kv in items:
                if not (isinstance(kv, list) and len(kv) == 2):
                    raise node_error("dict item is not a pair")
                stack.extend(kv)
        elif t == "stateful":
            stack.append(n.get("v"))


def has_refs(node: Node) -> bool:
    """Whether a skeleton subtree holds tensors or Stateful objects."""
    return any(n.get("t") in ("tensor", "stateful") for n in walk_nodes(node))
