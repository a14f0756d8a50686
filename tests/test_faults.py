"""Faults: transcripts that cannot be written or read, secrets hidden behind escapes."""

from __future__ import annotations

import errno
import html
import io
import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cldpd_magic import BuildFailedError, Event, EventType, Session
from cldpd_magic.runs import session as session_module
from cldpd_magic.runs.session import SessionControl

E = EventType
SECRET = 'pa"ss/wörd&<42>😀'
CODE = 7


def make_session(transcript_dir: Path, job: Callable[[SessionControl], int], **kw) -> Session:
    return Session("pod", "cldpd-pod", job, transcript_dir, **kw)


def lines_job(count: int, width: int = 100, code: int = CODE) -> Callable[[SessionControl], int]:
    def job(ctl: SessionControl) -> int:
        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        for i in range(count):
            ctl.stdout.write(f"{i:07d}{'x' * width}\n")
        return code

    return job


def outputs(events: list[Event]) -> list[str]:
    return [e.data for e in events if e.type is E.OUTPUT]


def notices(events: list[Event]) -> list[str]:
    return [e.data for e in events if e.type is E.STDERR and e.data.startswith("cldpd:")]


def mount_tmpfs(path: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB filesystem that fills up after a few hundred lines."""
    path = tmp_path / "tiny"
    mount_tmpfs(path, "size=64k")
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def read_only_disk(tmp_path: Path) -> Iterator[Path]:
    """A read-only filesystem (root cannot write to it either)."""
    path = tmp_path / "ro"
    mount_tmpfs(path, "ro,size=64k")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def assert_went_on_without_transcript(session: Session, where: Path) -> list[Event]:
    assert session.wait(30) == CODE
    assert session.state == "exited"
    assert str(where) in session.transcript_error
    assert "could not be written" in session.transcript_error
    assert "\n" not in session.transcript_error
    events = list(session.events())
    said = notices(events)
    # Said once; a reader that comes late may find it dropped with the other early events.
    assert said.count(session.transcript_error) == 1 or "earlier events are not shown" in said[0]
    assert events[-1] == Event(E.CONTAINER_EXITED, str(CODE), CODE, events[-1].time)
    return events


def test_a_transcript_disk_that_fills_up_mid_run_loses_no_event_held_in_memory(tiny_disk):
    session = make_session(tiny_disk, lines_job(3000))
    events = assert_went_on_without_transcript(session, tiny_disk)
    assert outputs(events) == [f"{i:07d}{'x' * 100}" for i in range(3000)]
    written = session.transcript.read_text(encoding="utf-8").splitlines()
    assert 0 < len(written) < 3000


def test_a_transcript_dir_that_is_a_file_runs_without_transcript(tmp_path):
    blocker = tmp_path / "sessions"
    blocker.write_text("not a directory")
    session = make_session(blocker / "deeper", lines_job(3))
    events = assert_went_on_without_transcript(session, blocker / "deeper")
    assert types_of(events) == [E.STDERR, E.CONTAINER_STARTED, E.OUTPUT, E.OUTPUT, E.OUTPUT,
                                E.CONTAINER_EXITED]  # fmt: skip
    assert blocker.read_text() == "not a directory"


def test_a_read_only_transcript_dir_runs_without_transcript(read_only_disk):
    session = make_session(read_only_disk, lines_job(3))
    assert len(outputs(assert_went_on_without_transcript(session, read_only_disk))) == 3


def types_of(events: list[Event]) -> list[EventType]:
    return [e.type for e in events]


class _FillsUp:
    """A transcript file whose disk is full after ``room`` characters."""

    def __init__(self, real, room: int) -> None:
        self._real = real
        self._room = room

    def write(self, text: str) -> int:
        if len(text) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(text)
        return self._real.write(text)

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def test_without_a_transcript_memory_stays_bounded_and_readers_are_told(
    transcript_dir, monkeypatch
):
    real_open = open

    def opener(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return _FillsUp(file, 5000) if "w" in mode else file

    monkeypatch.setattr(session_module, "open", opener, raising=False)
    monkeypatch.setattr(Session, "MAX_EVENTS", 200)
    session = make_session(transcript_dir, lines_job(5000, width=10))
    events = assert_went_on_without_transcript(session, transcript_dir)
    assert session.held_in_memory[0] <= 200 + 64
    lines = outputs(events)
    # What reached the disk is replayed, then one notice names the gap, then the latest.
    assert lines[:10] == [f"{i:07d}{'x' * 10}" for i in range(10)]
    assert lines[-1] == f"{4999:07d}{'x' * 10}"
    numbers = [int(line[:7]) for line in lines]
    assert numbers == sorted(numbers) and len(numbers) < 5000
    gap = [n for n in notices(events) if "earlier events are not shown" in n]
    assert len(gap) == 1 and "could not be written (No space left on device)" in gap[0]


def test_an_unreadable_transcript_never_breaks_a_reader(transcript_dir, monkeypatch):
    monkeypatch.setattr(Session, "MAX_EVENTS", 100)
    session = make_session(transcript_dir, lines_job(1000, width=10, code=0))
    assert session.wait(30) == 0
    session.transcript.write_text("garbage\n")
    events = list(session.events())
    assert "could not be read" in notices(events)[0]
    assert events[-1].type is E.CONTAINER_EXITED
    session.transcript.unlink()
    assert list(session.events())[-1].type is E.CONTAINER_EXITED


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_an_error_that_cannot_be_printed_still_ends_the_session(transcript_dir):
    def job(ctl: SessionControl) -> int:
        raise _Unprintable()

    session = make_session(transcript_dir, job)
    with pytest.raises(_Unprintable):
        session.wait(10)
    assert [(e.type, e.data) for e in session.events()] == [(E.ERROR, "_Unprintable")]


# -- secrets behind escapes ------------------------------------------------------------


def escaped_forms(secret: str) -> list[str]:
    """The secret as JSON text may carry it: every character escaped, Go style, ``\\/``."""
    every = "".join(
        f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else json.dumps(c)[1:-1]  # a surrogate pair
        for c in secret
    )
    go = json.dumps(secret, ensure_ascii=False)[1:-1]
    for c, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("/", "\\/")):
        go = go.replace(c, esc)
    upper = re.sub(r"\\u[0-9a-f]{4}", lambda m: "\\u" + m[0][2:].upper(), json.dumps(secret)[1:-1])
    mixed = "".join(json.dumps(c)[1:-1] if i % 2 else c for i, c in enumerate(secret))
    return [every, go, upper, mixed, html.escape(secret), "".join(f"&#{ord(c)};" for c in secret)]


def decodings(text: str) -> Iterator[str]:
    """The text, every string a JSON decoder finds in it, and its HTML-unescaped form."""
    yield text
    yield html.unescape(text)
    try:
        stack = [json.loads(text)]
    except ValueError:
        return
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
            yield from decodings(item) if "\\" in item or "&" in item else ()
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def assert_no_secret(text: str, secret: str = SECRET) -> None:
    for decoded in decodings(text):
        assert secret not in decoded, text


def test_a_session_holds_no_secret_in_any_encoding(transcript_dir):
    forms = escaped_forms(SECRET)

    def job(ctl: SessionControl) -> int:
        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        for form in forms:
            ctl.stdout.write(json.dumps({"type": "assistant", "text": "x"})[:-1])
            ctl.stdout.write(f', "more": "see {form}"}}\n')
            ctl.stderr.write(f"warning: {form}\n")
        ctl.emit(E.BUILD_OUTPUT, f"built with {forms[0]}")
        raise BuildFailedError(f"failed near {forms[1]}", log_tail=f"tail {forms[2]}")

    session = make_session(transcript_dir, job, secrets=[SECRET])
    with pytest.raises(BuildFailedError) as info:
        session.wait(10)
    events = list(session.events())
    assert len(events) == 2 + 2 * len(forms) + 1
    for event in events:
        assert_no_secret(event.data)
    for line in session.transcript.read_text(encoding="utf-8").splitlines():
        assert_no_secret(line)
        assert_no_secret(json.loads(line)["data"])
    error = info.value
    for text in (str(error), repr(error), error.log_tail, str(error.args)):
        assert_no_secret(text)


# -- on the real engine ---------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_a_run_with_a_full_transcript_disk_ends_with_its_code_and_leaves_nothing(
    docker_client, make_pod, pods_dir, tiny_disk
):
    from cldpd_magic import Dispatcher, DockerRunner

    name = make_pod(
        """
        i=0
        while [ $i -lt 2000 ]; do
          echo "line $i of an agent that prints more than the transcript disk holds"
          i=$((i+1))
        done
        exit 7
        """
    )
    session = Dispatcher(pods_dir, DockerRunner(), tiny_disk).start_session(
        name, "https://github.com/octocat/Hello-World/issues/1"
    )
    events = assert_went_on_without_transcript(session, tiny_disk)
    assert (
        outputs(events)[-1]
        == "line 1999 of an agent that prints more than the transcript disk holds"
    )
    assert docker_client.containers.list(all=True, filters={"name": f"cldpd-{name}"}) == []


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_a_pod_that_prints_its_secret_escaped_shows_it_nowhere(
    docker_client, make_pod, pods_dir, transcript_dir, monkeypatch, capsys
):
    from cldpd_magic import Dispatcher, DockerRunner

    monkeypatch.setenv("CLDPD_TEST_FORWARDED", SECRET)
    lines = [
        json.dumps({"type": "assistant"})[:-1] + f', "text": "{f}"}}' for f in escaped_forms(SECRET)
    ]
    script = "\n".join(f"printf '%s\\n' {shlex.quote(line)}" for line in lines)
    script += "\n" + "\n".join(
        f"printf '%s\\n' {shlex.quote(f)} >&2" for f in escaped_forms(SECRET)
    )
    name = make_pod(script + "\nexit 3", pod_json={"inheritEnv": ["CLDPD_TEST_FORWARDED"]})
    dispatcher = Dispatcher(pods_dir, DockerRunner(), transcript_dir)
    out = io.StringIO()
    assert dispatcher.start(name, "https://github.com/o/r/issues/1", out, check=False) == 3
    session = dispatcher.sessions[0]
    events = list(session.events())
    assert len(outputs(events)) == len(lines)
    assert len([e for e in events if e.type is E.STDERR]) == len(lines)
    for event in events:
        assert_no_secret(event.data)
    assert_no_secret(out.getvalue())
    assert_no_secret(capsys.readouterr().err)
    for line in session.transcript.read_text(encoding="utf-8").splitlines():
        assert_no_secret(json.loads(line)["data"])
