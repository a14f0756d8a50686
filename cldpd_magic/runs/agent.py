"""The agent's command line and environment: the issue URL and prompt, pod.json's caps and
arguments, forwarded variables and the secrets among them, and the kernel's limits."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

from ..errors import InvalidRequestError
from ..pods import Pod, brokered_credentials
from ..secrets import config_secrets, forwarded_env
from .usage import Limits

#: Linux refuses one argument or environment entry of 131072 bytes or more (MAX_ARG_STRLEN,
#: 32 pages, counting its terminating NUL) with "argument list too long".
MAX_ARGUMENT_BYTES = 131072 - 1
#: All arguments and environment entries together (each with its NUL and an 8-byte pointer)
#: may take a quarter of the stack limit, 8 MiB in containers: 2 MiB. 64 KiB of it is
#: left for the image's own environment and the exec wrapper.
MAX_COMMAND_LINE_BYTES = 2 * 1024 * 1024 - 64 * 1024


def validate_issue_url(url: str) -> str:
    """Return the URL stripped, or raise InvalidRequestError unless it is an http(s) URL."""
    url = (url or "").strip()
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or any(c.isspace() for c in url):
        raise InvalidRequestError(
            f"{url!r} is not an issue URL; give one like https://github.com/OWNER/REPO/issues/N."
        )
    return url


def build_prompt(template: str, issue_url: str) -> str:
    """The start prompt: the template, a blank line, then the issue directive."""
    directive = f"Work on this GitHub issue: {issue_url}"
    return f"{template}\n\n{directive}" if template else directive


#: Claude Code options that take several values, or an optional one (``claude --help`` of
#: 2.1.x): after one of them, a bare prompt would be read as its value.
GREEDY_OPTIONS = frozenset({
    "--add-dir", "--allowedTools", "--allowed-tools", "--betas", "--cloud", "-d", "--debug",
    "--disallowedTools", "--disallowed-tools", "--file", "--from-pr", "--mcp-config",
    "--prompt-suggestions", "--remote-control", "-r", "--resume", "--teleport", "--tools",
    "-w", "--worktree",
})  # fmt: skip


def issue_number(url: str) -> str:
    """The issue or pull request number at the end of a URL's path, "" when there is none."""
    found = re.search(r"/(\d+)/*$", urlparse(url).path)
    return found.group(1) if found else ""


def cap_args(pod: Pod, args: Sequence[str] = ()) -> list[str]:
    """The CLI's own caps from pod.json (``--max-budget-usd``, ``--max-turns``), unless given."""
    given = {*pod.config.args, *args}
    caps = []
    if pod.config.max_cost_usd is not None and "--max-budget-usd" not in given:
        caps += ["--max-budget-usd", f"{pod.config.max_cost_usd:g}"]
    if pod.config.max_turns is not None and "--max-turns" not in given:
        caps += ["--max-turns", str(pod.config.max_turns)]
    return caps


def pod_limits(pod: Pod, timeout: float | None = None) -> Limits:
    """What cldpd enforces on a run of the pod: pod.json's caps; ``timeout`` overrides its own."""
    config = pod.config
    seconds = timeout if timeout is not None else config.timeout_seconds
    return Limits(config.max_cost_usd, config.max_turns, seconds)


#: The options of an interactive run's Claude Code: JSON lines on stdin (user messages,
#: control requests), questions about tool calls on stdout, the prompts it was sent
#: echoed when their turn starts (so the cell shows them where they take effect).
INTERACTIVE_OPTIONS = (
    "--input-format", "stream-json", "--permission-prompt-tool", "stdio",
    "--replay-user-messages",
)  # fmt: skip
#: Asks Claude Code to say when a turn is over and nothing more is queued.
INTERACTIVE_ENV = {"CLAUDE_CODE_EMIT_SESSION_STATE_EVENTS": "1"}


def agent_command(
    pod: Pod,
    prompt: str,
    *,
    session_uuid: str,
    resume: bool,
    args: Sequence[str] = (),
    interactive: bool = False,
) -> list[str]:
    """The Claude Code command line for a start (``--session-id``) or resume (``--resume``).

    pod.json's caps come first (``--max-budget-usd``, ``--max-turns``), then its args,
    then ``args`` (a batch variant's). A prompt that starts with ``-`` (a Markdown list,
    YAML front matter, pasted text), or that follows args holding an option that takes
    several values or an optional one (``--allowedTools Bash``), is put after ``--``, so
    the CLI never reads it as an option or an option's value. An interactive run's
    command has no prompt: its prompts are written to its stdin (the CLI ignores one
    given as an argument in that mode).
    """
    flag = "--resume" if resume else "--session-id"
    all_args = [*cap_args(pod, args), *pod.config.args, *args]
    if interactive:
        return [
            "claude", "-p", "--output-format", "stream-json", "--verbose",
            *INTERACTIVE_OPTIONS, flag, session_uuid, *all_args,
        ]  # fmt: skip
    greedy = any(arg in GREEDY_OPTIONS for arg in all_args)
    end_of_options = ["--"] if prompt.startswith("-") or greedy else []
    return [
        "claude", "-p", "--output-format", "stream-json", "--verbose",
        flag, session_uuid, *all_args, *end_of_options, prompt,
    ]  # fmt: skip


#: Seconds the container's own deadline runs after the run's timeout: a live client stops
#: its run first (and says why); the container's deadline is for a client that died.
DEADLINE_GRACE = 5
#: Ends the agent in its container once its time is up, whoever watches: SIGINT (the agent
#: ends its turn), SIGTERM, then SIGKILL. The watchdog polls the agent's process, so it
#: ends with it and never signals a process that took its number later; ``exec`` keeps the
#: agent the shell's process (signals from stop reach it, its stdin stays its own).
DEADLINE_SCRIPT = (
    "limit=$1; shift; agent=$$; ("
    " waited=0;"
    ' while kill -0 "$agent" 2>/dev/null; do'
    '  if [ "$waited" -ge "$limit" ]; then'
    '   kill -INT "$agent" 2>/dev/null; sleep 10;'
    '   kill -0 "$agent" 2>/dev/null && kill -TERM "$agent" 2>/dev/null; sleep 5;'
    '   kill -0 "$agent" 2>/dev/null && kill -KILL "$agent" 2>/dev/null; exit 0;'
    "  fi;"
    "  sleep 2; waited=$((waited + 2));"
    ' done ) </dev/null >/dev/null 2>&1 & exec "$@"'
)


def with_deadline(cmd: list[str], seconds: float | None) -> list[str]:
    """``cmd`` ending by itself in its container ``seconds`` (plus a grace) after it starts.

    The run's timeout is enforced by the client too, which stops the run gracefully and
    says why; this holds when the client is gone (a killed kernel or ``cldpd``). It needs
    ``sh`` in the image, as the stop's signalling does. None leaves ``cmd`` as it is.
    """
    if seconds is None:
        return cmd
    limit = math.ceil(seconds) + DEADLINE_GRACE
    return ["sh", "-c", DEADLINE_SCRIPT, "cldpd-deadline", str(limit), *cmd]


def check_command_line(
    cmd: list[str], env: dict[str, str], prompt_is: str = "", fix: str = ""
) -> None:
    """Refuse up front a command the kernel would refuse with "argument list too long".

    Args:
        cmd: The agent's command; its last argument is the prompt, unless ``prompt_is``
            is "" (an interactive run's prompts go to its stdin, where no such limit is).
        env: The environment it runs with.
        prompt_is: What the prompt is, for the message (``The prompt``).
        fix: What to do about a prompt that is too long.

    Raises:
        InvalidRequestError: An argument or environment entry holds a NUL or is over
            :data:`MAX_ARGUMENT_BYTES`, or all of them are over :data:`MAX_COMMAND_LINE_BYTES`.
    """
    args = cmd[:-1] if prompt_is else cmd
    named = [(f"The argument {a[:40]!r} in pod.json args", a) for a in args]
    if prompt_is:
        named.append((prompt_is, cmd[-1]))
    named += [(f"The environment variable {k}", f"{k}={v}") for k, v in env.items()]
    total = 0
    for what, text in named:
        if "\0" in text:
            raise InvalidRequestError(
                f"{what} contains a NUL character, which no command-line argument or "
                "environment variable can carry; remove it."
            )
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_ARGUMENT_BYTES:
            advice = fix if text is cmd[-1] else "shorten it"
            raise InvalidRequestError(
                f"{what} is {size} bytes, over the {MAX_ARGUMENT_BYTES} bytes Linux allows in "
                f"one argument (MAX_ARG_STRLEN); {advice}."
            )
        total += size + 1 + 8
    if total > MAX_COMMAND_LINE_BYTES:
        raise InvalidRequestError(
            f"The agent's command line and environment come to {total} bytes, over the "
            f"{MAX_COMMAND_LINE_BYTES} bytes Linux allows in all; shorten the prompt or the "
            "pod's environment."
        )


@dataclass(frozen=True)
class StartPlan:
    """What a start gives the agent, resolved once: the values masked are the values forwarded.

    Attributes:
        cmd: The agent's command line.
        env: Its environment: pod.json's ``env`` and the forwarded host variables.
        secrets: The values to mask: secret-looking, forwarded and brokered ones.
        missing: ``inheritEnv`` names not set on this host.
        brokered: The credentials the egress proxy brokers, ``(kind, value, upstream)``.
        session_uuid: Claude Code's session uuid (``--session-id``).
        prompt: The start prompt (template, issue line, the caller's text).
        interactive: Whether the agent takes its prompts on stdin (``prompt`` is then
            its first message, not an argument).
    """

    cmd: list[str]
    env: dict[str, str]
    secrets: list[str]
    missing: list[str]
    brokered: list[tuple[str, str, str]]
    session_uuid: str
    prompt: str = ""
    interactive: bool = False


def plan_start(
    pod: Pod,
    url: str,
    prompt: str = "",
    args: Sequence[str] = (),
    timeout: float | None = None,
    *,
    interactive: bool | None = None,
    resume: str | None = None,
) -> StartPlan:
    """The command, environment and secrets of a start of a pod on an issue.

    Args:
        pod: The pod.
        url: The issue URL, validated ("" for a run driven without one: the start
            prompt is then the template alone).
        prompt: Text added after the start prompt, after a blank line.
        args: CLI arguments after the pod's own.
        timeout: The run's timeout; None is pod.json's (``timeoutSeconds``). The agent's
            container enforces it too (:func:`with_deadline`).
        interactive: Whether the agent takes its prompts on stdin; None is pod.json's.
        resume: A Claude Code session to resume (``--resume``) instead of a new one.

    Raises:
        InvalidRequestError: The prompt, an argument or an environment entry holds a NUL
            or is over the kernel's limits (see :func:`check_command_line`).
    """
    session_uuid = resume or str(uuid.uuid4())
    forwarded = forwarded_env(pod.config.inherit_env)
    missing = [n for n in pod.config.inherit_env if n not in forwarded]
    env = {**pod.config.env, **forwarded}
    secrets = config_secrets(pod.config.env, forwarded, forwarded)
    brokered = brokered_credentials(pod.name, pod.config.credentials, pod.config.env)
    secrets += [value for _kind, value, _upstream in brokered]
    start_prompt = build_prompt(pod.template, url) if url else pod.template
    start_prompt += f"\n\n{prompt}" if prompt and start_prompt else prompt
    interactive = pod.config.interactive if interactive is None else interactive
    cmd = agent_command(pod, start_prompt, session_uuid=session_uuid, resume=resume is not None,
                        args=list(args), interactive=interactive)  # fmt: skip
    if interactive:
        env = {**env, **INTERACTIVE_ENV}
        check_command_line(cmd, env)
    else:
        check_command_line(
            cmd, env, f"The start prompt of pod {pod.name} (template.md and the issue line)",
            f"shorten {pod.dir / 'template.md'}",
        )  # fmt: skip
    cmd = with_deadline(cmd, pod_limits(pod, timeout).timeout_seconds)
    return StartPlan(cmd, env, secrets, missing, brokered, session_uuid, start_prompt,
                     interactive)  # fmt: skip
