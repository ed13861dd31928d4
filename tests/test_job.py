"""plinius.job: the pieces of a training job, called as the demo and library users call them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from plinius.counters import FileCounter, KeyServerCounter
from plinius.crypto import MasterKey
from plinius.data import SealedDataset, seal_dataset
from plinius.errors import ConfigError, KeyFileError, PliniusError
from plinius.job import (
    EventLog,
    build_job,
    label_classes,
    load_key,
    make_counter,
    process_age_s,
)


@pytest.fixture
def key() -> MasterKey:
    return MasterKey.generate()


def _seal(path: Path, key: MasterKey, labels: np.ndarray, dtype: type = np.uint8) -> Path:
    n = len(labels)
    images = np.arange(n * 16, dtype=np.uint8).reshape(n, 4, 4).astype(dtype)
    seal_dataset(path, key, {"image": images, "label": labels})
    return path


# --------------------------------------------------------------------------- load_key


def test_load_key_from_a_file(tmp_path: Path, key: MasterKey) -> None:
    key.save(tmp_path / "k.key")
    loaded, how = load_key(tmp_path / "k.key", None, None, None, "job")
    assert loaded.fingerprint == key.fingerprint
    assert how == "key file (no attestation)"


@pytest.mark.parametrize(
    ("key_path", "server", "pubkey", "needle"),
    [
        ("k.key", "http://127.0.0.1:1", "ab", "either --key or --key-server"),
        (None, None, None, "a key is needed"),
        (None, "http://127.0.0.1:1", None, "--key-server-pubkey"),
        (None, "http://127.0.0.1:1", "", "--key-server-pubkey"),
    ],
)
def test_load_key_refuses_contradicting_or_missing_sources(
    tmp_path: Path, key_path: str | None, server: str | None, pubkey: str | None, needle: str
) -> None:
    path = tmp_path / key_path if key_path else None
    with pytest.raises(ConfigError, match=needle):
        load_key(path, server, pubkey, None, "job")


def test_load_key_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="keygen"):
        load_key(tmp_path / "absent.key", None, None, None, "job")


# --------------------------------------------------------------------------- make_counter


def test_make_counter_none_and_file(tmp_path: Path, key: MasterKey) -> None:
    assert make_counter(None, key, None, None, "job") == (None, 1)
    counter, every = make_counter(f"file:{tmp_path / 'c'}", key, None, None, "job")
    assert isinstance(counter, FileCounter) and every == 1
    assert counter.path == tmp_path / "c"


def test_make_counter_keyserver(key: MasterKey) -> None:
    counter, every = make_counter("keyserver", key, "http://127.0.0.1:1", "ab" * 32, "job")
    assert isinstance(counter, KeyServerCounter) and every == 1


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("sometimes", "file:PATH, tpm[:TCTI] or keyserver"),
        ("file:", "file:PATH"),
        ("file", "file:PATH"),
        ("keyserver:x", "file:PATH"),
        ("", "file:PATH"),
    ],
)
def test_make_counter_refuses_bad_specs(key: MasterKey, spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        make_counter(spec, key, None, None, "job")


def test_make_counter_keyserver_needs_the_server(key: MasterKey) -> None:
    with pytest.raises(ConfigError, match="--key-server and --key-server-pubkey"):
        make_counter("keyserver", key, None, None, "job")
    with pytest.raises(ConfigError, match="--key-server-pubkey"):
        make_counter("keyserver", key, "http://127.0.0.1:1", None, "job")


# --------------------------------------------------------------------------- classes, model


def test_label_classes_is_the_largest_label_plus_one(shm_dir: Path, key: MasterKey) -> None:
    path = _seal(shm_dir / "d.pld", key, np.array([0, 3, 1, 2, 3], dtype=np.int64))
    with SealedDataset(path, key) as ds:
        assert label_classes(ds) == 4


@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        (np.array([0.0, 1.0], dtype=np.float32), "not integer class labels"),
        (np.array([True, False]), "not integer class labels"),
        (np.array([-1, -2], dtype=np.int64), "record 0 has label -1"),
        (np.array([0, 1, 2, -1, 1], dtype=np.int64), "record 3 has label -1"),
    ],
)
def test_label_classes_refuses_labels_that_are_no_classes(
    shm_dir: Path, key: MasterKey, labels: np.ndarray, needle: str
) -> None:
    path = _seal(shm_dir / "d.pld", key, labels)
    with SealedDataset(path, key) as ds, pytest.raises(ConfigError, match=needle):
        label_classes(ds)


def test_build_job_is_seeded_and_counts_classes(shm_dir: Path, key: MasterKey) -> None:
    path = _seal(shm_dir / "d.pld", key, np.array([0, 1, 2, 1], dtype=np.int64))
    with SealedDataset(path, key) as ds:
        spec, classes = build_job("mlp", ds, None, seed=7)
        again, _ = build_job("mlp", ds, None, seed=7)
        other, more = build_job("mlp", ds, 5, seed=8)
    assert classes == 3 and more == 5
    assert spec.input_shape == (16,)
    for a, b in zip(spec.module.parameters(), again.module.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(spec.module.parameters()), next(other.module.parameters()))


def test_build_job_unknown_model(shm_dir: Path, key: MasterKey) -> None:
    path = _seal(shm_dir / "d.pld", key, np.array([0, 1], dtype=np.int64))
    with SealedDataset(path, key) as ds, pytest.raises(ConfigError, match="unknown model"):
        build_job("resnet-9000", ds, None, seed=0)


# --------------------------------------------------------------------------- events


def test_event_log_appends_flushed_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.write("start", pid=1)
        # Flushed at once: a reader sees it before the log is closed.
        assert json.loads(path.read_text())["event"] == "start"
        log.write("step", step=1, loss=0.5)
    log.close()  # twice is harmless
    log.write("late")  # dropped after close
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["start", "step"]
    assert lines[1]["loss"] == 0.5 and isinstance(lines[1]["t"], float)
    with EventLog(path) as again:  # appends
        again.write("done")
    assert len(path.read_text().splitlines()) == 3


def test_event_log_without_a_path_writes_nothing(tmp_path: Path) -> None:
    log = EventLog(None)
    log.write("start", pid=1)
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_event_log_unopenable_is_a_plinius_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open the events file"):
        EventLog(tmp_path / "missing-dir" / "events.jsonl")
    with pytest.raises(PliniusError):
        EventLog(tmp_path)  # a directory


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="Linux /proc only")
def test_process_age_is_positive_and_small() -> None:
    age = process_age_s()
    assert age is not None and 0.0 <= age < 24 * 3600
