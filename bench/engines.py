"""Figures 9 and 10: streaming from remote engines, a second dockerd over TLS and a swarm.

Each figure starts its own dockerd on a loopback TCP port with TLS
(``tests/engines_util.py``), builds the bench pod's image there, and stops and removes
that engine at its end. Ours is the runner a user's engines entry gives
(``docker_runner_for(parse_engine(entry))``) running the pod's agent command into a
writer that drops the lines; the baseline is the docker CLI against the same engine.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Callable

import docker.errors

from cldpd_magic.engines.multi import docker_runner_for
from cldpd_magic.engines.protocol import Runner, RunOptions
from cldpd_magic.engines.setting import SWARM_PREFIX, parse_engine
from cldpd_magic.pods import Pod
from cldpd_magic.runs.agent import agent_command, build_prompt
from tests.engines_util import ExtraEngine, free_port, start_extra_engine, stop_extra_engine

from .figures import STREAM_LINES, _samples, _time_cli
from .harness import ISSUE_URL, Bench, NullWriter, Result, interleaved, median

TLS_TARGET = 1.3
SWARM_TARGET = 1.5
_QUIET = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}


def _agent(pod: Pod) -> list[str]:
    return agent_command(pod, build_prompt(pod.template, ISSUE_URL),
                         session_uuid=str(uuid.uuid4()), resume=False)  # fmt: skip


def _cli_service(engine: ExtraEngine, pod: Pod, name: str) -> float:
    """``docker service create`` of a replicated job (it waits for the job to end), then
    ``docker service logs --raw`` to /dev/null and ``docker service rm``; the wall time."""
    cli = ["docker", *engine.cli_args(), "service"]
    env = [a for k, v in pod.config.env.items() for a in ("--env", f"{k}={v}")]
    started = time.perf_counter()
    try:
        subprocess.run([*cli, "create", "--quiet", "--name", name, "--mode", "replicated-job",
                        "--label", f"cldpd.pod={pod.name}", *env, pod.image, *_agent(pod)],
                       **_QUIET)  # fmt: skip
        subprocess.run([*cli, "logs", "--raw", name], **_QUIET)
    finally:
        subprocess.run([*cli, "rm", name], capture_output=True, check=False)
    return time.perf_counter() - started


def _streams(
    bench: Bench, engine: ExtraEngine, runner: Runner, tag: str, service: bool = False
) -> list[list[float]]:
    """Time ``runner.run`` of 200,000 lines against ``docker run`` on the same engine.

    Args:
        service: Also time the docker CLI's own way through a swarm (``_cli_service``).

    Returns:
        Ours and the baselines' wall times of the timed repetitions.
    """
    pod = bench.make_pod(tag, STREAM_LINES, build=False)
    runner.build(pod.image, str(pod.dir), pod.config.build_args)
    count = 0

    def ours() -> float:
        nonlocal count
        count += 1
        opts = RunOptions(pod.image, f"cldpd-{pod.name}-{count}", _agent(pod),
                          env=dict(pod.config.env), labels={"cldpd.pod": pod.name})  # fmt: skip
        writer = NullWriter()
        started = time.perf_counter()
        code = runner.run(opts, writer)
        took = time.perf_counter() - started
        if code != 0 or writer.lines != STREAM_LINES:
            raise RuntimeError(f"the run ended {code} with {writer.lines:,} of {STREAM_LINES:,}")
        return took

    def theirs() -> float:
        cli = bench.cli_run(pod)
        return _time_cli([cli[0], *engine.cli_args(), *cli[1:]])[0]

    def services() -> float:
        nonlocal count
        count += 1
        return _cli_service(engine, pod, f"cldpd-{pod.name}-cli-service{count}")

    return interleaved(bench.reps, ours, theirs, *([services] if service else []))


def _on_extra_engine(work: Callable[[ExtraEngine], list[Result]]) -> list[Result]:
    """Run ``work`` with a fresh TLS dockerd that holds busybox; stop and remove it after."""
    engine = start_extra_engine()
    try:
        return work(engine)
    finally:
        stop_extra_engine(engine)


def _row(figure: str, name: str, ours: list[float], theirs: list[float], target: float,
         baseline: str) -> Result:  # fmt: skip
    mine, base = median(ours), median(theirs)
    return Result(figure, name, mine, base, "s", f"ratio <= {target}", mine / base <= target,
                  f"ours {_samples(ours, 's')}, {baseline} {_samples(theirs, 's')}")  # fmt: skip


def tls_streaming(bench: Bench) -> list[Result]:
    """Figure 9: 200,000 lines from a second dockerd over TLS on loopback."""

    def work(engine: ExtraEngine) -> list[Result]:
        runner = docker_runner_for(parse_engine(engine.entry))
        ours, theirs = _streams(bench, engine, runner, "tls")
        return [_row("9", f"DockerRunner.run on a TLS engine (tcp://127.0.0.1, a second dockerd), "
                     f"{STREAM_LINES:,} lines to a null writer vs docker -H ... --tlsverify run "
                     "--rm --init > /dev/null on that engine", ours, theirs, TLS_TARGET,
                     "docker --tlsverify run")]  # fmt: skip

    return _on_extra_engine(work)


def swarm_streaming(bench: Bench) -> list[Result]:
    """Figure 10: 200,000 lines from a one-node swarm of a second dockerd.

    The baseline is ``docker run`` on the manager's engine (a plain container, no
    service): the cost of running as a service the swarm schedules is part of ours.
    """

    def work(engine: ExtraEngine) -> list[Result]:
        manager = docker_runner_for(parse_engine(engine.entry))
        api = manager.connection.control()  # type: ignore[attr-defined]
        api.init_swarm(advertise_addr="127.0.0.1", listen_addr=f"127.0.0.1:{free_port()}")
        try:
            runner = docker_runner_for(parse_engine(SWARM_PREFIX + engine.entry))
            ours, theirs, services = _streams(bench, engine, runner, "swarm", service=True)
        finally:
            with contextlib.suppress(docker.errors.APIError):
                api.leave_swarm(force=True)
        return [_row("10", f"SwarmRunner.run on a one-node swarm (a second dockerd over TLS), "
                     f"{STREAM_LINES:,} lines to a null writer: service created, its container "
                     "attached on its node, service removed vs docker run --rm --init "
                     "> /dev/null on the manager's engine (a plain container, not a service)",
                     ours, theirs, SWARM_TARGET, "docker --tlsverify run"),
                _row("10b", "the same SwarmRunner.run vs the docker CLI through the swarm: "
                     "docker service create --mode replicated-job (waits for the job's end), "
                     "docker service logs --raw > /dev/null, docker service rm", ours, services,
                     SWARM_TARGET, "docker service create + logs + rm")]  # fmt: skip

    return _on_extra_engine(work)
