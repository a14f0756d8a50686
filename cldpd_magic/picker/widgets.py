"""The former single module of picker/, kept while some tests import it.

Import from :mod:`cldpd_magic.picker` instead; this goes once nothing imports it.
"""

from __future__ import annotations

from .actions import PodActions
from .batch import BatchPanel
from .details import display_path, pod_details_html
from .layout import PodPicker
from .state import Controls, PodControl

__all__ = [
    "BatchPanel",
    "Controls",
    "PodActions",
    "PodControl",
    "PodPicker",
    "display_path",
    "pod_details_html",
]
