"""The key server's per-job freshness counter, as a :class:`~plinius.counters.Counter`.

::

    from plinius import Mirror
    from plinius.counters import KeyServerCounter
    from plinius.tee import obtain_master_key

    key, _ = obtain_master_key(url, pubkey_hex, job_id="mnist-7", sealed_key_path=...)
    counter = KeyServerCounter(url, pubkey_hex, job_id="mnist-7", key=key)
    with Mirror("/mnt/pmem/mnist-7.plm", key, counter=counter) as mirror:
        ...

Every request is authenticated with a key derived from the master key, and
every answer must be signed by the configured server key over this job, this
operation and a fresh random nonce (protocol: :mod:`plinius.tee.counter_service`).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import urllib.error
from typing import Any

from ..crypto import MasterKey
from ..errors import ConfigError, KeyReleaseError, RollbackError
from ..tee._wire import Http, base_url, refused
from ..tee.counter_service import (
    COUNTER_DOMAIN,
    MAX_COUNTER_VALUE,
    counter_auth_key,
    counter_request,
)
from ..tee.protocol import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    check_job_id,
    open_signed_json,
    parse_server_public_key,
)

__all__ = ["KeyServerCounter"]

# A lost response is retried this many times, with the same request: an
# advance that already happened is not repeated (see plinius.tee.counter_service).
_RETRIES = 1
_TRANSPORT = (urllib.error.URLError, OSError, http.client.HTTPException)


class KeyServerCounter:
    """The freshness counter of ``job_id`` kept by the key server at ``server_url``.

    The server must run with ``--counter-dir``. It does not wear, and the host
    cannot rewind it. :meth:`increment` advances to one more than the last
    value this object saw (reading first if it saw none) in one request, so a
    retry after a lost response never advances twice; it returns the server's
    value, which is more than expected only if someone else advanced the
    counter (the mirror then refuses: two jobs share a counter).

    Args:
        server_url: ``http(s)://HOST:PORT`` of the key server.
        server_pubkey_hex: the server's identity ('public key:' line of
            ``plinius keyserver``), 64 hex digits.
        job_id: the job whose counter this is.
        key: the job's master key; the request-authentication key is derived from it.
        timeout: seconds per HTTP request.
        tls_cafile: a CA bundle for an https server (None: the system's).

    Raises:
        ConfigError: a malformed URL, public key, job id, key or timeout.

    Every method raises :class:`~plinius.errors.KeyReleaseError` when the
    server is unreachable, refuses, or answers anything not signed for this
    request, and :class:`~plinius.errors.RollbackError` when the counter goes
    backwards.
    """

    wears = False
    trusted = True

    def __init__(
        self,
        server_url: str,
        server_pubkey_hex: str,
        *,
        job_id: str,
        key: MasterKey,
        timeout: float = 10.0,
        tls_cafile: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(key, MasterKey):
            raise ConfigError("key must be a plinius MasterKey (the job's master key)")
        if not (timeout > 0):
            raise ConfigError("timeout must be a positive number of seconds")
        self._server_key = parse_server_public_key(server_pubkey_hex)
        self.job_id = check_job_id(job_id)
        self.url = base_url(server_url)
        self._auth = counter_auth_key(key, self.job_id)
        self._http = Http(timeout, tls_cafile)
        self._last: int | None = None  # the highest value a signed answer has shown
        self._lock = threading.Lock()

    def read(self) -> int:
        """The counter's value, read from the server.

        Returns:
            The value; 0 for a job that never advanced.

        Raises:
            KeyReleaseError: see the class.
            RollbackError: the value is below one the server signed before.
        """
        with self._lock:
            return self._call("read", None)

    def increment(self) -> int:
        """Advance to one more than the last value seen, in one request.

        Returns:
            The server's new value.

        Raises:
            KeyReleaseError: see the class.
            RollbackError: the server's counter is below a value it signed before.
        """
        with self._lock:
            last = self._last if self._last is not None else self._call("read", None)
            return self._call("advance", last + 1)

    def advance_to(self, target: int) -> int:
        """Set the counter to ``target`` if it is at ``target - 1``.

        At ``target`` or beyond: unchanged (a repeated advance is harmless).

        Args:
            target: the value to advance to, from 1 to ``MAX_COUNTER_VALUE``.

        Returns:
            The server's value afterwards (at least ``target``).

        Raises:
            ConfigError: ``target`` is not an integer in range.
            KeyReleaseError: the counter is below ``target - 1`` (refused by the
                server), or see the class.
            RollbackError: the value is below one the server signed before.
        """
        if type(target) is not int or not 1 <= target <= MAX_COUNTER_VALUE:
            raise ConfigError(f"a counter target is an integer from 1 to {MAX_COUNTER_VALUE}")
        with self._lock:
            return self._call("advance", target)

    def _call(self, op: str, target: int | None) -> int:
        nonce = os.urandom(NONCE_SIZE)
        body = counter_request(self._auth, job_id=self.job_id, op=op, nonce=nonce, target=target)
        data = json.dumps(body).encode()
        attempt = 0
        while True:
            try:
                status, answer = self._post(data)
                break
            except KeyReleaseError as exc:
                # Only a lost connection is retried, never a refusal or a bad answer.
                if attempt >= _RETRIES or not isinstance(exc.__cause__, _TRANSPORT):
                    raise
                attempt += 1
        if status != 200:
            # A gap below a value the server itself signed: its counter went back.
            gap = answer.get("error") == "counter_gap"
            if gap and self._last is not None and target == self._last + 1:
                raise RollbackError(
                    f"the key server's counter for job {self.job_id} is below the value "
                    f"{self._last} it signed earlier: it was reset or rolled back on the "
                    f"server. Stop and ask the data owner to check the counter service "
                    f"({str(answer.get('reason'))[:300]})"
                )
            raise refused(self.url, status, answer)
        return self._check(answer, op, nonce, target)

    def _post(self, data: bytes) -> tuple[int, dict[str, Any]]:
        return self._http.post(f"{self.url}/v1/counter", data)

    def _check(self, answer: dict[str, Any], op: str, nonce: bytes, target: int | None) -> int:
        payload = open_signed_json(self._server_key, answer, COUNTER_DOMAIN, "counter response")
        expected = {
            "type": "counter",
            "version": PROTOCOL_VERSION,
            "job_id": self.job_id,
            "op": op,
            "nonce": nonce.hex(),
            "target": target,
        }
        if set(payload) != {*expected, "value", "advanced"}:
            raise KeyReleaseError("the signed counter response has unexpected fields; refusing it")
        for name, want in expected.items():
            if payload[name] != want or type(payload[name]) is not type(want):
                raise KeyReleaseError(
                    f"the signed counter response does not answer this request ({name}): "
                    "a replayed or redirected response; refusing it"
                )
        value = payload["value"]
        if type(value) is not int or not 0 <= value <= MAX_COUNTER_VALUE:
            raise KeyReleaseError("the signed counter response holds no valid counter value")
        if type(payload["advanced"]) is not bool:
            raise KeyReleaseError("the signed counter response is malformed (advanced)")
        if target is not None and value < target:
            raise KeyReleaseError(
                f"the key server answered {value} to an advance to {target}; refusing it"
            )
        if self._last is not None and value < self._last:
            raise RollbackError(
                f"the key server's counter for job {self.job_id} went back from {self._last} "
                f"to {value}: it was reset or rolled back on the server. Stop and ask the data "
                "owner to check the counter service"
            )
        self._last = value
        return value

    def __repr__(self) -> str:
        return f"KeyServerCounter({self.url!r}, job_id={self.job_id!r})"
