"""DockerRunner: the Runner protocol on one Docker engine, composed of one piece per job.

The pieces, each in its own runner-layer module (the only modules that import docker):
:class:`~cldpd_magic.engines.docker.DockerConnection` (clients, the private-API adapter,
errors), :class:`~cldpd_magic.engines.docker.ImageBuilder` (builds),
:class:`~cldpd_magic.engines.docker.Containers` (create, run, inspect, logs),
:class:`~cldpd_magic.engines.docker.Processes` (exec and the graceful stop) and
:class:`~cldpd_magic.engines.docker.Networks` (egress networks); what confines a container
is read from its options once, in ``confinement.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..protocol import ContainerInfo, ExecHandle, Runner, RunOptions, StdinPipe, Writer
from .confinement import LABEL_VOLUME_OF, SECURITY_OPT, TMP_TMPFS_OPTIONS
from .containers import KILLED_EXIT_CODE, Containers, out_of_memory_line
from .engine import DockerConnection, PrivateAPI
from .images import LABEL_CONTEXT, ImageBuilder
from .networks import Networks
from .processes import Processes
from .snapshots import Snapshots

if TYPE_CHECKING:
    import docker

#: The private docker-py calls, under the name the conformance tests import.
_PrivateAPI = PrivateAPI


class DockerRunner:
    """Runner on the Docker engine, through docker-py.

    Args:
        client: A ``docker.DockerClient``; ``docker.from_env()`` when None, which honours
            DOCKER_HOST. Without a client, each streaming operation gets a client of its
            own, since docker-py clients are not documented as thread-safe.
        base_url: Connect to this endpoint (``unix://``, ``tcp://``, ``ssh://``) instead.
        tls: ``(ca, cert, key)`` file paths: verify the engine with ``ca`` and present
            the client certificate ``cert`` with its key ``key``.
        use_ssh_client: Reach ``ssh://`` endpoints through the system's ``ssh`` command.
        timeout: Seconds any call but a stream may take (docker-py's default when None).

    Attributes:
        connection: The engine's clients.
        images: Image builds.
        containers: Containers: create, run, inspect, follow.
        processes: Agents run through exec, and graceful stops.
        networks: Networks for a pod's egress.
    """

    #: Shares of the stop timeout given to SIGINT and SIGTERM before SIGKILL.
    STOP_SHARES = Processes.STOP_SHARES

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        *,
        base_url: str | None = None,
        tls: tuple[str, str, str] | None = None,
        use_ssh_client: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.connection = DockerConnection(
            client, base_url=base_url, tls=tls, use_ssh_client=use_ssh_client, timeout=timeout
        )
        self.containers = Containers(self.connection)
        self.images = ImageBuilder(self.connection, self.containers)
        self.processes = Processes(self.connection, self.containers)
        self.networks = Networks(self.connection)
        self.snapshots = Snapshots(self.connection)

    def preflight(self) -> None:
        """Check that the Docker engine answers (see :meth:`DockerConnection.preflight`)."""
        self.connection.preflight()

    def build(
        self,
        tag: str,
        context_dir: str,
        build_args: dict[str, str] | None = None,
        on_output: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        engine: str = "",
    ) -> None:
        """Build an image, streaming its log (see :meth:`ImageBuilder.build`)."""
        self.images.build(tag, context_dir, build_args, on_output, cancel, engine)

    def image_exists(self, tag: str) -> bool:
        """Whether the engine has an image of this tag."""
        return self.images.image_exists(tag)

    def run(
        self,
        opts: RunOptions,
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ContainerInfo], None] | None = None,
    ) -> int:
        """Run a container to its end, streaming its output (see :meth:`Containers.run`)."""
        return self.containers.run(opts, stdout, stderr, on_start)

    def start(self, opts: RunOptions) -> ContainerInfo:
        """Create and start a container detached (see :meth:`Containers.start`)."""
        return self.containers.start(opts)

    def start_service(self, opts: RunOptions, networks: list[str], stdin: bytes) -> ContainerInfo:
        """Start a detached container fed on stdin (see :meth:`Containers.start_service`)."""
        return self.containers.start_service(opts, networks, stdin)

    def inspect(self, container: str) -> ContainerInfo | None:
        """Describe a container; None when there is none of that name or id."""
        return self.containers.inspect(container)

    def list(self, label: str) -> list[ContainerInfo]:
        """Containers, running or not, that carry a label (``key`` or ``key=value``)."""
        return self.containers.list(label)

    def logs(self, container: str, stdout: Writer, stderr: Writer | None = None) -> int:
        """Follow a container's output from its start to its end (see :meth:`Containers.logs`)."""
        return self.containers.logs(container, stdout, stderr)

    def follow_gated(
        self,
        container: str,
        stdout: Writer,
        stderr: Writer | None = None,
        stdin: StdinPipe | None = None,
        end_of_input: str = "",
    ) -> int:
        """Release a container waiting for a line on stdin and follow it to its end, its
        stdin then ``stdin`` up to ``end_of_input`` (see :meth:`Containers.follow_gated`)."""
        return self.containers.follow_gated(container, stdout, stderr, stdin, end_of_input)

    def remove(self, container: str) -> None:
        """Force-remove a container; a missing one is fine."""
        self.containers.remove(container)

    def exec(
        self,
        container: str,
        cmd: list[str],
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ExecHandle], None] | None = None,
        stdin: StdinPipe | None = None,
    ) -> int:
        """Run a command in a running container, its stdin ``stdin`` when given (see
        :meth:`Processes.exec`)."""
        return self.processes.exec(container, cmd, stdout, stderr, on_start, stdin)

    def stop_exec(self, handle: ExecHandle, timeout: float = 10.0) -> None:
        """Stop one exec gracefully; the container stays (see :meth:`Processes.stop_exec`)."""
        self.processes.stop_exec(handle, timeout)

    def stop(self, container: str, timeout: float = 10.0) -> None:
        """Stop a container gracefully: SIGINT, SIGTERM, SIGKILL (see :meth:`Processes.stop`)."""
        self.processes.stop(container, timeout)

    def create_network(self, name: str, labels: dict[str, str], internal: bool = True) -> str:
        """Create a bridge network; its subnet (see :meth:`Networks.create_network`)."""
        return self.networks.create_network(name, labels, internal)

    def capture(self, container: str, script: str, *, left_at: str | None = None) -> bytes:
        """Run ``sh -c script`` over an ended container's files (see Snapshots.capture)."""
        return self.snapshots.capture(container, script, left_at=left_at)

    def gateway(self, network: str) -> str:
        """The gateway address reserved on a network (see :meth:`Networks.gateway`)."""
        return self.networks.gateway(network)

    def remove_network(self, name: str) -> None:
        """Remove a network, disconnecting what is on it; a missing one is fine."""
        self.networks.remove_network(name)

    def list_networks(self, label: str) -> list[str]:
        """Names of the networks that carry a label (``key`` or ``key=value``)."""
        return self.networks.list_networks(label)

    def address(self, container: str, network: str) -> str:
        """A container's IP address on a network ("" when it is not on it)."""
        return self.networks.address(container, network)


__all__ = [
    "KILLED_EXIT_CODE",
    "LABEL_CONTEXT",
    "LABEL_VOLUME_OF",
    "SECURITY_OPT",
    "TMP_TMPFS_OPTIONS",
    "ContainerInfo",
    "DockerRunner",
    "ExecHandle",
    "RunOptions",
    "Runner",
    "Writer",
    "out_of_memory_line",
]
