# ruff: noqa: F811 - the fixtures of test_real_claude are parameters here
"""A run's changes with the real Claude Code CLI in pods, against the scripted model.

The agent writes, edits and commits with its own tools (Write, Edit, Bash ``git commit``)
in a bind-mounted workdir; the changes cldpd captured are compared with the files it left,
byte for byte, applied to a copy of the starting repository, pushed to a bare one, shown
in a cell, and compared across two variants of one issue in a real kernel.

The pods come from tests/test_real_claude.py's fixtures; the runner is a DockerRunner
that can read ended containers (what the engines wiring gives every runner).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_changes_capture import tree
from test_real_claude import (  # noqa: F401 - its fixtures
    API_KEY,
    COSTLY,
    SLOW,
    URL,
    _api_key,
    claude_image,
    offline_pod,
)

from cldpd_magic.engines.docker import DockerRunner
from cldpd_magic.model_server.server import ScriptedModelServer, ToolCall, Turn
from cldpd_magic.render import diff as diff_view
from cldpd_magic.runs import Dispatcher

pytestmark = [
    pytest.mark.docker,
    pytest.mark.claude,
    pytest.mark.skipif(shutil.which("git") is None, reason="needs git on the host"),
]

WORK = "/home/agent/work"
AGENT_UID = 1000
GIT = "git -c user.email=agent@example.com -c user.name=agent"


def host_git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def own(path: Path) -> None:
    """Give the agent (uid 1000 in the container) the workdir, as a clone of its own."""
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), AGENT_UID, AGENT_UID)
    os.chown(path, AGENT_UID, AGENT_UID)


@pytest.fixture
def dispatcher(pods_dir: Path, transcript_dir: Path) -> Dispatcher:
    return Dispatcher(pods_dir, DockerRunner(), transcript_dir)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The pod's workdir as a git repository, and a copy of it as it starts."""
    work = tmp_path / "work"
    work.mkdir()
    host_git(work, "init", "-q", "-b", "main")
    (work / "app.py").write_text("def greet():\n    return 'hello'\n")
    (work / "README.md").write_text("# App\n")
    host_git(work, "add", "-A")
    host_git(work, "commit", "-qm", "start")
    start = tmp_path / "start"
    shutil.copytree(work, start, symlinks=True)
    own(work)
    yield work, start


def agent_turns(greeting: str) -> list[Turn]:
    """An agent that edits, commits, then leaves a new file and an edit uncommitted."""
    return [
        Turn(
            tool_calls=[
                ToolCall(
                    "Edit",
                    {
                        "file_path": f"{WORK}/app.py",
                        "old_string": "'hello'",
                        "new_string": f"'{greeting}'",
                    },
                )
            ]
        ),
        Turn(tool_calls=[ToolCall("Bash", {"command": f"{GIT} commit -qam 'greet: {greeting}'"})]),
        Turn(
            tool_calls=[
                ToolCall(
                    "Write",
                    {
                        "file_path": f"{WORK}/test_app.py",
                        "content": f"from app import greet\n\nassert greet() == '{greeting}'\n",
                    },
                )
            ]
        ),
        Turn(
            tool_calls=[
                ToolCall(
                    "Edit",
                    {
                        "file_path": f"{WORK}/README.md",
                        "old_string": "# App",
                        "new_string": "# App\n\nGreets.",
                    },
                )
            ]
        ),
        Turn(text=f"Done: greet() says {greeting}."),
    ]


ARGS = ["--permission-mode", "acceptEdits", "--allowedTools=Bash", "--model", "claude-scripted-1",
        "--max-turns", "10"]  # fmt: skip


def test_a_git_run_captures_what_the_agent_did_byte_for_byte(dispatcher, offline_pod, repo):
    work, start = repo
    with ScriptedModelServer(agent_turns("hi"), api_key=API_KEY) as server:
        name = offline_pod(server.url, args=ARGS)
        session = dispatcher.start_session(name, URL)
        assert session.wait(180) == 0
    changes = session.changes
    assert changes is not None
    assert {f.path: f.status for f in changes.files} == {
        "app.py": "modified", "test_app.py": "added", "README.md": "modified",
    }  # fmt: skip
    assert [c.split(" ", 1)[1] for c in changes.commits] == ["greet: hi"]
    assert changes.file("app.py").insertions == 1 and changes.file("app.py").deletions == 1
    changes.apply(start)  # a copy of the starting repository
    assert tree(start) == tree(work)  # the files the agent left, byte for byte
    section = diff_view.changes_html(changes, title=session.run)
    assert (changes.file("test_app.py").insertions, changes.file("README.md").insertions) == (3, 2)
    assert f"Changes: 3 files, +6 {diff_view.MINUS}1" in section, changes.summary_line()
    assert "test_app.py" in section
    assert "<span class=\"cldpd-gi\">+    return 'hi'" in section
    assert changes.path is not None and changes.path.parent == session.transcript.parent
    assert API_KEY not in changes.path.read_text()


def test_the_changes_push_to_a_bare_repository(dispatcher, offline_pod, repo, tmp_path):
    work, start = repo
    bare = tmp_path / "origin.git"
    host_git(tmp_path, "clone", "-q", "--bare", str(start), str(bare))
    with ScriptedModelServer(agent_turns("hey"), api_key=API_KEY) as server:
        session = dispatcher.start_session(offline_pod(server.url, args=ARGS), URL)
        session.wait(180)
    commit = session.changes.push(str(bare), "agent/greet")
    assert host_git(bare, "rev-parse", "agent/greet").strip() == commit
    assert host_git(bare, "show", "agent/greet:app.py") == (work / "app.py").read_text()
    assert host_git(bare, "show", "agent/greet:test_app.py") == (work / "test_app.py").read_text()
    assert "greet: hey" in host_git(bare, "log", "-1", "--format=%B", "agent/greet")
    assert (
        host_git(bare, "rev-parse", "agent/greet^").strip()
        == host_git(start, "rev-parse", "HEAD").strip()
    )


def test_a_workdir_outside_git(dispatcher, offline_pod, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("status: draft\n")
    own(work)
    turns = [
        Turn(tool_calls=[ToolCall("Write", {"file_path": f"{WORK}/new.txt", "content": "new\n"})]),
        Turn(
            tool_calls=[
                ToolCall(
                    "Edit",
                    {
                        "file_path": f"{WORK}/notes.md",
                        "old_string": "draft",
                        "new_string": "done",
                    },
                )
            ]
        ),
        Turn(text="Done."),
    ]
    with ScriptedModelServer(turns, api_key=API_KEY) as server:
        session = dispatcher.start_session(offline_pod(server.url, args=ARGS), URL)
        assert session.wait(180) == 0
    changes = session.changes
    assert {f.path: f.status for f in changes.files} == {"new.txt": "added", "notes.md": "modified"}
    assert "+status: done" in changes.diff("notes.md")
    assert not (work / ".git").exists()  # cldpd's own repository is not in the workdir


def test_stopped_and_over_budget_runs_keep_their_changes(dispatcher, offline_pod, tmp_path):
    (tmp_path / "work").mkdir()
    own(tmp_path / "work")
    slow = [
        Turn(tool_calls=[ToolCall("Write", {"file_path": f"{WORK}/half.txt", "content": "1\n"})]),
        Turn(delay=SLOW, text="too late"),
    ]
    with ScriptedModelServer(slow, api_key=API_KEY) as server:
        stopped = dispatcher.start_session(offline_pod(server.url, args=ARGS), URL)
        server.wait_for_turn(1, timeout=120)
        stopped.stop()
    assert stopped.state == "stopped"
    assert [f.path for f in stopped.changes.files] == ["half.txt"]
    loop = Turn(tool_calls=[ToolCall("Bash", {"command": "echo more >> spent.txt"})],
                usage=COSTLY, repeat=10)  # fmt: skip
    with ScriptedModelServer([loop], api_key=API_KEY) as server:
        name = offline_pod(server.url, args=[*ARGS, "--max-turns", "20"],
                           extra={"maxCostUsd": 1.0})  # fmt: skip
        spent = dispatcher.start_session(name, URL)
        spent.wait(180)
    assert spent.stop_reason == "over budget"
    assert [f.path for f in spent.changes.files] == ["spent.txt"]  # half.txt was there at start


def repo_in_image(pods_dir: Path, name: str, start: Path) -> str:
    """Put the starting repository in the pod's image (each run gets its own copy) instead
    of the bind-mounted workdir; the agent's work then lives in its container alone."""
    pod = pods_dir / name
    shutil.copytree(start, pod / "repo", symlinks=True)
    with open(pod / "Dockerfile", "a", encoding="utf-8") as dockerfile:
        dockerfile.write(f"\nCOPY --chown=agent:agent repo/ {WORK}/\n")
    config = json.loads((pod / "pod.json").read_text())
    config["mounts"] = []
    (pod / "pod.json").write_text(json.dumps(config))
    return name


def without_commits(turns: list[Turn]) -> list[Turn]:
    return [t for t in turns if not t.tool_calls or t.tool_calls[0].name != "Bash"]


def test_two_variants_compared_and_a_batchs_dataframe(dispatcher, offline_pod, repo, pods_dir):
    pandas = pytest.importorskip("pandas")
    _work, start = repo
    turns = without_commits(agent_turns("hi")) + without_commits(agent_turns("hey"))
    with ScriptedModelServer(turns, api_key=API_KEY) as server:
        name = repo_in_image(pods_dir, offline_pod(server.url, args=ARGS), start)
        variants = [{"name": "short", "prompt": "Be brief."}, {"name": "long", "prompt": "More."}]
        batch = dispatcher.dispatch(name, URL, variants=variants, max_parallel=1).wait(300)
    frame = batch.to_dataframe()
    assert isinstance(frame, pandas.DataFrame)
    assert {"files_changed", "insertions", "deletions", "patch"} <= set(frame.columns)
    assert list(frame["files_changed"]) == [3, 3]
    assert all(isinstance(p, str) and "diff --git" in p for p in frame["patch"])
    runs = {r.run: r.changes for r in batch.runs}
    text = diff_view.compare_text(runs)
    assert "app.py" in text and "'hi'" in text and "'hey'" in text


KERNEL_SETUP = """
%load_ext cldpd_magic
%config CldpdMagics.pods_dir = {pods!r}
%config CldpdMagics.transcript_dir = {sessions!r}
from cldpd_magic.runs import Dispatcher

assert "cldpd_diff" in get_ipython().magics_manager.magics["line"]
dispatcher = Dispatcher({pods!r}, transcript_dir={sessions!r})
"""


def test_two_variants_compared_with_cldpd_diff_in_a_real_kernel(
    offline_pod, pods_dir, transcript_dir, repo, tmp_path
):
    from kernel_util import KernelSession, outputs

    _work, start = repo
    turns = without_commits(agent_turns("hi")) + without_commits(agent_turns("yo"))
    with ScriptedModelServer(turns, api_key=API_KEY) as server:
        name = repo_in_image(pods_dir, offline_pod(server.url, args=ARGS), start)
        runs = [f"{name}-7", f"{name}-7-2"]  # <pod>-<issue number>, then -2 for the variant
        env = {"ANTHROPIC_API_KEY": API_KEY, "CLDPD_SESSIONS_DIR": str(transcript_dir)}
        with KernelSession(env=env, cwd=str(tmp_path)) as ks:
            ks.execute(KERNEL_SETUP.format(pods=str(pods_dir), sessions=str(transcript_dir)))
            variants = [{"name": "a"}, {"name": "b", "prompt": "Differently."}]
            ks.execute(
                f"batch = dispatcher.dispatch({name!r}, {URL!r}, variants={variants!r},"
                f" max_parallel=1).wait(300)\nassert [r.run for r in batch.runs] == {runs!r}",
                timeout=360,
            )
            compared = outputs(ks.execute(f"%cldpd_diff {runs[0]} {runs[1]}"))
            one = outputs(ks.execute(f"%cldpd_diff {runs[0]} --file app.py"))
            messages = list(ks.messages)
    html = compared[-1]["content"]["data"]["text/html"]
    assert "Changes of 2 runs" in html and "test_app.py" in html
    assert "app.py: how the runs&#x27; versions differ" in html
    assert "-    return 'hi'" in html and "+    return 'yo'" in html
    assert "<span class=\"cldpd-gi\">+    return 'hi'" in one[-1]["content"]["data"]["text/html"]
    assert API_KEY not in json.dumps(messages, default=str)


@pytest.mark.skipif(
    not hasattr(DockerRunner, "capture"),
    reason="the cell's section comes with the engines and magics wiring of issue 22",
)
def test_a_runs_cell_ends_with_its_changes(offline_pod, pods_dir, transcript_dir, repo, tmp_path):
    from kernel_util import KernelSession, outputs, text_of

    _work, start = repo
    with ScriptedModelServer(agent_turns("hi"), api_key=API_KEY) as server:
        name = repo_in_image(pods_dir, offline_pod(server.url, args=ARGS), start)
        env = {"ANTHROPIC_API_KEY": API_KEY, "CLDPD_SESSIONS_DIR": str(transcript_dir)}
        with KernelSession(env=env, cwd=str(tmp_path)) as ks:
            ks.execute(
                f"%load_ext cldpd_magic\n%config CldpdMagics.pods_dir = {str(pods_dir)!r}\n"
                f"%config CldpdMagics.transcript_dir = {str(transcript_dir)!r}"
            )
            shown = outputs(ks.execute(f"run = %cldpd_start {name} {URL}", timeout=300))
    last = shown[-1]["content"]["data"]["text/html"]
    assert f"Changes: 3 files, +6 {diff_view.MINUS}1" in last
    assert "<span class=\"cldpd-gi\">+    return 'hi'" in last
    assert last.index("cldpd-status") < last.index("cldpd-changes")  # at the end of the cell
    assert "Changes: 3 files" in text_of(shown[-1])
