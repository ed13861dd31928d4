"""Darknet cfg files: parsing, Darknet's shape rules, heads, policies, errors."""

from __future__ import annotations

import json
import math
import re
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plinius.darknet import (
    DarknetModel,
    LRPolicy,
    build_network,
    darknet_sgd,
    load_cfg,
    parse_cfg,
    parse_input_spec,
)
from plinius.errors import DarknetConfigError, PliniusError, StorageError

NET = """[net]
batch=4
height={h}
width={w}
channels={c}
"""


def build(body: str, h: int = 28, w: int = 28, c: int = 1, **kw: object) -> DarknetModel:
    text = NET.format(h=h, w=w, c=c) + body
    return build_network(parse_cfg(text, "t.cfg"), "t.cfg", **kw)  # type: ignore[arg-type]


def shapes(model: DarknetModel) -> list[tuple[int, int, int]]:
    return [layer.out_shape for layer in model.layers]


def forward_shape(model: DarknetModel, n: int = 2) -> tuple[int, ...]:
    c, h, w = model.input_shape
    return tuple(model.module(torch.randn(n, c, h, w)).shape)


# --------------------------------------------------------------------------- parsing


def test_comments_blank_lines_and_whitespace_are_ignored() -> None:
    text = """
# a comment
; another
[net]
 batch = 8     
height=4
width=4
channels=1
learning_rate = 0.05

[convolutional]
filters=2
size=3
pad=1
activation=linear
[avgpool]
[softmax]
"""  # noqa: W291
    m = build_network(parse_cfg(text, "c.cfg"), "c.cfg")
    assert m.net.batch == 8 and m.net.learning_rate == 0.05
    assert [layer.kind for layer in m.layers] == ["convolutional", "avgpool", "softmax"]
    assert [layer.line for layer in m.layers] == [11, 16, 17]


def test_net_defaults_are_darknets() -> None:
    m = build("[connected]\noutput=3\n[softmax]\n")
    net = m.net
    assert (net.batch, net.subdivisions, net.learning_rate, net.momentum, net.decay) == (
        4,
        1,
        0.001,
        0.9,
        0.0001,
    )
    assert net.policy == LRPolicy("constant", 4.0)
    hyper = net.hyper()
    assert hyper["batch"] == 4 and hyper["policy"] == "constant"


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("conv", "expect"),
    [
        ("size=3\npad=1", (5, 28, 28)),  # pad=1 -> padding size/2
        ("size=3\npad=0", (5, 26, 26)),  # no padding
        ("size=5\npadding=2", (5, 28, 28)),  # explicit padding
        ("size=5\npadding=1\npad=1", (5, 28, 28)),  # pad=1 wins over padding
        ("size=3\nstride=2\npad=1", (5, 14, 14)),  # (28 + 2 - 3) / 2 + 1
        ("size=4\nstride=3", (5, 9, 9)),  # (28 - 4) / 3 + 1
        ("size=1\npad=1", (5, 28, 28)),  # 1/2 = 0 padding
    ],
)
def test_convolution_output_shapes(conv: str, expect: tuple[int, int, int]) -> None:
    m = build(f"[convolutional]\nfilters=5\n{conv}\nactivation=leaky\n[softmax]\n")
    assert shapes(m)[0] == expect
    assert forward_shape(m) == (2, math.prod(expect))


def test_convolution_parameters_with_and_without_batch_norm() -> None:
    m = build(
        "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
        "[convolutional]\nfilters=4\nsize=1\nactivation=linear\n[avgpool]\n[softmax]\n",
        c=3,
    )
    # BN: no conv bias, scale + shift per filter; no BN: a bias per filter.
    assert [layer.params for layer in m.layers[:2]] == [3 * 9 * 8 + 2 * 8, 8 * 4 + 4]
    assert m.param_count() == sum(layer.params for layer in m.layers)


@pytest.mark.parametrize(
    ("pool", "size_in", "expect"),
    [
        ("size=2\nstride=2", 28, 14),
        ("size=2\nstride=2", 7, 4),  # default padding 1: (7 + 1 - 2) / 2 + 1
        ("size=2\nstride=2", 1, 1),
        ("size=3\nstride=1", 7, 7),  # default padding 2
        ("size=2\nstride=2\npadding=0", 7, 3),
        ("size=3\nstride=2\npadding=2", 8, 4),
        ("stride=2", 9, 5),  # size defaults to stride
    ],
)
def test_maxpool_output_shapes(pool: str, size_in: int, expect: int) -> None:
    m = build(f"[maxpool]\n{pool}\n[softmax]\n", h=size_in, w=size_in, c=2)
    assert shapes(m)[0] == (2, expect, expect)
    assert forward_shape(m) == (2, 2 * expect * expect)


def _darknet_maxpool(x: np.ndarray, size: int, stride: int, padding: int) -> np.ndarray:
    """Darknet's forward_maxpool_layer, transcribed as loops."""
    n, c, h, w = x.shape
    oh, ow = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
    off = -(padding // 2)
    out = np.empty((n, c, oh, ow), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            best = np.full((n, c), -np.inf, dtype=x.dtype)
            for dy in range(size):
                for dx in range(size):
                    y, xx = off + i * stride + dy, off + j * stride + dx
                    if 0 <= y < h and 0 <= xx < w:
                        best = np.maximum(best, x[:, :, y, xx])
            out[:, :, i, j] = best
    return out


@pytest.mark.parametrize(
    ("size", "stride", "padding", "hw"),
    [(2, 2, 1, 7), (2, 2, 0, 7), (3, 1, 2, 5), (3, 2, 2, 8), (3, 2, 4, 6), (2, 1, 1, 3)],
)
def test_maxpool_values_match_darknet(size: int, stride: int, padding: int, hw: int) -> None:
    m = build(
        f"[maxpool]\nsize={size}\nstride={stride}\npadding={padding}\n[softmax]\n", h=hw, w=hw, c=3
    )
    x = torch.randn(2, 3, hw, hw, generator=torch.Generator().manual_seed(size + hw))
    got = m.module.layers[0](x)
    want = _darknet_maxpool(x.numpy(), size, stride, padding)
    np.testing.assert_array_equal(got.numpy(), want)
    assert torch.isfinite(got).all()


def test_connected_after_convolution_flattens_channel_major() -> None:
    m = build(
        "[convolutional]\nfilters=3\nsize=3\nstride=2\nactivation=relu\n"
        "[connected]\noutput=7\nactivation=leaky\n[connected]\noutput=10\nactivation=linear\n"
        "[softmax]\n",
        h=9,
        w=9,
    )
    assert shapes(m) == [(3, 4, 4), (7, 1, 1), (10, 1, 1), (10, 1, 1)]
    assert m.layers[1].params == 3 * 4 * 4 * 7 + 7
    assert forward_shape(m, 5) == (5, 10)
    lin = m.module.layers[1].linear
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(
        m.module.layers[1](x).flatten(), F.leaky_relu(lin(x.reshape(1, -1)), 0.1).flatten()
    )


def test_connected_with_batch_norm_and_dropout_and_avgpool() -> None:
    m = build(
        "[convolutional]\nfilters=6\nsize=3\npad=1\nactivation=logistic\n[dropout]\nprobability=.25\n"
        "[avgpool]\n[connected]\noutput=4\nbatch_normalize=1\nactivation=linear\n[softmax]\ngroups=1\n"
    )
    assert shapes(m) == [(6, 28, 28), (6, 28, 28), (6, 1, 1), (4, 1, 1), (4, 1, 1)]
    assert m.layers[3].params == 6 * 4 + 2 * 4  # no linear bias under batch norm
    drop = m.module.layers[1]
    assert isinstance(drop, torch.nn.Dropout) and drop.p == 0.25
    out = m.module(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 4)


def test_darknet_activations_and_defaults() -> None:
    m = build("[convolutional]\nfilters=1\nsize=1\n[connected]\noutput=2\n[softmax]\n")
    conv = m.module.layers[0]
    assert isinstance(conv[-1], torch.nn.Sigmoid)  # Darknet's default: logistic
    assert isinstance(m.module.layers[1].act, torch.nn.Sigmoid)
    m = build("[convolutional]\nfilters=1\nsize=1\nactivation=leaky\n[softmax]\n")
    leaky = m.module.layers[0][-1]
    assert isinstance(leaky, torch.nn.LeakyReLU) and leaky.negative_slope == 0.1


def test_groups() -> None:
    m = build(
        "[convolutional]\nfilters=4\ngroups=2\nsize=3\npad=1\nactivation=linear\n[softmax]\n", c=2
    )
    assert m.layers[0].params == 4 * 1 * 9 + 4


def test_input_shape_from_data_and_resize() -> None:
    text = "[net]\nbatch=2\n[convolutional]\nfilters=2\nsize=3\nactivation=relu\n[softmax]\n"
    m = build_network(parse_cfg(text, "x.cfg"), "x.cfg", (8, 8))
    assert m.input_shape == (1, 8, 8) and shapes(m)[0] == (2, 6, 6)
    m = build_network(parse_cfg(text, "x.cfg"), "x.cfg", (3, 5, 5))
    assert m.input_shape == (3, 5, 5)
    declared = build("[connected]\noutput=2\n[softmax]\n", input_shape=(784,))
    assert declared.input_shape == (1, 28, 28)  # flat records reshaped, channel-major
    resized = build("[connected]\noutput=2\n[softmax]\n", input_shape=(3, 4, 4), resize=True)
    assert resized.input_shape == (3, 4, 4)
    with pytest.raises(
        DarknetConfigError, match=r"declares channels=1 height=28 width=28 .* \(8, 8\)"
    ):
        build("[connected]\noutput=2\n[softmax]\n", input_shape=(8, 8))
    inputs_only = build_network(
        parse_cfg("[net]\ninputs=5\n[connected]\noutput=2\n[softmax]\n", "i.cfg"), "i.cfg"
    )
    assert inputs_only.input_shape == (5, 1, 1)


def test_records_must_match_the_declared_shape_not_just_the_count() -> None:
    body = "[connected]\noutput=2\n[softmax]\n"
    assert build(body, h=16, w=16, c=3, input_shape=(3, 16, 16)).input_shape == (3, 16, 16)
    # (16, 16, 3) holds as many values as channels=3 height=16 width=16.
    with pytest.raises(DarknetConfigError, match=r"channels-last .* \(3, 16, 16\)"):
        build(body, h=16, w=16, c=3, input_shape=(16, 16, 3))
    with pytest.raises(DarknetConfigError, match=r"other layout"):
        build(body, h=16, w=16, c=3, input_shape=(16, 3, 16))
    # Flat records: unambiguous for one channel (row-major), refused for three.
    assert build(body, h=4, w=4, c=1, input_shape=(16,)).input_shape == (1, 4, 4)
    with pytest.raises(DarknetConfigError, match=r"records are flat"):
        build(body, h=4, w=4, c=3, input_shape=(48,))
    with pytest.raises(DarknetConfigError, match=r"\(4, 4, 3\)"):
        build(body, h=4, w=4, c=1, input_shape=(4, 4, 3))


def test_parse_input_spec() -> None:
    assert parse_input_spec("28x28x1") == (1, 28, 28)
    assert parse_input_spec("8X6x3") == (3, 8, 6)
    for bad in ("28x28", "axbxc", "0x1x1", "1x1x1x1", ""):
        with pytest.raises(DarknetConfigError, match=r"HxWxC|between"):
            parse_input_spec(bad)


# --------------------------------------------------------------------------- heads


def test_softmax_head_is_cross_entropy_with_darknets_gradient() -> None:
    m = build("[connected]\noutput=5\nactivation=linear\n[softmax]\n", h=1, w=1, c=3)
    logits = torch.randn(4, 5, requires_grad=True)
    target = torch.tensor([0, 4, 2, 2])
    loss = m.loss(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    loss.backward()
    # Darknet's delta is truth - p per record, summed over the batch and
    # applied with learning_rate / batch: the mean gradient of p - truth.
    p = logits.detach().softmax(1)
    onehot = F.one_hot(target, 5).float()
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, (p - onehot) / 4)
    # Huge logits stay finite (log-softmax, not log of a softmax).
    big = torch.tensor([[1e4, -1e4, 0.0, 0.0, 0.0]])
    assert torch.isfinite(m.loss(big, torch.tensor([1])))


def test_softmax_then_cost_adds_darknets_second_delta() -> None:
    m = build(
        "[connected]\noutput=3\nactivation=linear\n[softmax]\n[cost]\ntype=sse\nscale=.5\n",
        h=1,
        w=1,
        c=2,
    )
    assert m.head == "softmax+cost" and m.cost_scale == 0.5
    logits, target = torch.randn(6, 3), torch.randint(0, 3, (6,))
    torch.testing.assert_close(m.loss(logits, target), 1.5 * F.cross_entropy(logits, target))
    assert [layer.kind for layer in m.layers][-2:] == ["softmax", "cost"]


def test_cost_without_softmax_is_half_sse() -> None:
    m = build("[connected]\noutput=3\nactivation=linear\n[cost]\n", h=1, w=1, c=2)
    assert m.head == "cost"
    out = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0])
    loss = m.loss(out, target)
    onehot = F.one_hot(target, 3).float()
    torch.testing.assert_close(loss, 0.5 * ((out - onehot) ** 2).sum(1).mean())
    loss.backward()
    assert out.grad is not None
    torch.testing.assert_close(out.grad, (out.detach() - onehot) / 4)


# --------------------------------------------------------------------------- training


def _policy(body: str, total: int = 100) -> list[float]:
    m = build(body + "[connected]\noutput=2\n[softmax]\n")
    return [m.net.policy.factor(k, total) for k in range(12)]


def test_constant_policy() -> None:
    assert _policy("") == [1.0] * 12
    m = build("[connected]\noutput=2\n[softmax]\n")
    opt = darknet_sgd(m.module, 0.1, 0.9, 0.0)
    assert m.net.policy.scheduler(opt, 10) is None


def test_steps_policy_counts_batches_like_darknet() -> None:
    text = NET.format(h=1, w=1, c=1).replace(
        "[net]\n", "[net]\npolicy=steps\nsteps=2,4\nscales=.1,.5\n"
    )
    m = build_network(parse_cfg(text + "[connected]\noutput=2\n[softmax]\n", "s.cfg"), "s.cfg")
    f = [m.net.policy.factor(k, 100) for k in range(6)]
    # update k is Darknet's batch k + 1; the scale applies from its step on.
    assert f == pytest.approx([1.0, 0.1, 0.1, 0.05, 0.05, 0.05])


def test_poly_policy() -> None:
    text = NET.format(h=1, w=1, c=1).replace(
        "[net]\n", "[net]\npolicy=poly\npower=2\nmax_batches=10\n"
    )
    m = build_network(parse_cfg(text + "[connected]\noutput=2\n[softmax]\n", "p.cfg"), "p.cfg")
    pol = m.net.policy
    assert pol.factor(0, 99) == pytest.approx(0.81)  # (1 - 1/10)^2
    assert pol.factor(4, 99) == pytest.approx(0.25)
    assert pol.factor(9, 99) == 0.0 and pol.factor(30, 99) == 0.0  # never grows again
    # Without max_batches the horizon is the job's total steps.
    assert LRPolicy("poly", 4.0).factor(49, 100) == pytest.approx(0.5**4)


def test_burn_in() -> None:
    pol = LRPolicy("constant", power=2.0, burn_in=4)
    assert [pol.factor(k, 10) for k in range(5)] == pytest.approx([1 / 16, 4 / 16, 9 / 16, 1, 1])


def test_scheduler_drives_the_optimizer_and_its_state_is_plain_data() -> None:
    text = NET.format(h=1, w=1, c=1).replace(
        "[net]\n", "[net]\nlearning_rate=0.2\npolicy=steps\nsteps=1,3\nscales=.5,.1\n"
    )
    m = build_network(parse_cfg(text + "[connected]\noutput=2\n[softmax]\n", "s.cfg"), "s.cfg")
    opt = darknet_sgd(m.module, m.net.learning_rate, m.net.momentum, m.net.decay)
    sched = m.net.policy.scheduler(opt, 10)
    assert sched is not None
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01])
    state = sched.state_dict()
    json.dumps(state)  # numbers only: no functions, nothing to pickle
    opt2 = darknet_sgd(m.module, m.net.learning_rate, m.net.momentum, m.net.decay)
    sched2 = m.net.policy.scheduler(opt2, 10)
    assert sched2 is not None
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_darknet_sgd_equals_darknets_update_rule() -> None:
    m = build(
        "[convolutional]\nfilters=3\nsize=3\nbatch_normalize=1\nactivation=leaky\n"
        "[connected]\noutput=4\nactivation=linear\n[softmax]\n",
        h=5,
        w=5,
        c=2,
    )
    torch.manual_seed(1)
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 4, (8,))
    lr, momentum, decay, batch = 0.1, 0.9, 0.01, 8
    params = dict(m.module.named_parameters())
    decayed = {n for n, p in params.items() if n.endswith("weight") and p.dim() > 1}
    assert decayed == {"layers.0.0.weight", "layers.1.linear.weight"}
    ref = {n: p.detach().clone() for n, p in params.items()}
    updates = {n: torch.zeros_like(p) for n, p in ref.items()}
    opt = darknet_sgd(m.module, lr, momentum, decay)
    m.module.train()
    for _ in range(3):
        opt.zero_grad()
        m.loss(m.module(x), y).backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}  # type: ignore[union-attr]
        opt.step()
        # Darknet: updates accumulate the *summed* negative gradient; decay
        # (times batch) only for weights; step lr/batch; then scale by momentum.
        for n in ref:
            updates[n] += -grads[n] * batch
            if n in decayed:
                updates[n] += -decay * batch * ref[n]
            ref[n] += lr / batch * updates[n]
            updates[n] *= momentum
        # Recompute the next gradients at the reference weights: keep both in step.
        for n, p in params.items():
            torch.testing.assert_close(p.detach(), ref[n], rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                p.copy_(ref[n])


# --------------------------------------------------------------------------- shipped cfgs


@pytest.mark.parametrize("name", ["mnist.cfg", "plinius-5layer.cfg"])
def test_shipped_cfgs_build_and_train_a_step(name: str) -> None:
    path = Path(str(files("plinius") / "cfg" / name))
    torch.manual_seed(0)
    m = load_cfg(path, (28, 28), 10)
    assert m.input_shape == (1, 28, 28) and m.outputs == 10 and m.head == "softmax"
    assert m.net.policy.name == "poly" and m.net.policy.max_batches == 500
    opt = darknet_sgd(m.module, m.net.learning_rate, m.net.momentum, m.net.decay)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in m.module.parameters()]
    loss = m.loss(m.module(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.module.parameters()))


def test_original_plinius_augmentation_keys_are_accepted_and_reported() -> None:
    m = load_cfg(Path(str(files("plinius") / "cfg" / "mnist.cfg")), (28, 28), 10)
    assert m.net.ignored == ("exposure", "hue", "max_crop", "min_crop", "saturation")


def test_same_seed_same_weights() -> None:
    path = Path(str(files("plinius") / "cfg" / "mnist.cfg"))
    torch.manual_seed(3)
    a = load_cfg(path).module.state_dict()
    torch.manual_seed(3)
    b = load_cfg(path).module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- errors


def _err(text: str, **kw: object) -> str:
    with pytest.raises(DarknetConfigError) as info:
        build_network(parse_cfg(text, "bad.cfg"), "bad.cfg", **kw)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("bad.cfg")
    return msg


HEAD = "[net]\nheight=8\nwidth=8\nchannels=1\n"


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (HEAD + "[route]\nlayers=-1\n", r"line 5: unknown or unsupported section \[route\]"),
        (
            HEAD + "[convolutional]\nfilters=2\nsize=3\nflipped=1\n[softmax]\n",
            r"line 8: unknown key 'flipped'",
        ),
        (HEAD + "burn_in_typo=3\n[softmax]\n", r"line 5: unknown key 'burn_in_typo' in \[net\]"),
        (HEAD + "adam=1\n[softmax]\n", r"line 5: unknown key 'adam'"),
        (
            HEAD + "[convolutional]\nfilters=abc\n[softmax]\n",
            r"line 6: filters='abc' is not an integer",
        ),
        (HEAD + "[convolutional]\nfilters=0\n[softmax]\n", r"line 6: filters=0 is out of range"),
        (
            HEAD + "[convolutional]\nactivation=swish\n[softmax]\n",
            r"line 6: activation=swish is not supported",
        ),
        (HEAD + "learning_rate=fast\n[softmax]\n", r"line 5: learning_rate='fast' is not a number"),
        (HEAD + "learning_rate=nan\n[softmax]\n", r"line 5: learning_rate=nan is out of range"),
        (HEAD + "policy=sigmoid\n[softmax]\n", r"line 5: policy=sigmoid is not supported"),
        (HEAD + "policy=steps\nsteps=1,2\nscales=.1\n[softmax]\n", r"line 6: policy=steps needs"),
        (HEAD + "policy=steps\nsteps=5,2\nscales=.1,.1\n[softmax]\n", r"line 6: steps must be"),
        (
            HEAD + "[convolutional]\nfilters=2\nsize=9\n[softmax]\n",
            r"line 7: a 9x9 kernel does not fit the 8x8",
        ),
        (
            HEAD + "[maxpool]\nsize=9\nstride=1\npadding=0\n[softmax]\n",
            r"line 6: a 9x9 max pool shrinks",
        ),
        (HEAD + "[maxpool]\nsize=2\npadding=3\n[softmax]\n", r"line 7: padding=3 is too large"),
        (HEAD + "[dropout]\nprobability=1\n[softmax]\n", r"line 6: probability must be below 1"),
        (HEAD + "[softmax]\ngroups=2\n", r"line 6: groups=2 is out of range"),
        (HEAD + "[cost]\ntype=L1\n", r"line 6: type=L1 is not supported"),
        (
            HEAD + "[softmax]\n[connected]\noutput=2\n",
            r"line 6: \[connected\] after the \[softmax\] head",
        ),
        (
            HEAD + "[connected]\noutput=2\n",
            r"line 5: the network has no \[softmax\] or \[cost\] head",
        ),
        (HEAD + "[net]\n[softmax]\n", r"line 5: \[net\] may only be the first section"),
        ("[convolutional]\nfilters=1\n", r"line 1: the first section must be \[net\]"),
        ("batch=1\n[net]\n", r"line 1: 'batch' comes before the first \[section\]"),
        (HEAD + "batch=2\nbatch=3\n[softmax]\n", r"line 6: 'batch' is given twice .*line 5"),
        (HEAD + "just words\n", r"line 5: expected key=value"),
        (HEAD + "[softmax\n", r"line 5: malformed section header"),
        ("[net]\nbatch=2\n[softmax]\n", r"line 1: \[net\] gives no height/width/channels"),
        (HEAD + "batch=6\nsubdivisions=4\n[softmax]\n", r"line 6: batch=6 is not a multiple"),
        (HEAD + "inputs=10\n[softmax]\n", r"line 5: inputs=10 is not height \* width"),
    ],
)
def test_errors_name_the_line(text: str, expect: str) -> None:
    msg = _err(text)
    assert re.search(expect, msg), msg


def test_class_count_mismatch_names_the_fix() -> None:
    msg = _err(HEAD + "[connected]\noutput=3\n[softmax]\n", num_classes=10)
    assert "outputs 3 values" in msg and "10 classes" in msg


def test_empty_file_and_io_errors(tmp_path: Path) -> None:
    with pytest.raises(DarknetConfigError, match="no sections"):
        parse_cfg("# nothing\n\n", "e.cfg")
    with pytest.raises(StorageError, match="cannot read the model cfg"):
        load_cfg(tmp_path / "missing.cfg")
    binary = tmp_path / "bin.cfg"
    binary.write_bytes(b"[net]\n\xff\xfe\n")
    with pytest.raises(DarknetConfigError, match="not a text file"):
        load_cfg(binary)
    assert issubclass(DarknetConfigError, PliniusError)
