"""``plinius models``: the listing, a cfg's layer table, and one-line errors."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
from click.testing import Result

from plinius.models import CNN_SIZES_MB
from tests.conftest import assert_one_line_error, run_cli

MNIST_CFG = str(files("plinius") / "cfg" / "mnist.cfg")


def _run(*args: str) -> Result:
    return run_cli("models", *args)


def test_help() -> None:
    res = _run("--help")
    assert res.exit_code == 0
    assert "--cfg" in res.output and "HxWxC" in res.output and "built-in" in res.output


def test_lists_every_builtin_with_its_size() -> None:
    res = _run()
    assert res.exit_code == 0, res.output
    for name in ("mlp", "cnn-tiny", "tiny-lm", *(f"cnn-{mb}mb" for mb in CNN_SIZES_MB)):
        assert name in res.output
    assert "99.9" in res.output or "100.0" in res.output  # cnn-100mb's parameter MB
    assert "params MB" in res.output
    assert "mnist.cfg" in res.output and "plinius-5layer.cfg" in res.output


def test_cfg_prints_layers_shapes_and_parameter_count() -> None:
    res = _run("--cfg", MNIST_CFG)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "mnist.cfg: 9 layers, input 28 x 28 x 1" in out
    assert "convolutional" in out and "maxpool" in out and "softmax" in out
    assert "14 x  14 x   32" in out  # the first pool's output
    assert "parameters: 94,186" in out
    assert "policy poly (power 4, max_batches 500)" in out
    assert "ignored: exposure, hue, max_crop, min_crop, saturation" in out


def test_cfg_with_another_input_size() -> None:
    res = _run("--cfg", MNIST_CFG, "--input", "8x8x1")
    assert res.exit_code == 0, res.output
    assert "input 8 x 8 x 1" in res.output and "4 x   4 x   32" in res.output
    assert "parameters: 94,186" in res.output  # global pooling: size-independent


def test_bad_cfg_is_one_line_naming_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cfg"
    bad.write_text("[net]\nheight=4\nwidth=4\nchannels=1\n[convolutional]\nfliters=3\n[softmax]\n")
    err = assert_one_line_error(_run("--cfg", str(bad)))
    assert "bad.cfg line 6: unknown key 'fliters'" in err
    bad.write_text("[net]\nheight=4\nwidth=4\nchannels=1\n[yolo]\n")
    assert "line 5: unknown or unsupported section [yolo]" in assert_one_line_error(
        _run("--cfg", str(bad))
    )


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--cfg", "missing.cfg"], "cannot read the model cfg"),
        (["--cfg", MNIST_CFG, "--input", "28x28"], "is not HxWxC"),
        (["--cfg", MNIST_CFG, "--input", "1x1x0"], "between 1 and"),
        (["--input", "8x8x1"], "--input applies to --cfg"),
    ],
)
def test_bad_input_is_one_line(args: list[str], expect: str) -> None:
    assert expect in assert_one_line_error(_run(*args))


def test_a_cfg_that_shrinks_to_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "small.cfg"
    cfg.write_text(
        "[net]\nheight=28\nwidth=28\nchannels=1\n[convolutional]\nfilters=2\nsize=5\n[softmax]\n"
    )
    assert "line 7: a 5x5 kernel does not fit the 3x3 input" in assert_one_line_error(
        _run("--cfg", str(cfg), "--input", "3x3x1")
    )
