"""Flattening a training state: a JSON skeleton plus the tensors it holds, zero-copy.

``flatten`` walks a state dict and returns a JSON-serialisable *skeleton* (the
structure, every plain value, exactly typed: see ``_codec``) and the list of
tensors it holds, each a :class:`TensorSrc` with a flat ``uint8`` view of the
tensor's own memory (zero-copy; non-contiguous or conjugate tensors get a
contiguous copy). The skeleton refers to tensors by index. A
:class:`FlattenMemo` kept from one save to the next makes flattening the same
structure again cheap.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ._codec import (
    DTYPE_NAMES,
    MAX_DEPTH,
    TORCH_DTYPES,
    Node,
    contains_itself,
    describe,
    encode_plain,
    is_stateful,
    join_path,
    stateful_kind,
    too_deep,
)
from ._format import TensorMeta

__all__ = [
    "FlattenMemo",
    "TensorSrc",
    "byte_view",
    "fast_view",
    "flatten",
    "is_direct",
    "torch_src",
]

_STRIDED = torch.strided


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


class TensorSrc(TensorMeta):
    """A tensor to save: its :class:`TensorMeta` and a flat uint8 view of its bytes."""

    __slots__ = ("data", "owner")
    # A source is one save's view of live memory: compared by identity, as before.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

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
        self.nbytes = data.size  # plaintext size in bytes

    def __repr__(self) -> str:
        return f"TensorSrc({self.name!r}, {self.kind}, {self.dtype}{list(self.shape)})"


def byte_view(t: torch.Tensor) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A flat uint8 numpy view of a contiguous CPU tensor's memory (no copy)."""
    flat = t.detach().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.numpy()


def is_direct(t: torch.Tensor) -> bool:
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


def fast_view(t: torch.Tensor) -> np.ndarray[Any, np.dtype[np.uint8]] | None:
    """:func:`byte_view` in a few microseconds for the common case, else None.

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


def torch_src(t: torch.Tensor, name: str, copy: bool) -> TensorSrc:
    """The :class:`TensorSrc` of a torch tensor.

    Args:
        t: the tensor (any device; non-contiguous or lazy views are copied).
        name: its flattened name.
        copy: take a private copy of its bytes now (``save_async``'s capture).

    Raises:
        ConfigError: a quantized, sparse, nested or meta tensor.
    """
    view = None if copy else fast_view(t)
    if view is not None:
        return TensorSrc(name, "torch", DTYPE_NAMES[t.dtype], tuple(t.shape), view)
    _check_tensor(t, name)
    orig = t = t.detach()
    if not is_direct(t):
        # Memory that cannot be read as it is (non-contiguous, another device,
        # a lazy conjugate or negative view): a contiguous CPU copy.
        t = t.resolve_conj().resolve_neg().to("cpu").contiguous()
    data = byte_view(t)
    if copy and t.data_ptr() == orig.data_ptr():
        # save_async's capture: the caller may change this tensor before the
        # worker encrypts it, so take a private copy of its bytes now (as
        # bytes: torch cannot clone every dtype).
        data = data.copy()
    return TensorSrc(name, "torch", DTYPE_NAMES[t.dtype], tuple(t.shape), data)


def _numpy_src(a: np.ndarray[Any, Any], name: str, copy: bool) -> TensorSrc:
    if a.dtype.hasobject or a.dtype.fields is not None:
        raise ConfigError(f"cannot save {name}: numpy arrays of dtype {a.dtype} are not supported")
    c = np.ascontiguousarray(a)
    if copy and c is a:
        c = c.copy()
    return TensorSrc(name, "numpy", c.dtype.str, tuple(a.shape), c.reshape(-1).view(np.uint8))


# Plain values that need no further look (not containers, never Stateful).
_SCALARS = frozenset({str, int, float, bool, type(None), complex, bytes})


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
        view = fast_view(t)
        if view is None:
            self.views[j] = None
            return torch_src(t, name, False)
        dn, shape = DTYPE_NAMES[t.dtype], tuple(t.shape)
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
        # The containers being walked (id -> path), from the top down to the
        # current one: a value among them is a cycle, refused by name.
        self.walking: dict[int, str] = {}

    def enter(self, v: Any, path: str, level: int) -> None:
        """Start walking container ``v`` at ``path`` (refused too deep, or if it is its own
        ancestor); :meth:`leave` it when done. An error abandons the whole walk."""
        if level > MAX_DEPTH:
            raise too_deep(path)
        walking = self.walking
        i = id(v)
        if i in walking:
            raise contains_itself(path, walking[i])
        walking[i] = path

    def leave(self, v: Any) -> None:
        del self.walking[id(v)]

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
        Its keys are str or int (leaves): the caller has checked the dict's own level.
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
            names = [self._name(join_path(path, k)) for k in keys]
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
                    append(torch_src(t, name, True))
        else:
            for j, (name, t) in enumerate(zip(m.names, vals)):
                append(m.src(j, t, name))
        return m.node

    def nested_tensor_dict(self, obj: Any, d: Any, path: str) -> Node | None:
        """An optimizer's per-parameter state, ``{id: {key: tensor}}`` with every
        value a tensor (else None), through the memo. All of it is live.
        Its keys are str or int (leaves): the caller has checked both dicts' levels."""
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
                p = join_path(path, k)
                sub = []
                for k2 in ks:
                    names.append(self._name(join_path(p, k2)))
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
            src = torch_src(v, self._name(path), copy)
        else:
            src = _numpy_src(v, self._name(path), copy)
        self.tensors.append(src)
        return {"t": "tensor", "i": len(self.tensors) - 1}

    def value(self, v: Any, path: str, live: bool = False, level: int = 2) -> Node:
        """The node of ``v`` at ``path``, ``level`` deep (the top-level dict is level 1)."""
        tv = type(v)
        if tv in _SCALARS:
            return encode_plain(v, path)
        if tv is torch.Tensor or tv is np.ndarray or isinstance(v, torch.Tensor | np.ndarray):
            return self.tensor(v, path, live)
        if tv is dict or tv is OrderedDict:
            self.enter(v, path, level)
            inner = level + 1
            node: Node = {
                "t": "dict",
                "items": [
                    [encode_plain(k, path, inner), self.value(x, join_path(path, k), live, inner)]
                    for k, x in v.items()
                ],
            }
            self.leave(v)
            if tv is OrderedDict:
                node["o"] = True
            return node
        if tv is list or tv is tuple:
            self.enter(v, path, level)
            node = {
                "t": "list" if tv is list else "tuple",
                "items": [
                    self.value(x, join_path(path, i), live, level + 1) for i, x in enumerate(v)
                ],
            }
            self.leave(v)
            return node
        if is_stateful(v):
            self.enter(v, path, level)
            node = self.stateful(v, path, level)
            self.leave(v)
            return node
        return encode_plain(v, path, level)

    def stateful(self, obj: Any, path: str, level: int) -> Node:
        """The node of a Stateful ``obj`` at ``level``; its state dict is one level deeper."""
        if level + 1 > MAX_DEPTH:
            raise too_deep(path)
        kind = stateful_kind(obj)
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
                below = level + 2
                for k, t in sd.items():
                    p = join_path(path, k)
                    if isinstance(t, torch.Tensor):
                        live = _is_param(t, params)
                        items.append([encode_plain(k, path, below), self.tensor(t, p, live)])
                    else:
                        items.append([encode_plain(k, path, below), self.value(t, p, False, below)])
                inner = {"t": "dict", "o": True, "items": items}
        elif kind == "optimizer":
            # Only per-parameter state changes in optimizer.step(); the rest
            # (param groups, possibly with tensor learning rates) is captured now.
            if not isinstance(sd, dict) or set(sd) < {"state", "param_groups"}:
                raise ConfigError(f"cannot save {path}: unexpected optimizer state_dict()")
            items = []
            # "state" is {id: {key: tensor}}: its inner dicts are level + 3.
            fits = level + 3 <= MAX_DEPTH
            for k, x in sd.items():
                p = join_path(path, k)
                node = self.nested_tensor_dict(obj, x, p) if k == "state" and fits else None
                items.append(
                    [encode_plain(k, path, level + 2),
                     node or self.value(x, p, k == "state", level + 2)]
                )  # fmt: skip
            inner = {"t": "dict", "items": items}
        else:
            inner = self.value(sd, path, False, level + 1)
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


def flatten(
    state: Mapping[str, Any], *, capture: bool = False, memo: FlattenMemo | None = None
) -> tuple[Node, list[TensorSrc]]:
    """Split ``state`` into a JSON skeleton and its tensors (flat uint8 views).

    With ``capture`` (for ``save_async``), every tensor except module
    parameters and optimizer per-parameter state is copied now, so that the
    caller may change it (a forward pass updates BatchNorm statistics) while the
    copy is being encrypted. ``memo`` (kept by a Mirror from one save to the
    next) makes flattening the same structure again cheap; it is updated.

    Args:
        state: a dict with str keys.
        capture: copy what a forward pass may change (see above).
        memo: the structure the last flatten saw.

    Returns:
        The skeleton, and the tensors it refers to by index.

    Raises:
        ConfigError: the state holds something that cannot be saved: an
            unsupported value, containers nested deeper than ``MAX_DEPTH``, a
            container that contains itself (each named by its path).
    """
    if not isinstance(state, dict):
        raise ConfigError(f"the state must be a dict, not {type(state).__name__}")
    for k in state:
        if not isinstance(k, str):
            raise ConfigError(f"the state's top-level keys must be strings, not {describe(k)}")
    f = _Flattener(capture, memo)
    f.walking[id(state)] = ""  # level 1; its values are level 2
    try:
        skeleton = {
            "t": "dict",
            "items": [[encode_plain(k), f.value(v, k)] for k, v in state.items()],
        }
    except RecursionError as exc:
        # MAX_DEPTH levels take a few hundred frames: only a recursion limit
        # lowered far below Python's default, or a caller already deep, gets here.
        raise ConfigError(
            f"cannot save the state: walking it exceeded this process's recursion limit "
            f"({sys.getrecursionlimit()}); raise it with sys.setrecursionlimit() (Python's "
            "default is 1000)"
        ) from exc
    if memo is not None:
        memo.entries = f.next_memo  # only what this state still has
    return skeleton, f.tensors
