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


def to_markdown(report: Report) -> str:
    lines = [f"# {report.title}"]
    for s in report.sections:
        if s.title:
            lines += ["", f"## {s.title}"]
        if s.text:
            lines += ["", s.text]
        if s.table is not None:
            blanks = s.table.astype(object).where(s.table.notna(), None)  # tabulate prints None as "", NaN as "nan"
            lines += ["", blanks.to_markdown(index=s.index, floatfmt=s.floatfmt)]
        if s.code is not None:
            lines += ["", "```json", s.code, "```"]
        if s.note:
            lines += ["", s.note]
    return "\n".join(lines) + "\n"


_PAGE = Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title_text }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
.table { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { border-bottom: 2px solid #444; }
td:first-child, th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
code { background: #f2f2f2; padding: 0 0.2em; }
.figure { margin: 1em 0 2em; }
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


def _html_table(s: Section) -> str:
    def fmt(x: float) -> str:
        return format(x, s.floatfmt)

    # The index as a plain first column: pandas would put its name on a second header row.
    table = (s.table.reset_index() if s.index else s.table).rename_axis(columns=None)
    return table.to_html(index=False, na_rep="", float_format=fmt, border=0, escape=True)
