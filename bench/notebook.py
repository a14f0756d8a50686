"""Figure 3: what a real kernel sends to the frontend while ``%cldpd_start`` streams.

The baseline is the same container run with ``!docker run ...`` in the same kernel:
IPython's shell escape, which forwards every byte to the frontend.
"""

from __future__ import annotations

import json
import shlex
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from jupyter_client.jsonutil import json_default

from tests.kernel_util import KernelSession, parent_id

from .harness import ISSUE_URL, Bench, Result, check_transcript, fmt, interleaved, median

NOTEBOOK_LINES = 200_000
BUDGET = 10.0
CELL_TIMEOUT = 900


@dataclass
class Tally:
    """What one cell sent on iopub.

    Attributes:
        messages: iopub messages from the request to its idle status, and any that
            followed until iopub went quiet.
        seconds: Request sent to idle status.
        size: Bytes of message content, JSON-encoded.
        types: Message count by type.
    """

    messages: int
    seconds: float
    size: int
    types: Counter[str]

    @property
    def rate(self) -> float:
        """Messages per second of cell time."""
        return self.messages / self.seconds


def _size(msg: dict[str, Any]) -> int:
    return len(json.dumps(msg["content"], default=json_default))


def run_cell(kernel: KernelSession, code: str) -> Tally:
    """Run a cell and count what iopub carries for it."""
    first = len(kernel.messages)
    started = time.perf_counter()
    msg_id = kernel.submit(code)
    kernel.wait(msg_id, timeout=CELL_TIMEOUT)
    seconds = time.perf_counter() - started
    kernel.drain(0.5)
    msgs = kernel.messages[first:]
    del kernel.messages[first:]
    foreign = [m for m in msgs if parent_id(m) not in (msg_id, "")]
    if foreign:
        raise RuntimeError(f"{len(foreign)} iopub messages of another request")
    return Tally(len(msgs), seconds, sum(map(_size, msgs)), Counter(m["msg_type"] for m in msgs))


def message_budget(bench: Bench) -> list[Result]:
    """Figure 3: iopub messages per second for ``%cldpd_start`` of 200,000 lines."""
    pod = bench.make_pod("notebook", NOTEBOOK_LINES)
    transcripts = bench.root / "kernel-sessions"
    problems: list[str] = []
    env = {"CLDPD_PODS_DIR": str(bench.pods_dir), "CLDPD_SESSIONS_DIR": str(transcripts)}
    with KernelSession(env=env, cwd=str(bench.root)) as kernel:
        kernel.execute(
            "%load_ext cldpd_magic\n"
            f"%config CldpdMagics.pods_dir = {str(bench.pods_dir)!r}\n"
            f"%config CldpdMagics.transcript_dir = {str(transcripts)!r}\n"
        )

        def ours() -> Tally:
            tally = run_cell(kernel, f"%cldpd_start {pod.name} {ISSUE_URL}")
            found = sorted(transcripts.glob(f"{pod.name}-*.jsonl"))
            if len(found) != 1:
                problems.append(f"{len(found)} transcripts for one start")
            for path in found:
                why = check_transcript(path, NOTEBOOK_LINES)
                if why:
                    problems.append(why)
                path.unlink()
            return tally

        def theirs() -> Tally:
            return run_cell(kernel, "!" + shlex.join(bench.cli_run(pod)))

        mine, base = interleaved(bench.reps, ours, theirs)
    rate = median([t.rate for t in mine])
    base_rate = median([t.rate for t in base])
    types = ", ".join(f"{k} {v}" for k, v in sorted(mine[-1].types.items()))
    checked = (
        "; ".join(problems[:3]) or f"every run: all {NOTEBOOK_LINES:,} lines in the transcript"
    )
    mb = 1e6
    return [
        Result("3", f"%cldpd_start of {NOTEBOOK_LINES:,} lines in a real kernel: iopub messages "
               "per second of cell time vs !docker run in the same kernel", rate, base_rate,
               "msg/s", f"<= {BUDGET:.0f} msg/s (absolute), all lines in the transcript",
               rate <= BUDGET and not problems,
               f"{checked}; messages per run {median([t.messages for t in mine]):.0f} "
               f"in {fmt(median([t.seconds for t in mine]), 's')} (last run: {types}); "
               f"!docker run: {median([t.messages for t in base]):.0f} messages in "
               f"{fmt(median([t.seconds for t in base]), 's')}"),
        Result("3b", "iopub content sent per run vs !docker run", median([t.size for t in mine])
               / mb, median([t.size for t in base]) / mb, "MB", "(info)", None),
    ]  # fmt: skip
