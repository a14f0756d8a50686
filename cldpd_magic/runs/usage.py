"""What a run used (turns, tokens, cost), read live from Claude Code's stream-json output.

A ``result`` event carries the authoritative totals of the CLI run so far
(``num_turns``, ``usage``, ``total_cost_usd``). Between results, each assistant message
adds its ``usage`` (counted once per message id: the CLI repeats a message's usage on
every content block) and a cost estimated from list prices, so a budget can act before
the turn after next. Lines that are not stream-json are ignored.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..events import Usage

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
    price_in, price_out = next((p for rx, p in _PRICES if rx.search(model)), _DEFAULT_PRICE)
    return (
        usage.input_tokens * price_in
        + usage.cache_creation_tokens * price_in * 1.25
        + usage.cache_read_tokens * price_in * 0.1
        + usage.output_tokens * price_out
    ) / 1e6


def _number(value: object) -> float | None:
    """A JSON number that can be a count or a cost (finite, not negative), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def _int(value: object) -> int:
    number = _number(value)
    return 0 if number is None else int(number)


def _tokens(raw: object) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    return Usage(
        input_tokens=_int(raw.get("input_tokens")),
        output_tokens=_int(raw.get("output_tokens")),
        cache_read_tokens=_int(raw.get("cache_read_input_tokens")),
        cache_creation_tokens=_int(raw.get("cache_creation_input_tokens")),
    )


#: Links an agent prints that a batch's results keep: pull requests, branches, commits.
_LINK = re.compile(
    r"https?://[^\s\"'<>()\[\]\\`]+/(?:pull|pulls|merge_requests|tree|compare|commit)/"
    r"[^\s\"'<>()\[\]\\`]+"
)
MAX_LINKS = 50


class UsageMeter:
    """Follows one run's output lines and keeps its :class:`Usage` and printed links.

    Safe to read from any thread while one thread feeds it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base = Usage()
        self._messages: dict[str, tuple[str, Usage]] = {}
        self._usage = Usage()
        self.result_subtype = ""
        self.links: list[str] = []

    @property
    def usage(self) -> Usage:
        """The usage so far."""
        return self._usage

    def feed(self, line: str) -> bool:
        """Take one output line; return whether the usage changed."""
        if "://" in line:
            self._collect_links(line)
        if '"usage"' not in line and '"total_cost_usd"' not in line:
            return False
        try:
            event = json.loads(line)
        except ValueError:
            return False
        if not isinstance(event, dict):
            return False
        kind = event.get("type")
        with self._lock:
            if kind == "result":
                self._on_result(event)
            elif kind == "assistant" and isinstance(event.get("message"), dict):
                if not self._on_assistant(event["message"]):
                    return False
            else:
                return False
            self._usage = self._total()
        return True

    def _on_result(self, event: dict) -> None:
        tokens = _tokens(event.get("usage"))
        cost = _number(event.get("total_cost_usd"))
        if cost is None:
            cost = self._total().cost_usd
        turns = _int(event.get("num_turns")) or self._total().turns
        self._base = Usage(
            turns,
            tokens.input_tokens,
            tokens.output_tokens,
            tokens.cache_read_tokens,
            tokens.cache_creation_tokens,
            float(cost),
        )
        self._messages.clear()
        subtype = event.get("subtype")
        self.result_subtype = subtype if isinstance(subtype, str) else ""

    def _on_assistant(self, message: dict) -> bool:
        if message.get("id") is None or not isinstance(message.get("usage"), dict):
            return False
        model = message.get("model")
        entry = (model if isinstance(model, str) else "", _tokens(message["usage"]))
        key = str(message["id"])
        if self._messages.get(key) == entry:
            return False
        self._messages[key] = entry
        return True

    def _total(self) -> Usage:
        total = self._base
        for model, tokens in self._messages.values():
            cost = estimate_cost(model, tokens)
            total = total + Usage(
                1,
                tokens.input_tokens,
                tokens.output_tokens,
                tokens.cache_read_tokens,
                tokens.cache_creation_tokens,
                cost,
            )
        return total

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
