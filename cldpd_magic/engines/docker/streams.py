"""The output of attached containers and execs: multiplexed frames decoded into text.

A stream nobody answers (no stdin attached) on a plain socket is read by one thread for
the whole process, the shared reader: it waits on every such socket at once, and takes the
output of runs printing line by line together, a few times a second, so fifty runs wake
this process about as often as one does. A stream whose agent waits for answers (stdin
attached), or on TLS or an ``ssh`` connection, is read by its caller's thread, at once.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import logging
import math
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ...logs import log_swallowed
from ..protocol import Writer

logger = logging.getLogger(__package__)

__all__ = ["OutputStream", "SharedReader", "StreamDecoder", "pump", "trickle_wait"]

#: Bytes asked for by one read of a stream read in its caller's thread.
READ_SIZE = 1 << 16
#: Bytes asked for by one read of the shared reader (a socket holds about 200 KB).
SHARED_READ_SIZE = 1 << 18
#: A read smaller than this, soon after another such read, is a trickle of lines (an agent
#: printing as it goes), not a flood (a flood comes in pipe-sized frames of 4 KB and more).
TRICKLE_BYTES = 2048
#: Seconds after a small read in which another counts as part of a trickle: the first
#: line after a quiet spell is read at once (the first line of a run, of a turn).
TRICKLE_GAP = 1.0
#: A trickle is taken at the shared reader's next tick, at least this far apart, so that
#: a run printing line by line is read about as often as its output is shown, not at
#: every line. Far less than a view's publication interval (0.25 s).
TRICKLE_WAIT = 0.05
#: Past TRICKLE_WAKES x TRICKLE_WAIT streams (about a dozen), ticks are further apart, up
#: to TRICKLE_WAIT_MAX (reached at fifty streams: a batch of fifty runs, whose view is
#: published every 0.25 s), so that each tick has more to read.
TRICKLE_WAKES = 250
TRICKLE_WAIT_MAX = 0.2
#: A read at least this large is part of a flood: the stream is read again at once.
FLOOD_BYTES = 16384
#: A flood caught up with (nothing waiting after a large read) is read again after this
#: long, so that it is taken in fewer, larger reads (each wakes whoever follows the run).
FLOOD_WAIT = 0.005

Deliver = Callable[[int, bytes], None]


def trickle_wait(streams: int) -> float:
    """Seconds between the shared reader's ticks while it follows ``streams`` streams."""
    return min(TRICKLE_WAIT_MAX, max(TRICKLE_WAIT, streams / TRICKLE_WAKES))


class StreamDecoder:
    """Decodes byte chunks of one stream into text for a writer, UTF-8 safe across chunks."""

    def __init__(self, writer: Writer | None) -> None:
        self.writer = writer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes | None) -> None:
        """Write the text ``data`` completes (None or empty: nothing)."""
        if data and self.writer is not None:
            text = self.decoder.decode(data)
            if text:
                self.writer.write(text)

    def close(self) -> None:
        """At the end of the stream: write what is left (a cut character as U+FFFD)."""
        if self.writer is not None:
            text = self.decoder.decode(b"", final=True)
            if text:
                self.writer.write(text)


class _Demux:
    """Splits the bytes of a multiplexed stream into ``(stream id, payload)`` frames;
    consecutive frames of one stream read together come as one payload."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        """The complete frames ``chunk`` ends, in order."""
        buf = self._buf
        buf += chunk
        frames: list[tuple[int, bytes]] = []
        start, kind_of_run, run = 0, -1, []
        while len(buf) - start >= 8:
            kind, size = struct.unpack_from(">BxxxL", buf, start)
            end = start + 8 + size
            if len(buf) < end:
                break
            if kind != kind_of_run and run:
                frames.append((kind_of_run, b"".join(run)))
                run = []
            kind_of_run = kind
            run.append(buf[start + 8 : end])
            start = end
        if run:
            frames.append((kind_of_run, b"".join(run)))
        if start:
            del buf[:start]
        return frames

    def rest(self) -> list[tuple[int, bytes]]:
        """At the end of the stream: a frame cut short, as far as it came."""
        buf, self._buf = self._buf, bytearray()
        return [(buf[0], bytes(buf[8:]))] if len(buf) > 8 else []


def _reader(sock: Any) -> Callable[[int], bytes]:
    """What reads a hijacked connection: whatever has come, up to a size, blocking for
    some. docker-py's socket over the ``ssh`` command reads its stdout in full-size
    reads, which wait for the whole size: its ``read1`` takes what has come."""
    proc = getattr(sock, "proc", None)
    if proc is not None and hasattr(proc.stdout, "read1"):
        return proc.stdout.read1
    return sock.recv


class OutputStream:
    """The output of an attach or exec as ``(stdout, stderr)`` chunks, until it ends.

    Iterating reads it in the caller's thread, in large blocking reads; :func:`pump` hands
    a stream that is ``shared`` to the :class:`SharedReader`. The socket is closed at the
    end either way.

    Args:
        sock: The hijacked connection's socket (a plain, TLS or ``ssh`` one).
        answered: Its stdin is attached: its agent may wait for the answer to what it
            printed last (an approval, an SDK's control request), so it is read at once.
        buffered: What of the stream was read before the socket was handed over (with the
            response's headers); it comes first.
    """

    def __init__(self, sock: Any, answered: bool = False, buffered: bytes = b"") -> None:
        self.sock = sock
        self.buffered = buffered
        # Only a plain socket can be read without waiting (``MSG_DONTWAIT``): a TLS
        # socket's bytes may hold part of a record, and the ``ssh`` transports have no such
        # read; and it is not made non-blocking, so that stdin writes on it still block.
        self.shared = not answered and type(sock) is socket.socket

    def __iter__(self) -> Iterator[tuple[bytes | None, bytes | None]]:
        try:
            for kind, data in self._frames():
                yield (None, data) if kind == 2 else (data, None)
        finally:
            self.close()

    def _frames(self) -> Iterator[tuple[int, bytes]]:
        """``(stream id, payload)`` frames, read in this thread, until the end."""
        recv, demux = _reader(self.sock), _Demux()
        yield from demux.feed(self.buffered)
        while chunk := recv(READ_SIZE):
            yield from demux.feed(chunk)
        yield from demux.rest()

    def close(self) -> None:
        """Close the socket (again: nothing)."""
        self.sock.close()


def pump(
    stream: Iterable[tuple[bytes | None, bytes | None]],
    stdout: Writer,
    stderr: Writer | None,
) -> None:
    """Decode a stream of ``(stdout, stderr)`` byte chunks into text for two writers,
    until the stream ends.

    A shared :class:`OutputStream` is read, and its writers called, on the shared
    reader's thread while this one waits; a writer's error is raised here either way.
    """
    out, err = StreamDecoder(stdout), StreamDecoder(stderr)
    if isinstance(stream, OutputStream) and stream.shared:
        SHARED_READER.follow(
            stream.sock,
            lambda kind, data: (err.feed if kind == 2 else out.feed)(data),
            stream.buffered,
        )
    else:
        try:
            for chunk_out, chunk_err in stream:
                out.feed(chunk_out)
                err.feed(chunk_err)
        finally:
            # A writer that raises leaves the stream unread: closed here, not when a kept
            # traceback lets it go (its socket).
            close = getattr(stream, "close", None)
            if close is not None:
                close()
    out.close()
    err.close()


def _take_waiting(sock: socket.socket, size: int) -> bytes | None:
    """What has come on a plain socket (without a timeout), without waiting: None when
    nothing has, ``b""`` at the end of the stream."""
    try:
        return sock.recv(size, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None


class _Followed:
    """One stream the shared reader follows, and when to read it next.

    :meth:`read` takes what came and says when to read again: when the socket is
    readable (None), or at a time. A small read soon after another is a trickle: it is
    held and delivered with what follows it at the next tick, and a stream that keeps
    trickling is read at each tick, without waiting on its socket. A large read (or,
    out of a trickle, one more than small) is a flood: read again at once, and a moment
    after it is caught up with.
    """

    def __init__(self, sock: socket.socket, deliver: Deliver, buffered: bytes = b"") -> None:
        self.sock = sock
        self._deliver = deliver
        self._demux = _Demux()
        self._held = buffered  # a trickle's read, delivered with what follows it
        self._last_small = -math.inf
        self._flooding = False  # read again at once
        self._ticking = False  # read at the reader's ticks
        self.ended = False
        self.error: BaseException | None = None
        self.done = threading.Event()

    def read(self, now: float, tick: float, due: bool) -> float | None:
        """Read what came; when to read next (None: once readable; ``math.inf``: ended).

        Args:
            now: The time now (``time.monotonic``).
            tick: The reader's next tick.
            due: The read was scheduled (else the socket was readable).
        """
        try:
            data = _take_waiting(self.sock, SHARED_READ_SIZE if self._flooding else READ_SIZE)
        except OSError:  # a reset, say: what came before it is delivered first
            self._end()
            raise
        if data is None:  # nothing came
            self._give(b"")  # a trickle's held read, if any
            self._ticking = False
            if self._flooding:  # caught up with a flood: let it gather
                self._flooding = False
                return now + FLOOD_WAIT
            return None
        if not data:
            self._end()
            return math.inf
        if len(data) >= FLOOD_BYTES or (len(data) >= TRICKLE_BYTES and not self._ticking):
            # A flood (or a burst after a quiet spell): read on at once while it lasts, in
            # reads made large by waiting a moment once caught up, as each read costs a
            # run's writer about as much as many lines.
            self._give(data)
            self._flooding, self._ticking, self._last_small = True, False, -math.inf
            return now
        self._flooding = False
        if due or (len(data) < TRICKLE_BYTES and now - self._last_small < TRICKLE_GAP):
            # A trickle: what came is taken with what follows it, at each tick while
            # something comes.
            if due:
                self._give(data)
            else:
                self._held += data
            self._ticking, self._last_small = True, now
            return tick
        self._give(data)  # the first line after a quiet spell, read at once
        self._last_small = now
        return None

    @property
    def holds_bytes(self) -> bool:
        """Whether it holds bytes it has not delivered yet."""
        return bool(self._held)

    def _give(self, data: bytes) -> None:
        data, self._held = self._held + data, b""
        if data and not self.ended:
            for kind, payload in self._demux.feed(data):
                self._deliver(kind, payload)

    def _end(self) -> None:
        """At the end of the stream: deliver what is held, and a frame cut short."""
        self._give(b"")
        if not self.ended:
            for kind, payload in self._demux.rest():
                self._deliver(kind, payload)
            self.ended = True

    def fail(self, exc: BaseException) -> None:
        """End the stream with a writer's error, which its caller raises."""
        self.ended = True
        self.error = exc


class SharedReader:
    """One thread reading every shared stream of the process (see the module's docstring).

    The thread starts with the first stream and ends when it follows none. Writers are
    called on it, for every run at once: they must return soon and never wait for another
    stream (a session's writer masks, meters and records lines; a usage listener asks for
    a stop in a thread of its own). What goes wrong with one stream (its writer raises,
    its socket fails or was closed elsewhere) ends that stream alone.

    Attributes:
        wakes: How many times the thread has woken (for tests and benchmarks).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._added: list[_Followed] = []
        self._dropped: list[_Followed] = []  # no longer waited for: closed unread
        self._running = False
        self._wake_in, self._wake_out = socket.socketpair()
        self._followed: dict[_Followed, float | None] = {}  # when each is read next
        self.wakes = 0

    @property
    def streams(self) -> int:
        """How many streams the thread follows now (or is about to)."""
        with self._lock:
            return len(self._followed) + len(self._added)

    def follow(self, sock: socket.socket, deliver: Deliver, buffered: bytes = b"") -> None:
        """Read a plain socket's frames until its end, ``deliver(stream id, payload)``
        called on the shared thread; return then. The socket is closed at the end, and
        if this wait is interrupted (the stream is then dropped, unread). ``buffered``:
        what of the stream was read before (see :class:`OutputStream`), delivered first.

        Raises:
            BaseException: What ``deliver`` raised, or reading the socket did (after what
                came before it was delivered).
        """
        sock.settimeout(None)  # else each read would wait for it, even one that must not
        followed = _Followed(sock, deliver, buffered)
        with self._lock:
            self._added.append(followed)
            if not self._running:
                try:
                    threading.Thread(target=self._run, daemon=True, name="cldpd-output").start()
                except BaseException:  # no thread: nothing reads it, and no later stream
                    self._added.remove(followed)
                    sock.close()
                    raise
                self._running = True
        self._wake()
        try:
            followed.done.wait()
        except BaseException:  # a KeyboardInterrupt, in a main thread
            with self._lock:
                self._dropped.append(followed)
            self._wake()
            raise
        if followed.error is not None:
            raise followed.error

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: a wake is waiting already
            self._wake_out.send(b".", socket.MSG_DONTWAIT)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_in, selectors.EVENT_READ)
        try:
            while self._take_changes(selector):
                self._read_ready(selector)
        except BaseException as exc:  # never leave a caller waiting for a stream's end
            self._fail_all(selector, exc)
            log_swallowed(logger, "the shared output reader failed")
        finally:
            selector.close()

    def _take_changes(self, selector: selectors.BaseSelector) -> bool:
        """Follow the streams added since the last look and drop those no longer waited
        for; False (the thread ends) when none is left to follow."""
        with self._lock:
            added, self._added = self._added, []
            dropped, self._dropped = self._dropped, []
            if not added and not self._followed:
                self._running = False
                return False
        for followed in added:
            self._followed[followed] = 0.0  # due at once: what came before is delivered
            if not followed.holds_bytes:
                self._watch(selector, followed)
        for followed in dropped:
            if followed in self._followed:
                self._end(selector, followed)
        return True

    def _watch(self, selector: selectors.BaseSelector, followed: _Followed) -> None:
        """Read a stream once its socket is readable (one that cannot be is ended)."""
        try:
            try:
                selector.register(followed.sock, selectors.EVENT_READ, followed)
            except KeyError:  # its number is still watched for a socket closed elsewhere
                stale = selector.get_key(followed.sock.fileno()).data
                if stale is None or stale.sock.fileno() != -1:
                    raise
                stale.fail(OSError(errno.EBADF, "the output's socket was closed elsewhere"))
                self._end(selector, stale)
                selector.register(followed.sock, selectors.EVENT_READ, followed)
        except (KeyError, ValueError, OSError) as exc:
            followed.fail(exc)
            self._end(selector, followed)
            return
        self._followed[followed] = None

    def _end(self, selector: selectors.BaseSelector, followed: _Followed) -> None:
        """Stop following a stream: close its socket, let its caller go on."""
        if self._followed.pop(followed, 0.0) is None:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(followed.sock)
        with contextlib.suppress(OSError):
            followed.sock.close()
        followed.done.set()

    def _fail_all(self, selector: selectors.BaseSelector, exc: BaseException) -> None:
        with self._lock:
            self._running = False  # a later follow starts a thread with a fresh state
            streams = [*self._followed, *self._added]
            self._followed, self._added, self._dropped = {}, [], []
        for followed in streams:
            followed.fail(exc)
            self._end(selector, followed)

    def _read_ready(self, selector: selectors.BaseSelector) -> None:
        """Wait for a readable socket or the first read due, and read what is ready."""
        due_times = [t for t in self._followed.values() if t is not None]
        timeout = max(0.0, min(due_times) - time.monotonic()) if due_times else None
        ready = selector.select(timeout)
        self.wakes += 1
        now = time.monotonic()
        wait = trickle_wait(len(self._followed))
        tick = (math.floor(now / wait) + 1) * wait  # shared by all: one wake for all
        for key, _ in ready:
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    self._wake_in.recv(4096, socket.MSG_DONTWAIT)
            elif self._followed.get(key.data, 0.0) is None:
                self._read(selector, key.data, now, tick, due=False)
        for followed, at in list(self._followed.items()):
            if at is not None and at <= now and followed in self._followed:
                self._read(selector, followed, now, tick, due=True)

    def _read(
        self,
        selector: selectors.BaseSelector,
        followed: _Followed,
        now: float,
        tick: float,
        due: bool,
    ) -> None:
        try:
            at = followed.read(now, tick, due)
        except BaseException as exc:  # its writer's error, or its socket's: its caller's
            followed.fail(exc)
            at = math.inf
        if at == math.inf:
            self._end(selector, followed)
        elif at is None:
            if self._followed[followed] is not None:
                self._watch(selector, followed)
        else:
            if self._followed[followed] is None:
                selector.unregister(followed.sock)
            self._followed[followed] = at


#: The process's shared reader.
SHARED_READER = SharedReader()
# A child forked while streams were followed has none of them, nor the thread: it starts
# afresh (else a follow in it would wait for a thread that is not there).
os.register_at_fork(after_in_child=SHARED_READER.__init__)
