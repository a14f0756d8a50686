"""Turning session events into what a person reads: text, HTML, batched live updates.

One renderer serves the magics and the pod picker: :class:`SessionView` keeps a bounded
tail of rendered lines and a status line; :class:`LiveFeed` consumes a session's events
in a worker thread and publishes the view a few times a second, never once per line.
"""

from __future__ import annotations

import contextvars
import html
import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token

from .logs import log_swallowed
from .protocol import Writer
from .session import MASK, Event, EventType, Masker, RunState, RunStatus, Session
from .usage import Usage

DEFAULT_MAX_LINES = 200
DEFAULT_FLUSH_INTERVAL = 0.25
#: Longest line shown in a cell; the transcript keeps the whole line.
MAX_SHOWN_CHARS = 2000
_STEP_RE = re.compile(r"^Step (\d+)/(\d+) :")
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
    if not text:
        return text
    text = _BIDI_RE.sub("", _TERMINAL_RE.sub("", text))
    return _SURROGATE_RE.sub("\ufffd", text)


_KEY_ARGS = {
    "Bash": "command",
    "Read": "file_path",
    "Write": "file_path",
    "Edit": "file_path",
    "MultiEdit": "file_path",
    "NotebookEdit": "notebook_path",
    "NotebookRead": "notebook_path",
    "Glob": "pattern",
    "Grep": "pattern",
    "LS": "path",
    "WebFetch": "url",
    "WebSearch": "query",
    "Task": "description",
    "Agent": "description",
    "Skill": "skill",
    "SlashCommand": "command",
    "BashOutput": "bash_id",
    "KillShell": "shell_id",
}
#: Result subtypes of Claude Code and what the summary line calls them.
_RESULT_NAMES = {
    "error_max_turns": "reached the turn limit",
    "error_during_execution": "error during execution",
    "error_max_budget_usd": "reached the budget",
    "error_max_structured_output_retries": "no valid structured output",
}
#: Event types that carry nothing a person needs to read (partial messages, tool ticks).
_QUIET_TYPES = frozenset({"stream_event", "tool_progress", "keep_alive"})
#: System subtypes that only tick (thinking token estimates while the model thinks).
_QUIET_SYSTEM = frozenset({"thinking_tokens"})
#: Fields left out of the summary of an unknown event.
_SUMMARY_SKIP = frozenset({"type", "subtype", "uuid", "session_id", "parent_tool_use_id"})
#: Longest Markdown text rendered as Markdown; the transcript keeps the whole text.
MAX_MARKDOWN_CHARS = 20000

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Line:
    """One rendered piece of output.

    Attributes:
        kind: ``text``, ``stderr``, ``markdown``, ``thinking``, ``tool``, ``tool_result``,
            ``tool_error``, ``denied``, ``retry``, ``result``, ``failed``, ``system``,
            ``event``, ``build`` or ``error``.
        text: Plain-text form (for Markdown, the Markdown source), free of terminal
            escapes and control characters.
        lines: How many screen lines it takes (for the bounded tail).
        markup: Its HTML when made at render time (Markdown); else made from ``text``.
    """

    kind: str
    text: str
    lines: int = 1
    markup: str = ""

    def to_html(self) -> str:
        """HTML form: every character of the text escaped, Markdown made safe."""
        if self.markup:
            return self.markup
        if self.kind == "markdown":
            return f'<div class="cldpd-md">{markdown_to_html(self.text)}</div>'
        return f'<div class="cldpd-{self.kind}">{html.escape(self.text)}</div>'


def _clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit:,} more characters in the transcript]"


def _first_line(text: str, limit: int = 160) -> str:
    first = text.strip().split("\n", 1)[0]
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _number(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (strings, null, bools, huge ints)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _count(value: Any) -> str:
    number = _number(value)
    return "?" if number is None else f"{number:,.0f}"


def _short(value: Any, limit: int = 60) -> str:
    """A scalar's one-line form, clipped."""
    text = value if isinstance(value, str) else json.dumps(value)
    return _first_line(text, limit)


def _summary(obj: dict[str, Any], limit: int = 160) -> str:
    """``key=value`` of an event's scalar fields, for events this renderer does not know."""
    parts = [
        f"{key}={_short(value)}"
        for key, value in obj.items()
        if key not in _SUMMARY_SKIP and (value is None or isinstance(value, str | int | float))
    ]
    nested = [str(key) for key, value in obj.items() if isinstance(value, dict | list)]
    if nested:
        parts.append("+" + ",".join(nested))
    return _first_line(" ".join(parts), limit)


def _text_of(content: Any) -> str:
    """The text of a message or tool-result content: a string, or a list of blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type") == "image":
                    parts.append("[image]")
                elif isinstance(part.get("text"), str):
                    parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return "" if content is None else json.dumps(content)


def _tool_call(name: Any, args: Any) -> str:
    """``Name: key argument`` of a tool call (the argument that says what it does)."""
    name = _first_line(str(name or "tool"), 60)
    value: Any = None
    if isinstance(args, dict):
        key = _KEY_ARGS.get(name)
        value = args.get(key) if key else None
        if value is None:
            if name == "TodoWrite" and isinstance(args.get("todos"), list):
                value = f"{len(args['todos'])} todos"
            else:
                value = next((v for v in args.values() if isinstance(v, str)), "")
    if value is None or value == "":
        return name
    return f"{name}: {_short(value, 160)}"


def _markdown_line(text: str, kind: str = "markdown") -> Line:
    text = _clip(text.strip(), MAX_MARKDOWN_CHARS)
    return Line(kind, text, text.count("\n") + 1)


def _duration(value: Any) -> str:
    number = _number(value)
    return "? s" if number is None else f"{number / 1000:.1f} s"


class StreamRenderer:
    """Renders one agent's output lines, keeping what it must remember between them.

    It remembers the last assistant text shown, so that the final ``result`` event does
    not show the same answer again. Every line it produces is free of terminal escapes
    and masked with ``mask`` *after* JSON decoding, so a secret written with ``\\uXXXX``
    escapes is masked too. Rendering never raises: a line that cannot be rendered as an
    event is shown as text.

    Args:
        mask: Applied to the text of every produced line (e.g. a session's ``Masker``).
    """

    def __init__(self, mask: Callable[[str], str] | None = None) -> None:
        self.mask = mask
        self.last_text = ""

    def render(self, text: str) -> list[Line]:
        """Render one output line: a Claude Code stream-json event, or plain text."""
        try:
            lines = self._render(text)
        except Exception:  # hostile output must never end a session or its consumer
            log_swallowed(log, "rendering an output line failed; shown as text", self.mask)
            lines = None
        if lines is None:
            lines = [Line("text", _clip(text))]
        try:
            return [self._finish(line) for line in lines]
        except Exception:
            log_swallowed(log, "finishing a rendered line failed; shown as text", self.mask)
            return [self._finish(Line("text", _clip(str(text))))]

    def _finish(self, line: Line) -> Line:
        text = clean_text(line.text)
        if self.mask is None:
            return Line(line.kind, text, line.lines)
        if line.kind != "markdown":
            return Line(line.kind, self.mask(text), line.lines)
        # The mask must stay text in Markdown ("********" alone would be a rule): it goes
        # through as a private-use character. The decoded text (entities, escapes) is
        # masked again, as is the HTML made of it.
        source = self.mask(text).replace(MASK, _MASK_STAND_IN)
        markup = self.mask(markdown_to_html(source, self.mask)).replace(_MASK_STAND_IN, MASK)
        return Line(line.kind, self.mask(text), line.lines, f'<div class="cldpd-md">{markup}</div>')

    def _render(self, text: str) -> list[Line] | None:
        stripped = text.strip()
        if not (stripped.startswith("{") and stripped.endswith("}")):
            return None
        try:
            obj = json.loads(stripped)
        except (ValueError, RecursionError):
            return None
        return self.render_event(obj) if isinstance(obj, dict) else None

    def render_event(self, obj: dict[str, Any]) -> list[Line] | None:
        """Render one decoded stream-json event; None when it is no event (shown as text).

        Args:
            obj: A decoded JSON line.

        Returns:
            Rendered lines (none for events that stay quiet), or None when the object
            has no string ``type``.
        """
        kind = obj.get("type")
        if not isinstance(kind, str):
            return None
        handler = getattr(self, f"_on_{kind}", None) if kind.isidentifier() else None
        if kind in _QUIET_TYPES:
            return []
        if handler is None:
            return [Line("event", f"· {_first_line(kind, 40)}: {_summary(obj)}".rstrip(": "))]
        return handler(obj)

    def _on_system(self, obj: dict[str, Any]) -> list[Line]:
        subtype = obj.get("subtype")
        if subtype == "init":
            tools = obj.get("tools")
            servers = obj.get("mcp_servers")
            parts = [
                f"● Claude Code {_short(obj.get('claude_code_version') or '')}".rstrip(),
                f"model {_short(obj.get('model') or '?')}",
                f"permission mode {_short(obj.get('permissionMode') or '?')}",
                f"{len(tools) if isinstance(tools, list) else '?'} tools",
            ]
            if isinstance(servers, list) and servers:
                parts.append(f"{len(servers)} MCP servers")
            if obj.get("session_id"):
                parts.append(f"session {_short(obj['session_id'])}")
            return [Line("system", " · ".join(parts))]
        if subtype == "api_retry":
            status = obj.get("error_status")
            error = " ".join(_short(v) for v in (status, obj.get("error")) if v not in (None, ""))
            return [
                Line(
                    "retry",
                    f"↻ API retry {_count(obj.get('attempt'))}/{_count(obj.get('max_retries'))}"
                    f" in {_duration(obj.get('retry_delay_ms'))}" + (f": {error}" if error else ""),
                )
            ]
        if subtype == "compact_boundary":
            meta = obj.get("compact_metadata")
            meta = meta if isinstance(meta, dict) else {}
            trigger = _short(meta.get("trigger") or "?")
            return [
                Line(
                    "system",
                    f"── conversation compacted ({trigger}, "
                    f"{_count(meta.get('pre_tokens'))} tokens before) ──",
                )
            ]
        if subtype == "permission_denied":
            call = _tool_call(obj.get("tool_name"), None)
            reason = _first_line(_text_of(obj.get("message")), 200)
            return [
                Line("denied", f"⊘ permission denied: {call}" + (f": {reason}" if reason else ""))
            ]
        if subtype == "status" and obj.get("status") in (None, ""):
            return []
        if isinstance(subtype, str) and subtype in _QUIET_SYSTEM:
            return []
        name = f"system/{_first_line(str(subtype), 40)}" if subtype is not None else "system"
        return [Line("event", f"· {name}: {_summary(obj)}".rstrip(": "))]

    def _on_assistant(self, obj: dict[str, Any]) -> list[Line] | None:
        message = obj.get("message")
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            return None
        lines: list[Line] = []
        for block in content:
            btype = block.get("type") if isinstance(block, dict) else None
            if btype == "text":
                text = _text_of(block.get("text"))
                if text.strip():
                    self.last_text = text.strip()
                    lines.append(_markdown_line(text))
            elif btype == "thinking":
                thought = _text_of(block.get("thinking"))
                if thought.strip():
                    lines.append(Line("thinking", f"✻ {_first_line(thought, 120)}"))
            elif btype == "redacted_thinking":
                lines.append(Line("thinking", "✻ (redacted thinking)"))
            elif btype in ("tool_use", "server_tool_use", "mcp_tool_use"):
                lines.append(Line("tool", f"▸ {_tool_call(block.get('name'), block.get('input'))}"))
            elif isinstance(btype, str):
                lines.append(Line("event", f"· {_first_line(btype, 40)} block"))
            else:
                lines.append(Line("event", f"· content block: {_short(block, 120)}"))
        return lines

    def _on_rate_limit_event(self, obj: dict[str, Any]) -> list[Line]:
        info = obj.get("rate_limit_info")
        if isinstance(info, dict) and info.get("status") == "allowed":
            return []
        summary = _summary(info) if isinstance(info, dict) else _summary(obj)
        return [Line("retry", f"⚠ rate limit: {summary}")]

    def _on_user(self, obj: dict[str, Any]) -> list[Line] | None:
        message = obj.get("message")
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        if isinstance(content, str):
            return [Line("user", f"▷ {_first_line(content)}")] if content.strip() else []
        if not isinstance(content, list):
            return None
        lines: list[Line] = []
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_result":
                text = _text_of(block.get("content")).strip()
                count = len(text.splitlines())
                more = f" (+{count - 1} lines)" if count > 1 else ""
                if block.get("is_error"):
                    lines.append(Line("tool_error", f"  ✗ {_first_line(text)}{more}"))
                else:
                    lines.append(Line("tool_result", f"  ↳ {_first_line(text)}{more}"))
            elif block.get("type") == "text" and str(block.get("text") or "").strip():
                lines.append(Line("user", f"▷ {_first_line(str(block['text']))}"))
        return lines

    def _on_result(self, obj: dict[str, Any]) -> list[Line]:
        subtype = obj.get("subtype")
        answer = _text_of(obj.get("result")).strip()
        errors = obj.get("errors")
        reason = (
            next((e for e in errors if isinstance(e, str) and e.strip()), "")
            if (isinstance(errors, list))
            else ""
        )
        if subtype == "success" and not obj.get("is_error"):
            head = "✓ done"
        elif subtype == "success" or subtype is None:
            head = f"✗ failed: {_first_line(reason or answer or 'no reason given', 300)}"
        else:
            name = _RESULT_NAMES.get(subtype) if isinstance(subtype, str) else None
            head = f"✗ {name or _first_line(str(subtype), 60)}"
            if reason:
                head += f": {_first_line(reason, 300)}"
        turns = _count(obj.get("num_turns"))
        turns += " turn" if turns == "1" else " turns"
        parts = [head, turns, _duration(obj.get("duration_ms"))]
        cost = _number(obj.get("total_cost_usd", obj.get("cost_usd")))
        if cost is not None:
            parts.append(f"${cost:.4f}")
        usage = obj.get("usage")
        if isinstance(usage, dict):
            tokens_in = sum(
                _number(usage.get(k)) or 0
                for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
            )
            parts.append(f"{tokens_in:,.0f} in / {_count(usage.get('output_tokens'))} out tokens")
        if obj.get("session_id"):
            parts.append(f"session {_short(obj['session_id'])}")
        lines = [Line("result" if head.startswith("✓") else "failed", " · ".join(parts))]
        denials = obj.get("permission_denials")
        for denial in denials if isinstance(denials, list) else []:
            if isinstance(denial, dict):
                call = _tool_call(denial.get("tool_name"), denial.get("tool_input"))
                lines.append(Line("denied", f"⊘ permission denied: {call}"))
        # The answer is usually the last assistant text, already shown: not twice. A
        # failure's one-line reason is in the summary line already.
        if answer and answer != self.last_text and (head.startswith("✓") or "\n" in answer):
            lines.append(_markdown_line(answer))
        return lines


def render_output_line(text: str, mask: Callable[[str], str] | None = None) -> list[Line]:
    """Render one output line on its own: a Claude Code stream-json event, or plain text.

    Args:
        text: The line.
        mask: Applied to every produced line's text, after JSON decoding.

    Returns:
        The rendered lines; never raises.
    """
    return StreamRenderer(mask).render(text)


def render_stream_json(obj: dict[str, Any]) -> list[Line] | None:
    """Render one decoded Claude Code stream-json event; None when it is no event."""
    return StreamRenderer().render_event(obj)


_MASK_STAND_IN = "\ue000"
_SAFE_LINK_RE = re.compile(r"(?:https?://|mailto:|#)", re.IGNORECASE)
_LANGUAGE_RE = re.compile(r"[\w+#.-]{1,40}")
_LINK_REL = "noopener noreferrer nofollow"


def _safe_link(url: str) -> bool:
    """Only http(s), mailto and in-page anchors: never javascript:, data:, relative URLs."""
    return bool(_SAFE_LINK_RE.match(url))


def _render_link_open(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    token = tokens[idx]
    href = str(token.attrGet("href") or "")
    if not _safe_link(href):  # an empty target (``[x]()``) is not validated by the parser
        token.attrs.pop("href", None)
    elif not href.startswith("#"):
        token.attrSet("target", "_blank")
    token.attrSet("rel", _LINK_REL)
    return self.renderToken(tokens, idx, options, env)


def _render_image(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    # An image becomes a link to it: nothing is loaded from a URL an agent chose.
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env) or "image"
    label = f"[image: {html.escape(alt)}]"
    src = str(token.attrGet("src") or "")
    if not _safe_link(src):  # an empty source (``![x]()``) is not validated by the parser
        return label
    return f'<a href="{html.escape(src)}" target="_blank" rel="{_LINK_REL}">{label}</a>'


def _render_fence(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    token = tokens[idx]
    language = token.info.strip().split(maxsplit=1)[0] if token.info.strip() else ""
    token.info = language if _LANGUAGE_RE.fullmatch(language) else ""
    return self.rules["_fence"](tokens, idx, options, env)


def _render_cell_open(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    tokens[idx].attrs.pop("style", None)  # alignment styles: no style attribute at all
    return self.renderToken(tokens, idx, options, env)


def _make_markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    md.validateLink = _safe_link  # type: ignore[method-assign]
    md.renderer.rules["_fence"] = md.renderer.rules["fence"]
    md.add_render_rule("link_open", _render_link_open)
    md.add_render_rule("image", _render_image)
    md.add_render_rule("fence", _render_fence)
    md.add_render_rule("th_open", _render_cell_open)
    md.add_render_rule("td_open", _render_cell_open)
    return md


_MARKDOWN = _make_markdown()
_MARKDOWN_LOCK = threading.Lock()


#: Markdown larger than this, or with more link and emphasis marks, is shown as text:
#: markdown-it-py takes time quadratic in nested brackets (``"![" * 10000``: a second).
MARKDOWN_MAX_CHARS = 200_000
MARKDOWN_MAX_MARKS = 2_000
#: Inline tokens whose text a reader sees, joined, once the Markdown is rendered.
_SHOWN_TEXT = ("text", "code_inline", "softbreak", "hardbreak")


def _mask_tokens(tokens: Iterable[Any], mask: Callable[[str], str]) -> None:
    """Mask decoded text (entities and escapes resolved) and link targets of parsed tokens.

    A secret split by markup (``sk-**ant**-…``) shows whole once rendered: a run of
    inline text that holds one when joined is replaced by its masked plain text.
    """
    for token in tokens:
        if token.content:
            token.content = mask(token.content)
        for name in ("href", "src", "title"):
            value = token.attrGet(name)
            if isinstance(value, str) and value:
                token.attrSet(name, mask(value))
        if token.children:
            _mask_tokens(token.children, mask)
            shown = "".join(c.content for c in token.children if c.type in _SHOWN_TEXT)
            masked = mask(shown)
            if masked != shown:
                token.children = [Token("text", "", 0, content=masked)]


def markdown_to_html(text: str, mask: Callable[[str], str] | None = None) -> str:
    """Render the Markdown that agents write as HTML that is safe in a trusted page.

    CommonMark with tables and strikethrough, through markdown-it-py: raw HTML is shown
    as text, links only to http, https, mailto or anchors (opening in a new tab, with
    ``rel="noopener noreferrer nofollow"``), images become links (nothing is loaded),
    every attribute is quoted and escaped, terminal escapes and control characters dropped.

    Args:
        text: The Markdown.
        mask: Applied to the decoded text of the document (after entities and escapes).

    Returns:
        The HTML; on any failure of the Markdown library, the escaped text.
    """
    text = clean_text(text)
    if len(text) > MARKDOWN_MAX_CHARS or sum(map(text.count, "[*_")) > MARKDOWN_MAX_MARKS:
        return f"<pre>{html.escape(mask(text) if mask else text)}</pre>"
    try:
        with _MARKDOWN_LOCK:  # the parser and renderer are not documented as thread-safe
            env: dict[str, Any] = {}
            tokens = _MARKDOWN.parse(text, env)
            if mask is not None:
                _mask_tokens(tokens, mask)
            return _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, env)
    except Exception:  # e.g. RecursionError on pathological nesting
        log_swallowed(log, "Markdown rendering failed; shown as text", mask)
        return f"<pre>{html.escape(mask(text) if mask else text)}</pre>"


_CSS = (
    "<style>"
    ".cldpd-view{font-family:var(--jp-code-font-family,monospace);font-size:12px;}"
    ".cldpd-status{font-weight:bold;margin:2px 0;}"
    ".cldpd-body{max-height:480px;overflow-y:auto;display:flex;flex-direction:column-reverse;}"
    ".cldpd-text,.cldpd-stderr,.cldpd-tool,.cldpd-tool_result,.cldpd-tool_error,"
    ".cldpd-result,.cldpd-failed,.cldpd-system,.cldpd-build,.cldpd-error,.cldpd-elided,"
    ".cldpd-thinking,.cldpd-retry,.cldpd-denied,.cldpd-event,.cldpd-user"
    "{white-space:pre-wrap;word-break:break-all;}"
    ".cldpd-stderr,.cldpd-tool_error,.cldpd-error,.cldpd-denied{color:#c62828;}"
    ".cldpd-tool{color:#1565c0;}.cldpd-tool_result,.cldpd-system,.cldpd-build,.cldpd-elided,"
    ".cldpd-event,.cldpd-user{color:#757575;}"
    ".cldpd-thinking{color:#9e9e9e;font-style:italic;}.cldpd-retry{color:#e65100;}"
    ".cldpd-result{font-weight:bold;color:#2e7d32;}"
    ".cldpd-failed{font-weight:bold;color:#c62828;}"
    ".cldpd-md{font-family:var(--jp-content-font-family,sans-serif);}"
    ".cldpd-md p,.cldpd-md ul,.cldpd-md ol,.cldpd-md h1,.cldpd-md h2,.cldpd-md h3{margin:4px 0;}"
    ".cldpd-md table{border-collapse:collapse;}"
    ".cldpd-md td,.cldpd-md th{border:1px solid #e0e0e0;padding:1px 6px;}"
    ".cldpd-transcript{color:#757575;font-size:11px;}"
    "</style>"
)


#: Line kinds a running text shows but a view does not: it has its status line instead.
_STATUS_KINDS = frozenset({"status", "build_log"})
#: Line kinds a running text writes to stderr; the rest go to stdout.
_NOTE_KINDS = frozenset({"stderr", "status", "build", "build_log"})


class RunLines:
    """Turns one run's events into :class:`Line`: what the HTML view and the text are made of.

    Output lines are rendered by one :class:`StreamRenderer` (so the final answer shows
    once); everything is masked after decoding and free of terminal escapes. Build steps
    (``Step N/M``) are counted for progress bars.

    Args:
        mask: Masks secret values (a session's ``Masker``).
        kind: What the run does (``start``, ``resume``, ``attach``), for its status lines.

    Attributes:
        build_step: The last build step seen.
        build_total: How many steps the build has.
    """

    def __init__(self, mask: Masker, kind: str = "") -> None:
        self.mask = mask
        self.kind = str(kind)
        self.renderer = StreamRenderer(mask)
        self.build_step = 0
        self.build_total = 0

    def _clean(self, text: str) -> str:
        return self.mask(clean_text(text))

    def lines(self, event: Event) -> list[Line]:
        """The lines one event shows as; never raises, whatever the agent printed."""
        try:
            return self._lines(event)
        except Exception:
            log_swallowed(log, "a session event could not be rendered; shown as text", self.mask)
            return [Line("text", self._clean(_clip(str(event.data))))]

    def _lines(self, event: Event) -> list[Line]:
        etype, data = event.type, event.data
        if etype is EventType.OUTPUT:
            return self.renderer.render(data)
        if etype is EventType.STDERR:
            return [Line("stderr", self._clean(_clip(data)))]
        if etype is EventType.BUILD_OUTPUT:
            step = _STEP_RE.match(data)
            if step:
                self.build_step, self.build_total = int(step.group(1)), int(step.group(2))
            return [Line("build" if data.startswith("cldpd:") else "build_log", self._clean(data))]
        if etype is EventType.BUILD_STARTED:
            return [Line("status", self._clean(f"cldpd: building image {data}"))]
        if etype is EventType.BUILD_COMPLETE:
            self.build_step = self.build_total = max(self.build_total, 1)
            return []
        if etype is EventType.CONTAINER_STARTED:
            what = f"{self.kind} running" if self.kind else "running"
            return [Line("status", self._clean(f"cldpd: {what} in container {data}"))]
        if etype is EventType.ERROR:
            return [Line("error", self._clean(data))]
        if etype is EventType.EGRESS_BLOCKED:
            return [Line("stderr", self._clean(f"⛔ egress blocked: {_clip(data)}"))]
        return []


class SessionView:
    """What a cell or a widget shows of one run: a status line, build progress and a tail.

    The state comes from the run's :class:`~cldpd_magic.session.RunStatus`: the
    session's own once the view is bound to it (``session=`` or :meth:`bind`, as
    :class:`LiveFeed` does), so the view never re-derives it. A view fed events without
    a session follows them with a status of its own (the same state machine).

    Args:
        title: What the status line names (usually the pod).
        max_lines: How many lines the tail keeps; older lines are elided with a count.
        masker: Masks secret values in anything added that did not come from a session.
        transcript: The transcript path to show.
        session: The session whose state the view shows.
    """

    def __init__(
        self,
        title: str,
        max_lines: int = DEFAULT_MAX_LINES,
        masker: Masker | None = None,
        transcript: str = "",
        *,
        session: Session | None = None,
    ) -> None:
        self.title = clean_text(title)
        self.max_lines = max(1, int(max_lines))
        if session is not None:
            masker = masker or session.mask
            transcript = transcript or str(session.transcript)
        self.mask = masker or Masker()
        self.transcript = clean_text(str(transcript))
        self.model = RunLines(self.mask)
        self.status = RunStatus()
        self._usage: Callable[[], Usage] | None = None
        self._bound = False
        self._failure = ""
        self.tail: deque[Line] = deque()
        self.tail_lines = 0
        self.elided = 0
        self.total_lines = 0
        self.version = 0
        self.lock = threading.Lock()
        if session is not None:
            self.bind(session)

    def bind(self, session: Session) -> None:
        """Show the session's state from now on (its events still come through :meth:`add`)."""
        with self.lock:
            self.status = session.status
            self._usage = lambda: session.usage
            self.model.kind = str(session.kind)
            self._bound = True
            self.version += 1

    @property
    def renderer(self) -> StreamRenderer:
        """The stream-json renderer of this run's output."""
        return self.model.renderer

    @property
    def state(self) -> RunState:
        """The run's state (FAILED also when the view could not read the events)."""
        return RunState.FAILED if self._failure else self.status.state

    @property
    def exit_code(self) -> int | None:
        """The agent's exit code, once known."""
        return self.status.exit_code

    @property
    def build_step(self) -> int:
        """The last build step seen."""
        return self.model.build_step

    @property
    def build_total(self) -> int:
        """How many steps the build has (0 until known)."""
        return self.model.build_total

    def _push(self, line: Line) -> None:
        self.tail.append(line)
        self.tail_lines += line.lines
        self.total_lines += line.lines
        while len(self.tail) > 1 and self.tail_lines > self.max_lines:
            dropped = self.tail.popleft()
            self.tail_lines -= dropped.lines
            self.elided += dropped.lines

    def add(self, event: Event, stopped: bool = False) -> None:
        """Take one session event into the view; never raises, whatever the agent printed.

        Args:
            event: The event.
            stopped: For a view without a session: a stop was asked for.
        """
        with self.lock:
            self.version += 1
            if not self._bound:
                self.status.on_event(event, stopped)
            for line in self.model.lines(event):
                if line.kind in _STATUS_KINDS:
                    continue
                if line.kind == "error" and self.status.state is RunState.STOPPED:
                    continue  # a stop is not an error
                self._push(line)

    def note(self, text: str, kind: str = "system") -> None:
        """Add a line of our own (masked) to the tail."""
        with self.lock:
            self.version += 1
            self._push(Line(kind, self.mask(clean_text(text))))

    def fail(self, message: str) -> None:
        """Show the view failed with a one-sentence reason (the session is not touched)."""
        with self.lock:
            self.version += 1
            self._failure = self.mask(clean_text(message))

    @property
    def finished(self) -> bool:
        """Whether the run has ended (exited, failed or stopped)."""
        return self.state.finished

    def elapsed(self) -> float:
        """Seconds the agent has been running (or ran)."""
        return self.status.snapshot().elapsed

    def status_text(self) -> str:
        """The one-line status: building / running / exited N / failed: reason / stopped.

        Once the agent has reported usage, its turns, tokens and cost follow.
        """
        text = self._state_text()
        usage = self._usage() if self._usage is not None else None
        if isinstance(usage, Usage) and (usage.turns or usage.cost_usd):
            text += f" · {usage.summary()}"
        return text

    def _state_text(self) -> str:
        snap = self.status.snapshot()
        detail = self.mask(clean_text(snap.detail))
        state = snap.state
        if self._failure:
            return f"{self.title}: failed: {self._failure}"
        if state is RunState.BUILDING:
            progress = f" step {self.build_step}/{self.build_total}" if self.build_total else ""
            return f"{self.title}: building {detail}{progress}"
        if state is RunState.RUNNING:
            return f"{self.title}: running {snap.elapsed:.0f}s"
        if state is RunState.EXITED:
            return f"{self.title}: exited {snap.exit_code} after {snap.elapsed:.1f}s"
        if state is RunState.FAILED:
            return f"{self.title}: failed: {detail}"
        if state is RunState.STOPPED:
            code = f" (exit {snap.exit_code})" if snap.exit_code is not None else ""
            why = f": {snap.reason}" if snap.reason else ""
            return f"{self.title}: stopped{why}{code}"
        return f"{self.title}: {state}"

    def _elision(self) -> str:
        return f"… {self.elided:,} earlier lines not shown (the transcript has them all)"

    def text(self) -> str:
        """Plain-text rendering: status, tail, transcript path."""
        with self.lock:
            parts = [self.status_text()]
            if self.elided:
                parts.append(self._elision())
            parts.extend(line.text for line in self.tail)
            if self.transcript:
                parts.append(f"transcript: {self.transcript}")
        return "\n".join(parts)

    def body_html(self) -> str:
        """HTML of the tail alone (no status line), newest line last."""
        with self.lock:
            rows = [line.to_html() for line in self.tail]
            if self.elided:
                rows.insert(0, f'<div class="cldpd-elided">{html.escape(self._elision())}</div>')
        # The body box is column-reversed so it stays scrolled to the newest line.
        return '<div class="cldpd-body"><div>' + "".join(rows) + "</div></div>"

    def html(self) -> str:
        """HTML rendering: status, tail, transcript path."""
        status = html.escape(self.status_text())
        transcript = (
            f'<div class="cldpd-transcript">transcript: {html.escape(self.transcript)}</div>'
            if self.transcript
            else ""
        )
        return (
            f'{_CSS}<div class="cldpd-view"><div class="cldpd-status">{status}</div>'
            f"{self.body_html()}{transcript}</div>"
        )

    def bundle(self) -> dict[str, str]:
        """A MIME bundle with text/html and text/plain."""
        return {"text/html": self.html(), "text/plain": self.text()}


class LiveFeed:
    """Consumes a session's events in a worker thread and publishes its view, batched.

    ``publish(view)`` runs at most once per ``interval`` while output flows, about once
    a second while the agent is quiet (for the elapsed time), and once more at the end.
    It runs on a worker thread, so it must write only through display handles,
    ``Output.append_*`` or widget traits. That thread runs in a copy of the context
    the feed was created in, so in a kernel its messages carry the parent header of
    the cell that created the feed, whichever cell runs meanwhile.

    Args:
        session: The session to follow.
        view: The view to fill.
        publish: Called with the view when it should be shown again.
        interval: Seconds between publications while output flows.
    """

    def __init__(
        self,
        session: Session,
        view: SessionView,
        publish: Callable[[SessionView], None],
        interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self.session = session
        self.view = view
        view.bind(session)
        self.publish = publish
        self.interval = max(0.02, float(interval))
        self.publications = 0
        self._consumed = threading.Event()
        self._wake = threading.Event()
        self._done = threading.Event()
        self.error: BaseException | None = None
        self._reader = threading.Thread(target=self._read, daemon=True, name="cldpd-feed-read")
        # The writer runs in a copy of the creator's context: a kernel keeps the parent
        # message there, so updates stay tied to the cell that started the feed.
        context = contextvars.copy_context()
        self._writer = threading.Thread(
            target=context.run, args=(self._write,), daemon=True, name="cldpd-feed-pub"
        )
        self._reader.start()
        self._writer.start()

    def _read(self) -> None:
        try:
            for event in self.session.events():
                self.view.add(event)
        except BaseException as exc:  # the feed must end even if a transcript read fails
            log_swallowed(log, "reading the session's events failed", self.session.mask)
            self.error = exc
            self.view.fail(f"could not read the session's events: {exc}")
        finally:
            self._consumed.set()
            self._wake.set()

    def _publish(self) -> None:
        try:
            self.publish(self.view)
            self.publications += 1
        except Exception as exc:  # a frontend going away must not kill the feed
            log_swallowed(log, "publishing the view failed", self.session.mask)
            self.error = exc

    def _write(self) -> None:
        shown_version = -1
        shown_second = -1
        while not self._consumed.is_set():
            self._wake.wait(self.interval)
            if self._consumed.is_set():
                break
            second = int(self.view.elapsed())
            if self.view.version != shown_version or second != shown_second:
                shown_version, shown_second = self.view.version, second
                self._publish()
        self._publish()
        self._done.set()

    @property
    def done(self) -> bool:
        """Whether the final view has been published."""
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the final view is published; True if it was."""
        return self._done.wait(timeout)


class TextFeed:
    """Writes a session's events as lines of text: the one text consumer of a run.

    It serves the ``cldpd`` command and the blocking :meth:`Dispatcher.start` /
    :meth:`Dispatcher.resume`. Its lines are those of :class:`SessionView` (one
    :class:`RunLines`): the agent's output, rendered, goes to ``out``; its stderr and
    cldpd's own notes (building, running in container ...) go to ``err``. The final
    answer shows once, and secrets are masked after JSON decoding, so a secret written
    with ``\\uXXXX`` escapes is masked too. The run's error is not written: ``wait()``
    raises it.

    Args:
        session: The session to write.
        out: Receives the agent's output lines (anything with ``write(str)``).
        err: Receives stderr and notes; ``out`` when None.
        raw: Write the agent's stdout and stderr lines verbatim (masked as raw text,
            terminal escapes kept) instead of rendered.
        verbose: Also write the image build log.
        notes: Write cldpd's notes (building image ..., running in container ...).
    """

    def __init__(
        self,
        session: Session,
        out: Writer,
        err: Writer | None = None,
        *,
        raw: bool = False,
        verbose: bool = False,
        notes: bool = True,
    ) -> None:
        self.session = session
        self.out = out
        self.err = err if err is not None else out
        self.raw = raw
        self.verbose = verbose
        self.notes = notes
        self.model = RunLines(session.mask, session.kind)

    def write(self, events: Iterable[Event]) -> None:
        """Write a batch of events (one write per stream)."""
        shown: list[str] = []
        noted: list[str] = []
        for event in events:
            if self.raw and event.type is EventType.OUTPUT:
                shown.append(event.data)
                continue
            if self.raw and event.type is EventType.STDERR:
                noted.append(event.data)
                continue
            for line in self.model.lines(event):
                if not self._wanted(line.kind):
                    continue
                (noted if line.kind in _NOTE_KINDS else shown).append(line.text)
        if shown:
            self.out.write("\n".join(shown) + "\n")
        if noted:
            self.err.write("\n".join(noted) + "\n")

    def _wanted(self, kind: str) -> bool:
        if kind == "error":
            return False
        if kind in ("status", "build"):
            return self.notes
        return kind != "build_log" or (self.verbose and self.notes)

    def follow(self) -> None:
        """Write every event of the session, from the first, until it ends."""
        for batch in self.session.event_batches():
            self.write(batch)


_TABLE_CSS = (
    "<style>.cldpd-table td,.cldpd-table th{text-align:left;vertical-align:top;"
    "padding:2px 8px;font-family:var(--jp-code-font-family,monospace);font-size:12px;}"
    ".cldpd-table caption{text-align:left;font-weight:bold;}"
    ".cldpd-note{color:#757575;font-size:12px;}</style>"
)


class Table:
    """A small table that shows as HTML in a notebook and as aligned text elsewhere.

    Args:
        columns: Column headings.
        rows: One sequence of values per row, in column order (shown with ``str``).
        title: A caption.
        notes: Lines shown under the table.

    Attributes:
        columns: Column headings.
        rows: The rows, as tuples of strings.
        title: The caption.
        notes: Lines shown under the table.
    """

    def __init__(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        title: str = "",
        notes: Iterable[str] = (),
    ) -> None:
        self.columns = tuple(clean_text(str(c)) for c in columns)
        self.rows = [tuple("" if v is None else clean_text(str(v)) for v in row) for row in rows]
        self.title = clean_text(title)
        self.notes = [clean_text(str(n)) for n in notes]

    def records(self) -> list[dict[str, str]]:
        """The rows as dictionaries keyed by column heading."""
        return [dict(zip(self.columns, row, strict=False)) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def text(self) -> str:
        """Aligned plain text: caption, headings, rows, notes."""
        lines = [self.title] if self.title else []
        if self.rows:
            table = [self.columns, *self.rows]
            width = max(len(row) for row in table)  # rows may be longer or shorter
            widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(width)]
            for row in table:
                cells = [f"{cell:<{widths[i]}}" for i, cell in enumerate(row)]
                lines.append("  ".join(cells).rstrip())
        lines.extend(self.notes)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        esc = html.escape
        parts = [_TABLE_CSS]
        if self.rows:
            parts.append('<table class="cldpd-table">')
            if self.title:
                parts.append(f"<caption>{esc(self.title)}</caption>")
            parts.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for c in self.columns) + "</tr>")
            for row in self.rows:
                parts.append("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>")
            parts.append("</table>")
        elif self.title:
            parts.append(f"<div><b>{esc(self.title)}</b></div>")
        parts.extend(f'<div class="cldpd-note">{esc(n)}</div>' for n in self.notes)
        return "".join(parts)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def __repr__(self) -> str:
        return self.text()


class Report:
    """Several :class:`Table` shown one after the other.

    Args:
        tables: The tables, in display order.

    Attributes:
        tables: The tables.
    """

    def __init__(self, *tables: Table) -> None:
        self.tables = list(tables)

    def __getitem__(self, title: str) -> Table:
        """The table with that title."""
        for table in self.tables:
            if table.title == title:
                return table
        raise KeyError(title)

    def text(self) -> str:
        """Plain text of every table, separated by blank lines."""
        return "\n\n".join(t.text() for t in self.tables)

    def _repr_html_(self) -> str:
        return "<br>".join(t._repr_html_() for t in self.tables)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def __repr__(self) -> str:
        return self.text()


#: Columns of a batch's live table.
BATCH_COLUMNS = ("run", "pod", "state", "elapsed", "turns", "cost", "last tool call")
#: What marks the selected run's name in a batch's table.
SELECTED_MARK = "▶ "


def run_name(session: Session) -> str:
    """A session's run name (its pod's name for a session made before runs had names)."""
    return str(getattr(session, "run", "") or session.pod_name)


def _usage_cells(session: Session) -> tuple[str, str]:
    """The turns and cost of a run so far, as table cells ("-" while unknown)."""
    usage = getattr(session, "usage", None)
    turns = _number(getattr(usage, "turns", None))
    cost = _number(getattr(usage, "cost_usd", None))
    return (
        "-" if not turns else f"{turns:,.0f}",
        "-" if cost is None or (not cost and not turns) else f"${cost:.4f}",
    )


class _BatchRunView(SessionView):
    """One run's view in a batch: a :class:`SessionView` that remembers the last tool call."""

    def __init__(self, session: Session, max_lines: int) -> None:
        self.last_tool = ""
        super().__init__(run_name(session), max_lines, session=session)
        self.session = session

    def _push(self, line: Line) -> None:
        if line.kind == "tool":
            self.last_tool = _first_line(line.text.removeprefix("▸ "), 80)
        super()._push(line)

    def state_text(self, queued: bool = False) -> str:
        """The state, with why a run was stopped or failed (e.g. ``stopped: over budget``).

        Args:
            queued: The run waits for its turn in the batch (shown as ``queued``).
        """
        snap = self.status.snapshot()
        if queued and not snap.finished:
            return "queued"
        why = ""
        reason = getattr(snap, "reason", "")  # why cldpd stopped it by itself
        if snap.state is RunState.STOPPED and reason:
            why = f": {reason}"
        elif snap.state is RunState.FAILED and snap.detail:
            why = f": {_first_line(self.mask(clean_text(snap.detail)), 60)}"
        elif snap.state is RunState.EXITED and snap.exit_code:
            why = f" {snap.exit_code}"
        return f"{snap.state}{why}"

    def cells(self, selected: bool, queued: bool = False) -> tuple[str, ...]:
        """The run's row: run, pod, state, elapsed, turns, cost, last tool call."""
        turns, cost = _usage_cells(self.session)
        started = self.state not in (RunState.STARTING, RunState.BUILDING) and not queued
        elapsed = f"{self.elapsed():.0f}s" if started else "-"
        marker = SELECTED_MARK if selected else ""
        pod = clean_text(self.session.pod_name)
        state = self.state_text(queued)
        return (marker + self.title, pod, state, elapsed, turns, cost, self.last_tool)


class BatchView:
    """What a cell, the picker or a terminal shows of a batch: a row per run and one run's tail.

    Each run has its own :class:`SessionView` (bounded tail, masked, free of terminal
    escapes); the table shows each run's state, elapsed time, turns, cost and last tool
    call, and under it the selected run's status line and tail. Rows come in the order
    the runs were added.

    Args:
        title: What the summary line names.
        max_lines: How many lines each run's tail keeps.

    Attributes:
        selected: The run name whose output shows under the table ("" for none).
        version: Changes whenever anything shown may have changed.
        is_queued: Tells whether a run still waits for its turn (set by :class:`BatchFeed`
            from the batch); None: no run is shown as queued.
    """

    def __init__(self, title: str = "batch", max_lines: int = DEFAULT_MAX_LINES) -> None:
        self.title = clean_text(title)
        self.max_lines = max(1, int(max_lines))
        self.selected = ""
        self._rows: dict[int, _BatchRunView] = {}
        self._own_version = 0
        self.lock = threading.Lock()
        self.is_queued: Callable[[Session], bool] | None = None

    def _queued(self, session: Session) -> bool:
        try:
            return bool(self.is_queued and self.is_queued(session))
        except Exception:  # a view never fails for want of a queue state
            log_swallowed(log, "reading whether a run is queued failed", session.mask)
            return False

    def track(self, session: Session) -> bool:
        """Add a row for a run (once); True when the run is new."""
        with self.lock:
            if id(session) in self._rows:
                return False
            self._rows[id(session)] = _BatchRunView(session, self.max_lines)
            self._own_version += 1
            if not self.selected:
                self.selected = run_name(session)
            return True

    def add(self, session: Session, event: Event) -> None:
        """Take one event of a tracked run into its row; never raises."""
        self.row(session).add(event)

    def row(self, session: Session) -> SessionView:
        """The view of a tracked run (KeyError for a run not tracked)."""
        return self._rows[id(session)]

    def rows(self) -> list[SessionView]:
        """The run views, in the order the runs were tracked."""
        with self.lock:
            return list(self._rows.values())

    def run_names(self) -> list[str]:
        """The run names, in row order."""
        return [row.title for row in self.rows()]

    def select(self, run: str) -> None:
        """Show this run's output under the table ("" for none)."""
        with self.lock:
            self.selected = clean_text(run)
            self._own_version += 1

    def _selected_row(self) -> _BatchRunView | None:
        return next((r for r in self._rows.values() if r.title == self.selected), None)

    @property
    def version(self) -> int:
        """A number that changes whenever a row or the selection changes."""
        with self.lock:
            return self._own_version + sum(row.version for row in self._rows.values())

    @property
    def finished(self) -> bool:
        """Whether every tracked run has ended."""
        return all(row.finished for row in self.rows())

    def elapsed_second(self) -> int:
        """Seconds of the longest unfinished run, to know when elapsed times change."""
        running = [int(row.elapsed()) for row in self.rows() if not row.finished]
        return max(running, default=-1)

    def summary(self) -> str:
        """One line: how many runs are in each state, turns and cost in all."""
        counts: dict[str, int] = {}
        turns = cost = 0.0
        for row in self.rows():
            state = "queued" if self._queued(row.session) else str(row.state)
            counts[state] = counts.get(state, 0) + 1
            usage = getattr(row.session, "usage", None)
            turns += _number(getattr(usage, "turns", None)) or 0
            cost += _number(getattr(usage, "cost_usd", None)) or 0
        states = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no runs yet"
        return f"{self.title}: {states} · {turns:,.0f} turns · ${cost:.4f}"

    def table(self) -> Table:
        """The rows as a :class:`Table` (the selected run marked ``▶``)."""
        with self.lock:
            rows = [
                row.cells(row.title == self.selected, self._queued(row.session))
                for row in self._rows.values()
            ]
        return Table(BATCH_COLUMNS, rows, title=self.summary())

    def text(self) -> str:
        """Plain text: the table, then the selected run's status, tail and transcript."""
        parts = [self.table().text()]
        with self.lock:
            row = self._selected_row()
        if row is not None:
            parts.append(f"── {row.title} ──\n{row.text()}")
        return "\n".join(parts)

    def html(self) -> str:
        """HTML: the table, then the selected run's status, tail and transcript."""
        with self.lock:
            row = self._selected_row()
        selected = row.html() if row is not None else ""
        return f'<div class="cldpd-batch">{self.table()._repr_html_()}{selected}</div>'

    def bundle(self) -> dict[str, str]:
        """A MIME bundle with text/html and text/plain."""
        return {"text/html": self.html(), "text/plain": self.text()}


class RunSource:
    """What :class:`BatchFeed` follows: a batch's runs, which may grow, and whether it is done.

    A :class:`~cldpd_magic.batch.Batch` is one; so is any object with ``runs`` (a list of
    sessions) and ``done``.
    """

    runs: list[Session]
    done: bool


class BatchFeed:
    """Follows every run of a batch in worker threads and publishes its view, batched.

    One reader thread per run takes its events into the :class:`BatchView`; one writer
    thread publishes the whole view at most once per ``interval`` while output flows and
    about once a second while the runs are quiet, and once more at the end. So a batch of
    fifty runs sends no more frontend messages per second than one :class:`LiveFeed`.
    Like LiveFeed, the writer runs in a copy of the context the feed was created in, so
    in a kernel its messages stay tied to the cell that created the feed.

    Args:
        batch: The batch to follow (``runs`` and ``done``; runs may be added while it runs).
        view: The view to fill.
        publish: Called with the view when it should be shown again.
        interval: Seconds between publications while output flows.
    """

    def __init__(
        self,
        batch: RunSource,
        view: BatchView,
        publish: Callable[[BatchView], None],
        interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self.batch = batch
        self.view = view
        state_of = getattr(batch, "state_of", None)
        if callable(state_of) and view.is_queued is None:
            view.is_queued = lambda session: state_of(batch.runs.index(session)) == "queued"
        self.publish = publish
        self.interval = max(0.02, float(interval))
        self.publications = 0
        self.error: BaseException | None = None
        self._readers: list[threading.Thread] = []
        self._done = threading.Event()
        context = contextvars.copy_context()  # see LiveFeed: updates stay in their cell
        self._writer = threading.Thread(
            target=context.run, args=(self._write,), daemon=True, name="cldpd-batch-pub"
        )
        self._writer.start()

    def _follow_new_runs(self) -> bool:
        """Start a reader for each run not followed yet; True when the batch is complete."""
        done = bool(self.batch.done)  # read first: the runs of a done batch are final
        for session in list(self.batch.runs):
            if self.view.track(session):
                reader = threading.Thread(
                    target=self._read, args=(session,), daemon=True, name="cldpd-batch-read"
                )
                self._readers.append(reader)
                reader.start()
        return done

    def _read(self, session: Session) -> None:
        row = self.view.row(session)
        try:
            for events in session.event_batches():
                for event in events:
                    row.add(event)
        except BaseException as exc:  # the feed must end even if a transcript read fails
            log_swallowed(log, "reading a batch run's events failed", session.mask)
            self.error = exc
            row.fail(f"could not read the session's events: {exc}")

    def _publish(self) -> None:
        try:
            self.publish(self.view)
            self.publications += 1
        except Exception as exc:  # a frontend going away must not kill the feed
            log_swallowed(log, "publishing the batch view failed")
            self.error = exc

    def _write(self) -> None:
        shown: tuple[int, int] = (-1, -1)
        while True:
            complete = self._follow_new_runs()
            if complete and not any(r.is_alive() for r in self._readers):
                break
            state = (self.view.version, self.view.elapsed_second())
            if state != shown:
                shown = state
                self._publish()
            time.sleep(self.interval)  # one publication per interval, however many runs
        self._publish()
        self._done.set()

    @property
    def done(self) -> bool:
        """Whether the final view has been published."""
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the final view is published; True if it was."""
        return self._done.wait(timeout)
