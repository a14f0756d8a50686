"""Fuzzing the renderers: random and mutated stream-json, random bytes, random Markdown.

A seeded generator (``CLDPD_FUZZ_SEED``) makes inputs for a fixed budget: at most
``CLDPD_FUZZ_EXAMPLES`` inputs per test and at most ``CLDPD_FUZZ_SECONDS`` seconds per test
(the time only bounds the run; nothing asserts on it). Every input goes through
``render_output_line``, ``SessionView.add`` with ``.html()`` and ``.text()``, and the
Markdown path; nothing may raise, and the HTML must pass the same safety check as the
XSS corpus. A failure names the seed and the input, so it can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from html_safety import PAYLOADS, hostile_lines, html_problems

from cldpd_magic.events import Event, EventType
from cldpd_magic.render.markdown import markdown_to_html
from cldpd_magic.render.stream import render_output_line
from cldpd_magic.render.views import _CSS, SessionView
from cldpd_magic.secrets import Masker

SEED = int(os.environ.get("CLDPD_FUZZ_SEED", "20261203"))
EXAMPLES = int(os.environ.get("CLDPD_FUZZ_EXAMPLES", "20000"))
SECONDS = float(os.environ.get("CLDPD_FUZZ_SECONDS", "10"))
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
SECRET = "fuzz-secret-9f3a"

#: Real shapes of Claude Code's stream-json events (documented fields), to mutate.
EVENTS: list[dict[str, Any]] = [
    {"type": "system", "subtype": "init", "session_id": "s", "model": "claude-x", "cwd": "/w",
     "permissionMode": "default", "tools": ["Bash", "Read"], "mcp_servers": [],
     "claude_code_version": "2.1.0", "apiKeySource": "ANTHROPIC_API_KEY"},
    {"type": "system", "subtype": "api_retry", "attempt": 1, "max_retries": 10,
     "retry_delay_ms": 500, "error_status": 529, "error": "overloaded_error"},
    {"type": "system", "subtype": "compact_boundary",
     "compact_metadata": {"trigger": "auto", "pre_tokens": 1000}},
    {"type": "system", "subtype": "status", "status": "compacting"},
    {"type": "assistant", "message": {"id": "m", "role": "assistant", "content": [
        {"type": "text", "text": "## Plan\n\n- [a](https://a.io) **b** `c`"},
        {"type": "thinking", "thinking": "hmm\nmore", "signature": "x"},
        {"type": "tool_use", "id": "t", "name": "Bash", "input": {"command": "ls -la"}},
    ], "usage": {"input_tokens": 3, "output_tokens": 4}}, "parent_tool_use_id": None},
    {"type": "user", "message": {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "a\nb", "is_error": False},
        {"type": "tool_result", "tool_use_id": "u", "is_error": True,
         "content": [{"type": "text", "text": "denied"}]},
    ]}},
    {"type": "result", "subtype": "success", "is_error": False, "duration_ms": 1200,
     "duration_api_ms": 1000, "num_turns": 2, "result": "Done.", "session_id": "s",
     "total_cost_usd": 0.01, "usage": {"input_tokens": 5, "output_tokens": 6},
     "permission_denials": [{"tool_name": "Bash", "tool_use_id": "t",
                             "tool_input": {"command": "rm -rf /"}}]},
    {"type": "result", "subtype": "error_max_turns", "is_error": True, "num_turns": 3,
     "errors": ["max turns"]},
    {"type": "stream_event", "event": {"type": "content_block_delta"}},
    {"type": "rate_limit_event", "rate_limit_info": {"status": "allowed_warning"}},
]  # fmt: skip

MARKDOWN_ATOMS = [
    "[", "]", "(", ")", "![", "](", "<", ">", "*", "**", "_", "`", "```", "~~", "|", "---",
    "\n", "\n\n", "# ", "> ", "- ", "1. ", "\\", "&", "&#", ";", "&#x6A;", "&colon;", '"',
    "'", " ", "\t", "javascript:", "JaVaScRiPt:", "data:", "vbscript:", "http://", "https://",
    "mailto:", "#", "//", "x.io", "onerror=", "onmouseover=", "window.pwned=1", "<script>",
    "</script>", "<img src=x ", "<svg ", "\x1b[31m", "\x1b]0;t\x07", "\x00", "\ud800",
    "\u202e", "\ufffd", "é", "\U0001d4b3", "[r]: ", "\"t\"", SECRET,
]  # fmt: skip


def _budget() -> Iterator[int]:
    """Example numbers until the count or the time budget is used up."""
    deadline = time.monotonic() + SECONDS
    for index in range(EXAMPLES):
        if time.monotonic() > deadline:
            return
        yield index


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(12 if depth < 4 else 8)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 2**63, 10**400, 1.5, -0.0, 1e308])
    if choice == 3:
        return rng.choice([float("nan"), float("inf")])
    if choice in (4, 5, 6):
        return _random_markdown(rng, rng.randrange(1, 20))
    if choice == 7:
        return rng.choice(PAYLOADS)
    if choice in (8, 9):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["type", "text", "content", "input", "name", "subtype", "result", "message"]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _random_markdown(rng: random.Random, atoms: int) -> str:
    return "".join(rng.choice(MARKDOWN_ATOMS) for _ in range(atoms))


def _mutate_value(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """A copy of a decoded event with some fields replaced, dropped or retyped."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            roll = rng.random()
            if roll < 0.08:
                continue
            out[key] = _random_value(rng) if roll < 0.2 else _mutate_value(rng, item, depth + 1)
        if rng.random() < 0.1:
            out[_random_markdown(rng, 2)] = _random_value(rng)
        return out
    if isinstance(value, list):
        items = [_mutate_value(rng, item, depth + 1) for item in value]
        if rng.random() < 0.2:
            items.append(_random_value(rng))
        return items
    return _random_value(rng) if rng.random() < 0.3 else value


def _mutate_text(rng: random.Random, text: str) -> str:
    """Byte-level damage: cuts, insertions, duplicated and swapped pieces."""
    for _ in range(rng.randrange(1, 4)):
        if not text:
            break
        at = rng.randrange(len(text))
        roll = rng.randrange(5)
        if roll == 0:
            text = text[:at]
        elif roll == 1:
            text = text[:at] + rng.choice([*MARKDOWN_ATOMS, "{", "}", "\\u", '\\"']) + text[at:]
        elif roll == 2:
            text = text[:at] + text[at : at + rng.randrange(1, 40)] * 2 + text[at:]
        elif roll == 3:
            text = text[:at] + text[at + rng.randrange(1, 10) :]
        else:
            text = text[at:] + text[:at]
    return text


def _random_line(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
        return data.decode("utf-8", rng.choice(["replace", "surrogateescape", "ignore"]))
    if kind == 1:
        return _random_markdown(rng, rng.randrange(1, 60))
    if kind == 2:
        return rng.choice(hostile_lines(rng.choice(PAYLOADS)))
    event = _mutate_value(rng, rng.choice(EVENTS))
    line = json.dumps(event, ensure_ascii=rng.random() < 0.5)
    if kind == 3:
        line = _mutate_text(rng, line)
    if rng.random() < 0.05:
        depth = rng.choice([10, 500, 5000])
        line = '{"type":"assistant","message":' * depth + "1" + "}" * depth
    return line


def _check(html: str, what: str, seed_note: str, css: tuple[str, ...] = ()) -> None:
    problems = html_problems(html, css)
    assert not problems, f"{seed_note}: unsafe HTML for {what!r}: {problems[:3]}"
    html.encode("utf-8")


def _run(test: Callable[[random.Random, str], None]) -> int:
    rng = random.Random(SEED)
    done = 0
    for index in _budget():
        test(rng, f"seed {SEED}, example {index}")
        done += 1
    return done


def test_random_lines_through_render_output_line():
    mask = Masker([SECRET])

    def one(rng: random.Random, note: str) -> None:
        line = _random_line(rng)
        try:
            lines = render_output_line(line, mask=mask)
        except Exception as exc:  # pragma: no cover - the failure report
            pytest.fail(f"{note}: render_output_line raised {exc!r} for {line[:300]!r}")
        for rendered in lines:
            assert not CONTROL.search(rendered.text), f"{note}: control character in {line!r}"
            assert SECRET not in rendered.text, f"{note}: secret shown for {line!r}"
            _check(rendered.to_html(), line[:300], note)

    assert _run(one) > 0


def test_random_lines_through_a_session_view():
    view = SessionView("pod", max_lines=50, masker=Masker([SECRET]))
    types = [EventType.OUTPUT] * 6 + [EventType.STDERR, EventType.BUILD_OUTPUT]

    def one(rng: random.Random, note: str) -> None:
        line = _random_line(rng)
        try:
            view.add(Event(rng.choice(types), line))
            if rng.random() < 0.1:
                text, markup = view.text(), view.html()
            else:
                return
        except Exception as exc:  # pragma: no cover - the failure report
            pytest.fail(f"{note}: the view raised {exc!r} for {line[:300]!r}")
        assert not CONTROL.search(text), f"{note}: control character after {line!r}"
        assert SECRET not in text + markup, f"{note}: secret shown after {line!r}"
        _check(markup, line[:300], note, (_CSS,))

    assert _run(one) > 0
    _check(view.html(), "the final view", f"seed {SEED}", (_CSS,))


def test_random_markdown():
    def one(rng: random.Random, note: str) -> None:
        text = _random_markdown(rng, rng.randrange(1, 120))
        try:
            markup = markdown_to_html(text, Masker([SECRET]) if rng.random() < 0.5 else None)
        except Exception as exc:  # pragma: no cover - the failure report
            pytest.fail(f"{note}: markdown_to_html raised {exc!r} for {text!r}")
        _check(markup, text, note)

    assert _run(one) > 0
