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

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..crypto import MasterKey
from ..errors import KeyReleaseError
from ._wire import Http, base_url, decode_hex, refused
from .evidence import collect_evidence
from .platform import Platform, detect_platform
from .protocol import (
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
    """The master key for ``job_id``: unsealed locally, or released by the key server.

    If ``sealed_key_path`` exists it is unsealed locally, with no network. Otherwise
    the key server at ``server_url`` is asked (see :func:`request_master_key`) and,
    where the platform can seal, the key is sealed to ``sealed_key_path`` for the
    next start. On a confidential VM, which has no sealing key, the server is
    asked on every start.

    Args:
        server_url: ``http(s)://HOST:PORT`` of the key server.
        server_pubkey_hex: the server's identity (its 'public key:' line), 64 hex digits.
        job_id: the job, 1-128 characters of letters, digits and ``._:@-``.
        sealed_key_path: where the sealed key is kept (None: never sealed).
        platform: the TEE platform (None: detected).
        timeout: seconds per HTTP request.
        tls_cafile: a CA bundle for an https server (None: the system's).

    Returns:
        The key and ``"unsealed"`` or ``"released"``.

    Raises:
        ConfigError: a malformed URL, public key or job id.
        KeyReleaseError: the server is unreachable, refuses, or answers
            anything not signed for this request.
        AttestationError: no evidence can be collected on this platform.
        SealingError: the sealed key cannot be unsealed or written.
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
    """Run the key-release protocol once (see :mod:`plinius.tee.protocol`); no sealing.

    Args:
        server_url: ``http(s)://HOST:PORT`` of the key server.
        server_pubkey_hex: the server's identity, 64 hex digits.
        job_id: the job the key is for.
        platform: the TEE platform whose evidence is sent.
        timeout: seconds per HTTP request.
        tls_cafile: a CA bundle for an https server (None: the system's).

    Returns:
        The released master key.

    Raises:
        ConfigError: a malformed URL, public key or job id.
        KeyReleaseError: the server is unreachable, refuses, or answers
            anything not signed by ``server_pubkey_hex`` for this request.
        AttestationError: no evidence can be collected on this platform.
    """
    server_key = parse_server_public_key(server_pubkey_hex)
    job_id = check_job_id(job_id)
    base = base_url(server_url)
    http = Http(timeout, tls_cafile)

    status, body = http.post(f"{base}/v1/nonce", b"{}")
    if status != 200:
        raise refused(base, status, body)
    nonce = decode_hex(
        body.get("nonce"),
        NONCE_SIZE,
        name="nonce",
        error=lambda _: KeyReleaseError("the key server sent no valid nonce"),
    )

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
        raise refused(base, status, body)

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
