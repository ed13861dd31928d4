"""The bench report's wording rules, fed synthetic results (no benchmark runs here)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from plinius.bench.report import (
    estimated_split,
    pct_of_raw,
    spread_pct,
    target_verdict,
    write_markdown,
    write_plots,
)


def _method(save: list[float], restore: list[float], **phases: Any) -> dict[str, Any]:
    import statistics

    return {
        "save_s": statistics.median(save),
        "restore_s": statistics.median(restore),
        "save_runs_s": save,
        "restore_runs_s": restore,
        **phases,
    }


def _results() -> dict[str, Any]:
    ckpt_phases = {
        "save_phases_s": {"serialize": 0.1, "encrypt": 0.1, "write": 0.6},
        "restore_phases_s": {"read": 0.2, "decrypt": 0.1, "deserialize": 0.1, "apply": 0.0},
    }
    methods = {
        # plinius 20 ms, raw AES-GCM 22 ms: 110% of raw; rounds spread ±10% + ±9%.
        "plinius": _method(
            [0.018, 0.022],
            [0.018, 0.022],
            save_phases_s={"encrypt": 0.020, "write": 0.0},
            restore_phases_s={"read": 0.0, "decrypt": 0.020},
        ),
        "ssd_encrypted": _method([0.8, 0.8], [0.4, 0.4], **ckpt_phases),
        "ssd_encrypted_cold": _method([0.8, 0.8], [0.6, 0.6], **ckpt_phases),
        "torch_save": _method([0.2, 0.2], [0.1, 0.1]),
        "dcp": _method([0.4, 0.4], [0.2, 0.2]),
        "aesgcm_raw": _method([0.020, 0.024], [0.020, 0.024]),
    }
    meths = list(methods)
    size = {
        "size": "100",
        "state_mb": 200.0,
        "methods": methods,
        "time_vs_plinius": {m: {"save": 1.0, "restore": 1.0} for m in meths if m != "plinius"},
        "throughput_gb_s": {m: {"save": 10.0, "restore": 10.0} for m in meths},
        "plinius_pct_of_raw_aesgcm": {"save": 110.0, "restore": 110.0},
    }
    steps = {
        "none": [0.200, 0.200, 0.201, 0.199],
        "sync": [0.212, 0.212, 0.213, 0.211],
        "async": [0.205, 0.205, 0.206, 0.204],
    }
    return {
        "meta": {
            "command": "plinius bench --quick",
            "quick": True,
            "started": "2026-01-01T00:00:00+00:00",
            "wall_s": 90.0,
            "sections": ["latency", "overhead", "sealed", "recovery", "memory"],
            "machine": {
                "cpu": "test CPU",
                "cpu_count": 2,
                "aes_ni": "yes",
                "mem_total_bytes": 8e9,
                "mem_available_bytes_at_start": 4e9,
                "load_average_at_start": [1.0, 1.0, 1.0],
                "kernel": "6",
                "python": "3.11",
                "torch": "2",
                "torch_threads": 2,
                "openmp": {},
                "numpy": "2",
                "cryptography": "44",
                "pm_dir": "/dev/shm",
                "pm_kind": "tmpfs",
                "disk_dir": "/tmp",
                "disk_kind": "ext4",
                "disk_device": "/dev/vda1",
            },
            "pm_is_dax": False,
            "mirror_is_pmem": False,
            "storage_notes": ["a note"],
            "skipped": [],
            "notes": [],
        },
        "latency": {
            "repeats": 2,
            "methods": meths,
            "sizes": [size],
            "skipped": [],
            "method_notes": {"plinius": "the mirror"},
        },
        "overhead": {
            "model": "cnn-10mb",
            "batch": 128,
            "param_bytes": 10e6,
            "state_bytes": 20e6,
            "rounds": 2,
            "steps_per_round": 3,
            "iteration_s": {"none": 0.200, "sync": 0.2122, "async": 0.2052},
            "iteration_runs_s": steps,
            "overhead_pct": {"sync": 6.1, "async": 2.6},
            "save_in_iteration_s": 0.0122,
            "async_hidden_fraction": -0.03,
            "target": "mirroring every iteration adds at most 5%",
            "target_pct": 5.0,
        },
        "sealed": {
            "model": "cnn-10mb",
            "batch": 128,
            "records": 10000,
            "iteration_s": {"plain": 0.2, "sealed": 0.21},
            "fetch_s": {"plain": 0.001, "sealed": 0.002},
            "iteration_runs_s": {"plain": [0.2, 0.2], "sealed": [0.21, 0.21]},
            "overhead_pct": 5.0,
            "paper_overhead_pct": 20.0,
            "target": "at most 5% slower per iteration than plain memory",
            "target_pct": 5.0,
            "throughput": {
                "dataset_bytes": 8e6,
                "chunks": 31,
                "chunk_records": 330,
                "sealed_gb_s": 1.4,
                "raw_gb_s": 7.4,
                "sealed_pct_of_raw": 19.0,
            },
        },
        "recovery": {
            "model": "cnn-10mb",
            "batch": 8,
            "steps": 20,
            "crashes": 1,
            "runs": 2,
            "finished": True,
            "mirror_file_bytes": 40e6,
            "resumes": [
                {
                    "resumed_from": 7,
                    "interpreter": 0.1,
                    "imports": 1.4,
                    "key": 0.001,
                    "build": 1.6,
                    "open": 0.03,
                    "restore": 0.02,
                    "first_step": 0.1,
                    "total": 3.3,
                }
            ],
            "median_s": {
                "interpreter": 0.1,
                "imports": 1.4,
                "key": 0.001,
                "build": 1.6,
                "open": 0.03,
                "restore": 0.02,
                "first_step": 0.1,
                "total": 3.3,
            },
            "phases": ["interpreter", "imports", "key", "build", "open", "restore", "first_step"],
        },
        "memory": {
            "size": "10",
            "state_bytes": 20e6,
            "method": "VmHWM",
            "peak_extra_bytes": {"plinius_save": 0, "plinius_restore": 2e6, "torch_load": 20e6},
            "peak_extra_pct_of_state": {
                "plinius_save": 0.0,
                "plinius_restore": 10.0,
                "torch_load": 100.0,
            },
            "target": "a save or restore needs at most 5% of the state extra",
            "target_pct": 5.0,
        },
    }


def _md(tmp_path: Path, results: dict[str, Any]) -> str:
    return write_markdown(results, tmp_path).read_text(encoding="utf-8")


def test_targets_are_stated_and_misses_flagged(tmp_path: Path) -> None:
    md = _md(tmp_path, _results())
    assert "(issue" not in md
    assert "Target: mirroring every iteration adds at most 5%." in md
    assert "**missed: +6.1% > 5%**" in md  # synchronous
    assert "met: +2.6% ≤ 5%" in md  # asynchronous
    assert "Target: at most 5% slower per iteration than plain memory: met: +5.0% ≤ 5%." in md
    # memory: plinius' own operations are judged, the peers only compared
    assert "| plinius_save | 0.0 | 0% | met: +0.0% ≤ 5% |" in md
    assert "| plinius_restore | 2.0 | 10% | **missed: +10.0% > 5%** |" in md
    assert "| torch_load | 20.0 | 100% | - (for comparison) |" in md


def test_over_100_percent_of_raw_and_clamped_phases_say_noise(tmp_path: Path) -> None:
    md = _md(tmp_path, _results())
    assert "110% (≈100%: within the ±19% spread)" in md
    assert "100% / 0% (clamped: raw AES-GCM alone took at least as long; noise ±19%)" in md
    assert "0% / 100% (clamped: raw AES-GCM alone took at least as long; noise ±19%)" in md
    assert "% of raw above 100% is noise" in md


def test_negative_hidden_share_is_clamped_with_the_spread(tmp_path: Path) -> None:
    md = _md(tmp_path, _results())
    assert "hidden by the asynchronous save: 0% (measured -3%, within noise: " in md
    assert "-3%." not in md
    r = _results()
    r["overhead"]["save_in_iteration_s"] = -0.0338
    needle = "ms (below zero, so noise: a mirror cannot make a step faster; steps spread ±"
    assert needle in _md(tmp_path, r)


def test_a_busy_machine_is_said(tmp_path: Path) -> None:
    assert "The machine was busy" not in _md(tmp_path, _results())
    r = _results()
    r["meta"]["machine"]["load_average_at_start"] = [6.5, 4.8, 2.9]
    assert "**The machine was busy**: load average 6.5 on 2 logical CPUs" in _md(tmp_path, r)


def test_one_recovery_run_has_no_median(tmp_path: Path) -> None:
    md = _md(tmp_path, _results())
    assert "in ms (1 run: no median):" in md
    assert "| median" not in md
    r = _results()
    two = copy.deepcopy(r["recovery"]["resumes"][0])
    r["recovery"]["resumes"].append(two)
    md = _md(tmp_path, r)
    assert "| median of 2 runs |" in md
    assert "no median" not in md


def test_spread_and_verdict_rules() -> None:
    assert spread_pct([1.0, 1.0]) == 0.0
    assert spread_pct([0.9, 1.1], [2.0]) == pytest.approx(10.0)  # one sample adds nothing
    assert spread_pct([1.0]) != spread_pct([1.0])  # NaN: unknown
    assert pct_of_raw(95.0, 1.0) == "95%"
    assert pct_of_raw(130.0, 5.0).startswith("130% (over 100%, beyond the ±5% spread")
    assert target_verdict(6.1, 5.0) == "**missed: +6.1% > 5%**"
    assert target_verdict(5.5, 5.0, 1.0).endswith("(within the ±1% spread of the iterations)")
    assert target_verdict(float("nan"), 5.0) == "not measured"
    assert estimated_split({"encrypt": 0.9, "write": 0.1}, "encrypt", "write", 2.0) == "90% / 10%"
    assert estimated_split({"encrypt": 0.97, "write": 0.03}, "encrypt", "write", 5.0) == (
        "97% / 3% (within the ±5% spread)"
    )


def test_plots_label_zero_memory_and_one_recovery_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    texts: dict[str, list[str]] = {}
    real_savefig = plt.Figure.savefig

    def spy(fig: Any, path: Any, *a: Any, **kw: Any) -> None:
        texts[Path(path).name] = [t.get_text() for t in fig.findobj(plt.Text)]
        real_savefig(fig, path, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", spy)
        write_plots(_results(), tmp_path)
    assert "0 MB" in texts["memory.png"] and "2.0 MB" in texts["memory.png"]
    rec = texts["recovery.png"]
    assert not any("median" in t for t in rec)
    assert any("1 run)" in t for t in rec)
    lat = texts["latency.png"]  # the cold-cache series only in the restore legend
    assert sum("cold page cache" in t for t in lat) == 1
