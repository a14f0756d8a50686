"""Markdown to safe HTML: links and images checked, secrets kept masked, bounded work."""

from __future__ import annotations

import html
import logging
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token

from ..logs import log_swallowed
from .clean import clean_text

log = logging.getLogger(__package__)


_MASK_STAND_IN = "\ue000"
_SAFE_LINK_RE = re.compile(r"(?:https?://|mailto:|#)", re.IGNORECASE)
_LANGUAGE_RE = re.compile(r"[\w+#.-]{1,40}")
_LINK_REL = "noopener noreferrer nofollow"


def _safe_link(url: str) -> bool:
    """Only http(s), mailto and in-page anchors: never javascript:, data:, relative URLs."""
    return bool(_SAFE_LINK_RE.match(url))


def _render_link_open(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    token = tokens[idx]
    href = str(token.attrGet("href") or "")
    if not _safe_link(href):  # an empty target (``[x]()``) is not validated by the parser
        token.attrs.pop("href", None)
    elif not href.startswith("#"):
        token.attrSet("target", "_blank")
    token.attrSet("rel", _LINK_REL)
    return self.renderToken(tokens, idx, options, env)


def _render_image(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    # An image becomes a link to it: nothing is loaded from a URL an agent chose.
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env) or "image"
    label = f"[image: {html.escape(alt)}]"
    src = str(token.attrGet("src") or "")
    if not _safe_link(src):  # an empty source (``![x]()``) is not validated by the parser
        return label
    return f'<a href="{html.escape(src)}" target="_blank" rel="{_LINK_REL}">{label}</a>'


def _render_fence(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    token = tokens[idx]
    language = token.info.strip().split(maxsplit=1)[0] if token.info.strip() else ""
    token.info = language if _LANGUAGE_RE.fullmatch(language) else ""
    return self.rules["_fence"](tokens, idx, options, env)


def _render_cell_open(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    tokens[idx].attrs.pop("style", None)  # alignment styles: no style attribute at all
    return self.renderToken(tokens, idx, options, env)


def _make_markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    md.validateLink = _safe_link  # type: ignore[method-assign]
    md.renderer.rules["_fence"] = md.renderer.rules["fence"]
    md.add_render_rule("link_open", _render_link_open)
    md.add_render_rule("image", _render_image)
    md.add_render_rule("fence", _render_fence)
    md.add_render_rule("th_open", _render_cell_open)
    md.add_render_rule("td_open", _render_cell_open)
    return md


_MARKDOWN = _make_markdown()
_MARKDOWN_LOCK = threading.Lock()


#: Markdown larger than this, or with more link and emphasis marks, is shown as text:
#: markdown-it-py takes time quadratic in nested brackets (``"![" * 10000``: a second).
MARKDOWN_PARSE_MAX_CHARS = 200_000
MARKDOWN_MAX_MARKS = 2_000
#: Inline tokens whose text a reader sees, joined, once the Markdown is rendered.
_SHOWN_TEXT = ("text", "code_inline", "softbreak", "hardbreak")


def _mask_tokens(tokens: Iterable[Any], mask: Callable[[str], str]) -> None:
    """Mask decoded text (entities and escapes resolved) and link targets of parsed tokens.

    A secret split by markup (``sk-**ant**-…``) shows whole once rendered: a run of
    inline text that holds one when joined is replaced by its masked plain text.
    """
    for token in tokens:
        if token.content:
            token.content = mask(token.content)
        for name in ("href", "src", "title"):
            value = token.attrGet(name)
            if isinstance(value, str) and value:
                token.attrSet(name, mask(value))
        if token.children:
            _mask_tokens(token.children, mask)
            shown = "".join(c.content for c in token.children if c.type in _SHOWN_TEXT)
            masked = mask(shown)
            if masked != shown:
                token.children = [Token("text", "", 0, content=masked)]


def markdown_to_html(text: str, mask: Callable[[str], str] | None = None) -> str:
    """Render the Markdown that agents write as HTML that is safe in a trusted page.

    CommonMark with tables and strikethrough, through markdown-it-py: raw HTML is shown
    as text, links only to http, https, mailto or anchors (opening in a new tab, with
    ``rel="noopener noreferrer nofollow"``), images become links (nothing is loaded),
    every attribute is quoted and escaped, terminal escapes and control characters dropped.

    Args:
        text: The Markdown.
        mask: Applied to the decoded text of the document (after entities and escapes).

    Returns:
        The HTML; on any failure of the Markdown library, the escaped text.
    """
    text = clean_text(text)
    if len(text) > MARKDOWN_PARSE_MAX_CHARS or sum(map(text.count, "[*_")) > MARKDOWN_MAX_MARKS:
        return f"<pre>{html.escape(mask(text) if mask else text)}</pre>"
    try:
        with _MARKDOWN_LOCK:  # the parser and renderer are not documented as thread-safe
            env: dict[str, Any] = {}
            tokens = _MARKDOWN.parse(text, env)
            if mask is not None:
                _mask_tokens(tokens, mask)
            return _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, env)
    except Exception:  # e.g. RecursionError on pathological nesting
        log_swallowed(log, "Markdown rendering failed; shown as text", mask)
        return f"<pre>{html.escape(mask(text) if mask else text)}</pre>"
