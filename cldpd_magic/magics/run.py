"""IPython magics: run pods from a notebook and stream them live into the cell.

``%load_ext cldpd_magic`` registers ``%cldpd_start``, ``%cldpd_resume`` (and
``%%cldpd_resume``), ``%cldpd_interrupt``, ``%cldpd_stop``, ``%cldpd_pods``,
``%cldpd_sessions``, ``%cldpd_attach``, ``%cldpd_picker``, ``%cldpd_new``,
``%cldpd_egress`` and ``%cldpd_batch`` (and ``%%cldpd_batch``, one issue URL a line), and
completes pod names after the magics that take one. Settings are traits of
:class:`CldpdMagics`, e.g. ``%config CldpdMagics.pods_dir = "~/pods"``.

As IPython splits its own magics, these are three classes registered together:
:class:`CldpdMagics` (the run magics and the settings of all),
:class:`~cldpd_magic.magics.InventoryMagics` (pods, sessions, new, picker,
egress) and :class:`~cldpd_magic.magics.BatchMagics`; the last two read the
settings and dispatchers of the first.

A run shows in the cell that started it, through a display handle that a
:class:`~cldpd_magic.render.LiveFeed` updates a few times a second, also with ``-b``
while other cells run. A bare blocking ``%cldpd_start``, ``%cldpd_resume`` or
``%cldpd_attach`` shows the run and no ``Out[]`` result under it; ``s = %cldpd_start ...``
still gets the Session. ``%unload_ext cldpd_magic`` removes the magics and the completer;
pods and their live cells keep running (the pods belong to Docker, not to the
extension): stop them first with ``%cldpd_stop`` if they should end.

Each magic has one argparse parser, the one its help (``%cldpd_start?``) shows: it parses
the magic's options, and the completer reads its options and positions from it. A prompt
is the verbatim rest of the line after the parsed ``[options] RUN``.

An interactive run (a Claude Code pod) asks before a tool call its settings do not
allow: its cell shows a row per question under the output (Allow, Deny, Always allow the
tool for this run), and a blocking cell takes the clicks while it waits
(:mod:`~cldpd_magic.magics.uievents`); it returns once a kept-alive agent waits for a
follow-up, which ``%cldpd_resume`` sends to the same process. ``%cldpd_interrupt`` ends
the agent's turn and keeps the run.

``%config CldpdMagics.log_level = "DEBUG"`` logs what the package does, and every error it
swallows with its traceback (masked), to the kernel's stderr: the terminal that runs
Jupyter, never a cell.
"""

from __future__ import annotations

import ast
import functools
import logging
import sys
import weakref
from pathlib import Path
from typing import Any

from IPython.core.completer import (
    CompletionContext,
    SimpleCompletion,
    SimpleMatcherResult,
    context_matcher,
)
from IPython.core.display_functions import DisplayHandle, display
from IPython.core.displaypub import DisplayPublisher
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import CaselessStrEnum, Float, Integer, List, Unicode, observe

from ..arguments import RUN_HELP, non_negative
from ..engines import MultiEngineRunner, Runner
from ..errors import one_line
from ..logs import LEVELS, disable_logging, enable_logging, log_swallowed
from ..pods import scan_pods, validate_pod_name
from ..render import DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_LINES, BatchFeed, LiveFeed, SessionView
from ..render import diff as diff_view
from ..runs import Dispatcher, Session, validate_issue_url
from .batch import BatchMagics
from .diff import DiffMagics
from .inventory import InventoryMagics
from .support import (
    BACKGROUND,
    FOLLOWED_LIVE,
    ArgumentScan,
    parse_args,
    parse_verbatim,
    positional_names,
    scan_arguments,
    unquote,
    user_errors,
)
from .uievents import wait_followed

#: Magics that follow a run in their cell; a bare blocking call leaves no result under it.
FOLLOW_MAGICS = frozenset({"cldpd_start", "cldpd_resume", "cldpd_attach", "cldpd_batch"})
#: Magics whose first positional argument is a pod, or a run (completed with Tab).
POD_MAGICS = ("cldpd_start", "cldpd_resume", "cldpd_stop", "cldpd_attach", "cldpd_interrupt")
#: The positional argument the completer fills: a pod (start) or a run (the others).
NAME_ARGUMENTS = ("pod", "run")
logger = logging.getLogger(__package__)


def split_prompt(line: str) -> tuple[bool, str, str]:
    """Split ``%cldpd_resume``'s ``[-b] RUN PROMPT...`` into (background, run, prompt).

    The prompt is verbatim (see :func:`parse_verbatim`).

    Raises:
        UsageError: An unknown option, or no run.
    """
    args = parse_verbatim(CldpdMagics.cldpd_resume, line)
    return args.background, args.run, args.prompt


@magics_class
class CldpdMagics(Magics):
    """The run magics (start, resume, attach, stop), and the settings of all the magics.

    Its traits configure every ``%cldpd_*`` magic (``%config CldpdMagics.pods_dir = ...``);
    the inventory and batch magics (:class:`~cldpd_magic.magics.InventoryMagics`,
    :class:`~cldpd_magic.magics.BatchMagics`) read them, and its dispatchers, from
    the instance that ``%load_ext cldpd_magic`` registers with them.

    Args:
        shell: The IPython shell.
        runner: The Docker operations; a :class:`DockerRunner` when None.
        **kwargs: Passed to :class:`~IPython.core.magic.Magics`.

    Attributes:
        feeds: The live feed of every session shown in a cell, by session id.
        batch_feeds: The live feed of every batch shown in a cell, oldest first.
    """

    pods_dir = Unicode(
        "", help="The pods directory; $CLDPD_PODS_DIR or ~/.cldpd/pods when empty."
    ).tag(config=True)
    transcript_dir = Unicode(
        "", help="Where transcripts go; $CLDPD_SESSIONS_DIR or ~/.cldpd/sessions when empty."
    ).tag(config=True)
    engines = List(
        Unicode(),
        help="Docker engines (unix://, tcp://HOST:PORT?tls=DIR, ssh://USER@HOST, context "
        "names), the first the default; $CLDPD_ENGINES, else DOCKER_HOST, when empty.",
    ).tag(config=True)
    max_output_lines = Integer(
        DEFAULT_MAX_LINES, min=1, help="How many output lines a cell keeps (a rolling tail)."
    ).tag(config=True)
    flush_interval = Float(
        DEFAULT_FLUSH_INTERVAL, min=0.02, help="Seconds between updates of a live cell."
    ).tag(config=True)
    stop_timeout = Float(
        10.0, min=0.0, help="Seconds a pod gets to stop gracefully before it is killed."
    ).tag(config=True)
    log_level = CaselessStrEnum(
        ("", *LEVELS),
        default_value="",
        help="Log the package's work at this level and above (DEBUG: also every error it "
        "swallows, with its traceback, masked) to the kernel's stderr, the terminal that "
        "runs Jupyter; empty: no log.",
    ).tag(config=True)

    _log_handler: logging.Handler | None = None

    def __init__(self, shell: Any = None, runner: Runner | None = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._runner = runner
        self._dispatchers: dict[tuple[str, str, int], Dispatcher] = {}
        self.feeds: dict[str, LiveFeed] = {}
        self.approvals: dict[str, Any] = {}
        self.batch_feeds: list[BatchFeed] = []
        self._apply_log_level()

    @observe("log_level")
    def _log_level_changed(self, _change: dict[str, Any]) -> None:
        self._apply_log_level()

    def _apply_log_level(self) -> None:
        if self._log_handler is not None:
            disable_logging(self._log_handler)
            self._log_handler = None
        if self.log_level:
            # The process's own stderr: a log line from a worker thread never lands in a cell.
            self._log_handler = enable_logging(self.log_level, sys.__stderr__ or sys.stderr)

    # -- plumbing -------------------------------------------------------------------

    @property
    def runner(self) -> Runner:
        """The Docker operations, shared by every dispatcher of this instance."""
        if self._runner is None:
            self._runner = MultiEngineRunner.from_settings(list(self.engines))
        if self._runner is None:
            from ..engines.docker import DockerRunner  # docker-py loads only when it is used

            self._runner = DockerRunner()
        return self._runner

    @observe("engines")
    def _engines_changed(self, _change: dict[str, Any]) -> None:
        self._runner = None  # the next magic uses the new engines

    @runner.setter
    def runner(self, runner: Runner) -> None:
        """Use other Docker operations from now on (sessions already running go on)."""
        self._runner = runner

    @property
    def dispatcher(self) -> Dispatcher:
        """The dispatcher for the current ``pods_dir`` and ``transcript_dir`` traits."""
        return self.dispatcher_for(self.pods_dir)

    def dispatcher_for(self, pods_dir: str | None) -> Dispatcher:
        """The dispatcher of a pods directory (the trait's when empty), made once."""
        runner = self.runner
        key = (pods_dir or self.pods_dir, self.transcript_dir, id(runner))
        found = self._dispatchers.get(key)
        if found is None:
            found = Dispatcher(key[0] or None, runner, transcript_dir=key[1] or None)
            self._dispatchers[key] = found
        return found

    def sessions(self) -> list[Session]:
        """Every session this kernel started through the magics (or their dispatchers)."""
        seen: dict[str, Session] = {}
        for dispatcher in self.dispatchers():
            for session in dispatcher.local_sessions():
                seen.setdefault(session.id, session)
        return sorted(seen.values(), key=lambda s: s.started_at)

    def dispatchers(self) -> list[Dispatcher]:
        """Every dispatcher made so far (one per pods directory, transcript dir and runner)."""
        return list(self._dispatchers.values())

    def live(self) -> bool:
        """Whether the frontend shows display updates in place (not a plain terminal)."""
        # The plain terminal publisher prints every update: there, show the end only.
        return type(self.shell.display_pub) is not DisplayPublisher

    @staticmethod
    def _bundle(session: Session, view: SessionView) -> dict[str, str]:
        # A transcript that could not be written is no path to show: the session says
        # why in its output instead.
        if session.transcript_error:
            view.transcript = ""
        if view.finished:  # the run's changes, captured as it ended, close its cell
            return diff_view.with_changes(view.bundle(), session.changes, session.mask)
        return view.bundle()

    def _publish(self, handle: DisplayHandle, session: Session, view: SessionView) -> None:
        if self.live():
            handle.update(self._bundle(session, view), raw=True)

    def _follow(self, session: Session, title: str, background: bool, note: str = "") -> Session:
        """Show a session in this cell; block until it ends unless ``background``."""
        try:
            view = SessionView(title, self.max_output_lines, session.mask, str(session.transcript))
            if note:
                view.note(note)
            handle = display(self._bundle(session, view), raw=True, display_id=True)
            publish = functools.partial(self._publish, handle, session)
            feed = LiveFeed(session, view, publish, self.flush_interval)
            self.feeds[session.id] = feed
            if session.interactive and self.live():
                self._show_approvals(session, view)
        except KeyboardInterrupt:
            session.stop(self.stop_timeout)
            raise
        if background:
            return session
        FOLLOWED_LIVE.add(session)
        try:
            wait_followed(self.shell, feed, session)
        except KeyboardInterrupt:
            self._interrupted(session, feed, handle)
        if not self.live():
            handle.update(self._bundle(session, view), raw=True)
        if session.error is not None:
            raise UsageError(one_line(f"{title} failed: {session.error}"))
        return session

    def _show_approvals(self, session: Session, view: SessionView) -> None:
        """Show, under a run's output, a row per tool call waiting for approval."""
        from ..picker import ApprovalRows  # ipywidgets loads only when it is used

        rows = ApprovalRows(notice=lambda text: view.note(text, kind="error"))
        display(rows)
        rows.follow(session)
        self.approvals[session.id] = rows

    def _live_run(self, name: str) -> Session:
        """The session of this kernel running a run's interactive agent, which takes input."""
        sessions = [s for s in self.sessions() if not s.done and name in (s.run, s.pod_name)]
        for dispatcher in self.dispatchers() or [self.dispatcher]:
            live = dispatcher.registry.live_conversation(dispatcher.resolve_run(name, "interrupt"))
            if live is not None:
                return live
        if sessions and not any(s.interactive for s in sessions):
            raise UsageError(
                f"Run {name} is not interactive, so it cannot be interrupted; %cldpd_stop ends it."
            )
        raise UsageError(
            f"No interactive agent of run {name} runs in this kernel now; only runs this "
            "kernel started can be interrupted (%cldpd_stop ends any run)."
        )

    def _stop_pod(self, pod: str, timeout: float) -> bool:
        """Stop a pod through the dispatchers running it here (Dispatcher.stop owns the order).

        Returns:
            Whether anything was running.
        """
        owners = [d for d in self.dispatchers() if d.local_sessions(pod, active=True)]
        return any([dispatcher.stop(pod, timeout) for dispatcher in owners or [self.dispatcher]])

    def _interrupted(self, session: Session, feed: LiveFeed, handle: DisplayHandle) -> None:
        pod = session.pod_name
        what = f"pod {pod} stopped"
        timeout = self.stop_timeout
        while True:  # a second Ctrl-C must not leave the pod half stopped: it kills it
            try:
                # The agent's turn ends first (SIGINT through its exec for a resume),
                # then the pod, as a person interrupting a blocking cell expects.
                self._stop_pod(pod, timeout)
                feed.join(10)
                break
            except KeyboardInterrupt:
                what, timeout = f"pod {pod} killed", 0.0
        feed.view.note(f"interrupted: {what}", kind="error")
        handle.update(self._bundle(session, feed.view), raw=True)
        raise UsageError(f"Interrupted: {what}.")

    def _pod_names(self, pods_dir: str | None, running: bool) -> list[str]:
        directory = Path(pods_dir).expanduser() if pods_dir else self.dispatcher.pods_dir
        names = {name for name, _pod, _err in scan_pods(directory)}
        if running:
            names.update(s.pod_name for s in self.sessions() if not s.done)
        return sorted(names)

    def complete(self, text: str) -> SimpleMatcherResult:
        """Complete a pod name after a pod magic.

        Args:
            text: The line up to the cursor.

        Returns:
            Matching pod names (suppressing other completions) when the cursor is where a
            pod name goes, else nothing.
        """
        nothing: SimpleMatcherResult = {"completions": [], "suppress": False}
        words = text.split()
        name = words[0].lstrip("%") if words else ""
        if name not in POD_MAGICS:
            return nothing
        at_space = text[-1:].isspace()
        if len(words) == 1 and not at_space:
            return nothing
        before = words[1:] if at_space else words[1:-1]
        current = "" if at_space else words[-1]
        if current.startswith("-"):
            return nothing
        parser = getattr(self, name).parser
        found = scan_arguments(parser, before, strict=False)
        names = positional_names(parser)
        position = next(i for i, n in enumerate(names) if n in NAME_ARGUMENTS)
        if found.pending is not None or len(found.positionals) != position:
            return nothing
        try:
            pods_dir = unquote(found.values.get("pods_dir", "")) or None
            names = self._pod_names(pods_dir, running=name != "cldpd_start")
        except Exception:  # completion must never raise into the frontend
            log_swallowed(logger, "completing a pod name failed")
            return nothing
        matches = [SimpleCompletion(n, type="pod") for n in names if n.startswith(current)]
        return {"completions": matches, "suppress": True}

    # -- magics ---------------------------------------------------------------------

    @magic_arguments()
    @BACKGROUND
    @argument("--pods-dir", metavar="DIR", help="the pods directory for this run")
    @argument("pod", help="the pod to run")
    @argument("issue_url", help="the GitHub issue URL (http or https)")
    @line_magic
    def cldpd_start(self, line: str) -> Session:
        """Build a pod's image and run its agent on a GitHub issue, streaming into this cell.

        Blocks until the agent exits unless -b is given; interrupting the kernel stops
        the pod gracefully. Returns the Session, e.g. ``s = %cldpd_start -b pod URL``.
        """
        args = parse_args(self.cldpd_start, line)
        with user_errors():
            url = validate_issue_url(args.issue_url)
            dispatcher = self.dispatcher_for(unquote(args.pods_dir or "") or None)
            session = dispatcher.start_session(args.pod, url)
        return self._follow(session, args.pod, args.background, note=f"issue: {url}")

    @magic_arguments()
    @BACKGROUND
    @argument("run", metavar="RUN", help=RUN_HELP)
    @argument(
        "prompt", nargs="*",
        help="the follow-up prompt, verbatim to the end of the line (no $var or {x} "
        "expansion, quotes optional); with %%%%cldpd_resume, the cell body",
    )  # fmt: skip
    @no_var_expand
    @line_cell_magic
    def cldpd_resume(self, line: str, cell: str | None = None) -> Session:
        """Send a follow-up prompt to a running pod, streaming the answer into this cell.

        ``%cldpd_resume [-b] RUN PROMPT...`` takes the rest of the line as the prompt;
        ``%%cldpd_resume [-b] RUN`` takes the cell body; RUN is a run, or a pod with one
        run. Blocks until the agent answers unless -b is given; interrupting the kernel
        ends the agent's turn, then stops the pod. Returns the Session.
        """
        args = parse_verbatim(self.cldpd_resume, line)
        background, run, prompt = args.background, args.run, args.prompt
        if cell is not None:
            if prompt:
                raise UsageError(
                    "With %%cldpd_resume the prompt is the cell body; leave the line at [-b] RUN."
                )
            prompt = cell.strip("\n")
        if not prompt.strip():
            raise UsageError(f"The prompt is empty; say what pod {run} should do next.")
        with user_errors():
            session = self.dispatcher.resume_session(run, prompt)
        first = prompt.strip().splitlines()[0]
        return self._follow(session, f"{run} resume", background, note=f"prompt: {first}")

    @magic_arguments()
    @BACKGROUND
    @argument("run", metavar="RUN", help=RUN_HELP)
    @line_magic
    def cldpd_attach(self, line: str) -> Session:
        """Stream the output of a pod already running (e.g. started before a kernel restart).

        The output is replayed from the container's start. Blocks until the pod ends
        unless -b is given; interrupting the kernel stops the pod gracefully, as does
        %cldpd_stop. Returns the Session.
        """
        args = parse_args(self.cldpd_attach, line)
        with user_errors():
            validate_pod_name(args.run)
            session = self.dispatcher.attach_session(args.run)
        return self._follow(session, f"{args.run} attach", args.background)

    @magic_arguments()
    @argument("run", metavar="RUN", help=RUN_HELP)
    @line_magic
    def cldpd_interrupt(self, line: str) -> None:
        """End the turn a run's agent is on, without stopping the run.

        The agent stops what it was doing (a call waiting for approval is withdrawn) and
        waits for the next prompt: send it with ``%cldpd_resume RUN PROMPT``. The run and
        its container stay; ``%cldpd_stop`` ends the run. Works on the interactive runs
        this kernel started.
        """
        args = parse_args(self.cldpd_interrupt, line)
        with user_errors():
            validate_pod_name(args.run)
            session = self._live_run(args.run)
            session.interrupt()
        print(f"Run {session.run} interrupted; its agent waits for a prompt (%cldpd_resume).")

    @magic_arguments()
    @argument("run", metavar="RUN", help=RUN_HELP)
    @argument(
        "--timeout", type=non_negative, help="seconds before it is killed (default: stop_timeout)"
    )
    @line_magic
    def cldpd_stop(self, line: str) -> None:
        """Stop a pod gracefully: its agent gets SIGINT, then SIGTERM, then it is killed.

        Its live cells show it stopped; its container is removed (unless keepAlive).
        """
        args = parse_args(self.cldpd_stop, line)
        timeout = self.stop_timeout if args.timeout is None else max(0.0, args.timeout)
        with user_errors():
            validate_pod_name(args.run)
            if not self._stop_pod(args.run, timeout):
                if args.run not in self._pod_names(None, running=False):
                    raise UsageError(
                        f"No pod named {args.run!r} in {self.dispatcher.pods_dir}, and none "
                        "is running."
                    )
                print(f"Pod {args.run} is not running; nothing to stop.")
                return
        print(f"Pod {args.run} stopped.")


#: Per shell: the registered magics (settings first), the completer and the AST transformer.
_LOADED: weakref.WeakKeyDictionary[Any, tuple[list[Magics], Any, Any]] = weakref.WeakKeyDictionary()


def keep_question_marks(lines: list[str]) -> list[str]:
    """Input transformer: a one-line ``%cldpd_resume`` that ends in ``?`` is a prompt.

    IPython reads a trailing ``?`` as a help request before any magic runs, so
    ``%cldpd_resume pod Why did it fail?`` would send nothing; this rewrites such a line
    into the explicit magic call, the prompt untouched.
    """
    if len(lines) != 1:
        return lines
    line = lines[0].rstrip("\n")
    stripped = line.lstrip()
    if not stripped.startswith("%cldpd_resume ") or not line.rstrip().endswith("?"):
        return lines
    indent = line[: len(line) - len(stripped)]
    rest = stripped[len("%cldpd_resume ") :]
    return [f"{indent}get_ipython().run_line_magic('cldpd_resume', {rest!r})\n"]


def shown_result(value: Any) -> Any:
    """What a bare follow magic's cell shows as its result: nothing for a run it followed.

    The cell already shows that run live, so the Session (kept for ``s = %cldpd_start
    ...`` and ``-b``) would only repeat a stale status under it.
    """
    return None if value in FOLLOWED_LIVE else value


class HideFollowedResult(ast.NodeTransformer):
    """AST transformer: a cell's bare blocking follow magic shows no ``Out[]`` result.

    A top-level expression statement calling ``%cldpd_start``, ``%cldpd_resume`` or
    ``%cldpd_attach`` becomes ``shown_result(<the call>)``. The value never reaches the
    display hook, so neither a kernel (no execute_result) nor a terminal (no ``Out[n]:``
    prompt) shows it; an assignment, ``-b`` and any other statement are left alone.
    """

    def visit_Module(self, node: ast.Module) -> ast.Module:
        node.body = [self._wrap(statement) for statement in node.body]
        return node

    @staticmethod
    def _wrap(statement: ast.stmt) -> ast.stmt:
        call = statement.value if isinstance(statement, ast.Expr) else None
        if not (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr in ("run_line_magic", "run_cell_magic")
            and call.args
            and isinstance(call.args[0], ast.Constant)
            and call.args[0].value in FOLLOW_MAGICS
        ):
            return statement
        helper = ast.parse(f"__import__({__name__!r}, fromlist=['_']).shown_result", mode="eval")
        wrapped = ast.Expr(ast.Call(helper.body, [call], []))
        return ast.fix_missing_locations(ast.copy_location(wrapped, statement))


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics and the pod-name completer (``%load_ext cldpd_magic``).

    The run magics and settings (:class:`CldpdMagics`), the inventory magics and the
    batch magics are three registered classes sharing one :class:`CldpdMagics`. Loading
    again is harmless.
    """
    if ipython in _LOADED:
        return
    magics = CldpdMagics(shell=ipython)
    registered: list[Magics] = [
        magics,
        InventoryMagics(ipython, magics),
        BatchMagics(ipython, magics),
        DiffMagics(ipython, magics),
    ]
    ipython.register_magics(*registered)

    @context_matcher()
    def cldpd_pod_matcher(context: CompletionContext) -> SimpleMatcherResult:
        return magics.complete(context.text_until_cursor)

    completer = getattr(ipython, "Completer", None)
    if completer is not None:
        completer.custom_matchers.append(cldpd_pod_matcher)
    cleanup = getattr(ipython, "input_transformers_cleanup", None)
    if cleanup is not None and keep_question_marks not in cleanup:
        cleanup.append(keep_question_marks)
    hider = HideFollowedResult()
    ipython.ast_transformers.append(hider)
    _LOADED[ipython] = (registered, cldpd_pod_matcher, hider)


def _unregister(ipython: Any, magics: Magics) -> None:
    """Remove one registered Magics instance: its magics, registry entry and configurable."""
    manager = ipython.magics_manager
    for kind, table in magics.magics.items():
        for name in table:
            if getattr(manager.magics[kind].get(name), "__self__", None) is magics:
                del manager.magics[kind][name]
    if manager.registry.get(type(magics).__name__) is magics:
        del manager.registry[type(magics).__name__]
    if magics in getattr(ipython, "configurables", []):
        ipython.configurables.remove(magics)


def unload_ipython_extension(ipython: Any) -> None:
    """Undo :func:`load_ipython_extension` (``%unload_ext cldpd_magic``).

    The magics and the completer go. Running pods and their live cells are left
    running: they belong to Docker, and ``%cldpd_attach`` finds them again after a
    reload; stop them first with ``%cldpd_stop`` if they should end.
    """
    loaded = _LOADED.pop(ipython, None)
    if loaded is None:
        return
    registered, matcher, hider = loaded
    registered[0].log_level = ""  # its log handler goes with it
    if hider in ipython.ast_transformers:
        ipython.ast_transformers.remove(hider)
    for magics in registered:
        _unregister(ipython, magics)
    completer = getattr(ipython, "Completer", None)
    if completer is not None and matcher in completer.custom_matchers:
        completer.custom_matchers.remove(matcher)
    cleanup = getattr(ipython, "input_transformers_cleanup", None)
    if cleanup is not None and keep_question_marks in cleanup:
        cleanup.remove(keep_question_marks)


__all__ = [
    "POD_MAGICS",
    "ArgumentScan",
    "BatchMagics",
    "CldpdMagics",
    "InventoryMagics",
    "load_ipython_extension",
    "parse_verbatim",
    "positional_names",
    "scan_arguments",
    "shown_result",
    "split_prompt",
    "unload_ipython_extension",
    "user_errors",
]
