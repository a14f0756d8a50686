"""The details pane's HTML: a pod's configuration, secrets masked, every value escaped."""

from __future__ import annotations

import contextlib
import html
import os
import shlex
from pathlib import Path

from ..render import clean_text
from ..secrets import MASK, looks_secret
from .state import PodControl, error_sentence, pod_masker

#: How many lines of a pod's template the details pane shows.
TEMPLATE_PREVIEW_LINES = 6


def pod_details_html(control: PodControl, pods_dir: str | os.PathLike[str]) -> str:
    """HTML describing a pod for the details pane: its configuration, secrets masked.

    A pod whose pod.json waives a danger (``"unsafe"``) shows each warning first; mount
    sources are shown resolved, as they reach Docker.

    Args:
        control: The pod's controller (a blank one when no pod is selected).
        pods_dir: The pods directory, named when there are no pods.

    Returns:
        The HTML; every value escaped and free of terminal escapes.
    """
    if not control.name:
        where = html.escape(display_path(pods_dir))
        return (
            f"<i>No pods in {where}. A pod is a directory there with a Dockerfile, "
            "and optionally pod.json and template.md.</i>"
        )
    name = html.escape(control.name)
    if control.pod is None:
        error = (
            html.escape(clean_text(error_sentence(control.error)))
            if control.error
            else "unknown error"
        )
        return f"<b>{name}</b> is broken: {error}"
    pod, config = control.pod, control.pod.config
    env = ", ".join(f"{k}={MASK if looks_secret(k) else v}" for k, v in sorted(config.env.items()))
    missing = [n for n in config.inherit_env if n not in os.environ]
    forwarded = ", ".join(
        n + (" (not set on this host)" if n in missing else "") for n in config.inherit_env
    )
    mounts = "; ".join(
        f"{m.source} → {m.target}" + (" (read-only)" if m.read_only else "") for m in config.mounts
    )
    template = pod.template.splitlines()
    preview = "\n".join(template[:TEMPLATE_PREVIEW_LINES])
    if len(template) > TEMPLATE_PREVIEW_LINES:
        preview += f"\n… (+{len(template) - TEMPLATE_PREVIEW_LINES} more lines)"
    rows = [
        *(("unsafe", f"\u26a0 {w}") for w in pod.unsafe_warnings),
        ("image", pod.image),
        ("directory", display_path(pod.dir)),
        ("workdir", config.workdir or "(image default)"),
        ("env", env or "none"),
        ("inheritEnv", forwarded or "none"),
        ("mounts", mounts or "none"),
        ("args", shlex.join(config.args) or "none"),
        ("keepAlive", "yes" if config.keep_alive else "no"),
    ]
    mask = pod_masker(pod)
    cells = "".join(
        f'<tr><th style="text-align:left;padding-right:1em">{key}</th>'
        f"<td>{html.escape(mask(clean_text(value)))}</td></tr>"
        for key, value in rows
    )
    template_html = (
        f'<pre style="margin:2px 0">{html.escape(mask(clean_text(preview)))}</pre>'
        if preview
        else "<i>none</i>"
    )
    return f"<b>{name}</b><table>{cells}</table><div><b>template.md</b>{template_html}</div>"


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as a person would write it: relative to the working directory when below it,
    else with ``~`` for the home directory."""
    path = Path(path)
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        with contextlib.suppress(ValueError):
            return prefix + str(path.relative_to(base))
    return str(path)
