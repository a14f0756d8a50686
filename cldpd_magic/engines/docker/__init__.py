"""The Runner on one Docker engine, through docker-py: one module per resource, and the
confinement of a container that a swarm shares."""

from .confinement import (
    LABEL_VOLUME_OF,
    SECURITY_OPT,
    TMP_TMPFS_OPTIONS,
    ContainerSettings,
    ImageFacts,
    MountSpec,
    container_settings,
)
from .containers import Containers, out_of_memory_line
from .engine import (
    DockerConnection,
    PrivateAPI,
    container_error,
    engine_errors,
    explain,
    force_remove,
    refuse_engine_pin,
    response_frames,
    unreachable,
)
from .images import ImageBuilder
from .networks import Networks
from .processes import Processes
from .runner import DockerRunner
from .streams import OutputStream, SharedReader, StreamDecoder, pump

__all__ = [
    "LABEL_VOLUME_OF",
    "SECURITY_OPT",
    "TMP_TMPFS_OPTIONS",
    "ContainerSettings",
    "Containers",
    "DockerConnection",
    "DockerRunner",
    "ImageBuilder",
    "ImageFacts",
    "MountSpec",
    "Networks",
    "OutputStream",
    "PrivateAPI",
    "Processes",
    "SharedReader",
    "StreamDecoder",
    "container_error",
    "container_settings",
    "engine_errors",
    "explain",
    "force_remove",
    "out_of_memory_line",
    "pump",
    "refuse_engine_pin",
    "response_frames",
    "unreachable",
]
