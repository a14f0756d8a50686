"""Tables: runs and reports as text and HTML, and the batch view."""

from __future__ import annotations

import html
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..events import Event, EventType, RunState
from ..logs import log_swallowed
from ..stream_json import json_number
from .clean import _first_line, clean_text
from .stream import Line, StreamRenderer
from .views import _DATA, _TYPE, DEFAULT_MAX_LINES, RunLines, SessionView

if TYPE_CHECKING:
    from ..runs import Session


log = logging.getLogger(__package__)


_TABLE_CSS = (
    "<style>.cldpd-table td,.cldpd-table th{text-align:left;vertical-align:top;"
    "padding:2px 8px;font-family:var(--jp-code-font-family,monospace);font-size:12px;}"
    ".cldpd-table caption{text-align:left;font-weight:bold;}"
    ".cldpd-note{color:#757575;font-size:12px;}</style>"
)


class Table:
    """A small table that shows as HTML in a notebook and as aligned text elsewhere.

    Args:
        columns: Column headings.
        rows: One sequence of values per row, in column order (shown with ``str``).
        title: A caption.
        notes: Lines shown under the table.

    Attributes:
        columns: Column headings.
        rows: The rows, as tuples of strings.
        title: The caption.
        notes: Lines shown under the table.
    """

    def __init__(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        title: str = "",
        notes: Iterable[str] = (),
    ) -> None:
        self.columns = tuple(clean_text(str(c)) for c in columns)
        self.rows = [tuple("" if v is None else clean_text(str(v)) for v in row) for row in rows]
        self.title = clean_text(title)
        self.notes = [clean_text(str(n)) for n in notes]

    def records(self) -> list[dict[str, str]]:
        """The rows as dictionaries keyed by column heading."""
        return [dict(zip(self.columns, row, strict=False)) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def text(self) -> str:
        """Aligned plain text: caption, headings, rows, notes."""
        lines = [self.title] if self.title else []
        if self.rows:
            table = [self.columns, *self.rows]
            width = max(len(row) for row in table)  # rows may be longer or shorter
            widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(width)]
            for row in table:
                cells = [f"{cell:<{widths[i]}}" for i, cell in enumerate(row)]
                lines.append("  ".join(cells).rstrip())
        lines.extend(self.notes)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        esc = html.escape
        parts = [_TABLE_CSS]
        if self.rows:
            parts.append('<table class="cldpd-table">')
            if self.title:
                parts.append(f"<caption>{esc(self.title)}</caption>")
            parts.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for c in self.columns) + "</tr>")
            for row in self.rows:
                parts.append("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>")
            parts.append("</table>")
        elif self.title:
            parts.append(f"<div><b>{esc(self.title)}</b></div>")
        parts.extend(f'<div class="cldpd-note">{esc(n)}</div>' for n in self.notes)
        return "".join(parts)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def __repr__(self) -> str:
        return self.text()


class Report:
    """Several :class:`Table` shown one after the other.

    Args:
        tables: The tables, in display order.

    Attributes:
        tables: The tables.
    """

    def __init__(self, *tables: Table) -> None:
        self.tables = list(tables)

    def __getitem__(self, title: str) -> Table:
        """The table with that title."""
        for table in self.tables:
            if table.title == title:
                return table
        raise KeyError(title)

    def text(self) -> str:
        """Plain text of every table, separated by blank lines."""
        return "\n\n".join(t.text() for t in self.tables)

    def _repr_html_(self) -> str:
        return "<br>".join(t._repr_html_() for t in self.tables)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def __repr__(self) -> str:
        return self.text()


#: Columns of a batch's live table.
BATCH_COLUMNS = ("run", "pod", "state", "elapsed", "turns", "cost", "last tool call")
#: What marks the selected run's name in a batch's table.
SELECTED_MARK = "▶ "
#: In every output line holding a tool call (``"type":"tool_use"``, server and MCP ones).
_TOOL_MARK = 'tool_use"'
#: Events that are lines of the run's output.
_LINE_TYPES = (EventType.OUTPUT, EventType.STDERR)


def run_name(session: Session) -> str:
    """A session's run name (its pod's name for a session made before runs had names)."""
    return str(getattr(session, "run", "") or session.pod_name)


def _usage_cells(session: Session) -> tuple[str, str]:
    """The turns and cost of a run so far, as table cells ("-" while unknown)."""
    usage = getattr(session, "usage", None)
    turns = json_number(getattr(usage, "turns", None))
    cost = json_number(getattr(usage, "cost_usd", None))
    return (
        "-" if not turns else f"{turns:,.0f}",
        "-" if cost is None or (not cost and not turns) else f"${cost:.4f}",
    )


class _BatchRunView(SessionView):
    """One run's view in a batch: a :class:`SessionView` rendered only while it is shown.

    A run whose output is not shown keeps its last events as they came (a raw tail twice
    as long as the view's), counts its lines and notes its last tool call; its tail is
    rendered from the raw tail once it is shown. So a batch renders one run's output,
    however many runs it has.
    """

    def __init__(self, session: Session, max_lines: int, shown: bool = True) -> None:
        self.last_tool = ""
        super().__init__(run_name(session), max_lines, session=session)
        self.session = session
        self.shown = shown
        # Twice the tail: some events show as no line (a status, a tick of the agent).
        self._raw: deque[Event] = deque(maxlen=2 * self.max_lines)
        self._lines_seen = 0  # output and stderr lines, shown or not
        self._tools = StreamRenderer(self.mask, markup=False)

    def add(self, event: Event, stopped: bool = False) -> None:
        """Take one event of the run (see :meth:`add_events`); never raises."""
        self.add_events([event], stopped)

    def add_events(self, events: list[Event], stopped: bool = False) -> None:
        """Take events of the run: rendered if it is shown, else kept raw and counted."""
        with self.lock:
            self.version += 1
            self._raw.extend(events)
            kinds = Counter(map(_TYPE, events))
            self._lines_seen += kinds[EventType.OUTPUT] + kinds[EventType.STDERR]
            if self.shown:
                self._take(events, stopped)
                return
            self.total_lines += kinds[EventType.OUTPUT] + kinds[EventType.STDERR]
            if kinds[EventType.OUTPUT]:
                self._note_tool_calls(events)

    def _note_tool_calls(self, events: list[Event]) -> None:
        """Remember the last tool call among output lines that are not shown."""
        if _TOOL_MARK not in "\n".join(map(_DATA, events)):
            return
        for event in events:
            if event.type is EventType.OUTPUT and _TOOL_MARK in event.data:
                for line in self._tools.render(event.data):
                    if line.kind == "tool":
                        self.last_tool = _first_line(line.text.removeprefix("▸ "), 80)

    def show(self, shown: bool) -> None:
        """Show the run's output or stop rendering it; shown, its raw tail is rendered."""
        with self.lock:
            if shown and not self.shown:
                model = RunLines(self.mask, self.model.kind)
                model.build_step, model.build_total = self.build_step, self.build_total
                self.model = model
                raw = list(self._raw)
                kept = sum(1 for event in raw if event.type in _LINE_TYPES)
                self.tail.clear()
                self.tail_lines = 0
                self.elided = self.total_lines = self._lines_seen - kept
                self._take(raw, False)
            self.shown = shown
            self.version += 1

    def _push(self, line: Line) -> None:
        if line.kind == "tool":
            self.last_tool = _first_line(line.text.removeprefix("▸ "), 80)
        super()._push(line)

    def state_text(self, queued: bool = False) -> str:
        """The state, with why a run was stopped or failed (e.g. ``stopped: over budget``).

        Args:
            queued: The run waits for its turn in the batch (shown as ``queued``).
        """
        snap = self.status.snapshot()
        if queued and not snap.finished:
            return "queued"
        why = ""
        reason = getattr(snap, "reason", "")  # why cldpd stopped it by itself
        if snap.state is RunState.STOPPED and reason:
            why = f": {reason}"
        elif snap.state is RunState.FAILED and snap.detail:
            why = f": {_first_line(self.mask(clean_text(snap.detail)), 60)}"
        elif snap.state is RunState.EXITED and snap.exit_code:
            why = f" {snap.exit_code}"
        return f"{snap.state}{why}"

    def cells(self, selected: bool, queued: bool = False) -> tuple[str, ...]:
        """The run's row: run, pod, state, elapsed, turns, cost, last tool call."""
        turns, cost = _usage_cells(self.session)
        started = self.state not in (RunState.STARTING, RunState.BUILDING) and not queued
        elapsed = f"{self.elapsed():.0f}s" if started else "-"
        marker = SELECTED_MARK if selected else ""
        pod = clean_text(self.session.pod_name)
        state = self.state_text(queued)
        return (marker + self.title, pod, state, elapsed, turns, cost, self.last_tool)


class BatchView:
    """What a cell, the picker or a terminal shows of a batch: a row per run and one run's tail.

    Each run has its own :class:`SessionView` (bounded tail, masked, free of terminal
    escapes); the table shows each run's state, elapsed time, turns, cost and last tool
    call, and under it the selected run's status line and tail. Rows come in the order
    the runs were added.

    Args:
        title: What the summary line names.
        max_lines: How many lines each run's tail keeps.

    Attributes:
        selected: The run name whose output shows under the table ("" for none).
        version: Changes whenever anything shown may have changed.
        is_queued: Tells whether a run still waits for its turn (set by :class:`BatchFeed`
            from the batch); None: no run is shown as queued.
    """

    def __init__(self, title: str = "batch", max_lines: int = DEFAULT_MAX_LINES) -> None:
        self.title = clean_text(title)
        self.max_lines = max(1, int(max_lines))
        self.selected = ""
        self._rows: dict[int, _BatchRunView] = {}
        self._own_version = 0
        self.lock = threading.Lock()
        self.is_queued: Callable[[Session], bool] | None = None

    def _queued(self, session: Session) -> bool:
        try:
            return bool(self.is_queued and self.is_queued(session))
        except Exception:  # a view never fails for want of a queue state
            log_swallowed(log, "reading whether a run is queued failed", session.mask)
            return False

    def track(self, session: Session) -> bool:
        """Add a row for a run (once); True when the run is new."""
        with self.lock:
            if id(session) in self._rows:
                return False
            if not self.selected:
                self.selected = run_name(session)
            shown = clean_text(run_name(session)) == self.selected
            self._rows[id(session)] = _BatchRunView(session, self.max_lines, shown)
            self._own_version += 1
            return True

    def add(self, session: Session, event: Event) -> None:
        """Take one event of a tracked run into its row; never raises."""
        self.row(session).add(event)

    def row(self, session: Session) -> SessionView:
        """The view of a tracked run (KeyError for a run not tracked)."""
        return self._rows[id(session)]

    def rows(self) -> list[SessionView]:
        """The run views, in the order the runs were tracked."""
        with self.lock:
            return list(self._rows.values())

    def run_names(self) -> list[str]:
        """The run names, in row order."""
        return [row.title for row in self.rows()]

    def select(self, run: str) -> None:
        """Show this run's output under the table ("" for none); only it is rendered."""
        with self.lock:
            self.selected = clean_text(run)
            self._own_version += 1
            rows = list(self._rows.values())
        for row in rows:
            row.show(row.title == self.selected)

    def _selected_row(self) -> _BatchRunView | None:
        return next((r for r in self._rows.values() if r.title == self.selected), None)

    @property
    def version(self) -> int:
        """A number that changes whenever a row or the selection changes."""
        with self.lock:
            return self._own_version + sum(row.version for row in self._rows.values())

    @property
    def finished(self) -> bool:
        """Whether every tracked run has ended."""
        return all(row.finished for row in self.rows())

    def elapsed_second(self) -> int:
        """Seconds of the longest unfinished run, to know when elapsed times change."""
        running = [int(row.elapsed()) for row in self.rows() if not row.finished]
        return max(running, default=-1)

    def summary(self) -> str:
        """One line: how many runs are in each state, turns and cost in all."""
        counts: dict[str, int] = {}
        turns = cost = 0.0
        for row in self.rows():
            state = "queued" if self._queued(row.session) else str(row.state)
            counts[state] = counts.get(state, 0) + 1
            usage = getattr(row.session, "usage", None)
            turns += json_number(getattr(usage, "turns", None)) or 0
            cost += json_number(getattr(usage, "cost_usd", None)) or 0
        states = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no runs yet"
        return f"{self.title}: {states} · {turns:,.0f} turns · ${cost:.4f}"

    def table(self) -> Table:
        """The rows as a :class:`Table` (the selected run marked ``▶``)."""
        with self.lock:
            rows = [
                row.cells(row.title == self.selected, self._queued(row.session))
                for row in self._rows.values()
            ]
        return Table(BATCH_COLUMNS, rows, title=self.summary())

    def text(self, table: Table | None = None) -> str:
        """Plain text: the table, then the selected run's status, tail and transcript."""
        parts = [(table or self.table()).text()]
        with self.lock:
            row = self._selected_row()
        if row is not None:
            parts.append(f"── {row.title} ──\n{row.text()}")
        return "\n".join(parts)

    def html(self, table: Table | None = None) -> str:
        """HTML: the table, then the selected run's status, tail and transcript."""
        with self.lock:
            row = self._selected_row()
        selected = row.html() if row is not None else ""
        return f'<div class="cldpd-batch">{(table or self.table())._repr_html_()}{selected}</div>'

    def bundle(self) -> dict[str, str]:
        """A MIME bundle with text/html and text/plain (of one table of the rows)."""
        table = self.table()
        return {"text/html": self.html(table), "text/plain": self.text(table)}
