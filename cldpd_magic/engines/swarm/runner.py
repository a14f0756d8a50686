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
holds them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
import docker.types
import requests.exceptions

from ...errors import (
    BuildFailedError,
    ContainerFailedError,
    DockerUnavailableError,
    PodRunningError,
    SessionNotFoundError,
    one_line,
)
from ...secrets import looks_secret
from ..docker import (
    DockerRunner,
    PrivateAPI,
    _StreamDecoder,
    engine_errors,
    explain,
    response_frames,
)
from ..protocol import ContainerInfo, ExecHandle, Runner, RunOptions, Writer

#: Node label naming the Docker endpoint (an engine entry) that reaches the node's engine.
LABEL_ENDPOINT = "cldpd.endpoint"
#: Label on the Swarm secrets of a run, naming its service.
LABEL_SECRET_OF = "cldpd.secret-of"
#: Where the wrapper finds the secrets (one file per variable, named after it).
SECRET_PREFIX = "cldpd-env."
#: Reads each secret file into the variable it names.
_READ_SECRETS = (
    f'for f in /run/secrets/{SECRET_PREFIX}*; do [ -f "$f" ] || continue; '
    f'export "${{f#/run/secrets/{SECRET_PREFIX}}}=$(cat "$f")"; done; '
)
#: Waits for the line the follower sends once attached; the agent's stdin is then empty,
#: as a container's without one is.
_GATE = 'read -r _ || :; exec "$@" </dev/null'
_EXEC = 'exec "$@"'

_WAITING = ("new", "pending", "assigned", "accepted", "ready", "preparing", "starting")
#: Seconds the logs of a finished task have to reach the follower before it is closed.
LOG_DRAIN_SECONDS = 30.0
#: Seconds a detached run's task has to start.
START_SECONDS = 120.0


def _status(task: dict[str, Any] | None) -> str:
    """A task's state in Docker's container words (created, running, exited)."""
    if task is None:
        return "created"
    state = (task.get("Status") or {}).get("State", "")
    if state == "running":
        return "running"
    return "created" if state in _WAITING else "exited"


def _container_id(task: dict[str, Any] | None) -> str:
    """The id of a task's container, "" before the node made one."""
    status = (task or {}).get("Status") or {}
    return (status.get("ContainerStatus") or {}).get("ContainerID") or ""


def _not_run(task: dict[str, Any], name: str) -> ContainerFailedError:
    """One sentence for a task the swarm could not run, with the swarm's reason."""
    status = task.get("Status") or {}
    why = one_line(status.get("Err") or status.get("Message") or "rejected").rstrip(".")
    return ContainerFailedError(f"The swarm could not run {name}: {why}.")


class _LogFollower:
    """Follows a service's log in a thread, counting what each stream delivered."""

    def __init__(self, runner: DockerRunner, service: str, stdout: Writer, stderr: Writer | None):
        self._runner = runner
        self._service = service
        self._writers = {1: _StreamDecoder(stdout), 2: _StreamDecoder(stderr)}
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


class SwarmRunner:
    """Runner on a Docker Swarm, through its manager's engine.

    Args:
        manager: A DockerRunner on a manager node's engine.
        node_runner: Makes the runner of a node's engine from its ``cldpd.endpoint``
            label (an engine entry); DockerRunner(base_url=...) when None.
        poll: Seconds between looks at a task's state.
        registry: A registry (``host[:port]``) to push images to, built once on the
            manager, for the nodes to pull; "" builds each image on every ready node.
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
        self._node_runner = node_runner or (lambda url: DockerRunner(base_url=url))
        self.poll = poll
        self.registry = registry
        self._lock = threading.Lock()
        self._nodes: dict[str, Runner] = {}
        self._execs: dict[str, Runner] = {}  # exec id -> the node runner that runs it

    def _api(self) -> docker.APIClient:
        return self.manager.connection.control()

    # -- nodes and tasks -----------------------------------------------------------

    def _node(self, node_id: str) -> Runner:
        """The runner of a node's engine: the manager's own, or its ``cldpd.endpoint``."""
        with self._lock:
            if node_id in self._nodes:
                return self._nodes[node_id]
        api = self._api()
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
            self._nodes[node_id] = runner
        return runner

    def _task(self, service: str) -> dict[str, Any] | None:
        """The service's newest task, None before the swarm made one."""
        try:
            tasks = self._api().tasks(filters={"service": service})
        except docker.errors.NotFound:
            return None
        if not tasks:
            return None
        return max(tasks, key=lambda t: (t.get("Version") or {}).get("Index", 0))

    def _container(self, service: str) -> tuple[Runner, str] | None:
        """The node runner and container id of a service's running task."""
        task = self._task(service)
        if task is None or _status(task) != "running":
            return None
        cid = _container_id(task)
        return (self._node(task["NodeID"]), cid) if cid else None

    def _service(self, name: str) -> dict[str, Any] | None:
        try:
            return self._api().inspect_service(name)
        except docker.errors.NotFound:
            return None

    def _wait_end(self, service: str, opts_name: str) -> tuple[dict[str, Any] | None, int]:
        """Wait for the service's task to end; return it and its exit code."""
        while True:
            task = self._task(service)
            if task is None and self._service(service) is None:
                return None, -1
            if task is not None and _status(task) == "exited":
                status = task.get("Status") or {}
                code = (status.get("ContainerStatus") or {}).get("ExitCode")
                if status.get("State") == "rejected" or code is None:
                    raise _not_run(task, opts_name)
                return task, int(code)
            time.sleep(self.poll)

    def _logged(self, service: str) -> dict[int, int]:
        """Bytes the service's log holds now, per stream."""
        counts = {1: 0, 2: 0}
        with self.manager.connection.streaming() as api:
            for kind, data in response_frames(PrivateAPI.service_logs(api, service, follow=False)):
                if kind in counts:
                    counts[kind] += len(data)
        return counts

    def _first_container(self, service: str, name: str) -> dict[str, Any] | None:
        """Wait until the service's task has a container or has ended; None: no service."""
        while True:
            task = self._task(service)
            if task is None:
                if self._service(service) is None:
                    return None
            else:
                if (task.get("Status") or {}).get("State") == "rejected":
                    raise _not_run(task, name)
                if _container_id(task) or _status(task) == "exited":
                    return task
            time.sleep(self.poll)

    def _follow_on_node(
        self, task: dict[str, Any] | None, stdout: Writer, stderr: Writer | None
    ) -> int | None:
        """Follow the task container's own log on its node; None when that is not possible.

        The node's engine serves a container's log directly, several times faster than
        the swarm gathers a service's log through the manager.
        """
        cid = _container_id(task)
        if not cid:
            return None
        try:
            node = self._node(task["NodeID"])  # type: ignore[index]
            return node.logs(cid, stdout, stderr)
        except (DockerUnavailableError, SessionNotFoundError):
            return None  # no endpoint for the node, or the container is gone: the swarm's log

    def _nodes_reachable(self) -> bool:
        """Whether the engine of every node that may run a task can be reached directly."""
        for node in self._api().nodes():
            spec, status = node.get("Spec") or {}, node.get("Status") or {}
            if status.get("State") != "ready" or spec.get("Availability") != "active":
                continue
            try:
                if not hasattr(self._node(node["ID"]), "follow_gated"):
                    return False
            except DockerUnavailableError:
                return False
        return True

    def _follow_gated(self, service: str, name: str, stdout: Writer, stderr: Writer | None) -> int:
        """Attach to the task's container on its node, open its gate, follow it to its end.

        Raises:
            ContainerFailedError: The swarm could not run the task, or its node could not
                be reached (the service is removed: its agent would wait forever).
        """
        task = self._first_container(service, name)
        cid = _container_id(task)
        if task is None or not cid:
            return self._wait_end(service, name)[1]
        try:
            node: Any = self._node(task["NodeID"])
            code = node.follow_gated(cid, stdout, stderr)
        except (DockerUnavailableError, SessionNotFoundError) as exc:
            with contextlib.suppress(docker.errors.NotFound):
                self._api().remove_service(service)
            raise ContainerFailedError(
                f"Could not follow {name} on its swarm node: {one_line(str(exc))}"
            ) from None
        return code if code >= 0 else self._wait_end(service, name)[1]

    def _follow_to_end(self, service: str, name: str, stdout: Writer, stderr: Writer | None) -> int:
        code = self._follow_on_node(self._first_container(service, name), stdout, stderr)
        if code is not None and code >= 0:
            return code
        if code is not None:
            return self._wait_end(service, name)[1]
        follower = _LogFollower(self.manager, service, stdout, stderr)
        expected: dict[int, int] = {}
        try:
            _, code = self._wait_end(service, name)
            expected = self._logged(service)
            return code
        finally:
            follower.drain(expected, LOG_DRAIN_SECONDS if expected else 0)

    # -- services and secrets --------------------------------------------------------

    def _secret_refs(self, opts: RunOptions, env: dict[str, str]) -> list[Any]:
        """Swarm secrets for the secret values of ``env`` (taken out of it)."""
        secret = [k for k in env if k in opts.inherit_env or looks_secret(k)]
        refs = []
        api = self._api()
        for key in secret:
            value = env.pop(key)
            name = f"{opts.name}-{key}-{uuid.uuid4().hex[:8]}"[:64]
            created = api.create_secret(name, value.encode(), labels={LABEL_SECRET_OF: opts.name})
            refs.append(
                docker.types.SecretReference(
                    created["ID"], name, filename=SECRET_PREFIX + key, mode=0o444
                )
            )
        return refs

    def _remove_secrets(self, name: str) -> None:
        api = self._api()
        for secret in api.secrets(filters={"label": f"{LABEL_SECRET_OF}={name}"}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                api.remove_secret(secret["ID"])

    def _create(self, opts: RunOptions, gated: bool = False) -> str:
        """Create the run's service; ``gated``: its agent waits for a line on stdin.

        ``opts.guard`` is asked before anything is made and just before the service is
        created (a refusal removes the secrets made), and told of the service once it
        exists (a refusal removes it): a service is created and started at once.
        """
        if opts.guard is not None:
            opts.guard.check()
        if self._service(opts.name) is not None:
            raise PodRunningError(f"A run named {opts.name} already exists; stop it first.")
        env = opts.resolved_env()
        secrets = self._secret_refs(opts, env)
        script = (_READ_SECRETS if secrets else "") + (_GATE if gated else _EXEC)
        cmd = ["sh", "-c", script, "cldpd-run", *opts.cmd] if secrets or gated else opts.cmd
        limits = opts.resources
        nano_cpus = None if limits.cpus is None else round(limits.cpus * 1e9)
        resources = docker.types.Resources(
            cpu_limit=nano_cpus,
            mem_limit=limits.memory,
            cpu_reservation=nano_cpus,
            mem_reservation=limits.memory,
        )
        if limits.pids is not None:
            resources.setdefault("Limits", {})["Pids"] = limits.pids
        spec = docker.types.ContainerSpec(
            self._pulled(opts.image),
            command=cmd,
            env=env,
            workdir=opts.workdir or None,
            labels=opts.labels,
            mounts=[
                docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
                for m in opts.mounts
            ],
            secrets=secrets or None,
            init=True,
            open_stdin=gated,
            cap_drop=["ALL"],
            cap_add=list(opts.cap_add) or None,
            read_only=opts.read_only_root or None,
            dns_config=docker.types.DNSConfig(nameservers=opts.dns) if opts.dns else None,
        )
        template = docker.types.TaskTemplate(
            spec,
            resources=resources,
            restart_policy=docker.types.RestartPolicy("none"),
            networks=[opts.network] if opts.network else None,
        )
        if opts.guard is not None:
            try:
                opts.guard.check()  # the last moment before the swarm schedules the task
            except BaseException:
                self._remove_secrets(opts.name)
                raise
        try:
            created = self._api().create_service(
                template,
                name=opts.name,
                labels=opts.labels,
                mode=docker.types.ServiceMode("replicated-job"),
            )
        except docker.errors.APIError as exc:
            self._remove_secrets(opts.name)
            if exc.status_code == 409:
                raise PodRunningError(
                    f"A run named {opts.name} already exists; stop it first."
                ) from None
            raise ContainerFailedError(
                f"The swarm refused the service {opts.name}: {one_line(explain(exc))}"
            ) from None
        service = created["ID"]
        if opts.guard is not None:
            try:
                opts.guard.started(
                    ContainerInfo(opts.name, service, "running", opts.labels, opts.image)
                )
            except BaseException:
                self.remove(opts.name)
                raise
        return service

    # -- the Runner protocol ---------------------------------------------------------

    def preflight(self) -> None:
        """Check that the manager answers and is a swarm manager.

        Raises:
            DockerUnavailableError: It does not answer, or is no manager.
        """
        self.manager.preflight()
        try:
            swarm = self._api().info().get("Swarm") or {}
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
        """Build the image on every ready node, through each node's engine; or, with a
        registry, on the manager, then push it there.

        Raises:
            BuildFailedError: A build failed, or the registry refused the push.
        """
        if self.registry:
            self.manager.build(tag, context_dir, build_args, on_output, cancel)
            self._push(tag, on_output)
            return
        built: set[int] = set()
        for node in self._api().nodes():
            if (node.get("Status") or {}).get("State") != "ready":
                continue
            runner = self._node(node["ID"])
            if id(runner) not in built:
                built.add(id(runner))
                runner.build(tag, context_dir, build_args, on_output, cancel)

    def _push(self, tag: str, on_output: Callable[[str], None] | None) -> None:
        """Tag the manager's image for the registry and push it."""
        reference = self._pulled(tag)
        named = ":" in reference.rpartition("/")[2]
        repository, version = reference.rsplit(":", 1) if named else (reference, "latest")
        api = self._api()
        api.tag(tag, repository, version)
        for chunk in api.push(repository, version, stream=True, decode=True):
            if chunk.get("error"):
                raise BuildFailedError(
                    f"Pushing image {tag} to {self.registry} failed: {one_line(chunk['error'])}"
                )
            if on_output is not None and chunk.get("status") and not chunk.get("progress"):
                on_output(f"{chunk['status']}\n")

    def _pulled(self, tag: str) -> str:
        """The reference nodes run an image by: in the registry when there is one."""
        return f"{self.registry}/{tag}" if self.registry else tag

    @engine_errors
    def run(
        self,
        opts: RunOptions,
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ContainerInfo], None] | None = None,
    ) -> int:
        """Run a service to its end, following its log; return the task's exit code.

        Raises:
            PodRunningError: A service of that name exists.
            ContainerFailedError: The swarm refused the service or could not run its task.
        """
        gated = self._nodes_reachable()
        service = self._create(opts, gated)
        try:
            if on_start is not None:
                on_start(ContainerInfo(opts.name, service, "running", opts.labels, opts.image))
            if gated:
                return self._follow_gated(service, opts.name, stdout, stderr)
            return self._follow_to_end(service, opts.name, stdout, stderr)
        finally:
            if opts.remove:
                self.remove(opts.name)

    @engine_errors
    def start(self, opts: RunOptions) -> ContainerInfo:
        """Create the service detached (keepAlive runs) and wait until its task runs.

        It lives until stopped and removed.

        Raises:
            PodRunningError: A service of that name exists.
            ContainerFailedError: The swarm refused it, its task did not start in time,
                or it was removed meanwhile (its run was stopped).
        """
        service = self._create(opts)
        deadline = time.monotonic() + START_SECONDS
        while True:
            task = self._task(service)
            if task is None and self._service(service) is None:
                raise ContainerFailedError(f"{opts.name} was removed before its task started.")
            if ((task or {}).get("Status") or {}).get("State") == "rejected":
                self.remove(opts.name)
                raise _not_run(task, opts.name)  # type: ignore[arg-type]
            if _status(task) != "created":
                break
            if time.monotonic() > deadline:
                self.remove(opts.name)
                raise ContainerFailedError(
                    f"The swarm did not start {opts.name} within {START_SECONDS:g} s; check "
                    "that a node has its image and the resources it reserves."
                )
            time.sleep(self.poll)
        return ContainerInfo(opts.name, service, _status(task), opts.labels, opts.image)

    @engine_errors
    def exec(
        self,
        container: str,
        cmd: list[str],
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ExecHandle], None] | None = None,
    ) -> int:
        """Run a command in the task's container, through its node's engine.

        Raises:
            SessionNotFoundError: The service has no running task.
        """
        found = self._container(container)
        if found is None:
            raise SessionNotFoundError(f"No running container named {container}.")
        runner, cid = found

        def started(handle: ExecHandle) -> None:
            with self._lock:
                self._execs[handle.exec_id] = runner
            if on_start is not None:
                on_start(handle)

        return runner.exec(cid, cmd, stdout, stderr, on_start=started)

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
            task = self._task(container)
            if task is None or _status(task) == "exited":
                return
            found = self._container(container)
            if found is not None:
                break
            if time.monotonic() > deadline:
                self.remove(container)  # never started: nothing to end gracefully
                return
            time.sleep(self.poll)
        runner, cid = found
        runner.stop(cid, max(deadline - time.monotonic(), 1.0))
        while _status(self._task(container)) not in ("exited", "created"):
            if time.monotonic() > deadline + 10:
                break
            time.sleep(self.poll)

    @engine_errors
    def remove(self, container: str) -> None:
        """Remove the service and its secrets; a missing one is fine."""
        with contextlib.suppress(docker.errors.NotFound):
            self._api().remove_service(container)
        self._remove_secrets(container)

    def _unpulled(self, image: str) -> str:
        """The pod's own tag of an image reference the nodes run."""
        prefix = f"{self.registry}/"
        if not self.registry or not image.startswith(prefix):
            return image
        return image[len(prefix) :]

    def _info(self, service: dict[str, Any]) -> ContainerInfo:
        spec = service.get("Spec") or {}
        container = (spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}
        task = self._task(service["ID"])
        return ContainerInfo(
            name=spec.get("Name", ""),
            id=service["ID"],
            status=_status(task),
            labels=spec.get("Labels") or {},
            image=self._unpulled(str(container.get("Image", "")).split("@")[0]),
            started_at=((task or {}).get("Status") or {}).get("Timestamp", ""),
            env=dict(item.partition("=")[::2] for item in container.get("Env") or []),
        )

    @engine_errors
    def inspect(self, container: str) -> ContainerInfo | None:
        """Describe a run's service, None when there is none."""
        service = self._service(container)
        return None if service is None else self._info(service)

    @engine_errors
    def list(self, label: str) -> list[ContainerInfo]:
        """List the services that carry a label (``key`` or ``key=value``)."""
        services = self._api().services(filters={"label": label})
        return sorted((self._info(s) for s in services), key=lambda c: c.name)

    @engine_errors
    def logs(self, container: str, stdout: Writer, stderr: Writer | None = None) -> int:
        """Follow a run's log from its start to its end; return the exit code.

        Raises:
            SessionNotFoundError: There is no such service.
        """
        service = self._service(container)
        if service is None:
            raise SessionNotFoundError(f"No container named {container}.")
        return self._follow_to_end(service["ID"], container, stdout, stderr)


__all__ = ["LABEL_ENDPOINT", "LABEL_SECRET_OF", "SwarmRunner"]
