"""Markdown to one self-contained HTML file (markdown-it-py), figures embedded as data URIs.

>>> html = to_html(markdown_text, base=Path("reports/panel"), title="panel")   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html as html_escape
import mimetypes
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; }
figure { margin: 1.5rem 0; }
figcaption { font-size: 0.9rem; color: #333; }
code, pre { background: #f6f6f6; }
pre { padding: 0.5rem; overflow-x: auto; white-space: pre-wrap; }
blockquote { border-left: 3px solid #ccc; margin-left: 0; padding-left: 1rem; color: #333; }
"""


def _embed(tokens, base: Path) -> None:
    """Replace every relative image source with a data URI of the file (so the HTML stands alone)."""
    for token in tokens:
        for child in token.children or []:
            if child.type != "image":
                continue
            src = child.attrGet("src")
            if not src or "://" in src or src.startswith("data:"):
                continue
            path = (base / src).resolve()
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            child.attrSet("src", f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii"))


def to_html(markdown: str, base: Path, title: str) -> str:
    """``markdown`` (CommonMark + tables) as a standalone HTML page; images resolved against ``base``."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    _embed(tokens, Path(base))
    body = md.renderer.render(tokens, md.options, {})
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html_escape.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
