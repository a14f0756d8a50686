"""Claude Code's stream-json, line by line, rendered into :class:`Line` objects.

Each line's typed event comes from :mod:`cldpd_magic.stream_json`; this module only
formats it.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from ..logs import log_swallowed
from ..secrets import MASK, Masker
from ..stream_json import (
    ApiRetry,
    AssistantMessage,
    CanUseTool,
    ClaudeEvent,
    Compacted,
    OtherBlock,
    OtherSystem,
    PermissionDenied,
    RateLimit,
    Result,
    SessionStateChanged,
    SystemInit,
    SystemStatus,
    TextBlock,
    ThinkingBlock,
    ToolResult,
    ToolUse,
    UserMessage,
    decode_line,
)
from .clean import MAX_SHOWN_CHARS, _clip, _first_line, _short, clean_text, format_count, is_clean
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
#: An interactive run's control answers and withdrawals are cldpd's own business: an
#: approval and its answer show as PERMISSION_REQUEST and PERMISSION_DECISION events; a
#: message's progress through the queue shows as its replay when its turn starts.
_QUIET_TYPES = frozenset(
    {
        "stream_event",
        "tool_progress",
        "keep_alive",
        "control_response",
        "control_cancel_request",
        "command_lifecycle",
    }
)
#: A line after the first that starts with ``{`` or white space (one regex scan is several
#: times quicker than a substring search for each: newlines are everywhere in the text).
_LATER_LINE_MAY_BE_JSON = re.compile(r"\n[{ \t]")
#: System subtypes that only tick (thinking token estimates while the model thinks), or
#: say what cldpd already shows (an interactive run's turn is running, waiting, idle).
_QUIET_SYSTEM = frozenset({"thinking_tokens", "session_state_changed"})
#: Fields left out of the summary of an unknown event.
_SUMMARY_SKIP = frozenset({"type", "subtype", "uuid", "session_id", "parent_tool_use_id"})
#: Longest text of one rendered Markdown line (an answer); the transcript keeps the whole.
MAX_MARKDOWN_LINE_CHARS = 20000


class Line(msgspec.Struct, frozen=True):
    """One rendered piece of output (a frozen msgspec Struct: made in C, as each output
    line makes one or two).

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


def _summary(obj: Mapping[str, Any], limit: int = 160) -> str:
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


def tool_call(name: str, args: Any) -> str:
    """``Name: key argument`` of a tool call (the argument that says what it does)."""
    name = _first_line(name or "tool", 60)
    value: Any = None
    if isinstance(args, Mapping):
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
    text = _clip(text.strip(), MAX_MARKDOWN_LINE_CHARS)
    return Line(kind, text, text.count("\n") + 1)


def _duration(value: float | None) -> str:
    return "? s" if value is None else f"{value / 1000:.1f} s"


def _event_line(name: str, raw: Mapping[str, Any]) -> Line:
    """The compact line of an event this renderer shows only in brief."""
    return Line("event", f"· {name}: {_summary(raw)}".rstrip(": "))


#: Which method renders which event (looked up on the instance, so a test may patch one).
_HANDLERS: dict[type[ClaudeEvent], str] = {
    SystemInit: "_on_init",
    SystemStatus: "_on_status",
    ApiRetry: "_on_api_retry",
    Compacted: "_on_compacted",
    PermissionDenied: "_on_permission_denied",
    SessionStateChanged: "_on_other_system",
    OtherSystem: "_on_other_system",
    AssistantMessage: "_on_assistant",
    UserMessage: "_on_user",
    RateLimit: "_on_rate_limit",
    Result: "_on_result",
}


class StreamRenderer:
    """Renders one agent's output lines, keeping what it must remember between them.

    It reads each line's typed event (:func:`~cldpd_magic.stream_json.decode_line`) and
    only formats it. It remembers the last assistant text
    shown, so that the final ``result`` event does not show the same answer again. Every
    line it produces is free of terminal escapes and masked with ``mask`` *after* JSON
    decoding, so a secret written with ``\\uXXXX`` escapes is masked too. Rendering never
    raises: a line that cannot be rendered as an event is shown as text.

    Args:
        mask: Applied to the text of every produced line (e.g. a session's ``Masker``).
        markup: Make the HTML of Markdown lines as they are rendered (``Line.markup``);
            a reader of text alone (a terminal) has no use for it.
    """

    def __init__(self, mask: Callable[[str], str] | None = None, *, markup: bool = True) -> None:
        self.mask = mask
        self.markup = markup
        self.last_text = ""

    def renders_as_is(self, texts: list[str], text: str) -> bool:
        """Whether each of these output lines renders as one text line that is the line itself.

        True when no line may be stream-json (none holds a brace, or none starts with
        ``{`` or white space),
        none is clipped, and nothing in them is cleaned or masked; then rendering them
        one by one would give them back unchanged. One scan of their text for many lines.

        Args:
            texts: Output lines.
            text: The same lines joined by newlines.
        """
        if "{" in text and (
            text[:1] in ("{", " ", "\t") or _LATER_LINE_MAY_BE_JSON.search(text) is not None
        ):
            return False  # a line may be stream-json (which always holds a brace)
        if len(text) > MAX_SHOWN_CHARS and max(map(len, texts)) > MAX_SHOWN_CHARS:
            return False
        if not is_clean(text):
            return False
        if not text.isascii() and any([line[:1].isspace() for line in texts]):
            return False  # white space beyond ASCII: a line may still be stream-json
        mask = self.mask
        return mask is None or (isinstance(mask, Masker) and mask.is_clean(text))

    def render(self, text: str) -> list[Line]:
        """Render one output line: a Claude Code stream-json event, or plain text."""
        try:
            event = decode_line(text)
            lines = None if event is None else self.render_event(event)
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
        if line.kind != "markdown" or not self.markup or self.mask is None:
            shown = text if self.mask is None else self.mask(text)
            return line if shown is line.text else Line(line.kind, shown, line.lines)
        # The mask must stay text in Markdown ("********" alone would be a rule): it goes
        # through as a private-use character. The decoded text (entities, escapes) is
        # masked again, as is the HTML made of it.
        source = self.mask(text).replace(MASK, _MASK_STAND_IN)
        markup = self.mask(markdown_to_html(source, self.mask)).replace(_MASK_STAND_IN, MASK)
        return Line(line.kind, self.mask(text), line.lines, f'<div class="cldpd-md">{markup}</div>')

    def render_event(self, event: ClaudeEvent) -> list[Line] | None:
        """Render one typed stream-json event.

        Args:
            event: The event of a line.

        Returns:
            Rendered lines (none for events that stay quiet), or None when the event
            cannot be shown as one (a message without readable content): the line is
            then shown as text.
        """
        if isinstance(event, CanUseTool):
            return []  # its PERMISSION_REQUEST event says it
        handler = _HANDLERS.get(type(event))
        if handler is None:  # control frames and unknown types, in brief
            kind = event.type
            return [] if kind in _QUIET_TYPES else [_event_line(_first_line(kind, 40), event.raw)]
        return getattr(self, handler)(event)

    def _on_init(self, event: SystemInit) -> list[Line]:
        parts = [
            f"● Claude Code {_short(event.claude_code_version)}".rstrip(),
            f"model {_short(event.model or '?')}",
            f"permission mode {_short(event.permission_mode or '?')}",
            f"{'?' if event.tools is None else len(event.tools)} tools",
        ]
        if event.mcp_servers:
            parts.append(f"{len(event.mcp_servers)} MCP servers")
        if event.session_id:
            parts.append(f"session {_short(event.session_id)}")
        return [Line("system", " · ".join(parts))]

    def _on_status(self, event: SystemStatus) -> list[Line]:
        return [] if event.status is None else self._on_other_system(event)

    def _on_api_retry(self, event: ApiRetry) -> list[Line]:
        error = " ".join(_short(v) for v in (event.error_status, event.error) if v)
        attempts = f"{format_count(event.attempt)}/{format_count(event.max_retries)}"
        return [
            Line(
                "retry",
                f"↻ API retry {attempts} in {_duration(event.retry_delay_ms)}"
                + (f": {error}" if error else ""),
            )
        ]

    def _on_compacted(self, event: Compacted) -> list[Line]:
        return [
            Line(
                "system",
                f"── conversation compacted ({_short(event.trigger or '?')}, "
                f"{format_count(event.pre_tokens)} tokens before) ──",
            )
        ]

    def _on_permission_denied(self, event: PermissionDenied) -> list[Line]:
        call = tool_call(event.tool_name, None)
        reason = _first_line(event.message, 200)
        return [Line("denied", f"⊘ permission denied: {call}" + (f": {reason}" if reason else ""))]

    def _on_other_system(self, event: ClaudeEvent) -> list[Line]:
        # The typed subtype is the line's as text: a quiet one is known without its raw.
        subtype = event.subtype if isinstance(event, OtherSystem) else "session_state_changed"
        if subtype in _QUIET_SYSTEM:
            return []
        name = f"system/{_first_line(subtype, 40)}" if subtype is not None else "system"
        return [_event_line(name, event.raw)]

    def _on_assistant(self, event: AssistantMessage) -> list[Line] | None:
        if event.blocks is None:
            return None
        lines: list[Line] = []
        for block in event.blocks:
            if isinstance(block, TextBlock):
                if block.text.strip():
                    self.last_text = block.text.strip()
                    lines.append(_markdown_line(block.text))
            elif isinstance(block, ThinkingBlock):
                if block.redacted:
                    lines.append(Line("thinking", "✻ (redacted thinking)"))
                elif block.text.strip():
                    lines.append(Line("thinking", f"✻ {_first_line(block.text, 120)}"))
            elif isinstance(block, ToolUse):
                lines.append(Line("tool", f"▸ {tool_call(block.name, block.input)}"))
            elif isinstance(block, OtherBlock) and block.type is not None:
                lines.append(Line("event", f"· {_first_line(block.type, 40)} block"))
            elif isinstance(block, OtherBlock):
                lines.append(Line("event", f"· content block: {_short(block.value, 120)}"))
        return lines

    def _on_rate_limit(self, event: RateLimit) -> list[Line]:
        if event.info is not None and event.status == "allowed":
            return []
        summary = _summary(event.info if event.info is not None else event.raw)
        return [Line("retry", f"⚠ rate limit: {summary}")]

    def _on_user(self, event: UserMessage) -> list[Line] | None:
        if event.blocks is None:
            return None
        lines: list[Line] = []
        for block in event.blocks:
            if isinstance(block, ToolResult):
                text = block.text.strip()
                count = len(text.splitlines())
                more = f" (+{count - 1} lines)" if count > 1 else ""
                if block.is_error:
                    lines.append(Line("tool_error", f"  ✗ {_first_line(text)}{more}"))
                else:
                    lines.append(Line("tool_result", f"  ↳ {_first_line(text)}{more}"))
            elif isinstance(block, TextBlock) and block.text.strip():
                lines.append(Line("user", f"▷ {_first_line(block.text)}"))
        return lines

    def _on_result(self, event: Result) -> list[Line]:
        head = _result_head(event)
        turns = format_count(event.turns)
        turns += " turn" if turns == "1" else " turns"
        parts = [head, turns, _duration(event.duration_ms)]
        if event.cost_usd is not None:
            parts.append(f"${event.cost_usd:.4f}")
        if event.usage is not None:
            tokens_in = event.usage.all_input
            parts.append(
                f"{tokens_in:,.0f} in / {format_count(event.usage.output_tokens)} out tokens"
            )
        if event.session_id:
            parts.append(f"session {_short(event.session_id)}")
        kind = "failed" if head.startswith("✗") else "result"
        lines = [Line(kind, " · ".join(parts))]
        for denial in event.denials:
            call = tool_call(denial.tool_name, denial.tool_input)
            lines.append(Line("denied", f"⊘ permission denied: {call}"))
        # The answer is usually the last assistant text, already shown: not twice. A
        # failure's one-line reason is in the summary line already.
        answer = event.answer
        if answer and answer != self.last_text and (head.startswith("✓") or "\n" in answer):
            lines.append(_markdown_line(answer))
        return lines


def _result_head(event: Result) -> str:
    """``✓ done``, ``⏹ interrupted``, or ``✗`` and why the run (or turn) failed."""
    reason = next((e for e in event.errors if e.strip()), "")
    subtype = event.subtype
    if subtype == "success" and not event.is_error:
        return "✓ done"
    if event.terminal_reason.startswith("aborted_"):
        # An interrupt (a person's, or the SDK's) ends the turn so; the CLI's own
        # diagnostics then say nothing a person needs.
        return "⏹ interrupted"
    if subtype == "success" or subtype is None:
        return f"✗ failed: {_first_line(reason or event.answer or 'no reason given', 300)}"
    head = f"✗ {_RESULT_NAMES.get(subtype) or _first_line(subtype, 60)}"
    return head + (f": {_first_line(reason, 300)}" if reason else "")


def render_output_line(text: str, mask: Callable[[str], str] | None = None) -> list[Line]:
    """Render one output line on its own: a Claude Code stream-json event, or plain text.

    Args:
        text: The line.
        mask: Applied to every produced line's text, after JSON decoding.

    Returns:
        The rendered lines; never raises.
    """
    return StreamRenderer(mask).render(text)
