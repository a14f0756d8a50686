"""The renderer: stream-json and Markdown to text/HTML, the bounded view, batched feeds, tables."""

from __future__ import annotations

import contextvars
import io
import json
import re
import threading
import time
from pathlib import Path

import pytest

from cldpd_magic.events import Event, EventType, RunState
from cldpd_magic.render.feeds import LiveFeed, TextFeed
from cldpd_magic.render.markdown import markdown_to_html
from cldpd_magic.render.stream import StreamRenderer, render_output_line
from cldpd_magic.render.tables import Report, Table
from cldpd_magic.render.views import SessionView
from cldpd_magic.runs.session import Session
from cldpd_magic.secrets import Masker


def rendered(obj: dict) -> list[tuple[str, str]]:
    return [(line.kind, line.text) for line in render_output_line(json.dumps(obj))]


# -- Markdown and stream-json -----------------------------------------------------------


def test_markdown_renders_what_agents_write():
    html = markdown_to_html(
        "## Plan\n\n- read `a.py`\n- **fix** it\n\n1. one\n2. two\n\n"
        "See [docs](https://example.com/x) and *this*, ~~not that~~.\n```python\nx < 1\n```\n\n"
        "| a | b |\n|:--|--:|\n| 1 | 2 |"
    ).replace("\n", "")
    assert "<h2>Plan</h2>" in html
    assert "<ul><li>read <code>a.py</code></li><li><strong>fix</strong> it</li></ul>" in html
    assert "<ol><li>one</li><li>two</li></ol>" in html
    assert (
        '<a href="https://example.com/x" target="_blank" rel="noopener noreferrer nofollow">'
        "docs</a>"
    ) in html
    assert "<em>this</em>" in html and "<s>not that</s>" in html
    assert '<pre><code class="language-python">x &lt; 1</code></pre>' in html
    assert "<table><thead><tr><th>a</th><th>b</th></tr></thead>" in html
    assert "<td>1</td><td>2</td>" in html and "style" not in html


def test_markdown_cannot_inject_markup():
    html = markdown_to_html('<script>alert(1)</script> [x](javascript:alert(1)) <img src="y">')
    assert "<script>" not in html and "<img" not in html and "href" not in html


def test_markdown_images_become_links_and_only_web_links_are_links():
    html = markdown_to_html(
        "![logo](https://e.com/a.png) [rel](/api/contents) [mail](mailto:a@b.org) [top](#plan)"
    )
    assert "<img" not in html and "src=" not in html
    assert '<a href="https://e.com/a.png" target="_blank"' in html and "[image: logo]" in html
    assert "[rel](/api/contents)" in html
    assert '<a href="mailto:a@b.org"' in html and '<a href="#plan" rel=' in html


def test_assistant_text_is_markdown_and_tool_calls_are_one_line():
    event = {
        "type": "assistant",
        "message": {
            "content": [
                {"type": "text", "text": "I will run the tests.\nThen fix them."},
                {"type": "tool_use", "name": "Bash", "input": {"command": "pytest -q\necho"}},
                {"type": "tool_use", "name": "Read", "input": {"file_path": "/src/a.py"}},
                {"type": "tool_use", "name": "TodoWrite", "input": {"todos": [1, 2, 3]}},
                {"type": "tool_use", "name": "Mystery", "input": {"n": 1, "what": "thing"}},
                {"type": "tool_use", "name": "NoArgs", "input": {}},
            ]
        },
    }
    assert rendered(event) == [
        ("markdown", "I will run the tests.\nThen fix them."),
        ("tool", "▸ Bash: pytest -q"),
        ("tool", "▸ Read: /src/a.py"),
        ("tool", "▸ TodoWrite: 3 todos"),
        ("tool", "▸ Mystery: thing"),
        ("tool", "▸ NoArgs"),
    ]


def test_thinking_is_one_dimmed_line():
    event = {
        "type": "assistant",
        "message": {
            "content": [
                {
                    "type": "thinking",
                    "thinking": "The user wants a fix.\nLet me look.",
                    "signature": "x",
                },
                {"type": "redacted_thinking", "data": "..."},
            ]
        },
    }
    assert rendered(event) == [
        ("thinking", "✻ The user wants a fix."),
        ("thinking", "✻ (redacted thinking)"),
    ]
    html = render_output_line(json.dumps(event))[0].to_html()
    assert html == '<div class="cldpd-thinking">✻ The user wants a fix.</div>'


def test_tool_results_and_errors_show_their_first_line():
    event = {
        "type": "user",
        "message": {
            "content": [
                {"type": "tool_result", "content": "ok\nmore\nlines"},
                {"type": "tool_result", "is_error": True, "content": [{"text": "boom"}]},
                {"type": "tool_result", "content": [{"type": "image", "source": {}}]},
            ]
        },
    }
    assert rendered(event) == [
        ("tool_result", "  ↳ ok (+2 lines)"),
        ("tool_error", "  ✗ boom"),
        ("tool_result", "  ↳ [image]"),
    ]


def test_the_system_init_names_model_permission_mode_and_tools():
    init = {
        "type": "system", "subtype": "init", "session_id": "s", "model": "claude-x",
        "permissionMode": "acceptEdits", "tools": ["Bash", "Read"], "mcp_servers": [],
        "claude_code_version": "2.1.0", "cwd": "/work",
    }  # fmt: skip
    assert rendered(init) == [
        ("system", "● Claude Code 2.1.0 · model claude-x · permission mode acceptEdits · 2 tools"
                   " · session s"),
    ]  # fmt: skip


def test_api_retries_and_compaction_are_shown():
    retry = {
        "type": "system", "subtype": "api_retry", "attempt": 2, "max_retries": 10,
        "retry_delay_ms": 1250, "error_status": 529, "error": "overloaded_error",
    }  # fmt: skip
    assert rendered(retry) == [("retry", "↻ API retry 2/10 in 1.2 s: 529 overloaded_error")]
    unreachable = {"type": "system", "subtype": "api_retry", "attempt": 1, "max_retries": 10,
                   "retry_delay_ms": 500, "error_status": None, "error": "unknown"}  # fmt: skip
    assert rendered(unreachable) == [("retry", "↻ API retry 1/10 in 0.5 s: unknown")]
    compact = {"type": "system", "subtype": "compact_boundary",
               "compact_metadata": {"trigger": "auto", "pre_tokens": 156594}}  # fmt: skip
    assert rendered(compact) == [
        ("system", "── conversation compacted (auto, 156,594 tokens before) ──")
    ]


RESULT = {
    "type": "result", "subtype": "success", "is_error": False, "num_turns": 7,
    "duration_ms": 61500, "total_cost_usd": 0.25, "session_id": "abc",
    "usage": {"input_tokens": 1000, "cache_read_input_tokens": 200, "output_tokens": 345},
    "result": "All **done**.", "permission_denials": [],
}  # fmt: skip


def test_the_final_result_is_a_summary():
    assert rendered(RESULT) == [
        ("result", "✓ done · 7 turns · 61.5 s · $0.2500 · 1,200 in / 345 out tokens · session abc"),
        ("markdown", "All **done**."),
    ]


def test_a_failed_result_says_why_and_never_success():
    failed = RESULT | {
        "is_error": True, "result": "API Error: 401 {\"error\":\"invalid x-api-key\"}",
        "num_turns": 1, "total_cost_usd": 0, "usage": None,
    }  # fmt: skip
    lines = rendered(failed)
    assert lines == [
        ("failed", '✗ failed: API Error: 401 {"error":"invalid x-api-key"} · 1 turn · 61.5 s'
                   " · $0.0000 · session abc"),
    ]  # fmt: skip
    assert "success" not in lines[0][1]


def test_an_interrupted_turn_says_so_not_the_clis_diagnostics():
    """The real CLI's result of a turn ended by an interrupt (captured, streaming input)."""
    path = Path(__file__).parent / "fixtures" / "claude" / "interactive" / "cancel.jsonl"
    line = next(x for x in path.read_text().splitlines() if '"aborted_tools"' in x)
    lines = [(x.kind, x.text) for x in render_output_line(line)]
    assert lines[0][0] == "result"
    assert lines[0][1].startswith("⏹ interrupted · 3 turns · ")
    assert "ede_diagnostic" not in lines[0][1]
    assert lines[1] == ("denied", "⊘ permission denied: Bash: touch c1.txt")


@pytest.mark.parametrize(
    ("subtype", "head"),
    [
        ("error_max_turns", "✗ reached the turn limit"),
        ("error_during_execution", "✗ error during execution: boom"),
        ("error_max_budget_usd", "✗ reached the budget"),
        ("error_something_new", "✗ error_something_new"),
    ],
)
def test_every_result_subtype_has_a_summary(subtype, head):
    event = {"type": "result", "subtype": subtype, "is_error": True, "num_turns": 3,
             "duration_ms": 2000, "session_id": "abc"}  # fmt: skip
    if subtype == "error_during_execution":
        event["errors"] = ["boom", "later"]
    lines = rendered(event)
    assert lines == [("failed", f"{head} · 3 turns · 2.0 s · session abc")]


def test_permission_denials_are_listed():
    denied = RESULT | {
        "result": "",
        "permission_denials": [
            {"tool_name": "Bash", "tool_use_id": "t1", "tool_input": {"command": "rm -rf /"}},
            {"tool_name": "Write", "tool_use_id": "t2", "tool_input": {"file_path": "/etc/x"}},
        ],
    }
    assert rendered(denied)[1:] == [
        ("denied", "⊘ permission denied: Bash: rm -rf /"),
        ("denied", "⊘ permission denied: Write: /etc/x"),
    ]


def test_the_final_answer_is_not_shown_twice():
    renderer = StreamRenderer()
    answer = {
        "type": "assistant",
        "message": {"content": [{"type": "text", "text": "All **done**."}]},
    }
    assert [x.kind for x in renderer.render(json.dumps(answer))] == ["markdown"]
    assert [x.kind for x in renderer.render(json.dumps(RESULT))] == ["result"]
    other = RESULT | {"result": "A different summary."}
    assert [x.kind for x in renderer.render(json.dumps(other))] == ["result", "markdown"]

    view = SessionView("pod")
    for event in (answer, RESULT):
        view.add(Event(EventType.OUTPUT, json.dumps(event)))
    assert view.text().count("All **done**.") == 1


def test_unknown_events_are_compact_and_partial_messages_quiet():
    assert rendered({"type": "stream_event", "event": {"type": "content_block_delta"}}) == []
    assert rendered({"type": "other", "n": 3, "what": "x\ny", "data": {"a": 1}}) == [
        ("event", "· other: n=3 what=x +data")
    ]
    assert rendered(
        {
            "type": "system",
            "subtype": "hook_response",
            "hook_name": "h",
            "uuid": "u",
            "session_id": "s",
        }
    ) == [("event", "· system/hook_response: hook_name=h")]
    assert rendered({"type": "system", "subtype": "status", "status": None}) == []
    assert rendered({"no": "type"}) == [("text", '{"no": "type"}')]


def test_other_lines_are_plain_text():
    assert [(x.kind, x.text) for x in render_output_line("{not json}")] == [("text", "{not json}")]
    long = render_output_line("x" * 5000)[0].text
    assert long.startswith("x" * 2000) and "3,000 more characters in the transcript" in long


# -- the view ---------------------------------------------------------------------------


def test_status_line_follows_the_session():
    view = SessionView("pod", transcript="/t/pod-1.jsonl")
    assert view.status_text() == "pod: starting"
    view.add(Event(EventType.BUILD_STARTED, "cldpd-pod"))
    view.add(Event(EventType.BUILD_OUTPUT, "Step 2/5 : RUN make"))
    assert view.status_text() == "pod: building cldpd-pod step 2/5"
    view.add(Event(EventType.BUILD_COMPLETE, "cldpd-pod"))
    view.add(Event(EventType.CONTAINER_STARTED, "cldpd-pod"))
    assert view.status_text() == "pod: running 0s"
    view.add(Event(EventType.CONTAINER_EXITED, "3", 3))
    assert view.status_text().startswith("pod: exited 3 after ")
    assert view.finished

    failed = SessionView("pod")
    failed.add(Event(EventType.ERROR, "The image did not build."))
    assert failed.status_text() == "pod: failed: The image did not build."
    assert failed.text().splitlines()[1] == "The image did not build."

    stopped = SessionView("pod")
    stopped.add(Event(EventType.CONTAINER_EXITED, "130", 130), stopped=True)
    assert stopped.status_text() == "pod: stopped (exit 130)"


def test_the_tail_is_bounded_and_says_how_much_was_elided():
    view = SessionView("pod", max_lines=5, transcript="/t/x.jsonl")
    for i in range(1000):
        view.add(Event(EventType.OUTPUT, f"line {i}"))
    view.add(Event(EventType.STDERR, "warning <b>"))
    text = view.text().splitlines()
    assert text[1] == "… 996 earlier lines not shown (the transcript has them all)"
    assert text[2:] == ["line 996", "line 997", "line 998", "line 999", "warning <b>",
                        "transcript: /t/x.jsonl"]  # fmt: skip
    assert (view.elided, view.total_lines) == (996, 1001)
    html = view.html()
    assert "warning &lt;b&gt;" in html and "996 earlier lines" in html
    assert view.bundle() == {"text/html": html, "text/plain": view.text()}


def test_notes_are_masked():
    view = SessionView("pod", masker=Masker(["hunter2-secret"]))
    view.note("token hunter2-secret leaked")
    view.fail("bad hunter2-secret")
    assert "hunter2-secret" not in view.text()
    assert "token ******** leaked" in view.text()
    assert view.status_text() == "pod: failed: bad ********"


# -- the live feed ------------------------------------------------------------------------


def _session(tmp_path, lines: int, secret: str = "") -> Session:
    def job(ctl) -> int:
        ctl.emit(EventType.CONTAINER_STARTED, "c")
        chunk = "".join(f"line {i} {secret}\n" for i in range(1000))
        for _ in range(lines // 1000):
            ctl.stdout.write(chunk)
        return 0

    return Session("pod", "c", job, tmp_path, secrets=[secret] if secret else [])


def test_a_feed_publishes_batched_and_ends_with_everything(tmp_path):
    published: list[str] = []
    began = time.monotonic()
    session = _session(tmp_path, 200_000)
    view = SessionView("pod", max_lines=50, masker=session.mask)
    feed = LiveFeed(session, view, lambda v: published.append(v.text()), interval=0.05)
    assert feed.join(60)
    wall = time.monotonic() - began
    assert feed.done and feed.error is None
    assert feed.publications == len(published) <= wall / 0.05 + 3
    assert view.total_lines == 200_000 and view.elided == 200_000 - 50
    assert published[-1].startswith("pod: exited 0")
    assert published[-1].splitlines()[-1] == "line 999 "


def test_a_feed_survives_a_failing_publisher(tmp_path):
    calls = []

    def publish(view: SessionView) -> None:
        calls.append(view.state)
        raise RuntimeError("frontend gone")

    feed = LiveFeed(_session(tmp_path, 1000), SessionView("pod"), publish, interval=0.02)
    assert feed.join(30)
    assert calls and calls[-1] == "exited"
    assert isinstance(feed.error, RuntimeError)


def test_a_feed_publishes_in_the_context_it_was_made_in(tmp_path):
    var: contextvars.ContextVar[str] = contextvars.ContextVar("cell", default="none")
    var.set("cell-1")
    seen = set()
    feed = LiveFeed(
        _session(tmp_path, 1000), SessionView("pod"), lambda v: seen.add(var.get()), 0.02
    )
    var.set("cell-2")
    assert feed.join(30)
    assert seen == {"cell-1"}


def test_a_feed_keeps_secrets_out_of_what_it_publishes(tmp_path):
    published = []
    session = _session(tmp_path, 1000, secret="s3cr3t-value")
    feed = LiveFeed(session, SessionView("pod", masker=session.mask), published.append, 0.02)
    assert feed.join(30)
    assert all("s3cr3t-value" not in v.html() + v.text() for v in published)
    assert "s3cr3t-value" not in session.transcript.read_text()


def test_a_quiet_session_still_ticks_about_once_a_second(tmp_path):
    release = threading.Event()

    def job(ctl) -> int:
        ctl.emit(EventType.CONTAINER_STARTED, "c")
        release.wait(30)
        return 0

    states = []
    view = SessionView("pod")
    feed = LiveFeed(Session("pod", "c", job, tmp_path), view, lambda v: states.append(v.state))
    time.sleep(1.3)
    release.set()
    assert feed.join(30)
    assert states.count("running") >= 2
    assert states[-1] == "exited"


# -- tables -----------------------------------------------------------------------------


def test_a_table_is_aligned_text_and_escaped_html():
    table = Table(("pod", "state"), [("a", "running"), ("long-name", None)], title="Pods",
                  notes=["one note"])  # fmt: skip
    assert table.text() == "Pods\npod        state\na          running\nlong-name\none note"
    assert table.records() == [{"pod": "a", "state": "running"}, {"pod": "long-name", "state": ""}]
    assert len(table) == 2 and repr(table) == table.text()
    html = Table(("x",), [("<b>",)], title="<t>")._repr_html_()
    assert "&lt;b&gt;" in html and "<caption>&lt;t&gt;</caption>" in html


def test_a_report_shows_its_tables_in_order():
    first = Table(("a",), [("1",)], title="first")
    second = Table(("b",), [], title="second", notes=["empty"])
    report = Report(first, second)
    assert report["second"] is second
    assert report.text() == "first\na\n1\n\nsecond\nempty"
    assert report._repr_html_().index("first") < report._repr_html_().index("second")
    with pytest.raises(KeyError):
        report["third"]


# -- real Claude Code output ----------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "claude"


def fixture_view(name: str) -> SessionView:
    """A view fed a captured run of the real CLI (tests/fixtures/claude/<name>.jsonl)."""
    view = SessionView("pod", max_lines=10_000)
    view.add(Event(EventType.CONTAINER_STARTED, "cldpd-pod"))
    for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines():
        view.add(Event(EventType.OUTPUT, line))
    return view


def kinds(view: SessionView) -> list[str]:
    return [line.kind for line in view.tail]


def test_a_real_successful_run_shows_tools_results_and_one_answer():
    view = fixture_view("success_with_tools")
    text = view.text()
    assert kinds(view) == ["system", "thinking", "markdown", "tool", "tool_result", "tool",
                           "tool_result", "tool", "tool_result", "markdown", "result"]  # fmt: skip
    assert text.count("Wrote **proof.txt** in the workdir.") == 1
    assert "▸ Bash: echo made-in-pod > proof.txt" in text and "  ↳ made-in-pod (+" in text
    assert "permission mode acceptEdits · 22 tools" in text
    assert re.search(r"✓ done · 4 turns · \d+\.\d s · \$0\.0101 · 2,160 in / 132 out tokens", text)


@pytest.mark.parametrize(
    ("name", "failure"),
    [
        ("api_retry_then_failure", "✗ failed: API Error: Repeated 529 Overloaded errors."),
        ("auth_401", "✗ failed: Invalid API key"),
        ("max_turns", "✗ reached the turn limit: Reached maximum number of turns (2) · 3 turns"),
    ],
)
def test_a_real_failed_run_says_why_and_never_success(name, failure):
    view = fixture_view(name)
    result = view.tail[-1]
    assert result.kind == "failed" and result.text.startswith(failure)
    assert "✓" not in view.text() and "✗ success" not in view.text()


def test_real_api_retries_denials_and_tool_errors_are_shown():
    retries = [x.text for x in fixture_view("api_retry_then_failure").tail if x.kind == "retry"]
    assert len(retries) == 2  # the delays differ from capture to capture
    for attempt, retry in enumerate(retries, 1):
        assert re.fullmatch(rf"↻ API retry {attempt}/2 in \d+\.\d s: 529 overloaded", retry)
    denied = fixture_view("permission_denied")
    assert [x.text[:45] for x in denied.tail if x.kind == "denied"] == [
        "⊘ permission denied: Bash: touch in '/home/ag",
        "⊘ permission denied: Bash: touch refused.txt",
    ]
    assert "tool_error" in kinds(denied)
    assert [x.text for x in fixture_view("tool_error").tail if x.kind == "tool_error"] == [
        "  ✗ File does not exist. Note: your current working directory is /home/agent/work."
    ]


def test_real_runs_have_no_unknown_events():
    for path in sorted(FIXTURES.glob("*.jsonl")):
        assert "event" not in kinds(fixture_view(path.stem)), path.name


# -- one model of a run: the view reads the session's state; the text consumer --------------

SECRET = "s3cr3t-value-77"
ANSWER = {"type": "assistant", "message": {"content": [{"type": "text", "text": "Fixed it."}]}}
RESULT_LINE = {"type": "result", "subtype": "success", "is_error": False, "num_turns": 1,
               "duration_ms": 1000, "result": "Fixed it."}  # fmt: skip


def escaped(secret: str) -> str:
    """A stream-json line whose text holds the secret written with \\u escapes only."""
    hidden = "".join(f"\\u{ord(c):04x}" for c in secret)
    return (
        '{"type":"assistant","message":{"content":[{"type":"text","text":"key ' + hidden + '"}]}}'
    )


def gated_session(tmp_path, lines: list[str], secret: str = "") -> tuple[Session, threading.Event]:
    """A session that starts, prints lines, then waits for the returned event to exit 0."""
    release = threading.Event()

    def job(ctl) -> int:
        ctl.emit(EventType.CONTAINER_STARTED, "cldpd-pod")
        for line in lines:
            ctl.stdout.write(line + "\n")
        release.wait(30)
        return 0

    session = Session("pod", "c", job, tmp_path, secrets=[secret] if secret else [], kind="resume")
    return session, release


def test_a_view_bound_to_a_session_shows_its_state_not_one_rebuilt_from_events(tmp_path):
    session, release = gated_session(tmp_path, [])
    next(e for e in session.events() if e.type is EventType.CONTAINER_STARTED)
    view = SessionView("pod", session=session)
    assert view.status is session.status and view.state is RunState.RUNNING
    view.add(Event(EventType.CONTAINER_EXITED, "9", 9))  # events no longer decide the state
    assert view.state is RunState.RUNNING and view.exit_code is None
    assert view.transcript == str(session.transcript)
    release.set()
    session.wait(10)
    assert view.state is RunState.EXITED and view.status_text().startswith("pod: exited 0 after")


def test_a_feed_binds_its_view_so_a_stopped_run_shows_stopped(tmp_path):
    session, release = gated_session(tmp_path, ["working"])
    session._control.set_stopper(lambda _t: release.set())
    view = SessionView("pod")
    feed = LiveFeed(session, view, lambda v: None, 0.02)
    next(e for e in session.events() if e.type is EventType.OUTPUT)
    session.stop(1)
    assert feed.join(30)
    assert view.state is RunState.STOPPED and view.status_text() == "pod: stopped (exit 0)"


def test_text_consumer_shows_the_final_answer_once_and_notes_on_stderr(tmp_path):
    session, release = gated_session(tmp_path, [json.dumps(ANSWER), json.dumps(RESULT_LINE)])
    release.set()
    out, err = io.StringIO(), io.StringIO()
    TextFeed(session, out, err).follow()
    assert out.getvalue().count("Fixed it.") == 1
    assert out.getvalue().splitlines()[-1].startswith("✓ done · 1 turn ·")
    assert err.getvalue() == "cldpd: resume running in container cldpd-pod\n"


def test_text_consumer_masks_a_json_escaped_secret_unless_raw(tmp_path):
    for raw in (False, True):
        session, release = gated_session(tmp_path, [escaped(SECRET)], secret=SECRET)
        release.set()
        out = io.StringIO()
        TextFeed(session, out, raw=raw, notes=False).follow()
        assert SECRET not in out.getvalue()
        if raw:  # the line as it came, its escaped secret masked by the session
            assert out.getvalue().startswith('{"type":"assistant"')
            assert escaped(SECRET)[-60:] not in out.getvalue()
        else:
            assert out.getvalue() == "key ********\n"


def test_text_and_html_views_are_made_of_the_same_lines(tmp_path):
    lines = [json.dumps(ANSWER), "\x1b[31mplain\x1b[0m", json.dumps(RESULT_LINE)]
    session, release = gated_session(tmp_path, lines)
    release.set()
    out = io.StringIO()
    TextFeed(session, out, notes=False).follow()
    view = SessionView("pod", session=session)
    for event in session.events():
        view.add(event)
    assert [line.text for line in view.tail] == out.getvalue().splitlines()


def test_the_status_line_shows_usage_and_why_cldpd_stopped_a_run(tmp_path):
    result = {**RESULT_LINE, "num_turns": 2, "total_cost_usd": 0.25,
              "usage": {"input_tokens": 100, "output_tokens": 20}}  # fmt: skip

    def job(ctl):
        ctl.emit(EventType.CONTAINER_STARTED, "c")
        ctl.stdout.write(json.dumps(result) + "\n")
        return 0

    session = Session("pod", "c", job, tmp_path)
    session.wait(10)
    view = SessionView("pod", session=session)
    assert view.status_text().startswith("pod: exited 0 after ")
    assert view.status_text().endswith(" · 2 turns · 120 tokens · $0.2500")
    stopped = SessionView("pod")
    stopped.status.request_stop("over budget")
    stopped.status.finish(130)
    assert stopped.status_text() == "pod: stopped: over budget (exit 130)"


def test_a_feed_keeps_the_first_error_of_its_threads(tmp_path):
    first = RuntimeError("the frontend went away first")
    published = threading.Event()

    def publish(view: SessionView) -> None:
        if not published.is_set():
            published.set()
            raise first
        raise RuntimeError("and again")

    def events():
        published.wait(30)  # the reader fails after the publisher
        raise OSError("the transcript is gone")
        yield  # pragma: no cover

    session = _session(tmp_path, 1000)
    session.event_batches = events  # type: ignore[method-assign]
    view = SessionView("pod")
    feed = LiveFeed(session, view, publish, interval=0.02)
    assert feed.join(30)
    assert feed.error is first  # neither the reader's error nor a later publication's
    assert "could not read the session's events: the transcript is gone" in view.text()
    with pytest.raises(AttributeError):
        feed.error = None  # type: ignore[misc]


def test_real_streaming_input_output_renders_a_summary_per_turn():
    """Every turn's result has its summary; an approval request, answers to cldpd's control
    requests and withdrawals stay quiet (cldpd's own PERMISSION events say them)."""
    for path in sorted((FIXTURES / "interactive").glob("*.jsonl")):
        lines = path.read_text().splitlines()
        view = fixture_view(f"interactive/{path.stem}")
        results = [json.loads(x) for x in lines if json.loads(x).get("type") == "result"]
        summaries = [x.text for x in view.tail if x.kind in ("result", "failed")]
        assert len(summaries) == len(results), path.name
        assert "text" not in kinds(view), path.name  # every line was read as an event
        costs = [f"${r['total_cost_usd']:.4f}" for r in results]
        assert [s.split(" · ")[3] for s in summaries] == costs, path.name
    cancel = fixture_view("interactive/cancel").text()
    assert "control_request" not in cancel and "control_cancel_request" not in cancel
    assert "control_response" not in cancel


def test_approval_events_show_as_one_line_each():
    import json

    from cldpd_magic.events import Event, EventType
    from cldpd_magic.render import RunLines
    from cldpd_magic.secrets import Masker

    lines = RunLines(Masker(["sk-secret-value"]))

    def shown(etype, **fields):
        return [(x.kind, x.text) for x in lines.lines(Event(etype, json.dumps(fields)))]

    ask = {"request_id": "r1", "tool": "Bash", "input": {"command": "touch x sk-secret-value"}}
    assert shown(EventType.PERMISSION_REQUEST, **ask) == [
        ("approval", "⚠ approval needed: Bash: touch x ********")
    ]
    assert shown(EventType.PERMISSION_DECISION, tool="Bash", allow=True, by="user") == [
        ("allowed", "✓ allowed Bash (by you)")
    ]
    assert shown(EventType.PERMISSION_DECISION, tool="Bash", allow=True, always=True) == [
        ("allowed", "✓ allowed Bash (always, this run)")
    ]
    assert shown(EventType.PERMISSION_DECISION, tool="Bash", allow=False, message="no") == [
        ("denied", "⊘ denied Bash: no")
    ]
    timeout = shown(EventType.PERMISSION_DECISION, tool="Bash", allow=False, by="timeout",
                    message="no answer within 600 s; denied")  # fmt: skip
    assert timeout == [("denied", "⏱ denied Bash: no answer within 600 s; denied")]
    assert shown(EventType.PERMISSION_DECISION, tool="Bash", allow=False, by="cancelled") == [
        ("denied", "⊘ Bash: the agent withdrew its request")
    ]
    # Hostile data never breaks the line.
    assert lines.lines(Event(EventType.PERMISSION_REQUEST, "not json"))[0].kind == "approval"
    assert lines.lines(Event(EventType.PERMISSION_DECISION, "[1, 2]"))[0].kind == "denied"
