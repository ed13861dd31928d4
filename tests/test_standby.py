"""The warm standby (``plinius.standby``): the supervisor with small fake workers (fast),
then ``plinius train --standby`` killed at every kind of moment (slow), compared bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from plinius import standby
from plinius.bench.crashtest import read_events
from tests.cli.conftest import sealed_job
from tests.conftest import assert_one_line_error, run_cli

# A worker that does not import torch: it passes the gate, logs what it was told,
# then behaves as the file BEHAVE says for the Nth trainer (one word per line).
_FAKE = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from plinius.standby import gate
    d = Path(sys.argv[1])
    turn = gate()
    n = len(list(d.glob("trainer-*")))
    info = {"pid": os.getpid(), "prev": turn and turn.previous_pid, "cause": turn and turn.cause}
    (d / f"trainer-{n}").write_text(json.dumps(info))
    plan = (d / "BEHAVE").read_text().split()
    what = plan[min(n, len(plan) - 1)]
    if what == "ok":
        turn.stepped(); time.sleep(0.3); sys.exit(0)
    if what == "stepkill":
        turn.stepped(); time.sleep(0.3); os.kill(os.getpid(), signal.SIGKILL)
    if what == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if what == "retry":
        sys.exit(75)
    if what == "fatal":
        print("error: a fatal one", file=sys.stderr); sys.exit(1)
    if what == "hang":
        turn.stepped(); time.sleep(60)
    """
)


def _supervise(tmp_path: Path, behave: str, **kw: object) -> tuple[int, list[dict[str, object]]]:
    (tmp_path / "BEHAVE").write_text(behave)
    script = tmp_path / "worker.py"
    script.write_text(_FAKE)
    said: list[str] = []
    code = standby.supervise(
        [sys.executable, str(script), str(tmp_path)],
        events=tmp_path / "ev.jsonl",
        say=said.append,
        spare_delay_s=0.05,
        **kw,  # type: ignore[arg-type]
    )
    runs = [json.loads((tmp_path / f"trainer-{i}").read_text()) for i in range(_count(tmp_path))]
    (tmp_path / "said").write_text("\n".join(said))
    return code, runs


def _count(d: Path) -> int:
    return len(list(d.glob("trainer-*")))


def test_a_spare_takes_over_after_a_kill_and_a_restartable_exit(tmp_path: Path) -> None:
    code, runs = _supervise(tmp_path, "stepkill retry ok")
    assert code == 0
    assert [r["prev"] for r in runs] == [None, runs[0]["pid"], runs[1]["pid"]]
    assert [r["cause"] for r in runs] == [None, "SIGKILL", "exit 75"]
    evs, _ = read_events(tmp_path / "ev.jsonl")
    assert all(e["pid"] == os.getpid() for e in evs)  # the supervisor's own events
    exits = [e["how"] for e in evs if e["event"] == "standby_exit" and e["role"] == "trainer"]
    assert exits == ["SIGKILL", "exit 75", "exit 0"]


def test_a_fatal_error_stops_the_pair_with_the_workers_code(tmp_path: Path) -> None:
    code, runs = _supervise(tmp_path, "fatal")
    assert code == 1 and len(runs) == 1


def test_a_crash_every_restart_meets_stops_after_max_failures(tmp_path: Path) -> None:
    code, runs = _supervise(tmp_path, "crash")
    assert code == 1
    assert len(runs) == standby.MAX_FAILURES
    said = (tmp_path / "said").read_text()
    assert f"failed {standby.MAX_FAILURES} times in a row" in said and "SIGSEGV" in said


def test_a_spare_exits_untouched_when_its_supervisor_dies(tmp_path: Path) -> None:
    # The spare blocks in gate(); its control pipe closing means "stop": exit 0, no turn.
    r, w = os.pipe()
    r2, w2 = os.pipe()
    env = dict(os.environ, **{standby.ENV: f"{r},{w2}"})
    code = "from plinius.standby import gate; gate(); print('TOOK A TURN')"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, pass_fds=(r, w2), stdout=subprocess.PIPE
    )
    try:
        os.close(r)
        os.close(w2)
        assert json.loads(os.read(r2, 4096))["ready"] is True
        os.close(w)  # the supervisor is gone
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and b"TOOK A TURN" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(r2)


def test_sigterm_to_the_supervisor_stops_both(tmp_path: Path) -> None:
    (tmp_path / "BEHAVE").write_text("hang")
    script = tmp_path / "worker.py"
    script.write_text(_FAKE)
    sup = (
        "import sys; from plinius.standby import supervise; "
        f"sys.exit(supervise([sys.executable, {str(script)!r}, {str(tmp_path)!r}], "
        f"events={str(tmp_path / 'ev.jsonl')!r}, spare_delay_s=0.05))"
    )
    proc = subprocess.Popen([sys.executable, "-c", sup], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            evs, _ = read_events(tmp_path / "ev.jsonl")
            if any(e["event"] == "standby_ready" for e in evs):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        worker = json.loads((tmp_path / "trainer-0").read_text())["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)  # reaped by the supervisor: gone
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_exit_code_is_restartable_only_for_a_trainer_and_non_plinius_errors() -> None:
    from plinius.errors import ConfigError

    assert standby.exit_code(MemoryError(), 1) == 1  # not a standby worker
    standby._turn_taken = True
    try:
        assert standby.exit_code(MemoryError(), 1) == standby.RESTARTABLE_EXIT
        assert standby.exit_code(RuntimeError("oom"), 1) == standby.RESTARTABLE_EXIT
        assert standby.exit_code(ConfigError("bad"), 1) == 1
        assert standby.exit_code(KeyboardInterrupt(), 130) == 130
    finally:
        standby._turn_taken = False


def test_memory_of_this_process() -> None:
    mem = standby.memory_of(os.getpid())
    assert mem["rss"] > 0 and 0 < mem["private"] <= mem["rss"]
    assert standby.memory_of(2**22 + 12345) == {}


def test_standby_module_and_cli_load_no_torch() -> None:
    code = (
        "import sys, plinius.standby, plinius.cli, plinius.cli.train; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'loaded'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- bad input


def _train_args(job: dict[str, Path], *extra: str) -> list[str]:
    return [
        "train", "--key", str(job["key"]), "--data", str(job["data"]),
        "--mirror", str(job["mirror"]), "--model", "mlp", "--batch-size", "32",
        "--threads", "1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("var", ["WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"])
def test_standby_under_torchrun_is_refused(shm_dir: Path, var: str) -> None:
    job = sealed_job(shm_dir)
    r = run_cli(*_train_args(job, "--steps", "3", "--standby"), env={var: "2"})
    assert_one_line_error(r, "--standby cannot run under torchrun", var)
    assert not job["mirror"].exists()


def test_crash_test_standby_with_a_trace_is_refused(shm_dir: Path) -> None:
    job = sealed_job(shm_dir)
    r = run_cli("crash-test", "--key", str(job["key"]), "--data", str(job["data"]),
                "--mirror", str(job["mirror"]), "--standby", "--schedule", "trace")  # fmt: skip
    assert_one_line_error(r, "--standby cannot follow a price trace", code=2)


def test_python_m_standby_without_a_command_is_a_usage_error() -> None:
    assert standby.main([]) == 2
    assert standby.main(["--events", "x"]) == 2


# ---------------------------------------------------------------- real SIGKILLs


def _losses_by_step(events: list[dict[str, object]]) -> dict[int, set[float]]:
    out: dict[int, set[float]] = {}
    for e in events:
        if e.get("event") == "step":
            out.setdefault(int(e["step"]), set()).add(float(e["loss"]))  # type: ignore[arg-type]
    return out


def _audit_writers(events: list[dict[str, object]]) -> None:
    """One writer at a time: the steps pass from one process to another only at a
    takeover, after the supervisor saw the previous writer die, and never come back."""
    took = {e["pid"]: e for e in events if e.get("event") == "takeover"}
    order: list[object] = []
    for e in events:
        if e.get("event") != "step" or (order and order[-1] == e["pid"]):
            continue
        pid = e["pid"]
        assert pid not in order, f"pid {pid} wrote steps again after it was replaced"
        if order:
            assert pid in took, f"pid {pid} wrote steps without taking over"
            gone = [
                x for x in events
                if x.get("event") == "standby_exit" and x.get("worker_pid") == order[-1]
            ]  # fmt: skip
            assert gone and float(gone[0]["t"]) <= float(took[pid]["t"]), (pid, order)  # type: ignore[arg-type]
        order.append(pid)


@pytest.mark.slow
def test_standby_killed_at_every_kind_of_moment_matches_an_uninterrupted_run(
    shm_dir: Path, tmp_path: Path
) -> None:
    """Trainer mid-step and mid-save, right after a takeover (the next spare
    still preparing), the spare alone, both together; then the losses of every
    step every process computed equal an uninterrupted run's, and the mirror
    was only ever written by one process at a time."""
    from plinius.bench.standby import lost_times, run_standby_campaign

    job = sealed_job(shm_dir)
    args = _train_args(job, "--steps", "200000")[1:]
    env = dict(os.environ, PYTHONHASHSEED="0")
    camp = run_standby_campaign(
        args,
        events_path=tmp_path / "ev.jsonl",
        log_path=tmp_path / "log",
        plan=["trainer", "trainer-now", "spare", "both", "trainer"],
        stop_after=True,
        env=env,
        timeout_s=240,
    )
    roles = [k.role for k in camp.kills]
    assert roles == ["trainer", "trainer", "spare", "trainer", "spare", "trainer"]
    _audit_writers(camp.events)
    took = [e for e in camp.events if e["event"] == "takeover"]
    assert len(took) == 4 and {e["cause"] for e in took} == {"SIGKILL"}
    assert all(e["pid"] != e["previous_pid"] for e in took)
    assert len(lost_times(camp)) == 4
    got = _losses_by_step(camp.events)
    assert all(len(v) == 1 for v in got.values()), "a redone step computed another loss"
    top = max(got)
    # The same job without --standby, stopped once it passed the same step.
    ref_events = tmp_path / "ref.jsonl"
    ref_args = [*_train_args({**job, "mirror": shm_dir / "ref.plm"}, "--steps", "200000")]
    cmd = [sys.executable, "-m", "plinius", *ref_args, "--events", str(ref_events), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            evs, _ = read_events(ref_events)
            if any(e["event"] == "step" and e["step"] >= top for e in evs):
                break
            assert proc.poll() is None
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    ref = _losses_by_step(read_events(ref_events)[0])
    assert all(got[s] == ref[s] for s in got), "the standby job computed other losses"


@pytest.mark.slow
def test_train_by_hand_on_a_mirror_a_standby_pair_uses_is_refused(shm_dir: Path) -> None:
    job = sealed_job(shm_dir)
    events = shm_dir / "ev.jsonl"
    cmd = [sys.executable, "-m", "plinius", *_train_args(job, "--steps", "200000"), "--standby",
           "--events", str(events), "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any(e["event"] == "step" for e in read_events(events)[0]):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        r = run_cli(*_train_args(job, "--steps", "200000"))
        assert_one_line_error(r, str(job["mirror"]), "in use by another process")
        # The supervisor itself never loads torch, the worker does.
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_crash_test_standby_ends_bit_identical(shm_dir: Path) -> None:
    job = sealed_job(shm_dir)
    r = run_cli("crash-test", "--key", str(job["key"]), "--data", str(job["data"]),
                "--mirror", str(job["mirror"]), "--model", "cnn-tiny", "--steps", "1500",
                "--batch-size", "32", "--crashes", "1", "--standby",
                "--workdir", str(shm_dir / "w"))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "1 crashes taken over by a warm spare" in r.output
    assert "time lost to a SIGKILL" in r.output
    assert "bit-for-bit identical to an uninterrupted run: yes" in r.output
