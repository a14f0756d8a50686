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

from ..errors import InvalidRequestError, StdinClosedError
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


class StdinPipe:
    """The stdin of one agent process: lines any thread writes, sent in order.

    The caller makes it and hands it to a runner (``RunOptions.stdin`` for ``run``, the
    ``stdin`` argument of ``exec``); the runner connects it once the process's stdin is
    attached (before the process starts, so nothing is lost) and ends it once the
    process has ended. Lines written before the runner connects the pipe wait for it and
    go first, in order; later ones follow in the order they were written.

    Writing never blocks: a thread of the pipe's own sends what was written, so that no
    writer (the thread that reads the agent's output, say) waits for an agent that is not
    reading its stdin, and no agent waits on a reader blocked in a write. Once the pipe
    is closed or its process has ended, a write raises; a line written just as the
    process ends, before its runner has seen the end, is lost without an error.

    Attributes:
        connected: Set once a runner has connected the pipe to a process.
    """

    def __init__(self) -> None:
        self.connected = threading.Event()
        self._cond = threading.Condition()  # guards the state below
        self._queue: list[bytes] = []
        self._connection: tuple[Callable[[bytes], None], Callable[[], None]] | None = None
        self._closed = False  # close() was called
        self._ended = False  # the process has ended, or its stdin could not be written

    @property
    def closed(self) -> bool:
        """Whether writes are refused: the pipe was closed, or its process has ended."""
        with self._cond:
            return self._closed or self._ended

    @property
    def ended(self) -> bool:
        """Whether the process has ended (or its stdin could no longer be written)."""
        with self._cond:
            return self._ended

    def write_line(self, text: str) -> None:
        """Send one line to the process's stdin (a newline is added); returns at once.

        Args:
            text: One line, without a newline.

        Raises:
            InvalidRequestError: The text holds a newline.
            StdinClosedError: The pipe was closed, or its process has ended.
        """
        if "\n" in text:
            raise InvalidRequestError(
                "A line written to an agent's stdin holds a newline; write each line apart."
            )
        data = (text + "\n").encode("utf-8", errors="replace")
        with self._cond:
            if self._ended:
                raise StdinClosedError("The run's agent has ended and reads no more input.")
            if self._closed:
                raise StdinClosedError(
                    "The run's agent input was closed; resume the run to send it more."
                )
            self._queue.append(data)
            self._cond.notify_all()

    def close(self) -> None:
        """End the process's input: what was written is sent first, then the process reads
        end of file. Idempotent, returns at once; nothing to do once the process ended."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the runner's side ----------------------------------------------------------

    def connect(self, send: Callable[[bytes], None], half_close: Callable[[], None]) -> None:
        """Connect the pipe to a process's stdin; what waits is sent first, in order.

        Called by a runner once the process's stdin is attached; a thread of the pipe's
        own sends from then on (a pipe closed meanwhile is closed after its lines).

        Args:
            send: Writes bytes to the process's stdin, blocking until they are taken;
                an OSError (or EOFError) means the stdin is gone.
            half_close: Ends the process's stdin, leaving its output to be read.

        Raises:
            InvalidRequestError: The pipe was connected before (each process needs its own).
        """
        with self._cond:
            if self._connection is not None or self._ended:
                raise InvalidRequestError(
                    "This stdin pipe already served a process; give each run a new StdinPipe."
                )
            self._connection = (send, half_close)
        threading.Thread(target=self._send_all, daemon=True, name="cldpd-stdin").start()
        self.connected.set()

    def _send_all(self) -> None:
        """The pipe's thread: send what is written until the pipe is closed or ended."""
        assert self._connection is not None
        send, half_close = self._connection
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed or self._ended)
                if self._ended:
                    return
                data, self._queue = b"".join(self._queue), []
            try:
                if data:
                    send(data)
                    continue
                half_close()  # closed, and nothing more to send
            except (OSError, EOFError):  # EOFError: a closed paramiko channel
                with self._cond:
                    self._ended = True
                    self._queue.clear()
            return

    def end(self) -> None:
        """Mark the process ended; the runner calls it once the process has ended or could
        not be made, whatever happened. Later writes raise; what waits is dropped."""
        with self._cond:
            self._ended = True
            self._queue.clear()
            self._cond.notify_all()


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
        stdin: The agent's stdin for ``run`` (None: an empty stdin, as today); ``start``
            ignores it (a kept-alive container's agents run through ``exec``).
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
    stdin: StdinPipe | None = field(default=None, compare=False, repr=False)

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
        """Run a container to its end and return its exit code (asking ``opts.guard``; its
        stdin connected to ``opts.stdin`` when set, else empty)."""

    def start(self, opts: RunOptions) -> ContainerInfo:
        """Create and start a container detached (asking ``opts.guard``)."""

    def exec(
        self,
        container: str,
        cmd: list[str],
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ExecHandle], None] | None = None,
        stdin: StdinPipe | None = None,
    ) -> int:
        """Run a command in a running container and return its exit code (its stdin
        connected to ``stdin`` when given, else empty)."""

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


@runtime_checkable
class SnapshotRunner(Runner, Protocol):
    """A Runner that can read an ended container's files: a run's changes, taken before
    its container is removed (a running one is read through :meth:`Runner.exec`)."""

    def capture(self, container: str, script: str, *, left_at: str | None = None) -> bytes:
        """Run ``sh -c script`` over a container's files (its volumes and bind mounts too),
        as its user in its workdir, with no network and no capability; its stdout.

        ``left_at``: a file in which the container's own command may have left what the
        script prints (as it ended); an ended container holding it is read, not scripted.

        Raises:
            SessionNotFoundError: There is no such container.
        """
