"""What the key server and its clients share on the wire, below every other tee module.

* :class:`Refusal`: a request the server refuses (HTTP status, code, reason);
* :func:`decode_hex`: the one decoder of hex fields, strict (see
  :mod:`plinius._hexutil`), raising whatever error its caller's endpoint uses;
* the client side of HTTP: :func:`base_url`, :class:`Http` (bounded answers,
  no redirects) and :func:`refused`.

This module imports no other tee module, so :mod:`.protocol`, the server, the
client and :mod:`plinius.counters.keyserver` can all import it. Its names have
no underscore because they are shared by the package; the module itself is
private (not part of plinius' public API).
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .._hexutil import hex_exact
from ..errors import ConfigError, KeyReleaseError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "Http",
    "Refusal",
    "bad_request",
    "base_url",
    "decode_hex",
    "refused",
]

# Requests and responses are small (a quote with certificates is ~5 KiB).
MAX_MESSAGE_BYTES = 64 * 1024


class Refusal(Exception):
    """A request the server refuses: HTTP status, a short code and a reason for the client.

    Not a :class:`~plinius.errors.PliniusError`: it never leaves the server,
    which turns it into the ``{"error": code, "reason": reason}`` answer.

    Args:
        status: the HTTP status of the answer (4xx, or 5xx for the server's own failures).
        code: a short machine-readable code, e.g. ``"bad_request"``.
        reason: what went wrong and what to do, for the client.
    """

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


def bad_request(reason: str) -> Refusal:
    """A 400 ``bad_request`` :class:`Refusal` (an ``error`` for :func:`decode_hex`).

    Args:
        reason: what is wrong with the request.

    Returns:
        The refusal to raise.
    """
    return Refusal(400, "bad_request", reason)


def decode_hex(
    value: object,
    size: int,
    *,
    name: str,
    error: Callable[[str], Exception],
    prefix: str = "",
) -> bytes:
    """Decode the hex field ``name`` of a message: exactly ``2 * size`` hex digits.

    Whitespace, signs and ``0x`` are refused: ``bytes.fromhex`` would skip
    whitespace, so a padded value would decode to something other than what
    its length promises.

    Args:
        value: the field as received (any JSON value).
        size: the number of bytes it must encode.
        name: the field's name, for the message.
        error: builds the exception to raise from a message, e.g.
            :func:`bad_request`.
        prefix: put before ``name`` in the message (e.g. ``"evidence field "``).

    Returns:
        The ``size`` decoded bytes.

    Raises:
        Exception: ``error("<prefix><name> must be <size> bytes in hex")`` for a
            value that is not a string of ``2 * size`` characters,
            ``error("<prefix><name> is not valid hex")`` for one that is but
            holds anything but hex digits.
    """
    if not isinstance(value, str) or len(value) != 2 * size:
        raise error(f"{prefix}{name} must be {size} bytes in hex")
    try:
        return hex_exact(value, size)
    except ValueError as exc:
        raise error(f"{prefix}{name} is not valid hex") from exc


def base_url(url: str) -> str:
    """The key server URL ``url`` without a trailing slash, once checked.

    Args:
        url: ``http://HOST:PORT`` or ``https://HOST:PORT`` (a path is kept).

    Returns:
        ``url`` without trailing slashes.

    Raises:
        ConfigError: ``url`` is malformed, not http(s), has no host, or has a
            query or fragment.
    """
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


def refused(base: str, status: int, body: dict[str, Any]) -> KeyReleaseError:
    """The error for a non-200 answer of the key server at ``base``.

    Args:
        base: the server's URL (from :func:`base_url`), for the message.
        status: the HTTP status it answered.
        body: its JSON answer; ``error`` and ``reason`` are quoted, shortened.

    Returns:
        The :class:`~plinius.errors.KeyReleaseError` to raise.
    """
    reason = body.get("reason")
    code = body.get("error")
    if isinstance(reason, str) and isinstance(code, str):
        return KeyReleaseError(f"key server {base} refused ({status} {code[:40]}): {reason[:500]}")
    return KeyReleaseError(f"key server {base} answered HTTP {status} without a reason")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A key server never redirects; following one would send evidence elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Http:
    """POSTs JSON to a key server: no redirects, answers of at most ``MAX_MESSAGE_BYTES``.

    Args:
        timeout: seconds for connecting and for each read.
        cafile: a CA bundle for https (None: the system's).

    Raises:
        ConfigError: the CA file cannot be loaded.
    """

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
        """POST ``data`` (JSON) to ``url``.

        Args:
            url: the endpoint.
            data: the request body.

        Returns:
            The HTTP status and the JSON object answered (also for 4xx/5xx).

        Raises:
            KeyReleaseError: the server is unreachable or the connection fails
                (the transport error is the ``__cause__``, so callers can tell
                a lost connection from a bad answer), or the answer is too
                large, not JSON, or not a JSON object.
        """
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
