"""A run's changes as HTML and text: a collapsed "Changes: N files, +I -D" section, each
file's unified diff highlighted by Pygments (its ``DiffLexer``), and runs compared.

What a diff holds is the agent's (file names and contents are hostile input): every line
is cleaned of terminal escapes and control characters, masked, and escaped by Pygments'
formatter before it reaches a page or a terminal. Long diffs are cut with a count; a
cell's section shows a bounded number of lines in all, so it renders at once however
large the run's change (the whole diff is a call away: ``changes.diff(path)``,
``%cldpd_diff RUN --file PATH``).

The changes are any object with ``files``, ``insertions``, ``deletions``, ``truncated``,
``notes``, ``commits``, ``secrets`` and ``diff(path)`` (a
:class:`~cldpd_magic.runs.changes.Changes`): this module imports nothing of ``runs``.
"""

from __future__ import annotations

import difflib
import functools
import html
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from .clean import clean_text
from .tables import BatchView, Table

__all__ = [
    "DIFF_CSS",
    "FILE_LINES",
    "MINUS",
    "SECTION_LINES",
    "ChangesBatchView",
    "ChangesLike",
    "ChangesReport",
    "changes_html",
    "changes_summary",
    "changes_text",
    "compare_html",
    "compare_table",
    "compare_text",
    "file_diff_html",
    "post_image",
    "shared_files",
    "touches",
    "with_changes",
]

#: Lines of diff a cell's collapsed section holds in all (the rest are counted).
SECTION_LINES = 2000
#: Lines of one file's diff shown in a section (the rest are counted).
FILE_LINES = 400
#: Lines of one file's diff shown when it is opened on its own (``file_diff_html``).
OPEN_FILE_LINES = 5000
#: Files a section names one by one (the rest are counted).
MAX_FILES = 400
#: The minus sign of ``+3 -1``.
MINUS = "\u2212"
_STATUS_MARK = {"added": "A", "modified": "M", "deleted": "D", "renamed": "R"}

#: The style of a changes section and its Pygments tokens (classes ``cldpd-<token>``).
DIFF_CSS = (
    "<style>"
    ".cldpd-changes{font-family:var(--jp-code-font-family,monospace);font-size:12px;"
    "margin:4px 0;}"
    ".cldpd-changes summary{cursor:pointer;}"
    ".cldpd-changes-title{font-weight:bold;}"
    ".cldpd-file{margin-left:12px;}"
    ".cldpd-plus{color:#2e7d32;}.cldpd-minus{color:#c62828;}"
    ".cldpd-mark{display:inline-block;width:1.5em;color:#757575;}"
    ".cldpd-diff{margin:2px 0 6px 12px;white-space:pre;overflow-x:auto;max-height:600px;}"
    ".cldpd-gi{color:#2e7d32;background:#e8f5e9;}.cldpd-gd{color:#c62828;background:#ffebee;}"
    ".cldpd-gu{color:#6a1b9a;}.cldpd-gh,.cldpd-gs{color:#1565c0;font-weight:bold;}"
    ".cldpd-gp,.cldpd-err{color:#757575;}"
    ".cldpd-more,.cldpd-notes{color:#757575;}"
    "</style>"
)


class ChangesLike(Protocol):
    """What the renderer reads of a run's changes (a ``Changes``)."""

    files: Sequence[Any]
    insertions: int
    deletions: int
    truncated: bool
    notes: Sequence[str]
    commits: Sequence[str]
    secrets: bool

    def diff(self, path: str | None = None) -> str:
        """The patch, or one file's part of it."""


Mask = Callable[[str], str]


def _identity(text: str) -> str:
    return text


def _clean(text: str, mask: Mask | None) -> str:
    return (mask or _identity)(clean_text(text))


def changes_summary(changes: ChangesLike | None) -> str:
    """``Changes: 3 files, +10 -2`` (``no changes captured`` when there are none yet)."""
    if changes is None:
        return "Changes: none captured"
    count = len(changes.files)
    text = f"Changes: {count} file{'' if count == 1 else 's'}, "
    text += f"+{changes.insertions:,} {MINUS}{changes.deletions:,}"
    return text + (" (truncated: files only)" if changes.truncated else "")


@functools.cache
def _pygments() -> tuple[Any, Any, Any]:
    """Pygments' diff lexer, HTML formatter and terminal formatter (loaded when first used)."""
    from pygments.formatters import HtmlFormatter, TerminalFormatter
    from pygments.lexers import DiffLexer

    return (
        DiffLexer(stripnl=False, ensurenl=False),
        HtmlFormatter(nowrap=True, classprefix="cldpd-"),
        TerminalFormatter(),
    )


def _highlight_html(text: str) -> str:
    from pygments import highlight

    lexer, formatter, _ = _pygments()
    return highlight(text, lexer, formatter)


def _cut(text: str, limit: int) -> tuple[str, int]:
    """The first ``limit`` lines of text, and how many more there are."""
    if limit <= 0:
        return "", text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    end = -1
    for _ in range(limit):
        end = text.find("\n", end + 1)
        if end == -1:
            return text, 0
    rest = text[end + 1 :]
    more = rest.count("\n") + (1 if rest and not rest.endswith("\n") else 0)
    return text[: end + 1], more


def _counts(change: Any) -> str:
    plus = f'<span class="cldpd-plus">+{int(change.insertions):,}</span>'
    minus = f'<span class="cldpd-minus">{MINUS}{int(change.deletions):,}</span>'
    return f"{plus} {minus}"


def _file_title(change: Any, mask: Mask | None) -> str:
    mark = _STATUS_MARK.get(str(change.status), "?")
    name = html.escape(_clean(str(change.path), mask))
    if getattr(change, "old_path", "") and change.status == "renamed":
        name = f"{html.escape(_clean(str(change.old_path), mask))} → {name}"
    size = getattr(change, "size", None)
    extra = " · binary" if change.binary else ""
    extra += f" · {int(size):,} bytes" if isinstance(size, int) else ""
    return (
        f'<span class="cldpd-mark">{mark}</span>{name} {_counts(change)}'
        f'<span class="cldpd-more">{html.escape(extra)}</span>'
    )


def _file_body(changes: ChangesLike, change: Any, limit: int, mask: Mask | None) -> tuple[str, int]:
    """One file's highlighted diff, cut at ``limit`` lines; and the lines it used."""
    if changes.truncated:
        return '<div class="cldpd-more">the diff was not kept (over the size cap)</div>', 0
    try:
        text = "" if change.binary else changes.diff(str(change.path))
    except KeyError:
        text = ""
    if change.binary:
        return '<div class="cldpd-more">binary file: its content is not shown</div>', 0
    if limit <= 0 and text:
        lines = int(change.insertions) + int(change.deletions)
        note = f"the section shows no more lines: {lines:,} changed lines (changes.diff(path))"
        return f'<div class="cldpd-more">{note}</div>', 0
    shown, more = _cut(_clean(text, mask), limit)
    used = shown.count("\n")
    body = f'<pre class="cldpd-diff">{_highlight_html(shown)}</pre>' if shown else ""
    if more:
        body += f'<div class="cldpd-more">… {more:,} more lines (changes.diff(path) has them)</div>'
    elif not shown:
        body += '<div class="cldpd-more">no line changed (mode or name only)</div>'
    return body, used


def _notes_html(changes: ChangesLike, mask: Mask | None) -> str:
    lines = [str(n) for n in changes.notes]
    if changes.secrets:
        lines.append("The patch contains a secret value: it is masked here, and apply or push "
                     "refuse it unless allow_secrets=True.")  # fmt: skip
    if changes.commits:
        lines.append("Commits made during the run:")
        lines.extend(f"  {c}" for c in list(changes.commits)[:50])
    return "".join(
        f'<div class="cldpd-notes">{html.escape(_clean(line, mask))}</div>' for line in lines
    )


def changes_html(
    changes: ChangesLike | None,
    *,
    mask: Mask | None = None,
    max_lines: int = SECTION_LINES,
    file_lines: int = FILE_LINES,
    max_files: int = MAX_FILES,
    title: str = "",
    collapsed: bool = True,
) -> str:
    """The collapsed section a run's cell ends with: ``Changes: N files, +I -D``.

    Opened, it names each file (``A``/``M``/``D``/``R``, its +/-), itself collapsed over
    its highlighted diff; binary files are named, long diffs cut with a count, and the
    section holds at most ``max_lines`` lines of diff in all and ``max_files`` files.

    Args:
        changes: The run's changes (None: a section saying none were captured).
        mask: Masks secret values (a session's ``Masker``) in all that is shown.
        max_lines: Lines of diff the section holds in all.
        file_lines: Lines of one file's diff shown.
        max_files: Files named one by one.
        title: What the summary names before ``Changes`` (a run's name).
        collapsed: Whether the section starts closed (else it is a plain block, each file
            still collapsed).
    """
    head = html.escape(_clean((f"{title} · " if title else "") + changes_summary(changes), mask))
    tag, line = ("details", "summary") if collapsed else ("div", "div")
    parts = [DIFF_CSS, f'<{tag} class="cldpd-changes">']
    parts.append(f'<{line}><span class="cldpd-changes-title">{head}</span></{line}>')
    if changes is not None:
        parts.append(_notes_html(changes, mask))
        budget = max(0, int(max_lines))
        files = list(changes.files)
        for change in files[:max_files]:
            body, used = _file_body(changes, change, min(file_lines, budget), mask)
            budget -= used
            parts.append(
                f'<details class="cldpd-file"><summary>{_file_title(change, mask)}</summary>'
                f"{body}</details>"
            )
        if len(files) > max_files:
            parts.append(
                f'<div class="cldpd-more">… and {len(files) - max_files:,} more files</div>'
            )
    parts.append(f"</{tag}>")
    return "".join(parts)


def file_diff_html(
    changes: ChangesLike, path: str, *, mask: Mask | None = None, max_lines: int = OPEN_FILE_LINES
) -> str:
    """One file's highlighted diff on its own (what opening it shows), cut with a count.

    Raises:
        KeyError: No changed file has that path.
    """
    change = next((f for f in changes.files if path in (f.path, getattr(f, "old_path", ""))), None)
    if change is None:
        raise KeyError(path)
    body, _ = _file_body(changes, change, max_lines, mask)
    return f'{DIFF_CSS}<div class="cldpd-changes">{_file_title(change, mask)}{body}</div>'


def changes_text(
    changes: ChangesLike | None,
    *,
    color: bool = False,
    mask: Mask | None = None,
    path: str | None = None,
    max_lines: int | None = None,
) -> str:
    """The changes as text for a terminal: the summary, the file list and the diff.

    Args:
        changes: The run's changes.
        color: Colour the diff with terminal escapes (Pygments; the agent's own escapes
            are removed first).
        mask: Masks secret values.
        path: One file's diff only.
        max_lines: Lines of diff at most (None: all), the rest counted.
    """
    lines = [changes_summary(changes)]
    if changes is None:
        return lines[0]
    if path is None:
        for change in changes.files:
            mark = _STATUS_MARK.get(str(change.status), "?")
            name = _clean(str(change.path), mask)
            binary = " (binary)" if change.binary else ""
            counts = f"+{change.insertions} {MINUS}{change.deletions}"
            lines.append(f"  {mark} {name}  {counts}{binary}")
        lines += [_clean(str(n), mask) for n in changes.notes]
        lines += [f"commit {_clean(str(c), mask)}" for c in changes.commits]
    diff = "" if changes.truncated else _clean(changes.diff(path), mask)
    if max_lines is not None:
        diff, more = _cut(diff, max_lines)
        if more:
            diff += f"… {more:,} more lines\n"
    if diff and color:
        from pygments import highlight

        lexer, _, terminal = _pygments()
        diff = highlight(diff, lexer, terminal)
    text = "\n".join(lines)
    return f"{text}\n\n{diff}" if diff else text


# --- several runs ----------------------------------------------------------------------


def post_image(file_diff: str) -> list[str]:
    """The lines a file's diff leaves in its hunks (context and added), each hunk led by
    ``@@ +start,count @@``: the run's version of the file where it changed it."""
    out: list[str] = []
    in_hunk = False
    for line in file_diff.split("\n"):
        if line.startswith("@@"):
            ranges = line.split("@@")[1].split()
            out.append(f"@@ {ranges[-1] if ranges else ''} @@")
            in_hunk = True
        elif in_hunk and line[:1] in (" ", "+"):
            out.append(line[1:])
        elif in_hunk and line[:1] not in ("-", "\\"):
            in_hunk = False
    return out


def _versions_diff(runs: Mapping[str, ChangesLike], path: str, mask: Mask | None) -> str:
    """How the versions several runs made of one file differ, one run after the other."""
    names = [n for n, c in runs.items() if touches(c, path)]
    first = names[0]
    base = post_image(_file_diff(runs[first], path))
    pieces = []
    for other in names[1:]:
        theirs = post_image(_file_diff(runs[other], path))
        diff = difflib.unified_diff(
            base, theirs, f"{first}: {path}", f"{other}: {path}", n=2, lineterm=""
        )
        text = "\n".join(diff)
        pieces.append(text or f"{first} and {other} made the same version of {path}")
    return _clean("\n".join(pieces) + "\n", mask)


def _file_diff(changes: ChangesLike, path: str) -> str:
    try:
        return changes.diff(path)
    except KeyError:
        return ""


def touches(changes: ChangesLike, path: str) -> bool:
    """Whether the changes change that file."""
    return any(f.path == path for f in changes.files)


def _all_paths(runs: Mapping[str, ChangesLike]) -> list[str]:
    seen: dict[str, None] = {}
    for changes in runs.values():
        for change in changes.files:
            seen.setdefault(str(change.path), None)
    return sorted(seen)


def compare_table(runs: Mapping[str, ChangesLike], mask: Mask | None = None) -> Table:
    """Files x runs: each run's ``+I -D`` on each file ("" where it left it alone)."""
    names = list(runs)
    rows: list[list[str]] = []
    for path in _all_paths(runs):
        cells = [_clean(path, mask)]
        for name in names:
            change = next((f for f in runs[name].files if f.path == path), None)
            cells.append(
                "" if change is None else f"+{change.insertions} {MINUS}{change.deletions}"
            )
        rows.append(cells)
    totals = ["all files"] + [f"+{runs[n].insertions} {MINUS}{runs[n].deletions}" for n in names]
    rows.append(totals)
    title = f"Changes of {len(names)} runs: files by runs"
    return Table(["file", *(_clean(n, mask) for n in names)], rows, title=title)


def shared_files(runs: Mapping[str, ChangesLike]) -> list[str]:
    """The files several runs changed."""
    return [p for p in _all_paths(runs) if sum(touches(c, p) for c in runs.values()) > 1]


def compare_html(
    runs: Mapping[str, ChangesLike], *, mask: Mask | None = None, file_lines: int = FILE_LINES
) -> str:
    """Runs compared: the files x runs table, then, for each file several runs changed, how
    their versions differ (collapsed, highlighted)."""
    parts = [DIFF_CSS, compare_table(runs, mask)._repr_html_()]
    for path in shared_files(runs):
        shown, more = _cut(_versions_diff(runs, path, mask), file_lines)
        body = f'<pre class="cldpd-diff">{_highlight_html(shown)}</pre>'
        if more:
            body += f'<div class="cldpd-more">… {more:,} more lines</div>'
        title = html.escape(f"{_clean(path, mask)}: how the runs' versions differ")
        parts.append(f'<details class="cldpd-changes"><summary>{title}</summary>{body}</details>')
    return "".join(parts)


def compare_text(
    runs: Mapping[str, ChangesLike], *, color: bool = False, mask: Mask | None = None
) -> str:
    """Runs compared as text: the table, then each shared file's versions diff."""
    parts = [compare_table(runs, mask).text()]
    for path in shared_files(runs):
        diff = _versions_diff(runs, path, mask)
        if color:
            from pygments import highlight

            lexer, _, terminal = _pygments()
            diff = highlight(diff, lexer, terminal)
        parts.append(f"── {_clean(path, mask)}: how the runs' versions differ ──\n{diff}")
    return "\n\n".join(parts)


class ChangesBatchView(BatchView):
    """A batch's view whose table has a ``+/-`` column: each run's changes, once captured."""

    def table(self) -> Table:
        """The rows as a :class:`Table`, each run's ``+I -D`` last ("-" before a capture)."""
        table = super().table()
        cells = [_plus_minus(getattr(row, "session", None)) for row in self.rows()]
        rows = [(*r, c) for r, c in zip(table.rows, cells, strict=False)]
        return Table((*table.columns, "+/-"), rows, title=table.title, notes=table.notes)


def _plus_minus(session: Any) -> str:
    changes = getattr(session, "changes", None)
    if changes is None:
        return "-"
    files = len(changes.files)
    return (
        f"{files} file{'' if files == 1 else 's'} +{changes.insertions} {MINUS}{changes.deletions}"
    )


class ChangesReport:
    """What ``%cldpd_diff`` shows: one run's changes (or one file of them), or runs compared.

    Args:
        runs: The changes of each run, by run name.
        path: One file's diff only.
        mask: Masks secret values in all that is shown.

    Attributes:
        runs: The changes of each run.
    """

    def __init__(
        self, runs: Mapping[str, ChangesLike], path: str | None = None, mask: Mask | None = None
    ) -> None:
        self.runs = dict(runs)
        self.path = path
        self.mask = mask

    def __getitem__(self, run: str) -> ChangesLike:
        """The changes of one run."""
        return self.runs[run]

    def _single(self) -> tuple[str, ChangesLike] | None:
        return next(iter(self.runs.items())) if len(self.runs) == 1 else None

    def _repr_html_(self) -> str:
        single = self._single()
        if single is not None:
            name, changes = single
            if self.path is not None:
                return file_diff_html(changes, self.path, mask=self.mask)
            return changes_html(changes, mask=self.mask, title=name, collapsed=False)
        runs = self.runs
        if self.path is not None:
            runs = {n: c for n, c in runs.items() if touches(c, self.path)}
        return compare_html(runs, mask=self.mask)

    def text(self, color: bool = False) -> str:
        """The report as text (terminal colours when ``color``)."""
        single = self._single()
        if single is not None:
            return changes_text(single[1], color=color, mask=self.mask, path=self.path)
        return compare_text(self.runs, color=color, mask=self.mask)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def __repr__(self) -> str:
        return self.text()


def with_changes(bundle: dict[str, str], changes: ChangesLike | None, mask: Mask | None = None,
                 title: str = "") -> dict[str, str]:  # fmt: skip
    """A view's MIME bundle with the run's changes section at its end (when it has some)."""
    if changes is None:
        return bundle
    return {
        **bundle,
        "text/html": bundle.get("text/html", "") + changes_html(changes, mask=mask, title=title),
        "text/plain": bundle.get("text/plain", "") + "\n" + changes_summary(changes),
    }
