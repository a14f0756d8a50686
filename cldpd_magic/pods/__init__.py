"""What a pod is: the model, pod.json (network, credentials too), discovery, templates.

``model`` (Pod, PodConfig, Mount, Resources, names and images), ``config`` (pod.json, a
parser per key), ``unsafe`` (the dangers pod.json may only waive), ``policy`` (network
allowlists and credentials), ``discovery`` (pods in a directory), ``scaffold`` (new pods
from templates).
"""

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
from .policy import (
    CREDENTIAL_KINDS,
    AllowRule,
    CredentialKind,
    EgressPolicy,
    brokered_credentials,
    check_credentials,
    parse_allow_rule,
    parse_credentials,
    parse_network_allow,
)
from .scaffold import (
    DEFAULT_TEMPLATE,
    TEMPLATES_DIR,
    Scaffold,
    Template,
    create_pod,
    get_template,
    list_templates,
    template_names,
)
from .unsafe import check_unsafe, mount_danger

__all__ = [
    "CREDENTIAL_KINDS",
    "DEFAULT_TEMPLATE",
    "TEMPLATES_DIR",
    "AllowRule",
    "CredentialKind",
    "EgressPolicy",
    "Mount",
    "Pod",
    "PodConfig",
    "Resources",
    "Scaffold",
    "Template",
    "brokered_credentials",
    "check_credentials",
    "check_unsafe",
    "container_name",
    "create_pod",
    "default_image",
    "default_pods_dir",
    "discover_all",
    "discover_pod",
    "get_template",
    "is_valid_pod_name",
    "json_type",
    "list_templates",
    "mount_danger",
    "parse_allow_rule",
    "parse_credentials",
    "parse_memory",
    "parse_network_allow",
    "parse_pod_config",
    "pod_name_problem",
    "resolve_source",
    "scan_pods",
    "template_names",
    "validate_image",
    "validate_pod_name",
]
