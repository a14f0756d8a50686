"""A run's changes in JupyterLab: the collapsed section opens onto highlighted diffs, and no
script from a file's name or content runs, even on interaction.

A cell shows the changes of a patch whose file names, contents and commit subjects hold
the XSS corpus (built from text, no Docker). Opening the section and a file shows its diff
highlighted (Pygments' classes, the section's colours); a control cell afterwards shows
HTML that does run a handler, proving the page executes what it is given; ``window.pwned``
must still be undefined.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import nbformat
import pytest
from html_safety import PAYLOADS

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.kernel]

DIFF_CELL = """\
import base64, json
from IPython.display import HTML, display
from cldpd_magic.render import diff as diff_view
from cldpd_magic.runs.changes import Changes
corpus = json.loads(base64.b64decode("{data}").decode())
changes = Changes.from_patch(corpus["patch"], commits=corpus["payloads"][:5])
display(HTML(diff_view.changes_html(changes, title="xss-run")))
"""
CONTROL_CELL = """\
from IPython.display import HTML, display
display(HTML('<img src="missing-image" onerror="window.pwnedControl = 1">'))
"""
PWNED_JS = "() => [window.pwned, window.parent.pwned, window.top.pwned].map(String)"
GREEN = "rgb(46, 125, 50)"


def _patch() -> str:
    parts = [
        "diff --git a/app.py b/app.py\n--- a/app.py\n+++ b/app.py\n@@ -1,2 +1,2 @@\n"
        " def greet():\n-    return 'hello'\n+    return 'hi'\n"
    ]
    for i, payload in enumerate(PAYLOADS):
        name = f"f{i}-" + payload.replace("\n", " ").replace("/", "%")
        lines = "".join(f"+{line}\n" for line in payload.split("\n"))
        count = payload.count("\n") + 1
        parts.append(
            f"diff --git a/{name} b/{name}\nnew file mode 100644\n--- /dev/null\n+++ b/{name}\n"
            f"@@ -0,0 +1,{count} @@\n{lines}"
        )
    return "".join(parts)


def _write_notebook(path: Path) -> None:
    corpus = {"payloads": PAYLOADS, "patch": _patch()}
    data = base64.b64encode(json.dumps(corpus).encode()).decode()
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)",
                                       "language": "python", "name": "python3"}  # fmt: skip
    notebook.cells = [
        nbformat.v4.new_code_cell(DIFF_CELL.replace("{data}", data)),
        nbformat.v4.new_code_cell(CONTROL_CELL),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, path)


def test_a_diff_section_opens_highlighted_and_runs_no_script(
    notebook: Any, expect: Any, lab_root: Path
) -> None:
    lab = notebook.lab
    context = notebook.page.context
    context.route(
        "**/*",
        lambda route: route.continue_() if route.request.url.startswith(lab.url) else route.abort(),
    )
    _write_notebook(lab_root / "diff" / "changes.ipynb")
    notebook.open("diff/changes.ipynb")
    page = notebook.page
    notebook.run_cell(0)
    notebook.wait_idle(120)
    out = notebook.output(0)
    section = out.locator("details.cldpd-changes").first
    title = section.locator(".cldpd-changes-title")
    expect(title).to_contain_text(f"xss-run · Changes: {len(PAYLOADS) + 1} files")
    first_file = section.locator("details.cldpd-file").first
    expect(first_file).to_be_hidden()  # collapsed: the section shows its title only
    notebook.shot("collapsed", out)

    title.click()
    expect(first_file).to_be_visible()
    added = first_file.locator(".cldpd-diff .cldpd-gi", has_text="return 'hi'")
    expect(added).to_be_hidden()  # each file collapsed too
    first_file.locator("summary").click()
    expect(added).to_be_visible()
    expect(added).to_have_text("+    return 'hi'")
    assert added.evaluate("e => getComputedStyle(e).color") == GREEN
    removed = first_file.locator(".cldpd-diff .cldpd-gd", has_text="return 'hello'")
    assert removed.evaluate("e => getComputedStyle(e).color") == "rgb(198, 40, 40)"
    notebook.shot("opened", out)

    rendered = out.locator(".jp-OutputArea-output")
    files = rendered.locator("details.cldpd-file")
    for index in range(files.count()):  # open every file: their contents are the payloads
        summary = files.nth(index).locator("summary")
        summary.scroll_into_view_if_needed()
        summary.hover()
        summary.click()
    assert rendered.locator("script, img, svg, iframe, object, embed, input, form").count() == 0
    assert rendered.locator("[onerror], [onload], [onfocus], [onmouseover], [style]").count() == 0
    assert rendered.locator("a").count() == 0  # a diff's text is never a link
    page.keyboard.press("Tab")
    notebook.shot("every-file-open", out)

    notebook.run_cell(1)
    notebook.wait_idle(60)
    page.wait_for_function("() => window.pwnedControl === 1", timeout=30_000)
    assert page.evaluate(PWNED_JS) == ["undefined"] * 3
