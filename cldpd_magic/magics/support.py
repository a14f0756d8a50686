"""What every class of magics shares: argument parsing, one-sentence errors, the settings.

IPython registers the package's magics as several :class:`~IPython.core.magic.Magics`
classes, one per topic (runs in :mod:`cldpd_magic.magics.run`, inventory, batches), as its
own magics are split. They share the settings and plumbing of
:class:`~cldpd_magic.magics.CldpdMagics` (the configurable traits) through
:class:`MagicsCore`, and the helpers here: one parser per magic, which its help shows,
parses its options; the completer reads the same parser.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, parse_argstring
from IPython.utils.process import arg_split

from ..errors import CldpdError, one_line
from ..logs import log_swallowed
from ..render import BatchFeed
from ..runs import Dispatcher, Session

# Errors a magic turned into a sentence log under the magics' name, as they always did.
logger = logging.getLogger(__package__)


class MagicsCore(Protocol):
    """The settings and plumbing that the topic magics read from :class:`CldpdMagics`.

    Attributes:
        pods_dir: The pods directory trait ("" for the default).
        max_output_lines: Lines a cell keeps.
        flush_interval: Seconds between updates of a live cell.
        stop_timeout: Seconds a pod gets to stop gracefully.
        batch_feeds: The live feed of every batch shown in a cell, oldest first.
    """

    pods_dir: str
    max_output_lines: int
    flush_interval: float
    stop_timeout: float
    batch_feeds: list[BatchFeed]

    @property
    def dispatcher(self) -> Dispatcher:
        """The dispatcher of the current settings."""

    def dispatchers(self) -> list[Dispatcher]:
        """Every dispatcher made so far."""

    def sessions(self) -> list[Session]:
        """Every session this kernel started through the magics."""

    def live(self) -> bool:
        """Whether the frontend shows display updates in place (not a plain terminal)."""


#: Sessions and batches that a blocking magic followed in its cell to their end.
FOLLOWED_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()

_QUOTES = ("'", '"')
_WORD = re.compile(r"\S+")
#: The ``-b/--background`` option of the magics that follow a run.
BACKGROUND = argument(
    "-b", "--background", action="store_true",
    help="return at once with the Session; the cell keeps streaming",
)  # fmt: skip


def is_docker_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.split(".", 1)[0] in ("docker", "requests", "urllib3")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library and Docker errors into one-line UsageErrors (no traceback in a cell).

    Raises:
        UsageError: For every CldpdError, bad argument (ValueError from quoting) or
            docker-py/requests error raised inside the block.
    """
    try:
        yield
    except UsageError:
        raise
    except CldpdError as exc:
        log_swallowed(logger, "a magic failed")
        raise UsageError(one_line(str(exc)) or type(exc).__name__) from None
    except Exception as exc:
        if is_docker_error(exc):
            log_swallowed(logger, "a magic failed in Docker")
            raise UsageError(f"Docker error: {one_line(str(exc))}") from None
        raise


def _parser_of(magic: Any) -> argparse.ArgumentParser:
    return magic.parser


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    # argparse offers no public listing of its options; this mapping has been stable
    # since Python 2.7, and it is read here only.
    return dict(parser._option_string_actions)


def positional_names(parser: argparse.ArgumentParser) -> list[str]:
    """The names (dests) of a parser's positional arguments, in order."""
    return [action.dest for action in parser._actions if not action.option_strings]


def _option_names(parser: argparse.ArgumentParser) -> str:
    seen = {id(a): "/".join(a.option_strings) for a in _option_actions(parser).values()}
    return ", ".join(seen.values()) or "none"


@dataclass
class ArgumentScan:
    """How far a magic's words fill its parser (for the completer and verbatim prompts).

    Attributes:
        values: Raw option values by dest (``""`` for a flag that was given).
        positionals: The positional words, in order.
        pending: The dest of an option whose value has not come yet, else None.
    """

    values: dict[str, str]
    positionals: list[str]
    pending: str | None


def scan_arguments(
    parser: argparse.ArgumentParser, words: list[str], strict: bool = True
) -> ArgumentScan:
    """Sort a magic's words into options and positionals as its parser would.

    Args:
        parser: The magic's parser.
        words: The words, already split.
        strict: Raise on an option the parser does not know (else skip it).

    Raises:
        UsageError: An unknown option, when ``strict``.
    """
    options = _option_actions(parser)
    values: dict[str, str] = {}
    positionals: list[str] = []
    pending: str | None = None
    for word in words:
        if pending is not None:
            values[pending], pending = word, None
        elif word.startswith("-") and word != "-":
            name, has_value, value = word.partition("=")
            action = options.get(name)
            if action is None:
                if strict:
                    raise UsageError(
                        f"Unknown option {name}; the options are {_option_names(parser)}."
                    )
            elif action.nargs == 0 or has_value:
                values[action.dest] = value
            else:
                pending = action.dest
        else:
            positionals.append(word)
    return ArgumentScan(values, positionals, pending)


def parse_verbatim(magic: Any, line: str) -> argparse.Namespace:
    """Parse ``[options] RUN REST`` with the magic's own parser, REST kept verbatim.

    The options and every positional but the last are parsed by the parser that the
    magic's help shows; the last positional (the prompt) is the rest of the line as
    written, with one pair of quotes around the whole of it removed and nothing else
    touched (no quote processing, no ``$x`` or ``{x}`` expansion).

    Raises:
        UsageError: An unknown option, a bad option value or a missing positional (the
            run).
    """
    parser = _parser_of(magic)
    names = positional_names(parser)
    for match in _WORD.finditer(line):
        try:
            words = arg_split(line[: match.end()])  # as parse_argstring splits
        except ValueError:
            continue  # inside a quoted option value
        found = scan_arguments(parser, words)
        if found.pending is None and len(found.positionals) == len(names) - 1:
            args = parser.parse_args(words)
            setattr(args, names[-1], unquote(line[match.end() :].strip()))
            return args
    scan_arguments(parser, arg_split(line, strict=False))  # an unknown option, said first
    usage = one_line(parser.format_usage()).removeprefix("::").removeprefix("usage:").strip()
    raise UsageError(f"Name the {names[0]}: {usage}.")


def unquote(text: str) -> str:
    """Remove one pair of quotes around the whole text (parse_argstring keeps them)."""
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == text[0]:
        return text[1:-1]
    return text


def parse_args(magic: Any, line: str) -> Any:
    """Parse a magic's line with its own parser (the one its help shows).

    Raises:
        UsageError: Bad quotes (argparse errors are UsageErrors already).
    """
    try:
        return parse_argstring(magic, line)
    except ValueError as exc:
        raise UsageError(f"Cannot read the arguments ({exc}); check the quotes.") from None
