"""The Claude Agent SDK's transport into a pod: ``query()`` and ``ClaudeSDKClient`` drive
an agent that runs in a cldpd pod, not on the host.

``PodTransport("fixer", issue=URL, options=options)`` passed as ``transport=`` runs the
pod's Claude Code (its image, pod.json's network allowlist, brokered credentials,
resources, budgets and engine) and carries the SDK's stream-json both ways through the
run's stdin and output. The run is a cldpd run like any other: named, labelled, listed,
with a transcript and masked secrets.

Needs the optional extra: ``pip install 'cldpd_magic[sdk]'``. ``import cldpd_magic``
never imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import secrets as _secrets
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from .errors import CldpdError, InvalidRequestError
from .events import TERMINAL, Event, EventType
from .runs import Dispatcher, Session, validate_issue_url

if TYPE_CHECKING:
    from claude_agent_sdk import ClaudeAgentOptions

try:
    import anyio
    import claude_agent_sdk as _sdk
    from claude_agent_sdk import CLIConnectionError, ProcessError, Transport
except ImportError:  # the extra is missing: PodTransport says so when it is made
    _sdk = None
    Transport = object  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

__all__ = ["SDK_VERSIONS", "PodTransport", "SDKUnavailableError", "pod_cli_args"]

#: The versions of claude-agent-sdk this module is tested with, lowest and highest
#: (pyproject.toml's ``sdk`` extra says the same).
SDK_VERSIONS = ("0.2.143", "0.2.190")
#: Seconds :meth:`PodTransport.close` lets the agent end by itself after its input ends
#: (the SDK's own transport waits as long), before it stops the run.
CLOSE_WAIT = 5.0
#: Seconds a stopped run's container gets before it is killed.
STOP_TIMEOUT = 10.0


class SDKUnavailableError(CldpdError, ImportError):
    """claude-agent-sdk is not installed, or is a version this module is not tested with."""


def _version(text: str) -> tuple[int, ...]:
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(part) for part in found.groups()) if found else (0,)


def _check_sdk() -> None:
    """Raise SDKUnavailableError unless a tested claude-agent-sdk is importable."""
    low, high = SDK_VERSIONS
    wanted = f"claude-agent-sdk>={low},<={high}"
    if _sdk is None:
        raise SDKUnavailableError(
            "The Claude Agent SDK is not installed; install it with pip install 'cldpd_magic[sdk]'."
        )
    version = getattr(_sdk, "__version__", "unknown")
    if not _version(low) <= _version(version) <= _version(high):
        raise SDKUnavailableError(
            f"claude-agent-sdk {version} is not a version cldpd_magic is tested with; "
            f"install a tested one with pip install '{wanted}'."
        )


# --- ClaudeAgentOptions -> the pod's CLI arguments ---------------------------------------

#: Options that cannot apply to an agent in a pod, and what to do instead.
REFUSED_OPTIONS = {
    "cwd": "the agent works in the pod's workdir (pod.json's workdir and mounts)",
    "cli_path": "the agent is the Claude Code CLI of the pod's image",
    "add_dirs": "host directories are not in the container; mount them with pod.json's mounts",
    "env": "the agent's environment is pod.json's env and inheritEnv",
    "user": "the agent runs as the user of the pod's image",
    "plugins": "plugin directories on the host are not in the container; put them in the image",
    "continue_conversation": "each run starts a new container with no earlier conversation; "
    "resume a Claude Code session with resume= instead",
    "session_id": "cldpd names each run's Claude Code session (the container's "
    "cldpd.claude-session label)",
    "session_store": "the run's transcript is kept by cldpd; leave session_store unset",
    "enable_file_checkpointing": "it needs CLAUDE_CODE_ENABLE_SDK_FILE_CHECKPOINTING in the "
    "agent's environment; set that in pod.json's env instead",
}


def _given(options: Any, name: str) -> bool:
    """Whether an option has a value other than its default."""
    for field in dataclasses.fields(options):
        if field.name == name:
            if field.default_factory is not dataclasses.MISSING:
                return getattr(options, name) != field.default_factory()
            return getattr(options, name) != field.default
    return False


def _refuse(option: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"ClaudeAgentOptions.{option} cannot apply to an agent in a pod: {why}."
    )


def _is_json_object(text: Any) -> bool:
    return isinstance(text, str) and text.strip().startswith("{")


def _flag(flag: str, value: object) -> str:
    """One ``--flag=value`` argument: the value is bound to the flag whatever it holds."""
    return f"{flag}={value}"


def _prompt_and_tool_args(options: Any) -> list[str]:
    """The system prompt, tools, skills and permission arguments."""
    args: list[str] = []
    prompt = options.system_prompt
    if isinstance(prompt, str):
        args.append(_flag("--system-prompt", prompt))
    elif isinstance(prompt, dict):
        kind = prompt.get("type")
        if kind == "file":
            raise _refuse("system_prompt", "a prompt file names a host path; pass its text")
        if kind == "custom":
            args.append(_flag("--system-prompt", prompt["prompt"]))
        elif kind == "preset" and "append" in prompt:
            args.append(_flag("--append-system-prompt", prompt["append"]))
    tools = options.tools
    if isinstance(tools, list):
        args.append(_flag("--tools", ",".join(tools)))
    elif tools is not None:
        args.append(_flag("--tools", "default"))
    allowed = list(options.allowed_tools)
    sources = getattr(options, "setting_sources", None)
    skills = getattr(options, "skills", None)
    if skills is not None:
        wanted = ["Skill"] if skills == "all" else [f"Skill({name})" for name in skills]
        allowed += [tool for tool in wanted if tool not in allowed]
        sources = ["user", "project"] if sources is None else sources
    if allowed:
        args.append(_flag("--allowedTools", ",".join(allowed)))
    if options.disallowed_tools:
        args.append(_flag("--disallowedTools", ",".join(options.disallowed_tools)))
    if sources is not None:
        args.append(_flag("--setting-sources", ",".join(sources)))
    tool_name = options.permission_prompt_tool_name
    if tool_name not in (None, "stdio"):
        raise _refuse(
            "permission_prompt_tool_name",
            "the pod's agent always asks over stdio, where can_use_tool answers",
        )
    if options.permission_mode:
        args.append(_flag("--permission-mode", options.permission_mode))
    return args


def _model_and_limit_args(options: Any) -> list[str]:
    """The model, thinking, budget and turn arguments."""
    args: list[str] = []
    if options.max_turns:  # two arguments, so pod.json's maxTurns cap sees them
        args += ["--max-turns", str(options.max_turns)]
    if options.max_budget_usd is not None:
        args += ["--max-budget-usd", str(options.max_budget_usd)]
    task_budget = getattr(options, "task_budget", None)
    if task_budget is not None:
        args.append(_flag("--task-budget", task_budget["total"]))
    for option, flag in (("model", "--model"), ("fallback_model", "--fallback-model")):
        if getattr(options, option, None):
            args.append(_flag(flag, getattr(options, option)))
    if options.betas:
        args.append(_flag("--betas", ",".join(options.betas)))
    thinking = getattr(options, "thinking", None)
    if thinking is not None:
        if thinking["type"] == "enabled":
            args.append(_flag("--max-thinking-tokens", thinking["budget_tokens"]))
        else:
            args.append(_flag("--thinking", thinking["type"]))
        if thinking["type"] != "disabled" and "display" in thinking:
            args.append(_flag("--thinking-display", thinking["display"]))
    elif options.max_thinking_tokens is not None:
        args.append(_flag("--max-thinking-tokens", options.max_thinking_tokens))
    if getattr(options, "effort", None) is not None:
        args.append(_flag("--effort", options.effort))
    output_format = options.output_format
    schema = output_format.get("schema") if isinstance(output_format, dict) else None
    if schema is not None and output_format.get("type") == "json_schema":
        args.append(_flag("--json-schema", json.dumps(schema)))
    return args


def _session_and_config_args(options: Any) -> list[str]:
    """The resume, settings, MCP and stream arguments (``--resume`` itself is not here)."""
    args: list[str] = []
    if options.fork_session:
        args.append("--fork-session")
    for option, flag in (("resume_session_at", "--resume-session-at"),
                         ("resume_drops_turn", "--resume-drops-turn")):  # fmt: skip
        if getattr(options, option, None) is not None:
            args.append(_flag(flag, getattr(options, option)))
    settings = options.settings
    if settings is not None and not _is_json_object(settings):
        raise _refuse("settings", "a settings file names a host path; pass the settings as JSON")
    if options.sandbox is not None:
        merged = json.loads(settings) if settings else {}
        settings = json.dumps({**merged, "sandbox": options.sandbox})
    if settings:
        args += ["--settings", settings.strip()]
    servers = options.mcp_servers
    if isinstance(servers, dict) and servers:
        # An SDK server runs in this process (the SDK answers its calls); the others run
        # in the container, or are reached from it through the pod's network.
        config = {name: {k: v for k, v in server.items() if k != "instance"}
                  for name, server in servers.items()}  # fmt: skip
        args += ["--mcp-config", json.dumps({"mcpServers": config})]
    elif servers and not isinstance(servers, dict):
        if not _is_json_object(str(servers)):
            raise _refuse("mcp_servers", "an MCP config file names a host path; pass a dict")
        args += ["--mcp-config", str(servers).strip()]
    for option, flag in (("strict_mcp_config", "--strict-mcp-config"),
                         ("include_partial_messages", "--include-partial-messages"),
                         ("include_hook_events", "--include-hook-events")):  # fmt: skip
        if getattr(options, option, False):
            args.append(flag)
    for flag, value in options.extra_args.items():
        args += [f"--{flag}"] if value is None else [_flag(f"--{flag}", value)]
    return args


def pod_cli_args(options: ClaudeAgentOptions | None) -> list[str]:
    """The Claude Code arguments that carry ``options`` to an agent in a pod.

    They come after pod.json's ``args`` (so they win where both say the same). The SDK's
    own transport adds ``--system-prompt ""`` when ``system_prompt`` is None; here the
    pod's agent keeps Claude Code's own prompt then. Options the SDK itself acts on
    (``can_use_tool``, ``hooks``, ``agents``, SDK MCP servers' handlers, ``stderr``) need
    no argument; ``resume`` is :class:`PodTransport`'s to pass.

    Args:
        options: The SDK's options (None: none).

    Raises:
        InvalidRequestError: An option cannot apply to an agent in a pod (a host
            directory, file or environment, another CLI); the sentence names it.
    """
    if options is None:
        return []
    for option, why in REFUSED_OPTIONS.items():
        if _given(options, option):
            raise _refuse(option, why)
    return [
        *_prompt_and_tool_args(options),
        *_model_and_limit_args(options),
        *_session_and_config_args(options),
    ]


# --- the transport ------------------------------------------------------------------------


def _notebook_dispatcher() -> Dispatcher | None:
    """The dispatcher of cldpd's magics in this IPython kernel, if they are loaded."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    registry = getattr(getattr(shell, "magics_manager", None), "registry", None) or {}
    dispatcher = getattr(registry.get("CldpdMagics"), "dispatcher", None)
    return dispatcher if isinstance(dispatcher, Dispatcher) else None


def _same_content(content: Any) -> str:
    """A user message's content in one form: text alone is one text block."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return json.dumps(content, sort_keys=True)


def _started(session: Session) -> None:
    """Wait until the run's agent has started; raise CLIConnectionError if it cannot."""
    for batch in session.event_batches():
        for event in batch:
            if event.type is EventType.CONTAINER_STARTED:
                return
            if event.type is EventType.ERROR:
                raise CLIConnectionError(event.data) from session.error
    raise CLIConnectionError(f"Run {session.run} ended before its agent started.")


class PodTransport(Transport):
    """A ``claude_agent_sdk.Transport`` whose Claude Code runs in a cldpd pod.

    ``query(prompt=..., options=options, transport=PodTransport("fixer", options=options))``
    and ``ClaudeSDKClient(options, transport=PodTransport(...))`` then run the pod's agent:
    its image and CLI (not the SDK's bundled one), pod.json's network allowlist, brokered
    credentials, resources, budgets and engine. The SDK gives a transport none of its
    options, so give them here too: what makes sense in a pod becomes CLI arguments
    (:func:`pod_cli_args`), the rest is refused in one sentence.

    The agent always runs with ``--permission-prompt-tool stdio``: with ``can_use_tool``
    the SDK's callback answers its approvals; without one the SDK answers each with an
    error, which denies the tool, as the SDK's own transport (without the flag) does.

    The run is a cldpd run like any other: named, labelled, listed (``Dispatcher.running``,
    ``%cldpd_sessions``, the picker, ``cldpd list``), with a transcript and masked
    secrets; ``%cldpd_attach RUN`` follows it. :meth:`close` ends it: its input ends, the
    agent gets :data:`CLOSE_WAIT` seconds to end by itself (a turn in flight is
    interrupted first), then the run is stopped. A keepAlive pod's container stays,
    idle, when its agent ended by itself (resume it, or stop it); one stopped is removed.

    Args:
        pod: The pod's name.
        issue: A GitHub issue URL: the pod's template and the issue line are put before
            the first prompt the SDK writes, as a start on that issue would send them.
        run: The run's name; made up as for any start when None.
        dispatcher: Runs the pod; when None, the dispatcher of cldpd's magics in this
            kernel if they are loaded (so the magics and the picker see the run), else
            a new ``Dispatcher()``.
        options: The ``ClaudeAgentOptions`` given to ``query()`` or ``ClaudeSDKClient``.

    Attributes:
        dispatcher: Runs the pod.
        pod: The pod's name.
        args: The CLI arguments made of ``options``.
        session: The run's :class:`~cldpd_magic.runs.Session` once connected (None before).

    Raises:
        SDKUnavailableError: claude-agent-sdk is missing or not a tested version.
        InvalidRequestError: An option cannot apply in a pod, or the issue URL is not one.
        PodNotFoundError, InvalidPodError, PodConfigError: The pod is unusable.
    """

    def __init__(
        self,
        pod: str,
        *,
        issue: str | None = None,
        run: str | None = None,
        dispatcher: Dispatcher | None = None,
        options: ClaudeAgentOptions | None = None,
    ) -> None:
        _check_sdk()
        self.args = pod_cli_args(options)
        self._resume = options.resume if options is not None else None
        if issue is not None and self._resume:
            raise InvalidRequestError(
                "issue= starts a run on an issue and options.resume continues a Claude Code "
                "session; give one of them."
            )
        self._issue = validate_issue_url(issue) if issue is not None else None
        self.dispatcher = dispatcher or _notebook_dispatcher() or Dispatcher()
        self.pod = self.dispatcher.pod(pod).name
        self._run = run
        self._on_stderr: Callable[[str], None] | None = getattr(options, "stderr", None)
        self.session: Session | None = None
        self._closed = False
        self._busy = False  # a turn is in flight (the agent's state, and prompts written)
        self._prompted = False
        self._lock = threading.Lock()  # one write at a time, and the state below
        self._echoes: deque[str] = deque(maxlen=1000)  # prompts whose replay is not shown
        self._answered: deque[str] = deque(maxlen=1000)  # answers whose echo is not shown
        self._stderr_tail: deque[str] = deque(maxlen=20)

    def __repr__(self) -> str:
        run = self.session.run if self.session is not None else "not started"
        return f"PodTransport(pod={self.pod!r}, run={run!r})"

    # --- the Transport -----------------------------------------------------------------

    async def connect(self) -> None:
        """Start the run (its image is built first) and wait until its agent has started.

        Raises:
            CLIConnectionError: The run could not start (the cause is cldpd's error), or
                this transport was closed.
        """
        if self._closed:
            raise CLIConnectionError("This PodTransport was closed; make a new one.")
        if self.session is not None:
            return
        try:
            session = await anyio.to_thread.run_sync(self._start)
        except CldpdError as exc:
            raise CLIConnectionError(str(exc)) from exc
        self.session = session
        try:
            await anyio.to_thread.run_sync(_started, session, abandon_on_cancel=True)
        except BaseException:
            self._closed = True
            threading.Thread(target=session.stop, args=(STOP_TIMEOUT,), daemon=True).start()
            raise

    def _start(self) -> Session:
        return self.dispatcher.drive_session(
            self.pod, issue_url=self._issue, run=self._run, args=self.args, resume=self._resume
        )

    async def write(self, data: str) -> None:
        """Write the SDK's JSON lines to the agent's stdin, one writer at a time.

        Raises:
            CLIConnectionError: Not connected, closed, the input ended, or the agent ended.
        """
        with self._lock:
            session = self._connected()
            for line in data.split("\n"):
                if line.strip():
                    try:
                        session.stdin.write_line(self._outgoing(line, session))
                    except CldpdError as exc:
                        raise CLIConnectionError(str(exc)) from exc

    def read_messages(self) -> AsyncIterator[dict[str, Any]]:
        """The agent's stream-json messages, parsed, one per output line, in order.

        Lines that are not a JSON object (a pod may print text) are skipped; no line is
        too long. After the last, a non-zero exit raises ``ProcessError`` with its code
        (the SDK makes an error result's exit a ``ResultError``).
        """
        return self._messages()

    async def end_input(self) -> None:
        """End the agent's input: it finishes what was sent, then exits."""
        session = self.session
        if session is not None:
            with self._lock:
                session.stdin.close()

    async def close(self) -> None:
        """End the run, every wait bounded: see the class's description."""
        if self._closed:
            return
        self._closed = True
        session = self.session
        if session is None or session.done:
            return
        with self._lock:
            busy = self._busy
        with anyio.move_on_after(CLOSE_WAIT + 2 * STOP_TIMEOUT + 30):
            await anyio.to_thread.run_sync(_finish, session, busy, abandon_on_cancel=True)

    def is_ready(self) -> bool:
        """Whether the agent runs and this transport is open."""
        return self.session is not None and not self._closed and not self.session.done

    # --- what goes in ----------------------------------------------------------------

    def _connected(self) -> Session:
        if self._closed:
            raise CLIConnectionError("This PodTransport was closed; make a new one.")
        if self.session is None:
            raise CLIConnectionError("This PodTransport is not connected; connect() it first.")
        return self.session

    def _outgoing(self, line: str, session: Session) -> str:
        """The line to write: the first prompt gets the start prompt; what the agent will
        echo is noted so that the echo is not shown."""
        try:
            message = json.loads(line)
        except ValueError:
            return line
        if not isinstance(message, dict):
            return line
        kind = message.get("type")
        if kind == "control_response":
            self._answered.append(str((message.get("response") or {}).get("request_id")))
            return line
        if kind != "user" or not isinstance(message.get("message"), dict):
            return line
        self._busy = True
        body = message["message"]
        if not self._prompted and self._issue is not None and session.start_prompt:
            content = body.get("content")
            if isinstance(content, str):
                body["content"] = f"{session.start_prompt}\n\n{content}"
            elif isinstance(content, list):
                body["content"] = [{"type": "text", "text": session.start_prompt}, *content]
            line = json.dumps(message)
        self._prompted = True
        self._echoes.append(_same_content(body.get("content")))
        return line

    # --- what comes out --------------------------------------------------------------

    async def _messages(self) -> AsyncIterator[dict[str, Any]]:
        session = self._connected()
        batches = session.event_batches()
        end: Event | None = None
        while end is None:
            batch = await anyio.to_thread.run_sync(next, batches, None, abandon_on_cancel=True)
            if batch is None:
                break
            for event in batch:
                if event.type is EventType.OUTPUT:
                    message = self._incoming(event.data)
                    if message is not None:
                        yield message
                elif event.type is EventType.STDERR:
                    self._stderr(event.data)
                elif event.type is EventType.EGRESS_BLOCKED:
                    self._stderr(f"cldpd: egress blocked: {event.data}")
                elif event.type in TERMINAL:
                    end = event
        if end is not None and (end.type is EventType.ERROR or end.code):
            reason = f" ({session.stop_reason})" if session.stop_reason else ""
            raise ProcessError(
                f"The agent of run {session.run} failed{reason}: {end.data}"
                if end.type is EventType.ERROR
                else f"The agent of run {session.run} failed{reason}",
                exit_code=end.code,
                stderr="\n".join(self._stderr_tail) or None,
            )

    def _incoming(self, line: str) -> dict[str, Any] | None:
        """A line of the agent's output as the SDK wants it; None for one it does not."""
        text = line.strip()
        if not text.startswith("{"):
            return None
        try:
            message = json.loads(text)
        except ValueError:
            logger.debug("a line of the agent's output is not JSON; skipped")
            return None
        if not isinstance(message, dict):
            return None
        kind = message.get("type")
        with self._lock:
            if kind == "user" and message.get("isReplay"):
                echo = _same_content((message.get("message") or {}).get("content"))
                if echo in self._echoes:  # a prompt the SDK wrote, echoed as its turn starts
                    self._echoes.remove(echo)
                    return None
            elif kind == "control_response":
                answered = str((message.get("response") or {}).get("request_id"))
                if answered in self._answered:  # the SDK's answer, echoed
                    self._answered.remove(answered)
                    return None
            elif kind == "system" and message.get("subtype") == "session_state_changed":
                self._busy = message.get("state") != "idle"
                # Asked for by cldpd, not by the caller: the SDK uses them and hides them.
                message.setdefault("sdk_host_only", True)
        return message

    def _stderr(self, line: str) -> None:
        self._stderr_tail.append(line)
        if self._on_stderr is not None:
            try:
                self._on_stderr(line)
            except Exception:
                logger.debug("the stderr callback failed", exc_info=True)


def _finish(session: Session, busy: bool) -> None:
    """End a run: interrupt a turn in flight, end the input, wait a while, then stop it."""
    stdin = session.stdin
    if busy and not stdin.closed:
        request_id = f"cldpd_close_{_secrets.token_hex(4)}"
        interrupt = {"type": "control_request", "request_id": request_id,
                     "request": {"subtype": "interrupt"}}  # fmt: skip
        with contextlib.suppress(CldpdError):
            stdin.write_line(json.dumps(interrupt))
    stdin.close()
    try:
        session.wait(CLOSE_WAIT)
        return
    except TimeoutError:
        pass
    except Exception:  # the run ended with an error: nothing left to stop
        return
    session.stop(STOP_TIMEOUT)
