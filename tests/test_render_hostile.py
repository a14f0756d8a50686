"""Hostile and malformed agent output: every HTML cldpd emits stays inert, nothing raises.

The corpus of XSS payloads goes into every field of Claude Code's stream-json an agent
controls, into plain and stderr lines, titles, errors, tables and the picker; the HTML is
parsed with ``html.parser`` and must hold only allow-listed, inert markup. Malformed
events render (as text when nothing better is possible), secrets written with JSON
escapes are masked after decoding, and no text form carries terminal escapes.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from pathlib import Path

import pytest
from fakes import AgentCall, FakeRunner, write_pod
from html_safety import PAYLOADS, hostile_lines, html_problems

from cldpd_magic import Dispatcher, PodPicker
from cldpd_magic.events import Event, EventType
from cldpd_magic.render import stream as render_module
from cldpd_magic.render.feeds import LiveFeed
from cldpd_magic.render.markdown import markdown_to_html
from cldpd_magic.render.stream import StreamRenderer, render_output_line
from cldpd_magic.render.tables import _TABLE_CSS, Report, Table
from cldpd_magic.render.views import _CSS, SessionView
from cldpd_magic.runs.session import Session
from cldpd_magic.secrets import MASK, Masker

#: Characters no text form may hold: C0/C1 controls (tab and newline excepted), ESC.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: The ``style`` attributes the picker's own details HTML uses.
PICKER_STYLES = ("text-align:left;padding-right:1em", "margin:2px 0")
SECRET = "s3cr3t-T0ken_value"


def hostile_view(payload: str, masker: Masker | None = None) -> SessionView:
    """A view fed the payload through every event kind and every agent-made field."""
    view = SessionView(payload, max_lines=100_000, masker=masker, transcript=payload)
    view.add(Event(EventType.BUILD_STARTED, payload))
    view.add(Event(EventType.BUILD_OUTPUT, f"cldpd: {payload}"))
    view.add(Event(EventType.CONTAINER_STARTED, payload))
    for line in hostile_lines(payload):
        view.add(Event(EventType.OUTPUT, line))
    view.add(Event(EventType.STDERR, payload))
    view.note(payload)
    view.add(Event(EventType.ERROR, payload))
    return view


def test_the_checker_catches_what_the_old_converter_emitted():
    old = (
        '<a href="https://github.com/o/r/pull/1"autofocus=""onfocus="window.pwned=1"x=""'
        ' target="_blank">PR</a><img src=x><a href="javascript:alert(1)">x</a>'
        '<style>body{}</style><p style="color:red">x</p><!-- c --><div class="jp-x">'
    )
    problems = " | ".join(html_problems(old, (_CSS,)))
    for expected in ("autofocus", "onfocus", "<img>", "javascript:", "style element",
                     "style 'color:red'", "comment", "class 'jp-x'", "without rel"):  # fmt: skip
        assert expected in problems
    assert html_problems(_CSS + '<div class="cldpd-x"><a href="https://a.io" target="_blank" '
                         'rel="noopener noreferrer">a</a></div>', (_CSS,)) == []  # fmt: skip


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_every_payload_in_every_field_renders_inert(payload):
    view = hostile_view(payload)
    markup = view.html()
    assert html_problems(markup, (_CSS,)) == []
    assert view.bundle()["text/html"] == markup
    text = view.text()
    assert not CONTROL.search(text), repr(text[:200])
    assert view.total_lines >= len(hostile_lines(payload))  # nothing dropped silently
    markup.encode("utf-8")  # a kernel must be able to send it
    visible = html.unescape(re.sub(r"<[^>]+>", "", markup))
    if "window.pwned" in payload:
        assert "window.pwned" in visible  # shown as text, not dropped


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_markdown_alone_is_inert(payload):
    assert html_problems(markdown_to_html(payload)) == []
    assert html_problems(markdown_to_html(payload, Masker(["window"]))) == []


def test_tables_and_reports_are_inert():
    for payload in PAYLOADS:
        table = Table((payload, "b"), [(payload, None), (1, payload, payload), ()],
                      title=payload, notes=[payload])  # fmt: skip
        empty = Table(("a",), [], title=payload, notes=[payload])
        for markup in (table._repr_html_(), Report(table, empty)._repr_html_()):
            assert html_problems(markup, (_TABLE_CSS,)) == []
        assert not CONTROL.search(table.text())


def _hostile_agent(call: AgentCall) -> int:
    for payload in PAYLOADS:
        call.out(*hostile_lines(payload))
        call.err(payload)
    return 0


def test_the_picker_shows_hostile_pods_and_runs_inert(pods_dir: Path, transcript_dir: Path):
    terminal = "\x1b[2J\x1b]0;title\x07\x1b[31m"
    payload = terminal + "\n".join(p for p in PAYLOADS if "\x00" not in p)  # NUL: refused
    write_pod(
        pods_dir,
        "hostile",
        pod_json={
            "env": {"NOTE": payload[:500], "COLOUR": terminal},
            "args": PAYLOADS[:5],
            "workdir": "/" + PAYLOADS[0] + terminal,  # absolute, else refused up front
            "mounts": [{"source": "/tmp", "target": "/x" + PAYLOADS[1].replace(" ", "")}],
        },
        template=payload,
    )
    write_pod(pods_dir, "broken", pod_json='{"env": "<img src=x onerror=window.pwned=1>"}')
    dispatcher = Dispatcher(pods_dir, FakeRunner(_hostile_agent), transcript_dir)
    picker = PodPicker(dispatcher=dispatcher, interval=0.02, stop_timeout=2)
    try:
        for name in ("broken", "hostile"):
            picker.pod_select.value = name
            assert html_problems(picker.details.value, allowed_styles=PICKER_STYLES) == []
        picker.issue_url.value = "https://github.com/octocat/Hello-World/issues/1"
        picker.start_button.click()
        deadline = time.monotonic() + 60
        while not picker.status.value.startswith("hostile: exited"):
            assert time.monotonic() < deadline and ": failed" not in repr(picker), repr(picker)
            time.sleep(0.05)
        picker.join(30)
        entries = picker.output.outputs
        assert entries
        for entry in entries:
            assert html_problems(entry["data"].get("text/html", ""), (_CSS,)) == []
            assert not CONTROL.search(entry["data"]["text/plain"])
        assert not CONTROL.search(picker.status.value + repr(picker))
    finally:
        picker.join(30)
        picker.close()


# -- malformed events ---------------------------------------------------------------------

DEEP = 100_000
MALFORMED = [
    '{"type":"assistant","message":"str"}',
    '{"type":"assistant","message":{"content":"a plain string"}}',
    '{"type":"assistant","message":{"content":5}}',
    '{"type":"assistant","message":{"content":{"text":"x"}}}',
    '{"type":"assistant","message":{"content":[1,"x",null,[],{"type":7}]}}',
    '{"type":"assistant","message":{"content":[{"type":"text","text":["a"]}]}}',
    '{"type":"assistant","message":{"content":[{"type":"tool_use","name":null,"input":"x"}]}}',
    '{"type":"assistant","message":{"content":[{"type":"tool_use","name":{},"input":[1]}]}}',
    '{"type":"user","message":{"content":[{"type":"tool_result","content":{"a":[1]}}]}}',
    '{"type":"user","message":{"content":[{"type":"tool_result","content":[1,{"text":2}]}]}}',
    '{"type":"user","message":null}',
    '{"type":"result","subtype":"success","duration_ms":"12","num_turns":null}',
    '{"type":"result","subtype":"success","duration_ms":1e400,"num_turns":' + "9" * 500 + "}",
    '{"type":"result","subtype":"success","total_cost_usd":NaN,"duration_ms":Infinity}',
    '{"type":"result","usage":"x","permission_denials":"x","errors":"x","result":{"a":1}}',
    '{"type":"result","subtype":["x"],"is_error":"yes","permission_denials":[1,{"tool_name":2}]}',
    '{"type":"result"}',
    '{"type":"system"}',
    '{"type":"system","subtype":"init","tools":"x","model":{"a":1}}',
    '{"type":"system","subtype":"api_retry","attempt":"x","retry_delay_ms":-1e308}',
    '{"type":"system","subtype":"compact_boundary","compact_metadata":[1]}',
    '{"type":5}',
    '{"type":null}',
    '{"type":["a"]}',
    '{"type":"__class__"}',
    '{"type":"_on_system"}',
    '{"type":""}',
    '{"type":"rate_limit_event","rate_limit_info":"x"}',
    '{"type":"assistant","message":{"content":[{"type":"text","text":"nul\\u0000 and \\ud800 '
    'lone surrogate \\udfff and \\u001b[2J clear"}]}}',
    "{" + '"a":' * DEEP + "1" + "}" * DEEP,
    "{" + '"a":[' * DEEP + "]" * DEEP + "}",
    '{"type":"assistant","message":{"content":[{"type":"tool_use","name":"X","input":'
    + '{"a":' * 900
    + '"deep"'
    + "}" * 900
    + "}]}}",
    "{" * DEEP + "}" * DEEP,
    '{"usage":' + "[" * DEEP + "]" * DEEP + ',"total_cost_usd":1}',
    "[" * DEEP + "]" * DEEP,
    "{\ufffd\ufffd invalid utf-8 replaced \ufffd}",
    "\x00\x01\x02 binary \x7f\x9b2J",
    "",
    "{}",
    '{"type":"assistant","message":{"content":[{"type":"text","text":"'
    + "[" * 50_000
    + "x"
    + "](" * 20_000
    + '"}]}}',
    '{"type":"assistant","message":{"content":[{"type":"text","text":"'
    + "> " * 20_000
    + "- " * 20_000
    + '"}]}}',
    '{"type":"assistant","message":{"content":[{"type":"text","text":"' + "x" * 5_000_000 + '"}]}}',
]


@pytest.mark.parametrize("line", MALFORMED, ids=range(len(MALFORMED)))
def test_any_line_renders_and_nothing_raises(line):
    lines = render_output_line(line, mask=Masker(["secret-value"]))
    for rendered in lines:
        assert not CONTROL.search(rendered.text)
        assert len(rendered.text) <= render_module.MAX_MARKDOWN_LINE_CHARS + 100
        assert html_problems(rendered.to_html()) == []
        rendered.to_html().encode("utf-8")
    view = SessionView("pod")
    view.add(Event(EventType.OUTPUT, line))
    assert html_problems(view.html(), (_CSS,)) == []
    view.text().encode("utf-8")
    if line.strip() and line.strip() not in ("{}",) and not line.startswith('{"type":"result'):
        assert lines, "a line was dropped silently"


def test_a_renderer_failure_falls_back_to_text(monkeypatch, caplog):
    def broken(self, obj):
        raise RuntimeError("bug")

    monkeypatch.setattr(StreamRenderer, "_on_assistant", broken)
    line = '{"type":"assistant","message":{"content":[]}}'
    with caplog.at_level(logging.DEBUG, logger="cldpd_magic.render"):
        assert [(x.kind, x.text) for x in render_output_line(line)] == [("text", line)]
    assert "shown as text" in caplog.text

    view = SessionView("pod")
    monkeypatch.setattr(StreamRenderer, "render", broken)
    view.add(Event(EventType.OUTPUT, "\x1b[31mboom\x1b[0m"))
    assert view.text().splitlines()[-1] == "boom"


def test_ansi_colours_and_terminal_escapes_never_reach_text_or_html():
    coloured = "\x1b[1;31mred\x1b[0m \x1b]0;pwned title\x07\x1b[2J\x1b[H\x9b31mdone\u202e"
    view = SessionView("pod")
    view.add(Event(EventType.OUTPUT, coloured))
    view.add(Event(EventType.STDERR, coloured))
    event = {"type": "assistant", "message": {"content": [{"type": "text", "text": coloured}]}}
    view.add(Event(EventType.OUTPUT, json.dumps(event)))
    assert view.text().splitlines()[1:] == ["red done", "red done", "red done"]
    assert "\x1b" not in view.html() and "\x9b" not in view.html()


# -- secrets after decoding ---------------------------------------------------------------


def _escaped(text: str) -> str:
    """Every character as a JSON \\uXXXX escape."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


def _secret_lines(secret: str, written: str) -> list[str]:
    """Stream-json lines carrying ``written`` (a JSON-escaped form of the secret)."""
    lines = [
        line.replace("@@", written)
        for line in (
            '{"type":"assistant","message":{"content":[{"type":"text","text":"key @@ here"}]}}',
            '{"type":"assistant","message":{"content":[{"type":"text","text":"@@"}]}}',
            '{"type":"assistant","message":{"content":[{"type":"thinking","thinking":"@@"}]}}',
            '{"type":"assistant","message":{"content":[{"type":"tool_use","name":"Bash",'
            '"input":{"command":"export K=@@"}}]}}',
            '{"type":"user","message":{"content":[{"type":"tool_result","content":"@@"}]}}',
            '{"type":"result","subtype":"success","is_error":true,"result":"API Error: @@"}',
            '{"type":"result","subtype":"success","result":"The key is `@@`.\\n\\n```\\n@@\\n```",'
            '"permission_denials":[{"tool_name":"Bash","tool_input":{"command":"@@"}}]}',
            '{"type":"system","subtype":"api_retry","error":"@@"}',
            '{"type":"mystery","field":"@@"}',
        )
    ]
    html_forms = [
        "".join(f"&#{ord(c)};" for c in secret),
        "".join(f"&#x{ord(c):x};" for c in secret),
    ]
    for form in html_forms:
        text = f"see [{form}](https://x.io/{form}) and {form}"
        lines.append(json.dumps({"type": "assistant", "message": {"content": [text]}}))
    return lines


@pytest.mark.parametrize(
    ("secret", "style"),
    [
        (SECRET, "every character escaped"),
        ("p&ss<w>rd-1234", "Go-style escapes"),
        ("tok*en_with_*stars", "every character escaped"),
    ],
)
def test_secrets_written_with_json_escapes_are_masked(secret, style):
    if style == "Go-style escapes":
        written = secret.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    else:
        written = _escaped(secret)
    masker = Masker([secret])
    view = SessionView("pod", masker=masker)
    for line in _secret_lines(secret, written):
        assert secret not in masker(line)  # what the session itself masks is the raw line
        view.add(Event(EventType.OUTPUT, line))
        view.add(Event(EventType.OUTPUT, masker(line)))
    text, markup = view.text(), view.html()
    for shown in (
        text,
        markup,
        html.unescape(markup),
        html.unescape(re.sub("<[^>]+>", "", markup)),
    ):
        assert secret not in shown
    assert MASK in text and MASK in markup
    for line in render_output_line(_secret_lines(secret, written)[0], mask=masker):
        assert secret not in line.text + html.unescape(line.to_html())


def test_a_session_feed_masks_what_decoding_reveals(tmp_path):
    lines = _secret_lines(SECRET, _escaped(SECRET))

    def job(ctl) -> int:
        ctl.emit(EventType.CONTAINER_STARTED, "c")
        ctl.stdout.write("".join(line + "\n" for line in lines))
        return 0

    session = Session("pod", "c", job, tmp_path, secrets=[SECRET])
    published: list[str] = []
    view = SessionView("pod", masker=session.mask)
    feed = LiveFeed(session, view, lambda v: published.append(v.html() + v.text()), 0.02)
    assert feed.join(30)
    assert published and all(SECRET not in html.unescape(p) for p in published)
    assert view.total_lines >= len(lines)


@pytest.mark.parametrize(
    "written",
    [
        "key {a}**{b}**{c} here",
        "{a}`{b}`{c}",
        "[{a}](https://x.io){b}{c}",
        "~~{a}~~{b}*{c}*",
        "| {a}**{b}**{c} |\n|---|\n| x |",
    ],
)
def test_a_secret_split_by_markdown_markup_is_masked(written):
    """Markup hides a secret from the raw line's mask; the rendered text shows it whole."""
    secret = "sk-ant-0123456789abcdef"
    a, b, c = secret[:11], secret[11:15], secret[15:]
    text = written.format(a=a, b=b, c=c)
    line = json.dumps(
        {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}}
    )
    masker = Masker([secret])
    view = SessionView("pod", masker=masker)
    view.add(Event(EventType.OUTPUT, masker(line)))
    visible = html.unescape(re.sub("<[^>]+>", "", view.html()))
    assert secret not in visible and MASK in visible


@pytest.mark.parametrize("line", ["![" * 10000, "[" * 3000, "*a" * 5000, "x" * 300_000])
def test_markdown_that_would_parse_slowly_is_shown_as_text(line):
    """Nested brackets take markdown-it time quadratic in their number: such text is text."""
    shown = markdown_to_html(line)
    assert shown.startswith("<pre>") and html.unescape(shown[5:-6]) == line
    assert markdown_to_html("[a](https://x.io) *b*").startswith("<p><a ")
