"""A swarm's services: one replicated job per run, confined as a plain container is, its
secrets kept out of its spec, and its task's state read in Docker's container words."""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import docker
import docker.errors
import docker.types
import docker.utils

from ...errors import ContainerFailedError, DockerUnavailableError, PodRunningError, one_line
from ...secrets import looks_secret
from ..docker import ContainerSettings, ImageFacts, container_settings, explain
from ..protocol import ContainerInfo, Runner, RunOptions
from .images import Images
from .nodes import Nodes

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
#: The gate of a run with stdin: after the gate's line, the agent reads the task's stdin
#: up to the line ``$1`` (its end of input) and then end of file. A task's stdin has no
#: StdinOnce (a service spec cannot say it), so the end of the attach's input would never
#: reach the agent: a filter ends it at that line instead, and hands the rest over a FIFO
#: so that the agent stays the shell's own process (stop's signals reach it, its exit code
#: is the task's). The filter runs in the background, where SIGINT is ignored; it removes
#: the FIFO's name once both ends are open.
_GATE_STDIN = (
    "read -r _ || :; end=$1; shift; f=/tmp/.cldpd-stdin-$$; "
    'mkfifo -m 600 "$f" || { echo "cldpd: could not make the pipe $f for the agent\'s stdin." >&2; '
    "exit 125; }; exec 3<&0; "
    '{ rm -f "$f"; while IFS= read -r l; do [ "$l" = "$end" ] && exit 0; '
    'printf \'%s\\n\' "$l"; done; } <&3 >"$f" 3<&- & '
    'exec "$@" <"$f" 3<&-'
)

_WAITING = ("new", "pending", "assigned", "accepted", "ready", "preparing", "starting")
#: Seconds a detached run's task has to start.
START_SECONDS = 120.0

#: The first API version whose service spec says no-new-privileges
#: (``ContainerSpec.Privileges.NoNewPrivileges``).
NO_NEW_PRIVILEGES_API = "1.46"
#: What a plain container gets (:func:`container_settings`) that a service spec cannot
#: say, so that a swarm's task runs without it, and why; the rest is the same.
UNSUPPORTED_ON_SWARM = {
    "no_new_privileges": (
        f"a service spec says it from API {NO_NEW_PRIVILEGES_API} on; an older manager's "
        "tasks may gain privileges through setuid files (with no capability to gain)"
    ),
    "memory_swap": (
        "a task's limits set no swap on the API this speaks: the node's default applies "
        "(swap up to the memory limit, when the node has swap)"
    ),
    "tmpfs exec": (
        "a service's tmpfs is mounted noexec: a read-only root's /tmp is an anonymous "
        "volume instead, which allows exec and keeps the mode of the image's /tmp"
    ),
}


def task_status(task: dict[str, Any] | None) -> str:
    """A task's state in Docker's container words (created, running, exited)."""
    if task is None:
        return "created"
    state = (task.get("Status") or {}).get("State", "")
    if state == "running":
        return "running"
    return "created" if state in _WAITING else "exited"


def container_id(task: dict[str, Any] | None) -> str:
    """The id of a task's container, "" before the node made one."""
    status = (task or {}).get("Status") or {}
    return (status.get("ContainerStatus") or {}).get("ContainerID") or ""


def not_run(task: dict[str, Any], name: str) -> ContainerFailedError:
    """One sentence for a task the swarm could not run, with the swarm's reason."""
    status = task.get("Status") or {}
    why = one_line(status.get("Err") or status.get("Message") or "rejected").rstrip(".")
    return ContainerFailedError(f"The swarm could not run {name}: {why}.")


def service_mounts(settings: ContainerSettings) -> list[docker.types.Mount]:
    """A service's mounts: binds, and the anonymous volumes a read-only root keeps writable
    (removed with the task's container: :meth:`Services.remove`)."""
    return [
        docker.types.Mount(
            m.target, m.source or None, type=m.kind, read_only=m.read_only, labels=m.labels or None
        )
        for m in settings.mounts
    ]


def service_resources(settings: ContainerSettings) -> docker.types.Resources:
    """A task's limits, each also reserved, so the swarm picks a node that has them."""
    resources = docker.types.Resources(
        cpu_limit=settings.nano_cpus,
        mem_limit=settings.memory,
        cpu_reservation=settings.nano_cpus,
        mem_reservation=settings.memory,
    )
    if settings.pids is not None:
        resources.setdefault("Limits", {})["Pids"] = settings.pids
    return resources


def task_template(
    settings: ContainerSettings, container: dict[str, Any], api_version: str
) -> docker.types.TaskTemplate:
    """A run's task: its container (``ContainerSpec`` arguments) confined by ``settings``,
    run once, never restarted.

    What the manager's API cannot say is left out (:data:`UNSUPPORTED_ON_SWARM`).
    """
    spec = docker.types.ContainerSpec(
        **container,
        mounts=service_mounts(settings),
        init=settings.init,
        cap_drop=list(settings.cap_drop),
        cap_add=list(settings.cap_add) or None,
        read_only=settings.read_only_root or None,
        dns_config=docker.types.DNSConfig(nameservers=list(settings.dns)) if settings.dns else None,
    )
    if settings.no_new_privileges and docker.utils.version_gte(api_version, NO_NEW_PRIVILEGES_API):
        spec["Privileges"] = {"NoNewPrivileges": True}
    return docker.types.TaskTemplate(
        spec,
        resources=service_resources(settings),
        restart_policy=docker.types.RestartPolicy("none"),
        networks=[settings.network] if settings.network else None,
    )


class Services:
    """Creates, finds, describes and removes the services of a swarm's runs.

    Args:
        nodes: The swarm's nodes.
        images: Where the tasks find their images.
        poll: Seconds between looks at a task's state.
    """

    def __init__(self, nodes: Nodes, images: Images, poll: float = 0.1) -> None:
        self.nodes = nodes
        self.images = images
        self.poll = poll

    # -- tasks ---------------------------------------------------------------------

    def tasks(self, service: str) -> list[dict[str, Any]]:
        """The service's tasks (none before the swarm made one, or without the service)."""
        try:
            return self.nodes.api().tasks(filters={"service": service})
        except docker.errors.NotFound:
            return []

    def task(self, service: str) -> dict[str, Any] | None:
        """The service's newest task, None before the swarm made one."""
        tasks = self.tasks(service)
        if not tasks:
            return None
        return max(tasks, key=lambda t: (t.get("Version") or {}).get("Index", 0))

    def container(self, service: str) -> tuple[Runner, str] | None:
        """The node runner and container id of a service's running task."""
        task = self.task(service)
        if task is None or task_status(task) != "running":
            return None
        cid = container_id(task)
        return (self.nodes.runner_of(task["NodeID"]), cid) if cid else None

    def service(self, name: str) -> dict[str, Any] | None:
        """A service's description, None when there is none."""
        try:
            return self.nodes.api().inspect_service(name)
        except docker.errors.NotFound:
            return None

    def wait_end(self, service: str, name: str) -> tuple[dict[str, Any] | None, int]:
        """Wait for the service's task to end; return it and its exit code."""
        while True:
            task = self.task(service)
            if task is None and self.service(service) is None:
                return None, -1
            if task is not None and task_status(task) == "exited":
                status = task.get("Status") or {}
                code = (status.get("ContainerStatus") or {}).get("ExitCode")
                if status.get("State") == "rejected" or code is None:
                    raise not_run(task, name)
                return task, int(code)
            time.sleep(self.poll)

    def first_container(self, service: str, name: str) -> dict[str, Any] | None:
        """Wait until the service's task has a container or has ended; None: no service."""
        while True:
            task = self.task(service)
            if task is None:
                if self.service(service) is None:
                    return None
            else:
                if (task.get("Status") or {}).get("State") == "rejected":
                    raise not_run(task, name)
                if container_id(task) or task_status(task) == "exited":
                    return task
            time.sleep(self.poll)

    def wait_started(self, service: str, opts: RunOptions) -> ContainerInfo:
        """Wait until a detached run's task runs (or ended); a task that cannot start goes.

        Raises:
            ContainerFailedError: The swarm could not run it, it did not start in time, or
                it was removed meanwhile (its run was stopped).
        """
        deadline = time.monotonic() + START_SECONDS
        while True:
            task = self.task(service)
            if task is None and self.service(service) is None:
                raise ContainerFailedError(f"{opts.name} was removed before its task started.")
            if ((task or {}).get("Status") or {}).get("State") == "rejected":
                self.remove(opts.name)
                raise not_run(task, opts.name)  # type: ignore[arg-type]
            if task_status(task) != "created":
                return ContainerInfo(opts.name, service, task_status(task), opts.labels, opts.image)
            if time.monotonic() > deadline:
                self.remove(opts.name)
                raise ContainerFailedError(
                    f"The swarm did not start {opts.name} within {START_SECONDS:g} s; check "
                    "that a node has its image and the resources it reserves."
                )
            time.sleep(self.poll)

    # -- creation ------------------------------------------------------------------

    def _secret_refs(self, opts: RunOptions, env: dict[str, str]) -> list[Any]:
        """Swarm secrets for the secret values of ``env`` (taken out of it)."""
        secret = [k for k in env if k in opts.inherit_env or looks_secret(k)]
        refs = []
        api = self.nodes.api()
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

    def remove_secrets(self, name: str) -> None:
        """Remove a run's secrets; those missing are fine."""
        api = self.nodes.api()
        for secret in api.secrets(filters={"label": f"{LABEL_SECRET_OF}={name}"}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                api.remove_secret(secret["ID"])

    def _image_facts(self, image: str) -> ImageFacts | None:
        """What the manager's copy of an image says of its process (None: it has none)."""
        try:
            return ImageFacts.from_config(self.nodes.api().inspect_image(image).get("Config") or {})
        except docker.errors.NotFound:
            return None

    def _template(
        self, opts: RunOptions, gated: bool, end_of_input: str = ""
    ) -> docker.types.TaskTemplate:
        """The run's task, its secret values made Swarm secrets (which the caller removes
        if the service is not made)."""
        env = opts.resolved_env()
        secrets = self._secret_refs(opts, env)
        if end_of_input:
            gate, args = _GATE_STDIN, [end_of_input, *opts.cmd]
        else:
            gate, args = (_GATE if gated else _EXEC), opts.cmd
        script = (_READ_SECRETS if secrets else "") + gate
        cmd = ["sh", "-c", script, "cldpd-run", *args] if secrets or gated else opts.cmd
        container = {
            "image": self.images.pulled(opts.image),
            "command": cmd,
            "env": env,
            "workdir": opts.workdir or None,
            "labels": opts.labels,
            "secrets": secrets or None,
            "open_stdin": gated,
        }
        facts = self._image_facts(opts.image) if opts.read_only_root else None
        settings = container_settings(opts, facts, exec_tmpfs=False)
        return task_template(settings, container, self.nodes.api().api_version)

    def _create_service(self, opts: RunOptions, template: docker.types.TaskTemplate) -> str:
        try:
            created = self.nodes.api().create_service(
                template,
                name=opts.name,
                labels=opts.labels,
                mode=docker.types.ServiceMode("replicated-job"),
            )
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise PodRunningError(
                    f"A run named {opts.name} already exists; stop it first."
                ) from None
            raise ContainerFailedError(
                f"The swarm refused the service {opts.name}: {one_line(explain(exc))}"
            ) from None
        return created["ID"]

    def create(self, opts: RunOptions, gated: bool = False, end_of_input: str = "") -> str:
        """Create the run's service; ``gated``: its agent waits for a line on stdin, then
        (with an ``end_of_input`` line) reads the rest of its stdin up to that line.

        ``opts.guard`` is asked before anything is made and just before the service is
        created (a refusal removes the secrets made), and told of the service once it
        exists (a refusal removes it): a service is created and started at once.

        Returns:
            The service's id.

        Raises:
            PodRunningError: A service of that name exists.
            ContainerFailedError: The swarm refused the service.
        """
        guard = opts.guard
        if guard is not None:
            guard.check()
        if self.service(opts.name) is not None:
            raise PodRunningError(f"A run named {opts.name} already exists; stop it first.")
        try:
            template = self._template(opts, gated, end_of_input)
            if guard is not None:
                guard.check()  # the last moment before the swarm schedules the task
            service = self._create_service(opts, template)
        except BaseException:
            self.remove_secrets(opts.name)
            raise
        if guard is not None:
            try:
                guard.started(ContainerInfo(opts.name, service, "running", opts.labels, opts.image))
            except BaseException:
                self.remove(opts.name)
                raise
        return service

    # -- the rest ------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Remove a run's service, its task's container and its secrets; what is missing
        is fine.

        A node keeps the container of a removed service's task, and the volumes that kept
        its read-only root writable: they go here, through the node's engine, as a plain
        container's do.
        """
        tasks = self.tasks(name)
        with contextlib.suppress(docker.errors.NotFound):
            self.nodes.api().remove_service(name)
        for task in tasks:
            cid = container_id(task)
            if cid:
                # A node without an endpoint is left to the swarm.
                with contextlib.suppress(DockerUnavailableError):
                    self.nodes.runner_of(task["NodeID"]).remove(cid)
        self.remove_secrets(name)

    def info(self, service: dict[str, Any]) -> ContainerInfo:
        """A service described as its run's container."""
        spec = service.get("Spec") or {}
        container = (spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}
        task = self.task(service["ID"])
        return ContainerInfo(
            name=spec.get("Name", ""),
            id=service["ID"],
            status=task_status(task),
            labels=spec.get("Labels") or {},
            image=self.images.unpulled(str(container.get("Image", "")).split("@")[0]),
            started_at=((task or {}).get("Status") or {}).get("Timestamp", ""),
            env=dict(item.partition("=")[::2] for item in container.get("Env") or []),
        )

    def list(self, label: str) -> list[ContainerInfo]:
        """The services that carry a label (``key`` or ``key=value``), by name."""
        services = self.nodes.api().services(filters={"label": label})
        return sorted((self.info(s) for s in services), key=lambda c: c.name)
