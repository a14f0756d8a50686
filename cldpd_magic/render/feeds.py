"""Feeds: a session's lines published to a cell a few times a second, or written as text."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from itertools import chain, groupby
from typing import TYPE_CHECKING, Protocol

from ..engines import Writer
from ..events import Event, EventType
from ..logs import log_swallowed
from .stream import Line
from .tables import BatchView
from .views import _TYPE, RunLines, SessionView

if TYPE_CHECKING:
    from ..runs import Session


log = logging.getLogger(__package__)


DEFAULT_FLUSH_INTERVAL = 0.25
#: How long a text feed following a flood waits between its batches (far below what a
#: person reading a terminal can tell).
FOLLOW_PACE = 0.01
#: Items in a batch from which a text feed takes the next at once: such a batch means the
#: feed is behind (many reads waiting, or the transcript read back in batches of events).
FOLLOW_PACE_ITEMS = 64


#: Line kinds a running text writes to stderr; the rest go to stdout.
_NOTE_KINDS = frozenset({"stderr", "status", "build", "build_log"})


def _spoken(event: Event) -> bool:
    return event.type is EventType.OUTPUT or event.type is EventType.STDERR


class Lines(Protocol):
    """Lines of one read of a run's output as one item: a session's ``OutputLines``, a
    tuple whose first field is the type, as an Event's is."""

    type: EventType
    lines: list[str]
    time: datetime


def _texts(items: Iterable[Event | Lines]) -> list[str]:
    """The lines of events and of :class:`Lines` items, in order."""
    texts: list[str] = []
    for item in items:
        if type(item) is Event:
            texts.append(item.data)
        else:
            texts.extend(item.lines)
    return texts


def _events(items: Iterable[Event | Lines]) -> Iterator[Event]:
    """Events, each line of a :class:`Lines` item made one."""
    for item in items:
        if type(item) is Event:
            yield item
        else:
            for text in item.lines:
                yield Event(item.type, text, None, item.time)


class _Publisher:
    """What a feed's threads share: the first error of any of them (a reader, the
    publisher) and whether the final view is published."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        """Whether the final view has been published."""
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the final view is published; True if it was."""
        return self._done.wait(timeout)

    @property
    def error(self) -> BaseException | None:
        """The first error recorded, if any."""
        return self._error

    def _record(self, exc: BaseException) -> None:
        """Keep ``exc`` unless an error came first (any thread may call it)."""
        with self._lock:
            if self._error is None:
                self._error = exc


class LiveFeed(_Publisher):
    """Consumes a session's events in a worker thread and publishes its view, batched.

    ``publish(view)`` runs at most once per ``interval`` while output flows, about once
    a second while the agent is quiet (for the elapsed time), and once more at the end.
    It runs on a worker thread, so it must write only through display handles,
    ``Output.append_*`` or widget traits. That thread runs in a copy of the context
    the feed was created in, so in a kernel its messages carry the parent header of
    the cell that created the feed, whichever cell runs meanwhile.

    Args:
        session: The session to follow.
        view: The view to fill.
        publish: Called with the view when it should be shown again.
        interval: Seconds between publications while output flows.

    Attributes:
        error: The first error of its reader or publisher (the feed goes on after a
            publication fails, and ends after its reader fails).
    """

    def __init__(
        self,
        session: Session,
        view: SessionView,
        publish: Callable[[SessionView], None],
        interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        super().__init__()
        self.session = session
        self.view = view
        view.bind(session)
        self.publish = publish
        self.interval = max(0.02, float(interval))
        self.publications = 0
        self._consumed = threading.Event()
        self._wake = threading.Event()
        self._agent_spoke = threading.Event()  # the run's first output or stderr line came
        self._reader = threading.Thread(target=self._read, daemon=True, name="cldpd-feed-read")
        # The writer runs in a copy of the creator's context: a kernel keeps the parent
        # message there, so updates stay tied to the cell that started the feed.
        context = contextvars.copy_context()
        self._writer = threading.Thread(
            target=context.run, args=(self._write,), daemon=True, name="cldpd-feed-pub"
        )
        self._reader.start()
        self._writer.start()

    def _read(self) -> None:
        try:
            for events in self.session.event_batches():
                self.view.add_events(events)
                if not self._agent_spoke.is_set() and any(map(_spoken, events)):
                    self._agent_spoke.set()
                self._wake.set()
        except BaseException as exc:  # the feed must end even if a transcript read fails
            log_swallowed(log, "reading the session's events failed", self.session.mask)
            self._record(exc)
            self.view.fail(f"could not read the session's events: {exc}")
        finally:
            self._consumed.set()
            self._agent_spoke.set()
            self._wake.set()

    def _publish(self) -> None:
        try:
            self.publish(self.view)
            self.publications += 1
        except Exception as exc:  # a frontend going away must not kill the feed
            log_swallowed(log, "publishing the view failed", self.session.mask)
            self._record(exc)

    def _write(self) -> None:
        # What changes is shown at once (the first line with no delay), then at most once
        # per interval: after a publication the writer sleeps out the interval first,
        # except for the agent's first line, which ends that sleep (the build's notes,
        # shown a moment before, must not hold it back).
        shown = (-1, -1)
        while not self._consumed.is_set():
            self._wake.wait(self.interval)  # set by the reader when events come
            self._wake.clear()
            if self._consumed.is_set():
                break
            state = (self.view.version, int(self.view.elapsed()))
            if state != shown:
                shown = state
                spoke = self._agent_spoke.is_set()
                self._publish()
                (self._consumed if spoke else self._agent_spoke).wait(self.interval)
        self._publish()
        self._done.set()


class TextFeed:
    """Writes a session's events as lines of text: the one text consumer of a run.

    It serves the ``cldpd`` command and the blocking :meth:`Dispatcher.start` /
    :meth:`Dispatcher.resume`. Its lines are those of :class:`SessionView` (one
    :class:`RunLines`): the agent's output, rendered, goes to ``out``; its stderr and
    cldpd's own notes (building, running in container ...) go to ``err``. The final
    answer shows once, and secrets are masked after JSON decoding, so a secret written
    with ``\\uXXXX`` escapes is masked too. The run's error is not written: ``wait()``
    raises it.

    Args:
        session: The session to write.
        out: Receives the agent's output lines (anything with ``write(str)``).
        err: Receives stderr and notes; ``out`` when None.
        raw: Write the agent's stdout and stderr lines verbatim (masked as raw text,
            terminal escapes kept) instead of rendered.
        verbose: Also write the image build log.
        notes: Write cldpd's notes (building image ..., running in container ...).
    """

    def __init__(
        self,
        session: Session,
        out: Writer,
        err: Writer | None = None,
        *,
        raw: bool = False,
        verbose: bool = False,
        notes: bool = True,
    ) -> None:
        self.session = session
        self.out = out
        self.err = err if err is not None else out
        self.raw = raw
        self.verbose = verbose
        self.notes = notes
        self.model = RunLines(session.mask, session.kind, markup=False)

    def write(self, events: Iterable[Event | Lines]) -> None:
        """Write a batch of events (one write per stream).

        Args:
            events: Events, and lines of one read as one item (``type`` first, then
                their ``lines``; see :meth:`Session.line_batches`).
        """
        shown: list[str] = []
        noted: list[str] = []
        # Runs of one type at a time: a run of output lines is written at once when its
        # lines show as they are (raw, or plain text with nothing to clean or mask).
        for etype, run in groupby(events, _TYPE):
            if etype is EventType.OUTPUT:
                self._output(list(run), shown, noted)
            elif self.raw and etype is EventType.STDERR:
                noted.extend(_texts(run))
            else:
                self._render(run, shown, noted)
        if shown:
            self.out.write("\n".join(shown) + "\n")
        if noted:
            self.err.write("\n".join(noted) + "\n")

    def _output(self, items: list[Event | Lines], shown: list[str], noted: list[str]) -> None:
        texts = _texts(items)
        renderer = self.model.renderer
        if self.raw or renderer.renders_as_is(texts, "\n".join(texts)):
            shown.extend(texts)
        else:  # output lines straight to the renderer (which never raises): no Event each
            self._take(chain.from_iterable(map(renderer.render, texts)), shown, noted)

    def _render(self, items: Iterable[Event | Lines], shown: list[str], noted: list[str]) -> None:
        self._take(chain.from_iterable(map(self.model.lines, _events(items))), shown, noted)

    def _take(self, lines: Iterable[Line], shown: list[str], noted: list[str]) -> None:
        for line in lines:
            if self._wanted(line.kind):
                (noted if line.kind in _NOTE_KINDS else shown).append(line.text)

    def _wanted(self, kind: str) -> bool:
        if kind == "error":
            return False
        if kind in ("status", "build"):
            return self.notes
        return kind != "build_log" or (self.verbose and self.notes)

    def follow(self) -> None:
        """Write every event of the session, from the first, until it ends.

        In a flood, batches are taken FOLLOW_PACE apart (see :meth:`_pace`).
        """
        written = float("-inf")
        for batch in self.session.line_batches():
            self.write(batch)
            written = self._pace(len(batch), written)

    @staticmethod
    def _pace(items: int, written: float) -> float:
        """Wait before the next batch when this one came right after the last; the time
        this one was written."""
        # A flood's next batch is taken a moment later with what follows it, not at each
        # read of the session's reader (each wake of this thread and hand-over of the
        # GIL costs both threads). A feed that is behind never waits.
        if items < FOLLOW_PACE_ITEMS and time.monotonic() - written < FOLLOW_PACE:
            time.sleep(FOLLOW_PACE)
        return time.monotonic()


class RunSource:
    """What :class:`BatchFeed` follows: a batch's runs, which may grow, and whether it is done.

    A :class:`~cldpd_magic.runs.Batch` is one; so is any object with ``runs`` (a list of
    sessions) and ``done``.
    """

    runs: list[Session]
    done: bool


class _RunFollower:
    """What a :class:`BatchFeed` has taken of one run: its row, and its events not yet taken."""

    def __init__(self, session: Session, row: SessionView) -> None:
        self.session = session
        self.row = row
        self.events: Iterator[list[Event]] | None = session.event_batches(wait=False)

    @property
    def ended(self) -> bool:
        """Whether every event of the run has been taken (or reading them failed)."""
        return self.events is None

    def take(self) -> BaseException | None:
        """Take into the row what the run logged since the last take; an error reading it."""
        if self.events is None:
            return None
        try:
            events = next(self.events, None)
            if events is None:
                self.events = None
            elif events:
                self.row.add_events(events)
        except BaseException as exc:  # the feed must end even if a transcript read fails
            self.events = None
            log_swallowed(log, "reading a batch run's events failed", self.session.mask)
            self.row.fail(f"could not read the session's events: {exc}")
            return exc
        return None


class BatchFeed(_Publisher):
    """Follows every run of a batch in one worker thread and publishes its view, batched.

    One thread, at most once per ``interval`` while output flows and about once a second
    while the runs are quiet, takes what each run has logged since it last looked into the
    :class:`BatchView` and publishes the whole view, and once more at the end. So a batch
    of fifty runs sends no more frontend messages per second than one :class:`LiveFeed`,
    and wakes this process no more often: its runs are not followed by a thread each.
    Like LiveFeed, the thread runs in a copy of the context the feed was created in, so
    in a kernel its messages stay tied to the cell that created the feed.

    Args:
        batch: The batch to follow (``runs`` and ``done``; runs may be added while it runs).
        view: The view to fill.
        publish: Called with the view when it should be shown again.
        interval: Seconds between publications while output flows.

    Attributes:
        error: The first error of reading a run's events or of publishing (the feed goes
            on with the other runs after one fails, and after a publication fails).
    """

    def __init__(
        self,
        batch: RunSource,
        view: BatchView,
        publish: Callable[[BatchView], None],
        interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        super().__init__()
        self.batch = batch
        self.view = view
        state_of = getattr(batch, "state_of", None)
        if callable(state_of) and view.is_queued is None:
            view.is_queued = lambda session: state_of(batch.runs.index(session)) == "queued"
        self.publish = publish
        self.interval = max(0.02, float(interval))
        self.publications = 0
        self._followers: list[_RunFollower] = []
        context = contextvars.copy_context()  # see LiveFeed: updates stay in their cell
        self._writer = threading.Thread(
            target=context.run, args=(self._write,), daemon=True, name="cldpd-batch-pub"
        )
        self._writer.start()

    def _follow_new_runs(self) -> bool:
        """Follow each run not followed yet; True when the batch is complete."""
        done = bool(self.batch.done)  # read first: the runs of a done batch are final
        for session in list(self.batch.runs):
            if self.view.track(session):
                self._followers.append(_RunFollower(session, self.view.row(session)))
        return done

    def _take_events(self) -> bool:
        """Take what every run logged since the last look; True when all have ended."""
        ended = True
        for follower in self._followers:
            error = follower.take()
            if error is not None:
                self._record(error)
            ended = ended and follower.ended
        return ended

    def _publish(self) -> None:
        try:
            self.publish(self.view)
            self.publications += 1
        except Exception as exc:  # a frontend going away must not kill the feed
            log_swallowed(log, "publishing the batch view failed")
            self._record(exc)

    def _write(self) -> None:
        shown: tuple[int, int] = (-1, -1)
        while True:
            complete = self._follow_new_runs()
            if self._take_events() and complete:
                break
            state = (self.view.version, self.view.elapsed_second())
            if state != shown:
                shown = state
                self._publish()
            time.sleep(self.interval)  # one publication per interval, however many runs
        self._publish()
        self._done.set()
