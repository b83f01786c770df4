"""HTML mail -> readable plain text.

Written on lxml (libxml2's HTML parser, fast and tolerant of broken markup)
rather than a general-purpose renderer because mail HTML is mostly layout
tables, and laying those out costs far more than the rest of normalization
together. The output keeps what a reader needs: paragraphs and line breaks,
list items, headings on their own lines, and links as ``text (url)``. Head,
style, script and other non-visible content never appears. The walk is
iterative, so deeply nested markup cannot exhaust the stack.
"""

from __future__ import annotations

import re
import threading

from lxml import etree

_SKIP = frozenset(
    {
        "head", "title", "style", "script", "noscript", "template", "svg", "math",
        "object", "embed", "iframe", "meta", "link", "select", "button", "datalist",
    }
)  # fmt: skip
_PARAGRAPH = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "blockquote", "pre",
     "hr", "figure", "address"}
)  # fmt: skip
_LINE = frozenset(
    {"div", "tr", "li", "dt", "dd", "section", "article", "header", "footer", "nav", "main",
     "aside", "form", "center", "caption", "tbody", "thead", "tfoot", "fieldset", "legend",
     "details", "summary", "body", "html"}
)  # fmt: skip
_CELL = frozenset({"td", "th"})
_SPACE_RE = re.compile(r"[ \t\r\n\f\v\u00a0\u200b]+")
_LINKABLE = ("http://", "https://", "mailto:", "tel:")
MAX_LINK_CHARS = 500
_local = threading.local()  # lxml parsers must not be shared between threads


def _parser() -> etree.HTMLParser:
    parser: etree.HTMLParser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = etree.HTMLParser(
            remove_comments=True, remove_pis=True, no_network=True, recover=True
        )
        _local.parser = parser
    return parser


class _Out:
    """Accumulates text, turning requested breaks into at most two newlines."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pending = 0  # newlines owed before the next text
        self.at_line_start = True
        self.space = False  # the last text written ends with a space

    def brk(self, n: int) -> None:
        if self.parts and n > self.pending:
            self.pending = n

    def hard_newline(self) -> None:
        self.parts.append("\n")
        self.pending = 0
        self.at_line_start = True
        self.space = False

    def text(self, raw: str, pre: bool = False) -> None:
        if pre:
            text = raw.replace("\r\n", "\n")
        elif raw.isspace():  # whitespace between tags: at most one space
            if not (self.at_line_start or self.pending or self.space):
                self.parts.append(" ")
                self.space = True
            return
        else:
            text = _SPACE_RE.sub(" ", raw)
            if self.at_line_start or self.pending or self.space:
                text = text.lstrip(" ")
            if not text:
                return
        if self.pending:
            self.parts.append("\n" * self.pending)
            self.pending = 0
        self.parts.append(text)
        self.at_line_start = text[-1] == "\n"
        self.space = text[-1] == " "


_K_SKIP, _K_PARA, _K_LINE, _K_CELL, _K_OTHER = range(5)
_KIND = {
    **dict.fromkeys(_SKIP, _K_SKIP),
    **dict.fromkeys(_PARAGRAPH, _K_PARA),
    **dict.fromkeys(_LINE, _K_LINE),
    **dict.fromkeys(_CELL, _K_CELL),
}
_SPECIAL = frozenset({"pre", "ul", "ol", "li", "br", "hr", "img", "a"})


def html_to_text(markup: str) -> str:
    """Readable text of an HTML document or fragment ("" when it holds none)."""
    if not markup.strip():
        return ""
    try:
        root = etree.fromstring(markup, _parser())
    except (etree.ParserError, etree.XMLSyntaxError, ValueError):
        return ""
    if root is None:
        return ""
    out = _Out()
    write = out.text
    pre = 0
    lists: list[int] = []  # for each open list: 0 for ul, else the next number
    links: list[tuple[int, str | None]] = []
    walker = etree.iterwalk(root, events=("start", "end"))
    for event, el in walker:
        tag = el.tag
        if not isinstance(tag, str):
            if event == "start":
                walker.skip_subtree()
            elif tail := el.tail:
                write(tail, pre > 0)
            continue
        kind = _KIND.get(tag, _K_OTHER)  # libxml2's HTML parser lower-cases tag names
        if event == "start":
            if kind == _K_SKIP:
                walker.skip_subtree()
                continue
            if kind == _K_PARA:
                out.brk(1 if tag in ("ul", "ol") and lists else 2)
            elif kind == _K_LINE:
                out.brk(1)
            elif kind == _K_CELL and not out.at_line_start and not out.pending:
                write(" ")
            if tag in _SPECIAL:
                _open(tag, el, out, lists, links)
                if tag == "pre":
                    pre += 1
            if text := el.text:
                write(text, pre > 0)
            continue
        if kind == _K_SKIP:
            if tail := el.tail:
                write(tail, pre > 0)
            continue
        if tag in _SPECIAL:
            if tag == "a" and links:
                _close_link(out, *links.pop())
            elif tag == "pre":
                pre -= 1
            elif tag in ("ul", "ol") and lists:
                lists.pop()
        if kind == _K_PARA:
            out.brk(1 if tag in ("ul", "ol") and lists else 2)
        elif kind == _K_LINE:
            out.brk(1)
        if tail := el.tail:
            write(tail, pre > 0)
    text = "".join(out.parts)
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _open(
    tag: str, el: etree._Element, out: _Out, lists: list[int], links: list[tuple[int, str | None]]
) -> None:
    if tag in ("ul", "ol"):
        lists.append(0 if tag == "ul" else 1)
    elif tag == "li":
        indent = "  " * max(len(lists) - 1, 0)
        if lists and lists[-1]:
            bullet = f"{lists[-1]}. "
            lists[-1] += 1
        else:
            bullet = "* "
        out.text(indent + bullet, pre=True)
        out.at_line_start = False
    elif tag == "br":
        out.hard_newline()
    elif tag == "hr":
        out.text("---", pre=True)
        out.brk(2)
    elif tag == "img":
        alt = (el.get("alt") or "").strip()
        if alt:
            out.text(alt)
    elif tag == "a":
        href = (el.get("href") or "").strip()
        links.append((len(out.parts), href if href.lower().startswith(_LINKABLE) else None))


def _close_link(out: _Out, start: int, href: str | None) -> None:
    """Show the target after the link text, unless the text already is the target."""
    if not href or len(href) > MAX_LINK_CHARS:
        return
    label = "".join(out.parts[start:]).strip()
    shown = href.removeprefix("mailto:").removeprefix("tel:")
    if not label:
        out.text(href)
    elif shown.rstrip("/") not in (label.rstrip("/"), label):
        out.text(f" ({href})")
