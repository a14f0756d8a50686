"""The ``cldpd`` console command: start, resume, stop and list pods from a terminal."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from . import __version__
from .dispatcher import Dispatcher
from .errors import CldpdError
from .pods import default_pods_dir, scan_pods
from .render import render_output_line
from .scaffold import DEFAULT_TEMPLATE, create_pod, template_names
from .session import EventType, Session

EPILOG = """examples:
  cldpd init myrepo --template claude-code
  cldpd start myrepo --issue https://github.com/org/repo/issues/42
  cldpd resume myrepo --prompt "Focus on error handling"
  cldpd stop myrepo
  cldpd list
"""


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
            "--raw", action="store_true", help="print the agent's output lines verbatim"
        )
        command.add_argument(
            "-v", "--verbose", action="store_true", help="show the image build log"
        )
    stop = sub.add_parser("stop", help="stop a running pod gracefully")
    stop.add_argument("pod")
    stop.add_argument("--timeout", type=float, default=10.0, help="seconds before a kill")
    sub.add_parser("list", help="list pods and which of them are running")
    return parser


def _stream(
    session: Session, raw: bool, verbose: bool, out: TextIO, err: TextIO, seen: list[int]
) -> None:
    for index, event in enumerate(session.events()):
        if index < seen[0]:
            continue
        seen[0] = index + 1
        etype = event.type
        if etype is EventType.OUTPUT:
            if raw:
                out.write(event.data + "\n")
            else:
                for line in render_output_line(event.data):
                    out.write(line.text + "\n")
            out.flush()
        elif etype is EventType.STDERR:
            err.write(event.data + "\n")
        elif etype is EventType.BUILD_STARTED:
            err.write(f"cldpd: building image {event.data}\n")
        elif etype is EventType.BUILD_OUTPUT and (verbose or event.data.startswith("cldpd:")):
            err.write(event.data + "\n")
        elif etype is EventType.CONTAINER_STARTED:
            err.write(f"cldpd: {session.kind} running in container {event.data}\n")
        err.flush()


def _run(session: Session, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    seen = [0]
    try:
        try:
            _stream(session, args.raw, args.verbose, out, err, seen)
            return session.wait()
        except KeyboardInterrupt:
            err.write(f"\ncldpd: interrupted; stopping pod {session.pod_name} gracefully\n")
            err.flush()
            session.stop()
            _stream(session, args.raw, args.verbose, out, err, seen)
            return 130
    finally:
        err.write(f"cldpd: transcript: {session.transcript}\n")


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
    if len(rows) == 1:
        out.write(f"No pods in {dispatcher.pods_dir}: {_make_one_hint(dispatcher.pods_dir)}\n")
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
        The exit code: the agent's for start and resume, 1 for an error, 130 when
        interrupted.
    """
    args = build_parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    dispatcher = Dispatcher(args.pods_dir)
    try:
        if args.command == "init":
            return _init(args, out)
        if args.command == "start":
            return _run(dispatcher.start_session(args.pod, args.issue), args, out, err)
        if args.command == "resume":
            return _run(dispatcher.resume_session(args.pod, args.prompt), args, out, err)
        if args.command == "stop":
            dispatcher.stop(args.pod, args.timeout)
            err.write(f"cldpd: pod {args.pod} stopped\n")
            return 0
        return _list(dispatcher, out)
    except CldpdError as exc:
        err.write(f"cldpd: {exc}\n")
        return 1
    except KeyboardInterrupt:
        err.write("cldpd: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
