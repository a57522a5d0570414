"""A report's tables as LaTeX that fits a portrait page: booktabs tables, real minus signs, a label per table.

Each table is a `table` float that `\\input` puts into a document: caption, `\\label{tab:NAME}`, `\\small` type,
then one tabular, or several stacked under each other (each repeating the first column) when the columns would
not fit `\\textwidth` side by side; a note under them says what the short headers and marks mean. Widths are
estimated from the glyph widths of Computer Modern at `\\small` in a 10pt `article` (cmr9, measured by TeX), whose
`\\textwidth` is 345pt on letterpaper and a4paper alike. A first column wider than a third of the page wraps;
`\\resizebox` (graphicx) is the last resort, only for a single column wider than the page by itself.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

TEXTWIDTH_PT = 345.0  # \textwidth of article at 10pt, portrait letterpaper or a4paper
TABCOLSEP_PT = 4.0
FIT_PT = TEXTWIDTH_PT - 10.0  # the estimate's slack (it is within a fraction of a point on these tables)
KEY_SHARE = 1 / 3  # a first column wider than this share of the width wraps
PACKAGE = "booktabs"

# Glyph widths in pt at \small in a 10pt article (cmr9 at 9pt), as TeX's \settowidth measured them.
_LOWER = dict(zip("abcdefghijklmnopqrstuvwxyz", (
    4.62, 5.14, 4.11, 5.14, 4.11, 2.83, 4.62, 5.14, 2.57, 2.83, 4.88, 2.57, 7.71, 5.14, 4.62, 5.14, 4.88, 3.62,
    3.65, 3.60, 5.14, 4.88, 6.68, 4.88, 4.88, 4.11), strict=True))
_UPPER = dict(zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", (
    6.94, 6.55, 6.68, 7.07, 6.29, 6.04, 7.26, 6.94, 3.34, 4.75, 7.19, 5.78, 8.48, 6.94, 7.19, 6.29, 7.19, 6.81,
    5.14, 6.68, 6.94, 6.94, 9.51, 6.94, 6.94, 5.65), strict=True))
_OTHER = {" ": 3.08, ".": 2.57, ",": 2.57, ":": 2.57, ";": 2.57, "'": 2.57, "!": 2.57, "[": 2.57, "]": 2.57,
          "(": 3.60, ")": 3.60, "/": 4.62, "*": 4.62, "?": 4.37, "+": 7.19, "=": 7.19, "_": 3.33, "%": 7.71,
          "#": 7.71, "&": 7.19, "$": 4.62, "@": 7.19,
          "-": 7.19, "−": 7.19, "±": 7.19, "<": 9.8, ">": 9.8, "≤": 9.8, "Δ": 7.71, "†": 3.94, "‡": 3.94}
_WIDTHS = {**_LOWER, **_UPPER, **{d: 4.62 for d in "0123456789"}, **_OTHER}
_WIDE = 7.71  # any other glyph: as wide as an m
_SCIENTIFIC = re.compile(r"^([+-]?\d+(?:\.\d+)?)e([+-])0*(\d+)$")
_NUMERIC = re.compile(r"^[\[(<+\-−]?\d")
_HEADER_MATH = {"p_t": "$p_t$", "p_W": "$p_W$", "d_z": "$d_z$"}
_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"$\sim$", "^": r"\^{}"}
_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "†": r"$^\dagger$", "‡": r"$^\ddagger$", "−": "$-$",
            "≤": r"$\le$", "≥": r"$\ge$", "<": "$<$", ">": "$>$", "×": r"$\times$", "→": r"$\to$", "|": r"$|$"}


def width(text: str) -> float:
    """Estimated width in pt of text typeset at \\small in a 10pt article (what `cell` makes of it)."""
    number = _SCIENTIFIC.match(text)
    if number:  # 9.6e-05 is set as 9.6 x 10^{-5}
        return width(number.group(1)) + 26.4
    return sum(_WIDTHS.get(c, _WIDE) for c in text)


def escape(text: str) -> str:
    return "".join(_SPECIALS.get(c, c) for c in text)


def text(plain: str) -> str:
    """Report text (a Markdown-ish line: `code`, Unicode marks) as LaTeX: escaped, marks and minus signs as math."""
    parts = re.split(r"`([^`]*)`", plain)
    return "".join(rf"\texttt{{{escape(p)}}}" if i % 2 else _prose(p) for i, p in enumerate(parts))


def _prose(plain: str) -> str:
    """Escaped text with the table's symbol headers (p_t, p_W, d_z) as math where they appear as words."""
    words = re.split(r"\b(" + "|".join(_HEADER_MATH) + r")\b", plain)
    return "".join(_HEADER_MATH[w] if i % 2 else _marks(escape(w)) for i, w in enumerate(words))


def cell(plain: str) -> str:
    """One table cell as LaTeX: a p-value floor as math ($<0.001$), 9.6e-05 as $9.6\\times10^{-5}$, a minus sign
    before a number as $-$ (a hyphen is not a minus), the report's marks as math symbols."""
    number = _SCIENTIFIC.match(plain)
    if number:
        mantissa, sign, power = number.groups()
        return f"${mantissa}\\times10^{{{'-' if sign == '-' else ''}{power}}}$"
    floor = re.fullmatch(r"<(\d[\d.]*)(.*)", plain)
    if floor:
        return f"$<{floor.group(1)}$" + text(floor.group(2))
    return text(plain)


def _marks(escaped: str) -> str:
    escaped = re.sub(r"(?<![\w.])-(?=\d)", "$-$", escaped)  # -0.0133, [-1, 1]: minus signs; a-b stays a hyphen
    return "".join(_SYMBOLS.get(c, c) for c in escaped)


@dataclass
class Float:
    """One `table` float: the LaTeX and whether it needed \\resizebox (graphicx)."""

    latex: str
    resized: bool


def table_float(frame: pd.DataFrame, caption: str, label: str, note: str = "") -> Float:
    """frame (cells already formatted as text, or raw values: see `formatted`) as a table float that fits the
    page: its first column repeated on each stacked tabular when one would be too wide."""
    frame = formatted(frame)
    head = ["\\begin{table}[htbp]", "\\centering", f"\\caption{{{text(caption)}}}", f"\\label{{{label}}}",
            "\\small", f"\\setlength{{\\tabcolsep}}{{{TABCOLSEP_PT:g}pt}}"]
    if frame.shape[1] == 0 or frame.empty:
        body, resized = ["No rows yet."], False
    else:
        body, resized = _tabulars(frame)
    tail = [f"\\par\\smallskip{{\\footnotesize\\raggedright {text(note)}\\par}}"] if note else []
    return Float("\n".join(head + body + tail + ["\\end{table}"]) + "\n", resized)


def formatted(frame: pd.DataFrame) -> pd.DataFrame:
    """Every cell as display text: accuracies (a column named with "acc") to 4 decimals, other floats to 4
    significant digits, missing values empty."""
    def fmt(column: str, value) -> str:
        if value is None or value is pd.NA:
            return ""
        if isinstance(value, (float, np.floating)):
            return "" if math.isnan(value) else format(float(value), ".4f" if "acc" in column else ".4g")
        return str(value)

    return pd.DataFrame({str(c): [fmt(str(c), v) for v in frame[c].tolist()] for c in frame.columns})


def _tabulars(frame: pd.DataFrame) -> tuple[list[str], bool]:
    key, *others = list(frame.columns)
    pad = 2 * TABCOLSEP_PT
    key_width = max(width(key), *(width(v) for v in frame[key])) + pad
    wrap = None
    if key_width > KEY_SHARE * FIT_PT:  # the first column wraps at spaces and after underscores
        words = [w for v in [key, *frame[key]] for w in re.split(r"(?<=_)| ", v)]
        wrap = max(KEY_SHARE * FIT_PT - pad, *(width(w) for w in words))
        key_width = wrap + pad
    headers = {c: [c] for c in others}
    widths = [max(width(c), *(width(v) for v in frame[c])) + pad for c in others]
    if sum(widths) > FIT_PT - key_width:  # too wide for one tabular: long headers first stack after underscores
        headers = {c: _stacked(c, max(width(v) for v in frame[c])) for c in others}
        widths = [max(*(width(h) for h in headers[c]), *(width(v) for v in frame[c])) + pad for c in others]
    chunks = _balanced(widths, FIT_PT - key_width) if others else [[]]
    lines, resized = [], False
    for i, chunk in enumerate(chunks):
        columns = [key] + [others[j] for j in chunk]
        aligns = [_align(frame[c]) for c in columns[1:]]
        spec = (f"p{{{wrap:.1f}pt}}" if wrap else "l") + "".join(aligns)
        rows = [" & ".join([_key_cell(key, wrap), *(_header(headers[c], a) for c, a in zip(columns[1:], aligns,
                                                                                            strict=True))])]
        rows += [" & ".join(_key_cell(row[0], wrap) if k == 0 else cell(v) for k, v in enumerate(row))
                 for row in frame[columns].itertuples(index=False, name=None)]
        tabular = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", rows[0] + " \\\\", "\\midrule",
                   *(r + " \\\\" for r in rows[1:]), "\\bottomrule", "\\end{tabular}"]
        if key_width + sum(widths[j] for j in chunk) > FIT_PT:  # one column wider than the page: last resort
            tabular = ["\\resizebox{\\linewidth}{!}{%", *tabular, "}"]
            resized = True
        lines += (["\\par\\medskip"] if i else []) + tabular
    return lines, resized


def _balanced(widths: list[float], room: float) -> list[list[int]]:
    """Column indices split into the fewest consecutive groups that fit room (a column wider than room alone),
    with the widest group as narrow as that number allows."""
    n = len(widths)
    prefix = np.concatenate([[0.0], np.cumsum(widths)])

    def span(i: int, j: int) -> float:
        return prefix[j] - prefix[i]

    def fits(i: int, j: int) -> bool:
        return j - i == 1 or span(i, j) <= room

    # best[k][j]: the narrowest widest group splitting columns [0, j) into k groups; cut[k][j]: the last cut
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(n + 1)]
    cut = [[0] * (n + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] < inf and fits(i, j):
                    cost = max(best[k - 1][i], span(i, j))
                    if cost < best[k][j]:
                        best[k][j], cut[k][j] = cost, i
        if best[k][n] < inf:
            groups, j = [], n
            for level in range(k, 0, -1):
                i = cut[level][j]
                groups.insert(0, list(range(i, j)))
                j = i
            return groups
    return [[j] for j in range(n)]


def _align(column: pd.Series) -> str:
    values = [v for v in column if v]
    return "r" if values and sum(bool(_NUMERIC.match(v)) for v in values) * 2 >= len(values) else "l"


def _stacked(header: str, room: float) -> list[str]:
    """header in lines no wider than room (or its widest piece), broken after underscores: flops_ / per_ / segment."""
    lines: list[str] = []
    for piece in re.split(r"(?<=_)", header):
        if lines and width(lines[-1] + piece) <= room:
            lines[-1] += piece
        else:
            lines.append(piece)
    return [line for line in lines if line]


def _header(lines: list[str], align: str) -> str:
    if len(lines) == 1:
        return _HEADER_MATH.get(lines[0]) or cell(lines[0])
    stack = "\\\\".join(cell(line) for line in lines)
    return f"\\shortstack[{align}]{{{stack}}}"


def _key_cell(value: str, wrap: float | None) -> str:
    if wrap is None:
        return cell(value)
    return "\\raggedright " + cell(value).replace("\\_", "\\_\\allowbreak{}")


def label(title: str) -> str:
    """tab:NAME from the study names in a report's title (in backticks): letters, digits and -, nothing else."""
    names = re.findall(r"`([^`]+)`", title) or [title]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", "-vs-".join(names)).strip("-")
    return f"tab:{slug or 'report'}"
