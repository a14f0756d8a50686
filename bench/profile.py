"""A profile of the hottest path: ``Dispatcher.start`` rendering a real container's
Claude Code stream-json as text (figure 11b), with cProfile in every thread of the
process (the session's reader, the run's worker, the caller's feed).

Usage: ``python -m bench.profile [--lines N] [--plain] [--top K]`` from the repository
root; it prints what ``pstats`` says, by own time and by cumulative time.
``bench/profiles/`` keeps what it printed, with what was changed because of it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .harness import ISSUE_URL, Bench, NullWriter, machine, run_with_bench
from .rendering import json_pod


@contextmanager
def every_thread() -> Iterator[Callable[[io.StringIO], pstats.Stats]]:
    """Profile this thread and every thread started meanwhile; yields a function that
    returns their merged statistics, printing to a stream."""
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_in_thread(*_: object) -> None:
        profile = cProfile.Profile()
        with lock:
            profiles.append(profile)
        profile.enable()  # replaces this hook in the new thread

    main = cProfile.Profile()
    profiles.append(main)
    threading.setprofile(start_in_thread)
    main.enable()
    try:
        yield lambda stream: pstats.Stats(*profiles, stream=stream)
    finally:
        main.disable()
        threading.setprofile(None)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """Profile one rendered ``Dispatcher.start`` and print the statistics."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--lines", type=int, default=100_000, help="lines the agent prints")
    parser.add_argument("--plain", action="store_true", help="plain lines, not stream-json")
    parser.add_argument("--top", type=int, default=30, help="functions listed per order")
    args = parser.parse_args(argv)

    def profile(bench: Bench) -> None:
        pod = (
            bench.make_pod("profile", args.lines)
            if args.plain
            else json_pod(bench, "profile", args.lines)
        )
        bench.dispatcher.start(pod.name, ISSUE_URL, NullWriter())  # warm: cached build
        bench.forget(bench.dispatcher.sessions[-1])
        cpu, wall = time.process_time(), time.perf_counter()
        with every_thread() as stats:
            bench.dispatcher.start(pod.name, ISSUE_URL, NullWriter())
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        bench.forget(bench.dispatcher.sessions[-1])
        kind = "plain lines" if args.plain else "lines of Claude Code stream-json"
        print(f"Dispatcher.start, rendered text, {args.lines:,} {kind}, under cProfile in "
              f"every thread: {wall:.2f} s wall, {cpu / args.lines * 1e6:.1f} µs of CPU a "
              "line (profiled: several times the unprofiled cost)")  # fmt: skip
        print("; ".join(f"{k}: {v}" for k, v in machine().items()))
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            stats(out).strip_dirs().sort_stats(order).print_stats(args.top)
            print(f"\n## by {order}\n")
            print(out.getvalue().strip())

    return run_with_bench(profile)


if __name__ == "__main__":
    raise SystemExit(main())
