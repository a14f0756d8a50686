"""JupyterLab in headless Chromium: a person clicks Allow under a blocking run, the tool runs.

The agent is the real Claude Code CLI against the scripted model (the pods of
tests/test_real_claude.py, their fixtures taken under their names).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import test_real_claude as real_claude
from test_jupyterlab import KERNELSPEC

from cldpd_magic.model_server.server import ScriptedModelServer, ToolCall, Turn

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.kernel, pytest.mark.claude]

claude_image = real_claude.claude_image
offline_pod = real_claude.offline_pod
#: The model's key: the lab's kernels do not inherit this test's environment, so the pod
#: gets it in its pod.json (it is masked all the same).
KEY = "sk-ant-browser-" + "0123456789abcdef"


@pytest.fixture
def pods_dir(lab_root: Path) -> Path:
    """Pods go where the lab's notebooks find them (``../browser-pods``)."""
    return lab_root / "browser-pods"


def write_notebook(path: Path, sources: list[str]) -> None:
    cells = [{"cell_type": "code", "metadata": {}, "source": s, "execution_count": None,
              "outputs": []} for s in sources]  # fmt: skip
    notebook = {"cells": cells, "metadata": {"kernelspec": KERNELSPEC}, "nbformat": 4,
                "nbformat_minor": 5}  # fmt: skip
    path.write_text(json.dumps(notebook, indent=1))


def open_notebook(notebook: Any, path: str, tries: int = 3) -> None:
    """Open a notebook, again if the page lost its requests: Chromium fails them with
    ERR_NETWORK_CHANGED whenever another container's interface comes or goes."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(tries):
        try:
            notebook.open(path, timeout=60)
            return
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise


def test_clicking_allow_under_a_blocking_run_runs_the_tool(
    notebook: Any, expect: Any, no_leftovers: Any, offline_pod: Any, lab: Any, tmp_path: Path
) -> None:
    proof = tmp_path / "work" / "asked.txt"
    scenario = [Turn(tool_calls=[ToolCall("Bash", {"command": "touch asked.txt"})]),
                Turn(delay=8, text="Touched **asked.txt**.")]  # fmt: skip
    with ScriptedModelServer(scenario, api_key=KEY) as server:
        name = offline_pod(server.url, args=["--max-turns", "6"], env={"ANTHROPIC_API_KEY": KEY},
                           extra={"interactive": True, "inheritEnv": []})  # fmt: skip
        no_leftovers(name)
        write_notebook(lab.root / "notebooks" / "approve.ipynb", [
            '%load_ext cldpd_magic\n%config CldpdMagics.pods_dir = "../browser-pods"\n'
            '%config CldpdMagics.transcript_dir = "transcripts"',
            f"%cldpd_start {name} {real_claude.URL}",
            "print('the next cell ran')",
        ])  # fmt: skip
        open_notebook(notebook, "notebooks/approve.ipynb")
        notebook.run_all()
        out = notebook.output(1)
        row = out.locator(".cldpd-approvals .widget-hbox")
        expect(row.locator(".widget-label")).to_have_text("Bash: touch asked.txt", timeout=180_000)
        allow = row.get_by_role("button", name=re.compile(r"^\W*Allow$"))
        for button in (allow, row.get_by_role("button", name=re.compile(r"^\W*Deny$")),
                       row.get_by_role("button", name="Always allow Bash")):  # fmt: skip
            expect(button).to_be_visible()
        expect(out.locator(".cldpd-approval")).to_have_text(
            "⚠ approval needed: Bash: touch asked.txt"
        )
        assert not proof.exists()
        assert "*" in notebook.execution_counts()[1]  # the cell blocks, waiting
        notebook.shot("asked", out)

        allow.click()
        deadline = time.monotonic() + 60
        while not proof.exists():
            assert time.monotonic() < deadline, "the tool did not run after the click"
            time.sleep(0.1)
        assert "*" in notebook.execution_counts()[1]  # it ran while the cell still blocked
        expect(row).to_have_count(0)
        expect(out.locator(".cldpd-allowed")).to_have_text("✓ allowed Bash (by you)")
        notebook.shot("allowed", out)

        expect(out.locator(".cldpd-status")).to_have_text(
            re.compile(rf"^{name}: exited 0 after "), timeout=120_000
        )
        expect(out.locator(".cldpd-md strong", has_text="asked.txt")).to_be_visible()
        notebook.wait_idle(60)
        expect(notebook.output(2)).to_contain_text("the next cell ran")
        notebook.shot("done", out)
    assert KEY not in out.inner_text()
