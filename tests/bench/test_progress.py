"""``plinius bench`` progress outside a terminal, and the quick preset's configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from plinius.bench import QUICK_SIZES, BenchConfig, SizeSpec
from plinius.bench._common import Progress
from tests.conftest import run_cli


def test_plain_progress_lines_at_most_every_interval() -> None:
    now = [0.0]
    lines: list[str] = []
    bars = Progress("plain", interval_s=5.0, clock=lambda: now[0], write=lines.append)
    with bars, bars.section("latency", 4) as advance:
        for what in ("10 MB warm-up", "10 MB round 1", "10 MB round 2", "100 MB warm-up"):
            now[0] += 3.0
            advance(what)
    assert lines == [
        "bench latency 0/4  started  0 s",
        "bench latency 2/4  10 MB round 1  6 s",
        "bench latency 4/4  100 MB warm-up  12 s",
        "bench latency 4/4  done  12 s",
    ]


def test_plain_progress_heartbeat_while_one_step_is_long() -> None:
    import threading

    lines: list[str] = []
    got = threading.Event()

    def write(line: str) -> None:
        lines.append(line)
        if len(lines) >= 2:
            got.set()

    bars = Progress("plain", interval_s=0.01, write=write)
    with bars, bars.section("recovery", 2):
        assert got.wait(10.0)  # the heartbeat repeats the state while no step ends
    assert lines[0] == "bench recovery 0/2  started  0 s"
    assert lines[1].startswith("bench recovery 0/2  started  ")
    assert lines[-1].startswith("bench recovery 2/2  done  ")


def test_disabled_progress_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(False) as bars, bars.section("memory", 1) as advance:
        advance("22 MB")
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("flag", "expected"), [((), "plain"), (("--no-progress",), False), (("--progress",), True)]
)
def test_cli_progress_outside_a_terminal_is_plain_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: tuple[str, ...], expected: object
) -> None:
    import plinius.bench

    seen: list[object] = []

    def fake_run_bench(cfg: BenchConfig, *, progress: bool | str = True) -> dict[str, Any]:
        seen.append(progress)
        return {"files": {"markdown": "r.md", "json": "r.json"}, "plots": [],
                "meta": {"skipped": []}}  # fmt: skip

    monkeypatch.setattr(plinius.bench, "run_bench", fake_run_bench)
    r = run_cli("bench", "--quick", "--out", tmp_path / "o", "--disk-dir", tmp_path, *flag)
    assert r.exit_code == 0, r.output
    assert seen == [expected]


def test_quick_preset_configuration(tmp_path: Path) -> None:
    cfg = BenchConfig.preset(True, out=tmp_path, pm_dir=tmp_path, disk_dir=tmp_path)
    full = BenchConfig.preset(False, out=tmp_path, pm_dir=tmp_path, disk_dir=tmp_path)
    assert cfg.quick and not full.quick
    # Every section stays in the quick run, with less work in each.
    assert cfg.sections == full.sections
    assert cfg.sizes == QUICK_SIZES == (
        SizeSpec(5.0, "sgd"), SizeSpec(25.0, "sgd"), SizeSpec(300.0, "adam"),
    )  # fmt: skip
    assert [round(s.approx_state_bytes / 1e6) for s in cfg.sizes] == [10, 50, 300]
    assert (cfg.repeats, full.repeats) == (2, 5)
    assert cfg.overhead_model == full.overhead_model  # the target is about this model
    assert (cfg.overhead_steps, cfg.overhead_rounds) == (3, 2)
    assert (cfg.sealed_records, cfg.sealed_steps, cfg.sealed_rounds) == (10_000, 4, 2)
    assert (cfg.recovery_model, cfg.recovery_crashes, cfg.recovery_steps) == ("cnn-10mb", 1, 40)
    assert cfg.memory_mb == 10.0
