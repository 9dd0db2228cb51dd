"""Render one report, described as a list of blocks, to Markdown and to self-contained HTML.

Blocks (plain tuples so the builder stays readable):

* ``("h", level, text)``        heading
* ``("p", text)``               paragraph (plain text, escaped in HTML)
* ``("notes", [text, ...])``    bulleted notes (warnings, skipped maps)
* ``("table", DataFrame, caption)``
* ``("figure", png_path, caption)``   png_path relative to the report directory
* ``("details", summary, [blocks])``  collapsed in HTML, a sub-section in Markdown

The HTML embeds every figure as a base64 PNG ``data:`` URI and its CSS inline:
no scripts, no external stylesheets, fonts or images, so the file can be
mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #ccc; } h2 { border-bottom: 1px solid #ddd; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.2em; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 4px 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
.notes { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.3em 1em; }
details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: 600; }
.scroll { overflow-x: auto; }
"""


def _fmt(v) -> str:
    """Table cell text: 3 significant decimals for floats, "–" for NaN."""
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.3f}"
    return str(v)


def _md_cell(v) -> str:
    return _fmt(v).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, blocks: list) -> str:
    """Markdown text of the report (figures linked as relative PNG paths)."""
    out = [f"# {title}", ""]

    def emit(bs, depth):
        for b in bs:
            kind = b[0]
            if kind == "h":
                out.extend(["#" * min(6, b[1] + depth) + " " + b[2], ""])
            elif kind == "p":
                out.extend([b[1], ""])
            elif kind == "notes":
                out.extend([f"> - {n}" for n in b[1]] + [""])
            elif kind == "table":
                df, caption = b[1], b[2]
                if caption:
                    out.extend([f"**{caption}**", ""])
                cols = [str(c) for c in df.columns]
                out.append("| " + " | ".join(cols) + " |")
                out.append("|" + "|".join("---" for _ in cols) + "|")
                for row in df.itertuples(index=False):
                    out.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
                out.append("")
            elif kind == "figure":
                out.extend([f"![{b[2]}]({Path(b[1]).as_posix()})", "", f"*{b[2]}*", ""])
            elif kind == "details":
                out.extend([f"{'#' * min(6, 3 + depth)} {b[1]}", ""])
                emit(b[2], depth + 1)
            else:
                raise ValueError(f"unknown block kind {kind!r}")

    emit(blocks, 0)
    return "\n".join(out).rstrip() + "\n"


def _html_table(df: pd.DataFrame, caption: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False))
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def render_html(title: str, blocks: list, root: Path) -> str:
    """Self-contained HTML of the report; figure PNGs are read from ``root`` and inlined."""
    parts = []

    def emit(bs, depth):
        for b in bs:
            kind = b[0]
            if kind == "h":
                lvl = min(6, b[1] + depth)
                parts.append(f"<h{lvl}>{html.escape(b[2])}</h{lvl}>")
            elif kind == "p":
                parts.append(f"<p>{html.escape(b[1])}</p>")
            elif kind == "notes":
                items = "".join(f"<li>{html.escape(n)}</li>" for n in b[1])
                parts.append(f'<div class="notes"><ul>{items}</ul></div>')
            elif kind == "table":
                parts.append(_html_table(b[1], b[2]))
            elif kind == "figure":
                data = base64.b64encode((root / b[1]).read_bytes()).decode("ascii")
                cap = html.escape(b[2])
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{cap}">'
                             f"<figcaption>{cap}</figcaption></figure>")
            elif kind == "details":
                parts.append(f"<details><summary>{html.escape(b[1])}</summary>")
                emit(b[2], depth + 1)
                parts.append("</details>")
            else:
                raise ValueError(f"unknown block kind {kind!r}")

    emit(blocks, 0)
    # The empty data: icon stops browsers from asking the file system for /favicon.ico.
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><link rel=\"icon\" href=\"data:,\">"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>\n"
            + "\n".join(parts) + "\n</body></html>\n")
