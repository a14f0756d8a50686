"""What the picker knows of each pod, free of ipywidgets: its runs, its controls, its status.

A :class:`PodControl` reads a pod's state through its runs' sessions and keeps, under its
lock, only what no session knows (a run being made, a stop under way, the last failure,
a container found running outside the picker). The layout (:mod:`.layout`) shows it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ..errors import CldpdError, SessionNotFoundError
from ..events import RunState
from ..pods import Pod
from ..render import LiveFeed, SessionView
from ..runs import RunningPod, Session, SessionKind
from ..secrets import Masker

#: How many runs (start, resume, attach) a pod's Output keeps.
DEFAULT_MAX_RUNS = 5


def error_sentence(exc: BaseException) -> str:
    """One line describing an error, for a status line."""
    text = str(exc).strip().split("\n", 1)[0]
    if isinstance(exc, CldpdError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def pod_masker(pod: Pod | None) -> Masker:
    """Masks the secret values of a pod (none for no pod)."""
    if pod is None:
        return Masker()
    return Masker(pod.secret_values())


class FollowedRun:
    """One followed session: its view, its feed and its entry in the pod's Output."""

    def __init__(self, session: Session, view: SessionView) -> None:
        self.session = session
        self.view = view
        self.feed: LiveFeed | None = None
        self.entry: dict[str, Any] | None = None
        self.ended = False

    @property
    def follows_container(self) -> bool:
        """Whether the run follows the pod's container (a start or an attach, not a resume)."""
        return self.session.kind is not SessionKind.RESUME


@dataclass(frozen=True, slots=True)
class Controls:
    """Which of a pod's controls are enabled.

    Attributes:
        start: Start the pod on an issue.
        resume: Send a follow-up prompt.
        stop: Stop the pod.
        attach: Follow a pod started outside the picker.
        interrupt: End the turn of the pod's interactive agent (the run stays).
    """

    start: bool
    resume: bool
    stop: bool
    attach: bool
    interrupt: bool = False


class PodControl:
    """What the picker knows of one pod: its runs, read through their sessions' state.

    A run's state is its session's (:class:`~cldpd_magic.events.RunState`); the
    controller keeps of its own only what no session knows, all changed under
    :attr:`lock` through the methods below:

    - ``launching``: the verb of a run being made (``starting``, ``resuming``,
      ``attaching``) before its session exists, else "";
    - ``stopping``: a stop is under way; a run whose session comes meanwhile is stopped
      at once;
    - ``note``: the last failure (or "stopped" for a pod no run showed), one sentence;
    - ``outside``: the pod's container, found running with no run of ours following it;
    - ``gone``: the container is known to be gone (stopped, or found not running) since
      the last run that followed it; else a kept-alive pod whose start exited idles.

    Args:
        name: The pod's name.
        pod: The pod, None when it is broken.
        error: Why it is broken.
        max_runs: How many runs its Output keeps.
    """

    def __init__(
        self,
        name: str,
        pod: Pod | None,
        error: Exception | None,
        max_runs: int = DEFAULT_MAX_RUNS,
    ) -> None:
        self.name = name
        self.pod = pod
        self.error = error
        self.max_runs = max(1, int(max_runs))
        self.runs: list[FollowedRun] = []
        self.dropped_runs = 0
        self.launching = ""
        self.stopping = False
        self.note = ""
        self.outside: RunningPod | None = None
        self.gone = False
        self._follower: Session | None = None
        self.workers: list[threading.Thread] = []
        self.lock = threading.RLock()

    @property
    def mask(self) -> Masker:
        """Masks the pod's secret values."""
        return pod_masker(self.pod)

    # -- reading ------------------------------------------------------------------------

    def active_runs(self) -> list[FollowedRun]:
        """Runs still followed."""
        return [r for r in self.runs if not r.ended]

    def current(self) -> FollowedRun | None:
        """The run the pane shows: the newest active one, else the newest."""
        active = self.active_runs()
        if active:
            return active[-1]
        return self.runs[-1] if self.runs else None

    @property
    def idle(self) -> bool:
        """Whether our kept-alive container idles: its start exited and it is not gone."""
        if self.gone or self.pod is None or not self.pod.config.keep_alive:
            return False
        last = self._follower  # kept when its run leaves the Output
        return last is not None and last.kind is SessionKind.START and last.state is RunState.EXITED

    @property
    def alive(self) -> bool:
        """Whether the pod's container runs (as far as the picker knows)."""
        return (
            self.idle
            or self.outside is not None
            or any(
                r.follows_container and r.session.state is RunState.RUNNING
                for r in self.active_runs()
            )
        )

    def live_session(self) -> Session | None:
        """The session running the pod's interactive agent while it takes input, if any."""
        for run in reversed(self.active_runs()):
            conversation = run.session.conversation
            if conversation is not None and run.session.owns_conversation and conversation.live:
                return run.session
        return None

    @property
    def busy(self) -> bool:
        """Whether a run is being made or a stop is under way."""
        return bool(self.launching) or self.stopping

    def controls(self, url_ok: bool) -> Controls:
        """Which controls are enabled, given whether the issue URL is acceptable."""
        with self.lock:
            active = self.active_runs()
            following = any(r.follows_container for r in active)
            resuming = any(not r.follows_container for r in active)
            alive, busy = self.alive, self.busy
            return Controls(
                start=self.pod is not None and url_ok and not (alive or active or busy),
                resume=alive and not resuming and not busy,
                stop=(alive or bool(active) or bool(self.launching)) and not self.stopping,
                attach=alive and self.outside is not None and not following and not busy,
                interrupt=self.live_session() is not None and not self.stopping,
            )

    def entries(self) -> tuple[dict[str, Any], ...]:
        """The Output's entries: one per kept run, after a note of the dropped ones."""
        shown = [r.entry for r in self.runs if r.entry is not None]
        if self.dropped_runs:
            note = (
                f"… {self.dropped_runs} earlier run(s) not shown "
                "(their transcripts have everything)"
            )
            data = {"text/plain": note}
            shown.insert(0, {"output_type": "display_data", "data": data, "metadata": {}})
        return tuple(shown)

    def status_text(self) -> str:
        """The pod's one-line status."""
        with self.lock:
            if self.stopping:
                return f"{self.name}: stopping…"
            if self.launching:
                return f"{self.name}: {self.launching}…"
            if self.note:
                return self.note
            run = self.current()
            if self.outside is not None and (run is None or run.ended):
                since = self.outside.started_at[:19]
                return (
                    f"{self.name}: running in container {self.outside.container}"
                    f"{f' since {since}' if since else ''}, "
                    "started outside this picker; attach to follow it"
                )
            if run is not None:
                text = run.view.status_text()
                if run.view.finished and self.idle:
                    text += " · container idle: resume or stop"
                elif self._waiting(run):
                    text += " · waiting for a prompt: resume or stop"
                return text
            if self.error is not None:
                return f"{self.name}: broken: {error_sentence(self.error)}"
            if not self.name:
                return "no pod selected"
            return f"{self.name}: not running"

    @staticmethod
    def _waiting(run: FollowedRun) -> bool:
        """Whether a kept-alive interactive agent's turn is over and it waits for more."""
        conversation = run.session.conversation
        return bool(
            conversation is not None
            and run.session.owns_conversation
            and not run.ended
            and conversation.waiting.is_set()
        )

    # -- changing -----------------------------------------------------------------------

    def failed(self, doing: str, exc: BaseException) -> None:
        """Something asked of a running pod (an interrupt) failed: say so in its status."""
        with self.lock:
            self.note = f"{self.name}: {doing} failed: {self.mask(error_sentence(exc))}"

    def begin_launch(self, verb: str) -> None:
        """A run is being made (``verb``: starting, resuming, attaching)."""
        with self.lock:
            self.launching = verb
            self.note = ""

    def launch_failed(self, exc: BaseException) -> None:
        """The run could not be made; a pod found not running is not running."""
        with self.lock:
            if isinstance(exc, SessionNotFoundError):
                self.gone = True
                self.outside = None
            self.launching = ""
            self.note = f"{self.name}: failed: {self.mask(error_sentence(exc))}"

    def add_run(self, run: FollowedRun) -> bool:
        """Follow a new run; returns whether to stop it at once (a stop came first)."""
        with self.lock:
            self.runs.append(run)
            while len(self.runs) > self.max_runs and self.runs[0].ended:
                self.runs.pop(0)
                self.dropped_runs += 1
            if run.follows_container:
                self.outside = None
                self.gone = False
                self._follower = run.session
            self.launching = ""
            return self.stopping

    def run_ended(self, run: FollowedRun) -> None:
        """A run's session and feed have ended: a resume that found no container says so."""
        with self.lock:
            if isinstance(run.session.error, SessionNotFoundError):
                self.gone = True
                self.outside = None
            run.ended = True

    def begin_stop(self) -> None:
        """A stop is asked for."""
        with self.lock:
            self.stopping = True
            self.note = ""

    def stop_failed(self, exc: BaseException) -> None:
        """The stop failed."""
        with self.lock:
            self.stopping = False
            self.note = f"{self.name}: failed: {self.mask(error_sentence(exc))}"

    def stop_done(self) -> None:
        """The stop is done: nothing runs; say so unless the last run shows it."""
        with self.lock:
            self.gone = True
            self.outside = None
            self.stopping = False
            run = self.current()
            shown = run is not None and run.session.state is RunState.STOPPED
            self.note = "" if shown else f"{self.name}: stopped"

    def seen(self, container: RunningPod | None) -> bool:
        """What a look-up of running containers found; False when it was ignored.

        A pod being launched, stopped or followed knows better than a look-up.
        """
        with self.lock:
            if self.busy or self.active_runs():
                return False
            if container is None:
                self.gone = True
                self.outside = None
            elif not self.idle and self.outside is None:
                self.outside = container
            return True
