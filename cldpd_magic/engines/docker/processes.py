"""Agents run through exec, and the graceful stop of an exec or a container: SIGINT, then
SIGTERM, then SIGKILL."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable

import docker
import docker.errors
import requests
import requests.exceptions

from ...errors import ContainerFailedError, SessionNotFoundError, StopFailedError
from ..protocol import ExecHandle, StdinPipe, Writer
from .containers import KILLED_EXIT_CODE, Containers, out_of_memory_line
from .engine import DockerConnection, PrivateAPI, connect_stdin, engine_errors, explain
from .streams import pump

#: Signals ($0) the live processes recorded by exec()'s pid files; exit 0 when any was alive.
_SIGNAL_EXECS = (
    'alive=1; for f in /tmp/.cldpd-exec-*.pid; do [ -f "$f" ] || continue; '
    'p=$(cat "$f"); if kill -0 "$p" 2>/dev/null; then alive=0; '
    '[ "$0" = 0 ] || kill -"$0" "$p" 2>/dev/null; else rm -f "$f"; fi; done; exit $alive'
)


class Processes:
    """Runs commands in a container of one engine, and stops them or the container gracefully.

    Args:
        connection: The engine's clients.
        containers: The engine's containers (to tell whether one runs).
    """

    #: Shares of the stop timeout given to SIGINT and SIGTERM before SIGKILL.
    STOP_SHARES = (0.6, 0.3)

    def __init__(self, connection: DockerConnection, containers: Containers) -> None:
        self.connection = connection
        self.containers = containers

    @staticmethod
    def _say_if_exec_out_of_memory(
        api: docker.APIClient, container: str, since: float, stderr: Writer | None
    ) -> None:
        """After an exec killed by SIGKILL: one line when the engine saw an OOM since it began.

        The container's ``OOMKilled`` is only set when the container itself exits, so
        an exec is judged by the engine's ``oom`` events of its container.
        """
        if stderr is None:
            return
        with contextlib.suppress(docker.errors.APIError, requests.exceptions.RequestException):
            limit = (api.inspect_container(container).get("HostConfig") or {}).get("Memory")
            events = api.events(
                since=f"{since:.9f}",
                until=f"{time.time():.9f}",
                filters={"container": container, "event": "oom"},
                decode=True,
            )
            try:
                if any(True for _ in events):
                    stderr.write(out_of_memory_line(limit or 0, KILLED_EXIT_CODE))
            finally:
                events.close()

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
        """Run a command in a running container and stream its output.

        The command runs under ``sh``, which records its pid, so that
        :meth:`stop_exec` can signal this exec alone.

        Args:
            container: Container name or id.
            cmd: Command and arguments.
            stdout: Receives stdout as text.
            stderr: Receives stderr; None drops it.
            on_start: Called with a handle for stop_exec once the exec exists.
            stdin: The command's stdin, connected once the exec has started (the engine
                closes it when the pipe closes) and ended with the exec; None: empty.

        Returns:
            The command's exit code.

        Raises:
            SessionNotFoundError: The container does not exist or is not running.
        """
        try:
            return self._exec(container, cmd, stdout, stderr, on_start, stdin)
        finally:
            if stdin is not None:
                stdin.end()

    def _exec(
        self,
        container: str,
        cmd: list[str],
        stdout: Writer,
        stderr: Writer | None,
        on_start: Callable[[ExecHandle], None] | None,
        stdin: StdinPipe | None,
    ) -> int:
        info = self.containers.inspect(container)
        if info is None or not info.running:
            raise SessionNotFoundError(f"No running container named {container}.")
        pidfile = f"/tmp/.cldpd-exec-{uuid.uuid4().hex[:12]}.pid"
        wrapped = ["sh", "-c", '{ echo $$ >"$0"; } 2>/dev/null; exec "$@"', pidfile, *cmd]
        began = time.time()
        with self.connection.streaming() as api:
            try:
                exec_id = api.exec_create(
                    container, wrapped, stdout=True, stderr=True, stdin=stdin is not None
                )["Id"]
                if stdin is None:
                    stream = PrivateAPI.exec_start(api, exec_id)
                else:
                    sock, stream = PrivateAPI.exec_start_with_stdin(api, exec_id)
                    connect_stdin(stdin, sock)
            except docker.errors.NotFound:
                raise SessionNotFoundError(f"No running container named {container}.") from None
            except docker.errors.APIError as exc:
                if "not running" in explain(exc):
                    raise SessionNotFoundError(f"No running container named {container}.") from None
                raise ContainerFailedError(
                    f"Could not run a command in {container}: {explain(exc)}"
                ) from None
            if on_start is not None:
                on_start(ExecHandle(container, exec_id, pidfile))
            pump(stream, stdout, stderr)
            try:
                for _ in range(50):
                    result = api.exec_inspect(exec_id)
                    if not result.get("Running"):
                        break
                    time.sleep(0.02)
                code = result.get("ExitCode")
            except docker.errors.NotFound:
                code = None
            if code == KILLED_EXIT_CODE:
                self._say_if_exec_out_of_memory(api, container, began, stderr)
            return -1 if code is None else int(code)

    def _signal_exec(self, handle: ExecHandle, signal: str) -> None:
        api = self.connection.control()
        script = f'kill -{signal} "$(cat "$0")" 2>/dev/null'
        with contextlib.suppress(docker.errors.APIError):
            exec_id = api.exec_create(handle.container, ["sh", "-c", script, handle.pidfile])["Id"]
            api.exec_start(exec_id)

    def _signal_execs(self, container: str, signal: str) -> bool:
        """Signal every agent exec() started in a container (``0``: none); True if any is alive."""
        try:
            api = self.connection.control()
            exec_id = api.exec_create(container, ["sh", "-c", _SIGNAL_EXECS, signal])["Id"]
            api.exec_start(exec_id)
            return api.exec_inspect(exec_id).get("ExitCode") == 0
        except (docker.errors.APIError, requests.exceptions.RequestException):
            return False

    def _exec_running(self, handle: ExecHandle) -> bool:
        try:
            return bool(self.connection.control().exec_inspect(handle.exec_id).get("Running"))
        except docker.errors.APIError:
            return False

    @engine_errors
    def stop_exec(self, handle: ExecHandle, timeout: float = 10.0) -> None:
        """Stop one exec gracefully: SIGINT, then SIGTERM, then SIGKILL; the container stays.

        Args:
            handle: The exec, from exec()'s on_start.
            timeout: Seconds before SIGKILL.
        """
        shares = (*self.STOP_SHARES, 0.1)
        for signal, share in zip(("INT", "TERM", "KILL"), shares, strict=True):
            if not self._exec_running(handle):
                return
            self._signal_exec(handle, signal)
            deadline = time.monotonic() + max(timeout * share, 0.5)
            while time.monotonic() < deadline:
                if not self._exec_running(handle):
                    return
                time.sleep(0.05)

    def _wait_exit(self, api: docker.APIClient, container: str, seconds: float) -> bool:
        try:
            api.wait(container, timeout=max(seconds, 0.1))
        except docker.errors.NotFound:
            return True
        except (requests.exceptions.RequestException, docker.errors.APIError):
            info = self.containers.inspect(container)
            return info is None or not info.running
        return True

    @engine_errors
    def stop(self, container: str, timeout: float = 10.0) -> None:
        """Stop a container gracefully: SIGINT (the agent ends its turn), SIGTERM, then SIGKILL.

        Args:
            container: Container name or id; a missing or stopped container is fine.
            timeout: Seconds before SIGKILL.

        Raises:
            StopFailedError: The engine refused to stop it.
        """
        info = self.containers.inspect(container)
        if info is None or info.status not in ("running", "paused", "restarting"):
            return
        deadline = time.monotonic() + timeout * self.STOP_SHARES[0]
        if info.running and self._signal_execs(container, "INT"):
            # Agents running through exec (resumes, keepAlive runs) end their turn first:
            # stopping the container would kill them.
            while time.monotonic() < deadline and self._signal_execs(container, "0"):
                time.sleep(0.1)
        with self.connection.streaming() as api:
            for signal, share in zip(("SIGINT", "SIGTERM"), self.STOP_SHARES, strict=True):
                try:
                    api.kill(container, signal=signal)
                except docker.errors.NotFound:
                    return
                except docker.errors.APIError as exc:
                    if "is not running" in explain(exc):
                        return
                    raise StopFailedError(f"Could not stop {container}: {explain(exc)}") from None
                if self._wait_exit(api, container, timeout * share):
                    return
            try:
                api.kill(container)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if "is not running" not in explain(exc):
                    raise StopFailedError(f"Could not stop {container}: {explain(exc)}") from None
            self._wait_exit(api, container, 10)
