"""The cldpd console command, run as a real process against the real engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cldpd_magic.cli import build_parser, main

URL = "https://github.com/octocat/Hello-World/issues/1"
CLDPD = [sys.executable, "-m", "cldpd_magic.cli"]


def cldpd(pods_dir: Path, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLDPD, "--pods-dir", str(pods_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def spawn_start(pods_dir: Path, name: str, stdout: int) -> subprocess.Popen[str]:
    """``cldpd start`` in the background, stderr piped, output unbuffered."""
    return subprocess.Popen(
        [*CLDPD, "--pods-dir", str(pods_dir), "start", name, "--issue", URL],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_parser_needs_issue_for_start():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["start", "pod"])


def test_unknown_pod_is_one_line_on_stderr(pods_dir, capsys):
    assert main(["--pods-dir", str(pods_dir), "start", "nope", "--issue", URL]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("cldpd: No pod named 'nope'")


def test_bad_url_is_refused(pods_dir, make_pod, capsys):
    name = make_pod("echo hi")
    assert main(["--pods-dir", str(pods_dir), "start", name, "--issue", "ftp://x"]) == 1
    assert "is not an issue URL" in capsys.readouterr().err


def test_list_shows_pods_and_broken_ones(pods_dir, make_pod, capsys):
    good = make_pod("echo hi")
    bad = make_pod("echo hi", pod_json="{nope")
    assert main(["--pods-dir", str(pods_dir), "list"]) == 0
    out = capsys.readouterr().out
    assert f"{good}  cldpd-{good}" in out
    assert bad in out and "malformed JSON at line 1, column 2" in out


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


def test_ctrl_c_stops_the_pod_gracefully(docker_client, pods_dir, make_pod):
    name = make_pod(
        """
        trap 'echo got INT; exit 130' INT
        echo ready
        while :; do sleep 1 & wait $!; done
        """
    )
    proc = spawn_start(pods_dir, name, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "got INT" in out
    assert f"stopping pod {name} gracefully" in err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not docker_client.containers.list(all=True, filters={"name": f"cldpd-{name}"}):
            break
        time.sleep(0.2)
    assert not docker_client.containers.list(all=True, filters={"name": f"cldpd-{name}"})


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
        assert f"pod {name} stopped" in stopped.stderr
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
