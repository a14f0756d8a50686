"""Where a process following a batch spends its CPU, by thread: figure 7d's path.

A batch of ``--runs`` runs of a pod printing 100 lines a second each (figure 7's pod),
followed by a :class:`~cldpd_magic.render.BatchFeed` that builds the view's bundle at each
publication, as a cell's display does, in this process (no kernel: its own threads would
blur the picture). Over 4 s while every run prints, it reads the process's CPU and each
thread's (``/proc/self/task``; Linux's per-thread accounting, in clock ticks, undercounts
short bursts), summed by thread name.

Usage: ``python -m bench.fleet_threads [--runs 50] [--reps 3]`` from the repository
root. ``bench/profiles/fleet-threads.txt`` keeps what it printed, with what was changed
because of it.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections import Counter

from cldpd_magic.render import BatchFeed, BatchView

from .batches import FLEET_SECONDS, PACED_SCRIPT, STEADY_SECONDS, _running
from .harness import ISSUE_URL, Bench, machine, run_with_bench

_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> Counter[str]:
    """CPU seconds of this process's threads so far, by thread name (runs' workers as one)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    cpu: Counter[str] = Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        name = names.get(int(tid), "(not Python's)")
        if name.startswith("cldpd-bench-"):  # a session's worker, named after its run
            name = "the runs' workers"
        cpu[name] += (int(fields[11]) + int(fields[12])) / _TICKS
    return cpu


def main(argv: list[str] | None = None) -> int:
    """Follow a batch's runs and print the process's CPU while they all print, by thread."""
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_threads", description=__doc__)
    parser.add_argument("--runs", type=int, default=50, help="runs in the batch")
    parser.add_argument("--reps", type=int, default=3, help="batches, one after another")
    args = parser.parse_args(argv)

    def follow(bench: Bench) -> None:
        pod = bench.make_pod("fleet-threads", script=PACED_SCRIPT)
        (pod.dir / "pod.json").write_text(f'{{"env": {{"BENCH_SECONDS": "{FLEET_SECONDS}"}}}}')
        print(f"{args.runs} runs x 100 lines/s followed by a BatchFeed in one process; CPU over "
              f"{STEADY_SECONDS:.0f} s while every run prints, % of one core")  # fmt: skip
        print("; ".join(f"{k}: {v}" for k, v in machine().items()))
        for _ in range(args.reps):
            batch = bench.dispatcher.dispatch(
                pod.name, ISSUE_URL, repeats=args.runs, max_parallel=args.runs
            )
            feed = BatchFeed(batch, BatchView(), lambda view: view.bundle())
            while _running(pod.name) < args.runs:
                time.sleep(0.1)
            time.sleep(1.0)
            threads, cpu, began = thread_cpu(), time.process_time(), time.monotonic()
            time.sleep(STEADY_SECONDS)
            seconds = time.monotonic() - began
            cpu = (time.process_time() - cpu) / seconds
            spent = thread_cpu() - threads
            batch.wait()
            feed.join(30)
            by_thread = ", ".join(
                f"{name} {value / seconds * 100:.1f}" for name, value in spent.most_common()
            )
            print(f"process {cpu * 100:.1f}%; by thread: {by_thread or '(none counted)'}")
            for session in batch.runs:
                bench.forget(session)

    return run_with_bench(follow)


if __name__ == "__main__":
    raise SystemExit(main())
