"""Argument types both front ends read: the ``cldpd`` command and the magics."""

from __future__ import annotations

import argparse
import math
import shlex

from .errors import InvalidRequestError

#: The help of a positional RUN: ``cldpd resume`` and ``stop``, ``%cldpd_resume``,
#: ``%cldpd_attach`` and ``%cldpd_stop``.
RUN_HELP = "a run, or a pod with one run"


def non_negative(text: str) -> float:
    """A number of seconds or dollars: finite and not negative."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of 0 or more")
    return value


def parse_variant(spec: str) -> dict[str, object]:
    """Read a variant given as ``NAME`` or ``NAME=ARGS`` (ARGS split as a shell would).

    Args:
        spec: The variant, e.g. ``opus=--model opus``.

    Returns:
        ``{"name": NAME, "args": [ARG, ...]}``, as ``Dispatcher.dispatch`` takes it.

    Raises:
        InvalidRequestError: No name, or unbalanced quotes in ARGS.
    """
    name, _, args = spec.partition("=")
    name = name.strip()
    if not name:
        raise InvalidRequestError(
            f"The variant {spec!r} has no name; write NAME or NAME=ARGS, e.g. opus='--model opus'."
        )
    try:
        words = shlex.split(args)
    except ValueError as exc:
        raise InvalidRequestError(f"Cannot read the variant {name}'s arguments ({exc}).") from None
    return {"name": name, "args": words}
