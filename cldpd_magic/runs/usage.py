"""What a run used (turns, tokens, cost), read live from Claude Code's stream-json output.

Each ``result`` closes a turn with the CLI's own figures: that turn's ``num_turns`` and
``usage``, and the process's cumulative ``total_cost_usd`` (one result per run with
``-p``; one per user message in streaming-input mode). Between results, each assistant
message adds its ``usage`` (counted once per message id: the CLI repeats a message's
usage on every content block) and a cost estimated from list prices, so a budget can act
before the turn after next. Lines that are not stream-json are ignored.
"""

from __future__ import annotations

import collections
import functools
import json
import operator
import re
import threading
from dataclasses import dataclass, fields
from pathlib import Path

from ..events import Usage
from ..stream_json import (
    AssistantMessage,
    ClaudeEvent,
    Result,
    TokenUsage,
    json_number,
    usage_event,
)

__all__ = [
    "Limits",
    "UsageMeter",
    "estimate_cost",
    "usage_from_transcript",
]


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on one run; None is no cap.

    Attributes:
        max_cost_usd: Stop the run gracefully once its cost passes this.
        max_turns: Stop the run gracefully once it passes this many turns.
        timeout_seconds: Stop the run gracefully once its agent has run this long.
    """

    max_cost_usd: float | None = None
    max_turns: int | None = None
    timeout_seconds: float | None = None

    def passed(self, usage: Usage) -> str:
        """Which cap the usage has passed: ``over budget``, ``max turns`` or ""."""
        if self.max_cost_usd is not None and usage.cost_usd > self.max_cost_usd:
            return "over budget"
        if self.max_turns is not None and usage.turns > self.max_turns:
            return "max turns"
        return ""


#: US dollars per million tokens (input, output) by model family, for estimates between
#: result events; cache writes cost 1.25 times input, cache reads 0.1 times. A model not
#: listed is priced as Sonnet.
_PRICES: list[tuple[re.Pattern[str], tuple[float, float]]] = [
    (re.compile(r"opus-4-(0|1)\b|opus-4-20|claude-3-opus"), (15.0, 75.0)),
    (re.compile(r"opus"), (5.0, 25.0)),
    (re.compile(r"haiku-3|3-5-haiku|3-haiku"), (0.8, 4.0)),
    (re.compile(r"haiku"), (1.0, 5.0)),
]
_DEFAULT_PRICE = (3.0, 15.0)


def estimate_cost(model: str, usage: Usage) -> float:
    """Estimate the cost in USD of some tokens of a model from list prices."""
    price_in, price_out = _price(model[:200])  # the agent's text: cached only so long
    return (
        usage.input_tokens * price_in
        + usage.cache_creation_tokens * price_in * 1.25
        + usage.cache_read_tokens * price_in * 0.1
        + usage.output_tokens * price_out
    ) / 1e6


@functools.lru_cache(maxsize=64)
def _price(model: str) -> tuple[float, float]:
    return next((p for rx, p in _PRICES if rx.search(model)), _DEFAULT_PRICE)


def _count(value: float | None) -> int:
    """A count or a number of tokens: a whole number, 0 unless a finite number >= 0."""
    return 0 if value is None or value < 0 else int(value)


class _Tally(
    collections.namedtuple(
        "_Tally",
        [f.name for f in fields(Usage)],
        defaults=[f.default for f in fields(Usage)],
    )
):
    """A :class:`Usage` being summed: a tuple of its fields, made and added at a fraction
    of the cost of a frozen dataclass (several for each new message); the meter makes one
    Usage of its tallies when they change."""

    __slots__ = ()

    def plus(self, other: _Tally) -> _Tally:
        return tuple.__new__(_Tally, map(operator.add, self, other))


_NONE = _Tally()


def _turn(model: str, tokens: _Tally) -> _Tally:
    """One assistant message as a turn: its tokens and their estimated cost."""
    return _Tally(
        1,
        tokens.input_tokens,
        tokens.output_tokens,
        tokens.cache_read_tokens,
        tokens.cache_creation_tokens,
        estimate_cost(model, tokens),  # type: ignore[arg-type]  # a tally has its fields
    )


def _tokens(usage: TokenUsage | None) -> _Tally:
    if usage is None:
        return _NONE
    return _Tally(
        0,
        _count(usage.input_tokens),
        _count(usage.output_tokens),
        _count(usage.cache_read_tokens),
        _count(usage.cache_creation_tokens),
    )


#: Links an agent prints that a batch's results keep: pull requests, branches, commits.
_LINK = re.compile(
    r"https?://[^\s\"'<>()\[\]\\`]+/(?:pull|pulls|merge_requests|tree|compare|commit)/"
    r"[^\s\"'<>()\[\]\\`]+"
)
MAX_LINKS = 50


class UsageMeter:
    """Follows one run's output lines and keeps its :class:`Usage` and printed links.

    It reads the lines' typed events (:mod:`cldpd_magic.stream_json`). A ``result``
    closes a turn: in one-shot ``-p`` runs there is one for the whole run; a process that
    takes several user messages writes one per turn, whose ``num_turns`` and tokens
    (``model_usage_since_last_result``, else ``usage``) are that turn's alone while
    ``total_cost_usd`` is cumulative. So turns and tokens are summed over the results,
    and the cost is the last result's. Assistant messages since the last result add an
    estimate (a turn each, their tokens, list prices), replaced by the figures of the
    next result.

    Safe to read from any thread while one thread feeds it.

    Attributes:
        result_subtype: The last result's subtype ("" before one).
        links: Pull request, branch and commit links printed, in order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results = _NONE
        # A message id -> its model and usage as the line gave them, and as a turn.
        self._messages: dict[str, tuple[tuple[str, TokenUsage], _Tally]] = {}
        self._since = _NONE  # the messages since the last result, summed as they come
        self._usage = Usage()
        self.result_subtype = ""
        self.links: list[str] = []

    @property
    def usage(self) -> Usage:
        """The usage so far."""
        return self._usage

    def feed(self, line: str, links: bool = True) -> bool:
        """Take one output line; return whether the usage changed. Never raises.

        Args:
            line: The line.
            links: Whether it may hold a link (False when the text it came in holds no
                ``://``: it is not looked at for one then).
        """
        if links and "://" in line:
            self._collect_links(line)
        # Only these lines can change the usage; the others are parsed by whoever shows them.
        if '"usage"' not in line and '"total_cost_usd"' not in line and '"cost_usd"' not in line:
            return False
        return self.take(usage_event(line))

    def take(self, event: ClaudeEvent | None) -> bool:
        """Take one line's typed event; return whether the usage changed.

        Args:
            event: The event (None, and events other than results and assistant
                messages, change nothing).
        """
        with self._lock:
            if isinstance(event, Result):
                self._on_result(event)
            elif not (isinstance(event, AssistantMessage) and self._on_assistant(event)):
                return False
            self._usage = Usage(*self._results.plus(self._since))
        return True

    def _on_result(self, result: Result) -> None:
        since = self._since
        turns = _count(result.turns) or since.turns
        if result.turn_model_usage is not None:
            # The turn's tokens by model: right also where "usage" says 0 (over budget).
            tokens = functools.reduce(
                _Tally.plus, map(_tokens, result.turn_model_usage.values()), _NONE
            )
        elif result.usage is not None:
            tokens = _tokens(result.usage)
        else:
            tokens = since
        cost = json_number(result.cost_usd, minimum=0)
        if cost is None:
            cost = self._results.cost_usd + since.cost_usd
        done = self._results
        self._results = _Tally(
            done.turns + turns,
            done.input_tokens + tokens.input_tokens,
            done.output_tokens + tokens.output_tokens,
            done.cache_read_tokens + tokens.cache_read_tokens,
            done.cache_creation_tokens + tokens.cache_creation_tokens,
            cost,
        )
        self._messages.clear()
        self._since = _NONE
        self.result_subtype = result.subtype or ""

    def _on_assistant(self, message: AssistantMessage) -> bool:
        if message.message_id is None or message.usage is None:
            return False
        given = (message.model, message.usage)
        known = self._messages.get(message.message_id)
        if known is not None and known[0] == given:
            return False  # the message's next block: its usage again (compared in C)
        turn = _turn(message.model, _tokens(message.usage))
        self._messages[message.message_id] = (given, turn)
        if known is None:
            self._since = self._since.plus(turn)
        elif known[1] != turn:  # a message seen again with other figures: sum them again
            self._since = functools.reduce(
                _Tally.plus, (turn for _, turn in self._messages.values()), _NONE
            )
        else:
            return False
        return True

    def _collect_links(self, line: str) -> None:
        for link in _LINK.findall(line):
            link = link.rstrip(".,;:!?*_")
            if link not in self.links and len(self.links) < MAX_LINKS:
                self.links.append(link)


def usage_from_transcript(path: str | Path) -> Usage:
    """Read a run's usage back from its transcript (its OUTPUT events' stream-json)."""
    meter = UsageMeter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith('{"type":"output"'):
                meter.feed(json.loads(line)["data"])
    return meter.usage
