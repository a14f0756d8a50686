"""Interactive runs in their front ends, with the real Claude Code CLI against the scripted
model: an approval row in a real kernel's blocking cell, answered through its widget's comm
as a frontend does; and one approval queue over a batch whose runs ask at once.

The pods, the kernel and the CLI image are those of tests/test_real_claude.py (its
fixtures are imported here, so their names come back as test arguments).
"""

# ruff: noqa: F811

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from kernel_util import KernelError, KernelSession, parent_id
from test_real_claude import (  # noqa: F401  (fixtures are found by name)
    API_KEY,
    URL,
    _api_key,
    assert_secret_nowhere,
    claude_image,
    dispatcher,
    kernel,
    ks,
    live,
    offline_pod,
    text_of,
)

from cldpd_magic.model_server.server import ScriptedModelServer, ToolCall, Turn

pytestmark = [pytest.mark.docker, pytest.mark.claude]

Message = dict[str, Any]


def shown(ks: KernelSession, since: int) -> str:
    """The last display of the cells since a point, for a failure's message."""
    displays = [m for m in ks.messages[since:] if m["msg_type"].endswith("display_data")]
    return str(displays[-1]["content"]["data"].get("text/plain")) if displays else "nothing"


def wait_for_row(ks: KernelSession, label: str, since: int) -> None:
    """Wait until the kernel opens the label of an approval row."""
    try:
        ks.wait_for(lambda m: widget_state(m).get("value") == label, 180, since=since)
    except KernelError as exc:
        cell = shown(ks, since)
        raise AssertionError(f"no approval row {label!r}; the cell shows:\n{cell}") from exc


def comm_opens(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m["msg_type"] == "comm_open"]


def widget_state(message: Message) -> dict[str, Any]:
    """The widget state a comm message carries ({} for any other message)."""
    if not message["msg_type"].startswith("comm_"):
        return {}
    return (message["content"].get("data") or {}).get("state") or {}


def row_buttons(messages: list[Message], label: str) -> dict[str, str]:
    """The comm ids of the buttons of the approval row whose label is ``label``.

    The row is an HBox (label, Allow, Deny, Always allow <tool>) opened by the kernel.
    """
    opened = comm_opens(messages)
    labels = [m["content"]["comm_id"] for m in opened if widget_state(m).get("value") == label]
    assert labels, f"no approval row {label!r} was opened"
    for message in opened:
        children = widget_state(message).get("children") or []
        if children and children[0] == f"IPY_MODEL_{labels[-1]}":
            states = {m["content"]["comm_id"]: widget_state(m) for m in opened}
            ids = [child.removeprefix("IPY_MODEL_") for child in children[1:]]
            return {states[i]["description"]: i for i in ids}
    raise AssertionError(f"the row of {label!r} was not opened")


def click(session: KernelSession, comm_id: str) -> None:
    """What a frontend sends when a person clicks a button: a custom comm message."""
    content = {"comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}}
    session.kc.shell_channel.send(session.kc.session.msg("comm_msg", content))


def is_idle(msg_id: str):
    def check(message: Message) -> bool:
        state = message["content"].get("execution_state")
        return message["msg_type"] == "status" and state == "idle" and parent_id(message) == msg_id

    return check


def wait_until(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.kernel
def test_a_blocking_cell_shows_the_approval_row_and_its_allow_runs_the_tool(
    ks, offline_pod, tmp_path: Path
):
    proof = tmp_path / "work" / "asked.txt"
    scenario = [Turn(tool_calls=[ToolCall("Bash", {"command": "touch asked.txt"})]),
                Turn(delay=6, text="Touched it.")]  # fmt: skip
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = live(offline_pod, server.url)
        before = len(ks.messages)
        msg_id = ks.submit(f"%cldpd_start {name} {URL}")
        wait_for_row(ks, "Bash: touch asked.txt", before)
        ks.drain(quiet=0.5, timeout=3)
        buttons = row_buttons(ks.messages[before:], "Bash: touch asked.txt")
        assert list(buttons) == ["Allow", "Deny", "Always allow Bash"]
        assert not proof.exists()  # the CLI waits for the answer
        assert not any(is_idle(msg_id)(m) for m in ks.messages[before:])  # the cell blocks

        click(ks, buttons["Allow"])
        assert wait_until(proof.exists, 60), "the tool did not run after Allow"
        ks.drain(quiet=0.2, timeout=1)
        assert not any(is_idle(msg_id)(m) for m in ks.messages[before:]), "the cell had ended"
        messages = ks.wait(msg_id, timeout=120)
        requests = server.conversation_requests()
    (result,) = requests[-1].tool_results()
    assert not result.get("is_error")
    mine = ks.messages[before:]
    row = [m for m in mine if m["msg_type"] == "comm_msg"
           and widget_state(m).get("children") == []]  # fmt: skip
    assert row, "the approval row did not go once answered"
    displays = [m for m in messages if m["msg_type"].endswith("display_data")]
    shown = "\n".join(str(m["content"].get("data", {})) for m in displays)
    assert "✓ allowed Bash (by you)" in shown and "Touched it." in shown
    assert API_KEY not in str(mine)
    assert ks.value("1 + 1") == "2"


@pytest.mark.kernel
def test_a_cell_queued_behind_a_blocking_run_runs_after_it_and_deny_reaches_the_model(
    ks, offline_pod, tmp_path: Path
):
    scenario = [Turn(tool_calls=[ToolCall("Bash", {"command": "touch refused.txt"})]),
                Turn(text="Understood.")]  # fmt: skip
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = live(offline_pod, server.url)
        before = len(ks.messages)
        start = ks.submit(f"%cldpd_start {name} {URL}")
        after = ks.submit("print('the next cell ran')")
        wait_for_row(ks, "Bash: touch refused.txt", before)
        ks.drain(quiet=0.5, timeout=3)
        click(ks, row_buttons(ks.messages[before:], "Bash: touch refused.txt")["Deny"])
        ks.wait(start, timeout=120)
        printed = ks.wait(after, timeout=30)
        (result,) = server.conversation_requests()[-1].tool_results()
    assert not (tmp_path / "work" / "refused.txt").exists()
    assert result.get("is_error") and "The user denied this tool call." in str(result)
    assert any("the next cell ran" in str(m["content"]) for m in printed)
    order = [m for m in ks.messages[before:] if is_idle(start)(m) or is_idle(after)(m)]
    assert [parent_id(m) for m in order] == [start, after]  # in the order they were sent


def test_a_batch_of_four_with_two_asking_at_once_shows_both_in_one_queue(
    dispatcher, offline_pod, tmp_path: Path
):
    from cldpd_magic.picker import BatchPanel

    def asking(file: str) -> list[Turn]:
        return [Turn(tool_calls=[ToolCall("Bash", {"command": f"touch {file}"})]),
                Turn(text=f"Touched {file}.")]  # fmt: skip

    scenarios = [asking("one.txt"), asking("two.txt"), [Turn(text="Nothing to do.")],
                 [Turn(text="Nothing here either.")]]  # fmt: skip
    servers = [ScriptedModelServer(s, api_key=API_KEY).start() for s in scenarios]
    try:
        pods = [live(offline_pod, server.url) for server in servers]
        batch = dispatcher.dispatch(pods, URL, max_parallel=4)
        panel = BatchPanel(batch, interval=0.1, stop_timeout=5)
        try:
            assert wait_until(lambda: len(panel.approvals.rows) == 2, 240), panel.view.text()
            rows = panel.approvals.rows
            run_of = {s.pod_name: s.run for s in batch.runs}
            waiting = [s.run for s in batch.runs if s.pending()]  # both at once
            assert sorted(row.item.run for row in rows) == sorted(waiting)
            assert sorted(waiting) == sorted(run_of[pod] for pod in pods[:2])
            one, two = run_of[pods[0]], run_of[pods[1]]
            assert sorted(row.label.value for row in rows) == sorted(
                [f"{one}: Bash: touch one.txt", f"{two}: Bash: touch two.txt"]
            )
            assert not (tmp_path / "work" / "one.txt").exists()
            for row in rows:
                row.allow_button.click()
            batch.wait(timeout=240)
            assert panel.join(30)
        finally:
            batch.stop()
            panel.close()
    finally:
        for server in servers:
            server.close()
    assert [s.exit_code for s in batch.runs] == [0, 0, 0, 0], [text_of(s) for s in batch.runs]
    assert (tmp_path / "work" / "one.txt").exists() and (tmp_path / "work" / "two.txt").exists()
    assert panel.approvals.rows == []
    for session in batch.runs:
        assert_secret_nowhere(session)


def displays_of(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m["msg_type"].endswith("display_data")]


def display_text(message: Message) -> str:
    return str(message["content"]["data"].get("text/plain", ""))


@pytest.mark.kernel
def test_a_kept_alive_start_returns_when_it_waits_and_resume_is_a_live_follow_up(ks, offline_pod):
    from kernel_util import display_id

    scenario = [Turn(text="First answer."), Turn(text="Second answer.")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = live(offline_pod, server.url, keepAlive=True)
        before = len(ks.messages)
        try:
            started = ks.execute(f"%cldpd_start {name} {URL}", timeout=180)  # returns: it waits
            start_display = display_id(displays_of(started)[0])
            assert "First answer." in display_text(displays_of(started)[-1])
            resumed = ks.execute(f"%cldpd_resume {name} And the second question?", timeout=120)
            turn = display_text(displays_of(resumed)[-1])
            assert turn.startswith(f"{name} resume: exited 0"), turn
            assert "Second answer." in turn and "First answer." not in turn

            def start_cell_shows_it(m: Message) -> bool:
                return display_id(m) == start_display and "Second answer." in display_text(m)

            ks.wait_for(start_cell_shows_it, 30, since=before)  # the start cell goes on
            requests = server.conversation_requests()
        finally:
            ks.execute(f"%cldpd_stop {name}", timeout=60, check=False)
    contents = str(requests[-1].messages)
    assert "Work on this GitHub issue" in contents and "And the second question?" in contents
    assert len(requests) == 2  # one process: no second --resume read the session anew


@pytest.mark.kernel
def test_interrupt_ends_a_slow_turn_in_the_kernel_and_a_follow_up_works(ks, offline_pod):
    scenario = [Turn(delay=300, text="too late"), Turn(text="After the interrupt.")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = live(offline_pod, server.url, keepAlive=True)
        try:
            ks.execute(f"s = %cldpd_start -b {name} {URL}", timeout=60)
            server.wait_for_turn(0, timeout=180)
            said = ks.execute(f"%cldpd_interrupt {name}", timeout=60)
            assert f"Run {name} interrupted" in str(said)
            ks.execute("assert s.conversation.waiting.wait(60)", timeout=90)
            resumed = ks.execute(f"%cldpd_resume {name} Go on, quickly.", timeout=120)
            assert "After the interrupt." in display_text(displays_of(resumed)[-1])
            assert ks.value("s.done") == "False"  # the run stayed
        finally:
            ks.execute(f"%cldpd_stop {name}", timeout=60, check=False)


@pytest.mark.kernel
def test_interrupting_the_kernel_while_a_blocking_cell_takes_clicks_stops_the_pod(
    ks, offline_pod, docker_client
):
    from test_real_claude import container_gone

    with ScriptedModelServer([Turn(delay=300, text="too late")], api_key=API_KEY) as server:
        name = live(offline_pod, server.url)
        msg_id = ks.submit(f"%cldpd_start {name} {URL}")
        server.wait_for_turn(0, timeout=180)
        time.sleep(0.5)  # the cell's wait loop polls the widgets' messages meanwhile
        ks.interrupt()
        ks.wait(msg_id, timeout=90, check=False)
    reply = ks.replies[msg_id]["content"]
    assert reply["status"] == "error" and "nterrupted" in reply["evalue"], reply
    assert container_gone(docker_client, name)
    assert ks.value("1 + 1") == "2"  # the kernel took the interrupt and goes on
