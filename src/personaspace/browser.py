"""The views researchers compare runs in, opened in a real browser: the MLflow UI and `dvc plots diff`.

>>> with mlflow_server(Path("mlflow.db")) as url, chromium() as driver:            # doctest: +SKIP
...     text = page_text(driver, url + "/#/experiments/1", wait_for=["panel · panel12"])
>>> page = plots_page(Path("."), ["HEAD"], Path("/tmp/plots"), cache=Path(".cache/vega"))  # doctest: +SKIP

Headless Chromium is Debian's `chromium` with its `chromedriver` (`make browser` installs both),
driven by selenium. ``mlflow_server`` starts `mlflow server` on 127.0.0.1 in a process group of
its own and stops the whole group on exit. `dvc plots diff` writes a page that loads Vega from a
CDN; ``plots_page`` renders the same page with the same Vega versions inlined (fetched once with
`npm pack`), so it draws without the network.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def unavailable() -> str | None:
    """Why a browser check cannot run here (None when it can)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        return f"{', '.join(missing)} not installed (`make browser` installs Debian's chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (`make setup`)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(db: Path, timeout: float = 120) -> Iterator[str]:
    """`mlflow server` on the SQLite database ``db``, on a free port of 127.0.0.1: yields its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    from personaspace.tracking import server_command

    command = [*server_command(f"sqlite:///{Path(db).resolve()}", port), "--workers", "1"]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(url, server, timeout, log)
            yield url
        finally:
            _stop_group(server)


def wait_healthy(url: str, server: subprocess.Popen, timeout: float, log: Any = None) -> None:
    """Return once the MLflow server at ``url`` answers /health; raise if it exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            said = "" if log is None else (log.seek(0), log.read().decode(errors="replace")[-2000:])[1]
            raise RuntimeError(f"mlflow server did not start at {url}: {said or 'see its output above'}")
        time.sleep(0.5)


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM the process group ``server`` leads (its workers are its children), SIGKILL what stays."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # a worker that outlived the server
        os.killpg(server.pid, signal.SIGKILL)


@contextmanager
def chromium(width: int = 1440, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium driven by selenium (quit on exit)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--lang=en-US"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver: Any, url: str, wait_for: Sequence[str], timeout: float = 60) -> str:
    """The visible text of ``url`` once every string of ``wait_for`` shows (the UI renders after load)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    try:
        WebDriverWait(driver, timeout).until(
            lambda d: all(s in d.find_element(By.TAG_NAME, "body").text for s in wait_for)
        )
    except TimeoutException as err:
        shown = driver.find_element(By.TAG_NAME, "body").text
        missing = [s for s in wait_for if s not in shown]
        raise AssertionError(f"{url}: {missing} never showed; the page says:\n{shown[:3000]}") from err
    return driver.find_element(By.TAG_NAME, "body").text


def vega_scripts(cache: Path) -> str:
    """`<script>` elements inlining the Vega, Vega-Lite and vega-embed builds DVC's plots page names.

    The versions are read from dvc_render (the page DVC writes loads them from a CDN); the builds
    come from `npm pack` once and are kept in ``cache``."""
    from dvc_render.vega import VegaRenderer

    packages = re.findall(r"npm/([\w-]+)@([\d.]+)", VegaRenderer.SCRIPTS)
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    scripts = []
    for name, version in packages:
        build = cache / f"{name}-{version}.min.js"
        if not build.is_file():
            if shutil.which("npm") is None:
                raise RuntimeError("npm is needed once to fetch the Vega builds (apt-get install npm)")
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run(["npm", "pack", "-q", f"{name}@{version}"], cwd=tmp, check=True, capture_output=True)
                with tarfile.open(next(Path(tmp).glob("*.tgz"))) as archive:
                    member = archive.extractfile(f"package/build/{name}.min.js")
                    if member is None:
                        raise RuntimeError(f"{name}@{version} has no build/{name}.min.js")
                    partial = build.with_suffix(".tmp")
                    partial.write_bytes(member.read())
                    partial.replace(build)
        # a "</script>" inside the code would end the element early; JS reads "<\/script>" the same
        code = build.read_text(encoding="utf8").replace("</script>", "<\\/script>")
        scripts.append(f"<script>{code}</script>")
    return "\n".join(scripts)


# DVC's page calls vegaEmbed(el, spec); drawn as SVG (not vega-embed's default canvas), the marks and
# legends are DOM elements a test can read
SVG_EMBED = """<script>
const canvasEmbed = window.vegaEmbed;
window.vegaEmbed = (el, spec, opt) => canvasEmbed(el, spec, Object.assign({renderer: "svg"}, opt || {}));
</script>"""

# per plot on the page: its title, how many data marks it drew, and its legend's text
PLOTS_DRAWN = """return [...document.querySelectorAll('.vega-embed svg.marks')].map(svg => ({
  title: (svg.querySelector('.role-title-text') || {}).textContent || '',
  marks: [...svg.querySelectorAll('.role-mark path, .role-mark line, .role-mark rect')]
           .filter(e => !(e.getAttribute('d') || '').includes('NaN')).length,
  legend: [...svg.querySelectorAll('.role-legend')].map(e => e.textContent).join(' '),
}))"""


def plots_drawn(driver: Any, page: Path, plots: int, timeout: float = 60) -> list[dict[str, Any]]:
    """Open ``page`` and wait until it holds ``plots`` drawn plots: per plot, title, data marks and legend."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.as_uri())
    WebDriverWait(driver, timeout).until(lambda d: len(d.execute_script(PLOTS_DRAWN)) >= plots)
    return driver.execute_script(PLOTS_DRAWN)


def plots_page(repo: Path, revisions: Sequence[str], out: Path, cache: Path) -> Path:
    """`dvc plots diff <revisions>` in ``repo`` as an HTML page in ``out`` that draws offline."""
    template = out / "template.html"
    out.mkdir(parents=True, exist_ok=True)
    # DVC's own page, with the CDN scripts replaced by the same builds inlined
    template.write_text(
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset='utf-8'>\n<title>DVC Plot</title>\n"
        f"{vega_scripts(cache)}\n{SVG_EMBED}\n<style>table {{ border-spacing: 15px; }}</style>\n</head>\n"
        "<body>\n{plot_divs}\n</body>\n</html>\n",
        encoding="utf8",
    )
    subprocess.run(
        ["dvc", "plots", "diff", *revisions, "--out", str(out.resolve()), "--html-template", str(template.resolve())],
        cwd=repo, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out / "index.html"
