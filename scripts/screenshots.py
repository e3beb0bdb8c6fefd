"""The README's screenshots, taken from this repo's real runs in headless Chromium.

    python scripts/screenshots.py --out docs/screenshots [--plots-revs HEAD] [--studies panel em_first]
        [--shots mlflow plots reports] [--reports DIR]

Writes, each from what the runs left here:
- `mlflow_runs.png`: the MLflow runs table (`personaspace ui`'s first page), parent runs named
  `<study> · panel<N> · <experiment>`;
- `mlflow_compare.png`: MLflow's comparison of the two newest parent runs (two panels or studies);
- `mlflow_model.png`: a registered coupling adapter and its versions;
- `plots_diff.png`: `dvc plots diff <revs>` (the workspace against each rev), drawn offline;
- `report_<study>.png`: the top of each study's `reports/<study>/report.html` (``--reports``: another
  checkout's reports folder, e.g. a clone that ran `dvc exp run -S study=em_first`).
Needs `make browser` (Debian's chromium and its driver).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from personaspace import browser
from personaspace.tracking import EXPERIMENT, RUNS_TABLE_QUERY, runs_table_url

ROOT = Path(__file__).resolve().parents[1]
# MLflow 3.17 opens its assistant beside every page of a new browser profile; its close button
ASSISTANT_CLOSE = 'button[data-component-id="mlflow.assistant.chat_panel.close"]'


def _close_assistant(driver) -> None:
    """Close MLflow's assistant panel (the profile remembers it for the later pages)."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, ASSISTANT_CLOSE):
        button.click()


def _full_height(driver, limit: int = 4000) -> None:
    """Resize the window to the page's height (up to ``limit`` px), so one screenshot holds it."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(driver.get_window_size()["width"], min(int(height) + 40, limit))


def mlflow_shots(driver, out: Path) -> list[Path]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ROOT / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit("no MLflow runs here yet: run `dvc repro` first")
    parents = mlflow.search_runs(
        [experiment.experiment_id], filter_string="tags.stage = 'invocation'", order_by=["attributes.start_time DESC"],
        output_format="list",
    )  # fmt: skip
    written = []
    with browser.mlflow_server(ROOT / "mlflow.db") as url:
        browser.page_text(driver, runs_table_url(url, experiment.experiment_id), [parents[0].info.run_name])
        _close_assistant(driver)
        driver.save_screenshot(str(out / "mlflow_runs.png"))
        written.append(out / "mlflow_runs.png")
        newest = {}  # the newest parent run of each study that logged headline metrics (not a report-only rerun)
        for run in parents:
            if run.data.metrics:
                newest.setdefault(run.data.params.get("study", run.info.run_name), run)
        if len(newest) >= 2:
            pair = list(newest.values())[:2]
            ids = [p.info.run_id for p in pair]
            compare = (
                f'{url}/#/compare-runs?runs=["{ids[0]}","{ids[1]}"]&experiments=["{experiment.experiment_id}"]'
                f"&{RUNS_TABLE_QUERY}"
            )
            browser.page_text(driver, compare, [pair[0].info.run_name, "Parameters"])
            # the params and headline metrics side by side, not the (empty) parallel-coordinates plot above them
            from selenium.webdriver.common.by import By

            details = driver.find_element(By.XPATH, "//*[normalize-space(text())='Run details']")
            driver.execute_script("arguments[0].scrollIntoView()", details)
            driver.save_screenshot(str(out / "mlflow_compare.png"))
            written.append(out / "mlflow_compare.png")
        models = mlflow.MlflowClient().search_registered_models(max_results=1, order_by=["name ASC"])
        if models:
            name = models[0].name
            browser.page_text(driver, f"{url}/#/models/{name}", [name, "Version 1"])
            driver.save_screenshot(str(out / "mlflow_model.png"))
            written.append(out / "mlflow_model.png")
    return written


def plots_shot(driver, out: Path, revisions: list[str], scratch: Path) -> Path:
    page = browser.plots_page(ROOT, revisions, scratch / "plots", cache=ROOT / ".cache" / "vega")
    browser.plots_drawn(driver, page, plots=1)
    _full_height(driver)
    driver.save_screenshot(str(out / "plots_diff.png"))
    return out / "plots_diff.png"


def report_shot(driver, out: Path, study: str, reports: Path) -> Path | None:
    page = reports / study / "report.html"
    if not page.is_file():
        print(f"no {page}: run the study first (skipped)", file=sys.stderr)
        return None
    driver.get(page.as_uri())
    driver.save_screenshot(str(out / f"report_{study}.png"))
    return out / f"report_{study}.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--plots-revs", nargs="*", default=["HEAD"], help="revisions `dvc plots diff` compares")
    parser.add_argument("--studies", nargs="*", default=["panel"], help="studies whose report is shot")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports", help="the folder of reports/<study>/")
    parser.add_argument("--shots", nargs="*", default=["mlflow", "plots", "reports"], help="which views to shoot")
    args = parser.parse_args()
    reason = browser.unavailable()
    if reason:
        raise SystemExit(f"no browser: {reason}")
    args.out.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch, browser.chromium(width=1800) as driver:
        written = mlflow_shots(driver, args.out) if "mlflow" in args.shots else []
        if "plots" in args.shots:
            driver.set_window_size(1800, 1000)
            written.append(plots_shot(driver, args.out, args.plots_revs, Path(scratch)))
        if "reports" in args.shots:
            driver.set_window_size(1800, 1000)
            written += [p for p in (report_shot(driver, args.out, s, args.reports) for s in args.studies) if p]
    for path in written:
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
