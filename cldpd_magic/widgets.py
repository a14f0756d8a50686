"""The pod picker: an ipywidgets app to browse pods and start, steer and stop their agents.

Every Docker operation runs on a worker thread, so button handlers return at once and the
kernel stays free. Worker threads touch the widgets only through trait writes: each pod
has its own Output, status Label and build progress bar, and the pane shows the selected
pod's. A pod's Output holds one display_data entry per run (start, resume, attach),
rendered by :class:`~cldpd_magic.render.SessionView` exactly as in the magics; each
batched publication of :class:`~cldpd_magic.render.LiveFeed` replaces that run's entry by
assigning the ``outputs`` trait (never ``with output:``, never ``clear_output()`` from a
thread). Each entry is a bounded tail, and only the last few runs are kept, so the
Output stays bounded whatever the agents print; the transcripts keep everything.

A pod already running when the picker opens (started by another kernel, or before a
restart) is found through its Docker labels and shown as running; the Attach button
follows its output, and Resume and Stop work on it without attaching.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from .dispatcher import Dispatcher, RunningPod, validate_issue_url
from .errors import CldpdError, InvalidRequestError, SessionNotFoundError
from .logs import log_swallowed
from .pods import Pod, scan_pods
from .render import DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_LINES, LiveFeed, SessionView, clean_text
from .secrets import MASK, Masker, looks_secret
from .session import Session

#: How many lines of a pod's template the details pane shows.
TEMPLATE_PREVIEW_LINES = 6
#: How many runs (start, resume, attach) a pod's Output keeps.
DEFAULT_MAX_RUNS = 5
URL_PLACEHOLDER = "https://github.com/OWNER/REPO/issues/N"

logger = logging.getLogger(__name__)


def _sentence(exc: BaseException) -> str:
    """One line describing an error, for the status line."""
    text = str(exc).strip().split("\n", 1)[0]
    if isinstance(exc, CldpdError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _pod_masker(pod: Pod | None) -> Masker:
    if pod is None:
        return Masker()
    return Masker(pod.secret_values())


class _Run:
    """One followed session: its view, its feed and its entry in the pod's Output."""

    def __init__(self, session: Session, view: SessionView) -> None:
        self.session = session
        self.view = view
        self.feed: LiveFeed | None = None
        self.entry: dict[str, Any] | None = None
        self.ended = False


class _PodState:
    """What the picker knows of one pod, with the widgets that show it."""

    def __init__(self, name: str, pod: Pod | None, error: Exception | None) -> None:
        self.name = name
        self.pod = pod
        self.error = error
        self.output = widgets.Output(
            layout=widgets.Layout(border="1px solid #e0e0e0", min_height="2em")
        )
        self.status = widgets.Label(value="")
        self.progress = widgets.IntProgress(
            value=0, min=0, max=1, description="build", layout=widgets.Layout(display="none")
        )
        self.runs: list[_Run] = []
        self.dropped_runs = 0
        self.container_up = False
        self.remote: RunningPod | None = None
        self.message: str | None = None
        self.pending = False
        self.stopping = False
        self.stop_requested = False
        self.workers: list[threading.Thread] = []
        self.lock = threading.Lock()

    def all_widgets(self) -> list[widgets.Widget]:
        return [self.output, self.status, self.progress]

    def active_runs(self) -> list[_Run]:
        return [r for r in self.runs if not r.ended]

    def current(self) -> _Run | None:
        active = self.active_runs()
        if active:
            return active[-1]
        return self.runs[-1] if self.runs else None

    @property
    def alive(self) -> bool:
        """Whether the pod's container runs (as far as the picker knows)."""
        return self.container_up or any(
            r.session.kind != "resume" and r.view.state == "running" for r in self.active_runs()
        )

    @property
    def busy(self) -> bool:
        return self.pending or self.stopping

    def entries(self) -> tuple[dict[str, Any], ...]:
        shown = [r.entry for r in self.runs if r.entry is not None]
        if self.dropped_runs:
            note = (
                f"… {self.dropped_runs} earlier run(s) not shown "
                "(their transcripts have everything)"
            )
            data = {"text/plain": note}
            shown.insert(0, {"output_type": "display_data", "data": data, "metadata": {}})
        return tuple(shown)

    def status_text(self) -> str:
        if self.message:
            return self.message
        run = self.current()
        if self.remote is not None and self.container_up and (run is None or run.ended):
            started = f" since {self.remote.started_at[:19]}" if self.remote.started_at else ""
            return (
                f"{self.name}: running in container {self.remote.container}{started}, "
                "started outside this picker; attach to follow it"
            )
        if run is not None:
            text = run.view.status_text()
            if run.ended and self.container_up:
                text += " · container idle: resume or stop"
            return text
        if self.error is not None:
            return f"{self.name}: broken: {_sentence(self.error)}"
        if not self.name:
            return "no pod selected"
        return f"{self.name}: not running"


class PodPicker:
    """An ipywidgets app over the discovered pods: start, follow, resume and stop agents.

    Display it (it is the last expression of a cell, or ``display(picker)``); in a plain
    text frontend it shows as a list of pods and their states. Several pods can run at
    once; the pane shows the selected pod's output, status and build progress.

    Args:
        pods_dir: The pods directory; the dispatcher's (or the default) when None.
        dispatcher: Runs the pods; a new :class:`~cldpd_magic.Dispatcher` when None.
        max_lines: Lines each run keeps in its tail.
        max_runs: Runs each pod's Output keeps.
        interval: Seconds between batched updates while output flows.
        stop_timeout: Seconds a stop waits before killing the container.

    Attributes:
        pod_select: The pod list (options: pod names, sorted; broken pods included).
        refresh_button: Re-discovers pods and looks up which are running.
        details: HTML description of the selected pod.
        issue_url: The issue URL to start the agent on.
        url_hint: Why the URL is not acceptable, when it is not.
        start_button: Starts the selected pod on the issue (enabled for a valid URL).
        prompt: A follow-up prompt.
        resume_button: Sends the prompt to the running pod.
        stop_button: Stops the selected pod.
        attach_button: Follows a pod started outside this picker.
        notice: Messages about the picker as a whole (Docker unreachable, ...).
        widget: The top-level widget.
    """

    def __init__(
        self,
        pods_dir: str | os.PathLike[str] | None = None,
        dispatcher: Dispatcher | None = None,
        *,
        max_lines: int = DEFAULT_MAX_LINES,
        max_runs: int = DEFAULT_MAX_RUNS,
        interval: float = DEFAULT_FLUSH_INTERVAL,
        stop_timeout: float = 10.0,
    ) -> None:
        if dispatcher is None:
            dispatcher = Dispatcher(pods_dir)
        elif pods_dir is not None and _resolved(pods_dir) != _resolved(dispatcher.pods_dir):
            dispatcher = Dispatcher(pods_dir, dispatcher.runner, dispatcher.transcript_dir)
        self.dispatcher = dispatcher
        self.pods_dir = dispatcher.pods_dir
        self.max_lines = max_lines
        self.max_runs = max(1, int(max_runs))
        self.interval = interval
        self.stop_timeout = stop_timeout
        self._states: dict[str, _PodState] = {}
        self._blank = _PodState("", None, None)
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._updating = False

        self.pod_select = widgets.Select(
            options=[], rows=6, layout=widgets.Layout(width="220px"), description=""
        )
        self.refresh_button = widgets.Button(
            description="Refresh", icon="refresh", tooltip="Look for pods again"
        )
        self.details = widgets.HTML(layout=widgets.Layout(flex="1 1 auto"))
        self.issue_url = widgets.Text(
            placeholder=URL_PLACEHOLDER, description="Issue", layout=widgets.Layout(width="60%")
        )
        self.url_hint = widgets.Label(value="")
        self.start_button = widgets.Button(
            description="Start", icon="play", button_style="success", disabled=True
        )
        self.prompt = widgets.Textarea(
            placeholder="Follow-up prompt for the running agent",
            disabled=True,
            layout=widgets.Layout(width="60%", height="4em"),
        )
        self.resume_button = widgets.Button(description="Resume", icon="reply", disabled=True)
        self.stop_button = widgets.Button(
            description="Stop", icon="stop", button_style="danger", disabled=True
        )
        self.attach_button = widgets.Button(
            description="Attach", icon="link", disabled=True, tooltip="Follow a running pod"
        )
        self.notice = widgets.Label(value="")
        self._pane = widgets.VBox()
        self.widget = widgets.VBox(
            [
                widgets.HBox([widgets.VBox([self.pod_select, self.refresh_button]), self.details]),
                widgets.HBox([self.issue_url, self.start_button]),
                self.url_hint,
                self._pane,
                widgets.HBox(
                    [
                        self.prompt,
                        widgets.VBox([self.resume_button, self.stop_button, self.attach_button]),
                    ]
                ),
                self.notice,
            ]
        )
        self.pod_select.observe(self._on_select, names="value")
        self.issue_url.observe(self._on_url, names="value")
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.start_button.on_click(self._on_start)
        self.resume_button.on_click(self._on_resume)
        self.stop_button.on_click(self._on_stop)
        self.attach_button.on_click(self._on_attach)
        self.refresh()

    # -- the selected pod's widgets -------------------------------------------------

    def _selected(self) -> _PodState:
        name = self.pod_select.value
        return self._states.get(name, self._blank) if name else self._blank

    @property
    def output(self) -> widgets.Output:
        """The selected pod's Output."""
        return self._selected().output

    @property
    def status(self) -> widgets.Label:
        """The selected pod's status line (``<pod>: building|running|exited N|...``)."""
        return self._selected().status

    @property
    def progress(self) -> widgets.IntProgress:
        """The selected pod's build progress bar."""
        return self._selected().progress

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- discovery --------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-discover the pods, then look up (in the background) which ones are running."""
        if self._closed:
            return
        found = scan_pods(self.pods_dir)
        with self._lock:
            for name, pod, error in found:
                state = self._states.get(name)
                if state is None:
                    self._states[name] = _PodState(name, pod, error)
                else:
                    state.pod, state.error = pod, error
            names = [name for name, _pod, _error in found]
            keep = self.pod_select.value
            self._updating = True
            try:
                self.pod_select.options = names
                self.pod_select.value = keep if keep in names else (names[0] if names else None)
            finally:
                self._updating = False
            self._show_selected()
        self._spawn(self._lookup_running)

    def _lookup_running(self) -> None:
        try:
            found = self.dispatcher.running()
        except Exception as exc:
            pods = [s.pod for s in list(self._states.values()) if s.pod is not None]
            mask = Masker([value for pod in pods for value in pod.secret_values()])
            log_swallowed(logger, "the picker could not look up running pods", mask)
            self._set_notice(f"Cannot tell which pods are running: {_sentence(exc)}")
            return
        self._set_notice("")
        up = {rp.pod: rp for rp in found if rp.status == "running"}
        for state in list(self._states.values()):
            if state.busy or state.active_runs():
                continue
            running = up.get(state.name)
            if running is None:
                state.container_up = False
                state.remote = None
            elif not state.container_up:
                state.container_up = True
                state.remote = running
            self._show(state)

    def _set_notice(self, text: str) -> None:
        if not self._closed:
            self.notice.value = text

    # -- events from the widgets ----------------------------------------------------

    def _on_select(self, _change: dict[str, Any]) -> None:
        if not self._updating:
            with self._lock:
                self._show_selected()

    def _show_selected(self) -> None:
        state = self._selected()
        self.details.value = self._details_html(state)
        self._pane.children = (state.status, state.progress, state.output)
        self._show(state)

    def _on_url(self, change: dict[str, Any]) -> None:
        value = change["new"]
        try:
            validate_issue_url(value)
            hint = ""
        except InvalidRequestError as exc:
            hint = str(exc) if value.strip() else ""
        self.url_hint.value = hint
        with self._lock:
            self._sync_controls()

    def _url_ok(self) -> bool:
        try:
            validate_issue_url(self.issue_url.value)
        except InvalidRequestError:
            return False
        return True

    def _on_start(self, _button: Any = None) -> None:
        state, url = self._selected(), self.issue_url.value
        if self.start_button.disabled or state.pod is None:
            return
        self._launch(state, "starting", lambda: self.dispatcher.start_session(state.name, url))

    def _on_resume(self, _button: Any = None) -> None:
        state, prompt = self._selected(), self.prompt.value
        if self.resume_button.disabled or not state.name:
            return
        lines = prompt.strip().splitlines() or [""]
        more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
        self._launch(
            state,
            "resuming",
            lambda: self.dispatcher.resume_session(state.name, prompt),
            note=f"» {lines[0]}{more}",
            sent=prompt,
        )

    def _on_attach(self, _button: Any = None) -> None:
        state = self._selected()
        if self.attach_button.disabled or not state.name:
            return
        self._launch(state, "attaching", lambda: self._attach_session(state))

    def _on_stop(self, _button: Any = None) -> None:
        state = self._selected()
        if self.stop_button.disabled or not state.name:
            return
        state.stopping = state.stop_requested = True
        state.message = f"{state.name}: stopping…"
        self._show(state)
        self._spawn(self._stop_worker, state)

    # -- workers ------------------------------------------------------------------------

    def _launch(
        self,
        state: _PodState,
        verb: str,
        make: Callable[[], Session],
        note: str = "",
        sent: str | None = None,
    ) -> None:
        state.pending = True
        state.stop_requested = False
        state.message = f"{state.name}: {verb}…"
        self._show(state)
        thread = self._spawn(self._run_worker, state, make, note, sent)
        state.workers = [t for t in state.workers if t.is_alive()] + [thread]

    def _attach_session(self, state: _PodState) -> Session:
        followed = {id(r.session) for r in state.runs}
        local = [
            s
            for s in self.dispatcher.local_sessions(state.name, active=True)
            if s.kind != "resume" and id(s) not in followed
        ]
        return local[-1] if local else self.dispatcher.attach_session(state.name)

    def _run_worker(
        self, state: _PodState, make: Callable[[], Session], note: str, sent: str | None
    ) -> None:
        try:
            session = make()
        except Exception as exc:
            log_swallowed(logger, f"pod {state.name}: no run started", _pod_masker(state.pod))
            if isinstance(exc, SessionNotFoundError):
                state.container_up = False
                state.remote = None
            state.pending = False
            state.message = f"{state.name}: failed: {_pod_masker(state.pod)(_sentence(exc))}"
            self._show(state)
            return
        if sent is not None and self.prompt.value == sent and not self._closed:
            self.prompt.value = ""
        view = SessionView(state.name, self.max_lines, session.mask, str(session.transcript))
        if note:
            view.note(note)
        run = _Run(session, view)
        with state.lock:
            state.runs.append(run)
            while len(state.runs) > self.max_runs and state.runs[0].ended:
                state.runs.pop(0)
                state.dropped_runs += 1
        if session.kind != "resume":
            state.remote = None
        state.pending = False
        if not state.stopping:
            state.message = None
        run.feed = LiveFeed(session, view, lambda _v: self._publish(state, run), self.interval)
        self._show(state)
        if state.stop_requested:
            session.stop(self.stop_timeout)
        run.feed.join()
        if session.kind == "resume":
            if isinstance(session.error, SessionNotFoundError):
                state.container_up = False
        else:
            keep_alive = state.pod is not None and state.pod.config.keep_alive
            state.container_up = session.kind == "start" and keep_alive and view.state == "exited"
        run.ended = True
        self._publish(state, run, final=True)

    def _stop_worker(self, state: _PodState) -> None:
        try:
            self.dispatcher.stop(state.name, self.stop_timeout)
        except Exception as exc:
            log_swallowed(logger, f"pod {state.name}: the stop failed", _pod_masker(state.pod))
            state.stopping = False
            state.message = f"{state.name}: failed: {_pod_masker(state.pod)(_sentence(exc))}"
            self._show(state)
            return
        for thread in list(state.workers):
            thread.join(self.stop_timeout + 30)
        state.container_up = False
        state.remote = None
        state.stopping = False
        run = state.current()
        stopped = run is not None and run.view.state == "stopped"
        state.message = None if stopped else f"{state.name}: stopped"
        self._show(state)

    def _spawn(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        name = f"cldpd-picker-{target.__name__.strip('_').removesuffix('_worker')}"
        if args and isinstance(args[0], _PodState):
            name += f"-{args[0].name}"

        def guarded() -> None:
            try:
                target(*args)
            except Exception as exc:  # a worker must never print a traceback into a cell
                pod = args[0].pod if args and isinstance(args[0], _PodState) else None
                log_swallowed(logger, f"the picker's {name} worker failed", _pod_masker(pod))
                self._set_notice(f"The pod picker hit an unexpected error: {_sentence(exc)}")

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the picker's background work (runs, stops, look-ups) to finish.

        Args:
            timeout: Seconds to wait in all; None waits for ever.

        Returns:
            True if everything finished in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                alive = [t for t in self._threads if t.is_alive()]
            if not alive:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            alive[0].join(left)

    # -- showing state (any thread, trait writes only) ----------------------------------

    def _publish(self, state: _PodState, run: _Run, final: bool = False) -> None:
        entry = {"output_type": "display_data", "data": run.view.bundle(), "metadata": {}}
        with state.lock:
            if self._closed:
                return
            run.entry = entry
            state.output.outputs = state.entries()
            if run is state.current():
                self._show_progress(state.progress, run)
        if final or not run.view.finished:
            self._show(state)

    @staticmethod
    def _show_progress(bar: widgets.IntProgress, run: _Run) -> None:
        view = run.view
        if run.session.kind == "start":
            total = max(view.build_total, 1)
            step = min(view.build_step, total)
        else:
            total = step = 1
        if not view.finished:
            style = ""
        elif view.state == "exited" and view.exit_code == 0:
            style = "success"
        elif view.state == "stopped":
            style = "warning"
        else:
            style = "danger"
        with bar.hold_sync():
            bar.max = total
            bar.value = step
            bar.bar_style = style
            bar.layout.display = None

    def _show(self, state: _PodState) -> None:
        with self._lock:
            if self._closed:
                return
            self._sync_controls()
            state.status.value = state.status_text()

    def _sync_controls(self) -> None:
        state = self._selected()
        active = state.active_runs()
        following = any(r.session.kind != "resume" for r in active)
        resuming = any(r.session.kind == "resume" for r in active)
        alive, busy = state.alive, state.busy
        can_start = state.pod is not None and self._url_ok() and not (alive or active or busy)
        can_resume = alive and not resuming and not busy
        self.start_button.disabled = not can_start
        self.resume_button.disabled = not can_resume
        self.prompt.disabled = not can_resume
        self.stop_button.disabled = not (alive or active or state.pending) or state.stopping
        self.attach_button.disabled = not (
            alive and state.remote is not None and not following and not busy
        )

    def _details_html(self, state: _PodState) -> str:
        if not state.name:
            where = html.escape(display_path(self.pods_dir))
            return (
                f"<i>No pods in {where}. A pod is a directory there with a Dockerfile, "
                "and optionally pod.json and template.md.</i>"
            )
        name = html.escape(state.name)
        if state.pod is None:
            error = (
                html.escape(clean_text(_sentence(state.error))) if state.error else "unknown error"
            )
            return f"<b>{name}</b> is broken: {error}"
        pod, config = state.pod, state.pod.config
        env = ", ".join(
            f"{k}={MASK if looks_secret(k) else v}" for k, v in sorted(config.env.items())
        )
        missing = [n for n in config.inherit_env if n not in os.environ]
        forwarded = ", ".join(
            n + (" (not set on this host)" if n in missing else "") for n in config.inherit_env
        )
        mounts = "; ".join(
            f"{m.source} → {m.target}" + (" (read-only)" if m.read_only else "")
            for m in config.mounts
        )
        template = pod.template.splitlines()
        preview = "\n".join(template[:TEMPLATE_PREVIEW_LINES])
        if len(template) > TEMPLATE_PREVIEW_LINES:
            preview += f"\n… (+{len(template) - TEMPLATE_PREVIEW_LINES} more lines)"
        rows = [
            ("image", pod.image),
            ("directory", display_path(pod.dir)),
            ("workdir", config.workdir or "(image default)"),
            ("env", env or "none"),
            ("inheritEnv", forwarded or "none"),
            ("mounts", mounts or "none"),
            ("args", shlex.join(config.args) or "none"),
            ("keepAlive", "yes" if config.keep_alive else "no"),
        ]
        mask = _pod_masker(pod)
        cells = "".join(
            f'<tr><th style="text-align:left;padding-right:1em">{key}</th>'
            f"<td>{html.escape(mask(clean_text(value)))}</td></tr>"
            for key, value in rows
        )
        template_html = (
            f'<pre style="margin:2px 0">{html.escape(mask(clean_text(preview)))}</pre>'
            if preview
            else "<i>none</i>"
        )
        return f"<b>{name}</b><table>{cells}</table><div><b>template.md</b>{template_html}</div>"

    # -- presentation -------------------------------------------------------------------

    def __repr__(self) -> str:
        names = list(self.pod_select.options)
        head = f"PodPicker: {len(names)} pod{'s' if len(names) != 1 else ''} in {self.pods_dir}"
        if self._closed:
            head += " (closed)"
        lines = [head]
        selected = self.pod_select.value
        for name in names:
            marker = "*" if name == selected else " "
            lines.append(f"{marker} {self._states[name].status_text()}")
        return "\n".join(lines)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        render = self.widget._repr_mimebundle_
        bundle = dict(render(**kwargs) or {}) if render else {}
        bundle["text/plain"] = repr(self)
        return bundle

    def close(self) -> None:
        """Stop publishing to the widgets and close them; running pods keep running.

        The sessions go on (their transcripts record everything); a new picker finds the
        running pods again and can attach, resume or stop them.
        """
        if self._closed:
            return
        with self._lock:
            self._closed = True
            for state in [self._blank, *self._states.values()]:
                with state.lock:  # waits for a publication in flight
                    for widget in state.all_widgets():
                        widget.close()
            _close_tree(self.widget)


def _close_tree(widget: widgets.Widget) -> None:
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as a person would write it: relative to the working directory when below it,
    else with ``~`` for the home directory."""
    path = Path(path)
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        with contextlib.suppress(ValueError):
            return prefix + str(path.relative_to(base))
    return str(path)


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


__all__ = ["PodPicker"]
