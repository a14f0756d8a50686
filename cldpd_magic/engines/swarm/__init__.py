"""The Runner on a Docker Swarm: runs as replicated-job services, one module per resource."""

from .images import Images
from .logs import Logs
from .nodes import LABEL_ENDPOINT, GatedFollower, Nodes
from .runner import SwarmRunner
from .services import LABEL_SECRET_OF, UNSUPPORTED_ON_SWARM, Services

__all__ = [
    "LABEL_ENDPOINT",
    "LABEL_SECRET_OF",
    "UNSUPPORTED_ON_SWARM",
    "GatedFollower",
    "Images",
    "Logs",
    "Nodes",
    "Services",
    "SwarmRunner",
]
