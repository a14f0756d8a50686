"""Approvals as lines: a tool call waiting for a person, and the answer it got.

The event data is JSON that cldpd wrote (see :class:`~cldpd_magic.events.EventType`), but
the tool, its input and the deny message come from the agent or a person: every value is
read defensively, masked and cleaned like any agent text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from ..events import Event, EventType
from .clean import _clip, clean_text
from .stream import Line, tool_call

#: How the decisions are said, by who made them.
_BY = {"user": "by you", "policy": "by the policy", "always": "always, this run"}


def _fields(data: str) -> Mapping[str, Any]:
    try:
        fields = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return fields if isinstance(fields, Mapping) else {}


def _text(value: Any, limit: int = 200) -> str:
    return _clip(value, limit) if isinstance(value, str) else ""


def approval_lines(event: Event, mask: Callable[[str], str]) -> list[Line]:
    """The line a PERMISSION_REQUEST or PERMISSION_DECISION event shows as; never raises."""
    fields = _fields(event.data)
    tool = _text(fields.get("tool"), 60) or "tool"
    if event.type is EventType.PERMISSION_REQUEST:
        call = tool_call(tool, fields.get("input"))
        return [Line("approval", mask(clean_text(f"⚠ approval needed: {call}")))]
    message = _text(fields.get("message"))
    by = _text(fields.get("by"), 20)
    if fields.get("allow") is True:
        how = "always, this run" if fields.get("always") is True else _BY.get(by, "")
        text = f"✓ allowed {tool}" + (f" ({how})" if how else "")
        return [Line("allowed", mask(clean_text(text)))]
    if by == "timeout":
        text = f"⏱ denied {tool}: {message or 'no answer in time'}"
    elif by == "cancelled":
        text = f"⊘ {tool}: the agent withdrew its request"
    else:
        text = f"⊘ denied {tool}" + (f": {message}" if message else "")
    return [Line("denied", mask(clean_text(text)))]
