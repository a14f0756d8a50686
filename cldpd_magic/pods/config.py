"""pod.json: every key read by its own parser, what no key may do alone checked after.

:func:`parse_pod_config` reads the text into a :class:`~.model.PodConfig`: JSON with no key
twice, each known key through its parser in :data:`POD_JSON_KEYS`, then what keys say
together (build args that look secret, credentials and their egress, the dangers
:func:`~.unsafe.check_unsafe` refuses unless waived).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import PodConfigError
from ..secrets import looks_secret
from .model import (
    CAPABILITIES,
    IMAGE_REFERENCE_RE,
    MAX_REPOSITORY_LENGTH,
    POD_NAME_RE,
    Mount,
    PodConfig,
    Resources,
    resolve_source,
)
from .policy import EgressPolicy, check_credentials, parse_credentials, parse_network_allow
from .unsafe import check_unsafe

#: Docker refuses a memory limit below 6 MiB.
MIN_MEMORY_BYTES = 6 * 1024 * 1024
#: Docker refuses a CPU limit below a hundredth of a CPU.
MIN_CPUS = 0.01
_MEMORY_RE = re.compile(r"(\d+(?:\.\d+)?) ?([kmgtp]?)i?b?", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


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


def _mounts(path: Path, key: str, value: Any) -> tuple[Mount, ...]:
    _expect(path, key, value, list, "a list of objects")
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


def _capabilities(path: Path, key: str, value: Any) -> tuple[str, ...]:
    names: list[str] = []
    for i, item in enumerate(_str_list(path, key, value)):
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


def _resources(path: Path, key: str, value: Any) -> Resources:
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


def _network(path: Path, key: str, value: Any) -> str | EgressPolicy:
    if isinstance(value, dict):
        return parse_network_allow(path, value)
    _expect(
        path, key, value, str,
        'a string (none, host, bridge or a network name) or {"allow": [hosts]}',
    )  # fmt: skip
    if not POD_NAME_RE.fullmatch(value):
        raise PodConfigError(
            f"{path}: 'network' must be none, host, bridge or the name of a Docker "
            f"network, got {value!r}."
        )
    return value


def _engine(path: Path, key: str, value: Any) -> str:
    engine = _expect(path, key, value, str, "a string")
    if not engine.strip() or any(c in engine for c in "\0\n\r"):
        raise PodConfigError(
            f"{path}: 'engine' must name a configured engine (its name or endpoint), "
            f"got {engine!r}."
        )
    return engine


def _workdir(path: Path, key: str, value: Any) -> str:
    workdir = _expect(path, key, value, str, "a string")
    if workdir and (not workdir.startswith("/") or "\0" in workdir):
        raise PodConfigError(
            f"{path}: 'workdir' must be an absolute path in the container, got {workdir!r}."
        )
    return workdir


def _image(path: Path, key: str, value: Any) -> str:
    return validate_image(path, _expect(path, key, value, str, "a string"))


def _flag(path: Path, key: str, value: Any) -> bool:
    return _expect(path, key, value, bool, "true or false")


def _credentials(path: Path, _key: str, value: Any) -> tuple[tuple[str, str], ...]:
    return parse_credentials(path, value)


#: Reads one pod.json key's value: ``(path, key, value) -> parsed``, or PodConfigError.
KeyParser = Callable[[Path, str, Any], Any]


def _cap(whole: bool, example: str) -> KeyParser:
    return functools.partial(_positive, whole=whole, example=example)


#: pod.json's keys, in the order error messages list them: the PodConfig field each
#: fills and its parser. ``network`` as ``{"allow": [...]}`` fills ``egress`` instead.
POD_JSON_KEYS: dict[str, tuple[str, KeyParser]] = {
    "image": ("image", _image),
    "env": ("env", _str_map),
    "buildArgs": ("build_args", _str_map),
    "workdir": ("workdir", _workdir),
    "inheritEnv": ("inherit_env", _str_list),
    "mounts": ("mounts", _mounts),
    "args": ("args", _str_list),
    "keepAlive": ("keep_alive", _flag),
    "network": ("network", _network),
    "resources": ("resources", _resources),
    "egressResources": ("egress_resources", _resources),
    "capAdd": ("cap_add", _capabilities),
    "readOnlyRoot": ("read_only_root", _flag),
    "credentials": ("credentials", _credentials),
    "engine": ("engine", _engine),
    "maxCostUsd": ("max_cost_usd", _cap(whole=False, example="2.5")),
    "maxTurns": ("max_turns", _cap(whole=True, example="30")),
    "timeoutSeconds": ("timeout_seconds", _cap(whole=False, example="1800")),
    "changesMaxBytes": ("changes_max_bytes", _cap(whole=True, example="20971520")),
    "interactive": ("interactive", _flag),
    "approvalTimeoutSeconds": ("approval_timeout_seconds", _cap(whole=False, example="600")),
    "idleTimeoutSeconds": ("idle_timeout_seconds", _cap(whole=False, example="1800")),
    "unsafe": ("unsafe", _str_list),
}


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


def _load_json(path: Path, text: str) -> Any:
    """The decoded pod.json, a key twice in one object refused."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
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


def _check_together(path: Path, values: dict[str, Any]) -> None:
    """Refuse what parsed keys say together: secret build args, egress limits, credentials."""
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
    data = _expect(path, "pod.json", _load_json(path, text), dict, "a JSON object")
    unknown = [k for k in data if k not in POD_JSON_KEYS]
    if unknown:
        raise PodConfigError(
            f"{path}: unknown key {unknown[0]!r}; expected one of {', '.join(POD_JSON_KEYS)}."
        )
    values: dict[str, Any] = {}
    for key, value in data.items():
        name, parse = POD_JSON_KEYS[key]
        parsed = parse(path, key, value)
        values["egress" if isinstance(parsed, EgressPolicy) else name] = parsed
    _check_together(path, values)
    written = tuple(item["source"] for item in data.get("mounts", ()))
    config = PodConfig(**values)
    unsafe, warnings = check_unsafe(path, config, config.unsafe, written)
    return replace(config, unsafe=unsafe, unsafe_warnings=warnings)
