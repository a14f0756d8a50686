"""The ipywidgets front end: the pod picker and the batch panel.

What the picker knows of each pod (:mod:`.state`: PodControl, Controls), what its buttons
do (:mod:`.actions`: PodActions and its worker threads), the approvals waiting across
runs (:mod:`.approvals`: ApprovalQueue) and the details pane's HTML (:mod:`.details`)
import no ipywidgets; the widgets are :mod:`.layout` (PodPicker, a pane per pod),
:mod:`.batch` (BatchPanel) and :mod:`.approval_rows` (ApprovalRows: Allow, Deny, Always
per waiting call), loaded when first asked for.
"""

from __future__ import annotations

from typing import Any

from .actions import PodActions
from .approvals import ApprovalQueue, PendingApproval
from .details import pod_details_html
from .state import Controls, PodControl

__all__ = [
    "ApprovalQueue",
    "ApprovalRows",
    "BatchPanel",
    "Controls",
    "PendingApproval",
    "PodActions",
    "PodControl",
    "PodPicker",
    "pod_details_html",
]


def __getattr__(name: str) -> Any:
    # The widgets import ipywidgets: load them only when asked for.
    if name == "PodPicker":
        from .layout import PodPicker

        return PodPicker
    if name == "ApprovalRows":
        from .approval_rows import ApprovalRows

        return ApprovalRows
    if name == "BatchPanel":
        from .batch import BatchPanel

        return BatchPanel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
