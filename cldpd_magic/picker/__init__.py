"""The ipywidgets front end: the pod picker and the batch panel."""

from .widgets import BatchPanel, Controls, PodActions, PodControl, PodPicker, pod_details_html

__all__ = [
    "BatchPanel",
    "Controls",
    "PodActions",
    "PodControl",
    "PodPicker",
    "pod_details_html",
]
