"""Shared helpers for tests that drive the MLflow UI in a real browser: the `mlflow ui` server on a
temporary store, and a headless page of Debian's Chromium driven by Playwright.

Usage::

    sync_api = require_browser()               # skips the test when Chromium or Playwright is missing
    with mlflow_ui(uri, tmp_path / "mlflow-ui.log") as url, browser_page(tmp_path) as page:
        page.goto(f"{url}/#/experiments/{experiment_id}", wait_until="domcontentloaded")
        page.get_by_text("light-ce", exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)

The UI keeps polling the server, so pages are awaited with `domcontentloaded` and locators, never
with `networkidle`. Playwright's own browser download does not work here: the browser is the
system's /usr/bin/chromium (apt-get install chromium).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest
from processes import free_port, start_mlflow

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 1000}
# MLflow 3.17 opens tip popovers of its own (e.g. "Detect Issues in Your Traces" on the GenAI overview,
# a second or more after the page loads) that block every click until "Got it" is pressed.
TIP_DISMISS_BUTTON = "Got it"
UI_TIMEOUT_MS = 90_000  # for one locator: the first page load compiles and fetches a large bundle
SERVER_START_SECONDS = 180  # the first start of `mlflow ui` on a fresh store can take ~20 s, more when busy
SERVER_STOP_SECONDS = 30


def require_browser():
    """playwright.sync_api, or a skip saying what is missing. Call it before any costly set-up."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@contextmanager
def mlflow_ui(uri: str, log_path: Path, timeout: float = SERVER_START_SECONDS) -> Iterator[str]:
    """`python -m mlflow ui` (the README's command) on the tracking store `uri` and a free port, as
    its own process group; yields its base URL once /health answers, and always stops the group.
    The server's output goes to `log_path`; it runs in that file's folder."""
    server, url = start_mlflow("ui", ["--backend-store-uri", uri], log_path, free_port(), timeout)
    try:
        yield url
    finally:
        server.stop(SERVER_STOP_SECONDS)


def dismiss_tips(page) -> None:
    """Press "Got it" on any tip popover the UI opens, whenever it opens, before the page's next action
    (as a user would); without it, a click races the tip and loses on a busy machine."""
    button = page.get_by_role("dialog").get_by_role("button", name=TIP_DISMISS_BUTTON, exact=True)
    page.add_locator_handler(button.first, lambda tip: tip.click())


@contextmanager
def browser_page(screenshots: Optional[Path] = None, viewport: Optional[dict] = None):
    """A page of headless Chromium (skips when there is none); the browser is always closed.

    With `screenshots`, a failure inside the block leaves `failure.png` of the page there first."""
    sync_api = require_browser()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport=viewport or VIEWPORT)
            dismiss_tips(page)
            try:
                yield page
            except BaseException:
                if screenshots is not None:
                    try:
                        page.screenshot(path=str(Path(screenshots) / "failure.png"))
                    except Exception:  # the page may be what failed; the original error matters
                        pass
                raise
        finally:
            browser.close()
