"""Runs whose agent someone works with while it runs: a Dispatcher's interactive side.

An interactive run's agent takes its prompts on stdin, and cldpd's
:class:`~cldpd_magic.runs.interactive.Conversation` answers its questions (a person, a
policy, a timeout); a driven run's agent is driven by its caller (the SDK transport),
and cldpd answers nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..engines import StdinPipe
from .agent import plan_start, validate_issue_url
from .approvals import ToolPolicy
from .interactive import Conversation, follow_up
from .session import Session, SessionKind

if TYPE_CHECKING:
    from ..pods import Pod
    from .agent import StartPlan
    from .registry import RunRegistry


class InteractiveAPI:
    """Interactive and driven runs, over a class's pods, registry and launch.

    :class:`~cldpd_magic.runs.Dispatcher` has these.
    """

    can_use_tool: ToolPolicy | None
    registry: RunRegistry
    transcript_dir: object

    def pod(self, name: str) -> Pod:
        """Discover one pod by name (the class provides it)."""
        raise NotImplementedError

    def _launch(
        self,
        pod: Pod,
        plan: StartPlan,
        url: str,
        run: str | None,
        timeout: float | None,
        *,
        stdin: StdinPipe | None = None,
    ) -> Session:
        """Name the run and start its session (the class provides it)."""
        raise NotImplementedError

    def drive_session(
        self,
        pod_name: str,
        *,
        issue_url: str | None = None,
        run: str | None = None,
        args: Sequence[str] = (),
        resume: str | None = None,
        timeout: float | None = None,
    ) -> Session:
        """Start a pod's agent for a caller that drives it through its stdin; at once.

        The agent runs interactive (Claude Code's stream-json in and out, tool approvals
        asked on its stdout) whatever pod.json says, and cldpd answers nothing: the
        caller writes the prompts, control requests and approvals to ``session.stdin``
        and reads the agent's lines from the session's events (the Claude Agent SDK's
        transport, :class:`cldpd_magic.sdk.PodTransport`, does). It is a run like any
        other: named, labelled, listed, masked, with a transcript; stopping it stops it.

        Args:
            pod_name: The pod.
            issue_url: The issue the run is on, if any: its line (and the template) is
                ``session.start_prompt``, for the caller to put before its first prompt.
            run: The run's name; made up when None.
            args: CLI arguments after the pod's own (the driver's options).
            resume: A Claude Code session to resume instead of starting a new one.
            timeout: Seconds the agent may run; pod.json's ``timeoutSeconds`` when None.

        Returns:
            The Session; ``session.stdin`` is the agent's stdin (a StdinPipe).

        Raises:
            As :meth:`start_session`.
        """
        url = validate_issue_url(issue_url) if issue_url else ""
        pod = self.pod(pod_name)
        plan = plan_start(pod, url, "", args, timeout, interactive=True, resume=resume)
        pipe = StdinPipe()
        session = self._launch(pod, plan, url, run, timeout, stdin=pipe)
        session.stdin = pipe
        session.start_prompt = plan.prompt
        return session

    def _conversation(self, pod: Pod, run: str, prompt: str) -> Conversation:
        """The conversation of an interactive agent about to start: its first message waits."""
        conversation = Conversation(
            run, StdinPipe(), keep_alive=pod.config.keep_alive,
            approval_timeout=pod.config.approval_timeout_seconds,
            idle_timeout=pod.config.idle_timeout_seconds, policy=self.can_use_tool,
        )  # fmt: skip
        conversation.send_user(prompt)
        return conversation

    def _follow_up(self, live: Session, prompt: str) -> Session:
        """A follow-up sent to a live interactive run's agent (see :func:`follow_up`)."""
        assert live.conversation is not None
        job = follow_up(live, live.conversation, prompt)
        session = Session(live.pod_name, live.container, job, self.transcript_dir,
                          live.mask.values, kind=SessionKind.RESUME,
                          claude_session=live.claude_session, run=live.run,
                          conversation=live.conversation,
                          owns_conversation=False)  # fmt: skip
        return self.registry.register(session)
