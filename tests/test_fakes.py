"""The fakes are real Runners: same methods, same signatures, so they cannot drift; their
agents read a run's stdin as a container's would."""

from __future__ import annotations

import inspect
import json
import threading

import pytest
from fakes import FakeRunner, cat_agent, line_agent
from test_docker_runner import Text

from cldpd_magic.engines.protocol import Runner, RunOptions, StdinPipe
from cldpd_magic.errors import StdinClosedError

PROTOCOL_METHODS = sorted(
    name for name, value in vars(Runner).items() if inspect.isfunction(value) and name[0] != "_"
)


def test_the_fake_is_a_runner():
    assert isinstance(FakeRunner(), Runner)
    assert "start" in PROTOCOL_METHODS and len(PROTOCOL_METHODS) >= 10


@pytest.mark.parametrize("name", PROTOCOL_METHODS)
def test_each_method_has_the_protocol_signature(name):
    expected = inspect.signature(getattr(Runner, name))
    actual = inspect.signature(getattr(FakeRunner, name))
    assert list(actual.parameters) == list(expected.parameters)
    assert actual.return_annotation == expected.return_annotation
    for param, want in expected.parameters.items():
        got = actual.parameters[param]
        assert (got.kind, got.default, got.annotation) == (want.kind, want.default, want.annotation)


def _run_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("code", fn(*args, **kwargs)), daemon=True
    )
    thread.start()
    return thread, result


def test_the_fake_agent_reads_the_runs_stdin_as_a_container_would():
    runner = FakeRunner(cat_agent)
    pipe, out = StdinPipe(), Text()
    pipe.write_line("before the start")
    thread, result = _run_in_thread(runner.run, RunOptions("img", "c", [], stdin=pipe), out)
    out.wait_for("before the start\n")
    pipe.write_line("while it runs")
    out.wait_for("while it runs\n")
    assert thread.is_alive()  # the control: it reads until the close
    pipe.close()
    thread.join(60)
    assert result == {"code": 0}
    assert out.value == "before the start\nwhile it runs\nstdin closed\n"
    [stdin] = runner.stdins
    assert stdin.lines == ["before the start", "while it runs"] and stdin.closed
    with pytest.raises(StdinClosedError):
        pipe.write_line("after the end")


def test_a_stop_ends_a_fake_agent_waiting_for_stdin():
    runner = FakeRunner(cat_agent)
    runner.start(RunOptions("img", "kept", []))
    pipe, out, handles = StdinPipe(), Text(), []
    thread, result = _run_in_thread(
        runner.exec, "kept", ["agent"], out, on_start=handles.append, stdin=pipe
    )
    pipe.write_line("hello")
    out.wait_for("hello\n")
    runner.stop_exec(handles[0])
    thread.join(60)
    assert result == {"code": 130} and out.value == "hello\ngot INT\n"
    assert pipe.ended and not runner.stdins[0].closed
    pipe = StdinPipe()
    thread, result = _run_in_thread(runner.run, RunOptions("img", "c", [], stdin=pipe), Text())
    runner.agent_started.wait(60)
    pipe.connected.wait(60)
    runner.stop("c")
    thread.join(60)
    assert result == {"code": 130}


def test_a_line_agent_answers_each_line():
    def respond(call, line):
        call.out(json.dumps({"echo": json.loads(line)}))

    runner = FakeRunner(line_agent(respond, code=3))
    pipe, out = StdinPipe(), Text()
    for n in range(3):
        pipe.write_line(json.dumps({"n": n}))
    pipe.close()
    assert runner.run(RunOptions("img", "c", [], stdin=pipe), out) == 3
    assert [json.loads(line)["echo"]["n"] for line in out.value.splitlines()] == [0, 1, 2]
    # Without a pipe, stdin is empty.
    assert runner.run(RunOptions("img", "d", []), Text()) == 3 and len(runner.stdins) == 1
