"""The package's logging: errors it swallows are logged at debug level, masked, off by default.

Every module logs to its folder's logger (``logging.getLogger(__package__)``:
``cldpd_magic.render``, ``cldpd_magic.runs``), or at the top of the package to
``logging.getLogger(__name__)`` (``cldpd_magic.cli``), under the ``cldpd_magic`` logger,
which holds only a :class:`logging.NullHandler`: nothing is printed unless asked for.
Turn it on with

- ``%config CldpdMagics.log_level = "DEBUG"`` in a notebook: the log goes to the kernel
  process's stderr (the terminal that runs Jupyter), never into a cell;
- ``CLDPD_LOG=debug`` or ``cldpd --debug`` for the ``cldpd`` command: the log goes to
  stderr;
- a handler of one's own on ``logging.getLogger("cldpd_magic")``, anywhere.

An error the package swallows (the picker's workers, the renderer, the magics) is logged
with its traceback. The traceback is formatted and masked before any handler sees it, so
a secret in an exception's message is masked there as it is everywhere else.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from typing import TextIO

#: The logger every module of the package logs under.
PACKAGE_LOGGER = "cldpd_magic"
#: The level names accepted by ``log_level`` and ``CLDPD_LOG``.
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_swallowed(
    logger: logging.Logger,
    message: str,
    mask: Callable[[str], str] | None = None,
    exc: BaseException | None = None,
) -> None:
    """Log the exception being handled at debug level, with its traceback, masked.

    Call it in an ``except`` block that keeps only a message. The record carries the
    formatted traceback in ``exc_text`` (which every ``logging.Formatter`` prints) and no
    ``exc_info``: a handler formatting the live exception itself would print its message
    unmasked.

    Args:
        logger: The module's logger.
        message: What was being done, e.g. ``"rendering an output line failed"``.
        mask: Applied to the whole traceback text (a session's or pod's masker).
        exc: The exception; the one being handled when None.
    """
    exc = exc if exc is not None else sys.exc_info()[1]
    if exc is None or not logger.isEnabledFor(logging.DEBUG):
        return
    try:
        text = "".join(traceback.format_exception(exc)).rstrip("\n")
        if mask is not None:
            text = mask(text)
    except Exception:  # an error whose str() fails, or a mask that fails: the type only
        text = f"{type(exc).__module__}.{type(exc).__qualname__} (no traceback: it failed to print)"
    filename, lineno, function, _stack = logger.findCaller(False, 2)
    record = logger.makeRecord(
        logger.name, logging.DEBUG, filename, lineno, message, (), None, function
    )
    record.exc_text = text
    logger.handle(record)


def parse_level(value: str) -> int:
    """The logging level a name stands for, in any case (``debug``, ``INFO``).

    Raises:
        ValueError: The value is no level name; the message says which names are.
    """
    name = value.strip().upper()
    if name not in LEVELS:
        names = ", ".join(level.lower() for level in LEVELS)
        raise ValueError(f"{value!r} is not a log level; use one of {names}.")
    return logging.getLevelName(name)


def enable_logging(level: int | str, stream: TextIO | None = None) -> logging.Handler:
    """Send the package's log at ``level`` and above to a stream.

    Args:
        level: A level number or name (see :func:`parse_level`).
        stream: Where the lines go; ``sys.stderr`` when None.

    Returns:
        The handler added, for :func:`disable_logging`.
    """
    number = parse_level(level) if isinstance(level, str) else level
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(number)
    return handler


def disable_logging(handler: logging.Handler) -> None:
    """Undo :func:`enable_logging`: remove its handler and the level it set."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.removeHandler(handler)
    if not [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]:
        logger.setLevel(logging.NOTSET)
