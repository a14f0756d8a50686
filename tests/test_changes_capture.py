"""The capture of a run's changes in real containers, on the real engine.

The scripts (``cldpd_magic/data/changes``) run in busybox (no git: a copy or a listing of
the workdir) and in cldpd-debian:bookworm (git: repositories, a workdir outside git),
through docker-py exec, and through :class:`Snapshots` in a container that has ended. Then
whole runs of busybox pods through the Dispatcher: every run ends with its changes (also
a failed, a stopped and an over-budget one), a kept-alive run's on demand, a batch's.

The runner here is a DockerRunner with ``capture`` (what the engines wiring adds to it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cldpd_magic.engines.docker import DockerRunner
from cldpd_magic.engines.docker.snapshots import LABEL_SNAPSHOT, Snapshots
from cldpd_magic.errors import CldpdError
from cldpd_magic.runs import Dispatcher
from cldpd_magic.runs.changes import (
    SIGNAL_GROUP_ENV,
    Changes,
    capture_command,
    capture_left_at,
    capture_script,
    changes_paths,
    decode_capture,
    load_changes,
    with_baseline,
)
from cldpd_magic.secrets import MASK

GIT_IMAGE = "cldpd-debian:bookworm"
BUSYBOX = "busybox:latest"
pytestmark = pytest.mark.docker

URL = "https://github.com/octocat/Hello-World/issues/3"
GIT_ID = "git config --global user.email a@example.com && git config --global user.name agent"


class Box:
    """A long-lived test container with a workdir, driven through docker-py exec."""

    def __init__(self, client, image: str, workdir: str = "/w") -> None:
        self.client = client
        self.workdir = workdir
        self.container = client.containers.run(
            image, ["sh", "-c", "sleep 3600"], detach=True, working_dir="/",
            labels={"cldpd.test": "1"}, name=f"cldpd-test-changes-{uuid.uuid4().hex[:8]}",
        )  # fmt: skip
        self.sh(f"mkdir -p {workdir}", cwd="/")

    def sh(self, script: str, cwd: str | None = None) -> bytes:
        result = self.container.exec_run(["sh", "-c", script], workdir=cwd or self.workdir)
        assert result.exit_code == 0, result.output.decode(errors="replace")
        return result.output

    def baseline(self) -> None:
        result = self.container.exec_run(
            with_baseline(["sh", "-c", "echo agent-starts"]), workdir=self.workdir
        )
        assert result.output == b"agent-starts\n"

    def capture(self, max_bytes: int = 20 * 1024 * 1024) -> Changes:
        result = self.container.exec_run(capture_command(max_bytes), workdir="/", demux=True)
        out, err = result.output
        assert result.exit_code == 0, (err or b"").decode()
        return Changes.from_capture(decode_capture(out or b""))

    def files(self, dest: Path) -> Path:
        """The workdir's files, copied to ``dest`` (links kept as links)."""
        stream, _ = self.container.get_archive(self.workdir)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            tar.extractall(dest, filter="tar")
        return dest / Path(self.workdir).name

    def remove(self) -> None:
        self.container.remove(force=True)


@pytest.fixture
def box(docker_client) -> Iterator:
    made: list[Box] = []

    def make(image: str, workdir: str = "/w") -> Box:
        made.append(Box(docker_client, image, workdir))
        return made[-1]

    yield make
    for b in made:
        b.remove()


def _git_image(docker_client) -> None:
    try:
        docker_client.images.get(GIT_IMAGE)
    except Exception:
        pytest.skip(f"no {GIT_IMAGE} image; run scripts/setup")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (``.git`` left out) by path: contents, or a link's target."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if ".git" in rel.parts:
            continue
        if path.is_symlink():
            found[str(rel)] = b"-> " + os.readlink(path).encode()
        elif path.is_file():
            found[str(rel)] = path.read_bytes()
    return found


AGENT_WORK = r"""
set -e
{git_id}
printf 'one\n2\nthree\nfour\n' > a.txt
git commit -qam 'agent: fix a'
git rm -q gone.txt
git mv 'old name.txt' 'new name.txt'
printf 'caf\351 cr\350me\n' > latin1.txt
printf '\000\001\002binary' > img.bin
printf 'fresh\n' > new.txt
printf '<script>alert(1)</script>\n' > "$(printf '\033[31m<img src=x onerror=alert(1)>.txt')"
ln -s /etc/passwd link
mkdir -p deep/er && printf 'x\n' > deep/er/file.txt
printf 'ignored\n' > build.log
""".replace("{git_id}", GIT_ID)

START = r"""
set -e
{git_id}
git init -q -b main .
printf 'one\ntwo\nthree\n' > a.txt
printf 'bye\n' > gone.txt
printf 'moved\nkept\n' > 'old name.txt'
printf 'caf\351\n' > latin1.txt
printf '*.log\n' > .gitignore
git add -A && git commit -qm start
""".replace("{git_id}", GIT_ID)


def test_a_git_workdir_patch_applies_to_the_start_byte_for_byte(box, docker_client, tmp_path):
    _git_image(docker_client)
    b = box(GIT_IMAGE)
    b.sh(START)
    start = b.files(tmp_path / "start")
    b.baseline()
    b.sh(AGENT_WORK)
    changes = b.capture()
    after = b.files(tmp_path / "after")
    status = {f.path: f.status for f in changes.files}
    assert status == {
        "\x1b[31m<img src=x onerror=alert(1)>.txt": "added", "a.txt": "modified",
        "deep/er/file.txt": "added", "gone.txt": "deleted", "img.bin": "added",
        "latin1.txt": "modified", "link": "added", "new name.txt": "renamed", "new.txt": "added",
    }  # fmt: skip
    assert [c.split(" ", 1)[1] for c in changes.commits] == ["agent: fix a"]
    assert changes.file("img.bin").binary and "build.log" not in changes.patch
    assert len(changes.bases[""]) == 40
    Changes.from_patch(changes.raw or b"").apply(start)
    expected = tree(after)
    assert expected.pop("build.log") == b"ignored\n"  # ignored by .gitignore: not a change
    assert tree(start) == expected  # the agent's files, byte for byte


def test_the_baseline_and_the_capture_write_nothing_in_the_repository(box, docker_client):
    _git_image(docker_client)
    b = box(GIT_IMAGE)
    b.sh(START)
    # Every file's content, every file's and directory's size and time, under .git.
    listing = "find .git -type f | xargs md5sum | sort; find .git -exec stat -c '%n %s %Y' {} +"
    before = b.sh(listing)
    b.baseline()
    b.sh("echo more >> a.txt && echo new > new.txt")
    assert {f.path for f in b.capture().files} == {"a.txt", "new.txt"}
    assert b.sh(listing) == before
    b.sh("git add a.txt")  # control: a change to the repository is seen
    assert b.sh(listing) != before


def test_what_was_dirty_at_the_start_is_not_the_agents(box, docker_client):
    _git_image(docker_client)
    b = box(GIT_IMAGE)
    b.sh(START + "printf 'dirty\\n' >> a.txt; printf 'untracked\\n' > before.txt")
    b.baseline()
    b.sh("printf 'agent\\n' >> a.txt")
    changes = b.capture()
    assert [f.path for f in changes.files] == ["a.txt"]
    assert "+agent" in changes.diff("a.txt") and "+dirty" not in changes.diff("a.txt")
    assert changes.commits == []
    control = b.capture()  # the same twice: the capture changed nothing
    assert control.patch == changes.patch


def test_a_repository_the_agent_cloned_shows_only_its_own_work(box, docker_client):
    _git_image(docker_client)
    b = box(GIT_IMAGE)
    b.sh(START)
    b.sh(f"{GIT_ID} && mkdir /src && cd /src && git init -q && seq 1 50 > lib.txt && "
         "git add -A && git commit -qm upstream", cwd="/")  # fmt: skip
    b.baseline()
    b.sh(f"{GIT_ID} && git clone -q /src vendor/lib && cd vendor/lib && "
         "git checkout -qb fix && echo 51 >> lib.txt && git commit -qam 'lib: add 51' && "
         "echo wip > wip.txt")  # fmt: skip
    changes = b.capture()
    assert sorted(f.path for f in changes.files) == ["vendor/lib/lib.txt", "vendor/lib/wip.txt"]
    assert changes.file("vendor/lib/lib.txt").insertions == 1
    assert [c.split(" ", 2)[0] + " " + c.split(" ", 2)[2] for c in changes.commits] == [
        "vendor/lib: lib: add 51"
    ]


def test_a_workdir_outside_git_is_compared_through_a_repository_of_cldpds(box, docker_client):
    _git_image(docker_client)
    b = box(GIT_IMAGE)
    b.sh("printf 'a\\n' > a.txt && printf 'b\\n' > b.txt && mkdir sub && printf 's\\n' > sub/s")
    b.baseline()
    b.sh("printf 'a2\\n' >> a.txt && rm b.txt && printf 'n\\n' > new.txt && ln -s .. up")
    changes = b.capture()
    assert {f.path: f.status for f in changes.files} == {
        "a.txt": "modified", "b.txt": "deleted", "new.txt": "added", "up": "added",
    }  # fmt: skip
    assert b.sh("ls -A") == b"a.txt\nnew.txt\nsub\nup\n"  # no .git appeared


def test_the_home_as_workdir_leaves_out_the_agents_own_files(box, docker_client):
    _git_image(docker_client)
    b = box(GIT_IMAGE, workdir="/root")
    b.baseline()
    b.sh("mkdir -p .claude && echo s > .claude/session.jsonl && echo x > .claude.json "
         "&& echo w > work.txt")  # fmt: skip
    assert [f.path for f in b.capture().files] == ["work.txt"]


def test_over_the_cap_only_the_files_and_sizes_are_kept(box, docker_client):
    _git_image(docker_client)
    b = box(GIT_IMAGE)
    b.sh(START)
    b.baseline()
    b.sh("seq 1 5000 > big.txt && printf 'x\\n' >> a.txt && git rm -q gone.txt")
    changes = b.capture(max_bytes=1000)
    assert changes.truncated and changes.patch == ""
    by_path = {f.path: f for f in changes.files}
    assert by_path["big.txt"].size == len("\n".join(map(str, range(1, 5001)))) + 1
    assert by_path["big.txt"].insertions == 5000 and by_path["gone.txt"].status == "deleted"
    assert "over the 1,000 bytes" in changes.notes[-1]
    assert not b.capture(max_bytes=10**7).truncated  # control: under the cap, the patch


def test_busybox_without_git_copies_the_workdir_and_diffs_it(box):
    b = box(BUSYBOX)
    b.sh("printf 'one\\ntwo\\n' > a.txt && printf 'keep\\n' > k.txt && printf 'x\\000y' > b.bin")
    b.baseline()
    b.sh("printf 'three\\n' >> a.txt && rm k.txt && printf 'new\\n' > 'new file.txt' "
         "&& printf 'x\\000z' > b.bin && ln -s /etc/passwd link")  # fmt: skip
    changes = b.capture()
    assert {(f.path, f.status, f.insertions, f.deletions, f.binary) for f in changes.files} == {
        ("a.txt", "modified", 1, 0, False), ("k.txt", "deleted", 0, 1, False),
        ("new file.txt", "added", 1, 0, False), ("b.bin", "modified", 0, 0, True),
        ("link", "added", 1, 0, False),
    }  # fmt: skip
    assert "+three" in changes.diff("a.txt")


def test_busybox_with_a_large_workdir_lists_it(box):
    b = box(BUSYBOX)
    b.sh("dd if=/dev/zero of=big bs=1M count=33 2>/dev/null && echo a > a.txt")
    b.baseline()
    assert b.sh("cat $HOME/.cache/cldpd/changes/mode") == b"list\n"
    b.sh("echo b > b.txt && echo aa > a.txt")
    changes = b.capture()
    assert {(f.path, f.status) for f in changes.files} == {
        ("a.txt", "modified"),
        ("b.txt", "added"),
    }
    assert changes.diff("a.txt").count("\n") == 1  # no copy to compare with: named only


def test_a_run_that_kept_no_baseline_says_so(box):
    b = box(BUSYBOX)
    changes = b.capture()
    assert changes.files == [] and "no baseline" in changes.notes[0]


def test_an_ended_container_is_read_through_a_snapshot(docker_client):
    runner = DockerRunner()
    name = f"cldpd-test-snap-{uuid.uuid4().hex[:8]}"
    container = docker_client.containers.create(
        BUSYBOX, with_baseline(["sh", "-c", "mkdir -p d && echo made > d/new.txt && exit 3"]),
        working_dir="/w", labels={"cldpd.test": "1"}, name=name,
    )  # fmt: skip
    try:
        container.start()
        assert container.wait()["StatusCode"] == 3
        out = Snapshots(runner.connection).capture(name, capture_script())
        changes = Changes.from_capture(decode_capture(out))
        assert [f.path for f in changes.files] == ["d/new.txt"]
        assert "+made" in changes.diff("d/new.txt")
    finally:
        container.remove(force=True)
    assert not docker_client.containers.list(all=True, filters={"label": LABEL_SNAPSHOT})
    assert not docker_client.images.list(filters={"label": LABEL_SNAPSHOT})


LEFT_BEHIND = (
    # Left running by the agent: a forger of the capture's file, and a late writer.
    "(while :; do echo forged > " + capture_left_at() + "; done) & "
    "(sleep 1; echo late > late.txt) & "
    "mkdir -p d && echo made > d/new.txt && exit 3"
)


def test_an_ended_container_leaves_its_capture_and_nothing_it_left_running_touches_it(
    docker_client,
):
    """The container's own command captures as its agent ends: read from the ended
    container (no snapshot: a script that would fail is never run), with the agent's
    leftover processes killed first, and the agent's exit code kept."""
    runner = DockerRunner()
    name = f"cldpd-test-left-{uuid.uuid4().hex[:8]}"
    container = docker_client.containers.create(
        BUSYBOX, with_baseline(["sh", "-c", LEFT_BEHIND]), init=True,
        environment=SIGNAL_GROUP_ENV, working_dir="/w", labels={"cldpd.test": "1"}, name=name,
    )  # fmt: skip
    try:
        container.start()
        assert container.wait(timeout=60)["StatusCode"] == 3
        out = Snapshots(runner.connection).capture(name, "exit 9", left_at=capture_left_at())
        changes = Changes.from_capture(decode_capture(out))
        assert [f.path for f in changes.files] == ["d/new.txt"]
        with pytest.raises(CldpdError, match="exit 9"):  # the control: no file, the script
            Snapshots(runner.connection).capture(name, "exit 9", left_at="/tmp/none")
    finally:
        container.remove(force=True)
    assert not docker_client.images.list(filters={"label": LABEL_SNAPSHOT})


# --- whole runs ----------------------------------------------------------------------

POD_DOCKERFILE = (
    "FROM busybox:latest\nWORKDIR /work\nRUN printf 'start\\n' > /work/a.txt\n"
    "COPY claude /usr/local/bin/claude\nRUN chmod +x /usr/local/bin/claude\n"
)


@pytest.fixture
def dispatcher(pods_dir: Path, transcript_dir: Path) -> Dispatcher:
    return Dispatcher(pods_dir, DockerRunner(), transcript_dir)


def _pod(make_pod, script: str, **config) -> str:
    return make_pod(script, pod_json={"workdir": "/work", **config}, dockerfile=POD_DOCKERFILE)


def test_a_run_ends_with_its_changes_saved_beside_its_transcript(dispatcher, make_pod):
    name = _pod(make_pod, "echo agent >> a.txt; echo new > new.txt; echo done")
    session = dispatcher.start_session(name, URL)
    assert session.wait(120) == 0
    changes = session.changes
    assert changes is not None and {f.path for f in changes.files} == {"a.txt", "new.txt"}
    assert changes.path == changes_paths(session.transcript)[0] and changes.path.exists()
    summary = json.loads(changes_paths(session.transcript)[1].read_text())
    assert summary["run"] == session.run and summary["files_changed"] == 2
    assert load_changes(session.transcript).diff("a.txt") == changes.diff("a.txt")
    assert dispatcher.changes(session.run).diff() == changes.diff()
    assert dispatcher.runner.inspect(session.container) is None  # removed after the capture


def test_failed_stopped_and_over_budget_runs_keep_their_changes(dispatcher, make_pod):
    failed = _pod(make_pod, "echo f > failed.txt; exit 7")
    stopped = _pod(make_pod, "echo s > stopped.txt; echo started; sleep 300")
    result = json.dumps({"type": "result", "subtype": "success", "is_error": False,
                         "num_turns": 1, "total_cost_usd": 5.0, "result": "spent"})  # fmt: skip
    spent = _pod(make_pod, f"echo b > spent.txt; echo '{result}'; sleep 300", maxCostUsd=1)
    runs = [dispatcher.start_session(n, URL) for n in (failed, stopped, spent)]
    for event in runs[1].events():
        if event.data == "started":
            break
    runs[1].stop(5)
    for run in runs:
        run.wait(120)
    assert (runs[0].exit_code, runs[1].state, runs[2].stop_reason) == (7, "stopped", "over budget")
    for run, path in zip(runs, ["failed.txt", "stopped.txt", "spent.txt"], strict=True):
        assert run.changes is not None and [f.path for f in run.changes.files] == [path]
        assert dispatcher.runner.inspect(run.container) is None


def test_a_stop_reaches_the_agent_through_the_capture_and_its_changes_are_kept(
    dispatcher, make_pod
):
    name = _pod(make_pod, "trap 'echo got-int > int.txt; echo got-int; exit 130' INT; "
                "echo started; while :; do sleep 0.1; done")  # fmt: skip
    session = dispatcher.start_session(name, URL)
    for event in session.events():
        if event.data == "started":
            break
    session.stop(20)
    session.wait(60)
    assert session.state == "stopped"
    assert "got-int" in [e.data for e in session.events()]
    assert session.changes is not None and [f.path for f in session.changes.files] == ["int.txt"]
    assert dispatcher.runner.inspect(session.container) is None


def test_a_kept_alive_run_captures_on_demand_and_after_a_resume(dispatcher, make_pod, monkeypatch):
    monkeypatch.setenv("PASSWORD_FOR_TEST", "hunter2-secret-value")
    name = _pod(make_pod, 'echo "$*" | grep -q -- --resume || echo first > first.txt; '
                'echo "$*" | grep -q again && echo "key $PASSWORD_FOR_TEST" > second.txt; true',
                keepAlive=True, inheritEnv=["PASSWORD_FOR_TEST"])  # fmt: skip
    try:
        first = dispatcher.start_session(name, URL)
        first.wait(120)
        assert [f.path for f in first.changes.files] == ["first.txt"]
        second = dispatcher.resume_session(name, "again")
        second.wait(60)
        assert sorted(f.path for f in second.changes.files) == ["first.txt", "second.txt"]
        assert second.changes.secrets and MASK in second.changes.diff("second.txt")
        assert "hunter2-secret-value" not in second.changes.path.read_text()
        now = first.capture_changes()  # the container still runs: an exec
        assert now.files == second.changes.files
    finally:
        dispatcher.stop(name)


def test_a_batch_has_the_columns_of_its_runs_changes(dispatcher, make_pod):
    pandas = pytest.importorskip("pandas")
    name = _pod(make_pod, "seq 1 3 > lines.txt")
    batch = dispatcher.dispatch(name, [URL, URL.replace("/3", "/4")], max_parallel=2).wait(180)
    frame = batch.to_dataframe()
    assert isinstance(frame, pandas.DataFrame)
    assert list(frame["files_changed"]) == [1, 1] and list(frame["insertions"]) == [3, 3]
    assert list(frame["deletions"]) == [0, 0]
    assert all("+3" in patch for patch in frame["patch"])


class NoSnapshots(DockerRunner):
    """A runner whose engine cannot read ended containers (no ``capture``)."""

    capture = None


def test_a_runner_that_cannot_read_ended_containers_takes_no_baseline(
    make_pod, pods_dir, transcript_dir
):
    plain = Dispatcher(pods_dir, NoSnapshots(), transcript_dir)
    name = _pod(make_pod, 'echo "$0 $*" > x.txt')
    session = plain.start_session(name, URL)
    session.wait(120)
    assert session.changes is None  # a control: the same run through a DockerRunner has them
    with pytest.raises(CldpdError, match="has no changes to capture"):
        session.capture_changes()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git on the host")
def test_the_host_needs_no_git_to_capture(box, docker_client, monkeypatch):
    _git_image(docker_client)
    b = box(GIT_IMAGE)
    b.sh(START)
    b.baseline()
    b.sh("echo more >> a.txt")
    monkeypatch.setenv("PATH", "/nonexistent")  # no git here from now on
    assert [f.path for f in b.capture().files] == ["a.txt"]
