"""A report as data (title, sections of text / tables / code, figures), rendered to Markdown or offline HTML.

The search, ablation and comparison reports build one `Report`; every export format renders that same object,
so the Markdown note in optuna-dashboard, the HTML page and the printed text never disagree.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
from jinja2 import Environment
from markupsafe import Markup
from plotly.offline import get_plotlyjs


@dataclass
class Section:
    title: str = ""
    text: str = ""  # a paragraph; `backticks` mark code
    table: pd.DataFrame | None = None
    code: str | None = None  # a preformatted block (JSON)
    index: bool = False  # whether the table's index is a column worth showing (e.g. the choice)
    floatfmt: str = ".4g"
    note: str = ""  # a paragraph after the table


@dataclass
class Report:
    title: str
    sections: list[Section]
    figures: list[tuple[str, go.Figure]] = field(default_factory=list)  # (id, figure); titles live in the figure
    csv: pd.DataFrame | None = None  # the data behind the report, one row per trial / variant / study
    tex: pd.DataFrame | None = None  # the main table for a paper (LaTeX)


NOTE_WIDTH = 100  # monospace characters a line of optuna-dashboard's note shows in a window about 1,200 px wide


def to_markdown(report: Report, width: int | None = None) -> str:
    """The report as Markdown, tables as GitHub tables; with `width`, tables as aligned monospace blocks no wider
    than `width` characters (see to_note)."""
    lines = [f"# {report.title}"]
    for s in report.sections:
        if s.title:
            lines += ["", f"## {s.title}"]
        if s.text:
            lines += ["", s.text]
        if s.table is not None:
            blanks = s.table.astype(object).where(s.table.notna(), None)  # tabulate prints None as "", NaN as "nan"
            lines += ["", _text_table(blanks, s, width) if width else
                      blanks.to_markdown(index=s.index, floatfmt=s.floatfmt)]
        if s.code is not None:
            lines += ["", "```json", s.code, "```"]
        if s.note:
            lines += ["", s.note]
    return "\n".join(lines) + "\n"


def to_note(report: Report) -> str:
    """The report as optuna-dashboard's note: its Markdown draws tables without cell padding (neighbouring values
    run together, "0.2667 0.0008823") and a code block as one unwrapped line, so tables are code blocks of aligned
    columns two spaces apart, a wide one cut into blocks of columns that each start with its first column."""
    return to_markdown(report, NOTE_WIDTH)


def _text_table(blanks: pd.DataFrame, s: Section, width: int) -> str:
    text = blanks.to_markdown(index=s.index, floatfmt=s.floatfmt, tablefmt="simple")
    lines = text.split("\n")
    rule = next(line for line in lines if line.strip() and not line.strip(" -"))  # the dashes under the header
    spans = [m.span() for m in re.finditer(r"-+", rule)]
    blocks, block = [], [0]
    for i in range(1, len(spans)):
        if len(block) > 1 and sum(spans[j][1] - spans[j][0] + 2 for j in (*block, i)) - 2 > width:
            blocks.append(block)
            block = [0]
        block.append(i)
    blocks.append(block)
    shown = ["\n".join("  ".join(line[a:b].ljust(b - a) for a, b in (spans[i] for i in cols)).rstrip()
                       for line in lines) for cols in blocks]
    return "```text\n" + "\n\n".join(shown) + "\n```"


_PAGE = Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title_text }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
.table { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th { border-bottom: 2px solid #444; }
td:first-child, th:first-child, td.text { text-align: left; }
td.text { white-space: normal; min-width: 6em; max-width: 22em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
code { background: #f2f2f2; padding: 0 0.2em; }
.figure { margin: 1em 0 2em; }
@media print {
  @page { size: A4; margin: 12mm; }
  body { max-width: none; margin: 0; padding: 0; font-size: 9pt; }
  h1 { font-size: 14pt; } h2 { font-size: 11pt; break-after: avoid; }
  .table { overflow: visible; }
  table { font-size: 7.5pt; max-width: 100%; }
  th, td { padding: 0.15em 0.35em; white-space: normal; }
  th, td.text { overflow-wrap: anywhere; }  /* a wide table narrows to its numbers, and every column prints */
  th { min-width: 5ch; }
  tr, .figure { break-inside: avoid; }
  pre { white-space: pre-wrap; overflow: visible; font-size: 7.5pt; }
  .figure { zoom: 0.5; margin: 0.5em 0; }
}
</style>
<script type="text/javascript">{{ plotlyjs }}</script>
</head>
<body>
<h1>{{ title }}</h1>
{% for s in sections %}
{% if s.title %}<h2>{{ s.title }}</h2>{% endif %}
{% if s.text %}<p>{{ s.text }}</p>{% endif %}
{% if s.table %}<div class="table">{{ s.table }}</div>{% endif %}
{% if s.code %}<pre>{{ s.code }}</pre>{% endif %}
{% if s.note %}<p>{{ s.note }}</p>{% endif %}
{% endfor %}
{% if figures %}<h2>Figures</h2>{% endif %}
{% for f in figures %}<div class="figure">{{ f }}</div>
{% endfor %}
</body>
</html>
""")


def to_html(report: Report) -> str:
    """One self-contained page: plotly.js is inlined once, nothing is fetched from the network."""
    sections = [
        {"title": _inline(s.title), "text": _inline(s.text), "note": _inline(s.note), "code": s.code,
         "table": Markup(_html_table(s)) if s.table is not None else None}
        for s in report.sections
    ]
    figures = [
        Markup(fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False, div_id=fig_id,
                           config={"displaylogo": False}))
        for fig_id, fig in report.figures
    ]
    return _PAGE.render(title=_inline(report.title), title_text=report.title.replace("`", ""), sections=sections,
                        figures=figures, plotlyjs=Markup(get_plotlyjs()))


def _inline(text: str) -> Markup:
    """Escape, then turn `code` spans into <code> (the only Markdown our texts use)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text)))


_NUMBER = re.compile(r"^[\[(<+\-−]?\d")  # 0.5, -0.1, [0.29, 0.31], <0.001, 6/0/0, 13.3 M: set right-aligned


def _html_table(s: Section) -> str:
    """One header row (the index, when shown, as a plain first column: pandas would give its name a second row),
    floats per the section's floatfmt; a column of mostly non-numbers is text (class "text": left-aligned, and it
    wraps, so a long name does not widen the table). Headers and text may also break after an underscore."""
    def fmt(x) -> str:
        if x is None or x is pd.NA or (isinstance(x, float) and x != x):
            return ""
        return format(x, s.floatfmt) if isinstance(x, float) else str(x)

    table = (s.table.reset_index() if s.index else s.table).rename_axis(columns=None)
    columns = {str(c): [fmt(v) for v in table[c].tolist()] for c in table.columns}
    text = {c for c, values in columns.items()
            if sum(bool(_NUMBER.match(v)) for v in values if v) * 2 < sum(1 for v in values if v)}
    def breakable(value: str) -> str:
        return html.escape(value).replace("_", "_<wbr>")

    head = "".join(f"<th>{breakable(c)}</th>" for c in columns)
    rows = ["<tr>" + "".join(f'<td class="text">{breakable(values[i])}</td>' if c in text else
                             f"<td>{html.escape(values[i])}</td>" for c, values in columns.items()) + "</tr>"
            for i in range(len(table))]
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"
