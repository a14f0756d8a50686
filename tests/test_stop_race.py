"""A stop is never lost: a run asked to stop while it starts makes no container, or
removes the one it made, kept alive or not.

A stop is injected at each step of a start (before the build, after it, after the
container is created, after it started, before a kept-alive run's exec), through the
fake runner and through the real engine, by a runner that pauses the job at that step
until the stop has looked for the container. Then: the run ends ``stopped``, its agent
never ran, and no container of it is left, running or not. The same for a resume (the
exec ends), for a batch stopped while it fills its slots, and, in test_swarm.py, for a
Swarm run. Last, the reduction of the issue itself, twenty times on the engine.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fakes import ISSUE_URL as URL
from fakes import AgentCall, FakeRunner, idle_agent, write_pod

from cldpd_magic import Dispatcher, PodRunningError
from cldpd_magic.engines.protocol import ContainerInfo, LaunchGuard, RunOptions
from cldpd_magic.events import EventType, RunState
from cldpd_magic.runs.session import Session

#: The steps of a start a stop is injected at.
STEPS = ["build", "built", "created", "started"]
ISSUES = [f"https://github.com/octocat/Hello-World/issues/{n}" for n in range(1, 7)]
#: A stand-in agent for the engine: says it started, works until SIGINT, exits 130 then.
SLOW_AGENT = """
trap 'echo interrupted; exit 130' INT TERM
echo "agent started"
sleep 30 & wait $!
echo "agent finished"
"""


def until(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """Wait for a condition (a deadline against hanging, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)


class StopInjector:
    """Pauses a job at one step of its start, stops the run meanwhile, lets the job go on.

    At the step, the runner calls :meth:`at`, which waits until the test has armed the
    injector (the run exists by then), starts the stop in a thread and returns once
    ``looked()`` says the stop has got far enough (for a Dispatcher.stop, that it has
    looked for the container). The job then goes on, as in the race of the issue.

    Args:
        step: The step (one of STEPS, ``exec``) to fire at.
        occurrence: Which time the step is reached to fire at (1: the first).
    """

    def __init__(self, step: str, occurrence: int = 1) -> None:
        self.step = step
        self.occurrence = occurrence
        self.seen = 0
        self.stop: Callable[[], Any] = lambda: None
        self.looked: Callable[[], bool] = lambda: True
        self.armed = threading.Event()
        self.fired = threading.Event()
        self.thread: threading.Thread | None = None

    def arm(self, stop: Callable[[], Any], looked: Callable[[], bool]) -> None:
        """Say how to stop the run, and when the stop has got far enough."""
        self.stop, self.looked = stop, looked
        self.armed.set()

    def at(self, step: str) -> None:
        """The runner reached ``step``: fire when it is the one."""
        if step != self.step:
            return
        self.seen += 1
        if self.seen != self.occurrence:
            return
        until(self.armed.is_set, "the test armed the injector")
        thread = self.thread = threading.Thread(target=self.stop, daemon=True, name="test-stop")
        thread.start()
        self.fired.set()
        until(lambda: self.looked() or not thread.is_alive(), "the stop looked")

    def join(self) -> None:
        """Wait for the stop to fire and return (or fail)."""
        until(self.fired.is_set, f"the start reached {self.step}")
        assert self.thread is not None
        self.thread.join(120)
        assert not self.thread.is_alive()


# -- on the fake runner ----------------------------------------------------------------


@pytest.fixture
def runner() -> Iterator[FakeRunner]:
    r = FakeRunner(idle_agent)
    yield r
    r.release()


def fake_dispatcher(pods_dir, transcript_dir, runner: FakeRunner, injector) -> Dispatcher:
    d = Dispatcher(pods_dir, runner, transcript_dir)
    runner.on_step = lambda step, _name: injector.at(step)
    return d


@pytest.mark.parametrize("keep_alive", [False, True], ids=["run", "keepAlive"])
@pytest.mark.parametrize("step", [*STEPS, "exec"])
def test_a_stop_at_each_step_of_a_start_is_never_lost_fake(
    step, keep_alive, runner, pods_dir, transcript_dir
):
    if step == "exec" and not keep_alive:
        pytest.skip("only a kept-alive start runs its agent through exec")
    write_pod(pods_dir, "p", {"keepAlive": keep_alive})
    injector = StopInjector(step)
    d = fake_dispatcher(pods_dir, transcript_dir, runner, injector)
    session = d.start_session("p", URL)
    injector.arm(lambda: d.stop(session.run, 2), lambda: ("stop", ("cldpd-p", 2)) in runner.calls)
    injector.join()
    assert session.done and session.state == "stopped" and session.error is None
    assert runner.containers == {}  # nothing left, running or not
    if step == "exec":  # after the job's last look: an exec that starts ends with the pod
        assert session.exit_code in (-1, 130)
    else:
        assert not runner.agent_started.is_set()  # the agent never ran
        assert session.exit_code == -1


def test_without_the_guard_a_stop_after_create_is_lost_fake(runner, pods_dir, transcript_dir):
    """The control: a runner that does not ask the guard starts the agent after the stop."""

    def unguarded(opts: RunOptions) -> RunOptions:
        return dataclasses.replace(opts, guard=None)

    real_run = runner.run
    runner.run = lambda opts, *args, **kwargs: real_run(unguarded(opts), *args, **kwargs)
    runner.agent = lambda call: (call.out("ran"), 0)[1]
    write_pod(pods_dir, "p")
    injector = StopInjector("created")
    d = fake_dispatcher(pods_dir, transcript_dir, runner, injector)
    session = d.start_session("p", URL)
    injector.arm(lambda: d.stop(session.run, 2), lambda: ("stop", ("cldpd-p", 2)) in runner.calls)
    injector.join()
    assert runner.agent_started.is_set()  # the stop was lost: the agent ran after it
    assert "ran" in [e.data for e in session.events()]


def test_a_resume_stopped_as_its_exec_starts_ends_that_exec(runner, pods_dir, transcript_dir):
    write_pod(pods_dir, "p", {"keepAlive": True})
    runner.agent = lambda call: 0
    d = Dispatcher(pods_dir, runner, transcript_dir)
    assert d.start_session("p", URL).wait(10) == 0
    runner.agent = idle_agent
    injector = StopInjector("exec")
    runner.on_step = lambda step, _name: injector.at(step)
    resume = d.resume_session("p", "go on")
    injector.arm(lambda: resume.stop(2), lambda: resume.status.stop_requested.is_set())
    injector.join()
    assert resume.state == "stopped" and resume.exit_code == 130  # the exec was stopped
    assert runner.inspect("cldpd-p").running  # a resume's stop ends its exec, not the pod
    runner.on_step = None
    d.stop("p", 2)
    assert runner.containers == {}


def stoppable_agent(call: AgentCall) -> int:
    """Works until stopped (then exits 130), or for 30 s (then exits 0: the stop was lost)."""
    return 130 if call.stopped.wait(30) else 0


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("keep_alive", [False, True], ids=["run", "keepAlive"])
def test_a_batch_stopped_while_it_fills_its_slots_leaves_nothing_fake(
    step, keep_alive, runner, pods_dir, transcript_dir
):
    """Six runs, three at a time: the batch is stopped as the third run to go reaches
    the step (which of the first three that is, is the scheduler's choice)."""
    write_pod(pods_dir, "p", {"keepAlive": keep_alive})
    runner.agent = stoppable_agent
    injector = StopInjector(step, occurrence=3)
    d = fake_dispatcher(pods_dir, transcript_dir, runner, injector)
    batch = d.dispatch("p", ISSUES, max_parallel=3)
    injector.arm(batch.stop, lambda: all(r.status.stop_requested.is_set() for r in batch.runs))
    injector.join()
    assert batch.done and [r.state for r in batch.runs] == ["stopped"] * 6
    codes = [r.exit_code for r in batch.runs]
    assert 0 not in codes  # every agent that started was stopped
    assert -1 in codes[:3]  # the run caught at the step never ran
    assert codes[3:] == [-1] * 3  # nor did the queued ones, which made no container
    assert {o.name for o in runner.runs} <= {"cldpd-p-1", "cldpd-p-2", "cldpd-p-3"}
    assert runner.containers == {}


# -- on the real engine ----------------------------------------------------------------


class _InjectingGuard:
    """A run's guard that lets the injector fire first: ``created`` is the second check
    (after the create, before the start), ``started`` the report after the start."""

    def __init__(self, guard: LaunchGuard | None, injector: StopInjector) -> None:
        self.guard = guard
        self.injector = injector
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        if self.checks == 2:
            self.injector.at("created")
        if self.guard is not None:
            self.guard.check()

    def started(self, info: ContainerInfo) -> None:
        self.injector.at("started")
        if self.guard is not None:
            self.guard.started(info)


class InjectingRunner:
    """A real runner (a DockerRunner, a MultiEngineRunner) with a stop injected at a step.

    Args:
        runner: The runner.
        injector: Fired at ``build`` and ``built`` around a build, ``created`` and
            ``started`` through the run's guard, ``exec`` before an exec.
        guarded: False drops the run's guard (the control: the runner then asks nothing).
    """

    def __init__(self, runner: Any, injector: StopInjector, guarded: bool = True) -> None:
        self.runner = runner
        self.injector = injector
        self.guarded = guarded
        self.stopped: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def build(self, tag, context_dir, build_args=None, on_output=None, cancel=None, engine=""):
        self.injector.at("build")
        self.runner.build(tag, context_dir, build_args, on_output, cancel, engine)
        self.injector.at("built")

    def _injecting(self, opts: RunOptions) -> RunOptions:
        guard = opts.guard if self.guarded else None
        return dataclasses.replace(opts, guard=_InjectingGuard(guard, self.injector))

    def run(self, opts, stdout, stderr=None, on_start=None):
        return self.runner.run(self._injecting(opts), stdout, stderr, on_start)

    def start(self, opts):
        return self.runner.start(self._injecting(opts))

    def exec(self, container, cmd, stdout, stderr=None, on_start=None, stdin=None):
        self.injector.at("exec")
        return self.runner.exec(container, cmd, stdout, stderr, on_start, stdin=stdin)

    def stop(self, container, timeout=10.0):
        self.stopped.append(container)
        self.runner.stop(container, timeout)


def containers_of(docker_client, pod: str) -> list[str]:
    """Every container of a pod, running or not, as ``name status``."""
    found = docker_client.containers.list(all=True, filters={"label": f"cldpd.pod={pod}"})
    return sorted(f"{c.name} {c.status}" for c in found)


@pytest.fixture
def no_leftovers(docker_client) -> Iterator[list[str]]:
    """Pods to check: none may keep a container at the end (any left is removed)."""
    pods: list[str] = []
    yield pods
    leaked = []
    for pod in pods:
        for c in docker_client.containers.list(all=True, filters={"label": f"cldpd.pod={pod}"}):
            leaked.append(c.name)
            c.remove(force=True)
    assert not leaked, f"containers left behind: {leaked}"


def agent_output(session: Session) -> list[str]:
    return [e.data for e in session.events() if e.type is EventType.OUTPUT]


def start_with_a_stop_at(
    step: str, pod: str, pods_dir, transcript_dir, guarded: bool = True
) -> tuple[Session, InjectingRunner]:
    """Start a run of ``pod`` on the engine, stopping it (Dispatcher.stop) at ``step``."""
    from cldpd_magic.engines.docker.runner import DockerRunner

    injector = StopInjector(step)
    runner = InjectingRunner(DockerRunner(), injector, guarded)
    d = Dispatcher(pods_dir, runner, transcript_dir)
    session = d.start_session(pod, URL)
    injector.arm(lambda: d.stop(session.run, 2), lambda: f"cldpd-{session.run}" in runner.stopped)
    injector.join()
    return session, runner


@pytest.mark.docker
@pytest.mark.parametrize("keep_alive", [False, True], ids=["run", "keepAlive"])
@pytest.mark.parametrize("step", [*STEPS, "exec"])
def test_a_stop_at_each_step_of_a_start_is_never_lost_engine(
    step, keep_alive, make_pod, pods_dir, transcript_dir, docker_client, no_leftovers
):
    if step == "exec" and not keep_alive:
        pytest.skip("only a kept-alive start runs its agent through exec")
    pod = make_pod(SLOW_AGENT, pod_json={"keepAlive": keep_alive})
    no_leftovers.append(pod)
    session, _ = start_with_a_stop_at(step, pod, pods_dir, transcript_dir)
    assert session.done and session.state == "stopped" and session.error is None
    assert containers_of(docker_client, pod) == []  # nothing left, running or not
    if step == "exec":  # after the job's last look: an exec that starts ends with the pod
        assert "agent finished" not in agent_output(session)
    else:  # the run never reported its agent (after "started", it was killed at once)
        assert agent_output(session) == [] and session.exit_code == -1


@pytest.mark.docker
def test_without_the_guard_a_stop_after_create_is_lost_engine(
    make_pod, pods_dir, transcript_dir, docker_client, no_leftovers
):
    """The control: with a runner that does not ask the guard, the agent runs on after
    the stop, to its end (the container goes only because a run's container is removed
    when it ends)."""
    pod = make_pod('echo "agent started"; sleep 2; echo "agent finished"')
    no_leftovers.append(pod)
    session, _ = start_with_a_stop_at("created", pod, pods_dir, transcript_dir, guarded=False)
    assert agent_output(session) == ["agent started", "agent finished"]


@pytest.mark.docker
def test_a_resume_stopped_as_its_exec_starts_ends_that_exec_engine(
    make_pod, pods_dir, transcript_dir, docker_client, no_leftovers
):
    from cldpd_magic.engines.docker.runner import DockerRunner

    pod = make_pod('[ "$5" = "--resume" ] || exit 0\n' + SLOW_AGENT, pod_json={"keepAlive": True})
    no_leftovers.append(pod)
    injector = StopInjector("exec")
    d = Dispatcher(pods_dir, DockerRunner(), transcript_dir)
    assert d.start_session(pod, URL).wait(120) == 0
    d.runner = InjectingRunner(d.runner, injector)
    resume = d.resume_session(pod, "go on")
    injector.arm(lambda: resume.stop(2), lambda: resume.status.stop_requested.is_set())
    injector.join()
    assert resume.state == "stopped"
    assert "agent finished" not in agent_output(resume)  # the exec was stopped
    assert containers_of(docker_client, pod) == [f"cldpd-{pod} running"]
    d.stop(pod, 2)
    assert containers_of(docker_client, pod) == []


@pytest.mark.docker
@pytest.mark.parametrize("step", STEPS)
def test_a_batch_stopped_while_it_fills_its_slots_leaves_nothing_engine(
    step, make_pod, pods_dir, transcript_dir, docker_client, no_leftovers
):
    """Four runs, two at a time: the batch is stopped as the second run to go reaches
    the step."""
    from cldpd_magic.engines.docker.runner import DockerRunner

    pod = make_pod(SLOW_AGENT)
    no_leftovers.append(pod)
    injector = StopInjector(step, occurrence=2)
    runner = InjectingRunner(DockerRunner(), injector)
    batch = Dispatcher(pods_dir, runner, transcript_dir).dispatch(pod, ISSUES[:4], max_parallel=2)
    injector.arm(
        lambda: batch.stop(2), lambda: all(r.status.stop_requested.is_set() for r in batch.runs)
    )
    injector.join()
    assert batch.done and [r.state for r in batch.runs] == ["stopped"] * 4
    outputs = [agent_output(r) for r in batch.runs]
    assert not any("agent finished" in lines for lines in outputs)  # every agent was stopped
    assert [] in outputs[:2]  # the run caught at the step never reported its agent
    assert outputs[2:] == [[], []]  # nor did the queued ones
    assert containers_of(docker_client, pod) == []


@pytest.mark.docker
def test_the_reduction_of_the_issue_twenty_times(
    make_pod, pods_dir, transcript_dir, docker_client, no_leftovers
):
    """A kept-alive run; a second run of its pod stopped right after its start, then the
    first: nothing of the pod is left, every time."""
    pod = make_pod('echo "agent ran"', pod_json={"keepAlive": True})
    no_leftovers.append(pod)
    d = Dispatcher(pods_dir, transcript_dir=transcript_dir)
    for attempt in range(1, 21):
        assert d.start(pod, URL, io.StringIO()) == 0
        second = d.start_session(pod, URL)
        with pytest.raises(PodRunningError):
            d.start_session(pod, URL, run=pod)
        d.stop(second.run)
        assert second.state == RunState.STOPPED, f"try {attempt}"
        d.stop(pod)
        left = [(r.container, r.status) for r in d.running() if r.pod == pod]
        assert left == [], f"try {attempt}: {left}"
