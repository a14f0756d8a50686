"""The Dispatcher: finds pods, builds their images and runs their agents as Sessions."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .batch import Batch, Variant, plan_batch
from .egress import EgressAttempt, EgressGuard, brokered_credentials, remove_egress_of
from .engines import EngineSetting, MultiEngineRunner
from .errors import (
    CldpdError,
    ContainerFailedError,
    InvalidRequestError,
    PodNotFoundError,
    PodRunningError,
    SessionNotFoundError,
)
from .logs import log_swallowed
from .pods import (
    Pod,
    container_name,
    default_pods_dir,
    discover_all,
    discover_pod,
    is_valid_pod_name,
    validate_pod_name,
)
from .protocol import ContainerInfo, ExecHandle, Runner, RunOptions, Writer
from .render import TextFeed
from .secrets import config_secrets, container_secrets, forwarded_env
from .session import EventType, Session, SessionControl, SessionKind, new_session_id
from .usage import Limits

logger = logging.getLogger(__name__)

LABEL_POD = "cldpd.pod"
LABEL_SESSION = "cldpd.session"
LABEL_CLAUDE_SESSION = "cldpd.claude-session"
LABEL_KEEP_ALIVE = "cldpd.keep-alive"
LABEL_TRANSCRIPT = "cldpd.transcript"
LABEL_PODS_DIR = "cldpd.pods-dir"
LABEL_INHERIT_ENV = "cldpd.inherit-env"
LABEL_RUN = "cldpd.run"

#: A session's job; a batch wraps it to queue the run until a slot is free.
Job = Callable[[SessionControl], int]

#: The command a keepAlive container idles on; the agent then runs through exec.
IDLE_COMMAND = ["sh", "-c", "trap 'exit 0' INT TERM; while :; do sleep 3600 & wait $!; done"]

#: Linux refuses one argument or environment entry of 131072 bytes or more (MAX_ARG_STRLEN,
#: 32 pages, counting its terminating NUL) with "argument list too long".
MAX_ARGUMENT_BYTES = 131072 - 1
#: All arguments and environment entries together (each with its NUL and an 8-byte pointer)
#: may take a quarter of the stack limit, 8 MiB in containers: 2 MiB. 64 KiB of it is
#: left for the image's own environment and the exec wrapper.
MAX_COMMAND_LINE_BYTES = 2 * 1024 * 1024 - 64 * 1024


def default_transcript_dir() -> Path:
    """Return where transcripts go: ``$CLDPD_SESSIONS_DIR`` or ``~/.cldpd/sessions``."""
    env = os.environ.get("CLDPD_SESSIONS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cldpd" / "sessions"


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


def agent_command(
    pod: Pod, prompt: str, *, session_uuid: str, resume: bool, args: Sequence[str] = ()
) -> list[str]:
    """The Claude Code command line for a start (``--session-id``) or resume (``--resume``).

    pod.json's caps come first (``--max-budget-usd``, ``--max-turns``), then its args,
    then ``args`` (a batch variant's). A prompt that starts with ``-`` (a Markdown list,
    YAML front matter, pasted text), or that follows args holding an option that takes
    several values or an optional one (``--allowedTools Bash``), is put after ``--``, so
    the CLI never reads it as an option or an option's value.
    """
    flag = "--resume" if resume else "--session-id"
    all_args = [*cap_args(pod, args), *pod.config.args, *args]
    greedy = any(arg in GREEDY_OPTIONS for arg in all_args)
    end_of_options = ["--"] if prompt.startswith("-") or greedy else []
    return [
        "claude", "-p", "--output-format", "stream-json", "--verbose",
        flag, session_uuid, *all_args, *end_of_options, prompt,
    ]  # fmt: skip


def check_command_line(cmd: list[str], env: dict[str, str], prompt_is: str, fix: str) -> None:
    """Refuse up front a command the kernel would refuse with "argument list too long".

    Args:
        cmd: The agent's command; its last argument is the prompt.
        env: The environment it runs with.
        prompt_is: What the prompt is, for the message (``The prompt``).
        fix: What to do about a prompt that is too long.

    Raises:
        InvalidRequestError: An argument or environment entry holds a NUL or is over
            :data:`MAX_ARGUMENT_BYTES`, or all of them are over :data:`MAX_COMMAND_LINE_BYTES`.
    """
    named = [(f"The argument {a[:40]!r} in pod.json args", a) for a in cmd[:-1]]
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
class RunningPod:
    """A cldpd container found through its Docker labels.

    Attributes:
        pod: Pod name.
        container: Container name.
        status: Docker status (running, exited, ...).
        session_id: The cldpd session that started it.
        claude_session: Claude Code's session uuid.
        keep_alive: Whether it idles between agent runs.
        started_at: When it started (ISO 8601).
        transcript: The transcript path of the session that started it.
        run: The run's name (the container's name without ``cldpd-``).
    """

    pod: str
    container: str
    status: str
    session_id: str
    claude_session: str
    keep_alive: bool
    started_at: str
    transcript: str
    run: str = ""

    @classmethod
    def from_info(cls, info: ContainerInfo) -> RunningPod:
        """Build from a container description."""
        labels = info.labels
        return cls(
            pod=labels.get(LABEL_POD, ""),
            container=info.name,
            status=info.status,
            session_id=labels.get(LABEL_SESSION, ""),
            claude_session=labels.get(LABEL_CLAUDE_SESSION, ""),
            keep_alive=labels.get(LABEL_KEEP_ALIVE) == "true",
            started_at=info.started_at,
            transcript=labels.get(LABEL_TRANSCRIPT, ""),
            run=run_of(info),
        )


def run_of(info: ContainerInfo) -> str:
    """A cldpd container's run name: its ``cldpd.run`` label, else its name without ``cldpd-``."""
    return info.labels.get(LABEL_RUN) or info.name.removeprefix("cldpd-")


class Dispatcher:
    """Discovers pods, builds their images and runs their agents.

    Args:
        pods_dir: The pods directory; :func:`default_pods_dir` when None.
        runner: The Docker operations; a :class:`DockerRunner` when None.
        engines: The engines setting (see :func:`~cldpd_magic.engines.parse_engines`),
            used when ``runner`` is None; $CLDPD_ENGINES when None; one Docker engine
            (DOCKER_HOST) when neither names any.
        transcript_dir: Where session transcripts go; :func:`default_transcript_dir`
            when None.

    Attributes:
        sessions: Every session this dispatcher started, oldest first.
    """

    def __init__(
        self,
        pods_dir: str | os.PathLike[str] | None = None,
        runner: Runner | None = None,
        transcript_dir: str | os.PathLike[str] | None = None,
        *,
        engines: EngineSetting = None,
    ) -> None:
        self.pods_dir = Path(pods_dir).expanduser() if pods_dir else default_pods_dir()
        if runner is None:
            runner = MultiEngineRunner.from_settings(engines)
        if runner is None:
            from .runner import DockerRunner  # docker-py loads only when it is used

            runner = DockerRunner()
        self.runner: Runner = runner
        self.transcript_dir = (
            Path(transcript_dir).expanduser() if transcript_dir else default_transcript_dir()
        )
        self.sessions: list[Session] = []
        self._lock = threading.Lock()
        self._reserved: set[str] = set()  # run names being started, under _names_lock
        self._names_lock = threading.Lock()
        self._build_locks: dict[str, threading.Lock] = {}
        self._egress: dict[str, EgressGuard] = {}

    def pods(self) -> list[Pod]:
        """Every valid pod in the pods directory, sorted by name."""
        return discover_all(self.pods_dir)

    def pod(self, name: str) -> Pod:
        """Discover one pod by name (see :func:`discover_pod`)."""
        return discover_pod(self.pods_dir, name)

    def running(self) -> list[RunningPod]:
        """Containers with a ``cldpd.pod`` label, from any process, sorted by name."""
        return [RunningPod.from_info(i) for i in self.runner.list(LABEL_POD)]

    def local_sessions(
        self, pod_name: str | None = None, *, active: bool = False, run: str | None = None
    ) -> list[Session]:
        """This dispatcher's sessions, optionally of one pod or one run, and only those not done."""
        with self._lock:
            found = list(self.sessions)
        return [
            s
            for s in found
            if (pod_name is None or s.pod_name == pod_name)
            and (run is None or s.run == run)
            and not (active and s.done)
        ]

    def runs(self, pod_name: str) -> list[str]:
        """The names of a pod's runs: its running containers and this process's active sessions."""
        names = {s.run for s in self.local_sessions(pod_name, active=True)}
        names.update(
            run_of(i)
            for i in self.runner.list(LABEL_POD)
            if i.running and i.labels.get(LABEL_POD) == pod_name
        )
        return sorted(names)

    def _register(self, session: Session) -> Session:
        with self._lock:
            self.sessions.append(session)
        with self._names_lock:
            self._reserved.discard(session.run)
        return session

    def _run_taken(self, run: str) -> bool:
        if run in self._reserved or self.local_sessions(active=True, run=run):
            return True
        info = self.runner.inspect(container_name(run))
        return info is not None and (info.running or LABEL_POD not in info.labels)

    def _name_run(self, pod: Pod, url: str, run: str | None, *, alone: bool = True) -> str:
        """Choose and reserve a run's name: given, the pod's own, or ``<pod>-<issue>[-N]``."""
        if run is not None:
            if not is_valid_pod_name(run) or len(container_name(run)) > 128:
                raise InvalidRequestError(
                    f"{run!r} cannot name a run; use letters, digits, '_', '.' and '-', "
                    "starting with a letter or digit."
                )
            with self._names_lock:
                if run in self._reserved:
                    raise PodRunningError(f"Run {run} is being started; choose another name.")
                self._reserved.add(run)
            return run
        others = self.runs(pod.name)
        with self._names_lock:
            # The pod's own container, when taken by something else, is _ensure_free's to say.
            if alone and not others and pod.name not in self._reserved:
                self._reserved.add(pod.name)
                return pod.name
            base = f"{pod.name}-{issue_number(url) or 'run'}"
            name, n = base, 1
            while self._run_taken(name):
                n += 1
                name = f"{base}-{n}"
            self._reserved.add(name)
            return name

    def _ensure_free(self, pod: Pod, run: str) -> None:
        what = f"Pod {pod.name}" if run == pod.name else f"Run {run} of pod {pod.name}"
        if self.local_sessions(active=True, run=run):
            raise PodRunningError(
                f"{what} is already running in this kernel; resume it or stop it first."
            )
        info = self.runner.inspect(container_name(run))
        if info is None:
            return
        if info.running:
            raise PodRunningError(
                f"{what} is already running (container {info.name}); resume it or stop it first."
            )
        if LABEL_POD in info.labels:
            self.runner.remove(info.name)
        else:
            raise PodRunningError(
                f"A container named {info.name} exists and is not a cldpd pod; remove it first."
            )

    def _build(self, pod: Pod, ctl: SessionControl) -> None:
        """Build the pod's image; runs of one image build one at a time (the rest hit the cache)."""
        with self._lock:
            lock = self._build_locks.setdefault(pod.image, threading.Lock())
        with lock:
            ctl.check_cancelled()
            self.runner.build(
                pod.image,
                str(pod.dir),
                pod.config.build_args,
                on_output=lambda line: ctl.emit(EventType.BUILD_OUTPUT, line),
                cancel=ctl.cancelled,
                engine=pod.config.engine,
            )

    def start_session(
        self,
        pod_name: str,
        issue_url: str,
        *,
        run: str | None = None,
        args: Sequence[str] = (),
        prompt: str = "",
        timeout: float | None = None,
        _wrap_job: Callable[[Job], Job] | None = None,
        _alone: bool = True,
    ) -> Session:
        """Build the pod's image and run its agent on an issue, returning at once.

        Each run is its own container, ``cldpd-<run>``: a pod may run on several issues
        at once. The run is named ``run`` when given; else the pod's name when the pod
        has no other run, else ``<pod>-<issue number>`` (then ``-2``, ``-3``, ...).

        pod.json's ``maxCostUsd``, ``maxTurns`` and ``timeoutSeconds`` cap the run: the
        first two are passed to the CLI as well; passing any stops the run gracefully,
        and it ends ``stopped`` with the reason in :attr:`Session.stop_reason`.

        Args:
            pod_name: The pod.
            issue_url: The GitHub issue's http(s) URL.
            run: The run's name (a container-name-safe word); made up when None.
            args: CLI arguments after the pod's own (a batch variant's, e.g. ``--model``).
            prompt: Text added after the start prompt, after a blank line.
            timeout: Seconds the agent may run before it is stopped; pod.json's
                ``timeoutSeconds`` when None.

        Returns:
            The running Session; its events are BUILD_STARTED, BUILD_OUTPUT*,
            BUILD_COMPLETE, CONTAINER_STARTED, (OUTPUT|STDERR)*, then CONTAINER_EXITED
            or ERROR.

        Raises:
            InvalidRequestError: The URL is not http(s); the prompt, an argument or an
                environment entry holds a NUL or is over the kernel's limits.
            PodNotFoundError, InvalidPodError, PodConfigError: The pod is unusable.
            DockerUnavailableError: Docker does not answer.
            PodRunningError: The named run already runs.
        """
        url = validate_issue_url(issue_url)
        pod = self.pod(pod_name)
        if timeout is not None and not timeout > 0:
            raise InvalidRequestError(
                f"The timeout {timeout!r} is not a positive number of seconds."
            )
        session_uuid = str(uuid.uuid4())
        session_id = new_session_id(pod.name)
        forwarded = forwarded_env(pod.config.inherit_env)
        missing = [n for n in pod.config.inherit_env if n not in forwarded]
        # Resolved once, here: the values masked are the values forwarded.
        env = {**pod.config.env, **forwarded}
        secrets = config_secrets(pod.config.env, forwarded, forwarded)
        brokered = brokered_credentials(pod.name, pod.config.credentials, pod.config.env)
        secrets += [value for _kind, value, _upstream in brokered]
        start_prompt = build_prompt(pod.template, url) + (f"\n\n{prompt}" if prompt else "")
        cmd = agent_command(pod, start_prompt, session_uuid=session_uuid, resume=False,
                            args=list(args))  # fmt: skip
        check_command_line(
            cmd, env, f"The start prompt of pod {pod.name} (template.md and the issue line)",
            f"shorten {pod.dir / 'template.md'}",
        )  # fmt: skip
        self.runner.preflight()
        run = self._name_run(pod, url, run, alone=_alone)
        try:
            self._ensure_free(pod, run)
        except BaseException:
            self._unreserve(run)
            raise
        transcript = self.transcript_dir / f"{session_id}.jsonl"
        opts = RunOptions(
            image=pod.image,
            name=container_name(run),
            cmd=cmd,
            env=env,
            workdir=pod.config.workdir,
            remove=not pod.config.keep_alive,
            mounts=list(pod.config.mounts),
            network=pod.config.network,
            resources=pod.config.resources,
            cap_add=list(pod.config.cap_add),
            read_only_root=pod.config.read_only_root,
            engine=pod.config.engine,
            labels={
                LABEL_POD: pod.name,
                LABEL_SESSION: session_id,
                LABEL_CLAUDE_SESSION: session_uuid,
                LABEL_KEEP_ALIVE: "true" if pod.config.keep_alive else "false",
                LABEL_TRANSCRIPT: str(transcript),
                LABEL_PODS_DIR: str(pod.dir.parent),
                LABEL_INHERIT_ENV: ",".join(pod.config.inherit_env),
                LABEL_RUN: run,
            },
        )
        runner = self.runner

        def job(ctl: SessionControl) -> int:
            ctl.emit(EventType.BUILD_STARTED, pod.image)
            if missing:
                ctl.emit(
                    EventType.BUILD_OUTPUT,
                    "cldpd: not set on this host, so not forwarded: " + ", ".join(missing),
                )
            self._build(pod, ctl)
            guard = None
            if pod.config.egress is not None:

                def on_attempt(attempt: EgressAttempt) -> None:
                    if not attempt.allowed:
                        ctl.emit(EventType.EGRESS_BLOCKED, attempt.target)

                guard = EgressGuard(
                    runner, opts.name, pod.config.egress, brokered, on_attempt=on_attempt,
                    on_build_output=lambda line: ctl.emit(EventType.BUILD_OUTPUT, line),
                )  # fmt: skip
                guard.ensure_image()
            ctl.check_cancelled()
            ctl.emit(EventType.BUILD_COMPLETE, pod.image)
            try:
                run_opts = opts
                if guard is not None:
                    self._egress[opts.name] = guard
                    run_opts = guard.setup(opts)
                    ctl.check_cancelled()
                if pod.config.keep_alive:
                    return self._run_kept_alive(ctl, run_opts)

                def started(info: ContainerInfo) -> None:
                    ctl.emit(EventType.CONTAINER_STARTED, info.name)
                    ctl.set_stopper(lambda t: runner.stop(info.name, t))

                return runner.run(run_opts, ctl.stdout, ctl.stderr, on_start=started)
            finally:
                # A kept-alive pod keeps its egress until it is stopped (_remove_if_ended).
                if guard is not None and not (pod.config.keep_alive and runner.inspect(opts.name)):
                    guard.remove()

        try:
            session = Session(pod.name, opts.name, _wrap_job(job) if _wrap_job else job,
                              self.transcript_dir, secrets, kind=SessionKind.START,
                              session_id=session_id, claude_session=session_uuid,
                              missing_env=missing, run=run,
                              limits=pod_limits(pod, timeout))  # fmt: skip
        except BaseException:
            self._unreserve(run)
            raise
        return self._register(session)

    def _unreserve(self, run: str) -> None:
        with self._names_lock:
            self._reserved.discard(run)

    def _run_kept_alive(self, ctl: SessionControl, opts: RunOptions) -> int:
        agent_cmd = opts.cmd
        idle = RunOptions(**{**opts.__dict__, "cmd": IDLE_COMMAND, "remove": False})
        runner = self.runner
        info = runner.start(idle)
        ctl.set_stopper(lambda t: runner.stop(info.name, t))
        ctl.emit(EventType.CONTAINER_STARTED, info.name)
        return runner.exec(info.name, agent_cmd, ctl.stdout, ctl.stderr)

    @staticmethod
    def secrets(pod: Pod) -> list[str]:
        """The values to mask for a pod: secret-looking env values and forwarded variables."""
        return pod.secret_values()

    @staticmethod
    def container_secrets(info: ContainerInfo) -> list[str]:
        """The values to mask that a running container holds: forwarded and secret-looking.

        A pod may have been started by another process, whose forwarded values differ
        from this one's.
        """
        return container_secrets(info.env, info.labels.get(LABEL_INHERIT_ENV, "").split(","))

    def resolve_run(self, name: str, doing: str = "use") -> str:
        """The run a name means: a run of that name, else the one run of a pod of that name.

        A name that matches nothing is returned as it is (the caller says it is not running).

        Args:
            name: A run name, or a pod name.
            doing: What the caller does, for the message (``stop``, ``resume``, ...).

        Raises:
            InvalidPodError: The name cannot name a pod or a run.
            InvalidRequestError: The name is a pod with several runs (they are listed).
        """
        validate_pod_name(name)
        if self.local_sessions(active=True, run=name):
            return name
        info = self.runner.inspect(container_name(name))
        if info is not None and LABEL_POD in info.labels:
            return name
        runs = self.runs(name)
        if len(runs) > 1:
            raise InvalidRequestError(
                f"Pod {name} has {len(runs)} runs ({', '.join(runs)}); name the run to {doing}."
            )
        return runs[0] if runs else name

    def _running_container(
        self, pod_name: str, not_running: str, *, known: bool = False, doing: str = "use"
    ) -> ContainerInfo:
        """The running container of a run (or of a pod's one run), else SessionNotFoundError."""
        validate_pod_name(pod_name)
        self.runner.preflight()
        info = self.runner.inspect(container_name(self.resolve_run(pod_name, doing)))
        if info is None or not info.running:
            if known:
                self.pod(pod_name)  # an unknown pod is a clearer error than "not running"
            raise SessionNotFoundError(not_running)
        return info

    def _pod_of(self, pod_name: str, info: ContainerInfo) -> Pod:
        """The pod of a running container: from our pods_dir, else from where it was started."""
        try:
            return self.pod(pod_name)
        except PodNotFoundError:
            started_from = info.labels.get(LABEL_PODS_DIR)
            if not started_from or Path(started_from) == self.pods_dir:
                raise
            return discover_pod(started_from, pod_name)

    def resume_session(self, pod_name: str, prompt: str) -> Session:
        """Send a follow-up prompt to a run's running container, returning at once.

        ``pod_name`` is a run, or a pod with one run (several are an InvalidRequestError
        listing them).

        The agent resumes its Claude Code session (``--resume``, the uuid read from the
        container's label), through exec. Stopping this session ends that exec only.

        Args:
            pod_name: The pod.
            prompt: The follow-up prompt, verbatim.

        Returns:
            The Session; its events are CONTAINER_STARTED, (OUTPUT|STDERR)*, then
            CONTAINER_EXITED or ERROR.

        Raises:
            InvalidRequestError: The prompt is empty, holds a NUL or is over the kernel's
                limits (see :func:`check_command_line`).
            SessionNotFoundError: Nothing runs for the pod.
        """
        if not prompt or not prompt.strip():
            raise InvalidRequestError("The prompt is empty; say what the agent should do next.")
        info = self._running_container(
            pod_name,
            f"Pod {pod_name} is not running; start it first with an issue URL.",
            known=True,
            doing="resume",
        )
        pod = self._pod_of(info.labels.get(LABEL_POD) or pod_name, info)
        session_uuid = info.labels.get(LABEL_CLAUDE_SESSION) or str(uuid.uuid4())
        secrets = self.secrets(pod) + self.container_secrets(info)
        cmd = agent_command(pod, prompt, session_uuid=session_uuid, resume=True)
        check_command_line(cmd, info.env, "The prompt", "shorten it")
        runner = self.runner

        def job(ctl: SessionControl) -> int:
            ctl.emit(EventType.CONTAINER_STARTED, info.name)

            def started(handle: ExecHandle) -> None:
                ctl.set_stopper(lambda t: runner.stop_exec(handle, t))

            return runner.exec(info.name, cmd, ctl.stdout, ctl.stderr, on_start=started)

        session = Session(pod.name, info.name, job, self.transcript_dir, secrets,
                          kind=SessionKind.RESUME, claude_session=session_uuid,
                          run=run_of(info), limits=pod_limits(pod))  # fmt: skip
        return self._register(session)

    def attach_session(self, pod_name: str) -> Session:
        """Follow the output of a run's container started elsewhere (another kernel).

        ``pod_name`` is a run, or a pod with one run (several are an InvalidRequestError
        listing them); a new Dispatcher finds the run by its container's labels.

        The output is replayed from the container's start, then followed to its end.

        Args:
            pod_name: The pod.

        Returns:
            A Session of kind ``attach``; stopping it stops the pod. Once the container
            has ended, it is removed.

        Raises:
            SessionNotFoundError: Nothing runs for the pod.
        """
        info = self._running_container(
            pod_name, f"Pod {pod_name} is not running; nothing to attach to.", doing="attach to"
        )
        name = info.name
        pod_of_run = info.labels.get(LABEL_POD) or pod_name
        try:
            secrets = self.secrets(self._pod_of(pod_of_run, info))
        except CldpdError:  # the pod's directory may be gone; the container still runs
            log_swallowed(logger, f"pod {pod_name}: its directory is not readable; attaching")
            secrets = []
        secrets += self.container_secrets(info)
        runner = self.runner

        kept_alive = info.labels.get(LABEL_KEEP_ALIVE) == "true"
        transcript = info.labels.get(LABEL_TRANSCRIPT, "")

        def job(ctl: SessionControl) -> int:
            ctl.emit(EventType.CONTAINER_STARTED, name)
            if kept_alive:
                ctl.stderr.write(
                    "cldpd: this pod is kept alive and its agent runs through exec, whose "
                    "output went to the process that started it"
                    + (f" (transcript: {transcript})" if transcript else "")
                    + "; resume it to run the agent here, or stop it.\n"
                )
            ctl.set_stopper(lambda t: runner.stop(name, t))
            try:
                return runner.logs(name, ctl.stdout, ctl.stderr)
            finally:
                self._remove_if_ended(name)

        return self._register(Session(pod_of_run, name, job, self.transcript_dir, secrets,
                                      kind=SessionKind.ATTACH, run=run_of(info)))  # fmt: skip

    def stop(self, pod_name: str, timeout: float = 10.0) -> bool:
        """Stop a run gracefully: its sessions in this process, then its container.

        Stopping a pod that is not running is fine; the other runs of its pod go on.

        Args:
            pod_name: A run, or a pod with one run.
            timeout: Seconds before the container is killed.

        Returns:
            Whether anything was running: a session of this process or the container.

        Raises:
            InvalidPodError: The name is not a pod name.
            InvalidRequestError: The name is a pod with several runs (they are listed).
            StopFailedError: Docker refused to stop the container.
        """
        run = self.resolve_run(pod_name, "stop")
        name = container_name(run)
        info = self.runner.inspect(name)
        active = self.local_sessions(active=True, run=run)
        for session in reversed(active):
            if session.kind is SessionKind.RESUME:
                session.stop(timeout)
        self.runner.stop(name, timeout)
        for session in self.local_sessions(active=True, run=run):
            session.stop(timeout)
        self._remove_if_ended(name)
        return bool(active) or (info is not None and info.running)

    def _remove_if_ended(self, name: str) -> None:
        info = self.runner.inspect(name)
        if info is not None and not info.running and LABEL_POD in info.labels:
            self.runner.remove(name)
            remove_egress_of(self.runner, name)

    def egress_attempts(self, run: str) -> list[EgressAttempt] | None:
        """The connections the egress proxy of a run (its last, in this process) saw.

        Args:
            run: The run's name (a pod's name while runs are named after their pods).

        Returns:
            Allowed and refused attempts in order; None when no such run in this process
            had an allowlist.
        """
        guard = self._egress.get(container_name(run))
        return None if guard is None else list(guard.attempts)

    def dispatch(
        self,
        pods: str | Sequence[str],
        issues: str | Sequence[str],
        *,
        variants: Sequence[Variant] | None = None,
        repeats: int = 1,
        max_parallel: int = 4,
        budget_usd: float | None = None,
        timeout: float | None = None,
    ) -> Batch:
        """Run pods x issues x variants x repeats, at most ``max_parallel`` at once.

        Every run is made at once, as a session that waits its turn (``starting``, queued)
        in order; its run name is ``<pod>-<issue number>`` (``-2``, ... for repeats and
        variants), or the pod's own when the batch has one run and the pod no other.

        Args:
            pods: A pod name or a list of them.
            issues: An issue URL or a list of them.
            variants: Ways to run each: ``{"name": str, "args": [str], "prompt": str}``
                (all optional): CLI arguments after the pod's, text after the prompt.
            repeats: How many runs of each pod, issue and variant.
            max_parallel: How many runs go at once; the rest wait.
            budget_usd: The batch's budget: once its runs together cost this much, no run
                starts and the running ones stop gracefully (``batch over budget``).
            timeout: Seconds each run's agent may run (over pod.json's
                ``timeoutSeconds``); a run past it stops gracefully (``timed out``).

        Returns:
            The :class:`Batch`, running.

        Raises:
            InvalidRequestError: No pod or issue, a bad URL, variant, count or budget.
            PodNotFoundError, InvalidPodError, PodConfigError: A pod is unusable.
            DockerUnavailableError: Docker does not answer.
        """
        plan = plan_batch(pods, issues, variants, repeats, max_parallel, budget_usd)
        for spec in plan:
            spec.issue = validate_issue_url(spec.issue)
            self.pod(spec.pod)
        self.runner.preflight()
        batch = Batch(max_parallel=max_parallel, budget_usd=budget_usd)
        alone = len(plan) == 1
        try:
            for index, spec in enumerate(plan):
                session = self.start_session(
                    spec.pod, spec.issue, args=spec.args, prompt=spec.prompt, timeout=timeout,
                    _wrap_job=batch.queue(index), _alone=alone,
                )  # fmt: skip
                batch.add(spec, session)
        except BaseException:
            batch.stop()
            raise
        batch.open()
        return batch

    def _blocking(self, session: Session, stdout: Writer | None, check: bool, raw: bool) -> int:
        out = stdout if stdout is not None else sys.stdout
        try:
            TextFeed(session, out, sys.stderr, raw=raw, notes=False).follow()
            code = session.wait()
        except KeyboardInterrupt:
            session.stop()
            raise
        if check and code != 0:
            raise ContainerFailedError(
                f"The agent in pod {session.pod_name} exited with code {code}.", exit_code=code
            )
        return code

    def start(
        self,
        pod_name: str,
        issue_url: str,
        stdout: Writer | None = None,
        *,
        check: bool = True,
        raw: bool = False,
    ) -> int:
        """Build and run the pod's agent on an issue, streaming its output; block until it ends.

        Args:
            pod_name: The pod.
            issue_url: The GitHub issue's http(s) URL.
            stdout: Receives the agent's output, rendered as text (tool calls, answers,
                the result line; secrets masked, terminal escapes dropped); ``sys.stdout``
                when None. Its stderr goes to ``sys.stderr``.
            check: Raise ContainerFailedError on a non-zero exit code.
            raw: Write the agent's stdout lines verbatim (stream-json as it came, masked
                as raw text) instead of rendered.

        Returns:
            The agent's exit code.

        Raises:
            ContainerFailedError: Non-zero exit and ``check``.
            BuildFailedError: The image did not build.
            CldpdError: As :meth:`start_session`.
        """
        return self._blocking(self.start_session(pod_name, issue_url), stdout, check, raw)

    def resume(
        self,
        pod_name: str,
        prompt: str,
        stdout: Writer | None = None,
        *,
        check: bool = True,
        raw: bool = False,
    ) -> int:
        """Send a follow-up prompt to the running pod and block until the agent answers.

        Args:
            pod_name: The pod.
            prompt: The follow-up prompt.
            stdout: Receives the agent's output, rendered as text; ``sys.stdout`` when
                None (see :meth:`start`).
            check: Raise ContainerFailedError on a non-zero exit code.
            raw: Write the agent's stdout lines verbatim instead of rendered.

        Returns:
            The exit code.

        Raises:
            SessionNotFoundError: Nothing runs for the pod.
            ContainerFailedError: Non-zero exit and ``check``.
        """
        return self._blocking(self.resume_session(pod_name, prompt), stdout, check, raw)


__all__ = [
    "Dispatcher",
    "RunningPod",
    "agent_command",
    "build_prompt",
    "default_transcript_dir",
    "validate_issue_url",
]
