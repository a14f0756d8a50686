"""A swarm run's output: its task's container attached on its node behind a stdin gate, or
followed on its node, or the service's log gathered by the manager (several times slower)."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

import docker.errors

from ...errors import ContainerFailedError, DockerUnavailableError, SessionNotFoundError, one_line
from ..docker import DockerRunner, PrivateAPI, StreamDecoder, response_frames
from ..protocol import StdinPipe, Writer
from .nodes import GatedFollower, Nodes
from .services import Services, container_id

#: Seconds the logs of a finished task have to reach the follower before it is closed.
LOG_DRAIN_SECONDS = 30.0


class _LogFollower:
    """Follows a service's log in a thread, counting what each stream delivered."""

    def __init__(self, runner: DockerRunner, service: str, stdout: Writer, stderr: Writer | None):
        self._runner = runner
        self._service = service
        self._writers = {1: StreamDecoder(stdout), 2: StreamDecoder(stderr)}
        self.delivered = {1: 0, 2: 0}
        self._cond = threading.Condition()
        self._socket: Any = None
        self._closing = False
        self._thread = threading.Thread(target=self._follow, daemon=True, name="cldpd-swarm-logs")
        self._thread.start()

    def _follow(self) -> None:
        with contextlib.suppress(Exception), self._runner.connection.streaming() as api:
            with self._cond:
                if self._closing:
                    return
                response = PrivateAPI.service_logs(api, self._service, follow=True)
                self._socket = PrivateAPI.response_socket(api, response)
            for kind, data in response_frames(response):
                if kind not in self._writers:
                    continue  # the engine's own notes, such as a cancelled log read
                self._writers[kind].feed(data)
                with self._cond:
                    self.delivered[kind] += len(data)
                    self._cond.notify_all()
        for writer in self._writers.values():
            writer.close()

    def drain(self, expected: dict[int, int], timeout: float) -> None:
        """Wait until each stream delivered ``expected`` bytes (or ``timeout``), then stop."""
        with self._cond:
            self._cond.wait_for(
                lambda: all(self.delivered[k] >= n for k, n in expected.items()), timeout
            )
            self._closing = True
            sock = self._socket
        if sock is not None:
            # Closing the response would wait for the read in progress; a shutdown ends it,
            # as docker-py's CancellableStream does.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout)


class Logs:
    """Follows the output of a swarm's runs to their end.

    Args:
        nodes: The swarm's nodes.
        services: Its services.
    """

    def __init__(self, nodes: Nodes, services: Services) -> None:
        self.nodes = nodes
        self.services = services

    def _logged(self, service: str) -> dict[int, int]:
        """Bytes the service's log holds now, per stream."""
        counts = {1: 0, 2: 0}
        with self.nodes.manager.connection.streaming() as api:
            for kind, data in response_frames(PrivateAPI.service_logs(api, service, follow=False)):
                if kind in counts:
                    counts[kind] += len(data)
        return counts

    def _follow_on_node(
        self, task: dict[str, Any] | None, stdout: Writer, stderr: Writer | None
    ) -> int | None:
        """Follow the task container's own log on its node; None when that is not possible.

        The node's engine serves a container's log directly, several times faster than
        the swarm gathers a service's log through the manager.
        """
        cid = container_id(task)
        if not cid:
            return None
        try:
            node = self.nodes.runner_of(task["NodeID"])  # type: ignore[index]
            return node.logs(cid, stdout, stderr)
        except (DockerUnavailableError, SessionNotFoundError):
            return None  # no endpoint for the node, or the container is gone: the swarm's log

    def follow_gated(
        self,
        service: str,
        name: str,
        stdout: Writer,
        stderr: Writer | None,
        stdin: StdinPipe | None = None,
        end_of_input: str = "",
    ) -> int:
        """Attach to the task's container on its node, open its gate, follow it to its end.

        With ``stdin``, the pipe is connected after the gate's line; its close sends the
        line ``end_of_input``, where the task's command ends the agent's input.

        Raises:
            ContainerFailedError: The swarm could not run the task, or its node could not
                be reached (the service is removed: its agent would wait forever).
        """
        task = self.services.first_container(service, name)
        cid = container_id(task)
        if task is None or not cid:
            return self.services.wait_end(service, name)[1]
        try:
            node = self.nodes.runner_of(task["NodeID"])
            if not isinstance(node, GatedFollower):
                raise DockerUnavailableError(
                    f"the runner of node {task['NodeID'][:12]} cannot open a task's gate."
                )
            if stdin is None:
                code = node.follow_gated(cid, stdout, stderr)
            else:
                code = node.follow_gated(cid, stdout, stderr, stdin, end_of_input)
        except (DockerUnavailableError, SessionNotFoundError) as exc:
            with contextlib.suppress(docker.errors.NotFound):
                self.nodes.api().remove_service(service)
            raise ContainerFailedError(
                f"Could not follow {name} on its swarm node: {one_line(str(exc))}"
            ) from None
        return code if code >= 0 else self.services.wait_end(service, name)[1]

    def follow_to_end(self, service: str, name: str, stdout: Writer, stderr: Writer | None) -> int:
        """Follow a run's output to its end, on its node or else through the manager.

        Returns:
            The task's exit code, or -1 when the service vanished.
        """
        task = self.services.first_container(service, name)
        code = self._follow_on_node(task, stdout, stderr)
        if code is not None and code >= 0:
            return code
        if code is not None:
            return self.services.wait_end(service, name)[1]
        follower = _LogFollower(self.nodes.manager, service, stdout, stderr)
        expected: dict[int, int] = {}
        try:
            _, code = self.services.wait_end(service, name)
            expected = self._logged(service)
            return code
        finally:
            follower.drain(expected, LOG_DRAIN_SECONDS if expected else 0)
