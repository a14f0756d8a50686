"""Egress policies in pod.json: the ``network`` allowlist form and brokered ``credentials``.

Parsing only, with no engine and no protocol: pods.py reads a policy with it, and
egress.py (the proxy and broker that enforce it) builds on it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, PodConfigError


@dataclass(frozen=True)
class CredentialKind:
    """A kind of credential cldpd can broker.

    Attributes:
        key_env: The variable the agent reads the key from (it gets the placeholder).
        url_env: The variable the agent reads the API's base URL from (it gets the broker).
        header: The request header the broker sets to the real key.
        upstream: Where the broker forwards, unless the pod's env sets ``url_env``.
        methods: The HTTP methods the broker forwards.
        paths: The path prefixes the broker forwards; anything else is refused.
    """

    key_env: str
    url_env: str
    header: str
    upstream: str
    methods: tuple[str, ...] = ("GET", "POST", "DELETE")
    paths: tuple[str, ...] = ("/v1/",)


CREDENTIAL_KINDS = {
    "anthropic": CredentialKind(
        "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "x-api-key", "https://api.anthropic.com"
    ),
}

_HOST_RE = re.compile(
    r"(?:\*\.)?(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
_VARIABLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class AllowRule:
    """One allowlist entry: a host, or every host under a suffix, and a port.

    Attributes:
        host: ``example.com``, or ``*.example.com`` for it and every name under it.
        port: The one port allowed; None allows 80 and 443.
    """

    host: str
    port: int | None = None

    def __str__(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def squid(self) -> list[Any]:
        """The rule as the egress container reads it: ``[dstdomain, port or None]``."""
        host = "." + self.host[2:] if self.host.startswith("*.") else self.host
        return [host, self.port]


@dataclass(frozen=True)
class EgressPolicy:
    """A pod's egress allowlist (the allow form of pod.json's ``network``).

    Attributes:
        allow: The rules, in pod.json's order; empty allows nothing.
    """

    allow: tuple[AllowRule, ...] = ()

    @property
    def digest(self) -> str:
        """A short digest of the rules, the value of the ``cldpd.egress`` label."""
        canonical = json.dumps(sorted(str(rule) for rule in self.allow))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_allow_rule(path: Path, index: int, entry: Any) -> AllowRule:
    """Parse one allowlist entry: ``host``, ``*.suffix`` or either with ``:port``.

    Raises:
        PodConfigError: The entry is no host name (with an optional port).
    """
    where = f"{path}: network.allow[{index}]"
    if not isinstance(entry, str):
        raise PodConfigError(f"{where} must be a host name string such as 'github.com'.")
    no_host = PodConfigError(
        f"{where}: {entry[:80]!r} is no host name; write 'example.com', "
        "'*.example.com' (it and every name under it) or 'example.com:8443'."
    )
    if "/" in entry or "@" in entry:
        raise no_host
    host, colon, port_text = entry.strip().lower().rpartition(":")
    if not colon:
        host, port_text = port_text, ""
    port: int | None = None
    if colon:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise PodConfigError(
                f"{where}: {entry[:80]!r} has no valid port after ':'; give 1 to 65535, "
                "or no port for 80 and 443."
            )
        port = int(port_text)
    if not _is_ip(host) and (len(host) > 253 or not _HOST_RE.fullmatch(host)):
        raise no_host
    if host.startswith("*.") and "." not in host[2:]:
        raise PodConfigError(
            f"{where}: {entry[:80]!r} would allow a whole top-level domain; "
            "name a domain such as '*.example.com'."
        )
    return AllowRule(host, port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def parse_network_allow(path: Path, value: dict[str, Any]) -> EgressPolicy:
    """Parse the allow form of pod.json's ``network``: ``{"allow": [host, ...]}``.

    Raises:
        PodConfigError: Another key, no list, or an entry that is no host.
    """
    unknown = sorted(set(value) - {"allow"})
    if unknown or "allow" not in value:
        raise PodConfigError(
            f"{path}: 'network' as an object takes one key, 'allow', a list of hosts such "
            'as {"allow": ["github.com", "*.githubusercontent.com"]}.'
        )
    entries = value["allow"]
    if not isinstance(entries, list):
        raise PodConfigError(
            f"{path}: network.allow must be a list of host names, such as "
            '["api.anthropic.com", "*.githubusercontent.com"].'
        )
    rules = tuple(parse_allow_rule(path, i, entry) for i, entry in enumerate(entries))
    return EgressPolicy(tuple(dict.fromkeys(rules)))


def parse_credentials(path: Path, value: Any) -> tuple[tuple[str, str], ...]:
    """Parse pod.json's ``credentials``: ``{kind: host variable}``.

    Returns:
        ``(kind, variable)`` pairs in pod.json's order.

    Raises:
        PodConfigError: No object, an unknown kind, or no variable name.
    """
    if not isinstance(value, dict):
        raise PodConfigError(
            f"{path}: 'credentials' must be an object such as "
            '{"anthropic": "ANTHROPIC_API_KEY"}.'
        )
    pairs = []
    for kind, variable in value.items():
        if kind not in CREDENTIAL_KINDS:
            raise PodConfigError(
                f"{path}: credentials.{kind[:40]} is no kind cldpd can broker; "
                f"use one of {', '.join(CREDENTIAL_KINDS)}."
            )
        if not isinstance(variable, str) or not _VARIABLE_RE.fullmatch(variable):
            raise PodConfigError(
                f"{path}: credentials.{kind} must name a host environment variable, "
                "such as 'ANTHROPIC_API_KEY'."
            )
        pairs.append((kind, variable))
    return tuple(pairs)


def check_credentials(
    path: Path,
    credentials: tuple[tuple[str, str], ...],
    policy: EgressPolicy | None,
    env: dict[str, str],
    inherit_env: tuple[str, ...],
) -> None:
    """Refuse a pod.json whose credentials would still reach the container.

    Raises:
        PodConfigError: Credentials without an allowlist, or the key also forwarded.
    """
    if credentials and policy is None:
        raise PodConfigError(
            f"{path}: 'credentials' needs 'network' as an allowlist such as "
            '{"allow": []}, so that the forwarding endpoint is on the pod\'s own network.'
        )
    for kind, variable in credentials:
        key_env = CREDENTIAL_KINDS[kind].key_env
        if variable in inherit_env or key_env in env:
            raise PodConfigError(
                f"{path}: credentials.{kind} is brokered, so remove {variable} from "
                f"inheritEnv and {key_env} from env: the key must not enter the container."
            )


def brokered_credentials(
    pod_name: str, credentials: tuple[tuple[str, str], ...], env: dict[str, str]
) -> list[tuple[str, str, str]]:
    """Read a pod's brokered keys from the host: ``(kind, value, upstream)`` triples.

    The upstream is the pod's own ``env`` value of the kind's URL variable (a test
    server, a gateway), else the kind's public API.

    Raises:
        InvalidRequestError: A named host variable is not set.
    """
    brokered = []
    for kind, variable in credentials:
        value = os.environ.get(variable)
        if not value:
            raise InvalidRequestError(
                f"{variable} is not set on this host, and pod {pod_name} brokers it as its "
                f"{kind} credential; set it, then start the pod again."
            )
        spec = CREDENTIAL_KINDS[kind]
        brokered.append((kind, value, env.get(spec.url_env) or spec.upstream))
    return brokered
