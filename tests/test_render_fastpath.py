"""Output lines shown at once: what a flood of plain text costs must not change what shows.

The text feed and the views check many output lines at once and take them as they are
when rendering each would give it back unchanged. These tests compare that with
rendering the lines one by one, over hostile and real input, and check that the check
says no where it must (a control that the check can fail).
"""

from __future__ import annotations

import io
import itertools
import json
import random
import threading
import time
from pathlib import Path

import pytest

from cldpd_magic.events import Event, EventType
from cldpd_magic.render import feeds
from cldpd_magic.render.clean import MAX_SHOWN_CHARS, clean_text, is_clean
from cldpd_magic.render.feeds import LiveFeed, TextFeed
from cldpd_magic.render.stream import Line, StreamRenderer
from cldpd_magic.render.views import RunLines, SessionView
from cldpd_magic.runs.session import OutputLines, Session
from cldpd_magic.secrets import Masker

FIXTURES = Path(__file__).parent / "fixtures" / "claude"
SECRET = "sk-ant-fast-path-secret"
REAL = [line for path in sorted(FIXTURES.glob("*.jsonl")) for line in path.read_text().splitlines()]
PIECES = [
    "plain words", "1 abcdefghijklmnopqrstuvwxyz", "", " ", "{", "}", "\t", "\xa0", "\u3000",
    "\x1b[31m", "\x1b]0;title\x07", "\x9b2J", "\x85", "\r", "\u202e", "\u2066", "\ud800",
    "é", "😀", "漢字", "&amp;", "\\u0041", '"quoted"', SECRET, SECRET[:6], "\\u0073k-ant",
    '{"type":"system","subtype":"init","model":"m"}', "x" * (MAX_SHOWN_CHARS - 10),
]  # fmt: skip


def random_lines(rng: random.Random) -> list[str]:
    """A few output lines: plain, hostile, real stream-json, long, secret-bearing."""
    lines = []
    for _ in range(rng.randint(1, 8)):
        if rng.random() < 0.15:
            lines.append(rng.choice(REAL))
        else:
            lines.append("".join(rng.choice(PIECES) for _ in range(rng.randint(0, 4))))
    return lines


def one_by_one(texts: list[str], mask: Masker) -> list[list[Line]]:
    renderer = StreamRenderer(mask)
    return [renderer.render(text) for text in texts]


@pytest.mark.parametrize("secret", ["", SECRET])
def test_lines_said_to_render_as_they_are_do(secret):
    rng = random.Random(f"as-is {secret}")
    mask = Masker([secret] if secret else [])
    renderer = StreamRenderer(mask)
    said = {True: 0, False: 0}
    for _ in range(3000):
        texts = random_lines(rng)
        as_is = renderer.renders_as_is(texts, "\n".join(texts))
        said[as_is] += 1
        if as_is:
            assert one_by_one(texts, mask) == [[Line("text", text)] for text in texts], texts
    assert said[True] > 100 and said[False] > 100  # it says either, as the lines require


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"system","subtype":"init"}',  # stream-json
        ' {"type":"system","subtype":"init"}',  # stream-json after a space
        '\xa0{"type":"system","subtype":"init"}',  # after white space beyond ASCII
        '\t{"type":"result","subtype":"success"}',  # stream-json after a tab
        "x" * (MAX_SHOWN_CHARS + 1),  # clipped
        "colour \x1b[31mred",
        "bidi \u202e",
        "surrogate \ud800",
        f"key {SECRET}",
    ],
)
def test_a_line_that_renders_otherwise_is_never_taken_as_it_is(text):
    renderer = StreamRenderer(Masker([SECRET]))
    texts = ["plain before", text, "plain after"]
    assert not renderer.renders_as_is(texts, "\n".join(texts))


def test_is_clean_is_what_clean_text_leaves_alone():
    rng = random.Random("clean")
    for _ in range(5000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 5)))
        assert is_clean(text) == (clean_text(text) == text), repr(text)
    assert all(is_clean(chr(c)) == (clean_text(chr(c)) == chr(c)) for c in range(0x3000))


def _events(rng: random.Random) -> list[Event]:
    """A batch as a session gives it: runs of output lines between other events."""
    events: list[Event] = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.6:
            events += [Event(EventType.OUTPUT, text) for text in random_lines(rng)]
        elif kind < 0.75:
            events.append(Event(EventType.STDERR, rng.choice(PIECES)))
        elif kind < 0.85:
            events.append(Event(EventType.BUILD_OUTPUT, "Step 1/2 : FROM busybox"))
        else:
            events.append(Event(EventType.CONTAINER_STARTED, "cldpd-pod"))
    return events


class _FakeSession:
    def __init__(self, mask: Masker, batches: list[list[Event]]) -> None:
        self.mask = mask
        self.kind = "start"
        self._batches = batches

    def event_batches(self):
        return iter(self._batches)

    line_batches = event_batches  # a session may give every line as an Event


class _LinesSession(_FakeSession):
    """A session giving output and stderr lines of one type in a row as one OutputLines."""

    def line_batches(self):
        for batch in self._batches:
            items: list = []
            for etype, run in itertools.groupby(batch, lambda e: e.type):
                group = list(run)
                if etype in (EventType.OUTPUT, EventType.STDERR):
                    items.append(OutputLines(etype, [e.data for e in group], group[0].time))
                else:
                    items += group
            yield items


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("session_type", [_FakeSession, _LinesSession])
def test_the_text_feed_writes_what_rendering_each_event_writes(raw, session_type, monkeypatch):
    monkeypatch.setattr(feeds, "FOLLOW_PACE", 0.0)  # what is written, not when
    rng = random.Random(f"text feed {raw}")
    mask = Masker([SECRET])
    for _ in range(300):
        batches = [_events(rng) for _ in range(rng.randint(1, 4))]
        out, err = io.StringIO(), io.StringIO()
        TextFeed(session_type(mask, batches), out, err, raw=raw).follow()
        model = RunLines(mask, "start")
        want_out = want_err = ""
        for batch in batches:  # one write per stream and batch, as the feed does
            shown, noted = [], []
            for event in batch:
                if raw and event.type in (EventType.OUTPUT, EventType.STDERR):
                    (shown if event.type is EventType.OUTPUT else noted).append(event.data)
                    continue
                for line in model.lines(event):
                    if line.kind != "build_log":
                        note = line.kind in ("stderr", "status", "build")
                        (noted if note else shown).append(line.text)
            want_out += "\n".join(shown) + "\n" if shown else ""
            want_err += "\n".join(noted) + "\n" if noted else ""
        assert out.getvalue() == want_out
        assert err.getvalue() == want_err


def test_a_view_takes_a_batch_as_it_takes_each_event():
    rng = random.Random("view")
    mask = Masker([SECRET])
    for _ in range(300):
        events = [e for _ in range(rng.randint(1, 3)) for e in _events(rng)]
        events += [Event(EventType.OUTPUT, f"{n} plain") for n in range(rng.randint(0, 30))]
        batched = SessionView("pod", max_lines=rng.randint(1, 12), masker=mask)
        single = SessionView("pod", max_lines=batched.max_lines, masker=mask)
        batched.add_events(events)
        for event in events:
            single.add(event)
        assert batched.text() == single.text()
        assert batched.body_html() == single.body_html()
        assert (batched.elided, batched.total_lines) == (single.elided, single.total_lines)


def _first_line_shown(tmp_path, build_first: bool) -> int:
    """Follow a run printing one line with a feed whose interval (120 s) is far longer
    than the wait for that line: only a publication made as the line comes shows it in
    time. ``build_first``: the build's note comes, and is published, half a second
    before. Returns how many publications the feed had made by then."""
    shown = threading.Event()
    release = threading.Event()

    def job(ctl) -> int:
        if build_first:
            ctl.emit(EventType.BUILD_STARTED, "img")
            time.sleep(0.5)
        ctl.emit(EventType.CONTAINER_STARTED, "c")
        ctl.stdout.write("the first line\n")
        release.wait(60)
        return 0

    def publish(view: SessionView) -> None:
        if "the first line" in view.text():
            shown.set()

    session = Session("pod", "c", job, tmp_path)
    feed = LiveFeed(session, SessionView("pod"), publish, interval=120)
    try:
        assert shown.wait(30)
        return feed.publications
    finally:
        release.set()
        session.wait(30)
        feed.join(150)


def test_a_feed_shows_the_first_line_without_waiting_for_its_interval(tmp_path):
    assert _first_line_shown(tmp_path, build_first=False) >= 1


def test_the_agents_first_line_shows_as_it_comes_after_the_build_was_shown(tmp_path):
    """The build's note is published at once; the agent's first line, a moment later,
    does not wait out the interval that publication began."""
    assert _first_line_shown(tmp_path, build_first=True) >= 2


def test_a_text_feed_takes_a_flood_in_fewer_larger_batches(monkeypatch):
    # A batch that comes right after the last one means a flood: the feed waits a moment
    # before the next (so it wakes less), never after a batch that came on its own, nor
    # while it reads the transcript back (in batches of many events).
    clock = [100.0]
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(feeds, "time", type("Clock", (), {
        "monotonic": staticmethod(lambda: clock[0]), "sleep": staticmethod(nap)}))  # fmt: skip

    class Paced(_FakeSession):
        def line_batches(self):
            for gap, batch in self._batches:
                clock[0] += gap
                yield batch

    line = [Event(EventType.OUTPUT, "a line")]
    flood = [(0.0, line), (0.001, line), (0.001, line)]
    read_back = [(0.001, line * feeds.FOLLOW_PACE_ITEMS)]  # a feed behind: never paced
    trickle = [(1.0, line), (0.5, line)]
    out = io.StringIO()
    TextFeed(Paced(Masker([]), flood + read_back + trickle), out).follow()
    assert out.getvalue() == "a line\n" * (5 + feeds.FOLLOW_PACE_ITEMS)
    assert naps == [feeds.FOLLOW_PACE, feeds.FOLLOW_PACE]  # after the 2nd and 3rd batches


def test_real_output_reads_the_same_through_a_batch():
    mask = Masker([SECRET])
    events = [Event(EventType.OUTPUT, line) for line in REAL]
    events += [Event(EventType.OUTPUT, json.dumps({"n": n})) for n in range(3)]
    out = io.StringIO()
    TextFeed(_FakeSession(mask, [events]), out).follow()
    renderer = StreamRenderer(mask)
    expected = [line.text for event in events for line in renderer.render(event.data)]
    assert out.getvalue() == "\n".join(expected) + "\n"
