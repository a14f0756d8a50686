"""The ipywidgets front end: the pod picker and the batch panel.

What the picker knows of each pod (:mod:`.state`: PodControl, Controls), what its buttons
do (:mod:`.actions`: PodActions and its worker threads) and the details pane's HTML
(:mod:`.details`) import no ipywidgets; the widgets are :mod:`.layout` (PodPicker, a pane
per pod) and :mod:`.batch` (BatchPanel), loaded when first asked for.
"""

from __future__ import annotations

from typing import Any

from .actions import PodActions
from .details import pod_details_html
from .state import Controls, PodControl

__all__ = [
    "BatchPanel",
    "Controls",
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
    if name == "BatchPanel":
        from .batch import BatchPanel

        return BatchPanel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
