"""Pod templates shipped with the package, and writing a new pod from one.

``cldpd init NAME`` and ``%cldpd_new NAME`` use :func:`create_pod`; what they print
comes from :meth:`Scaffold.text`, which reads what to edit next from the new pod's own
``pod.json`` and ``Dockerfile``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequestError, PodConfigError
from ..secrets import looks_secret
from .config import parse_pod_config
from .model import default_pods_dir, validate_pod_name

#: Where the templates are, inside the installed package.
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"
#: The template used when none is named.
DEFAULT_TEMPLATE = "minimal"

_ARG_RE = re.compile(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)


@dataclass(frozen=True)
class Template:
    """A pod template: a pod directory shipped with the package.

    Attributes:
        name: The template's name (its directory name).
        dir: Its directory.
        summary: What it is, from the first line of its README ("" without one).
    """

    name: str
    dir: Path
    summary: str = ""


def _summary(readme: Path) -> str:
    try:
        first = readme.read_text(encoding="utf-8").strip().splitlines()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return ""
    title = first.lstrip("#").strip()
    name, sep, rest = title.partition(": ")
    return rest if sep and name == readme.parent.name else title


def list_templates() -> list[Template]:
    """The pod templates shipped with the package, sorted by name.

    Returns:
        Every directory of the templates folder that holds a Dockerfile.
    """
    if not TEMPLATES_DIR.is_dir():
        return []
    return [
        Template(entry.name, entry, _summary(entry / "README.md"))
        for entry in sorted(TEMPLATES_DIR.iterdir(), key=lambda p: p.name)
        if entry.is_dir() and (entry / "Dockerfile").is_file()
    ]


def template_names() -> list[str]:
    """The names of the shipped templates, sorted."""
    return [t.name for t in list_templates()]


def get_template(name: str) -> Template:
    """Find a shipped template by name.

    Args:
        name: The template's name.

    Returns:
        The template.

    Raises:
        InvalidRequestError: No template has that name (the message lists the known ones).
    """
    for template in list_templates():
        if template.name == name:
            return template
    known = ", ".join(template_names()) or "none are installed"
    raise InvalidRequestError(f"No pod template named {name!r}; the templates are: {known}.")


@dataclass(frozen=True)
class Scaffold:
    """A pod just written from a template.

    Attributes:
        pod: The new pod's name.
        template: The template it was made from.
        dir: The new pod's directory.
        files: The files written, relative to ``dir``, sorted.
        next_steps: What to edit or set before starting it, one line each.
    """

    pod: str
    template: str
    dir: Path
    files: tuple[str, ...]
    next_steps: tuple[str, ...]

    def text(self, start_command: str = "") -> str:
        """What was written and what to do next, as lines for a terminal or a cell.

        Args:
            start_command: How to start the pod, shown last (e.g. ``cldpd start ...``).
        """
        lines = [
            f"Created pod {self.pod!r} from template {self.template!r} in {self.dir}:",
            "  " + ", ".join(self.files),
        ]
        if self.next_steps:
            lines.append("Edit next:")
            lines.extend(f"  - {step}" for step in self.next_steps)
        if start_command:
            lines.append(f"Then start it: {start_command}")
        return "\n".join(lines)


def _uid() -> int | None:
    getuid = getattr(os, "getuid", None)
    return getuid() if getuid is not None else None


def _build_arg_step(build_args: dict[str, str], dockerfile: Path) -> str:
    shown = []
    uid = _uid()
    for name, value in build_args.items():
        hint = ""
        if name.upper().endswith("UID") and uid and str(uid) != value:
            hint = f" (your uid here is {uid}: use it so files in mounts are yours)"
        shown.append(f"{name}={value}{hint}")
    try:
        declared = _ARG_RE.findall(dockerfile.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        declared = []
    others = [n for n in dict.fromkeys(declared) if n not in build_args]
    if not shown and not others:
        return ""
    text = "build args (pod.json buildArgs; never secrets): " + ", ".join(shown)
    if others:
        text += ("; the Dockerfile also takes " if shown else "the Dockerfile takes ") + ", ".join(
            others
        )
    return text


def _next_steps(pod_dir: Path) -> tuple[str, ...]:
    config_path = pod_dir / "pod.json"
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    config = parse_pod_config(config_path, text)
    raw = json.loads(text) if text.strip() else {}
    steps = []
    if config.inherit_env:
        unset = [n for n in config.inherit_env if not os.environ.get(n)]
        note = f" (not set here: {', '.join(unset)})" if unset else ""
        steps.append(
            "forwarded variables (pod.json inheritEnv): set "
            f"{', '.join(config.inherit_env)} where pods are started{note}"
        )
    if config.env:
        shown = ", ".join(f"{k}={'***' if looks_secret(k) else v}" for k, v in config.env.items())
        steps.append(f"environment (pod.json env): {shown}")
    if config.mounts:
        shown_mounts = []
        for written, mount in zip(raw.get("mounts", []), config.mounts, strict=False):
            missing = "" if Path(mount.source).exists() else ", missing on this machine"
            mode = "read-only" if mount.read_only else "read-write"
            shown_mounts.append(f"{written['source']} -> {mount.target} ({mode}{missing})")
        steps.append("mounts (pod.json mounts): " + "; ".join(shown_mounts))
    build_step = _build_arg_step(config.build_args, pod_dir / "Dockerfile")
    if build_step:
        steps.append(build_step)
    if config.args:
        steps.append(f"agent arguments (pod.json args): {' '.join(config.args)}")
    if config.network:
        steps.append(f"network (pod.json network): {config.network}")
    if (pod_dir / "template.md").is_file():
        steps.append("standing orders, put before the issue on start: template.md")
    if (pod_dir / "README.md").is_file():
        steps.append(f"more in {pod_dir / 'README.md'}")
    return tuple(steps)


def _files(root: Path) -> tuple[str, ...]:
    return tuple(sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()))


def create_pod(
    name: str,
    template: str = DEFAULT_TEMPLATE,
    pods_dir: str | os.PathLike[str] | None = None,
) -> Scaffold:
    """Write a new pod from a shipped template into a pods directory.

    Args:
        name: The new pod's name.
        template: The template to copy (:func:`template_names` lists them).
        pods_dir: The pods directory (made if missing); :func:`default_pods_dir` when None.

    Returns:
        What was written and what to edit next.

    Raises:
        InvalidPodError: ``name`` is not a valid pod name.
        InvalidRequestError: Unknown template, ``name`` exists in the pods directory, or
            the pods directory cannot be written (nothing is left half-written).
    """
    validate_pod_name(name)
    source = get_template(template)
    root = Path(pods_dir).expanduser() if pods_dir else default_pods_dir()
    target = root / name
    exists = InvalidRequestError(
        f"{target} already exists; choose another pod name, or remove it first."
    )
    if target.exists() or target.is_symlink():
        raise exists
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidRequestError(
            f"Cannot make the pods directory {root} ({exc.strerror or exc}); choose a "
            "directory you can write to (--pods-dir)."
        ) from None
    try:
        shutil.copytree(source.dir, target, ignore=shutil.ignore_patterns("__pycache__"))
    except FileExistsError:
        raise exists from None
    except OSError as exc:
        shutil.rmtree(target, ignore_errors=True)  # a half-written pod would look like a pod
        raise InvalidRequestError(
            f"Cannot write the pod into {root} ({exc.strerror or 'some files failed to copy'}); "
            "choose a directory you can write to (--pods-dir)."
        ) from None
    try:
        steps = _next_steps(target)
    except PodConfigError as exc:
        steps = (f"fix pod.json: {exc}",)
    return Scaffold(name, source.name, target, _files(target), steps)


__all__ = [
    "DEFAULT_TEMPLATE",
    "TEMPLATES_DIR",
    "Scaffold",
    "Template",
    "create_pod",
    "get_template",
    "list_templates",
    "template_names",
]
