"""Finding pods: a pod is a directory with a Dockerfile, an optional pod.json and template.md."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InvalidPodError, PodConfigError, PodNotFoundError
from .config import parse_pod_config
from .model import POD_NAME_RE, Pod, validate_pod_name

#: The largest pod.json or template.md read; anything larger is no pod file.
MAX_POD_FILE_BYTES = 8 << 20


def _read_pod_file(path: Path, error: type[Exception]) -> str:
    """A pod file's text ("" when absent): regular files only, up to MAX_POD_FILE_BYTES.

    A FIFO, a device or a link to one would block or never end: such a file makes this
    pod broken, never the listing of every pod.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise error(f"{path} cannot be read: {exc.strerror or exc}.") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path} is not a regular file; make it one.")
    if info.st_size > MAX_POD_FILE_BYTES:
        raise error(f"{path} has {info.st_size:,} bytes; a pod file may have at most 8 MiB.")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(MAX_POD_FILE_BYTES + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path} cannot be read: {exc}.") from None


def _read_template(path: Path) -> str:
    text = _read_pod_file(path, InvalidPodError)
    return text.strip("\n") if text.strip() else ""


def discover_pod(pods_dir: str | os.PathLike[str], name: str) -> Pod:
    """Load one pod by name.

    Args:
        pods_dir: The pods directory.
        name: The pod's name (its directory name).

    Returns:
        The pod, with its parsed pod.json and template.

    Raises:
        InvalidPodError: The name is not a valid pod name, the directory has no
            Dockerfile, or template.md cannot be read.
        PodNotFoundError: There is no such pod directory.
        PodConfigError: pod.json is malformed.
    """
    validate_pod_name(name)
    root = Path(pods_dir).expanduser().resolve()
    pod_dir = root / name
    if not pod_dir.is_dir():
        raise PodNotFoundError(f"No pod named {name!r} in {root}.")
    dockerfile = pod_dir / "Dockerfile"
    if not dockerfile.is_file():
        raise InvalidPodError(f"Pod {name!r} has no Dockerfile in {pod_dir}.")
    config_path = pod_dir / "pod.json"
    config = parse_pod_config(config_path, _read_pod_file(config_path, PodConfigError))
    template = _read_template(pod_dir / "template.md")
    lower = name.lower()
    case_twin = name != lower and any(
        entry.name != name and entry.name.lower() == lower for entry in root.iterdir()
    )
    return Pod(name=name, dir=pod_dir, dockerfile=dockerfile, config=config, template=template,
               case_twin=case_twin)  # fmt: skip


def discover_all(pods_dir: str | os.PathLike[str]) -> list[Pod]:
    """Load every valid pod in a directory, sorted by name.

    Entries that are not directories, or directories without a Dockerfile, are skipped;
    a pod whose pod.json is broken raises (use :func:`scan_pods` to list broken pods too).

    Args:
        pods_dir: The pods directory.

    Returns:
        The pods, sorted by name; empty when the directory does not exist.
    """
    pods = []
    for _name, pod, error in scan_pods(pods_dir):
        if error is not None:
            raise error
        if pod is not None:
            pods.append(pod)
    return pods


def scan_pods(
    pods_dir: str | os.PathLike[str],
) -> list[tuple[str, Pod | None, Exception | None]]:
    """List every pod directory with either its Pod or the error that makes it broken.

    Directories without a Dockerfile, and names of other characters than a pod name's,
    are left out; a name that Docker would refuse (``x-``, too long) is a broken pod.

    Args:
        pods_dir: The pods directory.

    Returns:
        ``(name, pod, error)`` triples sorted by name; exactly one of pod and error is set.
    """
    root = Path(pods_dir).expanduser()
    if not root.is_dir():
        return []
    found: list[tuple[str, Pod | None, Exception | None]] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.is_dir() or not (entry / "Dockerfile").is_file():
            continue
        if not POD_NAME_RE.fullmatch(entry.name):
            continue
        try:
            found.append((entry.name, discover_pod(root, entry.name), None))
        except (PodConfigError, InvalidPodError) as exc:
            found.append((entry.name, None, exc))
    return found
