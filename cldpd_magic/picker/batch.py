"""A batch in widgets: its live table over the chosen run's output; stop or interrupt one
run, stop all; answer the approvals its runs wait for; compare the changes of the runs
chosen."""

from __future__ import annotations

import threading
import time
from typing import Any

import ipywidgets as widgets

from ..render import DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_LINES, BatchFeed, BatchView
from ..render import diff as diff_view
from ..runs import Session
from ..secrets import Masker
from ._tree import close_tree
from .actions import Workers
from .approval_rows import ApprovalRows
from .state import error_sentence


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
        interrupt_button: Ends the turn of the selected run's interactive agent; the run
            stays.
        stop_all_button: Stops the batch: no new run starts, running ones stop.
        approvals: The tool calls the batch's runs wait to have approved, a row each
            (Allow, Deny, Always allow the tool), newest last, the run named.
        compare_select: The runs whose changes to compare (none chosen: every run's).
        compare_button: Compares the changes of the runs chosen.
        comparison: The comparison: files by runs, and how versions of a file differ.
        output: The table (with each run's +/-) and the selected run's output.
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
        self.view: BatchView = diff_view.ChangesBatchView(title, max_lines)
        self._lock = threading.RLock()
        self._closed = False
        self._updating = False
        self._workers = Workers(self._set_notice)
        self.run_select = widgets.Dropdown(options=[], description="run")
        self.stop_button = widgets.Button(description="Stop run", icon="stop")
        self.interrupt_button = widgets.Button(
            description="Interrupt run", icon="pause",
            tooltip="End the selected run's turn; the run stays and takes a follow-up",
        )  # fmt: skip
        self.stop_all_button = widgets.Button(
            description="Stop all", icon="stop", button_style="danger"
        )
        self.output = widgets.Output(layout=widgets.Layout(border="1px solid #e0e0e0"))
        self.notice = widgets.Label(value="")
        self.compare_select = widgets.SelectMultiple(options=[], rows=4, description="compare")
        self.compare_button = widgets.Button(description="Compare changes", icon="columns")
        self.comparison = widgets.HTML(value="")
        self.approvals = ApprovalRows(show_run=True, notice=self._set_notice)
        self.widget = widgets.VBox(
            [
                widgets.HBox(
                    [self.run_select, self.stop_button, self.interrupt_button, self.stop_all_button]
                ),
                self.approvals.widget,
                self.output,
                widgets.HBox([self.compare_select, self.compare_button]),
                self.comparison,
                self.notice,
            ]
        )
        self.run_select.observe(self._on_select, names="value")
        self.stop_button.on_click(self._on_stop)
        self.interrupt_button.on_click(self._on_interrupt)
        self.stop_all_button.on_click(self._on_stop_all)
        self.compare_button.on_click(self._on_compare)
        self.feed = BatchFeed(batch, self.view, self._publish, interval)
        self.approvals.watch(lambda: list(self.batch.runs), until=lambda: bool(self.batch.done))

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

    def _on_interrupt(self, _button: Any = None) -> None:
        run = self.run_select.value or ""
        session = self._session(run)
        if session is None or session.done:
            return
        self._set_notice(f"interrupting {run}…")
        self._workers.spawn(self._interrupt_worker, session)

    def _interrupt_worker(self, session: Session) -> None:
        try:
            session.interrupt()
        except Exception as exc:  # one sentence, never a traceback in the cell
            self._set_notice(f"{session.run}: the interrupt failed: {error_sentence(exc)}")
            return
        self._set_notice("")

    def _on_stop_all(self, _button: Any = None) -> None:
        self.stop_all_button.disabled = True
        self._set_notice("stopping the batch…")
        self._workers.spawn(self._stop_all_worker)

    def _on_compare(self, _button: Any = None) -> None:
        chosen = list(self.compare_select.value) or [r.title for r in self.view.rows()]
        found = {}
        for run in chosen:
            session = self._session(run)
            if session is not None and session.changes is not None:
                found[run] = session.changes
        if not found:
            self._set_notice("No run chosen has changes captured yet (they are, as runs end).")
            return
        masks = [v for run in found if (s := self._session(run)) for v in s.mask.values]
        mask = Masker(masks) if masks else None
        if len(found) == 1:
            run, changes = next(iter(found.items()))
            self.comparison.value = diff_view.changes_html(changes, mask=mask, title=run)
        else:
            self.comparison.value = diff_view.compare_html(found, mask=mask)
        self._set_notice("")

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
                    kept = [n for n in self.compare_select.value if n in names]
                    self.compare_select.options = names
                    self.compare_select.value = kept
                    self.run_select.options = names
                    self.run_select.value = view.selected if view.selected in names else None
                finally:
                    self._updating = False
            self.output.outputs = (entry,)
            if self._ended(view):
                self.stop_button.disabled = self.stop_all_button.disabled = True
                self.interrupt_button.disabled = True

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
            self.approvals.close()
            close_tree(self.widget)
