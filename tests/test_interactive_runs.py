"""Interactive runs through the Dispatcher over a FakeRunner: a scripted agent that speaks
Claude Code's streaming-input protocol as measured (replays, can_use_tool, results, turn
state), so the whole path from pod.json to approvals and follow-ups runs without Docker.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from fakes import CLAUDE_INIT as INIT
from fakes import ISSUE_URL as URL
from fakes import FakeRunner, fake_claude, line_agent, write_pod

from cldpd_magic import Dispatcher, EventType, InvalidRequestError


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner(line_agent(fake_claude))


def pod(pods_dir, name: str = "live", **config) -> str:
    write_pod(pods_dir, name, {"interactive": True, **config})
    return name


def outputs(session) -> list[str]:
    return [e.data for e in session.events() if e.type is EventType.OUTPUT]


def wait_for(what, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.01)
    return what()


def test_an_interactive_run_gets_its_prompt_on_stdin_and_ends_after_its_turn(
    pods_dir, transcript_dir, runner
):
    session = Dispatcher(pods_dir, runner, transcript_dir).start_session(pod(pods_dir), URL)
    assert session.wait(timeout=10) == 0
    cmd = runner.runs[0].cmd
    assert "--input-format" in cmd and "Work on this GitHub issue" not in " ".join(cmd)
    (stdin,) = runner.stdins
    first = json.loads(stdin.lines[0])
    assert first["message"]["content"] == f"Work on this GitHub issue: {URL}"
    assert stdin.closed  # the turn was over and nothing queued: its input closed
    assert any(f"done: Work on this GitHub issue: {URL}" in line for line in outputs(session))


def test_an_approval_waits_for_a_decision_then_the_tool_runs(pods_dir, transcript_dir, runner):
    dispatcher = Dispatcher(pods_dir, runner, transcript_dir)
    session = dispatcher.start_session(pod(pods_dir), URL, prompt="please ask first")
    (request,) = wait_for(session.pending)
    assert (request.tool, request.input, request.run) == (
        "Bash", {"command": "touch asked.txt"}, "live")  # fmt: skip
    session.decide(request.request_id, allow=True)
    assert session.wait(timeout=10) == 0
    kinds = [e.type for e in session.events()]
    assert kinds.index(EventType.PERMISSION_REQUEST) < kinds.index(EventType.PERMISSION_DECISION)
    assert any("touched asked.txt" in line for line in outputs(session))
    with pytest.raises(InvalidRequestError, match="no pending approval"):
        session.decide(request.request_id, allow=False)


def test_a_denial_reaches_the_agent_with_its_message(pods_dir, transcript_dir, runner):
    session = Dispatcher(pods_dir, runner, transcript_dir).start_session(
        pod(pods_dir), URL, prompt="ask"
    )
    (request,) = wait_for(session.pending)
    session.decide(request.request_id, allow=False, message="not in this repo")
    assert session.wait(timeout=10) == 0
    assert any("not allowed: not in this repo" in line for line in outputs(session))


def test_the_dispatchers_policy_decides_as_requests_come(pods_dir, transcript_dir, runner):
    asked = []

    def policy(run, tool, tool_input):
        asked.append((run, tool, tool_input["command"]))
        return False, "policy says no"

    dispatcher = Dispatcher(pods_dir, runner, transcript_dir, can_use_tool=policy)
    session = dispatcher.start_session(pod(pods_dir), URL, prompt="ask")
    assert session.wait(timeout=10) == 0
    assert asked == [("live", "Bash", "touch asked.txt")]
    assert any("not allowed: policy says no" in line for line in outputs(session))


def test_a_pod_without_interactive_keeps_the_one_shot_path(pods_dir, transcript_dir, runner):
    write_pod(pods_dir, "plain", {})
    session = Dispatcher(pods_dir, runner, transcript_dir).start_session("plain", URL)
    session.wait(timeout=10)
    assert "--input-format" not in runner.runs[0].cmd
    assert not session.interactive and session.pending() == []
    with pytest.raises(InvalidRequestError, match="not interactive"):
        session.interrupt()


def test_a_follow_up_goes_to_the_live_agent_and_shows_its_turn(pods_dir, transcript_dir, runner):
    dispatcher = Dispatcher(pods_dir, runner, transcript_dir)
    start = dispatcher.start_session(pod(pods_dir, keepAlive=True), URL)
    assert wait_for(lambda: start.conversation.waiting.is_set())  # kept alive, idle
    follow = dispatcher.resume_session("live", "and add tests")
    assert follow.wait(timeout=10) == 0
    followed = outputs(follow)
    assert any("done: and add tests" in line for line in followed)
    assert not any("Work on this GitHub issue" in line for line in followed)  # its turn only
    assert not start.done  # the agent waits for more
    agents = [cmd for _, cmd in runner.execs if "--input-format" in cmd]
    assert len(agents) == 1  # the same process took the follow-up
    assert any("done: and add tests" in line for line in outputs_so_far(start))
    dispatcher.stop("live", timeout=5)
    assert start.wait(timeout=10) is not None


def outputs_so_far(session) -> list[str]:
    """The run's output lines read within a moment (the callers poll it until it holds
    what they wait for; a live run's reader would wait for more)."""
    found: list[str] = []
    done = threading.Event()

    def read():
        for batch in session.event_batches():
            found.extend(e.data for e in batch if e.type is EventType.OUTPUT)
            if len(found) >= 6:
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(0.2)
    return list(found)


def test_interrupt_ends_the_turn_and_the_run_takes_a_follow_up(pods_dir, transcript_dir, runner):
    dispatcher = Dispatcher(pods_dir, runner, transcript_dir)
    start = dispatcher.start_session(pod(pods_dir, keepAlive=True), URL, prompt="slow")
    assert wait_for(lambda: any(INIT in line for line in outputs_so_far(start)))
    start.interrupt()
    assert wait_for(lambda: start.conversation.waiting.is_set())
    follow = dispatcher.resume_session("live", "now the real thing")
    assert follow.wait(timeout=10) == 0
    assert any("done: now the real thing" in line for line in outputs(follow))
    dispatcher.stop("live", timeout=5)


def test_a_driven_run_takes_what_its_driver_writes_and_cldpd_answers_nothing(
    pods_dir, transcript_dir, runner
):
    write_pod(pods_dir, "sdk", {}, template="Be careful.")  # not interactive in pod.json
    session = Dispatcher(pods_dir, runner, transcript_dir).drive_session(
        "sdk", issue_url=URL, run="driven"
    )
    assert session.run == "driven" and session.conversation is None
    assert session.start_prompt == f"Be careful.\n\nWork on this GitHub issue: {URL}"
    session.stdin.write_line(json.dumps({"type": "user", "uuid": "u1", "message": {
        "role": "user", "content": "ask"}}))  # fmt: skip
    assert wait_for(lambda: any('"can_use_tool"' in line for line in outputs_so_far(session)))
    assert session.pending() == []  # the driver answers, not cldpd
    session.stdin.write_line(json.dumps({"type": "control_response", "response": {
        "subtype": "success", "request_id": "q1", "response": {"behavior": "allow"}}}))  # fmt: skip
    assert wait_for(lambda: any("touched" in line for line in outputs_so_far(session)))
    session.stdin.close()
    assert session.wait(timeout=10) == 0
    cmd = runner.runs[0].cmd
    assert "--input-format" in cmd and "--session-id" in cmd


def test_a_driven_run_can_resume_a_claude_session(pods_dir, transcript_dir, runner):
    write_pod(pods_dir, "sdk", {})
    session = Dispatcher(pods_dir, runner, transcript_dir).drive_session(
        "sdk", resume="0b8e2d9c-0000-4000-8000-000000000001"
    )
    assert session.start_prompt == ""
    session.stdin.close()
    session.wait(timeout=10)
    cmd = runner.runs[0].cmd
    assert cmd[cmd.index("--resume") + 1] == "0b8e2d9c-0000-4000-8000-000000000001"
