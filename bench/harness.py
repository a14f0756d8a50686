"""What every figure shares: bench pods, the docker CLI baseline, results and cleanup."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cldpd_magic import Dispatcher, EventType, Pod, Session
from cldpd_magic.events import Event
from cldpd_magic.runs import session as session_module
from cldpd_magic.runs.agent import agent_command, build_prompt

BASE_IMAGE = "busybox:latest"
ISSUE_URL = "https://github.com/o/r/issues/1"
#: Each output line is ``<n><PADDING>``: about 90 bytes, a plain-text line of an agent.
PADDING = " abcdefghijklmnopqrstuvwxyz" * 3
AGENT_SCRIPT = f"""#!/bin/sh
seq 1 "${{BENCH_LINES:-1}}" | sed 's/$/{PADDING}/'
"""
DOCKERFILE = f"""FROM {BASE_IMAGE}
COPY claude /usr/local/bin/claude
RUN chmod +x /usr/local/bin/claude
"""


def median(values: Sequence[float]) -> float:
    """The median of the samples."""
    return statistics.median(values)


@dataclass
class Result:
    """One row of the results table.

    Attributes:
        figure: Figure number and sub-letter, e.g. ``1`` or ``1b``.
        name: What is measured.
        ours: Median for cldpd_magic.
        baseline: Median of the baseline, None when the target is absolute.
        unit: ``s``, ``MiB``, ``msg/s``, ``MB`` or ``msg``.
        target: The target, as text.
        passed: Whether the target is met; None for an informational row.
        note: Details (samples, counts, what the baseline is).
    """

    figure: str
    name: str
    ours: float
    baseline: float | None
    unit: str
    target: str
    passed: bool | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """``ours / baseline``, None without a baseline."""
        if self.baseline is None or self.baseline == 0:
            return None
        return self.ours / self.baseline

    @property
    def verdict(self) -> str:
        """``pass``, ``MISS`` or ``info``."""
        if self.passed is None:
            return "info"
        return "pass" if self.passed else "MISS"


def fmt(value: float | None, unit: str) -> str:
    """Format a measured value with its unit."""
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "µs":
        return f"{value:.2f} µs"
    if unit in ("msg", "lines"):
        return f"{value:,.0f} {unit}"
    return f"{value:,.1f} {unit}"


def error_result(figure: str, name: str, exc: BaseException) -> Result:
    """A row for a figure that could not be measured."""
    return Result(figure, name, float("nan"), None, "", "-", False,
                  f"error: {type(exc).__name__}: {exc}")  # fmt: skip


class NullWriter:
    """A writer that drops its text and counts its lines (``start`` may write many at once)."""

    def __init__(self) -> None:
        self.lines = 0

    def write(self, text: str) -> None:
        """Count the lines in a piece of text."""
        self.lines += text.count("\n")


class OrderedWriter(NullWriter):
    """A writer that checks that bench lines come complete and in order: 1, 2, 3, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.disorder = 0

    def write(self, text: str) -> None:
        """Check each line's number and shape."""
        for line in text.splitlines():
            self.lines += 1
            if line != f"{self.lines}{PADDING}":
                self.disorder += 1


def check_transcript(path: Path, lines: int) -> str:
    """Return "" when the transcript holds exactly ``lines`` bench lines in order, else why not."""
    count = 0
    with open(path, encoding="utf-8") as f:
        for raw in f:
            event = Event.from_json(raw)
            if event.type is not EventType.OUTPUT:
                continue
            count += 1
            if event.data != f"{count}{PADDING}":
                return f"{path.name}: line {count} is {event.data[:40]!r}"
    if count != lines:
        return f"{path.name}: {count:,} output lines, expected {lines:,}"
    return ""


def phase_times(session: Session) -> dict[EventType, float]:
    """Wall-clock times (epoch seconds) of the first event of each type, from the transcript."""
    wanted = {EventType.BUILD_STARTED, EventType.BUILD_COMPLETE, EventType.CONTAINER_STARTED}
    found: dict[EventType, float] = {}
    with open(session.transcript, encoding="utf-8") as f:
        for raw in f:
            event = Event.from_json(raw)
            if event.type in wanted and event.type not in found:
                found[event.type] = event.time.timestamp()
            if len(found) == len(wanted):
                break
    return found


class ReplayCounter:
    """Counts events a consumer re-read from the transcript after falling behind.

    A session keeps a bounded window of events in memory; a consumer slower than the
    agent falls out of it and re-reads events from the transcript, which costs more CPU
    per event. This wraps the session's transcript reader (a private helper: when it is
    gone, ``count`` stays None) for the duration of a ``with`` block.
    """

    def __init__(self) -> None:
        self.count: int | None = None
        self._lock = threading.Lock()
        self._reader: Any = getattr(session_module, "_TranscriptReader", None)
        self._read: Any = None

    def __enter__(self) -> ReplayCounter:
        reader = self._reader
        if reader is None or not hasattr(reader, "read"):
            return self
        self.count = 0
        self._read = original = reader.read

        def read(inner: Any, start: int, stop: int) -> list[Event]:
            events = original(inner, start, stop)
            with self._lock:
                self.count = (self.count or 0) + len(events)
            return events

        reader.read = read
        return self

    def __exit__(self, *exc: object) -> None:
        if self._read is not None:
            self._reader.read = self._read


def interleaved(reps: int, *runs: Callable[[], Any], warm_up: bool = True) -> list[list[Any]]:
    """Run each function once as a warm-up, then ``reps`` rounds of all of them in turn.

    Alternating spreads the noise of a shared machine evenly over ours and the baseline.

    Returns:
        For each function, its results of the timed rounds.
    """
    if warm_up:
        for run in runs:
            run()
    results: list[list[Any]] = [[] for _ in runs]
    for _ in range(reps):
        for run, out in zip(runs, results, strict=True):
            out.append(run())
    return results


def docker(*args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run the docker CLI and return its stdout."""
    done = subprocess.run(["docker", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})  # fmt: skip
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Bench:
    """One benchmark run: a temporary pods directory, a dispatcher and what to clean up.

    Attributes:
        reps: Timed repetitions per figure.
        run_id: Hex id shared by every pod, container and image of this run.
        root: Temporary directory holding pods and transcripts.
    """

    reps: int
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cldpd-bench-")))

    def __post_init__(self) -> None:
        self.pods_dir = self.root / "pods"
        self.transcripts = self.root / "sessions"
        self.pods_dir.mkdir()
        self.dispatcher = Dispatcher(self.pods_dir, transcript_dir=self.transcripts)
        self._cli_count = 0

    @property
    def prefix(self) -> str:
        """Prefix of this run's pod names."""
        return f"bench-{self.run_id}"

    def make_pod(
        self,
        tag: str,
        lines: int | None = None,
        build: bool = True,
        script: str = AGENT_SCRIPT,
        files: dict[str, str] | None = None,
    ) -> Pod:
        """Write a bench pod printing ``lines`` lines (pod.json env) and build its image.

        Args:
            tag: Distinguishes the pod within the run.
            lines: BENCH_LINES in pod.json; None writes no pod.json (one line).
            build: Build the image now, so that figures time cached builds only.
            script: The pod's ``claude`` (a busybox sh script).
            files: More files for the image, by name: each is copied to ``/bench/NAME``.
        """
        name = f"{self.prefix}-{tag}"
        directory = self.pods_dir / name
        directory.mkdir()
        dockerfile = DOCKERFILE
        for file_name, text in (files or {}).items():
            (directory / file_name).write_text(text)
            dockerfile += f"COPY {file_name} /bench/{file_name}\n"
        (directory / "Dockerfile").write_text(dockerfile)
        (directory / "claude").write_text(script)
        if lines is not None:
            (directory / "pod.json").write_text(json.dumps({"env": {"BENCH_LINES": str(lines)}}))
        pod = self.dispatcher.pod(name)
        if build:
            self.dispatcher.runner.build(pod.image, str(pod.dir), pod.config.build_args)
        return pod

    def cli_run(self, pod: Pod, *docker_args: str) -> list[str]:
        """The ``docker run`` command line equivalent to the pod's start.

        Same image, same agent command, same environment, tini as init (``init=True``
        in the library); the container is named after the run, so cleanup finds it.
        """
        self._cli_count += 1
        env = [a for k, v in pod.config.env.items() for a in ("-e", f"{k}={v}")]
        cmd = agent_command(pod, build_prompt(pod.template, ISSUE_URL),
                            session_uuid=str(uuid.uuid4()), resume=False)  # fmt: skip
        return ["docker", "run", "--rm", "--init", "--name",
                f"cldpd-{self.prefix}-cli{self._cli_count}", *env, *docker_args,
                pod.image, *cmd]  # fmt: skip

    def timed_start(self, pod: Pod, raw: bool = True) -> tuple[float, float, NullWriter, Session]:
        """``Dispatcher.start`` of a pod into a :class:`NullWriter`: its wall seconds, the
        CPU seconds of this process (all threads), the writer and the run's session (to
        check, then :meth:`forget`)."""
        writer = NullWriter()
        cpu = time.process_time()
        started = time.perf_counter()
        self.dispatcher.start(pod.name, ISSUE_URL, writer, raw=raw)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
        return wall, cpu, writer, self.dispatcher.sessions[-1]

    def forget(self, session: Session) -> None:
        """Drop an ended session from the dispatcher and delete its transcript."""
        with contextlib.suppress(ValueError):
            self.dispatcher.sessions.remove(session)
        session.transcript.unlink(missing_ok=True)

    def cleanup(self) -> list[str]:
        """Stop live sessions, remove this run's containers, images and files.

        Returns:
            Names of containers that were still there (a leak, if any).
        """
        for session in self.dispatcher.local_sessions(active=True):
            with contextlib.suppress(Exception):
                session.stop(5)
        leaked = docker("ps", "-a", "--format", "{{.Names}}",
                        "--filter", f"name=cldpd-{self.prefix}").split()  # fmt: skip
        if leaked:
            docker("rm", "-f", *leaked, check=False)
        images = docker("images", "--format", "{{.Repository}}",
                        "--filter", f"reference=cldpd-{self.prefix}*").split()  # fmt: skip
        if images:
            docker("rmi", "-f", *sorted(set(images)), check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        return leaked


def run_with_bench(body: Callable[[Bench], object], reps: int = 1) -> int:
    """Run ``body`` with a :class:`Bench` and clean up after it, as a tool's ``main``
    does: its exit code, 1 if the run left containers behind (they are removed)."""
    bench = Bench(reps)
    try:
        body(bench)
    finally:
        leaked = bench.cleanup()
    if leaked:
        print(f"left behind and removed: {', '.join(leaked)}", file=sys.stderr)
        return 1
    return 0


def _meminfo_total() -> str:
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def machine() -> dict[str, str]:
    """Describe the machine: cores, memory, kernel, Docker, Python, date, load."""
    try:
        versions = docker("version", "--format", "{{.Server.Version}} {{.Client.Version}}").split()
        docker_version = f"engine {versions[0]}, CLI {versions[1]}"
    except (RuntimeError, IndexError, OSError) as exc:
        docker_version = f"unknown ({exc})"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "cores": str(os.cpu_count()),
        "memory": _meminfo_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "docker": docker_version,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load average (1, 5, 15 min) at start": load,
    }
