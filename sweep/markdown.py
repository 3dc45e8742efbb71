"""Strings from people and folders (prompts, trial names, `reason=`, `by=`, stored notes) made inert in Markdown.

report.md, the model card (README.md), the MLflow parent run's description (mlflow.note.content) and the registered
model's description are rendered as Markdown, HTML included: a prompt holding `<img src=x onerror=...>` or
`![x](http://host/)` would run or load there, and a `|` would break a table. Every such string goes through `text`
(or `code`) where it is written into Markdown; what the tool writes itself (headings, its own links) does not."""
from __future__ import annotations

import html
import re

_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# code spans, links and images ([text](url), ![alt](url)), table cells; emphasis is left alone (harmless), and a
# string never starts a line (line breaks become spaces), so no heading, list or quote either
_MARKUP = set("\\`[]|")
_SAFE_CODE = re.compile(r"[^`<>&|\r\n\u2028\u2029\x0b\x0c\x85]*")
_NEWLINES = re.compile(r"\r\n|[\r\n\u2028\u2029\x0b\x0c\x85]")


def text(value: object) -> str:
    """`value` as inert text in Markdown: HTML's special characters as entities (no tag, no autolink), the
    characters of code spans, links, images and table cells backslash-escaped, line breaks as spaces. Renders as the
    characters given; reads almost as they are in the file."""
    out = []
    for ch in _NEWLINES.sub(" ", str(value)):
        out.append(_HTML.get(ch) or ("\\" + ch if ch in _MARKUP else ch))
    return "".join(out)


def code(value: object) -> str:
    """`value` as inline code (`lr=0.0001@300`, a path): shown verbatim, nothing inside it is markup. A value that
    code cannot hold safely everywhere (a backtick, a table pipe, HTML's `<`, `>`, `&`, a line break) is given as
    escaped text instead: inert either way."""
    s = str(value)
    return f"`{s}`" if _SAFE_CODE.fullmatch(s) else text(s)


_ESCAPED = re.compile(r"\\([\\`\[\]|])")


def plain(markdown: str) -> str:
    """A line of this module's Markdown as a terminal shows it: no emphasis or code marks, escapes and entities
    turned back into the characters they stand for (the console is no renderer)."""
    s = re.sub(r"(?<!\\)`", "", markdown.replace("**", ""))
    return html.unescape(_ESCAPED.sub(r"\1", s))
