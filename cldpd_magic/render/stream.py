"""Claude Code's stream-json read line by line into rendered :class:`Line` objects."""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..logs import log_swallowed
from ..secrets import MASK
from .clean import _clip, _first_line, _number, _short, clean_text
from .markdown import _MASK_STAND_IN, markdown_to_html

log = logging.getLogger(__package__)


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


def _count(value: Any) -> str:
    number = _number(value)
    return "?" if number is None else f"{number:,.0f}"


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
