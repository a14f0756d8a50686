"""Sessions: one agent run in a worker thread, its ordered events and its transcript."""

from __future__ import annotations

import contextlib
import enum
import json
import re
import secrets as _secrets
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

from .errors import CldpdError

MASK = "********"


class EventType(enum.Enum):
    """What an :class:`Event` reports."""

    BUILD_STARTED = "build_started"
    BUILD_OUTPUT = "build_output"
    BUILD_COMPLETE = "build_complete"
    CONTAINER_STARTED = "container_started"
    OUTPUT = "output"
    STDERR = "stderr"
    CONTAINER_EXITED = "container_exited"
    ERROR = "error"


TERMINAL = frozenset({EventType.CONTAINER_EXITED, EventType.ERROR})


def _now() -> datetime:
    return datetime.now(UTC)


# json.dumps builds an encoder per call when given options; the bare string encoder
# (C-accelerated) is what a transcript of millions of lines can afford.
_encode_str = json.encoder.encode_basestring  # type: ignore[attr-defined]


class _EventFields(NamedTuple):
    type: EventType
    data: str
    code: int | None
    time: datetime


class Event(_EventFields):
    """One thing that happened in a session (an immutable tuple, cheap to make by the million).

    Attributes:
        type: What happened.
        data: A line of output, an image tag, a container name or an error message.
        code: The exit code, on CONTAINER_EXITED.
        time: When it happened (UTC).
    """

    __slots__ = ()

    def __new__(
        cls,
        type: EventType,
        data: str = "",
        code: int | None = None,
        time: datetime | None = None,
    ) -> Event:
        return tuple.__new__(cls, (type, data, code, time or _now()))

    def to_json(self) -> str:
        """Serialise as one JSON line of a transcript (without the newline)."""
        code = "null" if self.code is None else str(int(self.code))
        return (
            f'{{"type":"{self.type.value}","data":{_encode_str(self.data)},'
            f'"code":{code},"time":"{self.time.isoformat()}"}}'
        )

    @classmethod
    def from_json(cls, line: str) -> Event:
        """Read an event back from a transcript line."""
        raw = json.loads(line)
        return tuple.__new__(
            cls,
            (
                EventType(raw["type"]),
                raw["data"],
                raw["code"],
                datetime.fromisoformat(raw["time"]),
            ),
        )


class Masker:
    """Replaces secret values in text with a fixed mask.

    A value is also masked as it appears inside a JSON string (escaped quotes,
    backslashes, ``\\uXXXX``), since agents print stream-json that is decoded for display.

    Args:
        values: The secret values; empty values and values shorter than 4 characters
            (which would mask ordinary text) are ignored.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        kept = {v for v in values if v and len(v) >= 4}
        forms = kept | {json.dumps(v, ensure_ascii=a)[1:-1] for v in kept for a in (False, True)}
        self.values = sorted(forms, key=len, reverse=True)
        self._re = re.compile("|".join(map(re.escape, self.values))) if self.values else None

    def __call__(self, text: str) -> str:
        """Return text with every secret value masked."""
        if self._re is None or not text:
            return text
        return self._re.sub(MASK, text)

    def __bool__(self) -> bool:
        return self._re is not None


def new_session_id(pod_name: str) -> str:
    """Return a fresh session id ``<pod>-<8 hex digits>``."""
    return f"{pod_name}-{_secrets.token_hex(4)}"


class _Chunk:
    """Events stored together: output lines of one read (made Events only when consumed)."""

    __slots__ = ("etype", "items", "size", "start", "time")

    def __init__(self, etype: EventType | None, time: datetime | None, items: list[Any]) -> None:
        self.etype = etype
        self.time = time
        self.items = items
        self.start = 0
        self.size = 0

    def events(self, offset: int) -> list[Event]:
        if self.etype is None:
            return self.items[offset:]
        new, etype, time = tuple.__new__, self.etype, self.time
        return [new(Event, (etype, line, None, time)) for line in self.items[offset:]]


class SessionStopped(CldpdError):
    """Raised inside a job when the session was stopped before its container started."""


class _LineWriter:
    """A Writer that turns text chunks into one event per complete line."""

    def __init__(self, session: Session, etype: EventType) -> None:
        self._session = session
        self._type = etype
        self._pending: list[str] = []

    def write(self, text: str) -> int:
        if "\n" not in text:
            self._pending.append(text)
            return len(text)
        lines = text.split("\n")
        if self._pending:
            self._pending.append(lines[0])
            lines[0] = "".join(self._pending)
            self._pending = []
        tail = lines.pop()
        if tail:
            self._pending.append(tail)
        self._session._append_lines(self._type, lines)
        return len(text)

    def flush(self) -> None:
        """Do nothing: lines are sent as soon as they are complete."""

    def close(self) -> None:
        """Send the last, unterminated line, if any."""
        if self._pending:
            line = "".join(self._pending)
            self._pending = []
            self._session._append_lines(self._type, [line])


class SessionControl:
    """What a session's job uses to report and to learn of a stop.

    Attributes:
        stdout: Writer whose lines become OUTPUT events.
        stderr: Writer whose lines become STDERR events.
        cancelled: Set once the session is asked to stop.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self.stdout = _LineWriter(session, EventType.OUTPUT)
        self.stderr = _LineWriter(session, EventType.STDERR)
        self.cancelled = threading.Event()
        self._stopper: Callable[[float], None] | None = None
        self._lock = threading.Lock()
        self._stop_timeout = 10.0

    def emit(self, etype: EventType, data: str = "", code: int | None = None) -> None:
        """Record an event (its data is masked)."""
        self._session._append([Event(etype, self._session.mask(data), code)])

    def set_stopper(self, stopper: Callable[[float], None] | None) -> None:
        """Register how to stop what now runs; runs it at once if a stop came first."""
        with self._lock:
            self._stopper = stopper
            run_now = stopper is not None and self.cancelled.is_set()
        if run_now:
            # Not on this (the worker's) thread: it must go on reading the output meanwhile.
            threading.Thread(
                target=stopper, args=(self._stop_timeout,), daemon=True, name="cldpd-stop"
            ).start()

    def check_cancelled(self) -> None:
        """Raise SessionStopped if a stop was asked for."""
        if self.cancelled.is_set():
            raise SessionStopped("The session was stopped before the agent started.")

    def _stop(self, timeout: float) -> None:
        with self._lock:
            self._stop_timeout = timeout
            self.cancelled.set()
            stopper = self._stopper
        if stopper is not None:
            stopper(timeout)


class Session:
    """One agent run (a start, a resume or an attach) in a worker thread.

    Events are kept in memory up to a bound and written, masked, to the transcript as
    they come; :meth:`events` replays from the transcript what memory no longer holds,
    so every consumer sees every event in order while memory stays bounded.

    Args:
        pod_name: The pod.
        container: The pod's container name.
        job: Runs the agent; gets a :class:`SessionControl`, returns the exit code.
        transcript_dir: Where the transcript file goes.
        secrets: Values to mask in every event, error and transcript line.
        kind: ``start``, ``resume`` or ``attach``.
        session_id: The id; a fresh ``<pod>-<8 hex>`` when None.
        claude_session: Claude Code's session uuid.
        missing_env: inheritEnv names that were not set on the host.

    Attributes:
        id: ``<pod>-<8 hex>``.
        pod_name: The pod.
        container: The container name.
        kind: ``start``, ``resume`` or ``attach``.
        claude_session: Claude Code's session uuid ("" for an attach).
        missing_env: inheritEnv names that were not forwarded.
        transcript: Path of the JSON-lines transcript.
        error: The error that ended the session, if any.
        stopped: Whether :meth:`stop` was called.
    """

    MAX_EVENTS = 20000
    MAX_BYTES = 4 * 1024 * 1024

    def __init__(
        self,
        pod_name: str,
        container: str,
        job: Callable[[SessionControl], int],
        transcript_dir: str | Path,
        secrets: Iterable[str] = (),
        kind: str = "start",
        session_id: str | None = None,
        claude_session: str = "",
        missing_env: Iterable[str] = (),
    ) -> None:
        self.id = session_id or new_session_id(pod_name)
        self.pod_name = pod_name
        self.container = container
        self.kind = kind
        self.claude_session = claude_session
        self.missing_env = list(missing_env)
        self.mask = Masker(secrets)
        directory = Path(transcript_dir).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        self.transcript = directory / f"{self.id}.jsonl"
        self._file: IO[str] | None = open(self.transcript, "w", encoding="utf-8")  # noqa: SIM115
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._buf: deque[_Chunk] = deque()
        self._buf_events = 0
        self._buf_bytes = 0
        self._first = 0
        self._count = 0
        self._ended = False
        self._finished = threading.Event()
        self.error: BaseException | None = None
        self.stopped = False
        self.exit_code: int | None = None
        self.phase = "starting"
        self.started_at = _now()
        self.ended_at: datetime | None = None
        self._control = SessionControl(self)
        self._job = job
        self._thread = threading.Thread(target=self._work, name=f"cldpd-{self.id}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.kind} {self.state}>"

    @property
    def done(self) -> bool:
        """Whether the session has ended."""
        return self._finished.is_set()

    @property
    def state(self) -> str:
        """``building``, ``starting``, ``running``, ``exited``, ``failed`` or ``stopped``."""
        return self.phase

    @property
    def held_in_memory(self) -> tuple[int, int]:
        """How many events, and characters of their data, memory holds now (the rest is on disk)."""
        with self._cond:
            return self._buf_events, self._buf_bytes

    @property
    def event_count(self) -> int:
        """How many events the session has recorded so far."""
        return self._count

    def _work(self) -> None:
        control = self._control
        try:
            code = self._job(control)
            control.stdout.close()
            control.stderr.close()
            self.exit_code = code
            self.phase = "stopped" if self.stopped else "exited"
            self._append([Event(EventType.CONTAINER_EXITED, str(code), code)], final=True)
        except BaseException as exc:
            control.stdout.close()
            control.stderr.close()
            message = self.mask(str(exc)) or type(exc).__name__
            if isinstance(exc, SessionStopped) or self.stopped:
                self.exit_code = -1
                self.phase = "stopped"
            else:
                self.phase = "failed"
                self.error = _masked_error(exc, self.mask)
            self._append([Event(EventType.ERROR, message)], final=True)

    def _append_lines(self, etype: EventType, lines: list[str]) -> None:
        now = _now()
        if self.mask:
            lines = [self.mask(line) for line in lines]
        tail = f',"code":null,"time":"{now.isoformat()}"}}\n'
        head = f'{{"type":"{etype.value}","data":'
        enc = _encode_str
        text = "".join([head + enc(line) + tail for line in lines])
        self._store(_Chunk(etype, now, lines), text, sum(map(len, lines)))

    def _append(self, events: list[Event], final: bool = False) -> None:
        for e in events:
            if e.type is EventType.BUILD_STARTED:
                self.phase = "building"
            elif e.type is EventType.CONTAINER_STARTED:
                self.phase = "running"
        text = "".join(e.to_json() + "\n" for e in events)
        self._store(_Chunk(None, None, events), text, sum(len(e.data) for e in events), final)

    def _store(self, chunk: _Chunk, text: str, size: int, final: bool = False) -> None:
        with self._write_lock:
            f = self._file
            if f is None:
                return
            f.write(text)
            f.flush()
            if final:
                f.close()
                self._file = None
            with self._cond:
                buf = self._buf
                chunk.start = self._count
                chunk.size = size
                buf.append(chunk)
                count = len(chunk.items)
                self._count += count
                self._buf_events += count
                self._buf_bytes += size
                while len(buf) > 1 and (
                    self._buf_events > self.MAX_EVENTS or self._buf_bytes > self.MAX_BYTES
                ):
                    old = buf.popleft()
                    self._buf_events -= len(old.items)
                    self._buf_bytes -= old.size
                    self._first = buf[0].start
                if final:
                    self._ended = True
                    self.ended_at = _now()
                    # An ended session keeps only its last chunk: late readers replay
                    # the rest from the transcript, so finished sessions cost no memory.
                    while len(buf) > 1:
                        old = buf.popleft()
                        self._buf_events -= len(old.items)
                        self._buf_bytes -= old.size
                    self._first = buf[0].start
                    self._finished.set()
                self._cond.notify_all()

    def events(self) -> Iterator[Event]:
        """Iterate over every event from the first, in order, waiting for new ones.

        The iterator ends after the terminal event (CONTAINER_EXITED or ERROR). Events
        that memory no longer holds are read back from the transcript.
        """
        for batch in self.event_batches():
            yield from batch

    def event_batches(self) -> Iterator[list[Event]]:
        """Like :meth:`events`, in lists of the events that have come since the last one.

        A consumer that handles a batch at a time keeps up with millions of lines.
        """
        index = 0
        reader: _TranscriptReader | None = None
        try:
            while True:
                with self._cond:
                    while index >= self._count and not self._ended:
                        self._cond.wait()
                    if index >= self._count:
                        return
                    behind = index < self._first
                    if not behind:
                        chunks = []
                        for chunk in reversed(self._buf):
                            chunks.append(chunk)
                            if chunk.start <= index:
                                break
                    else:
                        upto = self._first
                if not behind:
                    batch = []
                    for chunk in reversed(chunks):
                        batch.extend(chunk.events(max(0, index - chunk.start)))
                else:
                    if reader is None:
                        reader = _TranscriptReader(self.transcript)
                    batch = reader.read(index, min(upto, index + 2000))
                index += len(batch)
                yield batch
        finally:
            if reader is not None:
                reader.close()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the session to end, whether or not anyone consumes its events.

        Args:
            timeout: Seconds to wait; None waits for ever.

        Returns:
            The exit code (-1 when the session was stopped before its container ran).

        Raises:
            TimeoutError: The session did not end in time.
            CldpdError: The error that ended the session (not raised after stop()).
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"Session {self.id} is still running.")
        if self.error is not None:
            raise self.error
        return -1 if self.exit_code is None else self.exit_code

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the session gracefully and wait for it to end; calling it again is harmless.

        A start session stops its container (SIGINT, then SIGTERM, then SIGKILL within
        ``timeout``); a resume session ends its exec only; a build in progress is abandoned.

        Args:
            timeout: Seconds before the container or exec is killed.
        """
        if not self.done:
            self.stopped = True
            self._control._stop(timeout)
        self._thread.join(timeout + 30)


def _masked_error(exc: BaseException, mask: Masker) -> BaseException:
    """Return exc, or a copy of it whose message and text attributes are masked."""
    if not mask:
        return exc
    attrs = {k: mask(v) if isinstance(v, str) else v for k, v in vars(exc).items()}
    args = tuple(mask(a) if isinstance(a, str) else a for a in exc.args)
    if attrs == vars(exc) and args == exc.args:
        return exc
    with contextlib.suppress(Exception):
        clone = type(exc).__new__(type(exc))
        clone.__dict__.update(attrs)
        clone.args = args
        return clone
    return CldpdError(mask(str(exc)))


class _TranscriptReader:
    """Reads events back from a transcript, sequentially."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, encoding="utf-8")  # noqa: SIM115
        self._index = 0

    def read(self, start: int, stop: int) -> list[Event]:
        while self._index < start:
            self._file.readline()
            self._index += 1
        events = []
        while self._index < stop:
            line = self._file.readline()
            if not line.endswith("\n"):
                raise RuntimeError("transcript ended early")
            events.append(Event.from_json(line))
            self._index += 1
        return events

    def close(self) -> None:
        self._file.close()


def read_transcript(path: str | Path) -> list[Event]:
    """Read every event of a transcript file."""
    with open(path, encoding="utf-8") as f:
        return [Event.from_json(line) for line in f if line.strip()]
