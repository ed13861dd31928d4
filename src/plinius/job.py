"""The pieces of a training job that ``plinius train``, the demo and a library user share.

``plinius train`` is these steps, and :mod:`plinius.bench.demo` rebuilds the
same job from them to compare and evaluate what it trained::

    key, how = load_key(key_path, None, None, None, job_id="job")
    with SealedDataset(data_path, key) as ds:
        spec, classes = build_job("cnn-tiny", ds, None, seed=0)
        counter, every = make_counter("file:/var/lib/job.ctr", key, None, None, "job")
        ...                               # Mirror(..., counter=counter), then fit(...)

- :func:`load_key`: the master key, from a key file or (after attestation)
  from the data owner's key server;
- :func:`make_counter`: the trusted freshness counter named by a
  ``--counter`` spec (``file:PATH``, ``tpm[:TCTI]``, ``keyserver``);
- :func:`label_classes` and :func:`build_job`: the number of classes and the
  model, built after seeding the global generators as the job was;
- :func:`init_model_from`: a new job's model weights from another job's
  mirror, read-only (``plinius train --init-from``);
- :class:`EventLog` and :func:`process_age_s`: the JSON-lines progress events
  (``plinius train --events``) that crash campaigns and the recovery benchmark
  read back.

Nothing here imports torch, the mirror or the TEE layer until it is called.
Error messages name the ``plinius train`` options the arguments come from.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from .counters import Counter
    from .crypto import MasterKey
    from .data import SealedDataset
    from .mirror import MirrorInfo
    from .models import ModelSpec

__all__ = [
    "EventLog",
    "build_job",
    "export_metadata",
    "init_model_from",
    "label_classes",
    "load_key",
    "make_counter",
    "model_settings",
    "process_age_s",
    "write_safetensors",
]


def process_age_s() -> float | None:
    """Seconds since this process started, read from Linux's ``/proc``.

    Returns:
        The age in seconds, or ``None`` where ``/proc`` cannot tell (not Linux).
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class EventLog:
    """Progress events as JSON lines, each flushed at once so a SIGKILL loses at most one.

    Each line is ``{"event": NAME, "t": UNIX_TIME, "pid": PID, **fields}`` (the
    writing process's id). ``plinius train``
    writes ``start``, ``resumed``, ``step`` and ``done`` events; crash campaigns
    (:func:`plinius.bench.crashtest.read_events`) read them back. A log made with
    ``path=None`` accepts events and writes nothing.

    Args:
        path: The file to append to (created if missing), or ``None``.

    Raises:
        ConfigError: The file cannot be opened for appending.
    """

    def __init__(self, path: Path | None) -> None:
        self._f: IO[str] | None = None
        if path is not None:
            try:
                self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(f"cannot open the events file {path}: {exc.strerror}") from exc

    def write(self, event: str, **fields: Any) -> None:
        """Append one event and flush it.

        Args:
            event: The event's name.
            **fields: JSON-serialisable values stored with it.
        """
        if self._f is None:
            return
        # The pid tells apart the processes of a standby pair writing one file.
        self._f.write(
            json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n"
        )
        self._f.flush()

    def close(self) -> None:
        """Close the file; later writes are dropped. Closing twice is harmless."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_key(
    key_path: Path | None,
    key_server: str | None,
    key_server_pubkey: str | None,
    sealed_key: Path | None,
    job_id: str,
) -> tuple[MasterKey, str]:
    """The master key, from a key file or, after attestation, from the key server.

    Give exactly one of ``key_path`` and ``key_server``.

    Args:
        key_path: A master key file (``plinius keygen``), or ``None``.
        key_server: The key server's URL, or ``None``.
        key_server_pubkey: The key server's Ed25519 public key, hex; needed with
            ``key_server``.
        sealed_key: Where a released key is sealed locally so that restarts
            need no round trip (platforms that can seal), or ``None``.
        job_id: The job the key server releases the key to.

    Returns:
        ``(key, how)``: the key, and how it was obtained, for display
        (``"key file (no attestation)"``, ``"key server (released)"``, ...).

    Raises:
        ConfigError: Both or neither of ``key_path`` and ``key_server`` given, or
            ``key_server`` without ``key_server_pubkey``.
        KeyFileError: The key file is missing, malformed or readable by others.
        AttestationError: The key server refused the evidence or answered
            something invalid (:class:`~plinius.errors.KeyReleaseError`).
    """
    if key_path is not None:
        if key_server is not None:
            raise ConfigError("give either --key or --key-server, not both")
        from .crypto import MasterKey

        return MasterKey.load(key_path), "key file (no attestation)"
    if key_server is None:
        raise ConfigError(
            "a key is needed: give --key KEY, or --key-server URL with its public key"
        )
    if not key_server_pubkey:
        raise ConfigError("--key-server needs --key-server-pubkey (the server's public key, hex)")
    from .tee import obtain_master_key

    key, how = obtain_master_key(
        key_server, key_server_pubkey, job_id=job_id, sealed_key_path=sealed_key
    )
    return key, f"key server ({how})"


def make_counter(
    spec: str | None,
    key: MasterKey,
    key_server: str | None,
    key_server_pubkey: str | None,
    job_id: str,
    *,
    create: bool = True,
) -> tuple[Counter | None, int]:
    """The trusted freshness counter a ``--counter`` spec names, and its advance interval.

    Counters that do not wear (a file, the key server) advance on every commit;
    a TPM NV counter wears out, so it advances every 100 commits by default.
    Nothing is contacted yet: the mirror reads and advances the counter.

    Args:
        spec: ``file:PATH`` (simulation only: whoever can write the file can
            roll it back), ``tpm`` or ``tpm:TCTI`` (a TPM 2.0 NV counter whose
            password derives from ``key``), ``keyserver`` (the key server's
            per-job counter), or ``None`` for no counter.
        key: The master key.
        key_server: The key server's URL (for ``keyserver``).
        key_server_pubkey: The key server's public key, hex (for ``keyserver``).
        job_id: The job whose counter the key server keeps.
        create: Whether a missing TPM index may be defined (training); the
            commands that only read a mirror pass False, so that a deleted
            index is a :class:`~plinius.errors.RollbackError`, never 0.

    Returns:
        ``(counter, every)``: the counter (``None`` without a spec) and how many
        commits it advances after by default (1, or 100 for a TPM).

    Raises:
        ConfigError: The spec is not understood, or ``keyserver`` lacks the
            server's URL or public key.
    """
    if spec is None:
        return None, 1
    kind, _, arg = spec.partition(":")
    if kind == "file" and arg:
        from .counters import FileCounter

        return FileCounter(arg), 1
    if kind == "tpm":
        from .counters.tpm import DEFAULT_TCTI, TPMCounter

        # for_key: the index password derives from the master key, so a host
        # that forges or replays TPM answers is caught (HMAC sessions).
        return TPMCounter.for_key(key, arg or DEFAULT_TCTI, create=create), 100
    if kind == "keyserver" and not arg:
        if not key_server or not key_server_pubkey:
            raise ConfigError("--counter keyserver needs --key-server and --key-server-pubkey")
        from .counters import KeyServerCounter

        return KeyServerCounter(key_server, key_server_pubkey, job_id=job_id, key=key), 1
    raise ConfigError(
        f"--counter {spec!r} is not understood; use file:PATH, tpm[:TCTI] or keyserver"
    )


def label_classes(ds: SealedDataset) -> int:
    """The number of classes in a sealed dataset: one more than its largest label.

    The labels are the last field; the whole dataset is read, a batch at a time,
    and a negative label anywhere is refused (no model has a class for it).

    Args:
        ds: An open sealed dataset.

    Returns:
        The largest label plus one.

    Raises:
        ConfigError: The last field does not hold integers, or a label is negative.
    """
    import torch

    info = ds.fields[-1]
    if info.dtype.is_floating_point or info.dtype == torch.bool:
        raise ConfigError(
            f"the last field {info.name!r} holds {info.dtype}, not integer class labels"
        )
    top = -1
    n = len(ds)
    step = 4096
    for lo in range(0, n, step):
        labels = ds.get_batch(list(range(lo, min(n, lo + step))))[-1]
        if int(labels.min()) < 0:
            rows = labels.reshape(len(labels), -1)
            first = int((rows < 0).any(dim=1).nonzero()[0, 0])
            raise ConfigError(
                f"record {lo + first} has label {int(rows[first].min())} in field "
                f"{info.name!r}; class labels must be 0, 1, 2, ...: fix the labels and seal "
                "the dataset again"
            )
        top = max(top, int(labels.max()))
    if top < 0:
        raise ConfigError("the dataset has no labels; class labels must be 0, 1, 2, ...")
    return top + 1


def build_job(
    model_name: str, ds: SealedDataset, num_classes: int | None, seed: int
) -> tuple[ModelSpec, int]:
    """Seed the global generators, then build the model for a sealed dataset.

    The model takes the dataset's first field as input. Building after
    :func:`~plinius.train.seed_everything` with the job's seed gives the same
    initial parameters every time, as ``plinius train`` does.

    Args:
        model_name: A built-in model name (``plinius models``) or a Darknet
            ``.cfg`` path.
        ds: The open sealed dataset the job trains on.
        num_classes: The number of classes, or ``None`` to count them with
            :func:`label_classes`.
        seed: The job's seed.

    Returns:
        ``(spec, num_classes)``: the :class:`~plinius.models.ModelSpec` and the
        number of classes it was built for.

    Raises:
        ConfigError: An unknown model, or a dataset the model cannot take.
        DarknetConfigError: A cfg that cannot be built (it names the line).
    """
    from .models import build_model
    from .train import seed_everything

    if num_classes is None:
        num_classes = label_classes(ds)
    seed_everything(seed)
    spec = build_model(model_name, input_shape=tuple(ds.fields[0].shape), num_classes=num_classes)
    return spec, num_classes


def init_model_from(
    path: Path, key: MasterKey, module: nn.Module, model_name: str
) -> tuple[int, MirrorInfo]:
    """Load the model weights of another job's mirror into ``module`` (fine-tuning).

    Only ``state["model"]`` is read; the mirror is opened read-only and never
    changed, and its freshness is not checked (as ``plinius export`` without
    ``--counter``). The new job brings its own optimizer, schedule, step
    counter and mirror. A library user does the same with
    ``Mirror(path, key, readonly=True).restore_model(module)``.

    Args:
        path: The old job's mirror.
        key: The master key it was written under.
        module: The new job's model, built as the old one was.
        model_name: The model's name, for the messages.

    Returns:
        ``(step, info)``: the old job's committed step and its mirror's info
        (for the freshness note).

    Raises:
        ConfigError: The file does not exist or holds no saved state.
        StateMismatchError: The saved model is not ``model_name`` (another
            architecture or number of classes).
        IntegrityError, WrongKeyError, FormatError: As for any mirror read.
    """
    from .errors import StateMismatchError
    from .mirror import Mirror

    if not path.exists():
        raise ConfigError(f"--init-from {path} does not exist; name the mirror of a trained job")
    with Mirror(path, key, readonly=True) as old:
        info = old.info()
        try:
            step = old.restore_model(module)
        except StateMismatchError as exc:
            # The first difference is enough to tell another architecture from other classes.
            first = str(exc).partition("): ")[2].partition("; ")[0] or str(exc)
            raise StateMismatchError(
                f"--init-from {path}: the model it holds does not fit --model {model_name} "
                f"({first[:160]}); fine-tune with the model and --num-classes the old job trained"
            ) from exc
    if step is None:
        raise ConfigError(f"--init-from {path} holds no saved state yet; train that job first")
    return step, info


def model_settings(model_name: str, input_shape: tuple[int, ...], dtype: Any) -> dict[str, Any]:
    """What rebuilding and feeding a trained model needs beyond its name.

    ``plinius train`` records these with the job's settings (so a resume checks
    them, and ``plinius export`` writes them into the safetensors metadata).

    Args:
        model_name: The built-in name or the cfg path (``--model``).
        input_shape: The per-record shape of the dataset's first field: what
            :func:`~plinius.models.build_model` takes to build the model again.
        dtype: The torch dtype of the dataset's first field.

    Returns:
        ``input_shape`` (a list), ``input_scale`` (what raw inputs are divided
        by: the integer dtype's maximum, 1.0 for floats and booleans, ``None``
        for ``tiny-lm``'s token ids; what ``spec.prepare`` does) and, for a cfg file, ``cfg_sha256``
        (the SHA-256 of its text, so an export can tell whether the cfg at hand
        is the one trained).
    """
    import hashlib

    import torch

    from .models import is_builtin

    scale: float | None
    if model_name == "tiny-lm":
        scale = None  # token ids, fed as they are
    elif dtype == torch.bool or dtype.is_floating_point:
        scale = 1.0
    else:
        scale = float(torch.iinfo(dtype).max)
    out: dict[str, Any] = {"input_shape": [int(d) for d in input_shape], "input_scale": scale}
    if not is_builtin(model_name):
        try:
            out["cfg_sha256"] = hashlib.sha256(Path(model_name).read_bytes()).hexdigest()
        except OSError:  # build_model read it a moment ago; a vanished file is not fatal here
            pass
    return out


def export_metadata(
    step: int | None, generation: int, job: Any
) -> tuple[dict[str, str], str | None]:
    """The safetensors ``__metadata__`` of ``plinius export``: what rebuilding the model needs.

    Keys (all values are strings, as safetensors requires): ``plinius_step``,
    ``plinius_generation``; from the job's recorded settings ``plinius_model``
    (a built-in name or the cfg path), ``plinius_num_classes``,
    ``plinius_input_shape`` (JSON list: the record shape ``build_model`` takes),
    ``plinius_input_scale`` (what raw inputs are divided by; ``none`` for
    token ids), ``plinius_job`` (every setting, JSON with sorted keys) and, for
    a cfg whose file is at hand unchanged, ``plinius_cfg`` (its text). Nothing
    varies between exports of the same state: no time, no host.

    Args:
        step: The committed step.
        generation: The committed generation.
        job: The job's settings as the mirror recorded them (anything but a
            dict, say ``None``, where a library user's own loop saved no settings).

    Returns:
        ``(metadata, note)``: the note says why a cfg's text is missing, else ``None``.
    """
    import hashlib

    meta = {"plinius_step": str(step), "plinius_generation": str(generation)}
    if not isinstance(job, dict) or not job:
        return meta, None
    meta["plinius_job"] = json.dumps(job, sort_keys=True, separators=(",", ":"), default=str)
    if "model" in job:
        meta["plinius_model"] = str(job["model"])
    if "classes" in job:
        meta["plinius_num_classes"] = str(job["classes"])
    if "input_shape" in job:
        meta["plinius_input_shape"] = json.dumps(job["input_shape"])
    if "input_scale" in job:
        scale = job["input_scale"]
        meta["plinius_input_scale"] = "none" if scale is None else repr(float(scale))
    want = job.get("cfg_sha256")
    if not want:
        return meta, None
    cfg = Path(str(job.get("model")))
    try:
        text = cfg.read_bytes()
    except OSError:
        return meta, f"the cfg {cfg} is not at hand: the export names it but does not hold its text"
    if hashlib.sha256(text).hexdigest() != want:
        return meta, f"the cfg {cfg} changed since training: its text is not in the export"
    meta["plinius_cfg"] = text.decode("utf-8")
    return meta, None


def write_safetensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path
) -> None:
    """Write a safetensors file whose bytes depend only on the tensors and the metadata.

    safetensors writes its JSON header from a hash map, so the key order (and
    the file's SHA-256) changes from run to run; the header is rewritten here
    with sorted keys. Offsets are relative to the data, which is unchanged.

    Args:
        tensors: Contiguous tensors sharing no memory, by name.
        metadata: String metadata (``__metadata__``).
        path: The file to write (created or truncated).

    Raises:
        OSError: The file cannot be written.
        SafetensorError: safetensors cannot serialise the tensors.
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors pads
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.write(memoryview(raw)[8 + n :])
