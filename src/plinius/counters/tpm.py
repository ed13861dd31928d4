"""A TPM 2.0 NV counter as plinius' trusted freshness counter.

:class:`TPMCounter` implements the :class:`~plinius.counters.Counter`
protocol on a TPM 2.0 NV index of type ``TPM_NT_COUNTER``, through
``tpm2-pytss`` (ESAPI). Install it with ``pip install 'plinius[tpm]'``; the
build needs Debian's ``libtss2-dev`` and ``pkg-config`` (``make sysdeps``)::

    counter = TPMCounter.for_key(key, "device:/dev/tpmrm0")
    mirror = Mirror(path, key, counter=counter, counter_every=100, counter_interval_s=60)

Why the TPM can be trusted with this: an NV counter only goes up. Even an
owner who deletes the index and defines it again gets no rollback, because
the TPM starts a re-created counter above the highest value any counter on
that TPM ever had (once it is first incremented).

The channel to the TPM, however, runs through the host (a socket or
``/dev/tpmrm0``), so responses are authenticated: every read and increment
runs in an HMAC session bound to the index, keyed by the index's
authorization value. With a secret value (:meth:`TPMCounter.for_key` derives
one from the master key) a host that fakes or replays TPM answers is caught
(:class:`~plinius.errors.IntegrityError`). That value is sent to the TPM once,
when the index is defined, encrypted in a session salted with a key the TPM
creates; the TPM itself is trusted on first use (verifying its endorsement
certificate is out of scope). Two answers cannot carry an HMAC and so cannot
be authenticated: "no such index" and "never incremented". Both read as 0,
as the protocol requires for a new job, so a host that fakes them can only
claim the counter is back at 0; the mirror refuses a manifest expecting more
than counter + 1, which bounds such a claim to the first generation. Pass
``create=False`` when resuming a job to refuse a missing index outright.

Wear: TPM NV memory endures a limited number of writes (often quoted around
10^5 to 10^6 per cell, vendor dependent), and TPMs rate-limit NV writes
(``TPM_RC_NV_RATE``). Incrementing after every training step would wear the
chip out within days, so ``wears = True``: the mirror advances this counter
only every K commits or T seconds, and an attacker can then roll back at
most that far. The index is deliberately *not* ``TPMA_NV_ORDERLY``: an
orderly counter saves wear by keeping the low bits in RAM, but after a power
cut it jumps ahead, which the mirror would take for a rollback.

TPM authorization, documented for operators:

* defining the index needs the owner hierarchy's authorization
  (``owner_auth``; empty on most machines and on a fresh ``swtpm``);
* the index has ``AUTHREAD | AUTHWRITE | NO_DA`` and the authorization value
  ``auth`` (at most 32 bytes). ``NO_DA``: a wrong value only fails, it never
  locks out the TPM's other users; guessing it gains nothing but the ability
  to increment, a denial of service, never a rollback.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..crypto import MasterKey
from ..errors import (
    ConfigError,
    IntegrityError,
    PliniusError,
    RollbackError,
    StorageError,
)

__all__ = ["DEFAULT_NV_INDEX", "DEFAULT_TCTI", "TPMCounter"]

DEFAULT_TCTI = "device:/dev/tpmrm0"
"""The kernel's TPM resource manager; a software TPM is ``swtpm:host=H,port=P``."""

DEFAULT_NV_INDEX = 0x01500100
"""An NV index handle in the 0x015xxxxx range tpm2-tools examples use for owner indices."""

NV_INDEX_FIRST = 0x01000000
NV_INDEX_LAST = 0x01FFFFFF
AUTH_MAX = 32  # a TPM2B_AUTH is at most the size of the index's name hash (SHA-256)
COUNTER_SIZE = 8

# One TPM conversation at a time per process: ESAPI contexts are not thread
# safe, and a TPM without a resource manager (swtpm over TCP) has few session
# slots, so concurrent sessions could fail spuriously.
_TPM_LOCK = threading.Lock()


def _load_tss() -> Any:
    """Import tpm2-pytss, or say how to install it."""
    # The TSS logs every TPM error to stderr; plinius turns them into one
    # clear exception instead. TSS2_LOG set by the user still wins.
    os.environ.setdefault("TSS2_LOG", "all+none")
    try:
        import tpm2_pytss
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            "the TPM counter needs tpm2-pytss: run 'make sysdeps' (Debian packages "
            "libtss2-dev, pkg-config) then pip install 'plinius[tpm]'"
        ) from exc
    return tpm2_pytss


def _check_index(index: object) -> None:
    if isinstance(index, bool) or not isinstance(index, int):
        raise ConfigError(f"the NV index must be an integer, not {index!r}")
    if not NV_INDEX_FIRST <= index <= NV_INDEX_LAST:
        raise ConfigError(
            f"NV index {index:#x} is not an NV index handle; "
            f"choose one in {NV_INDEX_FIRST:#010x}-{NV_INDEX_LAST:#010x}"
        )


class TPMCounter:
    """A monotonic counter in a TPM 2.0 NV counter index (``TPM_NT_COUNTER``).

    The index is defined on first increment when missing, under the owner
    hierarchy; prefer :meth:`for_key`, which derives a secret ``auth`` from the
    master key. A new index reads 0 until first incremented. Each :meth:`read`
    and :meth:`increment` opens its own TPM connection, so several objects (and
    processes, through a resource manager) can share one TPM.

    Args:
        tcti: the TPM, named as tpm2-tools do: ``"device:/dev/tpmrm0"`` (the
            default), ``"swtpm:host=127.0.0.1,port=2321"`` or ``"mssim:..."``.
        index: the NV index handle (0x01000000-0x01FFFFFF).
        auth: the index's authorization value (at most 32 bytes).
        owner_auth: the owner hierarchy's, to define the index.
        create: define a missing index; False makes a missing index a
            :class:`~plinius.errors.RollbackError` (when resuming a job: the
            index it used is gone).

    Raises:
        ConfigError: a malformed TCTI, index or authorization, or tpm2-pytss
            is not installed.

    Every TPM operation raises :class:`~plinius.errors.ConfigError` when no
    TPM answers or the index is not a plinius counter, and
    :class:`~plinius.errors.IntegrityError` when an answer fails its HMAC
    check or the authorization is refused (a forged answer, another key).
    """

    wears = True
    trusted = True
    # A new index starts above any value a deleted one had: the mirror learns
    # the base when it creates a mirror (see Mirror._initial_counter).
    first_increment_may_jump = True
    # It is in this machine: a job across machines cannot reach it from each.
    machine_local = True

    def __init__(
        self,
        tcti: str = DEFAULT_TCTI,
        *,
        index: int = DEFAULT_NV_INDEX,
        auth: bytes = b"",
        owner_auth: bytes = b"",
        create: bool = True,
    ) -> None:
        if not isinstance(tcti, str) or not tcti.strip():
            raise ConfigError(
                "a TPM TCTI is a string such as 'device:/dev/tpmrm0' "
                "or 'swtpm:host=127.0.0.1,port=2321'"
            )
        _check_index(index)
        for name, value in (("auth", auth), ("owner_auth", owner_auth)):
            if not isinstance(value, bytes | bytearray):
                raise ConfigError(f"the TPM {name} value must be bytes")
            if len(value) > AUTH_MAX:
                raise ConfigError(f"the TPM {name} value is at most {AUTH_MAX} bytes")
        self.tcti = tcti
        self.index = index
        self.create = create
        self._auth = bytes(auth)
        self._owner_auth = bytes(owner_auth)
        self._transients: dict[Any, int] = {}  # ESYS handle -> TPM handle, to flush
        self._tss = _load_tss()

    @classmethod
    def for_key(
        cls,
        key: MasterKey,
        tcti: str = DEFAULT_TCTI,
        *,
        index: int = DEFAULT_NV_INDEX,
        owner_auth: bytes = b"",
        create: bool = True,
    ) -> TPMCounter:
        """A counter whose index authorization is derived from ``key``.

        Only holders of the master key can then increment the index or pass
        a forged TPM answer off as genuine.

        Args:
            key: the job's master key.
            tcti: the TPM (see the class).
            index: the NV index handle; part of the derivation.
            owner_auth: the owner hierarchy's authorization.
            create: define a missing index (see the class).

        Returns:
            The counter.

        Raises:
            ConfigError: a malformed TCTI or index, or no tpm2-pytss.
        """
        _check_index(index)
        auth = key.derive("tpm-counter-auth", salt=index.to_bytes(4, "big"), length=AUTH_MAX)
        return cls(tcti, index=index, auth=auth, owner_auth=owner_auth, create=create)

    # -- the Counter protocol ---------------------------------------------

    def read(self) -> int:
        """The counter's value; never writes to the TPM (a read defines no index).

        Returns:
            The value; 0 for an index that is missing or never incremented.

        Raises:
            RollbackError: the index is missing and ``create`` is False.
            ConfigError, IntegrityError: see the class.
        """
        with _TPM_LOCK, self._connect("read the counter") as esys:
            handle = self._lookup(esys)
            if handle is None:
                return 0
            return self._read_value(esys, handle)

    def increment(self) -> int:
        """Advance the counter by one in the TPM, defining the index if missing.

        The first increment of an index defined earlier and later deleted
        starts above the old value: never expect exactly ``read() + 1`` then.

        Returns:
            The new value.

        Raises:
            RollbackError: the index is missing and ``create`` is False.
            ConfigError, IntegrityError: see the class.
        """
        with _TPM_LOCK, self._connect("increment the counter") as esys:
            handle = self._lookup(esys)
            if handle is None:
                handle = self._define(esys)
            session = self._bound_session(esys, handle)
            try:
                self._check_public(esys, handle, session)
                with self._translate("increment the counter"):
                    esys.nv_increment(handle, session1=session)
                return self._read_written(esys, handle, session)
            finally:
                self._flush(esys, session)

    # -- TPM conversation ---------------------------------------------------

    @contextmanager
    def _connect(self, what: str) -> Iterator[Any]:
        tss = self._tss
        try:
            esys = tss.ESAPI(self.tcti)
        except tss.TSS2_Exception as exc:
            raise self._tcti_error(exc, what) from exc
        except (ValueError, RuntimeError) as exc:
            # TCTILdr.parse refuses malformed strings with plain exceptions.
            raise ConfigError(
                f"cannot {what}: TCTI {self.tcti!r} is not valid ({exc}); use "
                "'device:/dev/tpmrm0' or 'swtpm:host=127.0.0.1,port=2321'"
            ) from exc
        self._transients = {}
        try:
            yield esys
        finally:
            esys.close()
            if self._transients:
                self._flush_leftovers()

    def _track(self, esys: Any, handle: Any) -> Any:
        """Remember a session or key to flush: a TPM without a resource manager
        (swtpm, /dev/tpm0) keeps it after we disconnect, and it has few slots."""
        self._transients[handle] = int(esys.tr_get_tpm_handle(handle))
        return handle

    def _flush(self, esys: Any, handle: Any) -> None:
        try:
            esys.flush_context(handle)
        except self._tss.TSS2_Exception:
            return  # flushed from a fresh context in _connect; never hide the real error
        self._transients.pop(handle, None)

    def _flush_leftovers(self) -> None:
        # After a failed command (a forged answer, say) ESAPI's context may
        # refuse everything, flushes included: free the slots from a new one.
        tss = self._tss
        leftovers, self._transients = list(self._transients.values()), {}
        try:
            with tss.ESAPI(self.tcti) as esys:
                for tpm_handle in leftovers:
                    try:
                        esys.flush_context(esys.tr_from_tpmpublic(tpm_handle))
                    except tss.TSS2_Exception:
                        pass
        except tss.TSS2_Exception:
            pass  # best effort: the TPM is gone, nothing to free

    def _lookup(self, esys: Any) -> Any | None:
        """The ESYS handle of the index, or None if the TPM has no such index."""
        tss = self._tss
        try:
            handle = esys.tr_from_tpmpublic(self.index)
        except tss.TSS2_Exception as exc:
            if self._tpm_code(exc) == tss.TPM2_RC.HANDLE:
                if not self.create:
                    raise RollbackError(
                        f"NV index {self.index:#x} does not exist on the TPM at {self.tcti!r}: "
                        "the counter this job used was deleted (a possible rollback) or this "
                        "is another TPM; only a new job may create it again"
                    ) from exc
                return None
            raise self._error(exc, "look up the counter's NV index") from exc
        esys.tr_set_auth(handle, self._auth)
        return handle

    def _define(self, esys: Any) -> Any:
        """Define the counter index under the owner hierarchy; returns its handle."""
        tss = self._tss
        attrs = (
            (tss.TPM2_NT.COUNTER << tss.TPMA_NV.TPM2_NT_SHIFT)
            | tss.TPMA_NV.AUTHREAD
            | tss.TPMA_NV.AUTHWRITE
            | tss.TPMA_NV.NO_DA
        )
        public = tss.TPM2B_NV_PUBLIC(
            nvPublic=tss.TPMS_NV_PUBLIC(
                nvIndex=self.index,
                nameAlg=tss.TPM2_ALG.SHA256,
                attributes=attrs,
                authPolicy=b"",
                dataSize=COUNTER_SIZE,
            )
        )
        # The index's auth value is the first command parameter: send it
        # encrypted, in a session salted with a key the TPM creates in the
        # null hierarchy, so a host that records the TPM traffic never sees it.
        with self._translate("create a salting key in the TPM"):
            template = tss.TPM2B_PUBLIC.parse(
                "ecc256:aes128cfb",
                objectAttributes=tss.TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS,
            )
            salt_key = self._track(
                esys,
                esys.create_primary(
                    tss.TPM2B_SENSITIVE_CREATE(), template, primary_handle=tss.ESYS_TR.NULL
                )[0],
            )
        try:
            with self._translate("start a salted TPM session"):
                session = self._track(
                    esys,
                    esys.start_auth_session(
                        tpm_key=salt_key,
                        bind=tss.ESYS_TR.NONE,
                        session_type=tss.TPM2_SE.HMAC,
                        symmetric=self._aes_cfb(),
                        auth_hash=tss.TPM2_ALG.SHA256,
                    ),
                )
            try:
                esys.trsess_set_attributes(
                    session, tss.TPMA_SESSION.CONTINUESESSION | tss.TPMA_SESSION.DECRYPT
                )
                esys.tr_set_auth(tss.ESYS_TR.OWNER, self._owner_auth)
                try:
                    handle = esys.nv_define_space(self._auth, public, session2=session)
                except tss.TSS2_Exception as exc:
                    if self._tpm_code(exc) == tss.TPM2_RC.NV_DEFINED:
                        # Another process defined it between our lookup and now.
                        handle = self._lookup(esys)
                        if handle is not None:
                            return handle
                    if self._tpm_code(exc) in (tss.TPM2_RC.AUTH_FAIL, tss.TPM2_RC.BAD_AUTH):
                        raise ConfigError(
                            f"the TPM at {self.tcti!r} refused the owner hierarchy "
                            "authorization needed to define the counter's NV index; "
                            "pass the owner password (owner_auth)"
                        ) from exc
                    raise self._error(exc, "define the counter's NV index") from exc
            finally:
                self._flush(esys, session)
        finally:
            self._flush(esys, salt_key)
        esys.tr_set_auth(handle, self._auth)
        return handle

    def _read_value(self, esys: Any, handle: Any) -> int:
        session = self._bound_session(esys, handle)
        try:
            if not self._check_public(esys, handle, session):
                return 0  # defined but never incremented: "uninitialized" in TPM terms
            return self._read_written(esys, handle, session)
        finally:
            self._flush(esys, session)

    def _read_written(self, esys: Any, handle: Any, session: Any) -> int:
        tss = self._tss
        esys.trsess_set_attributes(session, tss.TPMA_SESSION.CONTINUESESSION)
        with self._translate("read the counter"):
            data = bytes(esys.nv_read(handle, COUNTER_SIZE, session1=session))
        if len(data) != COUNTER_SIZE:
            raise IntegrityError(
                f"the TPM returned {len(data)} bytes for NV counter {self.index:#x}, "
                f"not {COUNTER_SIZE}"
            )
        return int.from_bytes(data, "big")  # TPM integers are big-endian

    def _bound_session(self, esys: Any, handle: Any) -> Any:
        """An HMAC session bound to the index: its key depends on ``auth``, so
        ESAPI rejects any response the TPM did not compute."""
        tss = self._tss
        with self._translate("start a TPM session"):
            session = esys.start_auth_session(
                tpm_key=tss.ESYS_TR.NONE,
                bind=handle,
                session_type=tss.TPM2_SE.HMAC,
                symmetric=tss.TPMT_SYM_DEF(algorithm=tss.TPM2_ALG.NULL),
                auth_hash=tss.TPM2_ALG.SHA256,
            )
        return self._track(esys, session)

    def _check_public(self, esys: Any, handle: Any, session: Any) -> bool:
        """Check the index is a plinius counter; returns whether it was written.

        Read in an audit session so that the answer is HMAC-checked too.
        """
        tss = self._tss
        esys.trsess_set_attributes(
            session, tss.TPMA_SESSION.CONTINUESESSION | tss.TPMA_SESSION.AUDIT
        )
        with self._translate("read the counter's NV index"):
            public = esys.nv_read_public(handle, session1=session)[0].nvPublic
        attrs = int(public.attributes)
        kind = (attrs & int(tss.TPMA_NV.TPM2_NT_MASK)) >> int(tss.TPMA_NV.TPM2_NT_SHIFT)
        wanted = int(tss.TPMA_NV.AUTHREAD | tss.TPMA_NV.AUTHWRITE)
        if (
            kind != int(tss.TPM2_NT.COUNTER)
            or int(public.dataSize) != COUNTER_SIZE
            or attrs & wanted != wanted
            or attrs & int(tss.TPMA_NV.ORDERLY)
        ):
            raise ConfigError(
                f"NV index {self.index:#x} on the TPM at {self.tcti!r} exists but is not a "
                f"plinius counter (type {kind}, attributes {attrs:#x}); choose another "
                "index, or remove this one with 'tpm2_nvundefine' if it is truly unused"
            )
        return bool(attrs & int(tss.TPMA_NV.WRITTEN))

    def _aes_cfb(self) -> Any:
        tss = self._tss
        return tss.TPMT_SYM_DEF(
            algorithm=tss.TPM2_ALG.AES,
            keyBits=tss.TPMU_SYM_KEY_BITS(aes=128),
            mode=tss.TPMU_SYM_MODE(aes=tss.TPM2_ALG.CFB),
        )

    # -- errors ---------------------------------------------------------------

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._tss.TSS2_Exception as exc:
            raise self._error(exc, what) from exc

    def _tpm_code(self, exc: Any) -> int | None:
        """The TPM's own response code (handle/parameter numbers stripped), if any."""
        tss = self._tss
        layer = int(exc.rc) & int(tss.TSS2_RC.RC_LAYER_MASK)
        if layer in (0, int(tss.TSS2_RC.RESMGR_TPM_RC_LAYER)):
            return int(exc.error)
        return None

    def _tcti_error(self, exc: Any, what: str) -> PliniusError:
        tss = self._tss
        base = int(exc.rc) & 0xFFFF
        if base in (int(tss.TSS2_RC.BASE_RC_IO_ERROR), int(tss.TSS2_RC.BASE_RC_NO_CONNECTION)):
            return ConfigError(
                f"cannot {what}: no TPM answers at TCTI {self.tcti!r} ({exc}); check that "
                "the TPM or swtpm is running and that you may open the device "
                "(for /dev/tpmrm0: the 'tss' group)"
            )
        return ConfigError(
            f"cannot {what}: TCTI {self.tcti!r} is not usable ({exc}); use "
            "'device:/dev/tpmrm0' or 'swtpm:host=127.0.0.1,port=2321'"
        )

    def _error(self, exc: Any, what: str) -> PliniusError:
        tss = self._tss
        code = self._tpm_code(exc)
        where = f"NV counter {self.index:#x} on the TPM at {self.tcti!r}"
        base = int(exc.rc) & 0xFFFF
        if code is None and base == int(tss.TSS2_RC.BASE_RC_RSP_AUTH_FAILED):
            return IntegrityError(
                f"cannot {what}: the answer for {where} failed its HMAC check; something "
                "between plinius and the TPM forged or altered it. Do not trust this host"
            )
        if code is None and base in (
            int(tss.TSS2_RC.BASE_RC_IO_ERROR),
            int(tss.TSS2_RC.BASE_RC_NO_CONNECTION),
        ):
            return self._tcti_error(exc, what)
        if code in (int(tss.TPM2_RC.AUTH_FAIL), int(tss.TPM2_RC.BAD_AUTH)):
            return IntegrityError(
                f"cannot {what}: the TPM refused the authorization value of {where}; it was "
                "defined under another key, or deleted and re-created by someone else. A new "
                "job needs another index"
            )
        if code == int(tss.TPM2_RC.LOCKOUT):
            return ConfigError(
                f"cannot {what}: the TPM at {self.tcti!r} is in dictionary-attack lockout; "
                "wait, or have its owner reset the lockout"
            )
        if code in (int(tss.TPM2_RC.NV_RATE), int(tss.TPM2_RC.NV_UNAVAILABLE)):
            return StorageError(
                f"cannot {what}: the TPM is rate-limiting NV writes ({exc}); advance the "
                "counter less often (raise K or T) and retry"
            )
        if code == int(tss.TPM2_RC.NV_SPACE):
            return StorageError(
                f"cannot {what}: the TPM has no room for another NV index; remove an "
                "unused one with 'tpm2_nvundefine'"
            )
        return StorageError(f"cannot {what}: the TPM refused for {where}: {exc}")

    def __repr__(self) -> str:
        return f"TPMCounter({self.tcti!r}, index={self.index:#x})"
