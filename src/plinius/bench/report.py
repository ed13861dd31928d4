"""The benchmark's outputs: ``results.json``, ``results.md`` and PNG plots.

Plots use matplotlib's Agg backend (no display needed): log scales where the
sizes span orders of magnitude, labelled axes with units. matplotlib is the
optional ``plots`` extra: without it there are no plots (:func:`plots_available`,
:data:`PLOTS_MISSING`), and everything else works.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_TARGET_PCT",
    "PAPER_TABLE_I",
    "PLOTS_MISSING",
    "plots_available",
    "write_json",
    "write_markdown",
    "write_plots",
]

# What the demo and the benchmark say when they skip their PNGs.
PLOTS_MISSING = "matplotlib is not installed (pip install 'plinius[plots]')"

# The original Plinius paper (DSN 2021), Table I, as summarised in DESIGN.md.
PAPER_TABLE_I = [
    ("save: time in encrypt / write", "66% / 34% (beyond the EPC: 92% / 8%)", "30% / 70%"),
    ("restore: time in read / decrypt", "75% / 25% (beyond the EPC: 91% / 9%)", "18% / 82%"),
    ("speed-up vs SSD, whole save", "3.5x (beyond the EPC: 1.7x)", "3.2x"),
    ("speed-up vs SSD, whole restore", "2.5x (beyond the EPC: 1.7x)", "3.7x"),
]

_LABELS = {
    "plinius": "plinius mirror (PM)",
    "ssd_encrypted": "encrypted checkpoint (disk)",
    "ssd_encrypted_cold": "encrypted checkpoint (disk, restored from a cold page cache)",
    "torch_save": "torch.save/load (disk, plain)",
    "dcp": "torch.distributed.checkpoint (disk, plain)",
    "aesgcm_raw": "raw AES-GCM (RAM)",
}


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_json(results: dict[str, Any], out: Path) -> Path:
    """``results.json`` (NaN and infinities become null)."""
    path = out / "results.json"
    path.write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")
    return path


def _ms(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    ms = s * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def _x(r: float | None) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.1f}x"


def _pct(p: float | None) -> str:
    return "-" if p is None or not math.isfinite(p) else f"{p:.0f}%"


# The 5% targets of overhead, sealed data and memory (results carry "target_pct").
DEFAULT_TARGET_PCT = 5.0


def _finite(xs: Sequence[float] | None) -> list[float]:
    return [x for x in (xs or ()) if x is not None and math.isfinite(x)]


def spread_pct(*runs: Sequence[float] | None) -> float:
    """The measured noise of a ratio of medians: the sum, over ``runs``, of half the range
    of each one's samples relative to its median, in %; NaN when none has 2 samples."""
    total, known = 0.0, False
    for xs in runs:
        v = _finite(xs)
        if len(v) >= 2 and statistics.median(v) > 0:
            total += 100.0 * (max(v) - min(v)) / 2.0 / statistics.median(v)
            known = True
    return total if known else float("nan")


def _iqr_half_pct(xs: Sequence[float] | None) -> float:
    """Half the interquartile range of per-step times, relative to their median, in %."""
    v = _finite(xs)
    if len(v) < 2 or statistics.median(v) <= 0:
        return float("nan")
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return 100.0 * (q3 - q1) / 2.0 / statistics.median(v)


def _pm(spread: float) -> str:
    return f"±{spread:.0f}%" if math.isfinite(spread) else "unknown (one sample)"


def target_verdict(value_pct: float | None, target_pct: float, spread: float = math.nan) -> str:
    """``met: +2.6% ≤ 5%`` or ``missed: +6.1% > 5%``, noting when within the spread.

    Args:
        value_pct: The measured overhead (%).
        target_pct: The target's limit (%).
        spread: The measured noise (%, NaN if unknown).

    Returns:
        The verdict; ``not measured`` for a missing value.
    """
    if value_pct is None or not math.isfinite(value_pct):
        return "not measured"
    noisy = math.isfinite(spread) and spread > 0 and abs(value_pct - target_pct) <= spread
    if value_pct <= target_pct:
        out = f"met: {value_pct:+.1f}% ≤ {target_pct:g}%"
    else:
        out = f"**missed: {value_pct:+.1f}% > {target_pct:g}%**"
    return out + (f" (within the {_pm(spread)} spread of the iterations)" if noisy else "")


def pct_of_raw(pct: float | None, spread: float) -> str:
    """plinius' throughput as a % of raw AES-GCM; above 100% is marked as noise or not."""
    if pct is None or not math.isfinite(pct):
        return "-"
    if pct <= 100.0:
        return f"{pct:.0f}%"
    if math.isfinite(spread) and pct - 100.0 <= spread:
        return f"{pct:.0f}% (≈100%: within the {_pm(spread)} spread)"
    return f"{pct:.0f}% (over 100%, beyond the {_pm(spread)} spread: raw ran slower this run)"


def estimated_split(phases: dict[str, float], a: str, b: str, spread: float) -> str:
    """An estimated two-phase split; a clamped (0%) or tiny share is marked as noise."""
    text = _split(phases, a, b)
    tot = phases.get(a, 0.0) + phases.get(b, 0.0)
    if text == "-" or tot <= 0:
        return text
    small = 100.0 * min(phases.get(a, 0.0), phases.get(b, 0.0)) / tot
    if small == 0.0:
        return text + f" (clamped: raw AES-GCM alone took at least as long; noise {_pm(spread)})"
    if math.isfinite(spread) and small <= spread:
        return text + f" (within the {_pm(spread)} spread)"
    return text


def _split(phases: dict[str, float], a: str, b: str) -> str:
    tot = phases.get(a, 0.0) + phases.get(b, 0.0)
    if tot <= 0:
        return "-"
    return f"{100 * phases.get(a, 0.0) / tot:.0f}% / {100 * phases.get(b, 0.0) / tot:.0f}%"


def _machine(md: list[str], meta: dict[str, Any]) -> None:
    m = meta["machine"]
    md += [
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu']}, {m['cpu_count']} logical CPUs, AES-NI: {m['aes_ni']} |",
        f"| memory | {m['mem_total_bytes'] / 1e9:.1f} GB "
        f"({m['mem_available_bytes_at_start'] / 1e9:.1f} GB available at start) |",
        f"| load average at start | {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])} |",
        f"| kernel | {m['kernel']} |",
        f"| versions | Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), NumPy {m['numpy']}, cryptography {m['cryptography']} |",
        f"| OpenMP | {_openmp(m.get('openmp'))} |",
        f"| PM directory | `{m['pm_dir']}`: {m['pm_kind']} |",
        f"| PM is DAX | {'yes' if meta['pm_is_dax'] else 'no'}; "
        f"`Mirror.info().is_pmem`: {meta.get('mirror_is_pmem')} |",
        f"| disk directory | `{m['disk_dir']}`: {m['disk_kind']}; device {m['disk_device']} |",
        "",
        "What this means for the numbers:",
        "",
    ]
    md += [f"- {line}" for line in meta["storage_notes"]]
    md.append("")


def _openmp(settings: dict[str, Any] | None) -> str:
    if not settings:
        return "not recorded"
    shown = [f"{k}={v}" for k, v in settings.items() if v is not None]
    return ", ".join(shown) if shown else "library defaults (nothing set)"


def _latency(md: list[str], lat: dict[str, Any]) -> None:
    md += [
        "## 1. Save and restore latency versus state size",
        "",
        f"Medians of {lat['repeats']} rounds (after one warm-up round), milliseconds; "
        "`Nx` = that method's time divided by plinius' (how many times faster plinius is); "
        "raw AES-GCM shows plinius' throughput as a percentage of it. Sizes: `N` = the "
        "reference CNN with N MB of parameters and SGD with momentum (the paper's setup; "
        "the state is about twice the parameters); `N:adam` = a state of about N MB with Adam.",
        "",
    ]
    for op in ("save", "restore"):
        cold = op == "restore" and "ssd_encrypted_cold" in lat["methods"]
        md += [
            f"**{op.capitalize()}** (ms)",
            "",
            "| size | state MB | plinius | encrypted ckpt | "
            + ("encrypted ckpt, cold cache | " if cold else "")
            + "torch | DCP | raw AES-GCM | plinius GB/s | % of raw |",
            "|---|---:|---:|---:|" + ("---:|" if cold else "") + "---:|---:|---:|---:|---:|",
        ]
        for s in lat["sizes"]:
            m, r = s["methods"], s["time_vs_plinius"]
            cold_cell = (
                f"{_ms(m['ssd_encrypted_cold'][op + '_s'])} ({_x(r['ssd_encrypted_cold'][op])}) | "
                if cold
                else ""
            )
            md.append(
                f"| {s['size']} | {s['state_mb']:.0f} | {_ms(m['plinius'][op + '_s'])} | "
                f"{_ms(m['ssd_encrypted'][op + '_s'])} ({_x(r['ssd_encrypted'][op])}) | "
                + cold_cell
                + f"{_ms(m['torch_save'][op + '_s'])} ({_x(r['torch_save'][op])}) | "
                f"{_ms(m['dcp'][op + '_s'])} ({_x(r['dcp'][op])}) | "
                f"{_ms(m['aesgcm_raw'][op + '_s'])} | "
                f"{s['throughput_gb_s']['plinius'][op]:.2f} | "
                f"{pct_of_raw(s['plinius_pct_of_raw_aesgcm'][op], _raw_spread(s, op))} |"
            )
        md.append("")
    md += [
        "% of raw above 100% is noise: plinius does the same encryption and more. The "
        "spread is half the range of the rounds, relative to the median, of plinius and "
        "raw AES-GCM added together.",
        "",
        "**Phases** (the paper's Table I, measured the same way here). plinius encrypts "
        "straight into PM, so its encrypt/write and read/decrypt splits are estimated: "
        "crypto = raw AES-GCM over the same bytes into RAM, measured in the same rounds; "
        "write/read = the rest of the save/restore. The encrypted checkpoint's phases are "
        "timed directly (serialization counted with encrypt for save, with read for restore).",
        "",
        "| size | plinius save encrypt / write | plinius restore read / decrypt | "
        "ckpt save encrypt / write | ckpt restore read / decrypt | speed-up save | "
        "speed-up restore |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for s in lat["sizes"]:
        p, c = s["methods"]["plinius"], s["methods"]["ssd_encrypted"]
        psave = estimated_split(p["save_phases_s"], "encrypt", "write", _raw_spread(s, "save"))
        prest = estimated_split(p["restore_phases_s"], "read", "decrypt", _raw_spread(s, "restore"))
        cs, cr = c["save_phases_s"], c["restore_phases_s"]
        csave = {"encrypt": cs["serialize"] + cs["encrypt"], "write": cs["write"]}
        crest = {
            "read": cr["read"] + cr["deserialize"] + cr["apply"],
            "decrypt": cr["decrypt"],
        }
        md.append(
            f"| {s['size']} | {psave} | {prest} | "
            f"{_split(csave, 'encrypt', 'write')} | {_split(crest, 'read', 'decrypt')} | "
            f"{_x(s['time_vs_plinius']['ssd_encrypted']['save'])} | "
            f"{_x(s['time_vs_plinius']['ssd_encrypted']['restore'])} |"
        )
    md.append("")
    for k in lat["skipped"]:
        md.append(f"- size {k['size']} skipped: {k['reason']}")
    md += ["", "Methods:", ""]
    md += [f"- `{k}`: {v}" for k, v in lat["method_notes"].items()]
    md.append("")


def _raw_spread(size: dict[str, Any], op: str) -> float:
    m = size["methods"]
    return spread_pct(m["plinius"].get(op + "_runs_s"), m["aesgcm_raw"].get(op + "_runs_s"))


def _paper(md: list[str]) -> None:
    md += [
        "## The original Plinius (DSN 2021), Table I",
        "",
        "MNIST CNNs of 10-100 MB of parameters, Darknet in an SGX enclave, AES-GCM, Romulus; "
        "averages of 5 runs; latencies of hundreds of milliseconds.",
        "",
        "| | SGX + emulated PM (below the EPC) | simulated SGX + real PM |",
        "|---|---|---|",
    ]
    md += [f"| {a} | {b} | {c} |" for a, b, c in PAPER_TABLE_I]
    md += [
        "",
        "Also from the paper: decrypting the sealed batches made iterations about 1.2x slower.",
        "",
    ]


def _hidden(o: dict[str, Any], spread_ms: float) -> str:
    h = o["async_hidden_fraction"]
    if h is None or not math.isfinite(h):
        return "not measurable in this run (the noise between runs exceeds the save's cost)"
    noise = (
        f"the iterations spread ±{spread_ms:.0f} ms, the save costs "
        f"{o['save_in_iteration_s'] * 1e3:.0f} ms"
    )
    if h < 0:
        return f"0% (measured {100 * h:.0f}%, within noise: {noise})"
    if h > 1:
        return f"100% (measured {100 * h:.0f}%, within noise: {noise})"
    return f"{100 * h:.0f}% ({noise})"


def _overhead(md: list[str], o: dict[str, Any]) -> None:
    it = o["iteration_s"]
    limit = float(o.get("target_pct", DEFAULT_TARGET_PCT))
    runs = o.get("iteration_runs_s", {})
    spread = {m: _iqr_half_pct(runs.get("none")) + _iqr_half_pct(runs.get(m)) for m in it}
    base_spread = _iqr_half_pct(runs.get("none"))
    spread_ms = base_spread / 100 * it["none"] * 1e3 if math.isfinite(base_spread) else math.nan
    md += [
        "## 2. Mirroring overhead per iteration",
        "",
        f"`plinius.fit` on {o['model']} ({o['param_bytes'] / 1e6:.1f} MB of parameters, "
        f"state {o['state_bytes'] / 1e6:.1f} MB), batch {o['batch']}, sealed synthetic "
        f"MNIST-shaped data; median of {o['rounds']} x {o['steps_per_round']} steps per mode.",
        "",
        f"Target: {o['target']}.",
        "",
        f"| mode | iteration (ms) | overhead | target (≤ {limit:g}%) |",
        "|---|---:|---:|---|",
        f"| no mirror | {_ms(it['none'])} | - | - |",
        f"| mirror every iteration, synchronous | {_ms(it['sync'])} | "
        f"{o['overhead_pct']['sync']:+.1f}% | "
        f"{target_verdict(o['overhead_pct']['sync'], limit, spread['sync'])} |",
        f"| mirror every iteration, asynchronous | {_ms(it['async'])} | "
        f"{o['overhead_pct']['async']:+.1f}% | "
        f"{target_verdict(o['overhead_pct']['async'], limit, spread['async'])} |",
        "",
        "Spread: half the interquartile range of the step times, relative to the median, "
        "of no mirror and the mode added together.",
        "",
        f"Save cost inside a synchronous iteration: {_ms(o['save_in_iteration_s'])} ms"
        + (
            " (below zero, so noise: a mirror cannot make a step faster; "
            f"steps spread ±{spread_ms:.0f} ms)"
            if o["save_in_iteration_s"] < 0
            else ""
        )
        + "; "
        f"share of it hidden by the asynchronous save: {_hidden(o, spread_ms)}.",
        "",
    ]


def _sealed(md: list[str], s: dict[str, Any]) -> None:
    it, fe, t = s["iteration_s"], s["fetch_s"], s["throughput"]
    limit = float(s.get("target_pct", DEFAULT_TARGET_PCT))
    runs = s.get("iteration_runs_s", {})
    spread = _iqr_half_pct(runs.get("plain")) + _iqr_half_pct(runs.get("sealed"))
    md += [
        "## 3. Sealed-data overhead",
        "",
        f"{s['model']}, batch {s['batch']}, {s['records']} synthetic MNIST-shaped records, "
        "chunk-shuffled order; medians.",
        "",
        "| data | iteration (ms) | of which fetching the batch (ms) |",
        "|---|---:|---:|",
        f"| plain tensors in memory | {_ms(it['plain'])} | {_ms(fe['plain'])} |",
        f"| sealed dataset (decrypt per batch) | {_ms(it['sealed'])} | {_ms(fe['sealed'])} |",
        "",
        f"Overhead: {s['overhead_pct']:+.1f}% per iteration (the original: about "
        f"+{s['paper_overhead_pct']:.0f}%). Target: {s['target']}: "
        f"{target_verdict(s['overhead_pct'], limit, spread)}.",
        "",
        f"Decryption throughput, one pass over {t['dataset_bytes'] / 1e6:.1f} MB in "
        f"{t['chunks']} chunks of {t['chunk_records']} records: sealed dataset "
        f"{t['sealed_gb_s']:.2f} GB/s, raw `AESGCM.decrypt_into` on the same chunks "
        f"{t['raw_gb_s']:.2f} GB/s ({_pct(t['sealed_pct_of_raw'])} of raw).",
        "",
    ]


def _recovery(md: list[str], r: dict[str, Any]) -> None:
    md += [
        "## 4. Recovery after SIGKILL",
        "",
        f"`plinius train --model {r['model']} --batch-size {r['batch']}` killed "
        f"{r['crashes']} time(s) with SIGKILL ({r['runs']} runs, job finished: "
        f"{'yes' if r['finished'] else 'NO'}; mirror file {r['mirror_file_bytes'] / 1e6:.1f} MB). "
        "From process start to the first resumed step, in ms"
        + (" (1 run: no median)" if len(r["resumes"]) == 1 else "")
        + ":",
        "",
    ]
    if not r["resumes"]:
        md += [
            "No run resumed mid-job, so there is no recovery to time: each kill came before "
            "the first committed step or after the last one.",
            "",
        ]
        return
    names = {
        "interpreter": "interpreter + CLI imports",
        "imports": "torch and library imports, setup",
        "key": "key load",
        "build": "dataset open + model build (with their imports)",
        "open": "mirror open",
        "restore": "restore",
        "first_step": "first step",
    }
    md += [
        "| run | resumed after step | " + " | ".join(names[p] for p in r["phases"]) + " | total |",
        "|---|---:|" + "---:|" * (len(r["phases"]) + 1),
    ]
    for i, row in enumerate(r["resumes"], start=1):
        md.append(
            f"| {i} | {row['resumed_from']:.0f} | "
            + " | ".join(_ms(row[p]) for p in r["phases"])
            + f" | {_ms(row['total'])} |"
        )
    med = r["median_s"]
    if len(r["resumes"]) > 1:
        md.append(
            f"| median of {len(r['resumes'])} runs | | "
            + " | ".join(_ms(med[p]) for p in r["phases"])
            + f" | {_ms(med['total'])} |"
        )
    md.append("")
    if "standby" in r:
        _standby(md, r["standby"])


def _standby(md: list[str], s: dict[str, Any]) -> None:
    """The time a SIGKILL costs: standby pair, cold restart, encrypted disk checkpoint."""

    def row(name: str, v: dict[str, float]) -> str:
        return f"| {name} | {v['n']:.0f} | {_ms(v['median'])} | {_ms(v['worst'])} |"

    mem = s.get("spare_memory") or {}
    md += [
        f"Time lost to a SIGKILL, `{s['model']}` at batch {s['batch']} (one step "
        f"{_ms(s['step_s'])} ms): from the kill to the end of the first step after it, "
        "less one step, in ms:",
        "",
        "| recovery | kills | median | worst |",
        "|---|---:|---:|---:|",
        row("warm standby (`plinius train --standby`)", s["standby_s"]),
        row("  of it: the kill until its death is seen", s["standby_detect_s"]),
        row("cold restart (`plinius train` again)", s["cold_s"]),
        row("encrypted disk checkpoint restart (estimate)", s["checkpoint_s"]),
        "",
        f"The checkpoint row is the cold restart with its mirror restore "
        f"({_ms(s['mirror_restore_s'])} ms) replaced by the load of an encrypted disk "
        f"checkpoint of the same state ({_ms(s['checkpoint_load_s'])} ms). The spare costs "
        f"{mem.get('rss', 0) / 1e6:.0f} MB resident, {mem.get('private', 0) / 1e6:.0f} MB "
        "of it its own.",
        "",
    ]


def _memory(md: list[str], m: dict[str, Any]) -> None:
    md += ["## 5. Peak extra memory of a save and a restore", ""]
    limit = float(m.get("target_pct", DEFAULT_TARGET_PCT))
    if "skipped" in m:
        md += [f"Skipped: {m['skipped']}.", ""]
        return
    md += [
        f"Size {m['size']} (state {m['state_bytes'] / 1e6:.1f} MB), in a child process; "
        f"method: {m['method']} (see docs/BENCHMARKS.md). Target: {m['target']}.",
        "",
        f"| operation | peak extra (MB) | of the state | target (≤ {limit:g}%) |",
        "|---|---:|---:|---|",
    ]
    for k, v in m["peak_extra_bytes"].items():
        pct = m["peak_extra_pct_of_state"][k]
        verdict = target_verdict(pct, limit) if k.startswith("plinius") else "- (for comparison)"
        md.append(f"| {k} | {v / 1e6:.1f} | {_pct(pct)} | {verdict} |")
    md += [
        "",
        "0.0 MB is a measurement, not missing data: the peak did not rise above the "
        "process' resident memory before the operation.",
        "",
    ]


def _ddp(md: list[str], d: dict[str, Any]) -> None:
    limit = float(d.get("target_pct", DEFAULT_TARGET_PCT))
    md += [
        "## 6. Mirroring under DistributedDataParallel (torchrun)",
        "",
        f"`plinius.fit` in DDP (gloo) on {d['model']} ({d['param_bytes'] / 1e6:.1f} MB of "
        f"parameters), global batch {d['batch']} (rounded down to a multiple of the "
        "processes) split between them, sealed "
        f"synthetic MNIST-shaped data; median of {d['rounds']} x {d['steps_per_round']} "
        "steps per mode, rank 0's step times. Every mode runs the step gate's all-gather; "
        "`mirror`: each process mirrors its state into its file of a mirror set every "
        "iteration; `ordered`: gradients reduced by the ordered all-reduce hook (exact "
        "on resume; `plinius train` uses it from 3 processes on) instead of DDP's; "
        "`counter`: as `mirror`, the set protected by a freshness counter file (rank 0 "
        "advances it once per save, in its background save).",
        "",
        f"| processes | DDP (ms) | + mirror set (ms) | mirroring overhead | target "
        f"(≤ {limit:g}%) | ordered hook (ms) | hook's cost | global commit's all-gather |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in d["worlds"]:
        it, runs = w["iteration_s"], w.get("iteration_runs_s", {})
        spread = _iqr_half_pct(runs.get("none")) + _iqr_half_pct(runs.get("mirror"))
        note = " (more processes than cores)" if w.get("oversubscribed") else ""
        md.append(
            f"| {w['world_size']}{note} | {_ms(it['none'])} | {_ms(it['mirror'])} | "
            f"{w['overhead_pct']['mirror']:+.1f}% | "
            f"{target_verdict(w['overhead_pct']['mirror'], limit, spread)} | "
            f"{_ms(it['ordered'])} | {w['overhead_pct']['ordered']:+.1f}% | "
            f"{w['gate_s'] * 1e3:.2f} ms ({w['gate_pct']:.1f}% of a step) |"
        )
    md += [
        "",
        "The global commit's all-gather is timed alone (the median of many start/finish "
        "pairs of `plinius.dist.StepGate`): an upper bound of what it adds, since `fit` "
        "overlaps it with `optimizer.step()`. The ordered hook all-gathers every gradient "
        "bucket (N times the bucket instead of about twice) and adds in rank order.",
        "",
    ]
    counted = [w for w in d["worlds"] if "counter" in w["iteration_s"]]
    if counted:  # results of a run before the mode existed have none
        md += [
            "| processes | + mirror set (ms) | + the set's freshness counter (ms) | "
            "the counter's cost |",
            "|---|---|---|---|",
        ]
        md += [
            f"| {w['world_size']} | {_ms(w['iteration_s']['mirror'])} | "
            f"{_ms(w['iteration_s']['counter'])} | {w['counter_vs_mirror_pct']:+.1f}% |"
            for w in counted
        ]
        md.append("")


def _dcp(md: list[str], d: dict[str, Any]) -> None:
    md += [
        "## 7. torch.distributed.checkpoint: encrypted (plinius.dcp) vs plain",
        "",
        f"One process, the disk directory, medians of {d['repeats']} rounds; DCP's "
        "`FileSystemWriter(sync_files=True)` and `FileSystemReader` against "
        "`plinius.dcp.PliniusWriter`/`PliniusReader` (AES-256-GCM, fsync, atomic commit).",
        "",
        "| size | state (MB) | save plain (s) | save plinius (s) | ratio "
        "| load plain (s) | load plinius (s) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["sizes"]:
        s, lo, q = r["save_s"], r["load_s"], r["ratio"]
        md.append(
            f"| {r['size']} | {r['state_bytes'] / 1e6:.1f} | {s['plain']:.3f} | "
            f"{s['plinius']:.3f} | {q['save']:.2f}x | {lo['plain']:.3f} | "
            f"{lo['plinius']:.3f} | {q['load']:.2f}x |"
        )
    md.append("")


def _replicas(md: list[str], d: dict[str, Any]) -> None:
    it, runs = d["iteration_s"], d["iteration_runs_s"]
    gate = d["gate_bytes_per_step"]
    spread = _iqr_half_pct(runs.get("mirror")) + _iqr_half_pct(runs.get("replicas"))
    md += [
        "## 8. Replicas across machines (two torchrun agents)",
        "",
        f"`plinius.fit` in DDP (gloo) on {d['model']} ({d['param_bytes'] / 1e6:.1f} MB of "
        f"parameters), global batch {d['batch']}, 2 processes, sealed synthetic MNIST-shaped "
        f"data; median of {d['rounds']} x {d['steps_per_round']} steps per mode, rank 0's "
        "step times, modes interleaved. A mirror set spanning two machines without replicas "
        "is refused, so the per-step comparison runs one agent with 2 processes and one "
        "mirror directory: only replication differs between `mirror` and `replicas`.",
        "",
        "| mode | step (ms) | vs no mirror | bytes into the step gate per step and process |",
        "|---|---:|---:|---:|",
        f"| no mirror | {_ms(it['none'])} | - | {gate['none']:.0f} |",
        f"| mirror set, no replicas | {_ms(it['mirror'])} | "
        f"{100.0 * (it['mirror'] / it['none'] - 1.0):+.1f}% | {gate['mirror']:.0f} |",
        f"| mirror set with replicas | {_ms(it['replicas'])} | "
        f"{d['replicas_vs_none_pct']:+.1f}% | {gate['replicas']:.0f} |",
        f"| the same on two agents (the machine-loss job) | {_ms(d['two_agents_step_s'])} | "
        f"{100.0 * (d['two_agents_step_s'] / it['none'] - 1.0):+.1f}% | - |",
        "",
        f"Replication costs {d['replication_pct']:+.1f}% of a step against the mirror set "
        f"without replicas (the steps' spread: {_pm(spread)}). Each process sends "
        f"{d['replica_bytes_per_step']:.0f} bytes more per saved step (its sealed replica: "
        "its generators and buffers) into the all-gather the step already runs, against "
        f"{d['mirror_tensor_bytes'] / 1e6:.1f} MB of tensors in its mirror "
        f"({d['mirror_file_bytes'] / 1e6:.1f} MB file): "
        f"{100.0 * d['replica_bytes_per_step'] / d['mirror_tensor_bytes']:.2g}% of it; the "
        "model and optimizer, the same on every process under DDP, are never sent. Sealing "
        f"it (packing the generators and buffers, AES-256-GCM) takes {d['seal_s'] * 1e6:.0f} "
        "µs a step, timed alone (median of 100 on rank 0).",
        "",
        f"**A machine's loss**, {d['kills']} times: the second agent and its worker "
        "SIGKILLed, its mirror directory deleted, a new agent started at once with an empty "
        f"one (rendezvous `--rdzv-conf {d['rdzv_conf']}`: a dead node is dropped after 2 s "
        "instead of torch's default 15 s). Seconds from the kill:",
        "",
        "| loss | torch: detection, rendezvous, new processes | workers' start-up | "
        "plinius: open_mirror_set (agreement, seed) | restore (seed, replica, own save) | "
        "first step | kill to next step | resumed after step | seed received (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, x in enumerate(d["losses"], 1):
        md.append(
            f"| {i} | {x['torch']:.2f} | {x['startup']:.2f} | {x['open']:.3f} | "
            f"{x['restore']:.3f} | {x['first_step']:.3f} | {x['total']:.2f} | "
            f"{x['resumed_from']} | {(x['seed_bytes'] or 0) / 1e6:.1f} |"
        )
    q = d["loss_s"]
    md.append(
        f"| median | {q['torch']:.2f} | {q['startup']:.2f} | {q['open']:.3f} | "
        f"{q['restore']:.3f} | {q['first_step']:.3f} | {q['total']:.2f} | | |"
    )
    c = d["checkpoint"]
    md += [
        "",
        "torch's part runs from the kill to the new workers' process start (the new agent's "
        "own start overlaps the dead node's detection); the start-up is the workers' Python, "
        "torch, model and process group; plinius' part is the new machine's "
        "`open_mirror_set` (every process's report, the agreed step, the survivor's committed "
        "mirror sent as ciphertext) and its restore (from that seed and its own sealed "
        "replica, then its own mirror saved). At most the step in flight is redone.",
        "",
        "**Without replicas**, the usual practice: the whole job restarts from an encrypted "
        "disk checkpoint (`torch.save`, AES-256-GCM, fsync, rename) written every N steps. "
        f"Measured: writing it takes {_ms(c['save_s'])} ms, reading it back "
        f"{_ms(c['load_s'])} ms "
        f"({c['bytes'] / 1e6:.1f} MB, the same model and optimizer; read from the page cache, "
        "a lower bound). Computed: torch's part and the start-up as measured above, the "
        "checkpoint's read, the first step, and N/2 steps redone on average at the no-mirror "
        "step time; the write cost is the write's time over N steps (written synchronously).",
        "",
        "| checkpoint every | kill to next step (computed) | vs replicas | write cost per step |",
        "|---:|---:|---:|---:|",
    ]
    for b in d["baseline"]:
        md.append(
            f"| {b['every']} steps | {b['lost_s']:.2f} s | {_x(b['vs_replicas'])} | "
            f"{b['write_pct_per_step']:.1f}% |"
        )
    md += [
        "",
        "Both agents run on this host (loopback network) and /dev/shm is RAM: emulated "
        "persistent memory, as everywhere in this report.",
        "",
    ]


def write_markdown(results: dict[str, Any], out: Path) -> Path:
    """``results.md``: every table, the machine, the paper's figures beside ours."""
    meta = results["meta"]
    md = [
        "# plinius bench" + (" (quick run)" if meta["quick"] else ""),
        "",
        f"Command: `{meta['command']}`; started {meta['started']}; took "
        f"{meta['wall_s']:.0f} s; sections: {', '.join(meta['sections'])}.",
        "",
    ]
    if meta["quick"]:
        md += [
            "A quick run: fewer sizes, repetitions and steps than the full benchmark; "
            "treat the numbers as indicative.",
            "",
        ]
    load = meta["machine"].get("load_average_at_start") or []
    cpus = meta["machine"].get("cpu_count") or 0
    if load and cpus and load[0] > cpus:
        md += [
            f"**The machine was busy**: load average {load[0]:.1f} on {cpus} logical CPUs "
            "at the start, so other processes shared the cores; the spreads below say how "
            "much the timings moved.",
            "",
        ]
    _machine(md, meta)
    if "latency" in results:
        _latency(md, results["latency"])
        _paper(md)
    if "overhead" in results:
        _overhead(md, results["overhead"])
    if "sealed" in results:
        _sealed(md, results["sealed"])
    if "recovery" in results:
        _recovery(md, results["recovery"])
    if "memory" in results:
        _memory(md, results["memory"])
    if "ddp" in results:
        _ddp(md, results["ddp"])
    if "dcp" in results:
        _dcp(md, results["dcp"])
    if "replicas" in results:
        _replicas(md, results["replicas"])
    if meta["skipped"]:
        md += ["## Skipped", ""]
        md += [f"- {k['section']} {k['size']}: {k['reason']}" for k in meta["skipped"]]
        md.append("")
    if results.get("plots"):
        md += ["## Plots", ""]
        md += [f"![{Path(p).stem}]({Path(p).name})" for p in results["plots"]]
        md.append("")
    path = out / "results.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def _mb_label(b: float) -> str:
    mb = b / 1e6
    return "0 MB" if mb < 0.05 else f"{mb:.1f} MB"


def plots_available() -> bool:
    """Whether the PNG plots can be drawn: matplotlib (the ``plots`` extra) imports.

    Returns:
        ``True`` when ``import matplotlib`` succeeds.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Draw a PNG plot of every section that ran into ``out``.

    Args:
        results: What :func:`plinius.bench.run_bench` measured.
        out: The directory to write into (it exists).

    Returns:
        The paths written; empty when matplotlib is missing
        (:func:`plots_available`), which draws nothing.
    """
    if not plots_available():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    paths: list[Path] = []

    def save(fig: Any, name: str, rect: tuple[float, float, float, float] | None = None) -> None:
        fig.tight_layout(rect=rect)
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    lat = results.get("latency")
    if lat and lat["sizes"]:
        sizes = lat["sizes"]
        xs = [s["state_mb"] for s in sizes]
        fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
        for ax, op in zip(axes, ("save", "restore")):
            for i, m in enumerate(lat["methods"]):
                if op == "save" and m == "ssd_encrypted_cold":
                    continue  # its save is the warm one; only its restore differs
                ys = [s["methods"][m][op + "_s"] * 1e3 for s in sizes]
                # One colour per method in both plots.
                ax.plot(xs, ys, marker="o", color=f"C{i}", label=_LABELS.get(m, m))
            ax.set_xscale("log")
            ax.set_yscale("log")
            # Label the measured sizes themselves, not 3x10^1 style minor ticks;
            # skip a label too close (on the log axis) to the last one shown.
            shown: list[float] = []
            for x in xs:
                if not shown or x / shown[-1] >= 1.35:
                    shown.append(x)
            ax.set_xticks(shown, [f"{x:.0f}" if x >= 1 else f"{x:.2g}" for x in shown])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("state size (MB, log scale)")
            ax.set_ylabel(f"{op} latency (ms, log scale; median)")
            ax.set_title(f"{op.capitalize()} latency versus state size")
            ax.grid(True, which="both", alpha=0.3)
        # One legend for both (a method has one colour), below them where it hides no line;
        # the restore plot's handles include the cold-cache restore.
        fig.legend(*axes[1].get_legend_handles_labels(), fontsize=8, ncol=3, loc="lower center")
        save(fig, "latency.png", rect=(0, 0.12, 1, 1))

        fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
        labels = [s["size"] for s in sizes]
        idx = list(range(len(sizes)))
        w = 0.38
        for ax, op, parts in (
            (axes[0], "save", ("encrypt", "write")),
            (axes[1], "restore", ("read", "decrypt")),
        ):
            for k, (m, off) in enumerate((("plinius", -w / 2), ("ssd_encrypted", w / 2))):
                bottom = [0.0] * len(sizes)
                for j, part in enumerate(parts):
                    vals = []
                    for s in sizes:
                        ph = s["methods"][m][op + "_phases_s"]
                        if m == "ssd_encrypted":
                            ph = (
                                {"encrypt": ph["serialize"] + ph["encrypt"], "write": ph["write"]}
                                if op == "save"
                                else {
                                    "read": ph["read"] + ph["deserialize"] + ph["apply"],
                                    "decrypt": ph["decrypt"],
                                }
                            )
                        tot = sum(ph.values()) or 1.0
                        vals.append(100.0 * ph[part] / tot)
                    ax.bar(
                        [i + off for i in idx],
                        vals,
                        w,
                        bottom=bottom,
                        color=["#1f77b4", "#aec7e8", "#d62728", "#ff9896"][2 * k + j],
                        label=f"{'plinius' if k == 0 else 'encrypted ckpt'}: {part}",
                    )
                    bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_xticks(idx, labels, rotation=45, ha="right")
            ax.set_xlabel("state size (MB of parameters; N:adam = MB of state)")
            ax.set_ylabel("share of the time (%; medians per phase)")
            ax.set_ylim(0, 100)
            ax.set_title(f"{op.capitalize()} phases: plinius (left) vs encrypted checkpoint")
            ax.grid(True, axis="y", alpha=0.3)
        # Each plot's legend below it, in a band kept free of the tick labels and x labels.
        for ax, x in zip(axes, (0.27, 0.77)):
            fig.legend(
                *ax.get_legend_handles_labels(),
                fontsize=8,
                ncol=2,
                loc="lower center",
                bbox_to_anchor=(x, 0.0),
            )
        save(fig, "phases.png", rect=(0, 0.1, 1, 1))

    o, s = results.get("overhead"), results.get("sealed")
    if o or s:
        fig, axes = plt.subplots(1, 2 if (o and s) else 1, figsize=(10 if o and s else 5.5, 4))
        axs = list(axes) if o and s else [axes]
        if o:
            ax = axs.pop(0)
            modes = ("none", "sync", "async")
            ax.bar(
                ["no mirror", "sync mirror", "async mirror"],
                [o["iteration_s"][m] * 1e3 for m in modes],
                color=["#7f7f7f", "#d62728", "#1f77b4"],
            )
            ax.set_ylabel("iteration time (ms, median)")
            ax.set_title(f"Mirroring every iteration ({o['model']}, batch {o['batch']})")
            ax.grid(True, axis="y", alpha=0.3)
        if s:
            ax = axs.pop(0)
            ax.bar(
                ["plain data", "sealed data"],
                [s["iteration_s"][m] * 1e3 for m in ("plain", "sealed")],
                color=["#7f7f7f", "#2ca02c"],
            )
            ax.set_ylabel("iteration time (ms, median)")
            ax.set_title(f"Sealed data ({s['model']}, batch {s['batch']})")
            ax.grid(True, axis="y", alpha=0.3)
        save(fig, "iteration.png")

    r = results.get("recovery")
    if r and r["resumes"]:
        fig, ax = plt.subplots(figsize=(10, 2.0 + 0.5 * (len(r["resumes"]) + 1)))
        n = len(r["resumes"])
        # A median of one run is that run: show it only from two runs on.
        rows = [*r["resumes"], r["median_s"]] if n > 1 else list(r["resumes"])
        names = [f"resume {i}" for i in range(1, n + 1)] + ([f"median of {n}"] if n > 1 else [])
        left = [0.0] * len(rows)
        colors = ["#7f7f7f", "#bcbd22", "#9467bd", "#8c564b", "#17becf", "#1f77b4", "#2ca02c"]
        for p, c in zip(r["phases"], colors):
            vals = [row[p] * 1e3 for row in rows]
            ax.barh(names, vals, left=left, color=c, label=p)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_xlabel("time from process start to the first resumed step (ms)")
        ax.set_title(f"Recovery after SIGKILL ({r['model']}, {n} run{'s' if n > 1 else ''})")
        ax.legend(
            fontsize=7, ncol=len(r["phases"]), loc="upper center", bbox_to_anchor=(0.5, -0.45)
        )
        ax.grid(True, axis="x", alpha=0.3)
        save(fig, "recovery.png")

    m = results.get("memory")
    if m and "peak_extra_bytes" in m:
        fig, ax = plt.subplots(figsize=(8, 4))
        ops = list(m["peak_extra_bytes"])
        bars = ax.bar(ops, [m["peak_extra_bytes"][k] / 1e6 for k in ops], color="#1f77b4")
        # Every bar labelled, so a zero reads as "0 MB" measured, not as missing data.
        ax.bar_label(bars, labels=[_mb_label(m["peak_extra_bytes"][k]) for k in ops], fontsize=8)
        ax.margins(y=0.12)
        ax.axhline(m["state_bytes"] / 1e6, color="#d62728", ls="--", label="state size")
        ax.set_ylabel("peak extra memory (MB)")
        ax.set_title(f"Peak extra memory, state of {m['state_bytes'] / 1e6:.0f} MB")
        ax.tick_params(axis="x", rotation=25)
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        save(fig, "memory.png")
    return paths
