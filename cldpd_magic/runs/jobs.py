"""What a session's worker thread does: build and run a start (with its egress and
keepAlive), exec a resume, follow an attached container, and clean up after a run."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator

from ..engines import ContainerInfo, ExecHandle, Runner, RunOptions, StdinPipe
from ..events import EventType
from ..pods import Pod, container_name
from .changes import (
    DEFAULT_MAX_BYTES,
    SIGNAL_GROUP_ENV,
    ChangeCapture,
    capture_at_end,
    with_baseline,
)
from .egress import EgressAttempt, EgressGuard, egress_reports, remove_egress_of
from .registry import LABEL_POD, LABEL_SESSION
from .session import SessionControl

#: A session's job; a batch wraps it to queue the run until a slot is free.
Job = Callable[[SessionControl], int]

#: The command a keepAlive container idles on; the agent then runs through exec.
IDLE_COMMAND = ["sh", "-c", "trap 'exit 0' INT TERM; while :; do sleep 3600 & wait $!; done"]

#: Brokered credentials, as :func:`~cldpd_magic.runs.brokered_credentials` gives them.
Brokered = list[tuple[str, str, str]]


@dataclasses.dataclass
class _BuildLock:
    """The lock of one image's builds, and how many builds hold or wait for it."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    users: int = 0


class RunJobs:
    """Makes the jobs of a dispatcher's sessions, on one runner.

    Args:
        runner: The Docker operations.
    """

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._lock = threading.Lock()
        # An image's entry lives while a build of it holds or waits for its lock: the
        # last one out removes it, so the map never outlives the builds under way.
        self._build_locks: dict[str, _BuildLock] = {}
        self._egress: dict[str, EgressGuard] = {}

    @contextlib.contextmanager
    def _image_lock(self, image: str) -> Iterator[None]:
        """Hold the build lock of ``image``; it is forgotten when its last user is done."""
        with self._lock:
            entry = self._build_locks.setdefault(image, _BuildLock())
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._lock:
                entry.users -= 1
                if entry.users == 0:
                    del self._build_locks[image]

    def build(self, pod: Pod, ctl: SessionControl) -> None:
        """Build the pod's image; runs of one image build one at a time (the rest hit the cache)."""
        with self._image_lock(pod.image):
            ctl.check_cancelled()
            self.runner.build(
                pod.image,
                str(pod.dir),
                pod.config.build_args,
                on_output=lambda line: ctl.emit(EventType.BUILD_OUTPUT, line),
                cancel=ctl.cancelled,
                engine=pod.config.engine,
            )

    def start(self, pod: Pod, opts: RunOptions, missing: list[str], brokered: Brokered) -> Job:
        """The job of a start: build, set up egress, then run the agent (or idle and exec it).

        A stop is never lost: the runner asks the run's state before it creates and before
        it starts the container (``RunOptions.guard``), and a container of a run asked to
        stop is stopped and removed before the job ends, whatever keepAlive says.

        Args:
            pod: The pod.
            opts: The agent's container.
            missing: inheritEnv names not set on this host (said in the build log).
            brokered: The credentials the pod's egress proxy brokers.
        """
        runner = self.runner
        capture = self.changes_capture(opts.name, pod.config.changes_max_bytes)
        if capture is not None:  # the baseline of the run's changes, before the agent starts
            opts = dataclasses.replace(
                opts,
                cmd=with_baseline(opts.cmd, pod.config.changes_max_bytes),
                env={**opts.env, **SIGNAL_GROUP_ENV},
            )

        def job(ctl: SessionControl) -> int:
            ctl.set_capturer(capture)
            ctl.emit(EventType.BUILD_STARTED, pod.image)
            for warning in pod.unsafe_warnings:
                ctl.emit(EventType.BUILD_OUTPUT, f"cldpd: {warning}")
            if missing:
                ctl.emit(
                    EventType.BUILD_OUTPUT,
                    "cldpd: not set on this host, so not forwarded: " + ", ".join(missing),
                )
            self.build(pod, ctl)
            guard = None
            if pod.config.egress is not None:

                def on_attempt(attempt: EgressAttempt) -> None:
                    if not attempt.allowed:
                        ctl.emit(EventType.EGRESS_BLOCKED, attempt.target)

                guard = EgressGuard(
                    runner, opts.name, pod.config.egress, brokered, on_attempt=on_attempt,
                    on_build_output=lambda line: ctl.emit(EventType.BUILD_OUTPUT, line),
                    resources=pod.config.egress_resources,
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
                run_opts = dataclasses.replace(run_opts, guard=ctl.guard(runner.stop))
                if pod.config.keep_alive:
                    return self._run_kept_alive(ctl, run_opts)

                def started(info: ContainerInfo) -> None:
                    ctl.emit(EventType.CONTAINER_STARTED, info.name)

                if capture is not None:  # removed below, once its changes are read
                    run_opts = dataclasses.replace(run_opts, remove=False)
                return runner.run(run_opts, ctl.stdout, ctl.stderr, on_start=started)
            finally:
                self._end_changes(ctl, capture, opts)
                if ctl.cancelled.is_set():
                    self._discard(opts, ctl.stop_timeout)
                # A kept-alive pod keeps its egress until it is stopped (remove_if_ended).
                if guard is not None and not (pod.config.keep_alive and runner.inspect(opts.name)):
                    guard.remove()

        return job

    def _run_kept_alive(self, ctl: SessionControl, opts: RunOptions) -> int:
        idle = dataclasses.replace(opts, cmd=IDLE_COMMAND, remove=False, stdin=None)
        info = self.runner.start(idle)
        ctl.emit(EventType.CONTAINER_STARTED, info.name)
        ctl.check_cancelled()  # a stop since the start stops the container: no exec into it
        return self.runner.exec(info.name, opts.cmd, ctl.stdout, ctl.stderr, stdin=opts.stdin)

    def _discard(self, opts: RunOptions, timeout: float) -> None:
        """Stop and remove the container of a run asked to stop, if this run made it.

        The stop may have stopped it already, or be stopping it now: stopping twice is
        harmless, and what decides the removal is that the run was asked to stop.
        """
        info = self.runner.inspect(opts.name)
        if info is None or info.labels.get(LABEL_SESSION) != opts.labels.get(LABEL_SESSION):
            return  # gone already, or another run's container of that name
        if info.running:
            self.runner.stop(opts.name, timeout)
        self.runner.remove(opts.name)

    def resume(self, container: str, cmd: list[str], stdin: StdinPipe | None = None) -> Job:
        """The job of a resume: exec the agent in the running container; a stop ends the exec.

        Args:
            container: The run's container.
            cmd: The agent's command.
            stdin: An interactive agent's stdin (None: an empty one).
        """
        runner = self.runner

        def job(ctl: SessionControl) -> int:
            ctl.emit(EventType.CONTAINER_STARTED, container)
            ctl.check_cancelled()  # an exec whose start races the stop is stopped at once

            def started(handle: ExecHandle) -> None:
                ctl.set_stopper(lambda t: runner.stop_exec(handle, t))

            def on_attempt(attempt: EgressAttempt) -> None:
                if not attempt.allowed:
                    ctl.emit(EventType.EGRESS_BLOCKED, attempt.target)

            with egress_reports(self._egress, runner, container, on_attempt):
                return runner.exec(
                    container, cmd, ctl.stdout, ctl.stderr, on_start=started, stdin=stdin
                )

        return job

    def attach(self, container: str, kept_alive: bool, transcript: str) -> Job:
        """The job of an attach: follow the container's output; a stop stops the pod.

        Args:
            container: The container.
            kept_alive: Whether it idles and runs its agent through exec (whose output
                this cannot see).
            transcript: The transcript of the session that started it ("" if unknown).
        """
        runner = self.runner

        def job(ctl: SessionControl) -> int:
            ctl.emit(EventType.CONTAINER_STARTED, container)
            if kept_alive:
                ctl.stderr.write(
                    "cldpd: this pod is kept alive and its agent runs through exec, whose "
                    "output went to the process that started it"
                    + (f" (transcript: {transcript})" if transcript else "")
                    + "; resume it to run the agent here, or stop it.\n"
                )
            ctl.set_stopper(lambda t: runner.stop(container, t))
            capture = self.changes_capture(container)
            ctl.set_capturer(capture)
            try:
                return runner.logs(container, ctl.stdout, ctl.stderr)
            finally:
                self._end_changes(ctl, capture, None)
                self.remove_if_ended(container)

        return job

    def changes_capture(
        self, container: str, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> ChangeCapture | None:
        """How a run's changes are captured; None when its engine cannot read an ended
        container (then no baseline is taken and nothing is captured)."""
        if not ChangeCapture.supported(self.runner):
            return None
        return ChangeCapture(self.runner, container, max_bytes)

    def with_changes(self, job: Job, container: str, max_bytes: int) -> Job:
        """``job`` (a resume's), capturing the run's changes as it ends."""
        capture = self.changes_capture(container, max_bytes)
        if capture is None:
            return job

        def capturing(ctl: SessionControl) -> int:
            ctl.set_capturer(capture)
            try:
                return job(ctl)
            finally:
                self._end_changes(ctl, capture, None)

        return capturing

    def _end_changes(
        self, ctl: SessionControl, capture: ChangeCapture | None, opts: RunOptions | None
    ) -> None:
        """As a run's job ends (any way): capture its changes from its container, running or
        ended, then remove a container the run does not keep (``opts.remove``)."""
        if capture is None:
            return
        note = capture_at_end(capture, ctl.capture_changes)
        if note:
            ctl.stderr.write(note + "\n")
        if opts is not None and opts.remove:
            self._discard(opts, ctl.stop_timeout)

    def remove_if_ended(self, name: str) -> None:
        """Remove a cldpd container that has ended, and its egress proxy and networks."""
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
