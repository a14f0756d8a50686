"""Hostile agent output and a checker of the HTML cldpd emits for it.

``PAYLOADS`` are known XSS payloads (each, if it ran, would set ``window.pwned``);
``hostile_lines(payload)`` puts one payload into every place of Claude Code's stream-json
an agent controls; ``html_problems(markup)`` parses HTML with Python's ``html.parser`` and
lists everything that is not plain, inert markup.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

PAYLOADS = [
    '[x](https://x.io/"onmouseover="window.pwned=1//)',
    '[PR](https://github.com/o/r/pull/1"autofocus=""onfocus="window.pwned=1"x=")',
    "[a](javascript:window.pwned=1)",
    "[a](JaVaScRiPt:window.pwned=1)",
    "[a](java\tscript:window.pwned=1)",
    "[a](jav&#x09;ascript:window.pwned=1)",
    "[a](&#106;avascript:window.pwned=1)",
    "[a](javascript&colon;window.pwned=1)",
    "[a](<javascript:window.pwned=1>)",
    "[a](%6Aavascript:window.pwned=1)",
    "[a](data:text/html;base64,PHNjcmlwdD53aW5kb3cucHduZWQ9MTwvc2NyaXB0Pg==)",
    "[a](DATA:text/html,<script>window.pwned=1</script>)",
    "[a](vbscript:msgbox(1))",
    "[a](VbScRiPt:msgbox(1))",
    "[a](//evil.example/x)",
    "[empty]() ![empty]() [e2](<>)",
    "[a](/api/contents?x=1)",
    "<javascript:window.pwned=1>",
    "<data:text/html,<script>window.pwned=1</script>>",
    "<script>window.pwned=1</script>",
    "<img src=x onerror=window.pwned=1>",
    '<img src="x" onerror="window.pwned=1">',
    "<svg onload=window.pwned=1>",
    "<svg><script>window.pwned=1</script></svg>",
    '<iframe src="javascript:window.pwned=1"></iframe>',
    '<iframe srcdoc="<script>parent.pwned=1</script>"></iframe>',
    '![x](https://x.io/a.png"onerror="window.pwned=1)',
    '![x" onerror="window.pwned=1](https://x.io/a.png)',
    "![x](javascript:window.pwned=1)",
    "![x](https://x.io/track.png)",
    '<a href="javascript:window.pwned=1">x</a>',
    '<a href="&#x6A;avascript:window.pwned=1">x</a>',
    "<details open ontoggle=window.pwned=1>",
    "<body onload=window.pwned=1>",
    '<input autofocus onfocus="window.pwned=1">',
    "<form><button formaction=javascript:window.pwned=1>x</button></form>",
    "<object data=javascript:window.pwned=1>",
    "<embed src=javascript:window.pwned=1>",
    '<meta http-equiv=refresh content="0;url=javascript:window.pwned=1">',
    "<base href=javascript:/>",
    "<style>*{background:url(javascript:window.pwned=1)}</style>",
    '<div style="background:url(javascript:window.pwned=1)">x</div>',
    "<math><mtext><table><mglyph><style><img src=x onerror=window.pwned=1>",
    "[[x](javascript:window.pwned=1)](https://ok.example)",
    '[x](https://ok.example "t\\" onmouseover=\\"window.pwned=1")',
    "[x][r]\n\n[r]: javascript:window.pwned=1",
    '[x][r]\n\n[r]: https://x.io "t\\" onmouseover=\\"window.pwned=1"',
    "&lt;script&gt;window.pwned=1&lt;/script&gt;",
    "&#60;img src=x onerror=window.pwned=1&#62;",
    '```"><img src=x onerror=window.pwned=1>\nx\n```',
    '```js" onmouseover="window.pwned=1\ncode\n```',
    "`<img src=x onerror=window.pwned=1>`",
    "| a |\n|---|\n| <img src=x onerror=window.pwned=1> |",
    "| a |\n|:-:|\n| [x](javascript:window.pwned=1) |",
    "~~<svg onload=window.pwned=1>~~",
    "\u202e<img src=x onerror=window.pwned=1>\u202c",
    "\ufe64script\ufe65window.pwned=1\ufe64/script\ufe65",
    "\uff1cimg src=x onerror=window.pwned=1\uff1e",
    "\x1b]8;;javascript:window.pwned=1\x1b\\link\x1b]8;;\x1b\\",
    "\x1b[31m<b onmouseover=window.pwned=1>red</b>\x1b[0m\x1b]0;title\x07\x1b[2J",
    "<!--><img src=x onerror=window.pwned=1>-->",
    "<![CDATA[<img src=x onerror=window.pwned=1>]]>",
    "x\x00<script>window.pwned=1</script>",
    "<scr<script>ipt>window.pwned=1</scr</script>ipt>",
    '"><img src=x onerror=window.pwned=1>',
    "'><svg onload=window.pwned=1>",
]

ALLOWED_TAGS = frozenset(
    re.split(
        r"\s+",
        "div p br hr h1 h2 h3 h4 h5 h6 ul ol li code pre em strong s a table thead tbody "
        "tr th td blockquote caption b i style details summary span",
    )
)
_SAFE_HREF = re.compile(r"(?:https?://|mailto:|#)", re.IGNORECASE)
_SAFE_CLASS = re.compile(r"cldpd-[\w-]+|language-[\w+#.-]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class _Checker(HTMLParser):
    def __init__(self, allowed_css: frozenset[str], allowed_styles: frozenset[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.allowed_css = allowed_css
        self.allowed_styles = allowed_styles
        self.problems: list[str] = []
        self.in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ALLOWED_TAGS:
            self.problems.append(f"element <{tag}>")
        self.in_style = tag == "style"
        for name, value in attrs:
            value = value or ""
            if name == "href":
                if not _SAFE_HREF.match(value):
                    self.problems.append(f"href {value!r}")
            elif name == "class":
                if not all(_SAFE_CLASS.fullmatch(c) for c in value.split()):
                    self.problems.append(f"class {value!r}")
            elif name == "target":
                if value != "_blank":
                    self.problems.append(f"target {value!r}")
            elif name == "rel":
                if not {"noopener", "noreferrer"} <= set(value.split()):
                    self.problems.append(f"rel {value!r}")
            elif name == "style":
                if value not in self.allowed_styles:
                    self.problems.append(f"style {value!r}")
            elif name == "start":
                if not value.isdigit():
                    self.problems.append(f"start {value!r}")
            elif name != "title":
                self.problems.append(f"attribute {name}={value!r} on <{tag}>")
        if tag == "a" and dict(attrs).get("target") == "_blank" and "rel" not in dict(attrs):
            self.problems.append("a link opening a tab without rel")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self.in_style = False

    def handle_endtag(self, tag: str) -> None:
        if tag not in ALLOWED_TAGS:
            self.problems.append(f"end tag </{tag}>")
        self.in_style = False

    def handle_data(self, data: str) -> None:
        if self.in_style and data not in self.allowed_css:
            self.problems.append(f"style element {data[:80]!r}")
        if _CONTROL.search(data):
            self.problems.append(f"control character in {data[:80]!r}")

    def handle_comment(self, data: str) -> None:
        self.problems.append(f"comment {data[:80]!r}")

    def handle_decl(self, decl: str) -> None:
        self.problems.append(f"declaration {decl[:80]!r}")

    def handle_pi(self, data: str) -> None:
        self.problems.append(f"processing instruction {data[:80]!r}")

    def unknown_decl(self, data: str) -> None:
        self.problems.append(f"declaration {data[:80]!r}")


def html_problems(
    markup: str, allowed_css: tuple[str, ...] = (), allowed_styles: tuple[str, ...] = ()
) -> list[str]:
    """Everything in ``markup`` that could be active or is not in the allow-list.

    Args:
        markup: The HTML.
        allowed_css: Contents of ``<style>`` elements that are ours (exactly).
        allowed_styles: ``style`` attribute values that are ours (exactly).

    Returns:
        One description per problem; empty when the HTML is inert.
    """
    css = frozenset(c.removeprefix("<style>").removesuffix("</style>") for c in allowed_css)
    checker = _Checker(css, frozenset(allowed_styles))
    checker.feed(markup)
    checker.close()
    problems = checker.problems
    if "\x1b" in markup:
        problems.append("a raw escape character")
    return problems


def hostile_lines(payload: str) -> list[str]:
    """Stream-json lines (and one plain line) carrying ``payload`` in every agent-made field."""
    tool_input = {"command": payload, "description": payload, payload[:20]: payload}
    events: list[dict] = [
        {"type": "system", "subtype": "init", "session_id": payload, "model": payload,
         "permissionMode": payload, "tools": [payload], "claude_code_version": payload,
         "mcp_servers": [{"name": payload}]},
        {"type": "system", "subtype": "api_retry", "attempt": payload, "max_retries": 10,
         "retry_delay_ms": payload, "error_status": payload, "error": payload},
        {"type": "system", "subtype": "compact_boundary",
         "compact_metadata": {"trigger": payload, "pre_tokens": payload}},
        {"type": "system", "subtype": payload, "note": payload},
        {"type": "assistant", "message": {"content": [
            {"type": "thinking", "thinking": payload},
            {"type": "text", "text": payload},
            {"type": "text", "text": f"See {payload} and more\n\n{payload}"},
            {"type": "tool_use", "name": payload, "input": tool_input},
            {"type": "tool_use", "name": "Bash", "input": tool_input},
            {"type": payload},
            payload,
        ]}},
        {"type": "assistant", "message": {"content": payload}},
        {"type": "user", "message": {"content": [
            {"type": "tool_result", "content": payload},
            {"type": "tool_result", "is_error": True,
             "content": [{"type": "text", "text": payload}]},
            {"type": "text", "text": payload},
        ]}},
        {"type": "user", "message": {"content": payload}},
        {"type": "rate_limit_event", "rate_limit_info": {"status": payload}},
        {"type": payload, payload: payload},
        {"type": "result", "subtype": "success", "is_error": False, "num_turns": payload,
         "duration_ms": payload, "total_cost_usd": payload, "session_id": payload,
         "result": f"Summary: {payload}", "usage": {"output_tokens": payload},
         "permission_denials": [{"tool_name": payload, "tool_input": tool_input}]},
        {"type": "result", "subtype": "success", "is_error": True, "result": payload},
        {"type": "result", "subtype": payload, "is_error": True, "errors": [payload]},
    ]  # fmt: skip
    return [json.dumps(e) for e in events] + [payload, json.dumps(payload)]
