"""``--json``: one JSON document on stdout, strict JSON whatever the values."""

from __future__ import annotations

import json
import math
from typing import Any

import click

__all__ = ["echo_json", "json_option"]

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document (keys in the README)."
)


def _strict(v: Any) -> Any:
    # NaN and infinities are not JSON (a diverged loss would be): null instead.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _strict(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_strict(x) for x in v]
    return v


def echo_json(doc: dict[str, Any]) -> None:
    """Print ``doc`` as the command's one JSON document on stdout.

    Non-finite floats become ``null``; a value JSON cannot hold (bytes in a
    job's settings, say) is written as its ``str``.
    """
    click.echo(json.dumps(_strict(doc), indent=2, default=str, allow_nan=False))
