"""Shared by the CLI tests: a key file and a small sealed dataset, as a job starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plinius.crypto import MasterKey
from plinius.data import seal_dataset


def sealed_job(directory: Path, records: int = 300) -> dict[str, Path]:
    """A key file and a sealed 8x8 image dataset (two classes) in ``directory``.

    Args:
        directory: where the files go (a test's ``shm_dir``).
        records: how many records to seal.

    Returns:
        ``key``, ``data``, ``mirror`` (not created yet) and ``dir``.
    """
    key_path = directory / "k.key"
    key = MasterKey.generate()
    key.save(key_path)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(records, 8, 8), dtype=np.uint8)
    y = (x[:, :4, :].mean(axis=(1, 2)) > 127).astype(np.int64)
    data = directory / "d.pld"
    seal_dataset(data, key, {"image": x, "label": y})
    return {"key": key_path, "data": data, "mirror": directory / "m.plm", "dir": directory}
