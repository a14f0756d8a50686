"""What a pod is: its name, image, mounts, limits and parsed pod.json (the model).

Parsing pod.json is :mod:`.config`'s, the dangers it may waive :mod:`.unsafe`'s, finding
pods in a directory :mod:`.discovery`'s.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidPodError
from ..secrets import config_secrets
from .policy import EgressPolicy

POD_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")

# The image reference grammar of Docker (distribution/reference): a repository is
# path components of lower-case letters and digits joined by '.', '_', '__' or dashes.
_ALNUM = r"[a-z0-9]+"
_PATH_COMPONENT = rf"{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,}"
IMAGE_REFERENCE_RE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::{_TAG})?(?:@{_DIGEST})?"
)
#: The engine counts a repository's length with its implicit ``docker.io/library/``
#: prefix, and refuses more than 255 characters: a bare name has 237.
MAX_REPOSITORY_LENGTH = 255 - len("docker.io/library/")
#: Image ``cldpd-<name>``, plus ``-<8 hex>`` for a name with capitals, within the limit.
MAX_POD_NAME_LENGTH = MAX_REPOSITORY_LENGTH - len("cldpd-") - 9
#: pod.json ``changesMaxBytes`` when absent: the largest patch of a run's changes kept
#: (beyond it, the list of changed files with their sizes).
DEFAULT_CHANGES_MAX_BYTES = 20 * 1024 * 1024
#: Seconds an interactive run's approval waits for an answer before it is denied.
DEFAULT_APPROVAL_TIMEOUT_SECONDS = 600.0


def default_pods_dir() -> Path:
    """Return the pods directory: ``$CLDPD_PODS_DIR`` when set, else ``~/.cldpd/pods``."""
    env = os.environ.get("CLDPD_PODS_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cldpd" / "pods"


@dataclass(frozen=True)
class Mount:
    """A bind mount from the host into the pod's container.

    Attributes:
        source: Absolute host path, resolved: ``~`` expanded, ``..`` and symbolic links
            followed (:func:`os.path.realpath`), so it names what the container gets.
            A remote mount's source is on the engine's host: it is only normalized.
        target: Absolute path in the container.
        read_only: Mount read-only.
        remote: The source exists on the engine's host, so the mount may go to a remote
            engine (``"remote": true`` in pod.json).
    """

    source: str
    target: str
    read_only: bool = False
    remote: bool = False


#: The capabilities of Linux 6.x (capability.h) that ``capAdd`` may name, without ``CAP_``.
CAPABILITIES = frozenset(
    [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ]
)


@dataclass(frozen=True)
class Resources:
    """Docker limits of a pod's container; None leaves a limit unset.

    Attributes:
        cpus: CPUs the container may use (``1.5`` is one and a half).
        memory: Memory limit in bytes; swap is not allowed beyond it.
        pids: Most processes and threads the container may have at once.
    """

    cpus: float | None = None
    memory: int | None = None
    pids: int | None = None


@dataclass(frozen=True)
class PodConfig:
    """The parsed ``pod.json`` of a pod; every key is optional.

    ``unsafe`` holds pod.json's waivers in their canonical form (``"cap:SYS_ADMIN"``,
    ``"network:host"``, ``"mount:<resolved source>"``), and ``unsafe_warnings`` one
    sentence per dangerous thing they let through (see :func:`check_unsafe`).
    """

    image: str = ""
    env: dict[str, str] = field(default_factory=dict)
    build_args: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    inherit_env: tuple[str, ...] = ()
    mounts: tuple[Mount, ...] = ()
    args: tuple[str, ...] = ()
    keep_alive: bool = False
    network: str = ""
    resources: Resources = field(default_factory=Resources)
    cap_add: tuple[str, ...] = ()
    read_only_root: bool = False
    egress: EgressPolicy | None = None
    egress_resources: Resources | None = None
    credentials: tuple[tuple[str, str], ...] = ()
    engine: str = ""
    max_cost_usd: float | None = None
    max_turns: int | None = None
    timeout_seconds: float | None = None
    changes_max_bytes: int = DEFAULT_CHANGES_MAX_BYTES
    interactive: bool = False
    approval_timeout_seconds: float = DEFAULT_APPROVAL_TIMEOUT_SECONDS
    idle_timeout_seconds: float | None = None
    unsafe: tuple[str, ...] = ()
    unsafe_warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pod:
    """A discovered pod.

    Attributes:
        name: The pod's name (its directory name).
        dir: Absolute path of the pod directory.
        dockerfile: Absolute path of its Dockerfile.
        config: Its parsed pod.json (defaults when absent).
        template: The standing orders from template.md ("" when absent or empty).
        case_twin: Another pod of the same pods directory has this name in other case
            (image names are lower case, so the two need distinct default images).
    """

    name: str
    dir: Path
    dockerfile: Path
    config: PodConfig
    template: str = ""
    case_twin: bool = False

    @property
    def image(self) -> str:
        """The image tag to build and run: ``config.image`` or :func:`default_image`."""
        return self.config.image or default_image(self.name, unique=self.case_twin)

    @property
    def container_name(self) -> str:
        """The name of the pod's container, ``cldpd-<name>``."""
        return container_name(self.name)

    def secret_values(self, environ: dict[str, str] | None = None) -> list[str]:
        """Values that must never be displayed: secret-looking env values, forwarded values.

        Args:
            environ: The host environment the inheritEnv values come from; ``os.environ``
                when None.
        """
        return config_secrets(self.config.env, self.config.inherit_env, environ)

    @property
    def unsafe(self) -> tuple[str, ...]:
        """The dangers pod.json waives on purpose (its ``"unsafe"`` list, canonical)."""
        return self.config.unsafe

    @property
    def unsafe_warnings(self) -> tuple[str, ...]:
        """One warning sentence per danger pod.json waives; empty for a pod without waivers.

        Such as ``"unsafe: mounts /run/docker.sock (the Docker API: root on the host)"``;
        shown wherever the pod is listed or run.
        """
        return self.config.unsafe_warnings


def container_name(pod_name: str) -> str:
    """Return the Docker container name used for a pod."""
    return f"cldpd-{pod_name}"


def default_image(pod_name: str, *, unique: bool = False) -> str:
    """The image a pod builds when its pod.json names none: ``cldpd-<name>`` lower-cased.

    Image names cannot hold capitals. With ``unique`` (another pod's name differs from
    this one only in case), a name that has capitals gets a suffix made from the name as
    written, so that the two pods never share an image.
    """
    image = f"cldpd-{pod_name}".lower()
    if unique and pod_name != pod_name.lower():
        image += "-" + hashlib.sha256(pod_name.encode()).hexdigest()[:8]
    return image


def pod_name_problem(name: str) -> str:
    """Say why ``name`` is not a usable pod name, or return "" when it is.

    A pod name is a directory name, a container name and (lower-cased) part of an image
    name, so it must satisfy the rules of all three.
    """
    if not isinstance(name, str) or not POD_NAME_RE.fullmatch(name):
        return (
            f"{name!r} is not a valid pod name: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit."
        )
    if len(name) > MAX_POD_NAME_LENGTH:
        return (
            f"The pod name {name[:20]}... has {len(name)} characters; Docker image names allow "
            f"pod names of at most {MAX_POD_NAME_LENGTH}: use a shorter name."
        )
    if not re.fullmatch(_PATH_COMPONENT, f"cldpd-{name}".lower()):
        return (
            f"{name!r} is not a valid pod name: Docker image names must end with a letter or "
            "digit, and '.', '_' or '__' may only stand between letters and digits."
        )
    return ""


def is_valid_pod_name(name: str) -> bool:
    """Tell whether ``name`` is a usable pod name (see :func:`pod_name_problem`)."""
    return not pod_name_problem(name)


def validate_pod_name(name: str) -> None:
    """Raise InvalidPodError unless ``name`` is a usable pod name.

    Args:
        name: The candidate pod name.

    Raises:
        InvalidPodError: If the name could escape the pods directory, is not a valid
            Docker name, or would make no valid image name.
    """
    problem = pod_name_problem(name)
    if problem:
        raise InvalidPodError(problem)


def normalize_source(source: str) -> str:
    """A path with ``.``, ``..`` and repeated slashes folded, links left alone."""
    normal = os.path.normpath(source)
    return "/" + normal.lstrip("/") if normal.startswith("//") else normal


def resolve_source(source: str, *, remote: bool = False) -> str:
    """The host path a bind mount of ``source`` gives the container.

    A local source is resolved through ``..`` and symbolic links (a missing part is
    kept as written, and Docker says so when the pod starts); a remote one is on the
    engine's host, where this machine cannot follow its links, so it is only normalized.

    Args:
        source: An absolute path.
        remote: The path is on a remote engine's host.
    """
    return normalize_source(source) if remote else os.path.realpath(source)
