"""The mirror file format, byte by byte (see docs/FORMAT.md), and its allocator.

Everything here is pure: bytes in, values out, with every length and offset
read from a file checked before use. The commit protocol that orders the
writes lives in the ``mirror`` package.

::

    0x0000  superblock (128 bytes; written once at creation, never again)
    0x0100  commit word (8 bytes, aligned: generation | slot | CRC-8)
    0x1000  manifest root, slot 0 (salt, length, AES-GCM sealed root record)
    0x2000  manifest root, slot 1
    0x3000  data area: manifest bodies and tensor slots, in pairs, 64-aligned
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import zlib
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _magic
from ..crypto import TAG_SIZE, hkdf
from ..errors import ConfigError, FormatError, IntegrityError
from ._codec import INT_DIGITS, MAX_DEPTH, TORCH_DTYPES, check_tensor_refs, skeleton_depth

__all__ = [
    "ALIGN",
    "COMMIT_OFFSET",
    "DATA_START",
    "FORMAT_VERSION",
    "HEADER_LEN",
    "MAGIC",
    "ROOT_OFFSETS",
    "ROOT_SIZE",
    "Entry",
    "Allocator",
    "Manifest",
    "Superblock",
    "TensorMeta",
    "crc8",
    "ct_len",
    "decode_body",
    "encode_body",
    "in_use_end",
    "nchunks",
    "pack_commit",
    "pack_root",
    "pack_superblock",
    "unpack_commit",
    "unpack_root",
    "unpack_superblock",
]

MAGIC = _magic.MIRROR
FORMAT_VERSION = 1
HEADER_LEN = 128  # superblock bytes; the rest of page 0 is zero but for the commit word
COMMIT_OFFSET = 256  # its own cache line, 8-byte aligned
ROOT_OFFSETS = (4096, 8192)
ROOT_SIZE = 4096
DATA_START = 12288
ALIGN = 64  # every extent starts on a cache line
ROOT_SALT = 16
MAX_GENERATION = (1 << 48) - 1
MAX_BODY = 1 << 31  # a manifest body larger than this is refused (about 10 million tensors)

_SB = struct.Struct(
    "<8sII16s16sdQ"
)  # magic, version, header_len, region id, fingerprint, created, flags
_SB_MAC = 64  # HMAC-SHA256 over bytes [0, 64) at [64, 96)
_SB_CRC = 96  # CRC-32 over bytes [0, 96) at [96, 100)

# Root record: version, flags, generation, step, saved_at, counter_expected,
# counter_every, counter_interval_s, body_off, body_len, body_other, body_cap,
# body_tag, num_tensors, tensor_bytes, extent_end, chunk_bytes.
_ROOT = struct.Struct("<IIQqdQQdQQQQ16sQQQQ")
ROOT_HAS_STEP = 1
ROOT_USES_COUNTER = 2


def crc8(data: bytes) -> int:
    """CRC-8/I-432-1 (poly 0x07, init 0, xorout 0x55): all-zero input gives 0x55, not 0."""
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc ^ 0x55


# ---------------------------------------------------------------- commit word
def pack_commit(generation: int, slot: int) -> int:
    """The 64-bit commit word: generation (48 bits), slot (8 bits), CRC-8 (8 bits)."""
    if not (0 <= generation <= MAX_GENERATION and slot in (0, 1)):
        raise ValueError("generation or slot out of range")
    body = (generation << 8) | slot
    return (body << 8) | crc8(body.to_bytes(7, "little"))


def unpack_commit(word: int) -> tuple[int, int]:
    """``(generation, slot)`` of a commit word; IntegrityError if its check fails."""
    body = word >> 8
    if word & 0xFF != crc8(body.to_bytes(7, "little")) or body & 0xFF not in (0, 1):
        raise IntegrityError(
            f"the commit word ({word:#018x}) fails its check: the mirror is damaged or was "
            "tampered with; restore it from a trusted copy"
        )
    return body >> 8, body & 0xFF


# ---------------------------------------------------------------- superblock
@dataclass(frozen=True)
class Superblock:
    """The immutable header of a mirror file."""

    version: int
    region_id: bytes
    fingerprint: bytes
    created_at: float
    mac: bytes


def superblock_key(mirror_key: bytes) -> bytes:
    """The HMAC key that authenticates the superblock."""
    return hkdf(mirror_key, salt=None, info="plinius/v1/mirror/superblock")


def pack_superblock(
    region_id: bytes, fingerprint: bytes, created_at: float, mirror_key: bytes
) -> bytes:
    """The 128 header bytes of a new mirror."""
    head = _SB.pack(MAGIC, FORMAT_VERSION, HEADER_LEN, region_id, fingerprint, created_at, 0)
    mac = hmac.new(superblock_key(mirror_key), head, hashlib.sha256).digest()
    body = head + mac
    return (body + struct.pack("<I", zlib.crc32(body))).ljust(HEADER_LEN, b"\0")


def unpack_superblock(page0: bytes | memoryview, what: str) -> Superblock:
    """Parse and check page 0 (without the key: magic, version, CRC, zero padding)."""
    if len(page0) < 8 or bytes(page0[:8]) != MAGIC:
        raise FormatError(f"{what} is not a plinius mirror (it does not start with {MAGIC!r})")
    if len(page0) < DATA_START:
        raise IntegrityError(
            f"{what} is truncated ({len(page0)} bytes, less than its {DATA_START}-byte header)"
        )
    _, version, hlen, region_id, fp, created, flags = _SB.unpack_from(page0, 0)
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{what} has mirror format version {version}; this plinius reads version "
            f"{FORMAT_VERSION}: use a matching plinius release"
        )
    (crc,) = struct.unpack_from("<I", page0, _SB_CRC)
    if hlen != HEADER_LEN or flags != 0 or crc != zlib.crc32(bytes(page0[:_SB_CRC])):
        raise IntegrityError(f"the superblock of {what} is damaged (checksum mismatch)")
    z = np.frombuffer(page0, dtype=np.uint8, count=4096)
    if z[100:COMMIT_OFFSET].any() or z[COMMIT_OFFSET + 8 :].any():
        raise IntegrityError(f"the reserved bytes of {what}'s header are not zero: it was modified")
    return Superblock(version, bytes(region_id), bytes(fp), created, bytes(page0[_SB_MAC:_SB_CRC]))


def check_superblock_mac(
    page0: bytes | memoryview, sb: Superblock, mirror_key: bytes, what: str
) -> None:
    """Authenticate the superblock under the mirror key."""
    expected = hmac.new(superblock_key(mirror_key), bytes(page0[:_SB_MAC]), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, sb.mac):
        raise IntegrityError(f"the superblock of {what} fails authentication: it was tampered with")


# ---------------------------------------------------------------- root record
@dataclass
class Root:
    """The fixed-size part of a manifest, sealed in a root slot."""

    generation: int
    step: int | None
    saved_at: float
    counter_expected: int
    uses_counter: bool
    counter_every: int  # 0: not by count
    counter_interval_s: float  # 0.0: not by time
    body_off: int
    body_len: int
    body_other: int
    body_cap: int
    body_tag: bytes
    num_tensors: int
    tensor_bytes: int
    extent_end: int
    chunk_bytes: int


def pack_root(r: Root) -> bytes:
    """The root record's plaintext bytes."""
    flags = (ROOT_HAS_STEP if r.step is not None else 0) | (
        ROOT_USES_COUNTER if r.uses_counter else 0
    )
    return _ROOT.pack(
        FORMAT_VERSION, flags, r.generation, r.step or 0, r.saved_at, r.counter_expected,
        r.counter_every, r.counter_interval_s, r.body_off, r.body_len, r.body_other, r.body_cap,
        r.body_tag, r.num_tensors, r.tensor_bytes, r.extent_end, r.chunk_bytes,
    )  # fmt: skip


def unpack_root(data: bytes) -> Root:
    """Parse an authenticated root record, checking every field."""
    if len(data) != _ROOT.size:
        raise IntegrityError("manifest root has the wrong size")
    (ver, flags, gen, step, saved_at, cexp, cevery, cint, boff, blen, bother, bcap, btag,
     ntens, tbytes, end, chunk) = _ROOT.unpack(data)  # fmt: skip
    ok = (
        ver == FORMAT_VERSION
        and flags & ~(ROOT_HAS_STEP | ROOT_USES_COUNTER) == 0
        and gen <= MAX_GENERATION
        and boff >= DATA_START
        and bother >= DATA_START
        and boff % ALIGN == 0
        and bother % ALIGN == 0
        and TAG_SIZE <= blen <= bcap <= MAX_BODY
        and boff + bcap <= end
        and bother + bcap <= end
        and (boff + bcap <= bother or bother + bcap <= boff)
        and 0 < chunk <= (1 << 31) - 1
        and math.isfinite(cint)
        and cint >= 0
    )
    if not ok:
        raise IntegrityError("manifest root holds inconsistent values")
    has_step, uses_counter = flags & ROOT_HAS_STEP, flags & ROOT_USES_COUNTER
    return Root(
        gen, step if has_step else None, saved_at, cexp, bool(uses_counter),
        cevery, cint, boff, blen, bother, bcap, btag, ntens, tbytes, end, chunk,
    )  # fmt: skip


ROOT_PLAIN_SIZE = _ROOT.size


# ---------------------------------------------------------------- body (tensor table)
def nchunks(nbytes: int, chunk: int) -> int:
    """How many AES-GCM pieces a tensor of ``nbytes`` is sealed in (at least one)."""
    return max(1, -(-nbytes // chunk))


def ct_len(nbytes: int, chunk: int) -> int:
    """Bytes a sealed tensor takes in its slot: ciphertext plus one tag per chunk."""
    return nbytes + TAG_SIZE * nchunks(nbytes, chunk)


def round_up(n: int, a: int) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    return -(-n // a) * a


@dataclass(slots=True)
class TensorMeta:
    """What a tensor is: the five fields every tensor record shares.

    A manifest :class:`Entry`, a tensor to save (``_flatten.TensorSrc``), a
    saved tensor to match on restore and the public ``TensorInfo`` all carry
    them; this is their one home.
    """

    name: str
    kind: str  # "torch" or "numpy"
    dtype: str  # a torch dtype name ("float32") or a numpy dtype string ("<f4")
    shape: tuple[int, ...]
    nbytes: int  # plaintext size in bytes


@dataclass(slots=True)
class Entry(TensorMeta):
    """One tensor in a manifest: what it is and where its two slots are."""

    slots: tuple[int, int]
    cap: int
    cur: int  # which slot holds this generation's ciphertext
    tags: list[bytes] = field(default_factory=list)

    @property
    def offset(self) -> int:
        """Where this generation's ciphertext starts."""
        return self.slots[self.cur]

    def to_json(self) -> list[Any]:
        # Positional, for speed: name, kind, dtype, shape, nbytes, slot a, slot b,
        # cap, cur, tags (one hex string, 32 digits per chunk).
        return [
            self.name, self.kind, self.dtype, list(self.shape), self.nbytes,
            self.slots[0], self.slots[1], self.cap, self.cur, b"".join(self.tags).hex(),
        ]  # fmt: skip


@dataclass
class Manifest:
    """A decoded, authenticated manifest: the root and the body."""

    root: Root
    slot: int
    skeleton: dict[str, Any]
    entries: list[Entry]
    salt: bytes = b""  # the per-save key's salt


def in_use_end(m: Manifest) -> int:
    """Where the extents a manifest references end: its body pair and every tensor pair.

    At most the root's ``extent_end`` (the file size at the commit): the file
    past it, and between the extents, is free space.
    """
    r = m.root
    end = max(r.body_off, r.body_other) + r.body_cap
    for e in m.entries:
        end = max(end, e.slots[0] + e.cap, e.slots[1] + e.cap)
    return end


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def encode_body(skeleton: dict[str, Any], entries: list[Entry]) -> bytes:
    """The manifest body's plaintext: compact JSON, ASCII."""
    return _dumps({"state": skeleton, "tensors": [e.to_json() for e in entries]}).encode()


class BodyEncoder:
    """:func:`encode_body`, byte for byte, reusing what the last save encoded.

    From one save to the next usually only the tags and the current slots
    change, and maybe a few plain values: the skeleton's JSON is reused when
    the skeleton is equal, and each entry's JSON up to its tags is cached.
    :meth:`prepare` does all of it before the tags exist (before a save
    encrypts, while the interpreter's data is still in the CPU caches);
    :meth:`fill` then only places the tags.
    """

    def __init__(self) -> None:
        self._skeleton: dict[str, Any] | None = None
        self._skeleton_json = ""
        self._heads: dict[tuple[Any, ...], str] = {}

    def prepare(self, skeleton: dict[str, Any], entries: list[Entry]) -> list[str]:
        """The body's text around the entries' tags: ``len(entries) + 1`` pieces."""
        if skeleton != self._skeleton:
            try:
                self._skeleton_json = _dumps(skeleton)
            except ValueError as exc:
                # Only where sys.set_int_max_str_digits() lowered Python's
                # default: integers of up to INT_DIGITS digits are JSON integers.
                raise ConfigError(
                    f"cannot save the state: it holds an integer longer than this process "
                    f"converts to decimal ({exc}); raise sys.set_int_max_str_digits() to at "
                    f"least {INT_DIGITS}, Python's default"
                ) from exc
            self._skeleton = skeleton
        heads = self._heads
        if len(heads) > 4 * len(entries) + 64:
            heads.clear()  # the layout changed: forget the old entries
        # Piece i is the text right before entry i's tags; the last one closes the body.
        pieces = [f'{{"state":{self._skeleton_json},"tensors":[']
        for e in entries:
            k = (e.name, e.kind, e.dtype, e.shape, e.nbytes, e.slots, e.cap, e.cur)
            head = heads.get(k)
            if head is None:
                # The entry's JSON without its last item (the tags) and "]".
                head = heads[k] = _dumps([*e.to_json()[:-1], ""])[:-3]
            pieces[-1] += f'{head}"'
            pieces.append('"],')
        pieces[-1] = '"]]}' if entries else pieces[-1] + "]}"
        return pieces

    @staticmethod
    def fill(pieces: list[str], entries: list[Entry]) -> bytes:
        """The body, with each entry's tags (hex) between the prepared pieces."""
        parts = [pieces[0]]
        for e, p in zip(entries, pieces[1:]):
            parts.append(b"".join(e.tags).hex())
            parts.append(p)
        return "".join(parts).encode()

    def encode(self, skeleton: dict[str, Any], entries: list[Entry]) -> bytes:
        """:func:`encode_body` (prepare, then fill)."""
        return self.fill(self.prepare(skeleton, entries), entries)


def _itemsize(kind: str, dtype: str) -> int:
    if kind == "torch":
        dt = TORCH_DTYPES.get(dtype)
        if dt is None:
            raise ValueError(dtype)
        return int(dt.itemsize)
    if kind == "numpy":
        nd = np.dtype(dtype)
        if nd.hasobject:
            raise ValueError(dtype)
        return int(nd.itemsize)
    raise ValueError(kind)


def _too_deep(label: str, depth: int | None) -> FormatError:
    levels = f" ({depth} levels)" if depth is not None else ""
    return FormatError(
        f"the saved state in {label} is nested deeper than the {MAX_DEPTH} levels plinius "
        f"reads{levels}: an older plinius wrote it under a raised recursion limit (or someone "
        "holding the key forged it); read it with that release and save it flattened, or "
        "restore the mirror from another copy"
    )


def decode_body(
    data: bytes, root: Root, label: str = "the mirror"
) -> tuple[dict[str, Any], list[Entry]]:
    """Parse an authenticated body, checking every field against the root.

    Raises:
        IntegrityError: the body is malformed or disagrees with the root.
        FormatError: the state nests deeper than :data:`MAX_DEPTH` (only an older
            plinius under a raised recursion limit could write that).
    """
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"the manifest body is inconsistent ({exc})") from exc
    try:
        # Every body plinius writes decodes well within the default recursion
        # limit (MAX_DEPTH levels take about 3 * MAX_DEPTH JSON levels).
        doc = json.loads(text)
    except RecursionError as exc:
        raise _too_deep(label, None) from exc
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"the manifest body is inconsistent ({exc})") from exc
    except ValueError as exc:
        # The one other ValueError: an integer longer than INT_DIGITS digits,
        # which only an older plinius under a raised limit wrote as JSON.
        raise FormatError(
            f"{label} holds an integer longer than {INT_DIGITS} digits in a form this process "
            f"will not convert ({exc}); open it in a Python started with "
            "-X int_max_str_digits=0 and save it again"
        ) from exc
    try:
        skeleton = doc["state"]
        if not isinstance(skeleton, dict):
            raise ValueError("state")
        depth = skeleton_depth(skeleton)
        if depth > MAX_DEPTH:
            raise _too_deep(label, depth)
        entries: list[Entry] = []
        total = 0
        for t in doc["tensors"]:
            name, kind, dtype, shape_l, nbytes, a, b, cap, cur, tags_hex = t
            shape = tuple(int(x) for x in shape_l)
            tags = bytes.fromhex(tags_hex)
            e = Entry(
                str(name), str(kind), str(dtype), shape, int(nbytes), (int(a), int(b)),
                int(cap), int(cur),
                [tags[k : k + TAG_SIZE] for k in range(0, len(tags), TAG_SIZE)],
            )  # fmt: skip
            need = ct_len(e.nbytes, root.chunk_bytes)
            if not (
                all(x >= 0 for x in shape)
                and e.nbytes == math.prod(shape) * _itemsize(e.kind, e.dtype)
                and all(type(x) is int for x in (nbytes, a, b, cap, cur, *shape_l))
                and e.cur in (0, 1)
                and need <= e.cap
                and a % ALIGN == 0
                and b % ALIGN == 0
                and min(a, b) >= DATA_START
                and max(a, b) + e.cap <= root.extent_end
                and (a + e.cap <= b or b + e.cap <= a)
                and len(e.tags) == nchunks(e.nbytes, root.chunk_bytes)
                and all(len(x) == TAG_SIZE for x in e.tags)
            ):
                raise ValueError(f"tensor entry {len(entries)}")
            total += e.nbytes
            entries.append(e)
        if len(entries) != root.num_tensors or total != root.tensor_bytes:
            raise ValueError("tensor count or size differs from the root")
        check_tensor_refs(skeleton, len(entries))
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, RecursionError) as exc:
        raise IntegrityError(f"the manifest body is inconsistent ({exc})") from exc
    except Exception as exc:  # ConfigError from the skeleton checks
        if isinstance(exc, IntegrityError | FormatError):
            raise
        raise IntegrityError(f"the manifest body is inconsistent ({exc})") from exc
    return skeleton, entries


# ---------------------------------------------------------------- allocator
def _gaps(used: list[tuple[int, int]]) -> list[list[int]]:
    """Free ``[start, end)`` ranges in the data area; the last one is open-ended (end -1)."""
    gaps: list[list[int]] = []
    pos = DATA_START
    for off, size in sorted(used):
        if off > pos:
            gaps.append([pos, off])
        pos = max(pos, off + size)
    gaps.append([pos, -1])
    return gaps


class Allocator:
    """Places a new generation so that it touches nothing the committed one references.

    Phase one, :meth:`place_tensors`: a tensor whose name the committed
    manifest has, with room enough, is written into the other slot of its
    pair; any other gets a new pair in free space (between extents, or past the
    end of the file, which the caller grows before writing). Phase two, once
    the tensors' tags are known, :meth:`place_body`: the manifest body goes into
    the other slot of the committed body pair if it fits, else into a new pair.
    Extents of the committed layout that are not reused become free once the
    new generation is committed.
    """

    def __init__(self, committed: Manifest | None) -> None:
        self.committed = committed
        self.used: list[tuple[int, int]] = []
        if committed is not None:
            self.used = [(e.offset, e.cap) for e in committed.entries]  # committed ciphertext
            r = committed.root
            self.used.append((r.body_off, r.body_cap))
            self.used.append((r.body_other, r.body_cap))  # kept for the next body
        self.end = DATA_START
        self.fresh = 0
        self._gaps: list[list[int]] | None = None

    def _take(self, size: int) -> int:
        """First fit, ALIGN-aligned; the open-ended gap at the end always fits."""
        if self._gaps is None:
            self._gaps = _gaps(self.used)
        for g in self._gaps:
            start = round_up(g[0], ALIGN)
            if g[1] < 0 or start + size <= g[1]:
                g[0] = start + size
                self.end = max(self.end, start + size)
                return start
        raise AssertionError("the last gap is open-ended")  # pragma: no cover

    def place_tensors(self, wants: list[tuple[str, int]]) -> list[tuple[tuple[int, int], int, int]]:
        """``(slots, cap, cur)`` per ``(name, sealed length)`` wanted."""
        c = self.committed
        if c is not None and len(wants) == len(c.entries):
            # The usual save: the same tensors as the committed generation, in
            # the same order, each fitting its pair; each goes to its other slot.
            # (The general case below gives the same answer, more slowly.)
            es = c.entries
            if all(w[0] == e.name and w[1] <= e.cap for w, e in zip(wants, es)):
                out = [(e.slots, e.cap, 1 - e.cur) for e in es]
                self.used += [(e.slots[1 - e.cur], e.cap) for e in es]
                self.end = max([DATA_START] + [max(e.slots) + e.cap for e in es])
                return out
        old: dict[str, deque[Entry]] = defaultdict(deque)
        for e in c.entries if c is not None else ():
            old[e.name].append(e)
        out2: list[tuple[tuple[int, int], int, int] | None] = []
        fresh: list[tuple[int, int]] = []
        for i, (name, need) in enumerate(wants):
            q = old.get(name)
            prev = q.popleft() if q else None
            if prev is not None and prev.cap >= need:
                other = 1 - prev.cur
                self.used.append((prev.slots[other], prev.cap))
                out2.append((prev.slots, prev.cap, other))
                self.end = max(self.end, max(prev.slots) + prev.cap)
            else:
                out2.append(None)
                fresh.append((i, round_up(max(need, 1), ALIGN)))
        self._gaps = _gaps(self.used)
        # All first slots, then all second slots: a save writes mostly sequentially.
        firsts = [(i, self._take(cap), cap) for i, cap in fresh]
        for i, a, cap in firsts:
            out2[i] = ((a, self._take(cap)), cap, 0)
        self.fresh = len(fresh)
        placed = [x for x in out2 if x is not None]
        assert len(placed) == len(wants)
        return placed

    def place_body(self, need: int) -> tuple[int, int, int]:
        """``(offset, other slot, cap)`` for a sealed manifest body of ``need`` bytes."""
        if need > MAX_BODY:
            raise ValueError("the manifest body would exceed its maximum size")
        c = self.committed
        if c is not None and need <= c.root.body_cap:
            r = c.root
            self.end = max(self.end, r.body_off + r.body_cap, r.body_other + r.body_cap)
            return r.body_other, r.body_off, r.body_cap
        # Room to grow, so that a few more tensors do not move the body again.
        cap = round_up(need + need // 2 + 1024, ALIGN)
        return self._take(cap), self._take(cap), cap
