"""The real Claude Code CLI in a pod, on the real engine, against the scripted model.

The pod is the ``claude-offline`` template built on ``cldpd-claude-code:<version>``
(made offline by scripts/setup); the model is :class:`ScriptedModelServer` on the host's
127.0.0.1, reached through ``"network": "host"``. No stand-in agent anywhere.

``CLDPD_CAPTURE_FIXTURES=1`` also writes the stream-json lines of these runs, masked, to
``tests/fixtures/claude/`` (``tests/fixtures/claude/capture.py`` does that).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cldpd_magic import Dispatcher
from cldpd_magic.events import EventType
from cldpd_magic.model_server.server import Scenario, ScriptedModelServer, ToolCall, Turn
from cldpd_magic.runs.session import Session, read_transcript
from cldpd_magic.secrets import MASK

pytestmark = [pytest.mark.docker, pytest.mark.claude]

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "cldpd_magic" / "templates" / "claude-offline"


def pinned_version(path: Path, pattern: str) -> str:
    found = re.search(pattern, path.read_text(encoding="utf-8"), re.MULTILINE)
    assert found, f"no pinned Claude Code version in {path.relative_to(REPO)}"
    return found.group(1)


#: The CLI version scripts/setup installs; the template pins the same (checked below).
CLAUDE_CODE_VERSION = pinned_version(REPO / "scripts" / "setup", r"^claude_code_version=(\S+)$")
CLAUDE_IMAGE = f"cldpd-claude-code:{CLAUDE_CODE_VERSION}"
URL = "https://github.com/octocat/Hello-World/issues/7"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "claude"
API_KEY = f"sk-ant-scripted-{uuid.uuid4().hex}"
SLOW = 300.0  # seconds: a turn that never ends by itself in these tests
NOTES = "/home/agent/work/notes.md"
PROOF_COMMAND = (
    "echo made-in-pod > proof.txt && cat proof.txt && id -un && echo key-is-$ANTHROPIC_API_KEY"
)


@pytest.fixture(scope="module")
def claude_image() -> Iterator[str]:
    """The image tag all pods of this module share; fails in CI when the CLI image is missing."""
    import docker

    template_pin = pinned_version(TEMPLATE / "Dockerfile", r"^ARG CLAUDE_CODE_VERSION=(\S+)$")
    assert template_pin == CLAUDE_CODE_VERSION, "scripts/setup and the template pin other CLIs"

    try:
        client = docker.from_env()
        client.ping()
        client.images.get(CLAUDE_IMAGE)
    except Exception as exc:
        message = f"no Docker engine with {CLAUDE_IMAGE} ({type(exc).__name__}); run scripts/setup"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    tag = f"cldpd-test-claude-offline-{uuid.uuid4().hex[:8]}"
    yield tag
    with contextlib.suppress(docker.errors.APIError):
        client.images.remove(tag, noprune=True)
    client.close()


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)


OfflinePod = Callable[..., str]


@pytest.fixture
def offline_pod(
    claude_image: str, pods_dir: Path, tmp_path: Path, docker_client
) -> Iterator[OfflinePod]:
    """Copy the claude-offline template into pods_dir, pointed at a model server.

    ``offline_pod(url, args=None, keep_alive=False, env=None, extra=None)`` returns the pod
    name (``extra``: more pod.json keys);
    its workdir is the bind-mounted ``tmp_path / "work"``. After the test, a container
    left behind fails the test (and is removed).
    """
    made: list[str] = []

    def make(
        url: str,
        args: list[str] | None = None,
        keep_alive: bool = False,
        env: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        name = f"claude{uuid.uuid4().hex[:8]}"
        pod = pods_dir / name
        shutil.copytree(TEMPLATE, pod)
        config = json.loads((pod / "pod.json").read_text())
        config["image"] = claude_image
        config["buildArgs"] = {"BASE_IMAGE": CLAUDE_IMAGE}
        config["env"].update({"ANTHROPIC_BASE_URL": url, "CLAUDE_CODE_MAX_RETRIES": "1"})
        config["env"].update(env or {})
        work = tmp_path / "work"
        work.mkdir(exist_ok=True)
        work.chmod(0o777)  # the agent is uid 1000
        config["mounts"] = [{"source": str(work), "target": config["workdir"]}]
        if args is not None:
            config["args"] = args
        config["keepAlive"] = keep_alive
        config["interactive"] = False  # the one-shot path; interactive tests ask for theirs
        config.update(extra or {})
        (pod / "pod.json").write_text(json.dumps(config, indent=2))
        made.append(name)
        return name

    yield make

    leaked = []
    for name in made:
        for container in docker_client.containers.list(
            all=True, filters={"name": f"^cldpd-{name}$"}
        ):
            leaked.append(f"{container.name} ({container.status})")
            container.remove(force=True)
    if leaked:
        pytest.fail(f"test left containers behind: {', '.join(leaked)}")


@pytest.fixture
def dispatcher(pods_dir: Path, transcript_dir: Path) -> Dispatcher:
    return Dispatcher(pods_dir, transcript_dir=transcript_dir)


def stream(session: Session) -> list[dict[str, Any]]:
    """The stream-json events among a finished session's output lines."""
    found = []
    for event in session.events():
        if event.type is EventType.OUTPUT and event.data.startswith("{"):
            with contextlib.suppress(ValueError):
                found.append(json.loads(event.data))
    return found


def result_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    results = [e for e in events if e.get("type") == "result"]
    assert len(results) == 1, [e.get("type") for e in events]
    return results[0]


def run(dispatcher: Dispatcher, name: str, timeout: float = 120) -> tuple[Session, list[dict]]:
    session = dispatcher.start_session(name, URL)
    session.wait(timeout)
    return session, stream(session)


def assert_secret_nowhere(session: Session) -> None:
    """The forwarded key is in no event and no transcript line."""
    for event in session.events():
        assert API_KEY not in event.data
    assert API_KEY not in session.transcript.read_text(encoding="utf-8")
    assert all(API_KEY not in e.data for e in read_transcript(session.transcript))


def refused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_gone(docker_client, name: str, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not docker_client.containers.list(all=True, filters={"name": f"^cldpd-{name}$"}):
            return True
        time.sleep(0.2)
    return False


# --- Fixtures for the renderer ----------------------------------------------------
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ID = re.compile(r"\b(msg|toolu|req|sig)_01[0-9a-f]{22}\b")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
_PORT = re.compile(r"127\.0\.0\.1:\d+")
_SOCK = re.compile(r"/tmp/cc-socks/\d+\.sock")


def mask_fixture(lines: list[str]) -> list[str]:
    """Make captured lines stable and shareable: ids numbered, times, ports and pids fixed."""
    seen: dict[str, str] = {}

    def number(kind: str, value: str) -> str:
        if value not in seen:
            n = sum(1 for v in seen.values() if v.startswith(kind)) + 1
            seen[value] = (
                f"{kind}{n:012d}" if kind == "00000000-0000-4000-8000-" else f"{kind}_01{n:022d}"
            )
        return seen[value]

    out = []
    for line in lines:
        line = line.replace(API_KEY, "***")
        line = _UUID.sub(lambda m: number("00000000-0000-4000-8000-", m.group()), line)
        line = _ID.sub(lambda m: number(m.group(1), m.group()), line)
        line = _TIME.sub("2026-01-01T00:00:00.000Z", line)
        line = _PORT.sub("127.0.0.1:8123", line)
        line = _SOCK.sub("/tmp/cc-socks/1000.sock", line)
        out.append(line)
    return out


def capture(name: str, session: Session) -> None:
    """Write a session's stream-json lines to tests/fixtures/claude/NAME.jsonl when asked."""
    if not os.environ.get("CLDPD_CAPTURE_FIXTURES"):
        return
    lines = [
        e.data for e in session.events() if e.type is EventType.OUTPUT and e.data.startswith("{")
    ]
    FIXTURES.mkdir(parents=True, exist_ok=True)
    (FIXTURES / f"{name}.jsonl").write_text("\n".join(mask_fixture(lines)) + "\n")


# --- Through the Dispatcher ------------------------------------------------------
def test_bash_write_and_edit_run_inside_the_container(dispatcher, offline_pod, tmp_path):
    scenario = [
        Turn(
            thinking="The issue wants a proof file. I will write it with Bash.",
            text="Writing the proof file.",
            tool_calls=[ToolCall("Bash", {"command": PROOF_COMMAND})],
            usage={"input_tokens": 1500, "output_tokens": 60, "cache_read_input_tokens": 300},
        ),
        Turn(tool_calls=[ToolCall("Write", {"file_path": NOTES, "content": "status: draft\n"})]),
        Turn(
            tool_calls=[
                ToolCall("Edit", {"file_path": NOTES, "old_string": "draft", "new_string": "done"})
            ]
        ),
        Turn(text="Wrote **proof.txt** in the workdir."),
    ]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = offline_pod(server.url, args=[
            "--permission-mode", "acceptEdits", "--allowedTools=Bash",
            "--model", "claude-scripted-1", "--max-turns", "5",
        ])  # fmt: skip
        session, events = run(dispatcher, name)
        requests = server.conversation_requests()
    capture("success_with_tools", session)
    assert session.exit_code == 0, events
    assert (tmp_path / "work" / "proof.txt").read_text() == "made-in-pod\n"
    assert (tmp_path / "work" / "notes.md").read_text() == "status: done\n"
    assert len(requests) == 4
    assert not [r for r in requests[3].tool_results() if r.get("is_error")]
    tool_result = requests[1].tool_results()[0]
    assert "made-in-pod" in str(tool_result["content"])
    assert "agent" in str(tool_result["content"])  # the non-root user
    assert f"key-is-{API_KEY}" in str(tool_result["content"])  # the agent printed the key,
    assert any(f"key-is-{MASK}" in e.data for e in session.events())  # cldpd masked it
    assert all(r.headers["x-api-key"] == API_KEY for r in requests)
    assert {r.body["model"] for r in requests} == {"claude-scripted-1"}
    init = events[0]
    assert (init["type"], init["subtype"]) == ("system", "init")
    assert init["permissionMode"] == "acceptEdits"
    assert init["claude_code_version"] == CLAUDE_CODE_VERSION
    assert [e["type"] for e in events].count("assistant") >= 3  # thinking, text, tool_use
    result = result_of(events)
    assert (result["subtype"], result["is_error"]) == ("success", False)
    assert result["result"] == "Wrote **proof.txt** in the workdir."
    assert result["usage"]["input_tokens"] > 1500 and result["total_cost_usd"] > 0
    assert_secret_nowhere(session)


def test_the_template_as_shipped_plays_its_sample_scenario(dispatcher, offline_pod, tmp_path):
    scenario = Scenario.from_json(TEMPLATE / "scenario.json")
    shipped = json.loads((TEMPLATE / "pod.json").read_text())
    assert shipped["interactive"] is True  # a Claude Code template: interactive
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        _, events = run(dispatcher, offline_pod(server.url, extra={"interactive": True}))
        assert len(server.conversation_requests()) == len(scenario.turns)
    assert (
        tmp_path / "work" / "STATUS.md"
    ).read_text() == "# Status\n\nChecked by the agent: done\n"
    result = result_of(events)
    assert (result["is_error"], result["num_turns"]) == (False, len(scenario.turns))
    assert result["result"].startswith("Done: I wrote **STATUS.md**")


def test_tool_error_and_permission_denied_are_in_the_stream(dispatcher, offline_pod, tmp_path):
    scenario = [
        Turn(tool_calls=[ToolCall("Read", {"file_path": "/home/agent/work/missing.txt"})]),
        Turn(text="There is no such file."),
        Turn(tool_calls=[ToolCall("Bash", {"command": "touch refused.txt"})]),
        Turn(text="The command was refused."),
    ]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        read = offline_pod(server.url)
        session, events = run(dispatcher, read)
        capture("tool_error", session)
        denied = offline_pod(server.url, args=["--permission-mode", "default", "--max-turns", "5"])
        refused, refused_events = run(dispatcher, denied)
        capture("permission_denied", refused)
    errors = [
        block
        for e in events
        if e["type"] == "user"
        for block in e["message"]["content"]
        if block.get("type") == "tool_result" and block.get("is_error")
    ]
    assert errors and "does not exist" in str(errors[0]["content"])
    assert result_of(events)["is_error"] is False
    assert not (tmp_path / "work" / "refused.txt").exists()
    result = result_of(refused_events)
    assert [d["tool_name"] for d in result["permission_denials"]] == ["Bash"]
    assert result["result"] == "The command was refused."


def test_resume_on_a_kept_alive_pod_continues_the_same_conversation(
    dispatcher, offline_pod, docker_client
):
    scenario = [Turn(text="First answer: noted."), Turn(text="Second answer: still here.")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = offline_pod(server.url, keep_alive=True)
        try:
            first, first_events = run(dispatcher, name)
            assert first.exit_code == 0, first_events
            assert docker_client.containers.get(f"cldpd-{name}").status == "running"
            second = dispatcher.resume_session(name, "And the follow-up?")
            second.wait(120)
            second_events = stream(second)
        finally:
            dispatcher.stop(name)
        requests = server.conversation_requests()
    assert second.exit_code == 0, second_events
    assert first_events[0]["session_id"] == second_events[0]["session_id"] == first.claude_session
    assert result_of(second_events)["result"] == "Second answer: still here."
    resumed = json.dumps(requests[1].messages)
    assert "Work on this GitHub issue: " + URL in resumed
    assert "First answer: noted." in resumed
    assert "And the follow-up?" in resumed
    assert container_gone(docker_client, name)
    assert_secret_nowhere(second)


def test_stopping_a_resume_ends_its_turn_only_and_the_next_resume_goes_on(
    dispatcher, offline_pod, docker_client
):
    scenario = [Turn(text="First answer."), Turn(delay=SLOW), Turn(text="Third answer.")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = offline_pod(server.url, keep_alive=True)
        try:
            first, _ = run(dispatcher, name)
            assert first.exit_code == 0
            slow = dispatcher.resume_session(name, "Take your time.")
            server.wait_for_turn(1, timeout=120)
            slow.stop()
            slow.wait(60)
            container = docker_client.containers.get(f"cldpd-{name}")
            status = container.status
            agents = container.exec_run(["sh", "-c", "ps -eo comm= | grep -c '^claude' || true"])
            third = dispatcher.resume_session(name, "Once more.")
            third.wait(120)
            third_events = stream(third)
        finally:
            dispatcher.stop(name)
        resumed = json.dumps(server.conversation_requests()[2].messages)
    assert slow.state == "stopped"
    assert status == "running"
    assert agents.output.decode().strip() == "0"  # the stopped turn's CLI is gone
    assert result_of(third_events)["result"] == "Third answer."
    assert "First answer." in resumed and "Once more." in resumed
    assert third_events[0]["session_id"] == first.claude_session


def test_stop_during_a_slow_turn_ends_the_session_and_the_container(
    dispatcher, offline_pod, docker_client
):
    with ScriptedModelServer([Turn(delay=SLOW, text="too late")], api_key=API_KEY) as server:
        name = offline_pod(server.url)
        session = dispatcher.start_session(name, URL)
        server.wait_for_turn(0, timeout=120)
        session.stop()
        session.wait(60)
    assert session.state == "stopped"
    assert container_gone(docker_client, name)


class Follower:
    """Collects a running session's events in a thread, so a test can look while it runs."""

    def __init__(self, session: Session) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._follow, args=(session,), daemon=True)
        self._thread.start()

    def _follow(self, session: Session) -> None:
        for event in session.events():
            with self._cond:
                self.lines.append(event.data)
                self._cond.notify_all()

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        """Block until an event holding needle has come; return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if needle in line]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no event with {needle!r} in {timeout} s")
                self._cond.wait(left)


def test_api_retry_events_arrive_while_the_run_goes_on(dispatcher, offline_pod, docker_client):
    scenario = [Turn(error=529), Turn(delay=SLOW, text="too late")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = offline_pod(server.url, env={"CLAUDE_CODE_MAX_RETRIES": "3"})
        session = dispatcher.start_session(name, URL)
        follower = Follower(session)
        server.wait_for_turn(1, timeout=120)  # the CLI retried; its retry now waits
        retry = json.loads(follower.wait_for('"subtype":"api_retry"'))
        running = not session.done
        session.stop()
        session.wait(60)
    assert running
    assert (retry["attempt"], retry["max_retries"], retry["error_status"]) == (1, 3, 529)
    assert retry["error"] == "overloaded" and retry["retry_delay_ms"] > 0
    assert container_gone(docker_client, name)


def test_api_retry_events_while_overloaded_then_success(dispatcher, offline_pod):
    scenario = [Turn(error=529, repeat=2), Turn(text="Recovered after the overload.")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = offline_pod(server.url, env={"CLAUDE_CODE_MAX_RETRIES": "3"})
        session, events = run(dispatcher, name)
    retries = [e for e in events if e.get("subtype") == "api_retry"]
    assert [(r["attempt"], r["error_status"]) for r in retries] == [(1, 529), (2, 529)]
    assert retries[0]["max_retries"] == 3
    result = result_of(events)
    assert (result["is_error"], result["result"]) == (False, "Recovered after the overload.")
    assert session.exit_code == 0


def failed_result(events: list[dict[str, Any]], session: Session) -> dict[str, Any]:
    result = result_of(events)
    assert result["is_error"] is True
    assert session.exit_code != 0
    return result


def test_overloaded_until_retries_run_out_fails_naming_the_error(dispatcher, offline_pod):
    with ScriptedModelServer([Turn(error=529, repeat=10)], api_key=API_KEY) as server:
        name = offline_pod(server.url, env={"CLAUDE_CODE_MAX_RETRIES": "2"})
        session, events = run(dispatcher, name)
        assert len(server.conversation_requests()) == 3
    capture("api_retry_then_failure", session)
    assert [e["attempt"] for e in events if e.get("subtype") == "api_retry"] == [1, 2]
    result = failed_result(events, session)
    assert result["api_error_status"] == 529
    assert "529" in result["result"] and "Overloaded" in result["result"]


def test_a_wrong_key_fails_naming_the_authentication_error(dispatcher, offline_pod):
    with ScriptedModelServer([Turn(text="never")], api_key="sk-ant-another-key") as server:
        name = offline_pod(server.url)
        session, events = run(dispatcher, name)
        assert server.conversation_requests() == []  # refused before any turn
    capture("auth_401", session)
    result = failed_result(events, session)
    assert result["api_error_status"] == 401
    assert "Invalid API key" in result["result"]
    assert_secret_nowhere(session)


def test_connection_refused_fails_naming_the_connection_error(dispatcher, offline_pod):
    name = offline_pod(f"http://127.0.0.1:{refused_port()}")
    session, events = run(dispatcher, name)
    assert [e for e in events if e.get("subtype") == "api_retry"]
    result = failed_result(events, session)
    assert "connect" in result["result"].lower()


def test_max_turns_is_honoured(dispatcher, offline_pod):
    loop = Turn(tool_calls=[ToolCall("Bash", {"command": "echo again"})], repeat=10)
    with ScriptedModelServer([loop], api_key=API_KEY) as server:
        name = offline_pod(server.url, args=["--allowedTools=Bash", "--max-turns", "2"])
        session, events = run(dispatcher, name)
        assert len(server.conversation_requests()) == 2
    capture("max_turns", session)
    result = result_of(events)
    assert (result["subtype"], result["is_error"]) == ("error_max_turns", True)
    assert session.exit_code != 0


def test_thinking_is_streamed_before_the_answer(dispatcher, offline_pod):
    turn = Turn(thinking="Two cases: the file exists, or not. Check first.", text="Checked.")
    with ScriptedModelServer([turn], api_key=API_KEY) as server:
        session, events = run(dispatcher, offline_pod(server.url))
    capture("thinking", session)
    blocks = [b for e in events if e["type"] == "assistant" for b in e["message"]["content"]]
    assert [b["type"] for b in blocks] == ["thinking", "text"]
    assert blocks[0]["thinking"] == turn.thinking and blocks[0]["signature"]
    assert result_of(events)["result"] == "Checked."


# --- Through the magics in a real kernel -------------------------------------------
@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory, claude_image: str):
    from kernel_util import KernelSession

    home = tmp_path_factory.mktemp("kernel-home")
    env = {
        "CLDPD_SESSIONS_DIR": str(home / "sessions"),
        "CLDPD_PODS_DIR": str(home / "pods"),
        "ANTHROPIC_API_KEY": API_KEY,
    }
    with KernelSession(env=env) as ks:
        yield ks


@pytest.fixture
def ks(kernel, pods_dir: Path, transcript_dir: Path):
    """The module's kernel, its magics pointed at this test's pods and transcripts."""
    kernel.execute(
        "%load_ext cldpd_magic\n"
        f"%config CldpdMagics.pods_dir = {str(pods_dir)!r}\n"
        f"%config CldpdMagics.transcript_dir = {str(transcript_dir)!r}\n"
        "%config CldpdMagics.flush_interval = 0.1"
    )
    return kernel


def interrupt_during_turn(ks, server: ScriptedModelServer, code: str, turn: int) -> dict:
    """Run a blocking magic, interrupt the kernel while the model's turn is pending.

    The cell's live output ends saying it was interrupted. Returns the cell's reply
    content; every message of the cell is in ks.messages.
    """
    from kernel_util import outputs, text_of

    msg_id = ks.submit(code)
    server.wait_for_turn(turn, timeout=120)
    ks.interrupt()
    msgs = ks.wait(msg_id, timeout=90, check=False)
    shown = outputs(msgs, ("display_data", "update_display_data"))
    assert shown and "interrupted" in text_of(shown[-1]).lower()
    return ks.replies[msg_id]["content"]


def assert_no_secret_in(messages: list[dict]) -> None:
    assert API_KEY not in json.dumps(messages, default=str)


def test_interrupting_a_blocking_start_during_a_slow_turn(ks, offline_pod, docker_client):
    with ScriptedModelServer([Turn(delay=SLOW, text="too late")], api_key=API_KEY) as server:
        name = offline_pod(server.url)
        before = len(ks.messages)
        reply = interrupt_during_turn(ks, server, f"%cldpd_start {name} {URL}", 0)
    assert reply["status"] == "error"
    assert "nterrupted" in reply["evalue"] and name in reply["evalue"]
    assert container_gone(docker_client, name)
    assert ks.value("1 + 1") == "2"
    assert_no_secret_in(ks.messages[before:])


def test_interrupting_a_blocking_resume_during_a_slow_turn(ks, offline_pod, docker_client):
    scenario = [Turn(text="First answer."), Turn(delay=SLOW, text="too late")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = offline_pod(server.url, keep_alive=True)
        before = len(ks.messages)
        try:
            ks.execute(f"%cldpd_start {name} {URL}", timeout=120)
            reply = interrupt_during_turn(ks, server, f"%cldpd_resume {name} Go on, slowly.", 1)
        finally:
            ks.execute(f"%cldpd_stop {name}", timeout=60, check=False)
        resumed = json.dumps(server.conversation_requests()[1].messages)
    assert reply["status"] == "error"
    assert "nterrupted" in reply["evalue"] and name in reply["evalue"]
    assert "First answer." in resumed and "Go on, slowly." in resumed
    assert container_gone(docker_client, name)
    assert ks.value("1 + 1") == "2"
    assert_no_secret_in(ks.messages[before:])


def cell_text(ks, msg_id: str) -> str:
    """The text of the last display of a cell so far."""
    from kernel_util import outputs, parent_id, text_of

    mine = [m for m in ks.messages if parent_id(m) == msg_id]
    shown = outputs(mine, ("display_data", "update_display_data"))
    return text_of(shown[-1]) if shown else ""


def test_a_cell_shows_retries_live_then_the_connection_error(ks, offline_pod, docker_client):
    from kernel_util import parent_id, text_of

    server = ScriptedModelServer([Turn(error=529), Turn(delay=SLOW)], api_key=API_KEY).start()
    try:
        name = offline_pod(server.url, env={"CLAUDE_CODE_MAX_RETRIES": "2"})
        before = len(ks.messages)
        msg_id = ks.submit(f"%cldpd_start {name} {URL}")
        server.wait_for_turn(1, timeout=120)  # retried; the model now holds the retry
        ks.wait_for(lambda m: parent_id(m) == msg_id and "retry" in text_of(m).lower(), timeout=60)
        assert docker_client.containers.get(f"cldpd-{name}").status == "running"
    finally:
        server.close()  # the held request drops, the next ones are refused
    ks.wait(msg_id, timeout=120, check=False)
    final = cell_text(ks, msg_id)
    assert "Connection refused" in final and "failed" in final.lower()
    assert "✗ success" not in final
    assert container_gone(docker_client, name)
    assert_no_secret_in(ks.messages[before:])


@pytest.mark.parametrize(
    ("scenario", "key", "error"),
    [
        ([Turn(text="never")], "sk-ant-another-key", "Invalid API key"),
        ([Turn(error=529, repeat=10)], API_KEY, "529"),
    ],
    ids=["401", "529"],
)
def test_a_cell_ends_with_the_apis_error(ks, offline_pod, scenario, key, error):
    with ScriptedModelServer(scenario, api_key=key) as server:
        name = offline_pod(server.url)
        before = len(ks.messages)
        msg_id = ks.submit(f"%cldpd_start {name} {URL}")
        ks.wait(msg_id, timeout=120, check=False)
    final = cell_text(ks, msg_id)
    assert error in final and "failed" in final.lower()
    assert "✗ success" not in final
    assert_no_secret_in(ks.messages[before:])


# --- Through the cldpd command --------------------------------------------------
def wait_for_turn_while_running(
    server: ScriptedModelServer, turn: int, proc: subprocess.Popen, timeout: float = 120
) -> None:
    """Wait for the model's turn; fail at once, with its output, if proc exits first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            server.wait_for_turn(turn, timeout=0.5)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
    pytest.fail(f"exited {proc.returncode} before turn {turn}: {proc.communicate()}")


def test_cldpd_resume_interrupted_during_a_slow_turn_stops_the_pod(
    dispatcher, offline_pod, pods_dir, transcript_dir, docker_client
):
    scenario = [Turn(text="First answer."), Turn(delay=SLOW, text="too late")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = offline_pod(server.url, keep_alive=True)
        try:
            first, _ = run(dispatcher, name)
            assert first.exit_code == 0
            resume = subprocess.Popen(
                [sys.executable, "-m", "cldpd_magic.cli", "--pods-dir", str(pods_dir),
                 "resume", name, "--prompt", "Go on, slowly."],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1",
                     "CLDPD_SESSIONS_DIR": str(transcript_dir)},
            )  # fmt: skip
            wait_for_turn_while_running(server, 1, resume)
            resume.send_signal(signal.SIGINT)
            out, err = resume.communicate(timeout=90)
        finally:
            dispatcher.stop(name)
    assert resume.returncode == 128 + signal.SIGINT
    assert "interrupted" in err and f"pod {name} stopped" in err
    assert container_gone(docker_client, name)
    assert API_KEY not in out + err


def test_prompts_that_look_like_options_reach_the_model_as_prompts(
    dispatcher, offline_pod, docker_client
):
    scenario = [Turn(text="Started."), Turn(text="Listed."), Turn(text="Not a version.")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        # An option taking several values right before the prompt, and prompts that
        # start with '-': the CLI must still get each prompt as the prompt.
        name = offline_pod(server.url, args=["--max-turns", "3", "--allowedTools", "Bash"],
                           keep_alive=True)  # fmt: skip
        try:
            first, first_events = run(dispatcher, name)
            assert first.exit_code == 0, first_events
            prompts = ["- also add a test\n- and the docs", "--version"]
            for prompt in prompts:
                resumed = dispatcher.resume_session(name, prompt)
                assert resumed.wait(120) == 0, stream(resumed)
        finally:
            dispatcher.stop(name)
        sent = [json.dumps(r.messages) for r in server.conversation_requests()]
    assert len(sent) == 3
    assert "Work on this GitHub issue" in sent[0]
    assert json.dumps(prompts[0])[1:-1] in sent[1]
    assert '"--version"' in sent[2] or "--version" in sent[2]
    assert container_gone(docker_client, name)


#: A turn that costs about $0.60 at Sonnet's list prices (200,000 input tokens).
COSTLY = {"input_tokens": 200_000, "output_tokens": 10}


def test_a_run_over_its_cost_cap_is_stopped_and_marked(dispatcher, offline_pod):
    loop = Turn(tool_calls=[ToolCall("Bash", {"command": "echo again"})], usage=COSTLY, repeat=10)
    with ScriptedModelServer([loop], api_key=API_KEY) as server:
        name = offline_pod(server.url, args=["--allowedTools=Bash"], extra={"maxCostUsd": 1.0})
        session, events = run(dispatcher, name)
        requests = len(server.conversation_requests())
    assert session.stop_reason == "over budget", [e.get("subtype") for e in events]
    assert session.state == "stopped"
    # The cap stops the run within the turn in flight: never all ten turns.
    assert 1 <= requests <= 3
    # The CLI's own total, reported when the stop ended its turn (cldpd stopped the run on
    # its live estimate, which counts every message's input tokens).
    assert session.usage.cost_usd > 0


def test_a_batch_budget_stops_the_batch_on_time(dispatcher, offline_pod):
    with ScriptedModelServer([Turn(text="Done, expensively.", usage=COSTLY, repeat=10)],
                             api_key=API_KEY) as server:  # fmt: skip
        name = offline_pod(server.url)
        issues = [f"https://github.com/octocat/Hello-World/issues/{n}" for n in (1, 2, 3)]
        batch = dispatcher.dispatch(name, issues, max_parallel=1, budget_usd=0.5)
        batch.wait(300)
        requests = len(server.conversation_requests())
    results = batch.results()
    # The first run alone passes the budget (it may be stopped as it ends): no other
    # run starts.
    assert results[0]["state"] in ("exited", "batch over budget"), results
    assert requests == 1
    assert all(r["state"] != "exited" for r in results[1:]), results
    assert batch.over_budget and batch.cost_usd >= 0.5


# --- Interactive runs: approvals, follow-ups, interrupts ----------------------------------

#: Default permission mode: a ``touch`` in the workdir asks for approval.
ASKING = ["--max-turns", "6"]


def pending_of(session: Session, timeout: float = 120) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not session.done:
        found = session.pending()
        if found:
            return found
        time.sleep(0.05)
    return session.pending()


def text_of(session: Session) -> str:
    return "\n".join(e.data for e in session.events() if e.type is EventType.OUTPUT)


def live(offline_pod, url: str, **extra) -> str:
    return offline_pod(url, args=ASKING, extra={"interactive": True, **extra})


def test_an_approved_bash_call_runs_in_the_container(dispatcher, offline_pod, tmp_path):
    scenario = [Turn(tool_calls=[ToolCall("Bash", {"command": "touch asked.txt"})]),
                Turn(text="Touched it.")]  # fmt: skip
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = live(offline_pod, server.url)
        session = dispatcher.start_session(name, URL)
        (request,) = pending_of(session)
        assert (request.tool, request.input["command"]) == ("Bash", "touch asked.txt")
        assert not (tmp_path / "work" / "asked.txt").exists()  # not before the answer
        session.decide(request.request_id, allow=True)
        assert session.wait(120) == 0, text_of(session)
        requests = server.conversation_requests()
    assert (tmp_path / "work" / "asked.txt").exists()
    (result,) = requests[-1].tool_results()
    assert not result.get("is_error")
    kinds = [e.type for e in session.events()]
    assert kinds.count(EventType.PERMISSION_REQUEST) == 1
    assert kinds.count(EventType.PERMISSION_DECISION) == 1
    assert_secret_nowhere(session)


def test_a_denied_call_is_refused_and_the_model_gets_the_message(dispatcher, offline_pod, tmp_path):
    scenario = [Turn(tool_calls=[ToolCall("Bash", {"command": "touch refused.txt"})]),
                Turn(text="Understood.")]  # fmt: skip
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        session = dispatcher.start_session(live(offline_pod, server.url), URL)
        (request,) = pending_of(session)
        session.decide(request.request_id, allow=False, message="Not in this repository.")
        assert session.wait(120) == 0, text_of(session)
        (result,) = server.conversation_requests()[-1].tool_results()
    assert not (tmp_path / "work" / "refused.txt").exists()
    assert result.get("is_error") and "Not in this repository." in json.dumps(result)


def test_always_allow_lets_the_second_call_through_without_asking(
    dispatcher, offline_pod, tmp_path
):
    scenario = [Turn(tool_calls=[ToolCall("Bash", {"command": "touch one.txt"})]),
                Turn(tool_calls=[ToolCall("Bash", {"command": "touch two.txt"})]),
                Turn(text="Both.")]  # fmt: skip
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        session = dispatcher.start_session(live(offline_pod, server.url), URL)
        (request,) = pending_of(session)
        session.decide(request.request_id, allow=True, always=True)
        assert session.wait(120) == 0, text_of(session)
    work = tmp_path / "work"
    assert (work / "one.txt").exists() and (work / "two.txt").exists()
    decisions = [json.loads(e.data) for e in session.events()
                 if e.type is EventType.PERMISSION_DECISION]  # fmt: skip
    assert decisions[0]["always"] is True
    assert all(d["allow"] for d in decisions)
    assert not (work / ".claude" / "settings.local.json").exists()  # this run only


def test_an_unanswered_approval_is_denied_when_its_time_is_up(dispatcher, offline_pod, tmp_path):
    scenario = [Turn(tool_calls=[ToolCall("Bash", {"command": "touch late.txt"})]),
                Turn(text="No answer, so no file.")]  # fmt: skip
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = live(offline_pod, server.url, approvalTimeoutSeconds=2)
        session = dispatcher.start_session(name, URL)
        assert session.wait(120) == 0, text_of(session)
        (result,) = server.conversation_requests()[-1].tool_results()
    assert "no answer within 2 s" in json.dumps(result)
    assert not (tmp_path / "work" / "late.txt").exists()
    assert session.pending() == []


def test_a_prompt_sent_while_the_first_turn_runs_is_answered_in_the_same_session(
    dispatcher, offline_pod
):
    scenario = [Turn(delay=4, text="First answer."), Turn(text="Second answer.")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = live(offline_pod, server.url, keepAlive=True)
        start = dispatcher.start_session(name, URL)
        server.wait_for(lambda r: any(x.conversation for x in r), timeout=120)
        follow = dispatcher.resume_session(name, "And the second question?")
        try:
            assert follow.wait(120) == 0, text_of(follow)
            requests = server.conversation_requests()
        finally:
            dispatcher.stop(name, timeout=5)
    assert "Second answer." in text_of(follow)
    assert "First answer." in text_of(start) and "Second answer." in text_of(start)
    contents = json.dumps(requests[-1].messages)
    assert "Work on this GitHub issue" in contents and "And the second question?" in contents
    sessions = {e.get("session_id") for e in stream(start) if e.get("type") == "result"}
    assert len(sessions) == 1  # one Claude Code session, one process


def test_interrupt_ends_a_slow_turn_and_a_follow_up_then_works(dispatcher, offline_pod):
    scenario = [Turn(delay=SLOW, text="too late"), Turn(text="After the interrupt.")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = live(offline_pod, server.url, keepAlive=True)
        start = dispatcher.start_session(name, URL)
        try:
            server.wait_for(lambda r: any(x.conversation for x in r), timeout=120)
            start.interrupt()
            deadline = time.monotonic() + 60
            while not start.conversation.waiting.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert start.conversation.waiting.is_set(), text_of(start)
            follow = dispatcher.resume_session(name, "Go on, quickly.")
            assert follow.wait(120) == 0, text_of(follow)
            assert not start.done  # the run and its container stayed
        finally:
            dispatcher.stop(name, timeout=5)
    assert "After the interrupt." in text_of(follow)
