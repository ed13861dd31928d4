"""Models to train: the built-ins and Darknet ``.cfg`` files.

:func:`build_model` turns a name (or a cfg path) and the dataset's record shape
into a :class:`ModelSpec`: the module plus everything a training loop needs
(input preparation, loss, optimizer, learning-rate schedule)::

    spec = build_model("cnn-tiny", input_shape=(8, 8), num_classes=10, input_scale=16)
    x, y = spec.split(batch)
    loss = spec.loss(spec.module(spec.prepare(x)), y)

Built-ins (parameter sizes for 28x28 single-channel inputs and 10 classes;
MB = 10**6 bytes of float32 parameters):

- ``mlp``: 2 hidden layers (256, 128), ReLU; SGD lr 0.05, momentum 0.9, constant.
- ``cnn-tiny`` and ``cnn-10mb`` ... ``cnn-100mb``: the reference MNIST CNN in the
  style of the original Plinius evaluation: 3x3 convolutions with batch norm and
  LeakyReLU(0.1), 2x2 max pools, a 1x1 convolution to the classes, global
  average pooling; the loss is softmax cross-entropy on its logits. SGD with
  learning rate 0.1, momentum 0.9, decay 0.0005 (weights only, as Darknet) and
  Darknet's ``poly`` policy with power 4 over the job's steps, the settings of
  the original Plinius MNIST cfgs (``policy=poly``, ``power=4``). Unlike those
  cfgs, which widened the 14x14 layers, the size grows in the last, 2x2 stage
  (see :func:`reference_cnn`), so even the large models train in reasonable CPU
  time; there is no dropout and the 1x1 convolution is linear.
- ``tiny-lm``: a small causal transformer language model (see :class:`TinyLM`).

A cfg runs unmodified; see :mod:`plinius.darknet` for what is supported and how
Darknet's settings map onto PyTorch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .darknet import LRPolicy, darknet_sgd, load_cfg
from .errors import ConfigError

__all__ = [
    "CNN_SIZES_MB",
    "ModelEntry",
    "ModelSpec",
    "TinyLM",
    "build_model",
    "is_builtin",
    "list_models",
    "reference_cnn",
    "shipped_cfgs",
    "tiny_corpus",
]

# 1 MB in the model names and listings (SI, like the original paper's sizes).
MB = 1_000_000
CNN_SIZES_MB = (10, 22, 33, 44, 56, 67, 78, 89, 100)
# The reference CNN's fixed first stages (channels at 28x28, 14x14, 7x7) and the
# number of width x width convolutions in its last stage.
_CNN_FRONT = (32, 64, 128)
_CNN_BLOCKS = 2
_TINY_FRONT = (8, 16, 16)
_TINY_WIDTH = 32


def _default_split(fields: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    return fields[0], fields[-1]


@dataclass
class ModelSpec:
    """A model ready to train, with how to feed it and what it optimises.

    - ``input_shape``: the per-record shape the module expects, e.g. ``(1, 28, 28)``.
    - ``split``: the fields of a batch -> ``(raw input, target)``; by default the
      first and the last field.
    - ``prepare``: raw input batch -> module input (images scaled to [0, 1],
      float32, a channel dimension added where needed; token ids kept int64).
    - ``loss``: ``(module output, target) -> scalar``, averaged over the batch.
    - ``make_optimizer(lr)``: a fresh optimizer; ``lr=None`` uses the default.
    - ``make_scheduler(optimizer, total_steps)``: the learning-rate schedule, or
      ``None`` for a constant rate; its ``state_dict()`` holds only numbers.
    - ``hyper``: the hyper-parameters, for display (``batch`` is the default
      batch size).
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    prepare: Callable[[Tensor], Tensor]
    loss: Callable[[Tensor, Tensor], Tensor]
    make_optimizer: Callable[[float | None], torch.optim.Optimizer]
    make_scheduler: Callable[[torch.optim.Optimizer, int], object | None]
    hyper: dict[str, object] = field(default_factory=dict)
    split: Callable[[tuple[Tensor, ...]], tuple[Tensor, Tensor]] = _default_split

    def param_bytes(self) -> int:
        """Bytes of trainable parameters (shared ones counted once)."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters())


@dataclass(frozen=True)
class ModelEntry:
    """A built-in model as ``plinius models`` lists it."""

    name: str
    description: str
    param_mb: float


# --------------------------------------------------------------------------- inputs


def _image_prepare(shape: tuple[int, ...], input_scale: float | None) -> Callable[[Tensor], Tensor]:
    """Scale a raw batch to float32 in [0, 1] and reshape it to ``(N, *shape)``."""

    def prepare(x: Tensor) -> Tensor:
        if input_scale is not None:
            y = x.to(torch.float32) / input_scale
        elif x.dtype == torch.bool or x.is_floating_point():
            y = x.to(torch.float32)
        else:
            y = x.to(torch.float32) / float(torch.iinfo(x.dtype).max)
        return y.reshape(x.shape[0], *shape)

    return prepare


# Channel counts that mark the last axis of a 3-D record as channels (grey,
# RGB, RGBA): (16, 16, 3) is an RGB image stored channels-last.
_SMALL_CHANNELS = (1, 3, 4)


def _image_shape(name: str, raw: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` for a record shape: (H, W) or (C, H, W).

    A channels-last record (H, W, C) is refused rather than read as C, H, W
    (which would train on scrambled pixels), and so are 1-D (tabular) records.
    """
    if len(raw) == 2:
        return (1, raw[0], raw[1])
    if len(raw) == 3:
        if raw[2] in _SMALL_CHANNELS and raw[0] not in _SMALL_CHANNELS:
            h, w, c = raw
            raise ConfigError(
                f"{name} takes images as (C, H, W) but the records look channels-last "
                f"{raw} (H, W, C); seal them again as ({c}, {h}, {w}), e.g. "
                "array.transpose(0, 3, 1, 2) before plinius seal --npz"
            )
        return (raw[0], raw[1], raw[2])
    if len(raw) == 1:
        raise ConfigError(
            f"{name} needs image records of shape (H, W) or (C, H, W), but these are 1-D "
            f"records of {raw[0]} values (tabular data?); use --model mlp, or seal images "
            "as (H, W) arrays"
        )
    raise ConfigError(
        f"{name} needs image records of shape (H, W) or (C, H, W), not {raw}; "
        "use the mlp for other data"
    )


def _classification_loss(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target.long().reshape(-1))


# --------------------------------------------------------------------------- the CNN


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.1),
    ]


def _pool() -> nn.Module:
    # ceil_mode: odd sizes round up (7 -> 4) and a 1x1 map stays 1x1, exactly
    # Darknet's size=2 stride=2 max pool, so 8x8 digits work as well as 28x28.
    return nn.MaxPool2d(2, 2, ceil_mode=True)


def _cnn(
    in_channels: int, num_classes: int, front: tuple[int, ...], width: int, blocks: int
) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for c_out in (*front, width):
        layers += _conv_block(c, c_out)
        layers.append(_pool())
        c = c_out
    for _ in range(blocks):
        layers += _conv_block(width, width)
    layers += [nn.Conv2d(width, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # He-normal, as Darknet initialises convolutions.
            nn.init.kaiming_normal_(m.weight, nonlinearity="leaky_relu", a=0.1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _cnn_params(in_channels: int, num_classes: int, width: int) -> int:
    """Parameter count of :func:`reference_cnn`'s network of ``width`` (closed form)."""
    chans = (in_channels, *_CNN_FRONT, width)
    convs = sum(9 * a * b + 2 * b for a, b in itertools.pairwise(chans))
    convs += _CNN_BLOCKS * (9 * width * width + 2 * width)
    return convs + width * num_classes + num_classes


def _cnn_width(target_mb: float, in_channels: int, num_classes: int) -> int:
    target = target_mb * MB / 4  # float32 parameters
    if _cnn_params(in_channels, num_classes, 1) > target:
        raise ConfigError(
            f"reference_cnn({target_mb:g}) is below the smallest reference CNN "
            f"({_cnn_params(in_channels, num_classes, 1) * 4 / MB:.2f} MB); use cnn-tiny"
        )
    lo, hi = 1, 1
    while _cnn_params(in_channels, num_classes, hi) < target:
        hi *= 2
    while hi - lo > 1:  # smallest width reaching the target
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _cnn_params(in_channels, num_classes, mid) < target else (lo, mid)
    below, above = (
        _cnn_params(in_channels, num_classes, lo),
        _cnn_params(in_channels, num_classes, hi),
    )
    return lo if target - below < above - target else hi


def reference_cnn(target_mb: float, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """The reference MNIST CNN with about ``target_mb`` MB of float32 parameters.

    3x3 convolutions (batch norm, LeakyReLU 0.1) of 32, 64 and 128 channels,
    each followed by a 2x2 max pool, then one of ``width`` channels and a pool,
    then two ``width`` x ``width`` convolutions, a 1x1 convolution to the
    classes and global average pooling. ``width`` is chosen so the parameter
    count is the closest to the target; the wide layers see a 2x2 map (for
    28x28 inputs), so most parameters cost little compute.

    Args:
        target_mb: The size wanted, in MB (10**6 bytes) of float32 parameters.
        in_channels: Channels of the input images.
        num_classes: The number of classes.

    Returns:
        The network; it outputs logits.

    Raises:
        ConfigError: ``target_mb`` is not a positive number, or below the
            smallest network of this shape (use ``cnn-tiny``).
    """
    if not math.isfinite(target_mb) or target_mb <= 0:
        raise ConfigError(f"the model size must be a positive number of MB, not {target_mb}")
    width = _cnn_width(target_mb, in_channels, num_classes)
    return _cnn(in_channels, num_classes, _CNN_FRONT, width, _CNN_BLOCKS)


def _cnn_spec(
    name: str,
    raw: tuple[int, ...],
    num_classes: int,
    input_scale: float | None,
    target_mb: float | None,
) -> ModelSpec:
    shape = _image_shape(name, raw)
    if target_mb is None:
        module: nn.Module = _cnn(shape[0], num_classes, _TINY_FRONT, _TINY_WIDTH, 1)
    else:
        module = reference_cnn(target_mb, shape[0], num_classes)
    lr0, momentum, decay = 0.1, 0.9, 0.0005
    policy = LRPolicy("poly", power=4.0)

    def make_optimizer(lr: float | None) -> torch.optim.Optimizer:
        return darknet_sgd(module, lr0 if lr is None else lr, momentum, decay)

    return ModelSpec(
        name=name,
        module=module,
        input_shape=shape,
        prepare=_image_prepare(shape, input_scale),
        loss=_classification_loss,
        make_optimizer=make_optimizer,
        make_scheduler=policy.scheduler,
        hyper={
            "batch": 128,
            "learning_rate": lr0,
            "momentum": momentum,
            "decay": decay,
            "policy": "poly",
            "power": 4.0,
        },
    )


# --------------------------------------------------------------------------- the MLP


def _mlp_spec(
    name: str, raw: tuple[int, ...], num_classes: int, input_scale: float | None
) -> ModelSpec:
    n = math.prod(raw)
    module = nn.Sequential(
        nn.Linear(n, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes)
    )
    lr0, momentum, decay = 0.05, 0.9, 0.0005

    def make_optimizer(lr: float | None) -> torch.optim.Optimizer:
        return darknet_sgd(module, lr0 if lr is None else lr, momentum, decay)

    return ModelSpec(
        name=name,
        module=module,
        input_shape=(n,),
        prepare=_image_prepare((n,), input_scale),
        loss=_classification_loss,
        make_optimizer=make_optimizer,
        make_scheduler=LRPolicy("constant").scheduler,
        hyper={
            "batch": 128,
            "learning_rate": lr0,
            "momentum": momentum,
            "decay": decay,
            "policy": "constant",
        },
    )


# --------------------------------------------------------------------------- the LM


class TinyLM(nn.Module):
    """A small causal transformer language model with tied input/output embeddings.

    Input: token ids ``(N, T)`` with ``T <= max_len``; output: next-token logits
    ``(N, T, vocab)``. Pre-norm encoder layers under a causal mask, no dropout.
    """

    def __init__(
        self, vocab: int, max_len: int, dim: int = 64, heads: int = 4, layers: int = 2
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.tok.weight, 0.0, 0.02)
        nn.init.normal_(self.pos.weight, 0.0, 0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device)
        h = self.tok(tokens) + self.pos(pos)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        h = self.encoder(h, mask=mask, is_causal=True)
        out: Tensor = self.norm(h)
        # Tied output projection: the token embedding doubles as the classifier.
        return out @ self.tok.weight.t()


def _lm_split(fields: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    tokens = fields[0]
    return tokens[:, :-1], tokens[:, 1:]


def _lm_prepare(vocab: int) -> Callable[[Tensor], Tensor]:
    def prepare(x: Tensor) -> Tensor:
        if x.is_floating_point() or x.dtype == torch.bool:
            raise ConfigError(f"tiny-lm needs integer token ids, not {x.dtype} values")
        # The embedding would fail on an id outside the vocabulary (the targets
        # are checked as labels; the first token of a record is input only).
        if x.numel():
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= vocab:
                raise ConfigError(
                    f"token id {lo if lo < 0 else hi} is outside the vocabulary of {vocab} "
                    f"(ids 0 to {vocab - 1}): give the vocabulary size as --num-classes, or "
                    "fix the tokens and seal the dataset again"
                )
        return x.to(torch.int64)

    return prepare


def _lm_loss(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1).long())


def _lm_spec(name: str, raw: tuple[int, ...], vocab: int) -> ModelSpec:
    if len(raw) != 1 or raw[0] < 2:
        raise ConfigError(
            f"tiny-lm needs one integer field of T+1 tokens per record (e.g. from "
            f"plinius.models.tiny_corpus), not records of shape {raw}"
        )
    module = TinyLM(vocab, raw[0])
    lr0, decay = 3e-3, 0.01

    def make_optimizer(lr: float | None) -> torch.optim.Optimizer:
        return torch.optim.AdamW(module.parameters(), lr=lr0 if lr is None else lr,
                                 weight_decay=decay)  # fmt: skip

    return ModelSpec(
        name=name,
        module=module,
        input_shape=(raw[0] - 1,),
        prepare=_lm_prepare(vocab),
        loss=_lm_loss,
        make_optimizer=make_optimizer,
        make_scheduler=LRPolicy("constant").scheduler,
        hyper={
            "batch": 32,
            "optimizer": "adamw",
            "learning_rate": lr0,
            "decay": decay,
            "policy": "constant",
        },
        split=_lm_split,
    )


def tiny_corpus(num_sequences: int, seq_len: int, vocab: int = 64, seed: int = 0) -> np.ndarray:
    """A deterministic toy corpus for ``tiny-lm``: int64 ``(num_sequences, seq_len + 1)``.

    Each sequence walks a fixed random Markov chain in which every token has four
    possible successors (probabilities 0.6, 0.25, 0.1, 0.05), so a model can
    learn it well below the uniform loss ``log(vocab)``. Seal it as one integer
    field (say ``tokens``): ``tiny-lm`` splits each record into input
    ``tokens[:-1]`` and target ``tokens[1:]``.

    Args:
        num_sequences: Records to make.
        seq_len: Tokens of input per record (each record holds one more).
        vocab: The vocabulary size, at least 4.
        seed: Seed of the chain and the walks.

    Returns:
        An int64 array of shape ``(num_sequences, seq_len + 1)``.

    Raises:
        ConfigError: A size below its minimum.
    """
    if num_sequences < 1 or seq_len < 1 or vocab < 4:
        raise ConfigError("tiny_corpus needs num_sequences >= 1, seq_len >= 1 and vocab >= 4")
    rng = np.random.default_rng(seed)
    successors = np.stack([rng.choice(vocab, 4, replace=False) for _ in range(vocab)])
    out = np.empty((num_sequences, seq_len + 1), dtype=np.int64)
    out[:, 0] = rng.integers(0, vocab, num_sequences)
    for t in range(seq_len):
        pick = rng.choice(4, size=num_sequences, p=[0.6, 0.25, 0.1, 0.05])
        out[:, t + 1] = successors[out[:, t], pick]
    return out


# --------------------------------------------------------------------------- cfg


def _cfg_spec(
    path: str, raw: tuple[int, ...], num_classes: int, input_scale: float | None
) -> ModelSpec:
    model = load_cfg(path, raw, num_classes)
    net = model.net
    module = model.module

    def make_optimizer(lr: float | None) -> torch.optim.Optimizer:
        return darknet_sgd(module, net.learning_rate if lr is None else lr, net.momentum, net.decay)

    return ModelSpec(
        name=Path(path).name,
        module=module,
        input_shape=model.input_shape,
        prepare=_image_prepare(model.input_shape, input_scale),
        loss=model.loss,
        make_optimizer=make_optimizer,
        make_scheduler=net.policy.scheduler,
        hyper=net.hyper(),
    )


# --------------------------------------------------------------------------- registry

_DESCRIPTIONS = {
    "mlp": "MLP (256, 128 hidden, ReLU); SGD 0.05",
    "cnn-tiny": "reference CNN, tiny: for the demo and tests",
    **{
        f"cnn-{mb}mb": "reference MNIST CNN (3x3 conv+BN+leaky, 1x1 to classes, avgpool)"
        for mb in CNN_SIZES_MB
    },
    "tiny-lm": "causal transformer LM (2 layers, dim 64); records of T+1 tokens",
}


def _builtin(
    name: str, raw: tuple[int, ...], num_classes: int, input_scale: float | None
) -> ModelSpec:
    if name == "mlp":
        return _mlp_spec(name, raw, num_classes, input_scale)
    if name == "tiny-lm":
        return _lm_spec(name, raw, num_classes)
    if name == "cnn-tiny":
        return _cnn_spec(name, raw, num_classes, input_scale, None)
    return _cnn_spec(name, raw, num_classes, input_scale, float(name[4:-2]))


def build_model(
    spec: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    input_scale: float | None = None,
) -> ModelSpec:
    """Build a built-in model by name, or a Darknet cfg by path, for a dataset.

    Parameters are drawn from torch's global generator, so the same
    ``torch.manual_seed`` gives the same model.

    Args:
        spec: A built-in name (``mlp``, ``cnn-tiny``, ``cnn-10mb`` ...
            ``cnn-100mb``, ``tiny-lm``; :func:`list_models`) or the path of a
            Darknet ``.cfg`` file.
        input_shape: The per-record shape of the dataset's first field
            (``(28, 28)`` for MNIST, ``(T + 1,)`` token records for ``tiny-lm``).
        num_classes: The number of classes (the vocabulary for ``tiny-lm``).
        input_scale: What integer inputs are divided by, instead of their
            dtype's maximum (16 for scikit-learn's digits); ``None`` for that maximum.

    Returns:
        A :class:`ModelSpec`: the module and how to feed, optimise and schedule it.

    Raises:
        ConfigError: An unknown name, a shape or class count the model cannot
            take, or a non-positive ``input_scale``.
        DarknetConfigError: A cfg that cannot be built (it names the line).
        StorageError: A cfg file that cannot be read.
    """
    raw = tuple(int(d) for d in input_shape)
    if not raw or any(d < 1 for d in raw):
        raise ConfigError(f"the input shape must be positive dimensions, not {input_shape}")
    if num_classes < 1:
        raise ConfigError(f"the number of classes must be at least 1, not {num_classes}")
    if input_scale is not None and not (math.isfinite(input_scale) and input_scale > 0):
        raise ConfigError(f"the input scale must be a positive number, not {input_scale}")
    if spec in _DESCRIPTIONS:
        return _builtin(spec, raw, num_classes, input_scale)
    if spec.endswith(".cfg") or Path(spec).is_file():
        return _cfg_spec(spec, raw, num_classes, input_scale)
    raise ConfigError(
        f"unknown model {spec!r}; choose a built-in ({', '.join(_DESCRIPTIONS)}) or give "
        "the path of a Darknet .cfg file (plinius models lists them)"
    )


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a built-in model's name (not a cfg path)."""
    return name in _DESCRIPTIONS


def shipped_cfgs() -> list[Path]:
    """The example Darknet cfgs installed with plinius (``mnist.cfg``, ...)."""
    return sorted(Path(__file__).with_name("cfg").glob("*.cfg"))


def list_models() -> list[ModelEntry]:
    """The built-in models with their parameter sizes (28x28 inputs, 10 classes).

    ``tiny-lm`` is sized for 64-token records over a 64-symbol vocabulary.
    Built on torch's meta device: nothing is allocated or initialised.
    """
    entries = []
    with torch.device("meta"):
        for name, desc in _DESCRIPTIONS.items():
            shape, classes = ((65,), 64) if name == "tiny-lm" else ((28, 28), 10)
            size = _builtin(name, shape, classes, None).param_bytes()
            entries.append(ModelEntry(name, desc, size / MB))
    return entries
