"""Attached output streams: frames decoded in order, and one shared thread reading every
stream nobody answers, taking trickles together at its ticks and floods in large reads."""

from __future__ import annotations

import math
import os
import socket
import ssl
import struct
import threading
import time

import pytest

from cldpd_magic.engines.docker import streams
from cldpd_magic.engines.docker.streams import OutputStream, SharedReader, _Followed, pump


def frame(kind: int, data: bytes) -> bytes:
    """One frame of an engine's multiplexed stream (kind 1 stdout, 2 stderr)."""
    return struct.pack(">BxxxL", kind, len(data)) + data


class Recorded:
    """What a followed stream delivered, as ``(stream id, payload)``."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []

    def __call__(self, kind: int, data: bytes) -> None:
        self.frames.append((kind, data))

    def take(self) -> list[tuple[int, bytes]]:
        taken, self.frames = self.frames, []
        return taken


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        yield ours, theirs


MIXED = (
    frame(1, b"a\n") + frame(1, b"b\n") + frame(2, b"e\n") + frame(1, b"c")
    + frame(1, b"d\n") + frame(2, b"cut sh")[:-2]
)  # fmt: skip
MIXED_FRAMES = [(1, b"a\nb\n"), (2, b"e\n"), (1, b"cd\n"), (2, b"cut ")]


def test_frames_read_together_come_as_one_payload_per_stream_in_order(pair):
    ours, theirs = pair
    theirs.sendall(MIXED)
    theirs.shutdown(socket.SHUT_WR)
    assert [(1, o) if o else (2, e) for o, e in OutputStream(ours)] == MIXED_FRAMES
    assert ours.fileno() == -1  # closed at the end


def test_the_shared_reader_gives_the_same_frames_and_closes_the_socket(pair):
    ours, theirs = pair
    theirs.sendall(MIXED)
    theirs.shutdown(socket.SHUT_WR)
    got = Recorded()
    SharedReader().follow(ours, got)
    assert got.frames == MIXED_FRAMES
    assert ours.fileno() == -1


def test_only_a_plain_socket_nobody_answers_is_read_by_the_shared_reader(pair):
    ours, _ = pair
    assert OutputStream(ours).shared
    assert not OutputStream(ours, answered=True).shared  # its agent may wait for an answer
    wrapped = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_socket(
        socket.socket(), server_hostname="engine", do_handshake_on_connect=False
    )
    with wrapped:
        assert not OutputStream(wrapped).shared  # a TLS record may be read in part


def test_pump_decodes_a_shared_stream_split_anywhere_into_text(pair):
    ours, theirs = pair
    text = "é€😀 line\n" * 500
    data = text.encode()
    sent = b"".join(frame(1, data[i : i + 7]) for i in range(0, len(data), 7))
    out, err = [], []
    writer = type("W", (), {"write": lambda self, t: out.append(t)})()
    errors = type("W", (), {"write": lambda self, t: err.append(t)})()
    feeding = threading.Thread(
        target=lambda: (theirs.sendall(sent + frame(2, b"done\n")), theirs.shutdown(socket.SHUT_WR))
    )
    feeding.start()
    pump(OutputStream(ours), writer, errors)
    feeding.join()
    assert "".join(out) == text
    assert err == ["done\n"]


# --- when a followed stream is read: its reads driven by hand ----------------------------

NOW, TICK = 1000.0, 1000.2


def test_a_trickle_is_held_until_the_tick_and_taken_with_what_followed_it(pair):
    ours, theirs = pair
    got = Recorded()
    followed = _Followed(ours, got)
    theirs.sendall(frame(1, b"first\n"))
    assert followed.read(NOW, TICK, due=False) is None  # after a quiet spell: at once
    assert got.take() == [(1, b"first\n")]
    theirs.sendall(frame(1, b"second\n"))
    assert followed.read(NOW + 0.01, TICK, due=False) == TICK  # a trickle: held
    assert got.take() == []
    theirs.sendall(frame(1, b"third\n") + frame(1, b"fourth\n"))
    assert followed.read(TICK, TICK + 0.2, due=True) == TICK + 0.2  # read at each tick
    assert got.take() == [(1, b"second\nthird\nfourth\n")]
    assert followed.read(TICK + 0.2, TICK + 0.4, due=True) is None  # quiet: wait on it
    assert got.take() == []
    theirs.sendall(frame(1, b"much later\n"))
    assert followed.read(TICK + 5, TICK + 5.2, due=False) is None  # quiet spell over
    assert got.take() == [(1, b"much later\n")]


def test_a_held_trickle_is_delivered_at_the_tick_even_if_nothing_followed(pair):
    ours, theirs = pair
    got = Recorded()
    followed = _Followed(ours, got)
    for line in (b"one\n", b"two\n"):
        theirs.sendall(frame(1, line))
        followed.read(NOW, TICK, due=False)
    assert got.take() == [(1, b"one\n")]
    assert followed.read(TICK, TICK + 0.2, due=True) is None
    assert got.take() == [(1, b"two\n")]


def test_a_flood_is_read_again_at_once_and_a_moment_after_it_is_caught_up_with(pair):
    ours, theirs = pair
    got = Recorded()
    followed = _Followed(ours, got)
    big = frame(1, b"x" * streams.FLOOD_BYTES)
    theirs.sendall(big)
    assert followed.read(NOW, TICK, due=False) == NOW  # a flood: read on at once
    assert followed.read(NOW, TICK, due=True) == NOW + streams.FLOOD_WAIT  # caught up
    theirs.sendall(big + big)
    assert followed.read(NOW + streams.FLOOD_WAIT, TICK, due=True) == NOW + streams.FLOOD_WAIT
    assert b"".join(d for _, d in got.take()) == big[8:] * 3
    followed.read(NOW + 0.01, TICK, due=True)
    assert followed.read(NOW + 0.02, TICK, due=True) is None  # the flood is over
    theirs.sendall(frame(1, b"caught up\n"))
    assert followed.read(NOW + 0.03, TICK, due=False) is None  # after a flood: at once
    assert got.take() == [(1, b"caught up\n")]


def test_more_than_a_trickle_is_read_on_at_once_unless_it_is_a_trickle_s_tick(pair):
    ours, theirs = pair
    followed = _Followed(ours, Recorded())
    medium = frame(1, b"y" * streams.TRICKLE_BYTES)
    theirs.sendall(medium)
    assert followed.read(NOW, TICK, due=False) == NOW  # a burst after a quiet spell
    assert followed.read(NOW, TICK, due=True) == NOW + streams.FLOOD_WAIT
    theirs.sendall(medium)
    assert followed.read(NOW + 0.01, TICK, due=True) == NOW + 0.01  # the flood goes on
    assert followed.read(NOW + 0.01, TICK, due=True) == NOW + 0.01 + streams.FLOOD_WAIT
    assert followed.read(NOW + 0.02, TICK, due=True) is None
    for line in (b"one\n", b"two\n"):  # now a trickle, read at its ticks
        theirs.sendall(frame(1, line))
        followed.read(NOW + 2, TICK + 2, due=False)
    theirs.sendall(medium)  # many lines by a tick: still a trickle
    assert followed.read(TICK + 2, TICK + 2.2, due=True) == TICK + 2.2


def test_the_end_delivers_what_was_held_and_a_frame_cut_short(pair):
    ours, theirs = pair
    got = Recorded()
    followed = _Followed(ours, got)
    theirs.sendall(frame(1, b"one\n"))
    followed.read(NOW, TICK, due=False)
    theirs.sendall(frame(1, b"held\n"))
    assert followed.read(NOW, TICK, due=False) == TICK
    theirs.sendall(frame(2, b"cut short")[:-6])
    theirs.shutdown(socket.SHUT_WR)
    assert followed.read(TICK, TICK + 0.2, due=True) == TICK + 0.2
    assert followed.read(TICK + 0.2, TICK + 0.4, due=True) == math.inf
    assert got.take() == [(1, b"one\n"), (1, b"held\n"), (2, b"cut")]
    assert followed.ended


# --- the shared thread ---------------------------------------------------------------------


def _follow_in_thread(reader: SharedReader, sock: socket.socket, deliver) -> threading.Thread:
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            reader.follow(sock, deliver)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=follow)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def _output_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cldpd-output"]


def test_fifty_trickling_streams_are_read_by_one_thread_waking_for_all_at_once():
    # Each stream gets a line every 20 ms for 1.5 s (3,750 lines in all). A thread per
    # stream wakes at least once per stream per tick; one reader wakes about once per tick.
    reader = SharedReader()
    pairs = [socket.socketpair() for _ in range(50)]
    got = [Recorded() for _ in pairs]
    before = len(_output_threads())
    followers = [
        _follow_in_thread(reader, ours, rec) for (ours, _), rec in zip(pairs, got, strict=True)
    ]
    lines = 75
    for n in range(lines):
        for _, theirs in pairs:
            theirs.sendall(frame(1, b"line %d\n" % n))
        if n == 5:
            wakes = reader.wakes  # from when every stream has begun
        time.sleep(0.02)
    woke = reader.wakes - wakes
    assert len(_output_threads()) == before + 1
    assert reader.streams == 50
    for _, theirs in pairs:
        theirs.shutdown(socket.SHUT_WR)
    for thread in followers:
        thread.join(10)
        assert not thread.is_alive() and thread.errors == []
    sent = b"".join(b"line %d\n" % n for n in range(lines))
    for rec in got:
        assert b"".join(d for _, d in rec.frames) == sent
        assert len(rec.frames) < lines / 3  # taken together, a tick's worth at a time
    assert woke < 150, woke  # about 1.4 s / 0.2 s ticks; 50 readers: at least 700
    for _, theirs in pairs:
        theirs.close()
    deadline = time.monotonic() + 10
    while len(_output_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_output_threads()) == before  # no stream left: the thread ended


def test_a_writer_that_raises_ends_its_stream_alone_and_its_caller_gets_the_error():
    reader = SharedReader()
    (bad, bad_theirs), (good, good_theirs) = socket.socketpair(), socket.socketpair()

    def failing(kind: int, data: bytes) -> None:
        raise OSError("the writer failed")

    kept = Recorded()
    failed = _follow_in_thread(reader, bad, failing)
    going = _follow_in_thread(reader, good, kept)
    bad_theirs.sendall(frame(1, b"line\n"))
    failed.join(10)
    assert [str(e) for e in failed.errors] == ["the writer failed"]  # type: ignore[attr-defined]
    assert bad.fileno() == -1  # closed: not left for a kept traceback to hold
    good_theirs.sendall(frame(1, b"still read\n"))
    good_theirs.shutdown(socket.SHUT_WR)
    going.join(10)
    assert kept.frames == [(1, b"still read\n")]
    bad_theirs.close()
    good_theirs.close()


def test_a_writer_that_raises_closes_the_stream_it_was_fed_from():
    # Read in the caller's thread: else the stream lives as long as the traceback.
    closed: list[bool] = []

    def stream():
        try:
            yield b"line\n", None
            yield b"never read\n", None
        finally:
            closed.append(True)

    class Failing:
        def write(self, text: str) -> int:
            raise OSError("the writer failed")

    with pytest.raises(OSError) as failure:  # kept: its traceback holds the stream
        pump(stream(), Failing(), None)
    assert closed == [True]
    assert failure.traceback


def test_ticks_are_further_apart_for_more_streams_within_bounds():
    assert streams.trickle_wait(1) == streams.TRICKLE_WAIT
    assert streams.trickle_wait(50) == 50 / streams.TRICKLE_WAKES <= streams.TRICKLE_WAIT_MAX
    assert streams.trickle_wait(10_000) == streams.TRICKLE_WAIT_MAX


def test_a_forked_child_reads_its_own_streams_with_a_thread_of_its_own(pair):
    # The parent follows a stream when it forks: the child has neither it nor the thread.
    ours, theirs = pair
    parent = _follow_in_thread(streams.SHARED_READER, ours, Recorded())
    while streams.SHARED_READER.streams == 0:
        time.sleep(0.01)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child reports through its exit status)
        try:
            mine, feeding = socket.socketpair()
            feeding.sendall(frame(1, b"in the child\n"))
            feeding.shutdown(socket.SHUT_WR)
            got = Recorded()
            following = _follow_in_thread(streams.SHARED_READER, mine, got)
            following.join(10)
            os._exit(0 if got.frames == [(1, b"in the child\n")] else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    theirs.shutdown(socket.SHUT_WR)
    parent.join(10)
    assert os.waitstatus_to_exitcode(status) == 0


# --- what goes wrong with one stream ends that stream alone --------------------------------


def _wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_thread_that_cannot_start_fails_that_follow_and_the_next_starts_one(monkeypatch):
    reader = SharedReader()
    start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        monkeypatch.setattr(threading.Thread, "start", start)
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    first, _ = socket.socketpair()
    with pytest.raises(RuntimeError, match="can't start new thread"):
        reader.follow(first, Recorded())
    assert first.fileno() == -1 and reader.streams == 0
    ours, theirs = socket.socketpair()
    theirs.sendall(frame(1, b"read\n"))
    theirs.shutdown(socket.SHUT_WR)
    got = Recorded()
    reader.follow(ours, got)
    assert got.frames == [(1, b"read\n")]
    theirs.close()


def test_a_socket_that_cannot_be_watched_fails_alone():
    reader = SharedReader()
    good, good_theirs = socket.socketpair()
    kept = Recorded()
    going = _follow_in_thread(reader, good, kept)

    class Unwatchable:
        """A socket the selector refuses (its number is gone)."""

        closed = False

        def settimeout(self, _seconds: float | None) -> None:
            pass

        def fileno(self) -> int:
            return -1

        def close(self) -> None:
            self.closed = True

    refused = Unwatchable()
    with pytest.raises(ValueError):
        reader.follow(refused, Recorded())  # type: ignore[arg-type]
    assert refused.closed
    good_theirs.sendall(frame(1, b"still read\n"))
    good_theirs.shutdown(socket.SHUT_WR)
    going.join(10)
    assert going.errors == [] and kept.frames == [(1, b"still read\n")]  # type: ignore[attr-defined]
    good_theirs.close()


def test_a_socket_closed_elsewhere_is_ended_when_its_number_is_taken_again():
    reader = SharedReader()
    lost, lost_peer = socket.socketpair()
    left = _follow_in_thread(reader, lost, Recorded())
    assert _wait_for(lambda: list(reader._followed.values()) == [None])  # watched
    number = lost.fileno()
    lost.close()  # nothing tells the reader: its selector forgets the socket
    lost_peer.close()
    new, new_peer = socket.socketpair()
    taken = new if new.fileno() == number else new_peer
    if taken.fileno() != number:
        pytest.skip("the system gave the new socket another number")
    got = Recorded()
    following = _follow_in_thread(reader, taken, got)
    left.join(10)
    assert [type(e) for e in left.errors] == [OSError]  # type: ignore[attr-defined]
    (new_peer if taken is new else new).sendall(frame(1, b"the new one\n"))
    (new_peer if taken is new else new).shutdown(socket.SHUT_WR)
    following.join(10)
    assert following.errors == [] and got.frames == [(1, b"the new one\n")]  # type: ignore[attr-defined]


def test_a_reset_delivers_what_came_before_it_then_raises():
    class Resetting:
        """A socket whose peer sent these reads, then reset the connection."""

        def __init__(self, *reads: bytes) -> None:
            self.reads = list(reads)

        def recv(self, size: int, flags: int = 0) -> bytes:
            if self.reads:
                return self.reads.pop(0)
            raise ConnectionResetError(104, "Connection reset by peer")

    got = Recorded()
    cut = frame(2, b"cut short")[:-6]
    followed = _Followed(Resetting(frame(1, b"first\n"), frame(1, b"held\n") + cut), got)
    assert followed.read(NOW, TICK, due=False) is None
    assert followed.read(NOW, TICK, due=False) == TICK
    with pytest.raises(ConnectionResetError):
        followed.read(TICK, TICK + 0.2, due=True)
    assert got.take() == [(1, b"first\n"), (1, b"held\n"), (2, b"cut")]
    assert followed.ended


def test_a_socket_with_a_timeout_is_read_without_waiting_for_it():
    reader = SharedReader()
    slow, slow_theirs = socket.socketpair()
    slow.settimeout(60)  # a read would wait for it: the reader must not
    other, other_theirs = socket.socketpair()
    got = Recorded()
    threads = [_follow_in_thread(reader, slow, Recorded()), _follow_in_thread(reader, other, got)]
    slow_theirs.sendall(frame(1, b"a\n"))
    time.sleep(0.02)
    slow_theirs.sendall(frame(1, b"b\n"))  # a trickle: read at the tick, with nothing more
    time.sleep(0.2)
    other_theirs.sendall(frame(1, b"x\n"))
    assert _wait_for(lambda: got.frames == [(1, b"x\n")], 10)  # not after the 60 s
    for theirs in (slow_theirs, other_theirs):
        theirs.shutdown(socket.SHUT_WR)
    for thread in threads:
        thread.join(10)
        assert thread.errors == []  # type: ignore[attr-defined]
    slow_theirs.close()
    other_theirs.close()


def test_an_interrupted_wait_drops_its_stream_and_closes_its_socket(pair):
    import signal

    ours, theirs = pair
    reader = SharedReader()

    def interrupt(signum, frame_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            reader.follow(ours, Recorded())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert _wait_for(lambda: reader.streams == 0)
    theirs.settimeout(10)
    assert theirs.recv(10) == b""  # closed: the engine sees the attach go


# --- what the engine sent with its 101 response ------------------------------------------


@pytest.mark.parametrize("stdin", [False, True], ids=["shared", "own thread"])
def test_output_sent_with_the_upgrade_headers_comes_first(tmp_path, stdin):
    # An exec that prints at once: its first bytes may come in the same read as the
    # engine's 101 headers, into http.client's buffer, before the socket is handed over.
    import docker

    from cldpd_magic.engines.docker import PrivateAPI

    first = frame(1, b"line 0\n") + frame(2, b"err 0\n")
    split = frame(1, b"line 1 split across reads\n")
    path = str(tmp_path / "engine.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def engine() -> None:
        conn, _ = server.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            conn.sendall(
                b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
                b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n" + first + split[:10]
            )
            time.sleep(0.2)
            conn.sendall(split[10:])
            conn.shutdown(socket.SHUT_WR)

    serving = threading.Thread(target=engine, daemon=True)
    serving.start()
    api = docker.APIClient(base_url="unix://" + path, version="1.41")
    if stdin:
        _sock, stream = PrivateAPI.attach_with_stdin(api, "cid")
    else:
        stream = PrivateAPI.attach(api, "cid")
    assert stream.shared is not stdin
    out, err = [], []
    pump(
        stream,
        type("W", (), {"write": lambda self, t: out.append(t)})(),
        type("W", (), {"write": lambda self, t: err.append(t)})(),
    )
    assert "".join(out) == "line 0\nline 1 split across reads\n"
    assert "".join(err) == "err 0\n"
    serving.join(10)
    server.close()
    api.close()
