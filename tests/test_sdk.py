"""The Claude Agent SDK drives agents in pods through cldpd_magic.sdk.PodTransport.

The real SDK (claude-agent-sdk, from the test extra) throughout. The first part runs it
over a FakeRunner whose agent speaks Claude Code's streaming-input protocol (no engine);
the second runs the real Claude Code CLI in pods on the engine against the scripted model
(marked docker and claude, as tests/test_real_claude.py is).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakes import ISSUE_URL as URL
from fakes import AgentCall, FakeRunner, line_agent, write_pod

try:
    import claude_agent_sdk as sdk
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip(
        "claude-agent-sdk is not installed; pip install -e '.[test]'", allow_module_level=True
    )
import anyio
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    CLIConnectionError,
    HookMatcher,
    PermissionResultAllow,
    PermissionResultDeny,
    ProcessError,
    ResultMessage,
    TextBlock,
    ToolUseBlock,
    UserMessage,
    query,
)

import cldpd_magic.sdk as pod_sdk
from cldpd_magic import Dispatcher, EventType, InvalidRequestError
from cldpd_magic.sdk import PodTransport, SDKUnavailableError, pod_cli_args

INIT = {"type": "system", "subtype": "init", "session_id": "s-1", "model": "m", "tools": []}


def state(name: str) -> dict[str, Any]:
    return {"type": "system", "subtype": "session_state_changed", "state": name}


def result(text: str, is_error: bool = False, cost: float = 0.001) -> dict[str, Any]:
    return {"type": "result", "subtype": "error_during_execution" if is_error else "success",
            "is_error": is_error, "num_turns": 1, "result": text, "session_id": "s-1",
            "duration_ms": 5, "duration_api_ms": 4, "total_cost_usd": cost}  # fmt: skip


def said(text: str) -> dict[str, Any]:
    return {"type": "assistant", "session_id": "s-1", "parent_tool_use_id": None,
            "message": {"id": "m1", "role": "assistant", "model": "m",
                        "content": [{"type": "text", "text": text}]}}  # fmt: skip


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content)


class FakeClaude:
    """Claude Code's streaming-input side as measured, for one process: replays each
    prompt, answers control requests, asks about a tool when a prompt says "ask", waits
    when it says "slow" (until interrupted), prints a 2 MB line for "big", text for
    "noise", and ends 1 after an error result, as the CLI does."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.last_error = False

    def out(self, call: AgentCall, *frames: dict[str, Any] | str) -> None:
        call.out(*(f if isinstance(f, str) else json.dumps(f) for f in frames))

    def __call__(self, call: AgentCall, line: str) -> None:
        frame = json.loads(line)
        self.lines.append(frame)
        kind = frame.get("type")
        if kind == "control_request":
            self.control(call, frame)
        elif kind == "control_response":
            self.out(call, frame)  # --replay-user-messages echoes answers too
            answer = frame["response"].get("response") or {}
            if answer.get("behavior") == "allow":
                self.reply(call, "ran the tool")
            else:
                self.reply(call, f"not allowed: {answer.get('message') or frame['response']}")
        elif kind == "user":
            self.prompt(call, frame)

    def prompt(self, call: AgentCall, frame: dict[str, Any]) -> None:
        text = text_of(frame["message"]["content"])
        replay = {"type": "user", "isReplay": True, "session_id": "s-1",
                  "message": {"role": "user", "content": frame["message"]["content"]}}  # fmt: skip
        self.out(call, replay, INIT)
        if "ask" in text:
            request = {"subtype": "can_use_tool", "tool_name": "Bash", "tool_use_id": "t1",
                       "input": {"command": "touch asked.txt"}}  # fmt: skip
            ask = {"type": "control_request", "request_id": "q1", "request": request}
            self.out(call, state("requires_action"), ask)
        elif "noise" in text:
            call.out("plain text a pod printed", "{not json either")
            self.reply(call, "after the noise")
        elif "big" in text:
            self.reply(call, "x" * (2 * 1024 * 1024))
        elif "fail" in text:
            self.out(call, result("it failed", is_error=True), state("idle"))
            self.last_error = True
        elif "slow" not in text:
            self.reply(call, f"done: {text}")

    def reply(self, call: AgentCall, text: str) -> None:
        self.out(call, said(text), result(text), state("idle"))
        self.last_error = False

    def control(self, call: AgentCall, frame: dict[str, Any]) -> None:
        subtype = frame["request"]["subtype"]
        answer = {"commands": [], "pid": 7} if subtype == "initialize" else {}
        reply = {"subtype": "success", "request_id": frame["request_id"], "response": answer}
        self.out(call, {"type": "control_response", "response": reply})
        if subtype == "interrupt":
            self.out(call, result("interrupted", is_error=True), state("idle"))
            self.last_error = True

    def agent(self) -> Callable[[AgentCall], int]:
        def run(call: AgentCall) -> int:
            call.err("claude: started")
            line_agent(self)(call)
            return 130 if call.stopped.is_set() else int(self.last_error)

        return run


@pytest.fixture
def fake() -> FakeClaude:
    return FakeClaude()


@pytest.fixture
def runner(fake: FakeClaude) -> FakeRunner:
    return FakeRunner(fake.agent())


@pytest.fixture
def dispatcher(pods_dir: Path, transcript_dir: Path, runner: FakeRunner) -> Dispatcher:
    write_pod(pods_dir, "fixer", {"args": ["--max-turns", "9"]}, template="Be careful.")
    return Dispatcher(pods_dir, runner, transcript_dir)


async def collect(messages) -> list[Any]:
    return [message async for message in messages]


def run_query(prompt: str, transport: PodTransport, options=None) -> list[Any]:
    options = options or ClaudeAgentOptions()
    return anyio.run(collect, query(prompt=prompt, options=options, transport=transport))


def texts(messages: list[Any]) -> list[str]:
    return [block.text for m in messages if isinstance(m, AssistantMessage)
            for block in m.content if isinstance(block, TextBlock)]  # fmt: skip


# --- the SDK and the options, without an engine ---------------------------------------------


def test_query_gets_the_sdks_messages_from_the_pods_agent(dispatcher, runner, fake):
    options = ClaudeAgentOptions(model="claude-sonnet-4-5", allowed_tools=["Read", "Bash"],
                                 max_turns=3, system_prompt="Be brief.")  # fmt: skip
    transport = PodTransport("fixer", issue=URL, dispatcher=dispatcher, options=options)
    messages = run_query("Fix it.", transport, options)
    assert texts(messages) == [f"done: Be careful.\n\nWork on this GitHub issue: {URL}\n\nFix it."]
    (final,) = [m for m in messages if isinstance(m, ResultMessage)]
    assert final.total_cost_usd == 0.001 and not final.is_error
    assert not [m for m in messages if isinstance(m, UserMessage)]  # the replay is not shown
    cmd = runner.runs[0].cmd
    for arg in ("--input-format", "--permission-prompt-tool", "--model=claude-sonnet-4-5",
                "--allowedTools=Read,Bash", "--system-prompt=Be brief."):  # fmt: skip
        assert arg in cmd
    assert cmd[cmd.index("--max-turns", cmd.index("--max-turns") + 1) + 1] == "3"  # after the pod's
    session = transport.session
    assert session.done and session.exit_code == 0 and session.run == "fixer"
    assert [f["type"] for f in fake.lines] == ["control_request", "user"]  # initialize, prompt
    assert session.transcript.exists()


def test_only_an_issue_puts_the_start_prompt_first(dispatcher, fake):
    messages = run_query("Just this.", PodTransport("fixer", dispatcher=dispatcher))
    assert texts(messages) == ["done: Just this."]


def test_the_pods_text_lines_are_skipped_and_a_long_line_comes_whole(dispatcher):
    messages = run_query("noise, then big", PodTransport("fixer", dispatcher=dispatcher))
    assert texts(messages) == ["after the noise"]
    messages = run_query("big", PodTransport("fixer", dispatcher=dispatcher))
    assert texts(messages) == ["x" * (2 * 1024 * 1024)]


def test_an_error_result_and_exit_reach_the_caller_as_the_sdks_errors(dispatcher):
    with pytest.raises(sdk.ResultError) as info:
        run_query("fail", PodTransport("fixer", dispatcher=dispatcher))
    assert info.value.exit_code == 1 and info.value.result == "it failed"


def test_a_non_zero_exit_without_an_error_result_is_a_process_error(pods_dir, transcript_dir):
    def crash(call: AgentCall) -> int:
        call.err("claude: out of memory")
        return 137

    write_pod(pods_dir, "crashy", {})
    dispatcher = Dispatcher(pods_dir, FakeRunner(crash), transcript_dir)
    stderr: list[str] = []
    options = ClaudeAgentOptions(stderr=stderr.append)
    transport = PodTransport("crashy", dispatcher=dispatcher, options=options)

    async def main() -> None:
        await transport.connect()
        await collect(transport.read_messages())

    with pytest.raises(ProcessError) as info:
        anyio.run(main)
    assert info.value.exit_code == 137 and "out of memory" in str(info.value)
    assert stderr == ["claude: out of memory"]


def test_a_failed_start_is_a_connection_error_caused_by_cldpds(dispatcher, runner):
    runner.build_error = "Building image cldpd-fixer failed: no such base image."
    with pytest.raises(CLIConnectionError, match="no such base image") as info:
        run_query("hi", PodTransport("fixer", dispatcher=dispatcher))
    assert type(info.value.__cause__).__name__ == "BuildFailedError"


def test_client_turns_an_approval_callback_and_a_denial(dispatcher, fake):
    asked = []

    async def can_use_tool(tool, tool_input, context):
        asked.append((tool, tool_input["command"]))
        return PermissionResultDeny(message="Not in this repository.")

    options = ClaudeAgentOptions(can_use_tool=can_use_tool)

    async def main() -> list[list[Any]]:
        transport = PodTransport("fixer", dispatcher=dispatcher, options=options)
        turns = []
        async with ClaudeSDKClient(options, transport=transport) as client:
            for prompt in ("first", "please ask"):
                await client.query(prompt)
                turns.append(await collect(client.receive_response()))
        return turns

    first, second = anyio.run(main)
    assert texts(first) == ["done: first"]
    assert texts(second) == ["not allowed: Not in this repository."]
    assert asked == [("Bash", "touch asked.txt")]
    answers = [f for f in fake.lines if f["type"] == "control_response"]
    assert answers[0]["response"]["response"]["behavior"] == "deny"
    assert "--permission-prompt-tool" in dispatcher.runner.runs[0].cmd


def test_writes_from_many_tasks_arrive_whole_and_a_write_after_close_is_refused(dispatcher, runner):
    transport = PodTransport("fixer", dispatcher=dispatcher)

    async def main() -> None:
        await transport.connect()

        async def writer(n: int) -> None:
            for i in range(50):
                frame = {"type": "keep_alive", "writer": n, "i": i, "pad": "p" * 5000}
                await transport.write(json.dumps(frame) + "\n")

        async with anyio.create_task_group() as group:
            for n in range(4):
                group.start_soon(writer, n)
        await transport.close()
        with pytest.raises(CLIConnectionError, match="closed"):
            await transport.write('{"type": "keep_alive"}\n')

    anyio.run(main)
    lines = [json.loads(line) for line in runner.stdins[0].lines]
    for n in range(4):
        assert [f["i"] for f in lines if f.get("writer") == n] == list(range(50))
    assert not transport.is_ready() and transport.session.done


def test_close_interrupts_a_turn_in_flight_and_ends_the_run(dispatcher, runner, fake):
    async def main() -> None:
        transport = PodTransport("fixer", dispatcher=dispatcher)
        async with ClaudeSDKClient(ClaudeAgentOptions(), transport=transport) as client:
            await client.query("slow")
            while not any(f["type"] == "user" for f in fake.lines):
                await anyio.sleep(0.01)
        assert transport.session.done

    anyio.run(main)
    requests = [f["request"]["subtype"] for f in fake.lines if f["type"] == "control_request"]
    assert requests == ["initialize", "interrupt"]
    assert runner.stdins[0].closed


def test_close_stops_an_agent_that_does_not_end(pods_dir, transcript_dir, monkeypatch):
    def deaf(call: AgentCall) -> int:  # reads nothing, never ends by itself
        call.out(json.dumps(INIT))
        call.stopped.wait(30)
        return 130

    monkeypatch.setattr(pod_sdk, "CLOSE_WAIT", 0.2)
    write_pod(pods_dir, "deaf", {})
    runner = FakeRunner(deaf)
    transport = PodTransport("deaf", dispatcher=Dispatcher(pods_dir, runner, transcript_dir))

    async def main() -> None:
        await transport.connect()
        await transport.close()

    anyio.run(main)
    assert transport.session.done and transport.session.stopped
    assert runner.stops == ["cldpd-deaf"]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("cwd", "/home/me/project"),
        ("cli_path", "/usr/local/bin/claude"),
        ("add_dirs", ["/home/me/data"]),
        ("env", {"ANTHROPIC_API_KEY": "sk-ant-host"}),
        ("user", "me"),
        ("continue_conversation", True),
        ("settings", "/home/me/settings.json"),
        ("system_prompt", {"type": "file", "path": "/home/me/prompt.md"}),
        ("mcp_servers", "/home/me/mcp.json"),
        ("plugins", [{"type": "local", "path": "/home/me/plugin"}]),
        ("permission_prompt_tool_name", "mcp__approver__ask"),
    ],
)
def test_an_option_that_cannot_apply_in_a_pod_is_one_sentence(dispatcher, runner, option, value):
    options = ClaudeAgentOptions(**{option: value})
    with pytest.raises(InvalidRequestError, match=rf"ClaudeAgentOptions\.{option} ") as info:
        PodTransport("fixer", dispatcher=dispatcher, options=options)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")
    assert runner.runs == [] and runner.calls == []


def test_options_that_apply_in_a_pod_become_cli_arguments():
    server = {"type": "stdio", "command": "my-mcp", "args": []}
    options = ClaudeAgentOptions(
        system_prompt={"type": "preset", "preset": "claude_code", "append": "Be terse."},
        permission_mode="acceptEdits", disallowed_tools=["WebFetch"], max_budget_usd=0.5,
        fallback_model="claude-haiku-4-5", settings='{"model": "x"}', mcp_servers={"m": server},
        include_partial_messages=True, extra_args={"debug": None}, effort="high",
        output_format={"type": "json_schema", "schema": {"type": "object"}},
    )  # fmt: skip
    args = pod_cli_args(options)
    assert "--append-system-prompt=Be terse." in args
    assert "--permission-mode=acceptEdits" in args and "--disallowedTools=WebFetch" in args
    assert args[args.index("--max-budget-usd") + 1] == "0.5"
    assert "--fallback-model=claude-haiku-4-5" in args and "--effort=high" in args
    assert args[args.index("--settings") + 1] == '{"model": "x"}'
    assert json.loads(args[args.index("--mcp-config") + 1]) == {"mcpServers": {"m": server}}
    assert "--include-partial-messages" in args and "--debug" in args
    assert '--json-schema={"type": "object"}' in args
    assert pod_cli_args(None) == pod_cli_args(ClaudeAgentOptions()) == []


def test_resume_passes_the_session_and_takes_no_issue(dispatcher, runner):
    session_uuid = "0b8e2d9c-0000-4000-8000-000000000001"
    options = ClaudeAgentOptions(resume=session_uuid)
    with pytest.raises(InvalidRequestError, match="give one of them"):
        PodTransport("fixer", issue=URL, dispatcher=dispatcher, options=options)
    run_query("again", PodTransport("fixer", dispatcher=dispatcher, options=options), options)
    cmd = runner.runs[0].cmd
    assert cmd[cmd.index("--resume") + 1] == session_uuid


def test_a_missing_or_untested_sdk_is_one_sentence(dispatcher, monkeypatch):
    monkeypatch.setattr(pod_sdk, "_sdk", None)
    with pytest.raises(SDKUnavailableError, match=r"pip install 'cldpd_magic\[sdk\]'"):
        PodTransport("fixer", dispatcher=dispatcher)
    untested = type("FakeSDK", (), {"__version__": "0.1.0"})
    monkeypatch.setattr(pod_sdk, "_sdk", untested)
    with pytest.raises(SDKUnavailableError, match=r"0\.1\.0 is not a version") as info:
        PodTransport("fixer", dispatcher=dispatcher)
    assert "\n" not in str(info.value)


def test_the_sdks_version_is_a_tested_one():
    low, high = pod_sdk.SDK_VERSIONS
    assert pod_sdk._version(low) <= pod_sdk._version(sdk.__version__) <= pod_sdk._version(high)
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert f'"claude-agent-sdk>={low},<=' in pyproject and f"<={high}" in pyproject


def test_importing_cldpd_magic_imports_neither_the_transport_nor_the_sdk():
    code = (
        "import sys, cldpd_magic, cldpd_magic.runs\n"
        "print(sorted(m for m in ('cldpd_magic.sdk', 'claude_agent_sdk') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import sys, cldpd_magic.sdk; print('claude_agent_sdk' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # the control: the check sees an import


# --- in a notebook: the magics see the run -------------------------------------------------


def test_in_a_notebook_the_run_is_in_cldpd_sessions_and_attach_follows_it(ip, pods_dir, fake):
    from IPython.utils.capture import capture_output

    write_pod(pods_dir, "fixer", {})
    magics = ip.magics_manager.registry["CldpdMagics"]
    magics.runner = FakeRunner(fake.agent())

    async def main() -> tuple[Any, Any, list[Any]]:
        transport = PodTransport("fixer", run="sdk-run")  # the magics' dispatcher
        async with ClaudeSDKClient(ClaudeAgentOptions(), transport=transport) as client:
            await client.query("first")
            messages = await collect(client.receive_response())
            with capture_output():
                report = ip.run_line_magic("cldpd_sessions", "")
                followed = ip.run_line_magic("cldpd_attach", "-b sdk-run")
        return transport, (report, followed), messages

    transport, (report, followed), messages = anyio.run(main)
    assert texts(messages) == ["done: first"]
    assert transport.dispatcher is magics.dispatcher
    sessions = report["sessions"].records()
    assert [(r["session"], r["pod"]) for r in sessions] == [(transport.session.id, "fixer")]
    assert followed is transport.session  # followed from its own events, from the start
    followed.wait(10)
    assert any("done: first" in e.data for e in followed.events() if e.type is EventType.OUTPUT)


# --- the real Claude Code CLI in pods on the engine ------------------------------------------

# The fixtures of the real-CLI and egress tests, used here through the fixtures below.
from test_egress import egress_base, egress_leftovers, made, upstream_network  # noqa: E402, F401
from test_real_claude import API_KEY, SLOW, _api_key, claude_image, offline_pod  # noqa: E402, F401

from cldpd_magic.model_server.server import ScriptedModelServer, ToolCall, Turn  # noqa: E402

#: The pod's own approvals: Bash runs unasked (the SDK's callbacks are not asked).
UNASKED = ["--permission-mode", "acceptEdits", "--allowedTools=Bash", "--max-turns", "6"]
#: Claude Code's default mode: ``touch`` in the workdir asks for approval.
ASKING = ["--max-turns", "6"]


@pytest.fixture
def pod_of(request: pytest.FixtureRequest) -> Callable[..., str]:
    """``pod_of(url, args=..., keep_alive=..., extra=...)``: a claude-offline pod (its
    workdir is ``tmp_path / "work"``), as tests/test_real_claude.py makes them."""
    return request.getfixturevalue("offline_pod")


@pytest.fixture
def upstream(request: pytest.FixtureRequest) -> str:
    """A host address containers reach, on a network of this test; the egress image made."""
    request.getfixturevalue("egress_base")
    return request.getfixturevalue("upstream_network")


@pytest.fixture
def real_dispatcher(pods_dir: Path, transcript_dir: Path) -> Dispatcher:
    return Dispatcher(pods_dir, transcript_dir=transcript_dir)


def wait_for_model(server: ScriptedModelServer, turns: int = 1) -> Callable[[], Any]:
    def wait() -> Any:
        return server.wait_for(lambda r: sum(x.conversation for x in r) >= turns, timeout=120)

    return wait


def tool_results(server: ScriptedModelServer) -> str:
    return json.dumps([r.tool_results() for r in server.conversation_requests()])


def assert_no_key(messages: list[Any], key: str = API_KEY) -> None:
    assert all(key not in repr(m) for m in messages)


@pytest.mark.docker
@pytest.mark.claude
def test_query_runs_a_tool_call_in_the_container(real_dispatcher, pod_of, tmp_path):
    command = "echo made-in-pod > proof.txt && cat /etc/hostname && id -un"
    scenario = [Turn(text="Writing it.", tool_calls=[ToolCall("Bash", {"command": command})],
                     usage={"input_tokens": 1500, "output_tokens": 60}),
                Turn(text="Wrote proof.txt.")]  # fmt: skip
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = pod_of(server.url, args=UNASKED)
        options = ClaudeAgentOptions(max_turns=4)
        transport = PodTransport(name, issue=URL, dispatcher=real_dispatcher, options=options)
        messages = run_query("Make the proof file.", transport, options)
        first = server.conversation_requests()[0]
    assert (tmp_path / "work" / "proof.txt").read_text() == "made-in-pod\n"
    uses = [b for m in messages if isinstance(m, AssistantMessage)
            for b in m.content if isinstance(b, ToolUseBlock)]  # fmt: skip
    assert [u.input["command"] for u in uses] == [command]
    output = tool_results(server)
    assert "agent" in output  # the container's user, not this one's
    (final,) = [m for m in messages if isinstance(m, ResultMessage)]
    assert final.result == "Wrote proof.txt." and not final.is_error
    assert isinstance(final.total_cost_usd, float) and final.total_cost_usd > 0
    asked = json.dumps(first.messages)
    assert f"Work on this GitHub issue: {URL}" in asked and "Make the proof file." in asked
    session = transport.session
    assert session.done and session.exit_code == 0
    assert API_KEY not in session.transcript.read_text()
    assert_no_key(messages)


@pytest.mark.docker
@pytest.mark.claude
def test_client_keeps_one_session_over_several_turns(real_dispatcher, pod_of):
    scenario = [Turn(text="Remember PAPAYA."), Turn(text="It was PAPAYA.")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = pod_of(server.url, args=UNASKED)

        async def main() -> list[list[Any]]:
            transport = PodTransport(name, dispatcher=real_dispatcher)
            turns = []
            async with ClaudeSDKClient(ClaudeAgentOptions(), transport=transport) as client:
                for prompt in ("Remember a word.", "What was the word?"):
                    await client.query(prompt)
                    turns.append(await collect(client.receive_response()))
            return turns

        first, second = anyio.run(main)
        requests = server.conversation_requests()
    assert texts(first) == ["Remember PAPAYA."] and texts(second) == ["It was PAPAYA."]
    results = [m for m in first + second if isinstance(m, ResultMessage)]
    assert len(results) == 2 and results[0].session_id == results[1].session_id
    history = json.dumps(requests[-1].messages)
    assert "Remember a word." in history and "Remember PAPAYA." in history
    assert "What was the word?" in history


@pytest.mark.docker
@pytest.mark.claude
def test_can_use_tool_allows_one_call_and_denies_another(real_dispatcher, pod_of, tmp_path):
    scenario = [Turn(tool_calls=[ToolCall("Bash", {"command": "touch allowed.txt"})]),
                Turn(tool_calls=[ToolCall("Bash", {"command": "touch denied.txt"})]),
                Turn(text="One of two.")]  # fmt: skip
    asked = []

    async def can_use_tool(tool, tool_input, context):
        asked.append(tool_input.get("command"))
        if "allowed" in tool_input.get("command", ""):
            return PermissionResultAllow()
        return PermissionResultDeny(message="Not that file.")

    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = pod_of(server.url, args=ASKING)
        options = ClaudeAgentOptions(can_use_tool=can_use_tool)

        async def main() -> list[Any]:
            transport = PodTransport(name, dispatcher=real_dispatcher, options=options)
            async with ClaudeSDKClient(options, transport=transport) as client:
                await client.query("Touch the two files.")
                return await collect(client.receive_response())

        messages = anyio.run(main)
        results = server.conversation_requests()[-1].tool_results()
    assert asked == ["touch allowed.txt", "touch denied.txt"]
    work = tmp_path / "work"
    assert (work / "allowed.txt").exists() and not (work / "denied.txt").exists()
    allowed, denial = results
    assert not allowed.get("is_error") and "Not that file." not in json.dumps(allowed)
    assert denial.get("is_error") and "Not that file." in json.dumps(denial)
    assert texts(messages)[-1] == "One of two."


@pytest.mark.docker
@pytest.mark.claude
def test_a_pre_tool_use_hook_blocks_a_command(real_dispatcher, pod_of, tmp_path):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    work.chmod(0o777)
    for kept in ("gone.txt", "keep.txt"):
        (work / kept).write_text("x")
        (work / kept).chmod(0o666)
    scenario = [Turn(tool_calls=[ToolCall("Bash", {"command": "rm -f gone.txt"})]),
                Turn(tool_calls=[ToolCall("Bash", {"command": "rm -f keep.txt"})]),
                Turn(text="Tried both.")]  # fmt: skip
    seen = []

    async def guard(hook_input, tool_use_id, context):
        command = hook_input["tool_input"]["command"]
        seen.append(command)
        if "keep.txt" not in command:
            return {}
        return {"hookSpecificOutput": {"hookEventName": "PreToolUse",
                                       "permissionDecision": "deny",
                                       "permissionDecisionReason": "keep.txt stays."}}  # fmt: skip

    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = pod_of(server.url, args=UNASKED)
        options = ClaudeAgentOptions(hooks={"PreToolUse": [HookMatcher("Bash", [guard])]})

        async def main() -> list[Any]:
            transport = PodTransport(name, dispatcher=real_dispatcher, options=options)
            async with ClaudeSDKClient(options, transport=transport) as client:
                await client.query("Clean up.")
                return await collect(client.receive_response())

        anyio.run(main)
        blocked = server.conversation_requests()[-1].tool_results()
    assert seen == ["rm -f gone.txt", "rm -f keep.txt"]
    assert not (work / "gone.txt").exists()  # the control: rm runs when the hook lets it
    assert (work / "keep.txt").exists()
    assert "keep.txt stays." in json.dumps(blocked)


@pytest.mark.docker
@pytest.mark.claude
def test_interrupt_ends_a_slow_turn_and_a_follow_up_works(real_dispatcher, pod_of):
    scenario = [Turn(delay=SLOW, text="too late"), Turn(text="After the interrupt.")]
    with ScriptedModelServer(scenario, api_key=API_KEY) as server:
        name = pod_of(server.url, args=UNASKED)

        async def main() -> tuple[list[Any], list[Any]]:
            transport = PodTransport(name, dispatcher=real_dispatcher)
            async with ClaudeSDKClient(ClaudeAgentOptions(), transport=transport) as client:
                await client.query("Take your time.")
                await anyio.to_thread.run_sync(wait_for_model(server))
                await client.interrupt()
                first = await collect(client.receive_response())
                await client.query("Go on, quickly.")
                return first, await collect(client.receive_response())

        first, second = anyio.run(main)
    (interrupted,) = [m for m in first if isinstance(m, ResultMessage)]
    assert interrupted.is_error and "too late" not in texts(first)
    assert texts(second) == ["After the interrupt."]
    (final,) = [m for m in second if isinstance(m, ResultMessage)]
    assert final.session_id == interrupted.session_id and not final.is_error


@pytest.mark.docker
@pytest.mark.claude
@pytest.mark.parametrize("keep_alive", [False, True], ids=["plain", "keepAlive"])
def test_the_run_is_listed_while_it_runs_and_ends_with_close(
    real_dispatcher, pod_of, docker_client, keep_alive
):
    with ScriptedModelServer([Turn(text="Here.")], api_key=API_KEY) as server:
        name = pod_of(server.url, args=UNASKED, keep_alive=keep_alive)

        async def main() -> tuple[PodTransport, list[str]]:
            transport = PodTransport(name, run=f"{name}-sdk", dispatcher=real_dispatcher)
            async with ClaudeSDKClient(ClaudeAgentOptions(), transport=transport) as client:
                await client.query("Are you there?")
                await collect(client.receive_response())
                listed = [r.run for r in real_dispatcher.running() if r.status == "running"]
            return transport, listed

        transport, listed_while_running = anyio.run(main)
    run = f"{name}-sdk"
    assert run in listed_while_running
    after = {r.run: r for r in real_dispatcher.running()}
    assert transport.session.done and transport.session.exit_code == 0
    if keep_alive:
        assert after[run].status == "running" and after[run].keep_alive  # kept, idle
        assert real_dispatcher.stop(run, timeout=5)
        after = {r.run: r for r in real_dispatcher.running()}
    assert run not in after
    assert not docker_client.containers.list(all=True, filters={"name": f"^cldpd-{run}$"})


@pytest.mark.docker
@pytest.mark.claude
def test_the_allowlist_and_the_brokered_key_apply_to_an_sdk_run(
    upstream, pod_of, real_dispatcher, docker_client, monkeypatch
):
    real_key = f"sk-ant-real-{uuid.uuid4().hex}"
    monkeypatch.setenv("CLDPD_TEST_BROKERED_KEY", real_key)
    command = "echo key=$ANTHROPIC_API_KEY; wget -q -T 5 -O - http://example.com/ || echo refused"
    scenario = [Turn(tool_calls=[ToolCall("Bash", {"command": command})]), Turn(text="Done.")]
    with ScriptedModelServer(scenario, host=upstream, api_key=real_key) as server:
        extra = {"network": {"allow": []}, "credentials": {"anthropic": "CLDPD_TEST_BROKERED_KEY"},
                 "inheritEnv": [], "unsafe": []}  # fmt: skip
        name = pod_of(server.url, args=UNASKED, extra=extra)
        container_env: list[str] = []

        async def main() -> list[Any]:
            transport = PodTransport(name, dispatcher=real_dispatcher)
            async with ClaudeSDKClient(ClaudeAgentOptions(), transport=transport) as client:
                await client.query("Show the key.")
                messages = await collect(client.receive_response())
                container = docker_client.containers.get(f"cldpd-{transport.session.run}")
                container_env.extend(container.attrs["Config"]["Env"])
            return messages

        messages = anyio.run(main)
        requests = server.conversation_requests()
        output = tool_results(server)
    assert requests and all(r.headers.get("x-api-key") == real_key for r in requests)
    assert container_env and not any(real_key in entry for entry in container_env)
    assert "key=cldpd-brokered-" in output and real_key not in output  # a placeholder inside
    assert "refused" in output  # not on the allowlist
    assert_no_key(messages, real_key)
    assert texts(messages)[-1] == "Done."
    assert egress_leftovers(docker_client, f"cldpd-{name}") == []
