"""Run the benchmarks and print (or write as Markdown) the results table.

Usage: ``python -m bench [--quick] [--only 1,4] [--markdown FILE]`` from the repository
root (``python bench/run.py`` works too).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import figures
from bench.harness import Bench, Result, error_result, fmt, machine

Figure = Callable[[Bench], list[Result]]


def _message_budget(bench: Bench) -> list[Result]:
    from bench.notebook import message_budget

    return message_budget(bench)


def _fleet_kernel(bench: Bench) -> list[Result]:
    from bench.batches import fleet_kernel

    return fleet_kernel(bench)


def _batch_wall(bench: Bench) -> list[Result]:
    from bench.batches import batch_wall

    return batch_wall(bench)


def _rendered(bench: Bench) -> list[Result]:
    from bench.rendering import rendered

    return rendered(bench)


def _kernel_memory(bench: Bench) -> list[Result]:
    from bench.kernel import kernel_memory

    return kernel_memory(bench)


def _first_line_kernel(bench: Bench) -> list[Result]:
    from bench.kernel import first_line_kernel

    return first_line_kernel(bench)


def _changes(bench: Bench) -> list[Result]:
    from bench.changes import changes

    return changes(bench)


def _decision_latency(bench: Bench) -> list[Result]:
    from bench.interactive import decision_latency

    return decision_latency(bench)


def _interactive_streaming(bench: Bench) -> list[Result]:
    from bench.interactive import interactive_streaming

    return interactive_streaming(bench)


def _tls_streaming(bench: Bench) -> list[Result]:
    from bench.engines import tls_streaming

    return tls_streaming(bench)


def _swarm_streaming(bench: Bench) -> list[Result]:
    from bench.engines import swarm_streaming

    return swarm_streaming(bench)


FIGURES: dict[int, tuple[str, Figure]] = {
    1: ("streaming overhead", figures.streaming),
    2: ("time to first line", figures.first_line),
    3: ("notebook message budget", _message_budget),
    4: ("memory bound", figures.memory),
    5: ("rebuild cost", figures.rebuild),
    6: ("concurrency", figures.concurrency),
    7: ("a batch in a kernel: messages and CPU for 1, 10, 50 runs", _fleet_kernel),
    8: ("a batch's wall time", _batch_wall),
    9: ("streaming from a second dockerd over TLS", _tls_streaming),
    10: ("streaming from a one-node swarm", _swarm_streaming),
    11: ("rendered text: what a person sees, plain and stream-json", _rendered),
    12: ("kernel memory after a batch of 50 runs x 100,000 lines", _kernel_memory),
    13: ("first line in a cell: %cldpd_start in a real kernel", _first_line_kernel),
    14: ("a run's changes: capture and render of 1,000 files", _changes),
    15: ("an approval decided by a policy: the agent's question to its answer", _decision_latency),
    16: ("streaming from an interactive run (stdin attached)", _interactive_streaming),
}
HEADER = ("figure", "measure", "ours", "baseline", "ratio", "target", "result")


def _row(r: Result) -> tuple[str, ...]:
    ratio = r.ratio
    return (r.figure, r.name, fmt(r.ours, r.unit), fmt(r.baseline, r.unit),
            "-" if ratio is None else f"{ratio:.2f}", r.target, r.verdict)  # fmt: skip


def text_table(results: list[Result]) -> str:
    """The results as a plain-text table, followed by each row's note."""
    rows = [HEADER, *(_row(r) for r in results)]
    short = [(*row[:1], row[1][:60] + ("…" if len(row[1]) > 60 else ""), *row[2:])
             for row in rows]  # fmt: skip
    widths = [max(len(row[i]) for row in short) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in short]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines += [f"{r.figure}: {r.name}\n    {r.note}" for r in results if r.note]
    return "\n".join(lines)


def markdown(results: list[Result], about: dict[str, str], options: str) -> str:
    """The results as a Markdown document: machine, table, notes."""
    out = ["# cldpd_magic benchmarks", "", f"Run with `{options}`.", "",
           "| machine | |", "|---|---|"]  # fmt: skip
    out += [f"| {k} | {v} |" for k, v in about.items()]
    out += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in _row(r)) + " |" for r in results]
    out += ["", "Ratios are ours / baseline; each value is the median of the repetitions.", ""]
    out += [f"- **{r.figure}**: {r.note}" for r in results if r.note]
    return "\n".join(out) + "\n"


def _selection(text: str | None) -> list[int]:
    if not text:
        return list(FIGURES)
    try:
        chosen = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--only takes figure numbers like 1,4 (got {text!r})") from None
    unknown = [n for n in chosen if n not in FIGURES]
    if unknown:
        raise SystemExit(f"no figure {unknown[0]}; figures are {', '.join(map(str, FIGURES))}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    """Run the selected figures, print the table, optionally write it as Markdown.

    Returns:
        0, or 1 when a figure could not be measured or a container was left behind.
    """
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 5")
    parser.add_argument("--reps", type=int, help="repetitions per figure (overrides --quick)")
    parser.add_argument("--only", metavar="N,M", help="run only these figures (1-16)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    args = parser.parse_args(argv)
    chosen = _selection(args.only)
    reps = args.reps or (3 if args.quick else 5)
    about = machine()
    results: list[Result] = []
    failed = False
    for number in chosen:
        title, run = FIGURES[number]
        print(f"figure {number}: {title} ({reps} repetitions) ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        bench = Bench(reps)
        try:
            results += run(bench)
        except Exception as exc:
            failed = True
            results.append(error_result(str(number), title, exc))
        finally:
            leaked = bench.cleanup()
        if leaked:
            failed = True
            print(f"  left behind and removed: {', '.join(leaked)}", file=sys.stderr)
        print(f"  {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    about["load average (1, 5, 15 min) at end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(text_table(results))
    if args.markdown:
        options = " ".join(["python -m bench", *(["--reps", str(args.reps)] if args.reps else
                            ["--quick"] if args.quick else []),
                            *(["--only", args.only] if args.only else [])])  # fmt: skip
        Path(args.markdown).write_text(markdown(results, about, options), encoding="utf-8")
        print(f"written to {args.markdown}", file=sys.stderr)
    else:
        print("\n".join(f"{k}: {v}" for k, v in about.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
