"""IPython magics: run pods from a notebook and stream them live into the cell.

``%load_ext cldpd_magic`` registers ``%cldpd_start``, ``%cldpd_resume`` (and
``%%cldpd_resume``), ``%cldpd_stop``, ``%cldpd_pods``, ``%cldpd_sessions``,
``%cldpd_attach``, ``%cldpd_picker``, ``%cldpd_new``, ``%cldpd_egress`` and ``%cldpd_batch`` (and
``%%cldpd_batch``, one issue URL a line), and completes pod names
after the magics that take one. Settings are traits of :class:`CldpdMagics`, e.g.
``%config CldpdMagics.pods_dir = "~/pods"``.

A run shows in the cell that started it, through a display handle that a
:class:`~cldpd_magic.render.LiveFeed` updates a few times a second, also with ``-b``
while other cells run. A bare blocking ``%cldpd_start``, ``%cldpd_resume`` or
``%cldpd_attach`` shows the run and no ``Out[]`` result under it; ``s = %cldpd_start ...``
still gets the Session. ``%unload_ext cldpd_magic`` removes the magics and the completer;
pods and their live cells keep running (the pods belong to Docker, not to the
extension): stop them first with ``%cldpd_stop`` if they should end.

Each magic has one argparse parser, the one its help (``%cldpd_start?``) shows: it parses
the magic's options, and the completer reads its options and positions from it. A prompt
is the verbatim rest of the line after the parsed ``[options] POD``.

``%config CldpdMagics.log_level = "DEBUG"`` logs what the package does, and every error it
swallows with its traceback (masked), to the kernel's stderr: the terminal that runs
Jupyter, never a cell.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import logging
import re
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
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
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.utils.process import arg_split
from traitlets import CaselessStrEnum, Float, Integer, List, Unicode, observe

from .cli import parse_variant
from .dispatcher import Dispatcher, validate_issue_url
from .engines import MultiEngineRunner
from .errors import CldpdError, one_line
from .logs import LEVELS, disable_logging, enable_logging, log_swallowed
from .pods import scan_pods, validate_pod_name
from .protocol import Runner
from .render import (
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_LINES,
    BatchFeed,
    BatchView,
    LiveFeed,
    Report,
    SessionView,
    Table,
)
from .scaffold import DEFAULT_TEMPLATE, create_pod, template_names
from .session import Session

#: Magics that follow a run in their cell; a bare blocking call leaves no result under it.
FOLLOW_MAGICS = frozenset({"cldpd_start", "cldpd_resume", "cldpd_attach", "cldpd_batch"})
#: Sessions and batches that a blocking magic followed in its cell to their end.
_FOLLOWED_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
#: Magics whose first positional argument is a pod name (completed with Tab).
POD_MAGICS = ("cldpd_start", "cldpd_resume", "cldpd_stop", "cldpd_attach")
_QUOTES = ("'", '"')
_WORD = re.compile(r"\S+")
logger = logging.getLogger(__name__)
_BACKGROUND = argument(
    "-b", "--background", action="store_true",
    help="return at once with the Session; the cell keeps streaming",
)  # fmt: skip


def _is_docker_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.split(".", 1)[0] in ("docker", "requests", "urllib3")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library and Docker errors into one-line UsageErrors (no traceback in a cell).

    Raises:
        UsageError: For every CldpdError, bad argument (ValueError from quoting) or
            docker-py/requests error raised inside the block.
    """
    try:
        yield
    except UsageError:
        raise
    except CldpdError as exc:
        log_swallowed(logger, "a magic failed")
        raise UsageError(one_line(str(exc)) or type(exc).__name__) from None
    except Exception as exc:
        if _is_docker_error(exc):
            log_swallowed(logger, "a magic failed in Docker")
            raise UsageError(f"Docker error: {one_line(str(exc))}") from None
        raise


def _parser_of(magic: Any) -> argparse.ArgumentParser:
    return magic.parser


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    # argparse offers no public listing of its options; this mapping has been stable
    # since Python 2.7, and it is read here only.
    return dict(parser._option_string_actions)


def positional_names(parser: argparse.ArgumentParser) -> list[str]:
    """The names (dests) of a parser's positional arguments, in order."""
    return [action.dest for action in parser._actions if not action.option_strings]


def _option_names(parser: argparse.ArgumentParser) -> str:
    seen = {id(a): "/".join(a.option_strings) for a in _option_actions(parser).values()}
    return ", ".join(seen.values()) or "none"


@dataclass
class ArgumentScan:
    """How far a magic's words fill its parser (for the completer and verbatim prompts).

    Attributes:
        values: Raw option values by dest (``""`` for a flag that was given).
        positionals: The positional words, in order.
        pending: The dest of an option whose value has not come yet, else None.
    """

    values: dict[str, str]
    positionals: list[str]
    pending: str | None


def scan_arguments(
    parser: argparse.ArgumentParser, words: list[str], strict: bool = True
) -> ArgumentScan:
    """Sort a magic's words into options and positionals as its parser would.

    Args:
        parser: The magic's parser.
        words: The words, already split.
        strict: Raise on an option the parser does not know (else skip it).

    Raises:
        UsageError: An unknown option, when ``strict``.
    """
    options = _option_actions(parser)
    values: dict[str, str] = {}
    positionals: list[str] = []
    pending: str | None = None
    for word in words:
        if pending is not None:
            values[pending], pending = word, None
        elif word.startswith("-") and word != "-":
            name, has_value, value = word.partition("=")
            action = options.get(name)
            if action is None:
                if strict:
                    raise UsageError(
                        f"Unknown option {name}; the options are {_option_names(parser)}."
                    )
            elif action.nargs == 0 or has_value:
                values[action.dest] = value
            else:
                pending = action.dest
        else:
            positionals.append(word)
    return ArgumentScan(values, positionals, pending)


def parse_verbatim(magic: Any, line: str) -> argparse.Namespace:
    """Parse ``[options] POD REST`` with the magic's own parser, REST kept verbatim.

    The options and every positional but the last are parsed by the parser that the
    magic's help shows; the last positional (the prompt) is the rest of the line as
    written, with one pair of quotes around the whole of it removed and nothing else
    touched (no quote processing, no ``$x`` or ``{x}`` expansion).

    Raises:
        UsageError: An unknown option, a bad option value or a missing pod.
    """
    parser = _parser_of(magic)
    names = positional_names(parser)
    for match in _WORD.finditer(line):
        try:
            words = arg_split(line[: match.end()])  # as parse_argstring splits
        except ValueError:
            continue  # inside a quoted option value
        found = scan_arguments(parser, words)
        if found.pending is None and len(found.positionals) == len(names) - 1:
            args = parser.parse_args(words)
            setattr(args, names[-1], unquote(line[match.end() :].strip()))
            return args
    scan_arguments(parser, arg_split(line, strict=False))  # an unknown option, said first
    usage = one_line(parser.format_usage()).removeprefix("::").removeprefix("usage:").strip()
    raise UsageError(f"Name the {names[0]}: {usage}.")


def split_prompt(line: str) -> tuple[bool, str, str]:
    """Split ``%cldpd_resume``'s ``[-b] POD PROMPT...`` into (background, pod, prompt).

    The prompt is verbatim (see :func:`parse_verbatim`).

    Raises:
        UsageError: An unknown option, or no pod name.
    """
    args = parse_verbatim(CldpdMagics.cldpd_resume, line)
    return args.background, args.pod, args.prompt


def unquote(text: str) -> str:
    """Remove one pair of quotes around the whole text (parse_argstring keeps them)."""
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == text[0]:
        return text[1:-1]
    return text


def _parse(magic: Any, line: str) -> Any:
    try:
        return parse_argstring(magic, line)
    except ValueError as exc:
        raise UsageError(f"Cannot read the arguments ({exc}); check the quotes.") from None


@magics_class
class CldpdMagics(Magics):
    """The ``%cldpd_*`` magics, with their settings as configurable traits.

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
            from .runner import DockerRunner  # docker-py loads only when it is used

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
        for dispatcher in list(self._dispatchers.values()):
            for session in dispatcher.local_sessions():
                seen.setdefault(session.id, session)
        return sorted(seen.values(), key=lambda s: s.started_at)

    def _live(self) -> bool:
        # The plain terminal publisher prints every update: there, show the end only.
        return type(self.shell.display_pub) is not DisplayPublisher

    @staticmethod
    def _bundle(session: Session, view: SessionView) -> dict[str, str]:
        # A transcript that could not be written is no path to show: the session says
        # why in its output instead.
        if session.transcript_error:
            view.transcript = ""
        return view.bundle()

    def _publish(self, handle: DisplayHandle, session: Session, view: SessionView) -> None:
        if self._live():
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
        except KeyboardInterrupt:
            session.stop(self.stop_timeout)
            raise
        if background:
            return session
        _FOLLOWED_LIVE.add(session)
        try:
            while not feed.join(0.25):
                pass
        except KeyboardInterrupt:
            self._interrupted(session, feed, handle)
        if not self._live():
            handle.update(self._bundle(session, view), raw=True)
        if session.error is not None:
            raise UsageError(one_line(f"{title} failed: {session.error}"))
        return session

    def _stop_pod(self, pod: str, timeout: float) -> bool:
        """Stop a pod through the dispatchers running it here (Dispatcher.stop owns the order).

        Returns:
            Whether anything was running.
        """
        owners = [d for d in list(self._dispatchers.values()) if d.local_sessions(pod, active=True)]
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
        parser = _parser_of(getattr(self, name))
        found = scan_arguments(parser, before, strict=False)
        pod_position = positional_names(parser).index("pod")
        if found.pending is not None or len(found.positionals) != pod_position:
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
    @_BACKGROUND
    @argument("--pods-dir", metavar="DIR", help="the pods directory for this run")
    @argument("pod", help="the pod to run")
    @argument("issue_url", help="the GitHub issue URL (http or https)")
    @line_magic
    def cldpd_start(self, line: str) -> Session:
        """Build a pod's image and run its agent on a GitHub issue, streaming into this cell.

        Blocks until the agent exits unless -b is given; interrupting the kernel stops
        the pod gracefully. Returns the Session, e.g. ``s = %cldpd_start -b pod URL``.
        """
        args = _parse(self.cldpd_start, line)
        with user_errors():
            url = validate_issue_url(args.issue_url)
            dispatcher = self.dispatcher_for(unquote(args.pods_dir or "") or None)
            session = dispatcher.start_session(args.pod, url)
        return self._follow(session, args.pod, args.background, note=f"issue: {url}")

    @magic_arguments()
    @_BACKGROUND
    @argument("pod", help="the running pod")
    @argument(
        "prompt", nargs="*",
        help="the follow-up prompt, verbatim to the end of the line (no $var or {x} "
        "expansion, quotes optional); with %%%%cldpd_resume, the cell body",
    )  # fmt: skip
    @no_var_expand
    @line_cell_magic
    def cldpd_resume(self, line: str, cell: str | None = None) -> Session:
        """Send a follow-up prompt to a running pod, streaming the answer into this cell.

        ``%cldpd_resume [-b] POD PROMPT...`` takes the rest of the line as the prompt;
        ``%%cldpd_resume [-b] POD`` takes the cell body. Blocks until the agent answers
        unless -b is given; interrupting the kernel ends the agent's turn, then stops the
        pod. Returns the Session.
        """
        args = parse_verbatim(self.cldpd_resume, line)
        background, pod, prompt = args.background, args.pod, args.prompt
        if cell is not None:
            if prompt:
                raise UsageError(
                    "With %%cldpd_resume the prompt is the cell body; leave the line at [-b] POD."
                )
            prompt = cell.strip("\n")
        if not prompt.strip():
            raise UsageError(f"The prompt is empty; say what pod {pod} should do next.")
        with user_errors():
            session = self.dispatcher.resume_session(pod, prompt)
        first = prompt.strip().splitlines()[0]
        return self._follow(session, f"{pod} resume", background, note=f"prompt: {first}")

    @magic_arguments()
    @argument("run", help="a run (or pod) started in this kernel with a network allowlist")
    @line_magic
    def cldpd_egress(self, line: str) -> Table:
        """List the connections a run's egress proxy saw: allowed and blocked, in order.

        Only runs whose pod.json has ``"network": {"allow": [...]}`` have a proxy; blocked
        attempts are also EGRESS_BLOCKED events in the run's cell and transcript.
        """
        args = _parse(self.cldpd_egress, line)
        with user_errors():
            validate_pod_name(args.run)
        for dispatcher in list(self._dispatchers.values()):
            attempts = dispatcher.egress_attempts(args.run)
            if attempts is not None:
                rows = [
                    (a.time.strftime("%H:%M:%S"), a.target, a.method,
                     "allowed" if a.allowed else "blocked")
                    for a in attempts
                ]  # fmt: skip
                blocked = sum(not a.allowed for a in attempts)
                return Table(
                    ("time", "host:port", "method", "verdict"), rows,
                    title=f"Egress of {args.run}: {len(rows) - blocked} allowed, {blocked} blocked",
                    notes=[] if rows else ["No connection was attempted yet."],
                )  # fmt: skip
        raise UsageError(
            f"No run {args.run!r} with a network allowlist was started in this kernel; "
            "%cldpd_egress lists the proxy of runs whose pod.json has network.allow."
        )

    @magic_arguments()
    @_BACKGROUND
    @argument("pod", help="the running pod")
    @line_magic
    def cldpd_attach(self, line: str) -> Session:
        """Stream the output of a pod already running (e.g. started before a kernel restart).

        The output is replayed from the container's start. Blocks until the pod ends
        unless -b is given; interrupting the kernel stops the pod gracefully, as does
        %cldpd_stop. Returns the Session.
        """
        args = _parse(self.cldpd_attach, line)
        with user_errors():
            validate_pod_name(args.pod)
            session = self.dispatcher.attach_session(args.pod)
        return self._follow(session, f"{args.pod} attach", args.background)

    @magic_arguments()
    @argument("pod", help="the pod to stop")
    @argument("--timeout", type=float, help="seconds before it is killed (default: stop_timeout)")
    @line_magic
    def cldpd_stop(self, line: str) -> None:
        """Stop a pod gracefully: its agent gets SIGINT, then SIGTERM, then it is killed.

        Its live cells show it stopped; its container is removed (unless keepAlive).
        """
        args = _parse(self.cldpd_stop, line)
        timeout = self.stop_timeout if args.timeout is None else max(0.0, args.timeout)
        with user_errors():
            validate_pod_name(args.pod)
            if not self._stop_pod(args.pod, timeout):
                if args.pod not in self._pod_names(None, running=False):
                    raise UsageError(
                        f"No pod named {args.pod!r} in {self.dispatcher.pods_dir}, and none "
                        "is running."
                    )
                print(f"Pod {args.pod} is not running; nothing to stop.")
                return
        print(f"Pod {args.pod} stopped.")

    @magic_arguments()
    @_BACKGROUND
    @argument(
        "-p", "--pod", action="append", default=[], metavar="POD",
        help="a pod to run (repeat for several, or POD,POD)",
    )  # fmt: skip
    @argument(
        "--variant", action="append", default=[], metavar="NAME[=ARGS]",
        help="a variant: a name and extra agent arguments, e.g. \"opus=--model opus\" (repeat "
        "for several)",
    )  # fmt: skip
    @argument("--repeats", type=int, default=1, help="runs of each pod, issue and variant")
    @argument("--max-parallel", type=int, default=4, help="runs at once; the rest wait")
    @argument(
        "--budget", type=float, metavar="USD",
        help="the batch's budget: past it no run starts and running ones stop",
    )  # fmt: skip
    @argument(
        "issues", nargs="*", metavar="ISSUE_URL",
        help="GitHub issue URLs; with %%%%cldpd_batch, one a line in the cell body",
    )  # fmt: skip
    @line_cell_magic
    def cldpd_batch(self, line: str, cell: str | None = None) -> Any:
        """Run pods on many issues at once, as a live table in this cell; returns the Batch.

        ``%cldpd_batch -p POD [options] URL...`` or ``%%cldpd_batch -p POD [options]`` with
        one issue URL a line in the cell body (blank lines and ``#`` comments skipped).
        Every pod runs on every issue, once per variant and repeat, at most
        --max-parallel at once. The table has a row per run (state, elapsed, turns,
        cost, last tool call); choose a run to see its output, stop one or all. Blocks
        until the batch ends unless -b is given; interrupting the kernel stops the batch.
        ``batch.to_dataframe()`` gives the results.
        """
        args = _parse(self.cldpd_batch, line)
        urls = list(args.issues)
        if cell is not None:
            body = [text.strip() for text in cell.splitlines()]
            urls += [text for text in body if text and not text.startswith("#")]
        pods = [name for spec in args.pod for name in unquote(spec).split(",") if name]
        if not pods:
            raise UsageError("Name the pods to run with -p POD (repeat it for several).")
        if not urls:
            raise UsageError(
                "Give the issues: URLs after the options, or one a line in a %%cldpd_batch cell."
            )
        with user_errors():
            issues = [validate_issue_url(unquote(url)) for url in urls]
            for pod in pods:
                validate_pod_name(pod)
            variants = [parse_variant(unquote(v)) for v in args.variant] or None
            batch = self.dispatcher.dispatch(
                pods, issues, variants=variants, repeats=args.repeats,
                max_parallel=args.max_parallel, budget_usd=args.budget,
            )  # fmt: skip
        return self._follow_batch(batch, args.background)

    def _follow_batch(self, batch: Any, background: bool) -> Any:
        """Show a batch in this cell (widgets in a live frontend); block unless ``background``."""
        try:
            if self._live():
                from .widgets import BatchPanel  # ipywidgets loads only when it is used

                panel = BatchPanel(
                    batch, max_lines=self.max_output_lines, interval=self.flush_interval,
                    stop_timeout=self.stop_timeout,
                )  # fmt: skip
                display(panel)
                feed = panel.feed
            else:  # a terminal prints every update: there, show the end only
                view = BatchView(max_lines=self.max_output_lines)
                handle = display(view.bundle(), raw=True, display_id=True)
                feed = BatchFeed(batch, view, lambda _view: None)
            self.batch_feeds.append(feed)
        except KeyboardInterrupt:
            batch.stop()
            raise
        if background:
            return batch
        _FOLLOWED_LIVE.add(batch)
        try:
            while not feed.join(0.25):
                pass
        except KeyboardInterrupt:
            batch.stop()
            feed.join(30)
            raise UsageError("Interrupted: the batch stopped.") from None
        finally:
            if not self._live():
                handle.update(feed.view.bundle(), raw=True)
        return batch

    @magic_arguments()
    @argument("pod", help="the new pod's name")
    @argument(
        "--template", default=DEFAULT_TEMPLATE,
        help=f"the template: {', '.join(template_names())} (default: {DEFAULT_TEMPLATE})",
    )  # fmt: skip
    @argument("--pods-dir", metavar="DIR", help="the pods directory to write it into")
    @line_magic
    def cldpd_new(self, line: str) -> None:
        """Write a new pod from a template into the pods directory, and say what to edit next.

        Refuses to overwrite an existing pod. The templates ship with the package
        (``--template`` lists them); ``minimal`` is the one to start from.
        """
        args = _parse(self.cldpd_new, line)
        with user_errors():
            pods_dir = unquote(args.pods_dir or "") or self.pods_dir or None
            scaffold = create_pod(unquote(args.pod), args.template, pods_dir)
        option = f" --pods-dir {args.pods_dir}" if args.pods_dir else ""
        print(scaffold.text(f"%cldpd_start{option} {args.pod} ISSUE_URL"))

    @magic_arguments()
    @line_magic
    def cldpd_pods(self, line: str = "") -> Table:
        """List the pods: image, workdir, mounts, forwarded variables, template, running.

        Broken pods are listed with what is wrong with them. Returns the Table
        (``.records()`` gives the rows as dictionaries).
        """
        _parse(self.cldpd_pods, line)
        pods_dir = self.dispatcher.pods_dir
        notes = []
        try:
            running: set[str] | None = {
                r.pod for r in self.dispatcher.running() if r.status == "running"
            }
        except Exception as exc:
            if not isinstance(exc, CldpdError) and not _is_docker_error(exc):
                raise
            log_swallowed(logger, "listing running pods failed")
            running = None
            notes.append(f"Docker did not answer, so running is unknown: {one_line(str(exc))}")
        rows = []
        for name, pod, error in scan_pods(pods_dir):
            state = "?" if running is None else ("running" if name in running else "no")
            if pod is None:
                rows.append((name, "", "", "", "", "", state, one_line(str(error))))
                continue
            config = pod.config
            mounts = ", ".join(
                f"{m.source}:{m.target}{':ro' if m.read_only else ''}" for m in config.mounts
            )
            rows.append((
                name, pod.image, config.workdir or "(image default)", mounts,
                ", ".join(config.inherit_env), "yes" if pod.template else "no", state, "",
            ))  # fmt: skip
        if not rows:
            notes.append(
                f"No pods in {pods_dir}: make one with %cldpd_new NAME (templates: "
                f"{', '.join(template_names())}); a pod is a directory with a Dockerfile."
            )
        columns = ("pod", "image", "workdir", "mounts", "forwards", "template", "running")
        if any(row[-1] for row in rows):
            columns += ("problem",)
        else:
            rows = [row[:-1] for row in rows]
        return Table(columns, rows, title=f"Pods in {pods_dir}", notes=notes)

    @magic_arguments()
    @line_magic
    def cldpd_sessions(self, line: str = "") -> Report:
        """List running cldpd containers (from any kernel) and this kernel's sessions.

        Containers are found through their Docker labels. Returns a Report of two
        Tables, ``"containers"`` and ``"sessions"``.
        """
        _parse(self.cldpd_sessions, line)
        notes = []
        try:
            found = self.dispatcher.running()
        except Exception as exc:
            if not isinstance(exc, CldpdError) and not _is_docker_error(exc):
                raise
            log_swallowed(logger, "listing cldpd containers failed")
            found = []
            notes.append(f"Docker did not answer: {one_line(str(exc))}")
        mine = self.sessions()
        here = {s.id for s in mine}
        container_rows = [
            (r.pod, r.container, r.status, r.session_id, r.started_at[:19],
             "yes" if r.keep_alive else "no", "yes" if r.session_id in here else "no")
            for r in found
        ]  # fmt: skip
        containers = Table(
            ("pod", "container", "status", "session", "started", "keepAlive", "this kernel"),
            container_rows,
            title="containers",
            notes=notes or ([] if found else ["No cldpd containers."]),
        )
        session_rows = [
            (s.id, s.pod_name, s.kind, s.state, "" if s.exit_code is None else s.exit_code,
             s.transcript_error or s.transcript)
            for s in mine
        ]  # fmt: skip
        sessions = Table(
            ("session", "pod", "kind", "state", "exit code", "transcript"),
            session_rows,
            title="sessions",
            notes=[] if mine else ["No sessions in this kernel yet."],
        )
        return Report(containers, sessions)

    @magic_arguments()
    @line_magic
    def cldpd_picker(self, line: str = "") -> None:
        """Show the pod picker: choose a pod, give an issue URL or a prompt, watch it run."""
        _parse(self.cldpd_picker, line)
        try:
            from .widgets import PodPicker
        except Exception as exc:
            log_swallowed(logger, "importing the pod picker failed")
            raise UsageError(
                f"The pod picker cannot be loaded ({one_line(str(exc))}); it needs "
                "ipywidgets >= 8.1 in this kernel."
            ) from None
        dispatcher = self.dispatcher
        with user_errors():
            picker = PodPicker(
                pods_dir=dispatcher.pods_dir,
                dispatcher=dispatcher,
                max_lines=self.max_output_lines,
                interval=self.flush_interval,
                stop_timeout=self.stop_timeout,
            )
        display(picker)


_LOADED: weakref.WeakKeyDictionary[Any, tuple[CldpdMagics, Any, Any]] = weakref.WeakKeyDictionary()


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
    return None if value in _FOLLOWED_LIVE else value


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

    Loading again is harmless.
    """
    if ipython in _LOADED:
        return
    magics = CldpdMagics(shell=ipython)
    ipython.register_magics(magics)

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
    _LOADED[ipython] = (magics, cldpd_pod_matcher, hider)


def unload_ipython_extension(ipython: Any) -> None:
    """Undo :func:`load_ipython_extension` (``%unload_ext cldpd_magic``).

    The magics and the completer go. Running pods and their live cells are left
    running: they belong to Docker, and ``%cldpd_attach`` finds them again after a
    reload; stop them first with ``%cldpd_stop`` if they should end.
    """
    loaded = _LOADED.pop(ipython, None)
    if loaded is None:
        return
    magics, matcher, hider = loaded
    magics.log_level = ""  # its log handler goes with it
    if hider in ipython.ast_transformers:
        ipython.ast_transformers.remove(hider)
    manager = ipython.magics_manager
    for kind, table in magics.magics.items():
        for name in table:
            if getattr(manager.magics[kind].get(name), "__self__", None) is magics:
                del manager.magics[kind][name]
    if manager.registry.get(type(magics).__name__) is magics:
        del manager.registry[type(magics).__name__]
    completer = getattr(ipython, "Completer", None)
    if completer is not None and matcher in completer.custom_matchers:
        completer.custom_matchers.remove(matcher)
    if magics in getattr(ipython, "configurables", []):
        ipython.configurables.remove(magics)
    cleanup = getattr(ipython, "input_transformers_cleanup", None)
    if cleanup is not None and keep_question_marks in cleanup:
        cleanup.remove(keep_question_marks)


__all__ = [
    "POD_MAGICS",
    "ArgumentScan",
    "CldpdMagics",
    "load_ipython_extension",
    "parse_verbatim",
    "positional_names",
    "scan_arguments",
    "shown_result",
    "split_prompt",
    "unload_ipython_extension",
    "user_errors",
]
