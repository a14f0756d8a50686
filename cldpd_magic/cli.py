"""The ``cldpd`` console command: start, resume, stop and list pods from a terminal.

A run followed by ``cldpd start`` or ``cldpd resume`` stops its pod on Ctrl+C (SIGINT),
SIGTERM or SIGHUP: gracefully first, and by a kill when a second signal comes during
the graceful stop. Whatever ends the command, no container of the run is left behind.

``cldpd --debug`` (or ``CLDPD_LOG=debug`` in the environment; any level name works there)
logs what the package does and every error it swallows, with its traceback, to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TextIO

from . import __version__
from .dispatcher import Dispatcher
from .errors import CldpdError, one_line
from .logs import disable_logging, enable_logging, log_swallowed, parse_level
from .pods import container_name, default_pods_dir, scan_pods, validate_pod_name
from .render import TextFeed, clean_text
from .scaffold import DEFAULT_TEMPLATE, create_pod, template_names
from .session import Event, Session, SessionKind

EPILOG = """examples:
  cldpd init myrepo --template claude-code
  cldpd start myrepo --issue https://github.com/org/repo/issues/42
  cldpd resume myrepo --prompt "Focus on error handling"
  cldpd stop myrepo
  cldpd list

Ctrl+C, SIGTERM or SIGHUP during start or resume stops the pod gracefully (the agent's
turn ends first); a second Ctrl+C during that stop kills it.

environment:
  CLDPD_PODS_DIR   the pods directory (default ~/.cldpd/pods)
  CLDPD_LOG        log level of the package's log on stderr (debug, info, ...); off when unset
"""

logger = logging.getLogger(__name__)

#: Signals that stop a followed run: Ctrl+C, ``kill`` and a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Seconds a pod gets to stop gracefully before it is killed.
STOP_TIMEOUT = 10.0
#: A repeat of the first signal within this many seconds is the same request, not an
#: escalation: timeout(1) signals its child and then, at once, its whole process group.
_REPEAT_WINDOW = 0.25


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cldpd`` command."""
    parser = argparse.ArgumentParser(
        prog="cldpd",
        description="Run Claude Code agents in Docker pods.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pods_dir_help = "the pods directory (default: $CLDPD_PODS_DIR or ~/.cldpd/pods)"
    parser.add_argument("--pods-dir", help=pods_dir_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="log debugging details, swallowed errors with their tracebacks, to stderr "
        "(same as CLDPD_LOG=debug)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init = sub.add_parser("init", help="write a new pod from a template into the pods directory")
    init.add_argument("pod", help="the new pod's name")
    init.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help=f"the template: {', '.join(template_names())} (default: {DEFAULT_TEMPLATE})",
    )
    init.add_argument("--pods-dir", default=argparse.SUPPRESS, help=pods_dir_help)
    start = sub.add_parser("start", help="build a pod and run its agent on a GitHub issue")
    start.add_argument("pod")
    start.add_argument("--issue", required=True, metavar="URL", help="the GitHub issue URL")
    resume = sub.add_parser("resume", help="send a follow-up prompt to a running pod")
    resume.add_argument("pod")
    resume.add_argument("--prompt", required=True, help="the follow-up prompt")
    for command in (start, resume):
        command.add_argument(
            "--raw",
            action="store_true",
            help="print the agent's stdout and stderr lines verbatim, terminal escape "
            "sequences included (by default they are rendered and escapes are dropped)",
        )
        command.add_argument(
            "-v", "--verbose", action="store_true", help="show the image build log"
        )
    stop = sub.add_parser("stop", help="stop a running pod gracefully")
    stop.add_argument("pod")
    stop.add_argument("--timeout", type=float, default=10.0, help="seconds before a kill")
    sub.add_parser("list", help="list pods and which of them are running")
    return parser


def _say(stream: TextIO, text: str) -> None:
    # A closed terminal (SIGHUP) or pipe must not stop the pod from being stopped.
    with contextlib.suppress(OSError, ValueError):
        stream.write(text)
        stream.flush()


class _Terminal:
    """A stream that a closed terminal (SIGHUP) or pipe cannot make fail: see :func:`_say`."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        _say(self._stream, text)


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class _Interrupted(BaseException):
    """A stop signal that came before the run could be followed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """The handler of the stop signals: raises while the run is set up, records afterwards.

    Recording (a list append) is all a handler may safely do while other threads hold
    locks; the run loop acts on what was recorded.
    """

    def __init__(self) -> None:
        self.received: list[tuple[int, float]] = []
        self.raising = True

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.raising:
            self.raising = False
            raise _Interrupted(signum)
        self.received.append((signum, time.monotonic()))

    def take(self) -> list[tuple[int, float]]:
        taken = self.received[:]
        del self.received[: len(taken)]
        return taken

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        previous = {s: signal.signal(s, self) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


class _Stopper:
    """Stops the pod of a followed run: gracefully on a first signal, by a kill on a second."""

    def __init__(self, dispatcher: Dispatcher, session: Session, err: TextIO) -> None:
        self._dispatcher = dispatcher
        self._session = session
        self._err = err
        self._threads: list[threading.Thread] = []
        self._errors: list[str] = []
        self.first: tuple[int, float] | None = None
        self.killing = False

    @property
    def signum(self) -> int | None:
        """The signal that asked for the stop, if any."""
        return None if self.first is None else self.first[0]

    def on_signal(self, signum: int, when: float) -> None:
        pod = self._session.pod_name
        if self.first is None:
            self.first = (signum, when)
            why = "interrupted" if signum == signal.SIGINT else f"got {_signal_name(signum)}"
            if self._session.kind is SessionKind.RESUME:
                what = f"the agent's turn ends first, then pod {pod} stops gracefully"
            else:
                what = f"stopping pod {pod} gracefully"
            _say(self._err, f"\ncldpd: {why}; {what} (interrupt again to kill it)\n")
            self._spawn(STOP_TIMEOUT)
        elif self.killing or (signum == self.first[0] and when - self.first[1] < _REPEAT_WINDOW):
            return
        else:
            self.killing = True
            why = "interrupted" if signum == signal.SIGINT else f"got {_signal_name(signum)}"
            _say(self._err, f"cldpd: {why} again; killing pod {pod}\n")
            self._spawn(0.0)

    def _spawn(self, timeout: float) -> None:
        thread = threading.Thread(
            target=self._stop, args=(timeout,), daemon=True, name="cldpd-stop"
        )
        self._threads.append(thread)
        thread.start()

    def _stop(self, timeout: float) -> None:
        try:
            self._dispatcher.stop(self._session.pod_name, timeout)
        except Exception as exc:  # reported by the main thread, never lost
            log_swallowed(logger, f"stopping pod {self._session.pod_name} failed")
            self._errors.append(one_line(str(exc)) or type(exc).__name__)

    @property
    def done(self) -> bool:
        """Whether every stop asked for has finished."""
        return not any(t.is_alive() for t in self._threads)

    def report(self) -> None:
        """Say how the stop ended."""
        pod = self._session.pod_name
        if self._errors:
            _say(self._err, f"cldpd: could not stop pod {pod}: {clean_text(self._errors[-1])}\n")
        elif self.first is not None:
            _say(self._err, f"cldpd: pod {pod} {'killed' if self.killing else 'stopped'}\n")


def _pump(session: Session, batches: queue.Queue[list[Event] | None]) -> None:
    try:
        for batch in session.event_batches():
            batches.put(batch)
    finally:
        batches.put(None)


def _follow(
    dispatcher: Dispatcher,
    session: Session,
    signals: _Signals,
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
) -> int:
    """Show a run until it ends and every stop asked for is done; return the exit code."""
    batches: queue.Queue[list[Event] | None] = queue.Queue()
    threading.Thread(
        target=_pump, args=(session, batches), daemon=True, name="cldpd-events"
    ).start()
    stopper = _Stopper(dispatcher, session, err)
    text = TextFeed(session, _Terminal(out), _Terminal(err), raw=args.raw, verbose=args.verbose)
    ended = False
    try:
        while not (ended and stopper.done):
            for signum, when in signals.take():
                stopper.on_signal(signum, when)
            try:
                batch = batches.get(timeout=0.1)
            except queue.Empty:
                continue
            if batch is None:
                ended = True
            else:
                text.write(batch)
        stopper.report()
    finally:
        where = session.transcript_error or f"cldpd: transcript: {session.transcript}"
        _say(err, where + "\n")
    if stopper.signum is not None:
        return 128 + stopper.signum
    return session.wait()


def _run(dispatcher: Dispatcher, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    signals = _Signals()
    with signals.installed():
        try:
            if args.command == "start":
                session = dispatcher.start_session(args.pod, args.issue)
            else:
                session = dispatcher.resume_session(args.pod, args.prompt)
            signals.raising = False
        except _Interrupted as exc:
            for started in dispatcher.local_sessions(active=True):
                started.stop(0.0)
            _say(err, f"\ncldpd: got {_signal_name(exc.signum)} before the pod started\n")
            return 128 + exc.signum
        return _follow(dispatcher, session, signals, args, out, err)


def _stop(dispatcher: Dispatcher, args: argparse.Namespace, err: TextIO) -> int:
    validate_pod_name(args.pod)
    dispatcher.runner.preflight()
    info = dispatcher.runner.inspect(container_name(args.pod))
    running = info is not None and info.running
    if info is not None:
        dispatcher.stop(args.pod, args.timeout)  # an ended container is removed too
    if not running:
        _say(err, f"cldpd: pod {args.pod} is not running; nothing to stop\n")
        return 1
    _say(err, f"cldpd: pod {args.pod} stopped\n")
    return 0


def _list(dispatcher: Dispatcher, out: TextIO) -> int:
    running = {r.pod: r for r in dispatcher.running()}
    rows = [("POD", "IMAGE", "STATUS")]
    names = set()
    for name, pod, error in scan_pods(dispatcher.pods_dir):
        names.add(name)
        if pod is None:
            rows.append((name, "-", f"broken: {error}"))
            continue
        status = running[name].status if name in running else "-"
        rows.append((name, pod.image, status))
    for name, info in sorted(running.items()):
        if name not in names:
            rows.append((name, "?", f"{info.status} (no pod directory)"))
    if not names:
        out.write(f"No pods in {dispatcher.pods_dir}: {_make_one_hint(dispatcher.pods_dir)}\n")
    if len(rows) == 1:
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for row in rows:
        out.write(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}\n")
    return 0


def _pods_dir_option(pods_dir: str | None) -> str:
    return f" --pods-dir {shlex.quote(pods_dir)}" if pods_dir else ""


def _make_one_hint(pods_dir: Path) -> str:
    default = pods_dir.expanduser().resolve() == default_pods_dir().expanduser().resolve()
    option = "" if default else _pods_dir_option(str(pods_dir))
    return f"make one with `cldpd{option} init NAME` (templates: {', '.join(template_names())})."


def _init(args: argparse.Namespace, out: TextIO) -> int:
    scaffold = create_pod(args.pod, args.template, args.pods_dir)
    option = _pods_dir_option(args.pods_dir)
    out.write(scaffold.text(f"cldpd{option} start {args.pod} --issue URL") + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cldpd`` command.

    Args:
        argv: The arguments; ``sys.argv[1:]`` when None.

    Returns:
        The exit code: the agent's for start and resume, 128 + the signal's number when
        a signal stopped the run (130 for Ctrl+C), 1 for an error and for stopping a pod
        that does not run, 2 for a bad command line or ``CLDPD_LOG`` value.
    """
    args = build_parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    level = "debug" if args.debug else os.environ.get("CLDPD_LOG", "")
    handler = None
    if level.strip():
        try:
            handler = enable_logging(parse_level(level), err)
        except ValueError as exc:
            _say(err, f"cldpd: CLDPD_LOG: {exc}\n")
            return 2
    try:
        return _command(args, out, err)
    finally:
        if handler is not None:
            disable_logging(handler)


def _command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    dispatcher = Dispatcher(args.pods_dir)
    try:
        if args.command == "init":
            return _init(args, out)
        if args.command in ("start", "resume"):
            return _run(dispatcher, args, out, err)
        if args.command == "stop":
            return _stop(dispatcher, args, err)
        return _list(dispatcher, out)
    except CldpdError as exc:
        log_swallowed(logger, f"cldpd {args.command} failed")
        _say(err, f"cldpd: {clean_text(str(exc))}\n")
        return 1
    except KeyboardInterrupt:
        _say(err, "cldpd: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
