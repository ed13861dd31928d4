"""The ``plinius`` command line.

Each group of commands lives in its own module here and registers itself on
:data:`main` via :func:`register`. Every :class:`~plinius.errors.PliniusError`
becomes one line on stderr and exit code 1; bad arguments exit with 2; nothing
ever prints a traceback unless ``PLINIUS_DEBUG=1`` is set.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Any, NoReturn

from .._runtime import tune_openmp

# Before any command module can import torch (see plinius._runtime: why).
tune_openmp()

import click  # noqa: E402

from ..errors import PliniusError  # noqa: E402
from ..standby import exit_code  # noqa: E402

# How long a torchrun worker that does not say a shared error waits before it exits.
_QUIET_LINGER_S = 3.0

# Modules that define commands; each has a ``register(group)`` function.
_COMMAND_MODULES = ["keys", "data", "mirror", "train", "demo", "models", "tee", "bench"]


class _Group(click.Group):
    """A group that turns every error into one line and a non-zero exit."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # A bare `plinius` is a usage error on every click version: the help,
        # then exit 2 (click 8.1 exits 0 here, 8.2 and later 2).
        if not args:
            click.echo(ctx.get_help())
            ctx.exit(2)
        try:
            return super().parse_args(ctx, args)
        except BrokenPipeError:  # --version or --help into a closed pipe
            _closed_pipe()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PliniusError as exc:
            _fail(f"error: {exc}", 1, exc)
        except KeyboardInterrupt as exc:
            _fail("interrupted", 130, exc)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:
            _closed_pipe()
        except SystemExit as exc:
            # rich's console exits 1 on a closed pipe (Console.on_broken_pipe).
            if isinstance(exc.__context__, BrokenPipeError):
                _closed_pipe()
            raise
        except MemoryError as exc:
            _fail("error: out of memory; try a smaller model or batch", 1, exc)
        except OSError as exc:
            _fail(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 1, exc)
        except Exception as exc:
            if _peer_lost(exc):
                _fail(
                    "error: another process of this torchrun job was lost (its process or "
                    f"machine died: {str(exc)[:160]}); torchrun restarts the group, which "
                    "resumes from the mirror set",
                    1,
                    exc,
                )
            _fail(
                f"internal error: {type(exc).__name__}: {exc} "
                "(please report it; PLINIUS_DEBUG=1 shows the traceback)",
                1,
                exc,
            )


def _peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer process died (torchrun).

    Under ``--replicas 1`` that is how the survivors of a lost machine learn of it:
    an expected event, not an internal error.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    text = str(exc)
    gone = ("closed by peer", "reset by peer", "Broken pipe", "Connection refused")
    return isinstance(exc, dist.DistNetworkError) or (
        isinstance(exc, RuntimeError) and "gloo" in text and any(g in text for g in gone)
    )


def _closed_pipe() -> NoReturn:
    """Exit 0 quietly: a reader that stopped early (``| head -1``) is no failure."""
    # Python's documented recipe: point stdout at devnull so that the flush at
    # exit does not raise again ("Exception ignored ... BrokenPipeError").
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (an in-process runner)
        pass
    finally:
        os.close(devnull)
    sys.exit(0)


def _fail(msg: str, code: int, exc: BaseException) -> None:
    if os.environ.get("PLINIUS_DEBUG") == "1":
        raise exc
    # An error every process of a torchrun job raised together is said once,
    # by the process that saw it (plinius.dist); the others exit quietly.
    by = getattr(exc, "reported_by", None)
    if by is not None and str(by) != os.environ.get("RANK", "0"):
        # Linger a moment: torchrun stops every worker once one has exited, and
        # the one that says the error may not have said it yet (a busy machine).
        time.sleep(_QUIET_LINGER_S)
        sys.exit(code)
    click.echo(msg.replace("\n", " "), err=True)
    # A standby pair's trainer tells its supervisor whether a restart can fix this.
    sys.exit(exit_code(exc, code))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="plinius")
def main() -> None:
    """plinius: secure and persistent ML training.

    Training state is mirrored, AES-256-GCM encrypted, into persistent memory
    after every iteration and resumes exactly after a crash.
    """


for _name in _COMMAND_MODULES:
    importlib.import_module(f".{_name}", __name__).register(main)
