"""A run's changes: what the agent did to its workdir, reviewable, comparable, taken home.

In the container, a small ``sh`` script (``data/changes/``: plain POSIX sh, with git when
the image has it, busybox tools otherwise) records a baseline before the agent starts
(:func:`with_baseline` wraps the agent's command), and its capture half prints everything
that changed since as one binary-safe patch: for each git repository under the workdir the
commits made during the run (listed) and the work tree against the baseline (``git diff
--binary``, new untracked files included); for a workdir outside git, the files added,
changed and removed. Over pod.json's ``changesMaxBytes`` it prints the changed files with
their sizes instead (``truncated``). Nothing of it needs git on the host.

:class:`Changes` is that patch parsed into :class:`FileChange` entries and stats, saved
beside the run's transcript (``<transcript stem>.patch`` and ``.changes.json``); from the
host it is exported, applied to a repository or pushed to a branch with the host's git. A
secret value found in it is masked in everything shown and written (the summary says so),
and apply or push refuse such a patch unless ``allow_secrets=True``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..engines import SnapshotRunner
from ..errors import CldpdError, SessionNotFoundError
from ..logs import log_swallowed
from ..pods import container_name
from ..secrets import Masker

if TYPE_CHECKING:
    from ..engines import Runner
    from .session import Session

logger = logging.getLogger(__package__)

__all__ = [
    "STATUSES",
    "ChangeCapture",
    "Changes",
    "ChangesError",
    "FileChange",
    "RunChanges",
    "capture_command",
    "capture_left_at",
    "changes_paths",
    "decode_capture",
    "find_changes",
    "find_saved_changes",
    "load_changes",
    "parse_patch",
    "with_baseline",
]

#: What a changed file's ``status`` may be.
STATUSES = ("added", "modified", "deleted", "renamed")
#: The scripts that run in the container (package data).
SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "changes"
#: Default of pod.json ``changesMaxBytes`` (see :data:`~cldpd_magic.pods.PodConfig`).
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
#: The minus sign of ``+10 \u22122``.
MINUS = "\u2212"
#: The version of the summary written beside a transcript.
SUMMARY_VERSION = 1


class ChangesError(CldpdError):
    """A run's changes could not be captured, read, applied or pushed (one sentence why)."""


# --- the scripts -------------------------------------------------------------------------


@functools.cache
def _script(name: str) -> str:
    return (SCRIPTS_DIR / name).read_text(encoding="utf-8")


def capture_left_at(max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Where a run's container leaves its capture as its agent ends (:func:`with_baseline`)."""
    return f"/tmp/.cldpd-changes-{int(max_bytes)}.out"


#: Set in a run's container with the baseline: its init (docker's tini) then passes the
#: signals of a stop to the whole process group of the container's command, the agent
#: included, and not to the shell alone.
SIGNAL_GROUP_ENV = {"TINI_KILL_PROCESS_GROUP": "1"}

#: After the baseline. An agent run through exec (a kept-alive container's), or in a
#: container without that init, takes the shell's process, as before. The container's own
#: command (the child of its init) runs the agent in the foreground, the stop's signals
#: reaching both (the shell only notes them); once the agent has ended, whatever it left
#: running is killed and the capture is written where the host reads it from the ended
#: container (an archive read, instead of a snapshot image and a throwaway container:
#: about 250 ms less at every run's end). The exit code is the agent's.
_RUN_THEN_CAPTURE = """(cldpd_baseline) </dev/null >/dev/null 2>&1
if [ "$PPID" != 1 ] || [ "${TINI_KILL_PROCESS_GROUP:-}" != 1 ]; then exec "$@"; fi
trap : INT TERM HUP
"$@"
cldpd_code=$?
kill -KILL -1 2>/dev/null
rm -f "$cldpd_left.part" 2>/dev/null
(cldpd_capture "$cldpd_max") </dev/null >"$cldpd_left.part" 2>/dev/null &&
  mv -f "$cldpd_left.part" "$cldpd_left" 2>/dev/null
exit "$cldpd_code"
"""


def baseline_script() -> str:
    """The ``sh`` program that takes the baseline, runs its arguments after the capture's
    path and size cap, then writes the capture there (see :func:`with_baseline`)."""
    return (
        _script("common.sh")
        + _script("baseline.sh")
        + _script("capture.sh")
        + "cldpd_left=$1 cldpd_max=$2\nshift 2\n"
        + _RUN_THEN_CAPTURE
    )


def with_baseline(cmd: list[str], max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """``cmd`` preceded, in its container, by the baseline of the run's changes, and
    followed by their capture, left at :func:`capture_left_at` for the host to read.

    It composes with :func:`~cldpd_magic.runs.with_deadline` (the command it wraps). The
    container's environment needs :data:`SIGNAL_GROUP_ENV` for the capture to be left (see
    ``_RUN_THEN_CAPTURE``); without it the agent takes the shell's process and the capture
    is read from a snapshot. The baseline never fails the start, nor the capture the run:
    whatever goes wrong, the agent runs and its exit code is the container's.
    """
    return ["sh", "-c", baseline_script(), "cldpd-changes", capture_left_at(max_bytes),
            str(int(max_bytes)), *cmd]  # fmt: skip


def capture_script(max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The ``sh`` program that prints the changes since the baseline (:func:`decode_capture`)."""
    return _script("common.sh") + _script("capture.sh") + f"cldpd_capture {int(max_bytes)}\n"


def capture_command(max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """The capture as a command, for an exec into a running container."""
    return ["sh", "-c", capture_script(max_bytes), "cldpd-capture"]


def decode_capture(output: str | bytes) -> bytes:
    """The payload the capture printed between its marker lines (base64 or hex).

    Raises:
        ChangesError: The output holds no complete capture.
    """
    text = output.decode("ascii", "replace") if isinstance(output, bytes) else output
    lines = text.split("\n")
    try:
        begin = lines.index("cldpd-changes begin")
        end = lines.index("cldpd-changes end", begin)
    except ValueError:
        raise ChangesError(
            "The capture of the run's changes printed no complete result; the container "
            "may lack sh or the time to finish; try capture_changes() again."
        ) from None
    encoding = lines[begin + 1] if begin + 1 < end else ""
    body = "".join(lines[begin + 2 : end])
    try:
        if encoding == "cldpd-changes base64":
            return base64.b64decode(body, validate=False)
        if encoding == "cldpd-changes hex":
            return bytes.fromhex(body)
    except (binascii.Error, ValueError):
        pass
    raise ChangesError("The capture of the run's changes printed a result cldpd cannot read.")


# --- patches -----------------------------------------------------------------------------

_DIFF_RE = re.compile(r"^diff --git ", re.MULTILINE)
_C_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, '"': 34, "\\": 92}


def unquote_path(text: str) -> str:
    """A path as git writes it, C-quoted (``"a/\\303\\244"``) or not, as text."""
    if not (len(text) >= 2 and text.startswith('"') and text.endswith('"')):
        return text
    out = bytearray()
    body, i = text[1:-1], 0
    while i < len(body):
        c = body[i]
        if c != "\\" or i + 1 == len(body):
            out += c.encode("utf-8", "surrogateescape")
            i += 1
        elif body[i + 1] in _C_ESCAPES:
            out.append(_C_ESCAPES[body[i + 1]])
            i += 2
        elif body[i + 1 : i + 4].isdigit():
            out.append(int(body[i + 1 : i + 4], 8) & 0xFF)
            i += 4
        else:
            out += body[i + 1].encode("utf-8", "surrogateescape")
            i += 2
    return out.decode("utf-8", "replace")


def _strip_side(name: str) -> str:
    """``a/x`` or ``b/x`` (quoted or not, maybe with git's trailing tab) as ``x``."""
    name = unquote_path(name.rstrip("\t") if name.startswith('"') else name.removesuffix("\t"))
    return name[2:] if name[:2] in ("a/", "b/") else name


def _quoted_end(text: str) -> int:
    """The index just past the C-quoted token that starts ``text`` (-1 if unterminated)."""
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return -1


def _git_line_paths(rest: str) -> tuple[str, str]:
    """The two paths of a ``diff --git`` line (after the prefix)."""
    if rest.startswith('"'):
        end = _quoted_end(rest)
        if end != -1:
            return _strip_side(rest[:end]), _strip_side(rest[end + 1 :])
    half = (len(rest) - 1) // 2
    if len(rest) % 2 == 1 and rest[half] == " " and rest[2:half] == rest[half + 3 :]:
        return _strip_side(rest[:half]), _strip_side(rest[half + 1 :])
    old, sep, new = rest.partition(" b/")
    if not sep:
        old, sep, new = rest.partition(' "b/')
        new = '"b/' + new
    else:
        new = "b/" + new
    return (_strip_side(old), _strip_side(new)) if sep else (rest, rest)


@dataclass(frozen=True)
class FileChange:
    """One changed file of a run.

    Attributes:
        path: The path under the workdir (after a rename, the new one).
        status: ``added``, ``modified``, ``deleted`` or ``renamed``.
        insertions: Lines added.
        deletions: Lines removed.
        binary: Whether its content is not text (its diff is not shown as lines).
        old_path: The path before a rename ("" otherwise).
        size: The file's size in bytes, when known (the list of a truncated capture).
    """

    path: str
    status: str
    insertions: int = 0
    deletions: int = 0
    binary: bool = False
    # Known for some changes only: equality is the contract's five fields.
    old_path: str = field(default="", compare=False)
    size: int | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON object."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileChange:
        """An entry from :meth:`to_json`'s form (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


_HUNK_RE = re.compile(r"@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def _count_hunks(lines: list[str], start: int) -> tuple[int, int]:
    """Lines added and removed by the hunks from ``lines[start]`` on, each read for as many
    lines as its header says (so a commit message after the last hunk is not counted)."""
    plus = minus = old = new = 0
    for line in lines[start:]:
        if old <= 0 and new <= 0:
            header = _HUNK_RE.match(line)
            if header is not None:
                old = int(header.group(1) or 1)
                new = int(header.group(2) or 1)
            continue
        first = line[:1]
        if first == "+":
            plus += 1
            new -= 1
        elif first == "-":
            minus += 1
            old -= 1
        elif first == " " or not line:
            old -= 1
            new -= 1
    return plus, minus


def _section_change(section: str) -> FileChange:
    """The file one ``diff --git`` section changes, with its line counts."""
    lines = section.split("\n")
    old, new = _git_line_paths(lines[0][len("diff --git ") :])
    status, binary = "modified", False
    plus = minus = 0
    for i, line in enumerate(lines[1:], 1):
        if line.startswith("@@"):
            plus, minus = _count_hunks(lines, i)
            break
        if line.startswith("new file mode"):
            status = "added"
        elif line.startswith("deleted file mode"):
            status = "deleted"
        elif line.startswith(("rename from ", "copy from ")):
            old = unquote_path(line.split(" ", 2)[2])
            status = "renamed" if line.startswith("rename") else "added"
        elif line.startswith(("rename to ", "copy to ")):
            new = unquote_path(line.split(" ", 2)[2])
        elif line.startswith("--- ") and line != "--- /dev/null":
            old = _strip_side(line[4:])
        elif line.startswith("+++ ") and line != "+++ /dev/null":
            new = _strip_side(line[4:])
        elif line.startswith(("GIT binary patch", "Binary files ")):
            binary = True
    path = old if status == "deleted" else new
    return FileChange(path, status, plus, minus, binary, old if status == "renamed" else "")


def patch_sections(text: str) -> list[tuple[int, int]]:
    """Start and end offsets of each file's section (``diff --git ...``) in a patch."""
    starts = [m.start() for m in _DIFF_RE.finditer(text)]
    return list(zip(starts, [*starts[1:], len(text)], strict=False))


def parse_patch(text: str) -> list[FileChange]:
    """The files a git patch (``git diff --binary`` or ``format-patch`` style) changes.

    A file changed by several sections (several commits of a series) is one entry whose
    counts add up; text before the first section (a commit message) is skipped.
    """
    return _parse(text)[0]


Spans = dict[str, list[tuple[int, int]]]


def _parse(text: str) -> tuple[list[FileChange], Spans]:
    """The files a patch changes, and where each file's sections are (by new and old path)."""
    found: dict[str, FileChange] = {}
    spans: Spans = {}
    for start, end in patch_sections(text):
        change = _section_change(text[start:end])
        spans.setdefault(change.path, []).append((start, end))
        if change.old_path and change.old_path != change.path:
            spans.setdefault(change.old_path, []).append((start, end))
        before = found.get(change.path)
        if before is not None:
            status = before.status if before.status in ("added", "renamed") else change.status
            change = dataclasses.replace(
                change, status=status, insertions=before.insertions + change.insertions,
                deletions=before.deletions + change.deletions,
                binary=before.binary or change.binary, old_path=before.old_path,
            )  # fmt: skip
        found[change.path] = change
    return list(found.values()), spans


# --- what the capture printed ------------------------------------------------------------


@dataclass
class _Payload:
    """The capture's result, read: status, notes, commits, bases and patch or file list."""

    status: str = "none"
    notes: list[str] = field(default_factory=list)
    commits: list[str] = field(default_factory=list)
    bases: dict[str, str] = field(default_factory=dict)
    patch: bytes = b""
    files: list[FileChange] = field(default_factory=list)
    sizes: tuple[int, int] = (0, 0)


def _header(line: str, payload: _Payload) -> None:
    what, _, arg = line[len("#cldpd ") :].partition(" ")
    if what == "v1":
        status, *numbers = arg.split()
        payload.status = status
        if len(numbers) == 2 and all(n.isdigit() for n in numbers):
            payload.sizes = (int(numbers[0]), int(numbers[1]))
    elif what == "note":
        payload.notes.append(arg)
    elif what in ("commit", "base"):
        prefix, _, rest = arg.partition("\t")
        if what == "base":
            payload.bases[prefix] = rest.strip()
            return
        sha, _, subject = rest.partition(" ")
        where = f"{prefix.rstrip('/')}: " if prefix else ""
        payload.commits.append(f"{where}{sha[:12]} {subject}")


def _listing(sections: dict[tuple[str, str], list[str]]) -> list[FileChange]:
    """The files of a truncated capture, from git's raw, numstat and sizes sections, or
    from the list a capture without git made."""
    files: list[FileChange] = []
    statuses = {"A": "added", "D": "deleted", "M": "modified", "T": "modified"}
    for (kind, prefix), lines in sections.items():
        if kind == "files":
            for line in lines:
                status, _, rest = line.partition("\t")
                size, _, path = rest.partition("\t")
                if path:
                    size_of = int(size) if size.isdigit() else None
                    files.append(FileChange(path, statuses.get(status, "modified"), size=size_of))
            continue
        if kind != "raw":
            continue
        sizes = {}
        for line in sections.get(("sizes", prefix), []):
            parts = line.split()
            if len(parts) == 3 and parts[2].isdigit():
                sizes[parts[0]] = int(parts[2])
        counts = [line.split("\t", 2) for line in sections.get(("numstat", prefix), [])]
        for i, line in enumerate(lines):
            meta, _, path = line.partition("\t")
            fields = meta.split()
            if len(fields) < 5:
                continue
            plus, minus = (counts[i] + ["", ""])[:2] if i < len(counts) else ("", "")
            status = statuses.get(fields[4][:1], "modified")
            oid = fields[2] if status == "deleted" else fields[3]
            files.append(FileChange(
                prefix + unquote_path(path), status,
                int(plus) if plus.isdigit() else 0, int(minus) if minus.isdigit() else 0,
                binary=plus == "-", size=sizes.get(oid),
            ))  # fmt: skip
    return files


def parse_payload(payload: bytes) -> _Payload:
    """Read what the capture script printed (decoded by :func:`decode_capture`)."""
    result = _Payload()
    marker = b"#cldpd patch\n"
    head, found, patch = payload.partition(marker)
    if not found and payload.startswith(marker[:-1]):
        head, patch = b"", b""
    result.patch = patch
    sections: dict[tuple[str, str], list[str]] = {}
    current: list[str] | None = None
    for line in head.decode("utf-8", "replace").split("\n"):
        if line.startswith("#cldpd "):
            what, _, arg = line[len("#cldpd ") :].partition(" ")
            if what in ("raw", "numstat", "sizes", "files"):
                current = sections.setdefault((what, arg), [])
            else:
                current = None
                _header(line, result)
        elif current is not None and line:
            current.append(line)
    result.files = _listing(sections)
    return result


# --- Changes -----------------------------------------------------------------------------


def _mask_bytes(data: bytes, mask: Masker | None) -> tuple[bytes, bool]:
    """``data`` with secret values masked, losslessly elsewhere; whether any was found."""
    if not mask or not data:
        return data, False
    text = data.decode("utf-8", "surrogateescape")
    masked = mask(text)
    if masked == text:
        return data, False
    return masked.encode("utf-8", "surrogateescape"), True


def _git(args: Sequence[str], cwd: Path | str | None, what: str, *, quiet: bool = False,
         **kw: Any) -> str:  # fmt: skip
    """Run the host's git; its stdout, or a ChangesError that says ``what`` failed.

    ``quiet``: a failure gives "" instead of an error (a question, such as a config value).
    """
    git = shutil.which("git")
    if git is None:
        raise ChangesError(f"Cannot {what}: git is not installed on this machine; install it.")
    try:
        done = subprocess.run(
            [git, *args], cwd=cwd, capture_output=True, text=True, errors="replace", **kw
        )
    except OSError as exc:
        raise ChangesError(f"Cannot {what}: git did not run ({exc.strerror or exc}).") from None
    if done.returncode != 0:
        if quiet:
            return ""
        detail = " ".join((done.stderr or done.stdout).split())[:300]
        raise ChangesError(f"Cannot {what}: git says: {detail or 'it failed'}.")
    return done.stdout


@dataclass(frozen=True, eq=False)
class Changes:
    """What a run changed in its workdir.

    Attributes:
        files: The changed files, in the patch's order.
        insertions: Lines added, in all.
        deletions: Lines removed, in all.
        commits: The commits made during the run (``<sha> <subject>``, oldest first).
        patch: The patch as text, secrets masked ("" when truncated).
        path: Where the patch is saved (None until it is).
        truncated: Whether the patch was over the size cap (only the files are known).
        notes: What the capture said besides (no baseline, the workdir is gone, ...).
        secrets: Whether a secret value was found in the patch (and masked).
        bases: The commit each repository started from, by path prefix ("" the workdir's).
        raw: The patch's bytes as captured: what apply and push use (secrets unmasked
            while the run's process holds them; read back from disk, masked).
        masked: The patch's bytes with secrets masked: what is shown, saved and exported
            (the same object as ``raw`` when the patch holds no secret).
    """

    files: list[FileChange]
    insertions: int
    deletions: int
    commits: list[str]
    patch: str
    path: Path | None = None
    truncated: bool = False
    notes: tuple[str, ...] = ()
    secrets: bool = False
    bases: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = field(default=None, repr=False)
    masked: bytes | None = field(default=None, repr=False)
    _index: Spans | None = field(default=None, init=False, repr=False)

    # --- making one ------------------------------------------------------------------

    @classmethod
    def from_patch(
        cls,
        patch: str | bytes,
        *,
        commits: Iterable[str] = (),
        mask: Masker | None = None,
        path: Path | None = None,
        notes: Iterable[str] = (),
        bases: dict[str, str] | None = None,
    ) -> Changes:
        """Changes from a git patch (text or bytes): its files and line counts.

        Args:
            patch: The patch.
            commits: The commits it holds, as ``<sha> <subject>``.
            mask: Masks secret values: in :attr:`patch`, paths and commits.
            path: Where it is saved.
            notes: Sentences to keep with it.
            bases: The commit each repository started from.
        """
        raw = patch.encode("utf-8", "surrogateescape") if isinstance(patch, str) else patch
        masked, secret = _mask_bytes(raw, mask)
        text = masked.decode("utf-8", "replace")
        files, spans = _parse(text)
        shown = list(commits)
        if mask:
            shown = [mask(c) for c in shown]
        made = cls(
            files, sum(f.insertions for f in files), sum(f.deletions for f in files), shown,
            text, path, False, tuple(notes), secret, dict(bases or {}), raw, masked,
        )  # fmt: skip
        object.__setattr__(made, "_index", spans)
        return made

    @classmethod
    def from_capture(cls, payload: bytes, mask: Masker | None = None) -> Changes:
        """Changes from what the capture script printed (see :func:`decode_capture`)."""
        read = parse_payload(payload)
        notes = list(read.notes)
        if read.status == "truncated":
            size, cap = read.sizes
            files = read.files
            if mask:
                files = [dataclasses.replace(f, path=mask(f.path)) for f in files]
            notes.append(
                f"The patch is {size:,} bytes, over the {cap:,} bytes pod.json's "
                "changesMaxBytes allows: only the changed files and their sizes are kept."
            )
            commits = [mask(c) for c in read.commits] if mask else read.commits
            return cls(
                files, sum(f.insertions for f in files), sum(f.deletions for f in files),
                commits, "", None, True, tuple(notes), False, read.bases,
            )  # fmt: skip
        return cls.from_patch(
            read.patch, commits=read.commits, mask=mask, notes=notes, bases=read.bases
        )

    # --- reading it --------------------------------------------------------------------

    @property
    def files_changed(self) -> int:
        """How many files changed."""
        return len(self.files)

    def summary_line(self) -> str:
        """``3 files, +10 \u22122`` (``, truncated`` when only the file list is kept)."""
        count = self.files_changed
        plural = "" if count == 1 else "s"
        text = f"{count} file{plural}, +{self.insertions:,} {MINUS}{self.deletions:,}"
        return text + (", truncated" if self.truncated else "")

    def __repr__(self) -> str:
        return f"<Changes: {self.summary_line()}>"

    def _sections(self) -> Spans:
        """Where each file's sections are in the patch, by new and old path (read once)."""
        if self._index is None:
            object.__setattr__(self, "_index", _parse(self.patch)[1])
        return self._index  # type: ignore[return-value]

    def diff(self, path: str | None = None) -> str:
        """The patch (secrets masked), or the part of it that changes one file.

        Args:
            path: A changed file (its new or old path); None for the whole patch.

        Raises:
            KeyError: No changed file has that path.
        """
        if path is None:
            return self.patch
        spans = self._sections().get(path)
        if spans is None:
            if any(f.path == path for f in self.files):
                return ""  # known from a truncated capture's list: no diff kept
            raise KeyError(path)
        return "".join(self.patch[start:end] for start, end in spans)

    def file(self, path: str) -> FileChange:
        """The entry of one changed file (KeyError when it did not change)."""
        for change in self.files:
            if path in (change.path, change.old_path):
                return change
        raise KeyError(path)

    def summary(self) -> dict[str, Any]:
        """What :meth:`save` writes beside the patch, as a JSON object."""
        return {
            "version": SUMMARY_VERSION,
            "files": [f.to_json() for f in self.files],
            "files_changed": self.files_changed,
            "insertions": self.insertions,
            "deletions": self.deletions,
            "commits": list(self.commits),
            "truncated": self.truncated,
            "secrets": self.secrets,
            "notes": list(self.notes),
            "bases": dict(self.bases),
        }

    def _repr_html_(self) -> str:
        from ..render import diff as diff_view  # Pygments loads only when it is used

        return diff_view.changes_html(self)

    # --- taking it home --------------------------------------------------------------

    def _bytes(self, allow_secrets: bool) -> bytes:
        """The bytes to apply or push: as captured (unmasked only when allowed)."""
        if self.raw is not None and (allow_secrets or not self.secrets):
            return self.raw
        return self._shown_bytes()

    def _shown_bytes(self) -> bytes:
        """The bytes to show, save or export: secrets masked."""
        if self.masked is not None:
            return self.masked
        if self.raw is not None and not self.secrets:
            return self.raw
        return self.patch.encode("utf-8")

    def _refuse(self, doing: str, allow_secrets: bool) -> None:
        if self.truncated:
            raise ChangesError(
                f"Cannot {doing}: the run's patch was over its size cap and only the list of "
                "changed files was kept; raise changesMaxBytes in pod.json and capture again."
            )
        if self.secrets and not allow_secrets:
            raise ChangesError(
                f"Refusing to {doing}: the patch contains a secret value (masked in what is "
                "shown); check the change, then pass allow_secrets=True if it must go."
            )
        if not self.files:
            raise ChangesError(f"Nothing to {doing.split()[0]}: the run changed no file.")

    def export(self, path: str | os.PathLike[str], *, allow_secrets: bool = False) -> Path:
        """Write the patch to a file (``git apply`` or ``git am``-free: a plain git patch).

        Args:
            path: The file to write.
            allow_secrets: Write secret values unmasked (only while the run's process
                holds them; a patch read from disk has them masked).

        Returns:
            The path written.
        """
        target = Path(path).expanduser()
        if self.truncated:
            raise ChangesError(
                "Cannot export: the run's patch was over its size cap and only the list of "
                "changed files was kept; raise changesMaxBytes in pod.json and capture again."
            )
        target.write_bytes(self._bytes(True) if allow_secrets else self._shown_bytes())
        return target

    def apply(
        self,
        repo_dir: str | os.PathLike[str],
        three_way: bool = True,
        *,
        allow_secrets: bool = False,
    ) -> None:
        """Apply the patch to a work tree on this machine, with this machine's git.

        All or nothing: the work tree must have no uncommitted change, the patch is
        checked first, and a 3-way merge that ends in conflicts is undone. The changes
        are left uncommitted (``git status`` shows them).

        Args:
            repo_dir: A git work tree (or a plain directory: then without 3-way merge).
            three_way: Fall back on a 3-way merge where the patch does not apply cleanly.
            allow_secrets: Apply a patch that contains a secret value.

        Raises:
            ChangesError: In one sentence: the tree has changes, the patch conflicts,
                is truncated, holds a secret, or git is missing.
        """
        self._refuse("apply the changes", allow_secrets)
        return apply_patch(self._bytes(allow_secrets), Path(repo_dir).expanduser(), three_way)

    def push(
        self,
        remote: str,
        branch: str,
        *,
        base: str | None = None,
        message: str | None = None,
        allow_secrets: bool = False,
    ) -> str:
        """Commit the changes on a new branch and push it, from this machine.

        The remote (a URL, a path or a bare repository) is cloned into a temporary
        directory with this machine's git and credentials, never the container's; the
        patch goes on the commit the run started from when the remote has it, else on
        ``base`` or the remote's default branch; the commit is pushed as ``branch``.

        Args:
            remote: Where to push.
            branch: The branch to make (a push that would overwrite another is refused).
            base: The commit or branch to start from (the run's own start when None).
            message: The commit message (one naming the run's commits when None).
            allow_secrets: Push a patch that contains a secret value.

        Returns:
            The pushed commit's id.
        """
        self._refuse("push the changes", allow_secrets)
        lines = [message or "Changes made by an agent in a cldpd run"]
        if message is None and self.commits:
            lines += ["", "Commits made during the run:", *(f"  {c}" for c in self.commits)]
        return push_patch(
            self._bytes(allow_secrets), remote, branch, base or self.bases.get(""), "\n".join(lines)
        )

    # --- beside the transcript -----------------------------------------------------------

    def save(
        self, transcript: str | os.PathLike[str], meta: dict[str, Any] | None = None
    ) -> Changes:
        """Write the patch (secrets masked) and its summary beside a transcript.

        Args:
            transcript: The run's transcript; ``<stem>.patch`` and ``<stem>.changes.json``
                go beside it.
            meta: More fields for the summary (run, pod, session, when).

        Returns:
            These changes, with :attr:`path` set.
        """
        patch_path, summary_path = changes_paths(transcript)
        patch_path.parent.mkdir(parents=True, exist_ok=True)
        data = b"" if self.truncated else self._shown_bytes()
        summary = {**self.summary(), **(meta or {}), "bytes": len(data)}
        _write_atomically(patch_path, data)
        _write_atomically(summary_path, json.dumps(summary, indent=1).encode("utf-8"))
        return dataclasses.replace(self, path=patch_path)


def changes_paths(transcript: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Where a transcript's changes go: ``<stem>.patch`` and ``<stem>.changes.json``."""
    path = Path(transcript)
    stem = path.name.removesuffix(".jsonl")
    return path.with_name(f"{stem}.patch"), path.with_name(f"{stem}.changes.json")


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_changes(transcript: str | os.PathLike[str]) -> Changes | None:
    """The changes saved beside a transcript (None when none were).

    Raises:
        ChangesError: The files are there but cannot be read.
    """
    patch_path, summary_path = changes_paths(transcript)
    if not summary_path.exists():
        return None
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        data = patch_path.read_bytes() if patch_path.exists() else b""
        files = [FileChange.from_json(f) for f in summary.get("files", [])]
        return Changes(
            files, int(summary.get("insertions", 0)), int(summary.get("deletions", 0)),
            [str(c) for c in summary.get("commits", [])], data.decode("utf-8", "replace"),
            patch_path if patch_path.exists() else None, bool(summary.get("truncated")),
            tuple(str(n) for n in summary.get("notes", [])), bool(summary.get("secrets")),
            {str(k): str(v) for k, v in (summary.get("bases") or {}).items()}, data, data,
        )  # fmt: skip
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ChangesError(
            f"The changes saved at {summary_path} cannot be read ({exc}); capture them again."
        ) from None


def find_saved_changes(transcript_dir: str | os.PathLike[str], name: str) -> Path | None:
    """The transcript of the latest run named ``name`` (or session id) with saved changes."""
    best: tuple[str, Path] | None = None
    folder = Path(transcript_dir).expanduser()
    if not folder.is_dir():
        return None
    for summary_path in folder.glob("*.changes.json"):
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(summary, dict) or name not in (
            summary.get("run"),
            summary.get("session"),
        ):
            continue
        when = str(summary.get("captured_at", ""))
        stem = summary_path.name.removesuffix(".changes.json")
        transcript = summary_path.with_name(f"{stem}.jsonl")
        if best is None or when > best[0]:
            best = (when, transcript)
    return None if best is None else best[1]


# --- git on the host ---------------------------------------------------------------------


def _work_tree(repo: Path) -> Path | None:
    """The top of the git work tree holding ``repo`` (None for a plain directory)."""
    git = shutil.which("git")
    if git is None:
        return None
    done = subprocess.run(
        [git, "rev-parse", "--show-toplevel"], cwd=repo, capture_output=True, text=True
    )
    return Path(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None


def apply_patch(data: bytes, repo: Path, three_way: bool = True) -> None:
    """Apply a patch to a work tree, all or nothing (see :meth:`Changes.apply`)."""
    if not repo.is_dir():
        raise ChangesError(f"Cannot apply the changes: {repo} is not a directory.")
    top = _work_tree(repo)
    if top is not None:
        status = _git(["status", "--porcelain", "--untracked-files=normal"], top, "apply")
        if status.strip():
            raise ChangesError(
                f"Refusing to apply the changes: {top} has uncommitted changes; commit or "
                "stash them first."
            )
    with tempfile.TemporaryDirectory(prefix="cldpd-apply-") as tmp:
        patch = Path(tmp) / "changes.patch"
        patch.write_bytes(data)
        where = top or repo
        check = ["apply", "--check", "--whitespace=nowarn", str(patch)]
        try:
            _git(check, where, "apply the changes")
            _git(check[:1] + check[2:], where, "apply the changes")
            return
        except ChangesError:
            if not (three_way and top is not None):
                raise ChangesError(
                    f"The changes do not apply cleanly to {where}; nothing was changed."
                ) from None
        try:
            _git(["apply", "--3way", "--whitespace=nowarn", str(patch)], top, "apply")
        except ChangesError:
            _git(["reset", "-q", "--hard"], top, "undo a partial apply")
            _git(["clean", "-q", "-fd"], top, "undo a partial apply")
            raise ChangesError(
                f"The changes conflict with {top}, even with a 3-way merge; nothing was changed."
            ) from None
        _git(["reset", "-q"], top, "apply")  # as a plain apply leaves them: unstaged


def push_patch(data: bytes, remote: str, branch: str, base: str | None, message: str) -> str:
    """Commit a patch on ``branch`` and push it to ``remote`` (see :meth:`Changes.push`)."""
    if not branch or branch.startswith("-") or any(c in branch for c in " ~^:?*[\\\0"):
        raise ChangesError(f"{branch!r} is not a branch name; give one like agent/fix-42.")
    local = Path(remote).expanduser()
    if "://" not in remote and local.exists():  # a path: from here, not from the clone
        remote = str(local.resolve())
    with tempfile.TemporaryDirectory(prefix="cldpd-push-") as tmp:
        work = Path(tmp) / "work"
        _git(["clone", "--quiet", "--no-checkout", "--", remote, str(work)], tmp, "push")
        start = ""
        for candidate in (base, "HEAD"):
            if candidate and not start:
                verify = ["rev-parse", "--verify", "-q", f"{candidate}^{{commit}}"]
                start = _git(verify, work, "push", quiet=True).strip()
        taken = ["rev-parse", "-q", "--verify", f"refs/remotes/origin/{branch}"]
        if _git(taken, work, "push", quiet=True).strip():
            raise ChangesError(
                f"The branch {branch} exists on {remote} already; push to a new branch name."
            )
        if start:
            _git(["checkout", "-q", "--detach", start], work, "push")
        patch = Path(tmp) / "changes.patch"
        patch.write_bytes(data)
        try:
            _git(["apply", "--index", "--3way", "--whitespace=nowarn", str(patch)], work, "push")
        except ChangesError:
            raise ChangesError(
                f"The changes do not apply to {remote} at {start or 'its start'}; nothing was "
                "pushed."
            ) from None
        env = {**os.environ}
        if not _git(["config", "user.email"], work, "push", quiet=True).strip():
            for role in ("AUTHOR", "COMMITTER"):
                env.update({f"GIT_{role}_NAME": "cldpd", f"GIT_{role}_EMAIL": "cldpd@localhost"})
        _git(["commit", "-q", "--no-verify", "-F", "-"], work, "commit the changes",
             input=message, env=env)  # fmt: skip
        commit = _git(["rev-parse", "HEAD"], work, "push").strip()
        _git(["push", "--quiet", "origin", f"HEAD:refs/heads/{branch}"], work,
             f"push the changes to {remote}")  # fmt: skip
        return commit


# --- capturing -----------------------------------------------------------------------------


class _Collect:
    """A Writer that keeps what it is given."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def text(self) -> str:
        return "".join(self.parts)


class ChangeCapture:
    """Captures a run's changes from its container, whatever state it is in.

    A running container is read through ``runner.exec``; an ended one through the
    runner's ``capture`` (:class:`SnapshotRunner`), before it is removed. The result is
    masked with the session's secrets and saved beside its transcript.

    Args:
        runner: The run's runner.
        container: The run's container.
        max_bytes: pod.json's ``changesMaxBytes``.
        meta: Fields for the saved summary (pod, run, issue).
    """

    def __init__(
        self,
        runner: Runner,
        container: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.runner = runner
        self.container = container
        self.max_bytes = max_bytes
        self.meta = dict(meta or {})

    @staticmethod
    def supported(runner: Runner) -> bool:
        """Whether the runner can capture changes of ended containers (so of every run)."""
        return isinstance(runner, SnapshotRunner)

    def output(self) -> bytes:
        """What the capture printed, from the container running or ended.

        Raises:
            SessionNotFoundError: The container is gone.
            ChangesError: The capture failed.
        """
        info = self.runner.inspect(self.container)
        if info is None:
            raise SessionNotFoundError(
                f"The container {self.container} is not there (not made yet, or removed); "
                "its changes are those captured when it ended, if any."
            )
        if info.running:
            try:
                return self._exec()
            except SessionNotFoundError:
                # It ended meanwhile (or its engine says a service runs whose task has
                # ended, as a swarm's does): read it as an ended container.
                if not isinstance(self.runner, SnapshotRunner):
                    raise
        if not isinstance(self.runner, SnapshotRunner):
            raise ChangesError(
                f"The container {self.container} has ended and its engine cannot read an "
                "ended container's files; capture changes while the run runs."
            )
        return self.runner.capture(
            self.container, capture_script(self.max_bytes), left_at=capture_left_at(self.max_bytes)
        )

    def _exec(self) -> bytes:
        """The capture's output through an exec into the running container."""
        out, err = _Collect(), _Collect()
        code = self.runner.exec(self.container, capture_command(self.max_bytes), out, err)
        if code != 0:
            detail = " ".join(err.text().split())[-300:]
            raise ChangesError(
                f"Capturing the changes in {self.container} failed (exit {code}"
                + (f": {detail}" if detail else "") + ")."
            )  # fmt: skip
        return out.text().encode("ascii", "replace")

    def payload(self) -> bytes:
        """What the capture found, read from its output (see :func:`decode_capture`)."""
        return decode_capture(self.output())

    def __call__(self, session: Session) -> Changes:
        """Capture now, mask with the session's secrets, save beside its transcript."""
        changes = Changes.from_capture(self.payload(), session.mask)
        meta = {
            **self.meta, "session": session.id, "pod": session.pod_name, "run": session.run,
            "kind": str(session.kind), "captured_at": datetime.now(UTC).isoformat(),
        }  # fmt: skip
        try:
            return changes.save(session.transcript, meta)
        except OSError as exc:
            log_swallowed(logger, f"session {session.id}: saving its changes failed", session.mask)
            note = f"The changes could not be saved beside the transcript ({exc.strerror or exc})."
            return dataclasses.replace(changes, notes=(*changes.notes, note))


class RunChanges:
    """What a :class:`~cldpd_magic.runs.Session` knows of its run's changes (mixed into it).

    The run's job registers how to capture them (``SessionControl.set_capturer``), and
    captures them as the run ends; :meth:`capture_changes` captures them now.
    """

    _changes: Changes | None = None
    _capturer: Callable[[Any], Changes] | None = None
    run: str

    @property
    def changes(self) -> Changes | None:
        """What the run changed in its workdir, as last captured (None before any capture).

        Captured as the run ends (also a failed, stopped or over-budget one) and whenever
        :meth:`capture_changes` is called; saved beside the transcript.
        """
        return self._changes

    def capture_changes(self) -> Changes:
        """Capture the run's changes now, from its container running or ended.

        Returns:
            The changes since the run began (also kept as :attr:`changes`).

        Raises:
            ChangesError: The run's engine cannot capture changes, or the capture failed.
            SessionNotFoundError: The run's container is gone.
        """
        if self._capturer is None:
            raise ChangesError(
                f"Run {self.run} has no changes to capture: its engine cannot read them, or "
                "its container is not made yet."
            )
        changes = self._capturer(self)
        self._changes = changes
        return changes


class RunsHere(Protocol):
    """What :func:`find_changes` reads of a dispatcher."""

    runner: Runner
    transcript_dir: Path

    @property
    def sessions(self) -> list[Session]:
        """The sessions of this process."""

    def resolve_run(self, name: str, doing: str = "use") -> str:
        """The run a name means."""

    def container_secrets(self, info: Any) -> list[str]:
        """The values a running container holds that are secret."""


def find_changes(runs: RunsHere, run: str, capture: bool = False) -> Changes:
    """A run's changes (see :meth:`Dispatcher.changes <cldpd_magic.runs.Dispatcher.changes>`)."""
    with contextlib.suppress(CldpdError):
        run = runs.resolve_run(run, "show the changes of")
    for session in reversed(runs.sessions):
        if run not in (session.run, session.id):
            continue
        if capture or session.changes is None:
            with contextlib.suppress(CldpdError):
                return session.capture_changes()
        if session.changes is not None:
            return session.changes
    saved = find_saved_changes(runs.transcript_dir, run)
    found = load_changes(saved) if saved is not None else None
    info = runs.runner.inspect(container_name(run)) if found is None or capture else None
    if info is not None and info.running and ChangeCapture.supported(runs.runner):
        mask = Masker(runs.container_secrets(info))
        return Changes.from_capture(ChangeCapture(runs.runner, info.name).payload(), mask)
    if found is None:
        raise ChangesError(
            f"No changes of run {run} are known here: it ran on an engine that cannot "
            "capture them, in another sessions directory, or has not started."
        )
    return found


def capture_at_end(capture: ChangeCapture | None, session_capture: Callable[[], Any]) -> str:
    """Capture a run's changes as its job ends; "" or one sentence saying why it failed."""
    if capture is None:
        return ""
    try:
        session_capture()
    except SessionNotFoundError:
        return ""
    except CldpdError as exc:
        return f"cldpd: the run's changes were not captured: {exc}"
    except Exception as exc:  # a capture never fails the run
        log_swallowed(logger, "capturing a run's changes failed")
        return f"cldpd: the run's changes were not captured ({type(exc).__name__})."
    return ""
