"""Container engines: the Runner protocol, the engines setting, several engines as one.

The engines themselves are in ``docker/`` (one module per resource, as docker-py's
``api/``) and ``swarm/``; they load docker-py, so they are imported only when a runner
is made (``from cldpd_magic.engines.docker import DockerRunner``).
"""

from .multi import UNREACHABLE, MultiEngineRunner, check_mounts, docker_runner_for
from .protocol import (
    LABEL_CLIENT,
    ContainerInfo,
    EgressRunner,
    ExecHandle,
    LaunchGuard,
    Runner,
    RunOptions,
    SnapshotRunner,
    StdinPipe,
    Writer,
    client_gone,
    this_client,
)
from .setting import ENGINES_ENV, Engine, EngineSetting, parse_engine, parse_engines

__all__ = [
    "ENGINES_ENV",
    "LABEL_CLIENT",
    "UNREACHABLE",
    "ContainerInfo",
    "EgressRunner",
    "Engine",
    "EngineSetting",
    "ExecHandle",
    "LaunchGuard",
    "MultiEngineRunner",
    "RunOptions",
    "Runner",
    "SnapshotRunner",
    "StdinPipe",
    "Writer",
    "check_mounts",
    "client_gone",
    "docker_runner_for",
    "parse_engine",
    "parse_engines",
    "this_client",
]
