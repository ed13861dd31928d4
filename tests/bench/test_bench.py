"""``plinius bench``: the smallest configuration end to end, the report's shape, bad input.

No test here asserts a timing: only that every section runs, that the report
has the expected structure, and that nothing is left in the PM and disk dirs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from plinius.bench import BenchConfig, SizeSpec, parse_sizes, run_bench
from plinius.bench.recovery import PHASES, phase_breakdown, split_runs
from plinius.errors import ConfigError
from tests.conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny(out: Path, pm: Path, disk: Path) -> BenchConfig:
    cfg = BenchConfig.preset(True, out=out, pm_dir=pm, disk_dir=disk, command="test")
    cfg.sizes = (SizeSpec(1.0, "sgd"),)
    cfg.repeats = 1
    cfg.overhead_model = "cnn-tiny"
    cfg.overhead_batch = 16
    cfg.overhead_steps = 2
    cfg.overhead_rounds = 1
    cfg.sealed_records = 512
    cfg.sealed_steps = 2
    cfg.sealed_rounds = 1
    cfg.recovery_model = "cnn-tiny"
    cfg.recovery_crashes = 1
    cfg.recovery_steps = 150
    cfg.recovery_batch = 8
    cfg.recovery_window_s = (0.02, 0.08)
    cfg.memory_mb = 1.0
    cfg.dcp_sizes = (SizeSpec(1.0, "sgd"),)
    cfg.threads = 1
    # ddp: tests/bench/test_multiproc.py; replicas: tests/bench/test_replicas.py
    cfg.sections = tuple(s for s in cfg.sections if s not in ("ddp", "replicas"))
    return cfg


def test_smallest_configuration_end_to_end(tmp_path: Path, shm_dir: Path) -> None:
    out, disk = tmp_path / "out", tmp_path / "disk"
    disk.mkdir()
    results = run_bench(_tiny(out, shm_dir, disk), progress=False)

    # Nothing left behind in the PM and disk directories.
    assert list(shm_dir.iterdir()) == []
    assert list(disk.iterdir()) == []

    data = json.loads((out / "results.json").read_text())
    assert set(data) >= {
        "meta",
        "latency",
        "overhead",
        "sealed",
        "recovery",
        "memory",
        "dcp",
        "plots",
    }
    meta = data["meta"]
    assert meta["sections"] == ["latency", "overhead", "sealed", "recovery", "memory", "dcp"]
    assert meta["machine"]["pm_dir"] == str(shm_dir)
    assert meta["machine"]["disk_dir"] == str(disk)
    assert isinstance(meta["pm_is_dax"], bool)
    assert any("emulated" in n or "DAX" in n for n in meta["storage_notes"])

    lat = data["latency"]
    assert [s["size"] for s in lat["sizes"]] == ["1"] and lat["skipped"] == []
    size = lat["sizes"][0]
    assert set(size["methods"]) == {
        "plinius",
        "ssd_encrypted",
        "ssd_encrypted_cold",
        "torch_save",
        "dcp",
        "aesgcm_raw",
    }
    p = size["methods"]["plinius"]
    assert set(p["save_phases_s"]) == {"encrypt", "write"}
    assert set(p["restore_phases_s"]) == {"read", "decrypt"}
    assert len(p["save_runs_s"]) == 1 and p["save_s"] > 0 and p["restore_s"] > 0
    assert set(size["methods"]["ssd_encrypted"]["save_phases_s"]) == {
        "serialize",
        "encrypt",
        "write",
    }
    assert set(size["time_vs_plinius"]) == {
        "ssd_encrypted",
        "ssd_encrypted_cold",
        "torch_save",
        "dcp",
        "aesgcm_raw",
    }
    # The state really is the model and its optimizer: about 2x the parameters.
    assert size["state_bytes"] > 1.5 * size["param_mb"] * 1e6
    assert size["mirror_tensor_bytes"] >= size["state_bytes"]

    o = data["overhead"]
    assert set(o["iteration_s"]) == {"none", "sync", "async"}
    assert all(len(v) == 2 for v in o["iteration_runs_s"].values())
    s = data["sealed"]
    assert set(s["iteration_s"]) == {"plain", "sealed"}
    assert s["throughput"]["dataset_bytes"] == 512 * (28 * 28 + 8)

    r = data["recovery"]
    assert r["finished"] is True and r["runs"] == r["crashes"] + 1
    for row in r["resumes"]:
        assert set(row) >= set(PHASES) | {"total"}
        assert row["total"] >= row["restore"] >= 0

    m = data["memory"]
    assert set(m["peak_extra_bytes"]) == {
        "plinius_save",
        "plinius_restore",
        "torch_save",
        "torch_load",
        "ssd_encrypted_save",
        "ssd_encrypted_load",
    }
    assert all(v >= 0 for v in m["peak_extra_bytes"].values())

    (row,) = data["dcp"]["sizes"]
    assert row["size"] == "1" and row["state_bytes"] >= 1_000_000
    assert set(row["save_s"]) == set(row["load_s"]) == {"plain", "plinius"}
    assert row["ratio"]["save"] > 0 and row["ratio"]["load"] > 0

    md = (out / "results.md").read_text()
    for heading in (
        "## Machine",
        "## 1. Save and restore latency",
        "Table I",
        "## 2. Mirroring overhead",
        "## 3. Sealed-data overhead",
        "## 4. Recovery after SIGKILL",
        "## 5. Peak extra memory",
        "## 7. torch.distributed.checkpoint",
    ):
        assert heading in md
    assert str(shm_dir) in md and str(disk) in md

    assert {Path(x).name for x in data["plots"]} >= {
        "latency.png",
        "phases.png",
        "iteration.png",
        "memory.png",
    }
    for x in data["plots"]:
        assert Path(x).read_bytes()[:8] == PNG_MAGIC
        assert f"]({Path(x).name})" in md
    assert results["files"]["json"] == str(out / "results.json")


def test_sizes_too_big_for_memory_are_skipped_and_said(tmp_path: Path, shm_dir: Path) -> None:
    cfg = _tiny(tmp_path / "out", shm_dir, tmp_path)
    cfg.sections = ("latency",)
    cfg.sizes = (SizeSpec(90_000.0, "adam"),)
    cfg.plots = False
    data = run_bench(cfg, progress=False)
    assert data["latency"]["sizes"] == []
    (skip,) = data["latency"]["skipped"]
    assert skip["size"] == "90000:adam" and "memory" in skip["reason"]
    assert "skipped" in (tmp_path / "out" / "results.md").read_text()


def test_parse_sizes() -> None:
    assert parse_sizes("10, 22,300:adam") == (
        SizeSpec(10.0, "sgd"),
        SizeSpec(22.0, "sgd"),
        SizeSpec(300.0, "adam"),
    )
    assert parse_sizes("0.5:SGD")[0].label == "0.5"
    assert SizeSpec(300.0, "adam").param_mb == pytest.approx(100.0)
    for bad in ("", "ten", "10:rmsprop", "-1", "0", "1e9"):
        with pytest.raises(ConfigError):
            parse_sizes(bad)


def test_recovery_breakdown_from_events() -> None:
    events = [
        {"event": "start", "t": 100.0, "process_age_s": 0.5},
        {"event": "resumed", "t": 101.0, "step": None, "key_s": 0.01, "build_s": 0.1,
         "open_s": 0.02, "recovery_s": 0.0},
        {"event": "step", "t": 101.2, "step": 1, "loss": 2.3},
        {"event": "start", "t": 200.0, "process_age_s": 0.4},
        {"event": "resumed", "t": 201.0, "step": 7, "key_s": 0.01, "build_s": 0.1,
         "open_s": 0.02, "recovery_s": 0.05},
        {"event": "step", "t": 201.25, "step": 8, "loss": 2.0},
    ]  # fmt: skip
    runs = split_runs(events)
    assert [len(r) for r in runs] == [3, 3]
    assert phase_breakdown(runs[0]) is None  # a fresh start is not a recovery
    b = phase_breakdown(runs[1])
    assert b is not None
    assert b["resumed_from"] == 7
    assert b["interpreter"] == pytest.approx(0.4)
    assert b["imports"] == pytest.approx(1.0 - 0.01 - 0.1 - 0.02 - 0.05)
    assert b["first_step"] == pytest.approx(0.25)
    assert b["total"] == pytest.approx(0.4 + 1.25)
    assert sum(b[p] for p in PHASES) == pytest.approx(b["total"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--pm-dir", "/nonexistent/pm"], "--pm-dir"),
        (["--disk-dir", "/nonexistent/disk"], "--disk-dir"),
        (["--only", "latency,bogus"], "bogus"),
        (["--sizes", "ten"], "--sizes"),
        (["--sizes", "10:rmsprop"], "rmsprop"),
    ],
)
def test_cli_bad_input(tmp_path: Path, args: list[str], needle: str) -> None:
    res = run_cli("bench", "--out", str(tmp_path / "o"), *args)
    assert res.exit_code == 1
    assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o" / "results.json").exists()


def test_cli_help_names_every_option() -> None:
    res = run_cli("bench", "--help")
    assert res.exit_code == 0
    for opt in ("--quick", "--out", "--pm-dir", "--disk-dir", "--sizes", "--only"):
        assert opt in res.output


def test_cli_runs_only_the_sections_and_sizes_asked(tmp_path: Path, shm_dir: Path) -> None:
    out = tmp_path / "o"
    res = run_cli("bench", "--only", "latency", "--sizes", "2:adam", "--repeats", "1", "--no-plots",
         "--out", str(out), "--pm-dir", str(shm_dir), "--disk-dir", str(tmp_path),
         "--threads", "1", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "results.md" in res.output
    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"meta", "latency", "plots", "files"}
    assert data["meta"]["command"].startswith("plinius bench")
    size = data["latency"]["sizes"][0]
    assert size["size"] == "2:adam" and size["optimizer"] == "adam"
    # Adam keeps two moments: about 3x the parameters.
    assert size["state_bytes"] > 2.5 * size["param_mb"] * 1e6
    assert not list(out.glob("*.png"))
    assert list(shm_dir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_cli_without_matplotlib_skips_the_plots_and_says_how(
    tmp_path: Path, shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bare `pip install plinius` has no matplotlib (the `plots` extra).
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "o"
    res = run_cli("bench", "--only", "latency", "--sizes", "2", "--repeats", "1",
         "--out", str(out), "--pm-dir", str(shm_dir), "--disk-dir", str(tmp_path),
         "--threads", "1", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "plots skipped: matplotlib is not installed (pip install 'plinius[plots]')" in (
        res.output.splitlines()
    )
    assert (out / "results.md").exists()
    assert json.loads((out / "results.json").read_text())["plots"] == []
    assert not list(out.glob("*.png"))


def test_write_plots_without_matplotlib_draws_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plinius.bench.report import plots_available, write_plots

    assert plots_available()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not plots_available()
    assert write_plots({"meta": {}}, tmp_path) == []
    assert list(tmp_path.iterdir()) == []
