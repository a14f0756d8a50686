"""SwarmRunner: the Runner protocol on a Docker Swarm, where the swarm picks each run's node.

Each run is a ``replicated-job`` service named like the container would be; its labels
are the run's, so the inventory finds it. Signals, execs and output reach the task's
container through the engine of its node: the manager's own, or the endpoint a node
names in its ``cldpd.endpoint`` label. A run's output comes through an attach to that
container (its command waits behind a one-line gate on stdin until the attach is made,
so nothing is missed), stdout and stderr kept apart; when some node names no endpoint,
from the service's log through the manager (several times slower). A later ``logs``
follows the container's log. The exit code is the task container's. Forwarded secrets
become Swarm secrets, read into the environment by a small wrapper, so no service spec
holds them. A task is confined as a plain container is, but for what a service spec
cannot say (``services.UNSUPPORTED_ON_SWARM``).

The pieces, as DockerRunner's: :class:`~.nodes.Nodes` (the manager and the nodes'
engines), :class:`~.images.Images` (builds on the nodes, or pushes to a registry),
:class:`~.services.Services` (services, tasks, secrets) and :class:`~.logs.Logs` (a run's
output to its end).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import docker.errors
import requests.exceptions

from ...errors import (
    ContainerFailedError,
    DockerUnavailableError,
    SessionNotFoundError,
    one_line,
)
from ..docker import DockerRunner, engine_errors, explain
from ..protocol import ContainerInfo, ExecHandle, Runner, RunOptions, StdinPipe, Writer
from .images import Images
from .logs import Logs
from .nodes import LABEL_ENDPOINT, Nodes
from .services import LABEL_SECRET_OF, Services, container_id, task_status


class SwarmRunner:
    """Runner on a Docker Swarm, through its manager's engine.

    Args:
        manager: A DockerRunner on a manager node's engine.
        node_runner: Makes the runner of a node's engine from its ``cldpd.endpoint``
            label (an engine entry); DockerRunner(base_url=...) when None.
        poll: Seconds between looks at a task's state.
        registry: A registry (``host[:port]``) to push images to, built once on the
            manager, for the nodes to pull; "" builds each image on every ready node.

    Attributes:
        nodes: The manager and the nodes' engines.
        images: Builds, on the nodes or through the registry.
        services: The runs' services, their tasks and secrets.
        output: The runs' output.
    """

    def __init__(
        self,
        manager: DockerRunner,
        *,
        node_runner: Callable[[str], Runner] | None = None,
        poll: float = 0.1,
        registry: str = "",
    ) -> None:
        self.manager = manager
        self.nodes = Nodes(manager, node_runner)
        self.images = Images(self.nodes, registry)
        self.services = Services(self.nodes, self.images, poll)
        self.output = Logs(self.nodes, self.services)
        self._lock = threading.Lock()
        self._execs: dict[str, Runner] = {}  # exec id -> the node runner that runs it

    @property
    def registry(self) -> str:
        """The registry images are pushed to ("" for none)."""
        return self.images.registry

    @property
    def poll(self) -> float:
        """Seconds between looks at a task's state."""
        return self.services.poll

    def preflight(self) -> None:
        """Check that the manager answers and is a swarm manager.

        Raises:
            DockerUnavailableError: It does not answer, or is no manager.
        """
        self.manager.preflight()
        try:
            swarm = self.nodes.api().info().get("Swarm") or {}
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailableError(
                f"The swarm manager did not answer: {one_line(explain(exc))}."
            ) from None
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise DockerUnavailableError(
                "This engine is not a swarm manager; run docker swarm init there, or name a "
                "manager's endpoint in the swarm:// entry."
            )

    @engine_errors
    def build(
        self,
        tag: str,
        context_dir: str,
        build_args: dict[str, str] | None = None,
        on_output: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        engine: str = "",
    ) -> None:
        """Build the image where the tasks find it (see :meth:`Images.build`).

        Raises:
            BuildFailedError: A build failed, or the registry refused the push.
        """
        self.images.build(tag, context_dir, build_args, on_output, cancel)

    @engine_errors
    def run(
        self,
        opts: RunOptions,
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ContainerInfo], None] | None = None,
    ) -> int:
        """Run a service to its end, following its output; return the task's exit code.

        With ``opts.stdin``, the task's stdin is written through the attach on its node
        after the gate's line, up to a line of the run's own that the pipe's close sends
        (:data:`~.services._GATE_STDIN`): every node must name its endpoint.

        Raises:
            PodRunningError: A service of that name exists.
            ContainerFailedError: The swarm refused the service or could not run its task,
                or the run has stdin and some node names no endpoint.
        """
        pipe = opts.stdin
        try:
            gated = self.nodes.all_gated()
            end_of_input = ""
            if pipe is not None:
                if not gated:
                    raise ContainerFailedError(
                        f"{opts.name} reads its stdin, which a swarm's task gets only through "
                        f"its node's engine; give every node a {LABEL_ENDPOINT} label naming "
                        "its Docker endpoint."
                    )
                end_of_input = f"cldpd-end-of-input-{uuid.uuid4().hex}"
            service = self.services.create(opts, gated, end_of_input)
            try:
                if on_start is not None:
                    on_start(ContainerInfo(opts.name, service, "running", opts.labels, opts.image))
                if gated:
                    return self.output.follow_gated(
                        service, opts.name, stdout, stderr, pipe, end_of_input
                    )
                return self.output.follow_to_end(service, opts.name, stdout, stderr)
            finally:
                if opts.remove:
                    self.remove(opts.name)
        finally:
            if pipe is not None:
                pipe.end()

    @engine_errors
    def start(self, opts: RunOptions) -> ContainerInfo:
        """Create the service detached (keepAlive runs) and wait until its task runs.

        It lives until stopped and removed.

        Raises:
            PodRunningError: A service of that name exists.
            ContainerFailedError: The swarm refused it, its task did not start in time,
                or it was removed meanwhile (its run was stopped).
        """
        return self.services.wait_started(self.services.create(opts), opts)

    @engine_errors
    def exec(
        self,
        container: str,
        cmd: list[str],
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ExecHandle], None] | None = None,
        stdin: StdinPipe | None = None,
    ) -> int:
        """Run a command in the task's container, through its node's engine (its stdin
        ``stdin`` when given, ended when the call returns).

        Raises:
            SessionNotFoundError: The service has no running task.
        """
        try:
            found = self.services.container(container)
            if found is None:
                raise SessionNotFoundError(f"No running container named {container}.")
            runner, cid = found

            def started(handle: ExecHandle) -> None:
                with self._lock:
                    self._execs[handle.exec_id] = runner
                if on_start is not None:
                    on_start(handle)

            return runner.exec(cid, cmd, stdout, stderr, on_start=started, stdin=stdin)
        finally:
            if stdin is not None:
                stdin.end()

    def stop_exec(self, handle: ExecHandle, timeout: float = 10.0) -> None:
        """Stop an exec started by exec(), on its node."""
        with self._lock:
            runner = self._execs.pop(handle.exec_id, None)
        if runner is not None:
            runner.stop_exec(handle, timeout)

    @engine_errors
    def stop(self, container: str, timeout: float = 10.0) -> None:
        """Stop the task gracefully on its node: SIGINT, SIGTERM, then kill; the service stays."""
        deadline = time.monotonic() + timeout
        while True:
            task = self.services.task(container)
            if task is None or task_status(task) == "exited":
                return
            found = self.services.container(container)
            if found is not None:
                break
            if time.monotonic() > deadline:
                self.remove(container)  # never started: nothing to end gracefully
                return
            time.sleep(self.poll)
        runner, cid = found
        runner.stop(cid, max(deadline - time.monotonic(), 1.0))
        while task_status(self.services.task(container)) not in ("exited", "created"):
            if time.monotonic() > deadline + 10:
                break
            time.sleep(self.poll)

    @engine_errors
    def capture(self, container: str, script: str, *, left_at: str | None = None) -> bytes:
        """Read a run's ended task container's files on its node (see SnapshotRunner).

        Raises:
            SessionNotFoundError: The run has no task container.
        """
        task = self.services.task(container)
        cid = container_id(task)
        if task is None or not cid:
            raise SessionNotFoundError(f"No container named {container}.")
        return self.nodes.runner_of(task["NodeID"]).capture(cid, script, left_at=left_at)

    @engine_errors
    def remove(self, container: str) -> None:
        """Remove the service and its secrets; a missing one is fine."""
        self.services.remove(container)

    @engine_errors
    def inspect(self, container: str) -> ContainerInfo | None:
        """Describe a run's service, None when there is none."""
        service = self.services.service(container)
        return None if service is None else self.services.info(service)

    @engine_errors
    def list(self, label: str) -> list[ContainerInfo]:
        """List the services that carry a label (``key`` or ``key=value``)."""
        return self.services.list(label)

    @engine_errors
    def logs(self, container: str, stdout: Writer, stderr: Writer | None = None) -> int:
        """Follow a run's log from its start to its end; return the exit code.

        Raises:
            SessionNotFoundError: There is no such service.
        """
        service = self.services.service(container)
        if service is None:
            raise SessionNotFoundError(f"No container named {container}.")
        return self.output.follow_to_end(service["ID"], container, stdout, stderr)


__all__ = ["LABEL_ENDPOINT", "LABEL_SECRET_OF", "SwarmRunner"]
