"""A fake Runner: the Docker operations in memory, with scripted agents, for unit tests."""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cldpd_magic.engines.protocol import (
    ContainerInfo,
    ExecHandle,
    RunOptions,
    StdinPipe,
    Writer,
)
from cldpd_magic.errors import BuildFailedError, PodRunningError, SessionNotFoundError

#: The GitHub issue every test starts its pods on.
ISSUE_URL = "https://github.com/octocat/Hello-World/issues/1"


def write_pod(
    pods_dir: Path,
    name: str,
    pod_json: dict | str | None = None,
    template: str | bytes | None = None,
    dockerfile: bool = True,
) -> Path:
    """Write a pod directory by hand (no Docker involved) and return its path."""
    pod = pods_dir / name
    pod.mkdir(parents=True)
    if dockerfile:
        (pod / "Dockerfile").write_text("FROM busybox:latest\n")
    if pod_json is not None:
        text = pod_json if isinstance(pod_json, str) else json.dumps(pod_json)
        (pod / "pod.json").write_text(text)
    if isinstance(template, bytes):
        (pod / "template.md").write_bytes(template)
    elif template is not None:
        (pod / "template.md").write_text(template)
    return pod


class FakeStdin:
    """The agent's end of a fake process's stdin: what its StdinPipe sent, line by line.

    Attributes:
        received: Every byte the pipe sent, in order.
        closed: Whether the pipe closed it (the agent read end of file after ``received``).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._unread = bytearray()
        self._end = False  # closed, hung up (stopped) or never connected
        self.received = bytearray()
        self.closed = False

    @classmethod
    def empty(cls) -> FakeStdin:
        """An empty stdin, at its end at once (a run without a pipe)."""
        stdin = cls()
        stdin._end = True
        return stdin

    def feed(self, data: bytes) -> None:
        """The pipe's ``send``."""
        with self._cond:
            self._unread += data
            self.received += data
            self._cond.notify_all()

    def close(self) -> None:
        """The pipe's ``half_close``: the agent reads end of file after what came."""
        with self._cond:
            self.closed = self._end = True
            self._cond.notify_all()

    def hang_up(self) -> None:
        """The process was stopped: a read waiting for a line gets end of file."""
        with self._cond:
            self._end = True
            self._cond.notify_all()

    def readline(self, timeout: float | None = None) -> str | None:
        """The next line with its newline; "" at the end; None when none came in time."""
        with self._cond:
            if not self._cond.wait_for(lambda: b"\n" in self._unread or self._end, timeout):
                return None
            cut = self._unread.find(b"\n") + 1 or len(self._unread)
            line = bytes(self._unread[:cut])
            del self._unread[:cut]
            return line.decode("utf-8", errors="replace")

    def __iter__(self) -> Iterator[str]:
        while line := self.readline():
            yield line

    @property
    def lines(self) -> list[str]:
        """Every line received so far, without newlines."""
        with self._cond:
            return self.received.decode("utf-8", errors="replace").splitlines()


@dataclass
class AgentCall:
    """What a scripted agent gets: its command, environment, writers and a stop signal.

    Attributes:
        cmd: The command line.
        env: The environment the container would see.
        stdout: Receives stdout text.
        stderr: Receives stderr text (may be None).
        stopped: Set when the container or exec is stopped.
        kind: ``run`` (container command) or ``exec``.
        stdin: Its stdin (empty unless the run or exec was given a StdinPipe).
    """

    cmd: list[str]
    env: dict[str, str]
    stdout: Writer
    stderr: Writer | None
    stopped: threading.Event
    kind: str
    stdin: FakeStdin = field(default_factory=FakeStdin.empty)

    def out(self, *lines: str) -> None:
        """Write lines to stdout."""
        for line in lines:
            self.stdout.write(line + "\n")

    def err(self, *lines: str) -> None:
        """Write lines to stderr, if there is a stderr."""
        if self.stderr is not None:
            for line in lines:
                self.stderr.write(line + "\n")


Agent = Callable[[AgentCall], int]


def echo_agent(call: AgentCall) -> int:
    """Print the command's last argument (the prompt) and exit 0."""
    call.out(call.cmd[-1])
    return 0


def lines_agent(*lines: str, code: int = 0) -> Agent:
    """An agent that prints lines and exits with code."""

    def agent(call: AgentCall) -> int:
        call.out(*lines)
        return code

    return agent


def cat_agent(call: AgentCall) -> int:
    """Echo every line of stdin; at its end say so and exit 0 (130 when stopped)."""
    for line in call.stdin:
        call.stdout.write(line)
    if call.stopped.is_set():
        call.out("got INT")
        return 130
    call.out("stdin closed")
    return 0


def line_agent(respond: Callable[[AgentCall, str], None], code: int = 0) -> Agent:
    """An agent that calls ``respond(call, line)`` for each line of stdin (without its
    newline), and exits with ``code`` at its end (130 when stopped)."""

    def agent(call: AgentCall) -> int:
        for line in call.stdin:
            respond(call, line.rstrip("\n"))
        return 130 if call.stopped.is_set() else code

    return agent


def idle_agent(call: AgentCall) -> int:
    """Run until stopped, then exit 130 as an agent that traps SIGINT does."""
    call.out("working")
    call.stopped.wait(30)
    call.out("got INT")
    return 130


class _Stopped(threading.Event):
    """A process's stop signal; once set, a read of the process's stdin gets end of file
    (a stopped agent reads no more)."""

    def __init__(self) -> None:
        super().__init__()
        self.stdin: FakeStdin | None = None

    def set(self) -> None:
        super().set()
        if self.stdin is not None:
            self.stdin.hang_up()

    def attach(self, pipe: StdinPipe | None, stdins: list[FakeStdin]) -> FakeStdin:
        """The process's stdin: the pipe connected to a new FakeStdin (kept in ``stdins``),
        or an empty one."""
        if pipe is None:
            return FakeStdin.empty()
        stdin = self.stdin = FakeStdin()
        stdins.append(stdin)
        pipe.connect(stdin.feed, stdin.close)
        if self.is_set():
            stdin.hang_up()
        return stdin


@dataclass
class _Container:
    info: ContainerInfo
    opts: RunOptions
    stopped: _Stopped = field(default_factory=_Stopped)


class FakeRunner:
    """Implements the Runner protocol without Docker.

    Attributes:
        agent: Runs for ``run`` and for ``exec`` (its ``AgentCall.kind`` tells which).
        build_lines: Lines the build prints.
        build_error: When set, the build fails with this message after its lines.
        hold_build: The build waits until it is cancelled.
        unavailable: preflight() and list() raise this error when set.
        containers: Containers by name, as the engine would report them.
        calls: Every call, as ``(method, args)`` tuples.
        runs: The RunOptions of every run() and start().
        execs: ``(container, cmd)`` of every exec().
        stdins: The stdin of every run() or exec() given a StdinPipe, in order.
        stops: Container names stop() was called with.
        removed: Container names removed.
        built: Tags built.
        build_started: Set when a build begins.
        agent_started: Set when the agent of a run() or exec() begins.
        on_step: Called as ``on_step(step, name)`` at each step of making a run: ``build``
            (before a build, with the tag), ``built`` (after it), ``created`` (the
            container exists, not started), ``started`` (it runs, before the runner
            reports it) and ``exec`` (before an exec starts); a test injects a stop there.
    """

    def __init__(self, agent: Agent = echo_agent) -> None:
        self.agent = agent
        self.build_lines: list[str] = ["Step 1/1 : FROM busybox:latest", "Successfully built"]
        self.build_error: str | None = None
        self.hold_build = False
        self.unavailable: Exception | None = None
        self.containers: dict[str, _Container] = {}
        self.calls: list[tuple[str, tuple]] = []
        self.runs: list[RunOptions] = []
        self.execs: list[tuple[str, list[str]]] = []
        self.stdins: list[FakeStdin] = []
        self.stops: list[str] = []
        self.removed: list[str] = []
        self.built: list[str] = []
        self.build_started = threading.Event()
        self.agent_started = threading.Event()
        self.on_step: Callable[[str, str], None] | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._exec_stops: dict[str, tuple[str, _Stopped]] = {}

    def add_container(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        status: str = "running",
        env: dict[str, str] | None = None,
    ) -> ContainerInfo:
        """Pretend a container exists (made by another process, say)."""
        env = dict(env or {})
        labels = dict(labels or {})
        info = ContainerInfo(name, f"id{next(self._ids)}", status, labels, "img", env=env)
        self.containers[name] = _Container(info, RunOptions("img", name, [], env=env))
        return info

    def _set_status(self, name: str, status: str) -> None:
        container = self.containers.get(name)
        if container is not None:
            container.info = dataclasses.replace(container.info, status=status)

    def preflight(self) -> None:
        """Raise ``unavailable`` when set."""
        self.calls.append(("preflight", ()))
        if self.unavailable is not None:
            raise self.unavailable

    def build(
        self,
        tag: str,
        context_dir: str,
        build_args: dict[str, str] | None = None,
        on_output: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        engine: str = "",
    ) -> None:
        """Print build_lines, then fail, wait for a cancel or succeed."""
        self.calls.append(("build", (tag, context_dir, dict(build_args or {}))))
        self._step("build", tag)
        self.built.append(tag)
        self.build_started.set()
        for line in self.build_lines:
            if on_output is not None:
                on_output(line)
        if self.hold_build:
            assert cancel is not None
            cancel.wait(30)
            raise BuildFailedError(f"Building image {tag} failed: the build was stopped")
        if self.build_error is not None:
            raise BuildFailedError(self.build_error, "\n".join(self.build_lines[-3:]))
        self._step("built", tag)

    def _step(self, step: str, name: str) -> None:
        if self.on_step is not None:
            self.on_step(step, name)

    def _create(self, opts: RunOptions) -> _Container:
        """Create the container, then start it, as an engine would (``created`` first),
        asking ``opts.guard`` as DockerRunner does; a refused container is removed."""
        guard = opts.guard
        if guard is not None:
            guard.check()
        with self._lock:
            if opts.name in self.containers:
                raise PodRunningError(f"A container named {opts.name} already exists.")
            info = ContainerInfo(
                opts.name, f"id{next(self._ids)}", "created", dict(opts.labels), opts.image,
                env=dict(opts.env),
            )  # fmt: skip
            container = self.containers[opts.name] = _Container(info, opts)
        self.runs.append(opts)
        try:
            self._step("created", opts.name)
            if guard is not None:
                guard.check()
            self._set_status(opts.name, "running")
            self._step("started", opts.name)
            if guard is not None:
                guard.started(container.info)
        except BaseException:
            container.stopped.set()
            self.remove(opts.name)
            raise
        return container

    def run(
        self,
        opts: RunOptions,
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ContainerInfo], None] | None = None,
    ) -> int:
        """Run the agent as the container's command, its stdin ``opts.stdin`` when set."""
        self.calls.append(("run", (opts,)))
        try:
            container = self._create(opts)
            stdin = container.stopped.attach(opts.stdin, self.stdins)
            if on_start is not None:
                on_start(container.info)
            self.agent_started.set()
            call = AgentCall(
                opts.cmd, dict(opts.env), stdout, stderr, container.stopped, "run", stdin
            )
            try:
                return self.agent(call)
            finally:
                self._set_status(opts.name, "exited")
                if opts.remove:
                    self.remove(opts.name)
        finally:
            if opts.stdin is not None:
                opts.stdin.end()

    def start(self, opts: RunOptions) -> ContainerInfo:
        """Create a running container that idles until stopped."""
        self.calls.append(("start", (opts,)))
        return self._create(opts).info

    def exec(
        self,
        container: str,
        cmd: list[str],
        stdout: Writer,
        stderr: Writer | None = None,
        on_start: Callable[[ExecHandle], None] | None = None,
        stdin: StdinPipe | None = None,
    ) -> int:
        """Run the agent as an exec in a running container, its stdin ``stdin`` when given."""
        self.calls.append(("exec", (container, cmd)))
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
        pipe: StdinPipe | None,
    ) -> int:
        found = self.containers.get(container)
        if found is None or not found.info.running:
            raise SessionNotFoundError(f"No running container named {container}.")
        self._step("exec", container)
        handle = ExecHandle(container, f"exec{next(self._ids)}", "/tmp/pid")
        stopped = _Stopped()
        with self._lock:  # an exec into a container being stopped ends with it
            found = self.containers.get(container)
            if found is None or not found.info.running:
                raise SessionNotFoundError(f"No running container named {container}.")
            self._exec_stops[handle.exec_id] = (container, stopped)
        self.execs.append((container, list(cmd)))
        stdin = stopped.attach(pipe, self.stdins)
        if on_start is not None:
            on_start(handle)
        self.agent_started.set()
        env = dict(found.opts.env)
        return self.agent(AgentCall(list(cmd), env, stdout, stderr, stopped, "exec", stdin))

    def stop_exec(self, handle: ExecHandle, timeout: float = 10.0) -> None:
        """Stop one exec; the container stays."""
        self.calls.append(("stop_exec", (handle, timeout)))
        self._exec_stops[handle.exec_id][1].set()

    def stop(self, container: str, timeout: float = 10.0) -> None:
        """Stop a running container; a missing one is fine, and one not started yet stays
        (as an engine's stop does)."""
        self.calls.append(("stop", (container, timeout)))
        self.stops.append(container)
        with self._lock:
            found = self.containers.get(container)
            if found is None or not found.info.running:
                return
            self._set_status(container, "exited")
            execs = [stopped for name, stopped in self._exec_stops.values() if name == container]
        found.stopped.set()
        for stopped in execs:
            stopped.set()

    def remove(self, container: str) -> None:
        """Remove a container; a missing one is fine."""
        self.calls.append(("remove", (container,)))
        if self.containers.pop(container, None) is not None:
            self.removed.append(container)

    def inspect(self, container: str) -> ContainerInfo | None:
        """The container's info, None when there is none."""
        found = self.containers.get(container)
        return None if found is None else found.info

    def list(self, label: str) -> list[ContainerInfo]:
        """Containers carrying the label key (or ``key=value``); ``unavailable`` when set."""
        if self.unavailable is not None:
            raise self.unavailable
        key, _, value = label.partition("=")
        return sorted(
            (
                c.info
                for c in self.containers.values()
                if key in c.info.labels and (not value or c.info.labels[key] == value)
            ),
            key=lambda i: i.name,
        )

    def logs(self, container: str, stdout: Writer, stderr: Writer | None = None) -> int:
        """Follow a container: runs the agent as if replaying its output."""
        self.calls.append(("logs", (container,)))
        found = self.containers.get(container)
        if found is None:
            raise SessionNotFoundError(f"No container named {container}.")
        call = AgentCall(found.opts.cmd, {}, stdout, stderr, found.stopped, "logs")
        try:
            return self.agent(call)
        finally:
            self._set_status(container, "exited")

    def release(self) -> None:
        """End every agent still waiting to be stopped (a test's clean-up)."""
        for container in list(self.containers.values()):
            container.stopped.set()
        for _name, stopped in list(self._exec_stops.values()):
            stopped.set()


# --- An interactive Claude Code, as measured (stream-json in and out) ------------------

#: Lines the scripted interactive CLI writes: a turn's start and its end.
CLAUDE_INIT = json.dumps({"type": "system", "subtype": "init", "session_id": "s", "model": "m"})
CLAUDE_IDLE = json.dumps({"type": "system", "subtype": "session_state_changed", "state": "idle"})


def claude_result(text: str, is_error: bool = False) -> str:
    """A turn's ``result`` line."""
    return json.dumps({"type": "result", "subtype": "success", "is_error": is_error,
                       "num_turns": 1, "result": text, "total_cost_usd": 0.001})  # fmt: skip


def claude_said(text: str) -> str:
    """An ``assistant`` line of one text block."""
    return json.dumps({"type": "assistant", "message": {"id": "m", "role": "assistant",
                       "content": [{"type": "text", "text": text}]}})  # fmt: skip


def fake_claude(call: AgentCall, line: str) -> None:
    """One stdin line of an interactive Claude Code (use with :func:`line_agent`): a
    message asks for ``touch`` when it says "ask", waits when it says "slow" (until
    interrupted), else answers at once."""
    frame = json.loads(line)
    kind = frame.get("type")
    if kind == "user":
        text = frame["message"]["content"]
        replay = {"type": "user", "isReplay": True, "uuid": frame.get("uuid", ""),
                  "message": {"role": "user", "content": text}}  # fmt: skip
        call.out(json.dumps(replay), CLAUDE_INIT)
        if "ask" in text:
            request = {"subtype": "can_use_tool", "tool_name": "Bash",
                       "input": {"command": "touch asked.txt"}, "tool_use_id": "t1"}  # fmt: skip
            call.out(json.dumps({"type": "control_request", "request_id": "q1",
                                 "request": request}))  # fmt: skip
        elif "slow" not in text:
            call.out(claude_said(f"done: {text}"), claude_result(f"done: {text}"), CLAUDE_IDLE)
    elif kind == "control_response":
        answer = frame["response"]["response"]
        if answer["behavior"] == "allow":
            call.out(claude_said("touched asked.txt"), claude_result("touched"), CLAUDE_IDLE)
        else:
            call.out(claude_said(f"not allowed: {answer['message']}"), claude_result("denied"),
                     CLAUDE_IDLE)  # fmt: skip
    elif kind == "control_request":
        subtype = frame["request"]["subtype"]
        reply = {"subtype": "success", "request_id": frame["request_id"], "response": {}}
        call.out(json.dumps({"type": "control_response", "response": reply}))
        if subtype == "interrupt":
            call.out(claude_result("interrupted", is_error=True), CLAUDE_IDLE)
