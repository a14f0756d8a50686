"""Runs: one pod on several issues at once, each run resumed, stopped and attached alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cldpd_magic import Dispatcher, InvalidRequestError
from cldpd_magic.engines.docker.runner import DockerRunner
from cldpd_magic.events import Event, EventType

pytestmark = pytest.mark.docker

ISSUES = [f"https://github.com/octocat/Hello-World/issues/{n}" for n in (1, 2, 3)]

#: Says ready, then echoes each resume's prompt, until SIGINT.
AGENT = """
if [ "$5" = --resume ]; then
  for a; do last="$a"; done
  echo "resumed: $last"
  exit 0
fi
trap 'echo got INT; exit 130' INT
echo ready
while :; do sleep 0.1; done
"""


def until(events: Iterator[Event], data: str) -> None:
    for event in events:
        if event.data == data:
            return
    raise AssertionError(f"no {data!r}")


def test_stop_and_resume_one_run_while_its_siblings_go_on_and_attach_after_a_restart(
    make_pod, pods_dir, transcript_dir, docker_client
):
    name = make_pod(AGENT)
    dispatcher = Dispatcher(pods_dir, DockerRunner(), transcript_dir)
    batch = dispatcher.dispatch(name, ISSUES, max_parallel=3)
    try:
        streams = [run.events() for run in batch]
        for events in streams:
            until(events, "ready")
        runs = [run.run for run in batch]
        assert runs == [f"{name}-1", f"{name}-2", f"{name}-3"]
        assert sorted(dispatcher.runs(name)) == runs
        with pytest.raises(InvalidRequestError, match=", ".join(runs)):
            dispatcher.resume_session(name, "which one?")

        resume = dispatcher.resume_session(runs[1], "more please")
        assert resume.wait(30) == 0 and resume.run == runs[1]
        assert [e.data for e in resume.events() if e.type is EventType.OUTPUT] == [
            "resumed: more please"
        ]

        assert dispatcher.stop(runs[0], 10) is True
        assert batch.runs[0].done and batch.runs[0].state == "stopped"
        assert not batch.runs[1].done and not batch.runs[2].done

        # A new kernel: a new Dispatcher finds the run by its labels, by name.
        later = Dispatcher(pods_dir, DockerRunner(), transcript_dir)
        assert sorted(later.runs(name)) == runs[1:]
        attach = later.attach_session(runs[2])
        assert attach.run == runs[2] and attach.pod_name == name
        until(attach.events(), "ready")
        later.stop(runs[2], 10)
        assert attach.wait(30) is not None
        assert batch.runs[2].wait(30) == 130
        assert not batch.runs[1].done
    finally:
        batch.stop(10)
    assert docker_client.containers.list(all=True, filters={"label": f"cldpd.pod={name}"}) == []
