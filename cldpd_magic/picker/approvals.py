"""Approvals waiting for a person, across runs, free of ipywidgets.

An interactive run's agent asks before a tool call its settings do not allow: the run
records a PERMISSION_REQUEST event, and a PERMISSION_DECISION event once anyone answers
(a person here or elsewhere, a policy, the timeout) or the agent withdraws it. An
:class:`ApprovalQueue` follows those events of the runs it is given, each in a reader
thread, and keeps what is still waiting, oldest first; the widgets
(:mod:`.approval_rows`) show it, and answer through :meth:`ApprovalQueue.decide`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..errors import CldpdError
from ..events import TERMINAL, Event, EventType
from ..logs import log_swallowed
from ..render import clean_text, tool_call
from ..runs import Session
from .state import error_sentence

logger = logging.getLogger(__package__)

#: Seconds between two looks for new runs when a queue watches a changing set of runs.
WATCH_INTERVAL = 0.5
#: Characters of a tool's name a row shows.
MAX_TOOL_CHARS = 60


@dataclass(frozen=True)
class PendingApproval:
    """A tool call a run's agent waits to be allowed.

    Attributes:
        run: The run that asks.
        request_id: The agent's id of the request.
        tool: The tool's name, cleaned (``Bash``).
        call: What the call does, cleaned and masked (``Bash: touch x``).
        time: When it was asked.
        session: The session to answer it through.
    """

    run: str
    request_id: str
    tool: str
    call: str
    time: datetime
    session: Session = field(compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        """What names it across runs: (run, request id)."""
        return self.run, self.request_id


def _fields(data: str) -> Mapping[str, Any]:
    try:
        found = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return found if isinstance(found, Mapping) else {}


def pending_from(session: Session, event: Event) -> PendingApproval | None:
    """The approval a PERMISSION_REQUEST event asks for; None if its data is unreadable."""
    fields = _fields(event.data)
    request_id = fields.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        return None
    raw_tool = fields.get("tool")
    tool = clean_text(raw_tool if isinstance(raw_tool, str) else "")[:MAX_TOOL_CHARS] or "tool"
    call = session.mask(clean_text(tool_call(tool, fields.get("input"))))
    return PendingApproval(session.run, request_id, tool, call, event.time, session)


class ApprovalQueue:
    """The approvals waiting across the runs it follows, oldest first (newest last).

    Each followed run's events are read in a thread of their own from the first: a
    request adds an entry, its decision (by anyone) or the run's end removes it.
    ``on_change()`` is called, on those threads, whenever the entries change.

    Args:
        on_change: Called when the entries change (from any thread).

    Attributes:
        error: The last answer that could not be given, one sentence ("" when none).
    """

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self._on_change = on_change
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], PendingApproval] = {}
        self._followed: set[str] = set()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self.error = ""

    # -- what it follows -------------------------------------------------------------

    def follow(self, session: Session) -> bool:
        """Follow a run's approvals (once per session); whether it was new."""
        with self._lock:
            if self._closed.is_set() or session.id in self._followed:
                return False
            self._followed.add(session.id)
            reader = threading.Thread(
                target=self._read, args=(session,), daemon=True,
                name=f"cldpd-approvals-{session.run}",
            )  # fmt: skip
            self._threads = [t for t in self._threads if t.is_alive()] + [reader]
        reader.start()
        return True

    def watch(self, sessions: Callable[[], Iterable[Session]], until: Callable[[], bool]) -> None:
        """Follow, as they come, the interactive runs ``sessions()`` lists, until ``until()``.

        Only the session that runs each agent is followed (a follow-up repeats its
        run's questions), so each question shows once.
        """

        def look() -> None:
            while not self._closed.is_set():
                done = until()
                for session in list(sessions()):
                    if session.owns_conversation and not session.done:
                        self.follow(session)
                if done:
                    return
                self._closed.wait(WATCH_INTERVAL)

        watcher = threading.Thread(target=look, daemon=True, name="cldpd-approvals-watch")
        with self._lock:
            self._threads.append(watcher)
        watcher.start()

    def _read(self, session: Session) -> None:
        try:
            for batch in session.event_batches():
                if self._closed.is_set():
                    return
                changed = False
                for event in batch:
                    changed = self._take(session, event) or changed
                if changed:
                    self._changed()
        except Exception:  # a reader must never print; the run's own view says more
            log_swallowed(logger, f"following the approvals of run {session.run} failed")
        finally:
            self._forget(session)

    def _take(self, session: Session, event: Event) -> bool:
        if event.type is EventType.PERMISSION_REQUEST:
            item = pending_from(session, event)
            if item is None:
                return False
            with self._lock:
                self._items[item.key] = item
            return True
        if event.type is EventType.PERMISSION_DECISION:
            request_id = _fields(event.data).get("request_id")
            with self._lock:
                return self._items.pop((session.run, str(request_id)), None) is not None
        if event.type in TERMINAL:
            self._forget(session)
        return False

    def _forget(self, session: Session) -> None:
        """A run ended: nothing of it waits any more."""
        with self._lock:
            gone = [k for k, item in self._items.items() if item.session is session]
            for key in gone:
                del self._items[key]
        if gone:
            self._changed()

    def _changed(self) -> None:
        if self._closed.is_set():
            return
        try:
            self._on_change()
        except Exception:
            log_swallowed(logger, "showing the approvals failed")

    # -- reading and answering --------------------------------------------------------

    def items(self) -> list[PendingApproval]:
        """What waits, oldest first (newest last)."""
        with self._lock:
            return sorted(self._items.values(), key=lambda item: item.time)

    def decide(
        self, item: PendingApproval, *, allow: bool, always: bool = False, message: str = ""
    ) -> bool:
        """Answer an approval; whether the answer was given.

        An approval answered meanwhile (by someone else, its timeout) or whose agent has
        ended leaves the queue; :attr:`error` then says why in one sentence.
        """
        try:
            item.session.decide(item.request_id, allow=allow, always=always, message=message)
        except CldpdError as exc:
            self.error = error_sentence(exc)
            with self._lock:
                self._items.pop(item.key, None)
            self._changed()
            return False
        self.error = ""
        return True

    def close(self) -> None:
        """Stop following; entries no longer change (its reader threads end with their runs)."""
        self._closed.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the readers and watcher to end (runs ended, or closed); whether they did."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        return not any(t.is_alive() for t in threads)


__all__ = ["ApprovalQueue", "PendingApproval", "pending_from"]
