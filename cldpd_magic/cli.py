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
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__
from .arguments import RUN_HELP, non_negative, parse_variant
from .errors import CldpdError, DockerUnavailableError, one_line
from .events import Event
from .logs import disable_logging, enable_logging, log_swallowed, parse_level
from .pods import (
    DEFAULT_TEMPLATE,
    container_name,
    create_pod,
    default_pods_dir,
    scan_pods,
    template_names,
    validate_pod_name,
)
from .render import SELECTED_MARK, BatchFeed, BatchView, Table, TextFeed, clean_text, tool_call
from .render import diff as diff_view
from .runs import (
    LABEL_POD,
    Dispatcher,
    RunningPod,
    Session,
    SessionKind,
    ToolPolicy,
    deny_unattended,
    validate_issue_url,
)

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


EPILOG = """examples:
  cldpd init myrepo --template claude-code
  cldpd start myrepo --issue https://github.com/org/repo/issues/42
  cldpd resume myrepo --prompt "Focus on error handling"
  cldpd stop myrepo
  cldpd list
  cldpd batch myrepo --issue URL1 --issue URL2 --variant opus="--model opus" --budget 5
  cldpd diff myrepo-42                 # what the run changed
  cldpd diff myrepo-42 myrepo-42-2     # two runs on one issue compared
  cldpd apply myrepo-42 --to ~/src/repo

Ctrl+C, SIGTERM or SIGHUP during start or resume stops the pod gracefully (the agent's
turn ends first); a second Ctrl+C during that stop kills it.

environment:
  CLDPD_PODS_DIR   the pods directory (default ~/.cldpd/pods)
  CLDPD_LOG        log level of the package's log on stderr (debug, info, ...); off when unset
"""


#: Signals that stop a followed run: Ctrl+C, ``kill`` and a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Seconds a pod gets to stop gracefully before it is killed.
STOP_TIMEOUT = 10.0
#: A repeat of the first signal within this many seconds is the same request, not an
#: escalation: timeout(1) signals its child and then, at once, its whole process group.
_REPEAT_WINDOW = 0.25


PODS_DIR_HELP = "the pods directory (default: $CLDPD_PODS_DIR or ~/.cldpd/pods)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cldpd`` command."""
    parser = argparse.ArgumentParser(
        prog="cldpd",
        description="Run Claude Code agents in Docker pods.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pods-dir", help=PODS_DIR_HELP)
    parser.add_argument(
        "--engine",
        action="append",
        metavar="ENDPOINT",
        help="a Docker engine to use: unix://, tcp://HOST:PORT?tls=DIR, ssh://USER@HOST or a "
        "context name; repeat for more, the first is the default (default: $CLDPD_ENGINES, "
        "else DOCKER_HOST)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="log debugging details, swallowed errors with their tracebacks, to stderr "
        "(same as CLDPD_LOG=debug)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adders = (_add_init, _add_start, _add_resume, _add_stop, _add_list, _add_batch,
              _add_diff, _add_apply)  # fmt: skip
    for add in adders:
        add(sub)
    return parser


def _add_init(sub: Subparsers) -> None:
    init = sub.add_parser("init", help="write a new pod from a template into the pods directory")
    init.add_argument("pod", help="the new pod's name")
    init.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help=f"the template: {', '.join(template_names())} (default: {DEFAULT_TEMPLATE})",
    )
    init.add_argument("--pods-dir", default=argparse.SUPPRESS, help=PODS_DIR_HELP)


def _add_output_options(command: argparse.ArgumentParser) -> None:
    """The options of a command that follows a run: --raw and -v."""
    command.add_argument(
        "--raw",
        action="store_true",
        help="print the agent's stdout and stderr lines verbatim, terminal escape "
        "sequences included (by default they are rendered and escapes are dropped)",
    )
    command.add_argument("-v", "--verbose", action="store_true", help="show the image build log")


def _add_start(sub: Subparsers) -> None:
    start = sub.add_parser("start", help="build a pod and run its agent on a GitHub issue")
    start.add_argument("pod")
    start.add_argument("--issue", required=True, metavar="URL", help="the GitHub issue URL")
    _add_output_options(start)


def _add_resume(sub: Subparsers) -> None:
    resume = sub.add_parser("resume", help="send a follow-up prompt to a running pod")
    resume.add_argument("run", metavar="RUN", help=RUN_HELP)
    resume.add_argument("--prompt", required=True, help="the follow-up prompt")
    _add_output_options(resume)


def _add_stop(sub: Subparsers) -> None:
    stop = sub.add_parser("stop", help="stop a running pod gracefully")
    stop.add_argument("run", metavar="RUN", help=RUN_HELP)
    stop.add_argument("--timeout", type=non_negative, default=10.0, help="seconds before a kill")


def _add_list(sub: Subparsers) -> None:
    sub.add_parser("list", help="list pods and their runs")


def _add_batch(sub: Subparsers) -> None:
    batch = sub.add_parser(
        "batch",
        help="run pods on several issues at once: a line per run's change, results at the end",
    )
    batch.add_argument("pods", nargs="+", metavar="POD", help="the pods to run")
    batch.add_argument(
        "--issue", action="append", required=True, dest="issues", metavar="URL",
        help="a GitHub issue URL (repeat for several)",
    )  # fmt: skip
    batch.add_argument(
        "--variant", action="append", default=[], metavar="NAME[=ARGS]",
        help="a variant: a name and extra agent arguments, e.g. opus='--model opus' "
        "(repeat for several; each run of every pod and issue is made once per variant)",
    )  # fmt: skip
    batch.add_argument(
        "--repeats", type=int, default=1, metavar="N",
        help="runs of each pod, issue and variant (default 1)",
    )  # fmt: skip
    batch.add_argument(
        "--max-parallel", type=int, default=4, metavar="N",
        help="runs at once; the others wait their turn (default 4)",
    )  # fmt: skip
    batch.add_argument(
        "--budget", type=non_negative, metavar="USD",
        help="the batch's budget in US dollars: past it no run starts and running ones stop",
    )  # fmt: skip


def _add_diff(sub: Subparsers) -> None:
    diff = sub.add_parser(
        "diff", help="show what a run changed in its workdir, or compare several runs' changes"
    )
    diff.add_argument("runs", nargs="+", metavar="RUN", help=f"{RUN_HELP}; several to compare")
    diff.add_argument("--file", metavar="PATH", help="one changed file's diff")
    diff.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto",
        help="colour the diff (default: auto, on a terminal)",
    )  # fmt: skip
    diff.add_argument(
        "--capture", action="store_true",
        help="capture the changes again now (a run whose container still runs)",
    )  # fmt: skip


def _add_apply(sub: Subparsers) -> None:
    apply = sub.add_parser(
        "apply", help="apply a run's changes to a git work tree on this machine (all or nothing)"
    )
    apply.add_argument("run", metavar="RUN", help=RUN_HELP)
    apply.add_argument("--to", required=True, metavar="DIR", help="the work tree to change")
    apply.add_argument(
        "--no-3way", dest="three_way", action="store_false",
        help="do not fall back on a 3-way merge where the patch does not apply cleanly",
    )  # fmt: skip
    apply.add_argument(
        "--allow-secrets", action="store_true",
        help="apply a patch that contains a secret value (refused otherwise)",
    )  # fmt: skip


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


def ask_on_terminal(stdin: TextIO, err: TextIO) -> ToolPolicy:
    """The approvals of a run followed on a terminal: each question asked there, in turn.

    ``y`` allows the call, ``a`` allows that tool for the rest of the run, anything else
    denies it (the agent is told a person said no). Without a terminal, nobody can answer:
    :func:`~cldpd_magic.runs.deny_unattended` decides.
    """
    if not stdin.isatty():
        return deny_unattended
    lock = threading.Lock()
    always: set[tuple[str, str]] = set()

    def ask(run: str, tool: str, tool_input: Any) -> bool | tuple[bool, str]:
        if (run, tool) in always:
            return True
        call = clean_text(tool_call(tool, tool_input))
        with lock:  # one question at a time, whatever the runs ask at once
            _say(err, f"cldpd: {clean_text(run)} asks to run {call}\nallow? [y/N/a=always] ")
            answer = stdin.readline().strip().lower()
        if answer in ("a", "always"):
            always.add((run, tool))
            return True
        if answer in ("y", "yes"):
            return True
        return False, "A person at the terminal said no."

    return ask


def _run(dispatcher: Dispatcher, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    signals = _Signals()
    dispatcher.can_use_tool = ask_on_terminal(sys.stdin, err)
    with signals.installed():
        try:
            if args.command == "start":
                session = dispatcher.start_session(args.pod, args.issue)
            else:
                session = dispatcher.resume_session(args.run, args.prompt)
            if session.conversation is not None:
                session.conversation.end_when_idle()  # the command takes no follow-ups
            signals.raising = False
        except _Interrupted as exc:
            for started in dispatcher.local_sessions(active=True):
                started.stop(0.0)
            _say(err, f"\ncldpd: got {_signal_name(exc.signum)} before the pod started\n")
            return 128 + exc.signum
        return _follow(dispatcher, session, signals, args, out, err)


class _BatchProgress:
    """Writes a line whenever a run of a batch changes state (the live form of a batch)."""

    def __init__(self, err: TextIO) -> None:
        self._err = err
        self._seen: dict[str, str] = {}

    def publish(self, view: BatchView) -> None:
        lines = []
        for row in view.table().records():
            run, state = row["run"].removeprefix(SELECTED_MARK), row["state"]
            if self._seen.get(run) != state:
                self._seen[run] = state
                usage = " · ".join(
                    v for v in (row["elapsed"], row["turns"], row["cost"]) if v != "-"
                )
                lines.append(
                    f"cldpd: {run} ({row['pod']}): {state}" + (f" · {usage}" if usage else "")
                )
        if lines:
            _say(self._err, "\n".join(lines) + "\n")


class _BatchStopper:
    """Stops a batch: gracefully on a first signal, by killing its runs on a second."""

    def __init__(self, batch: Any, err: TextIO) -> None:
        self._batch = batch
        self._err = err
        self.first: tuple[int, float] | None = None
        self.killing = False

    def on_signal(self, signum: int, when: float) -> None:
        if self.first is None:
            self.first = (signum, when)
            _say(self._err, "\ncldpd: stopping the batch: no new run starts, running ones "
                 "stop gracefully (interrupt again to kill them)\n")  # fmt: skip
            threading.Thread(target=self._batch.stop, daemon=True, name="cldpd-stop").start()
        elif self.killing or (signum == self.first[0] and when - self.first[1] < _REPEAT_WINDOW):
            return
        else:
            self.killing = True
            _say(self._err, "cldpd: killing the batch's runs\n")
            for session in list(self._batch.runs):
                threading.Thread(target=session.stop, args=(0.0,), daemon=True).start()


def results_table(records: list[dict]) -> Table:
    """A batch's results (``Batch.results()``) as a table: one row per run."""
    rows = [
        (r.get("run"), r.get("pod"), r.get("issue"), r.get("variant") or "-", r.get("state"),
         "-" if r.get("exit_code") is None else r["exit_code"], r.get("turns") or 0,
         f"{r.get('input_tokens') or 0:,}/{r.get('output_tokens') or 0:,}",
         f"${r.get('cost_usd') or 0:.4f}", f"{r.get('seconds') or 0:.1f}s",
         " ".join(str(link) for link in r.get("links") or []))
        for r in records
    ]  # fmt: skip
    columns = ("RUN", "POD", "ISSUE", "VARIANT", "STATE", "EXIT", "TURNS", "TOKENS IN/OUT",
               "COST", "TIME", "LINKS")  # fmt: skip
    return Table(columns, rows)


def run_failed(record: dict) -> bool:
    """Whether a batch run did not end well (any state but exited 0)."""
    return record.get("state") != "exited" or record.get("exit_code") != 0


def _batch(dispatcher: Dispatcher, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    variants = [parse_variant(v) for v in args.variant] or None
    issues = [validate_issue_url(url) for url in args.issues]
    for pod in args.pods:
        validate_pod_name(pod)
    signals = _Signals()
    with signals.installed():
        try:
            batch = dispatcher.dispatch(
                args.pods, issues, variants=variants, repeats=args.repeats,
                max_parallel=args.max_parallel, budget_usd=args.budget,
            )  # fmt: skip
            signals.raising = False
        except _Interrupted as exc:
            for started in dispatcher.local_sessions(active=True):
                started.stop(0.0)
            _say(err, f"\ncldpd: got {_signal_name(exc.signum)} before the batch started\n")
            return 128 + exc.signum
        feed = BatchFeed(batch, BatchView("batch", max_lines=1), _BatchProgress(err).publish, 0.5)
        stopper = _BatchStopper(batch, err)
        while not feed.join(0.1):
            for signum, when in signals.take():
                stopper.on_signal(signum, when)
    records = batch.results()
    table = results_table(records)
    _say(out, table.text() + "\n")
    failed = [r for r in records if run_failed(r)]
    summary = f"cldpd: {len(records) - len(failed)} of {len(records)} runs exited 0"
    cost = sum(float(r.get("cost_usd") or 0) for r in records)
    _say(err, f"{summary}; ${cost:.4f} in all; transcripts in {dispatcher.transcript_dir}\n")
    if stopper.first is not None:
        return 128 + stopper.first[0]
    return 1 if failed or not records else 0


def _stop(dispatcher: Dispatcher, args: argparse.Namespace, err: TextIO) -> int:
    validate_pod_name(args.run)
    dispatcher.runner.preflight()
    run = dispatcher.resolve_run(args.run, "stop")
    info = dispatcher.runner.inspect(container_name(run))
    running = info is not None and info.running
    if info is not None:
        dispatcher.stop(run, args.timeout)  # an ended container is removed too
    pod = info.labels.get(LABEL_POD, args.run) if info is not None else args.run
    what = f"pod {pod}" if run == pod else f"run {run} of pod {pod}"
    if not running:
        _say(err, f"cldpd: {what} is not running; nothing to stop\n")
        return 1
    _say(err, f"cldpd: {what} stopped\n")
    return 0


def _list(dispatcher: Dispatcher, out: TextIO, err: TextIO) -> int:
    try:
        found = dispatcher.running()
    except DockerUnavailableError as exc:
        _say(err, f"cldpd: runs not listed: {clean_text(str(exc))}\n")
        found = None
    runs: dict[str, list[RunningPod]] = {}
    for r in found or []:
        runs.setdefault(r.pod, []).append(r)
    engines = any(r.engine for r in found or [])
    rows = [("POD", "IMAGE", "RUN", *(("ENGINE",) if engines else ()), "STATUS")]

    def add(pod: str, image: str, status: str, r: RunningPod | None = None) -> None:
        engine = ((r.engine or "-") if r else "-",) if engines else ()
        rows.append((pod, image, r.run if r else "-", *engine, status))

    names = set()
    warnings = []
    for name, pod, error in scan_pods(dispatcher.pods_dir):
        names.add(name)
        if pod is None:
            add(name, "-", f"broken: {error}")
            continue
        warnings += [f"cldpd: {name}: {warning}" for warning in pod.unsafe_warnings]
        for r in runs.get(name) or [None]:  # type: ignore[list-item]
            add(name, pod.image, "?" if found is None else r.status if r else "-", r)
    for name in sorted(runs.keys() - names):
        for r in runs[name]:
            add(name, "?", f"{r.status} (no pod directory)", r)
    if not names:
        out.write(f"No pods in {dispatcher.pods_dir}: {_make_one_hint(dispatcher.pods_dir)}\n")
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [f"{c:<{w}}" for c, w in zip(row, widths, strict=False)]
            out.write("  ".join([*cells, row[-1]]) + "\n")
    for warning in warnings:  # what pod.json waives in "unsafe", on stderr as a warning
        _say(err, clean_text(warning).replace("\n", " ") + "\n")
    return 1 if found is None else 0


def _diff(dispatcher: Dispatcher, args: argparse.Namespace, out: TextIO) -> int:
    found = {}
    for run in args.runs:
        validate_pod_name(run)
        found[run] = dispatcher.changes(run, capture=args.capture)
    color = args.color == "always" or (args.color == "auto" and _is_tty(out))
    if len(found) == 1:
        text = diff_view.changes_text(next(iter(found.values())), color=color, path=args.file)
    else:
        text = diff_view.compare_text(found, color=color)
    _say(out, text.rstrip("\n") + "\n")
    return 0


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _apply(dispatcher: Dispatcher, args: argparse.Namespace, err: TextIO) -> int:
    validate_pod_name(args.run)
    changes = dispatcher.changes(args.run)
    changes.apply(args.to, args.three_way, allow_secrets=args.allow_secrets)
    where = clean_text(str(Path(args.to).expanduser()))
    _say(err, f"cldpd: {diff_view.changes_summary(changes)} applied to {where} (uncommitted)\n")
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
        a signal stopped the run or batch (130 for Ctrl+C), 1 for an error, for stopping
        a pod that does not run and for a batch with any run that did not exit 0, 2 for
        a bad command line or ``CLDPD_LOG`` value.
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
    # A batch's runs are not followed one by one: its approvals are the pods' settings.json.
    dispatcher = Dispatcher(args.pods_dir, engines=args.engine, can_use_tool=deny_unattended)
    try:
        if args.command == "init":
            return _init(args, out)
        if args.command in ("start", "resume"):
            return _run(dispatcher, args, out, err)
        if args.command == "stop":
            return _stop(dispatcher, args, err)
        if args.command == "batch":
            return _batch(dispatcher, args, out, err)
        if args.command == "diff":
            return _diff(dispatcher, args, out)
        if args.command == "apply":
            return _apply(dispatcher, args, err)
        return _list(dispatcher, out, err)
    except CldpdError as exc:
        log_swallowed(logger, f"cldpd {args.command} failed")
        _say(err, f"cldpd: {clean_text(str(exc))}\n")
        return 1
    except KeyboardInterrupt:
        _say(err, "cldpd: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
