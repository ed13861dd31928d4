"""Strict hex decoding: exactly ``2 * size`` hex digits, nothing else.

``bytes.fromhex`` skips whitespace (``bytes.fromhex(" 00 11")`` is two bytes),
so checking a string's length and then calling it does not pin the value down:
a padded string of the right length decodes to fewer bytes, or to the same
bytes as another string. Every hex value plinius reads from outside (the wire,
a user-given id or key) goes through :func:`hex_exact` instead.
"""

from __future__ import annotations

import re

__all__ = ["hex_exact"]

_HEX_DIGITS = re.compile(r"[0-9A-Fa-f]*")


def hex_exact(text: str, size: int) -> bytes:
    """Decode ``text`` if it is exactly ``2 * size`` hex digits.

    Args:
        text: the hex string; upper and lower case digits are both accepted.
        size: the number of bytes it must encode.

    Returns:
        The ``size`` decoded bytes.

    Raises:
        ValueError: ``text`` has another length, or anything but hex digits
            (whitespace, a sign, a ``0x`` prefix).
    """
    if len(text) != 2 * size or not _HEX_DIGITS.fullmatch(text):
        raise ValueError(f"not {size} bytes as {2 * size} hex digits")
    return bytes.fromhex(text)
