"""The blocking API: start or resume a run and follow it as text to its end."""

from __future__ import annotations

import sys

from ..engines import Writer
from ..errors import ContainerFailedError
from ..render import TextFeed
from .approvals import deny_unattended
from .session import Session


def _follow_to_end(session: Session, stdout: Writer | None, check: bool, raw: bool) -> int:
    """Write a session's output as text until it ends; a Ctrl-C stops it gracefully.

    Args:
        session: The running session.
        stdout: Receives its output, rendered as text; ``sys.stdout`` when None. Its
            stderr goes to ``sys.stderr``.
        check: Raise ContainerFailedError on a non-zero exit code.
        raw: Write the agent's stdout lines verbatim (masked) instead of rendered.

    Returns:
        The agent's exit code.

    Raises:
        ContainerFailedError: Non-zero exit and ``check``.
    """
    out = stdout if stdout is not None else sys.stdout
    conversation = session.conversation
    if conversation is not None:
        conversation.end_when_idle()  # nothing here sends follow-ups
        if conversation.policy is None:  # nor answers questions: never wait for one
            conversation.policy = deny_unattended
    try:
        TextFeed(session, out, sys.stderr, raw=raw, notes=False).follow()
        code = session.wait()
    except KeyboardInterrupt:
        session.stop()
        raise
    if check and code != 0:
        raise ContainerFailedError(
            f"The agent in pod {session.pod_name} exited with code {code}.", exit_code=code
        )
    return code


class BlockingAPI:
    """``start`` and ``resume`` that block, over a class's ``start_session`` and ``resume_session``.

    :class:`~cldpd_magic.runs.Dispatcher` has these; they make a session and
    follow it with :class:`~cldpd_magic.render.TextFeed` until it ends.
    """

    def start_session(self, pod_name: str, issue_url: str) -> Session:
        """Start a run, returning at once (the class provides it)."""
        raise NotImplementedError

    def resume_session(self, pod_name: str, prompt: str) -> Session:
        """Resume a run, returning at once (the class provides it)."""
        raise NotImplementedError

    def start(
        self,
        pod_name: str,
        issue_url: str,
        stdout: Writer | None = None,
        *,
        check: bool = True,
        raw: bool = False,
    ) -> int:
        """Build and run the pod's agent on an issue, streaming its output; block until it ends.

        Args:
            pod_name: The pod.
            issue_url: The GitHub issue's http(s) URL.
            stdout: Receives the agent's output, rendered as text (tool calls, answers,
                the result line; secrets masked, terminal escapes dropped); ``sys.stdout``
                when None. Its stderr goes to ``sys.stderr``.
            check: Raise ContainerFailedError on a non-zero exit code.
            raw: Write the agent's stdout lines verbatim (stream-json as it came, masked
                as raw text) instead of rendered.

        Returns:
            The agent's exit code.

        Raises:
            ContainerFailedError: Non-zero exit and ``check``.
            BuildFailedError: The image did not build.
            CldpdError: As :meth:`start_session`.
        """
        return _follow_to_end(self.start_session(pod_name, issue_url), stdout, check, raw)

    def resume(
        self,
        pod_name: str,
        prompt: str,
        stdout: Writer | None = None,
        *,
        check: bool = True,
        raw: bool = False,
    ) -> int:
        """Send a follow-up prompt to the running pod and block until the agent answers.

        Args:
            pod_name: The pod.
            prompt: The follow-up prompt.
            stdout: Receives the agent's output, rendered as text; ``sys.stdout`` when
                None (see :meth:`start`).
            check: Raise ContainerFailedError on a non-zero exit code.
            raw: Write the agent's stdout lines verbatim instead of rendered.

        Returns:
            The exit code.

        Raises:
            SessionNotFoundError: Nothing runs for the pod.
            ContainerFailedError: Non-zero exit and ``check``.
        """
        return _follow_to_end(self.resume_session(pod_name, prompt), stdout, check, raw)
