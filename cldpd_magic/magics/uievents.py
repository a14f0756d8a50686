"""Widget clicks while a cell blocks: the kernel's comm messages handled from the cell's wait.

A kernel runs one shell request at a time: while ``%cldpd_start`` blocks, a click on a
widget (a comm message from the frontend) waits behind it, so an approval row under a
blocking run could never be answered. :class:`UiEvents` lets the cell's wait loop take the
shell messages that came meanwhile: comm messages (widget events) are handled at once, on
the kernel's main thread as usual; every other request (the next cell, a completion) is
put back in line, in order, to run after the cell as it would have.

This is what ``jupyter-ui-poll`` does, for the kernels it no longer serves: it calls
``kernel.do_one_iteration()``, which ipykernel 7.1 removed (ipython/ipykernel#1458), so
under ipykernel 7 it handles nothing. The kernel's internals it reads are few and named
in :class:`_KernelInternals`; a kernel without them (another kernel, a plain IPython, a
future ipykernel) gets no UiEvents and the cell just waits, as before.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..logs import log_swallowed

logger = logging.getLogger(__package__)

#: The shell messages a widget sends; everything else runs after the cell.
COMM_TYPES = frozenset({"comm_open", "comm_msg", "comm_close"})


class _KernelInternals:
    """What UiEvents reads of an ipykernel, each with why (no public API offers it).

    - The stream the main shell's requests arrive on: ipykernel 7 forwards them from its
      shell channel thread over an inproc socket pair
      (``shell_channel_thread.manager.get_shell_channel_to_subshell_pair(None)``);
      ipykernel 6 reads them from ``kernel.shell_stream``. While a cell blocks the kernel's
      event loop, they wait in that socket.
    - The stream's own callback (pyzmq's ``ZMQStream._recv_callback``): a request taken
      out of the socket that is not a comm message is handed to it later on the event
      loop, exactly as the stream would have, so the kernel runs it in its order.
    """

    def __init__(self, kernel: Any) -> None:
        if getattr(kernel, "_supports_kernel_subshells", False):
            manager = kernel.shell_channel_thread.manager
            stream = manager.get_shell_channel_to_subshell_pair(None).to_stream
        else:
            stream = kernel.shell_stream
        callback = getattr(stream, "_recv_callback", None)
        if stream is None or callback is None or kernel.io_loop is None:
            raise AttributeError("the kernel's shell stream is not set up")
        self.kernel = kernel
        self.stream = stream
        self.callback: Callable[[list[Any]], Any] = callback
        self.io_loop = kernel.io_loop
        self.session = kernel.session
        self.handlers = kernel.shell_handlers


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (kernel interrupt) back until a message taken is handed on."""
    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if got:
            raise KeyboardInterrupt


class UiEvents:
    """Handles the widget events of a kernel whose main thread a cell keeps busy.

    Made by :meth:`of`; :meth:`poll` is called on the kernel's main thread (the cell's),
    now and then while the cell waits.

    Args:
        internals: The kernel's parts it uses.
    """

    def __init__(self, internals: _KernelInternals) -> None:
        self._k = internals

    @classmethod
    def of(cls, shell: Any) -> UiEvents | None:
        """The UiEvents of a shell's kernel; None outside an ipykernel's main thread."""
        kernel = getattr(shell, "kernel", None)
        if kernel is None or threading.current_thread() is not threading.main_thread():
            return None
        try:
            internals = _KernelInternals(kernel)
        except Exception:  # another kernel, or another ipykernel: no polling
            log_swallowed(logger, "this kernel's widget events cannot be polled")
            return None
        return cls(internals)

    def poll(self, limit: int = 100) -> int:
        """Handle the comm messages that came (at most ``limit``); put the rest back in line.

        Returns:
            How many messages were taken.
        """
        import zmq

        socket = self._k.stream.socket
        taken = 0
        while taken < limit:
            with _sigint_deferred():
                try:
                    raw = socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return taken
                taken += 1
                message = self._comm_message(raw)
                if message is None:
                    self._k.io_loop.add_callback(self._k.callback, raw)
                    continue
            self._handle(*message)
        return taken

    def _comm_message(self, raw: list[Any]) -> tuple[list[Any], dict[str, Any]] | None:
        """The identities and message of a comm message; None for any other request."""
        session = self._k.session
        try:
            idents, frames = session.feed_identities(raw, copy=False)
            header = session.unpack(frames[1].bytes)
        except Exception:
            return None  # the kernel will say what is wrong with it
        if not isinstance(header, dict) or header.get("msg_type") not in COMM_TYPES:
            return None
        try:
            return idents, session.deserialize(frames, content=True, copy=False)
        except Exception:
            log_swallowed(logger, "a widget message could not be read")
            return None

    def _handle(self, idents: list[Any], message: dict[str, Any]) -> None:
        handler = self._k.handlers.get(message["header"]["msg_type"])
        if handler is None:
            return
        try:
            result = handler(self._k.stream, idents, message)
            if inspect.isawaitable(result):
                self._k.io_loop.add_future(result, lambda future: future.result())
        except Exception:
            log_swallowed(logger, "a widget event failed")


#: Seconds between two looks at the widgets' events while a cell waits for a run that asks.
POLL_INTERVAL = 0.05


def wait_until(
    shell: Any,
    finished: Callable[[float], bool],
    *,
    widgets: bool,
    settled: Callable[[], bool] = lambda: False,
) -> bool:
    """Block a cell until ``finished(seconds)`` (a wait of at most that long) is true.

    Args:
        shell: The IPython shell.
        finished: Waits up to the given seconds; true once what the cell follows is over.
        widgets: Handle widget events meanwhile (a run that may ask for approvals).
        settled: Checked after each wait: true returns early (an agent that waits for a
            follow-up), the cell going on showing what comes.

    Returns:
        Whether it returned early, settled.
    """
    with ui_events(shell, widgets) as poll:
        while not finished(POLL_INTERVAL if widgets else 0.25):
            poll()
            if settled():
                return True
    return False


def wait_followed(shell: Any, feed: Any, session: Any) -> None:
    """Block a cell until a run's last view is shown (``feed.join``).

    An interactive run's cell handles clicks meanwhile (its approval rows), and returns
    once its kept-alive agent waits for a follow-up, its turn's end shown.

    Args:
        shell: The IPython shell.
        feed: The run's live feed (:class:`~cldpd_magic.render.LiveFeed`).
        session: The run's session.
    """
    conversation = session.conversation
    if conversation is None:
        wait_until(shell, feed.join, widgets=False)
        return
    owner = session.owns_conversation  # a follow-up's session ends with its turn
    if not wait_until(shell, feed.join, widgets=True,
                      settled=lambda: owner and conversation.waiting.is_set()):  # fmt: skip
        return
    # The agent said it waits before the feed showed its last lines: one publication
    # more (a few intervals at most) shows them in the cell before it returns.
    seen, end = feed.publications, time.monotonic() + 2 * feed.interval + 1.0

    def caught_up(seconds: float) -> bool:
        return feed.join(seconds) or feed.publications > seen or time.monotonic() > end

    wait_until(shell, caught_up, widgets=True)


@contextlib.contextmanager
def ui_events(shell: Any, wanted: bool = True) -> Iterator[Callable[[], int]]:
    """``with ui_events(shell) as poll:`` a wait loop that calls ``poll()`` now and then.

    Args:
        shell: The IPython shell.
        wanted: Whether to handle widget events at all (a run that asks nothing: no).

    Yields:
        ``poll()``: handles the widget events that came; does nothing outside a kernel.
    """
    events = UiEvents.of(shell) if wanted else None
    yield events.poll if events is not None else (lambda: 0)


__all__ = ["COMM_TYPES", "POLL_INTERVAL", "UiEvents", "ui_events", "wait_followed", "wait_until"]
