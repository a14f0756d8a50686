"""Figure 14: a run's changes, captured and shown, for a run that touched 1,000 files.

In a container of ``cldpd-debian:bookworm`` (git) a repository of 1,000 files of 100 lines
is committed, the baseline taken (the prologue every run's command gets), then every file
gets 25 lines replaced (50,000 changed lines in all) and 20 files are added. Measured:

- 14: the capture of a running run, as ``Session.capture_changes()`` does it: the script
  through exec, its output decoded, the patch parsed, masked (one secret) and saved
  beside a transcript;
- 14b: the same from the container once it has ended (commit to a temporary image, a
  throwaway container with its volumes), as every run's end does it;
- 14c: the first render of the run's collapsed "Changes" section (Pygments loaded);
- 14d: one file's diff opened (``file_diff_html``);
- 14e: the memory the capture takes (tracemalloc: peak while capturing, and what the
  ``Changes`` holds afterwards, which is what a kernel keeps per run).
No docker CLI baseline: the targets are absolute (issue 22).
"""

from __future__ import annotations

import contextlib
import gc
import time
import tracemalloc
from typing import Any

from cldpd_magic.engines.docker import DockerRunner
from cldpd_magic.engines.docker.snapshots import Snapshots
from cldpd_magic.render import diff as diff_view
from cldpd_magic.runs.changes import (
    Changes,
    capture_command,
    capture_script,
    decode_capture,
    with_baseline,
)
from cldpd_magic.secrets import Masker

from .harness import Bench, Result, fmt, median

IMAGE = "cldpd-debian:bookworm"
FILES = 1000
LINES = 100
CHANGED_PER_FILE = 25  # lines replaced: 25 removed and 25 added, 50 changed lines a file
CAPTURE_TARGET = 3.0
RENDER_TARGET = 0.050
OPEN_TARGET = 0.200
SECRET = "bench-secret-0123456789"

SETUP = f"""
set -e
git config --global user.email b@example.com && git config --global user.name bench
mkdir -p /w && cd /w && git init -q
i=0
while [ $i -lt {FILES} ]; do
  mkdir -p "pkg$((i / 100))"
  seq -f "line %g of file $i: some code = value($i) + other" 1 {LINES} > "pkg$((i / 100))/f$i.py"
  i=$((i + 1))
done
git add -A && git commit -qm start
"""
CHANGE = f"""
set -e
cd /w
for f in pkg*/f*.py; do
  sed -i '1,{CHANGED_PER_FILE}s/some code/changed code/' "$f"
done
i=0
while [ $i -lt 20 ]; do echo "new file $i {SECRET}" > "new$i.txt"; i=$((i + 1)); done
"""


class _Box:
    """A container of the image that holds the repository, for one figure."""

    def __init__(self, bench: Bench) -> None:
        self.runner = DockerRunner()
        self.client = self.runner.connection.connect()
        self.name = f"{bench.prefix}-changes"
        self.container = self.client.containers.run(
            IMAGE, ["sh", "-c", "sleep 3600"], name=self.name, detach=True,
            labels={"cldpd.bench": bench.run_id},
        )  # fmt: skip

    def sh(self, script: str, workdir: str = "/") -> bytes:
        result = self.container.exec_run(["sh", "-c", script], workdir=workdir)
        if result.exit_code != 0:
            raise RuntimeError(result.output.decode(errors="replace")[-500:])
        return result.output

    def capture_live(self, transcript: Any) -> Changes:
        """As a running run's capture does: exec, decode, parse, mask, save."""
        out = self.container.exec_run(capture_command(), workdir="/w").output
        changes = Changes.from_capture(decode_capture(out), Masker([SECRET]))
        return changes.save(transcript, {"run": "bench", "session": "bench-0"})

    def capture_ended(self) -> Changes:
        out = Snapshots(self.runner.connection).capture(self.name, capture_script())
        return Changes.from_capture(decode_capture(out), Masker([SECRET]))

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.container.remove(force=True)


def _timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def changes(bench: Bench) -> list[Result]:
    """Figure 14: capture and render the changes of a run that touched 1,000 files."""
    box = _Box(bench)
    try:
        box.sh(SETUP)
        box.container.exec_run(with_baseline(["true"]), workdir="/w")
        box.sh(CHANGE)
        transcript = bench.root / "sessions" / "bench-0.jsonl"
        transcript.parent.mkdir(parents=True, exist_ok=True)
        box.capture_live(transcript)  # warm-up
        live = [_timed(lambda: box.capture_live(transcript)) for _ in range(bench.reps)]
        captured = live[-1][1]
        memory = _memory(lambda: box.capture_live(transcript))
        box.sh("true")
        box.container.stop(timeout=1)
        ended = [_timed(box.capture_ended)[0] for _ in range(max(1, bench.reps // 2))]
    finally:
        box.remove()
    fresh = [_fresh(captured) for _ in range(bench.reps)]  # nothing of a render cached
    render = [_timed(lambda c=c: diff_view.changes_html(c))[0] for c in fresh]
    path = captured.files[0].path
    opened = [_timed(lambda c=c: diff_view.file_diff_html(c, path))[0] for c in fresh]
    capture_s = median([t for t, _ in live])
    return _results(captured, capture_s, live, ended, render, opened, memory)


def _fresh(changes: Changes) -> Changes:
    """The same changes as a new object, so that nothing a render caches is reused."""
    return Changes.from_patch(changes.raw or b"", commits=changes.commits)


def _memory(fn: Any) -> tuple[float, float]:
    """Peak MiB allocated while ``fn`` runs, and MiB its result still holds."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        value = fn()
        current, peak = tracemalloc.get_traced_memory()
        held = current - before
        del value
    finally:
        tracemalloc.stop()
    return (peak - before) / 2**20, held / 2**20


def _results(
    captured: Changes,
    capture_s: float,
    live: list[tuple[float, Any]],
    ended: list[float],
    render: list[float],
    opened: list[float],
    memory: tuple[float, float],
) -> list[Result]:
    size = len(captured.raw or b"") / 2**20
    what = (f"{captured.files_changed:,} files, +{captured.insertions:,} "
            f"-{captured.deletions:,}, patch {size:.1f} MiB")  # fmt: skip
    samples = ", ".join(fmt(t, "s") for t, _ in live)
    peak, held = memory
    return [
        Result("14", f"capture of a running run's changes ({what}): exec of the script, "
               "decode, parse, mask, save", capture_s, None, "s",
               f"< {CAPTURE_TARGET:.0f} s, absolute", capture_s < CAPTURE_TARGET,
               f"samples [{samples}]"),
        Result("14b", "the same from the container once ended (snapshot image, throwaway "
               "container with its volumes; every run's end)", median(ended), None, "s",
               "info", None, f"samples [{', '.join(fmt(t, 's') for t in ended)}]"),
        Result("14c", "first render of the run's collapsed Changes section (Pygments loaded)",
               median(render), None, "s", f"< {RENDER_TARGET * 1000:.0f} ms, absolute",
               median(render) < RENDER_TARGET,
               f"samples [{', '.join(fmt(t, 's') for t in render)}]"),
        Result("14d", "one file's diff opened (file_diff_html)", median(opened), None, "s",
               f"< {OPEN_TARGET * 1000:.0f} ms, absolute", median(opened) < OPEN_TARGET,
               f"samples [{', '.join(fmt(t, 's') for t in opened)}]"),
        Result("14e", "memory of a capture (tracemalloc): what the Changes holds after it "
               "(a kernel keeps this per run)", held, None, "MiB", "info", None,
               f"peak while capturing {peak:.1f} MiB"),
    ]  # fmt: skip
