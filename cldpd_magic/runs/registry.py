"""Which runs exist: this process's sessions and the engine's labelled containers, how a
new run is named, and which run a name means."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..engines import (
    LABEL_CLIENT,
    ContainerInfo,
    Runner,
    RunOptions,
    StdinPipe,
    client_gone,
    this_client,
)
from ..errors import CldpdError, InvalidRequestError, PodRunningError
from ..logs import log_swallowed
from ..pods import Pod, container_name, is_valid_pod_name, validate_pod_name
from .agent import issue_number
from .egress import ORPHAN_GRACE, remove_egress_of, seconds_since
from .session import Session

logger = logging.getLogger(__package__)

LABEL_POD = "cldpd.pod"
LABEL_SESSION = "cldpd.session"
LABEL_CLAUDE_SESSION = "cldpd.claude-session"
LABEL_KEEP_ALIVE = "cldpd.keep-alive"
LABEL_TRANSCRIPT = "cldpd.transcript"
LABEL_PODS_DIR = "cldpd.pods-dir"
LABEL_INHERIT_ENV = "cldpd.inherit-env"
LABEL_RUN = "cldpd.run"


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
        engine: The configured engine it runs on ("" with one engine).
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
    engine: str = ""

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
            engine=info.engine,
        )


def abandoned(info: ContainerInfo, now: datetime, grace: float = ORPHAN_GRACE) -> bool:
    """Whether a run's container has ended with nobody left to remove it.

    The process that starts a run removes its container when it ends (unless kept
    alive); a container that ended while that process is gone, or ended longer than
    ``grace`` seconds ago (its process on another host), is left behind.
    """
    if info.running or info.labels.get(LABEL_KEEP_ALIVE) == "true":
        return False
    if client_gone(info.labels.get(LABEL_CLIENT, "")):
        return True
    return bool(info.finished_at) and seconds_since(info.finished_at, now) >= grace


def sweep_abandoned(runner: Runner, found: list[ContainerInfo]) -> list[str]:
    """Remove the ended runs nobody will remove (see :func:`abandoned`), and their egress.

    Args:
        runner: The runner of the engine that holds them.
        found: The run containers listed (``runner.list(LABEL_POD)``).

    Returns:
        The names of the containers removed.
    """
    now = datetime.now(UTC)
    removed = []
    for info in found:
        if not abandoned(info, now):
            continue
        try:
            runner.remove(info.name)
            remove_egress_of(runner, info.name)
        except CldpdError:
            log_swallowed(logger, f"removing the abandoned run {info.name} failed")
            continue
        removed.append(info.name)
    return removed


def run_of(info: ContainerInfo) -> str:
    """A cldpd container's run name: its ``cldpd.run`` label, else its name without ``cldpd-``."""
    return info.labels.get(LABEL_RUN) or info.name.removeprefix("cldpd-")


class RunRegistry:
    """The runs of one dispatcher: its sessions, the names being taken, and the engine's runs.

    Args:
        runner: The Docker operations, to see the engine's containers.

    Attributes:
        sessions: Every session registered, oldest first.
    """

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.sessions: list[Session] = []
        self._lock = threading.Lock()
        self._reserved: set[str] = set()  # run names being started, under _names_lock
        self._names_lock = threading.Lock()

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

    def live_conversation(self, run: str) -> Session | None:
        """This process's session running the agent of an interactive run that takes
        messages now (its process runs, its input is open), if any."""
        for session in self.local_sessions(run=run, active=True):
            conversation = session.conversation
            if session.owns_conversation and conversation is not None and conversation.live:
                return session
        return None

    def runs(self, pod_name: str) -> list[str]:
        """The names of a pod's runs: its running containers and this process's active sessions."""
        names = {s.run for s in self.local_sessions(pod_name, active=True)}
        names.update(
            run_of(i)
            for i in self.runner.list(LABEL_POD)
            if i.running and i.labels.get(LABEL_POD) == pod_name
        )
        return sorted(names)

    def register(self, session: Session) -> Session:
        """Add a started session; its run name is no longer only reserved."""
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

    def name_run(self, pod: Pod, url: str, run: str | None, *, alone: bool = True) -> str:
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
            # The pod's own container, when taken by something else, is ensure_free's to say.
            if alone and not others and pod.name not in self._reserved:
                self._reserved.add(pod.name)
                return pod.name
            base = f"{pod.name}-{issue_number(url) or 'run'}"
            known = set(others) | self._reserved  # one listing, not one inspect per name
            name, n = base, 1
            while name in known or self._run_taken(name):
                n += 1
                name = f"{base}-{n}"
            self._reserved.add(name)
            return name

    def ensure_free(self, pod: Pod, run: str) -> None:
        """Refuse a run that runs; remove an ended cldpd container of its name."""
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

    def unreserve(self, run: str) -> None:
        """Free a reserved run name whose start failed."""
        with self._names_lock:
            self._reserved.discard(run)

    def running_container(self, name: str, doing: str = "use") -> ContainerInfo | None:
        """The running container of a run (or of a pod's one run); None when nothing runs.

        Raises:
            InvalidPodError: The name cannot name a pod or a run.
            InvalidRequestError: The name is a pod with several runs (they are listed).
            DockerUnavailableError: Docker does not answer.
        """
        validate_pod_name(name)
        self.runner.preflight()
        info = self.runner.inspect(container_name(self.resolve_run(name, doing)))
        return info if info is not None and info.running else None

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


def start_options(
    pod: Pod,
    run: str,
    cmd: list[str],
    env: dict[str, str],
    session_id: str,
    session_uuid: str,
    transcript: Path,
    stdin: StdinPipe | None = None,
) -> RunOptions:
    """The container of a start: pod.json's settings, and the labels that find it again.

    Args:
        pod: The pod.
        run: The run's name; the container is ``cldpd-<run>``.
        cmd: The agent's command.
        env: Its environment (forwarded variables resolved).
        session_id: The cldpd session.
        session_uuid: Claude Code's session uuid.
        transcript: The session's transcript.
        stdin: An interactive run's stdin (None: the agent's stdin is empty).
    """
    return RunOptions(
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
            LABEL_CLIENT: this_client(),
        },
        stdin=stdin,
    )
