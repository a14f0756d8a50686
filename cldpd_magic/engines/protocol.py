"""The Runner protocol and its data types: what the dispatcher needs from a container engine.

No engine is imported here: the fakes in the tests, a plain ``import cldpd_magic`` and
any future runner (another engine, a cluster) depend on this module alone.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..pods import Mount, Resources


class Writer(Protocol):
    """Anything with ``write(str)``, such as ``sys.stdout`` or an ``io.StringIO``."""

    def write(self, text: str, /) -> Any:
        """Write a piece of text."""


@runtime_checkable
class LaunchGuard(Protocol):
    """What a runner asks while it makes a run's container, so that a stop is never lost.

    The run's session answers from its state: once the run is stopping, both methods
    raise. The runner then makes nothing more and removes what it made, started or not,
    and lets the error through.
    """

    def check(self) -> None:
        """Called before the container is created and again before it starts."""

    def started(self, info: ContainerInfo) -> None:
        """Called once it has started: from then on a stop of the run finds it."""


@dataclass
class RunOptions:
    """How to run a pod's container.

    Attributes:
        image: Image tag.
        name: Container name.
        cmd: Command and arguments.
        env: Environment variables set in the container.
        inherit_env: Host variable names forwarded when set on the host; unset ones are skipped.
        workdir: Working directory ("" keeps the image's).
        remove: Remove the container once it has exited.
        mounts: Bind mounts.
        labels: Container labels.
        network: Docker network mode or network name ("" keeps the engine's default).
        resources: CPU, memory and process limits.
        cap_add: Capabilities kept (all others are dropped), without ``CAP_``.
        read_only_root: Make the root filesystem read-only; /tmp, the working directory
            and the home directory stay writable.
        engine: The configured engine to run on ("" is the default, the first one).
        dns: DNS servers the engine's resolver forwards to (empty: the engine's default).
        guard: The run's :class:`LaunchGuard`, asked by ``run`` and ``start`` (None: none).
    """

    image: str
    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    inherit_env: list[str] = field(default_factory=list)
    workdir: str = ""
    remove: bool = True
    mounts: list[Mount] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    network: str = ""
    resources: Resources = field(default_factory=Resources)
    cap_add: list[str] = field(default_factory=list)
    read_only_root: bool = False
    engine: str = ""
    dns: list[str] = field(default_factory=list)
    guard: LaunchGuard | None = field(default=None, compare=False, repr=False)

    def resolved_env(self) -> dict[str, str]:
        """``env`` plus every ``inherit_env`` variable that is set on the host."""
        env = dict(self.env)
        for name in self.inherit_env:
            value = os.environ.get(name)
            if value is not None:
                env[name] = value
        return env


#: Label on a run's containers (its own and its egress): the process that started it, as
#: :func:`this_client` says, so any later process can tell a run nobody follows any more.
LABEL_CLIENT = "cldpd.client"


def _start_ticks(pid: int) -> str:
    """A process's start time in clock ticks since boot ("" when there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def this_client() -> str:
    """This process as a ``cldpd.client`` label: host name, pid and start time.

    The start time tells this process from a later one that got the same pid.
    """
    return f"{socket.gethostname()}/{os.getpid()}/{_start_ticks(os.getpid())}"


def client_gone(label: str) -> bool:
    """Whether the process a ``cldpd.client`` label names has ended.

    Only a process on this host can be seen: for one elsewhere (or a label that names
    none) this says False, and a sweep falls back on how long ago the run ended.
    """
    host, _, rest = label.partition("/")
    pid, _, ticks = rest.partition("/")
    if host != socket.gethostname() or not pid.isdigit() or not ticks:
        return False
    return _start_ticks(int(pid)) != ticks


@dataclass(frozen=True)
class ContainerInfo:
    """What the engine says about a container.

    Attributes:
        name: Container name.
        id: Container id.
        status: Docker status (created, running, exited, ...).
        labels: Its labels.
        image: Image tag it was created from.
        started_at: Start time as the engine reports it (ISO 8601).
        env: Its environment.
        engine: The configured engine that holds it ("" when only one is configured).
        finished_at: When it exited, as the engine reports it ("" while it runs, or unknown).
    """

    name: str
    id: str
    status: str
    labels: dict[str, str]
    image: str = ""
    started_at: str = ""
    env: dict[str, str] = field(default_factory=dict)
    engine: str = ""
    finished_at: str = ""

    @property
    def running(self) -> bool:
        """Whether the container is running."""
        return self.status == "running"


@dataclass
class ExecHandle:
    """Identifies an exec started by :meth:`DockerRunner.exec`, so it can be stopped."""

    container: str
    exec_id: str
    pidfile: str


@runtime_checkable
class Runner(Protocol):
    """The Docker operations the dispatcher needs; every method blocks."""

    def preflight(self) -> None:
        """Raise DockerUnavailableError unless the engine answers."""

    def build(
        self,
        tag: str,
        context_dir: str,
        build_args: dict[str, str] | None = None,
        on_output: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        engine: str = "",
    ) -> None:
        """Build an image on an engine ("" the default), passing each log line to on_output."""

    def run(
        self,
        opts: RunOptions,
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ContainerInfo], None] | None = None,
    ) -> int:
        """Run a container to its end and return its exit code (asking ``opts.guard``)."""

    def start(self, opts: RunOptions) -> ContainerInfo:
        """Create and start a container detached (asking ``opts.guard``)."""

    def exec(
        self,
        container: str,
        cmd: list[str],
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ExecHandle], None] | None = None,
    ) -> int:
        """Run a command in a running container and return its exit code."""

    def stop_exec(self, handle: ExecHandle, timeout: float = 10.0) -> None:
        """Stop an exec started by exec()."""

    def stop(self, container: str, timeout: float = 10.0) -> None:
        """Stop a container gracefully; a missing container is fine."""

    def remove(self, container: str) -> None:
        """Remove a stopped container; a missing one is fine."""

    def inspect(self, container: str) -> ContainerInfo | None:
        """Describe a container, None when there is none."""

    def list(self, label: str) -> list[ContainerInfo]:
        """List containers carrying a label."""

    def logs(self, container: str, stdout: Writer, stderr: Writer | None = None) -> int:
        """Follow a container's output from its start to its end; return its exit code."""


@runtime_checkable
class EgressRunner(Runner, Protocol):
    """A Runner that can put a run behind an egress proxy: images, networks, a service.

    What ``runs/egress.py`` needs of an engine beyond :class:`Runner`. A single Docker
    engine's runner is one; a runner over several engines or a swarm is not (yet), and
    an allowlist is refused there in one sentence.
    """

    def image_exists(self, tag: str) -> bool:
        """Whether the engine has an image of this tag."""

    def create_network(self, name: str, labels: dict[str, str], internal: bool = True) -> str:
        """Create a bridge network (an internal one has no way out); return its subnet."""

    def gateway(self, network: str) -> str:
        """The gateway address the engine reserved on a network ("" when none)."""

    def remove_network(self, name: str) -> None:
        """Remove a network, disconnecting what is on it; a missing one is fine."""

    def list_networks(self, label: str) -> list[str]:
        """Names of the networks that carry a label (``key`` or ``key=value``)."""

    def address(self, container: str, network: str) -> str:
        """A container's IP address on a network ("" when it is not on it)."""

    def start_service(self, opts: RunOptions, networks: list[str], stdin: bytes) -> ContainerInfo:
        """Start a detached container on ``opts.network`` and ``networks``, fed ``stdin``."""
