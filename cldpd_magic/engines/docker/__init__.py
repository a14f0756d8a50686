"""The Runner on one Docker engine, through docker-py: one module per resource."""

from .containers import Containers, out_of_memory_line
from .engine import (
    DockerConnection,
    PrivateAPI,
    container_error,
    engine_errors,
    explain,
    force_remove,
    pump,
    refuse_engine_pin,
    response_frames,
    unreachable,
)
from .engine import _StreamDecoder as _StreamDecoder
from .images import ImageBuilder
from .networks import Networks
from .processes import Processes
from .runner import DockerRunner

__all__ = [
    "Containers",
    "DockerConnection",
    "DockerRunner",
    "ImageBuilder",
    "Networks",
    "PrivateAPI",
    "Processes",
    "container_error",
    "engine_errors",
    "explain",
    "force_remove",
    "out_of_memory_line",
    "pump",
    "refuse_engine_pin",
    "response_frames",
    "unreachable",
]
