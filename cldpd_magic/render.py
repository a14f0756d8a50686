"""Turning session events into what a person reads: text, HTML, batched live updates.

One renderer serves the magics and the pod picker: :class:`SessionView` keeps a bounded
tail of rendered lines and a status line; :class:`LiveFeed` consumes a session's events
in a worker thread and publishes the view a few times a second, never once per line.
"""

from __future__ import annotations

import contextvars
import html
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .session import Event, EventType, Masker, Session

DEFAULT_MAX_LINES = 200
DEFAULT_FLUSH_INTERVAL = 0.25
#: Longest line shown in a cell; the transcript keeps the whole line.
MAX_SHOWN_CHARS = 2000
_STEP_RE = re.compile(r"^Step (\d+)/(\d+) :")
#: Terminal escape sequences (CSI, OSC, DCS/PM/APC strings, two-character escapes) and
#: control characters other than tab and newline: what must never reach a terminal or a page.
_TERMINAL_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[@-Z\\-_]?"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)


def clean_text(text: str) -> str:
    """Remove terminal escape sequences and control characters (tab and newline stay).

    Agent output is hostile input: colours, cursor moves, window titles and clear-screen
    sequences are dropped, so that what is shown is only the text.
    """
    return _TERMINAL_RE.sub("", text) if text else text


_KEY_ARGS = {
    "Bash": "command",
    "Read": "file_path",
    "Write": "file_path",
    "Edit": "file_path",
    "MultiEdit": "file_path",
    "NotebookEdit": "notebook_path",
    "Glob": "pattern",
    "Grep": "pattern",
    "WebFetch": "url",
    "WebSearch": "query",
    "Task": "description",
    "Agent": "description",
}


@dataclass(frozen=True, slots=True)
class Line:
    """One rendered piece of output.

    Attributes:
        kind: ``text``, ``stderr``, ``markdown``, ``tool``, ``tool_result``,
            ``tool_error``, ``result``, ``system`` or ``error``.
        text: Plain-text form.
        lines: How many screen lines it takes (for the bounded tail).
    """

    kind: str
    text: str
    lines: int = 1

    def to_html(self) -> str:
        """HTML form."""
        if self.kind == "markdown":
            return f'<div class="cldpd-md">{markdown_to_html(self.text)}</div>'
        return f'<div class="cldpd-{self.kind}">{html.escape(self.text)}</div>'


def _clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit:,} more characters in the transcript]"


def _first_line(text: str, limit: int = 160) -> str:
    first = text.strip().split("\n", 1)[0]
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _tool_line(block: dict[str, Any]) -> Line:
    name = str(block.get("name", "tool"))
    args = block.get("input") or {}
    key = _KEY_ARGS.get(name)
    value: Any = args.get(key) if key and isinstance(args, dict) else None
    if value is None and isinstance(args, dict):
        if name == "TodoWrite" and isinstance(args.get("todos"), list):
            value = f"{len(args['todos'])} todos"
        else:
            value = next((v for v in args.values() if isinstance(v, str)), "")
    return Line("tool", f"▸ {name}: {_first_line(str(value))}" if value else f"▸ {name}")


def _result_text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def render_stream_json(obj: dict[str, Any]) -> list[Line] | None:
    """Render one Claude Code stream-json event; None when it is not one.

    Args:
        obj: A decoded JSON line.

    Returns:
        Rendered lines (possibly none, for events not worth showing), or None when
        the object is not a Claude Code event.
    """
    kind = obj.get("type")
    if kind == "system":
        if obj.get("subtype") == "init":
            tools = obj.get("tools") or []
            return [
                Line(
                    "system",
                    f"● Claude Code session {obj.get('session_id', '?')} · model "
                    f"{obj.get('model', '?')} · {len(tools)} tools",
                )
            ]
        return []
    if kind == "assistant":
        lines: list[Line] = []
        for block in (obj.get("message") or {}).get("content") or []:
            btype = block.get("type") if isinstance(block, dict) else None
            if btype == "text" and str(block.get("text", "")).strip():
                text = _clip(str(block["text"]).strip(), 20000)
                lines.append(Line("markdown", text, text.count("\n") + 1))
            elif btype == "tool_use":
                lines.append(_tool_line(block))
        return lines
    if kind == "user":
        lines = []
        content = (obj.get("message") or {}).get("content")
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                text = _result_text(block.get("content"))
                count = len(text.strip().splitlines())
                more = f" (+{count - 1} lines)" if count > 1 else ""
                if block.get("is_error"):
                    lines.append(Line("tool_error", f"  ✗ {_first_line(text)}{more}"))
                else:
                    lines.append(Line("tool_result", f"  ↳ {_first_line(text)}{more}"))
        return lines
    if kind == "result":
        ok = not obj.get("is_error") and obj.get("subtype") == "success"
        parts = [
            "✓ done" if ok else f"✗ {obj.get('subtype', 'error')}",
            f"{obj.get('num_turns', '?')} turns",
            f"{(obj.get('duration_ms') or 0) / 1000:.1f} s",
        ]
        cost = obj.get("total_cost_usd", obj.get("cost_usd"))
        if isinstance(cost, int | float):
            parts.append(f"${cost:.4f}")
        parts.append(f"session {obj.get('session_id', '?')}")
        lines = [Line("result", " · ".join(parts))]
        summary = str(obj.get("result") or "").strip()
        if summary:
            summary = _clip(summary, 20000)
            lines.append(Line("markdown", summary, summary.count("\n") + 1))
        return lines
    if kind == "stream_event":
        return []
    return None


def render_output_line(text: str) -> list[Line]:
    """Render one output line: a Claude Code stream-json event, or plain text."""
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            rendered = render_stream_json(obj)
            if rendered is not None:
                return rendered
    return [Line("text", _clip(text))]


_MD_INLINE = [
    (re.compile(r"`([^`\n]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*\n]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])"), r"<em>\1</em>"),
    (re.compile(r"\[([^\]\n]+)\]\((https?://[^)\s]+)\)"), r'<a href="\2" target="_blank">\1</a>'),
]


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, repl in _MD_INLINE:
        out = pattern.sub(repl, out)
    return out


def markdown_to_html(text: str) -> str:
    """Render the Markdown that agents write (headings, lists, code, emphasis, links) as HTML.

    The text is HTML-escaped first, so nothing in it can inject markup.
    """
    out: list[str] = []
    para: list[str] = []
    list_tag = ""
    in_code = False
    code: list[str] = []

    def close_para() -> None:
        if para:
            out.append("<p>" + "<br>".join(_inline(p) for p in para) + "</p>")
            para.clear()

    def close_list() -> None:
        nonlocal list_tag
        if list_tag:
            out.append(f"</{list_tag}>")
            list_tag = ""

    for raw in text.split("\n"):
        if raw.lstrip().startswith("```"):
            if in_code:
                out.append("<pre><code>" + html.escape("\n".join(code)) + "</code></pre>")
                code.clear()
                in_code = False
            else:
                close_para()
                close_list()
                in_code = True
            continue
        if in_code:
            code.append(raw)
            continue
        line = raw.rstrip()
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        bullet = re.match(r"^\s*[-*+]\s+(.*)$", line)
        numbered = re.match(r"^\s*\d+[.)]\s+(.*)$", line)
        if heading:
            close_para()
            close_list()
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif bullet or numbered:
            close_para()
            tag = "ul" if bullet else "ol"
            if list_tag != tag:
                close_list()
                out.append(f"<{tag}>")
                list_tag = tag
            item = (bullet or numbered).group(1)  # type: ignore[union-attr]
            out.append(f"<li>{_inline(item)}</li>")
        elif not line.strip():
            close_para()
            close_list()
        else:
            close_list()
            para.append(line)
    if in_code:
        out.append("<pre><code>" + html.escape("\n".join(code)) + "</code></pre>")
    close_para()
    close_list()
    return "".join(out)


_CSS = (
    "<style>"
    ".cldpd-view{font-family:var(--jp-code-font-family,monospace);font-size:12px;}"
    ".cldpd-status{font-weight:bold;margin:2px 0;}"
    ".cldpd-body{max-height:480px;overflow-y:auto;display:flex;flex-direction:column-reverse;}"
    ".cldpd-text,.cldpd-stderr,.cldpd-tool,.cldpd-tool_result,.cldpd-tool_error,"
    ".cldpd-result,.cldpd-system,.cldpd-build,.cldpd-error,.cldpd-elided"
    "{white-space:pre-wrap;word-break:break-all;}"
    ".cldpd-stderr,.cldpd-tool_error,.cldpd-error{color:#c62828;}"
    ".cldpd-tool{color:#1565c0;}.cldpd-tool_result,.cldpd-system,.cldpd-build,.cldpd-elided"
    "{color:#757575;}"
    ".cldpd-result{font-weight:bold;color:#2e7d32;}"
    ".cldpd-md{font-family:var(--jp-content-font-family,sans-serif);}"
    ".cldpd-md p,.cldpd-md ul,.cldpd-md ol,.cldpd-md h1,.cldpd-md h2,.cldpd-md h3{margin:4px 0;}"
    ".cldpd-transcript{color:#757575;font-size:11px;}"
    "</style>"
)


class SessionView:
    """The readable state of one session: status, build progress and a bounded tail.

    Args:
        title: What the status line names (usually the pod).
        max_lines: How many lines the tail keeps; older lines are elided with a count.
        masker: Masks secret values in anything added that did not come from a session.
        transcript: The transcript path to show.
    """

    def __init__(
        self,
        title: str,
        max_lines: int = DEFAULT_MAX_LINES,
        masker: Masker | None = None,
        transcript: str = "",
    ) -> None:
        self.title = title
        self.max_lines = max(1, int(max_lines))
        self.mask = masker or Masker()
        self.transcript = transcript
        self.tail: deque[Line] = deque()
        self.tail_lines = 0
        self.elided = 0
        self.total_lines = 0
        self.state = "starting"
        self.detail = ""
        self.exit_code: int | None = None
        self.build_step = 0
        self.build_total = 0
        self.started = time.monotonic()
        self.ended: float | None = None
        self.version = 0
        self.lock = threading.Lock()

    def _push(self, line: Line) -> None:
        self.tail.append(line)
        self.tail_lines += line.lines
        self.total_lines += line.lines
        while len(self.tail) > 1 and self.tail_lines > self.max_lines:
            dropped = self.tail.popleft()
            self.tail_lines -= dropped.lines
            self.elided += dropped.lines

    def add(self, event: Event, stopped: bool = False) -> None:
        """Take one session event into the view."""
        with self.lock:
            self.version += 1
            etype = event.type
            if etype is EventType.OUTPUT:
                for line in render_output_line(event.data):
                    self._push(line)
            elif etype is EventType.STDERR:
                self._push(Line("stderr", _clip(event.data)))
            elif etype is EventType.BUILD_OUTPUT:
                step = _STEP_RE.match(event.data)
                if step:
                    self.build_step, self.build_total = int(step.group(1)), int(step.group(2))
                if event.data.startswith("cldpd:"):
                    self._push(Line("build", event.data))
            elif etype is EventType.BUILD_STARTED:
                self.state = "building"
                self.detail = event.data
            elif etype is EventType.BUILD_COMPLETE:
                self.build_step = self.build_total = max(self.build_total, 1)
            elif etype is EventType.CONTAINER_STARTED:
                self.state = "running"
                self.detail = event.data
                self.started = time.monotonic()
            elif etype is EventType.CONTAINER_EXITED:
                self.state = "stopped" if stopped else "exited"
                self.exit_code = event.code
                self.ended = time.monotonic()
            elif etype is EventType.ERROR:
                self.state = "stopped" if stopped else "failed"
                self.detail = event.data
                self.ended = time.monotonic()
                if not stopped:
                    self._push(Line("error", event.data))

    def note(self, text: str, kind: str = "system") -> None:
        """Add a line of our own (masked) to the tail."""
        with self.lock:
            self.version += 1
            self._push(Line(kind, self.mask(text)))

    def fail(self, message: str) -> None:
        """Mark the view failed with a one-sentence reason."""
        with self.lock:
            self.version += 1
            self.state = "failed"
            self.detail = self.mask(message)
            self.ended = time.monotonic()

    @property
    def finished(self) -> bool:
        """Whether the session has ended (exited, failed or stopped)."""
        return self.state in ("exited", "failed", "stopped")

    def elapsed(self) -> float:
        """Seconds the agent has been running (or ran)."""
        return (self.ended or time.monotonic()) - self.started

    def status_text(self) -> str:
        """The one-line status: building / running / exited N / failed: reason / stopped."""
        state = self.state
        if state == "building":
            progress = f" step {self.build_step}/{self.build_total}" if self.build_total else ""
            return f"{self.title}: building {self.detail}{progress}"
        if state == "running":
            return f"{self.title}: running {self.elapsed():.0f}s"
        if state == "exited":
            return f"{self.title}: exited {self.exit_code} after {self.elapsed():.1f}s"
        if state == "failed":
            return f"{self.title}: failed: {self.detail}"
        if state == "stopped":
            code = f" (exit {self.exit_code})" if self.exit_code is not None else ""
            return f"{self.title}: stopped{code}"
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


class LiveFeed:
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
    """

    def __init__(
        self,
        session: Session,
        view: SessionView,
        publish: Callable[[SessionView], None],
        interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self.session = session
        self.view = view
        self.publish = publish
        self.interval = max(0.02, float(interval))
        self.publications = 0
        self._consumed = threading.Event()
        self._wake = threading.Event()
        self._done = threading.Event()
        self.error: BaseException | None = None
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
            for event in self.session.events():
                self.view.add(event, stopped=self.session.stopped)
                if event.type in (EventType.CONTAINER_EXITED, EventType.ERROR):
                    self.view.exit_code = self.session.exit_code
        except BaseException as exc:  # the feed must end even if a transcript read fails
            self.error = exc
            self.view.fail(f"could not read the session's events: {exc}")
        finally:
            self._consumed.set()
            self._wake.set()

    def _publish(self) -> None:
        try:
            self.publish(self.view)
            self.publications += 1
        except Exception as exc:  # a frontend going away must not kill the feed
            self.error = exc

    def _write(self) -> None:
        shown_version = -1
        shown_second = -1
        while not self._consumed.is_set():
            self._wake.wait(self.interval)
            if self._consumed.is_set():
                break
            second = int(self.view.elapsed())
            if self.view.version != shown_version or second != shown_second:
                shown_version, shown_second = self.view.version, second
                self._publish()
        self._publish()
        self._done.set()

    @property
    def done(self) -> bool:
        """Whether the final view has been published."""
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the final view is published; True if it was."""
        return self._done.wait(timeout)


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
        self.columns = tuple(columns)
        self.rows = [tuple("" if v is None else str(v) for v in row) for row in rows]
        self.title = title
        self.notes = list(notes)

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
            widths = [max(len(row[i]) for row in table) for i in range(len(self.columns))]
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
