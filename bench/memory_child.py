"""Run one session in this fresh process and print its peak memory as JSON (figure 4).

Usage: ``python -m bench.memory_child PODS_DIR TRANSCRIPT_DIR POD ISSUE_URL``.
"""

from __future__ import annotations

import json
import sys
import time

from cldpd_magic import Dispatcher

from .harness import NullWriter


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def main(argv: list[str]) -> int:
    """Run ``Dispatcher.start`` into a null writer, then print lines, time and memory.

    Peak memory is VmHWM, not ``getrusage().ru_maxrss``: the latter survives execve, so
    in a child it starts at the parent's peak.
    """
    pods_dir, transcripts, pod, url = argv
    dispatcher = Dispatcher(pods_dir, transcript_dir=transcripts)
    before = _status_kib("VmRSS")
    writer = NullWriter()
    started = time.perf_counter()
    code = dispatcher.start(pod, url, writer, check=False, raw=True)
    result = {
        "code": code,
        "lines": writer.lines,
        "seconds": time.perf_counter() - started,
        "rss_before_kib": before,
        "vmhwm_kib": _status_kib("VmHWM"),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
