"""User-given hex outside the tee wire: a dataset id (see tests/tee/test_wire.py)."""

from __future__ import annotations

import pytest

from plinius.data._format import ID_SIZE, normalize_id
from plinius.errors import ConfigError


def test_a_dataset_id_is_hex_digits_only() -> None:
    good = "aB" * ID_SIZE
    assert normalize_id(good) == bytes.fromhex(good)
    assert normalize_id(f"  {good}\n") == bytes.fromhex(good)  # a pasted line, as before
    assert normalize_id(None) is None
    # Before: whitespace inside was skipped, so these were the same id.
    for bad in ("ab " * ID_SIZE, good[:4] + " " + good[4:], "0x" + good[2:]):
        with pytest.raises(ConfigError, match="hex digits"):
            normalize_id(bad)
