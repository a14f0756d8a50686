"""A swarm's nodes: the manager's engine, and the engine of each node a task may run on."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import docker

from ...errors import DockerUnavailableError
from ..docker import DockerRunner
from ..protocol import Runner, StdinPipe, Writer

#: Node label naming the Docker endpoint (an engine entry) that reaches the node's engine.
LABEL_ENDPOINT = "cldpd.endpoint"


@runtime_checkable
class GatedFollower(Protocol):
    """A node's runner that can release a task's container waiting behind its stdin gate.

    :class:`~cldpd_magic.engines.docker.DockerRunner` is one: it attaches, then sends
    the line the gate waits for, so the output is read from its first byte.
    """

    def follow_gated(
        self,
        container: str,
        stdout: Writer,
        stderr: Writer | None = None,
        stdin: StdinPipe | None = None,
        end_of_input: str = "",
    ) -> int:
        """Open the container's gate and follow it to its end; its exit code (-1: vanished).

        With ``stdin``, the pipe is connected after the gate's line, and its close sends
        the line ``end_of_input``.
        """


class Nodes:
    """The manager's engine and the runners of the nodes' engines, each made once.

    Args:
        manager: A DockerRunner on a manager node's engine.
        node_runner: Makes the runner of a node's engine from its ``cldpd.endpoint``
            label (an engine entry); DockerRunner(base_url=...) when None.
    """

    def __init__(
        self, manager: DockerRunner, node_runner: Callable[[str], Runner] | None = None
    ) -> None:
        self.manager = manager
        self._node_runner = node_runner or (lambda url: DockerRunner(base_url=url))
        self._lock = threading.Lock()
        self._runners: dict[str, Runner] = {}

    def api(self) -> docker.APIClient:
        """The manager's shared low-level client."""
        return self.manager.connection.control()

    def runner_of(self, node_id: str) -> Runner:
        """The runner of a node's engine: the manager's own, or its ``cldpd.endpoint``.

        Raises:
            DockerUnavailableError: The node names no endpoint.
        """
        with self._lock:
            if node_id in self._runners:
                return self._runners[node_id]
        api = self.api()
        if ((api.info().get("Swarm") or {}).get("NodeID")) == node_id:
            runner: Runner = self.manager
        else:
            spec = api.inspect_node(node_id).get("Spec") or {}
            endpoint = (spec.get("Labels") or {}).get(LABEL_ENDPOINT)
            if not endpoint:
                raise DockerUnavailableError(
                    f"Swarm node {node_id[:12]} has no {LABEL_ENDPOINT} label naming its Docker "
                    f"endpoint; add one (docker node update --label-add {LABEL_ENDPOINT}=URL)."
                )
            runner = self._node_runner(endpoint)
        with self._lock:
            self._runners[node_id] = runner
        return runner

    def ready(self, active: bool = False) -> list[str]:
        """The ids of the ready nodes (``active``: that also take tasks)."""
        found = []
        for node in self.api().nodes():
            spec, status = node.get("Spec") or {}, node.get("Status") or {}
            if status.get("State") != "ready":
                continue
            if active and spec.get("Availability") != "active":
                continue
            found.append(node["ID"])
        return found

    def all_gated(self) -> bool:
        """Whether the engine of every node that may run a task can follow it gated."""
        for node_id in self.ready(active=True):
            try:
                if not isinstance(self.runner_of(node_id), GatedFollower):
                    return False
            except DockerUnavailableError:
                return False
        return True
