"""The scripted Messages API, driven by a plain HTTP client."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest

from cldpd_magic.model_server.server import (
    DONE_REPLY,
    SIDE_REPLY,
    Scenario,
    ScriptedModelServer,
    ToolCall,
    Turn,
    main,
)

TOOLS = [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}]


def post(
    server: ScriptedModelServer,
    body: dict[str, Any] | None = None,
    path: str = "/v1/messages",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """POST JSON; returns status, headers (lower-cased) and the raw body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        payload = json.dumps(body if body is not None else {}).encode()
        conn.request(
            "POST",
            path,
            payload,
            {"content-type": "application/json", "x-api-key": "sk-test", **(headers or {})},
        )
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def conversation(stream: bool = True, **extra: Any) -> dict[str, Any]:
    """A request body as the agent loop sends it (with tools)."""
    return {
        "model": "claude-test-1",
        "max_tokens": 1000,
        "stream": stream,
        "tools": TOOLS,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Split an SSE body into (event, data) pairs, checking the framing strictly."""
    text = raw.decode()
    assert text.endswith("\n\n")
    events = []
    for frame in text[:-2].split("\n\n"):
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ")
        assert data_line.startswith("data: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == event_line.removeprefix("event: ")
        events.append((data["type"], data))
    return events


def test_streams_text_thinking_and_tool_use_as_the_api_frames_them() -> None:
    turn = Turn(
        thinking="Let me plan this carefully, step by step.",
        text="I will write the file now, then check it.",
        tool_calls=[ToolCall("Write", {"file_path": "a.txt", "content": "x" * 60}, id="toolu_1")],
        usage={"input_tokens": 900, "output_tokens": 77, "cache_read_input_tokens": 5},
    )
    with ScriptedModelServer([turn]) as server:
        status, headers, raw = post(server, conversation())
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    events = parse_sse(raw)
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["message_start", "ping"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["model"] == "claude-test-1"
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 900
    assert start["usage"]["cache_read_input_tokens"] == 5
    blocks: dict[int, dict[str, Any]] = {}
    for kind, data in events:
        if kind == "content_block_start":
            blocks[data["index"]] = {"start": data["content_block"], "deltas": []}
        elif kind == "content_block_delta":
            blocks[data["index"]]["deltas"].append(data["delta"])
        elif kind == "content_block_stop":
            blocks[data["index"]]["stopped"] = True
    assert [b["start"]["type"] for b in blocks.values()] == ["thinking", "text", "tool_use"]
    assert all(b.get("stopped") for b in blocks.values())
    thinking = blocks[0]["deltas"]
    assert "".join(d["thinking"] for d in thinking if d["type"] == "thinking_delta") == (
        turn.thinking
    )
    assert thinking[-1]["type"] == "signature_delta" and thinking[-1]["signature"]
    text_deltas = blocks[1]["deltas"]
    assert len(text_deltas) > 1  # streamed in pieces
    assert "".join(d["text"] for d in text_deltas) == turn.text
    tool = blocks[2]
    assert tool["start"] == {"type": "tool_use", "id": "toolu_1", "name": "Write", "input": {}}
    assert {d["type"] for d in tool["deltas"]} == {"input_json_delta"}
    assert (
        json.loads("".join(d["partial_json"] for d in tool["deltas"])) == turn.tool_calls[0].input
    )
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"] == {"output_tokens": 77}


def test_non_streaming_answers_the_whole_message() -> None:
    with ScriptedModelServer(Scenario([Turn(text="hello")], model="claude-x")) as server:
        status, _, raw = post(server, conversation(stream=False))
    message = json.loads(raw)
    assert status == 200
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == "claude-x"
    assert message["content"] == [{"type": "text", "text": "hello"}]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"]["output_tokens"] > 0


@pytest.mark.parametrize(
    ("turn", "status", "error_type", "message"),
    [
        (Turn(error=401), 401, "authentication_error", "invalid x-api-key"),
        (Turn(error=429, retry_after=0), 429, "rate_limit_error", ""),
        (Turn(error=529), 529, "overloaded_error", "Overloaded"),
        (Turn(error=500, message="boom"), 500, "api_error", "boom"),
    ],
)
def test_errors_carry_the_apis_json_body(
    turn: Turn, status: int, error_type: str, message: str
) -> None:
    with ScriptedModelServer([turn]) as server:
        got, headers, raw = post(server, conversation())
    assert got == status
    body = json.loads(raw)
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert body["error"]["message"].startswith(message)
    assert headers["request-id"].startswith("req_")
    if turn.retry_after is not None:
        assert headers["retry-after"] == "0"


def test_a_stream_error_comes_as_an_sse_error_event_after_the_first_delta() -> None:
    with ScriptedModelServer([Turn(text="partial answer", stream_error=529)]) as server:
        status, _, raw = post(server, conversation())
        plain_status, _, plain = post(server, conversation(stream=False))
    events = parse_sse(raw)
    assert status == 200
    assert [kind for kind, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "error",
    ]  # fmt: skip
    assert events[-1][1]["error"]["type"] == "overloaded_error"
    assert plain_status == 200  # the next turn: the scenario has ended
    assert json.loads(plain)["content"][0]["text"] == DONE_REPLY


def test_a_dropped_connection_gets_no_answer_and_the_next_turn_does() -> None:
    with ScriptedModelServer([Turn(drop=True), Turn(text="after")]) as server:
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            post(server, conversation(stream=False))
        _, _, raw = post(server, conversation(stream=False))
    assert json.loads(raw)["content"][0]["text"] == "after"


def test_side_requests_take_no_turn_and_past_the_end_is_done() -> None:
    scenario = [Turn(text="first", repeat=2), Turn(text="third")]
    with ScriptedModelServer(scenario) as server:
        texts = []
        for body in [
            conversation(stream=False),
            {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "title?"}]},
            conversation(stream=False),
            conversation(stream=False),
            conversation(stream=False),
        ]:
            _, _, raw = post(server, body)
            texts.append(json.loads(raw)["content"][0]["text"])
        recorded = server.requests
    assert texts == ["first", SIDE_REPLY, "first", "third", DONE_REPLY]
    assert [r.turn for r in recorded] == [0, -1, 1, 2, 3]
    assert [r.conversation for r in recorded] == [True, False, True, True, True]


def test_records_method_path_headers_and_body() -> None:
    with ScriptedModelServer() as server:
        post(server, conversation(stream=False), path="/v1/messages?beta=true",
             headers={"anthropic-beta": "x"})  # fmt: skip
        status, _, raw = post(server, {"messages": []}, path="/v1/messages/count_tokens")
        assert status == 200 and json.loads(raw)["input_tokens"] > 0
        status, _, raw = post(server, {}, path="/api/unknown")
        assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
        requests = server.requests
        first = server.conversation_requests()
    assert [r.path for r in requests] == [
        "/v1/messages?beta=true",
        "/v1/messages/count_tokens",
        "/api/unknown",
    ]
    assert len(first) == 1
    assert first[0].method == "POST"
    assert first[0].headers["x-api-key"] == "sk-test"
    assert first[0].headers["anthropic-beta"] == "x"
    assert first[0].body["model"] == "claude-test-1"
    assert first[0].messages == [{"role": "user", "content": "hi"}]


def test_tool_results_are_read_from_the_request() -> None:
    body = conversation(stream=False)
    body["messages"] = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "hi"}]},
    ]  # fmt: skip
    with ScriptedModelServer() as server:
        post(server, body)
        (request,) = server.conversation_requests()
    assert request.tool_results() == [{"type": "tool_result", "tool_use_id": "t1", "content": "hi"}]


def test_a_wrong_key_is_refused_without_taking_a_turn() -> None:
    with ScriptedModelServer([Turn(text="for the right key")], api_key="sk-right") as server:
        status, _, raw = post(server, conversation(stream=False))
        assert status == 401
        assert json.loads(raw)["error"]["type"] == "authentication_error"
        status, _, raw = post(server, conversation(stream=False), headers={"x-api-key": "sk-right"})
    assert status == 200
    assert json.loads(raw)["content"][0]["text"] == "for the right key"


def test_a_delayed_turn_is_recorded_before_it_answers_and_close_ends_it() -> None:
    server = ScriptedModelServer([Turn(delay=600, text="never")]).start()
    outcome: list[object] = []

    def client() -> None:
        try:
            outcome.append(post(server, conversation()))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    request = server.wait_for_turn(0, timeout=30)
    assert request.turn == 0
    assert outcome == []
    server.close()
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(outcome[0], Exception)


def test_wait_for_times_out_with_a_sentence() -> None:
    with (
        ScriptedModelServer() as server,
        pytest.raises(TimeoutError, match="did not see that"),
    ):
        server.wait_for_turn(0, timeout=0.2)


def test_scenario_from_json_file_and_text(tmp_path) -> None:
    data = {
        "model": "claude-y",
        "turns": [
            {"text": "a", "tool_calls": [{"name": "Bash", "input": {"command": "ls"}}]},
            {"error": 529, "repeat": 2},
        ],
    }
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    for source in (path, str(path), json.dumps(data)):
        scenario = Scenario.from_json(source)
        assert scenario.model == "claude-y"
        assert scenario.turns[0].tool_calls == [ToolCall("Bash", {"command": "ls"})]
        assert [t.error for t in scenario.expand()] == [None, 529, 529]
    with pytest.raises(ValueError, match="unknown turn keys"):
        Scenario.from_dict([{"txt": "typo"}])


def test_serve_refuses_a_missing_scenario_in_one_sentence(tmp_path, capsys) -> None:
    assert main(["serve", "--scenario", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot load the scenario" in err and "Traceback" not in err


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_serve_command_line_serves_until_interrupted(tmp_path, stop_signal) -> None:
    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps([{"text": "from the file"}]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cldpd_magic.model_server",
            "serve",
            "--scenario",
            str(scenario),
            "--api-key",
            "sk-cli",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "ANTHROPIC_BASE_URL=http://127.0.0.1:" in line
        port = int(line.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = json.dumps(conversation(stream=False))
        conn.request("POST", "/v1/messages", body)
        assert conn.getresponse().status == 401
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/messages", body, {"x-api-key": "sk-cli"})
        assert json.loads(conn.getresponse().read())["content"][0]["text"] == "from the file"
        conn.close()
    finally:
        proc.send_signal(stop_signal)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "POST /v1/messages" in err and "Traceback" not in err
