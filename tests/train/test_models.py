"""Built-in models and build_model: sizes, inputs, losses, schedules, determinism."""

from __future__ import annotations

import json
import math
from importlib.resources import files

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plinius.errors import ConfigError, DarknetConfigError, StorageError
from plinius.models import (
    CNN_SIZES_MB,
    MB,
    ModelSpec,
    build_model,
    list_models,
    reference_cnn,
    tiny_corpus,
)
from plinius.models import _cnn_params as cnn_params

SMALL = ["mlp", "cnn-tiny", "tiny-lm"]


def _spec(name: str, **kw: object) -> ModelSpec:
    if name == "tiny-lm":
        return build_model(name, input_shape=(17,), num_classes=32)
    return build_model(name, input_shape=(28, 28), num_classes=10, **kw)  # type: ignore[arg-type]


def _batch(spec: ModelSpec, n: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    if spec.name == "tiny-lm":
        return (torch.randint(0, 32, (n, 17), generator=g),)
    return (torch.randint(0, 256, (n, 28, 28), generator=g).to(torch.uint8), torch.arange(n) % 10)


def _step(spec: ModelSpec, fields: tuple[torch.Tensor, ...]) -> torch.Tensor:
    opt = spec.make_optimizer(None)
    x, y = spec.split(fields)
    loss = spec.loss(spec.module(spec.prepare(x)), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


# --------------------------------------------------------------------------- listing, sizes


def test_list_models_names_and_sizes() -> None:
    entries = {e.name: e for e in list_models()}
    expected = {"mlp", "cnn-tiny", "tiny-lm", *(f"cnn-{mb}mb" for mb in CNN_SIZES_MB)}
    assert set(entries) == expected
    assert entries["cnn-tiny"].param_mb < 1.0
    for mb in CNN_SIZES_MB:
        size = entries[f"cnn-{mb}mb"].param_mb
        assert abs(size - mb) / mb < 0.05, (mb, size)
    assert all(e.description for e in entries.values())


@pytest.mark.parametrize("mb", CNN_SIZES_MB)
def test_cnn_sizes_match_their_names(mb: int) -> None:
    # Counted on the meta device: the real tensors are never allocated.
    with torch.device("meta"):
        spec = build_model(f"cnn-{mb}mb", input_shape=(28, 28), num_classes=10)
    assert abs(spec.param_bytes() / MB - mb) / mb < 0.05


def test_reference_cnn_arbitrary_size_and_closed_form() -> None:
    with torch.device("meta"):
        big = reference_cnn(300)
        odd = reference_cnn(5, in_channels=3, num_classes=7)
    n = sum(p.numel() for p in big.parameters())
    assert abs(n * 4 / MB - 300) / 300 < 0.05
    assert abs(sum(p.numel() for p in odd.parameters()) * 4 / MB - 5) / 5 < 0.05
    # The closed form used to pick the width agrees with a real build.
    real = reference_cnn(1.0, in_channels=2, num_classes=4)
    width = real[-3].in_channels  # the 1x1 convolution's input
    assert sum(p.numel() for p in real.parameters()) == cnn_params(2, 4, width)
    with pytest.raises(ConfigError):
        reference_cnn(0.001)
    with pytest.raises(ConfigError):
        reference_cnn(-1)


def test_the_big_cnn_builds_for_real() -> None:
    spec = build_model("cnn-100mb", input_shape=(28, 28), num_classes=10)
    assert abs(spec.param_bytes() / MB - 100) < 5
    out = spec.module.eval()(spec.prepare(torch.zeros(1, 28, 28, dtype=torch.uint8)))
    assert out.shape == (1, 10)


# --------------------------------------------------------------------------- training a step


@pytest.mark.parametrize("name", [*SMALL, "cnn-10mb"])
def test_builtins_train_a_step(name: str) -> None:
    torch.manual_seed(0)
    spec = _spec(name)
    before = [p.detach().clone() for p in spec.module.parameters()]
    loss = _step(spec, _batch(spec, 2 if name == "cnn-10mb" else 4))
    assert loss.dim() == 0 and torch.isfinite(loss)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, spec.module.parameters()))
    assert changed > 0
    assert spec.hyper["batch"] in (32, 128)


@pytest.mark.parametrize("name", SMALL)
def test_same_seed_same_parameters(name: str) -> None:
    torch.manual_seed(42)
    a = _spec(name).module.state_dict()
    torch.manual_seed(42)
    b = _spec(name).module.state_dict()
    torch.manual_seed(43)
    c = _spec(name).module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("shape", [(8, 8), (1, 1), (28, 28), (3, 5, 7), (3, 4, 4)])
def test_cnn_accepts_small_and_odd_inputs(shape: tuple[int, ...]) -> None:
    spec = build_model("cnn-tiny", input_shape=shape, num_classes=3)
    x = torch.randint(0, 255, (2, *shape), dtype=torch.uint8)
    out = spec.module(spec.prepare(x))
    assert out.shape == (2, 3)
    spec.loss(out, torch.tensor([0, 2])).backward()


def test_cnn_rejects_records_that_are_not_images() -> None:
    with pytest.raises(ConfigError, match="image records"):
        build_model("cnn-tiny", input_shape=(10,), num_classes=3)
    # 4 tabular columns are not a 2x2 image (nor 64 a flat 8x8 one): the mlp is named.
    for flat in ((4,), (64,)):
        with pytest.raises(ConfigError, match=r"1-D records .*--model mlp"):
            build_model("cnn-tiny", input_shape=flat, num_classes=3)
    with pytest.raises(ConfigError, match="image records"):
        build_model("cnn-tiny", input_shape=(2, 3, 4, 5), num_classes=3)


@pytest.mark.parametrize("shape", [(16, 16, 3), (28, 28, 1), (32, 24, 4)])
def test_cnn_refuses_channels_last_records(shape: tuple[int, int, int]) -> None:
    h, w, c = shape
    for name in ("cnn-tiny", "cnn-10mb"):
        with pytest.raises(ConfigError) as err:
            build_model(name, input_shape=shape, num_classes=3)
        msg = str(err.value)
        assert "channels-last" in msg and f"({c}, {h}, {w})" in msg and "\n" not in msg


def test_cnn_builds_channels_first_records_with_their_channels() -> None:
    spec = build_model("cnn-tiny", input_shape=(3, 16, 16), num_classes=3)
    first = next(m for m in spec.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 3 and spec.input_shape == (3, 16, 16)


# --------------------------------------------------------------------------- prepare, loss


def test_prepare_scales_and_adds_the_channel() -> None:
    spec = build_model("cnn-tiny", input_shape=(8, 8), num_classes=10)
    assert spec.input_shape == (1, 8, 8)
    x = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    y = spec.prepare(x)
    assert y.dtype == torch.float32 and y.shape == (2, 1, 8, 8) and torch.all(y == 1.0)
    i16 = torch.full((1, 8, 8), 32767, dtype=torch.int16)
    assert torch.all(spec.prepare(i16) == 1.0)
    f = torch.full((1, 8, 8), 0.25, dtype=torch.float64)
    assert torch.all(spec.prepare(f) == 0.25) and spec.prepare(f).dtype == torch.float32
    digits = build_model("cnn-tiny", input_shape=(8, 8), num_classes=10, input_scale=16)
    assert digits.input_shape == (1, 8, 8)
    z = digits.prepare(torch.full((3, 8, 8), 16, dtype=torch.uint8))
    assert z.shape == (3, 1, 8, 8) and torch.all(z == 1.0)
    mlp = build_model("mlp", input_shape=(8, 8), num_classes=10, input_scale=16)
    assert mlp.input_shape == (64,)
    assert mlp.prepare(torch.full((2, 8, 8), 8, dtype=torch.uint8)).shape == (2, 64)


def test_classification_loss_is_cross_entropy() -> None:
    spec = _spec("mlp")
    out, y = torch.randn(5, 10), torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    torch.testing.assert_close(spec.loss(out, y), F.cross_entropy(out, y.long()))
    assert spec.split((torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)))[1].item() == 2.0


# --------------------------------------------------------------------------- optimizer, schedule


def test_cnn_optimizer_and_poly_schedule() -> None:
    spec = _spec("cnn-tiny")
    opt = spec.make_optimizer(None)
    assert isinstance(opt, torch.optim.SGD)
    groups = opt.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0005, 0.0]
    assert all(g["lr"] == 0.1 and g["momentum"] == 0.9 for g in groups)
    # Decay on convolution weights only, as Darknet: BN scales/shifts and biases are free.
    assert all(p.dim() == 4 for p in groups[0]["params"])
    assert all(p.dim() == 1 for p in groups[1]["params"])
    assert spec.make_optimizer(0.01).param_groups[0]["lr"] == 0.01
    sched = spec.make_scheduler(opt, 10)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * (1 - k / 10) ** 4 for k in range(1, 11)])
    json.dumps(sched.state_dict())  # plain data: mirrors without pickle


def test_constant_schedules_are_none() -> None:
    for name in ("mlp", "tiny-lm"):
        spec = _spec(name)
        assert spec.make_scheduler(spec.make_optimizer(None), 10) is None


# --------------------------------------------------------------------------- the LM


def test_tiny_corpus_is_deterministic() -> None:
    a = tiny_corpus(8, 12, vocab=20, seed=1)
    assert a.shape == (8, 13) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 20
    assert np.array_equal(a, tiny_corpus(8, 12, vocab=20, seed=1))
    assert not np.array_equal(a, tiny_corpus(8, 12, vocab=20, seed=2))
    with pytest.raises(ConfigError):
        tiny_corpus(0, 12)


def test_tiny_lm_shapes_split_and_causality() -> None:
    torch.manual_seed(0)
    spec = build_model("tiny-lm", input_shape=(9,), num_classes=16)
    assert spec.input_shape == (8,)
    tokens = torch.tensor(tiny_corpus(3, 8, vocab=16))
    x, y = spec.split((tokens,))
    assert torch.equal(x, tokens[:, :-1]) and torch.equal(y, tokens[:, 1:])
    xp = spec.prepare(x.to(torch.int32))
    assert xp.dtype == torch.int64
    out = spec.module.eval()(xp)
    assert out.shape == (3, 8, 16)
    changed = xp.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 16
    out2 = spec.module(changed)
    torch.testing.assert_close(out[:, :5], out2[:, :5])  # the future never leaks back
    assert not torch.allclose(out[:, 5:], out2[:, 5:])
    with pytest.raises(ConfigError, match="integer token ids"):
        spec.prepare(torch.zeros(1, 8))
    with pytest.raises(ConfigError, match="T\\+1 tokens"):
        build_model("tiny-lm", input_shape=(4, 4), num_classes=16)


def test_tiny_lm_learns_the_corpus() -> None:
    torch.manual_seed(0)
    data = torch.tensor(tiny_corpus(256, 16, vocab=32, seed=0))
    spec = build_model("tiny-lm", input_shape=(17,), num_classes=32)
    opt = spec.make_optimizer(None)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y = spec.split((data[torch.randint(0, 256, (32,), generator=g)],))
        loss = spec.loss(spec.module(spec.prepare(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * math.log(32)


def test_cnn_tiny_learns_digits() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.uint8)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    spec = build_model("cnn-tiny", input_shape=(8, 8), num_classes=10, input_scale=16)
    opt = spec.make_optimizer(None)
    sched = spec.make_scheduler(opt, 100)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, 1500, (64,), generator=g)
        loss = spec.loss(spec.module(spec.prepare(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert sched is not None
        sched.step()
    spec.module.eval()
    with torch.no_grad():
        acc = (spec.module(spec.prepare(x[1500:])).argmax(1) == y[1500:]).float().mean()
    assert acc > 0.7


# --------------------------------------------------------------------------- build_model


def test_build_model_from_a_cfg() -> None:
    path = str(files("plinius") / "cfg" / "mnist.cfg")
    spec = build_model(path, input_shape=(28, 28), num_classes=10)
    assert spec.name == "mnist.cfg" and spec.input_shape == (1, 28, 28)
    assert spec.hyper["learning_rate"] == 0.1 and spec.hyper["batch"] == 128
    assert spec.hyper["power"] == 4.0 and spec.hyper["max_batches"] == 500
    opt = spec.make_optimizer(None)
    assert opt.param_groups[0]["weight_decay"] == 0.0005
    sched = spec.make_scheduler(opt, 10)
    assert sched is not None
    # poly over the cfg's max_batches (500), not over the job's 10 steps
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 1 / 500) ** 4)
    assert spec.make_optimizer(0.5).param_groups[0]["lr"] == 0.5
    _step(spec, _batch(spec))
    with pytest.raises(DarknetConfigError, match=r"outputs 10 values .* 3 classes"):
        build_model(path, input_shape=(28, 28), num_classes=3)


def test_build_model_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnet'.*cnn-tiny"):
        build_model("resnet", input_shape=(28, 28), num_classes=10)
    with pytest.raises(ConfigError, match="input shape"):
        build_model("mlp", input_shape=(0, 28), num_classes=10)
    with pytest.raises(ConfigError, match="input shape"):
        build_model("mlp", input_shape=(), num_classes=10)
    with pytest.raises(ConfigError, match="classes"):
        build_model("mlp", input_shape=(28, 28), num_classes=0)
    with pytest.raises(ConfigError, match="input scale"):
        build_model("mlp", input_shape=(28, 28), num_classes=10, input_scale=0)
    with pytest.raises(ConfigError, match="input scale"):
        build_model("mlp", input_shape=(28, 28), num_classes=10, input_scale=float("nan"))
    with pytest.raises(StorageError, match="cannot read"):
        build_model("no/such/model.cfg", input_shape=(28, 28), num_classes=10)
