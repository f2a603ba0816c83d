"""The report's document model and its two renderings, Markdown and HTML.

A report is a list of :class:`Block` objects (headings, paragraphs, lists, tables,
figures), composed by :mod:`.compose`; :func:`to_markdown` and :func:`to_html` render
the same blocks, so both files hold the same numbers. The HTML is one self-contained
file: inline CSS, figures embedded as base64 PNG, no script and no external request.

Text in blocks is plain with two inline marks: ```code``` and ``**bold**``.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass

from loralens.report.figures import FigureFile
from loralens.report.formatting import Table


@dataclass
class Block:
    kind: str             # "h1", "h2", "h3", "p", "ul", "table", "figure"
    text: str = ""
    cls: str = ""         # for "p": "", "missing", "warning", "note"
    items: tuple = ()
    table: Table | None = None
    figure: FigureFile | None = None
    id: str = ""


# --------------------------------------------------------------------------- Markdown

def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            lines += [f"# {b.text}", ""]
        elif b.kind in ("h2", "h3"):
            lines += [f"{'#' * int(b.kind[1])} {b.text}", ""]
        elif b.kind == "p":
            prefix = {"missing": "> ⚠ ", "warning": "> ⚠ ", "note": ""}.get(b.cls, "")
            lines += [prefix + b.text, ""]
        elif b.kind == "ul":
            lines += [f"- {i}" for i in b.items] + [""]
        elif b.kind == "table" and b.table:
            t = b.table
            lines += [f"**{t.title}**", ""]
            lines.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
            lines.append("|" + "|".join("---" for _ in t.columns) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
            lines.append("")
            lines += [f"{n}  " for n in t.notes]  # plain: notes hold names like subset_seed
            if t.notes:
                lines.append("")
        elif b.kind == "figure" and b.figure:
            fig = b.figure
            lines += [f"![{fig.title}](figures/{fig.png.name})", "",
                      f"**{fig.title}.** {fig.caption} (Vector version: "
                      f"`figures/{fig.svg.name}`.)", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 max-width:1280px;margin:0 auto;padding:1.5rem 2rem 4rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7rem;margin-bottom:.3rem}
h2{font-size:1.3rem;border-bottom:2px solid #e3e3e8;padding-bottom:.25rem;margin-top:2.2rem}
nav{font-size:.9rem;margin:.6rem 0 1rem}nav a{margin-right:1rem;color:#0063a6;text-decoration:none}
code{background:#f2f2f5;padding:0 .25rem;border-radius:3px;font-size:.88em}
.scroll{overflow-x:auto;margin:.8rem 0}
table{border-collapse:collapse;font-size:.86rem;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:.3rem 0;font-size:.95rem}
th,td{border:1px solid #d6d6dc;padding:.3rem .5rem;vertical-align:top;text-align:left}
th{background:#f4f5f8}tbody tr:nth-child(even){background:#fafafc}
td.num{text-align:right;white-space:nowrap}
.tnote{font-size:.82rem;color:#55555c;margin:.2rem 0}
p.missing{background:#fff6dd;border-left:4px solid #e0a800;padding:.5rem .8rem}
p.warning{background:#fdecea;border-left:4px solid #c62828;padding:.5rem .8rem}
p.note{color:#55555c;font-size:.88rem}
figure{margin:1.2rem 0}figure img{max-width:100%;height:auto;border:1px solid #e3e3e8}
figcaption{font-size:.88rem;color:#333;max-width:980px}
ul.glance li{margin:.25rem 0}
"""

_NUM = re.compile(r"^[\s+\-−]?[\d.,]+(e[+-]?\d+)?( ± [\d.e+-]+)?%?( \[.*\])?×?$")


def _inline(text: str) -> str:
    s = html.escape(str(text), quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)


def _html_table(t: Table) -> str:
    head = "".join(f"<th scope=\"col\">{_inline(c)}</th>" for c in t.columns)
    body = []
    for r in t.rows:
        cells = "".join(f"<td class=\"num\">{_inline(c)}</td>"
                        if t.numeric and _NUM.match(str(c))
                        else f"<td>{_inline(c)}</td>" for c in r)
        body.append(f"<tr>{cells}</tr>")
    notes = "".join(f"<p class=\"tnote\">{_inline(n)}</p>" for n in t.notes)
    return (f"<div class=\"scroll\"><table id=\"{html.escape(t.id)}\"><caption>"
            f"{_inline(t.title)}</caption><thead><tr>{head}</tr></thead><tbody>"
            f"{''.join(body)}</tbody></table></div>{notes}")


def _html_figure(fig: FigureFile) -> str:
    data = base64.b64encode(fig.png.read_bytes()).decode("ascii")
    return (f"<figure id=\"{html.escape(fig.id)}\"><img src=\"data:image/png;base64,{data}\" "
            f"alt=\"{html.escape(fig.title)}\"><figcaption><strong>{_inline(fig.title)}."
            f"</strong> {_inline(fig.caption)}</figcaption></figure>")


def to_html(blocks: list[Block]) -> str:
    title = next((b.text for b in blocks if b.kind == "h1"), "loralens report")
    nav = " ".join(f"<a href=\"#{b.id}\">{_inline(b.text)}</a>" for b in blocks if b.kind == "h2")
    parts = []
    for b in blocks:
        if b.kind == "h1":
            parts.append(f"<h1>{_inline(b.text)}</h1>")
        elif b.kind in ("h2", "h3"):
            parts.append(f"<{b.kind} id=\"{html.escape(b.id)}\">{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            cls = f" class=\"{b.cls}\"" if b.cls else ""
            parts.append(f"<p{cls}>{_inline(b.text)}</p>")
        elif b.kind == "ul":
            parts.append("<ul class=\"glance\">" + "".join(f"<li>{_inline(i)}</li>"
                                                           for i in b.items) + "</ul>")
        elif b.kind == "table" and b.table:
            parts.append(_html_table(b.table))
        elif b.kind == "figure" and b.figure:
            parts.append(_html_figure(b.figure))
    if len(parts) > 1:
        parts.insert(1, f"<nav>{nav}</nav>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
