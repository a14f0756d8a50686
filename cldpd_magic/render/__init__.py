"""Typed events to text and HTML: cleaning, the stream-json renderer, Markdown, views,
feeds, tables.
"""

from .clean import clean_text
from .diff import (
    ChangesBatchView,
    ChangesReport,
    changes_html,
    changes_summary,
    changes_text,
    compare_html,
    compare_text,
    file_diff_html,
    with_changes,
)
from .feeds import DEFAULT_FLUSH_INTERVAL, BatchFeed, LiveFeed, RunSource, TextFeed
from .markdown import markdown_to_html
from .stream import Line, StreamRenderer, render_output_line, tool_call
from .tables import SELECTED_MARK, BatchView, Report, Table, run_name
from .views import DEFAULT_MAX_LINES, RunLines, SessionView

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_LINES",
    "SELECTED_MARK",
    "BatchFeed",
    "BatchView",
    "ChangesBatchView",
    "ChangesReport",
    "Line",
    "LiveFeed",
    "Report",
    "RunLines",
    "RunSource",
    "SessionView",
    "StreamRenderer",
    "Table",
    "TextFeed",
    "changes_html",
    "changes_summary",
    "changes_text",
    "clean_text",
    "compare_html",
    "compare_text",
    "file_diff_html",
    "markdown_to_html",
    "render_output_line",
    "run_name",
    "tool_call",
    "with_changes",
]
