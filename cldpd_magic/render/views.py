"""Views of a run: its events as rendered lines (:class:`RunLines`) and a bounded tail
with the run's status (:class:`SessionView`), as text and HTML.
"""

from __future__ import annotations

import html
import logging
import re
import threading
from collections import deque
from collections.abc import Callable
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING

from ..events import Event, EventType, RunState, RunStatus, Usage
from ..logs import log_swallowed
from ..secrets import Masker
from .approvals import approval_lines
from .clean import _clip, clean_text
from .stream import Line, StreamRenderer

if TYPE_CHECKING:
    from ..runs import Session


log = logging.getLogger(__package__)


DEFAULT_MAX_LINES = 200


_STEP_RE = re.compile(r"^Step (\d+)/(\d+) :")


_CSS = (
    "<style>"
    ".cldpd-view{font-family:var(--jp-code-font-family,monospace);font-size:12px;}"
    ".cldpd-status{font-weight:bold;margin:2px 0;}"
    ".cldpd-body{max-height:480px;overflow-y:auto;display:flex;flex-direction:column-reverse;}"
    ".cldpd-text,.cldpd-stderr,.cldpd-tool,.cldpd-tool_result,.cldpd-tool_error,"
    ".cldpd-result,.cldpd-failed,.cldpd-system,.cldpd-build,.cldpd-error,.cldpd-elided,"
    ".cldpd-thinking,.cldpd-retry,.cldpd-denied,.cldpd-event,.cldpd-user,.cldpd-approval,"
    ".cldpd-allowed{white-space:pre-wrap;word-break:break-all;}"
    ".cldpd-approval{color:#e65100;font-weight:bold;}.cldpd-allowed{color:#2e7d32;}"
    ".cldpd-stderr,.cldpd-tool_error,.cldpd-error,.cldpd-denied{color:#c62828;}"
    ".cldpd-tool{color:#1565c0;}.cldpd-tool_result,.cldpd-system,.cldpd-build,.cldpd-elided,"
    ".cldpd-event,.cldpd-user{color:#757575;}"
    ".cldpd-thinking{color:#9e9e9e;font-style:italic;}.cldpd-retry{color:#e65100;}"
    ".cldpd-result{font-weight:bold;color:#2e7d32;}"
    ".cldpd-failed{font-weight:bold;color:#c62828;}"
    ".cldpd-md{font-family:var(--jp-content-font-family,sans-serif);}"
    ".cldpd-md p,.cldpd-md ul,.cldpd-md ol,.cldpd-md h1,.cldpd-md h2,.cldpd-md h3{margin:4px 0;}"
    ".cldpd-md table{border-collapse:collapse;}"
    ".cldpd-md td,.cldpd-md th{border:1px solid #e0e0e0;padding:1px 6px;}"
    ".cldpd-transcript{color:#757575;font-size:11px;}"
    "</style>"
)


#: Line kinds a running text shows but a view does not: it has its status line instead.
_STATUS_KINDS = frozenset({"status", "build_log"})
_TYPE = itemgetter(0)  # Event.type, read without Python code per event
_DATA = itemgetter(1)  # Event.data


class RunLines:
    """Turns one run's events into :class:`Line`: what the HTML view and the text are made of.

    Output lines are rendered by one :class:`StreamRenderer` (so the final answer shows
    once); everything is masked after decoding and free of terminal escapes. Build steps
    (``Step N/M``) are counted for progress bars.

    Args:
        mask: Masks secret values (a session's ``Masker``).
        kind: What the run does (``start``, ``resume``, ``attach``), for its status lines.
        markup: Make Markdown's HTML as lines are rendered (a text reader needs none).

    Attributes:
        build_step: The last build step seen.
        build_total: How many steps the build has.
    """

    def __init__(self, mask: Masker, kind: str = "", *, markup: bool = True) -> None:
        self.mask = mask
        self.kind = str(kind)
        self.renderer = StreamRenderer(mask, markup=markup)
        self.build_step = 0
        self.build_total = 0

    def _clean(self, text: str) -> str:
        return self.mask(clean_text(text))

    def lines(self, event: Event) -> list[Line]:
        """The lines one event shows as; never raises, whatever the agent printed."""
        try:
            return self._lines(event)
        except Exception:
            log_swallowed(log, "a session event could not be rendered; shown as text", self.mask)
            return [Line("text", self._clean(_clip(str(event.data))))]

    def _lines(self, event: Event) -> list[Line]:
        etype, data = event.type, event.data
        if etype is EventType.OUTPUT:
            return self.renderer.render(data)
        if etype is EventType.STDERR:
            return [Line("stderr", self._clean(_clip(data)))]
        if etype is EventType.BUILD_OUTPUT:
            step = _STEP_RE.match(data)
            if step:
                self.build_step, self.build_total = int(step.group(1)), int(step.group(2))
            return [Line("build" if data.startswith("cldpd:") else "build_log", self._clean(data))]
        if etype is EventType.BUILD_STARTED:
            return [Line("status", self._clean(f"cldpd: building image {data}"))]
        if etype is EventType.BUILD_COMPLETE:
            self.build_step = self.build_total = max(self.build_total, 1)
            return []
        if etype is EventType.CONTAINER_STARTED:
            what = f"{self.kind} running" if self.kind else "running"
            return [Line("status", self._clean(f"cldpd: {what} in container {data}"))]
        if etype is EventType.ERROR:
            return [Line("error", self._clean(data))]
        if etype is EventType.EGRESS_BLOCKED:
            return [Line("stderr", self._clean(f"⛔ egress blocked: {_clip(data)}"))]
        if etype in (EventType.PERMISSION_REQUEST, EventType.PERMISSION_DECISION):
            return approval_lines(event, self.mask)
        return []


class SessionView:
    """What a cell or a widget shows of one run: a status line, build progress and a tail.

    The state comes from the run's :class:`~cldpd_magic.events.RunStatus`: the
    session's own once the view is bound to it (``session=`` or :meth:`bind`, as
    :class:`LiveFeed` does), so the view never re-derives it. A view fed events without
    a session follows them with a status of its own (the same state machine).

    Args:
        title: What the status line names (usually the pod).
        max_lines: How many lines the tail keeps; older lines are elided with a count.
        masker: Masks secret values in anything added that did not come from a session.
        transcript: The transcript path to show.
        session: The session whose state the view shows.
    """

    def __init__(
        self,
        title: str,
        max_lines: int = DEFAULT_MAX_LINES,
        masker: Masker | None = None,
        transcript: str = "",
        *,
        session: Session | None = None,
    ) -> None:
        self.title = clean_text(title)
        self.max_lines = max(1, int(max_lines))
        if session is not None:
            masker = masker or session.mask
            transcript = transcript or str(session.transcript)
        self.mask = masker or Masker()
        self.transcript = clean_text(str(transcript))
        self.model = RunLines(self.mask)
        self.status = RunStatus()
        self._usage: Callable[[], Usage] | None = None
        self._bound = False
        self._failure = ""
        self.tail: deque[Line] = deque()
        self.tail_lines = 0
        self.elided = 0
        self.total_lines = 0
        self.version = 0
        self.lock = threading.Lock()
        if session is not None:
            self.bind(session)

    def bind(self, session: Session) -> None:
        """Show the session's state from now on (its events still come through :meth:`add`)."""
        with self.lock:
            self.status = session.status
            self._usage = lambda: session.usage
            self.model.kind = str(session.kind)
            self._bound = True
            self.version += 1

    @property
    def renderer(self) -> StreamRenderer:
        """The stream-json renderer of this run's output."""
        return self.model.renderer

    @property
    def state(self) -> RunState:
        """The run's state (FAILED also when the view could not read the events)."""
        return RunState.FAILED if self._failure else self.status.state

    @property
    def exit_code(self) -> int | None:
        """The agent's exit code, once known."""
        return self.status.exit_code

    @property
    def build_step(self) -> int:
        """The last build step seen."""
        return self.model.build_step

    @property
    def build_total(self) -> int:
        """How many steps the build has (0 until known)."""
        return self.model.build_total

    def _push(self, line: Line) -> None:
        self.tail.append(line)
        self.tail_lines += line.lines
        self.total_lines += line.lines
        while len(self.tail) > 1 and self.tail_lines > self.max_lines:
            dropped = self.tail.popleft()
            self.tail_lines -= dropped.lines
            self.elided += dropped.lines

    def _push_texts(self, texts: list[str]) -> None:
        """Push plain text lines, each one screen line: only those the tail can keep are made."""
        kept = texts[-self.max_lines :]
        skipped = len(texts) - len(kept)
        self.elided += skipped
        self.total_lines += skipped
        for text in kept:
            self._push(Line("text", text))

    def add(self, event: Event, stopped: bool = False) -> None:
        """Take one session event into the view; never raises, whatever the agent printed.

        Args:
            event: The event.
            stopped: For a view without a session: a stop was asked for.
        """
        with self.lock:
            self.version += 1
            self._add(event, stopped)

    def add_events(self, events: list[Event], stopped: bool = False) -> None:
        """Take session events into the view, as :meth:`add` of each would; never raises.

        A run of output lines that render as they are (plain text, nothing to clean or
        mask) is taken at once: a flood costs a few scans, not a rendering per line.

        Args:
            events: The events, in order.
            stopped: For a view without a session: a stop was asked for.
        """
        with self.lock:
            self.version += 1
            self._take(events, stopped)

    def _take(self, events: list[Event], stopped: bool) -> None:
        for etype, run in groupby(events, _TYPE):
            group = list(run)
            if etype is EventType.OUTPUT:
                texts = list(map(_DATA, group))
                if self.model.renderer.renders_as_is(texts, "\n".join(texts)):
                    self._push_texts(texts)
                    continue
            for event in group:
                self._add(event, stopped)

    def _add(self, event: Event, stopped: bool) -> None:
        if not self._bound:
            self.status.on_event(event, stopped)
        for line in self.model.lines(event):
            if line.kind in _STATUS_KINDS:
                continue
            if line.kind == "error" and self.status.state is RunState.STOPPED:
                continue  # a stop is not an error
            self._push(line)

    def note(self, text: str, kind: str = "system") -> None:
        """Add a line of our own (masked) to the tail."""
        with self.lock:
            self.version += 1
            self._push(Line(kind, self.mask(clean_text(text))))

    def fail(self, message: str) -> None:
        """Show the view failed with a one-sentence reason (the session is not touched)."""
        with self.lock:
            self.version += 1
            self._failure = self.mask(clean_text(message))

    @property
    def finished(self) -> bool:
        """Whether the run has ended (exited, failed or stopped)."""
        return self.state.finished

    def elapsed(self) -> float:
        """Seconds the agent has been running (or ran)."""
        return self.status.snapshot().elapsed

    def status_text(self) -> str:
        """The one-line status: building / running / exited N / failed: reason / stopped.

        Once the agent has reported usage, its turns, tokens and cost follow.
        """
        text = self._state_text()
        usage = self._usage() if self._usage is not None else None
        if isinstance(usage, Usage) and (usage.turns or usage.cost_usd):
            text += f" · {usage.summary()}"
        return text

    def _state_text(self) -> str:
        snap = self.status.snapshot()
        detail = self.mask(clean_text(snap.detail))
        state = snap.state
        if self._failure:
            return f"{self.title}: failed: {self._failure}"
        if state is RunState.BUILDING:
            progress = f" step {self.build_step}/{self.build_total}" if self.build_total else ""
            return f"{self.title}: building {detail}{progress}"
        if state is RunState.RUNNING:
            return f"{self.title}: running {snap.elapsed:.0f}s"
        if state is RunState.EXITED:
            return f"{self.title}: exited {snap.exit_code} after {snap.elapsed:.1f}s"
        if state is RunState.FAILED:
            return f"{self.title}: failed: {detail}"
        if state is RunState.STOPPED:
            code = f" (exit {snap.exit_code})" if snap.exit_code is not None else ""
            why = f": {snap.reason}" if snap.reason else ""
            return f"{self.title}: stopped{why}{code}"
        return f"{self.title}: {state}"

    def _elision(self) -> str:
        return f"… {self.elided:,} earlier lines not shown (the transcript has them all)"

    def text(self) -> str:
        """Plain-text rendering: status, tail, transcript path."""
        with self.lock:
            parts = [self.status_text()]
            if self.elided:
                parts.append(self._elision())
            parts.extend(line.text for line in self.tail)
            if self.transcript:
                parts.append(f"transcript: {self.transcript}")
        return "\n".join(parts)

    def body_html(self) -> str:
        """HTML of the tail alone (no status line), newest line last."""
        with self.lock:
            rows = [line.to_html() for line in self.tail]
            if self.elided:
                rows.insert(0, f'<div class="cldpd-elided">{html.escape(self._elision())}</div>')
        # The body box is column-reversed so it stays scrolled to the newest line.
        return '<div class="cldpd-body"><div>' + "".join(rows) + "</div></div>"

    def html(self) -> str:
        """HTML rendering: status, tail, transcript path."""
        status = html.escape(self.status_text())
        transcript = (
            f'<div class="cldpd-transcript">transcript: {html.escape(self.transcript)}</div>'
            if self.transcript
            else ""
        )
        return (
            f'{_CSS}<div class="cldpd-view"><div class="cldpd-status">{status}</div>'
            f"{self.body_html()}{transcript}</div>"
        )

    def bundle(self) -> dict[str, str]:
        """A MIME bundle with text/html and text/plain."""
        return {"text/html": self.html(), "text/plain": self.text()}
