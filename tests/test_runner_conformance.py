"""The Runner contract: one module every Runner must pass, on every kind of engine reached.

Targets: the local engine through DockerRunner, a second dockerd on a loopback TCP port
with TLS (certificates made here) through DockerRunner, the same TLS engine reached
through a MultiEngineRunner whose default is the local engine (so routing is exercised),
and the local engine behind an sshd on a loopback port (``ssh://``, paramiko, keys made
here), and the Swarm runner on a one-node swarm of a second dockerd (a swarm changes its
engine's networks, so never the main engine's), where a run is a service whose task's
exit code is read from the task. test_swarm.py holds what is Swarm's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import docker.tls
import pytest
from engines_util import (
    TEST_LABEL,
    ExtraEngine,
    SshEngine,
    found_again_by_a_new_dispatcher,
    init_swarm,
    start_extra_engine,
    start_ssh_engine,
    stop_extra_engine,
    stop_ssh_engine,
    write_echo_pod,
)
from test_docker_runner import Text

from cldpd_magic.engines.docker import LABEL_VOLUME_OF
from cldpd_magic.engines.docker.runner import DockerRunner, _PrivateAPI
from cldpd_magic.engines.multi import MultiEngineRunner, docker_runner_for
from cldpd_magic.engines.protocol import (
    ContainerInfo,
    ExecHandle,
    Runner,
    RunOptions,
    StdinPipe,
)
from cldpd_magic.engines.setting import Engine, parse_engine
from cldpd_magic.engines.swarm.runner import SwarmRunner
from cldpd_magic.errors import (
    DockerUnavailableError,
    InvalidRequestError,
    PodRunningError,
    SessionNotFoundError,
    StdinClosedError,
)
from cldpd_magic.runs.session import SessionStopped

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

AGENT = """#!/bin/sh
# The stand-in agent: what it does is chosen by its first argument.
case "$1" in
  exit) echo "leaving with $2"; exit "$2" ;;
  split) echo out-1; echo err-1 >&2; echo out-2; echo err-2 >&2 ;;
  lines) i=1; while [ "$i" -le "$2" ]; do echo "line $i"; i=$((i + 1)); done ;;
  long) head -c "$2" /dev/zero | tr '\\0' x; echo; echo after ;;
  trap) trap 'echo got INT; exit 130' INT; echo ready; while :; do sleep 1 & wait; done ;;
  deaf) trap '' INT TERM; echo ready; while :; do sleep 1; done ;;
  idle) trap 'exit 0' INT TERM; while :; do sleep 1 & wait; done ;;
  stdin) cat; echo "stdin closed" ;;
  catint) trap 'echo got INT; exit 130' INT; echo ready; exec 3<&0; cat <&3 & wait ;;
  write) mkdir -p "$2" && printf '%s\n' "$3" > "$2/made.txt" && echo wrote ;;
  *) echo "$@" ;;
esac
"""


def agent_context(directory: Path) -> Path:
    """Write the stand-in agent's image context into ``directory`` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "agent").write_text(AGENT)
    (directory / "Dockerfile").write_text(
        "FROM busybox:latest\nCOPY agent /usr/local/bin/agent\nRUN chmod +x /usr/local/bin/agent\n"
        "WORKDIR /work\n"
    )
    return directory


@dataclass
class Target:
    """A Runner under test, the engine it reaches, and a client to check and clean up."""

    kind: str
    runner: Runner
    client: docker.DockerClient
    engine: str = ""
    image: str = ""
    made: list[str] = field(default_factory=list)

    def opts(self, *args: str, **kwargs) -> RunOptions:
        name = f"cldpd-conf-{uuid.uuid4().hex[:10]}"
        self.made.append(name)
        labels = {TEST_LABEL: "conformance", "cldpd.run": name, **kwargs.pop("labels", {})}
        return RunOptions(
            self.image, name, ["agent", *args], labels=labels, engine=self.engine, **kwargs
        )

    def exit_code(self, name: str) -> int:
        """The exit code the engine recorded for a run that ended."""
        return self.client.api.inspect_container(name)["State"]["ExitCode"]

    def _force_remove(self, name: str) -> None:
        self.client.api.remove_container(name, force=True, v=True)

    def volumes_of(self, name: str) -> list[str]:
        """The anonymous volumes a read-only root of a run had, still on the engine."""
        found = self.client.api.volumes(filters={"label": f"{LABEL_VOLUME_OF}={name}"})
        return [v["Name"] for v in found.get("Volumes") or []]

    def cleanup(self) -> list[str]:
        """Remove what the tests made and did not remove; return those names."""
        leaked = []
        for name in self.made:
            try:
                self._force_remove(name)
                leaked.append(name)
            except docker.errors.NotFound:
                pass
        self.made.clear()
        return leaked


class SwarmTarget(Target):
    """A Swarm runner: each run is a service, whose task holds the exit code."""

    def exit_code(self, name: str) -> int:
        tasks = self.client.api.tasks(filters={"service": name})
        return tasks[0]["Status"]["ContainerStatus"]["ExitCode"]

    def _force_remove(self, name: str) -> None:
        self.client.api.remove_service(name)

    def volumes_of(self, name: str) -> list[str]:
        """The node removes a task's container, and its volumes, after its service went."""
        for _ in range(300):
            left = super().volumes_of(name)
            if not left:
                return []
            threading.Event().wait(0.2)
        return left


@pytest.fixture(scope="session")
def extra_engine(docker_client) -> Iterator[ExtraEngine]:
    engine = start_extra_engine()
    yield engine
    stop_extra_engine(engine)


def _client(engine: Engine) -> docker.DockerClient:
    tls: docker.tls.TLSConfig | bool = False
    if engine.tls:
        ca, cert, key = engine.tls
        tls = docker.tls.TLSConfig(client_cert=(cert, key), ca_cert=ca, verify=True)
    client = docker.DockerClient(base_url=engine.url, tls=tls, version="1.24")
    client.api.trust_env = False  # $REQUESTS_CA_BUNDLE would replace the engine's CA
    _PrivateAPI.use_server_version(client.api)
    return client


@pytest.fixture(scope="session")
def ssh_engine(docker_client) -> Iterator[SshEngine]:
    missing = [
        what
        for what, ok in (
            ("paramiko (the ssh extra)", importlib.util.find_spec("paramiko") is not None),
            ("sshd (Debian's openssh-server)", os.path.exists("/usr/sbin/sshd")),
        )
        if not ok
    ]
    if missing:
        message = f"the ssh:// engine needs {' and '.join(missing)}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    engine = start_ssh_engine()
    yield engine
    stop_ssh_engine(engine)


@pytest.fixture(scope="module", params=["local", "tls", "engines", "ssh", "swarm"])
def target(request, docker_client, tmp_path_factory) -> Iterator[Target]:
    if request.param == "swarm":
        extra = start_extra_engine()
        request.addfinalizer(lambda: stop_extra_engine(extra))
        init_swarm(extra)
        manager = DockerRunner(base_url=extra.url, tls=extra.tls_files())
        t = SwarmTarget("swarm", SwarmRunner(manager), _client(parse_engine(extra.entry)))
    elif request.param == "local":
        t = Target("local", DockerRunner(), docker.from_env())
    elif request.param == "ssh":
        ssh = request.getfixturevalue("ssh_engine")
        # paramiko finds the key and the host's key under $HOME/.ssh.
        home = os.environ.get("HOME")
        os.environ["HOME"] = str(ssh.home)
        request.addfinalizer(
            lambda: os.environ.update(HOME=home) if home else os.environ.pop("HOME", None)
        )
        t = Target("ssh", docker_runner_for(parse_engine(ssh.url)), docker.from_env())
    else:
        tls = parse_engine(request.getfixturevalue("extra_engine").entry)
        if request.param == "tls":
            t = Target("tls", docker_runner_for(tls), _client(tls))
        else:
            local = Engine("local", "unix:///var/run/docker.sock")
            multi = MultiEngineRunner([(local, DockerRunner()), (tls, docker_runner_for(tls))])
            t = Target("engines", multi, _client(tls), engine=tls.name)
    context = agent_context(tmp_path_factory.mktemp(f"agent-{t.kind}"))
    t.image = f"cldpd-conformance-{t.kind}:{uuid.uuid4().hex[:8]}"
    lines: list[str] = []
    t.runner.build(t.image, str(context), on_output=lines.append, engine=t.engine)
    assert any(line.startswith("Step 1/") for line in lines)
    yield t
    t.cleanup()
    t.client.images.remove(t.image, force=True)
    t.client.close()


@pytest.fixture(autouse=True)
def _no_leftovers(request) -> Iterator[None]:
    yield
    if "target" in request.fixturenames:
        t = request.getfixturevalue("target")
        leaked = t.cleanup()
        assert not leaked, f"left behind on {t.kind}: {leaked}"


def run(t: Target, *args: str, **kwargs) -> tuple[int, str, str, RunOptions]:
    out, err = Text(), Text()
    opts = t.opts(*args, **kwargs)
    return t.runner.run(opts, out, err), out.value, err.value, opts


def test_build_puts_the_image_on_the_engine(target):
    assert target.client.images.get(target.image).tags == [target.image]


@pytest.mark.parametrize("code", [0, 1, 3, 130])
def test_exit_codes_are_returned(target, code):
    got, out, _, _ = run(target, "exit", str(code))
    assert (got, out) == (code, f"leaving with {code}\n")


def test_stdout_and_stderr_are_kept_apart(target):
    _, out, err, _ = run(target, "split")
    assert (out, err) == ("out-1\nout-2\n", "err-1\nerr-2\n")


def test_every_line_comes_in_order(target):
    _, out, _, _ = run(target, "lines", "20000")
    assert out.splitlines() == [f"line {i}" for i in range(1, 20001)]


def test_the_agents_stdin_is_empty(target):
    assert run(target, "stdin")[:2] == (0, "stdin closed\n")


def test_a_long_line_comes_whole(target):
    _, out, _, _ = run(target, "long", str(3 << 20))
    assert out == "x" * (3 << 20) + "\nafter\n"


def test_run_removes_its_container_and_reports_its_start(target):
    started: list[ContainerInfo] = []
    code, _, _, opts = run(target, "hi")
    assert code == 0 and target.runner.inspect(opts.name) is None
    opts = target.opts("hi")
    target.runner.run(opts, Text(), Text(), on_start=started.append)
    assert [i.name for i in started] == [opts.name]
    assert started[0].engine == target.engine


def test_labels_inspect_and_list(target):
    opts = target.opts("idle", labels={"cldpd.pod": "conf"})
    info = target.runner.start(opts)
    assert info.name == opts.name and info.engine == target.engine
    seen = target.runner.inspect(opts.name)
    assert seen is not None and seen.running and seen.labels["cldpd.pod"] == "conf"
    assert seen.engine == target.engine
    listed = target.runner.list(f"cldpd.run={opts.name}")
    assert [(i.name, i.engine) for i in listed] == [(opts.name, target.engine)]
    target.runner.stop(opts.name, timeout=5)
    assert target.runner.inspect(opts.name).status == "exited"
    target.runner.remove(opts.name)
    assert target.runner.inspect(opts.name) is None
    assert target.runner.list(f"cldpd.run={opts.name}") == []


def test_a_taken_name_is_refused(target):
    opts = target.opts("idle")
    target.runner.start(opts)
    with pytest.raises(PodRunningError):
        target.runner.start(opts)
    target.runner.stop(opts.name, timeout=5)
    target.runner.remove(opts.name)


def test_exec_streams_and_returns_its_code(target):
    opts = target.opts("idle")
    target.runner.start(opts)
    out, err, handles = Text(), Text(), []
    code = target.runner.exec(opts.name, ["agent", "split"], out, err, on_start=handles.append)
    assert (code, out.value, err.value) == (0, "out-1\nout-2\n", "err-1\nerr-2\n")
    assert target.runner.exec(opts.name, ["agent", "exit", "4"], Text()) == 4
    assert isinstance(handles[0], ExecHandle)
    target.runner.stop(opts.name, timeout=5)
    with pytest.raises(SessionNotFoundError):
        target.runner.exec(opts.name, ["true"], Text())
    target.runner.remove(opts.name)


def test_stop_exec_ends_the_exec_gracefully_and_the_container_stays(target):
    opts = target.opts("idle")
    target.runner.start(opts)
    out, handles, result = Text(), [], {}

    def work():
        result["code"] = target.runner.exec(
            opts.name, ["agent", "trap"], out, on_start=handles.append
        )

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    out.wait_for("ready")
    target.runner.stop_exec(handles[0], timeout=10)
    thread.join(30)
    assert result["code"] == 130 and "got INT" in out.value
    assert target.runner.inspect(opts.name).running
    target.runner.stop(opts.name, timeout=5)
    target.runner.remove(opts.name)


def test_stop_is_graceful_first(target):
    out, result = Text(), {}
    opts = target.opts("trap")

    def work():
        result["code"] = target.runner.run(opts, out, Text())

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    out.wait_for("ready")
    target.runner.stop(opts.name, timeout=10)
    thread.join(30)
    assert result["code"] == 130 and "got INT" in out.value


def test_stop_escalates_to_kill(target):
    opts = target.opts("deaf")
    target.runner.start(opts)
    logs = Text()
    follower = threading.Thread(
        target=lambda: target.runner.logs(opts.name, logs, Text()), daemon=True
    )
    follower.start()
    logs.wait_for("ready")
    target.runner.stop(opts.name, timeout=2)
    info = target.runner.inspect(opts.name)
    assert info is not None and info.status == "exited"
    assert target.exit_code(opts.name) == 137
    follower.join(30)
    target.runner.remove(opts.name)


def test_logs_follow_from_the_start_to_the_exit_code(target):
    opts = target.opts("exit", "5")
    opts.remove = False
    target.runner.run(opts, Text(), Text())
    out = Text()
    assert target.runner.logs(opts.name, out, Text()) == 5
    assert out.value == "leaving with 5\n"
    target.runner.remove(opts.name)
    with pytest.raises(SessionNotFoundError):
        target.runner.logs(opts.name, Text())


def test_missing_containers(target):
    name = f"cldpd-conf-missing-{uuid.uuid4().hex[:8]}"
    assert target.runner.inspect(name) is None
    target.runner.stop(name)
    target.runner.remove(name)
    with pytest.raises(SessionNotFoundError):
        target.runner.exec(name, ["true"], Text())


def test_preflight(target):
    target.runner.preflight()


#: Writes in the working directory (the image's), the home directory and /tmp, runs a
#: program from /tmp, and tries the root elsewhere.
WRITES = (
    "touch /etc/x 2>/dev/null && echo root-writable; "
    "echo w >w && echo wrote-workdir; "
    'echo h >"$HOME/h" && echo wrote-home; '
    "printf '#!/bin/sh\\necho ran-from-tmp\\n' >/tmp/s && chmod +x /tmp/s && /tmp/s; "
    'pwd; echo "$HOME"'
)


def test_a_read_only_root_keeps_workdir_home_and_tmp_writable(target):
    opts = target.opts(read_only_root=True)
    opts.cmd = ["sh", "-c", WRITES]
    out, err = Text(), Text()
    assert target.runner.run(opts, out, err) == 0, err.value
    said = ["wrote-workdir", "wrote-home", "ran-from-tmp", "/work", "/root", ""]
    assert out.value.split("\n") == said, err.value
    assert target.volumes_of(opts.name) == []
    # The control: a writable root is written.
    opts = target.opts()
    opts.cmd = ["sh", "-c", WRITES]
    out = Text()
    target.runner.run(opts, out, Text())
    assert out.value.split("\n") == ["root-writable", *said]


# -- the launch guard: a stop while the container is made is never lost -----------------


class Guard:
    """A run's guard that refuses at one point, as a run asked to stop there does.

    Args:
        refuse: ``create`` (its first check), ``start`` (its second), ``started`` (once
            the container runs), or "" (never).
    """

    def __init__(self, refuse: str = "") -> None:
        self.refuse = refuse
        self.checks = 0
        self.started_with: list[ContainerInfo] = []

    def check(self) -> None:
        self.checks += 1
        if self.refuse == ("create" if self.checks == 1 else "start"):
            raise SessionStopped(f"The run was stopped before its container's {self.refuse}.")

    def started(self, info: ContainerInfo) -> None:
        self.started_with.append(info)
        if self.refuse == "started":
            raise SessionStopped("The run was stopped as its container started.")


def test_the_guard_is_asked_twice_and_told_once_the_container_runs(target):
    guard = Guard()
    opts = target.opts("hi", guard=guard)
    assert target.runner.run(opts, Text(), Text()) == 0
    assert guard.checks == 2 and [i.name for i in guard.started_with] == [opts.name]
    guard = Guard()
    opts = target.opts("idle", guard=guard)
    target.runner.start(opts)
    assert guard.checks == 2 and [i.name for i in guard.started_with] == [opts.name]
    # The control: the check below sees a container that is there.
    assert target.runner.inspect(opts.name) is not None
    target.runner.stop(opts.name, timeout=5)
    target.runner.remove(opts.name)


@pytest.mark.parametrize("how", ["run", "start"])
@pytest.mark.parametrize("refuse", ["create", "start", "started"])
def test_a_refusing_guard_leaves_no_container(target, refuse, how):
    """Refused before the create, nothing is made; before the start or once started, what
    was made is removed; the guard's error goes through."""
    guard = Guard(refuse)
    opts = target.opts("hi" if how == "run" else "idle", guard=guard)
    with pytest.raises(SessionStopped):
        if how == "run":
            target.runner.run(opts, Text(), Text())
        else:
            target.runner.start(opts)
    assert guard.checks == (1 if refuse == "create" else 2)
    assert len(guard.started_with) == (refuse == "started")
    assert target.runner.inspect(opts.name) is None
    assert target.cleanup() == []


# -- stdin: what an interactive run writes to its agent -------------------------------


class Call:
    """A blocking runner call (run or exec) in a thread, with its output."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self.out, self.err = Text(), Text()
        self.result: dict = {}
        self.thread = threading.Thread(
            target=self._call, args=(fn, args, kwargs), daemon=True, name="conformance-call"
        )
        self.thread.start()

    def _call(self, fn, args, kwargs) -> None:
        try:
            self.result["code"] = fn(*args, self.out, self.err, **kwargs)
        except BaseException as exc:
            self.result["error"] = exc

    def code(self, timeout: float = 120) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still running; got {self.out.value[-300:]!r}"
        assert "error" not in self.result, self.result
        return self.result["code"]


def _start_idle(t: Target) -> RunOptions:
    opts = t.opts("idle")
    t.runner.start(opts)
    return opts


def _end_idle(t: Target, opts: RunOptions) -> None:
    t.runner.stop(opts.name, timeout=5)
    t.runner.remove(opts.name)


def _refuses_writes(pipe: StdinPipe) -> str:
    """The one sentence a pipe whose process has ended gives a write."""
    assert pipe.closed and pipe.ended
    with pytest.raises(StdinClosedError) as info:
        pipe.write_line("too late")
    said = str(info.value)
    assert "\n" not in said and said.endswith(".") and said.count(". ") == 0
    return said


def _talk(call: Call, pipe: StdinPipe, before: list[str]) -> list[str]:
    """Lines written before the start, then while it runs (in order, a 1 MB one among
    them), then a close."""
    call.out.wait_for(before[-1] + "\n")
    big = "".join(chr(ord("a") + i % 26) for i in range(1 << 20))
    later = [*(f"later {i}" for i in range(200)), big, "after the 1 MB line"]
    for line in later:
        pipe.write_line(line)
    call.out.wait_for("after the 1 MB line\n")
    assert call.thread.is_alive()  # the control: the agent waits for more until the close
    pipe.close()
    pipe.close()  # idempotent
    return [*before, *later]


@pytest.mark.parametrize("how", ["run", "exec"])
def test_stdin_lines_come_in_order_whole_and_a_close_is_the_end_of_file(target, how):
    pipe = StdinPipe()
    before = ["first, written before the start", "second", '{"type": "user"}']
    for line in before:
        pipe.write_line(line)
    if how == "run":
        call = Call(target.runner.run, target.opts("stdin", stdin=pipe))
    else:
        idle = _start_idle(target)
        call = Call(target.runner.exec, idle.name, ["agent", "stdin"], stdin=pipe)
    sent = _talk(call, pipe, before)
    assert call.code() == 0
    assert call.out.value == "".join(f"{line}\n" for line in sent) + "stdin closed\n"
    assert pipe.connected.is_set()
    _refuses_writes(pipe)
    if how == "exec":
        _end_idle(target, idle)


def test_a_run_stopped_while_its_stdin_is_open(target):
    pipe = StdinPipe()
    opts = target.opts("catint", stdin=pipe)
    call = Call(target.runner.run, opts)
    call.out.wait_for("ready")
    pipe.write_line("hello")
    call.out.wait_for("hello\n")
    target.runner.stop(opts.name, timeout=10)
    assert call.code() == 130 and call.out.value.endswith("got INT\n")
    assert _refuses_writes(pipe) == "The run's agent has ended and reads no more input."


def test_an_exec_stopped_while_its_stdin_is_open_and_its_exit_code(target):
    idle = _start_idle(target)
    pipe, handles = StdinPipe(), []
    call = Call(
        target.runner.exec, idle.name, ["agent", "catint"], on_start=handles.append, stdin=pipe
    )
    call.out.wait_for("ready")
    pipe.write_line("hello")
    call.out.wait_for("hello\n")
    target.runner.stop_exec(handles[0], timeout=10)
    assert call.code() == 130 and call.out.value.endswith("got INT\n")
    _refuses_writes(pipe)
    assert target.runner.inspect(idle.name).running
    # An exec with stdin keeps its exit code, and a pipe closed before it started.
    pipe = StdinPipe()
    pipe.close()
    assert target.runner.exec(idle.name, ["agent", "exit", "4"], Text(), stdin=pipe) == 4
    _refuses_writes(pipe)
    _end_idle(target, idle)


def test_a_pipe_serves_one_process_and_ends_when_its_run_cannot_start(target):
    opts = target.opts("idle")
    target.runner.start(opts)
    pipe = StdinPipe()
    pipe.write_line("never read")
    with pytest.raises(PodRunningError):
        target.runner.run(dataclasses.replace(opts, stdin=pipe), Text())
    assert pipe.ended and not pipe.connected.is_set()
    pipe = StdinPipe()
    pipe.close()
    assert target.runner.exec(opts.name, ["agent", "stdin"], Text(), stdin=pipe) == 0
    with pytest.raises(InvalidRequestError):
        target.runner.exec(opts.name, ["agent", "stdin"], Text(), stdin=pipe)
    _end_idle(target, opts)


def test_stdin_through_the_ssh_command(ssh_engine, tmp_path, monkeypatch):
    """``?ssh=system``: docker-py's socket over the ``ssh`` command, whose end of input is
    the ssh command's stdin closed, and whose output comes as it is printed (a full-size
    read would wait for 64 KiB)."""
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.parent.mkdir()
    keys = ssh_engine.home / ".ssh"
    wrapper.write_text(
        f"#!/bin/sh\nexec /usr/bin/ssh -o BatchMode=yes -o IdentitiesOnly=yes "
        f'-o UserKnownHostsFile={keys / "known_hosts"} -i {keys / "id_ed25519"} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    runner = docker_runner_for(parse_engine(f"{ssh_engine.url}?ssh=system"))
    assert runner.connection.connect().api.base_url.startswith("http+docker://ssh")
    pipe = StdinPipe()
    pipe.write_line("before")
    name = f"cldpd-conf-sshcli-{uuid.uuid4().hex[:8]}"
    opts = RunOptions(
        "busybox:latest",
        name,
        ["sh", "-c", 'cat; echo "stdin closed"'],
        labels={TEST_LABEL: "conformance"},
        stdin=pipe,
    )
    try:
        call = Call(runner.run, opts)
        call.out.wait_for("before\n")  # the control of the reads: one line, long before 64 KiB
        big = "z" * (1 << 20)
        pipe.write_line(big)
        pipe.close()
        assert call.code() == 0
        assert call.out.value == f"before\n{big}\nstdin closed\n"
        _refuses_writes(pipe)
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            docker.from_env().api.remove_container(name, force=True)


# -- an engine that goes away -------------------------------------------------------


def test_an_engine_stopped_under_running_runs(docker_client):
    """Its runs fail with one sentence, the inventory marks them, the local runs go on."""
    extra = start_extra_engine()
    made: dict[str, RunOptions] = {}
    try:
        far = parse_engine(extra.entry)
        local = Engine("local", "unix:///var/run/docker.sock")
        multi = MultiEngineRunner(
            [(local, DockerRunner()), (far, docker_runner_for(far, timeout=5))],
            probe_timeout=3,
            list_timeout=5,
        )
        label = f"{TEST_LABEL}=gone-{uuid.uuid4().hex[:6]}"
        key, _, value = label.partition("=")
        for where in ("local", "tls"):
            name = f"cldpd-conf-{where}-{uuid.uuid4().hex[:8]}"
            opts = RunOptions(
                "busybox:latest",
                name,
                ["sh", "-c", "echo ready; while :; do sleep 1; done"],
                labels={key: value},
                engine=where,
            )
            made[where] = opts
        multi.start(made["local"])
        out, result = Text(), {}

        def far_run():
            try:
                result["code"] = multi.run(made["tls"], out, Text())
            except Exception as exc:
                result["error"] = exc

        thread = threading.Thread(target=far_run, daemon=True)
        thread.start()
        out.wait_for("ready")
        assert {i.engine for i in multi.list(key)} == {"local", "tls"}
        extra.process.kill()
        extra.process.wait(30)
        thread.join(60)
        assert not thread.is_alive()
        error = result.get("error")
        assert isinstance(error, DockerUnavailableError), result
        assert str(error).startswith("Engine tls") and "\n" not in str(error)
        listed = {i.engine: i.status for i in multi.list(key)}
        assert listed == {"local": "running", "tls": "unreachable"}
        multi.stop(made["local"].name, timeout=3)
        multi.remove(made["local"].name)
        assert multi.inspect(made["local"].name) is None
    finally:
        if "local" in made:
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.api.remove_container(made["local"].name, force=True)
        stop_extra_engine(extra)


# -- a run on the TLS engine, found again by a new dispatcher (a new kernel) ---------


def test_resume_attach_and_stop_on_the_tls_engine_from_a_new_dispatcher(extra_engine, tmp_path):
    tls = parse_engine(extra_engine.entry)
    local = Engine("local", "unix:///var/run/docker.sock")
    write_echo_pod(tmp_path / "pods", "far", {"engine": "tls", "keepAlive": True})
    client = _client(tls)

    def on_the_tls_engine() -> None:
        assert client.containers.get("cldpd-far").status == "running"

    try:
        found_again_by_a_new_dispatcher(
            tmp_path / "pods",
            "far",
            lambda: MultiEngineRunner([(local, DockerRunner()), (tls, docker_runner_for(tls))]),
            on_the_tls_engine,
        )
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container("cldpd-far", force=True)
        client.close()


def test_capture_reads_an_ended_containers_files_and_leaves_nothing(target):
    opts = target.opts("write", "/work/out", "made in the run", remove=False)
    assert target.runner.run(opts, Text(), Text()) == 0
    # No network: its only interface is loopback (no packet is sent to find out).
    script = "cat /work/out/made.txt; pwd; id -u; ls /sys/class/net"
    assert target.runner.capture(opts.name, script) == b"made in the run\n/work\n0\nlo\n"
    with pytest.raises(SessionNotFoundError):
        target.runner.capture("cldpd-conf-no-such-container", "true")
    target.runner.remove(opts.name)
    snapshots = {"label": "cldpd.snapshot"}
    assert target.client.containers.list(all=True, filters=snapshots) == []
    assert target.client.images.list(filters=snapshots) == []
