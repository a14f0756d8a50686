"""A scripted Anthropic Messages API, to run the real Claude Code CLI without a model.

The scenario format and the command line are in the docstring of :mod:`.server`::

    python -m cldpd_magic.model_server serve --port 8123 --scenario scenario.json
"""

from .server import (
    RecordedRequest,
    Scenario,
    ScriptedModelServer,
    ToolCall,
    Turn,
    block_text,
    content_blocks,
    error_body,
    is_conversation,
    main,
    sse,
    stream_events,
)

__all__ = [
    "RecordedRequest",
    "Scenario",
    "ScriptedModelServer",
    "ToolCall",
    "Turn",
    "block_text",
    "content_blocks",
    "error_body",
    "is_conversation",
    "main",
    "sse",
    "stream_events",
]
