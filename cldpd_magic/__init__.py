"""cldpd_magic: run AI coding agents in Docker pods from a Jupyter notebook.

Load the IPython extension with ``%load_ext cldpd_magic``, or use the Python API:
:class:`Dispatcher` builds a pod's image and runs its agent as a :class:`Session`.
"""

from __future__ import annotations

import logging
from typing import Any

from .engines import Runner, RunOptions
from .errors import (
    BuildFailedError,
    CldpdError,
    ContainerFailedError,
    DockerUnavailableError,
    InvalidPodError,
    InvalidRequestError,
    PodConfigError,
    PodNotFoundError,
    PodRunningError,
    SessionNotFoundError,
    StdinClosedError,
    StopFailedError,
)
from .events import Event, EventType, RunState, Usage
from .pods import (
    Mount,
    Pod,
    PodConfig,
    Scaffold,
    Template,
    create_pod,
    default_pods_dir,
    discover_all,
    discover_pod,
    list_templates,
)
from .runs import (
    Batch,
    Changes,
    ChangesError,
    Dispatcher,
    FileChange,
    Limits,
    PermissionRequest,
    RunningPod,
    RunSpec,
    Session,
    StopReason,
    Variant,
)

__version__ = "0.1.0"

# Silent unless the user asks (see cldpd_magic.logs): a library never configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Batch",
    "BuildFailedError",
    "Changes",
    "ChangesError",
    "CldpdError",
    "ContainerFailedError",
    "Dispatcher",
    "DockerRunner",
    "DockerUnavailableError",
    "Event",
    "EventType",
    "FileChange",
    "InvalidPodError",
    "InvalidRequestError",
    "Limits",
    "Mount",
    "PermissionRequest",
    "Pod",
    "PodConfig",
    "PodConfigError",
    "PodNotFoundError",
    "PodPicker",
    "PodRunningError",
    "RunOptions",
    "RunSpec",
    "RunState",
    "Runner",
    "RunningPod",
    "Scaffold",
    "Session",
    "SessionNotFoundError",
    "StdinClosedError",
    "StopFailedError",
    "StopReason",
    "Template",
    "Usage",
    "Variant",
    "create_pod",
    "default_pods_dir",
    "discover_all",
    "discover_pod",
    "list_templates",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def __getattr__(name: str) -> Any:
    # The widget and the magics import ipywidgets and IPython; load them only when asked.
    if name == "PodPicker":
        from .picker import PodPicker

        return PodPicker
    if name == "DockerRunner":  # docker-py and requests load only when asked for
        from .engines.docker import DockerRunner

        return DockerRunner
    raise AttributeError(f"module 'cldpd_magic' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """Register the %cldpd_* magics (``%load_ext cldpd_magic``)."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Undo :func:`load_ipython_extension` (``%unload_ext cldpd_magic``)."""
    from .magics import unload_ipython_extension as unload

    unload(ipython)
