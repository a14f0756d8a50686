"""Figures 12 and 13: a kernel's memory after a large batch, and the first line in a cell.

Figure 12 runs ``%cldpd_batch`` of 50 runs of 100,000 lines each in a real kernel and
reads the kernel's resident memory once they have all finished (the batch, its widgets
and its runs still held, as a person's notebook holds them). Figure 13 times
``%cldpd_start`` from the request sent to the kernel to the first agent line arriving in
the cell's display, against ``docker run`` spawned to its first byte.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from tests.kernel_util import KernelSession, text_of

from .figures import _first_byte_cli, _samples
from .harness import ISSUE_URL, PADDING, Bench, Result, fmt, interleaved, median

MEMORY_RUNS = 50
MEMORY_LINES = 100_000
MEMORY_PARALLEL = 10
MEMORY_TARGET_MIB = 300.0
FIRST_LINE_TARGET = 1.1
CELL_TIMEOUT = 900


def _status_mib(pid: int, key: str) -> float:
    """A ``/proc/PID/status`` size (VmRSS, VmHWM) in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for process {pid}")


def _output_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for raw in f if raw.startswith('{"type":"output"'))


def _kernel(bench: Bench, transcripts: Path) -> KernelSession:
    env = {"CLDPD_PODS_DIR": str(bench.pods_dir), "CLDPD_SESSIONS_DIR": str(transcripts)}
    return KernelSession(env=env, cwd=str(bench.root))


def _load(kernel: KernelSession, bench: Bench, transcripts: Path) -> int:
    """Load the extension in the kernel; return the kernel's pid."""
    kernel.execute(
        "%load_ext cldpd_magic\n"
        f"%config CldpdMagics.pods_dir = {str(bench.pods_dir)!r}\n"
        f"%config CldpdMagics.transcript_dir = {str(transcripts)!r}\n"
    )
    return int(kernel.value("__import__('os').getpid()"))


def _memory_sample(bench: Bench, pod: str, warm: str, problems: list[str]) -> dict[str, float]:
    transcripts = bench.root / f"memory-{time.monotonic_ns()}"
    with _kernel(bench, transcripts) as kernel:
        pid = _load(kernel, bench, transcripts)
        kernel.execute(f"_warm = %cldpd_batch -p {warm} {ISSUE_URL}", timeout=CELL_TIMEOUT)
        before = _status_mib(pid, "VmRSS")
        started = time.perf_counter()
        kernel.execute(
            f"batch = %cldpd_batch -p {pod} --repeats {MEMORY_RUNS} --max-parallel "
            f"{MEMORY_PARALLEL} {ISSUE_URL}\n"
            "assert [r['state'] for r in batch.results()] == ['exited'] * len(batch.runs)",
            timeout=CELL_TIMEOUT,
        )
        seconds = time.perf_counter() - started
        kernel.drain(0.5)
        after = _status_mib(pid, "VmRSS")
        peak = _status_mib(pid, "VmHWM")
    paths = sorted(transcripts.glob(f"{pod}-*.jsonl"))
    if len(paths) != MEMORY_RUNS:
        problems.append(f"{len(paths)} transcripts of {MEMORY_RUNS} runs")
    for path in paths:
        found = _output_lines(path)
        if found != MEMORY_LINES:
            problems.append(f"{path.name}: {found:,} output lines of {MEMORY_LINES:,}")
        path.unlink()
    return {"before": before, "after": after, "peak": peak, "seconds": seconds}


def kernel_memory(bench: Bench) -> list[Result]:
    """Figure 12: kernel RSS once 50 runs of 100,000 lines each have finished in a batch."""
    pod = bench.make_pod("kmem", MEMORY_LINES)
    warm = bench.make_pod("kwarm", 10)
    problems: list[str] = []
    samples = [_memory_sample(bench, pod.name, warm.name, problems) for _ in range(bench.reps)]
    after = median([s["after"] for s in samples])
    checked = "; ".join(problems[:3]) or (
        f"every run: all {MEMORY_LINES:,} lines in its transcript"
    )
    return [
        Result("12", f"kernel RSS (VmRSS) once a %cldpd_batch of {MEMORY_RUNS} runs x "
               f"{MEMORY_LINES:,} lines has finished (max-parallel {MEMORY_PARALLEL}; the "
               "batch, its widgets and its runs still held)", after, None, "MiB",
               f"< {MEMORY_TARGET_MIB:.0f} MiB, absolute",
               after < MEMORY_TARGET_MIB and not problems,
               f"{checked}; RSS before the batch "
               f"{median([s['before'] for s in samples]):.0f} MiB, peak (VmHWM) "
               f"{median([s['peak'] for s in samples]):.0f} MiB; RSS samples "
               f"{[round(s['after']) for s in samples]} MiB; cell "
               f"{fmt(median([s['seconds'] for s in samples]), 's')}"),
    ]  # fmt: skip


def _first_line_cell(kernel: KernelSession, pod: str) -> float:
    """Seconds from sending ``%cldpd_start`` to the cell's display showing the agent's line."""
    line = f"\n1{PADDING}\n"

    def shows(msg: dict) -> bool:
        kinds = ("display_data", "update_display_data")
        return msg["msg_type"] in kinds and line in text_of(msg)

    started = time.perf_counter()
    msg_id = kernel.submit(f"%cldpd_start {pod} {ISSUE_URL}")
    try:
        kernel.wait_for(shows, timeout=60)
        return time.perf_counter() - started
    finally:
        with contextlib.suppress(Exception):
            kernel.wait(msg_id, timeout=60)


def first_line_kernel(bench: Bench) -> list[Result]:
    """Figure 13: ``%cldpd_start`` to the first agent line in the cell vs ``docker run``."""
    pod = bench.make_pod("kfirst", 1)
    transcripts = bench.root / "first-line"
    with _kernel(bench, transcripts) as kernel:
        _load(kernel, bench, transcripts)
        ours, theirs = interleaved(
            bench.reps,
            lambda: _first_line_cell(kernel, pod.name),
            lambda: _first_byte_cli(bench.cli_run(pod)),
        )
    mine, base = median(ours), median(theirs)
    return [
        Result("13", "%cldpd_start in a real kernel: request sent -> the agent's first line "
               "shown in the cell (a display message carrying it) vs docker run spawned -> "
               "first stdout byte", mine, base, "s", f"ratio <= {FIRST_LINE_TARGET}",
               mine / base <= FIRST_LINE_TARGET,
               f"ours {_samples(ours, 's')}, docker run {_samples(theirs, 's')}"),
    ]  # fmt: skip
