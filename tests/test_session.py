"""Sessions with fake jobs: event order, replay, bounded memory, transcripts, stop (no Docker)."""

from __future__ import annotations

import io
import itertools
import json
import re
import threading
import time
from collections.abc import Callable

import pytest

from cldpd_magic import BuildFailedError, CldpdError, Event, EventType, Session
from cldpd_magic.engines.protocol import ContainerInfo
from cldpd_magic.events import TRANSITIONS, RunState, RunStatus
from cldpd_magic.runs.session import (
    OutputLines,
    SessionControl,
    SessionKind,
    SessionStopped,
    _TranscriptReader,
    new_session_id,
    read_transcript,
)
from cldpd_magic.secrets import MASK

E = EventType
SECRET = "s3cr3t-value-42"
TOKEN = "tok-98765"


def make_session(transcript_dir, job: Callable[[SessionControl], int], **kwargs) -> Session:
    return Session("pod", "cldpd-pod", job, transcript_dir, **kwargs)


def types(events: list[Event]) -> list[EventType]:
    return [e.type for e in events]


def lines_job(count: int, width: int = 0, code: int = 0) -> Callable[[SessionControl], int]:
    def job(ctl: SessionControl) -> int:
        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        for i in range(count):
            ctl.stdout.write(f"{i:07d}{'x' * width}\n")
        return code

    return job


def test_event_order_and_exit_code(transcript_dir):
    def job(ctl: SessionControl) -> int:
        ctl.emit(E.BUILD_STARTED, "cldpd-pod")
        ctl.emit(E.BUILD_OUTPUT, "Step 1/1 : FROM busybox")
        ctl.emit(E.BUILD_COMPLETE, "cldpd-pod")
        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        ctl.stdout.write("one\ntwo\n")
        ctl.stderr.write("warn\n")
        ctl.stdout.write("three\n")
        return 3

    session = make_session(transcript_dir, job)
    assert session.wait(10) == 3
    events = list(session.events())
    assert [(e.type, e.data, e.code) for e in events] == [
        (E.BUILD_STARTED, "cldpd-pod", None),
        (E.BUILD_OUTPUT, "Step 1/1 : FROM busybox", None),
        (E.BUILD_COMPLETE, "cldpd-pod", None),
        (E.CONTAINER_STARTED, "cldpd-pod", None),
        (E.OUTPUT, "one", None),
        (E.OUTPUT, "two", None),
        (E.STDERR, "warn", None),
        (E.OUTPUT, "three", None),
        (E.CONTAINER_EXITED, "3", 3),
    ]
    assert session.done and session.exit_code == 3 and session.state == "exited"
    assert session.error is None and not session.stopped
    assert all(a.time <= b.time for a, b in itertools.pairwise(events))


def test_chunks_are_assembled_into_lines(transcript_dir):
    def job(ctl: SessionControl) -> int:
        for chunk in ["he", "llo\nwo", "rld\n\n", "", "par", "tial"]:
            ctl.stdout.write(chunk)
        ctl.stderr.write("no newline")
        return 0

    session = make_session(transcript_dir, job)
    session.wait(10)
    assert [(e.type, e.data) for e in session.events()][:-1] == [
        (E.OUTPUT, "hello"),
        (E.OUTPUT, "world"),
        (E.OUTPUT, ""),
        (E.OUTPUT, "partial"),
        (E.STDERR, "no newline"),
    ]


def test_wait_returns_without_anyone_consuming_events(transcript_dir):
    session = make_session(transcript_dir, lines_job(30000, code=4))
    assert session.wait(60) == 4
    events = list(session.events())
    assert len(events) == 30002
    assert [e.data for e in events[1:-1]] == [f"{i:07d}" for i in range(30000)]


def test_wait_times_out_while_running(transcript_dir):
    release = threading.Event()

    def job(ctl: SessionControl) -> int:
        release.wait(10)
        return 0

    session = make_session(transcript_dir, job)
    with pytest.raises(TimeoutError):
        session.wait(0.05)
    assert not session.done and session.exit_code is None
    release.set()
    assert session.wait(10) == 0


def test_late_consumer_and_two_consumers_see_every_event(transcript_dir):
    release = threading.Event()

    def job(ctl: SessionControl) -> int:
        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        for i in range(500):
            ctl.stdout.write(f"early {i}\n")
        release.wait(10)
        for i in range(500):
            ctl.stdout.write(f"late {i}\n")
        return 0

    session = make_session(transcript_dir, job)
    seen: dict[str, list[str]] = {"a": [], "b": []}

    def consume(key: str) -> None:
        seen[key] = [e.data for e in session.events()]

    first = threading.Thread(target=consume, args=("a",))
    first.start()
    while session.event_count < 501:
        threading.Event().wait(0.01)
    second = threading.Thread(target=consume, args=("b",))
    second.start()
    release.set()
    first.join(10)
    second.join(10)
    session.wait(10)
    expected = (
        ["cldpd-pod"] + [f"early {i}" for i in range(500)] + [f"late {i}" for i in range(500)]
    )
    expected.append("0")
    assert seen["a"] == expected
    assert seen["b"] == expected
    assert [e.data for e in session.events()] == expected


def test_memory_stays_bounded_and_events_replay_from_the_transcript(transcript_dir, monkeypatch):
    monkeypatch.setattr(Session, "MAX_EVENTS", 50)
    monkeypatch.setattr(Session, "MAX_BYTES", 20_000)
    sizes: list[tuple[int, int]] = []
    gate = threading.Event()

    def job(ctl: SessionControl) -> int:
        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        for i in range(6000):
            ctl.stdout.write(f"{i:07d}{'y' * (i % 900)}\n")
            sizes.append(ctl._session.held_in_memory)
            if i == 3000:
                gate.set()
        return 0

    session = make_session(transcript_dir, job)
    slow: list[Event] = []
    iterator = session.events()
    slow.append(next(iterator))
    gate.wait(10)
    slow.extend(iterator)
    assert session.wait(10) == 0
    assert max(n for n, _ in sizes) <= 50
    assert max(b for _, b in sizes) <= 20_000
    assert session.held_in_memory[0] <= 50
    expected = [f"{i:07d}{'y' * (i % 900)}" for i in range(6000)]
    assert [e.data for e in slow[1:-1]] == expected
    assert [e.data for e in list(session.events())[1:-1]] == expected
    assert read_transcript(session.transcript) == slow


def test_a_reader_that_does_not_wait_gets_what_came_or_nothing_and_misses_no_event(
    transcript_dir, monkeypatch
):
    monkeypatch.setattr(Session, "MAX_EVENTS", 50)  # most of it is read back from disk
    step = threading.Semaphore(0)
    written = threading.Semaphore(0)

    def job(ctl: SessionControl) -> int:
        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        for burst in range(4):
            step.acquire()
            for i in range(300):
                ctl.stdout.write(f"{burst}.{i}\n")
            written.release()
        step.acquire()
        return 0

    session = make_session(transcript_dir, job)
    batches = session.event_batches(wait=False)
    taken: list[Event] = []

    def take_all() -> None:
        while batch := next(batches):
            taken.extend(batch)

    while not taken:
        take_all()
    assert next(batches) == []  # caught up: nothing now, at once
    for _ in range(4):
        step.release()
        assert written.acquire(timeout=10)
        take_all()
        assert next(batches) == []
    step.release()
    assert session.wait(10) == 0
    taken.extend(itertools.chain.from_iterable(batches))  # the end, then no more
    assert taken == list(session.events()) == read_transcript(session.transcript)
    assert len(taken) == 1 + 4 * 300 + 1


def test_transcript_holds_every_event(transcript_dir):
    session = make_session(transcript_dir, lines_job(100, code=2))
    session.wait(10)
    assert session.transcript == transcript_dir / f"{session.id}.jsonl"
    assert read_transcript(session.transcript) == list(session.events())


@pytest.mark.parametrize(
    "lines",
    [
        ["plain 1", "plain 2", "", "ünïcode 😀"],  # nothing to escape: the lines joined
        ['{"type":"assistant","text":"a"}', 'say "hi"', "tab\there", "bell\x07 nul\x00"],
        ["back\\slash", 'a \\n b \\"', "\\u0041", "lone \ud800 surrogate", "\x9b\u2028"],
        ['a "quote" and a lone \udc80 surrogate', "no backslash"],
    ],
)
def test_lines_of_one_read_are_written_to_the_transcript_as_events_write_them(
    transcript_dir, lines
):
    # The lines of one read are escaped for the transcript together where they can be;
    # each record must be the event's own JSON, and read back the same.
    def job(ctl: SessionControl) -> int:
        ctl.stdout.write("\n".join(lines) + "\n")
        return 0

    session = make_session(transcript_dir, job)
    session.wait(10)
    records = session.transcript.read_text(encoding="utf-8", errors="surrogateescape")
    output = [r for r in records.split("\n") if r.startswith('{"type":"output"')]
    events = [e for e in session.events() if e.type is E.OUTPUT]
    assert [e.data for e in events] == lines
    assert output == [e.to_json().encode("utf-8", "backslashreplace").decode() for e in events]
    assert [e for e in read_transcript(session.transcript) if e.type is E.OUTPUT] == events


def test_event_json_round_trip():
    event = Event(E.CONTAINER_EXITED, 'ünïcode "quoted"\t\u2028 line', 7)
    assert Event.from_json(event.to_json()) == event
    assert "\n" not in Event(E.OUTPUT, "a\nb").to_json()


def test_secrets_are_masked_everywhere(transcript_dir):
    def job(ctl: SessionControl) -> int:
        ctl.emit(E.BUILD_OUTPUT, f"building with {SECRET}")
        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        ctl.stdout.write(f"the key is {SECRET[:5]}")
        ctl.stdout.write(f"{SECRET[5:]} and {TOKEN}\n")
        ctl.stderr.write(f"{TOKEN}\n")
        raise BuildFailedError(f"failed near {SECRET}", log_tail=f"tail {TOKEN}\nend")

    session = make_session(transcript_dir, job, secrets=[SECRET, TOKEN, "", "ab"])
    with pytest.raises(BuildFailedError) as info:
        session.wait(10)
    events = list(session.events())
    assert [e.data for e in events] == [
        f"building with {MASK}",
        "cldpd-pod",
        f"the key is {MASK} and {MASK}",
        MASK,
        f"failed near {MASK}",
    ]
    assert events[-1].type is E.ERROR
    error = info.value
    assert str(error) == f"failed near {MASK}"
    assert error.log_tail == f"tail {MASK}\nend"
    assert session.error is error
    text = session.transcript.read_text()
    for secret in (SECRET, TOKEN):
        assert secret not in text
        assert secret not in repr(error) and secret not in str(error.args)


def test_log_tail_is_masked_even_when_the_message_has_no_secret(transcript_dir):
    def job(ctl: SessionControl) -> int:
        raise BuildFailedError("the build failed", log_tail=f"echo {SECRET}")

    session = make_session(transcript_dir, job, secrets=[SECRET])
    with pytest.raises(BuildFailedError) as info:
        session.wait(10)
    assert SECRET not in info.value.log_tail


def test_other_exceptions_fail_the_session(transcript_dir):
    def job(ctl: SessionControl) -> int:
        raise RuntimeError("boom")

    session = make_session(transcript_dir, job)
    with pytest.raises(RuntimeError, match="boom"):
        session.wait(10)
    assert session.state == "failed"
    assert [(e.type, e.data) for e in session.events()] == [(E.ERROR, "boom")]


def test_nothing_follows_the_terminal_event(transcript_dir):
    kept: list[SessionControl] = []

    def job(ctl: SessionControl) -> int:
        kept.append(ctl)
        ctl.stdout.write("only\n")
        return 0

    session = make_session(transcript_dir, job)
    session.wait(10)
    before = session.transcript.read_text()
    kept[0].emit(E.OUTPUT, "late")
    kept[0].stdout.write("later\n")
    assert [e.data for e in session.events()] == ["only", "0"]
    assert session.transcript.read_text() == before


def running_job(calls: list[float]) -> Callable[[SessionControl], int]:
    def job(ctl: SessionControl) -> int:
        stopped = threading.Event()

        def stopper(timeout: float) -> None:
            calls.append(timeout)
            stopped.set()

        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        ctl.set_stopper(stopper)
        ctl.stdout.write("working\n")
        stopped.wait(10)
        ctl.stdout.write("got INT\n")
        return 130

    return job


def test_stop_is_idempotent(transcript_dir):
    calls: list[float] = []
    session = make_session(transcript_dir, running_job(calls))
    events = session.events()
    assert next(events).type is E.CONTAINER_STARTED
    assert next(events).data == "working"
    session.stop(3)
    session.stop(3)
    assert calls == [3]
    assert session.done and session.stopped and session.state == "stopped"
    assert session.wait(0) == 130
    assert [(e.type, e.data) for e in events] == [
        (E.OUTPUT, "got INT"),
        (E.CONTAINER_EXITED, "130"),
    ]


def test_stop_of_a_finished_session_does_nothing(transcript_dir):
    session = make_session(transcript_dir, lines_job(1))
    session.wait(10)
    session.stop()
    assert not session.stopped and session.state == "exited"


def test_stop_before_the_container_starts(transcript_dir):
    building = threading.Event()
    calls: list[float] = []

    def job(ctl: SessionControl) -> int:
        ctl.emit(E.BUILD_STARTED, "cldpd-pod")
        building.set()
        ctl.cancelled.wait(10)
        ctl.check_cancelled()
        ctl.set_stopper(calls.append)
        return 0

    session = make_session(transcript_dir, job)
    building.wait(10)
    session.stop(2)
    assert session.wait(0) == -1
    events = list(session.events())
    assert types(events) == [E.BUILD_STARTED, E.ERROR]
    assert "stopped" in events[-1].data
    assert session.state == "stopped" and session.error is None and session.exit_code == -1
    assert calls == []


def test_stopper_registered_after_the_stop_runs_at_once(transcript_dir):
    calls: list[float] = []
    stop_asked = threading.Event()

    def job(ctl: SessionControl) -> int:
        stop_asked.wait(10)
        while not ctl.cancelled.is_set():
            threading.Event().wait(0.005)
        ctl.set_stopper(calls.append)
        return 130

    session = make_session(transcript_dir, job)
    stop_asked.set()
    session.stop(4)
    assert calls == [4]
    assert session.wait(0) == 130


def test_the_move_to_stopping_is_the_stop_the_job_sees(transcript_dir):
    """Whoever moves the run to STOPPING (a person, a cap, the dispatcher's expect_stop),
    the job's cancelled and its guard see it: the state machine is the one place."""
    release = threading.Event()
    seen: list[bool] = []

    def job(ctl: SessionControl) -> int:
        release.wait(10)
        seen.append(ctl.cancelled.is_set())
        with pytest.raises(SessionStopped):
            ctl.guard(lambda _name, _t: None).check()
        return 0

    session = make_session(transcript_dir, job)
    assert not session._control.cancelled.is_set()
    assert session.status.request_stop("over budget")
    release.set()
    assert session.wait(10) == 0
    assert seen == [True] and session.state == "stopped" and session.stop_reason == "over budget"


def test_a_guard_registers_the_started_container_for_a_later_stop(transcript_dir):
    stops: list[tuple[str, float]] = []
    go_on = threading.Event()

    def job(ctl: SessionControl) -> int:
        guard = ctl.guard(lambda name, timeout: (stops.append((name, timeout)), go_on.set()))
        guard.check()
        guard.started(ContainerInfo("cldpd-pod", "id1", "running", {}))
        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        go_on.wait(10)
        return 130

    session = make_session(transcript_dir, job)
    until_state(session, RunState.RUNNING)
    session.stop(3)
    assert stops == [("cldpd-pod", 3)]
    assert session.state == "stopped" and session.exit_code == 130


def test_a_guard_refuses_a_container_started_after_the_stop(transcript_dir):
    stops: list[str] = []
    refused: list[str] = []
    started = threading.Event()

    def job(ctl: SessionControl) -> int:
        guard = ctl.guard(lambda name, _t: stops.append(name))
        guard.check()
        started.set()
        ctl.cancelled.wait(10)
        try:
            guard.started(ContainerInfo("cldpd-pod", "id1", "running", {}))
        except SessionStopped as exc:
            refused.append(str(exc))
            raise
        return 0

    session = make_session(transcript_dir, job)
    started.wait(10)
    session.stop(1)
    assert refused and stops == []  # the runner removes it; no stopper to run
    assert session.state == "stopped" and session.exit_code == -1 and session.error is None


def test_a_stop_racing_a_start_is_either_refused_or_finds_the_container(transcript_dir):
    """Many times over, a stop and a guard's started() at once, in both orders (the stop
    goes at once, or after a pause that lets started() go first). Exactly one of them
    acts: the guard refuses the container, or the stop runs its stopper; never neither."""
    outcomes: set[tuple[int, int]] = set()
    for attempt in range(300):
        stops: list[str] = []
        refused: list[bool] = []
        ready = threading.Barrier(2)

        def job(ctl: SessionControl, stops=stops, refused=refused, ready=ready) -> int:
            guard = ctl.guard(lambda name, _t: stops.append(name))
            ready.wait(10)
            try:
                guard.started(ContainerInfo("cldpd-pod", "id1", "running", {}))
            except SessionStopped:
                refused.append(True)
            else:
                ctl.cancelled.wait(10)  # the container runs until the stop
            return 0

        session = make_session(transcript_dir, job)
        ready.wait(10)
        if attempt % 3:
            time.sleep(0.0001 * (attempt % 7))  # varies the interleaving; nothing is timed
        session.stop(1)
        assert session.done
        assert len(stops) + len(refused) == 1, (stops, refused)
        outcomes.add((len(stops), len(refused)))
    assert outcomes == {(1, 0), (0, 1)}  # both orders were tried


def until_state(session: Session, state: RunState) -> None:
    for _ in range(2000):
        if session.state is state:
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"{session} never reached {state}")


def test_stop_during_a_build_is_not_an_error(transcript_dir):
    building = threading.Event()

    def job(ctl: SessionControl) -> int:
        ctl.emit(E.BUILD_STARTED, "cldpd-pod")
        building.set()
        ctl.cancelled.wait(10)
        raise BuildFailedError("Building image cldpd-pod failed: the build was stopped")

    session = make_session(transcript_dir, job)
    building.wait(10)
    session.stop()
    assert session.wait(0) == -1
    assert session.state == "stopped" and session.error is None
    assert types(list(session.events())) == [E.BUILD_STARTED, E.ERROR]


def test_errors_are_cldpd_errors_with_a_message(transcript_dir):
    def job(ctl: SessionControl) -> int:
        raise CldpdError("")

    session = make_session(transcript_dir, job)
    with pytest.raises(CldpdError):
        session.wait(10)
    assert list(session.events())[-1].data == "CldpdError"


def test_session_id_format_and_uniqueness(transcript_dir):
    ids = {new_session_id("my-pod.1") for _ in range(5000)}
    # 32 random bits: two of 5,000 ids are alike about 3 times in 1,000 runs (a birthday).
    assert len(ids) >= 4990
    assert all(re.fullmatch(r"my-pod\.1-[0-9a-f]{8}", i) for i in ids)
    sessions = [make_session(transcript_dir, lines_job(0)) for _ in range(20)]
    for session in sessions:
        session.wait(10)
    assert all(re.fullmatch(r"pod-[0-9a-f]{8}", s.id) for s in sessions)
    assert len({s.id for s in sessions}) == 20
    assert len(list(transcript_dir.iterdir())) == 20


def test_given_session_id_and_attributes(transcript_dir):
    session = make_session(
        transcript_dir,
        lines_job(0),
        kind="resume",
        session_id="pod-0123abcd",
        claude_session="uuid-1",
        missing_env=["A"],
    )
    session.wait(10)
    assert (session.id, session.kind, session.claude_session) == (
        "pod-0123abcd",
        "resume",
        "uuid-1",
    )
    assert session.missing_env == ["A"]
    assert session.transcript.name == "pod-0123abcd.jsonl"
    assert "pod-0123abcd" in repr(session)


def test_json_escaped_secrets_are_masked(transcript_dir):
    secret = 'pa"ss\\wörd/42'
    escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
    ascii_escaped = json.dumps(secret, ensure_ascii=True)[1:-1]
    assert escaped != secret and ascii_escaped != escaped

    def job(ctl: SessionControl) -> int:
        ctl.stdout.write(f'{{"text": "{escaped}"}}\n{{"text": "{ascii_escaped}"}}\n{secret}\n')
        return 0

    session = make_session(transcript_dir, job, secrets=[secret])
    session.wait(10)
    assert [e.data for e in session.events()][:-1] == [
        f'{{"text": "{MASK}"}}',
        f'{{"text": "{MASK}"}}',
        MASK,
    ]
    for line in session.transcript.read_text().splitlines():
        assert "ss" not in json.loads(line)["data"]


def test_line_batches_give_the_lines_of_one_read_as_one_item(transcript_dir, monkeypatch):
    # What memory holds comes as OutputLines, one per read; what it no longer holds is
    # read back from the transcript as Events: in order, the same as event_batches.
    monkeypatch.setattr(Session, "MAX_EVENTS", 50)
    gate = threading.Event()

    def job(ctl: SessionControl) -> int:
        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        for i in range(0, 3000, 10):
            ctl.stdout.write("".join(f"{n:07d}\n" for n in range(i, i + 10)))
            ctl.stderr.write(f"err {i}\n")
            if i == 1000:
                gate.set()
        return 0

    session = make_session(transcript_dir, job)
    batches = session.line_batches()
    items = list(next(batches))
    gate.wait(10)
    items += [item for batch in batches for item in batch]
    assert session.wait(10) == 0
    flat = []
    for item in items:
        if isinstance(item, OutputLines):
            flat += [(item.type, line) for line in item.lines]
        else:
            flat.append((item.type, item.data))
    assert flat == [(e.type, e.data) for e in session.events()]
    assert any(isinstance(i, OutputLines) and len(i.lines) == 10 for i in items)
    assert any(type(i) is Event and i.type is E.OUTPUT for i in items)  # read back


def test_a_reader_behind_when_the_run_ends_reads_on_from_memory(transcript_dir, monkeypatch):
    # An ended session keeps only what its transcript lacks, but not under a reader's
    # feet: one still reading goes on from memory (no transcript read), and once it is
    # done the ended session holds next to nothing.
    read_back: list[int] = []
    original = _TranscriptReader.read

    def read(self, start: int, stop: int) -> list[Event]:
        read_back.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(_TranscriptReader, "read", read)
    session = make_session(transcript_dir, lines_job(3000))
    batches = session.event_batches()
    seen = list(next(batches))
    assert session.wait(10) == 0  # ended while this reader is at its first batch
    seen += [event for batch in batches for event in batch]
    assert [e.data for e in seen][1:-1] == [f"{i:07d}" for i in range(3000)]
    assert read_back == []
    assert session.held_in_memory[0] == 1
    assert [e.data for e in session.events()][1:-1] == [f"{i:07d}" for i in range(3000)]
    assert sum(read_back) > 0  # a reader that comes later reads the transcript


def test_lines_read_back_from_the_transcript_are_the_lines_written(transcript_dir, monkeypatch):
    # A reader behind what memory holds reads the transcript: records without an escape
    # are read by slicing, the others as JSON; either way every line comes back as it was.
    monkeypatch.setattr(Session, "MAX_EVENTS", 10)
    lines = ["plain", 'say "hi"', "a\\b", '","code":null,"time":"x"}', "tab\t", "é 😀", "\ud800"]
    lines += ['{"type":"assistant"}', "", "x" * 3000, "\x1b[31mred\x1b[0m"]
    gate = threading.Event()

    def job(ctl: SessionControl) -> int:
        gate.wait(10)
        for n in range(30):
            ctl.stdout.write("".join(f"{n} {line}\n" for line in lines))
            ctl.stderr.write(f"{n} {lines[n % len(lines)]}\n")
        return 0

    session = make_session(transcript_dir, job)
    batches = session.event_batches()
    gate.set()
    session.wait(10)  # ended: a reader starting now reads all but the last from disk
    read = [(e.type, e.data) for batch in batches for e in batch]
    written = [(E.OUTPUT, f"{n} {line}") for n in range(30) for line in lines]
    assert [r for r in read if r[0] is E.OUTPUT] == written
    assert [r for r in read if r[0] is E.STDERR] == [
        (E.STDERR, f"{n} {lines[n % len(lines)]}") for n in range(30)
    ]
    assert read_transcript(session.transcript) == [e for b in session.event_batches() for e in b]


def test_an_ended_session_holds_almost_nothing_in_memory(transcript_dir):
    session = make_session(transcript_dir, lines_job(3000))
    assert session.wait(10) == 0
    assert session.held_in_memory[0] == 1
    assert [e.data for e in session.events()][1:-1] == [f"{i:07d}" for i in range(3000)]


# -- the run state machine ----------------------------------------------------------------


def test_every_state_is_in_the_table_and_only_terminal_states_have_no_way_out():
    assert set(TRANSITIONS) == set(RunState)
    ended = {s for s in RunState if s.finished}
    assert ended == {RunState.EXITED, RunState.FAILED, RunState.STOPPED}
    assert all(TRANSITIONS[s] for s in set(RunState) - ended)
    assert TRANSITIONS[RunState.STOPPING] == {RunState.STOPPED}


def test_illegal_moves_are_refused_and_change_nothing():
    status = RunStatus()
    assert not status.move(RunState.STOPPED)  # only a stopping run ends stopped
    assert status.move(RunState.BUILDING, detail="img")
    assert not status.move(RunState.RUNNING)  # the build completes first
    assert status.move(RunState.STARTING) and status.move(RunState.RUNNING, detail="c")
    assert status.finish(exit_code=3) is RunState.EXITED
    assert not status.request_stop()  # a stop after the end is refused
    assert not status.move(RunState.RUNNING)
    snap = status.snapshot()
    assert (snap.state, snap.exit_code, snap.detail, snap.finished) == ("exited", 3, "c", True)


def test_a_run_asked_to_stop_ends_stopped_whatever_ends_it():
    for end in ({"exit_code": 0}, {"error": "boom"}, {}):
        status = RunStatus()
        status.move(RunState.RUNNING)
        assert status.request_stop() and not status.request_stop()
        assert not status.move(RunState.EXITED)
        assert status.finish(**end) is RunState.STOPPED
        assert status.exit_code == end.get("exit_code", -1)


def test_a_status_follows_events_for_a_run_known_only_by_them():
    status = RunStatus()
    for event in (Event(E.BUILD_STARTED, "img"), Event(E.BUILD_COMPLETE, "img")):
        status.on_event(event)
    assert status.state is RunState.STARTING
    status.on_event(Event(E.CONTAINER_STARTED, "c"))
    status.on_event(Event(E.ERROR, "gone"), stopped=True)
    assert status.state is RunState.STOPPED


def test_state_and_kind_are_enums_equal_to_their_old_strings(transcript_dir):
    session = make_session(transcript_dir, lines_job(1), kind="resume")
    session.wait(10)
    assert session.state is RunState.EXITED and session.state == "exited"
    assert session.kind is SessionKind.RESUME and session.kind == "resume"
    assert f"{session.state} {session.kind}" == "exited resume"
    with pytest.raises(ValueError):
        make_session(transcript_dir, lines_job(1), kind="restart")


def test_a_session_is_stopping_from_the_stop_until_its_end(transcript_dir):
    release = threading.Event()
    seen: list[RunState] = []

    def job(ctl: SessionControl) -> int:
        ctl.emit(E.CONTAINER_STARTED, "c")
        ctl.set_stopper(lambda _t: release.set())
        release.wait(10)
        seen.append(session.state)
        return 0

    session = make_session(transcript_dir, job)
    next(e for e in session.events() if e.type is E.CONTAINER_STARTED)
    assert session.state is RunState.RUNNING
    session.stop(1)
    assert seen == [RunState.STOPPING]
    assert session.state is RunState.STOPPED and session.exit_code == 0


# -- what the usage meter and each view read of a line ---------------------------------------


def test_the_meter_reads_only_usage_lines_and_each_view_decodes_what_it_shows(
    transcript_dir, monkeypatch
):
    from collections import Counter

    from cldpd_magic import stream_json
    from cldpd_magic.render import SessionView, TextFeed
    from cldpd_magic.render import stream as render_stream
    from cldpd_magic.runs import usage as usage_module

    whole: Counter[str] = Counter()  # lines decoded into their events
    metered: Counter[str] = Counter()  # lines read for their usage alone

    def counting(counter: Counter[str], read):  # type: ignore[no-untyped-def]
        def read_counted(text: str):  # type: ignore[no-untyped-def]
            counter[text] += 1
            return read(text)

        return read_counted

    monkeypatch.setattr(stream_json, "decode_line", counting(whole, stream_json.decode_line))
    monkeypatch.setattr(render_stream, "decode_line", counting(whole, render_stream.decode_line))
    monkeypatch.setattr(usage_module, "usage_event", counting(metered, stream_json.usage_event))
    usage = {"input_tokens": 10, "output_tokens": 2}
    lines = [
        json.dumps({"type": "system", "subtype": "init", "model": "m", "tools": []}),
        json.dumps({"type": "assistant", "message": {"id": "m1", "model": "m", "usage": usage,
                    "content": [{"type": "text", "text": "Hello."}]}}),
        json.dumps({"type": "user", "message": {"content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "ok"}]}}),
        json.dumps({"type": "result", "subtype": "success", "num_turns": 1, "usage": usage,
                    "total_cost_usd": 0.01, "result": "Hello."}),
        "plain text",
    ]  # fmt: skip

    release = threading.Event()

    def job(ctl: SessionControl) -> int:
        ctl.emit(E.CONTAINER_STARTED, "cldpd-pod")
        ctl.stdout.write("".join(line + "\n" for line in lines))
        release.wait(10)
        return 0

    session = make_session(transcript_dir, job)
    while session.event_count < 1 + len(lines):
        threading.Event().wait(0.01)
    # The meter (the session's writer thread) read what can carry usage, and only its
    # usage: no line's event was made for it.
    assert metered == Counter({lines[1]: 1, lines[3]: 1}) and not whole
    assert session.usage.turns == 1 and session.usage.cost_usd == 0.01
    # Two views of the running session: each decodes each line it shows.
    view = SessionView("pod", session=session)
    out = io.StringIO()
    text = TextFeed(session, out)
    for batch in session.event_batches():
        for event in batch:
            view.add(event)
        text.write(batch)
        if len(batch) and batch[-1].data == "plain text":
            break
    assert "✓ done · 1 turn" in view.text() and "✓ done · 1 turn" in out.getvalue()
    assert whole == Counter({line: 2 for line in lines})  # text: no JSON object, at once
    release.set()
    assert session.wait(10) == 0
