"""Pod discovery: a pod is a directory with a Dockerfile, an optional pod.json and template.md."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InvalidPodError, PodConfigError, PodNotFoundError
from ..secrets import config_secrets, looks_secret
from .policy import EgressPolicy, check_credentials, parse_credentials, parse_network_allow

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
#: Docker refuses a memory limit below 6 MiB.
MIN_MEMORY_BYTES = 6 * 1024 * 1024
#: Docker refuses a CPU limit below a hundredth of a CPU.
MIN_CPUS = 0.01
_MEMORY_RE = re.compile(r"(\d+(?:\.\d+)?) ?([kmgtp]?)i?b?", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


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
    unsafe: tuple[str, ...] = ()
    unsafe_warnings: tuple[str, ...] = ()


#: Docker's own network modes a pod may name; any other value names a network.
NETWORK_MODES = ("none", "host", "bridge")


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


def validate_image(path: Path, image: str) -> str:
    """Return ``image`` if it is a valid Docker image reference, else raise PodConfigError."""
    match = IMAGE_REFERENCE_RE.fullmatch(image)
    if match is None or len(match["name"]) > MAX_REPOSITORY_LENGTH:
        raise PodConfigError(
            f"{path}: 'image' must be a Docker image reference like 'name', 'name:tag' or "
            f"'registry/name:tag' (lower-case name, at most {MAX_REPOSITORY_LENGTH} "
            f"characters), got {image[:80]!r}."
        )
    return image


#: JSON's names for the Python types json.loads gives.
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "true or false",
               int: "a number", float: "a number", type(None): "null"}  # fmt: skip


def json_type(value: Any) -> str:
    """Name a decoded JSON value's type as JSON does (object, array, null, ...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _expect(path: Path, key: str, value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PodConfigError(f"{path}: {key!r} must be {what}, got {json_type(value)}.")
    return value


def _str_map(path: Path, key: str, value: Any) -> dict[str, str]:
    _expect(path, key, value, dict, "an object of strings")
    for k, v in value.items():
        if not isinstance(v, str):
            raise PodConfigError(f"{path}: {key}.{k} must be a string, got {json_type(v)}.")
    if key == "env":
        for k in value:
            if not k or "=" in k or "\0" in k:
                raise PodConfigError(
                    f"{path}: env key {k!r} is no variable name (empty, or with '=' or a NUL)."
                )
    return dict(value)


def _str_list(path: Path, key: str, value: Any) -> tuple[str, ...]:
    _expect(path, key, value, list, "a list of strings")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise PodConfigError(f"{path}: {key}[{i}] must be a string, got {json_type(v)}.")
    return tuple(value)


def _expand_source(path: Path, where: str, source: str) -> str:
    if source == "~" or source.startswith("~/"):
        source = str(Path.home()) + source[1:]
    if not os.path.isabs(source) or "\0" in source:
        raise PodConfigError(
            f"{path}: {where}.source must be an absolute path, '~' or '~/...', got {source!r}."
        )
    return source


def _normalized(source: str) -> str:
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
    return _normalized(source) if remote else os.path.realpath(source)


def _mounts(path: Path, value: Any) -> tuple[Mount, ...]:
    _expect(path, "mounts", value, list, "a list of objects")
    mounts = []
    for i, item in enumerate(value):
        where = f"mounts[{i}]"
        _expect(path, where, item, dict, "an object with source and target")
        unknown = set(item) - {"source", "target", "readOnly", "remote"}
        if unknown:
            raise PodConfigError(
                f"{path}: unknown key {sorted(unknown)[0]!r} in {where}; "
                "expected source, target, readOnly, remote."
            )
        for key in ("source", "target"):
            if key not in item:
                raise PodConfigError(f"{path}: {where} needs a {key!r}.")
            _expect(path, f"{where}.{key}", item[key], str, "a string")
        read_only = _expect(
            path, f"{where}.readOnly", item.get("readOnly", False), bool, "a boolean"
        )
        remote = _expect(path, f"{where}.remote", item.get("remote", False), bool, "a boolean")
        if not item["target"].startswith("/"):
            raise PodConfigError(
                f"{path}: {where}.target must be an absolute path in the container."
            )
        source = resolve_source(_expand_source(path, where, item["source"]), remote=remote)
        mounts.append(Mount(source, item["target"], read_only, remote))
    return tuple(mounts)


_CONFIG_KEYS = {
    "image": "image",
    "env": "env",
    "buildArgs": "build_args",
    "workdir": "workdir",
    "inheritEnv": "inherit_env",
    "mounts": "mounts",
    "args": "args",
    "keepAlive": "keep_alive",
    "network": "network",
    "resources": "resources",
    "egressResources": "egress_resources",
    "capAdd": "cap_add",
    "readOnlyRoot": "read_only_root",
    "credentials": "credentials",
    "engine": "engine",
    "maxCostUsd": "max_cost_usd",
    "maxTurns": "max_turns",
    "timeoutSeconds": "timeout_seconds",
    "unsafe": "unsafe",
}


def _positive(path: Path, key: str, value: Any, *, whole: bool, example: str) -> Any:
    """A pod.json cap: a positive number (a whole one when ``whole``)."""
    kind = int if whole else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or not math.isfinite(value)
        or value <= 0
    ):
        what = "a whole number above 0" if whole else "a number above 0"
        raise PodConfigError(
            f"{path}: {key!r} must be {what}, such as {example}, got {str(value)[:40]!r}."
        )
    return value if whole else float(value)


def _capabilities(path: Path, value: Any) -> tuple[str, ...]:
    names: list[str] = []
    for i, item in enumerate(_str_list(path, "capAdd", value)):
        name = item.upper().removeprefix("CAP_")
        if name == "ALL":
            raise PodConfigError(
                f"{path}: capAdd[{i}] is 'ALL', which would undo the capability drop; "
                "list the capabilities the pod needs, such as CHOWN or NET_BIND_SERVICE."
            )
        if name not in CAPABILITIES:
            raise PodConfigError(
                f"{path}: capAdd[{i}] {item[:40]!r} is not a Linux capability; use names "
                "like CHOWN, NET_ADMIN or CAP_NET_BIND_SERVICE."
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_memory(value: str | int) -> int | None:
    """Read a memory size as Docker does: bytes, or a number with b, k, m, g, t or p.

    Units are binary (``1k`` is 1024 bytes); ``kb``, ``KiB`` and ``K`` are the same.

    Args:
        value: An int of bytes or a string such as ``"512m"`` or ``"2g"``.

    Returns:
        The size in bytes, or None when the value is no size.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    match = _MEMORY_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        return None
    return int(float(match[1]) * _MEMORY_UNITS[match[2].lower()])


def _resources(path: Path, value: Any, key: str = "resources") -> Resources:
    _expect(path, key, value, dict, "an object with cpus, memory and pids")
    unknown = set(value) - {"cpus", "memory", "pids"}
    if unknown:
        raise PodConfigError(
            f"{path}: unknown key {sorted(unknown)[0]!r} in {key}; expected cpus, memory, pids."
        )
    # A key given as null is a bad value, not an absent one.
    missing = object()
    cpus = value.get("cpus", missing)
    if cpus is not missing and (
        isinstance(cpus, bool)
        or not isinstance(cpus, int | float)
        or not math.isfinite(cpus)
        or cpus < MIN_CPUS
    ):
        raise PodConfigError(
            f"{path}: {key}.cpus must be a number of CPUs of at least {MIN_CPUS}, "
            f"such as 1 or 1.5, got {str(cpus)[:40]!r}."
        )
    memory = value.get("memory", missing)
    if memory is not missing:
        size = parse_memory(memory)
        if size is None:
            raise PodConfigError(
                f"{path}: {key}.memory must be bytes or a size such as '512m' or '2g', "
                f"got {str(memory)[:40]!r}."
            )
        if size < MIN_MEMORY_BYTES:
            raise PodConfigError(
                f"{path}: {key}.memory {str(memory)[:40]!r} is below Docker's minimum "
                "of 6 MiB; give at least '6m' (an agent needs far more, such as '2g')."
            )
        memory = size
    pids = value.get("pids", missing)
    if pids is not missing and (isinstance(pids, bool) or not isinstance(pids, int) or pids < 1):
        raise PodConfigError(
            f"{path}: {key}.pids must be a whole number of processes of at least 1, "
            f"such as 256, got {str(pids)[:40]!r}."
        )
    return Resources(
        None if cpus is missing else float(cpus),
        None if memory is missing else memory,
        None if pids is missing else pids,
    )


def _network(path: Path, value: Any) -> str | EgressPolicy:
    if isinstance(value, dict):
        return parse_network_allow(path, value)
    _expect(
        path, "network", value, str,
        'a string (none, host, bridge or a network name) or {"allow": [hosts]}',
    )  # fmt: skip
    if not POD_NAME_RE.fullmatch(value):
        raise PodConfigError(
            f"{path}: 'network' must be none, host, bridge or the name of a Docker "
            f"network, got {value!r}."
        )
    return value


# -- dangerous pod.json: refused unless "unsafe" waives it ---------------------------------

#: Capabilities that open a way out of the container or into the host's kernel: what
#: each allows, and what that gives. pod.json adds one only with ``"cap:NAME"`` in
#: ``"unsafe"``. SYS_RAWIO and SYS_BOOT are here too: raw port I/O reaches the host's
#: hardware, and kexec_load a new kernel for the host wherever seccomp lets it through.
ESCAPE_CAPABILITIES: dict[str, tuple[str, str]] = {
    "SYS_ADMIN": ("mount and most kernel administration", "the usual way out of a container"),
    "SYS_PTRACE": ("tracing and rewriting other processes", "a way past seccomp on old kernels"),
    "SYS_MODULE": ("loading kernel modules", "code in the host's kernel"),
    "DAC_READ_SEARCH": ("open_by_handle_at", "any file of the host's filesystems"),
    "BPF": ("loading BPF programs", "code in the host's kernel"),
    "NET_ADMIN": ("changing routes, firewall rules and interfaces",
                  "a way around the pod's network limits"),
    "SYS_RAWIO": ("raw I/O ports and device memory", "the host's hardware"),
    "SYS_BOOT": ("reboot and kexec_load", "a new kernel for the host where seccomp allows it"),
}  # fmt: skip
#: Host directories that no mount may be, lie under or hold, unless "unsafe" waives it.
SYSTEM_DIRS = (
    "/etc", "/proc", "/sys", "/dev", "/boot", "/root", "/run", "/var/run", "/var/lib/docker",
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
)  # fmt: skip
#: Where the Docker socket usually is; ``$DOCKER_HOST``'s unix socket is added.
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
#: The forms of an ``"unsafe"`` entry.
UNSAFE_FORMS = '"cap:NAME", "network:host" or "mount:/path"'


@dataclass(frozen=True)
class _Danger:
    """One dangerous thing a pod.json does, and the waiver that would let it through."""

    lead: str  # the refusal's subject, such as 'capAdd[0] adds SYS_ADMIN'
    shown: str  # the warning's, such as 'adds SYS_ADMIN'
    name: str  # what it is or allows
    risk: str  # what that gives the pod
    entry: str  # the canonical waiver
    remedy: str = "remove it"
    joiner: str = ", "  # between lead and name in the refusal

    def refusal(self, path: Path) -> str:
        return (
            f"{path}: {self.lead}{self.joiner}{self.name} ({self.risk}); {self.remedy}, or "
            f'add "{self.entry}" to "unsafe" if the pod must have it.'
        )

    @property
    def warning(self) -> str:
        return f"unsafe: {self.shown} ({self.name}: {self.risk})"


def _is_under(path: str, base: str) -> bool:
    """``path`` is ``base`` or lies below it (both normalized, absolute)."""
    return path == base or path.startswith(base.rstrip("/") + "/")


def _docker_sockets(remote: bool) -> set[str]:
    sockets = set(DOCKER_SOCKETS)
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://") and os.path.isabs(host[7:]):
        sockets.add(_normalized(host[7:]))
    if not remote:
        sockets |= {os.path.realpath(s) for s in sockets}
    return sockets


def mount_danger(source: str, *, remote: bool = False) -> tuple[str, str] | None:
    """Say what a bind mount of ``source`` would give a pod, when that is dangerous.

    Dangerous: ``/``; the Docker socket, any unix socket or a device; a directory
    holding the Docker socket; a system directory (:data:`SYSTEM_DIRS`), anything in
    one or a directory holding one; ``/home`` and the user's home directory itself
    (their keys). The user's own files below their home are theirs to mount, even when
    the home is ``/root``. A remote source is judged on its path alone.

    Args:
        source: The mount's source as :func:`resolve_source` gives it.
        remote: The source is on a remote engine's host (not looked at).

    Returns:
        ``(what it is, what that gives the pod)``, or None when the mount is harmless.
    """
    if source == "/":
        return "the host's whole filesystem", "every file, /etc/shadow too"
    sockets = _docker_sockets(remote)
    if source in sockets:
        return "the Docker API", "root on the host"
    if not remote:
        try:
            mode = os.stat(source).st_mode
        except (OSError, ValueError):
            mode = 0
        if stat.S_ISSOCK(mode):
            return "a unix socket", "the API of a service of the host"
        if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
            return "a device of the host", "its raw contents"
    if any(_is_under(s, source) for s in sockets):
        return "a directory holding the Docker socket", "root on the host"
    home = os.path.realpath(Path.home())
    if source == "/home":
        return "every user's home directory", "their keys and ~/.ssh"
    if source == home:
        return "your home directory", "~/.ssh and your other keys"
    system = {*SYSTEM_DIRS, *(() if remote else (os.path.realpath(d) for d in SYSTEM_DIRS))}
    # The user's own files stay theirs to lend, when their home is /root too.
    mine = (
        home != "/"
        and _is_under(source, home)
        and not any(_is_under(home, d) for d in system if d != "/root")
    )
    for directory in sorted(system):
        if _is_under(source, directory) and not mine:
            where = "the" if source == directory else "a path in the"
            return f"{where} system directory {directory}", "the host's own files"
    for directory in sorted(system):
        if _is_under(directory, source):
            return f"a directory holding {directory}", "the host's own files"
    return None


def _dangers(config: PodConfig, written: Sequence[str]) -> list[_Danger]:
    """Every dangerous thing in a parsed pod.json, in the order of the file's keys."""
    dangers = []
    if config.network == "host":
        dangers.append(_Danger(
            "'network' is \"host\"", "shares the host's network", "the host's own network",
            "every service of the host and its loopback", "network:host",
            'use "bridge" or an allowlist',
        ))  # fmt: skip
    for i, cap in enumerate(config.cap_add):
        if cap in ESCAPE_CAPABILITIES:
            name, risk = ESCAPE_CAPABILITIES[cap]
            dangers.append(_Danger(f"capAdd[{i}] adds {cap}", f"adds {cap}", name, risk,
                                   f"cap:{cap}", joiner=", which allows "))  # fmt: skip
    for i, mount in enumerate(config.mounts):
        found = mount_danger(mount.source, remote=mount.remote)
        if found is None:
            continue
        given = written[i] if i < len(written) else mount.source
        aside = "" if given == mount.source else f" (written {given})"
        dangers.append(
            _Danger(f"mounts[{i}] mounts {mount.source}{aside}", f"mounts {mount.source}",
                    *found, f"mount:{mount.source}")
        )  # fmt: skip
    return dangers


def _waiver_keys(path: Path, i: int, entry: str) -> set[str]:
    """The canonical entries an ``"unsafe"`` entry may stand for.

    A mount's path is given both resolved and only normalized: its mount may be local
    (resolved) or remote (normalized), and a waiver may name the path as written.
    """
    kind, colon, rest = entry.partition(":")
    kind = kind.strip().lower()
    if colon and kind == "cap":
        cap = rest.strip().upper().removeprefix("CAP_")
        if cap in ESCAPE_CAPABILITIES:
            return {f"cap:{cap}"}
        if cap in CAPABILITIES:
            raise PodConfigError(
                f"{path}: unsafe[{i}] {entry[:80]!r} waives nothing, as {cap} needs no "
                "waiver; remove the entry."
            )
    elif colon and kind == "network" and rest.strip().lower() == "host":
        return {"network:host"}
    elif colon and kind == "mount":
        source = rest.strip()
        if source == "~" or source.startswith("~/"):
            source = str(Path.home()) + source[1:]
        if os.path.isabs(source) and "\0" not in source:
            return {f"mount:{resolve_source(source)}", f"mount:{_normalized(source)}"}
    raise PodConfigError(
        f"{path}: unsafe[{i}] {entry[:80]!r} is no waiver; write {UNSAFE_FORMS}, "
        "naming what this pod.json does on purpose."
    )


def check_unsafe(
    path: Path, config: PodConfig, unsafe: Sequence[str], written: Sequence[str] = ()
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Refuse a dangerous pod.json unless its ``"unsafe"`` list waives each danger.

    Dangerous: ``"network": "host"``; adding a capability of
    :data:`ESCAPE_CAPABILITIES`; a mount that :func:`mount_danger` names. SYS_ADMIN
    with a read-only mount or ``readOnlyRoot`` is refused whatever ``"unsafe"`` says:
    it could remount them writable. A waiver that matches nothing is refused too, so
    that none outlives what it was for.

    Args:
        path: The pod.json, named in messages.
        config: The parsed pod.json (its mount sources resolved).
        unsafe: Its ``"unsafe"`` entries as written.
        written: The mount sources as written, named when they resolve elsewhere.

    Returns:
        The waivers in canonical form, and one warning sentence per danger.

    Raises:
        PodConfigError: One sentence: what is dangerous, why, and the entry to add.
    """
    if "SYS_ADMIN" in config.cap_add:
        at = f"capAdd[{config.cap_add.index('SYS_ADMIN')}] SYS_ADMIN"
        for i, mount in enumerate(config.mounts):
            if mount.read_only:
                raise PodConfigError(
                    f"{path}: {at} would let the pod remount mounts[{i}] ({mount.source}, "
                    "read-only) writable; remove SYS_ADMIN or make that mount writable, as "
                    '"unsafe" cannot waive this.'
                )
        if config.read_only_root:
            raise PodConfigError(
                f"{path}: {at} would let the pod remount its read-only root filesystem "
                'writable; remove SYS_ADMIN or readOnlyRoot, as "unsafe" cannot waive this.'
            )
    waivers = [_waiver_keys(path, i, entry) for i, entry in enumerate(unsafe)]
    dangers = _dangers(config, written)
    for danger in dangers:
        if not any(danger.entry in keys for keys in waivers):
            raise PodConfigError(danger.refusal(path))
    entries = {d.entry for d in dangers}
    canonical: list[str] = []
    for i, keys in enumerate(waivers):
        matched = sorted(keys & entries)
        if not matched:
            raise PodConfigError(
                f"{path}: unsafe[{i}] {unsafe[i][:80]!r} matches nothing this pod.json does; "
                "remove it, so that no waiver outlives its reason."
            )
        if matched[0] in canonical:
            first = canonical.index(matched[0])
            raise PodConfigError(
                f"{path}: unsafe[{i}] {unsafe[i][:80]!r} repeats unsafe[{first}]; keep one."
            )
        canonical.append(matched[0])
    return tuple(canonical), tuple(dict.fromkeys(d.warning for d in dangers))


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def parse_pod_config(path: Path, text: str) -> PodConfig:
    """Parse the text of a pod.json file.

    Args:
        path: The file's path, named in error messages.
        text: Its contents.

    Returns:
        The parsed configuration.

    Raises:
        PodConfigError: Malformed JSON (with line and column), a key given twice, JSON
            nested too deeply, unknown keys, wrong types, an invalid image reference, a
            danger that ``"unsafe"`` does not waive or a waiver of nothing
            (:func:`check_unsafe`).
    """
    if not text.strip():
        return PodConfig()
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise PodConfigError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}."
        ) from None
    except _DuplicateKeyError as exc:
        raise PodConfigError(
            f"{path}: the key {exc.key!r} appears more than once in one object; keep one."
        ) from None
    except RecursionError:
        raise PodConfigError(
            f"{path}: the JSON is nested too deeply to read; "
            "a pod.json is at most three levels deep."
        ) from None
    _expect(path, "pod.json", data, dict, "a JSON object")
    unknown = [k for k in data if k not in _CONFIG_KEYS]
    if unknown:
        raise PodConfigError(
            f"{path}: unknown key {unknown[0]!r}; expected one of {', '.join(_CONFIG_KEYS)}."
        )
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "image":
            values["image"] = validate_image(path, _expect(path, key, value, str, "a string"))
        elif key == "workdir":
            values["workdir"] = _workdir(path, _expect(path, key, value, str, "a string"))
        elif key in ("env", "buildArgs"):
            values[_CONFIG_KEYS[key]] = _str_map(path, key, value)
        elif key in ("inheritEnv", "args", "unsafe"):
            values[_CONFIG_KEYS[key]] = _str_list(path, key, value)
        elif key == "mounts":
            values["mounts"] = _mounts(path, value)
        elif key == "network":
            network = _network(path, value)
            values["egress" if isinstance(network, EgressPolicy) else "network"] = network
        elif key == "credentials":
            values["credentials"] = parse_credentials(path, value)
        elif key in ("resources", "egressResources"):
            values[_CONFIG_KEYS[key]] = _resources(path, value, key)
        elif key == "capAdd":
            values["cap_add"] = _capabilities(path, value)
        elif key == "engine":
            values["engine"] = _engine(path, _expect(path, key, value, str, "a string"))
        elif key in ("maxCostUsd", "timeoutSeconds"):
            example = "2.5" if key == "maxCostUsd" else "1800"
            values[_CONFIG_KEYS[key]] = _positive(path, key, value, whole=False, example=example)
        elif key == "maxTurns":
            values["max_turns"] = _positive(path, key, value, whole=True, example="30")
        else:
            values[_CONFIG_KEYS[key]] = _expect(path, key, value, bool, "true or false")
    for name in values.get("build_args", {}):
        if looks_secret(name):
            raise PodConfigError(
                f"{path}: buildArgs.{name} looks like a secret, and build args stay in the "
                "image history; forward it at run time with inheritEnv instead."
            )
    if "egress_resources" in values and "egress" not in values:
        raise PodConfigError(
            f"{path}: 'egressResources' sets the limits of the egress proxy, which only a "
            "network allowlist has; give 'network' as {\"allow\": [...]}, or drop it."
        )
    check_credentials(
        path, values.get("credentials", ()), values.get("egress"),
        values.get("env", {}), values.get("inherit_env", ()),
    )  # fmt: skip
    written = tuple(item["source"] for item in data.get("mounts", ()))
    config = PodConfig(**values)
    unsafe, warnings = check_unsafe(path, config, config.unsafe, written)
    return replace(config, unsafe=unsafe, unsafe_warnings=warnings)


def _engine(path: Path, engine: str) -> str:
    if not engine.strip() or any(c in engine for c in "\0\n\r"):
        raise PodConfigError(
            f"{path}: 'engine' must name a configured engine (its name or endpoint), "
            f"got {engine!r}."
        )
    return engine


def _workdir(path: Path, workdir: str) -> str:
    if workdir and (not workdir.startswith("/") or "\0" in workdir):
        raise PodConfigError(
            f"{path}: 'workdir' must be an absolute path in the container, got {workdir!r}."
        )
    return workdir


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
