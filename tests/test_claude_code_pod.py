"""The example pod ``examples/claude-code``, built as shipped, runs the real CLI.

Its Dockerfile is built on ``cldpd-debian-node:bookworm`` (Debian's Node.js and npm,
made by scripts/setup) through its ``BASE_IMAGE`` build arg, and installs the pinned
Claude Code from npm in the build. Its pod.json, settings.json and ``--permission-mode``
stay as shipped; the test changes only what it must: the base image, the agent's uid,
the model (a :class:`ScriptedModelServer` on the host's 127.0.0.1, reached through
``"network": "host"``), the ``~/.ssh`` mount (a tmp directory) and a bind-mounted
workdir to look into. The model asks for commands that settings.json allows, denies,
or leaves to approval; the CLI must run the first and refuse the others, and the cell
must show the refusals.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_real_claude import CLAUDE_CODE_VERSION, cell_text, pinned_version, result_of, stream

from cldpd_magic import Dispatcher, EventType
from cldpd_magic.model_server.server import ScriptedModelServer, ToolCall, Turn
from cldpd_magic.runs import deny_unattended

pytestmark = [pytest.mark.docker, pytest.mark.claude]

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "claude-code"
NODE_IMAGE = "cldpd-debian-node:bookworm"
URL = "https://github.com/octocat/Hello-World/issues/9"
API_KEY = f"sk-ant-scripted-{uuid.uuid4().hex}"
BUILD_AND_RUN = 540.0  # seconds: a cold build downloads Debian packages and the CLI
NOTES = "/home/agent/work/notes.md"

#: settings.json allows python3; the agent's user name shows it is not root.
ALLOWED = "python3 -c 'import getpass; print(getpass.getuser())'"
#: settings.json denies force-pushes.
DENIED = "git push --force origin main"
#: Allowed neither by settings.json nor by acceptEdits: needs an approval nobody gives.
UNAPPROVED = "sh -c 'echo ran > refused.txt'"
SCENARIO = [
    Turn(text="Who am I?", tool_calls=[ToolCall("Bash", {"command": ALLOWED})]),
    Turn(tool_calls=[ToolCall("Write", {"file_path": NOTES, "content": "accepted edit\n"})]),
    Turn(tool_calls=[ToolCall("Bash", {"command": DENIED})]),
    Turn(tool_calls=[ToolCall("Bash", {"command": UNAPPROVED})]),
    Turn(text="Two commands were refused."),
]


@pytest.fixture(scope="module")
def pod_image() -> Iterator[str]:
    """The tag the pods of this module build; fails in CI when the base image is missing."""
    import docker

    example_pin = pinned_version(EXAMPLE / "Dockerfile", r"^ARG CLAUDE_CODE_VERSION=(\S+)$")
    assert example_pin == CLAUDE_CODE_VERSION, "scripts/setup and the example pin other CLIs"
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(NODE_IMAGE)
    except Exception as exc:
        message = f"no Docker engine with {NODE_IMAGE} ({type(exc).__name__}); run scripts/setup"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    tag = f"cldpd-test-claude-code-{uuid.uuid4().hex[:8]}"
    yield tag
    with contextlib.suppress(docker.errors.APIError):
        client.images.remove(tag, noprune=True)  # its layers stay: the next build is cached
    client.close()


@pytest.fixture(autouse=True)
def _host_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    monkeypatch.delenv("GH_TOKEN", raising=False)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The pod's workdir on the host (bind-mounted)."""
    path = tmp_path / "work"
    path.mkdir()
    path.chmod(0o777)  # the agent is not the host's user
    return path


ExamplePod = Callable[[str], str]


@pytest.fixture
def example_pod(
    pod_image: str, pods_dir: Path, tmp_path: Path, work: Path, docker_client
) -> Iterator[ExamplePod]:
    """``example_pod(model_url, interactive=False)``: a copy of examples/claude-code in
    pods_dir (interactive as shipped, or the one-shot path); its name.

    After the test, a container left behind fails the test (and is removed).
    """
    made: list[str] = []
    ssh = tmp_path / "ssh"
    ssh.mkdir()

    def make(model_url: str, interactive: bool = False) -> str:
        name = f"claudecode{uuid.uuid4().hex[:8]}"
        pod = pods_dir / name
        shutil.copytree(EXAMPLE, pod)
        config = json.loads((pod / "pod.json").read_text())
        assert config["interactive"] is True  # as shipped
        config["interactive"] = interactive
        config["image"] = pod_image
        config["buildArgs"].update(BASE_IMAGE=NODE_IMAGE, AGENT_UID=str(os.getuid() or 1000))
        config["network"] = "host"
        config["unsafe"] = ["network:host"]  # the scripted model is on the host's loopback
        config["env"] = {
            "ANTHROPIC_BASE_URL": model_url,
            "CLAUDE_CODE_MAX_RETRIES": "1",
            # The host's network: nothing but the scripted model may be called.
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
        }
        config["mounts"] = [{**m, "source": str(ssh)} for m in config["mounts"]]
        config["mounts"].append({"source": str(work), "target": config["workdir"]})
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


def test_the_example_pod_keeps_its_settings_as_shipped():
    config = json.loads((EXAMPLE / "pod.json").read_text())
    assert config["args"][:2] == ["--permission-mode", "acceptEdits"]
    permissions = json.loads((EXAMPLE / "settings.json").read_text())["permissions"]
    assert "Bash(python3:*)" in permissions["allow"]
    assert "Bash(git push --force:*)" in permissions["deny"]
    assert not [rule for rule in permissions["allow"] if rule.startswith("Bash(sh")]


def tool_results(server: ScriptedModelServer) -> dict[str, dict]:
    """The tool results the CLI sent the model, by the command or file they answer."""
    messages = server.conversation_requests()[-1].messages
    calls = {
        block["id"]: block["input"]
        for message in messages
        if message["role"] == "assistant" and isinstance(message["content"], list)
        for block in message["content"]
        if block.get("type") == "tool_use"
    }
    return {
        calls[block["tool_use_id"]].get("command")
        or calls[block["tool_use_id"]]["file_path"]: block
        for block in server.conversation_requests()[-1].tool_results()
    }


def test_allowed_commands_run_as_agent_and_refused_ones_reach_the_model_as_errors(
    example_pod, pods_dir, transcript_dir, work
):
    with ScriptedModelServer(SCENARIO, api_key=API_KEY) as server:
        name = example_pod(server.url)
        session = Dispatcher(pods_dir, transcript_dir=transcript_dir).start_session(name, URL)
        session.wait(BUILD_AND_RUN)
        events = stream(session)
        results = tool_results(server)
        keys = {r.headers["x-api-key"] for r in server.conversation_requests()}
    assert session.exit_code == 0, events
    init = events[0]
    assert (init["type"], init["subtype"]) == ("system", "init")
    assert init["permissionMode"] == "acceptEdits"
    assert init["claude_code_version"] == CLAUDE_CODE_VERSION
    assert keys == {API_KEY}

    allowed = results[ALLOWED]
    assert not allowed.get("is_error") and str(allowed["content"]).strip() == "agent"
    assert not results[NOTES].get("is_error")  # acceptEdits: file edits need no approval
    assert (work / "notes.md").read_text() == "accepted edit\n"

    denied = results[DENIED]
    assert denied["is_error"] and "has been denied" in str(denied["content"])
    unapproved = results[UNAPPROVED]
    assert unapproved["is_error"] and "requires approval" in str(unapproved["content"])
    assert not (work / "refused.txt").exists()

    result = result_of(events)
    assert (result["subtype"], result["is_error"]) == ("success", False)
    assert [d["tool_input"]["command"] for d in result["permission_denials"]] == [
        DENIED, UNAPPROVED,
    ]  # fmt: skip
    assert all(API_KEY not in e.data for e in session.events())


def test_an_interactive_run_nobody_watches_asks_and_is_denied_what_settings_do_not_allow(
    example_pod, pods_dir, transcript_dir, work
):
    """As shipped (interactive), with nobody to answer: settings.json still decides what it
    allows and denies; what it leaves open is asked, and denied with cldpd's sentence."""
    with ScriptedModelServer(SCENARIO, api_key=API_KEY) as server:
        name = example_pod(server.url, interactive=True)
        dispatcher = Dispatcher(pods_dir, transcript_dir=transcript_dir,
                                can_use_tool=deny_unattended)  # fmt: skip
        session = dispatcher.start_session(name, URL)
        session.wait(BUILD_AND_RUN)
        results = tool_results(server)
        asked = [json.loads(e.data)["tool"] for e in session.events()
                 if e.type is EventType.PERMISSION_REQUEST]  # fmt: skip
    assert session.exit_code == 0
    assert not results[ALLOWED].get("is_error")
    assert (work / "notes.md").read_text() == "accepted edit\n"
    assert results[DENIED]["is_error"] and "has been denied" in str(results[DENIED]["content"])
    unapproved = results[UNAPPROVED]
    assert unapproved["is_error"] and "no one is here to approve Bash" in str(unapproved["content"])
    assert asked == ["Bash"]  # only the command settings.json leaves open was asked
    assert not (work / "refused.txt").exists()


# --- The refusals in a cell of a real kernel -------------------------------------------
@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory, pod_image: str):
    from kernel_util import KernelSession

    home = tmp_path_factory.mktemp("kernel-home")
    env = {
        "CLDPD_SESSIONS_DIR": str(home / "sessions"),
        "CLDPD_PODS_DIR": str(home / "pods"),
        "ANTHROPIC_API_KEY": API_KEY,
        "GH_TOKEN": None,
    }
    with KernelSession(env=env) as ks:
        yield ks


def test_the_cell_shows_the_refused_commands(kernel, example_pod, pods_dir, transcript_dir, work):
    kernel.execute(
        "%load_ext cldpd_magic\n"
        f"%config CldpdMagics.pods_dir = {str(pods_dir)!r}\n"
        f"%config CldpdMagics.transcript_dir = {str(transcript_dir)!r}\n"
        "%config CldpdMagics.flush_interval = 0.1"
    )
    with ScriptedModelServer(SCENARIO, api_key=API_KEY) as server:
        name = example_pod(server.url)
        before = len(kernel.messages)
        msg_id = kernel.submit(f"%cldpd_start {name} {URL}")
        kernel.wait(msg_id, timeout=BUILD_AND_RUN)
    shown = cell_text(kernel, msg_id)
    assert "Two commands were refused." in shown
    assert f"Bash with command {DENIED} has been denied" in shown  # the tool error
    assert "requires approval" in shown
    denials = [line for line in shown.splitlines() if "permission denied" in line]
    assert any(DENIED in line for line in denials), shown
    assert any("refused.txt" in line for line in denials), shown
    assert not (work / "refused.txt").exists()
    assert API_KEY not in json.dumps(kernel.messages[before:], default=str)
