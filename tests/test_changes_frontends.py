"""A run's changes in the front ends: ``%cldpd_diff``, ``cldpd diff`` and ``cldpd apply``,
the picker's run entries and the batch panel (its +/- column and compare action).

Sessions here have changes through a capturer of their own (what a runner that reads
ended containers gives every run); runs of another process are read back from what was
saved beside their transcripts. No engine is needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from fakes import FakeRunner
from html_safety import html_problems
from IPython.core.error import UsageError

from cldpd_magic import cli
from cldpd_magic.events import EventType
from cldpd_magic.render import diff as diff_view
from cldpd_magic.render.tables import _TABLE_CSS
from cldpd_magic.runs.changes import Changes
from cldpd_magic.runs.session import Session

PATCH_ONE = (
    "diff --git a/app.py b/app.py\n--- a/app.py\n+++ b/app.py\n@@ -1,2 +1,2 @@\n"
    " def greet():\n-    return 'hello'\n+    return 'hi'\n"
    "diff --git a/new.txt b/new.txt\nnew file mode 100644\n--- /dev/null\n+++ b/new.txt\n"
    "@@ -0,0 +1 @@\n+<script>window.pwned=1</script>\n"
)
PATCH_TWO = PATCH_ONE.replace("'hi'", "'hey'").replace("new.txt", "other.txt")


def save(transcript_dir: Path, run: str, patch: str, session: str = "") -> Changes:
    """Changes of a run of another process, saved beside its transcript."""
    session = session or f"{run}-0000abcd"
    meta = {"run": run, "session": session, "captured_at": "2026-01-01T00:00:00"}
    return Changes.from_patch(patch).save(transcript_dir / f"{session}.jsonl", meta)


def session_with(transcript_dir: Path, run: str, patch: str, secrets=()) -> Session:
    """A finished session whose job captured ``patch`` as the run's changes."""

    def job(ctl) -> int:
        ctl.set_capturer(lambda s: Changes.from_patch(patch, mask=s.mask))
        ctl.emit(EventType.CONTAINER_STARTED, f"cldpd-{run}")
        ctl.capture_changes()
        return 0

    session = Session(run, f"cldpd-{run}", job, transcript_dir, secrets, run=run)
    session.wait(10)
    return session


@pytest.fixture
def ip(ip):
    """The shell of conftest's ``ip``, its magics on a fake engine."""
    ip.magics_manager.registry["CldpdMagics"].runner = FakeRunner()
    return ip


def test_cldpd_diff_of_one_run_a_file_and_two_runs(ip, transcript_dir):
    save(transcript_dir, "web-1", PATCH_ONE)
    save(transcript_dir, "web-1-2", PATCH_TWO)
    one = ip.run_line_magic("cldpd_diff", "web-1")
    page = one._repr_html_()
    assert "web-1 · Changes: 2 files, +2" in page and "<details" in page
    assert html_problems(page, (diff_view.DIFF_CSS,)) == []
    assert one["web-1"].file("new.txt").status == "added"
    assert "+    return 'hi'" in one.text()
    only = ip.run_line_magic("cldpd_diff", "web-1 --file app.py")._repr_html_()
    assert "app.py" in only and "new.txt" not in only
    both = ip.run_line_magic("cldpd_diff", "web-1 web-1-2")
    page = both._repr_html_()
    assert "Changes of 2 runs" in page and "app.py: how the runs" in page
    assert html_problems(page, (diff_view.DIFF_CSS, _TABLE_CSS)) == []
    assert "-    return 'hi'" in both.text() and "+    return 'hey'" in both.text()


def test_cldpd_diff_says_what_is_wrong_in_one_sentence(ip, transcript_dir):
    save(transcript_dir, "web-1", PATCH_ONE)
    with pytest.raises(UsageError, match="No changes of run nope are known here"):
        ip.run_line_magic("cldpd_diff", "nope")
    with pytest.raises(UsageError, match="Name each run once"):
        ip.run_line_magic("cldpd_diff", "web-1 web-1")
    with pytest.raises(UsageError, match="No run named changed 'zzz'"):
        ip.run_line_magic("cldpd_diff", "web-1 --file zzz")
    with pytest.raises(UsageError):
        ip.run_line_magic("cldpd_diff", "../etc")


def test_cldpd_diff_of_a_session_of_this_kernel_masks_its_secrets(ip, transcript_dir):
    secret = "tok-0123456789abcdef"
    session = session_with(transcript_dir, "local-1", PATCH_ONE + f"+{secret}\n", [secret])
    core = ip.magics_manager.registry["CldpdMagics"]
    core.dispatcher.registry.register(session)
    shown = ip.run_line_magic("cldpd_diff", "local-1")
    assert shown["local-1"] is session.changes
    assert secret not in shown._repr_html_() and secret not in shown.text()


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}  # fmt: skip
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git on the host")
def test_cldpd_diff_and_apply_in_a_terminal(transcript_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLDPD_SESSIONS_DIR", str(transcript_dir))
    monkeypatch.setattr(cli, "Dispatcher", _offline_dispatcher)
    save(transcript_dir, "web-1", PATCH_ONE)
    save(transcript_dir, "web-1-2", PATCH_TWO)
    assert cli.main(["diff", "web-1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Changes: 2 files, +2") and "  A new.txt" in out and "\x1b" not in out
    assert cli.main(["diff", "web-1", "--color", "always"]) == 0
    assert "\x1b[" in capsys.readouterr().out
    assert cli.main(["diff", "web-1", "web-1-2"]) == 0
    assert "how the runs' versions differ" in capsys.readouterr().out
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "app.py").write_text("def greet():\n    return 'hello'\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "start")
    (repo / "app.py").write_text("dirty\n")
    assert cli.main(["apply", "web-1", "--to", str(repo)]) == 1
    assert "uncommitted changes" in capsys.readouterr().err
    git(repo, "checkout", "app.py")
    assert cli.main(["apply", "web-1", "--to", str(repo)]) == 0
    assert "applied to" in capsys.readouterr().err
    assert (repo / "app.py").read_text() == "def greet():\n    return 'hi'\n"
    assert cli.main(["diff", "nope"]) == 1
    assert "No changes of run nope" in capsys.readouterr().err


def _offline_dispatcher(pods_dir=None, engines=None, **_kwargs):
    from cldpd_magic.runs import Dispatcher

    return Dispatcher(pods_dir, FakeRunner())


def test_the_picker_ends_a_runs_entry_with_its_changes(pods_dir, transcript_dir):
    from cldpd_magic.picker import PodPicker
    from cldpd_magic.picker.state import FollowedRun
    from cldpd_magic.render import SessionView

    picker = PodPicker(pods_dir, dispatcher=_offline_dispatcher(pods_dir))
    try:
        session = session_with(transcript_dir, "p-1", PATCH_ONE)
        view = SessionView("p-1", session=session)
        for event in session.events():
            view.add(event)
        control = picker._blank
        run = FollowedRun(session, view)
        control.add_run(run)
        picker._publish(control, run, final=True)
        page = run.entry["data"]["text/html"]
        assert "Changes: 2 files, +2" in page and "app.py" in page
        assert html_problems(page.replace(view.html(), ""), (diff_view.DIFF_CSS,)) == []
    finally:
        picker.close()


class _Batch:
    def __init__(self, runs: list[Session]) -> None:
        self.runs = runs
        self.done = True

    def stop(self) -> None:
        pass


def test_the_batch_panel_has_a_plus_minus_column_and_compares(transcript_dir):
    from cldpd_magic.picker import BatchPanel

    one = session_with(transcript_dir, "b-1", PATCH_ONE)
    two = session_with(transcript_dir, "b-2", PATCH_TWO)
    panel = BatchPanel(_Batch([one, two]), interval=0.02)
    try:
        assert panel.join(30)
        table = panel.view.table()
        assert table.columns[-1] == "+/-"
        assert [row[-1] for row in table.rows] == [f"2 files +2 {diff_view.MINUS}1"] * 2
        panel.compare_select.value = ("b-1", "b-2")
        panel.compare_button.click()
        page = panel.comparison.value
        assert "Changes of 2 runs" in page and "app.py" in page
        assert html_problems(page, (diff_view.DIFF_CSS, _TABLE_CSS)) == []
        panel.compare_select.value = ("b-1",)
        panel.compare_button.click()
        assert "b-1 · Changes: 2 files" in panel.comparison.value
    finally:
        panel.close()


def test_the_batch_panel_says_when_no_run_has_changes(transcript_dir):
    from cldpd_magic.picker import BatchPanel

    def job(ctl) -> int:
        return 0

    plain = Session("n", "cldpd-n", job, transcript_dir, run="n")
    plain.wait(10)
    panel = BatchPanel(_Batch([plain]), interval=0.02)
    try:
        assert panel.join(30)
        assert panel.view.table().rows[0][-1] == "-"
        panel.compare_button.click()
        assert "No run chosen has changes" in panel.notice.value
    finally:
        panel.close()


def test_a_session_without_a_capturer_says_so(transcript_dir):
    from cldpd_magic.runs.changes import ChangesError

    done = threading.Event()

    def job(ctl) -> int:
        done.wait(5)
        return 0

    session = Session("q", "cldpd-q", job, transcript_dir, run="q")
    try:
        assert session.changes is None
        with pytest.raises(ChangesError, match="has no changes to capture"):
            session.capture_changes()
    finally:
        done.set()
        session.wait(10)
