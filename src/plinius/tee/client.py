"""Obtaining the master key inside the TEE: unseal it locally, or ask the key server.

::

    from plinius.tee import obtain_master_key

    key, how = obtain_master_key(
        "http://keys.example:8470", "5c1f...e2",  # the server's 'public key:' line
        job_id="mnist-7", sealed_key_path="/data/job.sealed",
    )
    # how == "released" the first time (then sealed), "unsealed" afterwards

The client trusts a response only if it is signed by the configured server
public key and names this job, this nonce and this client's ephemeral key; in a
TEE deployment the URL and public key belong in the measured configuration.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..crypto import MasterKey
from ..errors import ConfigError, KeyReleaseError
from .evidence import collect_evidence
from .platform import Platform, detect_platform
from .protocol import (
    MAX_MESSAGE_BYTES,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    check_job_id,
    open_release_response,
    parse_server_public_key,
    report_data_binding,
    unwrap_master_key,
)
from .sealing import seal_master_key, unseal_master_key

__all__ = ["obtain_master_key", "request_master_key"]


def obtain_master_key(
    server_url: str,
    server_pubkey_hex: str,
    *,
    job_id: str,
    sealed_key_path: str | os.PathLike[str] | None,
    platform: Platform | None = None,
    timeout: float = 10.0,
    tls_cafile: str | os.PathLike[str] | None = None,
) -> tuple[MasterKey, str]:
    """The master key for ``job_id`` and how it was obtained (``"unsealed"`` or ``"released"``).

    If ``sealed_key_path`` exists it is unsealed locally, with no network. Otherwise
    the key server at ``server_url`` is asked (see :func:`request_master_key`) and,
    where the platform can seal, the key is sealed to ``sealed_key_path`` for the
    next start. On a confidential VM, which has no sealing key, the server is
    asked on every start.
    """
    job_id = check_job_id(job_id)
    platform = platform or detect_platform()
    if sealed_key_path is not None and Path(sealed_key_path).exists():
        return unseal_master_key(platform, sealed_key_path, job_id=job_id), "unsealed"
    key = request_master_key(
        server_url,
        server_pubkey_hex,
        job_id=job_id,
        platform=platform,
        timeout=timeout,
        tls_cafile=tls_cafile,
    )
    if sealed_key_path is not None and platform.can_seal:
        seal_master_key(platform, sealed_key_path, key, job_id=job_id)
    return key, "released"


def request_master_key(
    server_url: str,
    server_pubkey_hex: str,
    *,
    job_id: str,
    platform: Platform,
    timeout: float = 10.0,
    tls_cafile: str | os.PathLike[str] | None = None,
) -> MasterKey:
    """Run the key-release protocol once (see :mod:`plinius.tee.protocol`)."""
    server_key = parse_server_public_key(server_pubkey_hex)
    job_id = check_job_id(job_id)
    base = _base_url(server_url)
    http = _Http(timeout, tls_cafile)

    status, body = http.post(f"{base}/v1/nonce", b"{}")
    if status != 200:
        raise _refused(base, status, body)
    nonce = _hex(body, "nonce", NONCE_SIZE)

    # A fresh key pair per request: the private half never leaves this process.
    client_key = X25519PrivateKey.generate()
    client_pub = client_key.public_key().public_bytes_raw()
    evidence = collect_evidence(platform, report_data_binding(nonce, client_pub, job_id))
    request = {
        "version": PROTOCOL_VERSION,
        "job_id": job_id,
        "nonce": nonce.hex(),
        "client_public_key": client_pub.hex(),
        "evidence": evidence.to_json(),
    }
    status, body = http.post(f"{base}/v1/release", json.dumps(request).encode())
    if status != 200:
        raise _refused(base, status, body)

    payload = open_release_response(server_key, body)
    expected = {
        "type": "key-release",
        "version": PROTOCOL_VERSION,
        "job_id": job_id,
        "nonce": nonce.hex(),
        "client_public_key": client_pub.hex(),
    }
    for name, value in expected.items():
        if payload.get(name) != value:
            raise KeyReleaseError(
                f"the signed response does not match this request ({name}); refusing it"
            )
    key = unwrap_master_key(client_key, payload, job_id=job_id, nonce=nonce)
    if payload.get("key_fingerprint") != key.fingerprint.hex():
        raise KeyReleaseError("the released key does not match the fingerprint the server signed")
    return key


def _base_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:  # e.g. "http://[::1" (an unclosed IPv6 address)
        raise ConfigError(
            f"key server URL {url!r} is malformed ({exc}); use http://HOST:PORT or https://HOST:PORT"
        ) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"key server URL {url!r} must be http://HOST:PORT or https://HOST:PORT")
    if parts.query or parts.fragment:
        raise ConfigError(f"key server URL {url!r} must not have a query or fragment")
    return url.rstrip("/")


def _hex(body: dict[str, Any], name: str, size: int) -> bytes:
    value = body.get(name)
    if not isinstance(value, str) or len(value) != 2 * size:
        raise KeyReleaseError(f"the key server sent no valid {name}")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise KeyReleaseError(f"the key server sent no valid {name}") from exc


def _refused(base: str, status: int, body: dict[str, Any]) -> KeyReleaseError:
    reason = body.get("reason")
    code = body.get("error")
    if isinstance(reason, str) and isinstance(code, str):
        return KeyReleaseError(f"key server {base} refused ({status} {code[:40]}): {reason[:500]}")
    return KeyReleaseError(f"key server {base} answered HTTP {status} without a reason")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A key server never redirects; following one would send evidence elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Http:
    def __init__(self, timeout: float, cafile: str | os.PathLike[str] | None) -> None:
        self.timeout = timeout
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS CA file {cafile}: {exc}") from exc
        self.opener = urllib.request.build_opener(
            _NoRedirect(), urllib.request.HTTPSHandler(context=context)
        )

    def post(self, url: str, data: bytes) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            try:
                with self.opener.open(req, timeout=self.timeout) as resp:
                    status, raw = resp.status, resp.read(MAX_MESSAGE_BYTES + 1)
            except urllib.error.HTTPError as exc:
                status, raw = exc.code, exc.read(MAX_MESSAGE_BYTES + 1)
                exc.close()
        except urllib.error.URLError as exc:
            raise KeyReleaseError(
                f"cannot reach the key server at {url}: {exc.reason}; "
                "check the URL and that the server is running"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise KeyReleaseError(
                f"the connection to the key server at {url} failed: {exc}"
            ) from exc
        if len(raw) > MAX_MESSAGE_BYTES:
            raise KeyReleaseError(
                f"the key server's answer is larger than {MAX_MESSAGE_BYTES} bytes"
            )
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit int
            raise KeyReleaseError(
                f"the key server at {url} did not answer JSON (HTTP {status})"
            ) from exc
        if not isinstance(body, dict):
            raise KeyReleaseError(f"the key server at {url} did not answer a JSON object")
        return status, body
