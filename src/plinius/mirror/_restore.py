"""Restore planning: match a saved skeleton against the caller's state, writing nothing.

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

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, StateMismatchError
from ._codec import (
    DTYPE_NAMES,
    TORCH_DTYPES,
    Node,
    decode_plain,
    describe,
    has_refs,
    is_stateful,
    join_path,
    node_error,
    stateful_kind,
)
from ._flatten import byte_view, fast_view, is_direct
from ._format import TensorMeta

__all__ = ["MAX_DIFFERENCES", "RestorePlan", "SavedTensor", "TensorDst", "plan_restore"]

# How many differences a StateMismatchError names before "and N more".
MAX_DIFFERENCES = 5
# A plan collects at most this many before it stops looking.
_COLLECT_DIFFERENCES = 50


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


# What the manifest says about one saved tensor, for matching: its five
# shared fields (a manifest Entry is one, so the entries are passed as they are).
SavedTensor = TensorMeta

_MISSING: Any = object()


@dataclass
class RestorePlan:
    """Where each saved tensor goes, and how to rebuild the state afterwards."""

    dsts: list[TensorDst]
    finish: Callable[[], None]
    differences: list[str] = field(default_factory=list)


class _Planner:
    def __init__(self, tensors: Sequence[TensorMeta]) -> None:
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
        if not has_refs(node):
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
        raise node_error(f"unexpected node type {t!r}")

    def tensor(self, node: Node, target: Any, path: str, strict: bool) -> Callable[[], Any]:
        i = node["i"]
        if not (type(i) is int and 0 <= i < len(self.tensors)):
            raise node_error("tensor index out of range")
        st = self.tensors[i]
        if st.kind == "torch":
            if isinstance(target, torch.Tensor):
                tdt = DTYPE_NAMES[target.dtype]
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
                view = fast_view(target)
                if view is not None:
                    dst = TensorDst(i, view, target, alias=True)
                elif is_direct(target):
                    dst = TensorDst(i, byte_view(target), target, alias=True)
                else:
                    buf = torch.empty(st.shape, dtype=TORCH_DTYPES[st.dtype])
                    dst = TensorDst(i, byte_view(buf), buf, target=target)
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
                raise node_error(f"unknown dtype {st.dtype!r}")
            new = torch.empty(st.shape, dtype=dtype)
            self.dsts.append(TensorDst(i, byte_view(new), new))
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
            (k, self.node(v, tgt.get(k, _MISSING), join_path(path, k), strict, inplace))
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
                join_path(path, i),
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
        if not is_stateful(target):
            self.diff(
                path, f"saved a {node.get('cls')} (state_dict), target holds {_describe(target)}"
            )
            return lambda: target
        if stateful_kind(target) != kind:
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
            decode_plain(saved["param_groups"]) if not has_refs(saved["param_groups"]) else None
        )
        tgroups = template["param_groups"]
        if groups is None:
            # tensor learning rates: compare the structure through the generic rules
            groups_build = self.node(
                saved["param_groups"], tgroups, join_path(path, "param_groups"), False, False
            )
            saved_params = self._group_params_from_node(saved["param_groups"])
        else:
            groups_build = lambda: groups  # noqa: E731
            saved_params = [list(g.get("params", [])) for g in groups if isinstance(g, dict)]
        tparams = [list(g["params"]) for g in tgroups]
        if [len(p) for p in saved_params] != [len(p) for p in tparams]:
            self.diff(
                join_path(path, "param_groups"),
                f"saved groups of {[len(p) for p in saved_params]} parameters, "
                f"target {[len(p) for p in tparams]}",
            )
            return lambda: template
        # Saved parameter ids map to the target's by position, as torch does.
        id_map = {s: t for sp, tp in zip(saved_params, tparams) for s, t in zip(sp, tp)}
        state_node = saved["state"]
        tstate = template["state"]
        if state_node.get("t") != "dict":
            raise node_error("optimizer state is not a dict")
        thunks = []
        for k, v in state_node["items"]:
            pid = decode_plain(k)
            where = join_path(join_path(path, "state"), pid)
            if pid not in id_map:
                self.diff(where, "state for a parameter the saved groups do not list")
                continue
            tv = tstate.get(id_map[pid], _MISSING)
            thunks.append((pid, self.node(v, tv, where, False, False)))

        def build() -> Any:
            return {"state": {k: th() for k, th in thunks}, "param_groups": groups_build()}

        return build

    def _group_params_from_node(self, node: Node) -> list[list[Any]]:
        out = []
        for g in node.get("items", []):
            params: list[Any] = []
            if g.get("t") == "dict":
                for k, v in g["items"]:
                    if decode_plain(k) == "params" and not has_refs(v):
                        params = list(decode_plain(v))
            out.append(params)
        return out

    def _key_diff(self, path: str, saved: set[Any], target: set[Any]) -> None:
        if saved - target:
            self.diff(
                path,
                "saved keys missing from the target: "
                + _keys(sorted(saved - target, key=describe)),
            )
        if target - saved:
            self.diff(
                path,
                "target keys not in the saved state: "
                + _keys(sorted(target - saved, key=describe)),
            )


def _keys(keys: list[Any]) -> str:
    shown = ", ".join(describe(k) for k in keys[:5])
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


def _has_state(v: Any, depth: int = 0) -> bool:
    """Whether a target value holds tensors, arrays or Stateful objects."""
    if isinstance(v, torch.Tensor | np.ndarray) or is_stateful(v):
        return True
    if depth > 100:
        return False
    if isinstance(v, dict):
        return any(_has_state(x, depth + 1) for x in v.values())
    if isinstance(v, list | tuple):
        return any(_has_state(x, depth + 1) for x in v)
    return False


def plan_restore(skeleton: Node, tensors: Sequence[TensorMeta], state: Any) -> RestorePlan:
    """Match the saved ``skeleton`` against ``state`` without writing anything.

    Args:
        skeleton: the saved skeleton (or a sub-dict of it).
        tensors: what the manifest says of each saved tensor (its entries).
        state: the target state, a dict.

    Returns:
        The plan: its ``dsts`` say where to decrypt each tensor; its ``finish``
        puts staged tensors into their targets and rebuilds the state (call it
        only after every tensor has been authenticated).

    Raises:
        StateMismatchError: the saved state does not fit ``state`` (naming the
            first differences).
        ConfigError: ``state`` is not a dict, or the skeleton is malformed.
    """
    if not isinstance(state, dict):
        raise ConfigError(f"the state must be a dict, not {type(state).__name__}")
    p = _Planner(tensors)
    if skeleton.get("t") != "dict":
        raise node_error("the top level is not a dict")
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
