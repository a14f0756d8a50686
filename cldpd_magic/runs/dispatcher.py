"""The Dispatcher: finds pods, builds their images and runs their agents as Sessions.

Its pieces: :mod:`~cldpd_magic.runs.agent` (the agent's command line),
:mod:`~cldpd_magic.runs.registry` (which runs exist, how they are named) and
:mod:`~cldpd_magic.runs.jobs` (what a session's worker thread does).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from ..engines import ContainerInfo, EngineSetting, MultiEngineRunner, Runner, StdinPipe
from ..errors import CldpdError, InvalidRequestError, PodNotFoundError, SessionNotFoundError
from ..logs import log_swallowed
from ..pods import Pod, container_name, default_pods_dir, discover_all, discover_pod
from ..secrets import container_secrets
from .agent import (
    GREEDY_OPTIONS,
    MAX_ARGUMENT_BYTES,
    MAX_COMMAND_LINE_BYTES,
    StartPlan,
    agent_command,
    build_prompt,
    cap_args,
    check_command_line,
    issue_number,
    plan_start,
    pod_limits,
    validate_issue_url,
    with_deadline,
)
from .approvals import ToolPolicy
from .batch import BatchAPI
from .blocking import BlockingAPI
from .changes import Changes, find_changes
from .driving import InteractiveAPI
from .egress import EgressAttempt, sweep_orphans
from .jobs import IDLE_COMMAND, Job, RunJobs
from .registry import (
    LABEL_CLAUDE_SESSION,
    LABEL_INHERIT_ENV,
    LABEL_KEEP_ALIVE,
    LABEL_POD,
    LABEL_PODS_DIR,
    LABEL_RUN,
    LABEL_SESSION,
    LABEL_TRANSCRIPT,
    RunningPod,
    RunRegistry,
    run_of,
    start_options,
    sweep_abandoned,
)
from .session import Session, SessionKind, new_session_id

logger = logging.getLogger(__package__)

#: Seconds between two sweeps, by starts, of what killed processes left behind.
SWEEP_INTERVAL = 60.0


def default_transcript_dir() -> Path:
    """Return where transcripts go: ``$CLDPD_SESSIONS_DIR`` or ``~/.cldpd/sessions``."""
    env = os.environ.get("CLDPD_SESSIONS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cldpd" / "sessions"


class Dispatcher(BlockingAPI, InteractiveAPI, BatchAPI):
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
        registry: Its runs: sessions, names, resolution.
        jobs: What its sessions' worker threads do.
    """

    def __init__(
        self,
        pods_dir: str | os.PathLike[str] | None = None,
        runner: Runner | None = None,
        transcript_dir: str | os.PathLike[str] | None = None,
        *,
        engines: EngineSetting = None,
        can_use_tool: ToolPolicy | None = None,
    ) -> None:
        self.pods_dir = Path(pods_dir).expanduser() if pods_dir else default_pods_dir()
        #: Decides the tool calls interactive runs ask about, as they come:
        #: ``can_use_tool(run, tool, input)`` returns a bool, or ``(bool, message)``.
        #: None leaves them pending for a person (``Session.decide``) until their timeout.
        self.can_use_tool = can_use_tool
        if runner is None:
            runner = MultiEngineRunner.from_settings(engines)
        if runner is None:
            from ..engines.docker import DockerRunner  # docker-py loads only when it is used

            runner = DockerRunner()
        self.transcript_dir = (
            Path(transcript_dir).expanduser() if transcript_dir else default_transcript_dir()
        )
        self.registry = RunRegistry(runner)
        self.jobs = RunJobs(runner)
        self._last_sweep = -SWEEP_INTERVAL

    @property
    def runner(self) -> Runner:
        """The Docker operations; setting it sets the runner of the registry and the jobs."""
        return self.jobs.runner

    @runner.setter
    def runner(self, runner: Runner) -> None:
        self.registry.runner = self.jobs.runner = runner

    @property
    def sessions(self) -> list[Session]:
        """Every session this dispatcher started, oldest first."""
        return self.registry.sessions

    def pods(self) -> list[Pod]:
        """Every valid pod in the pods directory, sorted by name."""
        return discover_all(self.pods_dir)

    def pod(self, name: str) -> Pod:
        """Discover one pod by name (see :func:`discover_pod`)."""
        return discover_pod(self.pods_dir, name)

    def _sweep_now_and_then(self) -> None:
        """Sweep what killed processes left behind, at most once a minute (starts call it)."""
        now = time.monotonic()
        if now - self._last_sweep < SWEEP_INTERVAL:
            return
        self._last_sweep = now
        try:
            sweep_abandoned(self.runner, self.runner.list(LABEL_POD))
        except CldpdError:
            log_swallowed(logger, "sweeping abandoned runs failed")

    def running(self) -> list[RunningPod]:
        """Containers with a ``cldpd.pod`` label, from any process, sorted by name.

        What a killed kernel or ``cldpd`` left behind goes on the way: the ended runs it
        would have removed, and egress whose run's container is gone.
        """
        found = self.runner.list(LABEL_POD)
        swept = set(sweep_abandoned(self.runner, found))
        sweep_orphans(self.runner)
        return [RunningPod.from_info(i) for i in found if i.name not in swept]

    def local_sessions(
        self, pod_name: str | None = None, *, active: bool = False, run: str | None = None
    ) -> list[Session]:
        """This dispatcher's sessions, optionally of one pod or one run, and only those not done."""
        return self.registry.local_sessions(pod_name, active=active, run=run)

    def runs(self, pod_name: str) -> list[str]:
        """The names of a pod's runs: its running containers and this process's active sessions."""
        return self.registry.runs(pod_name)

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
        plan = plan_start(pod, url, prompt, args, timeout)
        return self._launch(pod, plan, url, run, timeout, _wrap_job=_wrap_job, _alone=_alone)

    def _launch(
        self,
        pod: Pod,
        plan: StartPlan,
        url: str,
        run: str | None,
        timeout: float | None,
        *,
        stdin: StdinPipe | None = None,
        _wrap_job: Callable[[Job], Job] | None = None,
        _alone: bool = True,
    ) -> Session:
        """Name the run and start its session: the part of a start after the plan."""
        session_id = new_session_id(pod.name)
        self.runner.preflight()
        self._sweep_now_and_then()
        run = self.registry.name_run(pod, url, run, alone=_alone)
        try:
            self.registry.ensure_free(pod, run)
        except BaseException:
            self.registry.unreserve(run)
            raise
        transcript = self.transcript_dir / f"{session_id}.jsonl"
        conversation = None
        if plan.interactive and stdin is None:
            conversation = self._conversation(pod, run, plan.prompt)
            stdin = conversation.pipe
        opts = start_options(pod, run, plan.cmd, plan.env, session_id, plan.session_uuid,
                             transcript, stdin)  # fmt: skip
        job = self.jobs.start(pod, opts, plan.missing, plan.brokered)
        try:
            session = Session(pod.name, opts.name, _wrap_job(job) if _wrap_job else job,
                              self.transcript_dir, plan.secrets, kind=SessionKind.START,
                              session_id=session_id, claude_session=plan.session_uuid,
                              missing_env=plan.missing, run=run,
                              limits=pod_limits(pod, timeout),
                              conversation=conversation)  # fmt: skip
        except BaseException:
            self.registry.unreserve(run)
            raise
        return self.registry.register(session)

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
        """The run a name means (see :meth:`RunRegistry.resolve_run`).

        Raises:
            InvalidPodError: The name cannot name a pod or a run.
            InvalidRequestError: The name is a pod with several runs (they are listed).
        """
        return self.registry.resolve_run(name, doing)

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
        container's label), through exec. Stopping this session ends that exec only. A
        live interactive run (its agent running, here) gets the prompt in the same
        process instead: the session then shows the turn the prompt causes, and its stop
        interrupts that turn.

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
        live = self.registry.live_conversation(self.registry.resolve_run(pod_name, "resume"))
        if live is not None:
            return self._follow_up(live, prompt)
        info = self.registry.running_container(pod_name, "resume")
        if info is None:
            self.pod(pod_name)  # an unknown pod is a clearer error than "not running"
            raise SessionNotFoundError(
                f"Pod {pod_name} is not running; start it first with an issue URL."
            )
        pod = self._pod_of(info.labels.get(LABEL_POD) or pod_name, info)
        session_uuid = info.labels.get(LABEL_CLAUDE_SESSION) or str(uuid.uuid4())
        secrets = self.secrets(pod) + self.container_secrets(info)
        interactive = pod.config.interactive
        if interactive and info.labels.get(LABEL_KEEP_ALIVE) != "true":
            raise InvalidRequestError(
                f"The agent of run {run_of(info)} runs in another process, whose input this "
                "one cannot reach; resume it there, attach to follow it, or stop it."
            )
        cmd = agent_command(pod, prompt, session_uuid=session_uuid, resume=True,
                            interactive=interactive)  # fmt: skip
        conversation = None
        if interactive:
            check_command_line(cmd, info.env)
            conversation = self._conversation(pod, run_of(info), prompt)
        else:
            check_command_line(cmd, info.env, "The prompt", "shorten it")
        cmd = with_deadline(cmd, pod_limits(pod).timeout_seconds)
        job = self.jobs.resume(info.name, cmd, conversation.pipe if conversation else None)
        job = self.jobs.with_changes(job, info.name, pod.config.changes_max_bytes)
        session = Session(pod.name, info.name, job, self.transcript_dir, secrets,
                          kind=SessionKind.RESUME, claude_session=session_uuid,
                          run=run_of(info), limits=pod_limits(pod),
                          conversation=conversation)  # fmt: skip
        return self.registry.register(session)

    def attach_session(self, pod_name: str) -> Session:
        """Follow the output of a run's container started elsewhere (another kernel).

        ``pod_name`` is a run, or a pod with one run (several are an InvalidRequestError
        listing them); a new Dispatcher finds the run by its container's labels.

        The output is replayed from the container's start, then followed to its end.
        A run whose agent this dispatcher runs (started here: by a magic, the picker or the
        SDK's transport) is its own session instead, whose events show the agent's output
        from the start, also a kept-alive pod's, whose agent runs through exec.

        Args:
            pod_name: The pod.

        Returns:
            A Session of kind ``attach`` (stopping it stops the pod; once the container
            has ended, it is removed), or the run's own session here.

        Raises:
            SessionNotFoundError: Nothing runs for the pod.
        """
        run = self.resolve_run(pod_name, "attach to")
        here = [s for s in self.local_sessions(active=True, run=run)
                if s.kind is not SessionKind.ATTACH]  # fmt: skip
        if here:
            return here[-1]
        info = self.registry.running_container(pod_name, "attach to")
        if info is None:
            raise SessionNotFoundError(f"Pod {pod_name} is not running; nothing to attach to.")
        name = info.name
        pod_of_run = info.labels.get(LABEL_POD) or pod_name
        try:
            secrets = self.secrets(self._pod_of(pod_of_run, info))
        except CldpdError:  # the pod's directory may be gone; the container still runs
            log_swallowed(logger, f"pod {pod_name}: its directory is not readable; attaching")
            secrets = []
        secrets += self.container_secrets(info)
        kept_alive = info.labels.get(LABEL_KEEP_ALIVE) == "true"
        job = self.jobs.attach(name, kept_alive, info.labels.get(LABEL_TRANSCRIPT, ""))
        return self.registry.register(Session(pod_of_run, name, job, self.transcript_dir, secrets,
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
            else:  # it may see its container end before the loop below reaches it
                session.expect_stop()
        self.runner.stop(name, timeout)
        for session in self.local_sessions(active=True, run=run):
            session.stop(timeout)
        self.jobs.remove_if_ended(name)
        return bool(active) or (info is not None and info.running)

    def egress_attempts(self, run: str) -> list[EgressAttempt] | None:
        """The connections the egress proxy of a run (its last, in this process) saw.

        Args:
            run: The run's name (a pod's name while runs are named after their pods).

        Returns:
            Allowed and refused attempts in order; None when no such run in this process
            had an allowlist.
        """
        return self.jobs.egress_attempts(run)

    def changes(self, run: str, *, capture: bool = False) -> Changes:
        """A run's changes: as its session here has them, else as saved beside its
        transcript (a run of another process), else captured now from its running container.

        Args:
            run: A run's name (or a pod with one run), or a session id.
            capture: Capture them again now from the run's container, if it is still there.

        Raises:
            ChangesError: No changes of that run are known here.
        """
        return find_changes(self, run, capture)


__all__ = [
    "GREEDY_OPTIONS",
    "IDLE_COMMAND",
    "LABEL_CLAUDE_SESSION",
    "LABEL_INHERIT_ENV",
    "LABEL_KEEP_ALIVE",
    "LABEL_POD",
    "LABEL_PODS_DIR",
    "LABEL_RUN",
    "LABEL_SESSION",
    "LABEL_TRANSCRIPT",
    "MAX_ARGUMENT_BYTES",
    "MAX_COMMAND_LINE_BYTES",
    "Dispatcher",
    "Job",
    "RunningPod",
    "agent_command",
    "build_prompt",
    "cap_args",
    "check_command_line",
    "default_transcript_dir",
    "issue_number",
    "pod_limits",
    "run_of",
    "validate_issue_url",
]
