"""Sessions: one agent run in a worker thread, its ordered events and its transcript."""

from __future__ import annotations

import contextlib
import enum
import logging
import re
import secrets as _secrets
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from ..errors import CldpdError, InvalidRequestError
from ..events import Usage
from ..logs import log_swallowed
from ..secrets import MASK, Masker
from .approvals import PermissionRequest
from .changes import RunChanges
from .interactive import Conversation
from .usage import Limits, UsageMeter

if TYPE_CHECKING:
    from ..engines import ContainerInfo, StdinPipe
    from .changes import Changes
from ..events import TERMINAL, Event, EventType, RunState, RunStatus, _now, encode_str_utf8

logger = logging.getLogger(__package__)


__all__ = [
    "MASK",
    "Masker",
    "RunGuard",
    "Session",
    "SessionControl",
    "SessionKind",
    "StopReason",
    "read_transcript",
]


class StopReason(enum.StrEnum):
    """Why cldpd stopped a run by itself; a stopped run's reason is "" when a person did."""

    OVER_BUDGET = "over budget"
    MAX_TURNS = "max turns"
    TIMED_OUT = "timed out"
    BATCH_BUDGET = "batch over budget"


class SessionKind(enum.StrEnum):
    """What a session does; a ``str`` so that ``session.kind == "resume"`` keeps working."""

    START = "start"
    RESUME = "resume"
    ATTACH = "attach"


def new_session_id(pod_name: str) -> str:
    """Return a fresh session id ``<pod>-<8 hex digits>``."""
    return f"{pod_name}-{_secrets.token_hex(4)}"


class _Chunk:
    """Events stored together, with the index of the first and the size of their data."""

    __slots__ = ("items", "size", "start")

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.start = 0
        self.size = 0

    def events(self, offset: int) -> list[Event]:
        return self.items[offset:]


class _LineChunk(_Chunk):
    """Output lines of one read, of one type and time: made Events only when consumed."""

    __slots__ = ("etype", "time")

    def __init__(self, etype: EventType, time: datetime, lines: list[str]) -> None:
        super().__init__(lines)
        self.etype = etype
        self.time = time

    def events(self, offset: int) -> list[Event]:
        new, etype, time = tuple.__new__, self.etype, self.time
        return [new(Event, (etype, line, None, time)) for line in self.items[offset:]]


class OutputLines(NamedTuple):
    """Lines of one read of the agent's output (or stderr), in a batch of
    :meth:`Session.line_batches` in place of an Event each.

    Attributes:
        type: OUTPUT or STDERR.
        lines: The lines, masked, in order.
        time: When they were read.
    """

    type: EventType
    lines: list[str]
    time: datetime


class SessionStopped(CldpdError):
    """Raised inside a job when the session was stopped before its container started."""


class RunGuard:
    """A run's :class:`~cldpd_magic.engines.LaunchGuard`: what its runner asks while it
    makes the run's container, answered from the run's state.

    Made by :meth:`SessionControl.guard`; any runner that creates a container from
    ``RunOptions`` (a run, a kept-alive start, a run attached to stdin) asks it, so a stop
    that lands while the container is being made is never lost.
    """

    def __init__(self, control: SessionControl, stop: Callable[[str, float], None]) -> None:
        self._control = control
        self._stop = stop

    def check(self) -> None:
        """Raise SessionStopped once the run is stopping (before a create or a start)."""
        self._control.check_cancelled()

    def started(self, info: ContainerInfo) -> None:
        """Register the started container, so a later stop stops it; raise if the run is
        stopping already (the runner then removes the container).

        Args:
            info: The container.
        """
        name, stop = info.name, self._stop
        self._control._launched(lambda timeout: stop(name, timeout))


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

    A stop is the run's move to STOPPING (:class:`RunStatus`); this adds how to stop
    what runs (the stopper), registered by the job or by its runner through
    :meth:`guard`, under one lock with the check of the state, so that a stop either
    finds the container or the job sees the stop before it makes one.

    Attributes:
        stdout: Writer whose lines become OUTPUT events.
        stderr: Writer whose lines become STDERR events.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self.stdout = _LineWriter(session, EventType.OUTPUT)
        self.stderr = _LineWriter(session, EventType.STDERR)
        self._stopper: Callable[[float], None] | None = None
        self._lock = threading.Lock()
        self._stop_timeout = 10.0

    @property
    def cancelled(self) -> threading.Event:
        """Set once the run is asked to stop (its :attr:`RunStatus.stop_requested`)."""
        return self._session.status.stop_requested

    @property
    def stop_timeout(self) -> float:
        """Seconds the last stop gave the container before it is killed."""
        return self._stop_timeout

    def guard(self, stop: Callable[[str, float], None]) -> RunGuard:
        """The guard a runner asks while it makes this run's container (``RunOptions.guard``).

        Args:
            stop: Stops a container by name gracefully within a timeout (the runner's
                ``stop``): the stopper of the container once it has started.
        """
        return RunGuard(self, stop)

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

    def set_capturer(self, capturer: Callable[[Session], Changes] | None) -> None:
        """Register how to capture the run's changes (:meth:`Session.capture_changes`)."""
        self._session._capturer = capturer

    def capture_changes(self) -> Changes:
        """Capture the run's changes now (the job does as the run ends); see the session's."""
        return self._session.capture_changes()

    def check_cancelled(self) -> None:
        """Raise SessionStopped if a stop was asked for."""
        if self.cancelled.is_set():
            raise SessionStopped("The session was stopped before the agent started.")

    def _launched(self, stopper: Callable[[float], None]) -> None:
        """Register the stopper of a container that has just started, unless the run is
        stopping: then raise SessionStopped and register nothing."""
        with self._lock:
            self.check_cancelled()
            self._stopper = stopper

    def _stop(self, timeout: float) -> None:
        # The move to STOPPING comes before the stopper is read, under this lock in
        # _launched: a container either is registered by then, or its guard refuses it.
        self._session.status.request_stop()
        with self._lock:
            self._stop_timeout = timeout
            stopper = self._stopper
        if stopper is not None:
            stopper(timeout)


class EventLog:
    """A session's events: written, masked, to its transcript as they come, and held in
    memory up to a bound, so that every reader sees every event in order while memory
    stays bounded (:meth:`batches` replays from the transcript what memory no longer holds).

    A transcript that cannot be written (its directory is a file or read-only, the disk
    fills up) does not end the log: it goes on with its latest events in memory and says
    once, in a STDERR event and in :attr:`error`, that the transcript could not be written.

    Args:
        name: Whose events (the session id), for log messages.
        transcript: Path of the JSON-lines transcript; its directory is made.
        mask: Masks the secrets in what is logged.
        max_events: Events memory holds (the newest chunk is always held).
        max_bytes: Characters of event data memory holds.

    Attributes:
        transcript: Path of the transcript.
        error: One sentence saying why the transcript is incomplete ("" when it is written).
        finished: Set once the terminal event is stored.
        ended_at: When that happened.
    """

    def __init__(
        self, name: str, transcript: Path, mask: Masker, max_events: int, max_bytes: int
    ) -> None:
        self._name = name
        self.transcript = transcript
        self._mask = mask
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._buf: deque[_Chunk] = deque()
        self._buf_events = 0
        self._buf_bytes = 0
        self._first = 0
        self._count = 0
        self._on_disk = 0
        self._ended = False
        self.finished = threading.Event()
        self.ended_at: datetime | None = None
        self.error = ""
        self._reading = 0  # readers iterating over batches()
        self._lost_because = ""
        self._file: IO[bytes] | None = None
        try:
            transcript.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(transcript, "wb")  # noqa: SIM115
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            self._lose_transcript(exc)

    @property
    def held_in_memory(self) -> tuple[int, int]:
        """How many events, and characters of their data, memory holds now."""
        with self._cond:
            return self._buf_events, self._buf_bytes

    @property
    def count(self) -> int:
        """How many events the log has recorded so far."""
        return self._count

    def store(self, chunk: _Chunk, records: bytes, size: int, final: bool = False) -> None:
        """Write a chunk's transcript records and hold the chunk; ``final`` ends the log.

        Args:
            chunk: The events (or output lines) to hold.
            records: Their transcript lines, UTF-8 (see :func:`_utf8`).
            size: Characters of their data.
            final: Whether the chunk holds the terminal event.
        """
        with self._write_lock:
            if self._ended:
                return
            failure: OSError | None = None
            if self._file is not None:
                try:
                    self._file.write(records)
                    self._file.flush()
                except OSError as exc:
                    failure = exc
            self._buffer(chunk, size, on_disk=self._file is not None and failure is None)
            if failure is not None:
                self._lose_transcript(failure)
            if final:
                self._close_transcript()
                self._end()

    def _buffer(self, chunk: _Chunk, size: int, on_disk: bool) -> None:
        """Hold a chunk in memory, dropping the oldest ones over the bounds."""
        with self._cond:
            buf = self._buf
            chunk.start = self._count
            chunk.size = size
            buf.append(chunk)
            count = len(chunk.items)
            self._count += count
            if on_disk:
                self._on_disk = self._count
            self._buf_events += count
            self._buf_bytes += size
            while len(buf) > 1 and (
                self._buf_events > self._max_events or self._buf_bytes > self._max_bytes
            ):
                self._drop_oldest()
            self._cond.notify_all()

    def _drop_oldest(self) -> None:
        old = self._buf.popleft()
        self._buf_events -= len(old.items)
        self._buf_bytes -= old.size
        self._first = self._buf[0].start

    def _end(self) -> None:
        with self._cond:
            self._ended = True
            self.ended_at = _now()
            if not self._reading:
                self._keep_what_disk_lacks()
            self.finished.set()
            self._cond.notify_all()

    def _keep_what_disk_lacks(self) -> None:
        """An ended session keeps only what its transcript does not hold (its last chunk
        when it does): later readers replay the rest from the transcript. Readers still
        reading when it ends read on from memory (the last of them drops it)."""
        while len(self._buf) > 1 and self._buf[1].start <= self._on_disk:
            self._drop_oldest()

    def _close_transcript(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def _lose_transcript(self, exc: Exception) -> None:
        """Go on without a transcript, saying so once (a STDERR event and :attr:`error`)."""
        self._close_transcript()
        if self.error:
            return
        log_swallowed(
            logger, f"session {self._name}: writing its transcript failed", self._mask, exc
        )
        reason = self._lost_because = _reason(exc)
        self.error = (
            f"cldpd: the transcript could not be written to {self.transcript} ({reason}); "
            f"the session goes on, keeping only its latest events in memory."
        )
        notice = [Event(EventType.STDERR, self.error)]
        self._buffer(_Chunk(notice), len(self.error), on_disk=False)

    def batches(
        self, start: int = 0, *, lines: bool = False, wait: bool = True
    ) -> Iterator[list[Any]]:
        """Every event from ``start`` (the first: 0), in order, in lists of those that came
        since the last.

        A consumer that handles a batch at a time keeps up with millions of lines.

        Args:
            start: The index of the first event.
            lines: Give the lines of one read held in memory as one :class:`OutputLines`
                in place of an Event each.
            wait: Wait for new events; without it, an empty list says none has come yet.
        """
        index = max(0, start)
        reader: _TranscriptReader | None = None
        unreadable = ""
        with self._cond:
            self._reading += 1
        try:
            while True:
                with self._cond:
                    while wait and index >= self._count and not self._ended:
                        self._cond.wait()
                    caught_up = index >= self._count
                    if caught_up and self._ended:
                        return
                    first = self._first
                    if not caught_up and index >= first:
                        chunks = []
                        for chunk in reversed(self._buf):
                            chunks.append(chunk)
                            if chunk.start <= index:
                                break
                    on_disk = self._on_disk if not unreadable else 0
                if caught_up:
                    yield []
                    continue
                if index >= first:
                    batch = []
                    for chunk in reversed(chunks):
                        offset = max(0, index - chunk.start)
                        if lines and type(chunk) is _LineChunk:
                            batch.append(OutputLines(chunk.etype, chunk.items[offset:], chunk.time))
                        else:
                            batch.extend(chunk.events(offset))
                    index = chunks[0].start + len(chunks[0].items)
                    yield batch
                    continue
                if index < on_disk:
                    try:
                        if reader is None:
                            reader = _TranscriptReader(self.transcript)
                        batch = reader.read(index, min(first, on_disk, index + 2000))
                    except (OSError, ValueError, KeyError, RuntimeError) as exc:
                        log_swallowed(
                            logger,
                            f"session {self._name}: reading its transcript failed",
                            self._mask,
                        )
                        unreadable = f"could not be read ({_reason(exc)})"
                        continue
                else:
                    why = unreadable or f"could not be written ({self._lost_because})"
                    batch = [
                        Event(
                            EventType.STDERR,
                            f"cldpd: {first - index} earlier events are not shown: memory no "
                            f"longer holds them and the transcript {self.transcript} {why}.",
                        )
                    ]
                    index = first
                    yield batch
                    continue
                index += len(batch)
                yield batch
        finally:
            if reader is not None:
                reader.close()
            with self._cond:
                self._reading -= 1
                if self._ended and not self._reading:
                    self._keep_what_disk_lacks()


class Session(RunChanges):
    """One agent run (a start, a resume or an attach) in a worker thread.

    Its events go to an :class:`EventLog`: written, masked, to the transcript as they
    come and kept in memory up to a bound; :meth:`events` replays from the transcript
    what memory no longer holds, so every consumer sees every event in order while
    memory stays bounded.

    A transcript that cannot be written (its directory is a file or read-only, the disk
    fills up) does not end the session: it goes on with its latest events in memory,
    says once, in a STDERR event and in :attr:`transcript_error`, that the transcript
    could not be written, and ends with the agent's exit code.

    Args:
        pod_name: The pod.
        container: The pod's container name.
        job: Runs the agent; gets a :class:`SessionControl`, returns the exit code.
        transcript_dir: Where the transcript file goes.
        secrets: Values to mask in every event, error and transcript line.
        kind: What the session does (a :class:`SessionKind` or its value).
        session_id: The id; a fresh ``<pod>-<8 hex>`` when None.
        claude_session: Claude Code's session uuid.
        missing_env: inheritEnv names that were not set on the host.
        run: The run's name (the pod's name when None).
        limits: Caps on the run's cost, turns and time; passing one stops the run
            gracefully, and it ends STOPPED with that reason.
        conversation: An interactive run's stdin and questions (None for a one-shot
            run). The session that starts the agent's process owns it (its output feeds
            it, and its end ends it); a resume of a live run shares it.
        owns_conversation: Whether this session starts the conversation's process.

    Attributes:
        id: ``<pod>-<8 hex>``.
        pod_name: The pod.
        run: The run: one container of the pod on one issue (``cldpd-<run>``).
        limits: The run's caps.
        container: The container name.
        kind: What the session does (:class:`SessionKind`).
        status: The run's state machine (:class:`RunStatus`); :attr:`state` reads it.
        claude_session: Claude Code's session uuid ("" for an attach).
        missing_env: inheritEnv names that were not forwarded.
        transcript: Path of the JSON-lines transcript.
        transcript_error: One sentence saying why the transcript is incomplete ("" when
            it is written).
        error: The error that ended the session, if any.
        stopped: Whether :meth:`stop` was called before the session ended.
    """

    # What a live run holds for its readers: a reader further behind reads the transcript
    # back, far slower. A reader starved of the CPU by a flood falls behind by tens of
    # thousands of short lines (seen: 40,000 of 89 characters), so lines of usual length
    # are bounded by their characters, and only very short ones by their count (an ended
    # run keeps only what its transcript lacks).
    MAX_EVENTS = 50_000
    MAX_BYTES = 4 * 1024 * 1024

    def __init__(
        self,
        pod_name: str,
        container: str,
        job: Callable[[SessionControl], int],
        transcript_dir: str | Path,
        secrets: Iterable[str] = (),
        kind: SessionKind | str = SessionKind.START,
        session_id: str | None = None,
        claude_session: str = "",
        missing_env: Iterable[str] = (),
        *,
        run: str | None = None,
        limits: Limits | None = None,
        conversation: Conversation | None = None,
        owns_conversation: bool = True,
    ) -> None:
        self.id = session_id or new_session_id(pod_name)
        self.conversation = conversation
        #: The agent's stdin, for a caller that drives it (``Dispatcher.drive_session``).
        self.stdin: StdinPipe | None = None
        #: What a driver puts before its first prompt (the template and issue line).
        self.start_prompt = ""
        self._owns_conversation = conversation is not None and owns_conversation
        self.pod_name = pod_name
        self.run = run or pod_name
        self.limits = limits or Limits()
        self.meter = UsageMeter()
        self._usage_listeners: list[Callable[[Session], None]] = []
        self._timer: threading.Timer | None = None
        self.container = container
        self.kind = SessionKind(kind)
        self.claude_session = claude_session
        self.missing_env = list(missing_env)
        self.mask = Masker(secrets)
        self.error: BaseException | None = None
        self.stopped = False
        self.status = RunStatus()
        self.started_at = _now()
        transcript = Path(transcript_dir).expanduser() / f"{self.id}.jsonl"
        self._log = EventLog(self.id, transcript, self.mask, self.MAX_EVENTS, self.MAX_BYTES)
        self.transcript = transcript
        self._control = SessionControl(self)
        if self._owns_conversation:
            conversation.attach(self._emit_masked)
        self._job = job
        self._thread = threading.Thread(target=self._work, name=f"cldpd-{self.id}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.kind} {self.state}>"

    @property
    def done(self) -> bool:
        """Whether the session has ended."""
        return self._log.finished.is_set()

    @property
    def state(self) -> RunState:
        """Where the run is (:class:`RunState`, equal to its string value)."""
        return self.status.state

    @property
    def exit_code(self) -> int | None:
        """The agent's exit code once it has ended (-1 when stopped before it ran)."""
        return self.status.exit_code

    @property
    def usage(self) -> Usage:
        """Turns, tokens and cost so far, live from the agent's stream-json output."""
        return self.meter.usage

    @property
    def links(self) -> list[str]:
        """Pull request, branch and commit links the agent printed, in order."""
        return list(self.meter.links)

    @property
    def stop_reason(self) -> str:
        """Why cldpd stopped the run by itself (``over budget``, ...), "" otherwise."""
        return self.status.reason

    def add_usage_listener(self, listener: Callable[[Session], None]) -> None:
        """Call ``listener(session)`` whenever the usage changes, on the thread reading
        the run's output (one thread may read many runs' output).

        A listener must not block; it gets every change from the next output line on.
        """
        self._usage_listeners.append(listener)

    @property
    def transcript_error(self) -> str:
        """One sentence saying why the transcript is incomplete ("" when it is written)."""
        return self._log.error

    @property
    def ended_at(self) -> datetime | None:
        """When the session ended (None while it runs)."""
        return self._log.ended_at

    @property
    def held_in_memory(self) -> tuple[int, int]:
        """How many events, and characters of their data, memory holds now (the rest is on disk)."""
        return self._log.held_in_memory

    @property
    def event_count(self) -> int:
        """How many events the session has recorded so far."""
        return self._log.count

    def _work(self) -> None:
        control = self._control
        try:
            try:
                code = self._job(control)
            finally:
                control.stdout.close()
                control.stderr.close()
                if self._owns_conversation:
                    self.conversation.finish()
            self._mark_limit_passed()
            self.status.finish(exit_code=code)
            self._append([Event(EventType.CONTAINER_EXITED, str(code), code)], final=True)
        except BaseException as exc:
            self._mark_limit_passed()
            log_swallowed(logger, f"session {self.id} ended by an error", self.mask)
            try:
                message = self.mask(str(exc)) or type(exc).__name__
            except Exception:  # an error whose str() fails must still end the session
                message = type(exc).__name__
            if self.status.finish(error=message) is RunState.FAILED:
                self.error = _masked_error(exc, self.mask)
            self._append([Event(EventType.ERROR, message)], final=True)

    def _mark_limit_passed(self) -> None:
        """A run the CLI ended at a cap, or that passed one, ends STOPPED with that reason."""
        if self._timer is not None:
            self._timer.cancel()
        subtype = self.meter.result_subtype
        reason = self.limits.passed(self.usage) or _CLI_CAPS.get(subtype, "")
        if reason:
            self.status.request_stop(reason)

    def _on_usage(self) -> None:
        reason = self.limits.passed(self.usage)
        if reason:
            self.stop_for(reason)
        for listener in self._usage_listeners:
            try:
                listener(self)
            except Exception:
                log_swallowed(logger, f"session {self.id}: a usage listener failed", self.mask)

    def stop_for(self, reason: str, timeout: float = 10.0) -> None:
        """Stop the run gracefully because of a cap, without waiting; it ends STOPPED.

        Args:
            reason: Why (a :class:`StopReason`).
            timeout: Seconds before the container or exec is killed.
        """
        if self.done or not self.status.request_stop(reason):
            return
        self.stopped = True
        # Not on the worker's thread: it must go on reading the output meanwhile.
        threading.Thread(
            target=self._control._stop, args=(timeout,), daemon=True, name=f"cldpd-cap-{self.id}"
        ).start()

    def _start_timer(self) -> None:
        seconds = self.limits.timeout_seconds
        if seconds is not None and self._timer is None:
            self._timer = threading.Timer(seconds, self.stop_for, args=(StopReason.TIMED_OUT,))
            self._timer.daemon = True
            self._timer.start()

    def _append_lines(self, etype: EventType, lines: list[str]) -> None:
        # The lines of one read are checked at once (one scan of their text), and looked
        # at one by one only where a check finds something: a secret, stream-json, a link.
        now = _now()
        text = "\n".join(lines)
        if not self.mask.is_clean(text):
            lines = [self.mask(line) for line in lines]
            text = "\n".join(lines)
        # Lines without a brace are no stream-json: nothing to meter (unless a link) or
        # to follow in the conversation.
        output = etype is EventType.OUTPUT
        may_hold_events = output and "{" in text
        links = output and _LINK_MARK.search(text) is not None
        if may_hold_events or links:
            feed = self.meter.feed
            if any([feed(line, links) for line in lines]):
                self._on_usage()
        records = _transcript_records(etype, now, lines, text)
        self._log.store(_LineChunk(etype, now, lines), records, len(text) - len(lines) + 1)
        if may_hold_events and self._owns_conversation:
            self.conversation.observe(lines)  # after the lines, so its events follow them

    def _append(self, events: list[Event], final: bool = False) -> None:
        for e in events:
            if e.type not in TERMINAL:  # the terminal state is set by _work, knowing why
                self.status.on_event(e)
            if e.type is EventType.CONTAINER_STARTED:
                self._start_timer()
        text = "".join(e.to_json() + "\n" for e in events)
        self._log.store(_Chunk(events), _utf8(text), sum(len(e.data) for e in events), final)

    def _emit_masked(self, etype: EventType, data: str) -> None:
        self._append([Event(etype, self.mask(data))])

    # --- an interactive run ----------------------------------------------------------------

    @property
    def owns_conversation(self) -> bool:
        """Whether this session runs its conversation's agent process (a follow-up does not)."""
        return self._owns_conversation

    @property
    def interactive(self) -> bool:
        """Whether the run's agent takes approvals, messages and interrupts while it runs."""
        return self.conversation is not None

    def _conversation(self, doing: str) -> Conversation:
        if self.conversation is None:
            raise InvalidRequestError(
                f"Run {self.run} is not interactive, so it cannot {doing}; set "
                '"interactive": true in its pod.json (Claude Code pods) to work with it live.'
            )
        return self.conversation

    def pending(self) -> list[PermissionRequest]:
        """The tool calls waiting for an approval, oldest first (empty when none)."""
        return [] if self.conversation is None else self.conversation.pending()

    def decide(
        self, request_id: str, *, allow: bool, message: str = "", always: bool = False
    ) -> None:
        """Answer a pending approval (see :meth:`pending`).

        Args:
            request_id: The request's id.
            allow: Whether the tool call may run.
            message: What the agent is told when it may not.
            always: Allow that tool for the rest of this run without asking.

        Raises:
            InvalidRequestError: The run is not interactive, or no such request is pending.
        """
        self._conversation("answer approvals").decide(
            request_id, allow=allow, message=message, always=always
        )

    def interrupt(self) -> None:
        """End the turn in flight; the run and its container stay, and take a follow-up.

        Raises:
            InvalidRequestError: The run is not interactive, or its agent has ended.
        """
        self._conversation("be interrupted").interrupt()

    def set_permission_mode(self, mode: str) -> None:
        """Change how the agent asks for approvals from its next tool call on.

        Raises:
            InvalidRequestError: Not interactive, no such mode, or the agent refused it.
        """
        self._conversation("change its permission mode").set_permission_mode(mode)

    def set_model(self, name: str | None) -> None:
        """Change the agent's model from its next turn on.

        Raises:
            InvalidRequestError: Not interactive, or the agent has ended.
        """
        self._conversation("change its model").set_model(name)

    def events(self) -> Iterator[Event]:
        """Iterate over every event from the first, in order, waiting for new ones.

        The iterator ends after the terminal event (CONTAINER_EXITED or ERROR). Events
        that memory no longer holds are read back from the transcript; those that neither
        holds (the transcript could not be written or read) are named in one STDERR event.
        """
        for batch in self.event_batches():
            yield from batch

    def event_batches(self, start: int = 0, *, wait: bool = True) -> Iterator[list[Event]]:
        """Like :meth:`events`, in lists of the events that have come since the last one.

        A consumer that handles a batch at a time keeps up with millions of lines.

        Args:
            start: The first event's index (0: from the first; :attr:`event_count` now:
                only what comes from now on).
            wait: Wait for events to come; without it, each ``next`` gives at once what
                has come (read back from the transcript, up to 2,000 events), an empty
                list when nothing has: one thread can so follow many sessions, taking
                their events when it chooses.
        """
        return self._log.batches(start, wait=wait)

    def line_batches(self) -> Iterator[list[Event | OutputLines]]:
        """Like :meth:`event_batches`, with the lines of one read as one :class:`OutputLines`.

        A consumer that takes lines together (a text feed) is spared making an Event
        for each of them; lines read back from the transcript still come as Events.
        """
        return self._log.batches(lines=True)

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
        if not self._log.finished.wait(timeout):
            raise TimeoutError(f"Session {self.id} is still running.")
        if self.error is not None:
            raise self.error
        return -1 if self.exit_code is None else self.exit_code

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the session gracefully and wait for it to end; calling it again is harmless.

        A start session stops its container (SIGINT, then SIGTERM, then SIGKILL within
        ``timeout``), which is then removed, kept alive or not; a resume session ends its
        exec only; a build in progress is abandoned. A stop while the container is being
        made is never lost: the container is not made, or is removed at once.

        Args:
            timeout: Seconds before the container or exec is killed.
        """
        if not self.done:
            self.expect_stop()
            self._control._stop(timeout)
        self._thread.join(timeout + 30)

    def expect_stop(self) -> None:
        """Record that the run's container is being stopped, so its end counts as stopped."""
        if not self.done:
            self.stopped = True
            self.status.request_stop()


#: Result subtypes of a CLI that ended itself at a cap, and the reason a run is marked with.
_CLI_CAPS = {
    "error_max_budget_usd": StopReason.OVER_BUDGET,
    "error_max_turns": StopReason.MAX_TURNS,
}


#: What every link holds: a regex finds it in a read's text twice as fast as ``in`` does.
_LINK_MARK = re.compile("://")
#: Latin-1 that a JSON string holds as it is (no quote, backslash or control), and the
#: newline between lines: deleting these bytes from text leaves what must be escaped.
_JSON_AS_IS = bytes(b for b in range(0x20, 0x100) if b not in b'"\\') + b"\n"


def _utf8(text: str) -> bytes:
    """Transcript text as written: a lone surrogate (no UTF-8 has one) as its JSON escape,
    which reads back as the same string."""
    return text.encode("utf-8", "backslashreplace")


def _transcript_records(etype: EventType, time: datetime, lines: list[str], text: str) -> bytes:
    """The transcript records of lines of one type and time (``text``: them joined by
    newlines), as :meth:`Event.to_json` writes them, one a line, in UTF-8 (:func:`_utf8`)."""
    head = f'{{"type":"{etype.value}","data":"'
    tail = f'","code":null,"time":"{time.isoformat()}"}}\n'
    plain = '"' not in text and "\\" not in text
    if plain and not text.encode("latin-1", "ignore").translate(None, _JSON_AS_IS):
        return _utf8(head + (tail + head).join(lines) + tail)  # nothing to escape
    if "\\" not in text:
        # With no backslash in the text, each escaped newline is a line break: every line
        # is escaped by one call.
        escaped = encode_str_utf8(text)[1:-1].split(b"\\n")
    else:
        escaped = [encode_str_utf8(line)[1:-1] for line in lines]
    return head.encode() + (tail + head).encode().join(escaped) + tail.encode()


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


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


#: How the transcript records of output and stderr lines begin, and what follows the line.
_LINE_HEADS = tuple(
    (etype, f'{{"type":"{etype.value}","data":"') for etype in (EventType.OUTPUT, EventType.STDERR)
)
_LINE_TAIL = '","code":null,"time":"'


class _TranscriptReader:
    """Reads events back from a transcript, sequentially.

    A reader that fell behind what memory holds reads on from here, so this must go
    faster than lines come: a line's record without an escape is read by slicing it
    (its text has no quote then, so the first tail is its own), any other by JSON.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, encoding="utf-8")  # noqa: SIM115
        self._index = 0
        self._stamp = ""
        self._time: datetime | None = None

    def read(self, start: int, stop: int) -> list[Event]:
        while self._index < start:
            self._file.readline()
            self._index += 1
        events = []
        while self._index < stop:
            line = self._file.readline()
            if not line.endswith("\n"):
                raise RuntimeError("transcript ended early")
            events.append(self._line(line) if "\\" not in line else Event.from_json(line))
            self._index += 1
        return events

    def _line(self, record: str) -> Event:
        """An event read back from a record with no escape in it."""
        for etype, head in _LINE_HEADS:
            if record.startswith(head) and record.endswith('"}\n'):
                end = record.find(_LINE_TAIL, len(head))
                stamp = record[end + len(_LINE_TAIL) : -3]
                if end < 0 or '"' in stamp:
                    break
                if stamp != self._stamp or self._time is None:
                    self._time, self._stamp = datetime.fromisoformat(stamp), stamp
                return tuple.__new__(Event, (etype, record[len(head) : end], None, self._time))
        return Event.from_json(record)

    def close(self) -> None:
        self._file.close()


def read_transcript(path: str | Path) -> list[Event]:
    """Read every event of a transcript file."""
    with open(path, encoding="utf-8") as f:
        return [Event.from_json(line) for line in f if line.strip()]
