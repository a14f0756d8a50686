"""What confines a pod's container, read once from its RunOptions for every Docker engine.

:func:`container_settings` is the one reading of a :class:`RunOptions`: the bind mounts,
the capabilities (all dropped but ``cap_add``), a read-only root with the directories it
keeps writable (the working directory, the home directory, /tmp), the limits, no new
privileges, the network and its DNS, an init. A plain engine turns the settings into a
container's host config (``containers.py``), a swarm into a service's task template
(``swarm/services.py``); what a swarm's API cannot say is listed there.

Pure: no docker-py, no engine. The image's working directory, user and environment, which
decide what a read-only root keeps writable, come in as :class:`ImageFacts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..protocol import RunOptions

#: Every pod container runs with these: no process gains privileges (setuid, file caps).
SECURITY_OPT = ["no-new-privileges"]
#: The /tmp of a read-only root: exec allowed (tools run scripts from /tmp), no devices.
TMP_TMPFS_OPTIONS = "rw,exec,nosuid,nodev,mode=1777"
#: Label on the anonymous volumes that keep a read-only root's directories writable.
LABEL_VOLUME_OF = "cldpd.volume-of"


@dataclass(frozen=True)
class ImageFacts:
    """What an image says about the process it runs, as the engine's inspect gives it.

    Attributes:
        workdir: Its working directory ("" for none).
        user: Its user (``name``, ``uid`` or ``user:group``; "" for root).
        env: Its environment.
    """

    workdir: str = ""
    user: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ImageFacts:
        """Read an image inspect's ``Config``."""
        return cls(
            workdir=config.get("WorkingDir") or "",
            user=config.get("User") or "",
            env=dict(item.partition("=")[::2] for item in config.get("Env") or []),
        )


@dataclass(frozen=True)
class MountSpec:
    """One mount of a container.

    Attributes:
        kind: ``bind`` (a host path), ``volume`` (an anonymous volume, removed with the
            container) or ``tmpfs``.
        target: Where it is in the container.
        source: The host path of a bind mount ("" otherwise).
        read_only: Whether the container may not write it.
        labels: Labels of a volume.
        options: Mount options of a tmpfs (``rw,exec,...``).
    """

    kind: Literal["bind", "volume", "tmpfs"]
    target: str
    source: str = ""
    read_only: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    options: str = ""


@dataclass(frozen=True)
class ContainerSettings:
    """How a pod's container is confined, whatever the engine.

    Attributes:
        mounts: The pod's bind mounts, then what keeps a read-only root writable.
        cap_add: Capabilities kept.
        cap_drop: Capabilities dropped (all; ``cap_add`` gives some back).
        read_only_root: Whether the root filesystem is read-only.
        no_new_privileges: Whether no process may gain privileges (setuid, file caps).
        init: Whether an init runs as PID 1 (signals reach the agent, zombies are reaped).
        nano_cpus: CPU limit in billionths of a CPU (None: none).
        memory: Memory limit in bytes (None: none).
        memory_swap: Memory and swap limit in bytes: the memory limit, so no swap.
        pids: Process limit (None: none).
        network: Network mode or name ("" for the engine's default).
        dns: DNS servers (empty: the engine's default).
    """

    mounts: tuple[MountSpec, ...] = ()
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ("ALL",)
    read_only_root: bool = False
    no_new_privileges: bool = True
    init: bool = True
    nano_cpus: int | None = None
    memory: int | None = None
    memory_swap: int | None = None
    pids: int | None = None
    network: str = ""
    dns: tuple[str, ...] = ()


def is_under(path: str, parent: str) -> bool:
    """Whether ``path`` is ``parent`` or below it."""
    parent = parent.rstrip("/")
    return path == parent or path.startswith(parent + "/")


def home_of(user: str, env: Mapping[str, str]) -> str:
    """The home directory of an image's user, "" when it cannot be told without running it."""
    if env.get("HOME"):
        return env["HOME"]
    name = user.partition(":")[0]
    if name in ("", "root", "0"):
        return "/root"
    return "" if name.isdigit() else f"/home/{name}"


def writable_dirs(opts: RunOptions, image: ImageFacts | None) -> list[str]:
    """The working and home directories a read-only root keeps writable with volumes.

    Directories already under a mount or /tmp need none; neither does "/". Without
    ``image`` (the engine does not have it), only what ``opts`` says is known.
    """
    if image is None:
        candidates = [opts.workdir, opts.env.get("HOME", "")]
    else:
        candidates = [
            opts.workdir or image.workdir,
            home_of(image.user, {**image.env, **opts.env}),
        ]
    covered = ["/tmp", *(m.target for m in opts.mounts)]
    chosen: list[str] = []
    for path in sorted(p.rstrip("/") for p in candidates if p.startswith("/")):
        if path and not any(is_under(path, c) for c in covered + chosen):
            chosen.append(path)
    return chosen


def container_settings(
    opts: RunOptions, image: ImageFacts | None, *, exec_tmpfs: bool = True
) -> ContainerSettings:
    """The one reading of ``opts`` as a confined container.

    A read-only root keeps its working and home directories writable with anonymous
    volumes (not tmpfs: the image's files there are copied in, and they take disk rather
    than the container's memory limit), labelled :data:`LABEL_VOLUME_OF`, and /tmp with
    a tmpfs that allows exec (:data:`TMP_TMPFS_OPTIONS`), unless a mount covers it.

    Args:
        opts: What to run.
        image: The image's facts; None when the engine does not have the image.
        exec_tmpfs: Whether the engine can mount a tmpfs that allows exec; when it
            cannot (a swarm's service mounts), /tmp is a volume too, which allows exec
            and keeps the mode of the image's /tmp.
    """
    mounts = [MountSpec("bind", m.target, m.source, m.read_only) for m in opts.mounts]
    if opts.read_only_root:
        labels = {LABEL_VOLUME_OF: opts.name}
        mounts += [MountSpec("volume", path, labels=labels) for path in writable_dirs(opts, image)]
        if not any(is_under("/tmp", m.target) for m in opts.mounts):
            if exec_tmpfs:
                mounts.append(MountSpec("tmpfs", "/tmp", options=TMP_TMPFS_OPTIONS))
            else:
                mounts.append(MountSpec("volume", "/tmp", labels=labels))
    limits = opts.resources
    return ContainerSettings(
        mounts=tuple(mounts),
        cap_add=tuple(opts.cap_add),
        read_only_root=opts.read_only_root,
        nano_cpus=None if limits.cpus is None else round(limits.cpus * 1e9),
        memory=limits.memory,
        memory_swap=limits.memory,
        pids=limits.pids,
        network=opts.network,
        dns=tuple(opts.dns),
    )
