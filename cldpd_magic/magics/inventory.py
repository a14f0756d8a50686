"""Inventory magics: what pods there are, what runs, a new pod, the picker, egress logs.

``%cldpd_pods``, ``%cldpd_sessions``, ``%cldpd_new``, ``%cldpd_picker`` and
``%cldpd_egress``, registered by ``%load_ext cldpd_magic`` beside the run magics; their
settings are :class:`~cldpd_magic.magics.CldpdMagics`'s traits.
"""

from __future__ import annotations

import logging
from typing import Any

from IPython.core.display_functions import display
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ..errors import CldpdError, one_line
from ..logs import log_swallowed
from ..pods import DEFAULT_TEMPLATE, create_pod, scan_pods, template_names, validate_pod_name
from ..render import Report, Table
from .support import MagicsCore, is_docker_error, parse_args, unquote, user_errors

logger = logging.getLogger(__package__)

#: Marks a pod whose pod.json waives a danger (``"unsafe"``), and each of its warnings.
UNSAFE_MARK = "\u26a0"


@magics_class
class InventoryMagics(Magics):
    """``%cldpd_pods``, ``%cldpd_sessions``, ``%cldpd_new``, ``%cldpd_picker``, ``%cldpd_egress``.

    Args:
        shell: The IPython shell.
        core: The settings and dispatchers (the :class:`~cldpd_magic.magics.CldpdMagics`).
        **kwargs: Passed to :class:`~IPython.core.magic.Magics`.
    """

    def __init__(self, shell: Any, core: MagicsCore, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.core = core

    @magic_arguments()
    @argument("run", help="a run (or pod) started in this kernel with a network allowlist")
    @line_magic
    def cldpd_egress(self, line: str) -> Table:
        """List the connections a run's egress proxy saw: allowed and blocked, in order.

        Only runs whose pod.json has ``"network": {"allow": [...]}`` have a proxy; blocked
        attempts are also EGRESS_BLOCKED events in the run's cell and transcript.
        """
        args = parse_args(self.cldpd_egress, line)
        with user_errors():
            validate_pod_name(args.run)
        for dispatcher in self.core.dispatchers():
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
        args = parse_args(self.cldpd_new, line)
        with user_errors():
            pods_dir = unquote(args.pods_dir or "") or self.core.pods_dir or None
            scaffold = create_pod(unquote(args.pod), args.template, pods_dir)
        option = f" --pods-dir {args.pods_dir}" if args.pods_dir else ""
        print(scaffold.text(f"%cldpd_start{option} {args.pod} ISSUE_URL"))

    @magic_arguments()
    @line_magic
    def cldpd_pods(self, line: str = "") -> Table:
        """List the pods: image, workdir, mounts, forwarded variables, template, running.

        Mount sources are shown resolved (through ``..`` and links). A pod whose pod.json
        waives a danger in ``"unsafe"`` is marked in an ``unsafe`` column, and each danger
        is said under the table. Broken pods are listed with what is wrong with them.
        Returns the Table (``.records()`` gives the rows as dictionaries).
        """
        parse_args(self.cldpd_pods, line)
        pods_dir = self.core.dispatcher.pods_dir
        notes = []
        try:
            running: set[str] | None = {
                r.pod for r in self.core.dispatcher.running() if r.status == "running"
            }
        except Exception as exc:
            if not isinstance(exc, CldpdError) and not is_docker_error(exc):
                raise
            log_swallowed(logger, "listing running pods failed")
            running = None
            notes.append(f"Docker did not answer, so running is unknown: {one_line(str(exc))}")
        rows = []
        for name, pod, error in scan_pods(pods_dir):
            state = "?" if running is None else ("running" if name in running else "no")
            if pod is None:
                rows.append((name, "", "", "", "", "", state, "", one_line(str(error))))
                continue
            config = pod.config
            mounts = ", ".join(
                f"{m.source}:{m.target}{':ro' if m.read_only else ''}" for m in config.mounts
            )
            unsafe = f"{UNSAFE_MARK} {', '.join(pod.unsafe)}" if pod.unsafe else ""
            notes.extend(f"{UNSAFE_MARK} {name}: {warning}" for warning in pod.unsafe_warnings)
            rows.append((
                name, pod.image, config.workdir or "(image default)", mounts,
                ", ".join(config.inherit_env), "yes" if pod.template else "no", state, unsafe, "",
            ))  # fmt: skip
        if not rows:
            notes.append(
                f"No pods in {pods_dir}: make one with %cldpd_new NAME (templates: "
                f"{', '.join(template_names())}); a pod is a directory with a Dockerfile."
            )
        columns = ("pod", "image", "workdir", "mounts", "forwards", "template", "running",
                   "unsafe", "problem")  # fmt: skip
        # The last two columns only when a pod has waivers or is broken.
        keep = [i for i, column in enumerate(columns)
                if column not in ("unsafe", "problem") or any(row[i] for row in rows)]  # fmt: skip
        return Table(
            [columns[i] for i in keep],
            [tuple(row[i] for i in keep) for row in rows],
            title=f"Pods in {pods_dir}",
            notes=notes,
        )

    @magic_arguments()
    @line_magic
    def cldpd_sessions(self, line: str = "") -> Report:
        """List running cldpd containers (from any kernel) and this kernel's sessions.

        Containers are found through their Docker labels. Returns a Report of two
        Tables, ``"containers"`` and ``"sessions"``.
        """
        parse_args(self.cldpd_sessions, line)
        notes = []
        try:
            found = self.core.dispatcher.running()
        except Exception as exc:
            if not isinstance(exc, CldpdError) and not is_docker_error(exc):
                raise
            log_swallowed(logger, "listing cldpd containers failed")
            found = []
            notes.append(f"Docker did not answer: {one_line(str(exc))}")
        mine = self.core.sessions()
        here = {s.id for s in mine}
        engines = any(r.engine for r in found)  # a column only when several are configured
        container_rows = [
            (r.pod, r.container, *((r.engine,) if engines else ()), r.status, r.session_id,
             r.started_at[:19], "yes" if r.keep_alive else "no",
             "yes" if r.session_id in here else "no")
            for r in found
        ]  # fmt: skip
        containers = Table(
            (
                "pod",
                "container",
                *(("engine",) if engines else ()),
                "status",
                "session",
                "started",
                "keepAlive",
                "this kernel",
            ),
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
        parse_args(self.cldpd_picker, line)
        try:
            from ..picker import PodPicker
        except Exception as exc:
            log_swallowed(logger, "importing the pod picker failed")
            raise UsageError(
                f"The pod picker cannot be loaded ({one_line(str(exc))}); it needs "
                "ipywidgets >= 8.1 in this kernel."
            ) from None
        dispatcher = self.core.dispatcher
        with user_errors():
            picker = PodPicker(
                pods_dir=dispatcher.pods_dir,
                dispatcher=dispatcher,
                max_lines=self.core.max_output_lines,
                interval=self.core.flush_interval,
                stop_timeout=self.core.stop_timeout,
            )
        display(picker)


__all__ = ["InventoryMagics"]
