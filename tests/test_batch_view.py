"""A batch as a live table: a row per run, the selected run's tail, updates batched."""

from __future__ import annotations

import contextvars
import json
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from html_safety import PAYLOADS, html_problems

from cldpd_magic.events import EventType
from cldpd_magic.render.feeds import BatchFeed
from cldpd_magic.render.tables import _TABLE_CSS, BatchView
from cldpd_magic.render.views import _CSS
from cldpd_magic.runs.session import Session


class _Usage(NamedTuple):
    turns: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_creation_tokens: int
    cost_usd: float


class _CostedSession(Session):
    """A session whose usage is given (the renderer only reads ``run`` and ``usage``)."""

    given_usage: _Usage | None = None

    @property
    def usage(self) -> _Usage | None:  # type: ignore[override]
        return self.given_usage


class FakeBatch:
    """What a BatchFeed follows: runs (added while it runs) and done."""

    def __init__(self, runs: list[Session] | None = None) -> None:
        self.runs = list(runs or [])
        self.closed = True

    @property
    def done(self) -> bool:
        return self.closed and all(s.done for s in self.runs)


def _tool(name: str, **args: Any) -> str:
    block = {"type": "tool_use", "name": name, "input": args}
    return json.dumps({"type": "assistant", "message": {"content": [block]}})


def _session(tmp_path, pod: str, lines: list[str], code: int = 0, **kwargs: Any) -> Session:
    def job(ctl) -> int:
        ctl.emit(EventType.CONTAINER_STARTED, f"cldpd-{pod}")
        ctl.stdout.write("".join(line + "\n" for line in lines))
        return code

    return _CostedSession(pod, f"cldpd-{pod}", job, tmp_path, **kwargs)


def _fed(tmp_path, sessions: list[Session], interval: float = 0.02) -> tuple[BatchView, list]:
    view = BatchView("batch")
    published: list[str] = []
    feed = BatchFeed(FakeBatch(sessions), view, lambda v: published.append(v.text()), interval)
    assert feed.join(60)
    assert feed.error is None
    return view, published


def test_a_row_per_run_with_state_elapsed_turns_cost_and_last_tool_call(tmp_path):
    ok = _session(tmp_path, "ok", [_tool("Read", file_path="a.py"), _tool("Bash", command="ls")])
    ok.given_usage = _Usage(3, 100, 20, 0, 0, 0.0123)
    bad = _session(tmp_path, "bad", ["plain text only"], code=2)
    view, published = _fed(tmp_path, [ok, bad])
    table = view.table()
    assert table.columns == ("run", "pod", "state", "elapsed", "turns", "cost", "last tool call")
    (first, second) = table.records()
    assert first["run"] == "▶ ok" and first["state"] == "exited" and first["turns"] == "3"
    assert first["cost"] == "$0.0123" and first["last tool call"] == "Bash: ls"
    assert first["elapsed"].endswith("s")
    assert second["run"] == "bad" and second["state"] == "exited 2"
    assert second["turns"] == second["cost"] == "-" and second["last tool call"] == ""
    assert table.title == "batch: 2 exited · 3 turns · $0.0123"
    assert view.run_names() == ["ok", "bad"]
    assert published[-1] == view.text()


def test_the_selected_runs_output_shows_under_the_table_and_no_other(tmp_path):
    runs = [_session(tmp_path, f"r{i}", [f"only-in-r{i}"]) for i in range(3)]
    view, _ = _fed(tmp_path, runs)
    assert "only-in-r0" in view.text() and "only-in-r1" not in view.text()
    view.select("r1")
    text, markup = view.text(), view.html()
    assert "── r1 ──" in text and "only-in-r1" in text
    assert "only-in-r0" not in text + markup and "only-in-r2" not in text + markup
    assert "▶ r1" in text
    view.select("")
    assert "only-in-r" not in view.text()


def test_fifty_runs_publish_no_more_often_than_one_and_keep_their_own_lines(tmp_path):
    runs = [
        _session(tmp_path, f"run{i}", [f"run{i} line {n}" for n in range(2000)]) for i in range(50)
    ]
    began = time.monotonic()
    view, published = _fed(tmp_path, runs, interval=0.05)
    wall = time.monotonic() - began
    assert len(published) <= wall / 0.05 + 3
    for i, row in enumerate(view.rows()):
        assert row.total_lines == 2000
        assert bool(row.tail) is (i == 0)  # only the selected run's output is rendered
        view.select(f"run{i}")  # the others are rendered from their raw tail once chosen
        shown = [line.text for line in row.tail]
        assert shown[-1] == f"run{i} line 1999" and len(shown) == row.max_lines
        assert all(text.startswith(f"run{i} ") for text in shown)
        assert (row.total_lines, row.elided) == (2000, 2000 - row.max_lines)
    assert view.summary().startswith("batch: 50 exited")


def test_a_run_not_shown_is_rendered_when_chosen_as_if_it_had_been_all_along(tmp_path):
    fixture = Path(__file__).parent / "fixtures" / "claude" / "success_with_tools.jsonl"
    lines = [*fixture.read_text().splitlines(), "plain \x1b[31mred", _tool("Grep", pattern="x")]
    shown_all_along = _session(tmp_path, "first", lines)
    chosen_later = _session(tmp_path, "second", lines)
    view, _ = _fed(tmp_path, [shown_all_along, chosen_later])
    first, second = view.rows()
    assert not second.tail and second.total_lines == len(lines)  # counted, not rendered
    assert second.last_tool == first.last_tool == "Grep: x"  # noted without rendering
    view.select("second")
    assert [line.text for line in second.tail] == [line.text for line in first.tail]
    assert second.body_html() == first.body_html()
    assert "── second ──" in view.text() and "Grep: x" in view.text()


def test_runs_that_join_a_running_batch_are_followed(tmp_path):
    release = threading.Event()

    def slow(ctl) -> int:
        ctl.emit(EventType.CONTAINER_STARTED, "c")
        release.wait(30)
        ctl.stdout.write("first done\n")
        return 0

    batch = FakeBatch([Session("first", "c", slow, tmp_path)])
    batch.closed = False
    view = BatchView("batch")
    feed = BatchFeed(batch, view, lambda v: None, 0.02)
    while not view.rows():
        time.sleep(0.01)
    batch.runs.append(_session(tmp_path, "queued", ["queued ran"]))
    batch.closed = True
    release.set()
    assert feed.join(30)
    assert view.run_names() == ["first", "queued"]
    assert [str(row.state) for row in view.rows()] == ["exited", "exited"]
    view.select("queued")
    assert "queued ran" in view.text()


def test_publications_stay_in_the_creating_context_and_survive_a_failing_frontend(tmp_path):
    var: contextvars.ContextVar[str] = contextvars.ContextVar("cell", default="none")
    var.set("cell-1")
    seen = set()

    def publish(_view: BatchView) -> None:
        seen.add(var.get())
        raise RuntimeError("frontend gone")

    feed = BatchFeed(FakeBatch([_session(tmp_path, "a", ["x"])]), BatchView(), publish, 0.02)
    var.set("cell-2")
    assert feed.join(30)
    assert seen == {"cell-1"}
    assert isinstance(feed.error, RuntimeError) and feed.publications == 0


def test_hostile_output_and_secrets_never_reach_the_table_or_the_tail(tmp_path):
    secret = "s3cr3t-batch-value"
    for payload in PAYLOADS[:12]:
        lines = [_tool("Bash", command=f"{payload} {secret}"), f"{payload} \x1b[2J{secret}"]
        session = _session(tmp_path, "evil", lines, secrets=[secret])
        view, _ = _fed(tmp_path, [session])
        markup, text = view.html(), view.text()
        assert html_problems(markup, (_CSS, _TABLE_CSS)) == []
        assert secret not in markup + text and "\x1b" not in text
        assert view.table().records()[0]["last tool call"].startswith("Bash: ")


# -- the batch in widgets ------------------------------------------------------------------


class StoppableBatch(FakeBatch):
    """A fake batch whose stop() stops every run, as Batch.stop does."""

    def __init__(self, runs: list[Session]) -> None:
        super().__init__(runs)
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1
        for session in self.runs:
            session.stop(1.0)


def _idle(tmp_path, pod: str) -> Session:
    def job(ctl) -> int:
        ctl.emit(EventType.CONTAINER_STARTED, f"cldpd-{pod}")
        ctl.stdout.write(f"{pod} is working\n")
        stopped = threading.Event()
        ctl.set_stopper(lambda _timeout: stopped.set())
        stopped.wait(30)
        return 130

    return Session(pod, f"cldpd-{pod}", job, tmp_path)


def _shown(panel) -> str:
    (entry,) = panel.output.outputs
    return entry["data"]["text/plain"]


def _until(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_panel_shows_the_table_and_the_chosen_runs_output_in_one_entry(tmp_path):
    from cldpd_magic.picker import BatchPanel

    runs = [_session(tmp_path, f"p{i}", [f"out-of-p{i}"]) for i in range(3)]
    panel = BatchPanel(FakeBatch(runs), interval=0.02)
    try:
        assert panel.join(30)
        assert panel.run_select.options == ("p0", "p1", "p2")
        assert panel.run_select.value == "p0" and "out-of-p0" in _shown(panel)
        panel.run_select.value = "p2"
        assert "out-of-p2" in _shown(panel) and "out-of-p0" not in _shown(panel)
        assert panel.stop_button.disabled and panel.stop_all_button.disabled
        assert repr(panel) == panel.view.text()
    finally:
        panel.close()


def test_a_panel_stops_one_run_while_its_siblings_go_on_then_all(tmp_path):
    from cldpd_magic.picker import BatchPanel

    runs = [_idle(tmp_path, "one"), _idle(tmp_path, "two")]
    batch = StoppableBatch(runs)
    panel = BatchPanel(batch, interval=0.02, stop_timeout=1.0)
    try:
        _until(lambda: len(panel.run_select.options) == 2)
        _until(lambda: all(s.state == "running" for s in runs))
        panel.run_select.value = "two"
        panel.stop_button.click()
        _until(lambda: runs[1].done)
        assert runs[1].state == "stopped" and runs[0].state == "running"
        panel.stop_all_button.click()
        assert panel.join(30)
        assert batch.stops == 1 and runs[0].state == "stopped"
        assert "2 stopped" in _shown(panel)
    finally:
        panel.close()


def test_the_picker_shows_a_batch_below_its_pods(tmp_path, pods_dir, transcript_dir):
    from fakes import FakeRunner

    from cldpd_magic.picker import PodPicker
    from cldpd_magic.runs.dispatcher import Dispatcher

    picker = PodPicker(pods_dir, Dispatcher(pods_dir, FakeRunner(), transcript_dir))
    try:
        panel = picker.show_batch(FakeBatch([_session(tmp_path, "b1", ["hello"])]), "fleet")
        assert panel.join(30)
        assert picker.widget.children[-1] is panel.widget
        assert picker.batch_panels == [panel]
        assert _shown(panel).startswith("fleet: 1 exited")
    finally:
        picker.close()
    assert panel._closed


# -- %cldpd_batch and cldpd batch (the Dispatcher's dispatch replaced by a recorder) -------


class ResultBatch(StoppableBatch):
    """A fake batch with results, as Batch.results() gives them."""

    def results(self) -> list[dict]:
        return [
            {"pod": s.pod_name, "issue": URL, "variant": "", "run": s.pod_name,
             "state": str(s.state), "exit_code": s.exit_code, "turns": 1, "input_tokens": 10,
             "output_tokens": 5, "cost_usd": 0.01, "seconds": 0.5,
             "transcript": str(s.transcript), "links": ["https://github.com/o/r/pull/7"]}
            for s in self.runs
        ]  # fmt: skip


URL = "https://github.com/octocat/Hello-World/issues/1"
URL2 = "https://github.com/octocat/Hello-World/issues/2"


@pytest.fixture
def dispatched(monkeypatch, tmp_path) -> list[dict]:
    """Replace Dispatcher.dispatch: record each call, run one session per pod and issue."""
    from cldpd_magic.runs.dispatcher import Dispatcher

    calls: list[dict] = []

    def dispatch(self, pods, issues, **kwargs) -> ResultBatch:
        calls.append({"pods": pods, "issues": issues, **kwargs})
        runs = [
            _session(tmp_path, f"{pod}-{n}", [f"{pod} on {issue}"], code=1 if "bad" in pod else 0)
            for pod in pods
            for n, issue in enumerate(issues)
        ]
        return ResultBatch(runs)

    monkeypatch.setattr(Dispatcher, "dispatch", dispatch, raising=False)
    return calls


def test_the_batch_magic_dispatches_and_shows_the_final_table(ip, dispatched):
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        batch = ip.run_line_magic(
            "cldpd_batch",
            f'-p demo,other --variant "opus=--model opus" --variant plain --repeats 2 '
            f"--max-parallel 3 --budget 1.5 {URL} {URL2}",
        )
    assert dispatched == [{
        "pods": ["demo", "other"], "issues": [URL, URL2], "repeats": 2, "max_parallel": 3,
        "budget_usd": 1.5,
        "variants": [{"name": "opus", "args": ["--model", "opus"]}, {"name": "plain", "args": []}],
    }]  # fmt: skip
    assert batch.done and len(batch.runs) == 4
    (shown,) = captured.outputs
    assert "application/vnd.jupyter.widget-view+json" in shown.data
    magics = ip.magics_manager.registry["CldpdMagics"]
    final = magics.batch_feeds[-1].view.text()
    assert final.startswith("batch: 4 exited")
    assert "demo-0" in final and "other-1" in final


def test_a_terminal_shows_the_batch_table_at_the_end(ip, dispatched, capsys):
    ip.run_line_magic("cldpd_batch", f"-p demo {URL} {URL2}")
    printed = capsys.readouterr().out
    assert printed.count("batch: 2 exited") == 1 and "demo-1" in printed


def test_the_batch_cell_magic_takes_one_issue_a_line(ip, dispatched):
    from IPython.utils.capture import capture_output

    with capture_output():
        ip.run_cell_magic("cldpd_batch", "-p demo -b", f"\n{URL}\n# not this one\n  {URL2}  \n")
    assert dispatched[0]["issues"] == [URL, URL2] and dispatched[0]["variants"] is None


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (URL, "Name the pods to run with -p POD"),
        ("-p demo", "Give the issues"),
        ("-p demo ftp://example.com/x", "http"),
        ("-p ../x " + URL, "pod name"),
        ("-p demo --variant =x " + URL, "has no name"),
    ],
)
def test_the_batch_magic_says_what_is_wrong_in_one_sentence(ip, dispatched, line, match):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match=match) as info:
        ip.run_line_magic("cldpd_batch", line)
    assert "\n" not in str(info.value) and dispatched == []


def test_cldpd_batch_prints_progress_and_results_and_fails_if_a_run_failed(
    pods_dir, dispatched, capsys
):
    from cldpd_magic.cli import main

    args = ["--pods-dir", str(pods_dir), "batch", "good", "--issue", URL, "--issue", URL2]
    assert main([*args, "--variant", "opus=--model opus", "--max-parallel", "2"]) == 0
    out, err = capsys.readouterr()
    assert dispatched[-1]["variants"] == [{"name": "opus", "args": ["--model", "opus"]}]
    assert dispatched[-1]["max_parallel"] == 2 and dispatched[-1]["budget_usd"] is None
    assert out.splitlines()[0].split() == [
        "RUN", "POD", "ISSUE", "VARIANT", "STATE", "EXIT", "TURNS", "TOKENS", "IN/OUT", "COST",
        "TIME", "LINKS",
    ]  # fmt: skip
    assert "https://github.com/o/r/pull/7" in out and "exited" in out
    assert "cldpd: good-0 (good-0): exited" in err
    assert "2 of 2 runs exited 0" in err
    assert main([*args[:3], "good", "bad", "--issue", URL]) == 1
    assert "1 of 2 runs exited 0" in capsys.readouterr().err


def test_cldpd_batch_refuses_a_bad_issue_before_dispatching(pods_dir, dispatched, capsys):
    from cldpd_magic.cli import main

    assert main(["--pods-dir", str(pods_dir), "batch", "p", "--issue", "nope"]) == 1
    assert dispatched == [] and capsys.readouterr().err.startswith("cldpd: ")


def test_queued_runs_show_as_queued_until_their_turn(tmp_path):
    release = threading.Event()

    def waiting(ctl) -> int:
        release.wait(30)
        ctl.emit(EventType.CONTAINER_STARTED, "c")
        return 0

    batch = FakeBatch([Session("first", "c", waiting, tmp_path), _session(tmp_path, "next", [])])
    batch.state_of = lambda index: "queued" if index == 0 and not release.is_set() else "x"
    view = BatchView("batch")
    feed = BatchFeed(batch, view, lambda v: None, 0.02)
    _until(lambda: len(view.rows()) == 2 and view.rows()[1].finished)
    first = view.table().records()[0]
    assert (first["state"], first["elapsed"]) == ("queued", "-")
    assert view.summary().startswith("batch: 1 queued, 1 exited")
    release.set()
    assert feed.join(30)
    assert view.table().records()[0]["state"] == "exited"


# -- the real engine ------------------------------------------------------------------------


def _no_containers_of(docker_client, pod: str) -> list[str]:
    found = docker_client.containers.list(all=True, filters={"label": f"cldpd.pod={pod}"})
    for container in found:
        container.remove(force=True)
    return [c.name for c in found]


@pytest.mark.docker
def test_cldpd_batch_runs_a_pod_on_several_issues_at_once(
    docker_client, make_pod, pods_dir, transcript_dir, monkeypatch, capsys
):
    from cldpd_magic.cli import main

    monkeypatch.setenv("CLDPD_SESSIONS_DIR", str(transcript_dir))
    name = make_pod('echo "run on $CLDPD_RUN_ISSUE ${*##*/}"; [ "${*##*/}" != 2 ] || exit 3')
    code = main([
        "--pods-dir", str(pods_dir), "batch", name, "--issue", URL, "--issue", URL2,
        "--repeats", "2", "--max-parallel", "2",
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert sorted((r[0], r[4], r[5]) for r in rows) == [
        (f"{name}-1", "exited", "0"), (f"{name}-1-2", "exited", "0"),
        (f"{name}-2", "exited", "3"), (f"{name}-2-2", "exited", "3"),
    ]  # fmt: skip
    assert f"cldpd: {name}-2-2 ({name}): exited 3" in err
    assert "2 of 4 runs exited 0" in err
    assert _no_containers_of(docker_client, name) == []


def test_a_run_cldpd_stopped_says_why_and_a_failed_one_says_what_failed(tmp_path):
    from cldpd_magic.runs.session import StopReason

    capped = _idle(tmp_path, "capped")

    def broken(ctl) -> int:
        raise RuntimeError("no such image \x1b[31mcldpd-x\x1b[0m")

    failed = Session("broken", "c", broken, tmp_path)
    batch = FakeBatch([capped, failed])
    view = BatchView("batch")
    feed = BatchFeed(batch, view, lambda v: None, 0.02)
    _until(lambda: capped.state == "running")
    capped.stop_for(StopReason.OVER_BUDGET, 1.0)
    assert feed.join(30)
    states = [r["state"] for r in view.table().records()]
    assert states == ["stopped: over budget", "failed: no such image cldpd-x"]


@pytest.mark.docker
def test_the_batch_cell_magic_on_the_real_engine(ip, docker_client, make_pod, capsys):
    name = make_pod('echo "working on ${*##*/}"; sleep 0.2; echo done')
    batch = ip.run_cell_magic("cldpd_batch", f"-p {name} --repeats 2", f"{URL}\n{URL2}\n")
    printed = capsys.readouterr().out
    assert printed.count("batch: 4 exited") == 1
    assert sorted(r["run"] for r in batch.results()) == [
        f"{name}-1", f"{name}-1-2", f"{name}-2", f"{name}-2-2",
    ]  # fmt: skip
    assert all(r["exit_code"] == 0 for r in batch.results())
    assert _no_containers_of(docker_client, name) == []


def test_one_thread_follows_every_run_of_a_batch(tmp_path):
    gate = threading.Event()

    def job(ctl) -> int:
        ctl.emit(EventType.CONTAINER_STARTED, "cldpd-x")
        for i in range(20):
            ctl.stdout.write(f"line {i}\n")
        gate.wait(30)
        ctl.stdout.write("last\n")
        return 0

    sessions = [Session(f"p{n}", f"cldpd-p{n}", job, tmp_path) for n in range(30)]
    before = set(threading.enumerate())  # the sessions' threads, an earlier test's feeds
    view = BatchView("batch")
    feed = BatchFeed(FakeBatch(sessions), view, lambda v: None, 0.02)
    while sum(row.total_lines for row in view.rows()) < 30 * 20:
        assert not feed.join(0.02)
    assert [t.name for t in set(threading.enumerate()) - before] == ["cldpd-batch-pub"]
    gate.set()
    assert feed.join(60)
    assert feed.error is None
    assert [row.total_lines for row in view.rows()] == [21] * 30
    view.select("p7")
    assert "line 19\nlast\ntranscript: " in view.text()


def test_a_batch_feed_keeps_the_first_error_of_its_runs_and_its_publisher(tmp_path):
    first = RuntimeError("the frontend went away first")
    published = threading.Event()

    def publish(_view: BatchView) -> None:
        if not published.is_set():
            published.set()
            raise first
        raise RuntimeError("and again")

    def reader_failing(n: int):
        def event_batches(start: int = 0, *, wait: bool = True):
            while not published.is_set():
                yield []  # nothing yet: the feed goes on to publish
            raise OSError(f"transcript {n} is gone")  # the eight fail after the publisher

        return event_batches

    sessions = [_session(tmp_path, f"p{n}", ["x"]) for n in range(8)]
    for n, session in enumerate(sessions):
        session.event_batches = reader_failing(n)  # type: ignore[method-assign]
    view = BatchView()
    feed = BatchFeed(FakeBatch(sessions), view, publish, 0.02)
    assert feed.join(60)
    assert feed.error is first
    assert [str(row.state) for row in view.rows()] == ["failed"] * 8  # each says so


def test_the_first_error_of_racing_threads_is_kept_and_never_replaced():
    from cldpd_magic.render.feeds import _Publisher

    errors = [OSError(n) for n in range(16)]
    holder = _Publisher()
    start = threading.Barrier(len(errors))

    def record(exc: BaseException) -> None:
        start.wait(30)
        holder._record(exc)
        assert holder.error is not None

    threads = [threading.Thread(target=record, args=(e,)) for e in errors]
    for thread in threads:
        thread.start()
    seen = holder.error
    for thread in threads:
        thread.join(30)
    assert holder.error in errors and (seen is None or holder.error is seen)
    holder._record(RuntimeError("later"))
    assert holder.error in errors
