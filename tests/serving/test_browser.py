"""The web page end to end: a real uvicorn, Debian's headless Chromium driven by Playwright.

CI installs chromium (.ci/run); on a machine without it the test skips and says why. Playwright never
downloads a browser here: it launches /usr/bin/chromium (or $CHROMIUM).
"""

import os
import shutil
from pathlib import Path

import pytest

from imdb_lora.inference.classifier import Classifier
from imdb_lora.serving.app import create_app
from imdb_lora.serving.server import BackgroundServer

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Headless, as root, on a machine with no network: no sandbox, and none of Chromium's background calls.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium; CI installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def test_page_analyzes_a_review_and_shows_model_info(browser, trained_run, tmp_path):
    clf = Classifier.load(str(trained_run), device="cpu")
    review = "great wonderful film i loved it, superb acting"
    want = clf.predict([review])[0]
    with BackgroundServer(create_app(clf)) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#info-list dd")  # model info arrives from /info
        info = page.inner_text("#info-list")
        assert "bert" in info and "lora" in info and "run on torch" in info

        page.fill("#text", review)
        page.click("#analyze")
        page.wait_for_selector("#result:not([hidden])")
        assert page.inner_text("#label") == want.label
        for side, prob in (("positive", want.positive), ("negative", want.negative)):
            shown = float(page.inner_text(f"#p-{side}").rstrip("%"))
            assert abs(shown - 100 * prob) < 0.06
            width = page.eval_on_selector(f"#bar-{side}", "el => el.style.width")
            assert abs(float(width.rstrip("%")) - 100 * prob) < 0.06
        page.screenshot(path=str(tmp_path / "page.png"))

        # an empty box is refused in the page itself, with a message, before any request
        page.fill("#text", "   ")
        page.click("#analyze")
        assert "review first" in page.inner_text("#error")
        assert page.is_hidden("#result")
        page.close()
