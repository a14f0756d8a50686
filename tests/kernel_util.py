"""Run code in a real IPython kernel and collect what it sends on iopub.

``KernelSession`` starts ``python -m ipykernel_launcher`` with this interpreter (no
kernelspec needs to be installed) in an isolated IPython directory::

    with KernelSession(env={"FOO": "1"}) as ks:
        msgs = ks.execute("print(1)")          # iopub messages of that cell
        msg_id = ks.submit("import time; time.sleep(5)")
        ks.wait_for(lambda m: m["msg_type"] == "status", timeout=5)
        ks.interrupt()
        ks.wait(msg_id)

Every message read is also kept in ``ks.messages``, in arrival order, whichever cell
it belongs to (background output arrives while other cells run).
"""

from __future__ import annotations

import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager

Message = dict[str, Any]

_SPEC = KernelSpec(
    argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    display_name="cldpd test kernel",
    language="python",
    resource_dir="",
)


class _Manager(KernelManager):
    """A KernelManager that runs this interpreter, whatever kernelspecs are installed."""

    @property
    def kernel_spec(self) -> KernelSpec:
        return _SPEC


class KernelError(AssertionError):
    """A cell raised, or a kernel did not answer in time."""


def parent_id(msg: Message) -> str:
    """The msg_id of the request a message answers ("" when none)."""
    return (msg.get("parent_header") or {}).get("msg_id", "")


def outputs(msgs: list[Message], types: tuple[str, ...] = ()) -> list[Message]:
    """The output messages among msgs (stream, display data, results, errors)."""
    types = types or (
        "stream", "display_data", "update_display_data", "execute_result", "error",
    )  # fmt: skip
    return [m for m in msgs if m["msg_type"] in types]


def text_of(msg: Message) -> str:
    """Everything readable in one message: stream text, text/plain and text/html, tracebacks."""
    content = msg.get("content", {})
    if msg["msg_type"] == "stream":
        return content.get("text", "")
    if msg["msg_type"] == "error":
        return f"{content.get('ename')}: {content.get('evalue')}"
    data = content.get("data", {})
    return "\n".join(str(data.get(k, "")) for k in ("text/plain", "text/html"))


def display_id(msg: Message) -> str | None:
    """The display_id of a display_data / update_display_data message."""
    return (msg.get("content", {}).get("transient") or {}).get("display_id")


class KernelSession:
    """A kernel of this interpreter and a client to it, for tests.

    Args:
        env: Variables added to (or, with value None, removed from) this process's
            environment for the kernel.
        cwd: The kernel's working directory.
        startup_timeout: Seconds to wait for the kernel to answer.

    Attributes:
        messages: Every iopub message read so far, in arrival order.
        replies: execute_reply messages by request msg_id.
    """

    def __init__(
        self,
        env: dict[str, str | None] | None = None,
        cwd: str | None = None,
        startup_timeout: float = 60,
    ) -> None:
        self._extra_env = dict(env or {})
        self._cwd = cwd
        self._startup_timeout = startup_timeout
        self._dir = ""
        self.km: KernelManager | None = None
        self.kc: Any = None
        self.messages: list[Message] = []
        self.replies: dict[str, Message] = {}
        self._idle: set[str] = set()

    def start(self) -> KernelSession:
        """Start the kernel and wait until it answers."""
        self._dir = tempfile.mkdtemp(prefix="cldpd-kernel-")
        env = {**os.environ, "IPYTHONDIR": os.path.join(self._dir, "ipython")}
        for key, value in self._extra_env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.km = _Manager(
            connection_file=os.path.join(self._dir, "kernel.json"),
            transport="ipc",
            ip=os.path.join(self._dir, "ipc"),
        )
        self.km.start_kernel(env=env, cwd=self._cwd or self._dir)
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=self._startup_timeout)
        except RuntimeError:
            self.shutdown()
            raise
        return self

    def shutdown(self, now: bool = True) -> None:
        """Stop the kernel (its threads die with it) and remove its files."""
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None
        if self.km is not None:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=now)
            self.km = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""

    def __enter__(self) -> KernelSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def interrupt(self) -> None:
        """Interrupt the kernel (SIGINT), as the notebook's stop button does."""
        assert self.km is not None
        self.km.interrupt_kernel()

    def alive(self) -> bool:
        """Whether the kernel process still runs."""
        return self.km is not None and self.km.is_alive()

    def _read(self, timeout: float) -> Message | None:
        try:
            msg = self.kc.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return None
        self.messages.append(msg)
        if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
            self._idle.add(parent_id(msg))
        return msg

    def submit(self, code: str) -> str:
        """Send code to run and return at once with the request's msg_id."""
        return self.kc.execute(code, store_history=True, allow_stdin=False)

    def wait(self, msg_id: str, timeout: float = 60, check: bool = True) -> list[Message]:
        """Read iopub until the request is done; return the messages it parented.

        Args:
            msg_id: From :meth:`submit`.
            timeout: Seconds to wait.
            check: Raise KernelError if the cell raised (its execute_reply says error;
                a UsageError, for one, comes as a stderr stream, not an error message).

        Raises:
            KernelError: Timeout, or (with check) the cell raised.
        """
        deadline = time.monotonic() + timeout
        while msg_id not in self._idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KernelError(f"the kernel did not finish {msg_id} in {timeout} s")
            self._read(min(left, 0.5))
        self._collect_reply(msg_id, deadline)
        msgs = [m for m in self.messages if parent_id(m) == msg_id]
        reply = self.replies.get(msg_id, {}).get("content", {})
        if check and reply.get("status") == "error":
            raise KernelError(f"{reply.get('ename')}: {reply.get('evalue')}")
        return msgs

    def _collect_reply(self, msg_id: str, deadline: float) -> None:
        while msg_id not in self.replies:
            try:
                reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                return
            self.replies[parent_id(reply)] = reply

    def execute(self, code: str, timeout: float = 60, check: bool = True) -> list[Message]:
        """Run code and return the iopub messages of that cell (see :meth:`wait`)."""
        return self.wait(self.submit(code), timeout, check)

    def wait_for(
        self, predicate: Callable[[Message], bool], timeout: float = 30, since: int | None = None
    ) -> Message:
        """Read iopub until a message satisfies predicate; return it.

        Args:
            predicate: Tells the message looked for.
            timeout: Seconds to wait.
            since: Look first at the messages already read from this index of
                :attr:`messages` on; by default only new messages count.

        Raises:
            KernelError: None came in time.
        """
        if since is not None:
            for msg in self.messages[since:]:
                if predicate(msg):
                    return msg
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KernelError(f"no matching iopub message in {timeout} s")
            msg = self._read(min(left, 0.5))
            if msg is not None and predicate(msg):
                return msg

    def drain(self, quiet: float = 0.3, timeout: float = 10) -> list[Message]:
        """Read iopub until quiet for ``quiet`` seconds, or for ``timeout``; return what came."""
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (msg := self._read(quiet)) is not None:
            got.append(msg)
        return got

    def value(self, expression: str, timeout: float = 60) -> str:
        """Evaluate an expression in the kernel and return its text/plain repr."""
        msgs = self.execute(expression, timeout)
        results = outputs(msgs, ("execute_result",))
        if not results:
            raise KernelError(f"{expression!r} gave no result")
        return results[-1]["content"]["data"]["text/plain"]
