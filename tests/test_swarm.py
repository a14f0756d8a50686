"""What is the Swarm runner's own, on a one-node swarm of a second dockerd.

The Runner contract itself (exit codes, streams, line fidelity, labels, stop, exec, logs)
is checked by test_runner_conformance.py on a swarm too. Here: a run is a replicated job,
the service's own log when a node names no endpoint, an exec into the task's container,
secrets kept out of the service spec, resources as reservations and limits, ``swarm://``
entries in the engines setting, a batch of eight, a keepAlive run found again by a new
dispatcher, and a two-node swarm (a third dockerd joined as a worker on 127.0.0.2) whose
runs are built, exec'd and stopped through the worker's endpoint label.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker.errors
import pytest
from engines_util import (
    TEST_LABEL,
    ExtraEngine,
    found_again_by_a_new_dispatcher,
    free_port,
    init_swarm,
    start_extra_engine,
    start_registry,
    stop_extra_engine,
    stop_registry,
    write_echo_pod,
)
from test_runner_conformance import Text, agent_context

from cldpd_magic.engines.docker.runner import DockerRunner
from cldpd_magic.engines.multi import MultiEngineRunner
from cldpd_magic.engines.protocol import ContainerInfo, ExecHandle, RunOptions, StdinPipe
from cldpd_magic.engines.setting import parse_engine
from cldpd_magic.engines.swarm.runner import LABEL_SECRET_OF, SwarmRunner
from cldpd_magic.errors import (
    BuildFailedError,
    ContainerFailedError,
    DockerUnavailableError,
    PodConfigError,
    SessionNotFoundError,
    StdinClosedError,
)
from cldpd_magic.pods import Resources

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]


@dataclass
class Swarm:
    """A one-node swarm, its runner, and the image of the stand-in agent."""

    engine: ExtraEngine
    runner: SwarmRunner
    image: str = ""
    made: list[str] = field(default_factory=list)

    @property
    def api(self) -> docker.APIClient:
        return self.runner.manager.connection.control()

    @property
    def entry(self) -> str:
        return f"swarm://{self.engine.url}?tls={self.engine.certs}&name=swarm"

    def opts(self, *args: str, **kwargs) -> RunOptions:
        name = f"cldpd-swarm-{uuid.uuid4().hex[:10]}"
        self.made.append(name)
        labels = {TEST_LABEL: "swarm", "cldpd.run": name, **kwargs.pop("labels", {})}
        return RunOptions(self.image, name, ["agent", *args], labels=labels, **kwargs)

    def cleanup(self) -> list[str]:
        leaked = []
        for name in self.made:
            with contextlib.suppress(docker.errors.NotFound):
                self.api.remove_service(name)
                leaked.append(name)
        self.made.clear()
        return leaked


@pytest.fixture(scope="module")
def swarm(docker_client, tmp_path_factory) -> Iterator[Swarm]:
    engine = start_extra_engine()
    try:
        init_swarm(engine)
        manager = DockerRunner(base_url=engine.url, tls=engine.tls_files())
        s = Swarm(engine, SwarmRunner(manager))
        context = agent_context(tmp_path_factory.mktemp("swarm-agent"))
        s.image = f"cldpd-swarm-agent:{uuid.uuid4().hex[:8]}"
        s.runner.build(s.image, str(context))
        yield s
        s.cleanup()
        with contextlib.suppress(docker.errors.APIError):
            s.api.leave_swarm(force=True)
    finally:
        stop_extra_engine(engine)


@pytest.fixture(autouse=True)
def _no_leftovers(request) -> Iterator[None]:
    yield
    if "swarm" in request.fixturenames:
        s = request.getfixturevalue("swarm")
        leaked = s.cleanup()
        assert not leaked, f"services left behind: {leaked}"


def run(s: Swarm, *args: str, **kwargs) -> tuple[int, str, str, RunOptions]:
    out, err = Text(), Text()
    opts = s.opts(*args, **kwargs)
    return s.runner.run(opts, out, err), out.value, err.value, opts


def test_a_run_is_a_replicated_job_removed_at_its_end(swarm):
    started: list[ContainerInfo] = []
    opts = swarm.opts("hi")
    specs = []

    def on_start(info: ContainerInfo) -> None:
        started.append(info)
        specs.append(swarm.api.inspect_service(info.id)["Spec"])

    assert swarm.runner.run(opts, Text(), Text(), on_start=on_start) == 0
    assert [i.name for i in started] == [opts.name]
    assert "ReplicatedJob" in specs[0]["Mode"]
    assert specs[0]["Labels"]["cldpd.run"] == opts.name
    assert swarm.runner.inspect(opts.name) is None
    # The node would keep the task's container: the removal took it.
    assert swarm.api.containers(all=True, filters={"label": f"cldpd.run={opts.name}"}) == []


def _no_endpoint(node_id: str) -> None:
    raise DockerUnavailableError(f"Swarm node {node_id[:12]} has no cldpd.endpoint label.")


def test_without_a_node_endpoint_the_services_log_carries_the_run(swarm, monkeypatch):
    """The swarm's own log path: every line in order, streams apart, the task's exit code."""
    monkeypatch.setattr(swarm.runner.nodes, "runner_of", _no_endpoint)
    code, out, err, _ = run(swarm, "split")
    assert (code, out, err) == (0, "out-1\nout-2\n", "err-1\nerr-2\n")
    code, out, _, _ = run(swarm, "lines", "20000")
    assert code == 0 and out.splitlines() == [f"line {i}" for i in range(1, 20001)]
    code, out, _, _ = run(swarm, "exit", "3")
    assert (code, out) == (3, "leaving with 3\n")


def test_exec_runs_in_the_task_container_and_stop_exec_ends_it(swarm):
    opts = swarm.opts("idle")
    swarm.runner.start(opts)
    with pytest.raises(SessionNotFoundError):
        swarm.runner.exec(f"{opts.name}-none", ["true"], Text())
    _wait_running(swarm, opts.name)
    out, err, handles = Text(), Text(), []
    code = swarm.runner.exec(opts.name, ["agent", "split"], out, err, on_start=handles.append)
    assert (code, out.value, err.value) == (0, "out-1\nout-2\n", "err-1\nerr-2\n")
    assert isinstance(handles[0], ExecHandle)
    trap, result, handles = Text(), {}, []
    thread = threading.Thread(
        target=lambda: result.update(
            code=swarm.runner.exec(opts.name, ["agent", "trap"], trap, on_start=handles.append)
        ),
        daemon=True,
    )
    thread.start()
    trap.wait_for("ready")
    swarm.runner.stop_exec(handles[0], timeout=10)
    thread.join(30)
    assert result["code"] == 130 and swarm.runner.inspect(opts.name).running
    swarm.runner.stop(opts.name, timeout=5)
    with pytest.raises(SessionNotFoundError):
        swarm.runner.exec(opts.name, ["true"], Text())
    swarm.runner.remove(opts.name)


def _wait_running(s: Swarm, name: str) -> None:
    probe = Text()
    # The task runs once the agent answers an exec; until then exec says it is not running.
    for _ in range(600):
        with contextlib.suppress(SessionNotFoundError):
            s.runner.exec(name, ["true"], probe)
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"{name} never ran")


def test_secrets_reach_the_agent_but_no_service_spec(swarm, monkeypatch):
    token = f"tok-{uuid.uuid4().hex}"
    forwarded = f"fwd-{uuid.uuid4().hex}"
    monkeypatch.setenv("CLDPD_SWARM_FORWARDED", forwarded)
    opts = swarm.opts(
        env={"API_TOKEN": token, "PLAIN": "visible"}, inherit_env=["CLDPD_SWARM_FORWARDED"]
    )
    opts.cmd = ["sh", "-c", 'echo "$API_TOKEN $CLDPD_SWARM_FORWARDED $PLAIN"']
    opts.remove = False
    out = Text()
    assert swarm.runner.run(opts, out, Text()) == 0
    assert out.value == f"{token} {forwarded} visible\n"
    cli = subprocess.run(
        ["docker", *swarm.engine.cli_args(), "service", "inspect", opts.name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = json.dumps(swarm.api.inspect_service(opts.name))
    for text in (cli, spec, repr(swarm.runner.inspect(opts.name))):
        assert token not in text and forwarded not in text
    assert "PLAIN=visible" in spec
    secrets = swarm.api.secrets(filters={"label": f"{LABEL_SECRET_OF}={opts.name}"})
    assert len(secrets) == 2
    swarm.runner.remove(opts.name)
    assert swarm.api.secrets(filters={"label": f"{LABEL_SECRET_OF}={opts.name}"}) == []


def test_a_run_with_stdin_needs_every_nodes_endpoint(swarm, monkeypatch):
    monkeypatch.setattr(swarm.runner.nodes, "runner_of", _no_endpoint)
    pipe = StdinPipe()
    pipe.write_line("never read")
    opts = swarm.opts("stdin", stdin=pipe)
    with pytest.raises(ContainerFailedError) as refused:
        swarm.runner.run(opts, Text(), Text())
    said = str(refused.value)
    assert said.startswith(f"{opts.name} reads its stdin") and "\n" not in said
    assert "cldpd.endpoint" in said and swarm.runner.inspect(opts.name) is None
    with pytest.raises(StdinClosedError):
        pipe.write_line("refused: its run is over")


#: Prints the agent's secret and its parent (the init that stop signals), reads its stdin,
#: then tells whether the FIFO's name was left in /tmp.
STDIN_AGENT = (
    'echo "$API_TOKEN"; grep PPid /proc/$$/status; cat; '
    "ls /tmp/.cldpd-stdin-* 2>/dev/null || echo no-fifo-left"
)


def test_stdin_with_secrets_and_a_read_only_root_reaches_the_tasks_own_process(swarm):
    """The gate's filter and FIFO under the secrets' wrapper, on a read-only root (the
    FIFO is made in /tmp, a volume there): the agent is the child of the task's init, so
    stop's signals reach it, and the end-of-input line itself is never read."""
    token = f"tok-{uuid.uuid4().hex}"
    pipe = StdinPipe()
    lines = ["  keeps its spaces  ", "a \\ backslash", '{"json": "line"}', "é"]
    for line in lines:
        pipe.write_line(line)
    pipe.close()
    opts = swarm.opts(env={"API_TOKEN": token}, read_only_root=True, stdin=pipe)
    opts.cmd = ["sh", "-c", STDIN_AGENT]
    out = Text()
    assert swarm.runner.run(opts, out, Text()) == 0
    assert out.value.splitlines() == [token, "PPid:\t1", *lines, "no-fifo-left"]
    # The control: without stdin the agent's stdin is empty, as a plain container's.
    opts = swarm.opts(env={"API_TOKEN": token}, read_only_root=True)
    opts.cmd = ["sh", "-c", STDIN_AGENT]
    out = Text()
    assert swarm.runner.run(opts, out, Text()) == 0
    assert out.value.splitlines() == [token, "PPid:\t1", "no-fifo-left"]


def test_resources_become_reservations_and_limits(swarm):
    opts = swarm.opts("idle", resources=Resources(cpus=0.5, memory=64 << 20, pids=100))
    swarm.runner.start(opts)
    resources = swarm.api.inspect_service(opts.name)["Spec"]["TaskTemplate"]["Resources"]
    assert resources["Limits"] == {"NanoCPUs": 500_000_000, "MemoryBytes": 64 << 20, "Pids": 100}
    assert resources["Reservations"] == {"NanoCPUs": 500_000_000, "MemoryBytes": 64 << 20}
    swarm.runner.stop(opts.name, timeout=5)
    swarm.runner.remove(opts.name)


def test_an_image_the_nodes_lack_fails_in_one_sentence(swarm):
    opts = swarm.opts("hi")
    opts.image = f"cldpd-swarm-absent:{uuid.uuid4().hex[:8]}"
    with pytest.raises(ContainerFailedError) as caught:
        swarm.runner.run(opts, Text(), Text())
    assert opts.name in str(caught.value) and "\n" not in str(caught.value)
    assert swarm.runner.inspect(opts.name) is None


def test_with_a_registry_the_image_is_pushed_and_the_tasks_pull_it(swarm, tmp_path):
    if not Path("/usr/bin/docker-registry").exists():
        message = "the registry test needs Debian's docker-registry (scripts/setup --browser)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    registry = start_registry()
    try:
        runner = SwarmRunner(swarm.runner.manager, registry=registry.address)
        context = agent_context(tmp_path / "agent")
        version = uuid.uuid4().hex[:8]
        said: list[str] = []
        runner.build(f"cldpd-swarm-pushed:{version}", str(context), on_output=said.append)
        assert registry.tags("cldpd-swarm-pushed") == [version]
        assert any(line.startswith("Step 1/") for line in said)
        opts = swarm.opts("split")
        opts.image = f"cldpd-swarm-pushed:{version}"
        opts.remove = False
        out = Text()
        assert runner.run(opts, out, Text()) == 0 and out.value == "out-1\nout-2\n"
        image = swarm.api.inspect_service(opts.name)["Spec"]["TaskTemplate"]["ContainerSpec"]
        assert image["Image"].startswith(f"{registry.address}/cldpd-swarm-pushed")
        assert runner.inspect(opts.name).image == opts.image
        runner.remove(opts.name)
        untagged = swarm.opts("hi")
        untagged.image = "cldpd-swarm-pushed"  # as a pod's default image: no tag
        runner.build(untagged.image, str(context))
        assert "latest" in registry.tags("cldpd-swarm-pushed")
        runner.start(untagged)
        assert runner.inspect(untagged.name).image == "cldpd-swarm-pushed"
        runner.stop(untagged.name, timeout=5)
        runner.remove(untagged.name)
    finally:
        stop_registry(registry)
    with pytest.raises(BuildFailedError) as refused:
        runner.build(f"cldpd-swarm-pushed:{version}", str(context))
    said = str(refused.value)
    assert said.startswith(f"Pushing image cldpd-swarm-pushed:{version} to {registry.address}")
    assert "\n" not in said


def test_preflight_needs_a_swarm_manager(swarm, docker_client):
    swarm.runner.preflight()
    with pytest.raises(DockerUnavailableError, match="not a swarm manager"):
        SwarmRunner(DockerRunner()).preflight()


def test_a_swarm_entry_in_the_engines_setting(swarm):
    engine = parse_engine(swarm.entry)
    assert (engine.name, engine.url, engine.swarm) == ("swarm", swarm.engine.url, True)
    with pytest.raises(PodConfigError, match="swarm://"):
        parse_engine("swarm://")
    multi = MultiEngineRunner.from_settings([swarm.entry])
    assert multi is not None
    opts = swarm.opts("hi", engine="swarm")
    out = Text()
    assert multi.run(opts, out, Text()) == 0 and out.value == "hi\n"


def test_resume_attach_and_stop_on_the_swarm_from_a_new_dispatcher(swarm, tmp_path):
    write_echo_pod(tmp_path / "pods", "herd", {"keepAlive": True})
    swarm.made.append("cldpd-herd")
    found_again_by_a_new_dispatcher(
        tmp_path / "pods", "herd", lambda: MultiEngineRunner.from_settings([swarm.entry])
    )


def test_a_batch_of_eight_runs_on_the_swarm(swarm, tmp_path):
    from fakes import write_pod

    from cldpd_magic.events import EventType
    from cldpd_magic.runs.dispatcher import Dispatcher

    pod = write_pod(tmp_path / "pods", "eight", {})
    (pod / "Dockerfile").write_text(
        "FROM busybox:latest\nCOPY claude /usr/local/bin/claude\n"
        "RUN chmod +x /usr/local/bin/claude\n"
    )
    (pod / "claude").write_text(
        '#!/bin/sh\ni=1; while [ "$i" -le 2000 ]; do echo "line $i"; i=$((i + 1)); done\n'
    )
    issues = [f"https://github.com/octocat/Hello-World/issues/{n}" for n in range(1, 9)]
    runner = MultiEngineRunner.from_settings([swarm.entry])
    batch = Dispatcher(tmp_path / "pods", runner, tmp_path / "sessions").dispatch(
        "eight", issues, max_parallel=8
    )
    swarm.made += [f"cldpd-eight-{n}" for n in range(1, 9)]
    try:
        batch.wait(240)
        for run in batch.runs:
            lines = [e.data for e in run.events() if e.type == EventType.OUTPUT]
            assert (run.exit_code, lines) == (0, [f"line {i}" for i in range(1, 2001)])
    finally:
        batch.stop(10)
    assert swarm.api.services(filters={"label": "cldpd.pod=eight"}) == []


# -- two nodes: the second dockerd's swarm joined by a third as a worker ------------


def test_a_two_node_swarm_runs_on_the_worker_through_its_endpoint_label(docker_client, tmp_path):
    """The manager drained: the run lands on the worker; build, exec and stop reach it."""
    from cldpd_magic.engines.multi import docker_runner_for

    manager_engine = start_extra_engine()
    worker_engine = None
    try:
        worker_engine = start_extra_engine()
        manager = DockerRunner(base_url=manager_engine.url, tls=manager_engine.tls_files())
        worker = DockerRunner(base_url=worker_engine.url, tls=worker_engine.tls_files()).connection
        api = manager.connection.control()
        api.init_swarm(advertise_addr="127.0.0.1", listen_addr=f"127.0.0.1:{free_port()}")
        address = api.info()["Swarm"]["RemoteManagers"][0]["Addr"]
        token = api.inspect_swarm()["JoinTokens"]["Worker"]
        worker.control().join_swarm(
            [address], token, listen_addr=f"127.0.0.2:{free_port()}", advertise_addr="127.0.0.2"
        )
        worker_id = worker.control().info()["Swarm"]["NodeID"]
        manager_id = api.info()["Swarm"]["NodeID"]
        for node_id, labels, availability in (
            (worker_id, {"cldpd.endpoint": worker_engine.entry}, "active"),
            (manager_id, {}, "drain"),
        ):
            node = api.inspect_node(node_id)
            spec = {**node["Spec"], "Labels": labels, "Availability": availability}
            api.update_node(node_id, node["Version"]["Index"], spec)
        runner = SwarmRunner(
            manager, node_runner=lambda entry: docker_runner_for(parse_engine(entry))
        )
        context = agent_context(tmp_path / "agent")
        image = f"cldpd-swarm-agent:{uuid.uuid4().hex[:8]}"
        for _ in range(100):  # the worker is ready once the manager says so
            if all(n["Status"]["State"] == "ready" for n in api.nodes()) and len(api.nodes()) == 2:
                break
            threading.Event().wait(0.2)
        runner.build(image, str(context))
        worker.control().inspect_image(image)  # built on the worker too
        s = Swarm(manager_engine, runner, image)
        out = Text()
        assert runner.run(s.opts("split"), out, Text()) == 0 and out.value == "out-1\nout-2\n"
        opts = s.opts("idle")
        runner.start(opts)
        task = api.tasks(filters={"service": opts.name})[0]
        assert task["NodeID"] == worker_id
        out = Text()
        assert runner.exec(opts.name, ["agent", "hi"], out) == 0 and out.value == "hi\n"
        runner.stop(opts.name, timeout=5)
        assert runner.inspect(opts.name).status == "exited"
        runner.remove(opts.name)
        assert s.cleanup() == []
    finally:
        if worker_engine is not None:
            stop_extra_engine(worker_engine)
        stop_extra_engine(manager_engine)


# -- a stop is never lost (the guard of a run's service) ---------------------------------


def _slow_pod(pods_dir: Path, name: str, keep_alive: bool) -> None:
    from test_stop_race import SLOW_AGENT

    pod = write_echo_pod(pods_dir, name, {"keepAlive": keep_alive})
    (pod / "claude").write_text("#!/bin/sh\n" + SLOW_AGENT)


@pytest.mark.parametrize("keep_alive", [False, True], ids=["run", "keepAlive"])
@pytest.mark.parametrize("step", ["build", "built", "created", "started"])
def test_a_stop_at_each_step_of_a_start_leaves_no_service(swarm, tmp_path, step, keep_alive):
    """Steps: around the build on the nodes; ``created`` just before the service is
    created (the swarm starts its task at once), ``started`` once it exists."""
    from fakes import ISSUE_URL
    from test_stop_race import InjectingRunner, StopInjector, agent_output

    from cldpd_magic.runs.dispatcher import Dispatcher

    name = f"race-{step}-{int(keep_alive)}"
    _slow_pod(tmp_path / "pods", name, keep_alive)
    swarm.made.append(f"cldpd-{name}")
    injector = StopInjector(step)
    runner = InjectingRunner(MultiEngineRunner.from_settings([swarm.entry]), injector)
    d = Dispatcher(tmp_path / "pods", runner, tmp_path / "sessions")
    session = d.start_session(name, ISSUE_URL)
    injector.arm(lambda: d.stop(session.run, 2), lambda: f"cldpd-{name}" in runner.stopped)
    injector.join()
    assert session.done and session.state == "stopped" and session.error is None
    assert agent_output(session) == [] and session.exit_code == -1
    assert swarm.api.services(filters={"label": f"cldpd.pod={name}"}) == []


def test_a_batch_stopped_while_it_fills_its_slots_leaves_no_service(swarm, tmp_path):
    """Four runs, two at a time: the batch is stopped once the second run's service exists."""
    from test_stop_race import InjectingRunner, StopInjector, agent_output

    from cldpd_magic.runs.dispatcher import Dispatcher

    _slow_pod(tmp_path / "pods", "racers", False)
    issues = [f"https://github.com/octocat/Hello-World/issues/{n}" for n in range(1, 5)]
    swarm.made += [f"cldpd-racers-{n}" for n in range(1, 5)]
    injector = StopInjector("started", occurrence=2)
    runner = InjectingRunner(MultiEngineRunner.from_settings([swarm.entry]), injector)
    batch = Dispatcher(tmp_path / "pods", runner, tmp_path / "sessions").dispatch(
        "racers", issues, max_parallel=2
    )
    injector.arm(
        lambda: batch.stop(2), lambda: all(r.status.stop_requested.is_set() for r in batch.runs)
    )
    injector.join()
    assert batch.done and [r.state for r in batch.runs] == ["stopped"] * 4
    outputs = [agent_output(r) for r in batch.runs]
    assert not any("agent finished" in lines for lines in outputs)
    assert outputs[2:] == [[], []]
    assert swarm.api.services(filters={"label": "cldpd.pod=racers"}) == []
