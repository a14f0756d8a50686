"""The batch magic: ``%cldpd_batch`` and ``%%cldpd_batch``, many runs as one live table.

Registered by ``%load_ext cldpd_magic`` beside the run magics; its settings are
:class:`~cldpd_magic.magics.CldpdMagics`'s traits, and the feeds it shows go to that
instance's ``batch_feeds``.
"""

from __future__ import annotations

from typing import Any

from IPython.core.display_functions import display
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ..arguments import non_negative, parse_variant
from ..pods import validate_pod_name
from ..render import BatchFeed, ChangesBatchView
from ..runs import validate_issue_url
from .support import BACKGROUND, FOLLOWED_LIVE, MagicsCore, parse_args, unquote, user_errors
from .uievents import wait_until


@magics_class
class BatchMagics(Magics):
    """``%cldpd_batch`` and ``%%cldpd_batch``: pods on many issues, as a live table.

    Args:
        shell: The IPython shell.
        core: The settings and dispatchers (the :class:`~cldpd_magic.magics.CldpdMagics`).
        **kwargs: Passed to :class:`~IPython.core.magic.Magics`.
    """

    def __init__(self, shell: Any, core: MagicsCore, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.core = core

    @magic_arguments()
    @BACKGROUND
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
        "--budget", type=non_negative, metavar="USD",
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
        until the batch ends unless -b is given (or until every agent of an interactive
        pod waits for a prompt; the table shows what they wait to have approved and takes
        the answers meanwhile); interrupting the kernel stops the batch.
        ``batch.to_dataframe()`` gives the results.
        """
        args = parse_args(self.cldpd_batch, line)
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
            batch = self.core.dispatcher.dispatch(
                pods, issues, variants=variants, repeats=args.repeats,
                max_parallel=args.max_parallel, budget_usd=args.budget,
            )  # fmt: skip
        return self._follow_batch(batch, args.background)

    def _follow_batch(self, batch: Any, background: bool) -> Any:
        """Show a batch in this cell (widgets in a live frontend); block unless ``background``."""
        try:
            if self.core.live():
                from ..picker import BatchPanel  # ipywidgets loads only when it is used

                panel = BatchPanel(
                    batch, max_lines=self.core.max_output_lines, interval=self.core.flush_interval,
                    stop_timeout=self.core.stop_timeout,
                )  # fmt: skip
                display(panel)
                feed = panel.feed
            else:  # a terminal prints every update: there, show the end only
                view = ChangesBatchView(max_lines=self.core.max_output_lines)
                handle = display(view.bundle(), raw=True, display_id=True)
                feed = BatchFeed(batch, view, lambda _view: None)
            self.core.batch_feeds.append(feed)
        except KeyboardInterrupt:
            batch.stop()
            raise
        if background:
            return batch
        FOLLOWED_LIVE.add(batch)
        try:
            runs = list(batch.runs)
            wait_until(
                self.shell, feed.join, widgets=any(s.interactive for s in runs),
                settled=lambda: all(_settled(s) for s in batch.runs),
            )  # fmt: skip
        except KeyboardInterrupt:
            batch.stop()
            feed.join(30)
            raise UsageError("Interrupted: the batch stopped.") from None
        finally:
            if not self.core.live():
                handle.update(feed.view.bundle(), raw=True)
        return batch


def _settled(session: Any) -> bool:
    """Whether a batch's run needs no more waiting: ended, or its agent waits for a prompt."""
    conversation = session.conversation
    waiting = conversation is not None and conversation.waiting.is_set()
    return session.done or (session.owns_conversation and waiting)


__all__ = ["BatchMagics"]
