"""The Dispatcher on the real engine: sessions, resume, stop, keepAlive, attach, volume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import docker.errors
import pytest
from fakes import ISSUE_URL as URL

from cldpd_magic import (
    BuildFailedError,
    ContainerFailedError,
    Dispatcher,
    DockerRunner,
    DockerUnavailableError,
    Event,
    EventType,
    InvalidRequestError,
    PodRunningError,
    Session,
    SessionNotFoundError,
)
from cldpd_magic.runs.agent import MAX_ARGUMENT_BYTES
from cldpd_magic.runs.registry import LABEL_CLAUDE_SESSION, LABEL_POD, LABEL_SESSION
from cldpd_magic.runs.session import read_transcript
from cldpd_magic.secrets import MASK

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]

E = EventType

#: Start: print the session uuid and idle (SIGINT ends it with 130) until a resume
#: creates /tmp/done. Resume: print the uuid and the prompt, create /tmp/done, exit 5.
ROUND_TRIP = """
eval "prompt=\\${$#}"
if [ "$5" = --resume ]; then
  echo "resumed $6: $prompt"
  touch /tmp/done
  exit 5
fi
trap 'echo got INT; exit 130' INT
echo "started $6"
while [ ! -f /tmp/done ]; do sleep 1 & wait; done
echo finished
"""

#: Idles until SIGINT in a start; a resume idles too until its own SIGINT.
IDLE = """
if [ "$5" = --resume ]; then
  trap 'echo resume got INT; exit 130' INT
  echo resume-ready
else
  trap 'echo got INT; exit 130' INT
  echo ready
fi
while :; do sleep 1 & wait; done
"""


@pytest.fixture
def dispatcher(docker_client, pods_dir, transcript_dir) -> Dispatcher:
    return Dispatcher(pods_dir, DockerRunner(), transcript_dir)


def until(events: Iterator[Event], data: str) -> list[Event]:
    """Consume events up to the first whose data is ``data``."""
    seen = []
    for event in events:
        seen.append(event)
        if event.data == data:
            return seen
    raise AssertionError(f"{data!r} never came; last events: {seen[-5:]}")


def output(session: Session, etype: EventType = E.OUTPUT) -> list[str]:
    return [e.data for e in session.events() if e.type is etype]


def container(docker_client, name: str):
    try:
        return docker_client.containers.get(f"cldpd-{name}")
    except docker.errors.NotFound:
        return None


def test_start_output_stderr_and_exit_code(dispatcher, make_pod):
    name = make_pod('echo "out: $#"; echo "warn" >&2; echo done; exit 3')
    session = dispatcher.start_session(name, URL)
    assert session.wait(60) == 3
    events = list(session.events())
    kinds = [e.type for e in events]
    assert kinds[0] is E.BUILD_STARTED and E.BUILD_OUTPUT in kinds
    after_build = kinds[kinds.index(E.BUILD_COMPLETE) :]
    assert after_build[:2] == [E.BUILD_COMPLETE, E.CONTAINER_STARTED]
    assert after_build[-1] is E.CONTAINER_EXITED and events[-1].code == 3
    assert output(session) == ["out: 7", "done"]
    assert output(session, E.STDERR) == ["warn"]
    assert read_transcript(session.transcript) == events
    assert session.state == "exited"


def test_blocking_start_returns_or_raises_the_exit_code(dispatcher, make_pod):
    name = make_pod("echo bye; exit 2")
    with pytest.raises(ContainerFailedError) as info:
        dispatcher.start(name, URL, stdout=_Sink())
    assert info.value.exit_code == 2
    sink = _Sink()
    assert dispatcher.start(name, URL, sink, check=False) == 2
    assert sink.text == "bye\n"


class _Sink:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text


def test_build_failure(dispatcher, make_pod):
    name = make_pod(dockerfile="FROM busybox:latest\nRUN echo broken-step && false\n")
    session = dispatcher.start_session(name, URL)
    with pytest.raises(BuildFailedError) as info:
        session.wait(60)
    assert "broken-step" in info.value.log_tail
    kinds = [e.type for e in session.events()]
    assert kinds[0] is E.BUILD_STARTED and kinds[-1] is E.ERROR
    assert set(kinds[1:-1]) == {E.BUILD_OUTPUT}


def test_no_docker_is_one_clear_error(make_pod, pods_dir, transcript_dir, monkeypatch, tmp_path):
    name = make_pod()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(DockerUnavailableError, match="Docker is not reachable"):
        Dispatcher(pods_dir, transcript_dir=transcript_dir).start_session(name, URL)


def test_config_reaches_the_container(dispatcher, make_pod, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("host notes\n")
    name = make_pod(
        """
        echo "mode=$MODE"
        echo "pwd=$(pwd)"
        cat /data/notes.txt
        touch /data/new 2>/dev/null && echo wrote || echo read-only
        """,
        pod_json={
            "env": {"MODE": "fast"},
            "workdir": "/srv/work",
            "mounts": [{"source": str(data), "target": "/data", "readOnly": True}],
        },
    )
    session = dispatcher.start_session(name, URL)
    assert session.wait(60) == 0
    assert output(session) == ["mode=fast", "pwd=/srv/work", "host notes", "read-only"]
    assert not (data / "new").exists()


def test_inherited_env_reaches_the_container_and_is_masked(dispatcher, make_pod, monkeypatch):
    secret = f"val-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("HOST_FORWARDED", secret)
    monkeypatch.delenv("HOST_NOT_SET", raising=False)
    name = make_pod(
        """
        echo "value=$HOST_FORWARDED"
        echo "$HOST_FORWARDED" | sed 's/./&./g'
        echo "err=$HOST_FORWARDED" >&2
        echo "unset=${HOST_NOT_SET-none}"
        """,
        pod_json={"inheritEnv": ["HOST_FORWARDED", "HOST_NOT_SET"]},
    )
    session = dispatcher.start_session(name, URL)
    assert session.wait(60) == 0
    dotted = "".join(c + "." for c in secret)
    assert output(session) == [f"value={MASK}", dotted, "unset=none"]
    assert output(session, E.STDERR) == [f"err={MASK}"]
    assert session.missing_env == ["HOST_NOT_SET"]
    assert any("HOST_NOT_SET" in line for line in output(session, E.BUILD_OUTPUT))
    assert secret not in session.transcript.read_text()


def test_resume_round_trip(dispatcher, make_pod, docker_client):
    name = make_pod(ROUND_TRIP, pod_json={"args": ["--model", "opus"]}, template="Orders.")
    start = dispatcher.start_session(name, URL)
    events = start.events()
    until(events, f"started {start.claude_session}")
    labels = container(docker_client, name).labels
    assert labels[LABEL_POD] == name
    assert labels[LABEL_SESSION] == start.id
    assert labels[LABEL_CLAUDE_SESSION] == start.claude_session
    (running,) = [r for r in dispatcher.running() if r.pod == name]
    assert (running.container, running.status) == (f"cldpd-{name}", "running")
    assert (running.session_id, running.claude_session) == (start.id, start.claude_session)

    resume = dispatcher.resume_session(name, "now the tests, {please}")
    assert resume.wait(60) == 5
    assert output(resume) == [f"resumed {start.claude_session}: now the tests, {{please}}"]
    assert [e.type for e in resume.events()] == [E.CONTAINER_STARTED, E.OUTPUT, E.CONTAINER_EXITED]
    assert start.wait(60) == 0
    assert [e.data for e in events][-2:] == ["finished", "0"]
    assert container(docker_client, name) is None


def test_resume_with_nothing_running(dispatcher, make_pod):
    name = make_pod()
    with pytest.raises(SessionNotFoundError, match="not running"):
        dispatcher.resume_session(name, "hello?")
    with pytest.raises(SessionNotFoundError):
        dispatcher.attach_session(name)


def test_stop_is_graceful_and_idempotent(dispatcher, make_pod, docker_client):
    name = make_pod(IDLE)
    session = dispatcher.start_session(name, URL)
    until(session.events(), "ready")
    session.stop(10)
    session.stop(10)
    dispatcher.stop(name)
    assert session.wait(0) == 130
    assert output(session)[-1] == "got INT"
    assert session.state == "stopped"
    assert container(docker_client, name) is None


def idle_start_and_resume(dispatcher: Dispatcher, name: str) -> tuple[Session, Session]:
    """Start the IDLE pod and resume it, each up to its first line."""
    start = dispatcher.start_session(name, URL)
    until(start.events(), "ready")
    resume = dispatcher.resume_session(name, "wait for it")
    until(resume.events(), "resume-ready")
    return start, resume


def test_stopping_a_resume_ends_the_exec_only(dispatcher, make_pod, docker_client):
    name = make_pod(IDLE)
    start, resume = idle_start_and_resume(dispatcher, name)
    resume.stop(10)
    assert resume.wait(0) == 130
    assert output(resume) == ["resume-ready", "resume got INT"]
    assert container(docker_client, name).status == "running"
    assert not start.done
    dispatcher.stop(name, 10)
    assert start.wait(30) == 130
    assert container(docker_client, name) is None


def test_dispatcher_stop_ends_a_running_resume_too(dispatcher, make_pod, docker_client):
    name = make_pod(IDLE)
    start, resume = idle_start_and_resume(dispatcher, name)
    dispatcher.stop(name, 10)
    assert resume.wait(0) == 130 and start.wait(0) == 130
    assert container(docker_client, name) is None


def test_resume_finds_a_pod_started_from_another_pods_dir(
    dispatcher, make_pod, docker_client, tmp_path, transcript_dir
):
    name = make_pod(IDLE, pod_json={"args": ["--model", "m1"]})
    start, resume = idle_start_and_resume(dispatcher, name)
    resume.stop(10)
    elsewhere = Dispatcher(tmp_path / "other-pods", transcript_dir=transcript_dir)
    again = elsewhere.resume_session(name, "from elsewhere")
    until(again.events(), "resume-ready")
    again.stop(10)
    dispatcher.stop(name, 10)
    assert start.wait(30) == 130
    assert container(docker_client, name) is None


def test_stop_during_the_build(dispatcher, make_pod, docker_client, build_containers):
    marker = f"marker-{uuid.uuid4().hex[:8]}"
    name = make_pod(dockerfile=f"FROM busybox:latest\nRUN echo {marker}-$((6 * 7)) && sleep 30\n")
    session = dispatcher.start_session(name, URL)
    until(session.events(), f"{marker}-42")
    started = time.monotonic()
    session.stop(10)
    assert time.monotonic() - started < 20
    assert session.wait(0) == -1
    assert session.state == "stopped"
    assert [e.type for e in session.events()][-1] is E.ERROR
    assert build_containers(marker) == []
    assert container(docker_client, name) is None


def test_a_container_that_cannot_start_is_removed(dispatcher, make_pod, tmp_path, docker_client):
    name = make_pod(pod_json={"mounts": [{"source": str(tmp_path), "target": "/etc/passwd"}]})
    session = dispatcher.start_session(name, URL)
    with pytest.raises(ContainerFailedError, match="Could not start"):
        session.wait(60)
    kinds = [e.type for e in session.events()]
    assert kinds[-2:] == [E.BUILD_COMPLETE, E.ERROR]
    assert container(docker_client, name) is None

    (dispatcher.pods_dir / name / "pod.json").write_text(json.dumps({"workdir": "/etc/passwd/x"}))
    with pytest.raises(ContainerFailedError):
        dispatcher.start_session(name, URL).wait(60)
    assert container(docker_client, name) is None


def test_an_agent_that_is_not_installed(dispatcher, make_pod, docker_client):
    name = make_pod(dockerfile="FROM busybox:latest\n")
    session = dispatcher.start_session(name, URL)
    assert session.wait(60) == 127
    assert any("claude" in line for line in output(session, E.STDERR))
    assert container(docker_client, name) is None


def test_200000_lines_arrive_in_order_with_the_exit_code(dispatcher, make_pod):
    name = make_pod("seq 1 200000; exit 42")
    session = dispatcher.start_session(name, URL)
    assert session.wait(120) == 42
    assert session.held_in_memory[0] <= session.MAX_EVENTS
    lines = output(session)
    assert len(lines) == 200000
    assert lines == [str(i) for i in range(1, 200001)]
    assert list(session.events())[-1].code == 42


def test_a_5mb_line_arrives_intact(dispatcher, make_pod):
    name = make_pod("head -c 5000000 /dev/zero | tr '\\0' x; echo; echo after")
    session = dispatcher.start_session(name, URL)
    assert session.wait(60) == 0
    assert output(session) == ["x" * 5_000_000, "after"]


def test_fast_exit_output_is_complete(dispatcher, make_pod):
    name = make_pod("echo a; echo b")
    for _ in range(3):
        assert dispatcher.start_session(name, URL).wait(60) == 0
        assert output(dispatcher.sessions[-1]) == ["a", "b"]


def test_keep_alive(dispatcher, make_pod, docker_client):
    name = make_pod(
        """
        if [ "$5" = --resume ]; then echo "resumed $6"; exit 3; fi
        echo "agent done $6"
        """,
        pod_json={"keepAlive": True},
    )
    start = dispatcher.start_session(name, URL)
    assert start.wait(60) == 0
    assert output(start) == [f"agent done {start.claude_session}"]
    assert container(docker_client, name).status == "running"
    resume = dispatcher.resume_session(name, "more")
    assert resume.wait(60) == 3
    assert output(resume) == [f"resumed {start.claude_session}"]
    assert container(docker_client, name).status == "running"
    with pytest.raises(PodRunningError):
        dispatcher.start_session(name, URL, run=name)
    dispatcher.stop(name, 10)
    assert container(docker_client, name) is None


def test_stopping_a_kept_alive_pod_lets_its_agents_end_their_turn(
    dispatcher, make_pod, docker_client, transcript_dir
):
    name = make_pod(IDLE, pod_json={"keepAlive": True})
    start = dispatcher.start_session(name, URL)
    until(start.events(), "ready")
    resume = dispatcher.resume_session(name, "and more")
    until(resume.events(), "resume-ready")
    # Another process (a new kernel) stops it: it knows none of these sessions.
    Dispatcher(dispatcher.pods_dir, DockerRunner(), transcript_dir).stop(name, 10)
    assert start.wait(30) == 130 and resume.wait(30) == 130
    assert output(start) == ["ready", "got INT"]
    assert output(resume) == ["resume-ready", "resume got INT"]
    assert container(docker_client, name) is None


@pytest.mark.parametrize("how", ["session", "cap"])
def test_a_stopped_kept_alive_run_is_removed_whoever_stops_it(
    how, dispatcher, make_pod, docker_client
):
    """Its own session's stop, or a cap passed (here the run's timeout): the container
    goes as with Dispatcher.stop (it used to stay, exited, listed by running())."""
    name = make_pod(IDLE, pod_json={"keepAlive": True})
    start = dispatcher.start_session(name, URL, timeout=1 if how == "cap" else None)
    until(start.events(), "ready")
    if how == "session":
        start.stop(10)
    assert start.wait(30) == 130
    assert output(start) == ["ready", "got INT"]
    assert start.state == "stopped" and start.stop_reason == ("timed out" if how == "cap" else "")
    assert container(docker_client, name) is None
    assert [r for r in dispatcher.running() if r.pod == name] == []


def test_a_resume_masks_what_the_container_was_given(
    dispatcher, make_pod, docker_client, monkeypatch
):
    name = make_pod(
        """
        echo "token is $CLDPD_TEST_FORWARDED"
        [ "$5" = --resume ] && exit 0
        trap 'exit 130' INT
        while :; do sleep 1 & wait; done
        """,
        pod_json={"inheritEnv": ["CLDPD_TEST_FORWARDED"]},
    )
    monkeypatch.setenv("CLDPD_TEST_FORWARDED", "value-from-the-first-kernel")
    start = dispatcher.start_session(name, URL)
    until(start.events(), f"token is {MASK}")
    monkeypatch.delenv("CLDPD_TEST_FORWARDED")  # a new kernel without the variable
    resume = dispatcher.resume_session(name, "again")
    assert resume.wait(30) == 0
    assert output(resume) == [f"token is {MASK}"]
    assert "value-from-the-first-kernel" not in resume.transcript.read_text()
    dispatcher.stop(name, 10)
    assert container(docker_client, name) is None


def test_attaching_to_a_kept_alive_pod_says_where_its_output_went(
    dispatcher, make_pod, docker_client, transcript_dir
):
    name = make_pod("echo done", pod_json={"keepAlive": True})
    start = dispatcher.start_session(name, URL)
    assert start.wait(30) == 0
    attach = Dispatcher(dispatcher.pods_dir, DockerRunner(), transcript_dir).attach_session(name)
    notice = next(e for e in attach.events() if e.type is E.STDERR)
    assert "kept alive" in notice.data and str(start.transcript) in notice.data
    attach.stop(10)
    assert container(docker_client, name) is None


def test_pod_already_running(dispatcher, make_pod, pods_dir, transcript_dir):
    name = make_pod(IDLE)
    session = dispatcher.start_session(name, URL)
    until(session.events(), "ready")
    with pytest.raises(PodRunningError, match=name):
        dispatcher.start_session(name, URL, run=name)
    other = Dispatcher(pods_dir, DockerRunner(), transcript_dir)
    with pytest.raises(PodRunningError, match=f"cldpd-{name}"):
        other.start_session(name, URL, run=name)
    assert other.sessions == []
    dispatcher.stop(name, 10)


ANOTHER_KERNEL = """
import sys
from cldpd_magic import Dispatcher
dispatcher = Dispatcher(sys.argv[1], transcript_dir=sys.argv[2])
session = dispatcher.start_session(sys.argv[3], sys.argv[4])
print(session.id, flush=True)
session.wait()
"""


def test_attach_replays_a_pod_started_by_another_process(
    dispatcher, make_pod, pods_dir, transcript_dir, docker_client
):
    name = make_pod(
        """
        echo "first line"
        echo "to stderr" >&2
        while [ ! -f /tmp/go ]; do sleep 0.2; done
        echo "last line"
        exit 7
        """
    )
    kernel = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(ANOTHER_KERNEL), str(pods_dir),
         str(transcript_dir), name, URL],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        session_id = kernel.stdout.readline().strip()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = container(docker_client, name)
            if found is not None and found.status == "running":
                break
            time.sleep(0.1)
    finally:
        kernel.send_signal(signal.SIGKILL)
        kernel.wait(10)
        kernel.stdout.close()
    assert session_id.startswith(f"{name}-")
    (running,) = [r for r in dispatcher.running() if r.pod == name]
    assert running.session_id == session_id

    session = dispatcher.attach_session(name)
    events = session.events()
    until(events, "first line")
    container(docker_client, name).exec_run(["touch", "/tmp/go"])
    assert session.wait(60) == 7
    assert session.kind == "attach"
    assert output(session) == ["first line", "last line"]
    assert output(session, E.STDERR) == ["to stderr"]
    assert container(docker_client, name) is None


def test_a_prompt_over_the_argument_limit_is_one_sentence(dispatcher, make_pod, docker_client):
    """The kernel's limit is exact: the longest prompt runs, one byte more is refused up front."""
    directive = f"\n\nWork on this GitHub issue: {URL}"
    longest = "t" * (MAX_ARGUMENT_BYTES - len(directive))
    name = make_pod('eval "prompt=\\${$#}"; echo "${#prompt}"', template=longest)
    start = dispatcher.start_session(name, URL)
    assert start.wait(60) == 0
    assert output(start) == [str(MAX_ARGUMENT_BYTES)]

    (dispatcher.pods_dir / name / "template.md").write_text("t" * 200_000)
    with pytest.raises(InvalidRequestError) as info:
        dispatcher.start_session(name, URL)
    message = str(info.value)
    assert "131071 bytes" in message and "MAX_ARG_STRLEN" in message and "template.md" in message
    assert "argument list too long" not in message.lower()
    assert container(docker_client, name) is None


def test_a_resume_prompt_over_the_limit_or_with_a_nul_is_one_sentence(
    dispatcher, make_pod, docker_client
):
    name = make_pod('echo "ran with ${#7} bytes"', pod_json={"keepAlive": True})
    assert dispatcher.start_session(name, URL).wait(60) == 0
    try:
        with pytest.raises(
            InvalidRequestError, match=r"The prompt is 200000 bytes, over the 131071"
        ):
            dispatcher.resume_session(name, "r" * 200_000)
        with pytest.raises(InvalidRequestError, match="The prompt contains a NUL character"):
            dispatcher.resume_session(name, "before\0after")
        resume = dispatcher.resume_session(name, "r" * 1000)
        assert resume.wait(60) == 0
    finally:
        dispatcher.stop(name, 10)
    assert container(docker_client, name) is None


def test_pods_differing_only_in_case_run_their_own_images(dispatcher, make_pod, docker_client):
    base = f"case{uuid.uuid4().hex[:8]}"
    lower, upper = make_pod("echo lower", name=base), make_pod("echo upper", name=base.upper())
    image = dispatcher.pod(upper).image
    try:
        for name, said in ((lower, "lower"), (upper, "upper"), (lower, "lower")):
            session = dispatcher.start_session(name, URL)
            assert session.wait(60) == 0
            assert output(session) == [said]
        # The upper-case pod's build did not replace the lower-case pod's image.
        assert any("up to date" in line for line in output(session, E.BUILD_OUTPUT))
        assert docker_client.images.get(image).id != docker_client.images.get(f"cldpd-{base}").id
    finally:
        docker_client.images.remove(image, noprune=True)
