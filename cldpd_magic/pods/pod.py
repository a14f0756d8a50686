"""The former single module of pods/, kept while some tests and the benchmarks import it.

Import from :mod:`cldpd_magic.pods` instead; this goes once nothing imports it.
"""

from __future__ import annotations

from .config import json_type, parse_memory, parse_pod_config, validate_image
from .discovery import discover_all, discover_pod, scan_pods
from .model import (
    Mount,
    Pod,
    PodConfig,
    Resources,
    container_name,
    default_image,
    default_pods_dir,
    is_valid_pod_name,
    pod_name_problem,
    resolve_source,
    validate_pod_name,
)
from .unsafe import check_unsafe, mount_danger

__all__ = [
    "Mount",
    "Pod",
    "PodConfig",
    "Resources",
    "check_unsafe",
    "container_name",
    "default_image",
    "default_pods_dir",
    "discover_all",
    "discover_pod",
    "is_valid_pod_name",
    "json_type",
    "mount_danger",
    "parse_memory",
    "parse_pod_config",
    "pod_name_problem",
    "resolve_source",
    "scan_pods",
    "validate_image",
    "validate_pod_name",
]
