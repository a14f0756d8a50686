"""A batch in a real kernel: fifty runs send the frontend no more messages per second than one.

The runs are sessions whose agents print 100 lines a second in the kernel process (the
Docker side is the same for one run or fifty; what is measured here is what the cell
sends). ``%cldpd_start`` and ``%cldpd_batch`` run through their public entry points,
with the Dispatcher's ``start_session`` and ``dispatch`` replaced in the kernel.
"""

from __future__ import annotations

import time

import pytest
from kernel_util import KernelSession, Message, outputs, text_of

pytestmark = pytest.mark.kernel

URL = "https://github.com/octocat/Hello-World/issues/1"
SECONDS = 3

SETUP = """
%load_ext cldpd_magic
%config CldpdMagics.transcript_dir = {transcripts!r}
%config CldpdMagics.flush_interval = 0.1
import time
from cldpd_magic.runs import Dispatcher
from cldpd_magic.events import EventType
from cldpd_magic.runs import Session

def printer(name, seconds={seconds}):
    def job(ctl):
        ctl.emit(EventType.CONTAINER_STARTED, "cldpd-" + name)
        for i in range(seconds * 100):
            ctl.stdout.write(f"{{name}} line {{i}}\\n")
            time.sleep(0.01)
        return 0
    return Session(name, "cldpd-" + name, job, {transcripts!r})

class Fleet:
    def __init__(self, n):
        self.runs = [printer(f"run{{i}}") for i in range(n)]
    @property
    def done(self):
        return all(s.done for s in self.runs)
    def stop(self):
        for s in self.runs:
            s.stop(1)
    def results(self):
        return [{{"run": s.pod_name, "state": str(s.state)}} for s in self.runs]

Dispatcher.start_session = lambda self, pod, url: printer(pod)
Dispatcher.dispatch = lambda self, pods, issues, **kw: Fleet(kw["repeats"])
"""


def _updates(msgs: list[Message]) -> list[Message]:
    """What refreshes a live view: display updates and widget state changes."""
    return [
        m
        for m in msgs
        if m["msg_type"] == "update_display_data"
        or (m["msg_type"] == "comm_msg" and m["content"]["data"].get("method") == "update")
    ]


def _rate(ks: KernelSession, code: str) -> tuple[float, list[Message]]:
    first = len(ks.messages)
    started = time.monotonic()
    ks.execute(code, timeout=180)
    seconds = time.monotonic() - started
    ks.drain()
    msgs = ks.messages[first:]
    return len(_updates(msgs)) / seconds, msgs


def test_fifty_runs_send_no_more_messages_per_second_than_one(tmp_path):
    with KernelSession(cwd=str(tmp_path)) as ks:
        ks.execute(SETUP.format(transcripts=str(tmp_path / "sessions"), seconds=SECONDS))
        one, one_msgs = _rate(ks, f"%cldpd_start solo {URL}")
        fifty, fifty_msgs = _rate(ks, f"%cldpd_batch -p fleet --repeats 50 {URL}")
    assert one > 0 and fifty > 0
    print(f"update messages per second: one run {one:.1f}, fifty runs {fifty:.1f}")
    assert fifty <= one * 1.5 + 1, (one, fifty)
    # Every line stays in its run's view: none reaches the cell as a stream.
    streams = "".join(text_of(m) for m in outputs(fifty_msgs + one_msgs, ("stream",)))
    assert " line " not in streams
    tables = [str(m["content"]) for m in _updates(fifty_msgs) if "batch: " in str(m["content"])]
    assert "batch: 50 exited" in tables[-1]
