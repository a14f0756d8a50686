"""DockerRunner against the real engine: build, run, exec, stop, output fidelity, cleanup."""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path

import docker
import pytest

from cldpd_magic import (
    BuildFailedError,
    ContainerFailedError,
    DockerRunner,
    DockerUnavailableError,
    Mount,
    PodRunningError,
    RunOptions,
    SessionNotFoundError,
)
from cldpd_magic.engines.protocol import ExecHandle, StdinPipe
from cldpd_magic.errors import StdinClosedError
from cldpd_magic.runs.jobs import IDLE_COMMAND
from cldpd_magic.runs.session import SessionStopped

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]

TRAP_INT = """
trap 'echo got INT; exit 130' INT
echo ready
while :; do sleep 1 & wait; done
"""


class Text:
    """A Writer that keeps what it gets and lets a test wait for a piece of it."""

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._cond = threading.Condition()

    def write(self, text: str) -> int:
        with self._cond:
            self._chunks.append(text)
            self._cond.notify_all()
        return len(text)

    @property
    def value(self) -> str:
        with self._cond:
            return "".join(self._chunks)

    def wait_for(self, piece: str, timeout: float = 60) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: piece in "".join(self._chunks), timeout)
        assert ok, f"{piece!r} never came; got {self.value[-500:]!r}"


class Background:
    """Runs a blocking call in a thread and keeps its result or error."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self.result = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 60):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def runner(docker_client) -> DockerRunner:
    return DockerRunner()


@pytest.fixture
def image(runner, make_pod, pods_dir):
    """``image(script="...", **make_pod_kwargs) -> name``: a built pod image ``cldpd-<name>``."""

    def build(script: str = "echo hello", **kwargs) -> str:
        name = make_pod(script, **kwargs)
        runner.build(f"cldpd-{name}", str(pods_dir / name))
        return name

    return build


def opts(name: str, cmd: list[str] | None = None, **kwargs) -> RunOptions:
    return RunOptions(f"cldpd-{name}", f"cldpd-{name}", cmd or ["claude"], **kwargs)


def run(runner: DockerRunner, name: str, cmd: list[str] | None = None, **kwargs):
    out, err = Text(), Text()
    code = runner.run(opts(name, cmd, **kwargs), out, err)
    return code, out.value, err.value


def test_preflight(runner):
    runner.preflight()


def test_preflight_without_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(DockerUnavailableError, match="DOCKER_HOST") as info:
        DockerRunner().preflight()
    assert "\n" not in str(info.value)
    assert str(info.value) == (
        f"Docker is not reachable at unix://{tmp_path}/no-docker.sock (no socket there); "
        "start the Docker engine or set DOCKER_HOST."
    )


def test_preflight_with_a_refusing_engine(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")
    with pytest.raises(DockerUnavailableError, match=r"at tcp://127\.0\.0\.1:1 \(the connection"):
        DockerRunner().preflight()


def test_build_streams_lines(runner, make_pod, pods_dir):
    token = uuid.uuid4().hex  # a step the engine has never cached, so it runs and prints
    name = make_pod(dockerfile=f"FROM busybox:latest\nRUN echo build-says-$((6 * 7)) {token}\n")
    lines: list[str] = []
    runner.build(f"cldpd-{name}", str(pods_dir / name), on_output=lines.append)
    assert any(re.fullmatch(r"Step 1/\d+ : FROM busybox:latest", line) for line in lines)
    assert f"build-says-42 {token}" in lines
    assert not any("\n" in line for line in lines)


def test_build_args_reach_the_build(runner, make_pod, pods_dir):
    token = uuid.uuid4().hex
    name = make_pod(
        dockerfile=f"FROM busybox:latest\nARG FLAVOUR\nRUN echo flavour=$FLAVOUR {token}\n"
    )
    lines: list[str] = []
    runner.build(f"cldpd-{name}", str(pods_dir / name), {"FLAVOUR": "mint"}, lines.append)
    assert f"flavour=mint {token}" in lines


def test_build_failure_carries_the_log_tail(runner, make_pod, pods_dir):
    name = make_pod(dockerfile="FROM busybox:latest\nRUN echo about-to-fail && exit 3\n")
    lines: list[str] = []
    with pytest.raises(BuildFailedError, match=f"cldpd-{name}") as info:
        runner.build(f"cldpd-{name}", str(pods_dir / name), on_output=lines.append)
    assert "about-to-fail" in info.value.log_tail.splitlines()
    assert "about-to-fail" in lines


@pytest.mark.parametrize("dockerignore", [None, "!pod.json\n"])
def test_pod_json_is_not_in_the_build_context(runner, make_pod, pods_dir, dockerignore):
    name = make_pod(
        pod_json={"env": {"A": "b"}},
        template="orders",
        dockerfile="FROM busybox:latest\nCOPY template.md /t\n",
    )
    if dockerignore is not None:
        (pods_dir / name / ".dockerignore").write_text(dockerignore)
    runner.build(f"cldpd-{name}", str(pods_dir / name))
    (pods_dir / name / "Dockerfile").write_text("FROM busybox:latest\nCOPY pod.json /x\n")
    with pytest.raises(BuildFailedError, match=r"pod\.json"):
        runner.build(f"cldpd-{name}", str(pods_dir / name))


def test_output_stderr_and_exit_code(runner, image):
    name = image("echo out1; echo err1 >&2; echo out2; exit 3")
    assert run(runner, name) == (3, "out1\nout2\n", "err1\n")
    assert runner.inspect(f"cldpd-{name}") is None


def test_env_and_inherited_env(runner, image, monkeypatch):
    name = image()
    monkeypatch.setenv("HOST_VISIBLE", "from the host")
    monkeypatch.delenv("HOST_MISSING", raising=False)
    code, out, _ = run(
        runner,
        name,
        ["sh", "-c", 'echo "$MODE|$HOST_VISIBLE|${HOST_MISSING-unset}"'],
        env={"MODE": "fast"},
        inherit_env=["HOST_VISIBLE", "HOST_MISSING"],
    )
    assert (code, out) == (0, "fast|from the host|unset\n")


def test_read_only_and_writable_mounts(runner, image, tmp_path):
    name = image()
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello.txt").write_text("hello from the host\n")
    script = "cat /data/hello.txt; touch /data/new 2>/dev/null && echo wrote || echo read-only"
    ro = Mount(str(data), "/data", read_only=True)
    assert (
        run(runner, name, ["sh", "-c", script], mounts=[ro])[1]
        == "hello from the host\nread-only\n"
    )
    assert not (data / "new").exists()
    rw = Mount(str(data), "/data")
    assert run(runner, name, ["sh", "-c", script], mounts=[rw])[1] == "hello from the host\nwrote\n"
    assert (data / "new").exists()


def test_workdir(runner, image):
    name = image()
    assert run(runner, name, ["pwd"], workdir="/srv/agent")[:2] == (0, "/srv/agent\n")
    assert run(runner, name, ["pwd"])[:2] == (0, "/\n")


def test_network_none_host_and_named(runner, image, docker_client):
    name = image()
    show = ["sh", "-c", "ls /sys/class/net | sort | tr '\\n' ' '"]
    assert run(runner, name, show, network="none")[:2] == (0, "lo ")
    # Other containers' veth interfaces come and go on the host meanwhile: compare the rest.
    host = sorted(p.name for p in Path("/sys/class/net").iterdir() if "veth" not in p.name)
    seen = [n for n in run(runner, name, show, network="host")[1].split() if "veth" not in n]
    assert seen == host
    net = docker_client.networks.create(f"cldpd-test-{name}", labels={"cldpd.test": "1"})
    try:
        code, out, _ = run(runner, name, show, network=net.name)
        assert code == 0 and "eth0" in out.split()
    finally:
        net.remove()


def test_missing_network_is_one_sentence(runner, image):
    name = image()
    with pytest.raises(ContainerFailedError, match="network 'no-such-net' does not exist") as info:
        runner.run(opts(name, network="no-such-net"), Text())
    assert "\n" not in str(info.value)
    assert runner.inspect(f"cldpd-{name}") is None


def test_labels_and_list(runner, image):
    name = image(TRAP_INT)
    label = f"cldpd.test-{name}"
    info = runner.start(opts(name, labels={label: "yes", "cldpd.pod": name}))
    try:
        assert info.running and info.name == f"cldpd-{name}"
        (listed,) = runner.list(label)
        assert (listed.name, listed.status, listed.labels[label]) == (info.name, "running", "yes")
        assert listed.image == f"cldpd-{name}" and listed.started_at
        assert runner.list(f"{label}=no") == []
        with pytest.raises(PodRunningError):
            runner.start(opts(name))
    finally:
        runner.stop(info.name, 5)
        runner.remove(info.name)
    assert runner.inspect(info.name) is None and runner.list(label) == []


def test_a_container_that_cannot_start_is_removed(runner, image, tmp_path):
    name = image()
    with pytest.raises(ContainerFailedError, match=f"cldpd-{name}"):
        runner.run(opts(name, mounts=[Mount(str(tmp_path), "/etc/passwd")]), Text())
    assert runner.inspect(f"cldpd-{name}") is None
    with pytest.raises(ContainerFailedError):
        runner.start(opts(name, mounts=[Mount(str(tmp_path), "/etc/passwd")]))
    assert runner.inspect(f"cldpd-{name}") is None
    with pytest.raises(ContainerFailedError):
        runner.run(opts(name, workdir="/etc/passwd/sub"), Text())
    assert runner.inspect(f"cldpd-{name}") is None


def test_command_not_found_is_exit_127_and_removed(runner, image):
    name = image()
    code, out, err = run(runner, name, ["no-such-agent"])
    assert (code, out) == (127, "")
    assert "no-such-agent" in err
    assert runner.inspect(f"cldpd-{name}") is None


def test_fast_exits_lose_no_output(runner, image):
    name = image("echo a; echo b")
    for _ in range(20):
        assert run(runner, name) == (0, "a\nb\n", "")
    for _ in range(5):
        assert run(runner, name, ["sh", "-c", "echo a; echo b >&2; exit 9"]) == (9, "a\n", "b\n")


def test_a_5mb_line_arrives_intact(runner, image):
    name = image("head -c 5000000 /dev/zero | tr '\\0' x; echo; echo after")
    code, out, _ = run(runner, name)
    assert code == 0
    assert out == "x" * 5_000_000 + "\nafter\n"


def test_utf8_split_across_frames_is_decoded(runner, image):
    name = image("i=0; while [ $i -lt 3000 ]; do printf 'é€😀'; i=$((i+1)); done; echo")
    code, out, _ = run(runner, name)
    assert (code, out) == (0, "é€😀" * 3000 + "\n")


def test_a_trickle_of_lines_is_taken_a_few_lines_at_a_time(runner, image):
    # An agent printing line by line: each line is a frame, but the reader takes what
    # follows a small read for a moment, so its writer is called far less than per line.
    name = image("i=0; while [ $i -lt 60 ]; do echo line$i; i=$((i+1)); sleep 0.01; done")
    writes: list[str] = []
    counting = type("Counting", (), {"write": lambda self, text: writes.append(text)})()
    assert runner.run(opts(name), counting) == 0
    assert "".join(writes) == "".join(f"line{i}\n" for i in range(60))
    assert len(writes) <= 30, len(writes)  # a write a line without the wait: 60


def test_stop_is_graceful_and_idempotent(runner, image):
    name = image(TRAP_INT)
    out = Text()
    running = Background(runner.run, opts(name), out)
    out.wait_for("ready\n")
    runner.stop(f"cldpd-{name}", 10)
    assert running.join() == 130
    assert out.value == "ready\ngot INT\n"
    runner.stop(f"cldpd-{name}", 10)
    runner.stop("cldpd-no-such-container", 1)
    assert runner.inspect(f"cldpd-{name}") is None


def test_stop_kills_an_agent_that_ignores_signals(runner, image):
    name = image("trap '' INT TERM; echo ready; while :; do sleep 1; done")
    out = Text()
    running = Background(runner.run, opts(name), out)
    out.wait_for("ready\n")
    runner.stop(f"cldpd-{name}", 1)
    assert running.join() == 137


def test_exec_and_stop_exec_leave_the_container_running(runner, image):
    name = image(TRAP_INT)
    container = f"cldpd-{name}"
    runner.start(opts(name, IDLE_COMMAND))
    try:
        out, err = Text(), Text()
        cmd = ["sh", "-c", 'echo "in exec: $1"; echo warn >&2; exit 4', "sh", "a b"]
        assert runner.exec(container, cmd, out, err) == 4
        assert (out.value, err.value) == ("in exec: a b\n", "warn\n")
        handles: list[ExecHandle] = []
        out = Text()
        execing = Background(runner.exec, container, ["claude"], out, None, handles.append)
        out.wait_for("ready\n")
        runner.stop_exec(handles[0], 10)
        assert execing.join() == 130
        assert out.value == "ready\ngot INT\n"
        assert runner.inspect(container).running
    finally:
        runner.stop(container, 5)
        runner.remove(container)


def test_exec_with_nothing_running(runner, image):
    name = image()
    with pytest.raises(SessionNotFoundError):
        runner.exec(f"cldpd-{name}", ["true"], Text())
    runner.start(opts(name, ["true"]))
    try:
        deadline = time.monotonic() + 30
        while runner.inspect(f"cldpd-{name}").running and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(SessionNotFoundError):
            runner.exec(f"cldpd-{name}", ["true"], Text())
    finally:
        runner.remove(f"cldpd-{name}")


def test_logs_replay_from_the_start(runner, image):
    name = image("echo first; while [ ! -f /tmp/go ]; do sleep 0.1; done; echo last; exit 6")
    container = f"cldpd-{name}"
    runner.start(opts(name))
    try:
        out = Text()
        following = Background(runner.logs, container, out)
        out.wait_for("first\n")
        runner.exec(container, ["touch", "/tmp/go"], Text())
        assert following.join() == 6
        assert out.value == "first\nlast\n"
    finally:
        runner.remove(container)
    with pytest.raises(SessionNotFoundError):
        runner.logs(container, Text())


def test_cancelled_build_returns_promptly_and_leaves_no_container(
    runner, make_pod, pods_dir, build_containers
):
    marker = f"marker-{uuid.uuid4().hex[:8]}"
    name = make_pod(dockerfile=f"FROM busybox:latest\nRUN echo {marker}-$((6 * 7)) && sleep 30\n")
    cancel = threading.Event()

    def on_output(line: str) -> None:
        if line == f"{marker}-42":
            cancel.set()

    started = time.monotonic()
    with pytest.raises(BuildFailedError, match="stopped"):
        runner.build(f"cldpd-{name}", str(pods_dir / name), on_output=on_output, cancel=cancel)
    assert time.monotonic() - started < 25
    assert build_containers(marker) == []
    assert Path(pods_dir / name).is_dir()


def test_an_engine_that_stops_answering_is_one_sentence(tmp_path):
    gone = DockerRunner(
        docker.DockerClient(base_url=f"unix://{tmp_path}/gone.sock", version="1.41")
    )
    for call in (lambda: gone.list("cldpd.pod"), lambda: gone.stop("cldpd-x")):
        with pytest.raises(DockerUnavailableError, match="Docker") as info:
            call()
        assert "\n" not in str(info.value)


# -- stdin ------------------------------------------------------------------------


def test_a_run_with_stdin_opens_it_once_and_one_without_keeps_it_shut(runner, image, docker_client):
    """StdinOnce: the engine closes the container's stdin when the attach's input ends."""
    name = image("cat; echo done")
    configs = []

    def on_start(info) -> None:
        config = docker_client.api.inspect_container(info.id)["Config"]
        configs.append((config["OpenStdin"], config["StdinOnce"], config["AttachStdin"]))

    pipe = StdinPipe()
    pipe.write_line("in")
    pipe.close()
    out = Text()
    assert runner.run(opts(name, stdin=pipe), out, on_start=on_start) == 0
    assert out.value == "in\ndone\n"
    out = Text()
    assert runner.run(opts(name), out, on_start=on_start) == 0
    assert out.value == "done\n"
    assert configs == [(True, True, True), (False, False, False)]


def test_an_agent_that_never_reads_its_stdin_ends_and_no_writer_waits(runner, image):
    """The output is read while the stdin is written: 8 MB written to an agent that reads
    none of it and prints 20,000 lines never blocks either side; its end ends the pipe."""
    name = image('i=0; while [ "$i" -lt 20000 ]; do echo "line $i"; i=$((i + 1)); done')
    pipe = StdinPipe()
    line = "y" * 8192
    for _ in range(512):
        pipe.write_line(line)
    out = Text()
    running = Background(runner.run, opts(name, stdin=pipe), out)
    for _ in range(512):
        try:
            pipe.write_line(line)
        except StdinClosedError:
            break
    assert running.join(120) == 0
    assert out.value.splitlines() == [f"line {i}" for i in range(20000)]
    assert pipe.ended
    with pytest.raises(StdinClosedError):
        pipe.write_line("too late")


def test_a_guard_refusing_a_run_with_stdin_leaves_nothing_and_ends_the_pipe(runner, image):
    from test_runner_conformance import Guard

    name = image("cat")
    for refuse in ("create", "start", "started"):
        pipe = StdinPipe()
        pipe.write_line("never read")
        with pytest.raises(SessionStopped):
            runner.run(opts(name, stdin=pipe, guard=Guard(refuse)), Text())
        assert pipe.ended and not pipe.connected.is_set()
        assert runner.inspect(f"cldpd-{name}") is None
