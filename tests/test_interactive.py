"""A conversation with an interactive agent, without an engine: the agent's side is its real
output (Claude Code 2.1.332's frames, as measured) written by the test, and its stdin a list.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from cldpd_magic.errors import InvalidRequestError
from cldpd_magic.events import EventType
from cldpd_magic.runs import Conversation, PermissionRequest, deny_unattended


class Pipe:
    """What the agent would read: every line written, and whether its input was closed."""

    def __init__(self) -> None:
        self.lines: list[dict] = []
        self.closed = False

    def write_line(self, text: str) -> None:
        assert not self.closed, "written after close"
        self.lines.append(json.loads(text))

    def close(self) -> None:
        self.closed = True


def ask(request_id: str = "req-1", tool: str = "Bash", command: str = "touch x") -> str:
    return json.dumps(
        {
            "type": "control_request",
            "request_id": request_id,
            "request": {
                "subtype": "can_use_tool",
                "tool_name": tool,
                "input": {"command": command},
                "permission_suggestions": [
                    {"type": "addRules", "rules": [{"toolName": tool, "ruleContent": command}],
                     "behavior": "allow", "destination": "localSettings"}
                ],
                "tool_use_id": "toolu_1",
            },
        }
    )  # fmt: skip


def answer(request_id: str, ok: bool = True, **response) -> str:
    if ok:
        body = {"subtype": "success", "request_id": request_id, "response": response}
    else:
        body = {"subtype": "error", "request_id": request_id, "error": "Cannot set it"}
    return json.dumps({"type": "control_response", "response": body})


RESULT = json.dumps({"type": "result", "subtype": "success", "is_error": False, "num_turns": 1,
                     "result": "done", "total_cost_usd": 0.001})  # fmt: skip
IDLE = json.dumps({"type": "system", "subtype": "session_state_changed", "state": "idle"})
RUNNING = json.dumps({"type": "system", "subtype": "session_state_changed", "state": "running"})
INIT = json.dumps({"type": "system", "subtype": "init", "session_id": "s", "model": "m"})


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[EventType, dict]] = []

    def __call__(self, etype: EventType, data: str) -> None:
        self.events.append((etype, json.loads(data)))

    def decisions(self) -> list[dict]:
        return [d for t, d in self.events if t is EventType.PERMISSION_DECISION]


def conversation(**kwargs) -> tuple[Conversation, Pipe, Recorder]:
    pipe, events = Pipe(), Recorder()
    conv = Conversation("run-1", pipe, **kwargs)
    conv.attach(events)
    return conv, pipe, events


def wait_until(what, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not what() and time.monotonic() < deadline:
        time.sleep(0.01)
    return what()


def test_a_question_is_pending_until_it_is_allowed():
    conv, pipe, events = conversation()
    conv.observe([ask()])
    (request,) = conv.pending()
    assert isinstance(request, PermissionRequest)
    assert (request.request_id, request.tool, request.input, request.run) == (
        "req-1", "Bash", {"command": "touch x"}, "run-1")  # fmt: skip
    assert request.suggestions[0]["destination"] == "localSettings"
    assert events.events[0][0] is EventType.PERMISSION_REQUEST
    assert events.events[0][1]["input"] == {"command": "touch x"}
    conv.decide("req-1", allow=True)
    assert conv.pending() == []
    reply = {"subtype": "success", "request_id": "req-1", "response": {"behavior": "allow"}}
    assert pipe.lines == [{"type": "control_response", "response": reply}]
    assert events.decisions() == [{"request_id": "req-1", "tool": "Bash", "allow": True,
                                   "message": "", "always": False, "by": "user"}]  # fmt: skip


def test_a_denial_tells_the_agent_why():
    conv, pipe, events = conversation()
    conv.observe([ask()])
    conv.decide("req-1", allow=False, message="Not in this repository.")
    response = pipe.lines[0]["response"]["response"]
    assert response == {"behavior": "deny", "message": "Not in this repository."}
    conv.observe([ask("req-2")])
    conv.decide("req-2", allow=False)
    assert pipe.lines[1]["response"]["response"]["message"] == "The user denied this tool call."
    assert [d["allow"] for d in events.decisions()] == [False, False]


def test_always_allows_the_tool_for_this_run_only_and_asks_no_more():
    conv, pipe, events = conversation()
    conv.observe([ask()])
    conv.decide("req-1", allow=True, always=True)
    update = pipe.lines[0]["response"]["response"]["updatedPermissions"]
    assert update == [{"type": "addRules", "rules": [{"toolName": "Bash"}], "behavior": "allow",
                       "destination": "session"}]  # fmt: skip
    conv.observe([ask("req-2", command="touch y")])  # the CLI asked again all the same
    assert conv.pending() == []
    assert pipe.lines[1]["response"]["request_id"] == "req-2"
    assert pipe.lines[1]["response"]["response"]["behavior"] == "allow"
    assert events.decisions()[1]["by"] == "always"
    conv.observe([ask("req-3", tool="Write")])  # another tool is still asked
    assert [r.tool for r in conv.pending()] == ["Write"]


def test_an_unanswered_question_is_denied_when_its_time_is_up():
    conv, pipe, events = conversation(approval_timeout=0.2)
    conv.observe([ask()])
    assert wait_until(lambda: conv.pending() == [])
    (decision,) = events.decisions()
    assert decision["by"] == "timeout" and decision["allow"] is False
    assert "no answer within 0.2 s" in pipe.lines[0]["response"]["response"]["message"]
    with pytest.raises(InvalidRequestError, match="no pending approval"):
        conv.decide("req-1", allow=True)


@pytest.mark.parametrize(
    ("answer_", "allow", "message"),
    [(True, True, ""), ((False, "no network tools"), False, "no network tools"),
     ("maybe", False, "the approval policy gave no yes or no")],
)  # fmt: skip
def test_a_policy_decides_as_questions_come(answer_, allow, message):
    seen = []

    def policy(run, tool, tool_input):
        seen.append((run, tool, dict(tool_input)))
        return answer_

    conv, pipe, events = conversation(policy=policy)
    conv.observe([ask()])
    assert wait_until(lambda: pipe.lines)
    assert seen == [("run-1", "Bash", {"command": "touch x"})]
    (decision,) = events.decisions()
    assert (decision["allow"], decision["message"], decision["by"]) == (allow, message, "policy")


def test_a_policy_that_fails_denies_and_says_so():
    def policy(run, tool, tool_input):
        raise RuntimeError("boom")

    conv, pipe, events = conversation(policy=policy)
    conv.observe([ask()])
    assert wait_until(lambda: pipe.lines)
    assert "the approval policy failed (RuntimeError)" in events.decisions()[0]["message"]


def test_nobody_there_denies_with_a_sentence():
    allow, message = deny_unattended("r", "Bash", {})
    assert allow is False and "settings.json" in message and "\n" not in message


def test_a_withdrawn_question_is_no_longer_pending():
    conv, pipe, events = conversation()
    conv.observe([ask(), json.dumps({"type": "control_cancel_request", "request_id": "req-1"})])
    assert conv.pending() == [] and pipe.lines == []
    assert events.decisions()[0]["by"] == "cancelled"


def test_control_requests_wait_for_their_answer():
    conv, pipe, _ = conversation()
    result = {}

    def interrupt():
        try:
            conv.interrupt()
            result["ok"] = True
        except InvalidRequestError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=interrupt)
    thread.start()
    assert wait_until(lambda: pipe.lines)
    request = pipe.lines[0]
    assert request["type"] == "control_request" and request["request"] == {"subtype": "interrupt"}
    conv.observe([answer("someone-else"), answer(request["request_id"], still_queued=[])])
    thread.join(5)
    assert result == {"ok": True}


def test_a_refused_control_request_is_one_sentence():
    conv, pipe, _ = conversation()
    threading.Timer(
        0.2, lambda: conv.observe([answer(pipe.lines[0]["request_id"], ok=False)])
    ).start()
    with pytest.raises(InvalidRequestError, match="refused set_model: Cannot set it") as info:
        conv.set_model("sonnet")
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidRequestError, match="no permission mode"):
        conv.set_permission_mode("yolo")
    assert len(pipe.lines) == 1  # the bad mode never reached the agent


def test_a_turn_over_with_nothing_queued_ends_the_agents_input():
    conv, pipe, _ = conversation()
    conv.send_user("Fix it.")
    conv.observe([INIT, RUNNING, RESULT, IDLE])
    assert pipe.closed
    sent = pipe.lines[0]
    assert sent.pop("uuid")
    assert sent == {"type": "user", "message": {"role": "user", "content": "Fix it."},
                    "parent_tool_use_id": None, "session_id": "default"}  # fmt: skip
    with pytest.raises(InvalidRequestError, match="has ended"):
        conv.send_user("more")  # closed input: the run is over for messages


def test_without_state_events_a_result_ends_the_input_unless_a_turn_starts(monkeypatch):
    from cldpd_magic.runs import interactive

    monkeypatch.setattr(interactive, "RESULT_GRACE", 0.2)
    conv, pipe, _ = conversation()
    conv.observe([INIT, RESULT, INIT])  # a queued message started its turn at once
    time.sleep(0.5)
    assert not pipe.closed
    conv.observe([RESULT])
    assert wait_until(lambda: pipe.closed)


def test_a_kept_alive_agent_waits_for_follow_ups_until_its_idle_timeout():
    conv, pipe, _ = conversation(keep_alive=True)
    conv.observe([RESULT, IDLE])
    time.sleep(0.3)
    assert not pipe.closed
    conv, pipe, _ = conversation(keep_alive=True, idle_timeout=0.2)
    conv.observe([RESULT, IDLE])
    assert wait_until(lambda: pipe.closed)
    conv, pipe, _ = conversation(keep_alive=True, idle_timeout=0.3)
    conv.observe([RESULT, IDLE])
    time.sleep(0.1)
    conv.send_user("and one more thing")  # a follow-up in time keeps it
    time.sleep(0.4)
    assert not pipe.closed


def test_hostile_output_never_breaks_the_conversation():
    conv, pipe, _ = conversation()
    conv.observe(["not json", "{", json.dumps({"type": "control_request"}),
                  json.dumps({"type": "control_request", "request_id": 5, "request": {
                      "subtype": "can_use_tool", "tool_name": ["x"], "input": "rm -rf /"}}),
                  json.dumps({"type": "control_response", "response": "x"}),
                  "[" * 100000 + "]" * 100000])  # fmt: skip
    assert all(r.tool for r in conv.pending())
    assert pipe.lines == []


def test_finishing_withdraws_pending_questions_and_ends_waits():
    conv, _, events = conversation()
    conv.observe([ask()])
    conv.finish()
    assert conv.pending() == [] and events.decisions()[0]["by"] == "cancelled"
    with pytest.raises(InvalidRequestError, match="has ended"):
        conv.interrupt()


def test_a_request_cldpd_cannot_answer_gets_an_error_so_the_agent_never_waits():
    conv, pipe, events = conversation()
    request = {"subtype": "hook_callback", "callback_id": "hook_0", "input": {}}
    hook = {"type": "control_request", "request_id": "h1", "request": request}
    conv.observe([json.dumps(hook)])
    (reply,) = pipe.lines
    assert reply["response"]["subtype"] == "error" and reply["response"]["request_id"] == "h1"
    assert "hook_callback" in reply["response"]["error"]
    assert conv.pending() == [] and events.events == []
