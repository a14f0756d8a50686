"""The pod picker as widget state, without a browser: fake runner first, then the real engine."""

from __future__ import annotations

import ast
import html
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakes import ISSUE_URL as URL
from fakes import AgentCall, FakeRunner, echo_agent, fake_claude, idle_agent, line_agent, write_pod
from html_safety import PAYLOADS, html_problems

from cldpd_magic import Dispatcher, DockerUnavailableError, PodPicker
from cldpd_magic.errors import InvalidRequestError, SessionNotFoundError
from cldpd_magic.events import EventType, RunState
from cldpd_magic.picker import Controls, PodControl
from cldpd_magic.picker.state import FollowedRun
from cldpd_magic.render.views import SessionView
from cldpd_magic.runs.registry import LABEL_CLAUDE_SESSION, LABEL_KEEP_ALIVE, LABEL_POD, RunningPod
from cldpd_magic.runs.session import Session
from cldpd_magic.secrets import MASK

SECRET = "s3cr3t-t0ken-value"
#: The style attributes of the details pane.
PICKER_STYLES = ("text-align:left;padding-right:1em", "margin:2px 0")


def wait_for(
    check: Callable[[], bool], picker: PodPicker, timeout: float = 20.0, fail_fast: bool = True
) -> None:
    """Poll until check() holds; fail with the picker's state on timeout or on a failure."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline or (fail_fast and ": failed: " in repr(picker)):
            pytest.fail(f"timed out; picker state:\n{picker!r}\noutput:\n{text_of(picker)}")
        time.sleep(0.02)


def text_of(picker: PodPicker) -> str:
    """The plain text of every entry of the selected pod's Output."""
    return "\n".join(o["data"]["text/plain"] for o in picker.output.outputs)


def status_is(picker: PodPicker, prefix: str) -> Callable[[], bool]:
    return lambda: picker.status.value.startswith(prefix)


@pytest.fixture
def pickers() -> Iterator[list[PodPicker]]:
    """Pickers made by a test; every pod they know is stopped and they are closed after it."""
    made: list[PodPicker] = []
    yield made
    for picker in made:
        picker.join(60)
        for name in picker.pod_select.options:
            picker.dispatcher.stop(name, 2)
        picker.close()


@pytest.fixture
def fake(pods_dir: Path, transcript_dir: Path, pickers: list[PodPicker]):
    """``fake(agent=echo_agent, **kw) -> (picker, runner)`` over the fake runner."""

    def make(
        agent: Callable[[AgentCall], int] = echo_agent, runner: FakeRunner | None = None, **kwargs
    ) -> tuple[PodPicker, FakeRunner]:
        runner = runner or FakeRunner(agent)
        dispatcher = Dispatcher(pods_dir, runner, transcript_dir)
        picker = PodPicker(dispatcher=dispatcher, interval=0.02, stop_timeout=2, **kwargs)
        pickers.append(picker)
        picker.join(10)
        return picker, runner

    return make


def start(picker: PodPicker, name: str, url: str = URL) -> None:
    picker.pod_select.value = name
    picker.issue_url.value = url
    assert not picker.start_button.disabled, repr(picker)
    picker.start_button.click()


def test_pods_are_listed_sorted_broken_ones_too_and_refresh_finds_new_ones(make_pod, fake):
    uid = uuid.uuid4().hex[:6]
    make_pod(name=f"b{uid}")
    make_pod(name=f"a{uid}")
    make_pod(name=f"c{uid}", pod_json="{nope")
    picker, _ = fake()
    assert picker.pod_select.options == (f"a{uid}", f"b{uid}", f"c{uid}")
    assert picker.pod_select.value == f"a{uid}"
    assert picker.status.value == f"a{uid}: not running"
    picker.pod_select.value = f"c{uid}"
    assert "is broken" in picker.details.value
    assert "malformed JSON at line 1, column 2" in picker.details.value
    assert picker.status.value.startswith(f"c{uid}: broken: ")
    picker.issue_url.value = URL
    assert picker.start_button.disabled
    make_pod(name=f"0{uid}")
    picker.refresh_button.click()
    assert picker.pod_select.options[0] == f"0{uid}"
    assert picker.pod_select.value == f"c{uid}"


def test_no_pods_says_how_to_make_one(fake):
    picker, _ = fake()
    assert picker.pod_select.options == ()
    assert "A pod is a directory" in picker.details.value
    assert picker.status.value == "no pod selected"
    picker.issue_url.value = URL
    assert picker.start_button.disabled and picker.stop_button.disabled


def test_details_show_the_pod_with_secrets_masked(make_pod, fake, monkeypatch, tmp_path):
    monkeypatch.setenv("PICKER_GH_TOKEN", SECRET)
    monkeypatch.delenv("PICKER_MISSING", raising=False)
    template = "\n".join(f"order {i}" for i in range(1, 11))
    name = make_pod(
        pod_json={
            "image": "my/agent:1",
            "workdir": "/src",
            "env": {"API_KEY": "k3y-value-1234", "MODE": "fast"},
            "inheritEnv": ["PICKER_GH_TOKEN", "PICKER_MISSING"],
            "mounts": [{"source": str(tmp_path), "target": "/src", "readOnly": True}],
            "args": ["--model", "sonnet", "--token", SECRET],
            "keepAlive": True,
        },
        template=template,
    )
    picker, _ = fake()
    details = picker.details.value
    for shown in (
        "my/agent:1",
        "/src",
        f"API_KEY={MASK}",
        "MODE=fast",
        "PICKER_GH_TOKEN,",
        "PICKER_MISSING (not set on this host)",
        f"{tmp_path} → /src (read-only)",
        "--model sonnet --token",
        "keepAlive",
        "order 6",
        "(+4 more lines)",
    ):
        assert shown in details, shown
    assert "order 7" not in details
    assert SECRET not in details and "k3y-value-1234" not in details
    assert name in details


def test_details_warn_of_what_the_pod_json_waives_escaped(make_pod, fake, tmp_path):
    # A remote mount's path is taken as written: any text, so hostile markup too.
    payloads = [p for p in PAYLOADS if "\x00" not in p]
    sources = [os.path.normpath("/etc/" + p) for p in payloads]
    name = make_pod(
        pod_json={
            "capAdd": ["NET_ADMIN"],
            "mounts": [{"source": s, "target": f"/m{i}", "remote": True}
                       for i, s in enumerate(sources)],
            "unsafe": ["cap:NET_ADMIN", *(f"mount:{s}" for s in sources)],
        }
    )  # fmt: skip
    plain = make_pod()
    picker, _ = fake()
    picker.pod_select.value = name
    details = picker.details.value
    assert html_problems(details, allowed_styles=PICKER_STYLES) == []
    assert (
        '<th style="text-align:left;padding-right:1em">unsafe</th><td>\u26a0 unsafe: adds '
        "NET_ADMIN (changing routes, firewall rules and interfaces: a way around the pod&#x27;s "
        "network limits)</td>"
    ) in details
    assert details.count(">unsafe</th>") == 1 + len(sources)
    assert html.escape("unsafe: mounts /etc/<script>window.pwned=1</script>") in details
    picker.pod_select.value = plain
    assert "unsafe" not in picker.details.value  # the control: no waiver, no warning


def test_start_button_follows_the_url_as_it_is_typed(make_pod, fake):
    make_pod()
    picker, _ = fake()
    assert picker.start_button.disabled
    for value, enabled in [
        ("htt", False),
        ("https://github.com/o/r/issues/1", True),
        ("ftp://github.com/o/r/issues/1", False),
        ("https://", False),
        ("  http://example.com/x  ", True),
        ("", False),
    ]:
        picker.issue_url.value = value
        assert picker.start_button.disabled is not enabled, value
        assert bool(picker.url_hint.value) is (not enabled and bool(value)), value
    picker.start_button.click()  # disabled: nothing happens
    assert picker.join(5) and picker.output.outputs == ()


def test_start_streams_into_the_pods_output_and_ends_in_state(make_pod, fake):
    name = make_pod()
    picker, runner = fake()
    start(picker, name)
    wait_for(status_is(picker, f"{name}: exited 0 after "), picker)
    assert picker.join(10)
    (entry,) = picker.output.outputs
    assert entry["output_type"] == "display_data"
    assert f"Work on this GitHub issue: {URL}" in entry["data"]["text/plain"]
    assert f"Work on this GitHub issue: {URL}" in entry["data"]["text/html"]
    assert "transcript: " in entry["data"]["text/plain"]
    assert picker.progress.value == picker.progress.max == 1
    assert picker.progress.bar_style == "success"
    assert not picker.start_button.disabled
    assert picker.resume_button.disabled and picker.prompt.disabled
    assert picker.stop_button.disabled and picker.attach_button.disabled
    assert runner.containers == {}


def test_handlers_return_at_once_and_a_stop_during_the_build_is_a_stop(make_pod, fake):
    name = make_pod()
    picker, runner = fake()
    runner.hold_build = True
    runner.build_lines = ["Step 1/3 : FROM busybox", "Step 2/3 : COPY claude /x"]
    start(picker, name)
    assert picker.start_button.disabled
    assert runner.build_started.wait(10)
    wait_for(lambda: picker.progress.value == 2, picker)
    assert picker.progress.max == 3
    assert picker.status.value.startswith(f"{name}: building ")
    assert not picker.stop_button.disabled and picker.resume_button.disabled
    picker.stop_button.click()
    wait_for(status_is(picker, f"{name}: stopped"), picker)
    assert picker.progress.bar_style == "warning"
    assert picker.join(10)
    assert not picker.start_button.disabled and picker.stop_button.disabled
    assert runner.runs == []


def test_errors_are_one_sentence_in_the_status(make_pod, fake):
    name = make_pod()
    picker, runner = fake()
    runner.unavailable = DockerUnavailableError(
        "Docker is not reachable (no socket); start the Docker engine or set DOCKER_HOST."
    )
    start(picker, name)
    assert picker.join(10)
    assert picker.status.value == (
        f"{name}: failed: Docker is not reachable (no socket); start the Docker engine "
        "or set DOCKER_HOST."
    )
    assert not picker.start_button.disabled
    runner.unavailable = None
    runner.build_error = "Building image x failed: RUN false returned 1."
    picker.start_button.click()
    wait_for(status_is(picker, f"{name}: failed: Building image x failed"), picker, fail_fast=False)
    assert picker.progress.bar_style == "danger"
    assert "Traceback" not in picker.status.value + text_of(picker)


def test_keep_alive_pod_is_resumed_then_stopped(make_pod, fake):
    name = make_pod(pod_json={"keepAlive": True})
    picker, runner = fake()
    start(picker, name)
    wait_for(status_is(picker, f"{name}: exited 0"), picker)
    assert picker.status.value.endswith("container idle: resume or stop")
    assert not picker.resume_button.disabled and not picker.prompt.disabled
    assert picker.start_button.disabled and not picker.stop_button.disabled
    picker.prompt.value = "now write the tests\nand run them"
    picker.resume_button.click()
    wait_for(lambda: len(picker.output.outputs) == 2 and picker.status.value.startswith(
        f"{name}: exited 0"), picker)  # fmt: skip
    assert picker.join(10)
    second = picker.output.outputs[1]["data"]["text/plain"]
    assert "» now write the tests (+1 lines)" in second
    assert "and run them" in second
    assert picker.prompt.value == ""
    assert runner.execs[-1][1][5:7] == ["--resume", runner.runs[0].labels[LABEL_CLAUDE_SESSION]]
    picker.stop_button.click()
    wait_for(lambda: picker.status.value == f"{name}: stopped", picker)
    assert picker.resume_button.disabled and picker.stop_button.disabled
    assert runner.containers == {}


def test_resume_errors_are_shown_and_the_prompt_kept(make_pod, fake):
    name = make_pod(pod_json={"keepAlive": True})
    picker, runner = fake()
    start(picker, name)
    wait_for(status_is(picker, f"{name}: exited 0"), picker)
    picker.prompt.value = "   "
    picker.resume_button.click()
    assert picker.join(10)
    assert picker.status.value == (
        f"{name}: failed: The prompt is empty; say what the agent should do next."
    )
    runner.containers.clear()  # the container went away behind our back
    picker.prompt.value = "go on"
    picker.resume_button.click()
    assert picker.join(10)
    assert picker.status.value.startswith(f"{name}: failed: Pod {name} is not running")
    assert picker.prompt.value == "go on"
    assert picker.resume_button.disabled and not picker.start_button.disabled


def prompt_then_wait(call: AgentCall) -> int:
    call.out(f"agent says {call.cmd[-1]}")
    call.stopped.wait(30)
    return 130


def test_two_pods_run_at_once_each_with_its_own_output(make_pod, fake):
    uid = uuid.uuid4().hex[:6]
    one, two = make_pod(name=f"a{uid}"), make_pod(name=f"b{uid}")
    picker, runner = fake(prompt_then_wait)
    start(picker, one, URL + "1")
    start(picker, two, URL + "2")
    wait_for(lambda: "issues/12" in text_of(picker), picker)
    assert picker.status.value.startswith(f"{two}: running")
    picker.pod_select.value = one
    wait_for(lambda: "issues/11" in text_of(picker), picker)
    assert "issues/12" not in text_of(picker)
    assert picker.status.value.startswith(f"{one}: running")
    assert picker.start_button.disabled and not picker.stop_button.disabled
    first_output = picker.output
    picker.stop_button.click()
    wait_for(status_is(picker, f"{one}: stopped"), picker)
    picker.pod_select.value = two
    assert picker.output is not first_output
    assert picker.status.value.startswith(f"{two}: running")
    picker.stop_button.click()
    wait_for(status_is(picker, f"{two}: stopped"), picker)
    assert runner.containers == {}


def test_output_stays_bounded(make_pod, fake):
    name = make_pod(pod_json={"keepAlive": True})

    def chatty(call: AgentCall) -> int:
        if "--resume" in call.cmd:
            return echo_agent(call)
        call.out(*(f"line {i}" for i in range(500)))
        return 0

    picker, _ = fake(chatty, max_lines=20, max_runs=2)
    start(picker, name)
    wait_for(status_is(picker, f"{name}: exited 0"), picker)
    (entry,) = picker.output.outputs
    text = entry["data"]["text/plain"]
    assert "line 499" in text and "line 400" not in text
    assert "earlier lines not shown" in text
    for prompt in ("one", "two", "three"):
        picker.prompt.value = prompt
        picker.resume_button.click()
        assert picker.join(10)
    outputs = picker.output.outputs
    assert len(outputs) == 3
    assert outputs[0]["data"]["text/plain"].startswith("… 2 earlier run(s) not shown")
    assert "» two" in outputs[1]["data"]["text/plain"]
    assert "» three" in outputs[2]["data"]["text/plain"]


def test_pod_running_at_open_is_shown_attached_resumed_and_stopped(make_pod, fake, pods_dir):
    name = make_pod()

    def agent(call: AgentCall) -> int:
        if call.kind == "exec":
            call.out(f"resumed with {call.cmd[-1]}")
            return 0
        call.out("output from before the picker opened")
        call.stopped.wait(30)
        return 130

    runner = FakeRunner(agent)
    runner.add_container(
        f"cldpd-{name}", {LABEL_POD: name, LABEL_KEEP_ALIVE: "false", LABEL_CLAUDE_SESSION: "u1"}
    )
    picker, _ = fake(runner=runner)
    wait_for(status_is(picker, f"{name}: running in container cldpd-{name}"), picker)
    assert picker.start_button.disabled is True
    assert not picker.attach_button.disabled and not picker.resume_button.disabled
    picker.attach_button.click()
    wait_for(lambda: "output from before the picker opened" in text_of(picker), picker)
    assert picker.status.value.startswith(f"{name}: running ")
    assert picker.attach_button.disabled
    picker.prompt.value = "carry on"
    picker.resume_button.click()
    wait_for(lambda: "resumed with carry on" in text_of(picker), picker)
    picker.stop_button.click()
    wait_for(status_is(picker, f"{name}: stopped"), picker)
    assert picker.join(10)
    assert set(runner.stops) == {f"cldpd-{name}"}


def test_a_session_of_the_same_dispatcher_is_followed_on_attach(make_pod, fake):
    name = make_pod()
    picker, runner = fake(idle_agent)
    session = picker.dispatcher.start_session(name, URL)  # as %cldpd_start -b would
    assert runner.agent_started.wait(10)
    picker.refresh()
    wait_for(lambda: not picker.attach_button.disabled, picker)
    picker.attach_button.click()
    wait_for(lambda: "working" in text_of(picker), picker)
    assert runner.calls.count(("logs", (f"cldpd-{name}",))) == 0
    picker.stop_button.click()
    wait_for(status_is(picker, f"{name}: stopped"), picker)
    assert session.done and session.stopped


def test_close_stops_publication_not_the_pods(make_pod, fake):
    name = make_pod()
    picker, runner = fake(idle_agent)
    start(picker, name)
    wait_for(lambda: "working" in text_of(picker), picker)
    output, status = picker.output, picker.status
    picker.close()
    shown, state = output.outputs, status.value
    assert picker.closed and "(closed)" in repr(picker)
    assert f"cldpd-{name}" in runner.containers
    picker.dispatcher.stop(name, 2)
    assert picker.join(10)
    assert output.outputs == shown and status.value == state
    assert picker._repr_mimebundle_() == {"text/plain": repr(picker)}


def test_repr_and_mimebundle(make_pod, fake):
    uid = uuid.uuid4().hex[:6]
    make_pod(name=f"a{uid}")
    make_pod(name=f"b{uid}", pod_json="[]")
    picker, _ = fake()
    text = repr(picker)
    head, first, second = text.splitlines()
    assert head == f"PodPicker: 2 pods in {picker.pods_dir}"
    assert first == f"* a{uid}: not running"
    assert second.startswith(f"  b{uid}: broken: ")
    assert second.endswith("pod.json: 'pod.json' must be a JSON object, got an array.")
    bundle = picker._repr_mimebundle_()
    assert bundle["text/plain"] == text
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_a_worker_error_never_escapes_as_a_traceback(make_pod, fake, monkeypatch):
    name = make_pod()
    picker, _ = fake()

    def broken(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(picker.dispatcher, "start_session", broken)
    seen: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    start(picker, name)
    assert picker.join(10)
    assert picker.status.value == f"{name}: failed: RuntimeError: boom"
    assert seen == []


# -- the real engine ------------------------------------------------------------------

AGENT = """
# pod {uid}: no image layer is shared with another test's pods
trap 'echo "got INT"; exit 130' INT TERM
case "$5" in
  --resume) echo "resumed $6 with: $7"; exit 0 ;;
esac
echo "marker-$POD_MARK for: $6"
[ -n "$HOLD" ] && while :; do sleep 1; echo "still-$POD_MARK"; done
exit 0
"""


def agent() -> str:
    """The agent script, unique to the pod so that concurrent builds share no cached layer."""
    return AGENT.replace("{uid}", uuid.uuid4().hex)


@pytest.fixture
def real(pods_dir: Path, transcript_dir: Path, pickers: list[PodPicker], docker_client):
    """A picker over the real engine."""

    def make() -> PodPicker:
        picker = PodPicker(
            dispatcher=Dispatcher(pods_dir, transcript_dir=transcript_dir),
            interval=0.05,
            stop_timeout=3,
        )
        pickers.append(picker)
        return picker

    return make


def test_docker_start_output_resume_and_stop(make_pod, real, docker_client):
    name = make_pod(agent(), pod_json={"keepAlive": True, "env": {"POD_MARK": "one"}})
    picker = real()
    start(picker, name)
    wait_for(status_is(picker, f"{name}: exited 0"), picker, timeout=90)
    assert "marker-one for: " in text_of(picker)
    assert picker.progress.bar_style == "success" and picker.progress.value == picker.progress.max
    assert not picker.resume_button.disabled
    picker.prompt.value = "next step"
    picker.resume_button.click()
    wait_for(lambda: "with: next step" in text_of(picker), picker, timeout=30)
    wait_for(status_is(picker, f"{name}: exited 0"), picker)
    assert docker_client.containers.get(f"cldpd-{name}").status == "running"
    picker.stop_button.click()
    wait_for(lambda: picker.status.value == f"{name}: stopped", picker, timeout=30)
    assert not docker_client.containers.list(all=True, filters={"name": f"cldpd-{name}"})


def test_docker_two_pods_at_once(make_pod, real):
    one = make_pod(agent(), pod_json={"env": {"POD_MARK": "one", "HOLD": "1"}})
    two = make_pod(agent(), pod_json={"env": {"POD_MARK": "two", "HOLD": "1"}})
    picker = real()
    start(picker, one)
    start(picker, two)
    wait_for(lambda: "marker-two" in text_of(picker), picker, timeout=90)
    picker.pod_select.value = one
    wait_for(lambda: "marker-one" in text_of(picker), picker, timeout=90)
    assert "marker-two" not in text_of(picker)
    assert picker.status.value.startswith(f"{one}: running")
    picker.stop_button.click()
    picker.pod_select.value = two
    assert picker.status.value.startswith(f"{two}: running")
    assert "marker-one" not in text_of(picker)
    picker.stop_button.click()
    wait_for(status_is(picker, f"{two}: stopped"), picker, timeout=30)
    picker.pod_select.value = one
    wait_for(status_is(picker, f"{one}: stopped"), picker, timeout=30)
    assert "got INT" in text_of(picker)


def test_docker_pod_running_before_the_picker_opened(make_pod, real, pods_dir, transcript_dir):
    name = make_pod(agent(), pod_json={"env": {"POD_MARK": "early", "HOLD": "1"}})
    other_kernel = Dispatcher(pods_dir, transcript_dir=transcript_dir)
    session = other_kernel.start_session(name, URL)
    try:
        for event in session.events():
            if event.type.value == "output":
                break
        picker = real()
        wait_for(status_is(picker, f"{name}: running in container"), picker, timeout=30)
        picker.attach_button.click()
        wait_for(lambda: "still-early" in text_of(picker), picker, timeout=30)
        assert "marker-early" in text_of(picker)  # replayed from the container's start
        picker.prompt.value = "steer"
        picker.resume_button.click()
        wait_for(lambda: "with: steer" in text_of(picker), picker, timeout=30)
        picker.stop_button.click()
        wait_for(status_is(picker, f"{name}: stopped"), picker, timeout=30)
        assert session.wait(30) in (130, 137, 143)
    finally:
        session.stop(2)


def test_paths_show_as_a_person_writes_them(tmp_path, monkeypatch):
    from pathlib import Path

    from cldpd_magic.picker.details import display_path

    monkeypatch.chdir(tmp_path)
    assert display_path(tmp_path / "pods" / "demo") == "pods/demo"
    assert display_path(Path.home() / ".cldpd" / "pods") == "~/.cldpd/pods"
    assert display_path("/elsewhere/pods") == "/elsewhere/pods"


# -- the controller alone: what the picker knows of a pod, read through its sessions ---------


def held_session(transcript_dir: Path, kind: str = "start") -> tuple[Session, threading.Event]:
    """A session that runs (CONTAINER_STARTED) until the returned event is set, then exits 0."""
    release = threading.Event()

    def job(ctl) -> int:
        ctl.emit(EventType.CONTAINER_STARTED, "cldpd-p")
        ctl.set_stopper(lambda _t: release.set())
        release.wait(30)
        return 0

    session = Session("p", "cldpd-p", job, transcript_dir, kind=kind)
    next(e for e in session.events() if e.type is EventType.CONTAINER_STARTED)
    return session, release


def followed(session: Session) -> FollowedRun:
    return FollowedRun(session, SessionView("p", session=session))


def test_controls_follow_the_sessions_state(transcript_dir):
    control = PodControl("p", None, None)
    assert control.controls(url_ok=True) == Controls(False, False, False, False)  # broken pod
    session, release = held_session(transcript_dir)
    control.begin_launch("starting")
    assert control.status_text() == "p: starting…"
    assert control.controls(True) == Controls(start=False, resume=False, stop=True, attach=False)
    run = followed(session)
    assert control.add_run(run) is False
    assert control.alive and control.controls(True) == Controls(False, True, True, False)
    assert control.status_text() == "p: running 0s"
    release.set()
    session.wait(10)
    assert not control.alive  # read from the session: no flag of the controller's changed
    control.run_ended(run)
    assert not control.idle and control.controls(True).stop is False
    assert control.status_text().startswith("p: exited 0 after ")


def test_a_stop_asked_before_the_session_exists_stops_it_when_it_comes(transcript_dir):
    control = PodControl("p", None, None)
    control.begin_launch("starting")
    control.begin_stop()
    assert control.status_text() == "p: stopping…" and control.busy
    assert not control.controls(True).stop  # one stop at a time
    session, _release = held_session(transcript_dir)
    run = followed(session)
    assert control.add_run(run) is True
    session.stop(1)
    control.run_ended(run)
    control.stop_done()
    assert session.state is RunState.STOPPED
    assert control.note == "" and control.status_text() == "p: stopped (exit 0)"
    assert not control.busy and not control.alive


def test_a_look_up_shows_a_pod_started_elsewhere_unless_the_picker_knows_better(
    transcript_dir,
):
    elsewhere = RunningPod("p", "cldpd-p", "running", "p-1", "", False, "2026-01-01T10:00:00", "")
    control = PodControl("p", None, None)
    control.begin_launch("attaching")
    assert control.seen(elsewhere) is False and control.outside is None
    control.launch_failed(SessionNotFoundError("Pod p is not running; nothing to attach to."))
    assert control.status_text() == "p: failed: Pod p is not running; nothing to attach to."
    assert control.seen(elsewhere) is True and control.alive
    assert control.controls(False) == Controls(start=False, resume=True, stop=True, attach=True)
    control.begin_launch("resuming")
    control.launch_failed(SessionNotFoundError("Pod p is not running; start it first."))
    assert control.outside is None and not control.alive  # it was gone after all
    control.seen(elsewhere)
    control.begin_stop()
    control.stop_done()
    assert control.status_text() == "p: stopped" and control.outside is None


# -- what is free of ipywidgets ------------------------------------------------------------

PICKER = Path(__file__).resolve().parent.parent / "cldpd_magic" / "picker"
#: What the picker knows and does, and the details pane: none of them imports ipywidgets.
WIDGET_FREE = ("state", "actions", "details", "approvals")


def test_state_actions_and_details_import_no_ipywidgets():
    for name in WIDGET_FREE:
        tree = ast.parse((PICKER / f"{name}.py").read_text(encoding="utf-8"))
        imported = [
            alias.name if isinstance(node, ast.Import) else node.module or ""
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        ]
        assert not [n for n in imported if n.split(".")[0] == "ipywidgets"], name
    # At run time too, through everything they import: with ipywidgets made unimportable,
    # they load and work; the layout, the control, cannot.
    code = (
        "import sys\n"
        "sys.modules['ipywidgets'] = None\n"
        "from cldpd_magic.picker import Controls, PodActions, PodControl, pod_details_html\n"
        "import cldpd_magic.picker.state, cldpd_magic.picker.actions, cldpd_magic.picker.details\n"
        "from cldpd_magic.picker import ApprovalQueue\n"
        "print(ApprovalQueue().items())\n"
        "control = PodControl('p', None, None)\n"
        "print(control.controls(True), control.status_text())\n"
        "try:\n"
        "    from cldpd_magic.picker import PodPicker\n"
        "except ImportError:\n"
        "    print('the layout needs ipywidgets')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "[]",
        "Controls(start=False, resume=False, stop=False, attach=False, interrupt=False) "
        "p: not running",
        "the layout needs ipywidgets",
    ]


# -- interactive runs: one approval queue across runs, interrupt, live follow-ups -------


def interactive_pod(pods_dir: Path, name: str, template: str = "", **config) -> str:
    write_pod(pods_dir, name, {"interactive": True, **config}, template=template or None)
    return name


def labels(rows) -> list[str]:
    return [row.label.value for row in rows.rows]


def test_one_queue_across_runs_newest_last_each_answered_on_its_own(pods_dir, fake):
    first = interactive_pod(pods_dir, "first", "ask before you touch")
    second = interactive_pod(pods_dir, "second", "ask as well")
    quiet = interactive_pod(pods_dir, "quiet", "nothing to approve")
    picker, _runner = fake(runner=FakeRunner(line_agent(fake_claude)))
    start(picker, first)
    wait_for(lambda: labels(picker.approvals) == ["first: Bash: touch asked.txt"], picker)
    start(picker, quiet)
    start(picker, second)
    wait_for(lambda: len(picker.approvals.rows) == 2, picker)
    assert labels(picker.approvals) == ["first: Bash: touch asked.txt",
                                        "second: Bash: touch asked.txt"]  # fmt: skip
    assert picker.approvals.widget.children == tuple(r.widget for r in picker.approvals.rows)
    picker.approvals.rows[1].deny_button.click()  # the second run's only
    wait_for(status_is(picker, "second: exited 0"), picker)
    assert labels(picker.approvals) == ["first: Bash: touch asked.txt"]
    session = picker.control("second").runs[-1].session
    assert any("not allowed: The user denied" in e.data for e in session.events())
    assert not picker.control("first").runs[-1].session.done  # still waiting for its answer
    picker.approvals.rows[0].allow_button.click()
    picker.pod_select.value = first
    wait_for(status_is(picker, "first: exited 0"), picker)
    wait_for(lambda: picker.approvals.rows == [], picker)
    assert "touched asked.txt" in text_of(picker)


def test_a_question_answered_by_code_leaves_the_queue_and_a_late_click_says_so(pods_dir, fake):
    name = interactive_pod(pods_dir, "asks", "ask")
    picker, _runner = fake(runner=FakeRunner(line_agent(fake_claude)))
    start(picker, name)
    wait_for(lambda: len(picker.approvals.rows) == 1, picker)
    (row,) = picker.approvals.rows
    session = picker.control(name).runs[-1].session
    session.decide(session.pending()[0].request_id, allow=False, message="no")
    wait_for(lambda: picker.approvals.rows == [], picker)
    assert picker.approvals.widget.children == ()
    row.allow_button.click()  # a click on the row just gone: one sentence, nothing else
    assert "no pending approval" in picker.notice.value
    assert row.allow_button.disabled


def test_a_secret_or_markup_in_a_tool_call_shows_masked_and_as_text(pods_dir, fake):
    payload = PAYLOADS[0]

    def asks_with(call: AgentCall, line: str) -> None:
        frame = json.loads(line)
        if frame.get("type") == "user":
            request = {"subtype": "can_use_tool", "tool_name": "Bash",
                       "input": {"command": f"curl -H {SECRET} {payload}"}}  # fmt: skip
            call.out(
                __import__("json").dumps(
                    {"type": "control_request", "request_id": "r1", "request": request}
                )
            )
        else:
            fake_claude(call, line)

    name = interactive_pod(pods_dir, "secretive", env={"API_TOKEN": SECRET})
    picker, _runner = fake(runner=FakeRunner(line_agent(asks_with)))
    start(picker, name)
    wait_for(lambda: len(picker.approvals.rows) == 1, picker)
    (row,) = picker.approvals.rows
    assert SECRET not in row.label.value and MASK in row.label.value
    assert payload in row.label.value  # a Label shows text: markup stays text
    assert isinstance(row.label, __import__("ipywidgets").Label)
    row.deny_button.click()


def test_interrupt_button_ends_the_turn_and_resume_sends_a_live_follow_up(pods_dir, fake):
    name = interactive_pod(pods_dir, "kept", "slow", keepAlive=True)
    picker, runner = fake(runner=FakeRunner(line_agent(fake_claude)))
    assert picker.interrupt_button.disabled
    start(picker, name)
    wait_for(lambda: not picker.interrupt_button.disabled, picker)
    session = picker.control(name).runs[-1].session
    assert not session.conversation.waiting.is_set()  # its slow turn runs
    picker.interrupt_button.click()
    wait_for(lambda: session.conversation.waiting.is_set(), picker)
    wait_for(lambda: picker.status.value.endswith("waiting for a prompt: resume or stop"), picker)
    assert any('"interrupt"' in line for line in runner.stdins[0].lines)
    assert not picker.resume_button.disabled
    picker.prompt.value = "now the real thing"
    picker.resume_button.click()
    wait_for(lambda: len(picker.output.outputs) == 2, picker)
    follow = picker.control(name).runs[-1]
    assert follow.session.wait(10) == 0 and follow.session.kind == "resume"
    wait_for(lambda: "done: now the real thing" in text_of(picker), picker)
    assert len([cmd for _, cmd in runner.execs if "--input-format" in cmd]) == 1  # one agent
    assert not session.done  # the run stayed
    picker.stop_button.click()
    wait_for(lambda: picker.status.value == f"{name}: stopped", picker)
    assert picker.interrupt_button.disabled


def test_a_failed_interrupt_is_one_sentence_in_the_status(pods_dir, fake, monkeypatch):
    name = interactive_pod(pods_dir, "kept", "slow", keepAlive=True)
    picker, _runner = fake(runner=FakeRunner(line_agent(fake_claude)))
    start(picker, name)
    wait_for(lambda: not picker.interrupt_button.disabled, picker)
    session = picker.control(name).runs[-1].session

    def refuse() -> None:
        raise InvalidRequestError("The agent of run kept refused interrupt: busy.")

    monkeypatch.setattr(session, "interrupt", refuse)
    picker.interrupt_button.click()
    wait_for(lambda: "interrupt failed" in picker.status.value, picker, fail_fast=False)
    assert picker.status.value == (
        "kept: interrupt failed: The agent of run kept refused interrupt: busy."
    )
    picker.stop_button.click()
    wait_for(status_is(picker, f"{name}: stopped"), picker, fail_fast=False)


def test_batch_panel_queues_the_runs_approvals_and_interrupts_one(pods_dir, transcript_dir):
    from cldpd_magic.picker import BatchPanel

    interactive_pod(pods_dir, "fleet")
    runner = FakeRunner(line_agent(fake_claude))
    dispatcher = Dispatcher(pods_dir, runner, transcript_dir)
    variants = [{"name": "asks", "prompt": "ask first"}, {"name": "slow", "prompt": "slow"}]
    batch = dispatcher.dispatch("fleet", URL, variants=variants, repeats=2, max_parallel=4)
    panel = BatchPanel(batch, interval=0.02, stop_timeout=2)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
            len(panel.approvals.rows) < 2 or len(panel.run_select.options) < 4
        ):  # the panel shows the runs and the approvals as its publisher gets to them
            time.sleep(0.02)
        rows = panel.approvals.rows
        assert len(batch.runs) == 4 and len(rows) == 2  # both waiting at once, one queue
        asking = {s.run for s in batch.runs if s.pending()}
        assert {row.item.run for row in rows} == asking
        assert all(row.label.value.endswith(": Bash: touch asked.txt") for row in rows)
        assert [r.item.time for r in rows] == sorted(r.item.time for r in rows)
        rows[0].allow_button.click()
        rows[1].deny_button.click()
        slow = [s for s in batch.runs if s.run not in asking]
        panel.run_select.value = slow[0].run
        panel.interrupt_button.click()
        panel.run_select.value = slow[1].run
        panel.interrupt_button.click()
        batch.wait(timeout=20)
        assert all(s.done for s in batch.runs), [s.state for s in batch.runs]
        assert [s.exit_code for s in batch.runs if s.run in asking] == [0, 0]
        assert panel.join(10) and panel.approvals.rows == []
        assert panel.interrupt_button.disabled
    finally:
        batch.stop()
        panel.close()


def test_every_hostile_payload_in_a_tool_call_reads_as_clean_masked_text(transcript_dir):
    from types import SimpleNamespace

    from cldpd_magic.events import Event
    from cldpd_magic.picker.approvals import pending_from
    from cldpd_magic.secrets import Masker

    run = SimpleNamespace(run="r", mask=Masker([SECRET]))
    escapes = "\x1b[31m\x1b]0;title\x07\u202e"
    for payload in PAYLOADS:
        data = {"request_id": "q", "tool": f"Bash{escapes}",
                "input": {"command": f"{SECRET} {escapes} {payload}"}}  # fmt: skip
        item = pending_from(
            run, Event(EventType.PERMISSION_REQUEST, __import__("json").dumps(data))
        )
        assert item is not None and item.tool == "Bash", payload
        assert SECRET not in item.call and MASK in item.call, payload
        assert not any(c in item.call for c in "\x1b\x07\u202e"), repr(item.call)
    unreadable = Event(EventType.PERMISSION_REQUEST, "{not json")
    assert pending_from(run, unreadable) is None  # a control: bad data asks nothing
