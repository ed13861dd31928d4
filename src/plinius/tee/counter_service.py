"""Per-job freshness counters kept by the key server: wire format, store and protocol.

The data owner's key server can keep one monotonic counter per job, so a
training job inside a TEE can detect a rolled-back mirror file (see
:mod:`plinius.counters`) without a TPM. One request, in order::

    client (TEE, holds the master key)               key server (holds it too)
      N = 32 fresh random bytes
      mac = HMAC-SHA256(K_job, aad(domain, version, job, op, N, target))
        K_job = HKDF(master, salt=job id, info="plinius/v1/counter-auth")
      POST /v1/counter {version, job_id, op, nonce: N, target, mac} ->
                                                   mac verifies under K_job?
                                                   read: value = current
                                                   advance to V: V == current + 1: store V
                                                                 V <= current: no change
                                                                 V >  current + 1: refused
                                                <- {payload, signature} (Ed25519 identity)
      signature by the configured server key? payload names this job, op, N, V?

Only code that obtained the master key (released to attested code only) can
compute the MAC, so only it can read or advance its job's counter. The
response is signed over the exact bytes in its own domain (never valid as a key
release) and names the job, the operation and the client's fresh nonce, so it
cannot be replayed to a later request or passed off as another job's.

**Advance, not increment.** A plain "add one" retried after a lost response
would add two, and the mirror would then read the counter as ahead of every
manifest: a false rollback. "Advance to V" is idempotent: a retry (or an
attacker replaying the captured request) of an advance that already happened
changes nothing and returns the current value.

This module needs neither Starlette nor uvicorn: the client imports the wire
helpers from here, the key server (:mod:`.keyserver`) the store and service.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fsutil import write_atomic
from ..crypto import MasterKey, aad
from ..errors import ConfigError, FormatError, PliniusError, storage_error
from ._wire import Refusal, bad_request, decode_hex
from .protocol import NONCE_SIZE, PROTOCOL_VERSION, check_job_id

if TYPE_CHECKING:  # pragma: no cover
    from .audit import AuditLog

__all__ = [
    "COUNTER_DOMAIN",
    "MAC_SIZE",
    "MAX_COUNTER_REQUEST",
    "MAX_COUNTER_VALUE",
    "CounterService",
    "CounterStore",
    "counter_auth_key",
    "counter_request",
    "request_mac",
]

# The signature domain of counter responses (see protocol.sign_json).
COUNTER_DOMAIN = b"plinius/v1/counter\0"
MAC_SIZE = 32
# A counter request is under 300 bytes; anything much larger is not one.
MAX_COUNTER_REQUEST = 1024
MAX_COUNTER_VALUE = (1 << 63) - 1
OPS = ("read", "advance")
_STATE_FORMAT = "plinius-counter"
_MAX_STATE_FILE = 4096


def counter_auth_key(master: MasterKey, job_id: str) -> bytes:
    """The job's request-authentication key: HKDF(master, salt=job id, "counter-auth").

    Args:
        master: the job's master key (client and server both hold it).
        job_id: the job.

    Returns:
        32 bytes.

    Raises:
        ConfigError: ``job_id`` is malformed.
    """
    return master.derive("counter-auth", salt=check_job_id(job_id).encode("ascii"))


def request_mac(
    auth_key: bytes, *, job_id: str, op: str, nonce: bytes, target: int | None
) -> bytes:
    """HMAC-SHA256 over every field of a counter request (typed, length-prefixed).

    Args:
        auth_key: from :func:`counter_auth_key`.
        job_id: the job.
        op: ``"read"`` or ``"advance"``.
        nonce: the client's fresh 32 bytes.
        target: the advance's target (None for a read).

    Returns:
        The 32-byte MAC.
    """
    msg = aad("plinius/v1/counter/request", PROTOCOL_VERSION, job_id, op, nonce, target)
    return hmac.new(auth_key, msg, hashlib.sha256).digest()


def counter_request(
    auth_key: bytes, *, job_id: str, op: str, nonce: bytes, target: int | None = None
) -> dict[str, Any]:
    """The JSON body of a counter request (``target`` only for ``advance``).

    Args:
        auth_key: from :func:`counter_auth_key`.
        job_id: the job.
        op: ``"read"`` or ``"advance"``.
        nonce: the client's fresh 32 bytes; the signed answer must name it.
        target: the value to advance to (``advance`` only).

    Returns:
        The request, MAC'd with :func:`request_mac`.
    """
    req: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "job_id": job_id,
        "op": op,
        "nonce": nonce.hex(),
    }
    if op == "advance":
        req["target"] = target
    mac = request_mac(auth_key, job_id=job_id, op=op, nonce=nonce, target=target)
    req["mac"] = mac.hex()
    return req


class CounterStore:
    """Durable per-job counters in ``directory``: one small JSON file per job.

    Files are named by a hash of the job id (job ids may differ only in case,
    which some file systems fold) and hold the job id, checked on every read.
    A missing file is a counter at 0; a damaged one is an error, never 0. Each
    write goes to a temporary file that is fsynced, renamed over the old one,
    and then the directory is fsynced, so a power cut leaves the old value or
    the new one. An exclusive lock on ``directory/.lock`` keeps a second
    server from sharing the directory (two would break compare-and-set).

    Args:
        directory: created (mode 0700) if missing.

    Raises:
        StorageError: the directory or its lock file cannot be created.
        ConfigError: another key server holds the directory.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise storage_error(exc, f"cannot use counter directory {self.directory}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(
                f"counter directory {self.directory} is in use by another key server; "
                "stop it first (two servers on one directory could both advance a counter)"
            ) from exc
        self._lock_fd: int | None = fd

    @staticmethod
    def file_name(job_id: str) -> str:
        """The name of ``job_id``'s state file in the directory."""
        digest = hashlib.sha256(check_job_id(job_id).encode("ascii")).hexdigest()
        return f"{digest[:40]}.json"

    def path_for(self, job_id: str) -> Path:
        """The state file of ``job_id``."""
        return self.directory / self.file_name(job_id)

    def read(self, job_id: str) -> int:
        """The counter of ``job_id``.

        Args:
            job_id: the job.

        Returns:
            Its value; 0 if it never advanced.

        Raises:
            FormatError: the state file is damaged (never read as 0).
            StorageError: the state file cannot be read.
        """
        path = self.path_for(job_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise storage_error(exc, f"cannot read counter state {path}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise self._damaged(path, job_id, "not a regular file")
            data = os.read(fd, _MAX_STATE_FILE + 1)
        except OSError as exc:
            raise storage_error(exc, f"cannot read counter state {path}") from exc
        finally:
            os.close(fd)
        if len(data) > _MAX_STATE_FILE:
            raise self._damaged(path, job_id, "too large")
        try:
            state = json.loads(data)
        except (ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit int
            raise self._damaged(path, job_id, "not JSON") from exc
        if (
            not isinstance(state, dict)
            or set(state) != {"format", "version", "job_id", "value"}
            or state["format"] != _STATE_FORMAT
            or state["version"] != 1
        ):
            raise self._damaged(path, job_id, "not a plinius counter state, version 1")
        if state["job_id"] != job_id:
            raise self._damaged(path, job_id, f"it belongs to job {str(state['job_id'])[:130]!r}")
        value = state["value"]
        if type(value) is not int or not 0 <= value <= MAX_COUNTER_VALUE:
            raise self._damaged(path, job_id, "the value is not a counter value")
        return value

    def write(self, job_id: str, value: int) -> None:
        """Store ``value`` for ``job_id`` durably (atomic replace; see the class docstring).

        Args:
            job_id: the job.
            value: from 0 to ``MAX_COUNTER_VALUE``.

        Raises:
            ValueError: ``value`` is out of range (a bug in the caller).
            StorageError: the state cannot be written; the old value stays.
        """
        if type(value) is not int or not 0 <= value <= MAX_COUNTER_VALUE:
            raise ValueError("counter value out of range")
        path = self.path_for(job_id)
        state = {"format": _STATE_FORMAT, "version": 1, "job_id": job_id, "value": value}
        data = (json.dumps(state, sort_keys=True) + "\n").encode("ascii")
        # Durable before it is acknowledged: a power cut must never bring an
        # older (lower) value back.
        write_atomic(path, data, what="counter state")

    def close(self) -> None:
        """Release the directory lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def _damaged(path: Path, job_id: str, why: str) -> FormatError:
        return FormatError(
            f"counter state {path} of job {job_id!r} is damaged ({why}); restore it from a "
            "backup. Deleting it would reset the job's counter to 0 and weaken its rollback "
            "protection"
        )


_FIELDS = {
    "read": {"version", "job_id", "op", "nonce", "mac"},
    "advance": {"version", "job_id", "op", "nonce", "target", "mac"},
}


class CounterService:
    """The protocol logic of ``POST /v1/counter`` (no HTTP; see :class:`.keyserver.KeyServer`).

    ``sign(payload, domain)`` signs responses with the server's identity;
    ``audit`` gets one line per advance (also one that changed nothing) and per
    refusal. Reads are not audited: the mirror reads on every commit.

    Args:
        master_key: the key the server releases; request MAC keys derive from it.
        store: where the counters persist.
        sign: signs answers with the server's identity.
        audit: the server's audit log.
    """

    def __init__(
        self,
        master_key: MasterKey,
        store: CounterStore,
        sign: Callable[[dict[str, Any], bytes], dict[str, str]],
        audit: AuditLog,
    ) -> None:
        self._master = master_key
        self.store = store
        self._sign = sign
        self.audit = audit
        # One request at a time: read, compare and write must not interleave.
        self._lock = threading.Lock()

    def handle(self, body: bytes, client: str = "unknown") -> tuple[int, dict[str, Any]]:
        """Answer one ``POST /v1/counter`` request; never raises.

        Args:
            body: the request body.
            client: the peer's address, for the audit log.

        Returns:
            The HTTP status and JSON body: a signed answer, or
            ``{"error", "reason"}`` for a refusal.
        """
        event: dict[str, Any] = {"client": client}
        try:
            return 200, self._handle(body, event)
        except Refusal as r:
            self.refuse(event, r)
            return r.status, {"error": r.code, "reason": r.reason}
        except Exception as exc:  # a bug: refuse, and say so
            bug = Refusal(500, "internal", f"internal error: {type(exc).__name__}")
            self.refuse({**event, "detail": str(exc)[:500]}, bug)
            return bug.status, {"error": bug.code, "reason": bug.reason}

    def refuse(self, event: dict[str, Any], r: Refusal) -> None:
        """Audit a refusal (best effort: the refusal stands even if unlogged).

        Args:
            event: what is known of the request (client, job, ...).
            r: the refusal.
        """
        with contextlib.suppress(PliniusError):
            self.audit.write(
                {
                    "event": "counter-refusal",
                    "status": r.status,
                    "code": r.code,
                    "reason": r.reason,
                    **event,
                }
            )

    def _handle(self, body: bytes, event: dict[str, Any]) -> dict[str, str]:
        req = self._parse(body, event)
        job_id, op, nonce, target = req["job_id"], req["op"], req["nonce"], req["target"]
        # Authenticate before touching the store: an unauthenticated client
        # learns nothing and makes the server create nothing.
        expected = request_mac(
            counter_auth_key(self._master, job_id), job_id=job_id, op=op, nonce=nonce, target=target
        )
        if not hmac.compare_digest(expected, req["mac"]):
            raise Refusal(
                403,
                "unauthorized",
                "the request is not authenticated with this job's counter key: the client "
                "does not hold the master key this server releases (or the request was altered)",
            )
        with self._lock:
            current = self._read(job_id, event)
            value, advanced = current, False
            if op == "advance":
                event.update({"target": target, "from": current})
                if target > current + 1:
                    raise Refusal(
                        409,
                        "counter_gap",
                        f"the counter of job {job_id} is at {current}; it advances one step at "
                        f"a time, so not to {target}: the counter was reset here, or the client "
                        "uses another job's value",
                    )
                if target == current + 1:
                    # Fail closed, as releases do: an advance that cannot be
                    # audited does not happen.
                    try:
                        self.audit.write({"event": "counter-advance", **event, "to": target})
                    except PliniusError as exc:
                        raise Refusal(500, "audit", f"the key server cannot audit: {exc}") from exc
                    self._write(job_id, target, event)
                    value, advanced = target, True
                else:  # a retry or replay of an advance already made: no change
                    with contextlib.suppress(PliniusError):
                        self.audit.write({"event": "counter-advance", **event, "to": current})
        payload = {
            "type": "counter",
            "version": PROTOCOL_VERSION,
            "job_id": job_id,
            "op": op,
            "nonce": nonce.hex(),
            "target": target,
            "value": value,
            "advanced": advanced,
        }
        return self._sign(payload, COUNTER_DOMAIN)

    def _parse(self, body: bytes, event: dict[str, Any]) -> dict[str, Any]:
        if len(body) > MAX_COUNTER_REQUEST:
            raise Refusal(
                413, "too_large", f"counter requests are at most {MAX_COUNTER_REQUEST} bytes"
            )
        try:
            req = json.loads(body)
        except (ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit int
            raise Refusal(400, "bad_request", "the request is not JSON") from exc
        if not isinstance(req, dict) or req.get("op") not in OPS:
            raise Refusal(
                400, "bad_request", "the request must be a JSON object with op 'read' or 'advance'"
            )
        op = req["op"]
        event["op"] = op
        if set(req) != _FIELDS[op]:
            raise Refusal(
                400,
                "bad_request",
                f"a {op} request needs exactly: {', '.join(sorted(_FIELDS[op]))}",
            )
        if type(req["version"]) is not int or req["version"] != PROTOCOL_VERSION:
            raise Refusal(
                400, "bad_version", f"unsupported protocol version {str(req['version'])[:20]!r}"
            )
        try:
            job_id = check_job_id(req["job_id"])
        except ConfigError as exc:
            raise Refusal(400, "bad_request", str(exc)) from exc
        event["job_id"] = job_id
        nonce = decode_hex(req["nonce"], NONCE_SIZE, name="nonce", error=bad_request)
        event["nonce"] = nonce.hex()
        mac = decode_hex(req["mac"], MAC_SIZE, name="mac", error=bad_request)
        target = req.get("target")
        if op == "advance" and (type(target) is not int or not 1 <= target <= MAX_COUNTER_VALUE):
            raise Refusal(
                400, "bad_request", f"target must be an integer from 1 to {MAX_COUNTER_VALUE}"
            )
        return {"job_id": job_id, "op": op, "nonce": nonce, "target": target, "mac": mac}

    def _read(self, job_id: str, event: dict[str, Any]) -> int:
        try:
            return self.store.read(job_id)
        except PliniusError as exc:
            event["detail"] = str(exc)[:500]  # for the operator, not the client
            raise Refusal(
                500,
                "counter_state",
                f"the key server cannot read the counter of job {job_id}; "
                "its operator must repair the counter state (see the audit log)",
            ) from exc

    def _write(self, job_id: str, value: int, event: dict[str, Any]) -> None:
        try:
            self.store.write(job_id, value)
        except PliniusError as exc:
            event["detail"] = str(exc)[:500]
            raise Refusal(
                500,
                "counter_state",
                f"the key server cannot store the counter of job {job_id}; "
                "its operator must check the counter directory (see the audit log)",
            ) from exc
