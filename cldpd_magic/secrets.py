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
#: Latin-1 that is no control character (tab and newline are none here): deleting these
#: bytes from text encoded as Latin-1 (the rest dropped) leaves its controls, C0 and C1;
#: quicker than the regex.
_LATIN1_NO_CONTROL = bytes(range(0x20, 0x7F)) + b"\t\n" + bytes(range(0xA0, 0x100))
#: An HTML character reference by name (``&amp;``), which a value may be written with.
_ENTITY = re.compile(r"&[a-zA-Z]+;")


def _has_control(text: str) -> bool:
    """Whether the text holds a control character other than tab and newline."""
    return bool(text.encode("latin-1", "ignore").translate(None, _LATIN1_NO_CONTROL))


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
        marks = "urbf" + "".join(sorted(shorts))
        self._escape = re.compile(r"\\[" + re.escape(marks) + "]")

    def _holds_value(self, text: str) -> bool:
        """Whether a value is in the text as it is (substring searches: far quicker than
        the regex, which runs only where one is found)."""
        return any(value in text for value in self.values)

    def _may_hide(self, text: str) -> bool:
        """Whether the text holds an escape that a value may be written with, or a control."""
        if "\\" in text and self._escape.search(text) is not None:
            return True
        if "&" in text and ("&#" in text or _ENTITY.search(text) is not None):
            return True
        return _has_control(text)

    def __call__(self, text: str) -> str:
        """Return text with every secret value masked, in whatever encoding it appears."""
        if self._re is None or not text:
            return text
        if self._holds_value(text):
            text = self._re.sub(MASK, text)
        if self._may_hide(text):
            text = self._escaped_re.sub(MASK, text)  # type: ignore[union-attr]
        return text

    def is_clean(self, text: str) -> bool:
        """Whether masking would leave ``text``, and each of its lines, as it is.

        One scan for many lines at once: a line holding a value (or a form of one) makes
        the whole text hold it, so True means that no line needs masking. False may also
        come for text that would only be masked across a line break: mask each line then.
        """
        return self._re is None or not text or not (self._holds_value(text) or self._may_hide(text))

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
