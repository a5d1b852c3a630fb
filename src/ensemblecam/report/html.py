"""HTML assembly: escaping, tables, the page (parts and embedded figures), the document."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensemblecam.errors import InputError
from ensemblecam.io import fsutil

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{border-bottom:2px solid #4c72b0}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f3f8}tbody tr:nth-child(even){background:#fafafa}
table{display:block;overflow-x:auto;max-width:100%}
tr.mean td{font-weight:bold;border-bottom:2px solid #999}
table.headline td,table.headline th{font-size:1.05em;padding:.3em .8em}
table.facts td:first-child{font-weight:bold;white-space:nowrap}
table.timings td:last-child{text-align:right}
details{margin:.6em 0}summary{cursor:pointer;font-weight:bold}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.8em}
figure{display:inline-block;margin:.4em;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee}figure a img{cursor:zoom-in}
figcaption{font-size:.8em;color:#555;max-width:600px}
.note{background:#fff4d6;border-left:4px solid #e0a800;padding:.5em .8em}
.grid{display:flex;flex-wrap:wrap;align-items:flex-start;gap:.2em}
.fold{display:flex;flex-direction:column;align-items:center}
.fold figure{margin:.2em}
dt{font-weight:bold;margin-top:.4em}
nav{position:sticky;top:0;background:#fff;padding:.3em 0;border-bottom:1px solid #eee}
nav a{margin-right:1em}
table.sortable th{cursor:pointer}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
"""

#: The page's one script: a click on a header of a ``table.sortable`` sorts its rows by
#: that column (again: the other way); numbers (the leading number of a cell, e.g. the mean
#: of "20.2 [14.5, 26.0]") before text, blank or "–" cells last. Without JavaScript the
#: table keeps the order it was written in.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (t) {
  var heads = t.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, i) {
    th.title = "click to sort";
    th.addEventListener("click", function () {
      var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      function key(r) {
        var s = r.cells[i].textContent.trim(), x = parseFloat(s);
        return isNaN(x) ? [s === "" || s === "\\u2013" ? 2 : 1, s] : [0, x];
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x[0] !== y[0]) return x[0] - y[0];
        var r = x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0;
        return asc ? r : -r;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _th(h: str) -> str:
    """Header cell text: escaped, with a break opportunity after each underscore."""
    return esc(h).replace("_", "_<wbr>")


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """A table; ``cls`` its class names (``sortable``: a click on a header sorts it)."""
    head = "".join(f"<th>{_th(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    c = f' class="{esc(cls)}"' if cls else ""
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


def flatten(obj: Any, prefix: str = "", sep: str = ".") -> list[tuple[str, str]]:
    if isinstance(obj, dict):
        out: list[tuple[str, str]] = []
        for k, v in obj.items():
            out += flatten(v, f"{prefix}{sep}{k}" if prefix else str(k), sep)
        return out
    if isinstance(obj, float):
        return [(prefix, f"{obj:.4g}")]
    text = json.dumps(obj) if isinstance(obj, list) else str(obj)
    return [(prefix, text if len(text) <= 200 else text[:197] + "...")]


class Page:
    """Collects HTML parts and figures; figures go to PNG files and data URIs."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.parts: list[str] = []
        self.pngs: list[Path] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def h2(self, ident: str, title: str) -> None:
        self.parts.append(f'<h2 id="{esc(ident)}">{esc(title)}</h2>\n')

    def p(self, text: str, cls: str = "") -> None:
        c = f' class="{esc(cls)}"' if cls else ""
        self.parts.append(f"<p{c}>{esc(text)}</p>\n")

    def figure(self, name: str, png: bytes, caption: str, width: int | None = None) -> None:
        """Write ``name`` beside the report and embed it, linked to that file (click: full
        size); ``width``: shown width in px."""
        if not png.startswith(b"\x89PNG"):
            raise InputError(f"{name}: not a PNG image")
        path = self.out_dir / name
        with fsutil.atomic_path(path) as tmp:
            tmp.write_bytes(png)
        self.pngs.append(path)
        data = base64.b64encode(png).decode("ascii")
        style = f' style="width:{int(width)}px"' if width else ""
        cap = f' style="max-width:{int(width)}px"' if width else ""
        self.parts.append(
            f'<figure><a href="{esc(name)}" title="full size (the PNG beside '
            f'the report)"><img alt="{esc(caption)}"{style} '
            f'src="data:image/png;base64,{data}"></a>'
            f"<figcaption{cap}>{esc(caption)} ({esc(name)})</figcaption></figure>\n"
        )


def document(title: str, sections: Sequence[tuple[str, str]], parts: Sequence[str]) -> str:
    """The whole page: title, a navigation bar over ``sections`` (anchor, title), the parts."""
    nav = "".join(f'<a href="#{esc(k)}">{esc(t)}</a>' for k, t in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{esc(title)}</h1>\n<nav>{nav}</nav>\n"
        + "".join(parts)
        + f"<script>{SORT_SCRIPT}</script>\n</body></html>\n"
    )
