"""The typed events of Claude Code's stream-json (cldpd_magic.stream_json), from real output.

The interactive fixtures are the real CLI 2.1.332 in streaming-input mode
(tests/fixtures/claude/interactive/README.md); the one-shot ones are captured by
tests/fixtures/claude/capture.py. Hostile input never raises: every field is read
defensively, and a line that is no event is None.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgspec
import pytest
from test_render_fuzz import EVENTS, _mutate_value, _random_value
from test_render_hostile import MALFORMED

from cldpd_magic import stream_json as sj
from cldpd_magic.stream_json import (
    ApiRetry,
    AssistantMessage,
    CanUseTool,
    ClaudeEvent,
    Compacted,
    ControlCancel,
    ControlRequest,
    ControlResponse,
    HookCallback,
    OtherBlock,
    OtherEvent,
    OtherSystem,
    PermissionDenied,
    RateLimit,
    Result,
    SessionStateChanged,
    SystemInit,
    SystemStatus,
    TextBlock,
    ThinkingBlock,
    TokenUsage,
    ToolResult,
    ToolUse,
    UserMessage,
    decode_line,
    interpret,
    json_number,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "claude"


def events_of(name: str) -> list[ClaudeEvent | None]:
    return [decode_line(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def of_type(events: list, cls: type) -> list:
    return [e for e in events if type(e) is cls]


# -- one-shot runs ------------------------------------------------------------------------


def test_a_real_one_shot_run_reads_as_typed_events():
    events = events_of("success_with_tools")
    assert all(e is not None for e in events)
    (init,) = of_type(events, SystemInit)
    assert init.permission_mode == "acceptEdits" and len(init.tools) == 22
    assert init.session_id == "00000000-0000-4000-8000-000000000001"
    assert init.model == "claude-scripted-1" and init.cwd == "/home/agent/work"
    messages = of_type(events, AssistantMessage)
    blocks = [b for m in messages for b in m.blocks]
    assert {type(b) for b in blocks} == {ThinkingBlock, TextBlock, ToolUse}
    (first_call, *_) = [b for b in blocks if isinstance(b, ToolUse)]
    assert first_call.name == "Bash" and first_call.input["command"].startswith("echo")
    assert first_call.id.startswith("toolu_") and first_call.kind == "tool_use"
    assert all(m.message_id and m.usage is not None for m in messages)
    results = [b for e in of_type(events, UserMessage) for b in e.blocks]
    assert results and all(isinstance(b, ToolResult) and not b.is_error for b in results)
    (result,) = of_type(events, Result)
    assert (result.subtype, result.is_error, result.turns) == ("success", False, 4)
    assert result.answer == "Wrote **proof.txt** in the workdir."
    assert result.usage == TokenUsage(input_tokens=1860, output_tokens=132,
                                      cache_read_tokens=300, cache_creation_tokens=0)  # fmt: skip
    assert result.cost_usd == pytest.approx(0.01014) and result.index == 0


def test_real_failures_and_denials_are_typed():
    (denied,) = of_type(events_of("permission_denied"), PermissionDenied)
    assert denied.tool_name == "Bash" and denied.tool_use_id.startswith("toolu_")
    assert denied.message.startswith("touch in '/home/agent")
    (result,) = of_type(events_of("permission_denied"), Result)
    assert [d.tool_name for d in result.denials] == ["Bash"]
    assert result.denials[0].tool_input["command"] == "touch refused.txt"
    assert result.denials[0].tool_use_id == denied.tool_use_id
    retries = of_type(events_of("api_retry_then_failure"), ApiRetry)
    assert [(r.attempt, r.max_retries, r.error_status) for r in retries] == [
        (1, 2, "529"), (2, 2, "529")]  # fmt: skip
    (limit,) = of_type(events_of("max_turns"), Result)
    assert limit.subtype == "error_max_turns" and limit.is_error
    assert limit.errors == ("Reached maximum number of turns (2)",)


# -- streaming input: control frames, replays, states -------------------------------------


def test_an_approval_asked_and_withdrawn():
    events = events_of("interactive/cancel")
    asked = of_type(events, CanUseTool)
    assert len(asked) == 2 and isinstance(asked[0], ControlRequest)
    first = asked[0]
    assert first.subtype == "can_use_tool" and first.tool_name == "Bash"
    assert first.display_name == "Bash" and first.description == "touch c1.txt"
    assert dict(first.input) == {"command": "touch c1.txt", "description": "touch c1.txt"}
    assert first.tool_use_id.startswith("toolu_")
    assert first.blocked_path == "/home/agent/work/10-cancel/c1.txt"
    kinds = [s["type"] for s in first.permission_suggestions]
    assert kinds == ["addRules", "addDirectories", "setMode"]
    call = next(b for m in of_type(events, AssistantMessage) for b in m.blocks
                if isinstance(b, ToolUse))  # fmt: skip
    assert call.id == first.tool_use_id  # an approval names the tool call it is about
    (cancel,) = of_type(events, ControlCancel)
    assert cancel.request_id == first.request_id and cancel.type == "control_cancel_request"
    answers = of_type(events, ControlResponse)
    assert [(a.request_id, a.ok) for a in answers] == [("init_1", True), ("int_1", True)]
    assert answers[1].response == {"still_queued": []}
    assert answers[0].response["claude_code_version"] == "2.1.332"
    results = of_type(events, Result)
    assert [(r.subtype, r.terminal_reason, r.index) for r in results] == [
        ("error_during_execution", "aborted_tools", 0),
        ("success", "completed", 1),
        ("success", "completed", 2),
    ]
    assert results[0].denials[0].tool_name == "Bash"
    interrupted = [b.text for e in of_type(events, UserMessage) for b in e.blocks
                   if isinstance(b, TextBlock)]  # fmt: skip
    assert interrupted == ["[Request interrupted by user for tool use]"]
    assert not any(e.is_replay for e in of_type(events, UserMessage))


def test_replays_states_and_partial_messages():
    events = events_of("interactive/replay_state")
    replays = [e for e in of_type(events, UserMessage) if e.is_replay]
    assert [e.blocks[0].text for e in replays] == [
        "with replay", "slow turn", "queued during slow turn"]  # fmt: skip
    assert replays[0].uuid == "11111111-2222-3333-4444-555555555555"
    states = [e.state for e in of_type(events, SessionStateChanged)]
    assert states[:4] == ["running", "requires_action", "running", "idle"]
    (asked,) = of_type(events, CanUseTool)
    echoed = [e for e in of_type(events, ControlResponse) if e.request_id == asked.request_id]
    assert len(echoed) == 1 and echoed[0].response["behavior"] == "allow"  # our answer, echoed
    statuses = of_type(events, SystemStatus)
    assert statuses and {s.status for s in statuses} == {"requesting"}
    others = {e.type for e in of_type(events, OtherEvent)}
    assert others == {"stream_event", "command_lifecycle"}
    assert len(of_type(events, SystemInit)) == 3  # one per turn


def test_hooks_and_mode_changes():
    hooks = of_type(events_of("interactive/hooks"), HookCallback)
    assert [h.callback_id for h in hooks] == ["hook_1", "hook_0"]
    assert [h.input["hook_event_name"] for h in hooks] == ["UserPromptSubmit", "PreToolUse"]
    assert hooks[1].input["tool_name"] == "Bash" and hooks[1].subtype == "hook_callback"
    events = events_of("interactive/modes")
    errors = [a for a in of_type(events, ControlResponse) if not a.ok]
    assert [a.request_id for a in errors] == ["mode_1", "mode_6"]
    assert errors[0].error.startswith("Cannot set permission mode: must be one of")
    assert errors[0].response == {}
    modes = [s.permission_mode for s in of_type(events, SystemStatus) if s.status is None]
    assert modes[0] == "acceptEdits"
    replayed = [e.blocks[0].text for e in of_type(events, UserMessage) if e.is_replay]
    assert len(replayed) == 4 and all("Set model to `" in text for text in replayed)


def test_a_budget_turn_says_its_tokens_by_model():
    results = of_type(events_of("interactive/budget"), Result)
    over = results[1]
    assert over.subtype == "error_max_budget_usd" and over.terminal_reason == "budget_exhausted"
    assert over.usage.input_tokens == 0  # what "usage" says
    (spent,) = over.turn_model_usage.values()
    assert (spent.input_tokens, spent.output_tokens, spent.cost_usd) == (120, 24, 0.00096)
    (total,) = over.model_usage.values()
    assert total.input_tokens == 240 and over.cost_usd == 0.00192
    assert results[2].turn_model_usage == {}


# -- one event per line shape -------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"type": "system", "subtype": "compact_boundary",
          "compact_metadata": {"trigger": "auto", "pre_tokens": 5}},
         Compacted(trigger="auto", pre_tokens=5)),
        ({"type": "system", "subtype": "status", "status": None, "permissionMode": "plan"},
         SystemStatus(status=None, permission_mode="plan")),
        ({"type": "system", "subtype": "hook_response"}, OtherSystem(subtype="hook_response")),
        ({"type": "system"}, OtherSystem(subtype=None)),
        ({"type": "rate_limit_event", "rate_limit_info": {"status": "allowed"}},
         RateLimit(status="allowed", info={"status": "allowed"})),
        ({"type": "control_request", "request_id": "r", "request": {"subtype": "mcp_message",
          "x": 1}}, ControlRequest(request_id="r", subtype="mcp_message",
                                  request={"subtype": "mcp_message", "x": 1})),
        ({"type": "control_response", "response": {"subtype": "error", "request_id": "q",
          "error": "no"}}, ControlResponse(request_id="q", subtype="error", error="no")),
        ({"type": "result", "subtype": "success", "cost_usd": 0.5},
         Result(subtype="success", cost_usd=0.5)),
        ({"type": "result", "total_cost_usd": None, "cost_usd": 0.5}, Result(cost_usd=None)),
        ({"type": "assistant", "message": {"content": "hi"}},
         AssistantMessage(blocks=(TextBlock(text="hi"),))),
        ({"type": "assistant", "message": {"content": ["x", {"type": "redacted_thinking"},
          {"type": "image"}]}}, AssistantMessage(blocks=(
            OtherBlock(value="x"), ThinkingBlock(redacted=True),
            OtherBlock(type="image", value={"type": "image"})))),
        ({"type": "assistant", "message": None}, AssistantMessage()),
        ({"type": "user", "message": {"content": 123}}, UserMessage()),
        ({"type": "banana"}, OtherEvent()),
    ],
)  # fmt: skip
def test_each_shape(obj, expected):
    event = interpret(obj)
    assert event == expected and type(event) is type(expected)
    assert event.raw == obj and event.type == obj["type"]
    with pytest.raises(TypeError):
        event.raw["type"] = "changed"  # type: ignore[index]


def test_what_is_no_event():
    for text in ["", "plain", "[1, 2]", '"x"', "{not json}", '{"type": 5}', '{"no": "type"}',
                 '{"type": null}', "{" * 100_000 + "}" * 100_000]:  # fmt: skip
        assert decode_line(text) is None
        assert sj.usage_event(text) is None
    assert interpret([{"type": "x"}]) is None


def test_json_numbers():
    assert [json_number(v) for v in (1, -2.5, True, "3", None, 10**400, float("nan"))] == [
        1.0, -2.5, None, None, None, None, None]  # fmt: skip
    assert json_number(-1, minimum=0) is None and json_number(0, minimum=0) == 0.0


def test_hostile_lines_and_mutated_events_never_raise():
    rng = random.Random(7)
    shapes = [
        *EVENTS,
        *(
            json.loads(line)
            for line in (FIXTURES / "interactive" / "cancel.jsonl").read_text().splitlines()
        ),
    ]
    for _ in range(5000):
        obj = _mutate_value(rng, rng.choice(shapes))
        event = interpret(obj)
        assert event is None or isinstance(event, ClaudeEvent)
        other = interpret(_random_value(rng))
        assert other is None or isinstance(other, ClaudeEvent)
    for line in MALFORMED:
        event = decode_line(line)
        assert event is None or isinstance(event, ClaudeEvent)


def test_a_failure_inside_the_reader_is_no_event_and_logs_no_text(monkeypatch, caplog):
    def broken(obj, raw):
        raise KeyError(obj["secret"])

    monkeypatch.setitem(sj._READERS, "result", broken)
    with caplog.at_level("DEBUG", logger="cldpd_magic"):
        assert interpret({"type": "result", "secret": "hidden-value"}) is None
    assert "KeyError" in caplog.text and "hidden-value" not in caplog.text


def test_the_events_are_frozen():
    event = interpret({"type": "control_cancel_request", "request_id": "r"})
    with pytest.raises(AttributeError):
        event.request_id = "other"  # type: ignore[misc]
    assert isinstance(event.raw, MappingProxyType)


# -- the commonest lines are read for their fields alone ------------------------------------


def _whole(line: str) -> ClaudeEvent | None:
    """The event of a line decoded whole (the reading every line had before)."""
    stripped = line.strip()
    try:
        return interpret(json.loads(stripped))
    except (ValueError, RecursionError):
        return None


def _same_event(line: str) -> None:
    fast, whole = decode_line(line), _whole(line)
    assert type(fast) is type(whole) and fast == whole, line
    if whole is not None:
        assert fast.type == whole.type and dict(fast.raw) == dict(whole.raw), line
        assert list(fast.raw) == list(whole.raw) and len(fast.raw) == len(whole.raw)


def test_reading_only_the_fields_gives_the_event_a_whole_decoding_gives():
    lines = [line for path in sorted(FIXTURES.rglob("*.jsonl")) for line in
             path.read_text(encoding="utf-8").splitlines() if line.strip()]  # fmt: skip
    assert len(lines) > 150
    known = [line for line in lines if sj._read_known(line.strip()) is not None]
    assert len(known) > 100  # the fixtures' assistant, user, system and result lines
    rng = random.Random(11)
    for _ in range(4000):
        obj = _mutate_value(rng, json.loads(rng.choice(known)))
        lines.append(json.dumps(obj, ensure_ascii=rng.random() < 0.5))
    hostile = [
        '{"type":"assistant","message":{"content":"a"},"type":"user"}',  # its type twice
        '{"type":"assistant","message":"text"}', '{"type":"user","message":[1,2]}',
        '{"type":"system","subtype":"permission_denied","message":{"content":"x","y":1}}',
        '{"type":"result","num_turns":NaN}', '{"type":"result","duration_ms":1e400}',
        '{"type":"result","result":"\\ud800"}', '{"type":"assistant","message":{"id":5}}',
        '{"type":"result","num_turns":' + "1" * 5000 + "}",
        '{"type":"user","message":' + "[" * 5000 + "]" * 5000 + "}",
        '{"type":"assistant","message":{"content":[{"type":"text","text":"a","text":"b"}]}}',
        '{"type":"system","subtype":"init","tools":["Bash",3,null],"cwd":1}',
        '  {"type":"result","subtype":"success","total_cost_usd":null,"cost_usd":2}  ',
        '{"type":"result","modelUsage":{"m":{"inputTokens":"3"}},"model_usage_since_last_result":[]}',
    ]  # fmt: skip
    for line in lines + hostile:
        _same_event(line)


def _keep_types(rng: random.Random, value: Any) -> Any:
    """A copy of a decoded event with values changed but not their JSON types nor its and
    its blocks' ``type`` (and keys dropped or added): lines that the typed reading of the
    commonest lines still takes, mostly."""
    if isinstance(value, dict):
        out = {
            k: v if k == "type" else _keep_types(rng, v)
            for k, v in value.items()
            if k == "type" or rng.random() > 0.1
        }
        if rng.random() < 0.1:
            out[rng.choice(["extra", "cost_usd", "kind", "data"])] = _random_value(rng)
        return out
    if isinstance(value, list):
        return [_keep_types(rng, item) for item in value if rng.random() > 0.1]
    if isinstance(value, bool):
        return rng.random() < 0.5
    if isinstance(value, int | float):
        return rng.choice([0, -1, 3, 2.5, -0.0, 2**53 + 1, 10**30, 1.5e308, value])
    if isinstance(value, str) and rng.random() < 0.5:
        return rng.choice(
            ["", " padded  ", "<script>x</script>", "\u00e9\n\t", "\x1b[31m", value * 2]
        )
    return value


def test_the_typed_reading_gives_the_event_a_whole_decoding_gives():
    lines = [line for path in sorted(FIXTURES.rglob("*.jsonl")) for line in
             path.read_text(encoding="utf-8").splitlines() if line.strip()]  # fmt: skip
    commonest = [json.loads(line) for line in lines if _typed_reading(line)]
    kinds = [_whole(line) for line in lines]
    common = [e for e in kinds if isinstance(e, AssistantMessage | UserMessage | Result)]
    assert len(commonest) == len(common) > 70  # every one the real CLI wrote
    rng = random.Random(12)
    mutated = [json.dumps(_keep_types(rng, rng.choice(commonest))) for _ in range(4000)]
    hostile = [
        '{"type":"assistant","message":{"content":[{"type":"tool_use","id":"a","name":"",'
        '"input":{}},{"type":"server_tool_use","name":"x"},{"type":"mcp_tool_use"},'
        '{"type":"redacted_thinking","data":"x"},{"type":"thinking","thinking":"t"}]}}',
        '{"type":"assistant","message":{"usage":{"input_tokens":-3,"output_tokens":1.5e308}}}',
        '{"type":"assistant","message":{"usage":{"cache_read_input_tokens":1e400}}}',
        '{"type":"assistant","message":null}', '{"type":"user","message":null,"isReplay":true}',
        '{"type":"user","message":{"content":"plain"}}', '{"type":"user","message":{"content":""}}',
        '{"type":"user","message":{"content":[{"type":"tool_result","content":[{"type":"image"},'
        '{"type":"text","text":"t"}],"is_error":1}]}}',
        '{"type":"result","errors":["a","b"],"permission_denials":[{"tool_name":"Bash",'
        '"tool_input":{"a":1}}],"modelUsage":{"m":{"inputTokens":3,"costUSD":0.5}},"num_turns":2}',
        '{"type":"result","session_id":"","result":"  x  ","total_cost_usd":1,"cost_usd":2}',
        '{"type":"result","cost_usd":2,"is_error":true,"subtype":"error_max_turns"}',
    ]  # fmt: skip
    typed = [line for line in mutated + hostile if _typed_reading(line)]
    assert len(typed) > 2500  # most keep a shape the typed reading takes
    for line in mutated + hostile:
        _same_event(line)


def test_the_usage_of_a_line_read_alone_is_what_its_event_says():
    lines = [line for path in sorted(FIXTURES.rglob("*.jsonl")) for line in
             path.read_text(encoding="utf-8").splitlines() if line.strip()]  # fmt: skip
    commonest = [json.loads(line) for line in lines if _typed_reading(line)]
    rng = random.Random(13)
    lines += [json.dumps(_keep_types(rng, rng.choice(commonest))) for _ in range(3000)]
    lines += [json.dumps(_mutate_value(rng, rng.choice(commonest))) for _ in range(1000)]
    lines += [
        '{"type":"assistant","message":{"id":"m","usage":{"input_tokens":1}},"type":"user"}',
        '{"type":"assistant","message":{"id":3,"usage":{"input_tokens":1}}}',
        '{"type":"assistant","message":{"id":"m","content":[{"type":"new"}],"usage":{}}}',
        '{"type":"result","total_cost_usd":null,"cost_usd":2,"usage":{"output_tokens":1e400}}',
        '{"type":"result","model_usage_since_last_result":{"m":{"costUSD":1,"inputTokens":2}}}',
        '{"type":"user","message":{"content":"usage"}}', "usage", "{not json}",
        '{"type":"system","subtype":"init","type":"assistant","message":{"id":"m","usage":{}}}',
        '{"type":"user","type":"result","num_turns":2}', '{"type":"system","usage":[1]}',
    ]  # fmt: skip
    read_alone = 0
    for line in lines:
        alone, event = sj.usage_event(line), decode_line(line)
        if isinstance(event, AssistantMessage):
            assert isinstance(alone, AssistantMessage), line
            assert (alone.message_id, alone.model, alone.usage) == (
                event.message_id, event.model, event.usage), line  # fmt: skip
        elif isinstance(event, Result):
            assert isinstance(alone, Result), line
            assert (alone.subtype, alone.turns, alone.cost_usd, alone.usage) == (
                event.subtype, event.turns, event.cost_usd, event.usage), line  # fmt: skip
            assert alone.turn_model_usage == event.turn_model_usage, line
        else:
            assert alone is None, line
        read_alone += _metered_reading(line)
    assert read_alone > 1500  # most without building the line's event


def test_events_are_equal_by_their_typed_fields_and_never_show_their_raw():
    raw = MappingProxyType({"type": "control_cancel_request", "secret": "s3cret"})
    event, bare = sj.ControlCancel(raw=raw, request_id="r"), sj.ControlCancel(request_id="r")
    assert event == bare and hash(event) == hash(bare) and event != sj.ControlCancel()
    assert "s3cret" not in repr(event) and repr(event) == "ControlCancel(request_id='r')"
    assert list(event.__rich_repr__()) == [("request_id", "r")]
    with pytest.raises(AttributeError):
        event.request_id = "other"  # type: ignore[misc]


def test_a_tool_result_nested_near_the_recursion_limit_never_raises():
    # msgspec reads content deeper than the event's JSON text can then be written: the
    # line is then decoded whole, which says what it can (a view shows it as text at worst).
    limit = sys.getrecursionlimit()
    for depth in range(limit - 120, limit + 10):
        content = '{"a":' * depth + "1" + "}" * depth
        line = (
            '{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t",'
            f'"content":{content}}}]}}}}'
        )
        event = decode_line(line)
        assert event is None or isinstance(event, UserMessage)
        assert sj.usage_event(line) is None


def test_lines_of_types_without_usage_are_read_as_such_by_the_meter():
    for line in [
        '{"type":"stream_event","event":{"type":"message_delta","usage":{"output_tokens":3}}}',
        '{"type":"rate_limit_event","rate_limit_info":{"status":"allowed","usage":1}}',
        '{"type":"system","subtype":"init","slash_commands":["usage","cost"]}',
        '{"type":"user","message":{"content":"what is my usage"}}',
    ]:
        assert _metered_reading(line) and sj.usage_event(line) is None


def _metered_reading(line: str) -> bool:
    """Whether a usage meter's reading of the line reads it alone (not whole)."""
    try:
        return isinstance(sj._METERED.decode(line.strip()), msgspec.Struct)
    except Exception:
        return False


def _typed_reading(line: str) -> bool:
    """Whether the typed reading of the commonest lines reads this line."""
    try:
        return isinstance(sj._TYPED.decode(line), sj._WIRE_LINES)
    except Exception:
        return False


def test_a_line_read_for_its_fields_decodes_its_raw_only_when_read():
    line = (FIXTURES / "success_with_tools.jsonl").read_text().splitlines()[4]
    event = decode_line(line)
    assert isinstance(event, AssistantMessage) and event.raw._object is None
    assert event.type == "assistant" and event.raw["type"] == "assistant"
    assert event.raw._object is None  # its type is known without decoding
    assert event.raw["message"]["usage"] == json.loads(line)["message"]["usage"]
    assert isinstance(event.raw._object, MappingProxyType)
    with pytest.raises(TypeError):
        event.raw["type"] = "user"  # type: ignore[index]
