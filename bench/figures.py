"""The figures measured against the docker CLI: streaming, first line, memory, rebuild, concurrency.

Each function takes a :class:`~bench.harness.Bench`, builds its pods beforehand (so
only cached builds are timed) and returns rows of the results table.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cldpd_magic import EventType, Pod

from .harness import (
    ISSUE_URL,
    Bench,
    OrderedWriter,
    ReplayCounter,
    Result,
    check_transcript,
    docker,
    fmt,
    interleaved,
    median,
    phase_times,
)

STREAM_LINES = 200_000
MEMORY_LINES = (20_000, 2_000_000)
CONCURRENT_PODS = 8
CONCURRENT_LINES = 50_000
REPO = Path(__file__).resolve().parent.parent


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time_cli(cmd: list[str]) -> tuple[float, float]:
    """Run a docker CLI command to its end; return its wall time and its CPU time."""
    cpu = _children_cpu()
    started = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started, _children_cpu() - cpu


def _samples(values: list[float], unit: str) -> str:
    return "[" + ", ".join(fmt(v, unit) for v in values) + "]"


def _timed_start(bench: Bench, pod: Pod, lines: int | None) -> tuple[float, dict[str, float]]:
    """Run ``Dispatcher.start`` into a null writer; return its time and phase marks.

    The marks are seconds from BUILD_STARTED to BUILD_COMPLETE (``build``), from
    BUILD_COMPLETE to ``start`` returning (``run``: create, start, stream, wait, remove),
    the CPU time of this process, all its threads (``cpu``), and how many events the
    consumer re-read from the transcript after falling behind (``replayed``, -1 unknown).
    """
    with ReplayCounter() as replayed:
        total, cpu, writer, session = bench.timed_start(pod)
    ended = time.time()
    marks = phase_times(session)
    bench.forget(session)
    if lines is not None and writer.lines != lines:
        raise RuntimeError(f"start delivered {writer.lines:,} lines of {lines:,}")
    built = marks[EventType.BUILD_COMPLETE]
    return total, {
        "build": built - marks[EventType.BUILD_STARTED],
        "run": ended - built,
        "cpu": cpu,
        "replayed": -1 if replayed.count is None else replayed.count,
    }


def streaming(bench: Bench) -> list[Result]:
    """Figure 1: ``Dispatcher.start`` of 200,000 lines against ``docker run > /dev/null``."""
    pod = bench.make_pod("stream", STREAM_LINES)
    ours, theirs = interleaved(
        bench.reps,
        lambda: _timed_start(bench, pod, STREAM_LINES),
        lambda: _time_cli(bench.cli_run(pod)),
    )
    totals = [t for t, _ in ours]
    runs = [m["run"] for _, m in ours]
    builds = [m["build"] for _, m in ours]
    cpus = [m["cpu"] for _, m in ours]
    cli_cpus = [c for _, c in theirs]
    theirs = [t for t, _ in theirs]
    base = median(theirs)
    total = median(totals)
    return [
        Result("1", f"Dispatcher.start, {STREAM_LINES:,} lines to a null writer (cached build "
               "+ run) vs docker run --rm --init > /dev/null", total, base, "s",
               "ratio <= 1.15", total / base <= 1.15,
               f"ours {_samples(totals, 's')}, docker run {_samples(theirs, 's')}; "
               f"of which build phase {fmt(median(builds), 's')}"),
        Result("1b", "its run phase (BUILD_COMPLETE event to start returning: create, "
               "stream, wait, remove) vs docker run", median(runs), base, "s",
               "(info)", None, f"ours {_samples(runs, 's')}"),
        Result("1c", "CPU time of the client: this Python process (all threads) vs the "
               "docker run CLI process", median(cpus), median(cli_cpus), "s", "(info)", None,
               f"ours {_samples(cpus, 's')}, docker run {_samples(cli_cpus, 's')}; "
               f"{median(cpus) / STREAM_LINES * 1e6:.2f} µs per line; events the consumer "
               f"re-read from the transcript after falling behind the in-memory window: "
               f"{[m['replayed'] for _, m in ours]} (-1: unknown)"),
    ]  # fmt: skip


def _first_line_ours(bench: Bench, pod: Pod) -> tuple[float, float]:
    started = time.perf_counter()
    session = bench.dispatcher.start_session(pod.name, ISSUE_URL)
    built = first = None
    for event in session.events():
        if event.type is EventType.BUILD_COMPLETE:
            built = time.perf_counter()
        elif event.type is EventType.OUTPUT:
            first = time.perf_counter()
            break
    session.wait(60)
    bench.forget(session)
    if first is None or built is None:
        raise RuntimeError("the session printed no line")
    return first - started, first - built


def _first_byte_cli(cmd: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.perf_counter() - started
    proc.communicate()
    return first


def first_line(bench: Bench) -> list[Result]:
    """Figure 2: start_session call to first OUTPUT event, against docker run's first byte."""
    pod = bench.make_pod("first", 1)
    ours, theirs = interleaved(
        bench.reps,
        lambda: _first_line_ours(bench, pod),
        lambda: _first_byte_cli(bench.cli_run(pod)),
    )
    full = [a for a, _ in ours]
    after_build = [b for _, b in ours]
    base = median(theirs)
    mine = median(full)
    overhead = mine - base
    return [
        Result("2", "first line: start_session called -> first OUTPUT event read from "
               "events() (includes preflight and cached build) vs docker run spawned -> "
               "first stdout byte", mine, base, "s", "ratio <= 1.5 and overhead < 50 ms",
               mine / base <= 1.5 and overhead < 0.05,
               f"overhead {fmt(overhead, 's')}; ours {_samples(full, 's')}, "
               f"docker run {_samples(theirs, 's')}"),
        Result("2b", "first line after the build: BUILD_COMPLETE event read -> first OUTPUT "
               "event read vs the same docker run", median(after_build), base, "s", "(info)",
               None, f"overhead {fmt(median(after_build) - base, 's')}; "
               f"ours {_samples(after_build, 's')}"),
    ]  # fmt: skip


def _memory_run(bench: Bench, pod: Pod, lines: int) -> dict[str, Any]:
    transcripts = bench.root / f"memory-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory_child", str(bench.pods_dir), str(transcripts),
         pod.name, ISSUE_URL],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    for path in transcripts.glob("*.jsonl"):
        path.unlink()
    if done.returncode != 0:
        raise RuntimeError(f"memory child failed: {done.stderr.strip()[-500:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    if data["lines"] != lines:
        raise RuntimeError(f"memory child got {data['lines']:,} lines of {lines:,}")
    return data


def memory(bench: Bench) -> list[Result]:
    """Figure 4: peak RSS of a process running one session, 2,000,000 vs 20,000 lines."""
    small_lines, large_lines = MEMORY_LINES
    small = bench.make_pod("memsmall", small_lines)
    large = bench.make_pod("memlarge", large_lines)
    smalls, larges = interleaved(
        bench.reps,
        lambda: _memory_run(bench, small, small_lines),
        lambda: _memory_run(bench, large, large_lines),
        warm_up=False,
    )
    mib = 1024.0
    peak_small = median([d["vmhwm_kib"] / mib for d in smalls])
    peak_large = median([d["vmhwm_kib"] / mib for d in larges])
    imports = median([d["rss_before_kib"] / mib for d in larges])
    seconds = median([d["seconds"] for d in larges])
    return [
        Result("4", f"peak RSS (VmHWM) of a process running Dispatcher.start of "
               f"{large_lines:,} lines vs {small_lines:,} lines", peak_large, peak_small,
               "MiB", "ratio < 1.2", peak_large / peak_small < 1.2,
               f"RSS after imports {imports:.1f} MiB; the {large_lines:,}-line run took "
               f"{fmt(seconds, 's')} "
               f"({large_lines / seconds:,.0f} lines/s)"),
    ]  # fmt: skip


def rebuild(bench: Bench) -> list[Result]:
    """Figure 5: a fully cached build through the library against ``docker build``."""
    pod = bench.make_pod("build")
    runner = bench.dispatcher.runner

    def ours() -> float:
        started = time.perf_counter()
        runner.build(pod.image, str(pod.dir), pod.config.build_args)
        return time.perf_counter() - started

    def theirs() -> float:
        # A tag of its own: retagging ours would drop the label that lets start skip the build.
        started = time.perf_counter()
        docker("build", "-t", f"{pod.image}-cli", str(pod.dir), env={"DOCKER_BUILDKIT": "0"})
        return time.perf_counter() - started

    direct, cli, in_start = interleaved(
        bench.reps, ours, theirs, lambda: _timed_start(bench, pod, 1)[1]["build"]
    )
    base = median(cli)
    mine = median(direct)
    return [
        Result("5", "rebuild of an unchanged pod: DockerRunner.build (which skips the engine "
               "when the pod is unchanged) vs DOCKER_BUILDKIT=0 docker build (same context, "
               "fully cached)", mine, base, "s",
               "ratio <= 1.2", mine / base <= 1.2,
               f"ours {_samples(direct, 's')}, docker build {_samples(cli, 's')}"),
        Result("5b", "the build phase inside start (BUILD_STARTED to BUILD_COMPLETE "
               "events) vs the same docker build", median(in_start), base, "s", "(info)",
               None, f"ours {_samples(in_start, 's')}"),
    ]  # fmt: skip


def _concurrent_ours(
    bench: Bench, pods: list[Pod], problems: list[str], replays: list[int]
) -> float:
    writers = [OrderedWriter() for _ in pods]
    failures: list[str] = []

    def one(pod: Pod, writer: OrderedWriter) -> None:
        try:
            bench.dispatcher.start(pod.name, ISSUE_URL, writer, raw=True)
        except Exception as exc:
            failures.append(f"{pod.name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=pw) for pw in zip(pods, writers, strict=True)]
    with ReplayCounter() as replayed:
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    replays.append(-1 if replayed.count is None else replayed.count)
    problems.extend(failures)
    for pod, writer in zip(pods, writers, strict=True):
        if writer.lines != CONCURRENT_LINES or writer.disorder:
            problems.append(f"{pod.name}: {writer.lines:,} lines, {writer.disorder} out of order")
        for session in bench.dispatcher.local_sessions(pod.name):
            why = check_transcript(session.transcript, CONCURRENT_LINES)
            if why:
                problems.append(why)
            bench.forget(session)
    return elapsed


def _concurrent_cli(bench: Bench, pods: list[Pod]) -> float:
    commands = [bench.cli_run(pod) for pod in pods]
    started = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for c in commands]  # fmt: skip
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"docker run exit codes {codes}")
    return elapsed


def concurrency(bench: Bench) -> list[Result]:
    """Figure 6: 8 pods at once from one process, every line checked, vs 8 docker runs."""
    pods = [bench.make_pod(f"conc{i}", CONCURRENT_LINES) for i in range(CONCURRENT_PODS)]
    problems: list[str] = []
    replays: list[int] = []
    ours, theirs = interleaved(
        bench.reps,
        lambda: _concurrent_ours(bench, pods, problems, replays),
        lambda: _concurrent_cli(bench, pods),
    )
    base = median(theirs)
    mine = median(ours)
    checked = (
        f"{'; '.join(problems[:5])}"
        if problems
        else f"every run: {CONCURRENT_PODS} x {CONCURRENT_LINES:,} lines complete and in "
        "order (writer and transcript)"
    )
    return [
        Result("6", f"{CONCURRENT_PODS} pods at once (threads calling Dispatcher.start, one "
               f"dispatcher), {CONCURRENT_LINES:,} lines each vs {CONCURRENT_PODS} parallel "
               "docker run", mine, base, "s", "ratio <= 1.3, all lines in order",
               mine / base <= 1.3 and not problems,
               f"{checked}; ours {_samples(ours, 's')}, docker run {_samples(theirs, 's')}; "
               f"events re-read from transcripts per run {replays[1:]} (-1: unknown)"),
    ]  # fmt: skip
