"""What is secret and how it is masked: the one place that decides.

Secret values are the values of ``env`` keys that look secret (KEY, TOKEN, SECRET,
PASSWORD, PASSWD, CREDENTIAL) and every value forwarded from the host (``inheritEnv``).
A :class:`Masker` replaces them in text, whether written plainly or through the escapes
that a later decoding step would undo (JSON ``\\uXXXX``, ``\\/``, ``\\"``, surrogate pairs,
HTML character references), so what is displayed after decoding holds no secret either.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from html.entities import codepoint2name

MASK = "********"

#: Values shorter than this are not masked: they would mask ordinary text.
MIN_SECRET_LENGTH = 4

SECRET_KEY_RE = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)

_SHORT_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "\b": "b", "\f": "f", "\n": "n", "\r": "r",
                  "\t": "t"}  # fmt: skip


def looks_secret(name: str) -> bool:
    """Tell whether an environment variable name looks like it holds a secret."""
    return bool(SECRET_KEY_RE.search(name))


def forwarded_env(
    inherit_env: Iterable[str], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The host variables an ``inheritEnv`` list forwards: those set on the host.

    Args:
        inherit_env: Variable names.
        environ: The host environment; ``os.environ`` when None.

    Returns:
        Name to value, for every name that is set.
    """
    environ = os.environ if environ is None else environ
    return {n: environ[n] for n in inherit_env if n in environ}


def config_secrets(
    env: Mapping[str, str], inherit_env: Iterable[str], environ: Mapping[str, str] | None = None
) -> list[str]:
    """The secret values of a pod configuration.

    Args:
        env: The pod's ``env``: values of secret-looking keys are secret.
        inherit_env: The pod's ``inheritEnv``: every value forwarded from the host is secret.
        environ: The host environment; ``os.environ`` when None.

    Returns:
        The values (empty ones left out).
    """
    values = [v for k, v in env.items() if v and looks_secret(k)]
    return values + [v for v in forwarded_env(inherit_env, environ).values() if v]


def container_secrets(env: Mapping[str, str], forwarded: Iterable[str]) -> list[str]:
    """The secret values a container holds, from its own environment.

    A container may have been started by another process, whose forwarded values differ
    from this one's: what it was given is what must be masked.

    Args:
        env: The container's environment.
        forwarded: The names that were forwarded from the host when it started.

    Returns:
        The values of forwarded and of secret-looking variables.
    """
    names = set(forwarded)
    return [v for k, v in env.items() if v and (k in names or looks_secret(k))]


def _hex(code: int, width: int) -> str:
    """A regex matching ``code`` in hex, either case, zero-padded to ``width``."""
    return "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d for d in f"{code:0{width}x}")


def _char_forms(char: str) -> str:
    """A regex matching one character written plainly or as any escape that decodes to it.

    Any number of backslashes is allowed before an escape, so text escaped twice (JSON in
    a JSON string) is matched too; matching too much only masks more.
    """
    code = ord(char)
    forms = [re.escape(char)]
    if code > 0xFFFF:
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        forms.append(rf"\\+u{_hex(high, 4)}\\+u{_hex(low, 4)}")
    else:
        forms.append(rf"\\+u{_hex(code, 4)}")
    if char in _SHORT_ESCAPES:
        forms.append(r"\\+" + re.escape(_SHORT_ESCAPES[char]))
    forms.append(rf"&#0*{code};|&#[xX]0*{_hex(code, 1)};")
    if code in codepoint2name:
        forms.append(f"&{codepoint2name[code]};")
    return "(?:" + "|".join(forms) + ")"


#: What a terminal or a renderer drops between the characters of a value, raw or as a
#: JSON escape: escape sequences, control characters, ``\\r``. A value split by these
#: reads whole once shown, so it is masked with them.
_FILLER = (
    r"(?:\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
    r"|\\+u00[01][0-9a-fA-F](?:\[[0-?]*[ -/]*[@-~])?|\\+u00[89][0-9a-fA-F]|\\+u007[fF]"
    r"|\\+[rbf])*"
)
_RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class Masker:
    """Replaces secret values in text with a fixed mask.

    Plain values and their JSON-escaped forms are replaced everywhere. Text that holds an
    escape is also searched for a value written with escapes of any of its characters
    (``\\u0026``, ``\\/``, surrogate pairs, ``&#38;``, ``&amp;``), or split by terminal
    escape sequences and control characters (raw or escaped), so that decoding or showing
    the text (a JSON line, Markdown, a terminal) cannot reveal a value that escaped the
    plain search.

    Args:
        values: The secret values; empty values and values shorter than 4 characters
            (which would mask ordinary text) are ignored.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        kept = {v for v in values if v and len(v) >= MIN_SECRET_LENGTH}
        forms = kept | {json.dumps(v, ensure_ascii=a)[1:-1] for v in kept for a in (False, True)}
        self.values = sorted(forms, key=len, reverse=True)
        self._re = re.compile("|".join(map(re.escape, self.values))) if self.values else None
        ordered = sorted(kept, key=len, reverse=True)
        self._escaped_re = (
            re.compile("|".join(_FILLER.join(map(_char_forms, v)) for v in ordered))
            if kept
            else None
        )
        # Most lines hold only escapes that no secret needs (``\\n`` in every JSON line):
        # a quick search for the ones that matter spares the slow search on those.
        shorts = {_SHORT_ESCAPES[c] for v in kept for c in v if c in _SHORT_ESCAPES}
        self._may_hide = re.compile(
            r"&#|&[a-zA-Z]+;|\\u|\\[rbf]" + "".join(rf"|\\{re.escape(c)}" for c in sorted(shorts))
        )

    def __call__(self, text: str) -> str:
        """Return text with every secret value masked, in whatever encoding it appears."""
        if self._re is None or not text:
            return text
        text = self._re.sub(MASK, text)
        if (("\\" in text or "&" in text) and self._may_hide.search(text)) or _RAW_CONTROL.search(
            text
        ):
            text = self._escaped_re.sub(MASK, text)  # type: ignore[union-attr]
        return text

    def __bool__(self) -> bool:
        return self._re is not None


__all__ = [
    "MASK",
    "Masker",
    "config_secrets",
    "container_secrets",
    "forwarded_env",
    "looks_secret",
]
