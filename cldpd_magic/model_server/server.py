"""A scripted Anthropic Messages API, to run the real Claude Code CLI without a model.

:class:`ScriptedModelServer` is a real HTTP server (a thread, on 127.0.0.1, any free
port by default) that answers ``POST /v1/messages`` the way the Anthropic API does,
streaming (server-sent events) or not, from a :class:`Scenario`: one :class:`Turn` per
request of the conversation. It accepts any API key and records every request, so a
test can assert what the CLI sent (the key, the earlier turns after a resume, the
model)::

    scenario = Scenario([
        Turn(tool_calls=[ToolCall("Bash", {"command": "echo hi > out.txt"})]),
        Turn(text="Wrote out.txt."),
    ])
    with ScriptedModelServer(scenario) as server:
        ...  # run claude with ANTHROPIC_BASE_URL=server.url
        server.conversation_requests()[1].body["messages"]  # holds the tool result

Scenario format (JSON, as loaded by :meth:`Scenario.from_json`; the Python classes take
the same names)::

    {
      "model": "claude-sonnet-4-5",        // optional: the model named in replies
      "turns": [
        {"text": "Let me look."},          // assistant text
        {"thinking": "Plan: ...",          // a thinking block (with a signature)
         "tool_calls": [                   // tool_use blocks; the turn then stops
           {"name": "Bash", "input": {"command": "ls"}},     // with stop_reason tool_use
           {"name": "Write", "input": {"file_path": "a.txt", "content": "x"}}]},
        {"delay": 5, "text": "slow"},      // seconds before the reply starts
        {"error": 529, "repeat": 3},       // an HTTP error with the API's JSON body,
                                           //   for 3 requests in a row
        {"error": 429, "retry_after": 0},  // retry-after header (seconds)
        {"error": 500, "message": "boom"}, // the error's message
        {"drop": true},                    // close the connection without an answer
        {"text": "part", "stream_error": 529},  // the stream starts, then an SSE error event
        {"text": "done", "usage": {"input_tokens": 900, "output_tokens": 40,
                                   "cache_read_input_tokens": 100}},
        {"text": "x", "stop_reason": "max_tokens"}
      ]
    }

Each request of the conversation takes the next turn (a turn with ``repeat: N`` serves
N requests); when the turns run out, the reply is the text ``Done.`` Errors the CLI
retries (429, 529, 500, a dropped connection) take turns too: script as many as the
retries to exhaust. Requests that are not the conversation do not take turns: the agent
loop always offers its tools, while side requests of the CLI (session titles, quota
probes, summaries) offer none; they get a short default text answer. Recorded from
Claude Code 2.1.332 in ``-p`` mode, with or without
``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC``: only ``POST /v1/messages?beta=true``,
streaming, with tools, one per model turn and per retry; nothing else reached the
server. ``POST /v1/messages/count_tokens`` answers an estimate; any other path answers
404 with the API's error body, and is logged and recorded like everything else.

Command line, for demos and for trying a pod without an API key (it prints the URL, logs
each request to stderr, and serves until Ctrl+C or SIGTERM; ``--api-key KEY`` refuses
other keys with 401)::

    python -m cldpd_magic.model_server serve --port 8123 --scenario scenario.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__package__)

DEFAULT_MODEL = "claude-sonnet-4-5"
DEFAULT_USAGE = {
    "input_tokens": 120,
    "output_tokens": 24,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
}
SIDE_REPLY = "OK"
DONE_REPLY = "Done."

#: The API's error type for each HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
ERROR_MESSAGES = {
    401: "invalid x-api-key",
    429: "Number of request tokens has exceeded your per-minute rate limit",
    500: "Internal server error",
    529: "Overloaded",
}


@dataclass
class ToolCall:
    """A tool_use block the model sends.

    Attributes:
        name: The tool, as the CLI names it (Bash, Write, Edit, Read, ...).
        input: The tool's input, e.g. ``{"command": "ls"}`` for Bash.
        id: The tool_use id; made up when empty.
    """

    name: str
    input: dict[str, Any] = field(default_factory=dict)
    id: str = ""


@dataclass
class Turn:
    """The reply to one request of the conversation (see the module docstring).

    Attributes:
        text: Assistant text (after thinking, before tool calls).
        thinking: A thinking block's text, sent with a signature.
        tool_calls: tool_use blocks; their presence makes stop_reason ``tool_use``.
        delay: Seconds to wait before the reply starts.
        error: An HTTP status to answer with the API's JSON error body instead.
        message: The error's message (a default per status when empty).
        retry_after: A ``retry-after`` header (seconds) on an error.
        drop: Close the connection without answering.
        stream_error: An HTTP status whose error body comes as an SSE ``error`` event
            after the reply's first delta, ending the stream (the API does so when it is
            overloaded mid-reply); a plain error reply when the request is not streaming.
        usage: Token counts merged over the defaults (input_tokens, output_tokens,
            cache_creation_input_tokens, cache_read_input_tokens).
        stop_reason: Overrides the stop reason (end_turn, or tool_use with tool calls).
        repeat: How many consecutive requests this turn answers.
    """

    text: str = ""
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    delay: float = 0.0
    error: int | None = None
    message: str = ""
    retry_after: float | None = None
    drop: bool = False
    stream_error: int | None = None
    usage: dict[str, int] = field(default_factory=dict)
    stop_reason: str = ""
    repeat: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Turn:
        """Build a turn from its JSON form; unknown keys are a ValueError."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown turn keys {sorted(unknown)}; expected some of {sorted(known)}"
            )
        data = dict(data)
        data["tool_calls"] = [
            call if isinstance(call, ToolCall) else ToolCall(**call)
            for call in data.get("tool_calls", [])
        ]
        return cls(**data)


@dataclass
class Scenario:
    """The scripted conversation: a list of turns, and the model named in replies.

    Attributes:
        turns: One per request of the conversation (see :attr:`Turn.repeat`).
        model: The model in replies; the request's model when empty.
    """

    turns: list[Turn] = field(default_factory=list)
    model: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | list[Any]) -> Scenario:
        """Build from ``{"turns": [...], "model": ...}`` or a bare list of turns."""
        if isinstance(data, list):
            data = {"turns": data}
        turns = [t if isinstance(t, Turn) else Turn.from_dict(t) for t in data.get("turns", [])]
        return cls(turns=turns, model=data.get("model", ""))

    @classmethod
    def from_json(cls, source: str | os.PathLike[str]) -> Scenario:
        """Load from a JSON file path, or from JSON text."""
        text = str(source)
        if not text.lstrip().startswith(("{", "[")):
            text = Path(source).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    def expand(self) -> list[Turn]:
        """The turns, each repeated as often as it says: one per request."""
        return [turn for turn in self.turns for _ in range(max(1, turn.repeat))]


@dataclass
class RecordedRequest:
    """One request the server received.

    Attributes:
        method: HTTP method.
        path: The path with its query string.
        headers: Header names lower-cased.
        body: The JSON body (None when empty or not JSON).
        conversation: Whether it took a scenario turn.
        turn: The index of the turn that answered it (-1 for side requests).
        time: When it arrived.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    conversation: bool = False
    turn: int = -1
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The request's messages (empty when none)."""
        return list((self.body or {}).get("messages", [])) if isinstance(self.body, dict) else []

    def tool_results(self) -> list[dict[str, Any]]:
        """Every tool_result block in the request's messages, oldest first."""
        return [
            block
            for message in self.messages
            if isinstance(message.get("content"), list)
            for block in message["content"]
            if isinstance(block, dict) and block.get("type") == "tool_result"
        ]


def is_conversation(body: Any) -> bool:
    """Whether a /v1/messages body is the agent's conversation, not a side request.

    The agent loop always offers its tools; the CLI's side requests (titles, quota
    probes, summaries) offer none.
    """
    return isinstance(body, dict) and bool(body.get("tools"))


def block_text(content: Any) -> str:
    """The text of a message's or tool result's content (a string or a list of blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            block_text(b.get("text", b.get("content", ""))) for b in content if isinstance(b, dict)
        )
    return ""


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event, framed as the API frames it."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _new_id(prefix: str) -> str:
    return f"{prefix}_01{uuid.uuid4().hex[:22]}"


def content_blocks(turn: Turn) -> list[dict[str, Any]]:
    """The content blocks of a turn's reply, in order: thinking, text, tool calls."""
    blocks: list[dict[str, Any]] = []
    if turn.thinking:
        blocks.append({"type": "thinking", "thinking": turn.thinking, "signature": _new_id("sig")})
    if turn.text or not (turn.thinking or turn.tool_calls):
        blocks.append({"type": "text", "text": turn.text})
    for call in turn.tool_calls:
        blocks.append(
            {
                "type": "tool_use",
                "id": call.id or _new_id("toolu"),
                "name": call.name,
                "input": call.input,
            }
        )
    return blocks


def _chunks(text: str, size: int = 24) -> Iterator[str]:
    for i in range(0, len(text), size):
        yield text[i : i + size]


def stream_events(message: dict[str, Any]) -> Iterator[bytes]:
    """The SSE events of a complete message, as the API streams it."""
    usage = message["usage"]
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    yield sse("message_start", {"type": "message_start", "message": start})
    yield sse("ping", {"type": "ping"})
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        if kind == "thinking":
            empty: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": c} for c in _chunks(block["thinking"])]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind == "tool_use":
            empty = {**block, "input": {}}
            text = json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": ""}]
            deltas += [{"type": "input_json_delta", "partial_json": c} for c in _chunks(text)]
        else:
            empty = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": c} for c in _chunks(block["text"])]
        yield sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": empty},
        )
        for delta in deltas:
            yield sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield sse("message_stop", {"type": "message_stop"})


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_body(status: int, message: str = "") -> dict[str, Any]:
    """The API's JSON error body for an HTTP status."""
    return {
        "type": "error",
        "error": {
            "type": ERROR_TYPES.get(status, "api_error"),
            "message": message or ERROR_MESSAGES.get(status) or _phrase(status),
        },
    }


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _read_body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.send_header("request-id", _new_id("req"))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _handle(self) -> None:
        owner = self.server.owner
        body = self._read_body() if self.command in ("POST", "PUT", "PATCH") else None
        path = self.path.split("?", 1)[0]
        request = RecordedRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        if not owner.key_accepted(request.headers):
            owner._record(request)
            self._send_json(401, error_body(401))
        elif self.command == "POST" and path == "/v1/messages":
            owner._record(request, conversation=is_conversation(body))
            self._messages(request)
        elif self.command == "POST" and path == "/v1/messages/count_tokens":
            owner._record(request)
            tokens = max(1, len(json.dumps(body or {})) // 4)
            self._send_json(200, {"input_tokens": tokens})
        else:
            owner._record(request)
            log.info(
                "scripted model: %s %s is not scripted; answering 404", self.command, self.path
            )
            self._send_json(404, error_body(404, f"{self.command} {path} is not scripted"))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def _messages(self, request: RecordedRequest) -> None:
        owner = self.server.owner
        body = request.body if isinstance(request.body, dict) else {}
        turn = owner.scenario_turn(request.turn) if request.conversation else Turn(text=SIDE_REPLY)
        if turn.delay and owner._closing.wait(turn.delay):
            self.close_connection = True
            return
        if turn.drop:
            self.close_connection = True
            self.connection.close()
            return
        if turn.error:
            headers = {}
            if turn.retry_after is not None:
                headers["retry-after"] = f"{turn.retry_after:g}"
            if turn.error in (429, 500, 529):
                headers["x-should-retry"] = "true"
            self._send_json(turn.error, error_body(turn.error, turn.message), headers)
            return
        message = {
            "id": _new_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": owner.scenario.model or body.get("model") or DEFAULT_MODEL,
            "content": content_blocks(turn),
            "stop_reason": turn.stop_reason or ("tool_use" if turn.tool_calls else "end_turn"),
            "stop_sequence": None,
            "usage": {**DEFAULT_USAGE, **turn.usage},
        }
        if not body.get("stream"):
            if turn.stream_error:
                self._send_json(turn.stream_error, error_body(turn.stream_error, turn.message))
            else:
                self._send_json(200, message)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("request-id", _new_id("req"))
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in stream_events(message):
                self.wfile.write(chunk)
                self.wfile.flush()
                if turn.stream_error and chunk.startswith(b"event: content_block_delta"):
                    error = error_body(turn.stream_error, turn.message)
                    self.wfile.write(sse("error", error))
                    break
        except OSError:
            log.info("scripted model: the client went away during a reply")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: ScriptedModelServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (the CLI stopped, a keep-alive closed) is no error.
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("scripted model: %s hung up", client_address)
        else:
            log.exception("scripted model: error answering %s", client_address)


class ScriptedModelServer:
    """The scripted Messages API on 127.0.0.1, serving in a thread.

    Use it as a context manager, or call :meth:`start` and :meth:`close`.

    Args:
        scenario: The conversation to play; a Scenario, its JSON form (dict or list),
            or None for "Done." to every request.
        host: The address to listen on.
        port: The port; 0 picks a free one.
        api_key: When set, a request whose ``x-api-key`` (or bearer token) differs is
            answered 401 ``authentication_error`` without taking a turn, as the API
            answers a wrong key; any key is accepted when None.

    Attributes:
        scenario: The scenario played.
        url: ``http://HOST:PORT`` once started (what ANTHROPIC_BASE_URL should be).
    """

    def __init__(
        self,
        scenario: Scenario | dict[str, Any] | list[Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
    ) -> None:
        if scenario is None:
            scenario = Scenario()
        elif not isinstance(scenario, Scenario):
            scenario = Scenario.from_dict(scenario)
        self.scenario = scenario
        self._turns = scenario.expand()
        self._host, self._port = host, port
        self.api_key = api_key
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._next_turn = 0
        self._closing = threading.Event()
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> ScriptedModelServer:
        """Start listening and serving in a daemon thread; returns self."""
        self._http = _HTTPServer((self._host, self._port), _Handler)
        self._http.owner = self
        host, port = self._http.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="scripted-model",
            daemon=True,
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        """The port listened on (0 before start)."""
        return self._http.server_address[1] if self._http else 0

    def close(self) -> None:
        """Stop serving; replies waiting on a delay end without an answer."""
        self._closing.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> ScriptedModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, request: RecordedRequest, *, conversation: bool = False) -> None:
        with self._lock:
            if conversation:
                request.conversation = True
                request.turn = self._next_turn
                self._next_turn += 1
            self._requests.append(request)
            self._lock.notify_all()
        log.info(
            "scripted model: %s %s%s",
            request.method,
            request.path,
            f" (turn {request.turn})" if conversation else "",
        )

    def key_accepted(self, headers: dict[str, str]) -> bool:
        """Whether a request's API key is accepted (always, unless ``api_key`` is set)."""
        if self.api_key is None:
            return True
        bearer = headers.get("authorization", "").removeprefix("Bearer ")
        return self.api_key in (headers.get("x-api-key"), bearer)

    def scenario_turn(self, index: int) -> Turn:
        """The turn answering the index-th conversation request (``Done.`` past the end)."""
        return self._turns[index] if index < len(self._turns) else Turn(text=DONE_REPLY)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def conversation_requests(self) -> list[RecordedRequest]:
        """The requests that took scenario turns, in order."""
        return [r for r in self.requests if r.conversation]

    def wait_for(
        self, predicate: Callable[[list[RecordedRequest]], bool], timeout: float = 60.0
    ) -> list[RecordedRequest]:
        """Block until predicate(requests) holds; returns the requests.

        Raises:
            TimeoutError: It did not hold within timeout seconds.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(list(self._requests)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the scripted model did not see that in {timeout:g} s")
                self._lock.wait(left)
            return list(self._requests)

    def wait_for_turn(self, index: int, timeout: float = 60.0) -> RecordedRequest:
        """Block until the index-th conversation request (0-based) has arrived; return it."""
        requests = self.wait_for(
            lambda rs: sum(r.conversation for r in rs) > index, timeout=timeout
        )
        return [r for r in requests if r.conversation][index]


def _serve(args: argparse.Namespace) -> int:
    try:
        scenario = Scenario.from_json(args.scenario) if args.scenario else Scenario()
    except (OSError, ValueError, TypeError) as exc:
        print(
            f"cannot load the scenario {args.scenario}: {exc}; "
            "give a JSON file as the module docstring describes.",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        server = ScriptedModelServer(
            scenario, host=args.host, port=args.port, api_key=args.api_key
        ).start()
    except OSError as exc:
        print(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; "
            "pick another --port.",
            file=sys.stderr,
        )
        return 1
    # SIGTERM ends it as Ctrl+C does: a script that started it in the background stops it
    # with kill (SIGINT is ignored by background jobs of non-interactive shells).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        print(
            f"scripted model listening on {server.url} "
            f"({len(scenario.turns)} turns); set ANTHROPIC_BASE_URL={server.url}",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cldpd_magic.model_server serve [--port N] [--scenario FILE] [--api-key KEY]``.

    Serves until Ctrl+C or SIGTERM; returns the exit code.
    """
    parser = argparse.ArgumentParser(
        prog="python -m cldpd_magic.model_server",
        description="A scripted Anthropic Messages API for running Claude Code without a model.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a scenario until Ctrl+C")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    serve.add_argument("--scenario", help="scenario JSON file (default: 'Done.' to everything)")
    serve.add_argument(
        "--api-key", help="answer 401 to requests with another key (default: accept any key)"
    )
    args = parser.parse_args(argv)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
