"""The pod picker's layout: the widgets to browse pods and start, steer and stop their agents.

What the buttons do runs on worker threads (:mod:`.actions`), so button handlers return
at once and the kernel stays free. Worker threads touch the widgets only through trait
writes: each pod has its own Output, status Label and build progress bar, and the pane
shows the selected pod's. A pod's Output holds one display_data entry per run (start,
resume, attach), rendered by :class:`~cldpd_magic.render.SessionView` exactly as in the
magics; each batched publication of :class:`~cldpd_magic.render.LiveFeed` replaces that
run's entry by assigning the ``outputs`` trait (never ``with output:``, never
``clear_output()`` from a thread). Each entry is a bounded tail, and only the last few
runs are kept, so the Output stays bounded whatever the agents print; the transcripts
keep everything.

A pod already running when the picker opens (started by another kernel, or before a
restart) is found through its Docker labels and shown as running; the Attach button
follows its output, and Resume and Stop work on it without attaching.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..errors import InvalidRequestError
from ..events import RunState
from ..pods import scan_pods
from ..render import DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_LINES
from ..render import diff as diff_view
from ..runs import Dispatcher, SessionKind, validate_issue_url
from ._tree import close_tree
from .actions import PodActions
from .approval_rows import ApprovalRows
from .batch import BatchPanel
from .details import pod_details_html
from .state import DEFAULT_MAX_RUNS, FollowedRun, PodControl

URL_PLACEHOLDER = "https://github.com/OWNER/REPO/issues/N"


class PodPane:
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
        """The pane's widgets, to close them."""
        return [self.output, self.status, self.progress]


def show_progress(bar: widgets.IntProgress, run: FollowedRun) -> None:
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
        interrupt_button: Ends the turn of the selected pod's interactive agent.
        approvals: The tool calls every interactive run waits to have approved, a row
            each (Allow, Deny, Always allow the tool), newest last, the run named.
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
        self._panes: dict[str, PodPane] = {}
        self._blank = PodControl("", None, None)
        self._blank_pane = PodPane()
        self._lock = threading.RLock()
        self._closed = False
        self._updating = False
        self.batch_panels: list[BatchPanel] = []
        self._build_controls()
        self._build_panes()
        self._wire()
        self.refresh()

    def _build_controls(self) -> None:
        """The pod list, the details, the issue and prompt fields, the buttons, the notice."""
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
        self.interrupt_button = widgets.Button(
            description="Interrupt", icon="pause", disabled=True,
            tooltip="End the agent's turn; the run stays and takes a follow-up",
        )  # fmt: skip
        self.notice = widgets.Label(value="")
        self.approvals = ApprovalRows(show_run=True, notice=self._set_notice)

    def _build_panes(self) -> None:
        """Arrange the controls and the selected pod's pane into the top-level widget."""
        self._pane = widgets.VBox()
        self.widget = widgets.VBox(
            [
                widgets.HBox([widgets.VBox([self.pod_select, self.refresh_button]), self.details]),
                widgets.HBox([self.issue_url, self.start_button]),
                self.url_hint,
                self._pane,
                self.approvals.widget,
                widgets.HBox(
                    [
                        self.prompt,
                        widgets.VBox([self.resume_button, self.interrupt_button]),
                        widgets.VBox([self.stop_button, self.attach_button]),
                    ]
                ),
                self.notice,
            ]
        )

    def _wire(self) -> None:
        """Connect the widgets' events to the handlers."""
        self.pod_select.observe(self._on_select, names="value")
        self.issue_url.observe(self._on_url, names="value")
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.start_button.on_click(self._on_start)
        self.resume_button.on_click(self._on_resume)
        self.stop_button.on_click(self._on_stop)
        self.attach_button.on_click(self._on_attach)
        self.interrupt_button.on_click(self._on_interrupt)
        # One queue of the approvals every interactive run of the dispatcher waits for.
        self.approvals.watch(lambda: self.dispatcher.sessions, until=lambda: self._closed)

    # -- the selected pod -----------------------------------------------------------------

    def _selected(self) -> PodControl:
        name = self.pod_select.value
        return self._controls.get(name, self._blank) if name else self._blank

    def _pane_of(self, control: PodControl) -> PodPane:
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
                    self._panes[name] = PodPane()
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

    def _on_interrupt(self, _button: Any = None) -> None:
        control = self._selected()
        if self.interrupt_button.disabled or not control.name:
            return
        self.actions.interrupt(control)

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

    def _publish(self, control: PodControl, run: FollowedRun, final: bool = False) -> None:
        data = run.view.bundle()
        if run.view.finished:  # the run's changes, captured as it ended, close its entry
            data = diff_view.with_changes(data, run.session.changes, run.session.mask)
        entry = {"output_type": "display_data", "data": data, "metadata": {}}
        pane = self._pane_of(control)
        with control.lock:
            if self._closed:
                return
            run.entry = entry
            pane.output.outputs = control.entries()
            if run is control.current():
                show_progress(pane.progress, run)
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
        self.interrupt_button.disabled = not can.interrupt

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
            self.approvals.close()
            for panel in self.batch_panels:
                panel.close()
            for control in [self._blank, *self._controls.values()]:
                with control.lock:  # waits for a publication in flight
                    for widget in self._pane_of(control).all_widgets():
                        widget.close()
            close_tree(self.widget)


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()
