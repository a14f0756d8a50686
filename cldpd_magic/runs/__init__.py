"""One run, whatever the engine: the session, usage, batches, the dispatcher, the run
registry, what a run's worker does, egress orchestration.
"""

from .agent import (
    StartPlan,
    agent_command,
    build_prompt,
    cap_args,
    check_command_line,
    issue_number,
    plan_start,
    pod_limits,
    validate_issue_url,
    with_deadline,
)
from .approvals import Approvals, PermissionRequest, ToolPolicy, deny_unattended
from .batch import RESULT_KEYS, Batch, RunSpec, Variant, plan_batch
from .blocking import BlockingAPI
from .dispatcher import Dispatcher, default_transcript_dir
from .egress import (
    EgressAttempt,
    EgressGuard,
    egress_base,
    egress_image_tag,
    egress_name,
    egress_reports,
    egress_resources,
    parse_access_line,
    remove_egress_of,
    rules_image_tag,
    seconds_since,
    sweep_orphans,
)
from .interactive import Conversation, follow_up
from .jobs import RunJobs
from .registry import (
    LABEL_POD,
    RunningPod,
    RunRegistry,
    abandoned,
    run_of,
    start_options,
    sweep_abandoned,
)
from .session import RunGuard, Session, SessionControl, SessionKind, StopReason, read_transcript
from .usage import Limits, UsageMeter, estimate_cost, usage_from_transcript

__all__ = [
    "LABEL_POD",
    "RESULT_KEYS",
    "Approvals",
    "Batch",
    "BlockingAPI",
    "Conversation",
    "Dispatcher",
    "EgressAttempt",
    "EgressGuard",
    "Limits",
    "PermissionRequest",
    "RunGuard",
    "RunJobs",
    "RunRegistry",
    "RunSpec",
    "RunningPod",
    "Session",
    "SessionControl",
    "SessionKind",
    "StartPlan",
    "StopReason",
    "ToolPolicy",
    "UsageMeter",
    "Variant",
    "abandoned",
    "agent_command",
    "build_prompt",
    "cap_args",
    "check_command_line",
    "default_transcript_dir",
    "deny_unattended",
    "egress_base",
    "egress_image_tag",
    "egress_name",
    "egress_reports",
    "egress_resources",
    "estimate_cost",
    "follow_up",
    "issue_number",
    "parse_access_line",
    "plan_batch",
    "plan_start",
    "pod_limits",
    "read_transcript",
    "remove_egress_of",
    "rules_image_tag",
    "run_of",
    "seconds_since",
    "start_options",
    "sweep_abandoned",
    "sweep_orphans",
    "usage_from_transcript",
    "validate_issue_url",
    "with_deadline",
]
