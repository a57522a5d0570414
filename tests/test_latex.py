"""The LaTeX a report writes (`run-study report --format tex`), compiled by a real pdflatex into a portrait
article page: it must compile and fit (no "Overfull \\hbox"), with real minus signs, p-values to 3 significant
digits, a \\label per table and the ablation's per-seed table. No training: the studies are made of finished trials
(`optuna.trial.create_trial`) carrying what the report reads, in an SQLite file. pdflatex is required (CI installs
it, see .ci/run): missing, the test fails; it is never skipped.
"""
import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import create_trial

import run_study
from reports.ablation import format_p

ROWS = ["baseline", "attention", "am_softmax", "attention + am_softmax"]
SEEDS = list(range(6))
BASE = [0.30, 0.31, 0.29, 0.32, 0.30, 0.31]
# Paired differences from the baseline, by seed. attention: consistently up (t-test p ~1e-8, shown <0.001);
# am_softmax: one zero difference (5 nonzero pairs: too few seeds, flagged) and a mean of 5e-6 (Holm p_t 0.99959,
# which must read 1.00, not 1); attention + am_softmax: consistently down (p 2.4e-5, and minus signs).
DIFFS = {"baseline": [0.0] * 6, "attention": [0.05, 0.051, 0.049, 0.05, 0.052, 0.048],
         "am_softmax": [0.02, -0.02, 0.03, -0.03, 0.0, 3e-5],
         "attention + am_softmax": [-0.01, -0.012, -0.008, -0.011, -0.009, -0.0105]}


def ablation_study(url: str, name: str = "boss_ablation", names: dict[str, str] | None = None) -> optuna.Study:
    """4 variants x 6 seeds as run_ablation stores them: study attrs kind/rows/baseline_row/seeds, each cell a
    complete trial with param `variant`, user attr `seed` and a learning curve whose peak is the trial's value.
    `names`: the rows' names (ROWS -> name), e.g. an explain's."""
    names = names or {row: row for row in ROWS}
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    rows = [names[row] for row in ROWS]
    for key, value in (("kind", "ablation"), ("rows", rows), ("baseline_row", rows[0]), ("seeds", SEEDS)):
        study.set_user_attr(key, value)
    dist = {"variant": CategoricalDistribution(rows)}
    study.add_trials([
        create_trial(params={"variant": names[row]}, distributions=dist, value=BASE[seed] + DIFFS[row][seed],
                     user_attrs={"seed": seed},
                     intermediate_values={100: 0.2, 200: BASE[seed] + DIFFS[row][seed], 300: 0.25})
        for row in ROWS for seed in SEEDS])
    return study


def search_study(url: str, name: str = "wide_search") -> optuna.Study:
    """A search over 14 parameters with every recorded metric: a top table far wider than a page."""
    dists = {"lr": FloatDistribution(1e-5, 1e-1, log=True), "d_model": IntDistribution(32, 256),
             "nhead": CategoricalDistribution([1, 2, 4, 8]), "ff_mult": FloatDistribution(1.0, 4.0),
             "dropout": FloatDistribution(0.0, 0.5), "pooling": CategoricalDistribution(["mean", "stats", "attention"]),
             "loss": CategoricalDistribution(["cross_entropy", "am_softmax"]), "margin": FloatDistribution(0.1, 0.4),
             "scale": FloatDistribution(10.0, 40.0), "batch_size": CategoricalDistribution([16, 32, 64]),
             "segment_len": IntDistribution(64, 512), "warmup_steps": IntDistribution(0, 2000),
             "weight_decay": FloatDistribution(1e-6, 1e-2, log=True), "kernel": CategoricalDistribution([15, 31])}
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    trials = []
    for i in range(12):
        params = {"lr": 0.96e-4 * 1.9 ** (i % 8), "d_model": 32 + 16 * i, "nhead": [1, 2, 4, 8][i % 4],
                  "ff_mult": 1.0 + 0.25 * i, "dropout": 0.03 * i, "pooling": ["mean", "stats", "attention"][i % 3],
                  "loss": ["cross_entropy", "am_softmax"][i % 2], "margin": 0.1 + 0.02 * i, "scale": 10.0 + 2.5 * i,
                  "batch_size": [16, 32, 64][i % 3], "segment_len": 64 + 32 * i, "warmup_steps": 100 * i,
                  "weight_decay": 1e-6 * 2.2 ** i, "kernel": [15, 31][i % 2]}
        value = 0.3 + 0.04 * i - 0.001 * i * i
        trials.append(create_trial(
            params=params, distributions=dists, value=value, intermediate_values={100: value - 0.1, 200: value},
            user_attrs={"n_params": 1_234_567 * (i + 1), "flops_per_segment": 13_251_584 * (i + 1),
                        "steps_run": 200 + i, "steps_per_s": 12.5 + i, "best_step": 200 + i % 2, "seed": i,
                        "stopped_at_deadline": 190 + i}))
    study.add_trials(trials)
    return study


def _report(tmp_path: Path, name: str, url: str, formats: str = "tex") -> Path:
    """What `run-study report NAME --storage URL --format FORMATS --out OUT` writes; the folder."""
    out = tmp_path / "out"
    assert run_study.main(["report", name, "--storage", url, "--format", formats, "--out", str(out)]) == 0
    return out


def _compile(folder: Path, inputs: list[Path], options: str) -> str:
    """A portrait article that \\input's each file (with the packages their `% requires` lines name), compiled by
    pdflatex; its log."""
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        pytest.fail("pdflatex is not installed: apt-get install texlive-latex-base texlive-latex-recommended "
                    "(.ci/run does)", pytrace=False)
    packages = sorted({p for path in inputs for line in path.read_text().splitlines() if line.startswith("% requires")
                       for p in re.findall(r"\\usepackage\{[^}]+\}", line)})
    doc = folder / "doc.tex"
    doc.write_text(f"\\documentclass[{options}]{{article}}\n{''.join(packages)}\n\\begin{{document}}\n"
                   + "".join(f"\\input{{{path.name}}}\n\\clearpage\n" for path in inputs) + "\\end{document}\n")
    run = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=folder,
                         capture_output=True, text=True, timeout=120)
    log = (folder / "doc.log").read_text(errors="replace")
    assert run.returncode == 0, run.stdout[-3000:]
    overfull = [line for line in log.splitlines() if line.startswith(("Overfull \\hbox", "Overfull \\vbox"))]
    assert overfull == [], (overfull, options)
    return log


def _tabulars(tex: str) -> list[list[list[str]]]:
    """Each tabular's rows (header first) as cells; a header stacked on lines (\\shortstack) as one string."""
    def unstack(cell: str) -> str:
        return re.sub(r"\\shortstack\[.\]\{(.*)\}", lambda m: m.group(1).replace("\\\\", ""), cell.strip())

    return [[[unstack(c) for c in row.split("&")] for row in body.replace("\\midrule\n", "").split(" \\\\\n")
             if row.strip()]
            for body in re.findall(r"\\toprule\n(.*?)\\bottomrule", tex, re.S)]


def _prose(tex: str) -> str:
    """The text outside math: where a hyphen before a digit would print a hyphen, not a minus sign."""
    return re.sub(r"\$[^$]*\$", "", tex)


def test_ablation_and_search_tex_compile_and_fit_a_portrait_article_page(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    ablation_study(url)
    search_study(url)
    out = _report(tmp_path, "boss_ablation", url, "tex,csv,md")
    _report(tmp_path, "wide_search", url)
    assert run_study.main(["report", "boss_ablation", "wide_search", "--storage", url, "--format", "tex",
                           "--out", str(out)]) == 0  # a comparison's .tex too
    inputs = [out / "boss_ablation.tex", out / "wide_search.tex", out / "boss_ablation-vs-wide_search.tex"]
    for options in ("letterpaper", "a4paper", "a4paper,12pt"):  # 10pt by default: \textwidth 345pt on both papers
        log = _compile(out, inputs, options)
        assert "Float too large" not in log, options  # nor too tall: the stacked tabulars fit a page

    tex = inputs[0].read_text()
    assert tex.startswith("% Ablation boss_ablation") and tex.splitlines()[1] == "% requires \\usepackage{booktabs}"
    assert tex.count("\\begin{table}") == 2 and "\\resizebox" not in tex
    assert "\\caption{Ablation boss\\_ablation}\n\\label{tab:boss-ablation}" in tex
    assert "\\label{tab:boss-ablation-seeds}" in tex and "Cells by seed: best validation accuracy" in tex
    summary, comparison, by_seed = _tabulars(tex)  # the main table as two stacked tabulars, then the seeds
    assert [row[0] for row in summary] == ["variant", *(r.replace("_", "\\_") for r in ROWS)]
    assert summary[0] == ["variant", "c/p/f", "mean $\\pm$ std", "95\\% CI"]
    assert comparison[0] == ["variant", "$\\Delta$ [95\\% CI]", "$p_t$", "$p_W$", "$d_z$"]
    rows = {row[0]: row for row in comparison}
    assert rows["attention"][2] == "$<0.001$" and rows["attention + am\\_softmax"][2] == "$<0.001$"
    assert rows["am\\_softmax"][2:4] == ["1.00", "1.00$^\\ddagger$"]  # 0.99959 and 1: 3 significant digits
    assert rows["attention"][3] == "0.0938"  # Holm 3 x 0.03125
    assert rows["attention + am\\_softmax"][1] == "$-$0.0101 [$-$0.0116, $-$0.0086]"  # minus signs, not hyphens
    assert rows["attention + am\\_softmax"][4] == "$-$7.06"
    assert not re.search(r"-\d", _prose(tex)), "a hyphen before a number prints as a hyphen, not a minus sign"
    assert "$^\\ddagger$ too few seeds" in tex and "$p_t$, $p_W$: paired t-test" in tex  # the legend
    assert by_seed[0] == ["variant", *(f"seed {s}" for s in SEEDS)]
    assert by_seed[1] == ["baseline", "0.3000", "0.3100", "0.2900", "0.3200", "0.3000", "0.3100"]
    assert "picked on the validation split, the same split the variants are compared on" in tex

    markdown = (out / "boss_ablation.md").read_text()  # one display frame: the same texts
    md_rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
               for line in markdown.split("## Cells by seed")[0].splitlines() if line.startswith("| ")}
    assert md_rows["am_softmax"][5:7] == ["1.00", "1.00‡"] and md_rows["attention"][5] == "<0.001"
    csv = pd.read_csv(out / "boss_ablation.csv")
    assert csv["too_few_seeds"].dtype == bool and csv["too_few_seeds"].tolist() == [False, False, True, False]

    search = inputs[1].read_text()
    assert "\\caption{Study wide\\_search}\n\\label{tab:wide-search}" in search and "\\resizebox" not in search
    tables = _tabulars(search)
    assert len(tables) > 1 and all(t[0][0] == "trial" for t in tables)  # split into stacked tabulars, each keyed
    shown = [c for t in tables for c in t[0][1:]]
    assert len(shown) == len(set(shown)) and {"valid\\_acc", "lr", "weight\\_decay", "n\\_params"} <= set(shown)
    assert "$9.6\\times10^{-5}$" in search  # lr 9.6e-05, not 0.0001
    assert not re.search(r"-\d", _prose(search))


@pytest.mark.parametrize(("p", "shown"), [(0.9996, "1.00"), (1.0, "1.00"), (0.00004, "<0.001"), (0.001, "0.00100"),
                                          (0.0123456, "0.0123"), (0.05, "0.0500"), (float("nan"), "")])
def test_p_values_have_three_significant_digits(p, shown):
    assert format_p(p) == shown


def test_an_unbreakable_column_wider_than_the_page_is_resized_as_a_last_resort(tmp_path):
    from reports.latex import table_float

    frame = pd.DataFrame({"a long first column that has to wrap on the page": ["x " * 40, "y"],
                          "config": ["z" * 130, "w"], "acc": [0.5, -0.25]})
    made = table_float(frame, "Wide `t`", "tab:t", "a note")
    assert made.resized and made.latex.count("\\resizebox") == 1 and "\\begin{tabular}{p{" in made.latex
    (tmp_path / "t.tex").write_text("% requires \\usepackage{booktabs} \\usepackage{graphicx}\n" + made.latex)
    _compile(tmp_path, [tmp_path / "t.tex"], "")



def test_an_explain_report_compiles_and_its_pdf_shows_the_csvs_numbers(tmp_path):
    """An explain study (search/explain.py: an ablation with the study attr `explain`): its .tex compiles in a
    minimal article with booktabs, and the PDF's text carries each choice's contribution and CI as the CSV has them."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    names = {"baseline": "winner", "attention": "pooling = mean", "am_softmax": "loss = ce",
             "attention + am_softmax": "d_model = 80"}
    study = ablation_study(url, "s-explain-t3", names)
    study.set_user_attr("explain", {"source": "s", "trial": 3, "reference": "sample", "plan": "leave_one_out",
                                    "factors": [{"name": row.split(" = ")[0], "winner": "w",
                                                 "reference": row.split(" = ")[1], "row": row}
                                                for row in list(names.values())[1:]]})
    out = _report(tmp_path, "s-explain-t3", url, "tex,csv")
    _compile(out, [out / "s-explain-t3.tex"], "a4paper")
    text = subprocess.run(["pdftotext", "-layout", str(out / "doc.pdf"), "-"], capture_output=True, text=True,
                          check=True).stdout.replace("\u2212", "-")
    csv = pd.read_csv(out / "s-explain-t3.csv")
    # contribution = winner - row, largest first: d_model's row is 0.0101 below the winner, pooling's 0.05 above
    assert list(csv["parameter"]) == ["d_model", "loss", "pooling"]
    for r in csv.itertuples():
        assert f"{r.contribution:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]" in text, (r, text)


def test_report_figures_are_written_as_pdf_and_svg_for_a_paper(tmp_path, capsys):
    """`report --figures pdf,svg`: every figure of the report as OUT/NAME-ID.{pdf,svg}, through kaleido and the
    Chromium CI installs; the PDF carries the figure's text, the SVG is an SVG document."""
    import xml.etree.ElementTree as ET

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    ablation_study(url)
    out = tmp_path / "out"
    assert run_study.main(["report", "boss_ablation", "--storage", url, "--format", "md", "--out", str(out),
                           "--figures", "pdf,svg"]) == 0
    ids = ["ablation-bars", "ablation-deltas", "ablation-learning-curves"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["boss_ablation.md", *(f"boss_ablation-{i}.{fmt}" for i in ids for fmt in ("pdf", "svg"))])
    text = subprocess.run(["pdftotext", str(out / "boss_ablation-ablation-bars.pdf"), "-"], capture_output=True,
                          text=True, check=True).stdout
    assert "per variant" in text and "attention" in text
    assert ET.parse(out / "boss_ablation-ablation-deltas.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert run_study.main(["report", "boss_ablation", "--storage", url, "--figures", "eps"]) == 2
    assert "--figures 'eps': unknown format 'eps'; valid: pdf, svg, png" in capsys.readouterr().err
