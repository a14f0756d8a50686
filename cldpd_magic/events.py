"""What a run reports, below both runs/ and render/: its events, its states, its usage.

:class:`Event` and :class:`EventType` (one thing that happened), the run's state machine
(:data:`TRANSITIONS`, :class:`RunStatus`: the only place a state changes) and
:class:`Usage`. Plain values and one lock; no engine, no rendering.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec


class EventType(enum.Enum):
    """What an :class:`Event` reports."""

    BUILD_STARTED = "build_started"
    BUILD_OUTPUT = "build_output"
    BUILD_COMPLETE = "build_complete"
    CONTAINER_STARTED = "container_started"
    OUTPUT = "output"
    STDERR = "stderr"
    CONTAINER_EXITED = "container_exited"
    ERROR = "error"
    #: The egress proxy refused a connection; data is ``host:port``.
    EGRESS_BLOCKED = "egress_blocked"
    #: A tool call waits for a person's approval; data is JSON: ``request_id``, ``tool``,
    #: ``input``, ``suggestions``.
    PERMISSION_REQUEST = "permission_request"
    #: An approval was answered; data is JSON: ``request_id``, ``tool``, ``allow``,
    #: ``message``, ``always``, ``by`` (``user``, ``policy``, ``timeout``, ``cancelled``).
    PERMISSION_DECISION = "permission_decision"


TERMINAL = frozenset({EventType.CONTAINER_EXITED, EventType.ERROR})


def _now() -> datetime:
    return datetime.now(UTC)


# json.dumps builds an encoder per call when given options; the bare string encoder
# (C-accelerated) is what a transcript of millions of lines can afford.
_encode_str = json.encoder.encode_basestring  # type: ignore[attr-defined]
#: The same JSON of a string, as UTF-8 bytes, several times quicker; raises for a lone
#: surrogate (which no UTF-8 holds) and for a str subclass.
_encode_str_utf8 = msgspec.json.Encoder().encode


def encode_str_utf8(text: str) -> bytes:
    """``text``'s JSON string as :meth:`Event.to_json` writes it, in a transcript's UTF-8:
    a lone surrogate as its JSON escape, which reads back as the same string."""
    try:
        return _encode_str_utf8(text)
    except (UnicodeEncodeError, TypeError):
        return _encode_str(text).encode("utf-8", "backslashreplace")


class _EventFields(NamedTuple):
    type: EventType
    data: str
    code: int | None
    time: datetime


class Event(_EventFields):
    """One thing that happened in a session (an immutable tuple, cheap to make by the million).

    Attributes:
        type: What happened.
        data: A line of output, an image tag, a container name or an error message.
        code: The exit code, on CONTAINER_EXITED.
        time: When it happened (UTC).
    """

    __slots__ = ()

    def __new__(
        cls,
        type: EventType,
        data: str = "",
        code: int | None = None,
        time: datetime | None = None,
    ) -> Event:
        return tuple.__new__(cls, (type, data, code, time or _now()))

    def to_json(self) -> str:
        """Serialise as one JSON line of a transcript (without the newline)."""
        code = "null" if self.code is None else str(int(self.code))
        return (
            f'{{"type":"{self.type.value}","data":{_encode_str(self.data)},'
            f'"code":{code},"time":"{self.time.isoformat()}"}}'
        )

    @classmethod
    def from_json(cls, line: str) -> Event:
        """Read an event back from a transcript line."""
        raw = json.loads(line)
        return tuple.__new__(
            cls,
            (
                EventType(raw["type"]),
                raw["data"],
                raw["code"],
                datetime.fromisoformat(raw["time"]),
            ),
        )


class RunState(enum.StrEnum):
    """Where a run is; a ``str`` so that ``session.state == "exited"`` keeps working."""

    STARTING = "starting"
    BUILDING = "building"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def finished(self) -> bool:
        """Whether the run has ended (exited, failed or stopped)."""
        return not TRANSITIONS[self]


_S = RunState
#: The legal moves of a run, and the only place they are written down. A start goes
#: STARTING, BUILDING, STARTING (the container is being made), RUNNING; a resume or an
#: attach goes STARTING, RUNNING. Any unfinished run may fail, exit or be asked to stop;
#: a run asked to stop ends STOPPED, whatever its exit code.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    _S.STARTING: frozenset({_S.BUILDING, _S.RUNNING, _S.STOPPING, _S.EXITED, _S.FAILED}),
    _S.BUILDING: frozenset({_S.STARTING, _S.STOPPING, _S.EXITED, _S.FAILED}),
    _S.RUNNING: frozenset({_S.STOPPING, _S.EXITED, _S.FAILED}),
    _S.STOPPING: frozenset({_S.STOPPED}),
    _S.EXITED: frozenset(),
    _S.FAILED: frozenset(),
    _S.STOPPED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class RunSnapshot:
    """A run's state at one moment, read at once so that its fields agree.

    Attributes:
        state: Where the run is.
        exit_code: The agent's exit code, once known (-1 for a run stopped before it ran).
        detail: The image being built, the container running, or why the run failed
            (masked, not yet cleaned of terminal escapes).
        elapsed: Seconds the agent has been running (or ran); from the run's creation
            until its container starts.
        reason: Why cldpd stopped the run by itself (a :class:`StopReason` value), ""
            otherwise.
    """

    state: RunState
    exit_code: int | None
    detail: str
    elapsed: float
    reason: str = ""

    @property
    def finished(self) -> bool:
        """Whether the run has ended."""
        return self.state.finished


class RunStatus:
    """The state machine of one run: its state, and what came with it, under one lock.

    Every change goes through :meth:`move`, which allows only the moves in
    :data:`TRANSITIONS` and refuses (returns False for) the others, such as a stop asked
    for after the run exited. A :class:`Session` owns one; views read it.

    Whether a stop was asked for is decided here and nowhere else: the move to STOPPING
    sets :attr:`stop_requested`, which a job waits on and which its runner asks (through
    :meth:`SessionControl.guard`) before it creates or starts the run's container.

    Attributes:
        stop_requested: Set once the run has moved to STOPPING; never cleared.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = RunState.STARTING
        self._exit_code: int | None = None
        self._detail = ""
        self._since = time.monotonic()
        self._ended: float | None = None
        self._reason = ""
        self.stop_requested = threading.Event()

    @property
    def state(self) -> RunState:
        """Where the run is now."""
        return self._state

    @property
    def exit_code(self) -> int | None:
        """The exit code, once the run has ended with one."""
        return self._exit_code

    def snapshot(self) -> RunSnapshot:
        """The state, exit code, detail and elapsed time, read together."""
        with self._lock:
            end = self._ended if self._ended is not None else time.monotonic()
            return RunSnapshot(
                self._state, self._exit_code, self._detail, end - self._since, self._reason
            )

    @property
    def reason(self) -> str:
        """Why cldpd stopped the run by itself ("" when it did not)."""
        return self._reason

    def move(
        self, to: RunState, *, detail: str | None = None, exit_code: int | None = None
    ) -> bool:
        """Move to ``to`` if :data:`TRANSITIONS` allows it from the current state.

        Args:
            to: The new state.
            detail: Replaces the detail when given.
            exit_code: Recorded when given.

        Returns:
            Whether the move happened; a refused move changes nothing.
        """
        with self._lock:
            return self._move(to, detail, exit_code)

    def _move(self, to: RunState, detail: str | None, exit_code: int | None) -> bool:
        if to not in TRANSITIONS[self._state]:
            return False
        self._state = to
        if detail is not None:
            self._detail = detail
        if exit_code is not None:
            self._exit_code = exit_code
        if to is RunState.RUNNING:
            self._since = time.monotonic()
        elif to is RunState.STOPPING:
            self.stop_requested.set()
        elif to.finished:
            self._ended = time.monotonic()
        return True

    def request_stop(self, reason: str = "") -> bool:
        """Move an unfinished run to STOPPING; False when it has ended or is stopping.

        Args:
            reason: Why cldpd stops it by itself (a :class:`StopReason`), "" for a person.
        """
        with self._lock:
            moved = self._move(RunState.STOPPING, None, None)
            if moved and reason:
                self._reason = str(reason)
            return moved

    def finish(self, exit_code: int | None = None, error: str | None = None) -> RunState:
        """End the run: STOPPED if a stop was asked for, else FAILED on an error, else EXITED.

        Args:
            exit_code: The agent's exit code (None when it never ran or failed).
            error: Why the run failed, if it did.

        Returns:
            The final state (unchanged when the run had already ended).
        """
        with self._lock:
            if self._state is RunState.STOPPING:
                code = -1 if exit_code is None else exit_code
                self._move(RunState.STOPPED, None, code)
            elif error is not None:
                self._move(RunState.FAILED, error, exit_code)
            else:
                self._move(RunState.EXITED, None, exit_code)
            return self._state

    def on_event(self, event: Event, stopped: bool = False) -> None:
        """Follow an event of the run (for a run known only through its events).

        Args:
            event: The event.
            stopped: Whether a stop was asked for (a terminal event then ends STOPPED).
        """
        etype = event.type
        if etype is EventType.BUILD_STARTED:
            self.move(RunState.BUILDING, detail=event.data)
        elif etype is EventType.BUILD_COMPLETE:
            self.move(RunState.STARTING)
        elif etype is EventType.CONTAINER_STARTED:
            self.move(RunState.RUNNING, detail=event.data)
        elif etype in TERMINAL:
            if stopped:
                self.request_stop()
            if etype is EventType.ERROR:
                self.finish(error=event.data)
            else:
                self.finish(exit_code=event.code)


@dataclass(frozen=True, slots=True)
class Usage:
    """What a run has used so far.

    Attributes:
        turns: Model turns (the CLI's ``num_turns`` once a result says it).
        input_tokens: Input tokens not read from or written to the prompt cache.
        output_tokens: Output tokens.
        cache_read_tokens: Input tokens read from the prompt cache.
        cache_creation_tokens: Input tokens written to the prompt cache.
        cost_usd: Cost in US dollars (the CLI's figure at each result, estimated between).
    """

    turns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.turns + other.turns,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_creation_tokens + other.cache_creation_tokens,
            self.cost_usd + other.cost_usd,
        )

    def summary(self) -> str:
        """``3 turns · 12,345 tokens · $0.0123``: what a status line shows."""
        tokens = (
            self.input_tokens
            + self.output_tokens
            + self.cache_read_tokens
            + self.cache_creation_tokens
        )
        turns = f"{self.turns} turn{'' if self.turns == 1 else 's'}"
        return f"{turns} · {tokens:,} tokens · ${self.cost_usd:.4f}"


__all__ = [
    "TRANSITIONS",
    "Event",
    "EventType",
    "RunSnapshot",
    "RunState",
    "RunStatus",
    "Usage",
    "encode_str_utf8",
]
