"""The key-release protocol: message formats, report-data binding, key wrapping, signatures.

One release, in order::

    client                                        key server
      POST /v1/nonce                    ->
                                        <-  {"nonce": N}          (one-time, expires)
      ephemeral X25519 key pair (c, C)
      report_data = SHA-512(binding(N, C, job_id))
      evidence over report_data
      POST /v1/release {job_id, N, C, evidence} ->
                                            nonce N fresh, unused, unexpired (then spent)
                                            evidence verified, allowed by the policy
                                            report data == binding(N, C, job_id)
                                            ephemeral (s, S); k = HKDF(X25519(s, C))
                                            W = AES-256-GCM_k(master; AAD = job_id, N)
                                        <-  {payload, signature}  (Ed25519 identity key)
      signature by the configured server key? payload names our job, N and C?
      master = open W with k = HKDF(X25519(c, S))

Binding the client's public key into the evidence means only the code that
produced the evidence holds ``c``, so only it can open ``W``; binding the nonce
makes old evidence useless; binding the job id stops a key released for one job
from being presented as released for another. The response is signed over its
exact bytes (canonical JSON, domain-separated), so nothing in it can be changed,
and a client configured with the server's public key cannot be talked into
using a key from anyone else (a fake server could hand out a key of its choice
and read everything encrypted under it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .._fsutil import create_secret_file
from .._hexutil import hex_exact
from ..crypto import KEY_SIZE, MasterKey, aad
from ..errors import ConfigError, KeyFileError, KeyReleaseError
from ._wire import MAX_MESSAGE_BYTES, decode_hex

__all__ = [
    "MAX_MESSAGE_BYTES",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "RELEASE_DOMAIN",
    "canonical_json",
    "check_job_id",
    "load_identity",
    "open_release_response",
    "open_signed_json",
    "parse_server_public_key",
    "public_key_hex",
    "report_data_binding",
    "seal_release_response",
    "sign_json",
    "unwrap_master_key",
    "wrap_master_key",
]

PROTOCOL_VERSION = 1
NONCE_SIZE = 32
PUBLIC_KEY_SIZE = 32
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
RELEASE_DOMAIN = b"plinius/v1/key-release-response\0"


def check_job_id(job_id: object) -> str:
    """Check a job id: 1-128 characters of letters, digits and ``._:@-``.

    Args:
        job_id: the value to check (any type).

    Returns:
        ``job_id``, unchanged.

    Raises:
        ConfigError: it is not such a string.
    """
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ConfigError(
            "a job id is 1 to 128 characters: letters, digits and . _ : @ - "
            "(starting with a letter or digit)"
        )
    return job_id


def canonical_json(obj: dict[str, Any]) -> bytes:
    """Deterministic JSON, the bytes that get signed: sorted keys, no spaces, ASCII only.

    Args:
        obj: a JSON object.

    Returns:
        Its canonical encoding.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def report_data_binding(nonce: bytes, client_public_key: bytes, job_id: str) -> bytes:
    """The 64 bytes of report data that bind a release request (SHA-512, domain-separated).

    Args:
        nonce: the server's one-time nonce.
        client_public_key: the client's ephemeral X25519 public key.
        job_id: the job the key is asked for.

    Returns:
        SHA-512 over the three, typed and length-prefixed.
    """
    return hashlib.sha512(
        aad("plinius/v1/key-release/report-data", nonce, client_public_key, job_id)
    ).digest()


def _wrap_key(
    shared: bytes, nonce: bytes, job_id: str, client_pub: bytes, server_pub: bytes
) -> bytes:
    if shared == bytes(len(shared)):
        # A low-order public key forces an all-zero secret that anyone knows.
        raise KeyReleaseError("the X25519 exchange produced an all-zero secret")
    info = aad("plinius/v1/key-release/wrap", job_id, client_pub, server_pub)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=nonce, info=info).derive(shared)


def _wrap_aad(job_id: str, nonce: bytes) -> bytes:
    return aad("plinius/v1/key-release/wrapped-key", job_id, nonce)


def wrap_master_key(
    master: MasterKey, client_public_key: bytes, *, job_id: str, nonce: bytes
) -> dict[str, str]:
    """Encrypt ``master`` to ``client_public_key`` (X25519, HKDF-SHA256, AES-256-GCM).

    Args:
        master: the key to release.
        client_public_key: the client's 32-byte X25519 public key (bound in its evidence).
        job_id: the job, bound into the key derivation and the AAD.
        nonce: the request's nonce, the HKDF salt.

    Returns:
        The hex fields ``server_ephemeral_public_key``, ``wrap_nonce`` and
        ``wrapped_key`` for the response payload.

    Raises:
        KeyReleaseError: ``client_public_key`` is not a usable X25519 key
            (including low-order points, which would give an all-zero secret).
    """
    try:
        client = X25519PublicKey.from_public_bytes(client_public_key)
    except ValueError as exc:
        raise KeyReleaseError("the client public key is not an X25519 key") from exc
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes_raw()
    try:
        shared = eph.exchange(client)
    except ValueError as exc:  # OpenSSL refuses some degenerate points itself
        raise KeyReleaseError("the client public key is not usable for X25519") from exc
    key = _wrap_key(shared, nonce, job_id, client_public_key, eph_pub)
    iv = os.urandom(12)
    wrapped = AESGCM(key).encrypt(iv, master.raw_bytes(), _wrap_aad(job_id, nonce))
    return {
        "server_ephemeral_public_key": eph_pub.hex(),
        "wrap_nonce": iv.hex(),
        "wrapped_key": wrapped.hex(),
    }


def unwrap_master_key(
    client_private_key: X25519PrivateKey, fields: dict[str, Any], *, job_id: str, nonce: bytes
) -> MasterKey:
    """Open the wrapped key in a (verified) response payload.

    Args:
        client_private_key: the ephemeral key whose public half was sent.
        fields: the payload, with the fields :func:`wrap_master_key` made.
        job_id: the job asked for.
        nonce: the request's nonce.

    Returns:
        The master key.

    Raises:
        KeyReleaseError: a field is not exact hex of its size, the server's
            ephemeral key is unusable, or the wrapped key fails authentication.
    """

    def field(name: str, size: int) -> bytes:
        return decode_hex(fields.get(name), size, name=name, error=KeyReleaseError, prefix="field ")

    eph_pub = field("server_ephemeral_public_key", PUBLIC_KEY_SIZE)
    iv = field("wrap_nonce", 12)
    wrapped = field("wrapped_key", KEY_SIZE + 16)
    client_pub = client_private_key.public_key().public_bytes_raw()
    try:
        shared = client_private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError as exc:
        raise KeyReleaseError("the server's ephemeral key is not usable for X25519") from exc
    key = _wrap_key(shared, nonce, job_id, client_pub, eph_pub)
    try:
        raw = AESGCM(key).decrypt(iv, wrapped, _wrap_aad(job_id, nonce))
    except InvalidTag as exc:
        raise KeyReleaseError("the wrapped master key failed authentication") from exc
    return MasterKey(raw)


def sign_json(
    identity: Ed25519PrivateKey, payload: dict[str, Any], domain: bytes
) -> dict[str, str]:
    """A signed message: canonical payload bytes and an Ed25519 signature over ``domain + bytes``.

    Args:
        identity: the server's signing key.
        payload: the JSON object to sign.
        domain: separates message types, so a signature made for one kind of
            message (a key release, a counter value) is never valid as another.

    Returns:
        ``{"payload": base64 of the canonical bytes, "signature": hex}``.
    """
    data = canonical_json(payload)
    return {
        "payload": base64.b64encode(data).decode("ascii"),
        "signature": identity.sign(domain + data).hex(),
    }


def open_signed_json(
    server_key: Ed25519PublicKey, body: object, domain: bytes, what: str = "response"
) -> dict[str, Any]:
    """Verify a :func:`sign_json` message with ``server_key``; return its payload.

    The signature is checked over the exact payload bytes received, before
    anything in them is parsed or believed.

    Args:
        server_key: the configured server public key.
        body: the message as received.
        domain: the domain it must be signed in.
        what: names the message in errors.

    Returns:
        The payload, a JSON object.

    Raises:
        KeyReleaseError: not a signed message, a bad signature (tampered with,
            another server, another domain), or a payload that is not a JSON object.
    """
    if not isinstance(body, dict) or set(body) != {"payload", "signature"}:
        raise KeyReleaseError(f"the key server's {what} is not a signed message")
    payload_b64, sig_hex = body["payload"], body["signature"]
    if not isinstance(payload_b64, str) or not isinstance(sig_hex, str) or len(sig_hex) != 128:
        raise KeyReleaseError(f"the key server's {what} has a malformed payload or signature")
    try:
        data = base64.b64decode(payload_b64, validate=True)
        sig = hex_exact(sig_hex, 64)
    except (binascii.Error, ValueError) as exc:
        raise KeyReleaseError(
            f"the key server's {what} has a malformed payload or signature"
        ) from exc
    try:
        server_key.verify(sig, domain + data)
    except InvalidSignature as exc:
        raise KeyReleaseError(
            f"the key server's {what} is not signed by the configured key server public key: "
            "it was tampered with, or another server answered"
        ) from exc
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit int
        raise KeyReleaseError("the signed payload is not JSON") from exc
    if not isinstance(payload, dict):
        raise KeyReleaseError("the signed payload is not a JSON object")
    return payload


def seal_release_response(identity: Ed25519PrivateKey, payload: dict[str, Any]) -> dict[str, str]:
    """The body of a key-release response (:func:`sign_json` in the release domain).

    Args:
        identity: the server's signing key.
        payload: the release payload.

    Returns:
        The signed message.
    """
    return sign_json(identity, payload, RELEASE_DOMAIN)


def open_release_response(server_key: Ed25519PublicKey, body: object) -> dict[str, Any]:
    """Verify a key-release response with ``server_key``.

    Args:
        server_key: the configured server public key.
        body: the response as received.

    Returns:
        The payload.

    Raises:
        KeyReleaseError: see :func:`open_signed_json`.
    """
    return open_signed_json(server_key, body, RELEASE_DOMAIN, "release response")


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte Ed25519 public key, in hex (what clients are configured with).

    Args:
        key: the identity, or its public half.

    Returns:
        64 hex digits.
    """
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes_raw().hex()


def parse_server_public_key(text: str) -> Ed25519PublicKey:
    """A key server public key given as 64 hex digits (as printed by ``plinius keyserver``).

    Args:
        text: the hex digits; whitespace around them (a pasted line) is ignored,
            inside them it is not.

    Returns:
        The public key.

    Raises:
        ConfigError: ``text`` is not 64 hex digits of an Ed25519 key.
    """
    text = text.strip()  # surrounding whitespace only: a line copied from a terminal
    try:
        return Ed25519PublicKey.from_public_bytes(hex_exact(text, PUBLIC_KEY_SIZE))
    except ValueError as exc:
        raise ConfigError(
            "a key server public key is 64 hex digits (the 'public key:' line that "
            "'plinius keyserver' prints)"
        ) from exc


def load_identity(path: str | os.PathLike[str], *, create: bool = True) -> Ed25519PrivateKey:
    """The key server's Ed25519 identity key from ``path`` (PEM, PKCS#8).

    Args:
        path: the identity file.
        create: make a new identity (mode 0600) when ``path`` is missing.

    Returns:
        The identity key.

    Raises:
        KeyFileError: missing (and not ``create``), unreadable, not a regular
            file, readable or writable by group or others, or not a PEM Ed25519 key.
        StorageError: a new identity cannot be written.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang the open
    except FileNotFoundError:
        if not create:
            raise KeyFileError(f"identity key {p} does not exist") from None
        return _create_identity(p)
    except OSError as exc:
        raise KeyFileError(f"cannot open identity key {p}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"identity key {p} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"identity key {p} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run 'chmod 600 {p}'"
            )
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"identity key {p} is not a PEM Ed25519 private key (is it the master key file?)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"identity key {p} is not an Ed25519 key")
    return key


def _create_identity(p: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    create_secret_file(p, pem, what="identity key")
    return key
