"""The agent's command line: what cldpd asks Claude Code to do, and nothing more."""

from __future__ import annotations

from pathlib import Path

import pytest

from cldpd_magic.pods import Pod, PodConfig
from cldpd_magic.runs.agent import agent_command

POD = Pod("p", Path("/pods/p"), Path("/pods/p/Dockerfile"), PodConfig(args=("--model", "opus")))
HEAD = ["claude", "-p", "--output-format", "stream-json", "--verbose"]


@pytest.mark.parametrize("resume", [False, True])
def test_an_ordinary_prompt_is_the_last_argument(resume):
    flag = "--resume" if resume else "--session-id"
    cmd = agent_command(POD, "Fix the bug", session_uuid="u", resume=resume)
    assert cmd == [*HEAD, flag, "u", "--model", "opus", "Fix the bug"]


@pytest.mark.parametrize(
    "prompt",
    ["- also add a test", "--version", "--permission-mode=bypassPermissions", "---\nrole: x\n---"],
)
def test_a_prompt_that_looks_like_an_option_follows_end_of_options(prompt):
    cmd = agent_command(POD, prompt, session_uuid="u", resume=True)
    assert cmd[-2:] == ["--", prompt]
    assert cmd[:-2] == [*HEAD, "--resume", "u", "--model", "opus"]


@pytest.mark.parametrize(
    "args",
    [("--allowedTools", "Bash"), ("--add-dir", "/a", "/b"), ("--model", "opus", "--debug")],
)
def test_a_prompt_after_an_option_that_takes_several_values_follows_end_of_options(args):
    pod = Pod("p", Path("/pods/p"), Path("/pods/p/Dockerfile"), PodConfig(args=args))
    cmd = agent_command(pod, "Fix the bug", session_uuid="u", resume=False)
    assert cmd == [*HEAD, "--session-id", "u", *args, "--", "Fix the bug"]


def test_options_written_with_equals_need_no_end_of_options():
    pod = Pod("p", Path("/x"), Path("/x/Dockerfile"), PodConfig(args=("--allowedTools=Bash",)))
    cmd = agent_command(pod, "go", session_uuid="u", resume=False)
    assert cmd[-2:] == ["--allowedTools=Bash", "go"]


def test_a_run_with_a_timeout_ends_by_itself_in_its_container():
    from cldpd_magic.runs.agent import DEADLINE_GRACE, plan_start, with_deadline

    timed = Pod("p", Path("/pods/p"), Path("/pods/p/Dockerfile"),
                PodConfig(timeout_seconds=20.5))  # fmt: skip
    plan = plan_start(timed, "https://github.com/o/r/issues/1")
    assert plan.cmd[:2] == ["sh", "-c"]
    assert plan.cmd[3:5] == ["cldpd-deadline", str(21 + DEADLINE_GRACE)]
    assert plan.cmd[5:10] == HEAD and plan.cmd[-1].endswith("issues/1")
    overridden = plan_start(timed, "https://github.com/o/r/issues/1", timeout=3)
    assert overridden.cmd[4] == str(3 + DEADLINE_GRACE)
    assert plan_start(POD, "https://github.com/o/r/issues/1").cmd[:5] == HEAD
    assert with_deadline(["claude"], None) == ["claude"]


def test_an_interactive_run_takes_its_prompts_on_stdin():
    from cldpd_magic.runs.agent import INTERACTIVE_ENV, plan_start

    config = PodConfig(args=("--model", "opus"), interactive=True)
    live = Pod("p", Path("/pods/p"), Path("/pods/p/Dockerfile"), config, template="Be brief.")
    plan = plan_start(live, "https://github.com/o/r/issues/1", "and add tests")
    assert plan.interactive
    assert plan.cmd == [
        *HEAD, "--input-format", "stream-json", "--permission-prompt-tool", "stdio",
        "--replay-user-messages", "--session-id", plan.session_uuid, "--model", "opus",
    ]  # fmt: skip
    assert plan.prompt == (
        "Be brief.\n\nWork on this GitHub issue: https://github.com/o/r/issues/1\n\nand add tests"
    )
    assert INTERACTIVE_ENV.items() <= plan.env.items()
    # A prompt far over one argument's limit is fine: it goes to stdin.
    long = plan_start(live, "https://github.com/o/r/issues/1", "x" * 300_000)
    assert len(long.prompt) > 300_000
    assert plan_start(POD, "https://github.com/o/r/issues/1").interactive is False
