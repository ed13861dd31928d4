"""The training state as tensors plus a JSON skeleton, and back (no pickle).

``flatten`` walks a state dict and returns a JSON-serialisable *skeleton* (the
structure, every plain value, exactly typed) and the list of tensors it holds,
each as a flat ``uint8`` view of the tensor's own memory (zero-copy). The
skeleton refers to tensors by index.

``plan_restore`` matches a saved skeleton against the caller's target state and
returns a :class:`RestorePlan`: where every saved tensor is to be decrypted
(into the target tensor's memory when it can be, else into a fresh buffer) and
how to put the state back together. It writes nothing: every difference
between the saved state and the target is found first, and reported as one
:class:`~plinius.errors.StateMismatchError`, before anything is written.

Matching rules (documented in docs/FORMAT.md):

* containers that hold tensors or Stateful objects must match in type and keys
  (or length), at every level; containers of plain values only are replaced
  wholesale, as are plain values;
* a saved tensor is loaded in place into the target's tensor at the same place,
  which must have the same shape and dtype;
* a Stateful object (``state_dict``/``load_state_dict``) must meet one of the
  same kind. ``nn.Module``: exactly the same keys. ``Optimizer``: the same
  parameter groups (count and sizes); per-parameter state may be missing from
  the target (a fresh optimizer) and is created. Any other object: the same
  top-level keys; below them, missing tensors are created.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, StateMismatchError

__all__ = [
    "MAX_DIFFERENCES",
    "TORCH_DTYPES",
    "RNGState",
    "RestorePlan",
    "TensorDst",
    "TensorSrc",
    "decode_plain",
    "encode_plain",
    "FlattenMemo",
    "flatten",
    "plan_restore",
    "check_tensor_refs",
]

Node = dict[str, Any]
_pack_d = struct.Struct("<d").pack
_STRIDED = torch.strided

# Every torch dtype by its canonical name ("float32", "bfloat16", ...).
TORCH_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (getattr(torch, n) for n in dir(torch))
    if isinstance(d, torch.dtype)
}
# The canonical name of each torch dtype (aliases such as torch.float included).
_DTYPE_NAMES: dict[torch.dtype, str] = {
    d: str(d).removeprefix("torch.") for d in TORCH_DTYPES.values()
}


# Dtypes whose CPU tensors Tensor.numpy() views without a copy (not bfloat16,
# the float8s, quantized or bit types): the fast path of a save.
_NUMPY_VIEWABLE: frozenset[torch.dtype] = frozenset(
    TORCH_DTYPES[n]
    for n in (
        "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
    if n in TORCH_DTYPES
)  # fmt: skip
# How many differences a StateMismatchError names before "and N more".
MAX_DIFFERENCES = 5
# A plan collects at most this many before it stops looking.
_COLLECT_DIFFERENCES = 50


# ---------------------------------------------------------------- tensors
class TensorSrc:
    """A tensor to save: metadata and a flat uint8 view of its bytes."""

    __slots__ = ("data", "dtype", "kind", "name", "nbytes", "owner", "shape")

    def __init__(
        self,
        name: str,
        kind: str,  # "torch" or "numpy"
        dtype: str,
        shape: tuple[int, ...],
        data: np.ndarray[Any, np.dtype[np.uint8]],
        owner: Any = None,  # what keeps ``data``'s memory alive, if not ``data`` itself
    ) -> None:
        self.name = name
        self.kind = kind
        self.dtype = dtype
        self.shape = shape
        self.data = data
        self.owner = owner
        self.nbytes: int = data.size  # plaintext size in bytes

    def __repr__(self) -> str:
        return f"TensorSrc({self.name!r}, {self.kind}, {self.dtype}{list(self.shape)})"


@dataclass(slots=True)
class TensorDst:
    """Where a saved tensor goes on restore.

    ``buf`` is a flat uint8 view to decrypt into. When ``alias`` is True it is
    the target's own memory (zero-copy); otherwise it is a fresh buffer, copied
    into ``target`` (if any) only after every tag has verified.
    """

    index: int
    buf: np.ndarray[Any, np.dtype[np.uint8]]
    value: Any  # what the restored structure holds (the target, or a new tensor)
    target: Any = None  # a tensor/array to copy ``value`` into after verification
    alias: bool = False


def _byte_view(t: torch.Tensor) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A flat uint8 numpy view of a contiguous CPU tensor's memory (no copy)."""
    flat = t.detach().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.numpy()


def _direct(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory can be encrypted from / decrypted into as it is."""
    return (
        t.device.type == "cpu"
        and t.layout == torch.strided
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
    )


def _check_tensor(t: torch.Tensor, path: str) -> None:
    if t.is_quantized or t.layout != torch.strided or t.is_nested or t.device.type == "meta":
        raise ConfigError(
            f"cannot save {path}: {t.layout} / {t.dtype} tensors on {t.device} are not "
            "supported (quantized, sparse, nested and meta tensors cannot be mirrored); "
            "convert it to a dense tensor first"
        )


def _fast_view(t: torch.Tensor) -> np.ndarray[Any, np.dtype[np.uint8]] | None:
    """:func:`_byte_view` in a few microseconds for the common case, else None.

    The common case: a plain dense CPU tensor that numpy can view as it is
    (state_dict() values, optimizer state). Saves and restores do this for
    every tensor, every iteration.
    """
    if (
        type(t) is torch.Tensor
        and t.dtype in _NUMPY_VIEWABLE
        and t.is_cpu
        and t.layout is _STRIDED
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
        and not t.is_nested
    ):
        a = (t.detach() if t.requires_grad else t).numpy()
        return a.reshape(-1).view(np.uint8)
    return None


def _torch_src(t: torch.Tensor, name: str, copy: bool) -> TensorSrc:
    view = None if copy else _fast_view(t)
    if view is not None:
        return TensorSrc(name, "torch", _DTYPE_NAMES[t.dtype], tuple(t.shape), view)
    _check_tensor(t, name)
    orig = t = t.detach()
    if not _direct(t):
        # Memory that cannot be read as it is (non-contiguous, another device,
        # a lazy conjugate or negative view): a contiguous CPU copy.
        t = t.resolve_conj().resolve_neg().to("cpu").contiguous()
    data = _byte_view(t)
    if copy and t.data_ptr() == orig.data_ptr():
        # save_async's capture: the caller may change this tensor before the
        # worker encrypts it, so take a private copy of its bytes now (as
        # bytes: torch cannot clone every dtype).
        data = data.copy()
    return TensorSrc(name, "torch", _DTYPE_NAMES[t.dtype], tuple(t.shape), data)


def _numpy_src(a: np.ndarray[Any, Any], name: str, copy: bool) -> TensorSrc:
    if a.dtype.hasobject or a.dtype.fields is not None:
        raise ConfigError(f"cannot save {name}: numpy arrays of dtype {a.dtype} are not supported")
    c = np.ascontiguousarray(a)
    if copy and c is a:
        c = c.copy()
    return TensorSrc(name, "numpy", c.dtype.str, tuple(a.shape), c.reshape(-1).view(np.uint8))


# ---------------------------------------------------------------- plain values
def encode_plain(v: Any, path: str = "value") -> Node:
    """The skeleton node of a plain value, keeping its exact type."""
    tv = type(v)
    if tv is str:  # the commonest first: keys, then numbers (a save encodes hundreds)
        return {"t": "str", "v": v}
    if tv is int:
        return {"t": "int", "v": v}
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
    if type(v) is tuple:
        return {"t": "tuple", "items": [encode_plain(x, f"{path}[{i}]") for i, x in enumerate(v)]}
    if type(v) is list:
        return {"t": "list", "items": [encode_plain(x, f"{path}[{i}]") for i, x in enumerate(v)]}
    if type(v) in (dict, OrderedDict):
        node: Node = {
            "t": "dict",
            "items": [
                [encode_plain(k, path), encode_plain(x, f"{path}.{k}")] for k, x in v.items()
            ],
        }
        if type(v) is OrderedDict:
            node["o"] = True
        return node
    raise ConfigError(
        f"cannot save {path}: values of type {type(v).__module__}.{type(v).__qualname__} are "
        "not supported (use tensors, numpy arrays, int, float, complex, str, bytes, bool, None, "
        "and dicts, lists or tuples of them, or objects with state_dict()/load_state_dict())"
    )


def _node_error(what: str) -> ConfigError:
    return ConfigError(f"malformed state skeleton: {what}")


def decode_plain(node: Any) -> Any:
    """The value of a plain skeleton node (inverse of :func:`encode_plain`)."""
    if not isinstance(node, dict) or not isinstance(node.get("t"), str):
        raise _node_error("a node is not an object with a type")
    t = node["t"]
    try:
        if t == "none":
            return None
        if t == "bool" and isinstance(node["v"], bool):
            return node["v"]
        if t == "int" and type(node["v"]) is int:
            return node["v"]
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
                raise _node_error("object numpy scalar")
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
        raise _node_error(f"bad {t!r} node") from exc
    raise _node_error(f"unknown or invalid node type {t!r}")


# ---------------------------------------------------------------- flatten
# Plain values that need no further look (not containers, never Stateful).
_SCALARS = frozenset({str, int, float, bool, type(None), complex, bytes})


def _stateful(v: Any) -> bool:
    return (
        not isinstance(v, type | torch.Tensor | Mapping)
        and callable(getattr(v, "state_dict", None))
        and callable(getattr(v, "load_state_dict", None))
    )


def _stateful_kind(v: Any) -> str:
    if isinstance(v, torch.nn.Module):
        return "module"
    if isinstance(v, torch.optim.Optimizer):
        return "optimizer"
    return "object"


def _key_str(k: Any) -> str:
    return k if isinstance(k, str) else repr(k)


@dataclass(slots=True)
class _Memo:
    """The skeleton of one dict of tensors (or of dicts of tensors), as last flattened."""

    cls: type
    base: int  # index of its first tensor
    keys: tuple[Any, ...]
    inner: tuple[tuple[Any, ...], ...] | None  # keys of each inner dict, when nested
    names: list[str]
    node: Node
    # Per tensor, how its memory was last viewed: (data_ptr, dtype, torch shape,
    # dtype name, shape, uint8 view), or None where it could not be viewed.
    views: list[tuple[Any, ...] | None] = field(default_factory=list)

    def forget(self, j: int) -> None:
        """Drop tensor ``j``'s view."""
        if j < len(self.views):
            self.views[j] = None

    def src(self, j: int, t: torch.Tensor, name: str) -> TensorSrc:
        """Tensor ``j``'s TensorSrc, reusing last time's view of the same memory."""
        c = self.views[j] if j < len(self.views) else None
        if (
            c is not None
            and t.layout is _STRIDED  # first: a sparse tensor has no data pointer
            and t.is_cpu
            and t.data_ptr() == c[0]
            and t.dtype is c[1]
            and t.shape == c[2]
            and t.is_contiguous()
            and not t.is_conj()
            and not t.is_neg()
        ):
            # The same bytes, seen the same way (a live tensor occupies them
            # now: its pointer, dtype, shape and layout say so). ``t`` keeps
            # them alive while the save reads them.
            return TensorSrc(name, "torch", c[3], c[4], c[5], owner=t)
        while len(self.views) <= j:
            self.views.append(None)
        view = _fast_view(t)
        if view is None:
            self.views[j] = None
            return _torch_src(t, name, False)
        dn, shape = _DTYPE_NAMES[t.dtype], tuple(t.shape)
        self.views[j] = (t.data_ptr(), t.dtype, t.shape, dn, shape, view)
        return TensorSrc(name, "torch", dn, shape, view)


class FlattenMemo:
    """What one flatten learned of the state's structure, for the next one.

    A training loop saves the same structure every iteration: the same module
    keys, the same optimizer state keys. The skeleton of each such dict of
    tensors is kept and reused when the next flatten finds the same keys at the
    same place, with the numpy view of each tensor's memory, reused when the
    tensor still occupies the same memory the same way; so that a save spends
    its time encrypting rather than rebuilding the same skeleton. Only what the
    last flatten saw is kept: a view that a tensor no longer uses is dropped at
    the next flatten (or by :meth:`clear`).
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[tuple[int, str], _Memo] = {}

    def clear(self) -> None:
        """Forget everything (and release the views)."""
        self.entries = {}


class _Flattener:
    def __init__(self, capture: bool, memo: FlattenMemo | None = None) -> None:
        self.capture = capture
        self.tensors: list[TensorSrc] = []
        self.names: set[str] = set()
        self.memo = memo.entries if memo is not None else {}
        self.next_memo: dict[tuple[int, str], _Memo] = {}

    def _reuse(self, obj: Any, path: str, keys: tuple[Any, ...]) -> _Memo | None:
        m = self.memo.get((id(obj), path))
        if (
            m is not None
            and m.cls is type(obj)
            and m.base == len(self.tensors)
            and m.keys == keys
            and self.names.isdisjoint(m.names)
        ):
            self.names.update(m.names)
            return m
        return None

    def tensor_dict(self, obj: Any, d: Mapping[Any, Any], path: str, params: Any) -> Node | None:
        """A module's state dict when every value is a tensor (else None), through the memo.

        ``params``: data pointers of the module's parameters (for save_async's capture).
        """
        vals = list(d.values())
        for t in vals:
            if type(t) is not torch.Tensor:
                return None
        keys = tuple(d)
        if not _exact_keys(keys):
            return None
        m = self._reuse(obj, path, keys)
        if m is None:
            base = len(self.tensors)
            names = [self._name(_join(path, k)) for k in keys]
            node: Node = {
                "t": "dict",
                "o": True,
                "items": [
                    [encode_plain(k, path), {"t": "tensor", "i": base + j}]
                    for j, k in enumerate(keys)
                ],
            }
            m = _Memo(type(obj), base, keys, None, names, node)
        self.next_memo[(id(obj), path)] = m
        append = self.tensors.append
        if self.capture:
            for j, (name, t) in enumerate(zip(m.names, vals)):
                if _is_param(t, params):
                    append(m.src(j, t, name))
                else:
                    # Copied now; a view from an earlier save must not keep old memory.
                    m.forget(j)
                    append(_torch_src(t, name, True))
        else:
            for j, (name, t) in enumerate(zip(m.names, vals)):
                append(m.src(j, t, name))
        return m.node

    def nested_tensor_dict(self, obj: Any, d: Any, path: str) -> Node | None:
        """An optimizer's per-parameter state, ``{id: {key: tensor}}`` with every
        value a tensor (else None), through the memo. All of it is live."""
        if type(d) is not dict:
            return None
        inner = list(d.values())
        for x in inner:
            if type(x) is not dict:
                return None
            for t in x.values():
                if type(t) is not torch.Tensor:
                    return None
        keys = tuple(d)
        inner_keys = tuple(tuple(x) for x in inner)
        if not (_exact_keys(keys) and all(_exact_keys(ks) for ks in inner_keys)):
            return None
        m = self._reuse(obj, path, keys)
        if m is not None and m.inner != inner_keys:
            self.names.difference_update(m.names)
            m = None
        if m is None:
            base = len(self.tensors)
            names: list[str] = []
            items = []
            for k, ks in zip(keys, inner_keys):
                p = _join(path, k)
                sub = []
                for k2 in ks:
                    names.append(self._name(_join(p, k2)))
                    sub.append([encode_plain(k2, p), {"t": "tensor", "i": base + len(names) - 1}])
                items.append([encode_plain(k, path), {"t": "dict", "items": sub}])
            m = _Memo(type(obj), base, keys, inner_keys, names, {"t": "dict", "items": items})
        self.next_memo[(id(obj), path)] = m
        append = self.tensors.append
        j = 0
        names = m.names
        for x in inner:
            for t in x.values():
                append(m.src(j, t, names[j]))
                j += 1
        return m.node

    def _name(self, path: str) -> str:
        # Names are for people (inspect, export); keep them unique anyway.
        name, n = path, 1
        while name in self.names:
            n += 1
            name = f"{path}#{n}"
        self.names.add(name)
        return name

    def tensor(self, v: Any, path: str, live: bool) -> Node:
        # ``live`` tensors (parameters, optimizer state) are read later by
        # save_async's worker; everything else is copied now when capturing.
        copy = self.capture and not live
        if isinstance(v, torch.Tensor):
            src = _torch_src(v, self._name(path), copy)
        else:
            src = _numpy_src(v, self._name(path), copy)
        self.tensors.append(src)
        return {"t": "tensor", "i": len(self.tensors) - 1}

    def value(self, v: Any, path: str, live: bool = False) -> Node:
        tv = type(v)
        if tv in _SCALARS:
            return encode_plain(v, path)
        if tv is torch.Tensor or tv is np.ndarray or isinstance(v, torch.Tensor | np.ndarray):
            return self.tensor(v, path, live)
        if tv is dict or tv is OrderedDict:
            node: Node = {
                "t": "dict",
                "items": [
                    [encode_plain(k, path), self.value(x, _join(path, k), live)]
                    for k, x in v.items()
                ],
            }
            if tv is OrderedDict:
                node["o"] = True
            return node
        if tv is list or tv is tuple:
            return {
                "t": "list" if tv is list else "tuple",
                "items": [self.value(x, _join(path, i), live) for i, x in enumerate(v)],
            }
        if _stateful(v):
            return self.stateful(v, path)
        return encode_plain(v, path)

    def stateful(self, obj: Any, path: str) -> Node:
        kind = _stateful_kind(obj)
        try:
            sd = obj.state_dict()
        except Exception as exc:
            raise ConfigError(f"cannot save {path}: its state_dict() failed: {exc}") from exc
        if kind == "module":
            # Which tensors are parameters matters only to save_async's capture.
            params = {p.data_ptr() for p in obj.parameters() if p.numel()} if self.capture else ()
            fast = self.tensor_dict(obj, sd, path, params)
            if fast is not None:
                inner: Node = fast
            else:
                items = []
                for k, t in sd.items():
                    p = _join(path, k)
                    if isinstance(t, torch.Tensor):
                        live = _is_param(t, params)
                        items.append([encode_plain(k, path), self.tensor(t, p, live)])
                    else:
                        items.append([encode_plain(k, path), self.value(t, p)])
                inner = {"t": "dict", "o": True, "items": items}
        elif kind == "optimizer":
            # Only per-parameter state changes in optimizer.step(); the rest
            # (param groups, possibly with tensor learning rates) is captured now.
            if not isinstance(sd, dict) or set(sd) < {"state", "param_groups"}:
                raise ConfigError(f"cannot save {path}: unexpected optimizer state_dict()")
            items = []
            for k, x in sd.items():
                p = _join(path, k)
                node = self.nested_tensor_dict(obj, x, p) if k == "state" else None
                items.append([encode_plain(k), node or self.value(x, p, live=(k == "state"))])
            inner = {"t": "dict", "items": items}
        else:
            inner = self.value(sd, path)
        cls = type(obj)
        return {"t": "stateful", "kind": kind, "cls": f"{cls.__module__}.{cls.__qualname__}",
                "v": inner}  # fmt: skip


def _is_param(t: torch.Tensor, params: Any) -> bool:
    """Whether ``t`` holds a module parameter's memory (``params``: their data pointers)."""
    return t.layout is _STRIDED and t.numel() > 0 and t.data_ptr() in params


def _exact_keys(keys: tuple[Any, ...]) -> bool:
    """Whether ``==`` on these keys is exact: str and int only (1 == 1.0 == True, 0.0 == -0.0)."""
    for k in keys:
        tk = type(k)
        if tk is not str and tk is not int:
            return False
    return True


def _join(path: str, k: Any) -> str:
    ks = k if type(k) is str else _key_str(k)
    return f"{path}.{ks}" if path else ks


def flatten(
    state: Mapping[str, Any], *, capture: bool = False, memo: FlattenMemo | None = None
) -> tuple[Node, list[TensorSrc]]:
    """Split ``state`` into a JSON skeleton and its tensors (flat uint8 views).

    With ``capture`` (for ``save_async``), every tensor except module
    parameters and optimizer per-parameter state is copied now, so that the
    caller may change it (a forward pass updates BatchNorm statistics) while the
    copy is being encrypted. ``memo`` (kept by a Mirror from one save to the
    next) makes flattening the same structure again cheap; it is updated.
    """
    if not isinstance(state, dict):
        raise ConfigError(f"the state must be a dict, not {type(state).__name__}")
    for k in state:
        if not isinstance(k, str):
            raise ConfigError(f"the state's top-level keys must be strings, not {k!r}")
    f = _Flattener(capture, memo)
    skeleton = {"t": "dict", "items": [[encode_plain(k), f.value(v, k)] for k, v in state.items()]}
    if memo is not None:
        memo.entries = f.next_memo  # only what this state still has
    return skeleton, f.tensors


def check_tensor_refs(skeleton: Node, entries: int) -> None:
    """Check that the skeleton's tensor references are exactly ``0..entries-1``, once each."""
    seen: list[int] = []
    for node in _walk(skeleton):
        if node.get("t") == "tensor":
            i = node.get("i")
            if type(i) is not int:
                raise _node_error("tensor index is not an integer")
            seen.append(i)
    if sorted(seen) != list(range(entries)):
        raise _node_error("tensor references do not match the tensor table")


def _walk(node: Any) -> Iterator[Node]:
    stack = [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, dict):
            raise _node_error("a node is not an object")
        yield n
        t = n.get("t")
        if t in ("list", "tuple"):
            items = n.get("items")
            if not isinstance(items, list):
                raise _node_error("list without items")
            stack.extend(items)
        elif t == "dict":
            items = n.get("items")
            if not isinstance(items, list):
                raise _node_error("dict without items")
            for kv in items:
                if not (isinstance(kv, list) and len(kv) == 2):
                    raise _node_error("dict item is not a pair")
                stack.extend(kv)
        elif t == "stateful":
            stack.append(n.get("v"))


# ---------------------------------------------------------------- restore
@dataclass(slots=True)
class SavedTensor:
    """What the manifest says about one saved tensor (for matching)."""

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


_MISSING: Any = object()


@dataclass
class RestorePlan:
    """Where each saved tensor goes, and how to rebuild the state afterwards."""

    dsts: list[TensorDst]
    finish: Callable[[], None]
    differences: list[str] = field(default_factory=list)


class _Planner:
    def __init__(self, tensors: list[SavedTensor]) -> None:
        self.tensors = tensors
        self.dsts: list[TensorDst] = []
        self.diffs: list[str] = []

    def diff(self, path: str, what: str) -> None:
        if len(self.diffs) < _COLLECT_DIFFERENCES:
            self.diffs.append(f"{path or '<state>'}: {what}")

    # Each planning function returns a thunk that builds the restored value.
    def node(
        self, node: Node, target: Any, path: str, strict: bool, inplace: bool
    ) -> Callable[[], Any]:
        t = node.get("t")
        if t == "tensor":
            return self.tensor(node, target, path, strict)
        if t == "stateful":
            return self.stateful(node, target, path)
        if not _has_refs(node):
            value = decode_plain(node)
            if strict and target is not _MISSING and _has_state(target):
                self.diff(
                    path,
                    f"saved a plain {type(value).__name__}, target holds tensors or state objects",
                )
            return lambda: value
        if t == "dict":
            return self.mapping(node, target, path, strict, inplace)
        if t in ("list", "tuple"):
            return self.sequence(node, target, path, strict, inplace)
        raise _node_error(f"unexpected node type {t!r}")

    def tensor(self, node: Node, target: Any, path: str, strict: bool) -> Callable[[], Any]:
        i = node["i"]
        if not (type(i) is int and 0 <= i < len(self.tensors)):
            raise _node_error("tensor index out of range")
        st = self.tensors[i]
        if st.kind == "torch":
            if isinstance(target, torch.Tensor):
                tdt = _DTYPE_NAMES[target.dtype]
                if tuple(target.shape) != st.shape or tdt != st.dtype:
                    self.diff(
                        path, f"saved {st.dtype}{list(st.shape)}, target {tdt}{list(target.shape)}"
                    )
                    return lambda: target
                if target.is_quantized or target.layout != torch.strided:
                    self.diff(
                        path, f"target is a {target.layout} tensor; it cannot be loaded in place"
                    )
                    return lambda: target
                view = _fast_view(target)
                if view is not None:
                    dst = TensorDst(i, view, target, alias=True)
                elif _direct(target):
                    dst = TensorDst(i, _byte_view(target), target, alias=True)
                else:
                    buf = torch.empty(st.shape, dtype=TORCH_DTYPES[st.dtype])
                    dst = TensorDst(i, _byte_view(buf), buf, target=target)
                self.dsts.append(dst)
                return lambda: target
            if strict or (target is not _MISSING and not _replaceable(target)):
                self.diff(
                    path,
                    f"saved a tensor {st.dtype}{list(st.shape)}, target holds {_describe(target)}",
                )
                return lambda: target
            dtype = TORCH_DTYPES.get(st.dtype)
            if dtype is None:
                raise _node_error(f"unknown dtype {st.dtype!r}")
            new = torch.empty(st.shape, dtype=dtype)
            self.dsts.append(TensorDst(i, _byte_view(new), new))
            return lambda: new
        # numpy arrays
        dt = np.dtype(st.dtype)
        if isinstance(target, np.ndarray):
            if tuple(target.shape) != st.shape or target.dtype != dt:
                self.diff(
                    path,
                    f"saved array {dt}{list(st.shape)}, target {target.dtype}{list(target.shape)}",
                )
                return lambda: target
            if target.flags.c_contiguous and target.flags.writeable:
                self.dsts.append(
                    TensorDst(i, target.reshape(-1).view(np.uint8), target, alias=True)
                )
            else:
                stage = np.empty(st.shape, dtype=dt)
                self.dsts.append(
                    TensorDst(i, stage.reshape(-1).view(np.uint8), stage, target=target)
                )
            return lambda: target
        if strict or (target is not _MISSING and not _replaceable(target)):
            self.diff(
                path, f"saved an array {dt}{list(st.shape)}, target holds {_describe(target)}"
            )
            return lambda: target
        arr = np.empty(st.shape, dtype=dt)
        self.dsts.append(TensorDst(i, arr.reshape(-1).view(np.uint8), arr))
        return lambda: arr

    def mapping(
        self, node: Node, target: Any, path: str, strict: bool, inplace: bool
    ) -> Callable[[], Any]:
        items = [(decode_plain(k), v) for k, v in node["items"]]
        is_dict = isinstance(target, dict)
        if strict and not is_dict:
            self.diff(path, f"saved a dict, target holds {_describe(target)}")
            return lambda: target
        tgt: dict[Any, Any] = target if is_dict else {}
        if strict:
            saved_keys = [k for k, _ in items]
            missing = [k for k in saved_keys if k not in tgt]
            extra = [k for k in tgt if k not in set(saved_keys)]
            if missing:
                self.diff(path, f"saved keys missing from the target: {_keys(missing)}")
            if extra:
                self.diff(path, f"target keys not in the saved state: {_keys(extra)}")
        thunks = [
            (k, self.node(v, tgt.get(k, _MISSING), _join(path, k), strict, inplace))
            for k, v in items
        ]
        odict = bool(node.get("o"))

        def build() -> Any:
            if inplace and is_dict:
                for k, th in thunks:
                    tgt[k] = th()
                return tgt
            out: dict[Any, Any] = OrderedDict() if odict else {}
            for k, th in thunks:
                out[k] = th()
            return out

        return build

    def sequence(
        self, node: Node, target: Any, path: str, strict: bool, inplace: bool
    ) -> Callable[[], Any]:
        kind = list if node["t"] == "list" else tuple
        items = node["items"]
        ok = type(target) is kind
        if strict and not (ok and len(target) == len(items)):
            self.diff(
                path, f"saved a {kind.__name__} of {len(items)}, target holds {_describe(target)}"
            )
            return lambda: target
        thunks = [
            self.node(
                v,
                target[i] if ok and i < len(target) else _MISSING,
                _join(path, i),
                strict,
                inplace,
            )
            for i, v in enumerate(items)
        ]

        def build() -> Any:
            values = [th() for th in thunks]
            if kind is list and inplace and ok:
                target[:] = values
                return target
            return kind(values)

        return build

    def stateful(self, node: Node, target: Any, path: str) -> Callable[[], Any]:
        kind = node.get("kind")
        if not _stateful(target):
            self.diff(
                path, f"saved a {node.get('cls')} (state_dict), target holds {_describe(target)}"
            )
            return lambda: target
        if _stateful_kind(target) != kind:
            self.diff(path, f"saved a {node.get('cls')}, target is a {type(target).__qualname__}")
            return lambda: target
        try:
            template = target.state_dict()
        except Exception as exc:
            raise ConfigError(f"cannot restore {path}: its state_dict() failed: {exc}") from exc
        inner = node["v"]
        if kind == "module":
            build = self.node(inner, template, path, strict=True, inplace=False)
            metadata = getattr(template, "_metadata", None)
        elif kind == "optimizer":
            build = self.optimizer(inner, template, path)
            metadata = None
        else:
            if inner.get("t") == "dict" and isinstance(template, dict):
                keys = {decode_plain(k) for k, _ in inner["items"]}
                if keys != set(template):
                    self._key_diff(path, keys, set(template))
            build = self.node(inner, template, path, strict=False, inplace=False)
            metadata = None

        def finish() -> Any:
            sd = build()
            if metadata is not None:
                sd._metadata = metadata
            try:
                target.load_state_dict(sd)
            except Exception as exc:
                raise StateMismatchError(
                    f"{path}: load_state_dict() refused the saved state ({exc}); the target "
                    "may be partly loaded and must not be used"
                ) from exc
            return target

        return finish

    def optimizer(self, inner: Node, template: Any, path: str) -> Callable[[], Any]:
        saved = {decode_plain(k): v for k, v in inner["items"]}
        if set(saved) != set(template):
            self._key_diff(path, set(saved), set(template))
            return lambda: template
        groups = (
            decode_plain(saved["param_groups"]) if not _has_refs(saved["param_groups"]) else None
        )
        tgroups = template["param_groups"]
        if groups is None:
            # tensor learning rates: compare the structure through the generic rules
            groups_build = self.node(
                saved["param_groups"], tgroups, _join(path, "param_groups"), False, False
            )
            saved_params = self._group_params_from_node(saved["param_groups"])
        else:
            groups_build = lambda: groups  # noqa: E731
            saved_params = [list(g.get("params", [])) for g in groups if isinstance(g, dict)]
        tparams = [list(g["params"]) for g in tgroups]
        if [len(p) for p in saved_params] != [len(p) for p in tparams]:
            self.diff(
                _join(path, "param_groups"),
                f"saved groups of {[len(p) for p in saved_params]} parameters, "
                f"target {[len(p) for p in tparams]}",
            )
            return lambda: template
        # Saved parameter ids map to the target's by position, as torch does.
        id_map = {s: t for sp, tp in zip(saved_params, tparams) for s, t in zip(sp, tp)}
        state_node = saved["state"]
        tstate = template["state"]
        if state_node.get("t") != "dict":
            raise _node_error("optimizer state is not a dict")
        thunks = []
        for k, v in state_node["items"]:
            pid = decode_plain(k)
            if pid not in id_map:
                self.diff(
                    _join(path, f"state.{pid}"),
                    "state for a parameter the saved groups do not list",
                )
                continue
            tv = tstate.get(id_map[pid], _MISSING)
            thunks.append((pid, self.node(v, tv, _join(path, f"state.{pid}"), False, False)))

        def build() -> Any:
            return {"state": {k: th() for k, th in thunks}, "param_groups": groups_build()}

        return build

    def _group_params_from_node(self, node: Node) -> list[list[Any]]:
        out = []
        for g in node.get("items", []):
            params: list[Any] = []
            if g.get("t") == "dict":
                for k, v in g["items"]:
                    if decode_plain(k) == "params" and not _has_refs(v):
                        params = list(decode_plain(v))
            out.append(params)
        return out

    def _key_diff(self, path: str, saved: set[Any], target: set[Any]) -> None:
        if saved - target:
            self.diff(
                path,
                f"saved keys missing from the target: {_keys(sorted(saved - target, key=repr))}",
            )
        if target - saved:
            self.diff(
                path,
                f"target keys not in the saved state: {_keys(sorted(target - saved, key=repr))}",
            )


def _keys(keys: list[Any]) -> str:
    shown = ", ".join(repr(k) for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _describe(v: Any) -> str:
    if v is _MISSING:
        return "nothing"
    if isinstance(v, torch.Tensor):
        return f"a tensor {str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
    if isinstance(v, np.ndarray):
        return f"an array {v.dtype}{list(v.shape)}"
    if isinstance(v, list | tuple):
        return f"a {type(v).__name__} of {len(v)}"
    return f"a {type(v).__qualname__}"


def _replaceable(v: Any) -> bool:
    """Plain values a lenient match may replace with a tensor."""
    return v is None or isinstance(v, int | float | bool)


def _has_refs(node: Node) -> bool:
    """Whether a skeleton subtree holds tensors or Stateful objects."""
    return any(n.get("t") in ("tensor", "stateful") for n in _walk(node))


def _has_state(v: Any, depth: int = 0) -> bool:
    """Whether a target value holds tensors, arrays or Stateful objects."""
    if isinstance(v, torch.Tensor | np.ndarray) or _stateful(v):
        return True
    if depth > 100:
        return False
    if isinstance(v, dict):
        return any(_has_state(x, depth + 1) for x in v.values())
    if isinstance(v, list | tuple):
        return any(_has_state(x, depth + 1) for x in v)
    return False


def plan_restore(skeleton: Node, tensors: list[SavedTensor], state: Any) -> RestorePlan:
    """Match the saved ``skeleton`` against ``state`` without writing anything.

    Raises :class:`StateMismatchError` naming the first differences. The
    returned plan's ``dsts`` say where to decrypt each tensor; ``finish`` puts
    staged tensors into their targets and rebuilds the state (call it only after
    every tensor has been authenticated).
    """
    if not isinstance(state, dict):
        raise ConfigError(f"the state must be a dict, not {type(state).__name__}")
    p = _Planner(tensors)
    if skeleton.get("t") != "dict":
        raise _node_error("the top level is not a dict")
    build = p.mapping(skeleton, state, "", strict=True, inplace=True)
    if p.diffs:
        shown = "; ".join(p.diffs[:MAX_DIFFERENCES])
        more = len(p.diffs) - MAX_DIFFERENCES
        suffix = f"; and {more} more" if more > 0 else ""
        raise StateMismatchError(
            f"the saved state does not fit the target (nothing was written): {shown}{suffix}"
        )
    dsts = p.dsts

    def finish() -> None:
        for d in dsts:
            if d.target is not None:
                if isinstance(d.target, torch.Tensor):
                    with torch.no_grad():
                        d.target.copy_(d.value)
                else:
                    np.copyto(d.target, d.value)
        build()

    return RestorePlan(dsts, finish)


# ---------------------------------------------------------------- RNG state
class RNGState:
    """Captures and restores the global random generators.

    Python's ``random``, NumPy's legacy global generator, torch's CPU generator
    (and CUDA generators when CUDA is available), and any private
    ``torch.Generator`` passed as ``generators={"name": gen}``. Put one in the
    mirrored state: ``{"rng": RNGState()}``.
    """

    def __init__(self, generators: Mapping[str, torch.Generator] | None = None) -> None:
        self.generators = dict(generators or {})

    def state_dict(self) -> dict[str, Any]:
        """The generators' current states (copies)."""
        import random

        name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
        version, internal, gauss = random.getstate()
        sd: dict[str, Any] = {
            # Python's Mersenne Twister state is 625 ints: one tensor, not 625
            # plain values to walk and encode on every save.
            "python": {
                "version": int(version),
                "state": torch.tensor(internal, dtype=torch.int64),
                "gauss_next": gauss,
            },
            "numpy": {
                "name": str(name),
                "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():  # pragma: no cover - CPU build here
            sd["cuda"] = list(torch.cuda.get_rng_state_all())
        sd["generators"] = {k: g.get_state() for k, g in self.generators.items()}
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Set every generator from a :meth:`state_dict`."""
        import random

        py = sd["python"]
        internal = tuple(int(v) for v in py["state"].tolist())
        random.setstate((py["version"], internal, py["gauss_next"]))
        n = sd["numpy"]
        key = np.asarray(n["key"].numpy(), dtype=np.uint32)
        np.random.set_state((n["name"], key, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(sd["torch"])
        if "cuda" in sd:  # pragma: no cover - CPU build here
            torch.cuda.set_rng_state_all(sd["cuda"])
        for k, g in self.generators.items():
            g.set_state(sd["generators"][k])

    def __repr__(self) -> str:
        return f"RNGState(generators={sorted(self.generators)})"
