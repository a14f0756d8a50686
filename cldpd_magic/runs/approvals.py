"""The questions of an interactive run: tool calls waiting for approval, and their answers.

Claude Code asks, for each tool call its settings do not allow, whether it may run
(``control_request`` ``can_use_tool``) and waits. Each question is a
:class:`PermissionRequest`, pending until a person (:meth:`Approvals.decide`), a policy
callable or the approval timeout answers it, or the CLI withdraws it; each question and
each answer is an event of the run (PERMISSION_REQUEST, PERMISSION_DECISION).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..errors import CldpdError, InvalidRequestError
from ..events import EventType
from ..logs import log_swallowed
from ..stream_json import CanUseTool

logger = logging.getLogger(__package__)

#: What a policy answers: allow or not, or that with the message the agent is told.
Decision = bool | tuple[bool, str]
#: ``Dispatcher(can_use_tool=...)``: decides a run's tool calls, ``(run, tool, input)``.
ToolPolicy = Callable[[str, str, Mapping[str, Any]], Decision]

#: Seconds a pending approval waits for an answer unless pod.json says otherwise.
DEFAULT_APPROVAL_TIMEOUT = 600.0


@dataclass(frozen=True)
class PermissionRequest:
    """A tool call the agent asks to run, waiting for an answer.

    Attributes:
        request_id: The CLI's id of the request; :meth:`Conversation.decide` takes it.
        tool: The tool's name (``Bash``, ``Write``, ...).
        input: The call's input as the agent wrote it (masked).
        suggestions: The CLI's suggested permission updates (masked).
        time: When it came (UTC).
        run: The run that asks.
    """

    request_id: str
    tool: str
    input: Mapping[str, Any]
    suggestions: tuple[Mapping[str, Any], ...] = ()
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    run: str = ""


def _decision(answer: Any) -> tuple[bool, str]:
    """A policy's answer as (allow, message); anything but a bool or a pair is a deny."""
    if isinstance(answer, bool):
        return answer, ""
    if isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], bool):
        return answer[0], str(answer[1])
    return False, "the approval policy gave no yes or no"


def deny_unattended(run: str, tool: str, tool_input: Mapping[str, Any]) -> Decision:
    """The policy of a run nobody watches (``cldpd`` without a terminal, a CLI batch).

    The pod's ``settings.json`` rules decide first (the CLI asks only for what they do not
    allow); what is asked anyway is denied, and the agent is told why.
    """
    return False, (
        f"cldpd: no one is here to approve {tool}; allow it in the pod's settings.json, "
        "or run the pod where a person can answer."
    )


class Approvals:
    """The pending questions of one run and how they are answered.

    Args:
        run: The run's name (what a policy and a PermissionRequest are told).
        send: Writes one control frame to the agent's stdin.
        emit: Records an event of the run, ``emit(event type, data)``.
        timeout: Seconds a question waits for an answer before it is denied.
        policy: Decides questions as they come.
    """

    def __init__(
        self,
        run: str,
        send: Callable[[Mapping[str, Any]], None],
        emit: Callable[[EventType, str], None],
        timeout: float = DEFAULT_APPROVAL_TIMEOUT,
        policy: ToolPolicy | None = None,
    ) -> None:
        self.run = run
        self._send = send
        self._emit = emit
        self.approval_timeout = timeout
        self.policy = policy
        self._lock = threading.Lock()
        self._pending: dict[str, PermissionRequest] = {}
        self._timers: dict[str, threading.Timer] = {}
        self._always: set[str] = set()

    @property
    def any(self) -> bool:
        """Whether a question waits for an answer."""
        with self._lock:
            return bool(self._pending)

    def pending(self) -> list[PermissionRequest]:
        """The questions waiting for an answer, oldest first."""
        with self._lock:
            return sorted(self._pending.values(), key=lambda r: r.time)

    def decide(
        self,
        request_id: str,
        *,
        allow: bool,
        message: str = "",
        always: bool = False,
        by: str = "user",
    ) -> None:
        """Answer a question: the tool call runs, or the agent is told ``message``.

        Args:
            request_id: A pending request's id.
            allow: Whether the call may run.
            message: What the agent is told when it may not.
            always: Allow this tool for the rest of the run without asking.
            by: Who decided (``user``, ``policy``, ``timeout``), for the record.

        Raises:
            InvalidRequestError: No such question is pending (answered, withdrawn or
                never asked).
        """
        with self._lock:
            request = self._pending.pop(request_id, None)
            timer = self._timers.pop(request_id, None)
            if request is not None and allow and always:
                self._always.add(request.tool)
        if timer is not None:
            timer.cancel()
        if request is None:
            raise InvalidRequestError(
                f"Run {self.run} has no pending approval {str(request_id)[:60]!r}; it was "
                "answered, withdrawn or timed out (see pending())."
            )
        answer: dict[str, Any] = {"behavior": "allow" if allow else "deny"}
        if allow and always:
            answer["updatedPermissions"] = [
                {
                    "type": "addRules",
                    "rules": [{"toolName": request.tool}],
                    "behavior": "allow",
                    # This run only: "localSettings" would write into the workdir.
                    "destination": "session",
                }
            ]
        if not allow:
            answer["message"] = message or "The user denied this tool call."
        self._emit_decision(request, allow, answer.get("message", ""), always, by)
        try:
            reply = {"subtype": "success", "request_id": request_id, "response": answer}
            self._send({"type": "control_response", "response": reply})
        except (CldpdError, OSError):
            log_swallowed(logger, f"answering an approval of run {self.run} failed")

    def _emit_decision(
        self, request: PermissionRequest, allow: bool, message: str, always: bool, by: str
    ) -> None:
        data = {"request_id": request.request_id, "tool": request.tool, "allow": allow,
                "message": message, "always": always, "by": by}  # fmt: skip
        self._emit(EventType.PERMISSION_DECISION, json.dumps(data, ensure_ascii=False))

    def asked(self, event: CanUseTool) -> None:
        """A question came: pending until answered; an always-allowed tool is allowed."""
        request = PermissionRequest(
            event.request_id, event.tool_name or "tool", dict(event.input or {}),
            tuple(event.permission_suggestions or ()), run=self.run,
        )  # fmt: skip
        with self._lock:
            always = request.tool in self._always
            if not always:
                self._pending[request.request_id] = request
        data = {"request_id": request.request_id, "tool": request.tool,
                "input": request.input, "suggestions": list(request.suggestions)}  # fmt: skip
        self._emit(EventType.PERMISSION_REQUEST, json.dumps(data, ensure_ascii=False, default=str))
        if always:
            with self._lock:
                self._pending[request.request_id] = request
            self.decide(request.request_id, allow=True, by="always")
            return
        if self.approval_timeout > 0:
            timer = threading.Timer(self.approval_timeout, self._timed_out, (request.request_id,))
            timer.daemon = True
            with self._lock:
                self._timers[request.request_id] = timer
            timer.start()
        if self.policy is not None:
            threading.Thread(
                target=self._ask_policy, args=(request,), daemon=True,
                name=f"cldpd-policy-{self.run}",
            ).start()  # fmt: skip

    def _ask_policy(self, request: PermissionRequest) -> None:
        try:
            allow, message = _decision(self.policy(self.run, request.tool, request.input))
        except Exception as exc:
            log_swallowed(logger, f"the approval policy of run {self.run} failed")
            allow, message = False, f"cldpd: the approval policy failed ({type(exc).__name__})."
        with contextlib.suppress(InvalidRequestError):  # answered meanwhile (a person, ...)
            self.decide(request.request_id, allow=allow, message=message, by="policy")

    def _timed_out(self, request_id: str) -> None:
        seconds = f"{self.approval_timeout:g}"
        with contextlib.suppress(InvalidRequestError):  # answered in the last moment
            self.decide(request_id, allow=False, by="timeout",
                        message=f"cldpd: no answer within {seconds} s; denied.")  # fmt: skip

    def withdrawn(self, request_id: str) -> None:
        """The CLI withdrew a question (or the agent ended): it is no longer pending."""
        with self._lock:
            request = self._pending.pop(request_id, None)
            timer = self._timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()
        if request is not None:
            self._emit_decision(request, False, "", False, "cancelled")

    def withdraw_all(self) -> None:
        """The agent ended: every question still pending is withdrawn."""
        with self._lock:
            pending = list(self._pending)
        for request_id in pending:
            self.withdrawn(request_id)
