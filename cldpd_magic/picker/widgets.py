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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..errors import CldpdError, InvalidRequestError, SessionNotFoundError
from ..events import RunState
from ..logs import log_swallowed
from ..pods import Pod, scan_pods
from ..render import (
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_LINES,
    BatchFeed,
    BatchView,
    LiveFeed,
    SessionView,
    clean_text,
)
from ..runs import Dispatcher, RunningPod, Session, SessionKind, validate_issue_url
from ..secrets import MASK, Masker, looks_secret

#: How many lines of a pod's template the details pane shows.
TEMPLATE_PREVIEW_LINES = 6
#: How many runs (start, resume, attach) a pod's Output keeps.
DEFAULT_MAX_RUNS = 5
URL_PLACEHOLDER = "https://github.com/OWNER/REPO/issues/N"

logger = logging.getLogger(__package__)


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

    @property
    def follows_container(self) -> bool:
        """Whether the run follows the pod's container (a start or an attach, not a resume)."""
        return self.session.kind is not SessionKind.RESUME


@dataclass(frozen=True, slots=True)
class Controls:
    """Which of a pod's controls are enabled.

    Attributes:
        start: Start the pod on an issue.
        resume: Send a follow-up prompt.
        stop: Stop the pod.
        attach: Follow a pod started outside the picker.
    """

    start: bool
    resume: bool
    stop: bool
    attach: bool


class PodControl:
    """What the picker knows of one pod: its runs, read through their sessions' state.

    A run's state is its session's (:class:`~cldpd_magic.events.RunState`); the
    controller keeps of its own only what no session knows, all changed under
    :attr:`lock` through the methods below:

    - ``launching``: the verb of a run being made (``starting``, ``resuming``,
      ``attaching``) before its session exists, else "";
    - ``stopping``: a stop is under way; a run whose session comes meanwhile is stopped
      at once;
    - ``note``: the last failure (or "stopped" for a pod no run showed), one sentence;
    - ``outside``: the pod's container, found running with no run of ours following it;
    - ``gone``: the container is known to be gone (stopped, or found not running) since
      the last run that followed it; else a kept-alive pod whose start exited idles.

    Args:
        name: The pod's name.
        pod: The pod, None when it is broken.
        error: Why it is broken.
        max_runs: How many runs its Output keeps.
    """

    def __init__(
        self,
        name: str,
        pod: Pod | None,
        error: Exception | None,
        max_runs: int = DEFAULT_MAX_RUNS,
    ) -> None:
        self.name = name
        self.pod = pod
        self.error = error
        self.max_runs = max(1, int(max_runs))
        self.runs: list[_Run] = []
        self.dropped_runs = 0
        self.launching = ""
        self.stopping = False
        self.note = ""
        self.outside: RunningPod | None = None
        self.gone = False
        self._follower: Session | None = None
        self.workers: list[threading.Thread] = []
        self.lock = threading.RLock()

    @property
    def mask(self) -> Masker:
        """Masks the pod's secret values."""
        return _pod_masker(self.pod)

    # -- reading ------------------------------------------------------------------------

    def active_runs(self) -> list[_Run]:
        """Runs still followed."""
        return [r for r in self.runs if not r.ended]

    def current(self) -> _Run | None:
        """The run the pane shows: the newest active one, else the newest."""
        active = self.active_runs()
        if active:
            return active[-1]
        return self.runs[-1] if self.runs else None

    @property
    def idle(self) -> bool:
        """Whether our kept-alive container idles: its start exited and it is not gone."""
        if self.gone or self.pod is None or not self.pod.config.keep_alive:
            return False
        last = self._follower  # kept when its run leaves the Output
        return last is not None and last.kind is SessionKind.START and last.state is RunState.EXITED

    @property
    def alive(self) -> bool:
        """Whether the pod's container runs (as far as the picker knows)."""
        return (
            self.idle
            or self.outside is not None
            or any(
                r.follows_container and r.session.state is RunState.RUNNING
                for r in self.active_runs()
            )
        )

    @property
    def busy(self) -> bool:
        """Whether a run is being made or a stop is under way."""
        return bool(self.launching) or self.stopping

    def controls(self, url_ok: bool) -> Controls:
        """Which controls are enabled, given whether the issue URL is acceptable."""
        with self.lock:
            active = self.active_runs()
            following = any(r.follows_container for r in active)
            resuming = any(not r.follows_container for r in active)
            alive, busy = self.alive, self.busy
            return Controls(
                start=self.pod is not None and url_ok and not (alive or active or busy),
                resume=alive and not resuming and not busy,
                stop=(alive or bool(active) or bool(self.launching)) and not self.stopping,
                attach=alive and self.outside is not None and not following and not busy,
            )

    def entries(self) -> tuple[dict[str, Any], ...]:
        """The Output's entries: one per kept run, after a note of the dropped ones."""
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
        """The pod's one-line status."""
        with self.lock:
            if self.stopping:
                return f"{self.name}: stopping…"
            if self.launching:
                return f"{self.name}: {self.launching}…"
            if self.note:
                return self.note
            run = self.current()
            if self.outside is not None and (run is None or run.ended):
                since = self.outside.started_at[:19]
                return (
                    f"{self.name}: running in container {self.outside.container}"
                    f"{f' since {since}' if since else ''}, "
                    "started outside this picker; attach to follow it"
                )
            if run is not None:
                text = run.view.status_text()
                if run.view.finished and self.idle:
                    text += " · container idle: resume or stop"
                return text
            if self.error is not None:
                return f"{self.name}: broken: {_sentence(self.error)}"
            if not self.name:
                return "no pod selected"
            return f"{self.name}: not running"

    # -- changing -----------------------------------------------------------------------

    def begin_launch(self, verb: str) -> None:
        """A run is being made (``verb``: starting, resuming, attaching)."""
        with self.lock:
            self.launching = verb
            self.note = ""

    def launch_failed(self, exc: BaseException) -> None:
        """The run could not be made; a pod found not running is not running."""
        with self.lock:
            if isinstance(exc, SessionNotFoundError):
                self.gone = True
                self.outside = None
            self.launching = ""
            self.note = f"{self.name}: failed: {self.mask(_sentence(exc))}"

    def add_run(self, run: _Run) -> bool:
        """Follow a new run; returns whether to stop it at once (a stop came first)."""
        with self.lock:
            self.runs.append(run)
            while len(self.runs) > self.max_runs and self.runs[0].ended:
                self.runs.pop(0)
                self.dropped_runs += 1
            if run.follows_container:
                self.outside = None
                self.gone = False
                self._follower = run.session
            self.launching = ""
            return self.stopping

    def run_ended(self, run: _Run) -> None:
        """A run's session and feed have ended: a resume that found no container says so."""
        with self.lock:
            if isinstance(run.session.error, SessionNotFoundError):
                self.gone = True
                self.outside = None
            run.ended = True

    def begin_stop(self) -> None:
        """A stop is asked for."""
        with self.lock:
            self.stopping = True
            self.note = ""

    def stop_failed(self, exc: BaseException) -> None:
        """The stop failed."""
        with self.lock:
            self.stopping = False
            self.note = f"{self.name}: failed: {self.mask(_sentence(exc))}"

    def stop_done(self) -> None:
        """The stop is done: nothing runs; say so unless the last run shows it."""
        with self.lock:
            self.gone = True
            self.outside = None
            self.stopping = False
            run = self.current()
            shown = run is not None and run.session.state is RunState.STOPPED
            self.note = "" if shown else f"{self.name}: stopped"

    def seen(self, container: RunningPod | None) -> bool:
        """What a look-up of running containers found; False when it was ignored.

        A pod being launched, stopped or followed knows better than a look-up.
        """
        with self.lock:
            if self.busy or self.active_runs():
                return False
            if container is None:
                self.gone = True
                self.outside = None
            elif not self.idle and self.outside is None:
                self.outside = container
            return True


class _PodPane:
    """The widgets that show one pod: its Output, status line and build progress bar."""

    def __init__(self) -> None:
        self.output = widgets.Output(
            layout=widgets.Layout(border="1px solid #e0e0e0", min_height="2em")
        )
        self.status = widgets.Label(value="")
        self.progress = widgets.IntProgress(
            value=0, min=0, max=1, description="build", layout=widgets.Layout(display="none")
        )

    def all_widgets(self) -> list[widgets.Widget]:
        return [self.output, self.status, self.progress]


class _Workers:
    """The picker's worker threads: each guarded (no traceback reaches a cell), all joinable.

    Args:
        notice: Shows a one-sentence message about the picker as a whole.
    """

    def __init__(self, notice: Callable[[str], None]) -> None:
        self._notice = notice
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def spawn(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        """Run ``target(*args)`` on a new daemon thread, named after it and its pod."""
        name = f"cldpd-picker-{target.__name__.strip('_').removesuffix('_worker')}"
        if args and isinstance(args[0], PodControl):
            name += f"-{args[0].name}"

        def guarded() -> None:
            try:
                target(*args)
            except Exception as exc:  # a worker must never print a traceback into a cell
                pod = args[0].pod if args and isinstance(args[0], PodControl) else None
                log_swallowed(logger, f"the picker's {name} worker failed", _pod_masker(pod))
                self._notice(f"The pod picker hit an unexpected error: {_sentence(exc)}")

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every thread; True if all finished within ``timeout`` seconds in all."""
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


class PodActions:
    """What the picker's buttons do: start, resume, attach and stop pods on worker threads,
    and look up which pods run.

    It knows nothing of the layout: what changes it reports through ``show`` (a pod's
    status and controls), ``publish`` (a run's view) and ``notice`` (the picker as a
    whole); what a pod is doing it keeps in the pod's :class:`PodControl`.

    Args:
        dispatcher: Runs the pods.
        show: Called with a pod's controller when its status or controls change.
        publish: Called with a controller, a run and whether it is the run's last view.
        notice: Shows a one-sentence message about the picker as a whole.
        sent: Called with a prompt once a resume with it has started.
        max_lines: Lines each run keeps in its tail.
        interval: Seconds between batched updates while output flows.
        stop_timeout: Seconds a stop waits before killing the container.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        show: Callable[[PodControl], None],
        publish: Callable[[PodControl, _Run, bool], None],
        notice: Callable[[str], None],
        sent: Callable[[str], None],
        max_lines: int = DEFAULT_MAX_LINES,
        interval: float = DEFAULT_FLUSH_INTERVAL,
        stop_timeout: float = 10.0,
    ) -> None:
        self.dispatcher = dispatcher
        self.max_lines = max_lines
        self.interval = interval
        self.stop_timeout = stop_timeout
        self._show = show
        self._publish = publish
        self._set_notice = notice
        self._sent = sent
        self._workers = _Workers(notice)

    def start(self, control: PodControl, url: str) -> None:
        """Start a pod on an issue."""
        self._launch(control, "starting", lambda: self.dispatcher.start_session(control.name, url))

    def resume(self, control: PodControl, prompt: str) -> None:
        """Send a follow-up prompt to a running pod."""
        lines = prompt.strip().splitlines() or [""]
        more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
        self._launch(
            control,
            "resuming",
            lambda: self.dispatcher.resume_session(control.name, prompt),
            note=f"» {lines[0]}{more}",
            sent=prompt,
        )

    def attach(self, control: PodControl) -> None:
        """Follow a running pod: a session of this kernel if there is one, else its container."""
        self._launch(control, "attaching", lambda: self._attach_session(control))

    def stop(self, control: PodControl) -> None:
        """Stop a pod."""
        control.begin_stop()
        self._show(control)
        self._workers.spawn(self._stop_worker, control)

    def look_up_running(self, controls: list[PodControl]) -> None:
        """Find out, in the background, which of these pods run."""
        self._workers.spawn(self._lookup_running, controls)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the work in flight; True if it all finished within ``timeout`` seconds."""
        return self._workers.join(timeout)

    def _launch(
        self,
        control: PodControl,
        verb: str,
        make: Callable[[], Session],
        note: str = "",
        sent: str | None = None,
    ) -> None:
        control.begin_launch(verb)
        self._show(control)
        thread = self._workers.spawn(self._run_worker, control, make, note, sent)
        with control.lock:
            control.workers = [t for t in control.workers if t.is_alive()] + [thread]

    def _attach_session(self, control: PodControl) -> Session:
        followed = {id(r.session) for r in control.runs}
        local = [
            s
            for s in self.dispatcher.local_sessions(control.name, active=True)
            if s.kind is not SessionKind.RESUME and id(s) not in followed
        ]
        return local[-1] if local else self.dispatcher.attach_session(control.name)

    def _run_worker(
        self, control: PodControl, make: Callable[[], Session], note: str, sent: str | None
    ) -> None:
        try:
            session = make()
        except Exception as exc:
            log_swallowed(logger, f"pod {control.name}: no run started", control.mask)
            control.launch_failed(exc)
            self._show(control)
            return
        if sent is not None:
            self._sent(sent)
        view = SessionView(control.name, self.max_lines, session=session)
        if note:
            view.note(note)
        run = _Run(session, view)
        stop_now = control.add_run(run)
        run.feed = LiveFeed(
            session, view, lambda _v: self._publish(control, run, False), self.interval
        )
        self._show(control)
        if stop_now:
            session.stop(self.stop_timeout)
        run.feed.join()
        control.run_ended(run)
        self._publish(control, run, True)

    def _stop_worker(self, control: PodControl) -> None:
        try:
            self.dispatcher.stop(control.name, self.stop_timeout)
        except Exception as exc:
            log_swallowed(logger, f"pod {control.name}: the stop failed", control.mask)
            control.stop_failed(exc)
            self._show(control)
            return
        for thread in list(control.workers):
            thread.join(self.stop_timeout + 30)
        control.stop_done()
        self._show(control)

    def _lookup_running(self, controls: list[PodControl]) -> None:
        try:
            found = self.dispatcher.running()
        except Exception as exc:
            pods = [c.pod for c in controls if c.pod is not None]
            mask = Masker([value for pod in pods for value in pod.secret_values()])
            log_swallowed(logger, "the picker could not look up running pods", mask)
            self._set_notice(f"Cannot tell which pods are running: {_sentence(exc)}")
            return
        self._set_notice("")
        up = {rp.pod: rp for rp in found if rp.status == "running"}
        for control in controls:
            if control.seen(up.get(control.name)):
                self._show(control)


class PodPicker:
    """An ipywidgets app over the discovered pods: start, follow, resume and stop agents.

    Display it (it is the last expression of a cell, or ``display(picker)``); in a plain
    text frontend it shows as a list of pods and their states. Several pods can run at
    once; the pane shows the selected pod's output, status and build progress.

    The picker is the layout: what its buttons do runs in :attr:`actions` (a
    :class:`PodActions`), and what it knows of each pod is a :class:`PodControl` over
    the pod's sessions.

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
        batch_panels: The batches shown with :meth:`show_batch`, oldest first.
        actions: Starts, resumes, attaches and stops pods on worker threads.
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
        self.pods_dir = dispatcher.pods_dir
        self.max_runs = max(1, int(max_runs))
        self.actions = PodActions(
            dispatcher,
            show=self._show,
            publish=self._publish,
            notice=self._set_notice,
            sent=self._clear_prompt,
            max_lines=max_lines,
            interval=interval,
            stop_timeout=stop_timeout,
        )
        self._controls: dict[str, PodControl] = {}
        self._panes: dict[str, _PodPane] = {}
        self._blank = PodControl("", None, None)
        self._blank_pane = _PodPane()
        self._lock = threading.RLock()
        self._closed = False
        self._updating = False
        self.batch_panels: list[BatchPanel] = []

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

    # -- the selected pod -----------------------------------------------------------------

    def _selected(self) -> PodControl:
        name = self.pod_select.value
        return self._controls.get(name, self._blank) if name else self._blank

    def _pane_of(self, control: PodControl) -> _PodPane:
        return self._panes.get(control.name, self._blank_pane)

    @property
    def dispatcher(self) -> Dispatcher:
        """The dispatcher that runs the pods."""
        return self.actions.dispatcher

    def control(self, name: str) -> PodControl:
        """The controller of a pod (KeyError for a pod the picker does not list)."""
        return self._controls[name]

    @property
    def output(self) -> widgets.Output:
        """The selected pod's Output."""
        return self._pane_of(self._selected()).output

    @property
    def status(self) -> widgets.Label:
        """The selected pod's status line (``<pod>: building|running|exited N|...``)."""
        return self._pane_of(self._selected()).status

    @property
    def progress(self) -> widgets.IntProgress:
        """The selected pod's build progress bar."""
        return self._pane_of(self._selected()).progress

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
                control = self._controls.get(name)
                if control is None:
                    self._controls[name] = PodControl(name, pod, error, self.max_runs)
                    self._panes[name] = _PodPane()
                else:
                    control.pod, control.error = pod, error
            names = [name for name, _pod, _error in found]
            keep = self.pod_select.value
            self._updating = True
            try:
                self.pod_select.options = names
                self.pod_select.value = keep if keep in names else (names[0] if names else None)
            finally:
                self._updating = False
            self._show_selected()
        self.actions.look_up_running(list(self._controls.values()))

    def _set_notice(self, text: str) -> None:
        if not self._closed:
            self.notice.value = text

    # -- events from the widgets ----------------------------------------------------

    def _on_select(self, _change: dict[str, Any]) -> None:
        if not self._updating:
            with self._lock:
                self._show_selected()

    def _show_selected(self) -> None:
        control = self._selected()
        pane = self._pane_of(control)
        self.details.value = pod_details_html(control, self.pods_dir)
        self._pane.children = (pane.status, pane.progress, pane.output)
        self._show(control)

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
        control = self._selected()
        if self.start_button.disabled or control.pod is None:
            return
        self.actions.start(control, self.issue_url.value)

    def _on_resume(self, _button: Any = None) -> None:
        control = self._selected()
        if self.resume_button.disabled or not control.name:
            return
        self.actions.resume(control, self.prompt.value)

    def _on_attach(self, _button: Any = None) -> None:
        control = self._selected()
        if self.attach_button.disabled or not control.name:
            return
        self.actions.attach(control)

    def _on_stop(self, _button: Any = None) -> None:
        control = self._selected()
        if self.stop_button.disabled or not control.name:
            return
        self.actions.stop(control)

    def _clear_prompt(self, sent: str) -> None:
        if self.prompt.value == sent and not self._closed:
            self.prompt.value = ""

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the picker's background work (runs, stops, look-ups) to finish.

        Args:
            timeout: Seconds to wait in all; None waits for ever.

        Returns:
            True if everything finished in time.
        """
        return self.actions.join(timeout)

    def show_batch(self, batch: Any, title: str = "batch") -> BatchPanel:
        """Show a batch at the bottom of the picker: a row per run, the chosen run's output,
        stop one run or all.

        Args:
            batch: A :class:`~cldpd_magic.runs.Batch` (e.g. from ``Dispatcher.dispatch``).
            title: What its summary line names.

        Returns:
            The batch's panel (also in :attr:`batch_panels`).
        """
        panel = BatchPanel(
            batch,
            title=title,
            max_lines=self.actions.max_lines,
            interval=self.actions.interval,
            stop_timeout=self.actions.stop_timeout,
        )
        with self._lock:
            self.batch_panels.append(panel)
            self.widget.children = (*self.widget.children, panel.widget)
        return panel

    # -- showing state (any thread, trait writes only) ----------------------------------

    def _publish(self, control: PodControl, run: _Run, final: bool = False) -> None:
        entry = {"output_type": "display_data", "data": run.view.bundle(), "metadata": {}}
        pane = self._pane_of(control)
        with control.lock:
            if self._closed:
                return
            run.entry = entry
            pane.output.outputs = control.entries()
            if run is control.current():
                _show_progress(pane.progress, run)
        if final or not run.view.finished:
            self._show(control)

    def _show(self, control: PodControl) -> None:
        with self._lock:
            if self._closed:
                return
            self._sync_controls()
            self._pane_of(control).status.value = control.status_text()

    def _sync_controls(self) -> None:
        can = self._selected().controls(self._url_ok())
        self.start_button.disabled = not can.start
        self.resume_button.disabled = not can.resume
        self.prompt.disabled = not can.resume
        self.stop_button.disabled = not can.stop
        self.attach_button.disabled = not can.attach

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
            lines.append(f"{marker} {self._controls[name].status_text()}")
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
            for panel in self.batch_panels:
                panel.close()
            for control in [self._blank, *self._controls.values()]:
                with control.lock:  # waits for a publication in flight
                    for widget in self._pane_of(control).all_widgets():
                        widget.close()
            _close_tree(self.widget)


class BatchPanel:
    """A batch in widgets: its live table over the selected run's output; stop one or all.

    One Output holds one display entry, the whole :class:`~cldpd_magic.render.BatchView`
    (a row per run, then the selected run's status and tail), replaced by assigning the
    ``outputs`` trait at each batched publication of a
    :class:`~cldpd_magic.render.BatchFeed`: a batch of any size sends one update per
    interval, as one run does. Choosing a run in the dropdown shows its output at once.

    Args:
        batch: The batch (a :class:`~cldpd_magic.runs.Batch`, or anything with ``runs``,
            ``done`` and ``stop()``).
        title: What the summary line names.
        max_lines: Lines each run's tail keeps.
        interval: Seconds between batched updates while output flows.
        stop_timeout: Seconds a stopped run gets before it is killed.

    Attributes:
        batch: The batch.
        view: What is shown.
        feed: Follows the runs and publishes the view.
        run_select: The run whose output shows.
        stop_button: Stops the selected run.
        stop_all_button: Stops the batch: no new run starts, running ones stop.
        output: The table and the selected run's output.
        notice: Messages about the batch as a whole.
        widget: The top-level widget.
    """

    def __init__(
        self,
        batch: Any,
        *,
        title: str = "batch",
        max_lines: int = DEFAULT_MAX_LINES,
        interval: float = DEFAULT_FLUSH_INTERVAL,
        stop_timeout: float = 10.0,
    ) -> None:
        self.batch = batch
        self.stop_timeout = stop_timeout
        self.view = BatchView(title, max_lines)
        self._lock = threading.RLock()
        self._closed = False
        self._updating = False
        self._workers = _Workers(self._set_notice)
        self.run_select = widgets.Dropdown(options=[], description="run")
        self.stop_button = widgets.Button(description="Stop run", icon="stop")
        self.stop_all_button = widgets.Button(
            description="Stop all", icon="stop", button_style="danger"
        )
        self.output = widgets.Output(layout=widgets.Layout(border="1px solid #e0e0e0"))
        self.notice = widgets.Label(value="")
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.run_select, self.stop_button, self.stop_all_button]),
                self.output,
                self.notice,
            ]
        )
        self.run_select.observe(self._on_select, names="value")
        self.stop_button.on_click(self._on_stop)
        self.stop_all_button.on_click(self._on_stop_all)
        self.feed = BatchFeed(batch, self.view, self._publish, interval)

    def _set_notice(self, text: str) -> None:
        if not self._closed:
            self.notice.value = text

    def _session(self, run: str) -> Session | None:
        return next((r.session for r in self.view.rows() if r.title == run), None)

    def _on_select(self, change: dict[str, Any]) -> None:
        if not self._updating:
            self.view.select(change["new"] or "")
            self._publish(self.view)

    def _on_stop(self, _button: Any = None) -> None:
        session = self._session(self.run_select.value or "")
        if session is None or session.done:
            return
        self._set_notice(f"stopping {self.run_select.value}…")
        self._workers.spawn(self._stop_worker, session)

    def _stop_worker(self, session: Session) -> None:
        session.stop(self.stop_timeout)
        self._set_notice("")

    def _on_stop_all(self, _button: Any = None) -> None:
        self.stop_all_button.disabled = True
        self._set_notice("stopping the batch…")
        self._workers.spawn(self._stop_all_worker)

    def _stop_all_worker(self) -> None:
        self.batch.stop()
        self._set_notice("")

    def _publish(self, view: BatchView) -> None:
        entry = {"output_type": "display_data", "data": view.bundle(), "metadata": {}}
        names = view.run_names()
        with self._lock:
            if self._closed:
                return
            if list(self.run_select.options) != names:
                self._updating = True
                try:
                    self.run_select.options = names
                    self.run_select.value = view.selected if view.selected in names else None
                finally:
                    self._updating = False
            self.output.outputs = (entry,)
            if self._ended(view):
                self.stop_button.disabled = self.stop_all_button.disabled = True

    def _ended(self, view: BatchView) -> bool:
        return bool(self.batch.done) and view.finished

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the batch's final view is shown and stops asked for are done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.feed.join(timeout):
            return False
        return self._workers.join(None if deadline is None else deadline - time.monotonic())

    def __repr__(self) -> str:
        return self.view.text()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        render = self.widget._repr_mimebundle_
        bundle = dict(render(**kwargs) or {}) if render else {}
        bundle["text/plain"] = repr(self)
        return bundle

    def close(self) -> None:
        """Stop showing the batch and close the widgets; its runs go on."""
        with self._lock:
            self._closed = True
            _close_tree(self.widget)


def _show_progress(bar: widgets.IntProgress, run: _Run) -> None:
    """Show a run's build progress; the bar's colour says how it ended."""
    view = run.view
    if run.session.kind is SessionKind.START:
        total = max(view.build_total, 1)
        step = min(view.build_step, total)
    else:
        total = step = 1
    state = view.state
    if not state.finished:
        style = ""
    elif state is RunState.EXITED and view.exit_code == 0:
        style = "success"
    elif state is RunState.STOPPED:
        style = "warning"
    else:
        style = "danger"
    with bar.hold_sync():
        bar.max = total
        bar.value = step
        bar.bar_style = style
        bar.layout.display = None


def pod_details_html(control: PodControl, pods_dir: str | os.PathLike[str]) -> str:
    """HTML describing a pod for the details pane: its configuration, secrets masked.

    A pod whose pod.json waives a danger (``"unsafe"``) shows each warning first; mount
    sources are shown resolved, as they reach Docker.

    Args:
        control: The pod's controller (a blank one when no pod is selected).
        pods_dir: The pods directory, named when there are no pods.

    Returns:
        The HTML; every value escaped and free of terminal escapes.
    """
    if not control.name:
        where = html.escape(display_path(pods_dir))
        return (
            f"<i>No pods in {where}. A pod is a directory there with a Dockerfile, "
            "and optionally pod.json and template.md.</i>"
        )
    name = html.escape(control.name)
    if control.pod is None:
        error = (
            html.escape(clean_text(_sentence(control.error))) if control.error else "unknown error"
        )
        return f"<b>{name}</b> is broken: {error}"
    pod, config = control.pod, control.pod.config
    env = ", ".join(f"{k}={MASK if looks_secret(k) else v}" for k, v in sorted(config.env.items()))
    missing = [n for n in config.inherit_env if n not in os.environ]
    forwarded = ", ".join(
        n + (" (not set on this host)" if n in missing else "") for n in config.inherit_env
    )
    mounts = "; ".join(
        f"{m.source} → {m.target}" + (" (read-only)" if m.read_only else "") for m in config.mounts
    )
    template = pod.template.splitlines()
    preview = "\n".join(template[:TEMPLATE_PREVIEW_LINES])
    if len(template) > TEMPLATE_PREVIEW_LINES:
        preview += f"\n… (+{len(template) - TEMPLATE_PREVIEW_LINES} more lines)"
    rows = [
        *(("unsafe", f"\u26a0 {w}") for w in pod.unsafe_warnings),
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


__all__ = ["BatchPanel", "Controls", "PodActions", "PodControl", "PodPicker", "pod_details_html"]
