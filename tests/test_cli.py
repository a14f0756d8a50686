"""The cldpd console command, run as a real process against the real engine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_real_claude as real_claude
from fakes import ISSUE_URL as URL
from fakes import FakeRunner

from cldpd_magic import cli
from cldpd_magic.cli import build_parser, main
from cldpd_magic.runs.dispatcher import Dispatcher
from cldpd_magic.runs.registry import LABEL_POD

CLDPD = [sys.executable, "-m", "cldpd_magic.cli"]


def cldpd(pods_dir: Path, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLDPD, "--pods-dir", str(pods_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def spawn(pods_dir: Path, *args: str, stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """``cldpd ARGS`` in the background, stderr piped, output unbuffered."""
    return subprocess.Popen(
        [*CLDPD, "--pods-dir", str(pods_dir), *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def spawn_start(pods_dir: Path, name: str, stdout: int) -> subprocess.Popen[str]:
    """``cldpd start`` in the background, stderr piped, output unbuffered."""
    return spawn(pods_dir, "start", name, "--issue", URL, stdout=stdout)


def read_until(stream, needle: str) -> str:
    """Read lines until one contains needle (fails at end of stream); return what was read."""
    seen = []
    while True:
        line = stream.readline()
        assert line, f"{needle!r} never came; read: {''.join(seen)!r}"
        seen.append(line)
        if needle in line:
            return "".join(seen)


def gone(docker_client, name: str, timeout: float = 15) -> bool:
    """Whether no container cldpd-<name> exists, running or not (waits up to timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not docker_client.containers.list(all=True, filters={"name": f"^cldpd-{name}$"}):
            return True
        time.sleep(0.2)
    return False


def test_parser_needs_issue_for_start():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["start", "pod"])


def test_resume_and_stop_take_a_run(capsys):
    parser = build_parser()
    assert parser.parse_args(["resume", "p-2", "--prompt", "go"]).run == "p-2"
    assert parser.parse_args(["stop", "p"]).run == "p"
    assert parser.parse_args(["start", "p", "--issue", URL]).pod == "p"  # a pod, not a run
    for command in ("resume", "stop"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        shown = capsys.readouterr().out
        assert "RUN" in shown and "a run, or a pod with one run" in shown


def test_unknown_pod_is_one_line_on_stderr(pods_dir, capsys):
    assert main(["--pods-dir", str(pods_dir), "start", "nope", "--issue", URL]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("cldpd: No pod named 'nope'")


def test_bad_url_is_refused(pods_dir, make_pod, capsys):
    name = make_pod("echo hi")
    assert main(["--pods-dir", str(pods_dir), "start", name, "--issue", "ftp://x"]) == 1
    assert "is not an issue URL" in capsys.readouterr().err


def test_list_shows_pods_and_broken_ones(pods_dir, make_pod, capsys, monkeypatch, tmp_path):
    runner = FakeRunner()  # the engine's answer: one run of the good pod
    monkeypatch.setattr(
        cli,
        "Dispatcher",
        lambda pods_dir, engines, **_policy: Dispatcher(pods_dir, runner, tmp_path),
    )
    good = make_pod("echo hi")
    bad = make_pod("echo hi", pod_json="{nope")
    runner.add_container(f"cldpd-{good}", {LABEL_POD: good})
    assert main(["--pods-dir", str(pods_dir), "list"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^{good}  cldpd-{good}  {good}  running$", out, re.MULTILINE), out
    assert bad in out and "malformed JSON at line 1, column 2" in out


def test_list_warns_on_stderr_of_what_each_pod_waives(pods_dir, make_pod, capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    waived = make_pod("echo hi", pod_json={"network": "host", "unsafe": ["network:host"]})
    plain = make_pod("echo hi")
    refused = make_pod("echo hi", pod_json={"capAdd": ["BPF"]})
    assert main(["--pods-dir", str(pods_dir), "list"]) == 1  # no Docker: runs unknown
    captured = capsys.readouterr()
    assert f"{waived}  cldpd-{waived}" in captured.out and f"{plain}  cldpd-{plain}" in captured.out
    assert "capAdd[0] adds BPF, which allows loading BPF programs" in captured.out
    assert 'add "cap:BPF" to "unsafe"' in captured.out  # the refused pod is broken
    warnings = [line for line in captured.err.splitlines() if "unsafe" in line]
    assert warnings == [
        f"cldpd: {waived}: unsafe: shares the host's network (the host's own network: "
        "every service of the host and its loopback)"
    ]
    assert refused not in captured.err


def test_list_without_docker_still_lists_the_pods(pods_dir, make_pod, capsys, monkeypatch):
    name = make_pod("echo hi")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert main(["--pods-dir", str(pods_dir), "list"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].split() == [name, f"cldpd-{name}", "-", "?"]
    said = captured.err.strip()
    assert said.startswith("cldpd: runs not listed: Docker is not reachable") and "\n" not in said


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "soon"])
def test_a_timeout_or_budget_that_is_no_number_is_refused(value, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["stop", "x", "--timeout", value])
    assert stop.value.code == 2
    assert f"argument --timeout: {value!r} is not a number of 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["batch", "x", "--issue", "u", "--budget", value])
    assert "argument --budget" in capsys.readouterr().err


def test_list_shows_each_run_of_a_pod_and_stop_takes_a_run(
    docker_client, pods_dir, transcript_dir, make_pod, capsys
):
    name = make_pod("echo hi", pod_json='{"keepAlive": true}')
    dispatcher = Dispatcher(pods_dir, transcript_dir=transcript_dir)
    first = dispatcher.start_session(name, "https://github.com/o/r/issues/7")
    second = dispatcher.start_session(name, "https://github.com/o/r/issues/8")
    try:
        assert first.wait(60) == 0 and second.wait(60) == 0
        assert main(["--pods-dir", str(pods_dir), "list"]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert rows[0] == ["POD", "IMAGE", "RUN", "STATUS"]
        assert sorted(r[2] for r in rows if r[0] == name) == sorted([first.run, second.run])
        assert (first.run, second.run) == (name, f"{name}-8")
        assert main(["--pods-dir", str(pods_dir), "stop", second.run]) == 0
        assert capsys.readouterr().err == f"cldpd: run {second.run} of pod {name} stopped\n"
        assert main(["--pods-dir", str(pods_dir), "stop", name]) == 0
        assert capsys.readouterr().err == f"cldpd: pod {name} stopped\n"
        assert main(["--pods-dir", str(pods_dir), "stop", name]) == 1
    finally:
        for session in (first, second):
            dispatcher.stop(session.run, 5)


def test_start_streams_output_and_returns_agent_exit_code(docker_client, pods_dir, make_pod):
    name = make_pod('echo "issue: $7"; echo oops >&2; exit 3')
    result = cldpd(pods_dir, "start", name, "--issue", URL)
    assert result.returncode == 3
    assert f"issue: Work on this GitHub issue: {URL}" in result.stdout
    assert "oops" in result.stderr
    assert f"cldpd: building image cldpd-{name}" in result.stderr
    assert "cldpd: transcript: " in result.stderr


def test_stream_json_is_rendered_unless_raw(docker_client, pods_dir, make_pod):
    line = '{"type":"result","subtype":"success","is_error":false,"num_turns":2,"duration_ms":1500,"result":"All done","session_id":"s1","total_cost_usd":0.5}'  # noqa: E501
    name = make_pod(f"echo '{line}'")
    rendered = cldpd(pods_dir, "start", name, "--issue", URL)
    assert "✓ done · 2 turns · 1.5 s · $0.5000 · session s1" in rendered.stdout
    raw = cldpd(pods_dir, "start", name, "--issue", URL, "--raw")
    assert line in raw.stdout


def test_the_final_answer_shows_once_and_an_escaped_secret_is_masked(
    docker_client, pods_dir, make_pod
):
    secret = "s3cr3t-cli-value"
    hidden = "".join(f"\\u{ord(c):04x}" for c in secret)
    answer = '{"type":"assistant","message":{"content":[{"type":"text","text":"Fixed it."}]}}'
    leak = answer.replace("Fixed it.", f"key {hidden}")
    result = '{"type":"result","subtype":"success","is_error":false,"result":"Fixed it."}'
    script = "\n".join(f"printf '%s\\n' '{line}'" for line in (leak, answer, result))
    name = make_pod(script, pod_json={"env": {"API_TOKEN": secret}})
    run = cldpd(pods_dir, "start", name, "--issue", URL)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("Fixed it.") == 1
    assert "key ********" in run.stdout
    assert secret not in run.stdout + run.stderr and hidden not in run.stdout


GRACEFUL = """
trap 'echo got INT; exit 130' INT
trap 'echo got TERM; exit 143' TERM
echo ready
while :; do sleep 1 & wait $!; done
"""


@pytest.mark.docker
@pytest.mark.parametrize(
    ("signum", "said"),
    [
        (signal.SIGINT, "interrupted"),
        (signal.SIGTERM, "got SIGTERM"),
        (signal.SIGHUP, "got SIGHUP"),
    ],
)
def test_a_signal_stops_the_pod_gracefully(docker_client, pods_dir, make_pod, signum, said):
    name = make_pod(GRACEFUL)
    proc = spawn_start(pods_dir, name, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    # Whatever the signal, the agent gets SIGINT first: it ends its turn.
    assert "got INT" in out
    assert f"cldpd: {said}; stopping pod {name} gracefully (interrupt again to kill it)" in err
    assert f"cldpd: pod {name} stopped" in err
    assert gone(docker_client, name)


@pytest.mark.docker
def test_a_second_interrupt_kills_the_pod(docker_client, pods_dir, make_pod):
    name = make_pod(
        """
        trap '' INT TERM
        echo ready
        while :; do sleep 1 & wait $!; done
        """
    )
    proc = spawn_start(pods_dir, name, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    read_until(proc.stderr, f"stopping pod {name} gracefully")
    time.sleep(0.5)  # a person's second Ctrl+C, not timeout(1)'s echo of the first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"cldpd: interrupted again; killing pod {name}" in err
    assert f"cldpd: pod {name} killed" in err
    assert gone(docker_client, name)


@pytest.mark.docker
def test_timeout_with_sigint_leaves_nothing_behind(docker_client, pods_dir, make_pod):
    name = make_pod(GRACEFUL)
    result = subprocess.run(
        ["timeout", "-s", "INT", "5", *CLDPD, "--pods-dir", str(pods_dir), "start", name,
         "--issue", URL],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 124, result.stderr
    # timeout(1) signals the command and then its process group: one request, not two.
    assert "killing" not in result.stderr
    assert gone(docker_client, name)


@pytest.mark.docker
def test_an_interrupted_start_of_a_kept_alive_pod_stops_it(docker_client, pods_dir, make_pod):
    name = make_pod(GRACEFUL, pod_json={"keepAlive": True})
    proc = spawn_start(pods_dir, name, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "got INT" in out
    assert f"cldpd: pod {name} stopped" in err
    assert gone(docker_client, name)


@pytest.mark.docker
def test_an_interrupted_resume_ends_the_turn_then_stops_the_pod(docker_client, pods_dir, make_pod):
    name = make_pod(
        """
        case "$5" in --resume)
            trap 'echo turn ended; exit 130' INT
            echo resuming
            while :; do sleep 1 & wait $!; done;;
        esac
        trap 'echo start ended; exit 0' INT TERM
        while :; do sleep 1 & wait $!; done
        """,
        pod_json={"keepAlive": True},
    )
    start = spawn_start(pods_dir, name, stdout=subprocess.PIPE)
    try:
        assert start.stdout is not None and start.stderr is not None
        read_until(start.stderr, "running in container")
        resume = spawn(pods_dir, "resume", name, "--prompt", "go on")
        assert resume.stdout is not None
        assert resume.stdout.readline().strip() == "resuming"
        resume.send_signal(signal.SIGINT)
        out, err = resume.communicate(timeout=60)
        assert resume.returncode == 130
        assert "turn ended" in out
        assert (
            f"cldpd: interrupted; the agent's turn ends first, then pod {name} stops "
            "gracefully (interrupt again to kill it)"
        ) in err
        assert f"cldpd: pod {name} stopped" in err
        assert start.wait(timeout=60) == 0
        assert "start ended" in start.stdout.read()
        assert gone(docker_client, name)
    finally:
        start.kill()
        start.wait()


#: Clear screen, cursor home, a window title, colours, BELs and a C1 CSI, as printf octal.
HOSTILE_PRINTF = r"\033[2J\033[H\033]0;pwned-title\007\033[31mred\033[0m bell\007 c1\302\23331m end"
HOSTILE = "\x1b[2J\x1b[H\x1b]0;pwned-title\x07\x1b[31mred\x1b[0m bell\x07 c1\x9b31m end"
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.mark.docker
def test_no_terminal_escape_reaches_the_terminal_unless_raw(docker_client, pods_dir, make_pod):
    event = {"type": "assistant", "message": {"content": [{"type": "text", "text": HOSTILE}]}}
    name = make_pod(
        f"""
        printf '{HOSTILE_PRINTF}\\n'
        printf '{HOSTILE_PRINTF}\\n' >&2
        cat <<'EOF'
        {json.dumps(event)}
        EOF
        """
    )
    rendered = cldpd(pods_dir, "start", name, "--issue", URL)
    assert rendered.returncode == 0, rendered.stderr
    for text in (rendered.stdout, rendered.stderr):
        assert not CONTROL_RE.search(text), repr(text)
        assert "pwned-title" not in text
    assert rendered.stdout.count("red bell c1 end") == 2  # the plain line and the JSON one
    assert "red bell c1 end" in rendered.stderr
    raw = cldpd(pods_dir, "start", name, "--issue", URL, "--raw")
    assert HOSTILE in raw.stdout and HOSTILE in raw.stderr


def test_resume_and_stop(docker_client, pods_dir, make_pod):
    name = make_pod(
        """
        case "$5" in --resume) echo "resumed with: $7"; exit 0;; esac
        trap 'exit 0' INT TERM
        while :; do sleep 1 & wait $!; done
        """
    )
    proc = spawn_start(pods_dir, name, stdout=subprocess.DEVNULL)
    try:
        assert proc.stderr is not None
        while "running in container" not in proc.stderr.readline():
            pass
        resumed = cldpd(pods_dir, "resume", name, "--prompt", "and now tests")
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed with: and now tests" in resumed.stdout
        stopped = cldpd(pods_dir, "stop", name)
        assert stopped.returncode == 0
        assert stopped.stderr == f"cldpd: pod {name} stopped\n"
        assert proc.wait(timeout=60) == 0
        again = cldpd(pods_dir, "stop", name)
        assert again.returncode == 1
        assert again.stderr == f"cldpd: pod {name} is not running; nothing to stop\n"
    finally:
        proc.kill()
        proc.wait()


# -- approvals of an interactive run: asked on a terminal, denied without one ------------
# The real Claude Code CLI against the scripted model (tests/test_real_claude.py's pods,
# its fixtures taken under their names).

claude_image = real_claude.claude_image
offline_pod = real_claude.offline_pod
ASKS = [
    real_claude.Turn(tool_calls=[real_claude.ToolCall("Bash", {"command": "touch asked.txt"})]),
    real_claude.Turn(text="My turn is over."),
]
QUESTION = "allow? [y/N/a=always] "


def interactive(offline_pod, url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An interactive pod of the real CLI; the model's key forwarded from this process."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", real_claude.API_KEY)
    return offline_pod(url, args=["--max-turns", "6"], extra={"interactive": True})


def on_a_terminal(pods_dir: Path, name: str, answer: str) -> tuple[int, str]:
    """``cldpd start`` in a pseudo-terminal, answering its question; (exit code, what it showed)."""
    import pexpect

    args = ["-m", "cldpd_magic.cli", "--pods-dir", str(pods_dir), "start", name, "--issue",
            real_claude.URL]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=180)
    try:
        child.expect_exact(QUESTION)
        asked = child.before + child.after
        child.sendline(answer)
        child.expect(pexpect.EOF)
        shown = asked + child.before
    finally:
        child.close()
    return child.exitstatus, shown


@pytest.mark.docker
@pytest.mark.claude
@pytest.mark.parametrize("answer", ["y", "n"])
def test_on_a_terminal_cldpd_asks_and_obeys(pods_dir, offline_pod, tmp_path, monkeypatch, answer):
    with real_claude.ScriptedModelServer(ASKS, api_key=real_claude.API_KEY) as server:
        name = interactive(offline_pod, server.url, monkeypatch)
        code, shown = on_a_terminal(pods_dir, name, answer)
        (result,) = server.conversation_requests()[-1].tool_results()
    assert f"cldpd: {name} asks to run Bash: touch asked.txt\r\n{QUESTION}" in shown
    assert code == 0, shown
    made = (tmp_path / "work" / "asked.txt").exists()
    if answer == "y":
        assert made and not result.get("is_error")
        assert "✓ allowed Bash (by the policy)" in shown
    else:
        assert not made and result.get("is_error")
        assert "A person at the terminal said no." in json.dumps(result)
        assert "⊘ denied Bash: A person at the terminal said no." in shown
    assert "My turn is over." in shown
    assert real_claude.API_KEY not in shown


@pytest.mark.docker
@pytest.mark.claude
def test_without_a_terminal_cldpd_denies_and_says_why(pods_dir, offline_pod, tmp_path, monkeypatch):
    with real_claude.ScriptedModelServer(ASKS, api_key=real_claude.API_KEY) as server:
        name = interactive(offline_pod, server.url, monkeypatch)
        done = cldpd(pods_dir, "start", name, "--issue", real_claude.URL, stdin=subprocess.DEVNULL)
        (result,) = server.conversation_requests()[-1].tool_results()
    assert done.returncode == 0, done.stderr
    assert QUESTION not in done.stderr  # nobody to ask: no question, no wait
    assert not (tmp_path / "work" / "asked.txt").exists()
    said = "cldpd: no one is here to approve Bash"
    assert result.get("is_error") and said in json.dumps(result)
    assert f"⊘ denied Bash: {said}" in done.stdout + done.stderr
