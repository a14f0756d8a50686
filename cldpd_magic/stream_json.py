"""Claude Code's stream-json, read once: one typed event per output line.

The CLI (``claude -p --output-format stream-json --verbose``, and in streaming-input mode
``--input-format stream-json --permission-prompt-tool stdio``) prints one JSON object per
line. :func:`decode_line` turns a line into one frozen :class:`ClaudeEvent`, or None when the
line is no event (plain text, malformed or truncated JSON, a JSON value that is no object,
an object without a string ``type``). What the renderer, the usage meter and the approvals
read is these events, not the JSON.

Agent output is hostile input: the events are built defensively, field by field. A field
of the wrong type is read as absent (numbers: :func:`json_number`; text: ``""``), and
nothing here raises, whatever the line (too deep, too long, not UTF-8, NaN, 1e400).
Every event keeps the decoded object in ``raw`` (read-only at its top level) for the
fields it does not type. The commonest lines (assistant, user, system, result) are read
with msgspec for the fields their events type, skipping the rest of the line unbuilt; their
``raw`` is decoded when first read. Any other line, or one whose fields have other shapes,
is decoded whole; both ways give the same event.

Each reader decodes the lines it reads (a line's event costs a few microseconds): the
usage meter reads what it needs alone (:func:`usage_event`), and each view of a run
decodes what it shows.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Union

import msgspec

log = logging.getLogger(__package__)

__all__ = [
    "ApiRetry",
    "AssistantMessage",
    "Block",
    "CanUseTool",
    "ClaudeEvent",
    "Compacted",
    "ControlCancel",
    "ControlRequest",
    "ControlResponse",
    "Denial",
    "HookCallback",
    "OtherBlock",
    "OtherEvent",
    "OtherSystem",
    "PermissionDenied",
    "RateLimit",
    "Result",
    "SessionStateChanged",
    "SystemInit",
    "SystemStatus",
    "TextBlock",
    "ThinkingBlock",
    "TokenUsage",
    "ToolResult",
    "ToolUse",
    "UserMessage",
    "decode_line",
    "interpret",
    "json_number",
    "text_of",
    "usage_event",
]

#: The read-only mapping of an event without one.
EMPTY: Mapping[str, Any] = MappingProxyType({})


def json_number(value: Any, minimum: float | None = None) -> float | None:
    """A JSON number as a float; None for anything else.

    Strings, null, booleans, NaN, infinities and integers too large for a float are not
    numbers here.

    Args:
        value: A decoded JSON value.
        minimum: The smallest number accepted (e.g. 0 for counts and costs); None
            accepts any finite number.
    """
    kind = type(value)
    if kind is float:  # what JSON decoding gives, checked first: most values are these
        number = value
    elif kind is int or (kind is not bool and isinstance(value, int | float)):
        try:
            number = float(value)
        except OverflowError:
            return None
    else:
        return None
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        return None
    return number


def _text(value: Any) -> str:
    """A scalar as text: a string as it is, None as "", anything else as its JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _name(value: Any) -> str:
    """A name (a tool's): "" when absent or empty, else its ``str``."""
    return str(value) if value else ""


def _str(value: Any) -> str:
    """A string field; "" for anything that is not a string."""
    return value if isinstance(value, str) else ""


def _mapping(value: Any) -> Mapping[str, Any]:
    """An object field, read-only; empty for anything that is not an object."""
    return MappingProxyType(value) if isinstance(value, dict) else EMPTY


def text_of(content: Any) -> str:
    """The text of a message or tool-result content: a string, or a list of blocks.

    Text blocks (and bare strings) are joined by newlines; an image block is ``[image]``;
    anything else is its JSON.
    """
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


# --- the events -----------------------------------------------------------------------------


class ClaudeEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One line of Claude Code's stream-json.

    Events are frozen msgspec Structs (made in C: a line's event and its blocks cost a
    tenth of what frozen dataclasses did). Two events are equal when their typed fields
    are; ``raw`` is neither compared, hashed nor shown in their repr.

    Attributes:
        raw: The decoded JSON object (read-only at its top level; never change what is
            under it): every field, typed or not.
    """

    raw: Mapping[str, Any] = EMPTY

    @property
    def type(self) -> str:
        """The line's ``type`` (``assistant``, ``result``, ``control_request`` ...)."""
        return _str(self.raw.get("type"))

    def _typed_fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__struct_fields__[1:])

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._typed_fields() == other._typed_fields()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._typed_fields())

    def __repr__(self) -> str:
        names = self.__struct_fields__[1:]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

    def __rich_repr__(self) -> Iterator[tuple[str, Any]]:
        for name in self.__struct_fields__[1:]:
            yield name, getattr(self, name)


class TokenUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens as a message or a result reports them.

    Each is a finite JSON number as a float (negative ones kept: readers decide), or
    None when absent or not a number.

    Attributes:
        input_tokens: Input tokens not read from or written to the prompt cache.
        output_tokens: Output tokens.
        cache_read_tokens: Input tokens read from the prompt cache.
        cache_creation_tokens: Input tokens written to the prompt cache.
        cost_usd: Their cost, where the CLI says it (``modelUsage``), else None.
    """

    input_tokens: float | None = None
    output_tokens: float | None = None
    cache_read_tokens: float | None = None
    cache_creation_tokens: float | None = None
    cost_usd: float | None = None

    @property
    def all_input(self) -> float:
        """Input tokens of every kind (absent ones count 0)."""
        return (
            (self.input_tokens or 0)
            + (self.cache_read_tokens or 0)
            + (self.cache_creation_tokens or 0)
        )


def _model_usage(value: Any) -> Mapping[str, TokenUsage] | None:
    """``modelUsage``-style ``{model: {inputTokens, ..., costUSD}}``; None when no object."""
    if not isinstance(value, dict):
        return None
    return MappingProxyType(
        {
            str(model): TokenUsage(
                input_tokens=json_number(item.get("inputTokens")),
                output_tokens=json_number(item.get("outputTokens")),
                cache_read_tokens=json_number(item.get("cacheReadInputTokens")),
                cache_creation_tokens=json_number(item.get("cacheCreationInputTokens")),
                cost_usd=json_number(item.get("costUSD")),
            )
            for model, item in value.items()
            if isinstance(item, dict)
        }
    )


def _usage(value: Any) -> TokenUsage | None:
    if not isinstance(value, dict):
        return None
    return TokenUsage(
        input_tokens=json_number(value.get("input_tokens")),
        output_tokens=json_number(value.get("output_tokens")),
        cache_read_tokens=json_number(value.get("cache_read_input_tokens")),
        cache_creation_tokens=json_number(value.get("cache_creation_input_tokens")),
    )


# System lines ------------------------------------------------------------------------------


class SystemInit(ClaudeEvent, frozen=True, kw_only=True):
    """``system/init``: the CLI starts (in streaming-input mode, at every turn).

    Attributes:
        session_id: Claude Code's session id ("" when absent).
        model: The model ("" when absent).
        permission_mode: The permission mode (``default``, ``acceptEdits`` ...).
        claude_code_version: The CLI's version.
        cwd: The working directory.
        tools: The tools' names; None when the line gives no list.
        mcp_servers: The MCP servers as given; None when the line gives no list.
    """

    session_id: str = ""
    model: str = ""
    permission_mode: str = ""
    claude_code_version: str = ""
    cwd: str = ""
    tools: tuple[str, ...] | None = None
    mcp_servers: tuple[Any, ...] | None = None


class SystemStatus(ClaudeEvent, frozen=True, kw_only=True):
    """``system/status``: what the CLI is doing, or a permission mode that changed.

    Attributes:
        status: ``requesting``, ``compacting`` ...; None when null or empty (a mode change).
        permission_mode: The new permission mode, when the line says one ("" otherwise).
    """

    status: str | None = None
    permission_mode: str = ""


class ApiRetry(ClaudeEvent, frozen=True, kw_only=True):
    """``system/api_retry``: a model request failed and is tried again.

    Attributes:
        attempt: Which attempt this is.
        max_retries: How many the CLI makes.
        retry_delay_ms: Milliseconds before the next one.
        error_status: The HTTP status as text ("" when none).
        error: The error ("" when none).
    """

    attempt: float | None = None
    max_retries: float | None = None
    retry_delay_ms: float | None = None
    error_status: str = ""
    error: str = ""


class Compacted(ClaudeEvent, frozen=True, kw_only=True):
    """``system/compact_boundary``: the conversation was compacted.

    Attributes:
        trigger: ``auto`` or ``manual`` ("" when absent).
        pre_tokens: Tokens before compaction.
    """

    trigger: str = ""
    pre_tokens: float | None = None


class PermissionDenied(ClaudeEvent, frozen=True, kw_only=True):
    """``system/permission_denied``: the CLI refused a tool call by itself.

    Attributes:
        tool_name: The tool ("" when absent).
        tool_use_id: The refused call.
        message: Why.
    """

    tool_name: str = ""
    tool_use_id: str = ""
    message: str = ""


class SessionStateChanged(ClaudeEvent, frozen=True, kw_only=True):
    """``system/session_state_changed`` (``CLAUDE_CODE_EMIT_SESSION_STATE_EVENTS=1``).

    Attributes:
        state: ``running``, ``requires_action`` (an approval is asked) or ``idle`` (the
            last turn is over and nothing is queued).
    """

    state: str = ""


class OtherSystem(ClaudeEvent, frozen=True, kw_only=True):
    """Any other ``system`` line (``hook_response``, ``thinking_tokens`` ...).

    Attributes:
        subtype: Its subtype as text; None when absent.
    """

    subtype: str | None = None


# Messages ----------------------------------------------------------------------------------


class TextBlock(msgspec.Struct, frozen=True, kw_only=True):
    """Text the model (or the user) wrote.

    Attributes:
        text: The text, as written.
    """

    text: str = ""


class ThinkingBlock(msgspec.Struct, frozen=True, kw_only=True):
    """The model's thinking.

    Attributes:
        text: The thinking ("" when redacted).
        redacted: Whether it came redacted.
    """

    text: str = ""
    redacted: bool = False


class ToolUse(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call in an assistant message.

    Attributes:
        id: The call's id (``toolu_...``), which a ``can_use_tool`` and its result name.
        name: The tool ("" when absent).
        input: Its input as given (an object for every real tool).
        kind: ``tool_use``, ``server_tool_use`` or ``mcp_tool_use``.
    """

    id: str = ""
    name: str = ""
    input: Any = None
    kind: str = "tool_use"


class ToolResult(msgspec.Struct, frozen=True, kw_only=True):
    """A tool's result in a user message.

    Attributes:
        tool_use_id: The call it answers.
        text: Its text (see :func:`text_of`).
        is_error: Whether the tool failed or the call was refused.
    """

    tool_use_id: str = ""
    text: str = ""
    is_error: bool = False


class OtherBlock(msgspec.Struct, frozen=True, kw_only=True):
    """A content block of another type, or one that is no object.

    Attributes:
        type: Its ``type`` when it is a string, else None.
        value: The block as given.
    """

    type: str | None = None
    value: Any = None


Block = TextBlock | ThinkingBlock | ToolUse | ToolResult | OtherBlock


class AssistantMessage(ClaudeEvent, frozen=True, kw_only=True):
    """An ``assistant`` line: the model's message, or (2.x) one content block of it.

    The CLI repeats a message's id and usage on every line of it.

    Attributes:
        message_id: ``message.id`` as text; None when absent.
        model: The model ("" when absent).
        blocks: The content blocks; None when ``message`` or its content is malformed.
        usage: ``message.usage``; None when absent or not an object.
        parent_tool_use_id: The tool call of the subagent that wrote it, if any.
        session_id: Claude Code's session id.
    """

    message_id: str | None = None
    model: str = ""
    blocks: tuple[TextBlock | ThinkingBlock | ToolUse | OtherBlock, ...] | None = None
    usage: TokenUsage | None = None
    parent_tool_use_id: str | None = None
    session_id: str = ""


class UserMessage(ClaudeEvent, frozen=True, kw_only=True):
    """A ``user`` line: tool results, an interruption note, or a replayed prompt.

    Attributes:
        blocks: Tool results and text (a string content is one text block); None when
            ``message`` or its content is malformed.
        is_replay: Whether the CLI echoes a message written to it (``isReplay``: with
            ``--replay-user-messages``, and after ``set_model``), not one of its own.
        parent_tool_use_id: The tool call of the subagent it belongs to, if any.
        uuid: The line's uuid ("" when absent).
        session_id: Claude Code's session id.
    """

    blocks: tuple[TextBlock | ToolResult | OtherBlock, ...] | None = None
    is_replay: bool = False
    parent_tool_use_id: str | None = None
    uuid: str = ""
    session_id: str = ""


class RateLimit(ClaudeEvent, frozen=True, kw_only=True):
    """A ``rate_limit_event``.

    Attributes:
        status: ``rate_limit_info.status`` (``allowed``, ``allowed_warning``, ...).
        info: ``rate_limit_info``; None when it is no object.
    """

    status: str = ""
    info: Mapping[str, Any] | None = None


# The result ---------------------------------------------------------------------------------


class Denial(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call refused during the turn (``permission_denials``).

    Attributes:
        tool_name: The tool ("" when absent).
        tool_use_id: The call.
        tool_input: Its input as given.
    """

    tool_name: str = ""
    tool_use_id: str = ""
    tool_input: Any = None


class Result(ClaudeEvent, frozen=True, kw_only=True):
    """A ``result`` line: the end of a run (``-p``) or of one turn (streaming input).

    In a process that takes several user messages, ``turns``, ``usage``,
    ``turn_model_usage`` and ``duration_ms`` are those of this turn alone, while
    ``cost_usd`` and ``model_usage`` are cumulative: the process's, and after
    ``--resume`` the session's. A turn refused for the budget reports ``usage`` 0 for
    tokens it spent; ``turn_model_usage`` counts them.

    Attributes:
        subtype: ``success``, ``error_max_turns``, ``error_during_execution``,
            ``error_max_budget_usd``, ... as text; None when absent.
        is_error: Whether the turn failed (a ``success`` subtype may still be an error).
        answer: The final answer (``result``), stripped.
        errors: The ``errors`` strings.
        turns: ``num_turns``.
        duration_ms: ``duration_ms``.
        cost_usd: ``total_cost_usd``, or the older ``cost_usd`` when that is absent.
        usage: ``usage``; None when absent or not an object.
        model_usage: ``modelUsage`` by model (cumulative); None when absent.
        turn_model_usage: ``model_usage_since_last_result`` by model (this turn's);
            None when absent (CLIs before 2.1).
        session_id: Claude Code's session id ("" when absent).
        denials: The tool calls refused during the turn.
        terminal_reason: Why the turn ended (``completed``, ``aborted_tools``,
            ``aborted_streaming``, ``budget_exhausted`` ...; "" when absent).
        index: ``result_index``: 0, 1, 2 ... in one process.
    """

    subtype: str | None = None
    is_error: bool = False
    answer: str = ""
    errors: tuple[str, ...] = ()
    turns: float | None = None
    duration_ms: float | None = None
    cost_usd: float | None = None
    usage: TokenUsage | None = None
    model_usage: Mapping[str, TokenUsage] | None = None
    turn_model_usage: Mapping[str, TokenUsage] | None = None
    session_id: str = ""
    denials: tuple[Denial, ...] = ()
    terminal_reason: str = ""
    index: float | None = None


# Control frames (streaming-input mode) --------------------------------------------------------


class ControlRequest(ClaudeEvent, frozen=True, kw_only=True):
    """A ``control_request`` the CLI sends; it waits for a ``control_response``.

    Requests of subtypes not typed below (and the typed ones too) keep their fields in
    ``request``.

    Attributes:
        request_id: What the answer must name ("" when the line gives no string).
        subtype: ``request.subtype`` ("" when absent).
        request: The ``request`` object, read-only.
    """

    request_id: str = ""
    subtype: str = ""
    request: Mapping[str, Any] = EMPTY


class CanUseTool(ControlRequest, frozen=True, kw_only=True):
    """``control_request/can_use_tool``: the CLI asks whether a tool call may run.

    Answer with a ``control_response`` naming ``request_id``: ``{"behavior": "allow"}``
    (optionally ``updatedInput``, ``updatedPermissions``) or ``{"behavior": "deny",
    "message": ...}``. The CLI never times out; a later ``control_cancel_request`` with the
    same id withdraws the question.

    Attributes:
        tool_name: The tool ("" when absent).
        display_name: How the CLI names it.
        input: The call's input, read-only.
        description: What the call does, in the model's words.
        permission_suggestions: Rules the CLI proposes for "always allow", as given
            (``addRules``, ``addDirectories``, ``setMode``; each has a ``destination``).
        tool_use_id: The tool call (its ``ToolUse.id``).
        blocked_path: The path that needs the approval, when the CLI says one.
    """

    tool_name: str = ""
    display_name: str = ""
    input: Mapping[str, Any] = EMPTY
    description: str = ""
    permission_suggestions: tuple[Mapping[str, Any], ...] = ()
    tool_use_id: str = ""
    blocked_path: str | None = None


class HookCallback(ControlRequest, frozen=True, kw_only=True):
    """``control_request/hook_callback``: a hook registered by ``initialize`` fires.

    Attributes:
        callback_id: The hook's id as registered (``hook_0`` ...).
        input: What the hook gets (``hook_event_name``, ``tool_name``, ...), read-only.
        tool_use_id: The id the CLI gives the call.
    """

    callback_id: str = ""
    input: Mapping[str, Any] = EMPTY
    tool_use_id: str = ""


class ControlResponse(ClaudeEvent, frozen=True, kw_only=True):
    """A ``control_response``: the CLI's answer to a request written to it (or, with
    ``--replay-user-messages``, the echo of an answer written to it).

    Attributes:
        request_id: The request it answers ("" when absent).
        subtype: ``success`` or ``error``.
        response: The success payload, read-only (empty on an error).
        error: The error's text ("" on success).
    """

    request_id: str = ""
    subtype: str = ""
    response: Mapping[str, Any] = EMPTY
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.subtype == "success"


class ControlCancel(ClaudeEvent, frozen=True, kw_only=True):
    """A ``control_cancel_request``: the CLI withdraws a request it sent (an interrupt
    while a ``can_use_tool`` was pending); an answer written later is ignored.

    Attributes:
        request_id: The withdrawn request.
    """

    request_id: str = ""


class OtherEvent(ClaudeEvent, frozen=True, kw_only=True):
    """A line of another type (``stream_event``, ``command_lifecycle``, new ones ...)."""


# --- reading a line ---------------------------------------------------------------------------


def _init(obj: dict[str, Any], raw: Mapping[str, Any]) -> SystemInit:
    tools, servers = obj.get("tools"), obj.get("mcp_servers")
    return SystemInit(
        raw=raw,
        session_id=_text(obj.get("session_id") or None),
        model=_text(obj.get("model") or None),
        permission_mode=_text(obj.get("permissionMode") or None),
        claude_code_version=_text(obj.get("claude_code_version") or None),
        cwd=_str(obj.get("cwd")),
        tools=tuple(map(_text, tools)) if isinstance(tools, list) else None,
        mcp_servers=tuple(servers) if isinstance(servers, list) else None,
    )


def _status(obj: dict[str, Any], raw: Mapping[str, Any]) -> SystemStatus:
    status = obj.get("status")
    return SystemStatus(
        raw=raw,
        status=None if status in (None, "") else _text(status),
        permission_mode=_str(obj.get("permissionMode")),
    )


def _api_retry(obj: dict[str, Any], raw: Mapping[str, Any]) -> ApiRetry:
    return ApiRetry(
        raw=raw,
        attempt=json_number(obj.get("attempt")),
        max_retries=json_number(obj.get("max_retries")),
        retry_delay_ms=json_number(obj.get("retry_delay_ms")),
        error_status=_text(obj.get("error_status")),
        error=_text(obj.get("error")),
    )


def _compacted(obj: dict[str, Any], raw: Mapping[str, Any]) -> Compacted:
    meta = obj.get("compact_metadata")
    meta = meta if isinstance(meta, dict) else {}
    return Compacted(
        raw=raw,
        trigger=_text(meta.get("trigger") or None),
        pre_tokens=json_number(meta.get("pre_tokens")),
    )


def _permission_denied(obj: dict[str, Any], raw: Mapping[str, Any]) -> PermissionDenied:
    return PermissionDenied(
        raw=raw,
        tool_name=_name(obj.get("tool_name")),
        tool_use_id=_str(obj.get("tool_use_id")),
        message=text_of(obj.get("message")),
    )


#: The system lines typed by subtype; any other is an OtherSystem.
_SYSTEM_READERS: dict[str, Callable[[dict[str, Any], Mapping[str, Any]], ClaudeEvent]] = {
    "init": _init,
    "status": _status,
    "api_retry": _api_retry,
    "compact_boundary": _compacted,
    "permission_denied": _permission_denied,
    "session_state_changed": lambda obj, raw: SessionStateChanged(
        raw=raw, state=_str(obj.get("state"))
    ),
}


def _system(obj: dict[str, Any], raw: Mapping[str, Any]) -> ClaudeEvent:
    subtype = obj.get("subtype")
    reader = _SYSTEM_READERS.get(subtype) if isinstance(subtype, str) else None
    if reader is None:
        return OtherSystem(raw=raw, subtype=None if subtype is None else str(subtype))
    return reader(obj, raw)


def _assistant_block(block: Any) -> TextBlock | ThinkingBlock | ToolUse | OtherBlock:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        return TextBlock(text=text_of(block.get("text")))
    if kind == "thinking":
        return ThinkingBlock(text=text_of(block.get("thinking")))
    if kind == "redacted_thinking":
        return ThinkingBlock(redacted=True)
    if kind in ("tool_use", "server_tool_use", "mcp_tool_use"):
        return ToolUse(
            id=_str(block.get("id")), name=_name(block.get("name")), input=block.get("input"),
            kind=kind,
        )  # fmt: skip
    return OtherBlock(type=kind if isinstance(kind, str) else None, value=block)


def _user_block(block: Any) -> TextBlock | ToolResult | OtherBlock:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "tool_result":
        return ToolResult(
            tool_use_id=_str(block.get("tool_use_id")),
            text=text_of(block.get("content")),
            is_error=bool(block.get("is_error")),
        )
    if kind == "text":
        return TextBlock(text=str(block.get("text") or ""))
    return OtherBlock(type=kind if isinstance(kind, str) else None, value=block)


def _content(message: Any) -> list[Any] | None:
    """A message's content blocks (a string is one text block); None when malformed."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else None


def _assistant(obj: dict[str, Any], raw: Mapping[str, Any]) -> AssistantMessage:
    message = obj.get("message")
    message = message if isinstance(message, dict) else {}
    content = _content(message)
    msg_id = message.get("id")
    parent = obj.get("parent_tool_use_id")
    return AssistantMessage(
        raw=raw,
        message_id=None if msg_id is None else _text(msg_id),
        model=_str(message.get("model")),
        blocks=None if content is None else tuple(map(_assistant_block, content)),
        usage=_usage(message.get("usage")),
        parent_tool_use_id=parent if isinstance(parent, str) else None,
        session_id=_str(obj.get("session_id")),
    )


def _user(obj: dict[str, Any], raw: Mapping[str, Any]) -> UserMessage:
    content = _content(obj.get("message"))
    parent = obj.get("parent_tool_use_id")
    return UserMessage(
        raw=raw,
        blocks=None if content is None else tuple(map(_user_block, content)),
        is_replay=obj.get("isReplay") is True,
        parent_tool_use_id=parent if isinstance(parent, str) else None,
        uuid=_str(obj.get("uuid")),
        session_id=_str(obj.get("session_id")),
    )


def _denials(value: Any) -> tuple[Denial, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(
        Denial(
            tool_name=_name(item.get("tool_name")),
            tool_use_id=_str(item.get("tool_use_id")),
            tool_input=item.get("tool_input"),
        )
        for item in value
        if isinstance(item, dict)
    )


def _result(obj: dict[str, Any], raw: Mapping[str, Any]) -> Result:
    subtype = obj.get("subtype")
    errors = obj.get("errors")
    cost = obj["total_cost_usd"] if "total_cost_usd" in obj else obj.get("cost_usd")
    return Result(
        raw=raw,
        subtype=None if subtype is None else str(subtype),
        is_error=bool(obj.get("is_error")),
        answer=text_of(obj.get("result")).strip(),
        errors=tuple(e for e in errors if isinstance(e, str)) if isinstance(errors, list) else (),
        turns=json_number(obj.get("num_turns")),
        duration_ms=json_number(obj.get("duration_ms")),
        cost_usd=json_number(cost),
        usage=_usage(obj.get("usage")),
        model_usage=_model_usage(obj.get("modelUsage")),
        turn_model_usage=_model_usage(obj.get("model_usage_since_last_result")),
        session_id=_text(obj.get("session_id") or None),
        denials=_denials(obj.get("permission_denials")),
        terminal_reason=_str(obj.get("terminal_reason")),
        index=json_number(obj.get("result_index")),
    )


def _control_request(obj: dict[str, Any], raw: Mapping[str, Any]) -> ControlRequest:
    request = obj.get("request")
    request = request if isinstance(request, dict) else {}
    common = {
        "raw": raw,
        "request_id": _str(obj.get("request_id")),
        "subtype": _str(request.get("subtype")),
        "request": _mapping(request),
    }
    if common["subtype"] == "can_use_tool":
        suggestions = request.get("permission_suggestions")
        blocked = request.get("blocked_path")
        return CanUseTool(
            **common,
            tool_name=_name(request.get("tool_name")),
            display_name=_str(request.get("display_name")),
            input=_mapping(request.get("input")),
            description=_str(request.get("description")),
            permission_suggestions=tuple(
                MappingProxyType(s) for s in suggestions if isinstance(s, dict)
            )
            if isinstance(suggestions, list)
            else (),
            tool_use_id=_str(request.get("tool_use_id")),
            blocked_path=blocked if isinstance(blocked, str) else None,
        )
    if common["subtype"] == "hook_callback":
        return HookCallback(
            **common,
            callback_id=_str(request.get("callback_id")),
            input=_mapping(request.get("input")),
            tool_use_id=_str(request.get("tool_use_id")),
        )
    return ControlRequest(**common)


def _control_response(obj: dict[str, Any], raw: Mapping[str, Any]) -> ControlResponse:
    response = obj.get("response")
    response = response if isinstance(response, dict) else {}
    return ControlResponse(
        raw=raw,
        request_id=_str(response.get("request_id")),
        subtype=_str(response.get("subtype")),
        response=_mapping(response.get("response")),
        error=_text(response.get("error")),
    )


def _rate_limit(obj: dict[str, Any], raw: Mapping[str, Any]) -> RateLimit:
    info = obj.get("rate_limit_info")
    if not isinstance(info, dict):
        return RateLimit(raw=raw)
    return RateLimit(raw=raw, status=_str(info.get("status")), info=MappingProxyType(info))


_READERS = {
    "system": _system,
    "assistant": _assistant,
    "user": _user,
    "result": _result,
    "rate_limit_event": _rate_limit,
    "control_request": _control_request,
    "control_response": _control_response,
    "control_cancel_request": lambda obj, raw: ControlCancel(
        raw=raw, request_id=_str(obj.get("request_id"))
    ),
}


def interpret(obj: Any) -> ClaudeEvent | None:
    """The typed event of one decoded stream-json object; never raises.

    Args:
        obj: A decoded JSON value.

    Returns:
        The event, or None when ``obj`` is no object with a string ``type`` (or, for a
        bug of this module, when it cannot be read: that is logged).
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return None
    return _typed(obj["type"], obj, MappingProxyType(obj))


def _typed(kind: str, obj: dict[str, Any], raw: Mapping[str, Any]) -> ClaudeEvent | None:
    """The typed event of a line of type ``kind``, from its fields ``obj``; never raises
    (None, logged, for a bug of this module)."""
    try:
        reader = _READERS.get(kind)
        return OtherEvent(raw=raw) if reader is None else reader(obj, raw)
    except Exception as exc:  # hostile output must never end a session or its readers
        # Only the exception's type: its message may hold decoded (unmasked) text.
        log.debug("reading a stream-json event failed (%s); it is no event", type(exc).__name__)
        return None


class _LineObject(Mapping[str, Any]):
    """The JSON object of a line read by :func:`_read_known`, decoded when first read: the
    fields the typed event holds are all most readers want, so most lines are never
    decoded whole. Read-only, like the ``MappingProxyType`` of a line decoded whole."""

    __slots__ = ("_line", "_object", "_type")

    def __init__(self, line: str, kind: str) -> None:
        self._line = line
        self._type = kind
        self._object: Mapping[str, Any] | None = None

    def _decoded(self) -> Mapping[str, Any]:
        if self._object is None:
            try:
                value = json.loads(self._line)
            except (ValueError, RecursionError):  # what msgspec read and json cannot
                value = None
            self._object = MappingProxyType(
                value if isinstance(value, dict) else {"type": self._type}
            )
        return self._object

    def __getitem__(self, key: str) -> Any:
        if key == "type" and self._object is None:
            return self._type  # both decoders take the last of repeated keys
        return self._decoded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __repr__(self) -> str:
        return repr(self._decoded())


# What the readers of the commonest lines read, and nothing else: msgspec skips the rest of
# a line without building it (a line's usage details, an init's commands and agents ...).
# A field the readers read in full is ``Any``; a line whose fields have other shapes than
# these (or of another type, or with its type twice) fails here and is decoded whole.
_UNSET: Any = msgspec.UNSET


def _fields_struct(
    name: str, fields: str, message: Any = None, **options: Any
) -> type[msgspec.Struct]:
    """A Struct of these fields (space-separated), each any JSON value, and of a
    ``message`` of that type when given; every field absent is UNSET."""
    typed = [] if message is None else [("message", message, _UNSET)]
    return msgspec.defstruct(name, [(f, Any, _UNSET) for f in fields.split()] + typed, **options)


_SYSTEM_LINE = _fields_struct(
    "SystemLine", "subtype session_id model permissionMode claude_code_version cwd tools "
    "mcp_servers status error_status error attempt max_retries retry_delay_ms "
    "compact_metadata tool_name tool_use_id message state", tag_field="type", tag="system",
)  # fmt: skip
_ASSISTANT_BODY = _fields_struct("AssistantBody", "id model content usage")
_USER_BODY = _fields_struct("UserBody", "content")
_KNOWN = msgspec.json.Decoder(
    _fields_struct("AssistantLine", "parent_tool_use_id session_id",
                   _ASSISTANT_BODY | None, tag_field="type", tag="assistant")
    | _fields_struct("UserLine", "isReplay parent_tool_use_id uuid session_id",
                     _USER_BODY | None, tag_field="type", tag="user")
    | _SYSTEM_LINE
    | _fields_struct("ResultLine", "subtype is_error result errors num_turns duration_ms "
                     "total_cost_usd cost_usd usage modelUsage model_usage_since_last_result "
                     "session_id permission_denials terminal_reason result_index",
                     tag_field="type", tag="result")
)  # fmt: skip


# The commonest lines of the usual shapes are decoded by msgspec into these Structs, typed
# as their events' fields are, and each event is made from them with no Python code per
# JSON value. A line of another shape fails here (a wrong type, another block type, a
# number out of range ...) and is read by the readers above: where both read a line, they
# give the same event (a test checks it over the fixtures and thousands of mutations).


class _WireTokens(msgspec.Struct):
    """Tokens as a line gives them: a message's ``usage``, or a model's in ``modelUsage``
    (the same names in camel case, and a cost)."""

    input_tokens: float | None = None
    output_tokens: float | None = None
    cache_read_input_tokens: float | None = None
    cache_creation_input_tokens: float | None = None
    cost_usd: ClassVar[float | None] = None

    def usage(self) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_tokens=self.cache_read_input_tokens,
            cache_creation_tokens=self.cache_creation_input_tokens,
            cost_usd=self.cost_usd,
        )


_WireModelUsage = msgspec.defstruct(
    "_WireModelUsage",
    [(name, float | None, None) for name in _WireTokens.__struct_fields__]
    + [("cost_usd", float | None, msgspec.field(default=None, name="costUSD"))],
    bases=(_WireTokens,),
    rename="camel",
)


def _by_model(value: dict[str, _WireModelUsage] | None) -> Mapping[str, TokenUsage] | None:
    if value is None:
        return None
    return MappingProxyType({model: item.usage() for model, item in value.items()})


class _WireText(msgspec.Struct, tag="text", tag_field="type"):
    text: str = ""

    def block(self) -> TextBlock:
        return TextBlock(text=self.text)


class _WireThinking(msgspec.Struct, tag="thinking", tag_field="type"):
    thinking: str = ""

    def block(self) -> ThinkingBlock:
        return ThinkingBlock(text=self.thinking)


class _WireRedacted(msgspec.Struct, tag="redacted_thinking", tag_field="type"):
    def block(self) -> ThinkingBlock:
        return ThinkingBlock(redacted=True)


class _WireToolUse(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str = ""
    name: str = ""
    input: Any = None
    kind: ClassVar[str] = "tool_use"

    def block(self) -> ToolUse:
        return ToolUse(id=self.id, name=self.name, input=self.input, kind=self.kind)


class _WireServerToolUse(_WireToolUse, tag="server_tool_use"):
    kind: ClassVar[str] = "server_tool_use"


class _WireMcpToolUse(_WireToolUse, tag="mcp_tool_use"):
    kind: ClassVar[str] = "mcp_tool_use"


class _WireToolResult(msgspec.Struct, tag="tool_result", tag_field="type"):
    tool_use_id: str = ""
    content: Any = None
    is_error: Any = False

    def block(self) -> ToolResult:
        return ToolResult(
            tool_use_id=self.tool_use_id, text=text_of(self.content), is_error=bool(self.is_error)
        )


def _blocks(content: list[Any] | str | None) -> tuple[Any, ...] | None:
    if content is None:
        return None
    if isinstance(content, str):
        return (TextBlock(text=content),)
    return tuple([block.block() for block in content])


class _MeteredBody(msgspec.Struct):
    """What a usage meter reads of an assistant line's message."""

    id: str | None = None
    model: str = ""
    usage: _WireTokens | None = None


class _MeteredAssistant(msgspec.Struct, tag="assistant", tag_field="type"):
    """What a usage meter reads of an assistant line (its content is skipped unbuilt)."""

    message: _MeteredBody | None = None

    def metered(self, raw: Mapping[str, Any], **fields: Any) -> AssistantMessage:
        """The message of what a meter reads (and of ``fields``, the line's others)."""
        body = self.message or _NO_METERED_BODY
        return AssistantMessage(
            raw=raw,
            message_id=body.id,
            model=body.model,
            usage=None if body.usage is None else body.usage.usage(),
            **fields,
        )


_NO_METERED_BODY = _MeteredBody()


class _WireAssistantBody(_MeteredBody):
    content: (
        list[_WireText | _WireThinking | _WireRedacted | _WireToolUse | _WireServerToolUse
             | _WireMcpToolUse] | str | None
    ) = None  # fmt: skip


class _WireAssistant(_MeteredAssistant):
    message: _WireAssistantBody | None = None  # type: ignore[assignment]
    parent_tool_use_id: str | None = None
    session_id: str = ""

    def event(self, raw: Mapping[str, Any]) -> AssistantMessage:
        return self.metered(
            raw,
            blocks=None if self.message is None else _blocks(self.message.content),
            parent_tool_use_id=self.parent_tool_use_id,
            session_id=self.session_id,
        )


class _WireUserBody(msgspec.Struct):
    content: list[_WireText | _WireToolResult] | str | None = None


class _WireUser(msgspec.Struct, tag="user", tag_field="type"):
    message: _WireUserBody | None = None
    isReplay: bool = False
    parent_tool_use_id: str | None = None
    uuid: str = ""
    session_id: str = ""

    def event(self, raw: Mapping[str, Any]) -> UserMessage:
        return UserMessage(
            raw=raw,
            blocks=None if self.message is None else _blocks(self.message.content),
            is_replay=self.isReplay,
            parent_tool_use_id=self.parent_tool_use_id,
            uuid=self.uuid,
            session_id=self.session_id,
        )


class _MeteredResult(msgspec.Struct, tag="result", tag_field="type"):
    """What a usage meter reads of a result line."""

    subtype: str | None = None
    num_turns: float | None = None
    total_cost_usd: float | msgspec.UnsetType | None = msgspec.UNSET
    cost_usd: float | None = None
    usage: _WireTokens | None = None
    model_usage_since_last_result: dict[str, _WireModelUsage] | None = None

    @property
    def cost(self) -> float | None:
        """``total_cost_usd``, or the older ``cost_usd`` when that is absent."""
        cost = self.total_cost_usd
        return self.cost_usd if cost is msgspec.UNSET else cost

    def metered(self, raw: Mapping[str, Any], **fields: Any) -> Result:
        """The result of what a meter reads (and of ``fields``, the line's others)."""
        return Result(
            raw=raw,
            subtype=self.subtype,
            turns=self.num_turns,
            cost_usd=self.cost,
            usage=None if self.usage is None else self.usage.usage(),
            turn_model_usage=_by_model(self.model_usage_since_last_result),
            **fields,
        )


class _WireResult(_MeteredResult):
    is_error: bool = False
    result: str = ""
    errors: tuple[str, ...] = ()
    duration_ms: float | None = None
    modelUsage: dict[str, _WireModelUsage] | None = None
    session_id: str | None = None
    permission_denials: tuple[Denial, ...] = ()  # read as they are
    terminal_reason: str = ""
    result_index: float | None = None

    def event(self, raw: Mapping[str, Any]) -> Result:
        return self.metered(
            raw,
            is_error=self.is_error,
            answer=self.result.strip(),
            errors=self.errors,
            duration_ms=self.duration_ms,
            model_usage=_by_model(self.modelUsage),
            session_id=self.session_id or "",
            denials=self.permission_denials,
            terminal_reason=self.terminal_reason,
            index=self.result_index,
        )


#: Lines typed here, and system lines (many subtypes, each rare but thinking ticks) read
#: for their fields: either way one decoding of the line.
_TYPED = msgspec.json.Decoder(_WireAssistant | _WireUser | _WireResult | _SYSTEM_LINE)
_WIRE_LINES = (_WireAssistant, _WireUser, _WireResult)
#: What a usage meter reads: less than a line's event, so more quickly. Lines of the
#: types below carry none, whatever they say ("usage" in an init's commands, in a tool's
#: result, in a partial message's stream event).
_UNMETERED = tuple(
    msgspec.defstruct(f"_Unmetered_{kind}", [], tag=kind, tag_field="type")
    for kind in ("system", "user", "stream_event", "rate_limit_event")
)
_METERED = msgspec.json.Decoder(Union[(_MeteredAssistant, _MeteredResult, *_UNMETERED)])


def _fields(struct: msgspec.Struct) -> dict[str, Any]:
    """The fields a line gave, as the dict a whole decoding would have held them in."""
    return {k: v for k, v in msgspec.structs.asdict(struct).items() if v is not _UNSET}


def _read_known(line: str) -> ClaudeEvent | None:
    """The typed event of an assistant, user, system or result line, decoding only what it
    holds; None when the line is no such line of the usual shapes (it is then decoded
    whole: the event is the same either way)."""
    try:
        struct = _TYPED.decode(line)
    except Exception:  # of other shapes: read for their fields alone
        try:
            struct = _KNOWN.decode(line)
        except Exception:  # not UTF-8 encodable, malformed, another type or shape: no matter
            return None
    kind = type(struct).__struct_config__.tag
    if isinstance(struct, _WIRE_LINES):
        try:
            return struct.event(_LineObject(line, kind))
        except Exception:  # a tool's result nested too deep to write as JSON ...
            return None  # decoded whole, which says what it can
    subtype = getattr(struct, "subtype", None)
    if kind == "system" and type(subtype) is str and subtype not in _SYSTEM_READERS:
        return OtherSystem(raw=_LineObject(line, kind), subtype=subtype)  # thinking ticks ...
    obj = _fields(struct)
    message = obj.get("message")
    if isinstance(message, msgspec.Struct):
        obj["message"] = _fields(message)
    return _typed(kind, obj, _LineObject(line, kind))


def decode_line(text: str) -> ClaudeEvent | None:
    """Parse one output line into its typed event; never raises, never caches.

    Only a line that is a JSON object (``{`` ... ``}`` once stripped) is decoded, so
    plain text costs no JSON decoding. The commonest lines are read for the fields their
    events hold (:func:`_read_known`); the others are decoded whole.

    Args:
        text: One output line.

    Returns:
        The event, or None when the line is no stream-json event.
    """
    stripped = text.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    event = _read_known(stripped)
    if event is not None:
        return event
    try:
        obj = json.loads(stripped)
    except (ValueError, RecursionError):  # malformed, or nested deeper than the decoder goes
        return None
    return interpret(obj)


def usage_event(text: str) -> AssistantMessage | Result | None:
    """The usage an assistant or result line reports, read alone: for a usage meter, which
    reads every line of a run however it is shown. Never raises.

    An assistant line gives an :class:`AssistantMessage` of its ``message_id``, ``model``
    and ``usage``; a result line a :class:`Result` of its ``subtype``, ``turns``,
    ``cost_usd``, ``usage`` and ``turn_model_usage``. Their other fields are left at their
    defaults (an assistant message's ``blocks`` is None): these are not the lines' events.
    A line of another shape is decoded whole (:func:`decode_line`); the fields read are
    the same either way, but for a line whose content no event can be made of (nested too
    deep, a number too long for Python), whose usage is still read here.

    Args:
        text: One output line.

    Returns:
        The event, or None when the line is no assistant or result line.
    """
    stripped = text.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    try:
        lean = _METERED.decode(stripped)
    except Exception:  # of other shapes, or another type: read whole
        event = decode_line(stripped)
        return event if isinstance(event, AssistantMessage | Result) else None
    if not isinstance(lean, _MeteredAssistant | _MeteredResult):
        return None
    return lean.metered(_LineObject(stripped, type(lean).__struct_config__.tag))
