"""The engines setting: Docker endpoints, contexts and Swarm entries, parsed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

from ..errors import PodConfigError

#: The environment variable holding the engines setting (entries separated by commas).
ENGINES_ENV = "CLDPD_ENGINES"


#: The prefix of a Swarm entry, followed by the manager's endpoint.
SWARM_PREFIX = "swarm://"
#: The file names of a TLS directory, as ``DOCKER_CERT_PATH`` holds them.
TLS_FILES = ("ca.pem", "cert.pem", "key.pem")


#: The engines setting: entries (strings or dicts), one comma-separated string, or None.
EngineSetting = str | Sequence[str | Mapping[str, Any]] | None


@dataclass(frozen=True)
class Engine:
    """One configured engine.

    Attributes:
        name: What a pod's ``engine`` names and the inventory shows.
        url: The Docker endpoint (``unix://...``, ``tcp://host:port``, ``ssh://user@host``).
        tls: ``(ca, cert, key)`` file paths for a TLS endpoint, None without TLS.
        use_ssh_client: Reach an ``ssh://`` endpoint through the system's ``ssh`` command
            rather than paramiko (the ``ssh`` extra); both read ``~/.ssh``.
        swarm: The endpoint is a Swarm manager's: runs are services the swarm places.
        registry: For a swarm, the registry (``host[:port]``) its images are pushed to
            and its nodes pull from; "" builds each image on every node instead.
    """

    name: str
    url: str
    tls: tuple[str, str, str] | None = None
    use_ssh_client: bool = False
    swarm: bool = False
    registry: str = ""

    @property
    def remote(self) -> bool:
        """Whether the engine may run on another host (its bind mounts name that host's paths)."""
        if self.swarm:
            return True  # any node may run the pod
        parts = urlsplit(self.url)
        if parts.scheme in ("unix", "npipe"):
            return False
        host = (parts.hostname or "").lower()
        return not (host == "localhost" or host == "::1" or host.startswith("127."))


def docker_config_dir() -> Path:
    """The Docker CLI's configuration directory: ``$DOCKER_CONFIG`` or ``~/.docker``."""
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")


def _tls_dir(where: str, directory: str) -> tuple[str, str, str]:
    base = Path(directory).expanduser()
    files = tuple(str(base / name) for name in TLS_FILES)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise PodConfigError(
            f"Engine {where}: the TLS directory {base} lacks "
            f"{', '.join(map(os.path.basename, missing))}; "
            f"it must hold {', '.join(TLS_FILES)} (as DOCKER_CERT_PATH does)."
        )
    return files  # type: ignore[return-value]


def _context(name: str) -> Engine:
    """The engine of a Docker CLI context, from its metadata and TLS files."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    contexts = docker_config_dir() / "contexts"
    meta = contexts / "meta" / digest / "meta.json"
    if name == "default" and not meta.exists():
        url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        return Engine("default", url)
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
        endpoint = data["Endpoints"]["docker"]
        url = str(endpoint["Host"])
    except FileNotFoundError:
        raise PodConfigError(
            f"Engine {name!r} is neither an endpoint (unix://, tcp://, ssh://) nor a Docker "
            "context (docker context ls lists them); fix the engines setting."
        ) from None
    except (OSError, ValueError, KeyError, TypeError):
        raise PodConfigError(
            f"Docker context {name!r} has unreadable metadata ({meta}); "
            "recreate it with docker context create."
        ) from None
    tls_dir = contexts / "tls" / digest / "docker"
    tls = None
    if url.startswith("tcp://") and all((tls_dir / f).is_file() for f in TLS_FILES):
        tls = _tls_dir(name, str(tls_dir))
    return Engine(name, url, tls)


def parse_engine(entry: str | Mapping[str, Any]) -> Engine:
    """Read one engine entry.

    Forms: ``unix:///path``; ``tcp://host:port`` (plain) or ``tcp://host:port?tls=DIR``
    with ``DIR`` holding ca.pem, cert.pem and key.pem; ``ssh://user@host[:port]``
    (through paramiko, or the ``ssh`` command with ``?ssh=system``); a Docker context
    name; ``swarm://`` followed by any of these names a Swarm manager (runs become
    services the swarm places). ``?name=NAME`` names an endpoint (else its URL is its
    name). In Python, a
    dict ``{"url": ..., "name": ..., "tls": DIR or {"ca", "cert", "key"}}``.

    Args:
        entry: The entry.

    Returns:
        The engine.

    Raises:
        PodConfigError: The entry cannot be read; the message says why.
    """
    if isinstance(entry, Mapping):
        return _engine_from_mapping(entry)
    if not isinstance(entry, str) or not entry.strip():
        raise PodConfigError(f"An engine entry must be a non-empty string, got {entry!r}.")
    entry = entry.strip()
    if "://" not in entry:
        return _context(entry)
    if entry.startswith(SWARM_PREFIX):
        return _swarm(entry)
    parts = urlsplit(entry)
    if parts.scheme not in ("unix", "tcp", "ssh"):
        raise PodConfigError(
            f"Engine {entry}: unknown scheme {parts.scheme!r}; use unix://, tcp://, ssh:// "
            "or a Docker context name."
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"tls", "name", "ssh"}
    if unknown:
        raise PodConfigError(
            f"Engine {entry}: unknown option {sorted(unknown)[0]!r}; "
            "the options are tls, ssh and name."
        )
    use_ssh_client = query.get("ssh", ["paramiko"])[0] == "system"
    if "ssh" in query and (parts.scheme != "ssh" or query["ssh"][0] not in ("system", "paramiko")):
        raise PodConfigError(
            f"Engine {entry}: ssh= goes with ssh:// endpoints and is system or paramiko."
        )
    url = entry.partition("?")[0]
    name = (query.get("name") or [url])[0] or url
    tls = None
    if "tls" in query:
        if parts.scheme != "tcp":
            raise PodConfigError(f"Engine {entry}: tls= goes with tcp:// endpoints only.")
        tls = _tls_dir(name, query["tls"][0])
    return Engine(name, url, tls, use_ssh_client)


def _swarm(entry: str) -> Engine:
    """A ``swarm://`` entry: the manager's endpoint after the prefix, in any form above."""
    manager = entry[len(SWARM_PREFIX) :]
    if not manager or manager.startswith(SWARM_PREFIX):
        raise PodConfigError(
            f"Engine {entry}: a swarm entry names its manager's Docker endpoint, such as "
            "swarm://unix:///var/run/docker.sock or swarm://tcp://HOST:2376?tls=DIR."
        )
    url, _, query = manager.partition("?")
    options = parse_qsl(query, keep_blank_values=True)
    registry = [value for key, value in options if key == "registry"]
    if registry and not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]+)?", registry[-1]):
        raise PodConfigError(
            f"Engine {entry}: registry= names a registry as HOST or HOST:PORT, "
            f"got {registry[-1]!r}."
        )
    rest = urlencode([(key, value) for key, value in options if key != "registry"])
    engine = parse_engine(f"{url}?{rest}" if rest else url)
    name = engine.name if "name=" in manager else entry.partition("?")[0]
    return dataclasses.replace(
        engine, name=name, swarm=True, registry=registry[-1] if registry else ""
    )


def _engine_from_mapping(entry: Mapping[str, Any]) -> Engine:
    unknown = set(entry) - {"url", "name", "tls"}
    if unknown or not isinstance(entry.get("url"), str):
        raise PodConfigError(
            f"An engine dict takes url (a string), name and tls, got keys {sorted(entry)}."
        )
    base = parse_engine(entry["url"])
    name = str(entry.get("name") or base.name)
    tls = entry.get("tls")
    if isinstance(tls, str):
        return dataclasses.replace(base, name=name, tls=_tls_dir(name, tls))
    if isinstance(tls, Mapping):
        try:
            files = tuple(str(Path(tls[k]).expanduser()) for k in ("ca", "cert", "key"))
        except KeyError:
            raise PodConfigError(
                f"Engine {name}: tls must be a directory or a dict of ca, cert and key."
            ) from None
        return dataclasses.replace(base, name=name, tls=files)  # type: ignore[arg-type]
    return dataclasses.replace(base, name=name)


def parse_engines(value: EngineSetting) -> list[Engine]:
    """Read the engines setting: a list of entries, or one string of comma-separated entries.

    Args:
        value: The setting; None or empty means ``$CLDPD_ENGINES``, and none at all
            means no engines (the caller then uses the one Docker of DOCKER_HOST).

    Returns:
        The engines, the default first.

    Raises:
        PodConfigError: An entry cannot be read, or two entries share a name.
    """
    if not value:
        value = os.environ.get(ENGINES_ENV, "")
    entries = value.split(",") if isinstance(value, str) else list(value)
    engines = [parse_engine(e) for e in entries if not (isinstance(e, str) and not e.strip())]
    seen: set[str] = set()
    for engine in engines:
        if engine.name in seen:
            raise PodConfigError(
                f"Two engines are named {engine.name!r}; give one another name (?name=...)."
            )
        seen.add(engine.name)
    return engines


__all__ = [
    "ENGINES_ENV",
    "Engine",
    "EngineSetting",
    "parse_engine",
    "parse_engines",
]
