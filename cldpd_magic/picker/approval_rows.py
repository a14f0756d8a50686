"""Approval rows in widgets: a tool call waiting for a person, with Allow, Deny and Always.

One :class:`ApprovalRows` shows an :class:`~.approvals.ApprovalQueue`: a row per waiting
call (``Bash: touch x``, the run named when it shows several runs), oldest first, each
with Allow, Deny and "Always allow <tool>" (that tool, for the rest of this run). A row
goes once its call is answered, here or anywhere else, or its run ends. The queue's
reader threads change the rows by assigning the box's ``children`` (never ``with out:``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import ipywidgets as widgets

from ..runs import Session
from ._tree import close_tree
from .approvals import ApprovalQueue, PendingApproval

#: How a row's label is laid out: the call takes what room there is.
_LABEL_LAYOUT = {"flex": "1 1 auto", "min_width": "12em"}


class ApprovalRow:
    """One waiting call: its label and its three buttons, in an HBox.

    Attributes:
        item: The call.
        label: What it is (``run: Bash: touch x``), as plain text.
        allow_button: Lets it run.
        deny_button: Refuses it; the agent is told a person said no.
        always_button: Lets it run, and every later call of that tool in this run.
        widget: The HBox.
    """

    def __init__(self, item: PendingApproval, show_run: bool, answer: Callable[..., None]) -> None:
        self.item = item
        text = f"{item.run}: {item.call}" if show_run else item.call
        self.label = widgets.Label(value=text, layout=widgets.Layout(**_LABEL_LAYOUT))
        self.allow_button = widgets.Button(
            description="Allow", button_style="success", icon="check",
            tooltip=f"Let {item.tool} run once",
        )  # fmt: skip
        self.deny_button = widgets.Button(
            description="Deny", button_style="danger", icon="ban", tooltip="Refuse this call"
        )
        self.always_button = widgets.Button(
            description=f"Always allow {item.tool}",
            tooltip=f"Let {item.tool} run without asking for the rest of run {item.run}",
            layout=widgets.Layout(width="auto"),
        )
        self.allow_button.on_click(lambda _b: answer(self, allow=True))
        self.deny_button.on_click(lambda _b: answer(self, allow=False))
        self.always_button.on_click(lambda _b: answer(self, allow=True, always=True))
        self.widget = widgets.HBox(
            [self.label, self.allow_button, self.deny_button, self.always_button],
            layout=widgets.Layout(align_items="center"),
        )

    @property
    def buttons(self) -> tuple[widgets.Button, ...]:
        """Allow, Deny and Always."""
        return self.allow_button, self.deny_button, self.always_button

    def answered(self) -> None:
        """Disable the buttons: the answer is on its way (a second click does nothing)."""
        for button in self.buttons:
            button.disabled = True


class ApprovalRows:
    """The calls waiting for a person, a row each, oldest first; their queue's widgets.

    Args:
        show_run: Name the run on each row (a queue across runs).
        notice: Shows why an answer could not be given (it was answered meanwhile, its
            agent ended), one sentence.

    Attributes:
        queue: The approvals shown.
        widget: A VBox of the rows (empty, so invisible, when nothing waits).
    """

    def __init__(self, *, show_run: bool = False, notice: Callable[[str], None] | None = None):
        self.show_run = show_run
        self._notice = notice
        self._lock = threading.RLock()
        self._rows: dict[tuple[str, str], ApprovalRow] = {}
        self._order: list[tuple[str, str]] = []
        self._closed = False
        self.widget = widgets.VBox()
        self.widget.add_class("cldpd-approvals")
        self.queue = ApprovalQueue(self.refresh)

    @property
    def rows(self) -> list[ApprovalRow]:
        """The rows shown, oldest first."""
        with self._lock:
            return [self._rows[key] for key in self._order]

    def row(self, request_id: str) -> ApprovalRow | None:
        """The row of a request, if it shows."""
        return next((r for r in self.rows if r.item.request_id == request_id), None)

    def follow(self, session: Session) -> None:
        """Show the approvals of one run (a cell's)."""
        self.queue.follow(session)

    def watch(self, sessions: Callable[[], Iterable[Session]], until: Callable[[], bool]) -> None:
        """Show the approvals of every interactive run ``sessions()`` lists, as they come."""
        self.queue.watch(sessions, until)

    def refresh(self) -> None:
        """Make the rows match the queue (any thread: trait writes only)."""
        with self._lock:
            if self._closed:
                return
            items = self.queue.items()
            keep = {item.key for item in items}
            gone = [row for key, row in self._rows.items() if key not in keep]
            for item in items:
                if item.key not in self._rows:
                    self._rows[item.key] = ApprovalRow(item, self.show_run, self._answer)
            for row in gone:
                del self._rows[row.item.key]
            self._order = [item.key for item in items]
            self.widget.children = tuple(self._rows[key].widget for key in self._order)
            for row in gone:  # after they left the box: the frontend never shows a closed one
                close_tree(row.widget)

    def _answer(self, row: ApprovalRow, *, allow: bool, always: bool = False) -> None:
        if row.allow_button.disabled:
            return
        row.answered()
        if not self.queue.decide(row.item, allow=allow, always=always) and self._notice:
            self._notice(self.queue.error)

    def close(self) -> None:
        """Stop showing approvals and close the widgets; the runs' questions stay pending."""
        with self._lock:
            self._closed = True
            self.queue.close()
            close_tree(self.widget)

    def __repr__(self) -> str:
        shown = [row.label.value for row in self.rows]
        return "\n".join(["approvals waiting:", *shown]) if shown else "no approval waiting"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        render = self.widget._repr_mimebundle_
        bundle = dict(render(**kwargs) or {}) if render else {}
        # Under a run's output, nothing waiting reads as nothing (a saved notebook).
        bundle["text/plain"] = repr(self) if self.rows else ""
        return bundle


__all__ = ["ApprovalRow", "ApprovalRows"]
