"""The magics in a real kernel against the real engine: what a notebook receives on iopub."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fakes import ISSUE_URL as URL
from kernel_util import (
    KernelSession,
    Message,
    display_id,
    outputs,
    parent_id,
    text_of,
)

pytestmark = [pytest.mark.kernel, pytest.mark.docker]

SECRET_NAME = "CLDPD_TEST_TOKEN"
SECRET = "tok-5e3c7a91-do-not-show"
DISPLAYS = ("display_data", "update_display_data")


def _kernel_env(home: Path) -> dict[str, str | None]:
    return {
        "CLDPD_SESSIONS_DIR": str(home / "sessions"),
        "CLDPD_PODS_DIR": str(home / "pods"),
        SECRET_NAME: SECRET,
    }


def _configure(ks: KernelSession, pods_dir: Path, transcript_dir: Path) -> None:
    ks.execute(
        "%load_ext cldpd_magic\n"
        f"%config CldpdMagics.pods_dir = {str(pods_dir)!r}\n"
        f"%config CldpdMagics.transcript_dir = {str(transcript_dir)!r}\n"
        "%config CldpdMagics.flush_interval = 0.1"
    )


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("kernel-home")
    with KernelSession(env=_kernel_env(home)) as ks:
        yield ks


@pytest.fixture
def ks(kernel: KernelSession, docker_client, pods_dir: Path, transcript_dir: Path):
    """The module's kernel, its magics pointed at this test's pods and transcripts."""
    _configure(kernel, pods_dir, transcript_dir)
    return kernel


def displays(msgs: list[Message], did: str | None = None) -> list[Message]:
    found = outputs(msgs, DISPLAYS)
    return [m for m in found if did is None or display_id(m) == did]


def first_display(msgs: list[Message]) -> str:
    shown = outputs(msgs, ("display_data",))
    assert shown, f"no display_data in {[m['msg_type'] for m in msgs]}"
    did = display_id(shown[0])
    assert did
    return did


def update_with(did: str, needle: str):
    """A predicate: an update of display ``did`` whose text contains needle."""

    def match(msg: Message) -> bool:
        return msg["msg_type"] in DISPLAYS and display_id(msg) == did and needle in text_of(msg)

    return match


def gone(docker_client, name: str, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not docker_client.containers.list(all=True, filters={"name": f"^cldpd-{name}$"}):
            return True
        time.sleep(0.2)
    return False


def test_output_streams_live_before_the_container_exits(ks, make_pod, docker_client):
    name = make_pod("echo first-marker; sleep 3; echo second-marker")
    msg_id = ks.submit(f"%cldpd_start {name} {URL}")
    shown = ks.wait_for(lambda m: parent_id(m) == msg_id and m["msg_type"] == "display_data")
    did = display_id(shown)
    assert did
    ks.wait_for(update_with(did, "first-marker"), timeout=60)
    assert docker_client.containers.get(f"cldpd-{name}").status == "running"
    msgs = ks.wait(msg_id)
    final = text_of(displays(msgs, did)[-1])
    assert "second-marker" in final
    assert f"{name}: exited 0" in final
    assert "transcript: " in final
    assert [m for m in displays(msgs) if display_id(m) != did] == []
    # The cell shows the run; no stale "<Session ... exited>" result under it.
    assert outputs(msgs, ("execute_result",)) == []


def test_200000_lines_are_batched_and_all_in_the_transcript(ks, make_pod, transcript_dir):
    name = make_pod("seq 1 200000")
    began = time.monotonic()
    msgs = ks.execute(f"s = %cldpd_start {name} {URL}", timeout=150)
    wall = time.monotonic() - began
    assert outputs(msgs, ("execute_result",)) == []
    assert ks.value("s").startswith(f"<Session {name}-")
    shown = displays(msgs)
    assert len(shown) < 10 * wall + 10, f"{len(shown)} display messages in {wall:.1f} s"
    final = text_of(shown[-1])
    assert "200000" in final
    assert "earlier lines not shown" in final
    assert final.count("\n") < 400
    transcript = Path(json.loads(ks.value("str(s.transcript)").replace("'", '"')))
    assert transcript.parent == transcript_dir
    with transcript.open(encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    output = [e["data"] for e in lines if e["type"] == "output"]
    assert len(output) == 200000
    assert output[0] == "1" and output[-1] == "200000"
    assert ks.value("1 + 1") == "2"


def test_background_output_stays_in_its_own_cell(ks, make_pod):
    name = make_pod("i=0; while [ $i -lt 4 ]; do echo tick-$i; i=$((i+1)); sleep 1; done")
    start_id = ks.submit(f"s = %cldpd_start -b {name} {URL}")
    start_msgs = ks.wait(start_id)
    assert outputs(start_msgs, ("execute_result", "stream")) == []
    did = first_display(start_msgs)
    ks.wait_for(update_with(did, "tick-0"), timeout=60)
    before = len(ks.messages)
    other_id = ks.submit("import time; time.sleep(2.5); print('other cell')")
    other = ks.wait(other_id)
    during = displays(ks.messages[before:], did)
    assert during, "no update of the background cell while another cell ran"
    assert all(parent_id(m) == start_id for m in during)
    assert [text_of(m) for m in outputs(other)] == ["other cell\n"]
    ks.execute("s.wait(60)")
    ks.wait_for(update_with(did, "exited 0"), timeout=30, since=before)
    cldpd = [m for m in ks.messages if m["msg_type"] in DISPLAYS and "tick-" in text_of(m)]
    assert {display_id(m) for m in cldpd} == {did}


RESUMABLE = """
case "$5" in --resume) echo "resumed with: $7"; exit 0;; esac
trap 'echo bye; exit 0' INT TERM
echo started
while :; do sleep 1 & wait $!; done
"""


def test_resume_into_a_background_start_then_stop(ks, make_pod, docker_client):
    name = make_pod(RESUMABLE)
    started = ks.execute(f"%cldpd_start -b {name} {URL}")
    did = first_display(started)
    assert text_of(outputs(started, ("execute_result",))[0]).startswith(f"<Session {name}-")
    ks.wait_for(update_with(did, "started"), timeout=60)
    line = ks.execute(f"%cldpd_resume {name} and now {{x}} $y tests")
    rdid = first_display(line)
    assert rdid != did
    assert "resumed with: and now {x} $y tests" in text_of(displays(line, rdid)[-1])
    cell = ks.execute(f"%%cldpd_resume {name}\nfirst line\nsecond line\n")
    assert outputs(line + cell, ("execute_result",)) == []
    final = text_of(displays(cell)[-1])
    assert "resumed with: first line" in final and "second line" in final
    assert f"{name} resume: exited 0" in final
    mark = len(ks.messages)
    stopped = ks.execute(f"%cldpd_stop {name}")
    assert f"Pod {name} stopped." in "".join(text_of(m) for m in outputs(stopped))
    ks.wait_for(update_with(did, f"{name}: stopped"), timeout=30, since=mark)
    assert gone(docker_client, name)


def test_interrupt_stops_the_pod_and_the_kernel_goes_on(ks, make_pod, docker_client):
    name = make_pod(
        """
        trap 'echo got INT; exit 130' INT
        echo ready
        while :; do sleep 1 & wait $!; done
        """
    )
    msg_id = ks.submit(f"%cldpd_start {name} {URL}")
    shown = ks.wait_for(lambda m: parent_id(m) == msg_id and m["msg_type"] == "display_data")
    did = display_id(shown)
    ks.wait_for(update_with(did, "ready"), timeout=60)
    ks.interrupt()
    msgs = ks.wait(msg_id, timeout=60, check=False)
    reply = ks.replies[msg_id]["content"]
    assert (reply["status"], reply["ename"]) == ("error", "UsageError")
    assert reply["evalue"] == f"Interrupted: pod {name} stopped."
    assert outputs(msgs, ("error",)) == []
    final = text_of(displays(msgs, did)[-1])
    assert f"interrupted: pod {name} stopped" in final
    assert "got INT" in final
    assert f"{name}: stopped" in final
    assert gone(docker_client, name)
    assert ks.value("1 + 1") == "2"


STREAM_JSON = [
    {"type": "system", "subtype": "init", "session_id": "s-42", "model": "m", "tools": ["Bash"]},
    {
        "type": "assistant",
        "message": {"content": [{"type": "text", "text": "## Plan\n- read it\n- run `pytest`"}]},
    },
    {
        "type": "assistant",
        "message": {
            "content": [{"type": "tool_use", "name": "Bash", "input": {"command": "pytest -q"}}]
        },
    },
    {
        "type": "user",
        "message": {
            "content": [{"type": "tool_result", "is_error": True, "content": "boom: no tests"}]
        },
    },
    {
        "type": "result", "subtype": "success", "is_error": False, "num_turns": 3,
        "duration_ms": 4200, "total_cost_usd": 0.1234, "session_id": "s-42",
        "result": "Fixed **it**.",
    },
]  # fmt: skip


def test_stream_json_renders_markdown_tools_and_result(ks, make_pod):
    body = "\n".join(json.dumps(event) for event in STREAM_JSON)
    name = make_pod(f"cat <<'EOF'\n{body}\nEOF\necho plain text line")
    msgs = ks.execute(f"%cldpd_start {name} {URL}")
    data = displays(msgs)[-1]["content"]["data"]
    html = data["text/html"]
    assert "<h2>Plan</h2>" in html
    assert "<li>read it</li>" in html and "<code>pytest</code>" in html
    assert "▸ Bash: pytest -q" in html
    assert "✗ boom: no tests" in html
    assert "✓ done · 3 turns · 4.2 s · $0.1234 · session s-42" in html
    assert "<strong>it</strong>" in html
    assert "plain text line" in html and "plain text line" in data["text/plain"]
    assert '"type"' not in data["text/plain"]


def test_secrets_never_reach_the_notebook_or_the_transcript(ks, make_pod, transcript_dir):
    name = make_pod(
        f'echo "token is ${SECRET_NAME}"; echo "${SECRET_NAME}" >&2; '
        f'echo \'{{"type":"result","subtype":"success","result":"\'"${SECRET_NAME}"\'"}}\'',
        pod_json={"inheritEnv": [SECRET_NAME]},
    )
    before = len(ks.messages)
    msgs = ks.execute(f"%cldpd_start {name} {URL}")
    assert "token is ********" in text_of(displays(msgs)[-1])
    assert SECRET not in json.dumps(ks.messages[before:], default=str)
    transcripts = list(transcript_dir.glob(f"{name}-*.jsonl"))
    assert len(transcripts) == 1
    text = transcripts[0].read_text()
    assert "token is ********" in text
    assert SECRET not in text


def test_attach_from_a_fresh_kernel(ks, make_pod, docker_client, pods_dir, transcript_dir):
    name = make_pod(
        """
        trap 'echo bye; exit 0' INT TERM
        i=0; while :; do echo tick-$i; i=$((i+1)); sleep 1 & wait $!; done
        """
    )
    with KernelSession(env=_kernel_env(transcript_dir.parent)) as first:
        _configure(first, pods_dir, transcript_dir)
        did = first_display(first.execute(f"%cldpd_start -b {name} {URL}"))
        first.wait_for(update_with(did, "tick-0"), timeout=60)
    assert docker_client.containers.get(f"cldpd-{name}").status == "running"
    sessions = ks.execute("%cldpd_sessions")
    listing = text_of(outputs(sessions, ("execute_result",))[0])
    assert f"cldpd-{name}" in listing and "running" in listing
    mark = len(ks.messages)
    attached = ks.execute(f"%cldpd_attach -b {name}")
    adid = first_display(attached)
    ks.wait_for(update_with(adid, "tick-0"), timeout=30, since=mark)
    ks.wait_for(update_with(adid, "tick-3"), timeout=30, since=mark)
    ks.execute(f"%cldpd_stop {name}")
    ks.wait_for(update_with(adid, f"{name} attach: stopped"), timeout=30, since=mark)
    assert gone(docker_client, name)


def test_a_kernel_restart_then_attach_to_one_run_of_a_batch(
    ks, make_pod, docker_client, pods_dir, transcript_dir
):
    name = make_pod(
        """
        trap 'echo bye; exit 0' INT TERM
        i=0; while :; do echo "tick-$i"; i=$((i+1)); sleep 1 & wait $!; done
        """
    )
    issues = [URL, URL.replace("/1", "/2")]
    with KernelSession(env=_kernel_env(transcript_dir.parent)) as first:
        _configure(first, pods_dir, transcript_dir)
        first.execute(
            "d = get_ipython().find_magic('cldpd_start').__self__.dispatcher\n"
            f"batch = d.dispatch({name!r}, {issues!r}, max_parallel=2)\n"
            "import time\n"
            "while sum(r.state == 'running' for r in batch.runs) < 2: time.sleep(0.1)\n"
            "runs = [r.run for r in batch.runs]\n"
            "print(runs)"
        )
    # The first kernel is gone; its batch's containers run on.
    runs = sorted(c.name for c in docker_client.containers.list(filters={"label": "cldpd.pod"})
                  if c.labels.get("cldpd.pod") == name)  # fmt: skip
    assert len(runs) == 2, runs
    run = runs[1].removeprefix("cldpd-")
    mark = len(ks.messages)
    adid = first_display(ks.execute(f"%cldpd_attach -b {run}"))
    ks.wait_for(update_with(adid, "tick-0"), timeout=30, since=mark)
    ks.wait_for(update_with(adid, "tick-2"), timeout=30, since=mark)
    ks.execute(f"%cldpd_stop {run}")
    ks.wait_for(update_with(adid, f"{run} attach: stopped"), timeout=30, since=mark)
    # Its sibling goes on until it is stopped too.
    other = runs[0].removeprefix("cldpd-")
    assert docker_client.containers.get(runs[0]).status == "running"
    ks.execute(f"%cldpd_stop {other}")
    for container in runs:
        assert gone(docker_client, container.removeprefix("cldpd-"))
