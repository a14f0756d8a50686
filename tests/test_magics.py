"""The magics in an IPython shell: parsing, help, errors, completion, config, streaming.

Most tests drive tests/fakes.py's FakeRunner (no Docker); one runs a real pod on the engine.
"""

from __future__ import annotations

import _thread
import sys
import threading
import time
import warnings

import pytest
from fakes import ISSUE_URL as URL
from fakes import (
    FakeRunner,
    echo_agent,
    fake_claude,
    idle_agent,
    line_agent,
    lines_agent,
    write_pod,
)
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets import TraitError

from cldpd_magic.arguments import RUN_HELP
from cldpd_magic.errors import DockerUnavailableError
from cldpd_magic.magics.run import (
    CldpdMagics,
    HideFollowedResult,
    keep_question_marks,
    positional_names,
    split_prompt,
)
from cldpd_magic.runs.registry import LABEL_CLAUDE_SESSION, LABEL_POD, LABEL_SESSION
from cldpd_magic.runs.session import Session

MAGICS = (
    "cldpd_start", "cldpd_resume", "cldpd_stop", "cldpd_pods", "cldpd_sessions",
    "cldpd_attach", "cldpd_picker", "cldpd_interrupt",
)  # fmt: skip


def pretend_running(runner: FakeRunner, pod: str) -> None:
    """A pod's container running, started by another kernel."""
    labels = {LABEL_POD: pod, LABEL_SESSION: f"{pod}-elsewhere", LABEL_CLAUDE_SESSION: "uuid-1"}
    runner.add_container(f"cldpd-{pod}", labels)


def magics_of(shell: InteractiveShell) -> CldpdMagics:
    return shell.magics_manager.registry["CldpdMagics"]


@pytest.fixture
def fake(ip) -> FakeRunner:
    runner = FakeRunner(lines_agent("hello"))
    magics_of(ip).runner = runner
    yield runner
    runner.release()


def views(captured) -> list:
    """The session views among captured displays (RichOutput: data, transient, update)."""
    return [o for o in captured.outputs if "cldpd-view" in o.data.get("text/html", "")]


def display_id(output) -> str | None:
    return output.transient.get("display_id")


def cell_views(captured) -> list:
    """The views a cell shows: those displayed in it and updates of those.

    The capture takes whatever is published while it runs, also a live run's updates of
    its view in an earlier cell; a frontend shows those there, by display id, not here.
    """
    shown = views(captured)
    own = {display_id(o) for o in shown if not o.update}
    return [o for o in shown if not o.update or display_id(o) in own]


def last_text(captured) -> str:
    """The plain text of the last view the cell shows (see :func:`cell_views`)."""
    return cell_views(captured)[-1].data["text/plain"]


def one_line_error(shell, magic: str, line: str, match: str) -> str:
    with pytest.raises(UsageError, match=match) as info:
        shell.run_line_magic(magic, line)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# -- help and parsing -----------------------------------------------------------------


@pytest.mark.parametrize("name", MAGICS)
def test_every_magic_has_help(ip, name):
    with capture_output() as captured:
        ip.run_cell(f"%{name}?")
    assert f"%{name}" in captured.stdout
    assert len(ip.find_line_magic(name).__doc__.strip()) > 40


def test_start_help_shows_its_arguments(ip):
    doc = ip.find_line_magic("cldpd_start").__doc__
    for word in ("-b", "--background", "--pods-dir", "pod", "issue_url", "Returns the Session"):
        assert word in doc


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("", "required"),
        ("pod", "required"),
        (f"pod {URL} extra", "unrecognized"),
        ("--bogus pod " + URL, "unrecognized"),
        ('pod "unbalanced', "check the quotes"),
        ("pod ftp://example.com/1", "is not an issue URL"),
        ("pod not-a-url", "is not an issue URL"),
        (f"nope {URL}", "No pod named 'nope'"),
        (f"../x {URL}", "not a valid pod name"),
    ],
)
def test_start_refuses_bad_input_in_one_line(ip, fake, line, match):
    one_line_error(ip, "cldpd_start", line, match)
    assert fake.runs == [] and fake.built == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("pod do it", (False, "pod", "do it")),
        ("-b pod  do {x} and $y ", (True, "pod", "do {x} and $y")),
        ('pod "quoted prompt"', (False, "pod", "quoted prompt")),
        ("--background pod 'it''s'", (True, "pod", "it''s")),
        ('pod say "hi" now', (False, "pod", 'say "hi" now')),
        ("pod", (False, "pod", "")),
    ],
)
def test_split_prompt_keeps_the_prompt_verbatim(line, expected):
    assert split_prompt(line) == expected


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("", "Name the run"),
        ("-x pod hi", "Unknown option -x"),
        ("pod", "The prompt is empty"),
        ("pod ''", "The prompt is empty"),
        ("nope hi", "No pod named 'nope'"),
    ],
)
def test_resume_refuses_bad_input_in_one_line(ip, fake, line, match):
    one_line_error(ip, "cldpd_resume", line, match)


def test_resume_of_a_pod_not_running_says_so(ip, fake, make_pod):
    name = make_pod()
    one_line_error(ip, "cldpd_resume", f"{name} go on", f"Pod {name} is not running")


# -- streaming through a fake runner ------------------------------------------------------


def test_start_streams_into_one_display_and_returns_the_session(ip, fake, make_pod):
    fake.agent = lines_agent(*(f"line {i}" for i in range(30)))
    magics_of(ip).max_output_lines = 10
    name = make_pod()
    with capture_output() as captured:
        session = ip.run_line_magic("cldpd_start", f"{name} {URL}")
    assert isinstance(session, Session) and session.exit_code == 0
    assert repr(session).count("\n") == 0 and session.id in repr(session)
    shown = views(captured)
    assert not shown[0].update
    assert all(o.update for o in shown[1:])
    assert {o.transient["display_id"] for o in shown} == {shown[0].transient["display_id"]}
    final = shown[-1].data["text/plain"]
    assert final.startswith(f"{name}: exited 0 after")
    assert "line 29" in final and "line 10\n" not in final
    assert "earlier lines not shown" in final
    assert f"transcript: {session.transcript}" in final
    assert captured.stdout == ""


def test_a_bare_blocking_magic_shows_no_result_but_an_assigned_one_keeps_it(ip, fake, make_pod):
    name, fresh = make_pod(), make_pod()
    pretend_running(fake, name)
    with capture_output() as captured:
        bare = [
            ip.run_cell(f"%cldpd_start {fresh} {URL}"),
            ip.run_cell(f"%cldpd_resume {name} go on"),
            ip.run_cell(f"%%cldpd_resume {name}\ngo on\n"),
            ip.run_cell(f"%cldpd_attach {name}"),
        ]
        kept = ip.run_cell(f"s = %cldpd_start {fresh} {URL}")
        shown = ip.run_cell("s")
        pretend_running(fake, name)  # the attach followed its container to its end
        background = ip.run_cell(f"%cldpd_resume -b {name} go on")
    assert [r.error_in_exec for r in bare] == [None] * 4
    assert [r.result for r in bare] == [None] * 4
    assert kept.result is None
    assert shown.result is ip.user_ns["s"]
    assert isinstance(shown.result, Session)
    assert isinstance(background.result, Session)
    assert captured.stdout.count("<Session") == 2  # s, and the -b resume


def test_background_start_returns_at_once_and_stop_ends_it(ip, fake, make_pod):
    fake.agent = idle_agent
    name = make_pod()
    with capture_output() as captured:
        session = ip.run_line_magic("cldpd_start", f"-b {name} {URL}")
        assert not session.done
        assert fake.agent_started.wait(10)
        report = ip.run_line_magic("cldpd_sessions", "")
        pods = ip.run_line_magic("cldpd_pods", "")
        ip.run_line_magic("cldpd_stop", name)
        assert magics_of(ip).feeds[session.id].join(10)
    assert session.state == "stopped"
    assert f"cldpd-{name}" in fake.stops
    assert f"Pod {name} stopped." in captured.stdout
    row = report["containers"].records()[0]
    assert (row["pod"], row["status"], row["this kernel"]) == (name, "running", "yes")
    sessions = report["sessions"].records()
    assert [(r["session"], r["state"]) for r in sessions] == [(session.id, "running")]
    assert pods.records()[0]["running"] == "running"
    final = last_text(captured)
    assert final.startswith(f"{name}: stopped")


def test_resume_sends_the_prompt_verbatim(ip, fake, make_pod):
    name = make_pod()
    fake.agent = echo_agent
    pretend_running(fake, name)
    ip.user_ns["x"] = "EXPANDED"
    with capture_output() as captured:
        session = ip.run_line_magic("cldpd_resume", f"{name} fix {{x}} and $x")
        ip.run_cell(f'%cldpd_resume {name} "quoted words"')
        ip.run_cell_magic("cldpd_resume", name, "line one\nline {x}\n")
        ip.run_cell(f"%cldpd_resume {name} Why did it fail?")
    prompts = [cmd[-1] for _container, cmd in fake.execs]
    assert prompts == ["fix {x} and $x", "quoted words", "line one\nline {x}", "Why did it fail?"]
    cmd = fake.execs[0][1]
    assert cmd[cmd.index("--resume") + 1] == "uuid-1"
    assert session.kind == "resume" and session.exit_code == 0
    shown = views(captured)
    assert shown[0].data["text/plain"].startswith(f"{name} resume: starting")
    firsts = [o for o in shown if o.transient["display_id"] == shown[0].transient["display_id"]]
    assert "\nfix {x} and $x\n" in firsts[-1].data["text/plain"]
    assert f"{name} resume: exited 0" in firsts[-1].data["text/plain"]


def test_cell_resume_wants_the_prompt_in_the_body_only(ip, fake, make_pod):
    name = make_pod()
    pretend_running(fake, name)
    with pytest.raises(UsageError, match="the prompt is the cell body"):
        ip.run_cell_magic("cldpd_resume", f"{name} also here", "body\n")


def _interrupt_when(event: threading.Event) -> None:
    def fire() -> None:
        if event.wait(10):
            time.sleep(0.1)
            _thread.interrupt_main()

    threading.Thread(target=fire, daemon=True).start()


@pytest.mark.parametrize("kind", ["start", "resume"])
def test_interrupt_stops_gracefully_and_says_so(ip, fake, make_pod, kind):
    fake.agent = idle_agent
    name = make_pod()
    if kind == "resume":
        pretend_running(fake, name)
        line, stops = f"{name} go", ["stop_exec", "stop"]
    else:
        line, stops = f"{name} {URL}", ["stop"]
    what = f"pod {name} stopped"
    _interrupt_when(fake.agent_started)
    with capture_output() as captured, pytest.raises(UsageError, match="Interrupted") as info:
        ip.run_line_magic(f"cldpd_{kind}", line)
    assert what in str(info.value)
    # A resume's agent ends its turn through its exec first; then the pod stops.
    stop_calls = [call[0] for call in fake.calls if call[0] in ("stop_exec", "stop")]
    assert stop_calls[: len(stops)] == stops
    assert f"cldpd-{name}" in fake.stops
    final = last_text(captured)
    assert f"interrupted: {what}" in final
    assert "stopped" in final.splitlines()[0]


def test_a_second_interrupt_during_the_stop_kills_the_pod(ip, fake, make_pod):
    fake.agent = idle_agent
    name = make_pod()
    timeouts: list[float] = []
    graceful = threading.Event()
    real_stop = fake.stop

    def slow_stop(container: str, timeout: float = 10.0) -> None:
        timeouts.append(timeout)
        if timeout > 0:
            graceful.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # a pod slow to end its turn
                time.sleep(0.01)
        real_stop(container, timeout)

    fake.stop = slow_stop
    _interrupt_when(fake.agent_started)
    _interrupt_when(graceful)
    with capture_output() as captured, pytest.raises(UsageError) as info:
        ip.run_line_magic("cldpd_start", f"{name} {URL}")
    assert str(info.value) == f"Interrupted: pod {name} killed."
    assert timeouts[0] == magics_of(ip).stop_timeout
    assert 0.0 in timeouts
    assert f"interrupted: pod {name} killed" in last_text(captured)


def test_a_failed_build_is_one_line_and_shown(ip, fake, make_pod):
    fake.build_error = "The image of pod x did not build: step 1 failed."
    name = make_pod()
    with capture_output() as captured:
        message = one_line_error(ip, "cldpd_start", f"{name} {URL}", "did not build")
    assert message.startswith(f"{name} failed:")
    assert "failed: The image of pod x did not build" in last_text(captured)


def test_docker_errors_are_one_sentence(ip, fake, make_pod):
    import docker.errors

    name = make_pod()
    fake.unavailable = DockerUnavailableError("Docker is not reachable; start it.")
    one_line_error(ip, "cldpd_start", f"{name} {URL}", "^Docker is not reachable; start it.$")
    fake.unavailable = docker.errors.APIError("500 Server Error\nfor url: http://x")
    message = one_line_error(ip, "cldpd_start", f"{name} {URL}", "^Docker error: ")
    assert "for url" in message
    pods = ip.run_line_magic("cldpd_pods", "")
    assert pods.records()[0]["running"] == "?"
    assert "Docker did not answer" in pods.notes[0]
    report = ip.run_line_magic("cldpd_sessions", "")
    assert "Docker did not answer" in report["containers"].notes[0]


# -- pods, sessions, stop, picker -------------------------------------------------------


def test_pods_table_lists_good_and_broken_pods(ip, fake, make_pod, tmp_path):
    good = make_pod(
        pod_json={
            "image": "img:1", "workdir": "/work", "inheritEnv": ["GH_TOKEN"],
            "mounts": [{"source": str(tmp_path), "target": "/src", "readOnly": True}],
            "env": {"API_KEY": "hush-hush-value"},
        },
        template="Be brief.",
        name="a-good",
    )  # fmt: skip
    plain = make_pod(name="b-plain")
    broken = make_pod(pod_json="{nope", name="c-broken")
    pretend_running(fake, plain)
    table = ip.run_line_magic("cldpd_pods", "")
    rows = {r["pod"]: r for r in table.records()}
    assert rows[good] == {
        "pod": good, "image": "img:1", "workdir": "/work", "mounts": f"{tmp_path}:/src:ro",
        "forwards": "GH_TOKEN", "template": "yes", "running": "no", "problem": "",
    }  # fmt: skip
    assert (rows[plain]["image"], rows[plain]["running"]) == (f"cldpd-{plain}", "running")
    assert "malformed JSON at line 1, column 2" in rows[broken]["problem"]
    html = table._repr_html_()
    assert "<table" in html and "hush-hush-value" not in html + repr(table)


def test_pods_table_marks_unsafe_pods_and_says_each_waived_danger(ip, fake, make_pod, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    link = tmp_path / "link"
    link.symlink_to(data)
    waived = make_pod(
        pod_json={
            "network": "host",
            "capAdd": ["sys_admin"],
            "mounts": [
                {"source": "/etc", "target": "/host-etc"}, {"source": str(link), "target": "/d"},
            ],
            "unsafe": ["network:host", "cap:SYS_ADMIN", "mount:/etc"],
        },
        name="a-waived",
    )  # fmt: skip
    plain = make_pod(name="b-plain")
    table = ip.run_line_magic("cldpd_pods", "")
    rows = {r["pod"]: r for r in table.records()}
    assert rows[waived]["unsafe"] == "\u26a0 network:host, cap:SYS_ADMIN, mount:/etc"
    assert rows[plain]["unsafe"] == "" and "problem" not in rows[plain]
    assert rows[waived]["mounts"] == f"/etc:/host-etc, {data}:/d"  # the link, resolved
    said = [n for n in table.notes if n.startswith(f"\u26a0 {waived}: ")]
    assert said == [
        f"\u26a0 {waived}: unsafe: shares the host's network (the host's own network: "
        "every service of the host and its loopback)",
        f"\u26a0 {waived}: unsafe: adds SYS_ADMIN (mount and most kernel administration: "
        "the usual way out of a container)",
        f"\u26a0 {waived}: unsafe: mounts /etc (the system directory /etc: the host's own files)",
    ]
    assert said[2] in repr(table) and "mounts /etc (the system directory" in table._repr_html_()


def test_pods_table_names_a_dangerous_pod_json_as_broken(ip, fake, make_pod):
    name = make_pod(pod_json={"mounts": [{"source": "/var/run/docker.sock", "target": "/s"}]})
    row = ip.run_line_magic("cldpd_pods", "").records()[0]
    assert row["pod"] == name and "unsafe" not in row
    assert "the Docker API (root on the host)" in row["problem"]
    assert 'add "mount:/run/docker.sock" to "unsafe"' in row["problem"]


def test_pods_table_of_an_empty_directory_says_what_a_pod_is(ip, fake):
    table = ip.run_line_magic("cldpd_pods", "")
    assert len(table) == 0
    assert "a pod is a directory with a Dockerfile" in repr(table)
    one_line_error(ip, "cldpd_pods", "extra", "unrecognized arguments: extra")


def test_stop_of_unknown_or_idle_pods(ip, fake, make_pod):
    one_line_error(ip, "cldpd_stop", "ghost", "No pod named 'ghost'")
    one_line_error(ip, "cldpd_stop", "", "required")
    name = make_pod()
    with capture_output() as captured:
        ip.run_line_magic("cldpd_stop", name)
    assert captured.stdout == f"Pod {name} is not running; nothing to stop.\n"
    pretend_running(fake, "elsewhere")
    with capture_output() as captured:
        ip.run_line_magic("cldpd_stop", "elsewhere --timeout 1")
    assert ("stop", ("cldpd-elsewhere", 1.0)) in fake.calls
    assert captured.stdout == "Pod elsewhere stopped.\n"


def test_attach_to_a_pod_not_running_says_so(ip, fake):
    one_line_error(ip, "cldpd_attach", "ghost", "Pod ghost is not running; nothing to attach")


def test_picker_import_failure_is_one_sentence(ip, monkeypatch):
    monkeypatch.setitem(sys.modules, "cldpd_magic.picker", None)
    one_line_error(ip, "cldpd_picker", "", "^The pod picker cannot be loaded")


def test_picker_is_displayed(ip, fake, make_pod):
    pytest.importorskip("cldpd_magic.picker")
    make_pod()
    with capture_output() as captured:
        assert ip.run_line_magic("cldpd_picker", "") is None
    assert len(captured.outputs) == 1


# -- completion, config, unload ---------------------------------------------------------


def completions(shell: InteractiveShell, line: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # complete() is pending
        return shell.Completer.complete(line_buffer=line)[1]


def test_pod_names_complete_after_pod_magics(ip, make_pod, tmp_path):
    for name in ("alpha", "beta", "bravo"):
        make_pod(name=name)
    other = tmp_path / "other"
    (other / "zulu").mkdir(parents=True)
    (other / "zulu" / "Dockerfile").write_text("FROM busybox\n")
    assert completions(ip, "%cldpd_start ") == ["alpha", "beta", "bravo"]
    assert completions(ip, "%cldpd_start b") == ["beta", "bravo"]
    assert completions(ip, "%cldpd_start -b al") == ["alpha"]
    assert completions(ip, f"%cldpd_start --pods-dir {other} ") == ["zulu"]
    assert completions(ip, "%cldpd_resume -b br") == ["bravo"]
    assert completions(ip, "%%cldpd_resume be") == ["beta"]
    assert completions(ip, "%cldpd_stop a") == ["alpha"]
    assert completions(ip, "%cldpd_attach a") == ["alpha"]
    assert "alpha" not in completions(ip, "%cldpd_start alpha ")
    assert "alpha" not in completions(ip, "%cldpd_pods ")
    assert "%cldpd_start" in completions(ip, "%cldpd_sta")


def test_resume_attach_and_stop_take_a_run(ip):
    magics = magics_of(ip)
    for name in ("cldpd_resume", "cldpd_attach", "cldpd_stop"):
        parser = getattr(magics, name).parser
        assert positional_names(parser)[0] == "run", name
        assert "RUN" in parser.format_usage() and RUN_HELP in parser.format_help(), name
    assert positional_names(magics.cldpd_start.parser)[0] == "pod"  # the control: a pod


def test_the_completer_reads_each_magics_parser(ip, make_pod, tmp_path):
    make_pod(name="alpha")
    other = tmp_path / "other"
    (other / "zulu").mkdir(parents=True)
    (other / "zulu" / "Dockerfile").write_text("FROM busybox\n")
    assert completions(ip, "%cldpd_stop --timeout 5 a") == ["alpha"]
    assert "alpha" not in completions(ip, "%cldpd_stop --timeout ")
    assert completions(ip, f"%cldpd_start --pods-dir={other} z") == ["zulu"]
    assert "alpha" not in completions(ip, "%cldpd_resume alpha ")


def test_resume_options_come_from_its_parser(ip, fake):
    message = one_line_error(ip, "cldpd_resume", "--pods-dir x pod hi", "Unknown option")
    assert message == "Unknown option --pods-dir; the options are -b/--background."


def test_a_transcript_that_cannot_be_written_is_said_instead_of_its_path(
    ip, fake, make_pod, tmp_path
):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    magics_of(ip).transcript_dir = str(blocked)
    name = make_pod()
    with capture_output() as captured:
        session = ip.run_line_magic("cldpd_start", f"{name} {URL}")
        report = ip.run_line_magic("cldpd_sessions", "")
    assert session.transcript_error
    final = last_text(captured)
    assert "transcript:" not in final
    assert session.transcript_error in final
    assert report["sessions"].records()[0]["transcript"] == session.transcript_error


def test_settings_are_config_traits(ip, pods_dir, tmp_path):
    magics = magics_of(ip)
    assert magics.pods_dir == str(pods_dir)
    first = magics.dispatcher
    assert first.pods_dir == pods_dir and magics.dispatcher is first
    ip.run_line_magic("config", f"CldpdMagics.pods_dir = {str(tmp_path)!r}")
    ip.run_line_magic("config", "CldpdMagics.max_output_lines = 7")
    ip.run_line_magic("config", "CldpdMagics.flush_interval = 0.5")
    assert magics.dispatcher.pods_dir == tmp_path
    assert (magics.max_output_lines, magics.flush_interval) == (7, 0.5)
    ip.run_line_magic("config", "CldpdMagics.max_output_lines = 0")  # logged, refused
    assert magics.max_output_lines == 7
    with pytest.raises(TraitError):
        magics.flush_interval = 0
    with capture_output() as captured:
        ip.run_line_magic("config", "CldpdMagics")
    for name in ("pods_dir", "transcript_dir", "max_output_lines", "flush_interval"):
        assert name in captured.stdout


def test_pods_dir_option_overrides_one_call(ip, fake, tmp_path):
    other = tmp_path / "elsewhere"
    message = one_line_error(ip, "cldpd_start", f"--pods-dir {other} nope {URL}", "No pod")
    assert str(other) in message
    assert magics_of(ip).dispatcher.pods_dir != other


def test_unload_removes_magics_completer_and_config_and_leaves_pods_running(ip, fake, make_pod):
    fake.agent = idle_agent
    name = make_pod()
    magics = magics_of(ip)
    with capture_output():
        session = ip.run_line_magic("cldpd_start", f"-b {name} {URL}")
    matchers = list(ip.Completer.custom_matchers)
    ip.extension_manager.unload_extension("cldpd_magic")
    try:
        for magic in MAGICS:
            assert ip.find_line_magic(magic) is None
        assert ip.find_cell_magic("cldpd_resume") is None
        assert "CldpdMagics" not in ip.magics_manager.registry
        assert magics not in ip.configurables
        assert len(ip.Completer.custom_matchers) == len(matchers) - 1
        assert keep_question_marks not in ip.input_transformers_cleanup
        assert not [t for t in ip.ast_transformers if isinstance(t, HideFollowedResult)]
        assert completions(ip, f"%cldpd_start {name[:3]}") == []
        assert not session.done
    finally:
        ip.extension_manager.load_extension("cldpd_magic")
        session.stop()
    assert session.state == "stopped"
    assert ip.find_line_magic("cldpd_start") is not None
    assert magics_of(ip) is not magics


# -- the real engine ----------------------------------------------------------------------


@pytest.mark.docker
def test_a_real_pod_through_the_shell(ip, docker_client, make_pod):
    name = make_pod(
        """
        trap 'echo bye; exit 0' INT TERM
        echo "up: $7"
        while :; do sleep 1 & wait $!; done
        """
    )
    with capture_output() as captured:
        session = ip.run_line_magic("cldpd_start", f"-b {name} {URL}")
        deadline = time.monotonic() + 60
        while session.state != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        report = ip.run_line_magic("cldpd_sessions", "")
        ip.run_line_magic("cldpd_stop", name)
        assert magics_of(ip).feeds[session.id].join(10)
    rows = [r for r in report["containers"].records() if r["pod"] == name]
    assert rows and rows[0]["status"] == "running" and rows[0]["this kernel"] == "yes"
    assert session.state == "stopped"
    final = last_text(captured)
    assert f"up: Work on this GitHub issue: {URL}" in final and "bye" in final
    assert not docker_client.containers.list(all=True, filters={"name": f"^cldpd-{name}$"})


# -- interactive runs: approval rows, follow-ups and interrupts in the cell ------------


@pytest.fixture
def claude(ip, monkeypatch, pods_dir) -> FakeRunner:
    """The magics over the scripted interactive Claude Code, in a frontend that shows
    widgets (a kernel's); ``claude.pod(template, **pod_json)`` writes an interactive pod."""
    runner = FakeRunner(line_agent(fake_claude))
    magics_of(ip).runner = runner
    monkeypatch.setattr(CldpdMagics, "live", lambda self: True)
    made = iter(range(1, 100))

    def pod(template: str = "", **config) -> str:
        name = f"live{next(made)}"
        write_pod(pods_dir, name, {"interactive": True, **config}, template=template or None)
        return name

    runner.pod = pod
    yield runner
    for dispatcher in magics_of(ip).dispatchers():
        for session in dispatcher.local_sessions(active=True):
            session.stop(2)
    runner.release()


def rows_of(ip, session):
    """The approval rows shown under a session's output in its cell."""
    return magics_of(ip).approvals[session.id]


def until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return check()


def widget_shown(captured) -> bool:
    """Whether a widget (the approval rows) was displayed among the captured outputs."""
    return any("application/vnd.jupyter.widget-view+json" in o.data for o in captured.outputs)


def test_an_approval_shows_as_a_row_under_the_output_and_allow_runs_the_tool(ip, claude):
    name = claude.pod("Please ask first.")
    with capture_output() as captured:
        session = ip.run_line_magic("cldpd_start", f"-b {name} {URL}")
        rows = rows_of(ip, session)
        (row,) = until(lambda: rows.rows)
        assert row.label.value == "Bash: touch asked.txt"
        assert [b.description for b in row.buttons] == ["Allow", "Deny", "Always allow Bash"]
        assert rows.widget.children == (row.widget,)
        assert not session.done  # the agent waits for the answer
        row.allow_button.click()
        assert session.wait(10) == 0
        assert until(lambda: rows.widget.children == ())
        assert magics_of(ip).feeds[session.id].join(10)
    assert widget_shown(captured)
    final = last_text(captured)
    assert "⚠ approval needed: Bash: touch asked.txt" in final
    assert "✓ allowed Bash (by you)" in final and "touched asked.txt" in final


def test_deny_and_always_reach_the_agent_and_a_row_goes_when_code_answers(ip, claude):
    name = claude.pod("ask")
    with capture_output() as captured:
        denied = ip.run_line_magic("cldpd_start", f"-b {name} {URL}")
        (row,) = until(lambda: rows_of(ip, denied).rows)
        row.deny_button.click()
        assert denied.wait(10) == 0 and magics_of(ip).feeds[denied.id].join(10)
        text = last_text(captured)
        assert "⊘ denied Bash: The user denied this tool call." in text
        assert "not allowed: The user denied this tool call." in text

        other = claude.pod("ask")
        always = ip.run_line_magic("cldpd_start", f"-b {other} {URL}")
        (row,) = until(lambda: rows_of(ip, always).rows)
        row.always_button.click()
        assert always.wait(10) == 0

        third = claude.pod("ask")
        by_code = ip.run_line_magic("cldpd_start", f"-b {third} {URL}")
        rows = rows_of(ip, by_code)
        until(lambda: rows.rows)
        (request,) = by_code.pending()
        by_code.decide(request.request_id, allow=True)  # answered elsewhere: the row goes
        assert until(lambda: rows.rows == [])
        assert by_code.wait(10) == 0
    decisions = [e.data for e in always.events() if e.type.value == "permission_decision"]
    assert '"always": true' in decisions[0]


def test_no_row_for_a_run_that_asks_nothing_nor_for_a_one_shot_run(ip, claude, make_pod):
    name = claude.pod()  # the start prompt asks nothing
    with capture_output():
        session = ip.run_line_magic("cldpd_start", f"{name} {URL}")
    assert session.exit_code == 0
    assert rows_of(ip, session).rows == []
    claude.agent = lines_agent("hello")
    plain = make_pod()
    with capture_output() as captured:
        one_shot = ip.run_line_magic("cldpd_start", f"{plain} {URL}")
    assert one_shot.id not in magics_of(ip).approvals and not widget_shown(captured)


def test_a_blocking_start_takes_an_answer_while_it_waits(ip, claude):
    name = claude.pod("ask")

    def answer() -> None:  # what a click does, from elsewhere while the cell blocks
        session = until(lambda: next(iter(magics_of(ip).sessions()), None))
        row = until(lambda: session.id in magics_of(ip).approvals and rows_of(ip, session).rows)
        row[0].allow_button.click()

    clicker = threading.Thread(target=answer, daemon=True)
    clicker.start()
    with capture_output() as captured:
        session = ip.run_line_magic("cldpd_start", f"{name} {URL}")
    clicker.join(10)
    assert session.exit_code == 0
    assert "touched asked.txt" in last_text(captured)


def test_a_kept_alive_run_returns_when_it_waits_then_resume_is_a_live_follow_up(ip, claude):
    name = claude.pod(keepAlive=True)
    with capture_output() as started:
        start = ip.run_line_magic("cldpd_start", f"{name} {URL}")
        assert not start.done and start.conversation.waiting.is_set()  # returned: it waits
        with capture_output() as resumed:
            follow = ip.run_line_magic("cldpd_resume", f"{name} and add tests")
    assert follow.exit_code == 0 and follow.kind == "resume"
    assert len([cmd for _, cmd in claude.execs if "--input-format" in cmd]) == 1  # one agent
    # The start's feed goes on updating its own cell's view while the resume runs: the
    # resume cell shows one new view, its own, and those updates go to the start's cell.
    (shown,) = [o for o in views(resumed) if not o.update]
    start_id = display_id(views(started)[0])
    assert {display_id(o) for o in views(resumed)} <= {display_id(shown), start_id}
    turn = last_text(resumed)
    assert turn.startswith(f"{name} resume: exited 0") and "done: and add tests" in turn
    assert "Work on this GitHub issue" not in turn  # only the turn it caused
    assert views(started)  # the start's cell showed the run, and goes on showing everything:
    start_view = magics_of(ip).feeds[start.id].view
    assert until(lambda: "done: and add tests" in start_view.bundle()["text/plain"])
    assert not start.done
    with capture_output() as stopped:
        ip.run_line_magic("cldpd_stop", name)
    assert f"Pod {name} stopped." in stopped.stdout
    assert start.wait(10) is not None


def test_interrupt_ends_the_turn_and_keeps_the_run(ip, claude):
    name = claude.pod("slow", keepAlive=True)
    with capture_output() as captured:
        start = ip.run_line_magic("cldpd_start", f"-b {name} {URL}")
        until(lambda: any("control_request" not in e.data and '"init"' in e.data
                          for e in list_events(start)))  # fmt: skip
        assert not start.conversation.waiting.is_set()
        ip.run_line_magic("cldpd_interrupt", name)
        assert until(lambda: start.conversation.waiting.is_set())
        follow = ip.run_line_magic("cldpd_resume", f"{name} now the real thing")
        assert follow.exit_code == 0
        ip.run_line_magic("cldpd_stop", name)
        assert magics_of(ip).feeds[start.id].join(10)
    assert f"Run {name} interrupted" in captured.stdout
    sent = [line for stdin in claude.stdins for line in stdin.lines]
    assert any('"subtype": "interrupt"' in line for line in sent)


def list_events(session) -> list:
    found: list = []
    done = threading.Event()

    def read() -> None:
        for batch in session.event_batches():
            found.extend(batch)
            break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(2)
    return found


def test_interrupt_of_a_run_that_is_not_interactive_or_not_here_says_so(ip, claude, make_pod):
    one_line_error(ip, "cldpd_interrupt", "nothing", "No interactive agent of run nothing")
    claude.agent = idle_agent
    plain = make_pod()
    with capture_output():
        session = ip.run_line_magic("cldpd_start", f"-b {plain} {URL}")
        assert claude.agent_started.wait(10)
        one_line_error(ip, "cldpd_interrupt", plain, "is not interactive")
        ip.run_line_magic("cldpd_stop", plain)
        assert magics_of(ip).feeds[session.id].join(10)
    assert session.done
    one_line_error(ip, "cldpd_interrupt", "", "required")


def test_ui_events_do_nothing_outside_a_kernel(ip):
    from cldpd_magic.magics.uievents import UiEvents, ui_events

    assert UiEvents.of(ip) is None  # a plain IPython shell has no kernel
    with ui_events(ip) as poll:
        assert poll() == 0


def test_a_blocking_batch_of_kept_alive_interactive_pods_returns_once_every_agent_waits(ip, claude):
    name = claude.pod(keepAlive=True)
    with capture_output():
        batch = ip.run_line_magic("cldpd_batch", f"-p {name} --repeats 2 {URL}")
        assert len(batch.runs) == 2 and not batch.done  # returned: both agents wait
        assert all(s.conversation.waiting.is_set() for s in batch.runs)
        batch.stop()
        assert batch.wait(timeout=10).done
