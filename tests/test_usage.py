"""Session.usage: turns, tokens and cost live from stream-json; per-run caps."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fakes import ISSUE_URL as URL
from fakes import AgentCall, FakeRunner, write_pod

from cldpd_magic import Dispatcher, PodConfigError, Usage, discover_pod
from cldpd_magic.events import EventType, RunState
from cldpd_magic.runs.session import StopReason
from cldpd_magic.runs.usage import Limits, UsageMeter, estimate_cost, usage_from_transcript

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "claude"


def assistant(msg_id: str, inp: int, out: int, model: str = "claude-sonnet-4-5", **cache) -> str:
    """An assistant event as Claude Code prints one per content block."""
    usage = {"input_tokens": inp, "output_tokens": out, **cache}
    message = {"id": msg_id, "model": model, "content": [{"type": "text", "text": "hi"}]}
    return json.dumps({"type": "assistant", "message": {**message, "usage": usage}})


def result(turns: int, cost: float, inp: int, out: int, subtype: str = "success") -> str:
    usage = {"input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": 7}
    return json.dumps({
        "type": "result", "subtype": subtype, "num_turns": turns, "total_cost_usd": cost,
        "usage": usage, "result": "done",
    })  # fmt: skip


def test_a_message_counts_once_however_many_blocks_repeat_its_usage():
    meter = UsageMeter()
    line = assistant("msg_1", 1000, 10)
    assert meter.feed(line) is True
    assert meter.feed(line) is False  # the same message, the same usage: nothing new
    meter.feed(assistant("msg_2", 200, 20))
    usage = meter.usage
    assert (usage.turns, usage.input_tokens, usage.output_tokens) == (2, 1200, 30)
    assert usage.cost_usd == pytest.approx((1200 * 3 + 30 * 15) / 1e6)


def test_a_message_seen_again_with_other_figures_counts_its_latest_once():
    meter = UsageMeter()
    meter.feed(assistant("msg_1", 1000, 10))
    meter.feed(assistant("msg_2", 200, 20))
    assert meter.feed(assistant("msg_1", 1000, 400)) is True  # its final output tokens
    assert meter.feed(assistant("msg_2", 200.4, 20)) is False  # other figures, the same counts
    usage = meter.usage
    assert (usage.turns, usage.input_tokens, usage.output_tokens) == (2, 1200, 420)
    assert usage.cost_usd == pytest.approx((1200 * 3 + 420 * 15) / 1e6)


def test_the_result_is_authoritative_and_later_messages_add_to_it():
    meter = UsageMeter()
    meter.feed(assistant("msg_1", 1000, 10))
    meter.feed(result(3, 0.5, 1500, 99))
    assert meter.usage == Usage(3, 1500, 99, 7, 0, 0.5)
    meter.feed(assistant("msg_9", 100, 1, model="claude-opus-4-5"))
    assert meter.usage.turns == 4
    assert meter.usage.cost_usd == pytest.approx(0.5 + (100 * 5 + 1 * 25) / 1e6)


def test_real_cli_output_gives_the_cli_totals():
    meter = UsageMeter()
    for line in (FIXTURES / "success_with_tools.jsonl").read_text().splitlines():
        meter.feed(line)
    assert meter.usage == Usage(4, 1860, 132, 300, 0, pytest.approx(0.01014))
    assert meter.result_subtype == "success"


# --- Several results in one process (streaming input: one result per turn) -------------------

INTERACTIVE = FIXTURES / "interactive"


def fixture_lines(name: str) -> list[str]:
    """The real CLI's lines of one streaming-input process (see interactive/README.md)."""
    return (INTERACTIVE / f"{name}.jsonl").read_text().splitlines()


def results_of(lines: list[str]) -> list[dict]:
    return [o for o in map(json.loads, lines) if o.get("type") == "result"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # per turn: (1, 120 in, 24 out, $0.00096 cumulative), (1, 120, 24, $0.00192)
        ("two_turns", Usage(2, 240, 48, 0, 0, pytest.approx(0.00192))),
        ("cancel", Usage(6, 480, 96, 0, 0, pytest.approx(0.00384))),
        ("modes", Usage(5, 600, 120, 0, 0, pytest.approx(0.0048))),
        ("replay_state", Usage(4, 480, 96, 0, 0, pytest.approx(0.00384))),
        ("hooks", Usage(2, 240, 48, 0, 0, pytest.approx(0.00192))),
        # the second turn passed the budget: "usage" says 0 for the 120/24 it spent
        ("budget", Usage(3, 240, 48, 0, 0, pytest.approx(0.00192))),
    ],
)
def test_turns_and_tokens_add_up_over_results_and_the_cost_is_the_last(name, expected):
    lines = fixture_lines(name)
    meter = UsageMeter()
    for line in lines:
        meter.feed(line)
    assert meter.usage == expected
    # The process's own cumulative figures agree: every model's tokens, the total cost.
    last = results_of(lines)[-1]
    models = last["modelUsage"].values()
    assert meter.usage.input_tokens == sum(m["inputTokens"] for m in models)
    assert meter.usage.output_tokens == sum(m["outputTokens"] for m in models)
    assert meter.usage.cost_usd == last["total_cost_usd"]


def test_taking_the_last_result_as_the_totals_would_be_wrong():
    """The control: the last result alone is one turn of the two."""
    (first, last) = results_of(fixture_lines("two_turns"))
    assert (first["num_turns"], first["usage"]["input_tokens"]) == (1, 120)
    assert (last["num_turns"], last["usage"]["input_tokens"]) == (1, 120)
    assert last["total_cost_usd"] == 2 * first["total_cost_usd"]
    meter = UsageMeter()
    meter.feed(json.dumps(last))
    assert (meter.usage.turns, meter.usage.input_tokens) == (1, 120)


def test_between_results_the_new_turn_is_estimated_then_replaced():
    lines = fixture_lines("two_turns")
    first_result = next(i for i, line in enumerate(lines) if '"type":"result"' in line)
    meter = UsageMeter()
    for line in lines[: first_result + 1]:
        meter.feed(line)
    assert meter.usage == Usage(1, 120, 24, 0, 0, pytest.approx(0.00096))
    second_turn = lines[first_result + 1 :]
    for line in second_turn[:-1]:  # the second turn's init and answer, not its result
        meter.feed(line)
    estimate = meter.usage
    assert (estimate.turns, estimate.input_tokens) == (2, 240)
    assert 24 < estimate.output_tokens < 48  # a message's usage while it streams: not final
    assert estimate.cost_usd > 0.00096
    meter.feed(second_turn[-1])
    assert meter.usage == Usage(2, 240, 48, 0, 0, pytest.approx(0.00192))
    assert meter.result_subtype == "success"


def test_a_result_without_usage_keeps_the_tokens_of_its_messages():
    meter = UsageMeter()
    meter.feed(assistant("msg_1", 100, 10))
    meter.feed(json.dumps({"type": "result", "subtype": "success", "num_turns": 1}))
    meter.feed(assistant("msg_2", 50, 5))
    meter.feed(json.dumps({"type": "result", "subtype": "success", "cost_usd": 0.5}))
    assert meter.usage == Usage(2, 150, 15, 0, 0, 0.5)  # the older "cost_usd" is read too


def test_plain_text_and_hostile_lines_change_nothing():
    meter = UsageMeter()
    for line in [
        "usage: claude [options]",
        '{"usage": 1}',
        '{"type":"assistant","message":{"id":"x","usage":"lots"}}',
        '{"type":"result","usage":[],"total_cost_usd":true,"num_turns":"9"}',
        "[1, 2]",
        '{"type":"assistant","message":{"id":"y","usage":{"input_tokens":1e400}}}',
    ]:
        meter.feed(line)
    assert meter.usage == Usage(turns=1)  # message y, with no usable numbers


def test_links_the_agent_printed_are_kept_once_in_order():
    meter = UsageMeter()
    meter.feed("Opened https://github.com/o/r/pull/7.")
    meter.feed(
        '{"text":"branch at https://github.com/o/r/tree/fix-7 and https://github.com/o/r/pull/7"}'
    )
    meter.feed("see https://example.com/docs")
    assert meter.links == ["https://github.com/o/r/pull/7", "https://github.com/o/r/tree/fix-7"]


def test_estimates_by_model_family():
    tokens = Usage(input_tokens=1_000_000, output_tokens=0)
    assert estimate_cost("claude-haiku-4-5", tokens) == pytest.approx(1.0)
    assert estimate_cost("claude-opus-4-1-20250805", tokens) == pytest.approx(15.0)
    assert estimate_cost("something-new", tokens) == pytest.approx(3.0)


def test_limits_say_which_cap_was_passed():
    limits = Limits(max_cost_usd=1.0, max_turns=3)
    assert limits.passed(Usage(turns=3, cost_usd=1.0)) == ""
    assert limits.passed(Usage(turns=3, cost_usd=1.01)) == "over budget"
    assert limits.passed(Usage(turns=4, cost_usd=0.5)) == "max turns"


# --- Sessions, through the Dispatcher on the fake runner -----------------------------------


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def dispatcher(pods_dir, transcript_dir, runner) -> Dispatcher:
    return Dispatcher(pods_dir, runner, transcript_dir)


def test_usage_is_live_and_kept_in_the_transcript(dispatcher, runner, pods_dir):
    step = threading.Event()
    seen: list[Usage] = []

    def agent(call: AgentCall) -> int:
        call.out(assistant("msg_1", 1000, 10), assistant("msg_1", 1000, 10))
        step.wait(10)
        call.out(result(1, 0.25, 1000, 50))
        return 0

    runner.agent = agent
    write_pod(pods_dir, "p")
    session = dispatcher.start_session("p", URL)
    session.add_usage_listener(lambda s: seen.append(s.usage))
    events = session.events()
    for event in events:
        if '"msg_1"' in event.data:
            break
    # The usage is counted before the line is recorded: it is there once the line is.
    assert session.usage.turns == 1 and session.usage.input_tokens == 1000
    step.set()
    assert session.wait(10) == 0
    assert session.usage == Usage(1, 1000, 50, 7, 0, 0.25)
    assert seen[-1] == session.usage
    assert usage_from_transcript(session.transcript) == session.usage


def test_a_run_passing_max_cost_is_stopped_and_marked_over_budget(dispatcher, runner, pods_dir):
    def agent(call: AgentCall) -> int:
        for n in range(1, 1000):
            call.out(assistant(f"msg_{n}", 100_000, 100))  # $0.3015 each at Sonnet prices
            if call.stopped.wait(0.01):
                return 130
        return 0

    runner.agent = agent
    write_pod(pods_dir, "p", {"maxCostUsd": 1.0})
    session = dispatcher.start_session("p", URL)
    assert session.wait(20) == 130
    assert session.state is RunState.STOPPED and session.stop_reason == StopReason.OVER_BUDGET
    assert session.status.snapshot().reason == "over budget"
    # Stopped at the turn that passed the cap; at most the turns in flight came after.
    assert 4 <= session.usage.turns <= 6
    cmd = runner.runs[0].cmd
    assert cmd[cmd.index("--max-budget-usd") + 1] == "1"


def test_the_cli_ending_itself_at_a_cap_marks_the_run(dispatcher, runner, pods_dir):
    runner.agent = lambda call: call.out(result(3, 0.01, 10, 1, "error_max_turns")) or 1
    write_pod(pods_dir, "p", {"maxTurns": 2})
    session = dispatcher.start_session("p", URL)
    assert session.wait(10) == 1
    assert session.state is RunState.STOPPED and session.stop_reason == "max turns"
    cmd = runner.runs[0].cmd
    assert cmd[cmd.index("--max-turns") + 1] == "2"


def test_a_run_past_its_timeout_is_stopped(dispatcher, runner, pods_dir):
    def agent(call: AgentCall) -> int:
        call.out("working")
        call.stopped.wait(30)
        return 130

    runner.agent = agent
    write_pod(pods_dir, "p", {"timeoutSeconds": 0.2})
    session = dispatcher.start_session("p", URL)
    assert session.wait(20) == 130
    assert session.stop_reason == "timed out" and session.state == "stopped"


def test_a_person_stopping_a_run_gives_no_reason(dispatcher, runner, pods_dir):
    runner.agent = lambda call: call.stopped.wait(30) and 130
    write_pod(pods_dir, "p", {"maxCostUsd": 5})
    session = dispatcher.start_session("p", URL)
    runner.agent_started.wait(10)
    session.stop(5)
    assert session.state is RunState.STOPPED and session.stop_reason == ""


@pytest.mark.parametrize(
    "config, message",
    [
        ({"maxCostUsd": 0}, "'maxCostUsd' must be a number above 0"),
        ({"maxCostUsd": "1"}, "'maxCostUsd' must be a number above 0"),
        ({"maxTurns": 2.5}, "'maxTurns' must be a whole number above 0"),
        ({"maxTurns": True}, "'maxTurns' must be a whole number above 0"),
        ({"timeoutSeconds": -1}, "'timeoutSeconds' must be a number above 0"),
    ],
)
def test_bad_caps_in_pod_json_are_one_sentence(pods_dir, config, message):
    write_pod(pods_dir, "p", config)
    with pytest.raises(PodConfigError, match=message):
        discover_pod(pods_dir, "p")


def test_caps_in_pod_json_are_read(pods_dir):
    write_pod(pods_dir, "p", {"maxCostUsd": 2, "maxTurns": 30, "timeoutSeconds": 1800})
    config = discover_pod(pods_dir, "p").config
    assert (config.max_cost_usd, config.max_turns, config.timeout_seconds) == (2.0, 30, 1800.0)


# --- Hostile lines never end a run -----------------------------------------------------------

#: A JSON line nested deeper than the decoder's recursion limit, with the meter's keys in it.
DEEP = '{"usage":' + "[" * 100_000 + "]" * 100_000 + ', "total_cost_usd": 1}'


def test_a_deeply_nested_line_is_ignored_not_raised():
    meter = UsageMeter()
    assert meter.feed(DEEP) is False
    assert meter.usage == Usage()
    meter.feed(assistant("msg_1", 10, 1))  # the meter goes on counting
    assert meter.usage.turns == 1


def test_a_run_printing_a_deeply_nested_line_keeps_every_line(tmp_path):
    from cldpd_magic.runs.session import Session

    def job(ctl) -> int:
        ctl.emit(EventType.CONTAINER_STARTED, "c")
        ctl.stdout.write(f"before\n{DEEP}\n{assistant('msg_1', 10, 1)}\nafter\n")
        return 0

    session = Session("pod", "c", job, tmp_path)
    assert session.wait(30) == 0
    assert session.state is RunState.EXITED
    output = [e.data for e in session.events() if e.type is EventType.OUTPUT]
    assert output == ["before", DEEP, assistant("msg_1", 10, 1), "after"]
    assert session.usage.turns == 1
