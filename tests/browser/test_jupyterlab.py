"""JupyterLab in headless Chromium: the notebooks run, the picker works, big output stays light.

These tests look at what a person sees: the rendered page, not the kernel's messages.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.kernel]

ISSUE = "https://github.com/octocat/Hello-World/issues/1"
#: Rendered output lines a cell may hold (the tail is 200 lines by default).
MAX_DOM_LINES = 300
#: Seconds a click on a cell may take to select it while output streams.
CLICK_ANSWER = 5.0
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


@pytest.fixture
def pods_dir(lab_root: Path) -> Path:
    """Pods made by ``make_pod`` go where the lab's notebooks find them (``../browser-pods``)."""
    return lab_root / "browser-pods"


def _write_notebook(path: Path, cells: list[tuple[str, str]]) -> None:
    """Write a notebook of (cell_type, source) cells."""
    notebook = {
        "cells": [
            {"cell_type": kind, "metadata": {}, "source": source}
            | ({"execution_count": None, "outputs": []} if kind == "code" else {})
            for kind, source in cells
        ],
        "metadata": {"kernelspec": KERNELSPEC},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook, indent=1))


def _unexpected_errors(notebook: Any) -> list[str]:
    """Sources of cells that show an error without being tagged raises-exception."""
    return notebook.page.evaluate(
        """() => window.jupyterapp.shell.currentWidget.content.widgets
             .filter(c => c.model.type === 'code')
             .filter(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'))
             .filter(c => !(c.model.getMetadata('tags') || []).includes('raises-exception'))
             .map(c => c.model.sharedModel.getSource())"""
    )


def test_quickstart_runs_all_cells(notebook: Any, expect: Any, no_leftovers: Any) -> None:
    """Run > Run All Cells: the real Claude Code's rendered runs (scripted model), exit 0."""
    no_leftovers("quickstart")
    notebook.open("notebooks/01-quickstart.ipynb")
    notebook.shot("opened")
    notebook.run_all()

    start = notebook.find("%cldpd_start quickstart ")
    out = notebook.output(start)
    expect(out.locator(".cldpd-status")).to_have_text(
        re.compile(r"^quickstart: exited 0 after "), timeout=120_000
    )
    expect(out.locator(".cldpd-system", has_text="Claude Code 2.1.")).to_be_visible()
    expect(out.locator(".cldpd-thinking", has_text="greeting script")).to_be_visible()
    expect(out.locator(".cldpd-tool", has_text="Bash: sh hello.sh")).to_be_visible()
    expect(out.locator(".cldpd-tool_result", has_text="Hello, World!")).to_be_visible()
    expect(out.locator(".cldpd-result")).to_have_text(re.compile(r"^✓ done · 4 turns · "))
    notebook.shot("claude-run", out)

    resume = notebook.find("%cldpd_resume quickstart Add a test")
    out = notebook.output(resume)
    expect(out.locator(".cldpd-status")).to_have_text(
        re.compile(r"^quickstart resume: exited 0 after "), timeout=120_000
    )
    expect(out.locator(".cldpd-md strong", has_text="test_hello.sh")).to_be_visible()
    expect(out.locator(".cldpd-tool", has_text="Bash: sh test_hello.sh")).to_be_visible()
    expect(out.locator(".cldpd-tool_result", has_text="2 tests passed")).to_be_visible()
    expect(out.locator(".cldpd-result")).to_have_text(re.compile(r"^✓ done · 3 turns · "))
    shown = out.inner_text()
    assert '{"type"' not in shown and '"session_id"' not in shown, shown[:2000]
    assert "**test_hello.sh**" not in shown, "the Markdown was not rendered"
    notebook.shot("resume-run", out)

    notebook.wait_idle(180)
    notebook.shot("all-cells-run")
    prompts = notebook.execution_counts()
    assert all(re.fullmatch(r"\[\d+\]:", p) for p in prompts), f"cells not run: {prompts}"
    assert _unexpected_errors(notebook) == []


def test_picker_start_resume_stop(
    notebook: Any, expect: Any, no_leftovers: Any, docker_client: Any
) -> None:
    """The picker renders; a typed URL enables Start; output streams in; Stop ends the pod."""
    no_leftovers("demo-kept")
    notebook.page.set_viewport_size({"width": 1280, "height": 1600})  # the whole picker
    notebook.open("notebooks/02-pod-picker.ipynb")
    cell = notebook.find("PodPicker(")
    notebook.run_cell(cell)
    notebook.wait_idle(60)
    out = notebook.output(cell)
    select = out.locator(".widget-select select")
    url = out.get_by_placeholder("https://github.com/OWNER/REPO/issues/N")
    start = out.get_by_role("button", name="Start")
    resume = out.get_by_role("button", name="Resume")
    stop = out.get_by_role("button", name="Stop")
    status = out.locator(".widget-label", has_text=re.compile(r"^demo-kept: "))
    expect(select).to_be_visible(timeout=30_000)
    expect(select.locator("option", has_text="demo-kept")).to_have_count(1)
    expect(out.locator(".widget-html", has_text="keepAlive")).to_be_visible()
    for control in (url, start, resume, stop, out.get_by_role("button", name="Refresh")):
        expect(control).to_be_visible()
    expect(start).to_be_disabled()
    expect(status).to_have_text("demo-kept: not running")
    notebook.shot("picker", out)

    select.select_option("demo-kept")
    url.press_sequentially("octocat/Hello-World#1")
    expect(out.locator("div.widget-label", has_text="is not an issue URL")).to_be_visible()
    expect(start).to_be_disabled()
    url.fill("")
    url.press_sequentially(ISSUE)
    expect(start).to_be_enabled()
    notebook.shot("url-typed", out)

    # Every status the picker shows, as the page shows it, to see it go live.
    out.evaluate(
        """(root) => {
          window.seenStatus = [];
          const record = () => {
            const label = [...root.querySelectorAll('.widget-label')]
              .map(e => e.textContent).find(t => t.startsWith('demo-kept: '));
            const seen = window.seenStatus;
            if (label && seen[seen.length - 1] !== label) seen.push(label);
          };
          new MutationObserver(record).observe(
            root, {subtree: true, childList: true, characterData: true, attributes: true});
        }"""
    )
    start.click()
    view = out.locator(".widget-output .cldpd-view")
    expect(view.locator(".cldpd-text", has_text="step 3 of 3")).to_be_visible(timeout=120_000)
    expect(status).to_have_text(
        re.compile(r"^demo-kept: exited 0 after \S+s · container idle: resume or stop$")
    )
    seen = notebook.page.evaluate("() => window.seenStatus")
    assert any(re.search(r": (starting|building|running)", s) for s in seen), seen
    expect(stop).to_be_enabled()
    expect(start).to_be_disabled()
    notebook.shot("started", out)

    out.get_by_placeholder("Follow-up prompt for the running agent").fill(
        "[stream-json] Now add a test for the empty input."
    )
    expect(resume).to_be_enabled()
    resume.click()
    expect(view.locator(".cldpd-md h2", has_text="Stand-in agent")).to_be_visible(timeout=60_000)
    expect(view.locator(".cldpd-result")).to_have_text(re.compile(r"^✓ done · 3 turns · "))
    expect(status).to_have_text(re.compile(r"^demo-kept: exited 0 after "))
    notebook.shot("resumed", out)
    out.screenshot(path=notebook.folder / "pod-picker.png")

    stop.click()
    expect(status).to_have_text(re.compile(r"^demo-kept: stopped"), timeout=60_000)
    expect(stop).to_be_disabled()
    expect(start).to_be_enabled()
    assert docker_client.containers.list(all=True, filters={"name": "^/cldpd-demo-kept$"}) == []
    notebook.shot("stopped", out)


def test_big_output_keeps_the_page_responsive(
    notebook: Any, expect: Any, make_pod: Any, lab: Any
) -> None:
    """200,000 lines in a cell: clicks still answer and the DOM keeps a bounded tail."""
    pod = make_pod("seq 1 200000")
    _write_notebook(
        lab.root / "notebooks" / "big-output.ipynb",
        [
            ("markdown", "# 200,000 lines"),
            (
                "code",
                '%load_ext cldpd_magic\n%config CldpdMagics.pods_dir = "../browser-pods"\n'
                '%config CldpdMagics.transcript_dir = "transcripts"',
            ),
            ("code", f"%cldpd_start {pod} {ISSUE}"),
            ("markdown", "Another cell, to click on while the pod prints."),
            ("code", "print('the next cell ran')"),
        ],
    )
    notebook.open("notebooks/big-output.ipynb")
    notebook.run_all()
    out = notebook.output(2)
    expect(out.locator(".cldpd-view")).to_be_visible(timeout=120_000)

    lines = out.locator(".cldpd-body > div > div")
    targets = [notebook.cell(3), notebook.cell(0)]
    clicks: list[float] = []
    while_running = 0
    while len(clicks) < 2 or "*" in notebook.execution_counts()[1]:
        running = "running" in out.locator(".cldpd-status").inner_text()
        count = lines.count()
        assert count <= MAX_DOM_LINES, f"{count} output lines in the DOM while the pod runs"
        if running and not while_running:
            notebook.shot("streaming", out)
        target = targets[len(clicks) % 2]
        began = time.monotonic()
        target.click(timeout=CLICK_ANSWER * 1000)
        expect(target).to_have_class(re.compile(r"\bjp-mod-active\b"), timeout=CLICK_ANSWER * 1000)
        clicks.append(time.monotonic() - began)
        while_running += running
    assert while_running, "no click happened while the pod printed"

    notebook.wait_idle(120)
    expect(out.locator(".cldpd-status")).to_have_text(re.compile(rf"^{pod}: exited 0 after "))
    count = lines.count()
    assert 0 < count <= MAX_DOM_LINES, f"{count} output lines in the DOM"
    expect(lines.last).to_have_text("200000")
    expect(out.locator(".cldpd-elided")).to_contain_text("earlier lines not shown")
    expect(notebook.output(4)).to_contain_text("the next cell ran")
    notebook.shot("finished", out)
    answers = ", ".join(f"{c:.2f}" for c in clicks)
    print(f"{len(clicks)} clicks ({while_running} while the pod ran) answered in {answers} s")
