"""Darknet ``.cfg`` files, the format the original Plinius trained, as PyTorch modules.

A cfg is read unmodified and built with Darknet's own rules (checked against
pjreddie/darknet's ``parser.c`` and the layer sources that Plinius embedded):

- ``[net]``/``[network]``: ``batch``, ``subdivisions``, ``learning_rate``,
  ``momentum``, ``decay``, ``policy`` (``constant``, ``steps`` with ``steps=`` and
  ``scales=``, ``poly`` with ``power=``), ``burn_in``, ``max_batches``,
  ``height``, ``width``, ``channels``, ``inputs``; Darknet's defaults apply
  (batch 1, learning rate 0.001, momentum 0.9, decay 0.0001, power 4).
  Darknet's image-augmentation keys (``max_crop``, ``min_crop``, ``max_ratio``,
  ``min_ratio``, ``center``, ``angle``, ``aspect``, ``saturation``,
  ``exposure``, ``hue``) are accepted and ignored: Darknet applies them only
  when its image loader reads picture files, never to in-memory records (which
  is how the original Plinius trained MNIST too). ``subdivisions`` only splits
  a batch into smaller forward passes in Darknet; plinius runs the whole batch
  at once, which is the same update except that batch-norm statistics come
  from the whole batch rather than from each subdivision.
- ``[convolutional]``: ``filters``, ``size``, ``stride``, ``pad``, ``padding``,
  ``groups``, ``batch_normalize``, ``activation``; out = (in + 2*padding -
  size) / stride + 1 with padding = size/2 when ``pad=1``.
- ``[maxpool]``: ``size``, ``stride``, ``padding`` (default size - 1); out =
  (in + padding - size) / stride + 1, windows start padding/2 before the
  input and ignore positions outside it.
- ``[avgpool]`` (global), ``[connected]`` (``output``, ``activation``,
  ``batch_normalize``), ``[dropout]`` (``probability``), ``[softmax]``
  (``groups=1``), ``[cost]`` (``type=sse``, ``scale``).
- Activations: ``leaky`` (slope 0.1), ``relu``, ``linear``, ``logistic``;
  Darknet's default for convolutional and connected layers is ``logistic``.

Anything else (an unknown section, an unknown key, a bad value, a layer that
shrinks the map to nothing, a layer of more than 2**31 parameters or an input or
layer output of more than 2**31 values per record, a learning rate above
:data:`plinius.train.MAX_LEARNING_RATE`) is a
:class:`~plinius.errors.DarknetConfigError` naming the file and line, raised
before torch allocates anything.

Training semantics. Darknet sums the gradient over the batch and scales the
update by ``learning_rate / batch``; weight decay (``decay * batch``) enters the
momentum buffer and applies to weights only, not to biases or batch-norm
scales. That is exactly :class:`torch.optim.SGD` (no dampening) with
``lr=learning_rate``, ``momentum``, ``weight_decay=decay`` on the weights, and
the loss averaged over the batch; :func:`darknet_sgd` builds it. Darknet counts
an update as batch number ``k + 1`` when it applies update ``k``, so
:meth:`LRPolicy.factor` does the same. The ``[softmax]`` layer's backward pass is
a pass-through of ``truth - p``, i.e. the gradient of cross-entropy on the
logits, so the module outputs logits and the loss is cross-entropy (computed by
log-softmax, numerically safe); a ``[cost]`` after a ``[softmax]`` adds
``scale * (truth - p)`` again in Darknet, so the loss is then ``(1 + scale)``
times cross-entropy. A ``[cost]`` without ``[softmax]`` is Darknet's
sum of squares against the one-hot target (half of it, whose gradient is
Darknet's ``truth - output``). Batch norm keeps Darknet's running-statistics
momentum (0.01); weights are initialised as Darknet does (He-normal
convolutions, uniform +-sqrt(2/inputs) connected layers, zero biases).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DarknetConfigError, storage_error
from .limits import MAX_LEARNING_RATE

__all__ = [
    "ACTIVATIONS",
    "DarknetModel",
    "LRPolicy",
    "LayerInfo",
    "NetConfig",
    "Section",
    "build_network",
    "darknet_sgd",
    "load_cfg",
    "parse_cfg",
    "parse_input_spec",
]

# Darknet's leaky ReLU slope.
LEAKY_SLOPE = 0.1
# Darknet updates rolling batch-norm statistics with .99 * old + .01 * new.
BN_MOMENTUM = 0.01
ACTIVATIONS = ("leaky", "relu", "linear", "logistic")
POLICIES = ("constant", "steps", "poly")
_AUGMENT_KEYS = frozenset(
    {
        "max_crop",
        "min_crop",
        "max_ratio",
        "min_ratio",
        "center",
        "angle",
        "aspect",
        "saturation",
        "exposure",
        "hue",
    }
)
# A sanity cap on any dimension or count read from a cfg (an untrusted file).
_MAX_DIM = 1 << 20
_MAX_CFG_BYTES = 16 << 20
# What a cfg may ask torch to build. Dimensions under _MAX_DIM still multiply to
# sizes torch cannot represent (a 2**20-cubed input is 2**60 values: computing
# its storage size overflows) or allocate (a 2**20-filter 1024x1024 convolution
# has 2**40 weights, 4 TiB of float32). So every layer's parameter count and
# every activation (values per record, input included) is computed with Python's
# exact integers and refused, naming the line, before torch sees it: at most
# 2**31 parameters in a layer (8 GiB of float32) and 2**31 values per record in
# an activation, far above any network Darknet or plinius trains.
_MAX_LAYER_PARAMS = 1 << 31
_MAX_VALUES = 1 << 31


# --------------------------------------------------------------------------- parsing


@dataclass
class Section:
    """One ``[section]`` of a cfg: its name, line, and ``key -> (value, line)``."""

    name: str
    line: int
    options: dict[str, tuple[str, int]] = field(default_factory=dict)


def parse_cfg(text: str, source: str = "<cfg>") -> list[Section]:
    """Split the text of a cfg into its sections.

    Like Darknet, whitespace anywhere in a line is ignored and ``#`` or ``;``
    start a comment line. A key given twice in a section is an error (Darknet
    would silently use the first).

    Args:
        text: The cfg's text.
        source: The name of the file, for error messages.

    Returns:
        The sections in order, each with its ``key -> (value, line)`` options.

    Raises:
        DarknetConfigError: A malformed line (the message names it).
    """
    sections: list[Section] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = "".join(raw.split())
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise _error(source, lineno, f"malformed section header {raw.strip()!r}")
            sections.append(Section(line[1:-1].lower(), lineno))
            continue
        key, eq, value = line.partition("=")
        if not eq or not key:
            raise _error(source, lineno, f"expected key=value, found {raw.strip()!r}")
        if not sections:
            raise _error(source, lineno, f"{key!r} comes before the first [section]")
        opts = sections[-1].options
        if key in opts:
            raise _error(
                source,
                lineno,
                f"{key!r} is given twice in [{sections[-1].name}] (first on "
                f"line {opts[key][1]}); keep one",
            )
        opts[key] = (value, lineno)
    if not sections:
        raise DarknetConfigError(f"{source}: no sections; a Darknet cfg starts with [net]")
    return sections


def _error(source: str, line: int, msg: str) -> DarknetConfigError:
    return DarknetConfigError(f"{source} line {line}: {msg}")


class _Options:
    """Typed access to one section's keys; remembers which keys were read."""

    def __init__(self, section: Section, source: str) -> None:
        self.section = section
        self.source = source
        self.used: set[str] = set()

    def error(self, key: str | None, msg: str) -> DarknetConfigError:
        line = self.section.options[key][1] if key in self.section.options else self.section.line
        return _error(self.source, line, msg)

    def _raw(self, key: str) -> str | None:
        self.used.add(key)
        item = self.section.options.get(key)
        return None if item is None else item[0]

    def get_int(self, key: str, default: int, lo: int = 0, hi: int = _MAX_DIM) -> int:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self.error(key, f"{key}={raw!r} is not an integer") from None
        if not lo <= value <= hi:
            fix = "smaller" if value > hi else "larger"
            raise self.error(key, f"{key}={value} is out of range [{lo}, {hi}]; make it {fix}")
        return value

    def get_flag(self, key: str, default: int = 0) -> bool:
        return self.get_int(key, default, 0, 1) == 1

    def get_float(self, key: str, default: float, lo: float = 0.0, hi: float = math.inf) -> float:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self.error(key, f"{key}={raw!r} is not a number") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise self.error(key, f"{key}={raw} is out of range [{lo}, {hi}]")
        return value

    def get_choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self._raw(key)
        if raw is None:
            return default
        if raw not in choices:
            raise self.error(key, f"{key}={raw} is not supported; use one of {', '.join(choices)}")
        return raw

    def get_list(self, key: str, kind: Callable[[str], float]) -> list[float]:
        raw = self._raw(key)
        if raw is None:
            return []
        try:
            values = [kind(v) for v in raw.split(",")]
        except ValueError:
            raise self.error(
                key, f"{key}={raw!r} is not a comma-separated list of numbers"
            ) from None
        if not all(math.isfinite(v) for v in values):
            raise self.error(key, f"{key}={raw!r} holds a value that is not finite")
        return values

    def accept(self, keys: frozenset[str]) -> list[str]:
        """Mark ``keys`` as read (accepted, ignored); return those present."""
        present = sorted(k for k in keys if k in self.section.options)
        self.used.update(keys)
        return present

    def check_unused(self) -> None:
        for key, (_, line) in self.section.options.items():
            if key not in self.used:
                known = ", ".join(sorted(self.used - _AUGMENT_KEYS)) or "no keys"
                raise _error(
                    self.source,
                    line,
                    f"unknown key {key!r} in [{self.section.name}]; plinius supports: {known}",
                )


# --------------------------------------------------------------------------- [net]


@dataclass(frozen=True)
class LRPolicy:
    """A Darknet learning-rate policy (``[net]``'s ``policy=``), as a factor of the base rate.

    Not to be confused with :class:`plinius.tee.Policy`, the key server's release policy.

    Args:
        name: ``"constant"``, ``"steps"`` or ``"poly"``.
        power: The ``poly`` exponent, and the burn-in's.
        steps: For ``steps``: the batch numbers at which the rate is multiplied...
        scales: ...by these factors, one per entry of ``steps``.
        max_batches: The ``poly`` horizon; 0 means the job's total steps.
        burn_in: Batches over which the rate ramps up as ``(batch / burn_in) ** power``.
    """

    name: str = "constant"
    power: float = 4.0
    steps: tuple[int, ...] = ()
    scales: tuple[float, ...] = ()
    max_batches: int = 0
    burn_in: int = 0

    def factor(self, update: int, total_steps: int) -> float:
        """The learning-rate factor of one update.

        Darknet computes the rate of an update from the number of batches seen
        *including* the one being applied, so update 0 uses batch number 1.

        Args:
            update: The update's index in the job, from 0.
            total_steps: The job's total steps (the ``poly`` horizon when
                ``max_batches`` is 0).

        Returns:
            The factor of the base learning rate, from 0 to 1 for ``poly``.
        """
        batch_num = update + 1
        if batch_num < self.burn_in:
            return float((batch_num / self.burn_in) ** self.power)
        if self.name == "steps":
            rate = 1.0
            for step, scale in zip(self.steps, self.scales):
                if step > batch_num:
                    break
                rate *= scale
            return rate
        if self.name == "poly":
            horizon = self.max_batches or total_steps
            # Past the horizon Darknet's formula would grow again (even powers).
            return float(max(0.0, 1.0 - batch_num / horizon) ** self.power)
        return 1.0

    def scheduler(
        self, optimizer: torch.optim.Optimizer, total_steps: int
    ) -> torch.optim.lr_scheduler.LambdaLR | None:
        """A torch scheduler applying :meth:`factor` after every update.

        The lambda is a plain closure, so ``state_dict()`` holds only numbers
        (LambdaLR stores ``None`` for functions) and the state mirrors safely.

        Args:
            optimizer: The optimizer whose learning rate it sets.
            total_steps: The job's total steps.

        Returns:
            A ``LambdaLR``, or ``None`` for a constant rate (nothing to schedule).

        Raises:
            DarknetConfigError: ``total_steps`` is below 1.
        """
        if total_steps < 1:
            raise DarknetConfigError(f"the job needs at least one step, not {total_steps}")
        if self.name == "constant" and self.burn_in == 0:
            return None
        policy = self

        def lr_factor(update: int) -> float:
            return policy.factor(update, total_steps)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    def describe(self) -> str:
        """A short human description, e.g. ``poly (power 4, max_batches 500)``."""
        parts = []
        if self.name == "poly":
            parts.append(f"power {self.power:g}")
            parts.append(f"max_batches {self.max_batches}" if self.max_batches else "over the job")
        if self.name == "steps":
            parts.append(
                "steps "
                + ",".join(str(s) for s in self.steps)
                + " scales "
                + ",".join(f"{s:g}" for s in self.scales)
            )
        if self.burn_in:
            parts.append(f"burn_in {self.burn_in}")
        return self.name + (f" ({', '.join(parts)})" if parts else "")


@dataclass(frozen=True)
class NetConfig:
    """The ``[net]`` section, with Darknet's defaults."""

    batch: int = 1
    subdivisions: int = 1
    learning_rate: float = 0.001
    momentum: float = 0.9
    decay: float = 0.0001
    policy: LRPolicy = LRPolicy()
    height: int = 0
    width: int = 0
    channels: int = 0
    inputs: int = 0
    ignored: tuple[str, ...] = ()

    def hyper(self) -> dict[str, object]:
        """The hyper-parameters for display (and the trainer's default batch)."""
        out: dict[str, object] = {
            "batch": self.batch,
            "subdivisions": self.subdivisions,
            "learning_rate": self.learning_rate,
            "momentum": self.momentum,
            "decay": self.decay,
            "policy": self.policy.name,
        }
        if self.policy.name == "poly":
            out["power"] = self.policy.power
            out["max_batches"] = self.policy.max_batches
        if self.policy.name == "steps":
            out["steps"] = list(self.policy.steps)
            out["scales"] = list(self.policy.scales)
        if self.policy.burn_in:
            out["burn_in"] = self.policy.burn_in
            out["power"] = self.policy.power
        return out


def _parse_net(opts: _Options) -> NetConfig:
    batch = opts.get_int("batch", 1, 1)
    subdivisions = opts.get_int("subdivisions", 1, 1)
    if batch % subdivisions:
        raise opts.error("subdivisions", f"batch={batch} is not a multiple of subdivisions")

    lr = opts.get_float("learning_rate", 0.001, 0.0, MAX_LEARNING_RATE)
    if lr <= 0:
        raise opts.error("learning_rate", "learning_rate must be positive")
    momentum = opts.get_float("momentum", 0.9, 0.0, 0.999999)
    decay = opts.get_float("decay", 0.0001, 0.0, 1.0)
    name = opts.get_choice("policy", "constant", POLICIES)
    power = opts.get_float("power", 4.0, 0.0, 1000.0)
    burn_in = opts.get_int("burn_in", 0, 0, 1 << 40)
    max_batches = opts.get_int("max_batches", 0, 0, 1 << 40)
    steps = [int(s) for s in opts.get_list("steps", int)]
    scales = opts.get_list("scales", float)
    if name == "steps":
        if not steps or len(steps) != len(scales):
            raise opts.error(
                "steps" if "steps" in opts.section.options else None,
                "policy=steps needs steps= and scales= lists of the same length",
            )
        if any(s < 0 for s in steps) or steps != sorted(steps):
            raise opts.error("steps", "steps must be non-negative and increasing")
        # The rate after the last step is lr times every scale: it must stay
        # usable too (a scale of 1e200 would overflow the optimizer mid-job).
        rate = lr
        for scale in scales:
            rate *= scale
            if not (0 < rate <= MAX_LEARNING_RATE):
                raise opts.error(
                    "scales", f"scales={opts.section.options['scales'][0]} take the learning "
                    f"rate to {rate:g}, outside (0, {MAX_LEARNING_RATE:g}]; use smaller scales",
                )  # fmt: skip
    policy = LRPolicy(name, power, tuple(steps), tuple(scales), max_batches, burn_in)
    height = opts.get_int("height", 0)
    width = opts.get_int("width", 0)
    channels = opts.get_int("channels", 0)
    inputs = opts.get_int("inputs", height * width * channels, 0, 1 << 40)
    if height and width and channels and inputs != height * width * channels:
        raise opts.error("inputs", f"inputs={inputs} is not height * width * channels")
    ignored = opts.accept(_AUGMENT_KEYS)
    return NetConfig(
        batch, subdivisions, lr, momentum, decay, policy, height, width, channels, inputs,
        tuple(ignored),
    )  # fmt: skip


# --------------------------------------------------------------------------- layers


def _activation(name: str) -> nn.Module:
    if name == "leaky":
        return nn.LeakyReLU(LEAKY_SLOPE)
    if name == "relu":
        return nn.ReLU()
    if name == "logistic":
        return nn.Sigmoid()
    return nn.Identity()


class DarknetMaxPool(nn.Module):
    """Darknet's max pool: windows start ``padding // 2`` before the input.

    Positions outside the input never win (Darknet uses ``-FLT_MAX``; here
    ``-inf`` padding, or a crop where Darknet's windows stop short of the end).
    """

    def __init__(self, size: int, stride: int, pads: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.size = size
        self.stride = stride
        self.pads = pads  # left, right, top, bottom; negative = crop

    def forward(self, x: Tensor) -> Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads, value=-math.inf)
        return F.max_pool2d(x, self.size, self.stride)


class GlobalAvgPool(nn.Module):
    """Darknet's ``[avgpool]``: the mean of each channel, as a 1x1 map."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class Connected(nn.Module):
    """Darknet's ``[connected]``: flatten (C, H, W), linear, batch norm, activation."""

    def __init__(self, inputs: int, outputs: int, batch_normalize: bool, act: str) -> None:
        super().__init__()
        self.linear = nn.Linear(inputs, outputs, bias=not batch_normalize)
        self.bn = nn.BatchNorm1d(outputs, momentum=BN_MOMENTUM) if batch_normalize else None
        self.act = _activation(act)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x.flatten(1))
        if self.bn is not None:
            y = self.bn(y)
        out: Tensor = self.act(y)
        return out[:, :, None, None]


class DarknetNetwork(nn.Module):
    """The layers of a cfg in order; returns the flattened last output (logits)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.flatten(1)


@dataclass(frozen=True)
class LayerInfo:
    """One layer as Darknet prints it: kind, settings, shapes (C, H, W), parameters."""

    index: int
    kind: str
    line: int
    detail: str
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    params: int


@dataclass
class DarknetModel:
    """A built cfg: the module, its ``[net]`` settings, layer table and head."""

    source: str
    net: NetConfig
    layers: list[LayerInfo]
    module: DarknetNetwork
    input_shape: tuple[int, int, int]  # (C, H, W)
    head: str  # "softmax", "softmax+cost" or "cost"
    cost_scale: float

    @property
    def outputs(self) -> int:
        """How many values the network outputs per record."""
        c, h, w = self.layers[-1].out_shape
        return c * h * w

    def param_count(self) -> int:
        """Trainable parameters in the module."""
        return sum(p.numel() for p in self.module.parameters())

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Darknet's training objective for this head, averaged over the batch."""
        target = target.long().reshape(-1)
        if self.head == "cost":
            onehot = F.one_hot(target, output.shape[1]).to(output.dtype)
            sse = 0.5 * (output - onehot).square().sum(dim=1).mean()
            return self.cost_scale * sse
        ce = F.cross_entropy(output, target)
        return ce * (1.0 + self.cost_scale) if self.head == "softmax+cost" else ce


def _conv_init(conv: nn.Conv2d) -> None:
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_in))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _linear_init(linear: nn.Linear) -> None:
    bound = math.sqrt(2.0 / linear.in_features)
    nn.init.uniform_(linear.weight, -bound, bound)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _build_conv(
    o: _Options, shape: tuple[int, int, int]
) -> tuple[nn.Module, tuple[int, int, int], str]:
    c, h, w = shape
    filters = o.get_int("filters", 1, 1)
    size = o.get_int("size", 1, 1, 1024)
    stride = o.get_int("stride", 1, 1, 1024)
    pad = o.get_flag("pad")
    padding = o.get_int("padding", 0, 0, 1024)
    if pad:
        padding = size // 2
    groups = o.get_int("groups", 1, 1)
    if c % groups or filters % groups:
        raise o.error(
            "groups", f"groups={groups} must divide {c} input channels and {filters} filters"
        )
    bn = o.get_flag("batch_normalize")
    act = o.get_choice("activation", "logistic", ACTIVATIONS)
    oh = (h + 2 * padding - size) // stride + 1
    ow = (w + 2 * padding - size) // stride + 1
    if h + 2 * padding < size or w + 2 * padding < size:
        raise o.error(
            "size", f"a {size}x{size} kernel does not fit the {h}x{w} input (padding {padding})"
        )
    params = filters * (c // groups) * size * size + (2 * filters if bn else filters)
    _check_size(
        o, params, f"{filters} filters x {c // groups} channels x {size}x{size}",
        "filters or size", (filters, oh, ow), "filters smaller or stride larger",
    )  # fmt: skip
    conv = nn.Conv2d(c, filters, size, stride, padding, groups=groups, bias=not bn)
    _conv_init(conv)
    parts: list[nn.Module] = [conv]
    if bn:
        parts.append(nn.BatchNorm2d(filters, momentum=BN_MOMENTUM))
    parts.append(_activation(act))
    detail = f"{filters} {size}x{size}/{stride} {act}{' bn' if bn else ''}"
    return nn.Sequential(*parts), (filters, oh, ow), detail


def _build_maxpool(
    o: _Options, shape: tuple[int, int, int]
) -> tuple[nn.Module, tuple[int, int, int], str]:
    c, h, w = shape
    stride = o.get_int("stride", 1, 1, 1024)
    size = o.get_int("size", stride, 1, 1024)
    padding = o.get_int("padding", size - 1, 0, 2048)
    # Every window must hold at least one input position, or its max is -inf.
    if (padding + 1) // 2 > size - 1:
        raise o.error("padding", f"padding={padding} is too large for size={size}")
    out = []
    pads = []
    for n in (h, w):
        m = (n + padding - size) // stride + 1
        if n + padding < size or m < 1:
            raise o.error("size", f"a {size}x{size} max pool shrinks the {h}x{w} map to nothing")
        left = padding // 2
        out.append(m)
        pads.append((left, (m - 1) * stride + size - n - left))
    (top, bottom), (left, right) = pads
    # Padding can grow a map (a 1x1 input, size=1024, padding=2046: 1024x1024).
    _check_size(o, 0, "", "", (c, out[0], out[1]), "padding smaller or stride larger")
    detail = f"{size}x{size}/{stride}" + (f" padding {padding}" if padding != size - 1 else "")
    return DarknetMaxPool(size, stride, (left, right, top, bottom)), (c, out[0], out[1]), detail


def _check_size(
    o: _Options,
    params: int,
    how: str,
    fix_params: str,
    out: tuple[int, int, int],
    fix_out: str,
) -> None:
    """Refuse a layer torch cannot build: see ``_MAX_LAYER_PARAMS`` and ``_MAX_VALUES``."""
    kind = o.section.name
    if params > _MAX_LAYER_PARAMS:
        raise _error(
            o.source, o.section.line, f"[{kind}] would have {params} parameters ({how}), more "
            f"than the {_MAX_LAYER_PARAMS} a layer may have; make {fix_params} smaller",
        )  # fmt: skip
    values = out[0] * out[1] * out[2]
    if values > _MAX_VALUES:
        c, h, w = out
        raise _error(
            o.source, o.section.line, f"[{kind}] would output {h}x{w}x{c} = {values} values per "
            f"record, more than the {_MAX_VALUES} plinius builds; make {fix_out}",
        )  # fmt: skip


def _build_connected(
    o: _Options, shape: tuple[int, int, int]
) -> tuple[nn.Module, tuple[int, int, int], str]:
    inputs = shape[0] * shape[1] * shape[2]
    outputs = o.get_int("output", 1, 1)
    bn = o.get_flag("batch_normalize")
    act = o.get_choice("activation", "logistic", ACTIVATIONS)
    params = inputs * outputs + (2 * outputs if bn else outputs)
    _check_size(
        o, params, f"{inputs} inputs x {outputs} outputs",
        "output (or the layers before it)", (outputs, 1, 1), "output smaller",
    )  # fmt: skip
    layer = Connected(inputs, outputs, bn, act)
    _linear_init(layer.linear)
    return layer, (outputs, 1, 1), f"{outputs} {act}{' bn' if bn else ''}"


def build_network(
    sections: list[Section],
    source: str,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    resize: bool = False,
) -> DarknetModel:
    """Build parsed ``sections`` into a :class:`DarknetModel`.

    ``input_shape`` is the per-record shape of the data, ``(H, W)``, ``(C, H, W)``
    or ``(N,)``; it must have as many values as ``[net]`` declares (Darknet reads
    records in channel-major order) unless ``resize`` is true, when it replaces
    ``[net]``'s size (as Darknet's ``resize_network`` does). Without it, ``[net]``
    must give height/width/channels or ``inputs``. ``num_classes`` (if given)
    must equal the network's output size.
    """
    first = sections[0]
    if first.name not in ("net", "network"):
        raise _error(source, first.line, "the first section must be [net] or [network]")
    net_opts = _Options(first, source)
    net = _parse_net(net_opts)
    net_opts.check_unused()
    shape = in0 = _input_shape(net, input_shape, source, first.line, resize)
    if math.prod(in0) > _MAX_VALUES:
        c, h, w = in0
        raise _error(
            source, first.line, f"the input {h}x{w}x{c} is {math.prod(in0)} values per record, "
            f"more than the {_MAX_VALUES} plinius builds; make height, width or channels "
            "(or --input) smaller",
        )  # fmt: skip

    modules: list[nn.Module] = []
    infos: list[LayerInfo] = []
    head: str | None = None
    cost_scale = 0.0
    builders = {
        "convolutional": _build_conv,
        "conv": _build_conv,
        "maxpool": _build_maxpool,
        "max": _build_maxpool,
        "connected": _build_connected,
        "conn": _build_connected,
    }
    for sec in sections[1:]:
        o = _Options(sec, source)
        kind = sec.name
        if head is not None and not (head == "softmax" and kind in ("cost",)):
            raise _error(
                source, sec.line, f"[{kind}] after the [{head}] head; the head must come last"
            )
        in_shape = shape
        module: nn.Module | None = None
        detail = ""
        if kind in builders:
            try:
                module, shape, detail = builders[kind](o, shape)
            except (MemoryError, RuntimeError) as exc:
                # torch raises RuntimeError when it cannot allocate the weights.
                if isinstance(exc, RuntimeError) and "alloc" not in str(exc):
                    raise
                raise _error(
                    source, sec.line, f"[{kind}] needs more memory for its weights than is "
                    "available; make the layer smaller (filters, size, output)",
                ) from exc  # fmt: skip
            kind = {"conv": "convolutional", "max": "maxpool", "conn": "connected"}.get(kind, kind)
        elif kind in ("avgpool", "avg"):
            kind, module, shape = "avgpool", GlobalAvgPool(), (shape[0], 1, 1)
        elif kind == "dropout":
            p = o.get_float("probability", 0.5, 0.0, 1.0)
            if p >= 1.0:
                raise o.error("probability", "probability must be below 1")
            module, detail = nn.Dropout(p), f"p={p:g}"
        elif kind in ("softmax", "soft"):
            kind = "softmax"
            o.get_int("groups", 1, 1, 1)
            head = "softmax"
        elif kind == "cost":
            o.get_choice("type", "sse", ("sse",))
            cost_scale = o.get_float("scale", 1.0, 0.0, 1e6)
            head = "softmax+cost" if head == "softmax" else "cost"
            detail = f"sse scale={cost_scale:g}"
        elif kind in ("net", "network"):
            raise _error(source, sec.line, f"[{kind}] may only be the first section")
        else:
            raise _error(
                source,
                sec.line,
                f"unknown or unsupported section [{sec.name}]; plinius supports [net], "
                "[convolutional], [maxpool], [avgpool], [connected], [dropout], [softmax], [cost]",
            )
        o.check_unused()
        params = 0
        if module is not None:
            modules.append(module)
            params = sum(p.numel() for p in module.parameters())
        infos.append(LayerInfo(len(infos), kind, sec.line, detail, in_shape, shape, params))

    if head is None:
        last = sections[-1].line
        raise _error(
            source, last, "the network has no [softmax] or [cost] head to train against; "
            "add a [softmax] section at the end",
        )  # fmt: skip
    model = DarknetModel(source, net, infos, DarknetNetwork(modules), in0, head, cost_scale)
    if num_classes is not None and model.outputs != num_classes:
        raise DarknetConfigError(
            f"{source}: the network outputs {model.outputs} values per record but the dataset "
            f"has {num_classes} classes; make the last layer's filters/output {num_classes}"
        )
    return model


def _input_shape(
    net: NetConfig, data_shape: tuple[int, ...] | None, source: str, line: int, resize: bool
) -> tuple[int, int, int]:
    declared: tuple[int, int, int] | None = None
    if net.height and net.width and net.channels:
        declared = (net.channels, net.height, net.width)
    elif net.inputs:
        declared = (net.inputs, 1, 1)
    if data_shape is None:
        if declared is None:
            raise _error(
                source, line, "[net] gives no height/width/channels or inputs; "
                "add them or give the input shape (--input HxWxC)",
            )  # fmt: skip
        return declared
    if not data_shape or any(d < 1 for d in data_shape):
        raise DarknetConfigError(f"{source}: invalid input shape {data_shape}")
    if declared is not None and not resize:
        _check_declared(declared, tuple(data_shape), net, source)
        return declared
    if len(data_shape) == 2:
        return (1, data_shape[0], data_shape[1])
    if len(data_shape) == 3:
        return (data_shape[0], data_shape[1], data_shape[2])
    return (math.prod(data_shape), 1, 1)


def _check_declared(
    declared: tuple[int, int, int], data: tuple[int, ...], net: NetConfig, source: str
) -> None:
    """Refuse records whose shape is not the one ``[net]`` declares.

    Equal value counts are not enough: (16, 16, 3) channels-last records hold as
    many values as ``channels=3 height=16 width=16`` but would be read as 16
    channels of 16x3 pixels. Flat records of H*W values fit a one-channel cfg
    (read row-major, as Darknet reads its flat vectors: MNIST from a CSV file);
    with several channels their layout is ambiguous, so they are refused.
    """
    c, h, w = declared
    if net.height and net.width and net.channels:
        flat_ok = data == (c * h * w,) and (c == 1 or h == w == 1)
        ok = data == declared or (c == 1 and data == (h, w)) or flat_ok
    else:  # inputs=N: a flat vector, any record of N values
        ok = math.prod(data) == c
    if ok:
        return
    want = f"channels={c} height={h} width={w}" if net.height else f"inputs={c}"
    hint = "use a cfg for this data"
    if len(data) == 3 and data[2] == c and data[:2] == (h, w):
        hint = f"the records are channels-last (H, W, C); seal them again as ({c}, {h}, {w})"
    elif math.prod(data) == c * h * w and len(data) == 1:
        hint = "the records are flat; seal them as (C, H, W) images or use a cfg with inputs="
    elif math.prod(data) == c * h * w:
        hint = "same number of values, other layout; seal the records as (C, H, W)"
    raise DarknetConfigError(
        f"{source}: [net] declares {want} (C, H, W = {declared}) but the records have "
        f"shape {data}; {hint}"
    )


def parse_input_spec(text: str) -> tuple[int, int, int]:
    """Parse an input size written ``HxWxC`` (``plinius models --input``).

    Args:
        text: Height, width and channels, e.g. ``28x28x1``.

    Returns:
        ``(C, H, W)``.

    Raises:
        DarknetConfigError: Not three positive integers within bounds.
    """
    parts = text.lower().replace(" ", "").split("x")
    try:
        h, w, c = (int(p) for p in parts)
    except ValueError:
        raise DarknetConfigError(
            f"--input {text!r} is not HxWxC (three positive integers, e.g. 28x28x1)"
        ) from None
    if min(h, w, c) < 1 or max(h, w, c) > _MAX_DIM:
        raise DarknetConfigError(f"--input {text!r}: dimensions must be between 1 and {_MAX_DIM}")
    return (c, h, w)


def load_cfg(
    path: str | Path,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    resize: bool = False,
) -> DarknetModel:
    """Read a Darknet ``.cfg`` file and build it into a PyTorch module.

    The file is read as it is (at most 16 MiB of UTF-8 text); see the module
    docstring for the sections and keys supported.

    Args:
        path: The ``.cfg`` file.
        input_shape: The per-record shape of the data, ``(H, W)``,
            ``(C, H, W)`` or ``(N,)``, with as many values as ``[net]``
            declares; ``None`` takes ``[net]``'s height, width and channels
            (or ``inputs``).
        num_classes: The number of classes, which must equal the network's
            output size; ``None`` checks nothing.
        resize: Let ``input_shape`` replace ``[net]``'s input size (as
            Darknet's ``resize_network`` does; ``plinius models --input``).

    Returns:
        The :class:`DarknetModel`: module, ``[net]`` settings, layer table and head.

    Raises:
        DarknetConfigError: The cfg cannot be built (the message names the file
            and line; sizes beyond the caps are refused before anything is
            allocated), is not a regular text file, or is too large.
        StorageError: The file cannot be read.
    """
    p = Path(path)
    try:
        # Only a regular file, and never more than the cap: a FIFO or /dev/zero
        # given as the cfg must fail, not hang or fill the memory.
        if p.exists() and not p.is_dir() and not p.is_file():
            raise DarknetConfigError(f"{p.name}: not a regular file; give a .cfg text file")
        with open(p, "rb") as f:
            data = f.read(_MAX_CFG_BYTES + 1)
    except OSError as exc:
        raise storage_error(exc, f"cannot read the model cfg {p}") from exc
    if len(data) > _MAX_CFG_BYTES:
        raise DarknetConfigError(
            f"{p.name}: more than {_MAX_CFG_BYTES} bytes is too large for a model cfg"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DarknetConfigError(f"{p.name}: not a text file (invalid UTF-8)") from exc
    return build_network(parse_cfg(text, p.name), p.name, input_shape, num_classes, resize)


# --------------------------------------------------------------------------- training


def darknet_sgd(module: nn.Module, lr: float, momentum: float, decay: float) -> torch.optim.SGD:
    """SGD as Darknet updates: weight decay on convolution and linear weights only.

    Args:
        module: The network.
        lr: The learning rate.
        momentum: The momentum.
        decay: The weight decay of convolution and linear weights.

    Returns:
        A ``torch.optim.SGD`` with two parameter groups, in module order:
        the weights (with ``decay``) and everything else (biases, batch-norm
        scales and shifts; no decay).
    """
    decayed: list[Tensor] = []
    seen: set[int] = set()
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            decayed.append(m.weight)
            seen.add(id(m.weight))
    rest = [p for p in module.parameters() if id(p) not in seen]
    groups: list[dict[str, object]] = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": decay})
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)  # type: ignore[arg-type]
