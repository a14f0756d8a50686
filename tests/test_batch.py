"""Dispatcher.dispatch and Batch: queueing, budgets, results; stand-in agents on Docker."""

from __future__ import annotations

import json
import threading

import pytest
from fakes import AgentCall, FakeRunner, write_pod

from cldpd_magic import Batch, CldpdError, Dispatcher, InvalidRequestError
from cldpd_magic.engines.docker.runner import DockerRunner
from cldpd_magic.events import EventType
from cldpd_magic.runs.batch import RESULT_KEYS

ISSUES = [f"https://github.com/octocat/Hello-World/issues/{n}" for n in range(1, 21)]


def result_line(cost: float) -> str:
    return json.dumps({
        "type": "result", "subtype": "success", "num_turns": 1, "total_cost_usd": cost,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    })  # fmt: skip


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def dispatcher(pods_dir, transcript_dir, runner) -> Dispatcher:
    return Dispatcher(pods_dir, runner, transcript_dir)


def test_runs_go_in_order_at_most_max_parallel_at_once(dispatcher, runner, pods_dir):
    lock = threading.Lock()
    running, most, order = [0], [0], []

    def agent(call: AgentCall) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            order.append(call.cmd[-1].rsplit("/", 1)[-1])
        call.out("https://github.com/o/r/pull/" + order[-1], result_line(0.01))
        with lock:
            running[0] -= 1
        return 0

    runner.agent = agent
    write_pod(pods_dir, "p")
    batch = dispatcher.dispatch("p", ISSUES[:6], max_parallel=2)
    assert isinstance(batch, Batch) and len(batch) == 6
    assert [s.run for s in batch] == [f"p-{n}" for n in range(1, 7)]
    records = batch.wait(30).results()
    assert batch.done and most[0] <= 2
    assert sorted(order, key=int) == [str(n) for n in range(1, 7)]
    order.clear()
    dispatcher.dispatch("p", ISSUES[:4], max_parallel=1).wait(30)
    assert order == ["1", "2", "3", "4"]  # one at a time: in the batch's order
    assert [tuple(r) for r in records] == [RESULT_KEYS] * 6
    first = records[0]
    assert first["pod"] == "p" and first["issue"] == ISSUES[0] and first["state"] == "exited"
    assert first["exit_code"] == 0 and first["cost_usd"] == 0.01 and first["turns"] == 1
    assert first["links"] == ["https://github.com/o/r/pull/1"]
    assert batch.cost_usd == pytest.approx(0.06)


def test_variants_and_repeats(dispatcher, runner, pods_dir):
    write_pod(pods_dir, "p")
    write_pod(pods_dir, "q")
    variants = [{"name": "opus", "args": ["--model", "opus"]}, {"prompt": "Be brief."}]
    batch = dispatcher.dispatch(["p", "q"], ISSUES[0], variants=variants, repeats=2).wait(30)
    records = batch.results()
    assert len(records) == 8
    assert [r["variant"] for r in records[:4]] == ["opus", "opus", "v2", "v2"]
    assert [r["run"] for r in records[:4]] == ["p-1", "p-1-2", "p-1-3", "p-1-4"]
    opus = next(o for o in runner.runs if o.name == "cldpd-p-1").cmd
    assert opus[opus.index("--model") + 1] == "opus"
    brief = next(o for o in runner.runs if o.name == "cldpd-p-1-3").cmd
    assert brief[-1].endswith("issues/1\n\nBe brief.")


def test_a_single_run_batch_is_named_after_its_pod(dispatcher, pods_dir):
    write_pod(pods_dir, "p")
    assert [s.run for s in dispatcher.dispatch("p", ISSUES[0]).wait(10)] == ["p"]


def test_the_budget_stops_running_runs_and_starts_no_new_one(dispatcher, runner, pods_dir):
    started = []

    def agent(call: AgentCall) -> int:
        started.append(call.cmd[-1])
        call.out(result_line(0.4))
        if call.cmd[-1].endswith(("/1", "/2")):
            return 0
        call.stopped.wait(30)  # runs on until the batch stops it
        return 130

    runner.agent = agent
    write_pod(pods_dir, "p")
    batch = dispatcher.dispatch("p", ISSUES[:6], max_parallel=1, budget_usd=1.0)
    batch.wait(30)
    states = [r["state"] for r in batch.results()]
    # Two ran (0.8), then a third passed the budget (1.2): it stops, and none more starts.
    assert len(started) == 3 and batch.over_budget
    assert states == ["exited", "exited"] + ["batch over budget"] * 4
    assert [r["exit_code"] for r in batch.results()][2:] == [130, -1, -1, -1]


def test_stop_stops_running_and_queued_runs(dispatcher, runner, pods_dir):
    runner.agent = lambda call: call.stopped.wait(30) and 130
    write_pod(pods_dir, "p")
    batch = dispatcher.dispatch("p", ISSUES[:4], max_parallel=1)
    runner.agent_started.wait(10)
    batch.stop(5)
    assert batch.done
    assert [r["state"] for r in batch.results()] == ["stopped"] * 4
    assert len(runner.runs) == 1


def test_queued_runs_say_so(dispatcher, runner, pods_dir):
    runner.agent = lambda call: call.stopped.wait(30) and 130
    write_pod(pods_dir, "p")
    batch = dispatcher.dispatch("p", ISSUES[:3], max_parallel=1)
    runner.agent_started.wait(10)
    assert [r["state"] for r in batch.results()][1:] == ["queued", "queued"]
    assert "2 queued" in repr(batch)
    batch.stop(5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pods": []}, "at least one pod"),
        ({"issues": "ftp://x"}, "not an issue URL"),
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "name of its own"),
        ({"variants": [{"args": "--model opus"}]}, "list of strings"),
        ({"variants": [{"model": "opus"}]}, "only"),
        ({"repeats": 0}, "repeats"),
        ({"max_parallel": 0}, "max_parallel"),
        ({"budget_usd": -1}, "budget_usd"),
    ],
)
def test_bad_requests_are_one_sentence_and_start_nothing(
    dispatcher, runner, pods_dir, kwargs, message
):
    write_pod(pods_dir, "p")
    args = {"pods": "p", "issues": ISSUES[0], **kwargs}
    with pytest.raises(InvalidRequestError, match=message):
        dispatcher.dispatch(args.pop("pods"), args.pop("issues"), **args)
    assert dispatcher.sessions == [] and runner.runs == []


def test_to_dataframe(dispatcher, pods_dir, monkeypatch):
    write_pod(pods_dir, "p")
    batch = dispatcher.dispatch("p", ISSUES[:2]).wait(10)
    pandas = pytest.importorskip("pandas")
    frame = batch.to_dataframe()
    assert isinstance(frame, pandas.DataFrame) and list(frame.columns) == list(RESULT_KEYS)
    assert list(frame["run"]) == ["p-1", "p-2"]
    monkeypatch.setitem(__import__("sys").modules, "pandas", None)
    with pytest.raises(CldpdError, match="pip install"):
        batch.to_dataframe()


# --- The real engine ---------------------------------------------------------------------

LINES = 200


@pytest.mark.docker
def test_twenty_runs_of_one_pod_at_once_keep_their_lines(make_pod, pods_dir, transcript_dir):
    name = make_pod(
        f"""
        for a; do issue="$a"; done; issue="${{issue##*/}}"
        i=1; while [ $i -le {LINES} ]; do echo "$issue line $i"; i=$((i+1)); done
        """
    )
    dispatcher = Dispatcher(pods_dir, DockerRunner(), transcript_dir)
    batch = dispatcher.dispatch(name, ISSUES, max_parallel=20)
    try:
        batch.wait(300)
    finally:
        batch.stop(5)
    assert [r["state"] for r in batch.results()] == ["exited"] * 20
    for number, run in enumerate(batch, 1):
        assert run.run == f"{name}-{number}" and run.container == f"cldpd-{name}-{number}"
        lines = [e.data for e in run.events() if e.type is EventType.OUTPUT]
        assert lines == [f"{number} line {i}" for i in range(1, LINES + 1)]
