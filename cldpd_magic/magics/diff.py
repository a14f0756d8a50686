"""The changes magic: ``%cldpd_diff``, what a run changed in its workdir, or runs compared.

Registered by ``%load_ext cldpd_magic`` beside the run magics; its settings are
:class:`~cldpd_magic.magics.CldpdMagics`'s traits. The changes come from a session of
this kernel, else from those saved beside the transcripts (a run of another process),
else from the run's container, captured now.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ..arguments import RUN_HELP
from ..errors import CldpdError
from ..pods import validate_pod_name
from ..render import diff as diff_view
from ..secrets import Masker
from .support import MagicsCore, parse_args, unquote, user_errors


@magics_class
class DiffMagics(Magics):
    """``%cldpd_diff``: a run's changes, one file of them, or several runs compared.

    Args:
        shell: The IPython shell.
        core: The settings and dispatchers (the :class:`~cldpd_magic.magics.CldpdMagics`).
        **kwargs: Passed to :class:`~IPython.core.magic.Magics`.
    """

    def __init__(self, shell: Any, core: MagicsCore, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.core = core

    @magic_arguments()
    @argument("runs", nargs="+", metavar="RUN", help=f"{RUN_HELP}; several to compare them")
    @argument("-f", "--file", metavar="PATH", help="one changed file's diff")
    @argument(
        "--capture", action="store_true",
        help="capture the changes again now (a run whose container still runs)",
    )  # fmt: skip
    @line_magic
    def cldpd_diff(self, line: str) -> diff_view.ChangesReport:
        """Show what a run changed in its workdir; with several runs, compare them.

        ``%cldpd_diff RUN`` lists the changed files, each collapsible over its highlighted
        diff; ``--file PATH`` shows one file's. ``%cldpd_diff RUN1 RUN2 ...`` (runs on one
        issue) shows a table of files by runs with each run's +/- and, for each file
        several runs changed, how their versions differ. The result's ``runs`` maps each
        run to its ``Changes`` (``apply``, ``push``, ``export``).
        """
        args = parse_args(self.cldpd_diff, line)
        names = [unquote(name) for name in args.runs]
        if len(set(names)) != len(names):
            raise UsageError("Name each run once; give two runs or more to compare them.")
        with user_errors():
            for name in names:
                validate_pod_name(name)
            found = {name: self._changes(name, args.capture) for name in names}
        path = unquote(args.file) if args.file else None
        if path is not None and not any(diff_view.touches(c, path) for c in found.values()):
            raise UsageError(f"No run named changed {path!r}; %cldpd_diff RUN lists its files.")
        masks = [s.mask for s in self.core.sessions() if s.run in names or s.id in names]
        values = [v for m in masks for v in m.values]
        return diff_view.ChangesReport(found, path, Masker(values) if values else None)

    def _changes(self, name: str, capture: bool) -> Any:
        """A run's changes from the first dispatcher that knows them."""
        error: CldpdError | None = None
        for dispatcher in [self.core.dispatcher, *self.core.dispatchers()]:
            try:
                return dispatcher.changes(name, capture=capture)
            except CldpdError as exc:
                error = error or exc
        assert error is not None
        raise error


__all__ = ["DiffMagics"]
