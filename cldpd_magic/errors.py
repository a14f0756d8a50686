"""Exceptions raised by cldpd_magic.

Every error a user can cause is a :class:`CldpdError` whose message is one sentence
saying what went wrong and what to do about it.
"""

from __future__ import annotations


def one_line(text: object) -> str:
    """Fold any text (an engine's message, a traceback-free error) into one line."""
    return " ".join(str(text).split())


class CldpdError(Exception):
    """Base class of every cldpd_magic error."""


class PodNotFoundError(CldpdError):
    """The named pod has no directory in the pods directory."""


class InvalidPodError(CldpdError):
    """The pod directory exists but is not a usable pod (no Dockerfile, bad name, ...)."""


class PodConfigError(CldpdError):
    """A pod's ``pod.json`` is malformed, has unknown keys or values of the wrong type."""


class InvalidRequestError(CldpdError, ValueError):
    """An argument is not acceptable, such as an issue URL that is not http(s)."""


class BuildFailedError(CldpdError):
    """Building the pod's image failed.

    Attributes:
        log_tail: The last lines of the build log.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class ContainerFailedError(CldpdError):
    """The agent's container exited with a non-zero code, or could not run at all.

    Attributes:
        exit_code: The container's exit code, -1 when it never ran.
    """

    def __init__(self, message: str, exit_code: int = -1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class SessionNotFoundError(CldpdError):
    """Nothing is running for the pod (resume, attach or exec with no running container)."""


class StdinClosedError(SessionNotFoundError):
    """A run's agent reads no more input: its stdin was closed, or the agent has ended."""


class DockerUnavailableError(CldpdError):
    """The Docker engine cannot be reached."""


class StopFailedError(CldpdError):
    """A container could not be stopped."""


class PodRunningError(CldpdError):
    """A container for the pod is already running."""


__all__ = [
    "BuildFailedError",
    "CldpdError",
    "ContainerFailedError",
    "DockerUnavailableError",
    "InvalidPodError",
    "InvalidRequestError",
    "PodConfigError",
    "PodNotFoundError",
    "PodRunningError",
    "SessionNotFoundError",
    "StdinClosedError",
    "StopFailedError",
    "one_line",
]
