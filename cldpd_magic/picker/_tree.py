"""Closing a tree of widgets, children first."""

from __future__ import annotations

from typing import Any


def close_tree(widget: Any) -> None:
    """Close a widget and, first, every widget below it (``children``)."""
    for child in getattr(widget, "children", ()):
        close_tree(child)
    widget.close()
