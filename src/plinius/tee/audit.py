"""The key server's audit log: one JSON line per release or refusal, never the key.

Lines are JSON with ``ensure_ascii``: whatever a client sent cannot break a line or
forge another. What a client chooses (a path, a method) goes in through :func:`clip`,
so no client can make a line large.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import storage_error

__all__ = ["MAX_FIELD", "AuditLog", "clip"]

# The most characters of a client-chosen value (a path, a method) in an audit line.
MAX_FIELD = 200


def clip(value: str | bytes, limit: int = MAX_FIELD) -> str:
    """A client-chosen value made fit for an audit line: text, at most ``limit`` characters.

    Bytes are decoded as ASCII, anything else escaped (``\\xff``); a longer value is cut
    and ends in ``...``. JSON escapes the rest (control characters, quotes).

    Args:
        value: what the client sent.
        limit: the most characters kept.

    Returns:
        At most ``limit + 3`` characters.
    """
    text = value.decode("ascii", "backslashreplace") if isinstance(value, bytes) else value
    return text if len(text) <= limit else text[:limit] + "..."


class AuditLog:
    """Append-only JSON lines, one per release or refusal (stderr when no path)."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._fd: int | None = None
        if self.path is not None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as exc:
                raise storage_error(exc, f"cannot open audit log {self.path}") from exc

    def write(self, event: dict[str, Any], *, sync: bool = True) -> None:
        """Append one event; raises StorageError when it cannot.

        Args:
            event: the fields of the line (``time`` is added).
            sync: fsync the line before returning (releases and counter advances
                must be durable before they happen). The HTTP layer's refusals are
                written without, so that a flood of them cannot stall the server on
                the disk.
        """
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **event}
        line = (json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n").encode()
        with self._lock:
            if self._fd is None:
                sys.stderr.write(line.decode())
                sys.stderr.flush()
                return
            try:
                os.write(self._fd, line)
                if sync:
                    os.fsync(self._fd)
            except OSError as exc:
                raise storage_error(exc, f"cannot write audit log {self.path}") from exc

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
