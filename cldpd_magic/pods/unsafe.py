"""Dangerous pod.json, refused unless its ``"unsafe"`` list waives each danger.

Dangerous: the host's network, capabilities that open a way out of the container, and
mounts of the host's own files, sockets and devices (:func:`mount_danger`).
:func:`check_unsafe` refuses them in one sentence naming the waiver to add, and turns the
waivers into their canonical form and a warning each.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import PodConfigError
from .model import CAPABILITIES, PodConfig, normalize_source, resolve_source

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
        sockets.add(normalize_source(host[7:]))
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
            return {f"mount:{resolve_source(source)}", f"mount:{normalize_source(source)}"}
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
