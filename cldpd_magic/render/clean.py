"""Cleaning text for a terminal or a page: escapes, controls, surrogates, bidi marks."""

from __future__ import annotations

import json
import re
from typing import Any

#: Longest line shown in a cell; the transcript keeps the whole line.
MAX_SHOWN_CHARS = 2000


#: Terminal escape sequences (CSI, OSC, DCS/PM/APC strings, two-character escapes) and
#: control characters other than tab and newline: what must never reach a terminal or a page.
_TERMINAL_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[@-Z\\-_]?"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)


_SURROGATE_RE = re.compile("[\ud800-\udfff]")
#: Bidirectional overrides and isolates: they make a terminal show text in another order.
_BIDI_RE = re.compile("[\u202a-\u202e\u2066-\u2069]")


def clean_text(text: str) -> str:
    """Remove terminal escape sequences and control characters (tab and newline stay).

    Agent output is hostile input: colours, cursor moves, window titles and clear-screen
    sequences are dropped, so that what is shown is only the text. Bidirectional
    overrides go too, and lone surrogates (which no page or terminal can encode) become
    U+FFFD.
    """
    if not text or is_clean(text):
        return text
    text = _BIDI_RE.sub("", _TERMINAL_RE.sub("", text))
    return _SURROGATE_RE.sub("\ufffd", text)


#: Latin-1 that clean_text keeps (all but the control characters; tab and newline stay).
_KEPT_LATIN1 = bytes(range(0x20, 0x7F)) + b"\t\n" + bytes(range(0xA0, 0x100))
#: What else clean_text removes or replaces: bidirectional marks and lone surrogates.
_BIDI_OR_SURROGATE_RE = re.compile("[\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def is_clean(text: str) -> bool:
    """Whether :func:`clean_text` leaves the text, and each of its lines, as it is.

    Every escape sequence starts with a control character, so text without one, without
    bidirectional marks and without lone surrogates is clean. Quick for many lines at
    once (a flood of plain text): mostly byte operations, not a regex over each line.
    """
    if text.isascii() and text.isprintable():
        return True  # most short lines (a tool call, a result's first line): one C scan
    if text.encode("latin-1", "ignore").translate(None, _KEPT_LATIN1):
        return False  # a control character (C0 or C1) other than tab and newline
    return text.isascii() or _BIDI_OR_SURROGATE_RE.search(text) is None


def _clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit:,} more characters in the transcript]"


def _first_line(text: str, limit: int = 160) -> str:
    first = text.strip().split("\n", 1)[0]
    return first if len(first) <= limit else first[: limit - 1] + "…"


def format_count(value: float | None) -> str:
    """A count as ``1,234`` (rounded), or ``?`` when it is not known."""
    return "?" if value is None else f"{value:,.0f}"


def _short(value: Any, limit: int = 60) -> str:
    """A scalar's one-line form, clipped."""
    text = value if isinstance(value, str) else json.dumps(value)
    return _first_line(text, limit)
