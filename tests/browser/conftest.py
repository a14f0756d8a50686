"""Fixtures of the browser tests: JupyterLab on a copy of the notebooks, headless Chromium.

``lab`` starts JupyterLab from this interpreter's environment on 127.0.0.1 (a free port,
no token) over a temporary root holding a copy of ``notebooks/`` (outputs stripped) and
``examples/pods`` in the layout the notebooks expect, plus ``browser-pods/`` for pods the
tests make. ``notebook`` opens a fresh browser page on it and drives the notebook UI.
Screenshots of every step, and on failure the page's HTML and the browser console, go to
``artifacts/browser/<test>/``; the session ends by printing that folder's path.

Without chromium, playwright or jupyterlab the tests skip, except in CI (``CI`` set),
where they fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "browser"
CHROMIUM = Path(os.environ.get("CLDPD_CHROMIUM", "/usr/bin/chromium"))
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}
#: JupyterLab settings: no news or update checks, every cell in the DOM.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}
_READY_JS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.context || !w.context.isReady || !w.content || !w.sessionContext) return false;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle' && k.connectionStatus === 'connected';
}"""
_PROMPTS_JS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  return w.content.widgets.filter(c => c.model.type === 'code')
    .map(c => c.node.querySelector('.jp-InputPrompt').textContent.trim());
}"""
_session_used = False


def _missing_requirements() -> list[str]:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"chromium ({CHROMIUM})")
    for module in ("playwright", "jupyterlab"):
        if importlib.util.find_spec(module) is None:
            missing.append(f"the Python package {module}")
    return missing


@pytest.fixture(scope="session")
def browser_requirements() -> None:
    """Chromium, playwright and jupyterlab are there; else skip, or fail in CI."""
    missing = _missing_requirements()
    if missing:
        message = f"browser tests need {', '.join(missing)}: run scripts/setup --browser"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def expect(browser_requirements: None) -> Any:
    """playwright's ``expect`` (imported here, so that without playwright the tests skip)."""
    from playwright.sync_api import expect

    return expect


@pytest.fixture(scope="session")
def artifacts(browser_requirements: None) -> Path:
    """``artifacts/browser/``, emptied at the start of the session."""
    global _session_used
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    _session_used = True
    return ARTIFACTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print where the screenshots, page dumps and logs of this session are."""
    if _session_used:
        terminalreporter.write_sep("-", "browser test artifacts")
        terminalreporter.write_line(f"screenshots and logs: {ARTIFACTS}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, for fixtures to see whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _strip_outputs(source: Path, target: Path) -> None:
    notebook = json.loads(source.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    target.write_text(json.dumps(notebook, indent=1))


@pytest.fixture(scope="session")
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The root JupyterLab serves: notebooks/ (outputs stripped), examples/pods, browser-pods/."""
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        _strip_outputs(notebook, root / "notebooks" / notebook.name)
    shutil.copytree(REPO / "examples" / "pods", root / "examples" / "pods")
    (root / "browser-pods").mkdir()
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line holds ``text`` (a path unique to this session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


class JupyterLab:
    """A JupyterLab server of this test session.

    Args:
        root: The directory it serves.
        home: A directory for its configuration, runtime files and transcripts.
        log: Where its log goes.

    Attributes:
        url: The base URL, e.g. ``http://127.0.0.1:PORT``.
        root: The directory it serves.
        runtime_dir: Its runtime directory (kernel connection files).
    """

    def __init__(self, root: Path, home: Path, log: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime_dir = home / "runtime"
        self.log = log
        settings = home / "lab-settings"
        for plugin, values in LAB_SETTINGS.items():
            path = settings / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(home / "config"),
            "JUPYTER_DATA_DIR": str(home / "data"),
            "JUPYTER_RUNTIME_DIR": str(self.runtime_dir),
            "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
            "IPYTHONDIR": str(home / "ipython"),
            "CLDPD_SESSIONS_DIR": str(home / "sessions"),
            "CLDPD_PODS_DIR": str(root / "examples" / "pods"),
        }
        cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0", "--IdentityProvider.token=",
            "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
            f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
        ]  # fmt: skip
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def api(self, method: str, path: str, timeout: float = 10) -> Any:
        """Call the server's REST API; returns the decoded JSON answer (None when empty)."""
        request = urllib.request.Request(f"{self.url}{path}", method=method)
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body = answer.read()
        return json.loads(body) if body else None

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = 90) -> None:
        """Wait until the server answers; fail with its log if it exits or never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"JupyterLab exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                self.api("GET", "/api/status", timeout=2)
                return
            time.sleep(0.25)
        pytest.fail(f"JupyterLab did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def shutdown_kernels(self) -> None:
        """Shut down every session and kernel of the server."""
        for session in self.api("GET", "/api/sessions"):
            with contextlib.suppress(OSError):
                self.api("DELETE", f"/api/sessions/{session['id']}", timeout=30)
        for kernel in self.api("GET", "/api/kernels"):
            with contextlib.suppress(OSError):
                self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=30)

    def stop(self) -> list[int]:
        """Shut down the kernels and the server; returns the pids of kernels left over.

        Leftover kernels (found by their connection files under the runtime directory)
        are killed.
        """
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.shutdown_kernels()
            with contextlib.suppress(OSError):
                self.api("POST", "/api/shutdown")
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        left = _pids_mentioning(str(self.runtime_dir))
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        return left


@pytest.fixture(scope="session")
def lab(
    artifacts: Path,
    docker_client: Any,
    lab_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[JupyterLab]:
    """A JupyterLab server over ``lab_root``; it and its kernels end with the session."""
    server = JupyterLab(lab_root, tmp_path_factory.mktemp("lab-home"), artifacts / "jupyterlab.log")
    try:
        server.wait_ready()
        yield server
    finally:
        left = server.stop()
    assert not left, f"kernel processes outlived the JupyterLab server: {left}"


@pytest.fixture(scope="module")
def browser(browser_requirements: None) -> Iterator[Any]:
    """Debian's Chromium, headless, driven by playwright; one per test module, since
    playwright's sync API marks an asyncio loop running in this thread while it lives, and
    later tests (the SDK's) run loops of their own here."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS
        )
        yield chromium
        chromium.close()


class Notebook:
    """A browser page on JupyterLab, with the notebook actions the tests need.

    Args:
        page: The playwright page.
        lab: The server.
        folder: Where this test's screenshots go.

    Attributes:
        page: The playwright page.
        console: Browser console messages and page errors, in order.
    """

    def __init__(self, page: Any, lab: JupyterLab, folder: Path) -> None:
        self.page = page
        self.lab = lab
        self.folder = folder
        self.console: list[str] = []
        self.shots = 0
        page.on("console", lambda m: self.console.append(f"[{m.type}] {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"[pageerror] {e}"))

    def open(self, path: str, timeout: float = 90) -> None:
        """Open a notebook (path relative to the root) in a workspace of its own.

        Waits until its kernel is connected and idle, then hides the left sidebar.
        """
        assert (self.lab.root / path).is_file(), f"{path} is missing from the lab's root"
        workspace = f"t{uuid.uuid4().hex[:8]}"
        self.page.goto(f"{self.lab.url}/lab/workspaces/{workspace}/tree/{path}")
        self.page.wait_for_function(_READY_JS, timeout=timeout * 1000, polling=200)
        self.page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
        self.page.evaluate(
            """() => window.jupyterapp.shell.currentWidget.content.widgets
                 .forEach((c, i) => c.node.setAttribute('data-test-cell', String(i)))"""
        )

    @property
    def panel(self) -> Any:
        """The open notebook's panel."""
        return self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")

    def cell(self, index: int) -> Any:
        """The cell at ``index`` (0-based, markdown cells included)."""
        return self.panel.locator(f".jp-Cell[data-test-cell='{index}']")

    def find(self, text: str) -> int:
        """The index of the first code cell whose source contains ``text``."""
        index = self.page.evaluate(
            """(text) => window.jupyterapp.shell.currentWidget.content.widgets.findIndex(
                 c => c.model.type === 'code' && c.model.sharedModel.getSource().includes(text))""",
            text,
        )
        assert index >= 0, f"no code cell of the notebook contains {text!r}"
        return index

    def output(self, index: int) -> Any:
        """The output area of the cell at ``index``."""
        return self.cell(index).locator(".jp-Cell-outputArea")

    def _prompts(self) -> list[str]:
        return self.page.evaluate(_PROMPTS_JS)

    def _run(self, action: Any) -> None:
        before = self._prompts()
        action()
        with contextlib.suppress(Exception):  # a cell may start and end within a poll
            self.page.wait_for_function(
                f"() => JSON.stringify(({_PROMPTS_JS})()) !== {json.dumps(json.dumps(before))}",
                timeout=10_000,
                polling=100,
            )

    def menu(self, menu: str, item: str) -> None:
        """Click an item of a menu of the menu bar."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{menu}$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()

    def run_all(self) -> None:
        """Run > Run All Cells, as a person would."""
        self._run(lambda: self.menu("Run", "Run All Cells"))

    def run_cell(self, index: int) -> None:
        """Select the cell at ``index`` and run it with Shift+Enter."""

        def action() -> None:
            self.cell(index).locator(".jp-InputPrompt").click()
            self.page.keyboard.press("Shift+Enter")

        self._run(action)

    def wait_idle(self, timeout: float = 120) -> None:
        """Wait until no cell runs or waits to run and the kernel is idle."""
        self.page.wait_for_function(
            f"() => ({_READY_JS})() && !({_PROMPTS_JS})().some(p => p.includes('*'))",
            timeout=timeout * 1000,
            polling=250,
        )

    def execution_counts(self) -> list[str]:
        """The input prompts of the code cells (``[3]:``, ``[ ]:``, ``[*]:``)."""
        return self._prompts()

    def shot(self, name: str, target: Any = None) -> Path:
        """Save a screenshot of the page (``target`` scrolled into view) as the next step."""
        self.shots += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.shots:02d}-{name}.png"
        if target is not None:
            target.scroll_into_view_if_needed()
        self.page.screenshot(path=path)
        return path

    def dump(self) -> None:
        """Save the page's HTML, the console and a screenshot (on failure)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "console.txt").write_text("\n".join(self.console) + "\n")
        with contextlib.suppress(Exception):
            (self.folder / "page.html").write_text(self.page.content())
        with contextlib.suppress(Exception):
            self.page.screenshot(path=self.folder / "failure.png")


@pytest.fixture
def notebook(
    browser: Any, lab: JupyterLab, artifacts: Path, request: pytest.FixtureRequest
) -> Iterator[Notebook]:
    """A fresh browser page on the server; its kernels are shut down after the test."""
    folder = artifacts / re.sub(r"[^\w.-]+", "_", request.node.name)
    folder.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    page = Notebook(context.new_page(), lab, folder)
    try:
        yield page
    finally:
        report = getattr(request.node, "report_call", None)
        if report is None or report.failed:
            page.dump()
            (folder / "jupyterlab.log").write_text(lab.log_tail(200) + "\n")
        context.close()
        lab.shutdown_kernels()


@pytest.fixture
def no_leftovers(docker_client: Any) -> Iterator[Any]:
    """``no_leftovers(*pods)``: after the test, no container ``cldpd-<pod>`` may remain.

    A container that existed before the call is someone else's and is left alone. A
    leftover of the test is removed and fails the test.
    """
    import docker.errors

    watched: list[str] = []

    def exists(name: str) -> bool:
        try:
            docker_client.containers.get(name)
        except docker.errors.NotFound:
            return False
        return True

    def watch(*pods: str) -> None:
        watched.extend(f"cldpd-{p}" for p in pods if not exists(f"cldpd-{p}"))

    yield watch

    deadline = time.monotonic() + 15  # a stop in progress removes its container
    left = [name for name in watched if exists(name)]
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [name for name in left if exists(name)]
    for name in left:
        with contextlib.suppress(docker.errors.APIError):
            docker_client.containers.get(name).remove(force=True)
    assert not left, f"containers left behind: {left}"
