"""What the picker's buttons do, free of ipywidgets: start, resume, attach, interrupt, stop,
look up.

Every Docker operation runs on a worker thread (:class:`Workers`), so a button handler
returns at once and the kernel stays free; what changes is reported through callbacks,
which the layout turns into trait writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import InvalidRequestError
from ..logs import log_swallowed
from ..render import DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_LINES, LiveFeed, SessionView
from ..runs import Dispatcher, Session, SessionKind
from ..secrets import Masker
from .state import FollowedRun, PodControl, error_sentence, pod_masker

logger = logging.getLogger(__package__)


class Workers:
    """The picker's worker threads: each guarded (no traceback reaches a cell), all joinable.

    Args:
        notice: Shows a one-sentence message about the picker as a whole.
    """

    def __init__(self, notice: Callable[[str], None]) -> None:
        self._notice = notice
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def spawn(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        """Run ``target(*args)`` on a new daemon thread, named after it and its pod."""
        name = f"cldpd-picker-{target.__name__.strip('_').removesuffix('_worker')}"
        if args and isinstance(args[0], PodControl):
            name += f"-{args[0].name}"

        def guarded() -> None:
            try:
                target(*args)
            except Exception as exc:  # a worker must never print a traceback into a cell
                pod = args[0].pod if args and isinstance(args[0], PodControl) else None
                log_swallowed(logger, f"the picker's {name} worker failed", pod_masker(pod))
                self._notice(f"The pod picker hit an unexpected error: {error_sentence(exc)}")

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every thread; True if all finished within ``timeout`` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                alive = [t for t in self._threads if t.is_alive()]
            if not alive:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            alive[0].join(left)


class PodActions:
    """What the picker's buttons do: start, resume, attach and stop pods on worker threads,
    and look up which pods run.

    It knows nothing of the layout: what changes it reports through ``show`` (a pod's
    status and controls), ``publish`` (a run's view) and ``notice`` (the picker as a
    whole); what a pod is doing it keeps in the pod's :class:`PodControl`.

    Args:
        dispatcher: Runs the pods.
        show: Called with a pod's controller when its status or controls change.
        publish: Called with a controller, a run and whether it is the run's last view.
        notice: Shows a one-sentence message about the picker as a whole.
        sent: Called with a prompt once a resume with it has started.
        max_lines: Lines each run keeps in its tail.
        interval: Seconds between batched updates while output flows.
        stop_timeout: Seconds a stop waits before killing the container.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        show: Callable[[PodControl], None],
        publish: Callable[[PodControl, FollowedRun, bool], None],
        notice: Callable[[str], None],
        sent: Callable[[str], None],
        max_lines: int = DEFAULT_MAX_LINES,
        interval: float = DEFAULT_FLUSH_INTERVAL,
        stop_timeout: float = 10.0,
    ) -> None:
        self.dispatcher = dispatcher
        self.max_lines = max_lines
        self.interval = interval
        self.stop_timeout = stop_timeout
        self._show = show
        self._publish = publish
        self._set_notice = notice
        self._sent = sent
        self._workers = Workers(notice)

    def start(self, control: PodControl, url: str) -> None:
        """Start a pod on an issue."""
        self._launch(control, "starting", lambda: self.dispatcher.start_session(control.name, url))

    def resume(self, control: PodControl, prompt: str) -> None:
        """Send a follow-up prompt to a running pod."""
        lines = prompt.strip().splitlines() or [""]
        more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
        self._launch(
            control,
            "resuming",
            lambda: self.dispatcher.resume_session(control.name, prompt),
            note=f"» {lines[0]}{more}",
            sent=prompt,
        )

    def attach(self, control: PodControl) -> None:
        """Follow a running pod: a session of this kernel if there is one, else its container."""
        self._launch(control, "attaching", lambda: self._attach_session(control))

    def interrupt(self, control: PodControl) -> None:
        """End the turn of a pod's interactive agent; the run stays and takes a follow-up."""
        self._workers.spawn(self._interrupt_worker, control)

    def _interrupt_worker(self, control: PodControl) -> None:
        session = control.live_session()
        try:
            if session is None:
                raise InvalidRequestError(
                    f"No interactive agent of pod {control.name} takes input now."
                )
            session.interrupt()
        except Exception as exc:
            log_swallowed(logger, f"pod {control.name}: the interrupt failed", control.mask)
            control.failed("interrupt", exc)
        self._show(control)

    def stop(self, control: PodControl) -> None:
        """Stop a pod."""
        control.begin_stop()
        self._show(control)
        self._workers.spawn(self._stop_worker, control)

    def look_up_running(self, controls: list[PodControl]) -> None:
        """Find out, in the background, which of these pods run."""
        self._workers.spawn(self._lookup_running, controls)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the work in flight; True if it all finished within ``timeout`` seconds."""
        return self._workers.join(timeout)

    def _launch(
        self,
        control: PodControl,
        verb: str,
        make: Callable[[], Session],
        note: str = "",
        sent: str | None = None,
    ) -> None:
        control.begin_launch(verb)
        self._show(control)
        thread = self._workers.spawn(self._run_worker, control, make, note, sent)
        with control.lock:
            control.workers = [t for t in control.workers if t.is_alive()] + [thread]

    def _attach_session(self, control: PodControl) -> Session:
        followed = {id(r.session) for r in control.runs}
        local = [
            s
            for s in self.dispatcher.local_sessions(control.name, active=True)
            if s.kind is not SessionKind.RESUME and id(s) not in followed
        ]
        return local[-1] if local else self.dispatcher.attach_session(control.name)

    def _run_worker(
        self, control: PodControl, make: Callable[[], Session], note: str, sent: str | None
    ) -> None:
        try:
            session = make()
        except Exception as exc:
            log_swallowed(logger, f"pod {control.name}: no run started", control.mask)
            control.launch_failed(exc)
            self._show(control)
            return
        if sent is not None:
            self._sent(sent)
        view = SessionView(control.name, self.max_lines, session=session)
        if note:
            view.note(note)
        run = FollowedRun(session, view)
        stop_now = control.add_run(run)
        run.feed = LiveFeed(
            session, view, lambda _v: self._publish(control, run, False), self.interval
        )
        self._show(control)
        if stop_now:
            session.stop(self.stop_timeout)
        run.feed.join()
        control.run_ended(run)
        self._publish(control, run, True)

    def _stop_worker(self, control: PodControl) -> None:
        try:
            self.dispatcher.stop(control.name, self.stop_timeout)
        except Exception as exc:
            log_swallowed(logger, f"pod {control.name}: the stop failed", control.mask)
            control.stop_failed(exc)
            self._show(control)
            return
        for thread in list(control.workers):
            thread.join(self.stop_timeout + 30)
        control.stop_done()
        self._show(control)

    def _lookup_running(self, controls: list[PodControl]) -> None:
        try:
            found = self.dispatcher.running()
        except Exception as exc:
            pods = [c.pod for c in controls if c.pod is not None]
            mask = Masker([value for pod in pods for value in pod.secret_values()])
            log_swallowed(logger, "the picker could not look up running pods", mask)
            self._set_notice(f"Cannot tell which pods are running: {error_sentence(exc)}")
            return
        self._set_notice("")
        up = {rp.pod: rp for rp in found if rp.status == "running"}
        for control in controls:
            if control.seen(up.get(control.name)):
                self._show(control)
