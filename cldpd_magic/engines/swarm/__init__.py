"""The Runner on a Docker Swarm: runs as replicated-job services."""

from .runner import LABEL_ENDPOINT, LABEL_SECRET_OF, SwarmRunner

__all__ = [
    "LABEL_ENDPOINT",
    "LABEL_SECRET_OF",
    "SwarmRunner",
]
