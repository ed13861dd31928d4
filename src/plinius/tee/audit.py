"""The key server's audit log: one JSON line per release or refusal, never the key."""

from __future__ import annotations

import json
import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import storage_error

__all__ = ["AuditLog"]


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

    def write(self, event: dict[str, Any]) -> None:
        """Append one event, durably; raises StorageError when it cannot."""
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **event}
        line = (json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n").encode()
        with self._lock:
            if self._fd is None:
                sys.stderr.write(line.decode())
                sys.stderr.flush()
                return
            try:
                os.write(self._fd, line)
                os.fsync(self._fd)
            except OSError as exc:
                raise storage_error(exc, f"cannot write audit log {self.path}") from exc

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
