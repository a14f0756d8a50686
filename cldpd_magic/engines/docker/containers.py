"""Containers on a Docker engine: confined creation, runs with their output, services,
descriptions and logs."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
import docker.types

from ...errors import (
    ContainerFailedError,
    DockerUnavailableError,
    PodRunningError,
    SessionNotFoundError,
)
from ..protocol import ContainerInfo, RunOptions, StdinPipe, Writer
from .confinement import LABEL_VOLUME_OF as LABEL_VOLUME_OF
from .confinement import SECURITY_OPT, ContainerSettings, ImageFacts, container_settings
from .confinement import TMP_TMPFS_OPTIONS as TMP_TMPFS_OPTIONS
from .engine import (
    DockerConnection,
    PrivateAPI,
    connect_stdin,
    container_error,
    engine_errors,
    explain,
    force_remove,
    refuse_engine_pin,
)
from .streams import pump

#: SIGKILL's exit code, which the kernel's OOM killer leaves.
KILLED_EXIT_CODE = 137


def _size(size: int) -> str:
    """A byte count as people write it: ``64 MiB``, ``1.5 GiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} bytes"


def out_of_memory_line(limit: int, exit_code: int) -> str:
    """The line a run's stderr gets when the kernel killed a process of it for memory.

    Args:
        limit: The container's memory limit in bytes (0: none).
        exit_code: The agent's exit code.
    """
    where = f" (limit {_size(limit)})" if limit else ""
    if exit_code == 0:
        return f"cldpd: a process of the agent ran out of memory{where} and was killed.\n"
    return f"cldpd: the agent ran out of memory{where} and was killed.\n"


def _host_config(api: docker.APIClient, settings: ContainerSettings) -> dict[str, Any]:
    """A container's host config from its settings.

    A tmpfs goes in ``Tmpfs``, whose options string allows exec, not in ``Mounts``,
    whose tmpfs is always mounted noexec (before API 1.46).
    """
    mounts = [
        docker.types.Mount(
            m.target, m.source or None, type=m.kind, read_only=m.read_only, labels=m.labels or None
        )
        for m in settings.mounts
        if m.kind != "tmpfs"
    ]
    tmpfs = {m.target: m.options for m in settings.mounts if m.kind == "tmpfs"}
    return api.create_host_config(
        init=settings.init,
        mounts=mounts,
        network_mode=settings.network or None,
        cap_drop=list(settings.cap_drop),
        cap_add=list(settings.cap_add) or None,
        security_opt=SECURITY_OPT if settings.no_new_privileges else None,
        read_only=settings.read_only_root or None,
        tmpfs=tmpfs or None,
        nano_cpus=settings.nano_cpus,
        mem_limit=settings.memory,
        memswap_limit=settings.memory_swap,
        pids_limit=settings.pids,
        dns=list(settings.dns) or None,
    )


class Containers:
    """Creates, runs, describes and follows the containers of one engine.

    Args:
        connection: The engine's clients.
    """

    def __init__(self, connection: DockerConnection) -> None:
        self.connection = connection

    @staticmethod
    def _image_facts(api: docker.APIClient, image: str) -> ImageFacts | None:
        """What the engine's image says of its process; None when there is no such image."""
        try:
            return ImageFacts.from_config(api.inspect_image(image).get("Config") or {})
        except docker.errors.NotFound:
            return None  # creating the container says so

    def create(self, api: docker.APIClient, opts: RunOptions, stdin_open: bool = False) -> str:
        """Create a confined container (see :func:`container_settings`); its id."""
        refuse_engine_pin(opts.engine, opts.name)
        facts = self._image_facts(api, opts.image) if opts.read_only_root else None
        host_config = _host_config(api, container_settings(opts, facts))
        try:
            created = api.create_container(
                image=opts.image,
                command=opts.cmd,
                name=opts.name,
                environment=opts.resolved_env(),
                working_dir=opts.workdir or None,
                labels=opts.labels,
                host_config=host_config,
                stdin_open=stdin_open,
                tty=False,
            )
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise PodRunningError(
                    f"A container named {opts.name} already exists; stop it first."
                ) from None
            raise container_error(opts, "create", exc) from None
        return created["Id"]

    def start_or_remove(self, api: docker.APIClient, opts: RunOptions, cid: str) -> None:
        """Start a created container; remove it when the engine will not start it."""
        try:
            api.start(cid)
        except docker.errors.APIError as exc:
            force_remove(api, cid)
            raise container_error(opts, "start", exc) from None

    def start_guarded(self, api: docker.APIClient, opts: RunOptions, cid: str) -> ContainerInfo:
        """Start a created container, asking ``opts.guard`` before and after the start.

        A guard that refuses (its run was asked to stop) has the container removed,
        started or not, and its error goes through.
        """
        info = ContainerInfo(opts.name, cid, "running", opts.labels, opts.image)
        guard = opts.guard
        if guard is None:
            self.start_or_remove(api, opts, cid)
            return info
        try:
            guard.check()
            self.start_or_remove(api, opts, cid)
            guard.started(info)
        except BaseException:
            force_remove(api, cid)
            raise
        return info

    @staticmethod
    def _say_if_out_of_memory(
        api: docker.APIClient, container: str, code: int, stderr: Writer | None
    ) -> None:
        """After a container's exit: one line on stderr when the kernel killed it for memory."""
        if stderr is None:
            return
        with contextlib.suppress(docker.errors.APIError):
            attrs = api.inspect_container(container)
            if (attrs.get("State") or {}).get("OOMKilled"):
                limit = (attrs.get("HostConfig") or {}).get("Memory") or 0
                stderr.write(out_of_memory_line(limit, code))

    @engine_errors
    def run(
        self,
        opts: RunOptions,
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ContainerInfo], None] | None = None,
    ) -> int:
        """Create, attach and start a container, stream its output, and wait for its end.

        The output stream is attached before the container starts, so nothing a fast
        container prints is missed. With ``opts.stdin``, the container's stdin is open
        (closed by the engine once the pipe closes: StdinOnce) and attached with the
        output, and the pipe is connected once the container has started; the pipe is
        ended with the run, whatever happens. A non-zero exit code is a return value,
        not an error.

        Args:
            opts: What to run.
            stdout: Receives the container's stdout as text.
            stderr: Receives its stderr; None drops it.
            on_start: Called once the container has started.

        Returns:
            The container's exit code.

        Raises:
            PodRunningError: The container name is taken.
            ContainerFailedError: The container could not be created or started.
        """
        pipe = opts.stdin
        try:
            with self.connection.streaming() as api:
                if opts.guard is not None:
                    opts.guard.check()
                cid = self.create(api, opts, stdin_open=pipe is not None)
                try:
                    return self._attach_and_run(api, opts, cid, stdout, stderr, on_start)
                except docker.errors.NotFound:
                    return -1
                finally:
                    if opts.remove:
                        force_remove(api, cid)
        finally:
            if pipe is not None:
                pipe.end()

    def _attach_and_run(
        self,
        api: docker.APIClient,
        opts: RunOptions,
        cid: str,
        stdout: Writer,
        stderr: Writer | None,
        on_start: Callable[[ContainerInfo], None] | None,
    ) -> int:
        """Attach to a created container (with its stdin when ``opts.stdin``), start it,
        stream its output to its end; its exit code."""
        sock = None
        try:
            if opts.stdin is None:
                stream = PrivateAPI.attach(api, cid)
            else:
                sock, stream = PrivateAPI.attach_with_stdin(api, cid)
        except docker.errors.APIError as exc:
            raise ContainerFailedError(
                f"Could not attach to container {opts.name}: {explain(exc)}"
            ) from None
        try:
            info = self.start_guarded(api, opts, cid)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        if opts.stdin is not None:
            connect_stdin(opts.stdin, sock)
        if on_start is not None:
            on_start(info)
        pump(stream, stdout, stderr)
        code = int(api.wait(cid)["StatusCode"])
        self._say_if_out_of_memory(api, cid, code, stderr)
        return code

    @engine_errors
    def follow_gated(
        self,
        container: str,
        stdout: Writer,
        stderr: Writer | None = None,
        stdin: StdinPipe | None = None,
        end_of_input: str = "",
    ) -> int:
        """Follow a container whose command first waits for a line on its stdin.

        It attaches, then sends the line, so the output is read from its first byte
        through the attach stream, which is several times faster than following the
        container's log (a swarm task, started by its node, is followed so).

        Args:
            container: Name or id.
            stdout: Receives stdout as text.
            stderr: Receives stderr; None drops it.
            stdin: Connected after the gate's line, to write the rest of the stdin; its
                close sends ``end_of_input`` as a line (the container's command ends its
                agent's input there: without StdinOnce, the engine keeps the container's
                stdin open, and the end of the attach's input would end its output too).
            end_of_input: The line that ends the agent's input.

        Returns:
            The exit code, or -1 when the container vanished.

        Raises:
            SessionNotFoundError: There is no such container.
        """
        with self.connection.streaming() as api:
            try:
                sock, stream = PrivateAPI.attach_with_stdin(api, container)
            except docker.errors.NotFound:
                raise SessionNotFoundError(f"No container named {container}.") from None
            sock.sendall(b"\n")
            if stdin is not None:
                end = (end_of_input + "\n").encode()
                stdin.connect(sock.sendall, functools.partial(sock.sendall, end))
            pump(stream, stdout, stderr)
            try:
                return int(api.wait(container)["StatusCode"])
            except docker.errors.NotFound:
                return -1

    @engine_errors
    def start(self, opts: RunOptions) -> ContainerInfo:
        """Create and start a container detached (for keepAlive pods).

        Args:
            opts: What to run; ``remove`` is ignored, the container lives until stopped.

        Returns:
            The started container.

        Raises:
            PodRunningError: The container name is taken.
            ContainerFailedError: The container could not be created or started.
        """
        api = self.connection.control()
        if opts.guard is not None:
            opts.guard.check()
        cid = self.create(api, opts)
        return self.start_guarded(api, opts, cid)

    @engine_errors
    def remove(self, container: str) -> None:
        """Force-remove a container; a missing one is fine."""
        force_remove(self.connection.control(), container)

    @engine_errors
    def start_service(self, opts: RunOptions, networks: list[str], stdin: bytes) -> ContainerInfo:
        """Start a detached container on ``opts.network`` and more networks, fed on stdin.

        Whatever ``stdin`` holds reaches the process through the engine's attach stream
        only: it is in no environment, label, file or ``docker inspect`` output.

        Args:
            opts: What to run.
            networks: Further networks the container joins before it starts.
            stdin: Bytes written to its stdin, which is then closed.

        Raises:
            PodRunningError: The container name is taken.
            ContainerFailedError: It could not be created, connected or started.
        """
        api = self.connection.control()
        cid = self.create(api, opts, stdin_open=True)
        try:
            for network in networks:
                api.connect_container_to_network(cid, network)
            sock = api.attach_socket(cid, params={"stdin": 1, "stream": 1})
        except docker.errors.APIError as exc:
            force_remove(api, cid)
            raise container_error(opts, "connect", exc) from None
        raw = getattr(sock, "_sock", sock)
        try:
            self.start_or_remove(api, opts, cid)
            raw.sendall(stdin)
        finally:
            raw.close()
        return ContainerInfo(opts.name, cid, "running", opts.labels, opts.image)

    @staticmethod
    def _info(attrs: dict[str, Any]) -> ContainerInfo:
        config = attrs.get("Config") or {}
        state = attrs.get("State") or {}
        return ContainerInfo(
            name=attrs.get("Name", "").lstrip("/"),
            id=attrs.get("Id", ""),
            status=state.get("Status", ""),
            labels=config.get("Labels") or {},
            image=config.get("Image", ""),
            started_at=state.get("StartedAt", ""),
            env=dict(item.partition("=")[::2] for item in config.get("Env") or []),
            finished_at=state.get("FinishedAt", "").removeprefix("0001-01-01T00:00:00Z"),
        )

    @engine_errors
    def inspect(self, container: str) -> ContainerInfo | None:
        """Describe a container.

        Args:
            container: Name or id.

        Returns:
            Its description, None when there is no such container.
        """
        try:
            return self._info(self.connection.control().inspect_container(container))
        except docker.errors.NotFound:
            return None
        except docker.errors.DockerException as exc:
            raise DockerUnavailableError(f"Docker did not answer: {explain(exc)}.") from None

    @engine_errors
    def list(self, label: str) -> list[ContainerInfo]:
        """List containers, running or not, that carry a label.

        Args:
            label: A label key, or ``key=value``.
        """
        api = self.connection.control()
        found = []
        for summary in api.containers(all=True, filters={"label": label}):
            info = self.inspect(summary["Id"])
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda c: c.name)

    @engine_errors
    def logs(self, container: str, stdout: Writer, stderr: Writer | None = None) -> int:
        """Follow a container's output from its start until it exits.

        The output already printed is read back from the engine's log (an attach with
        ``logs`` can miss it), then followed as it comes.

        Args:
            container: Name or id.
            stdout: Receives stdout as text.
            stderr: Receives stderr; None drops it.

        Returns:
            The exit code, or -1 when the container vanished.

        Raises:
            SessionNotFoundError: There is no such container.
        """
        if self.inspect(container) is None:
            raise SessionNotFoundError(f"No container named {container}.")
        with self.connection.streaming() as api:
            try:
                pump(PrivateAPI.follow_logs(api, container), stdout, stderr)
                return int(api.wait(container)["StatusCode"])
            except docker.errors.NotFound:
                return -1
