"""Figures 7 and 8: batches. What a kernel spends on many runs at once, and a batch's wall time.

Figure 7 runs ``%cldpd_batch`` in a real kernel with 1, 10 and 50 runs of a pod printing
100 lines a second each, and counts what the kernel sends on iopub and the CPU time it
uses. Figure 8 runs 8 runs of 50,000 lines as one ``Dispatcher.dispatch`` batch against 8
parallel ``docker run``.
"""

from __future__ import annotations

import os
import threading
import time

from tests.kernel_util import KernelSession

from .figures import CONCURRENT_LINES, CONCURRENT_PODS, _concurrent_cli, _samples
from .harness import (
    ISSUE_URL,
    PADDING,
    Bench,
    Result,
    check_transcript,
    docker,
    interleaved,
    median,
)

FLEET_SIZES = (1, 10, 50)
#: How long each run prints: fifty runs take about five seconds to start, and figure 7d's
#: window (a second after the last started, STEADY_SECONDS long) must end before the first
#: run does, or it measures runs ending (their changes, their removal), not runs printing
#: (with 10 s, 44 of 50 were still running at the end of a window).
FLEET_SECONDS = 16
#: Prints ``BENCH_SECONDS`` seconds of 100 numbered lines a second, 10 every 0.1 s, with
#: the shell's own echo (one sleep a tick: fifty of these must not cost the machine much).
PACED_SCRIPT = f"""#!/bin/sh
tick=0
n=0
while [ "$tick" -lt "$((${{BENCH_SECONDS:-10}} * 10))" ]; do
    i=0
    while [ "$i" -lt 10 ]; do
        n=$((n + 1))
        echo "$n{PADDING}"
        i=$((i + 1))
    done
    tick=$((tick + 1))
    sleep 0.1
done
"""
CPU_TARGET = 0.10
#: Seconds over which figure 7d reads the kernel's CPU while every run prints.
STEADY_SECONDS = 4.0
CELL_TIMEOUT = 900


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _is_update(msg: dict) -> bool:
    return msg["msg_type"] == "update_display_data" or (
        msg["msg_type"] == "comm_msg" and msg["content"]["data"].get("method") == "update"
    )


def _running(pod: str) -> int:
    """How many containers of the pod run now (the docker CLI, not the kernel, asks)."""
    return len(docker("ps", "-q", "--filter", f"label=cldpd.pod={pod}").split())


def _steady_cpu(pid: int, pod: str, runs: int, found: dict[str, float]) -> None:
    """The kernel's CPU while all the runs print: from a second after the last one
    started, for STEADY_SECONDS (or until one ends); in ``found["steady"]``."""
    deadline = time.monotonic() + CELL_TIMEOUT
    while _running(pod) < runs:
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)
    time.sleep(1.0)
    cpu, began = _cpu_seconds(pid), time.perf_counter()
    while time.perf_counter() - began < STEADY_SECONDS and _running(pod) == runs:
        time.sleep(0.2)
    if time.perf_counter() - began >= STEADY_SECONDS / 2:
        found["steady"] = (_cpu_seconds(pid) - cpu) / (time.perf_counter() - began)


def _fleet_cell(kernel: KernelSession, pid: int, pod: str, runs: int) -> dict[str, float]:
    first = len(kernel.messages)
    steady: dict[str, float] = {}
    watcher = threading.Thread(target=_steady_cpu, args=(pid, pod, runs, steady), daemon=True)
    watcher.start()
    cpu = _cpu_seconds(pid)
    started = time.perf_counter()
    kernel.execute(
        f"batch = %cldpd_batch -p {pod} --repeats {runs} --max-parallel {runs} {ISSUE_URL}\n"
        "assert [r['state'] for r in batch.results()] == ['exited'] * len(batch.runs)",
        timeout=CELL_TIMEOUT,
    )
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds(pid) - cpu
    watcher.join(STEADY_SECONDS + 5)
    kernel.drain(0.5)
    msgs = kernel.messages[first:]
    del kernel.messages[first:]
    return {
        "seconds": seconds,
        "messages": len(msgs) / seconds,
        "updates": sum(map(_is_update, msgs)) / seconds,
        "cpu": cpu / seconds,
        "steady": steady.get("steady", float("nan")),
    }


def fleet_kernel(bench: Bench) -> list[Result]:
    """Figure 7: iopub messages per second and kernel CPU for 1, 10 and 50 runs at once."""
    pod = bench.make_pod("fleet", script=PACED_SCRIPT)
    (pod.dir / "pod.json").write_text(f'{{"env": {{"BENCH_SECONDS": "{FLEET_SECONDS}"}}}}')
    transcripts = bench.root / "kernel-sessions"
    env = {"CLDPD_PODS_DIR": str(bench.pods_dir), "CLDPD_SESSIONS_DIR": str(transcripts)}
    samples: dict[int, list[dict[str, float]]] = {n: [] for n in FLEET_SIZES}
    with KernelSession(env=env, cwd=str(bench.root)) as kernel:
        kernel.execute(
            "%load_ext cldpd_magic\n"
            f"%config CldpdMagics.pods_dir = {str(bench.pods_dir)!r}\n"
            f"%config CldpdMagics.transcript_dir = {str(transcripts)!r}\n"
        )
        pid = int(kernel.value("__import__('os').getpid()"))
        _fleet_cell(kernel, pid, pod.name, 1)  # warm-up: imports, widgets, the image check
        for _ in range(bench.reps):
            for runs in FLEET_SIZES:
                samples[runs].append(_fleet_cell(kernel, pid, pod.name, runs))
    lines = FLEET_SECONDS * 100
    problems = [
        why
        for path in sorted(transcripts.glob("*.jsonl"))
        if (why := check_transcript(path, lines))
    ]
    rows: list[Result] = []
    one = median([s["messages"] for s in samples[1]])
    for runs in FLEET_SIZES:
        rate = median([s["messages"] for s in samples[runs]])
        cpu = median([s["cpu"] for s in samples[runs]])
        cell = median([s["seconds"] for s in samples[runs]])
        note = (
            f"update messages {median([s['updates'] for s in samples[runs]]):.1f}/s; "
            f"kernel CPU {cpu:.0%} of one core; cell {cell:.1f} s; "
            f"msg/s samples {[round(s['messages'], 1) for s in samples[runs]]}"
        )
        if runs == FLEET_SIZES[-1]:
            note += "; " + ("; ".join(problems[:3]) or f"every run: all {lines:,} lines in order")
        rows.append(Result(
            f"7{'abc'[FLEET_SIZES.index(runs)]}",
            f"%cldpd_batch of {runs} run(s) printing 100 lines/s each for {FLEET_SECONDS} s in a "
            "real kernel: iopub messages per second of cell time vs 1 run",
            rate, one, "msg/s", "flat (ratio <= 1.25)", rate <= one * 1.25 and not problems,
            note,
        ))  # fmt: skip
    most = FLEET_SIZES[-1]
    steady = median([s["steady"] for s in samples[most]])
    cpu = median([s["cpu"] for s in samples[most]])
    rows.append(
        Result(
            "7d",
            f"kernel CPU following {most} runs of 100 lines/s, the batch view open (fraction "
            f"of one core, over {STEADY_SECONDS:.0f} s while every run prints)",
            steady * 100,
            None,
            "%",
            f"< {CPU_TARGET:.0%} of one core",
            steady < CPU_TARGET,
            f"samples {[round(s['steady'] * 100, 1) for s in samples[most]]} %; 1 run "
            f"{median([s['steady'] for s in samples[1]]):.1%}, 10 runs "
            f"{median([s['steady'] for s in samples[10]]):.1%}",
        )
    )
    rows.append(Result(
        "7e", f"kernel CPU over the whole cell of {most} runs (starting, following and "
        "removing their containers)", cpu * 100, None, "%", "(info)", None,
        f"1 run {median([s['cpu'] for s in samples[1]]):.0%}, 10 runs "
        f"{median([s['cpu'] for s in samples[10]]):.0%}",
    ))  # fmt: skip
    return rows


def _batch_ours(bench: Bench, pod_name: str, problems: list[str]) -> float:
    started = time.perf_counter()
    batch = bench.dispatcher.dispatch(
        pod_name, ISSUE_URL, repeats=CONCURRENT_PODS, max_parallel=CONCURRENT_PODS
    )
    batch.wait()
    elapsed = time.perf_counter() - started
    for session in batch.runs:
        if session.exit_code != 0:
            problems.append(f"{session.run}: exit {session.exit_code}")
        why = check_transcript(session.transcript, CONCURRENT_LINES)
        if why:
            problems.append(why)
        bench.forget(session)
    return elapsed


def batch_wall(bench: Bench) -> list[Result]:
    """Figure 8: 8 runs of 50,000 lines as one batch vs 8 parallel docker run."""
    pod = bench.make_pod("batch", CONCURRENT_LINES)
    problems: list[str] = []
    ours, theirs = interleaved(
        bench.reps,
        lambda: _batch_ours(bench, pod.name, problems),
        lambda: _concurrent_cli(bench, [pod] * CONCURRENT_PODS),
    )
    mine, base = median(ours), median(theirs)
    checked = "; ".join(problems[:5]) or (
        f"every run: {CONCURRENT_LINES:,} lines complete and in order in its transcript"
    )
    return [
        Result("8", f"Dispatcher.dispatch of one pod x {CONCURRENT_PODS} repeats at once "
               f"(max_parallel {CONCURRENT_PODS}), {CONCURRENT_LINES:,} lines each, call to "
               f"wait() returning vs {CONCURRENT_PODS} parallel docker run", mine, base, "s",
               "ratio <= 1.3, all lines in order", mine / base <= 1.3 and not problems,
               f"{checked}; ours {_samples(ours, 's')}, docker run {_samples(theirs, 's')}"),
    ]  # fmt: skip
