"""The Dispatcher over a FakeRunner: commands, prompts, labels, env, errors, stop (no Docker)."""

from __future__ import annotations

import io
import threading
import uuid

import pytest
from fakes import ISSUE_URL as URL
from fakes import AgentCall, FakeRunner, idle_agent, write_pod

from cldpd_magic import (
    BuildFailedError,
    ContainerFailedError,
    Dispatcher,
    DockerRunner,
    DockerUnavailableError,
    EventType,
    InvalidPodError,
    InvalidRequestError,
    PodNotFoundError,
    PodRunningError,
    Runner,
    SessionNotFoundError,
)
from cldpd_magic.pods import Pod, PodConfig
from cldpd_magic.runs.agent import MAX_ARGUMENT_BYTES, MAX_COMMAND_LINE_BYTES
from cldpd_magic.runs.jobs import IDLE_COMMAND, RunJobs
from cldpd_magic.runs.registry import (
    LABEL_CLAUDE_SESSION,
    LABEL_KEEP_ALIVE,
    LABEL_POD,
    LABEL_SESSION,
    RunningPod,
)
from cldpd_magic.runs.session import Session
from cldpd_magic.secrets import MASK

E = EventType
DIRECTIVE = f"Work on this GitHub issue: {URL}"
HEAD = ["claude", "-p", "--output-format", "stream-json", "--verbose"]


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def dispatcher(pods_dir, transcript_dir, runner) -> Dispatcher:
    return Dispatcher(pods_dir, runner, transcript_dir)


def types(session) -> list[EventType]:
    return [e.type for e in session.events()]


def command_uuid(cmd: list[str]) -> str:
    assert cmd[5] in ("--session-id", "--resume")
    return cmd[6]


def test_start_runs_the_agent_command_with_template_and_args(dispatcher, runner, pods_dir):
    write_pod(pods_dir, "p", {"args": ["--model", "opus", "--max-turns", "3"]}, "\nBe brief.\n\n")
    session = dispatcher.start_session("p", f"  {URL}\n")
    assert session.wait(10) == 0
    (opts,) = runner.runs
    session_uuid = command_uuid(opts.cmd)
    assert uuid.UUID(session_uuid).version == 4
    prompt = f"Be brief.\n\n{DIRECTIVE}"
    assert opts.cmd == [*HEAD, "--session-id", session_uuid, "--model", "opus", "--max-turns",
                        "3", prompt]  # fmt: skip
    assert session.claude_session == session_uuid
    assert "\n".join(e.data for e in session.events() if e.type is E.OUTPUT) == prompt
    assert (opts.name, opts.image, opts.remove) == ("cldpd-p", "cldpd-p", True)
    assert opts.labels[LABEL_POD] == "p"
    assert opts.labels[LABEL_SESSION] == session.id
    assert opts.labels[LABEL_CLAUDE_SESSION] == session_uuid
    assert (session.kind, session.pod_name, session.container) == ("start", "p", "cldpd-p")


@pytest.mark.parametrize("template", [None, "", " \n\n "])
def test_prompt_without_template_is_the_directive(dispatcher, runner, pods_dir, template):
    write_pod(pods_dir, "p", template=template)
    dispatcher.start_session("p", URL).wait(10)
    assert runner.runs[0].cmd == [*HEAD, "--session-id", command_uuid(runner.runs[0].cmd),
                                  DIRECTIVE]  # fmt: skip


def test_each_start_gets_a_fresh_session_uuid(dispatcher, runner, pods_dir):
    write_pod(pods_dir, "p")
    first = dispatcher.start_session("p", URL)
    first.wait(10)
    second = dispatcher.start_session("p", URL)
    second.wait(10)
    assert first.claude_session != second.claude_session
    assert first.id != second.id
    assert [command_uuid(o.cmd) for o in runner.runs] == [
        first.claude_session,
        second.claude_session,
    ]


def test_run_options_carry_the_pod_config(dispatcher, runner, pods_dir, tmp_path):
    write_pod(
        pods_dir,
        "p",
        {
            "image": "custom:1",
            "env": {"MODE": "fast"},
            "buildArgs": {"VERSION": "2"},
            "workdir": "/w",
            "mounts": [{"source": str(tmp_path), "target": "/src", "readOnly": True}],
        },
    )
    dispatcher.start_session("p", URL).wait(10)
    assert runner.calls[1][0] == "build"
    assert runner.calls[1][1] == ("custom:1", str((pods_dir / "p").resolve()), {"VERSION": "2"})
    (opts,) = runner.runs
    assert (opts.image, opts.env, opts.workdir) == ("custom:1", {"MODE": "fast"}, "/w")
    assert [(m.source, m.target, m.read_only) for m in opts.mounts] == [
        (str(tmp_path), "/src", True)
    ]


def scripted(call: AgentCall) -> int:
    call.out("hello", "world")
    call.err("careful")
    return 0


def test_start_event_order(dispatcher, runner, pods_dir):
    runner.agent = scripted
    write_pod(pods_dir, "p")
    session = dispatcher.start_session("p", URL)
    assert session.wait(10) == 0
    events = list(session.events())
    assert [(e.type, e.data) for e in events] == [
        (E.BUILD_STARTED, "cldpd-p"),
        (E.BUILD_OUTPUT, "Step 1/1 : FROM busybox:latest"),
        (E.BUILD_OUTPUT, "Successfully built"),
        (E.BUILD_COMPLETE, "cldpd-p"),
        (E.CONTAINER_STARTED, "cldpd-p"),
        (E.OUTPUT, "hello"),
        (E.OUTPUT, "world"),
        (E.STDERR, "careful"),
        (E.CONTAINER_EXITED, "0"),
    ]
    assert session.transcript.parent == dispatcher.transcript_dir


def test_build_failure_events_and_error(dispatcher, runner, pods_dir):
    runner.build_error = "Building image cldpd-p failed: exit code 1"
    write_pod(pods_dir, "p")
    session = dispatcher.start_session("p", URL)
    with pytest.raises(BuildFailedError, match="exit code 1") as info:
        session.wait(10)
    assert "Successfully built" in info.value.log_tail
    assert types(session) == [E.BUILD_STARTED, E.BUILD_OUTPUT, E.BUILD_OUTPUT, E.ERROR]
    assert runner.runs == []
    assert session.state == "failed"


def test_resume_command_uses_the_uuid_from_the_container_label(dispatcher, runner, pods_dir):
    write_pod(pods_dir, "p", {"args": ["--model", "opus"]}, "Standing orders.")
    claude_session = str(uuid.uuid4())
    runner.add_container("cldpd-p", {LABEL_POD: "p", LABEL_CLAUDE_SESSION: claude_session})
    prompt = "Now fix {this} and $THAT,\n'quoted' too"
    session = dispatcher.resume_session("p", prompt)
    assert session.wait(10) == 0
    assert runner.execs == [
        ("cldpd-p", [*HEAD, "--resume", claude_session, "--model", "opus", prompt])
    ]
    assert (session.kind, session.claude_session) == ("resume", claude_session)
    assert [(e.type, e.data) for e in session.events()] == [
        (E.CONTAINER_STARTED, "cldpd-p"),
        (E.OUTPUT, "Now fix {this} and $THAT,"),
        (E.OUTPUT, "'quoted' too"),
        (E.CONTAINER_EXITED, "0"),
    ]
    assert runner.built == []
    assert runner.inspect("cldpd-p").running


def start_then_resume_agent(call: AgentCall) -> int:
    if call.kind == "exec":
        call.out(f"resumed {call.cmd[6]}")
        return 5
    return idle_agent(call)


def test_start_then_resume_round_trip(dispatcher, runner, pods_dir):
    runner.agent = start_then_resume_agent
    write_pod(pods_dir, "p")
    start = dispatcher.start_session("p", URL)
    events = start.events()
    assert [next(events).type for _ in range(5)][-1] is E.CONTAINER_STARTED
    resume = dispatcher.resume_session("p", "continue")
    assert resume.wait(10) == 5
    assert [e.data for e in resume.events() if e.type is E.OUTPUT] == [
        f"resumed {start.claude_session}"
    ]
    dispatcher.stop("p", timeout=1)
    assert start.wait(10) == 130
    assert runner.containers == {}


@pytest.mark.parametrize("prompt", ["", "  \n "])
def test_empty_resume_prompt_is_refused(dispatcher, runner, pods_dir, prompt):
    write_pod(pods_dir, "p")
    runner.add_container("cldpd-p", {LABEL_POD: "p"})
    with pytest.raises(InvalidRequestError):
        dispatcher.resume_session("p", prompt)
    assert runner.execs == []


@pytest.mark.parametrize("status", [None, "exited", "created"])
def test_resume_with_nothing_running(dispatcher, runner, pods_dir, status):
    write_pod(pods_dir, "p")
    if status:
        runner.add_container("cldpd-p", {LABEL_POD: "p"}, status=status)
    with pytest.raises(SessionNotFoundError, match="not running"):
        dispatcher.resume_session("p", "go on")
    with pytest.raises(SessionNotFoundError):
        dispatcher.resume("p", "go on")
    assert dispatcher.sessions == []


def test_inherit_env_forwards_set_variables_and_lists_unset_ones(
    dispatcher, runner, pods_dir, monkeypatch
):
    seen: list[dict[str, str]] = []

    def agent(call: AgentCall) -> int:
        seen.append(call.env)
        return 0

    runner.agent = agent
    write_pod(pods_dir, "p", {"env": {"MODE": "x"}, "inheritEnv": ["HOST_SET", "HOST_UNSET"]})
    monkeypatch.delenv("HOST_UNSET", raising=False)
    dispatcher = Dispatcher(pods_dir, runner, dispatcher.transcript_dir)
    monkeypatch.setenv("HOST_SET", "forwarded value")
    session = dispatcher.start_session("p", URL)
    session.wait(10)
    assert seen == [{"MODE": "x", "HOST_SET": "forwarded value"}]
    # Resolved once at start: the values masked are exactly the values forwarded.
    assert runner.runs[0].env == {"MODE": "x", "HOST_SET": "forwarded value"}
    assert session.missing_env == ["HOST_UNSET"]
    notes = [e.data for e in session.events() if e.type is E.BUILD_OUTPUT and "HOST" in e.data]
    assert len(notes) == 1
    assert "HOST_UNSET" in notes[0] and "HOST_SET" not in notes[0].replace("HOST_UNSET", "")


def test_no_missing_env_note_when_everything_is_set(dispatcher, runner, pods_dir, monkeypatch):
    write_pod(pods_dir, "p", {"inheritEnv": ["HOST_SET"]})
    monkeypatch.setenv("HOST_SET", "1")
    session = dispatcher.start_session("p", URL)
    session.wait(10)
    assert session.missing_env == []
    assert [e.data for e in session.events() if e.type is E.BUILD_OUTPUT] == runner.build_lines


HOST_SECRET = "host-secret-0042"
ENV_SECRET = "env-secret-0043"


def leaky(call: AgentCall) -> int:
    call.out(f"inherited={call.env.get('HOST_VALUE')} key={call.env.get('API_KEY')}")
    call.out(f"plain={call.env.get('MODE')}")
    call.err(f"stderr {HOST_SECRET}")
    return 3


def test_secrets_are_masked_in_events_transcript_and_errors(
    dispatcher, runner, pods_dir, monkeypatch
):
    runner.agent = leaky
    runner.build_lines = [f"build saw {ENV_SECRET}"]
    write_pod(
        pods_dir,
        "p",
        {"env": {"API_KEY": ENV_SECRET, "MODE": "visible-value"}, "inheritEnv": ["HOST_VALUE"]},
    )
    monkeypatch.setenv("HOST_VALUE", HOST_SECRET)
    out = io.StringIO()
    with pytest.raises(ContainerFailedError) as info:
        dispatcher.start("p", URL, out)
    session = dispatcher.sessions[0]
    data = [e.data for e in session.events()]
    assert f"inherited={MASK} key={MASK}" in data
    assert "plain=visible-value" in data
    assert f"stderr {MASK}" in data
    assert f"build saw {MASK}" in data
    text = session.transcript.read_text() + out.getvalue() + str(info.value)
    assert HOST_SECRET not in text and ENV_SECRET not in text
    assert "plain=visible-value" in out.getvalue()

    runner.build_error = f"failed with {HOST_SECRET} and {ENV_SECRET}"
    failed = dispatcher.start_session("p", URL)
    with pytest.raises(BuildFailedError) as build_info:
        failed.wait(10)
    error = build_info.value
    for secret in (HOST_SECRET, ENV_SECRET):
        assert secret not in str(error) and secret not in error.log_tail
        assert secret not in failed.transcript.read_text()


def test_resume_masks_secrets_too(dispatcher, runner, pods_dir, monkeypatch):
    runner.agent = leaky
    write_pod(pods_dir, "p", {"env": {"API_KEY": ENV_SECRET}, "inheritEnv": ["HOST_VALUE"]})
    runner.add_container("cldpd-p", {LABEL_POD: "p"})
    monkeypatch.setenv("HOST_VALUE", HOST_SECRET)
    runner.containers["cldpd-p"].opts.env = {"API_KEY": ENV_SECRET, "HOST_VALUE": HOST_SECRET}
    session = dispatcher.resume_session("p", "again")
    assert session.wait(10) == 3
    assert f"inherited={MASK} key={MASK}" in [e.data for e in session.events()]
    assert HOST_SECRET not in session.transcript.read_text()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "ftp://github.com/o/r/issues/1",
        "github.com/o/r/issues/1",
        "https://",
        "https:///o/r/issues/1",
        "https://github.com/o/r/issues/1 and more",
        "javascript:alert(1)",
        "file:///etc/passwd",
    ],
)
def test_bad_url_is_refused_before_anything_runs(dispatcher, runner, pods_dir, url):
    write_pod(pods_dir, "p")
    with pytest.raises(InvalidRequestError, match="is not an issue URL"):
        dispatcher.start_session("p", url)
    with pytest.raises(ValueError):
        dispatcher.start("p", url)
    assert runner.calls == [] and dispatcher.sessions == []


def test_unknown_pod_and_unavailable_docker(dispatcher, runner, pods_dir):
    with pytest.raises(PodNotFoundError):
        dispatcher.start_session("nope", URL)
    write_pod(pods_dir, "p")
    runner.unavailable = DockerUnavailableError("Docker is not reachable; start it.")
    with pytest.raises(DockerUnavailableError):
        dispatcher.start_session("p", URL)
    with pytest.raises(DockerUnavailableError):
        dispatcher.resume_session("p", "go")
    assert runner.built == [] and dispatcher.sessions == []


def test_a_run_running_in_docker_is_refused_and_a_new_start_is_another_run(
    dispatcher, runner, pods_dir
):
    write_pod(pods_dir, "p")
    runner.add_container("cldpd-p", {LABEL_POD: "p"})
    with pytest.raises(PodRunningError, match="already running"):
        dispatcher.start_session("p", URL, run="p")
    assert runner.built == [] and "cldpd-p" in runner.containers
    second = dispatcher.start_session("p", URL)
    assert second.wait(10) == 0
    assert second.run == "p-1" and second.container == "cldpd-p-1"


def test_pod_running_in_this_process_is_refused(dispatcher, runner, pods_dir):
    runner.agent = idle_agent
    runner.hold_build = True
    write_pod(pods_dir, "p")
    session = dispatcher.start_session("p", URL)
    runner.build_started.wait(10)
    with pytest.raises(PodRunningError):
        dispatcher.start_session("p", URL, run="p")
    session.stop(1)
    assert session.wait(0) == -1


def test_exited_cldpd_container_is_replaced(dispatcher, runner, pods_dir):
    write_pod(pods_dir, "p")
    runner.add_container("cldpd-p", {LABEL_POD: "p"}, status="exited")
    assert dispatcher.start_session("p", URL).wait(10) == 0
    assert runner.removed[0] == "cldpd-p"


def test_foreign_container_with_the_pod_name_is_refused(dispatcher, runner, pods_dir):
    write_pod(pods_dir, "p")
    runner.add_container("cldpd-p", {}, status="exited")
    with pytest.raises(PodRunningError, match="not a cldpd pod"):
        dispatcher.start_session("p", URL)
    assert runner.removed == []


def exit_three(call: AgentCall) -> int:
    call.out("some output")
    call.err("some error")
    return 3


def test_blocking_start_checks_the_exit_code(dispatcher, runner, pods_dir, capsys):
    runner.agent = exit_three
    write_pod(pods_dir, "p")
    out = io.StringIO()
    with pytest.raises(ContainerFailedError, match="code 3") as info:
        dispatcher.start("p", URL, out)
    assert info.value.exit_code == 3
    assert out.getvalue() == "some output\n"
    assert capsys.readouterr().err == "some error\n"
    assert dispatcher.start("p", URL, out, check=False) == 3
    runner.agent = scripted
    assert dispatcher.start("p", URL, check=True) == 0
    assert capsys.readouterr().out == "hello\nworld\n"


STREAM = [
    '{"type":"assistant","message":{"content":[{"type":"text","text":"All fixed."},'
    '{"type":"tool_use","name":"Bash","input":{"command":"make test"}}]}}',
    '{"type":"result","subtype":"success","is_error":false,"num_turns":2,'
    '"duration_ms":1500,"result":"All fixed.","total_cost_usd":0.5}',
]


def test_blocking_start_writes_rendered_text_or_raw_lines(dispatcher, runner, pods_dir, capsys):
    runner.agent = lambda call: call.out(*STREAM) or 0
    write_pod(pods_dir, "p")
    out = io.StringIO()
    assert dispatcher.start("p", URL, out) == 0
    assert out.getvalue() == (
        "All fixed.\n▸ Bash: make test\n✓ done · 2 turns · 1.5 s · $0.5000\n"
    )  # the final answer once, no notes of cldpd's own
    assert capsys.readouterr().err == ""
    raw = io.StringIO()
    assert dispatcher.start("p", URL, raw, raw=True) == 0
    assert raw.getvalue() == "\n".join(STREAM) + "\n"


def test_blocking_resume_checks_the_exit_code(dispatcher, runner, pods_dir):
    runner.agent = exit_three
    write_pod(pods_dir, "p")
    runner.add_container("cldpd-p", {LABEL_POD: "p"})
    out = io.StringIO()
    with pytest.raises(ContainerFailedError) as info:
        dispatcher.resume("p", "go", out)
    assert info.value.exit_code == 3
    assert dispatcher.resume("p", "go", out, check=False) == 3
    assert out.getvalue() == "some output\n" * 2


def test_blocking_start_raises_build_errors(dispatcher, runner, pods_dir):
    runner.build_error = "Building image cldpd-p failed: no"
    write_pod(pods_dir, "p")
    with pytest.raises(BuildFailedError):
        dispatcher.start("p", URL, io.StringIO(), check=False)


def test_keep_alive_starts_an_idle_container_and_execs_the_agent(dispatcher, runner, pods_dir):
    runner.agent = scripted
    write_pod(pods_dir, "p", {"keepAlive": True, "args": ["--model", "opus"]})
    session = dispatcher.start_session("p", URL)
    assert session.wait(10) == 0
    (opts,) = runner.runs
    assert runner.calls[2][0] == "start"
    assert opts.cmd == IDLE_COMMAND and opts.remove is False
    assert opts.labels[LABEL_KEEP_ALIVE] == "true"
    agent_cmd = [*HEAD, "--session-id", session.claude_session, "--model", "opus", DIRECTIVE]
    assert runner.execs == [("cldpd-p", agent_cmd)]
    assert types(session)[4:] == [E.CONTAINER_STARTED, E.OUTPUT, E.OUTPUT, E.STDERR,
                                  E.CONTAINER_EXITED]  # fmt: skip
    assert runner.inspect("cldpd-p").running
    assert dispatcher.running()[0].keep_alive

    runner.agent = start_then_resume_agent
    resume = dispatcher.resume_session("p", "more")
    assert resume.wait(10) == 5
    assert runner.execs[1][1][5:7] == ["--resume", session.claude_session]
    assert runner.inspect("cldpd-p").running

    dispatcher.stop("p", timeout=1)
    assert runner.stops == ["cldpd-p"]
    assert runner.containers == {}


def test_stopping_a_keep_alive_start_stops_and_removes_its_container(dispatcher, runner, pods_dir):
    runner.agent = idle_agent
    write_pod(pods_dir, "p", {"keepAlive": True})
    session = dispatcher.start_session("p", URL)
    runner.agent_started.wait(10)
    session.stop(1)
    assert session.wait(0) == 130
    assert runner.stops == ["cldpd-p"]
    assert runner.removed == ["cldpd-p"]  # a stopped run's container goes, kept alive or not


def test_stop_during_a_start_stops_and_removes_the_container(dispatcher, runner, pods_dir):
    runner.agent = idle_agent
    write_pod(pods_dir, "p")
    session = dispatcher.start_session("p", URL)
    runner.agent_started.wait(10)
    assert dispatcher.stop("p", timeout=2) is True
    assert session.done and session.stopped and session.state == "stopped"
    assert session.wait(0) == 130
    assert [e.data for e in session.events()][-2:] == ["got INT", "130"]
    assert ("stop", ("cldpd-p", 2)) in runner.calls
    assert runner.containers == {}
    assert dispatcher.stop("p") is False
    session.stop()


def test_stop_during_the_build_runs_nothing(dispatcher, runner, pods_dir):
    runner.hold_build = True
    write_pod(pods_dir, "p")
    session = dispatcher.start_session("p", URL)
    runner.build_started.wait(10)
    stopper = threading.Thread(target=session.stop, args=(1,))
    stopper.start()
    stopper.join(10)
    assert session.wait(0) == -1
    assert types(session)[-1] is E.ERROR
    assert runner.runs == [] and runner.containers == {}


def idle_resume(dispatcher: Dispatcher, runner: FakeRunner, pods_dir) -> Session:
    """A resume of pod p whose agent runs until stopped."""
    runner.agent = idle_agent
    write_pod(pods_dir, "p")
    runner.add_container("cldpd-p", {LABEL_POD: "p"})
    resume = dispatcher.resume_session("p", "go")
    runner.agent_started.wait(10)
    return resume


def stop_calls(runner: FakeRunner) -> list[str]:
    return [c for c, _ in runner.calls if c.startswith("stop")]


def test_stopping_a_resume_ends_the_exec_only(dispatcher, runner, pods_dir):
    resume = idle_resume(dispatcher, runner, pods_dir)
    resume.stop(1)
    assert resume.wait(0) == 130
    assert stop_calls(runner) == ["stop_exec"]
    assert runner.inspect("cldpd-p").running


def test_dispatcher_stop_ends_resumes_then_the_container(dispatcher, runner, pods_dir):
    resume = idle_resume(dispatcher, runner, pods_dir)
    dispatcher.stop("p", timeout=1)
    assert resume.wait(0) == 130
    assert stop_calls(runner) == ["stop_exec", "stop"]
    assert runner.containers == {}


def test_stop_of_a_pod_that_is_not_running(dispatcher, runner):
    assert dispatcher.stop("nothing-here") is False
    assert runner.removed == []
    runner.add_container("cldpd-ended", {LABEL_POD: "ended"}, status="exited")
    assert dispatcher.stop("ended") is False
    assert runner.removed == ["cldpd-ended"]


def test_running_lists_pods_by_label(dispatcher, runner):
    runner.add_container(
        "cldpd-b",
        {LABEL_POD: "b", LABEL_SESSION: "b-0000beef", LABEL_CLAUDE_SESSION: "u1"},
    )
    runner.add_container("cldpd-a", {LABEL_POD: "a", LABEL_KEEP_ALIVE: "true"}, "exited")
    runner.add_container("other", {"x": "y"})
    running = dispatcher.running()
    assert [(r.pod, r.container, r.status) for r in running] == [
        ("a", "cldpd-a", "exited"),
        ("b", "cldpd-b", "running"),
    ]
    assert isinstance(running[1], RunningPod)
    assert (running[1].session_id, running[1].claude_session) == ("b-0000beef", "u1")
    assert running[0].keep_alive and not running[1].keep_alive


def replay(call: AgentCall) -> int:
    call.out("line from before", "line after")
    return 7


def test_attach_follows_a_container_and_removes_it_when_done(dispatcher, runner, pods_dir):
    runner.agent = replay
    write_pod(pods_dir, "p")
    runner.add_container("cldpd-p", {LABEL_POD: "p"})
    session = dispatcher.attach_session("p")
    assert session.wait(10) == 7
    assert session.kind == "attach"
    assert [(e.type, e.data) for e in session.events()] == [
        (E.CONTAINER_STARTED, "cldpd-p"),
        (E.OUTPUT, "line from before"),
        (E.OUTPUT, "line after"),
        (E.CONTAINER_EXITED, "7"),
    ]
    assert runner.containers == {}


def test_attach_with_nothing_running(dispatcher, runner):
    with pytest.raises(SessionNotFoundError):
        dispatcher.attach_session("p")
    runner.add_container("cldpd-p", {LABEL_POD: "p"}, status="exited")
    with pytest.raises(SessionNotFoundError):
        dispatcher.attach_session("p")


def test_local_sessions(dispatcher, runner, pods_dir):
    write_pod(pods_dir, "a")
    write_pod(pods_dir, "b")
    first = dispatcher.start_session("a", URL)
    first.wait(10)
    runner.hold_build = True
    second = dispatcher.start_session("b", URL)
    runner.build_started.wait(10)
    assert dispatcher.local_sessions() == [first, second]
    assert dispatcher.local_sessions("a") == [first]
    assert dispatcher.local_sessions(active=True) == [second]
    second.stop(1)
    assert dispatcher.local_sessions(active=True) == []


def test_pods_and_pod(dispatcher, pods_dir):
    write_pod(pods_dir, "b")
    write_pod(pods_dir, "a")
    assert [p.name for p in dispatcher.pods()] == ["a", "b"]
    assert dispatcher.pod("a").dir == (pods_dir / "a").resolve()


def test_runners_follow_the_protocol(runner):
    assert isinstance(runner, Runner)
    assert isinstance(DockerRunner(), Runner)


def test_defaults_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CLDPD_PODS_DIR", str(tmp_path / "p"))
    monkeypatch.setenv("CLDPD_SESSIONS_DIR", str(tmp_path / "s"))
    dispatcher = Dispatcher()
    assert (dispatcher.pods_dir, dispatcher.transcript_dir) == (tmp_path / "p", tmp_path / "s")
    assert isinstance(dispatcher.runner, DockerRunner)


def test_stop_refuses_a_name_that_is_not_a_pod_name(dispatcher):
    with pytest.raises(InvalidPodError):
        dispatcher.stop("../etc")


def test_command_lines_the_kernel_would_refuse_are_one_sentence_before_any_work(
    dispatcher, runner, pods_dir, monkeypatch
):
    write_pod(pods_dir, "nul", template="orders\0more")
    write_pod(pods_dir, "big", template="t" * MAX_ARGUMENT_BYTES)
    write_pod(pods_dir, "arg", {"args": ["--model", "op\u0000us"]})
    write_pod(pods_dir, "env", {"env": {"HUGE": "v" * MAX_ARGUMENT_BYTES}})
    write_pod(pods_dir, "all", {"env": {f"V{i}": "v" * 100_000 for i in range(25)}})
    expected = {
        "nul": "The start prompt of pod nul (template.md and the issue line) contains a NUL",
        "big": f"over the {MAX_ARGUMENT_BYTES} bytes Linux allows in one argument (MAX_ARG_STRLEN)"
        "; shorten",
        "arg": "The argument 'op\\x00us' in pod.json args contains a NUL",
        "env": "The environment variable HUGE is",
        "all": f"over the {MAX_COMMAND_LINE_BYTES} bytes Linux allows in all",
    }
    for name, sentence in expected.items():
        with pytest.raises(InvalidRequestError) as info:
            dispatcher.start_session(name, URL)
        assert sentence in str(info.value) and "\n" not in str(info.value)
    assert runner.calls == [] and dispatcher.sessions == []


def test_a_resume_prompt_the_kernel_would_refuse_is_one_sentence(dispatcher, runner, pods_dir):
    write_pod(pods_dir, "p")
    runner.add_container("cldpd-p", {LABEL_POD: "p"})
    with pytest.raises(InvalidRequestError, match="The prompt contains a NUL character"):
        dispatcher.resume_session("p", "a\0b")
    with pytest.raises(InvalidRequestError, match=r"The prompt is 131072 bytes, .*; shorten it\."):
        dispatcher.resume_session("p", "é" * (MAX_ARGUMENT_BYTES // 2 + 1))
    assert runner.execs == []
    assert dispatcher.resume_session("p", "é" * (MAX_ARGUMENT_BYTES // 2)).wait(10) == 0


# -- RunJobs: one build lock per image, while builds of it are under way -------------------


class _HeldBuilds:
    """A runner whose builds wait for ``release``; a tag in ``failing`` then fails."""

    def __init__(self) -> None:
        self.entered: list[str] = []
        self.release = threading.Event()
        self.failing: set[str] = set()

    def build(self, tag, context_dir, build_args=None, on_output=None, cancel=None, engine=""):
        self.entered.append(tag)
        assert self.release.wait(30)
        if tag in self.failing:
            raise BuildFailedError(f"Building image {tag} failed: on purpose")


class _Ctl:
    """What RunJobs.build asks of a session's control."""

    cancelled = threading.Event()

    def check_cancelled(self) -> None:
        pass

    def emit(self, *_args) -> None:
        pass


def _pod(tmp_path, image: str) -> Pod:
    return Pod(image, tmp_path, tmp_path / "Dockerfile", PodConfig(image=image))


def _users(jobs: RunJobs, image: str) -> int:
    entry = jobs._build_locks.get(image)
    return 0 if entry is None else entry.users


def test_builds_of_one_image_take_turns_and_leave_no_lock_behind(tmp_path):
    builds = _HeldBuilds()
    jobs = RunJobs(builds)
    pod = _pod(tmp_path, "one")
    threads = [threading.Thread(target=jobs.build, args=(pod, _Ctl())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(3000):  # until all three hold or wait for the image's lock
        if _users(jobs, "one") == 3:
            break
        threading.Event().wait(0.01)
    # The control: while the builds are under way the map holds the image, with its users.
    assert list(jobs._build_locks) == ["one"] and _users(jobs, "one") == 3
    assert builds.entered == ["one"]  # the others wait: one build at a time
    builds.release.set()
    for thread in threads:
        thread.join(30)
    assert builds.entered == ["one"] * 3
    assert jobs._build_locks == {}


def test_a_build_lock_goes_with_its_last_build_failed_or_not(tmp_path):
    builds = _HeldBuilds()
    builds.release.set()
    builds.failing = {"bad"}
    jobs = RunJobs(builds)
    for i in range(50):
        jobs.build(_pod(tmp_path, f"image{i}"), _Ctl())
    with pytest.raises(BuildFailedError):
        jobs.build(_pod(tmp_path, "bad"), _Ctl())
    assert builds.entered[-1] == "bad" and len(builds.entered) == 51
    assert jobs._build_locks == {}
