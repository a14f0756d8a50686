"""Working with an agent while it runs: approvals, follow-up messages, interrupts.

An interactive run's Claude Code reads JSON lines on its stdin
(``--input-format stream-json --permission-prompt-tool stdio``): user messages and
control requests (``interrupt``, ``set_permission_mode``, ``set_model``); it asks on its
stdout whether a tool call may run (``control_request`` ``can_use_tool``) and waits for
the answer. One :class:`Conversation` per run holds its stdin and follows its output:
each question becomes a :class:`PermissionRequest`, pending until a person (the cell, the
picker, code), a policy callable or the approval timeout answers it; each answer is a
PERMISSION_DECISION event. When a turn is over and nothing more was sent, the agent's
stdin is closed so that it ends as a one-shot run does, unless the pod is kept alive:
then it waits for follow-ups until stopped, or for ``idleTimeoutSeconds``.

Everything the agent writes is hostile: a malformed or unknown frame never breaks the
run, and only JSON that cldpd made itself is ever written to the agent's stdin.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import uuid as _uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from ..errors import CldpdError, InvalidRequestError
from ..events import TERMINAL, Event, EventType
from ..logs import log_swallowed
from ..stream_json import (
    AssistantMessage,
    CanUseTool,
    ControlCancel,
    ControlRequest,
    ControlResponse,
    Result,
    SessionStateChanged,
    SystemInit,
    TextBlock,
    UserMessage,
    decode_line,
)
from .approvals import (
    DEFAULT_APPROVAL_TIMEOUT,
    Approvals,
    PermissionRequest,
    ToolPolicy,
)

logger = logging.getLogger(__package__)

#: Seconds cldpd waits for the CLI's answer to one of its control requests.
CONTROL_TIMEOUT = 30.0
#: Seconds after a result with no sign of another turn before the turn counts as the
#: last (a CLI that emits no session state events).
RESULT_GRACE = 1.5
#: Permission modes Claude Code takes at run time (``bypassPermissions`` only when the
#: CLI was started allowing it; the CLI says so).
PERMISSION_MODES = ("default", "acceptEdits", "plan", "dontAsk", "auto", "bypassPermissions")


class InputPipe(Protocol):
    """What a conversation writes to: a run's stdin (``engines.StdinPipe``)."""

    @property
    def closed(self) -> bool:
        """Whether the input was closed."""

    def write_line(self, text: str) -> None:
        """Send one line (a newline is added)."""

    def close(self) -> None:
        """End the input: the agent reads EOF once what was written is read."""


class _Waiter:
    """One control request of cldpd's, waiting for the CLI's answer."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: ControlResponse | None = None


class Conversation:
    """The stdin and the questions of one interactive run.

    Args:
        run: The run's name (what a policy and a PermissionRequest are told).
        pipe: The agent's stdin.
        keep_alive: Whether the pod is kept alive: its agent then waits for follow-ups
            after a turn instead of ending.
        approval_timeout: Seconds a question waits for an answer before it is denied.
        idle_timeout: Seconds a kept-alive agent waits for a follow-up before its input
            is closed (None: until stopped).
        policy: Decides questions as they come (``Dispatcher(can_use_tool=...)``).
    """

    def __init__(
        self,
        run: str,
        pipe: InputPipe,
        *,
        keep_alive: bool = False,
        approval_timeout: float | None = None,
        idle_timeout: float | None = None,
        policy: ToolPolicy | None = None,
    ) -> None:
        self.run = run
        self.pipe = pipe
        self.keep_alive = keep_alive
        self.idle_timeout = idle_timeout
        self._emit: Callable[[EventType, str], None] = lambda _etype, _data: None
        self.approvals = Approvals(
            run, self._write, lambda etype, data: self._emit(etype, data),
            DEFAULT_APPROVAL_TIMEOUT if approval_timeout is None else approval_timeout, policy,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._waiters: dict[str, _Waiter] = {}
        self._ids = itertools.count(1)
        self._activity = 0  # bumped by every sign of a turn: a check of idleness compares it
        self._idle_timer: threading.Timer | None = None
        self.ended = threading.Event()
        #: Set while a kept-alive agent's turn is over and it waits for a follow-up (a
        #: blocking cell returns then; the cell goes on showing what comes).
        self.waiting = threading.Event()

    # --- wiring --------------------------------------------------------------------------

    def attach(self, emit: Callable[[EventType, str], None]) -> None:
        """Record the run's events through ``emit(event type, data)`` (the start session's)."""
        self._emit = emit

    @property
    def live(self) -> bool:
        """Whether the agent still takes messages (its process runs, its input is open)."""
        return not self.ended.is_set() and not self.pipe.closed

    # --- writing -------------------------------------------------------------------------

    def _write(self, frame: Mapping[str, Any]) -> None:
        try:
            self.pipe.write_line(json.dumps(frame, ensure_ascii=False))
        except CldpdError:
            raise
        except OSError as exc:
            raise InvalidRequestError(
                f"The agent of run {self.run} no longer takes input ({type(exc).__name__}); "
                "resume the run once it has ended."
            ) from None

    def send_user(self, text: str, *, uuid: str | None = None) -> str:
        """Send a user message: the next turn, or queued behind the turn in flight.

        Args:
            text: The message.
            uuid: Its id (made when None); the CLI echoes it when the message's turn
                starts.

        Returns:
            The message's id.

        Raises:
            InvalidRequestError: The message is empty, or the agent takes no more input.
        """
        if not text or not text.strip():
            raise InvalidRequestError("The prompt is empty; say what the agent should do next.")
        self._check_live("send it a message")
        with self._lock:
            self._activity += 1
            self._cancel_idle()
            self.waiting.clear()
        message_id = uuid or str(_uuid.uuid4())
        self._write(
            {
                "type": "user",
                "message": {"role": "user", "content": text},
                "parent_tool_use_id": None,
                "session_id": "default",
                "uuid": message_id,
            }
        )
        return message_id

    def control(self, subtype: str, timeout: float = CONTROL_TIMEOUT, **fields: Any) -> Any:
        """Send a control request and wait for the CLI's answer.

        Returns:
            The answer's ``response`` object.

        Raises:
            InvalidRequestError: The agent takes no more input, refused the request (its
                reason, in one sentence) or did not answer in time.
        """
        self._check_live(subtype.replace("_", " "))
        request_id = f"cldpd-{next(self._ids)}-{os.urandom(4).hex()}"
        waiter = _Waiter()
        with self._lock:
            self._waiters[request_id] = waiter
        try:
            self._write(
                {
                    "type": "control_request",
                    "request_id": request_id,
                    "request": {"subtype": subtype, **fields},
                }
            )
            if not waiter.done.wait(timeout):
                raise InvalidRequestError(
                    f"The agent of run {self.run} did not answer {subtype} within "
                    f"{timeout:g} s; try again, or stop the run."
                )
        finally:
            with self._lock:
                self._waiters.pop(request_id, None)
        response = waiter.response
        if response is None:
            raise InvalidRequestError(
                f"The agent of run {self.run} ended before it answered {subtype}."
            )
        if not response.ok:
            reason = " ".join(str(response.error or "refused").split())[:300]
            raise InvalidRequestError(f"The agent of run {self.run} refused {subtype}: {reason}")
        return response.response

    def interrupt(self) -> None:
        """End the turn in flight; the agent then waits for the next message."""
        self.control("interrupt")

    def set_permission_mode(self, mode: str) -> None:
        """Change how the agent asks for approval from its next tool call on.

        Raises:
            InvalidRequestError: Not a mode Claude Code knows, or the CLI refused it.
        """
        if mode not in PERMISSION_MODES:
            raise InvalidRequestError(
                f"{str(mode)[:40]!r} is no permission mode; use one of "
                f"{', '.join(PERMISSION_MODES)}."
            )
        self.control("set_permission_mode", mode=mode)

    def set_model(self, name: str | None) -> None:
        """Change the model from the next turn on (None: the CLI's default)."""
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise InvalidRequestError("Name a model, such as 'sonnet' or 'claude-opus-5-5'.")
        self.control("set_model", model=name)

    def end_when_idle(self) -> None:
        """Close the agent's input once its turn is over, kept alive or not.

        For a front end that takes no follow-ups (the ``cldpd`` command, the blocking
        API): the agent then ends after its turn; a kept-alive pod's container stays.
        """
        with self._lock:
            self.keep_alive = False
            waiting = self.waiting.is_set()
        if waiting:
            self.close_input()

    def close_input(self) -> None:
        """Close the agent's stdin: it finishes what it was given, then ends."""
        with self._lock:
            self._cancel_idle()
        try:
            self.pipe.close()
        except (CldpdError, OSError):
            log_swallowed(logger, f"closing the input of run {self.run} failed")

    def _check_live(self, doing: str) -> None:
        if not self.live:
            raise InvalidRequestError(
                f"The agent of run {self.run} has ended, so it cannot {doing} now; "
                "resume the run to start it again."
            )

    # --- approvals -----------------------------------------------------------------------

    @property
    def policy(self) -> ToolPolicy | None:
        """Decides questions as they come (None: they wait for a person or their timeout)."""
        return self.approvals.policy

    @policy.setter
    def policy(self, policy: ToolPolicy | None) -> None:
        self.approvals.policy = policy

    def pending(self) -> list[PermissionRequest]:
        """The questions waiting for an answer, oldest first."""
        return self.approvals.pending()

    def decide(
        self, request_id: str, *, allow: bool, message: str = "", always: bool = False
    ) -> None:
        """Answer a pending question (see :meth:`Approvals.decide`)."""
        self.approvals.decide(request_id, allow=allow, message=message, always=always)

    # --- reading -------------------------------------------------------------------------

    def observe(self, lines: Sequence[str]) -> None:
        """Follow the agent's output lines (masked, after they are recorded); never raises."""
        for line in lines:
            try:
                event = decode_line(line)
                if event is not None:
                    self._on_event(event)
            except Exception:
                log_swallowed(logger, f"run {self.run}: an output line could not be followed")

    def _on_event(self, event: Any) -> None:
        if isinstance(event, ControlRequest) and not event.request_id:
            return  # no id to answer to: nothing waits for an answer it could get
        if isinstance(event, CanUseTool):
            self.approvals.asked(event)
        elif isinstance(event, ControlRequest):
            self._unsupported(event)
        elif isinstance(event, ControlResponse):
            with self._lock:
                waiter = self._waiters.get(event.request_id)
            if waiter is not None:  # else an echo of our own answer, or not ours
                waiter.response = event
                waiter.done.set()
        elif isinstance(event, ControlCancel):
            self.approvals.withdrawn(event.request_id)
        elif isinstance(event, SessionStateChanged):
            if event.state == "idle":
                self._turn_over(checked=True)
            else:
                self._busy()
        elif isinstance(event, Result):
            self._turn_over(checked=False)
        elif isinstance(event, SystemInit | AssistantMessage):
            self._busy()

    def _unsupported(self, event: ControlRequest) -> None:
        """Answer a question cldpd cannot (a hook, an MCP message: nothing registers those
        here) with an error, as the SDK does, so the agent never waits for it."""
        reply = {
            "subtype": "error",
            "request_id": event.request_id,
            "error": f"cldpd answers no {event.subtype[:60] or 'such'} request",
        }
        try:
            self._write({"type": "control_response", "response": reply})
        except (CldpdError, OSError):
            log_swallowed(logger, f"answering a request of run {self.run} failed")

    def _busy(self) -> None:
        with self._lock:
            self._activity += 1
            self._cancel_idle()
            self.waiting.clear()

    def _turn_over(self, *, checked: bool) -> None:
        """A turn ended: with nothing more to do, end the agent (or wait, kept alive)."""
        with self._lock:
            seen = self._activity
        if checked:
            self._idle(seen)
            return
        # No session state events (an older CLI): a queued message would have started
        # its turn (system/init) within moments; if none did, the agent is idle.
        timer = threading.Timer(RESULT_GRACE, self._idle, (seen,))
        timer.daemon = True
        timer.start()

    def _idle(self, seen: int) -> None:
        with self._lock:
            if seen != self._activity or self.approvals.any or self.ended.is_set():
                return
            if self.keep_alive:
                self._start_idle_timer()
                self.waiting.set()
                return
        self.close_input()

    def _start_idle_timer(self) -> None:
        """Under the lock: close a kept-alive agent's input after idleTimeoutSeconds."""
        self._cancel_idle()
        if self.idle_timeout is None:
            return
        self._idle_timer = threading.Timer(self.idle_timeout, self.close_input)
        self._idle_timer.daemon = True
        self._idle_timer.start()

    def _cancel_idle(self) -> None:
        """Under the lock: forget a pending idle close."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def finish(self) -> None:
        """The agent's process ended: questions still pending are withdrawn, waits end."""
        self.ended.set()
        self.waiting.clear()
        with self._lock:
            self._cancel_idle()
            waiters = list(self._waiters.values())
        self.approvals.withdraw_all()
        for waiter in waiters:
            waiter.done.set()


class Followed(Protocol):
    """What a follow-up follows: the session that runs the agent's process."""

    container: str

    @property
    def event_count(self) -> int:
        """How many events it has recorded."""

    def event_batches(self, start: int = 0) -> Iterator[list[Event]]:
        """Its events from ``start`` on, in batches, to its end."""


def follow_up(source: Followed, conversation: Conversation, prompt: str) -> Callable[..., int]:
    """The job of a follow-up sent to a live interactive run: the turn it causes.

    The prompt goes to the run's agent as a user message (queued by the CLI behind a turn
    in flight); the job shows the run's output from that moment to the end of the turn
    that took the message (the first result after the CLI echoed it), and ends 0, or 1
    when that result is an error. The run's own cell goes on showing everything. A stop
    of the follow-up interrupts that turn; the run stays.

    Args:
        source: The session running the agent's process.
        conversation: Its conversation.
        prompt: The message.
    """

    def job(ctl: Any) -> int:
        ctl.emit(EventType.CONTAINER_STARTED, source.container)
        mark = source.event_count
        ours = conversation.send_user(prompt)
        ctl.set_stopper(lambda _timeout: _interrupt_quietly(conversation))
        seen = False
        for batch in source.event_batches(mark):
            for event in batch:
                if event.type is EventType.OUTPUT:
                    ctl.stdout.write(event.data + "\n")
                    typed = decode_line(event.data)
                    if isinstance(typed, UserMessage) and typed.is_replay:
                        seen = seen or typed.uuid == ours or _text_of(typed) == prompt
                    elif isinstance(typed, Result) and seen:
                        return 1 if typed.is_error else 0
                elif event.type is EventType.STDERR:
                    ctl.stderr.write(event.data + "\n")
                elif event.type in (EventType.PERMISSION_REQUEST, EventType.PERMISSION_DECISION):
                    ctl.emit(event.type, event.data)
                elif event.type in TERMINAL:
                    return event.code if event.code is not None else 1
        return 0

    return job


def _text_of(message: UserMessage) -> str:
    blocks = message.blocks or ()
    return "".join(b.text for b in blocks if isinstance(b, TextBlock))


def _interrupt_quietly(conversation: Conversation) -> None:
    with contextlib.suppress(CldpdError):
        conversation.interrupt()
