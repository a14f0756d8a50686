"""A run's changes on the host: a patch parsed into files, saved, applied and pushed.

No engine here: the patches come from the host's git (with the flags the capture uses) or
are written out; apply and push use the host's git on repositories made in tmp_path.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cldpd_magic.runs.changes import (
    MINUS,
    ChangeCapture,
    Changes,
    ChangesError,
    FileChange,
    capture_command,
    capture_left_at,
    changes_paths,
    decode_capture,
    find_saved_changes,
    load_changes,
    parse_patch,
    parse_payload,
    unquote_path,
    with_baseline,
)
from cldpd_magic.secrets import MASK, Masker

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git on the host")

SECRET = "sk-live-0123456789abcdef"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent",
}  # fmt: skip
#: The diff options the capture script gives git.
DIFF = ["diff", "--binary", "--full-index", "-M", "-U3", "--no-color", "--no-ext-diff"]


def git(cwd: Path, *args: str, data: bytes | None = None) -> bytes:
    env = {**os.environ, **GIT_ENV}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, input=data)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def make_repo(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    git(path, "add", "-A")
    git(path, "commit", "-qm", "start")
    return path


START = {
    "a.txt": b"one\ntwo\nthree\n",
    "gone.txt": b"bye\n",
    "old name.txt": b"moved\nunchanged\nlines\nhere\n",
    "latin1.txt": b"caf\xe9\n",
    "img.bin": bytes(range(256)),
}


@pytest.fixture
def agent_patch(tmp_path: Path) -> tuple[Path, bytes]:
    """A starting repository, and the patch of an agent's work on a copy of it."""
    start = make_repo(tmp_path / "start", START)
    work = tmp_path / "work"
    shutil.copytree(start, work)
    (work / "a.txt").write_bytes(b"one\n2\nthree\nfour\n")
    (work / "gone.txt").unlink()
    git(work, "mv", "old name.txt", "new name.txt")
    (work / "latin1.txt").write_bytes(b"caf\xe9 cr\xe8me\n")
    (work / "img.bin").write_bytes(bytes(range(255, -1, -1)))
    (work / "new.txt").write_bytes(b"fresh\n")
    (work / "\x1b[31mred.txt").write_bytes(b"<script>alert(1)</script>\n")
    os.symlink("/etc/passwd", work / "link")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "agent")
    return start, git(work, *DIFF, "HEAD~1", "HEAD")


def test_a_patch_is_parsed_into_its_files_and_counts(agent_patch):
    _, patch = agent_patch
    changes = Changes.from_patch(patch)
    by_path = {f.path: f for f in changes.files}
    assert by_path["a.txt"] == FileChange("a.txt", "modified", 2, 1)
    assert by_path["gone.txt"] == FileChange("gone.txt", "deleted", 0, 1)
    assert by_path["new name.txt"].status == "renamed"
    assert by_path["new name.txt"].old_path == "old name.txt"
    assert by_path["img.bin"].binary and by_path["img.bin"].status == "modified"
    assert by_path["new.txt"] == FileChange("new.txt", "added", 1, 0)
    assert by_path["link"].status == "added"
    assert by_path["\x1b[31mred.txt"].status == "added"  # C-quoted by git, read back
    assert by_path["latin1.txt"].insertions == 1
    assert changes.insertions == sum(f.insertions for f in changes.files)
    assert changes.files_changed == len(changes.files) == 8
    assert changes.summary_line() == f"8 files, +{changes.insertions} {MINUS}{changes.deletions}"
    assert not changes.truncated and not changes.secrets and changes.path is None


def test_diff_gives_one_file_or_all(agent_patch):
    _, patch = agent_patch
    changes = Changes.from_patch(patch)
    one = changes.diff("a.txt")
    assert one.startswith("diff --git a/a.txt b/a.txt") and "+four" in one
    assert "new.txt" not in one
    assert changes.diff("old name.txt") == changes.diff("new name.txt")  # by either name
    assert changes.diff() == changes.patch == patch.decode("utf-8", "replace")
    with pytest.raises(KeyError):
        changes.diff("never.txt")


def test_several_sections_of_one_file_add_up():
    patch = (
        "From 1 Mon Sep 17 00:00:00 2001\nSubject: one\n\n---\n"
        "diff --git a/f b/f\nnew file mode 100644\n--- /dev/null\n+++ b/f\n@@ -0,0 +1 @@\n+a\n"
        "From 2 Mon Sep 17 00:00:00 2001\nSubject: two\n\n---\n"
        "diff --git a/f b/f\n--- a/f\n+++ b/f\n@@ -1 +1,2 @@\n a\n+b\n"
    )
    assert parse_patch(patch) == [FileChange("f", "added", 2, 0)]


def test_hunk_lines_that_look_like_headers_are_counted_as_lines():
    patch = "diff --git a/f b/f\n--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n--- x\n+++ y\n"
    assert parse_patch(patch) == [FileChange("f", "modified", 1, 1)]


def test_unquote_path():
    assert unquote_path('"a/\\303\\244 \\"q\\"\\t"') == 'a/ä "q"\t'
    assert unquote_path("plain") == "plain"
    assert unquote_path('"bad \\377"') == "bad \ufffd"


def test_a_secret_in_the_patch_is_masked_and_stops_apply_and_push(agent_patch, tmp_path):
    start, patch = agent_patch
    leaky = (
        patch
        + (
            f"diff --git a/key.env b/key.env\nnew file mode 100644\n--- /dev/null\n+++ b/key.env\n"
            f"@@ -0,0 +1 @@\n+KEY={SECRET}\n"
        ).encode()
    )
    changes = Changes.from_patch(leaky, mask=Masker([SECRET]), commits=[f"abc add {SECRET}"])
    assert changes.secrets
    assert SECRET not in changes.patch and f"KEY={MASK}" in changes.diff("key.env")
    assert SECRET not in changes.commits[0]
    with pytest.raises(ChangesError, match="contains a secret"):
        changes.apply(start)
    with pytest.raises(ChangesError, match="contains a secret"):
        changes.push(str(start), "agent")
    assert git(start, "status", "--porcelain") == b""  # nothing applied
    saved = changes.save(tmp_path / "sessions" / "run-1.jsonl")
    assert SECRET.encode() not in saved.path.read_bytes()
    summary = changes_paths(tmp_path / "sessions" / "run-1.jsonl")[1]
    assert json.loads(summary.read_text())["secrets"] is True
    exported = changes.export(tmp_path / "out.patch")
    assert SECRET.encode() not in exported.read_bytes()
    changes.apply(start, allow_secrets=True)  # the person said so: the real value
    assert (start / "key.env").read_text() == f"KEY={SECRET}\n"


def test_apply_reproduces_the_agents_files_byte_for_byte(agent_patch, tmp_path):
    start, patch = agent_patch
    Changes.from_patch(patch).apply(start)
    work = tmp_path / "work"
    for name in ["a.txt", "latin1.txt", "img.bin", "new.txt", "new name.txt", "\x1b[31mred.txt"]:
        assert (start / name).read_bytes() == (work / name).read_bytes(), name
    assert os.readlink(start / "link") == "/etc/passwd"  # a link, never followed
    assert not (start / "gone.txt").exists()
    assert git(start, "diff", "--cached", "--name-only") == b""  # left unstaged


def test_apply_refuses_a_dirty_tree_and_conflicts_leaving_it_as_it_was(agent_patch):
    start, patch = agent_patch
    changes = Changes.from_patch(patch)
    (start / "a.txt").write_bytes(b"local edit\n")
    with pytest.raises(ChangesError, match="uncommitted changes"):
        changes.apply(start)
    assert (start / "a.txt").read_bytes() == b"local edit\n"
    git(start, "commit", "-qam", "someone else's change")
    head = git(start, "rev-parse", "HEAD")
    with pytest.raises(ChangesError, match="conflict"):
        changes.apply(start)
    assert git(start, "status", "--porcelain") == b""  # nothing half-applied
    assert git(start, "rev-parse", "HEAD") == head
    assert not (start / "new.txt").exists()


def test_apply_merges_three_way_where_the_context_moved(agent_patch):
    start, patch = agent_patch
    (start / "a.txt").write_bytes(b"zero\none\ntwo\nthree\n")  # a line above the hunk
    git(start, "commit", "-qam", "moved")
    lines = b"\n".join(f"line {i}".encode() for i in range(40)) + b"\n"
    (start / "long.txt").write_bytes(lines)
    git(start, "add", "long.txt")
    git(start, "commit", "-qm", "long")
    Changes.from_patch(patch).apply(start)
    assert (start / "a.txt").read_bytes() == b"zero\none\n2\nthree\nfour\n"
    git(start, "reset", "-q", "--hard")
    git(start, "clean", "-qfd")
    with pytest.raises(ChangesError, match=r"conflict|apply cleanly"):
        Changes.from_patch(patch).apply(start, three_way=False)


def test_apply_to_a_plain_directory(tmp_path):
    target = tmp_path / "plain"
    target.mkdir()
    patch = "diff --git a/n.txt b/n.txt\nnew file mode 100644\n--- /dev/null\n+++ b/n.txt\n"
    patch += "@@ -0,0 +1 @@\n+hello\n"
    Changes.from_patch(patch).apply(target)
    assert (target / "n.txt").read_text() == "hello\n"
    with pytest.raises(ChangesError, match="nothing was changed"):
        Changes.from_patch(patch).apply(target)  # a second time: the file is there


def test_push_lands_the_branch_in_a_bare_repository(agent_patch, tmp_path):
    start, patch = agent_patch
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(start), str(bare))
    base = git(start, "rev-parse", "HEAD").decode().strip()
    changes = Changes.from_patch(patch, commits=["abc123 agent: fix"], bases={"": base})
    commit = changes.push(str(bare), "agent/fix-7")
    assert git(bare, "rev-parse", "refs/heads/agent/fix-7").decode().strip() == commit
    assert git(bare, "rev-parse", f"{commit}^").decode().strip() == base
    assert git(bare, "show", f"{commit}:a.txt") == b"one\n2\nthree\nfour\n"
    assert git(bare, "show", f"{commit}:img.bin") == bytes(range(255, -1, -1))
    assert b"abc123 agent: fix" in git(bare, "log", "-1", "--format=%B", commit)
    assert git(bare, "rev-parse", "refs/heads/main").decode().strip() == base  # untouched
    with pytest.raises(ChangesError, match="exists on"):
        Changes.from_patch(patch, bases={"": base}).push(str(bare), "main")
    with pytest.raises(ChangesError, match="branch name"):
        changes.push(str(bare), "bad name")


def test_saved_beside_the_transcript_and_read_back(agent_patch, tmp_path):
    _, patch = agent_patch
    transcript = tmp_path / "sessions" / "pod-1234abcd.jsonl"
    saved = Changes.from_patch(patch, commits=["abc agent"]).save(
        transcript, {"run": "pod-7", "session": "pod-1234abcd", "captured_at": "2026-01-01"}
    )
    assert saved.path == tmp_path / "sessions" / "pod-1234abcd.patch"
    assert saved.path.read_bytes() == patch  # invalid UTF-8 kept as it was
    loaded = load_changes(transcript)
    assert loaded is not None
    assert loaded.files == saved.files and loaded.commits == ["abc agent"]
    assert loaded.raw == patch and loaded.diff("a.txt") == saved.diff("a.txt")
    assert find_saved_changes(tmp_path / "sessions", "pod-7") == transcript
    assert find_saved_changes(tmp_path / "sessions", "pod-1234abcd") == transcript
    assert find_saved_changes(tmp_path / "sessions", "other") is None
    assert load_changes(tmp_path / "sessions" / "none.jsonl") is None
    changes_paths(transcript)[1].write_text("{not json")
    with pytest.raises(ChangesError, match="cannot be read"):
        load_changes(transcript)


def test_decode_capture_reads_base64_and_hex_and_refuses_a_cut_output():
    payload = b"#cldpd v1 ok\n#cldpd patch\n\x00\xff"
    b64 = base64.encodebytes(payload).decode()
    assert (
        decode_capture(
            f"noise\ncldpd-changes begin\ncldpd-changes base64\n{b64}cldpd-changes end\n"
        )
        == payload
    )
    hexed = " ".join(f"{b:02x}" for b in payload)
    assert (
        decode_capture(f"cldpd-changes begin\ncldpd-changes hex\n {hexed}\ncldpd-changes end")
        == payload
    )
    with pytest.raises(ChangesError, match="no complete result"):
        decode_capture(f"cldpd-changes begin\ncldpd-changes base64\n{b64}")


def test_a_truncated_capture_keeps_the_files_and_their_sizes():
    oid_a, oid_b = "a" * 40, "b" * 40
    payload = (
        "#cldpd v1 truncated 5000 100\n#cldpd commit \t" + "c" * 40 + " agent work\n"
        "#cldpd raw \n"
        f":100644 100644 {oid_a} {oid_b} M\tbig.txt\n"
        f':000000 100644 {"0" * 40} {oid_a} A\t"sp\\303\\251cial"\n'
        "#cldpd numstat \n900\t10\tbig.txt\n-\t-\tspécial\n"
        f"#cldpd sizes \n{oid_b} blob 4000\n{oid_a} blob 12\n"
        "#cldpd raw sub/\n"
        f":100644 000000 {oid_a} {'0' * 40} D\tx\n"
        "#cldpd numstat sub/\n0\t1\tx\n"
        f"#cldpd sizes sub/\n{oid_a} blob 12\n"
    ).encode()
    changes = Changes.from_capture(payload)
    assert changes.truncated and changes.patch == ""
    assert changes.files == [
        FileChange("big.txt", "modified", 900, 10, size=4000),
        FileChange("spécial", "added", 0, 0, binary=True, size=12),
        FileChange("sub/x", "deleted", 0, 1, size=12),
    ]
    assert [f.size for f in changes.files] == [4000, 12, 12]  # (not part of equality)
    assert changes.commits == ["cccccccccccc agent work"]
    assert "over the 100 bytes" in changes.notes[-1]
    assert changes.diff("big.txt") == ""
    with pytest.raises(ChangesError, match="size cap"):
        changes.apply(".")
    busybox = b"#cldpd v1 truncated 10 5\n#cldpd files\nA\t3\tnew file\nD\t0\told\n"
    assert [(f.path, f.status, f.size) for f in Changes.from_capture(busybox).files] == [
        ("new file", "added", 3),
        ("old", "deleted", 0),
    ]


def test_a_capture_without_baseline_says_so():
    read = parse_payload(b"#cldpd v1 none\n#cldpd note the run kept no baseline\n")
    assert read.status == "none" and read.notes == ["the run kept no baseline"]
    changes = Changes.from_capture(b"#cldpd v1 none\n#cldpd note the run kept no baseline\n")
    assert changes.files == [] and changes.notes == ("the run kept no baseline",)
    with pytest.raises(ChangesError, match="changed no file"):
        changes.apply(".")


def test_the_scripts_compose_with_the_command_and_capture_to_the_cap():
    agent = ["sh", "-c", "deadline", "cldpd-deadline", "9", "claude", "-p", "x"]
    cmd = with_baseline(agent, 1234)
    assert cmd[:2] == ["sh", "-c"] and cmd[3] == "cldpd-changes"
    assert cmd[4:6] == [capture_left_at(1234), "1234"] and cmd[6:] == agent
    assert cmd[4] == "/tmp/.cldpd-changes-1234.out"
    assert 'exec "$@"' in cmd[2] and cmd[2].rstrip().endswith('exit "$cldpd_code"')
    assert capture_command(1234)[2].rstrip().endswith("cldpd_capture 1234")


def test_the_scripts_run_here_too(tmp_path):
    """The scripts are plain sh: on the host's sh and git, a baseline then a capture."""
    work = make_repo(tmp_path / "w", {"a.txt": b"a\n"})
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, **GIT_ENV, "HOME": str(home)}
    base = subprocess.run(with_baseline(["sh", "-c", "echo agent > b.txt"]), cwd=work, env=env)
    assert base.returncode == 0
    out = subprocess.run(capture_command(10_000), cwd=work, env=env, capture_output=True)
    changes = Changes.from_capture(decode_capture(out.stdout))
    assert [f.path for f in changes.files] == ["b.txt"]
    assert git(work, "status", "--porcelain") == b"?? b.txt\n"  # the index is untouched


class _NoCapture:
    def inspect(self, name):
        return None


def test_change_capture_of_a_runner_without_snapshots():
    assert not ChangeCapture.supported(_NoCapture())  # type: ignore[arg-type]
