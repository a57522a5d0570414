"""Write a report to files (Markdown, CSV, LaTeX, offline HTML) and into optuna-dashboard."""
from __future__ import annotations

from pathlib import Path

import optuna
import optuna_dashboard
import plotly.graph_objects as go

from reports import latex as tex
from reports.ablation import ablation_report, is_ablation
from reports.compare import comparison_report
from reports.document import Report, to_html, to_markdown, to_note
from reports.tables import search_report
from search.studyfile import SpecError

FORMATS = ("md", "csv", "tex", "html")
FIGURE_FORMATS = ("pdf", "svg", "png")
# A figure for a paper: 420 x 300 px, 13 px type. kaleido's PDF of it is 525 pt wide, its type 16 pt; in a single
# column (3.5 in, 252 pt) it is shown at 0.48x, so the type reads at about 8 pt, like a caption.
FIGURE_SIZE = (420, 300)
FIGURE_FONT = 13
DEFAULT_FORMATS = ("md", "csv", "html")
# optuna-dashboard draws these itself, live; a stored copy would go stale and bloat the storage.
DASHBOARD_NATIVE = {"history", "parallel-coordinates", "importances", "learning-curves"}
# The note is the user's too: the report owns only the lines between these markers. They are Markdown link
# definitions, which render to nothing; HTML comments would show as text (optuna-dashboard escapes raw HTML
# unless started with --allow-unsafe). Each needs a blank line around it (a definition cannot end a paragraph).
NOTE_BEGIN = "[//]: # (hw4-search report: begin; text outside these markers is kept)"
NOTE_END = "[//]: # (hw4-search report: end)"


def study_report(study: optuna.Study, k: int = 10, plots: bool = False) -> Report:
    """An ablation's statistics report, or a search's top-k report; Optuna's plots only when `plots`."""
    return ablation_report(study) if is_ablation(study) else search_report(study, k, plots)


def write_report(study: optuna.Study, out: Path, k: int = 10, formats: tuple[str, ...] = DEFAULT_FORMATS,
                 figures: tuple[str, ...] = ()) -> tuple[str, list[Path]]:
    """Write <out>/<study>.<fmt> for each format, put the report into the study's optuna-dashboard page
    (its note's report section, the figures the dashboard does not draw itself), return the Markdown and paths."""
    report = study_report(study, k, plots="html" in formats)
    text, paths = write_files(report, out / study.study_name, formats, figures)
    save_to_dashboard(study, report)
    return text, paths


def save_to_dashboard(study: optuna.Study, report: Report) -> None:
    """The report as the note's report section (to_note: its tables as aligned monospace blocks, which the
    dashboard shows readably), and the figures the dashboard does not draw itself."""
    optuna_dashboard.save_note(study, with_report(optuna_dashboard.get_note(study), to_note(report)))
    for fig_id, fig in report.figures:
        if fig_id not in DASHBOARD_NATIVE:
            optuna_dashboard.save_plotly_graph_object(study, fig, graph_object_id=fig_id)  # same id: replaced


def with_report(note: str, markdown: str) -> str:
    """The note with its report section replaced by `markdown`, or the section appended after the user's text."""
    section = f"{NOTE_BEGIN}\n\n{markdown.strip()}\n\n{NOTE_END}\n"
    span = _section_span(note)
    if span is None:  # also a broken pair (a marker deleted by hand): appending loses no user text
        return f"{note.rstrip()}\n\n{section}" if note.strip() else section
    after = note[span[1]:].lstrip("\n")
    return note[:span[0]] + section + ("\n" + after if after else "")


def report_section(note: str) -> str | None:
    """The report inside a note, as the report wrote it (None when the note has no complete section)."""
    span = _section_span(note)
    return None if span is None else note[span[0] + len(NOTE_BEGIN):span[1] - len(NOTE_END)].strip() + "\n"


def _section_span(note: str) -> tuple[int, int] | None:
    """Where the report section starts and ends (after its end marker): the last begin marker that an end marker
    follows, so a lone marker left by a hand edit (and the user's text after it) is never part of it."""
    begin = note.rfind(NOTE_BEGIN)
    while begin >= 0:
        end = note.find(NOTE_END, begin)
        if end >= 0:
            return begin, end + len(NOTE_END)
        begin = note.rfind(NOTE_BEGIN, 0, begin)
    return None


def write_files(report: Report, stem: Path, formats: tuple[str, ...], figures: tuple[str, ...] = ()
                ) -> tuple[str, list[Path]]:
    text = to_markdown(report)
    stem.parent.mkdir(parents=True, exist_ok=True)
    writers = {
        "md": lambda path: path.write_text(text),
        "csv": lambda path: report.csv.to_csv(path, index=False),
        "tex": lambda path: path.write_text(latex(report)),
        "html": lambda path: path.write_text(to_html(report)),
    }
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        try:
            writers[fmt](path)
        except OSError as err:  # the file named, so the one-line error says where (a full disk, a read-only folder)
            if err.filename is None:
                err.filename = str(path)
            raise
        paths.append(path)
    return text, paths + write_figures(report, stem, figures)


def write_figures(report: Report, stem: Path, formats: tuple[str, ...]) -> list[Path]:
    """Each figure of the report as STEM-ID.FORMAT (pdf, svg, png) for a paper: a white template, FIGURE_SIZE,
    FIGURE_FONT type; through plotly's static export (kaleido, which drives a Chrome or Chromium it finds)."""
    if not formats or not report.figures:
        return []
    import plotly.io as pio

    figures, paths = [], []
    for fig_id, fig in report.figures:
        height = max(FIGURE_SIZE[1], fig.layout.height or 0)  # a tall one (a bar per choice) keeps its height
        styled = go.Figure(fig).update_layout(template="simple_white", width=FIGURE_SIZE[0], height=height,
                                              font={"size": FIGURE_FONT}, title_font_size=FIGURE_FONT,
                                              margin={"l": 60, "r": 20, "t": 50, "b": 50})
        for fmt in formats:
            figures.append(styled)
            paths.append(stem.with_name(f"{stem.name}-{fig_id}.{fmt}"))
    try:
        pio.write_images(figures, paths)
    except Exception as err:  # kaleido missing, or no browser: say what to install, in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpecError(f"--figures: plotly's static export failed ({first}); it needs the kaleido package and a "
                        "Chrome or Chromium (Debian: apt-get install chromium)") from None
    return paths


def latex(report: Report) -> str:
    """The report's main table for a paper, and any section table marked `attrs["latex"] = SUFFIX` (an
    ablation's cells by seed), each a booktabs `table` float that fits a portrait article page, labelled
    tab:STUDY (tab:STUDY-SUFFIX); the packages it needs are named in its first lines."""
    title, label = report.title.replace("`", ""), tex.label(report.title)
    main = next((s for s in report.sections if s.table is report.tex), None)
    floats = [tex.table_float(report.tex, title, label, main.note if main else "")]
    for s in report.sections:
        if s.table is not None and s.table.attrs.get("latex") and s.table is not report.tex:
            table = (s.table.reset_index() if s.index else s.table).rename_axis(columns=None)
            floats.append(tex.table_float(table, f"{title}: {s.title}", f"{label}-{s.table.attrs['latex']}",
                                          " ".join(filter(None, [s.text, s.note]))))
    packages = [tex.PACKAGE] + (["graphicx"] if any(f.resized for f in floats) else [])
    uses = " ".join(f"\\usepackage{{{p}}}" for p in packages)
    head = (f"% {title}: {len(floats)} table(s) written by run-study report, for \\input in a document.\n"
            f"% requires {uses}\n")
    return head + "\n".join(f.latex for f in floats)


def write_comparison(studies: list[optuna.Study], out: Path, formats: tuple[str, ...] = DEFAULT_FORMATS,
                     figures: tuple[str, ...] = ()) -> tuple[str, list[Path]]:
    """Several studies side by side, written as <out>/<A>-vs-<B>.<fmt>; nothing is saved into the studies."""
    report = comparison_report(studies, plots="html" in formats)
    return write_files(report, out / comparison_name(studies), formats, figures)


def comparison_name(studies: list[optuna.Study]) -> str:
    return "-vs-".join(s.study_name for s in studies)
