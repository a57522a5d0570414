"""A real browser (headless Debian chromium, driven by Playwright) on what a real `run-study search` wrote:
the study's optuna-dashboard page (note, saved figures, a trial's checkpoint artifact) and the offline
HTML report opened with every network request blocked.

Nothing is mocked: the CLI, optuna-dashboard's server and chromium are real processes. Screenshots are kept in
$HW4_TEST_ARTIFACTS, else test-artifacts/ at the repository root. Playwright and chromium are required (CI
installs both, see .ci/run): missing, the test fails; it is never skipped.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import optuna_dashboard
import pytest

from search.artifact_store import open_artifact_store
from search.checkpoints import artifacts
from tests.conftest import write_study
from tests.test_cli import FAST
from tests.test_dashboard import _free_port, _get

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # reported by the `browser` fixture as a failure, not a skip
    Page = sync_playwright = None

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright cannot download its own browser here
STUDY = "browser_e2e"
CHECKPOINT = "trial-0-best.pt"
# Two categorical d_model values: the report then has a figure optuna-dashboard does not draw itself
# ("by-d_model"), which is saved into the study and shown on its page.
BODY = FAST.replace("max_steps = 40", "max_steps = 20").replace("valid_steps = 20", "valid_steps = 10")


def _artifacts_dir() -> Path:
    folder = Path(os.environ.get("HW4_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _screenshot(page: "Page", name: str, full_page: bool = True) -> Path:
    path = _artifacts_dir() / f"browser-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    print(f"screenshot: {path}")
    return path


@contextmanager
def _screenshot_on_failure(page: "Page", name: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        _screenshot(page, f"{name}-FAILED", full_page=False)
        raise


def _console_errors(page: "Page") -> list[str]:
    """A list that fills with the page's console errors and uncaught exceptions."""
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    return errors


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, tiny_synthetic: Path) -> Path:
    """A 2-trial study run by the real CLI in a fresh folder: STUDY.db, the dashboard note and figures,
    and STUDY.results/STUDY.html."""
    cwd = tmp_path_factory.mktemp("browser")
    study_file = write_study(cwd / f"{STUDY}.toml", BODY)
    run = subprocess.run(
        [sys.executable, str(ROOT / "run_study.py"), "search", str(study_file), "--data", str(tiny_synthetic),
         "--n-trials", "2"],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr
    assert (cwd / f"{STUDY}.db").exists() and (cwd / f"{STUDY}.results" / f"{STUDY}.html").exists()
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{cwd / f'{STUDY}.db'}")
    assert CHECKPOINT in artifacts(study.trials[0], study._storage)  # uploaded by training
    return cwd


@pytest.fixture(scope="module")
def browser():  # first in each test's arguments: a missing browser fails before the 20 s search
    if sync_playwright is None:
        pytest.fail("playwright is not installed: pip install -e '.[test]' (CI installs it)", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def dashboard(searched: Path) -> Iterator[str]:
    """`run-study dashboard` (optuna-dashboard's own server, with the study's artifact store); its base URL."""
    port = _free_port()
    log = (searched / "dashboard.log").open("w")
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "run_study.py"), "dashboard", f"{STUDY}.toml", "--port", str(port)],
        cwd=searched, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _get(f"{base}/api/studies")[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"optuna-dashboard did not answer on {base}:\n{(searched / 'dashboard.log').read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# ------------------------------------------------------------------------------------------------------- tests

def _page_width(page: "Page") -> int:
    """How wide the page's content is (a 1400 px window shows 1400 of it without a horizontal scroll bar)."""
    page.wait_for_timeout(200)  # a layout pass after the last render
    return page.evaluate("document.documentElement.scrollWidth")


# In the <pre> block whose text holds `word` (a table's header), the on-screen gaps (px) between neighbouring
# values of the header line and of the first data line (values: runs of text two or more spaces apart).
_TABLE_GAPS = """word => {
  const pre = [...document.querySelectorAll('pre')].find(p => p.textContent.includes(word));
  if (!pre) return null;
  const walker = document.createTreeWalker(pre, NodeFilter.SHOW_TEXT);
  const nodes = [];  // [text node, its offset in the whole text]
  let text = '';
  for (let n = walker.nextNode(); n; n = walker.nextNode()) { nodes.push([n, text.length]); text += n.data; }
  const at = offset => {
    const [node, start] = nodes.filter(([, s]) => s <= offset).pop();
    return [node, offset - start];
  };
  const gaps = from => {
    const end = text.indexOf('\\n', from);
    const boxes = [...text.slice(from, end < 0 ? text.length : end).matchAll(/\\S+(?: \\S+)*/g)].map(m => {
      const range = document.createRange();
      range.setStart(...at(from + m.index));
      range.setEnd(...at(from + m.index + m[0].length));
      return range.getBoundingClientRect();
    });
    return boxes.slice(1).map((box, i) => box.left - boxes[i].right);
  };
  const header = text.lastIndexOf('\\n', text.indexOf(word)) + 1;
  const rule = text.indexOf('\\n', header) + 1;
  return {header: gaps(header), row: gaps(text.indexOf('\\n', rule) + 1)};
}"""


def test_dashboard_shows_note_figures_and_checkpoint(browser, searched: Path, dashboard: str) -> None:
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{searched / f'{STUDY}.db'}")
    heading = next(line for line in optuna_dashboard.get_note(study).splitlines() if line.startswith("#"))
    heading = heading.lstrip("#").strip().replace("`", "")  # as rendered: "# Study `x`" -> "Study x"
    detail = json.loads(_get(f"{dashboard}/api/studies/{study._study_id}")[1])
    figures = [figure["id"] for figure in detail["plotly_graph_objects"]]
    assert figures, "the report saved no figure into the study"
    checkpoint_store = open_artifact_store(str(searched / f"{STUDY}.artifacts"))

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(15_000)
    errors = _console_errors(page)
    try:
        with _screenshot_on_failure(page, "dashboard"):
            # The study list, then the study's page by its link, as a user gets there.
            page.goto(f"{dashboard}/dashboard")
            page.get_by_role("link", name=re.compile(re.escape(STUDY))).first.click()
            page.wait_for_url(f"**/dashboard/studies/{study._study_id}")
            assert STUDY in page.locator("header").inner_text()  # the app bar: "NAME (id=N)"
            # Saved plotly figures are drawn on the study's main (History) page, in divs with
            # id "user-defined-plot:<graph_object_id>", after the dashboard's own plots.
            for fig_id in figures:
                plot = page.locator(f'[id="user-defined-plot:{fig_id}"]')
                plot.locator("svg.main-svg").first.wait_for()
                assert "js-plotly-plot" in (plot.get_attribute("class") or "").split()
            _screenshot(page, "dashboard-study")

            # The note (the report's Markdown) has a page of its own: "Note" in the side bar.
            page.get_by_role("link", name="Note").click()
            page.wait_for_url("**/note")
            page.get_by_role("heading", name=heading, exact=True).wait_for()
            _screenshot(page, "dashboard-note")
            # The dashboard draws Markdown tables without cell padding; the note's tables are monospace blocks
            # instead: each value of the top table's header and first row lies apart from the next, on screen.
            gaps = page.evaluate(_TABLE_GAPS, "valid_acc")
            assert gaps and gaps["header"] and len(gaps["row"]) == len(gaps["header"]), gaps
            assert min(gaps["header"] + gaps["row"]) >= 8, gaps  # px: at least one monospace space between values
            assert _page_width(page) <= 1400, "the note is wider than the window"

            # Trial 0's page lists its checkpoint under "Artifacts", with a download link that serves the file.
            page.goto(f"{dashboard}/dashboard/studies/{study._study_id}/trials?numbers=0")
            page.get_by_role("heading", name=re.compile(r"^Trial 0 ")).wait_for()
            page.get_by_text(CHECKPOINT, exact=True).wait_for()
            link = page.locator(f'a[download="{CHECKPOINT}"]')
            href = link.get_attribute("href")
            assert href and href.startswith("/artifacts/"), href
            with checkpoint_store.open_reader(href.rsplit("/", 1)[1]) as stored:
                assert page.request.get(dashboard + href).body() == stored.read()
            # Each user attr is one unwrapped line: the run config, in parts, keeps the page within the window.
            page.get_by_text(re.compile(r"^run_config 01/\d+ ")).wait_for()
            assert _page_width(page) <= 1400, "the trial page is wider than the window"
            _screenshot(page, "dashboard-trial-0")
        assert errors == [], errors
    finally:
        page.close()


def test_offline_report_draws_every_figure_without_network(browser, searched: Path) -> None:
    html = searched / f"{STUDY}.results" / f"{STUDY}.html"
    n_figures = html.read_text().count('class="plotly-graph-div"')
    assert n_figures > 0

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    blocked: list[str] = []

    def offline(route) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", offline)
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors = _console_errors(page)
    try:
        with _screenshot_on_failure(page, "report"):
            page.goto(html.as_uri())
            drawn = ("n => [...document.querySelectorAll('.plotly-graph-div')]"
                     ".filter(d => d.classList.contains('js-plotly-plot') && d.querySelector('svg.main-svg'))"
                     ".length === n")
            page.wait_for_function(drawn, arg=n_figures)
            _screenshot(page, "report-offline")
        assert errors == [], errors
        assert blocked == [], f"the offline report asked the network for {blocked}"
    finally:
        context.close()


# The ablation table, its columns as measured in headless chromium: width on a 1280 px screen, text when printed.
_ABLATION_TABLE = """() => {
  const table = document.querySelector('table');
  const box = table.parentElement;
  return {page: document.documentElement.scrollWidth, right: table.getBoundingClientRect().right,
          box: box.clientWidth, boxScroll: box.scrollWidth,
          headers: [...table.querySelectorAll('th')].map(th => th.textContent),
          last: [...table.querySelectorAll('tbody tr')].map(tr => tr.lastElementChild.textContent)};
}"""


def test_ablation_report_fits_a_1280px_screen_and_prints_every_column_on_a4(browser, tmp_path: Path) -> None:
    """The 4-variant x 6-seed ablation's HTML (written by write_report, from faked finished cells): its table fits
    a 1280 px window without scrolling, and chromium's print to A4 PDF keeps every column (pdftotext reads it)."""
    from reports import write_report
    from tests.test_latex import ablation_study

    pdftotext = shutil.which("pdftotext")
    if pdftotext is None:
        pytest.fail("no pdftotext: apt-get install poppler-utils (.ci/run does)", pytrace=False)
    _, (html,) = write_report(ablation_study(None), tmp_path, formats=("html",))
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        with _screenshot_on_failure(page, "ablation-report"):
            page.goto(html.as_uri())
            table = page.evaluate(_ABLATION_TABLE)
            assert table["headers"] == ["variant", "c/p/f", "mean ± std", "95% CI", "Δ [95% CI]", "p_t", "p_W", "d_z"]
            assert table["page"] <= 1280 and table["right"] <= 1280, table
            assert table["boxScroll"] <= table["box"], table  # its own box does not scroll either
            _screenshot(page, "ablation-report", full_page=False)
            page.pdf(path=str(tmp_path / "report.pdf"), format="A4")
        printed = subprocess.run([pdftotext, str(tmp_path / "report.pdf"), "-"], capture_output=True, text=True,
                                 check=True).stdout
        words = " ".join(printed.split())
        missing = [text for text in table["headers"] + [v for v in table["last"] if v] if text not in words]
        assert missing == [], f"printed to A4 without {missing}"
    finally:
        page.close()
