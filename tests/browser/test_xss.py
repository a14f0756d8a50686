"""The XSS corpus in JupyterLab: no payload runs in a real browser, not even on interaction.

A cell displays the view of a session fed every payload in every field an agent controls
(built from events, no Docker), plus tables made of the payloads. Each payload would set
``window.pwned`` (or ``parent.pwned``) if it ran. A control cell afterwards shows HTML that
does run a handler, proving the page executes what it is given; then every link of the
output is hovered, focused and clicked, and ``window.pwned`` must still be undefined.
Requests to anything but the JupyterLab server are aborted, so a click goes nowhere.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import nbformat
import pytest
from html_safety import PAYLOADS, hostile_lines

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.kernel]

CORPUS_CELL = """\
import base64, json
from IPython.display import display
from cldpd_magic.render import Report, SessionView, Table
from cldpd_magic.events import Event, EventType
corpus = json.loads(base64.b64decode("{data}").decode())
view = SessionView("xss-corpus", max_lines=100_000, transcript=corpus["payloads"][0])
for kind, data in corpus["events"]:
    view.add(Event(EventType[kind], data))
display(view.bundle(), raw=True)
table = Table(corpus["payloads"][:3], [corpus["payloads"]] * 2, title=corpus["payloads"][1],
              notes=corpus["payloads"])
display(Report(table, Table(("x",), [], title=corpus["payloads"][2])))
"""
CONTROL_CELL = """\
from IPython.display import HTML, display
display(HTML('<img src="missing-image" onerror="window.pwnedControl = 1">'))
"""
PWNED_JS = "() => [window.pwned, window.parent.pwned, window.top.pwned].map(String)"


def _corpus() -> str:
    events: list[tuple[str, str]] = []
    for payload in PAYLOADS:
        events.append(("BUILD_STARTED", payload))
        events.append(("CONTAINER_STARTED", payload))
        events.extend(("OUTPUT", line) for line in hostile_lines(payload))
        events.append(("STDERR", payload))
    events.append(("ERROR", PAYLOADS[1]))
    corpus = {"payloads": PAYLOADS, "events": events}
    return base64.b64encode(json.dumps(corpus).encode()).decode()


def _write_notebook(path: Path) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)",
                                       "language": "python", "name": "python3"}  # fmt: skip
    notebook.cells = [
        nbformat.v4.new_code_cell(CORPUS_CELL.replace("{data}", _corpus())),
        nbformat.v4.new_code_cell(CONTROL_CELL),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, path)


def test_no_payload_runs_in_jupyterlab(notebook: Any, expect: Any, lab_root: Path) -> None:
    """The corpus renders as text and links; hovering, focusing and clicking runs nothing."""
    lab = notebook.lab
    context = notebook.page.context
    context.route(
        "**/*",
        lambda route: route.continue_() if route.request.url.startswith(lab.url) else route.abort(),
    )
    _write_notebook(lab_root / "xss" / "corpus.ipynb")
    notebook.open("xss/corpus.ipynb")
    page = notebook.page

    notebook.run_cell(0)
    notebook.wait_idle(120)
    out = notebook.output(0)
    expect(out.locator(".cldpd-status")).to_have_text("xss-corpus: failed: " + PAYLOADS[1])
    expect(out.locator(".cldpd-md").first).to_be_visible()
    expect(out.locator(".cldpd-table").first).to_be_attached()
    rendered = out.locator(".jp-OutputArea-output")  # what the cell showed, not Lab's chrome
    assert rendered.locator("script, img, svg, iframe, object, embed, input, form").count() == 0
    assert rendered.locator("[onerror], [onload], [onfocus], [onmouseover], [style]").count() == 0
    notebook.shot("corpus", out)

    notebook.run_cell(1)
    notebook.wait_idle(60)
    page.wait_for_function("() => window.pwnedControl === 1", timeout=30_000)
    assert page.evaluate(PWNED_JS) == ["undefined"] * 3

    links = rendered.locator("a")
    hrefs = links.evaluate_all("(all) => all.map(a => a.getAttribute('href') || '')")
    assert len(hrefs) > len(PAYLOADS) // 2  # the corpus's safe links are links
    assert all(h.startswith(("http://", "https://", "mailto:", "#")) for h in hrefs if h)
    seen: set[str] = set()
    for index, href in enumerate(hrefs):
        if href in seen:  # one of each target: the DOM checks above cover every element
            continue
        seen.add(href)
        link = links.nth(index)
        link.scroll_into_view_if_needed()
        link.hover()
        link.focus()
        link.click()  # opens a tab whose request is aborted
        for other in context.pages:
            if other is not page:
                other.close()
        assert page.evaluate(PWNED_JS) == ["undefined"] * 3, href
    out.locator(".cldpd-body").first.hover()
    page.keyboard.press("Tab")
    assert page.evaluate(PWNED_JS) == ["undefined"] * 3
    notebook.shot("after-interaction", out)
