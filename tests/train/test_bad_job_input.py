"""Issue 17 (items 10, 12) and 18 (item 2): bad job input is one clear error and loses nothing.

- item 10: a Darknet cfg whose sizes cannot be built (a layer of 2**40
  parameters, a 2**20 x 2**20 input) is a DarknetConfigError naming the line,
  refused before torch allocates or computes a storage size;
- item 12: labels outside the class count (-1, or ``--num-classes 2`` on ten
  classes) and learning rates the optimizer cannot use (``1e300``, ``nan``,
  ``inf``, ``0``, negative) are a ConfigError naming the value and what to do,
  from ``fit``/``evaluate`` as from the CLI; an error mid-training leaves the
  mirror at its last committed step;
- issue 18 item 2: the thread count is a job setting; a resume with another
  ``--threads`` is refused like one with another batch size, and a mirror
  written before it was recorded still resumes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from plinius.crypto import MasterKey
from plinius.darknet import load_cfg
from plinius.data import SealedDataset, seal_dataset
from plinius.errors import ConfigError, DarknetConfigError
from plinius.job import build_job, label_classes
from plinius.mirror import Mirror
from plinius.models import build_model
from plinius.train import evaluate, fit, make_sampler, training_state
from tests.conftest import assert_one_line_error, run_cli

# --------------------------------------------------------------------------- helpers


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def ws(shm_dir: Path) -> dict[str, Path]:
    """A key, a 10-class sealed dataset (labels 0..9) and a place for the mirror."""
    key = MasterKey.generate()
    key.save(shm_dir / "k.key")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 255, size=(200, 4, 4), dtype=np.uint8)
    y = (np.arange(200) % 10).astype(np.int64)
    seal_dataset(shm_dir / "ten.pld", key, {"image": x, "label": y})
    return {"dir": shm_dir, "key": shm_dir / "k.key", "ten": shm_dir / "ten.pld",
            "mirror": shm_dir / "m.plm"}  # fmt: skip


def _train(ws: dict[str, Path], *extra: str, data: str = "ten") -> list[str]:
    return [
        "train", "--key", ws["key"], "--data", ws[data], "--mirror", ws["mirror"],
        "--model", "mlp", "--batch-size", "20", "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------- item 10

_NET = "[net]\nheight={h}\nwidth={w}\nchannels={c}\n"
# (cfg body after [net], [net] size, the line the error names, a phrase of it)
_HUGE = {
    "conv-2^40-params": (
        "\n[convolutional]\nfilters=1048576\nsize=1024\npad=1\nactivation=leaky\n[softmax]\n",
        (28, 28, 1), 6, "parameters",
    ),
    "connected-2^40-params": (
        "\n[connected]\noutput=1048576\n\n[connected]\noutput=1048576\n[softmax]\n",
        (28, 28, 1), 9, "parameters",
    ),
    "connected-output-2^40": (
        "\n[connected]\noutput=1099511627776\n[softmax]\n", (28, 28, 1), 7, "output",
    ),
    "net-2^20-square": (
        "\n[connected]\noutput=10\n[softmax]\n", (1048576, 1048576, 1), 1, "values per record",
    ),
    "net-2^20-cube": (
        "\n[connected]\noutput=10\n[softmax]\n", (1048576, 1048576, 1048576), 1,
        "values per record",
    ),
    "conv-activation-2^32": (
        "\n[convolutional]\nfilters=65536\nsize=1\nactivation=linear\n[softmax]\n",
        (256, 256, 1), 6, "values per record",
    ),
}  # fmt: skip


def _huge_cfg(tmp: Path, name: str) -> tuple[Path, int, str]:
    body, (h, w, c), line, phrase = _HUGE[name]
    p = tmp / f"{name}.cfg"
    p.write_text(_NET.format(h=h, w=w, c=c) + body)
    return p, line, phrase


@pytest.mark.parametrize("name", list(_HUGE))
def test_attack_cfg_sizes_that_cannot_be_built_name_the_line(tmp_path: Path, name: str) -> None:
    path, line, phrase = _huge_cfg(tmp_path, name)
    shape = _HUGE[name][1]
    for meta in (True, False):  # plinius models builds on the meta device, train for real
        with (
            torch.device("meta") if meta else torch.device("cpu"),
            pytest.raises(DarknetConfigError) as ei,
        ):
            load_cfg(path)
        msg = str(ei.value)
        assert f"{path.name} line {line}:" in msg and phrase in msg, msg
        assert "smaller" in msg, msg  # what to do
    # plinius train builds it for the data's records (of the cfg's own shape here).
    with pytest.raises(DarknetConfigError, match=f"line {line}:"):
        build_model(str(path), input_shape=(shape[2], shape[0], shape[1]), num_classes=10)


@pytest.mark.parametrize("name", list(_HUGE))
def test_attack_cfg_sizes_models_cli_is_one_line(tmp_path: Path, name: str) -> None:
    path, line, phrase = _huge_cfg(tmp_path, name)
    res = run_cli("models", "--cfg", path)
    assert_one_line_error(res, f"line {line}:", phrase)


def test_attack_models_input_of_2_20_square_is_refused(tmp_path: Path) -> None:
    path, _, _ = _huge_cfg(tmp_path, "conv-2^40-params")
    res = run_cli("models", "--cfg", path, "--input", "1048576x1048576x1")
    assert_one_line_error(res, "values per record")


def test_attack_train_with_a_huge_cfg_is_one_line_and_loses_nothing(
    ws: dict[str, Path], tmp_path: Path
) -> None:
    # The cfg fits the data (4x4x1 records); its one convolution has 2**40 weights.
    path = tmp_path / "huge.cfg"
    path.write_text(_NET.format(h=4, w=4, c=1) + _HUGE["conv-2^40-params"][0])
    line = 6
    before = _snapshot(ws["dir"])
    args = _train(ws, "--steps", "2")
    args[args.index("--model") + 1] = str(path)
    res = run_cli(*args)
    assert_one_line_error(res, f"line {line}:", "parameters")
    assert _snapshot(ws["dir"]) == before


def test_layer_sizes_at_the_cap_still_build(tmp_path: Path) -> None:
    # 2**31 values per record, and a layer of almost 2**31 weights, are allowed (meta device).
    cfg = tmp_path / "cap.cfg"
    cfg.write_text("[net]\nheight=32768\nwidth=32768\nchannels=2\n[avgpool]\n"
                   "[connected]\noutput=1048576\n[connected]\noutput=2047\n"
                   "batch_normalize=1\n[softmax]\n")  # fmt: skip
    with torch.device("meta"):
        model = load_cfg(cfg)
    assert model.input_shape == (2, 32768, 32768)
    assert model.layers[-2].params == 2**20 * 2047 + 2 * 2047


# --------------------------------------------------------------------------- item 12: labels


def _seal_csv(ws: dict[str, Path], labels: list[int]) -> Path:
    csv = ws["dir"] / "bad.csv"
    rows = ["a,b,c,label"] + [f"{i % 7},{i % 5},{i % 3},{y}" for i, y in enumerate(labels)]
    csv.write_text("\n".join(rows) + "\n")
    out = ws["dir"] / "csv.pld"
    res = run_cli("seal", "--key", ws["key"], "--out", out, "--csv", csv, "--label-column",
                  "label")  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def test_attack_csv_label_minus_one_is_one_line(ws: dict[str, Path]) -> None:
    ws["csv"] = _seal_csv(ws, [0, 1, 2, -1] * 25)
    before = _snapshot(ws["dir"])
    res = run_cli(*_train(ws, "--steps", "3", data="csv"))
    err = assert_one_line_error(res, "-1")
    assert "label" in err and "IndexError" not in err and "internal error" not in err
    assert _snapshot(ws["dir"]) == before


def test_attack_csv_label_minus_one_with_num_classes_is_one_line(ws: dict[str, Path]) -> None:
    ws["csv"] = _seal_csv(ws, [0, 1, 2, -1] * 25)
    res = run_cli(*_train(ws, "--steps", "3", "--num-classes", "3", data="csv"))
    assert_one_line_error(res, "label -1", "3 classes")


def test_label_classes_refuses_a_negative_label(ws: dict[str, Path]) -> None:
    ws["csv"] = _seal_csv(ws, [0, 1, 2, -1] * 25)
    key = MasterKey.load(ws["key"])
    with SealedDataset(ws["csv"], key) as ds, pytest.raises(ConfigError, match="label -1"):
        label_classes(ds)


def test_attack_num_classes_2_on_ten_classes_is_one_line(ws: dict[str, Path]) -> None:
    before = _snapshot(ws["dir"])
    res = run_cli(*_train(ws, "--steps", "3", "--num-classes", "2"))
    assert_one_line_error(res, "2 classes", "--num-classes")
    # The job failed on its first batch: nothing was committed, nothing else changed.
    after = _snapshot(ws["dir"])
    after.pop("m.plm", None)
    assert after == before


def test_attack_bad_label_mid_training_keeps_the_last_committed_step(
    ws: dict[str, Path],
) -> None:
    # Labels 0/1 except one 7 in the 5th batch (records 80..99): with --shuffle none
    # steps 1-4 commit, step 5 is refused before its update.
    key = MasterKey.load(ws["key"])
    x = np.random.default_rng(1).integers(0, 255, size=(200, 4, 4), dtype=np.uint8)
    y = (np.arange(200) % 2).astype(np.int64)
    y[91] = 7
    seal_dataset(ws["dir"] / "late.pld", key, {"image": x, "label": y})
    ws["late"] = ws["dir"] / "late.pld"
    args = _train(ws, "--steps", "8", "--num-classes", "2", "--shuffle", "none", data="late")
    res = run_cli(*args)
    assert_one_line_error(res, "label 7", "2 classes")
    with Mirror(ws["mirror"], key, readonly=True) as m:
        assert m.info().step == 4
        m.verify()
    # The committed state is intact and is the uninterrupted run's step 4.
    with SealedDataset(ws["late"], key) as ds:
        spec, _ = build_job("mlp", ds, 2, 0)
        with Mirror(ws["mirror"], key, readonly=True) as m:
            assert m.restore_model(spec.module) == 4


def test_fit_refuses_labels_outside_the_class_count(ws: dict[str, Path]) -> None:
    key = MasterKey.load(ws["key"])
    with SealedDataset(ws["ten"], key) as ds:
        spec, _ = build_job("mlp", ds, 2, 0)  # 2 outputs for 10 classes
        opt = spec.make_optimizer(None)
        common = {"loss_fn": spec.loss, "dataset": ds, "batch_size": 20, "steps": 2,
                  "prepare": spec.prepare, "split": spec.split}  # fmt: skip
        # Told the class count: refused before the forward pass.
        with pytest.raises(ConfigError, match=r"label [2-9].*2 classes"):
            fit(spec.module, opt, num_classes=2, **common)  # type: ignore[arg-type]
        # Not told: the class count is the model's output size; torch's error is
        # not what the user sees.
        with pytest.raises(ConfigError, match=r"label [2-9].*2 classes") as ei:
            fit(spec.module, opt, **common)  # type: ignore[arg-type]
        assert not isinstance(ei.value, IndexError)
        with pytest.raises(ConfigError, match=r"label [2-9].*2 classes"):
            evaluate(spec.module, ds, loss_fn=spec.loss, prepare=spec.prepare, num_classes=2)
        with pytest.raises(ConfigError, match=r"label [2-9].*2 classes"):
            evaluate(spec.module, ds, loss_fn=spec.loss, prepare=spec.prepare)


def test_fit_refuses_a_label_torch_would_ignore(ws: dict[str, Path]) -> None:
    # cross_entropy silently skips -100 (its ignore_index): the label is still wrong.
    x = torch.zeros(40, 4)
    y = torch.zeros(40, dtype=torch.int64)
    y[5] = -100
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(ConfigError, match="label -100"):
        fit(model, opt, loss_fn=nn.functional.cross_entropy, dataset=ds, batch_size=10,
            steps=4, shuffle=False, num_classes=3)  # fmt: skip


def test_attack_evaluate_with_too_few_classes_is_one_line(ws: dict[str, Path]) -> None:
    key = MasterKey.load(ws["key"])
    x = np.random.default_rng(1).integers(0, 255, size=(100, 4, 4), dtype=np.uint8)
    seal_dataset(ws["dir"] / "two.pld", key, {"image": x, "label": np.arange(100) % 2})
    ws["two"] = ws["dir"] / "two.pld"
    assert run_cli(*_train(ws, "--steps", "2", data="two")).exit_code == 0
    before = _snapshot(ws["dir"])
    res = run_cli("evaluate", "--key", ws["key"], "--data", ws["ten"], "--mirror", ws["mirror"],
                  "--model", "mlp", "--num-classes", "2")  # fmt: skip
    assert_one_line_error(res, "2 classes", "--num-classes")
    assert _snapshot(ws["dir"]) == before


def test_tiny_lm_tokens_outside_the_vocabulary(ws: dict[str, Path]) -> None:
    # The first token of a record is input only: the embedding would fail on it.
    tokens = np.ones((64, 9), dtype=np.int64)
    tokens[:, 0] = 50
    key = MasterKey.load(ws["key"])
    seal_dataset(ws["dir"] / "lm.pld", key, {"tokens": tokens})
    ws["lm"] = ws["dir"] / "lm.pld"
    args = _train(ws, "--steps", "2", "--num-classes", "8", data="lm")
    args[args.index("--model") + 1] = "tiny-lm"
    res = run_cli(*args)
    assert_one_line_error(res, "50", "8")


# --------------------------------------------------------------------------- item 12: lr


@pytest.mark.parametrize("lr", ["1e300", "1e400", "nan", "inf", "-inf", "0", "-0.1", "5e3"])
def test_attack_bad_learning_rate_is_one_line(ws: dict[str, Path], lr: str) -> None:
    before = _snapshot(ws["dir"])
    res = run_cli(*_train(ws, "--steps", "2", "--lr", lr))
    assert_one_line_error(res, "--lr", "learning rate")
    assert _snapshot(ws["dir"]) == before


@pytest.mark.parametrize("lr", [1e300, math.nan, math.inf, 0.0, -0.1])
def test_fit_refuses_a_learning_rate_the_optimizer_cannot_use(lr: float) -> None:
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["lr"] = lr  # SGD's constructor itself refuses only negatives
    ds = torch.utils.data.TensorDataset(torch.zeros(40, 4), torch.zeros(40, dtype=torch.int64))
    with pytest.raises(ConfigError, match="learning rate"):
        fit(model, opt, loss_fn=nn.functional.cross_entropy, dataset=ds, batch_size=10, steps=2)


def test_fit_refuses_a_schedule_that_overflows_the_learning_rate(
    shm_dir: Path, key: MasterKey
) -> None:
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1e300 if k >= 2 else 1.0)
    ds = torch.utils.data.TensorDataset(torch.zeros(40, 4), torch.zeros(40, dtype=torch.int64))
    with Mirror(shm_dir / "s.plm", key) as m:
        with pytest.raises(ConfigError, match=r"learning rate.*1e\+299 at step 3"):
            fit(model, opt, loss_fn=nn.functional.cross_entropy, dataset=ds, batch_size=10,
                steps=4, scheduler=sched, mirror=m)  # fmt: skip
        # Refused before step 3's update: the mirror keeps step 2, and it verifies.
        assert m.info().step == 2
        m.verify()


@pytest.mark.parametrize(
    ("net", "expect"),
    [
        ("learning_rate=1e300", "line 2: learning_rate"),
        ("learning_rate=0.1\npolicy=steps\nsteps=10,20\nscales=1e200,1e200", "line 5: scales"),
    ],
)
def test_cfg_learning_rate_the_optimizer_cannot_use(tmp_path: Path, net: str, expect: str) -> None:
    cfg = tmp_path / "lr.cfg"
    cfg.write_text(f"[net]\n{net}\nheight=4\nwidth=4\nchannels=1\n[connected]\noutput=2\n"
                   "[softmax]\n")  # fmt: skip
    with pytest.raises(DarknetConfigError, match=expect):
        load_cfg(cfg)


# --------------------------------------------------------------------------- issue 18 item 2


def test_resume_with_other_threads_is_refused(ws: dict[str, Path]) -> None:
    assert run_cli(*_train(ws, "--steps", "2")).exit_code == 0
    key = MasterKey.load(ws["key"])
    with Mirror(ws["mirror"], key, readonly=True) as m:
        before = m.info().step
    args = _train(ws, "--steps", "2")
    args[args.index("--threads") + 1] = "2"
    res = run_cli(*args)
    assert_one_line_error(res, "threads=1 (now 2)", "other settings")
    with Mirror(ws["mirror"], key, readonly=True) as m:
        assert m.info().step == before
    # The same thread count resumes.
    res = run_cli(*_train(ws, "--steps", "2"))
    assert res.exit_code == 0 and "resumed after step 2" in res.output, res.output


def test_a_mirror_without_the_recorded_thread_count_still_resumes(ws: dict[str, Path]) -> None:
    # Write the mirror as a version that did not record the thread count did.
    key = MasterKey.load(ws["key"])
    with SealedDataset(ws["ten"], key) as ds:
        spec, classes = build_job("mlp", ds, None, 0)
        opt = spec.make_optimizer(None)
        with Mirror(ws["mirror"], key) as m:
            fit(spec.module, opt, loss_fn=spec.loss, dataset=ds, batch_size=20, steps=4,
                mirror=m, prepare=spec.prepare, split=spec.split,
                job_info={"model": "mlp", "lr": None, "classes": classes})  # fmt: skip
        spec2, _ = build_job("mlp", ds, None, 0)
        opt2 = spec2.make_optimizer(None)
        state = training_state(
            spec2.module, opt2, scheduler=spec2.make_scheduler(opt2, 4),
            sampler=make_sampler(ds, seed=0, shuffle="chunk"),
            losses=torch.zeros(4, dtype=torch.float64), total=4,
        )  # fmt: skip
        with Mirror(ws["mirror"], key) as m:
            assert m.restore(state) == 4
            state["job"].pop("threads", None)
            m.save(state, step=4)
    res = run_cli(*_train(ws, "--steps", "4"))
    assert res.exit_code == 0, res.output
    assert "resumed after step 4" in res.output
