"""The page at ``/`` in a real browser (Playwright on the system's Chromium): two images in,
two verdicts out equal to the API's, the model card shown, usable on a phone-sized window.

Playwright's own browser download is not reachable here, so the test points it at Debian's
``chromium``. Without a browser (or without Playwright) it skips and says why, unless
``REQUIRE_BROWSER=1`` (set by .ci/run), which makes that a failure.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.serving import running_service

KEY = "browser-key"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    found = next((p for name in BROWSERS if (p := shutil.which(name))), None)
    try:
        import playwright.sync_api  # noqa: F401  (deferred: optional, only this test needs it)
    except ImportError:
        found, why = None, "Playwright for Python is not installed (pip install playwright)"
    else:
        why = "no Chromium on PATH (as root: apt-get install -y chromium)"
    if found is None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"REQUIRE_BROWSER=1 but {why}")
        pytest.skip(f"{why}; REQUIRE_BROWSER=1 turns this skip into a failure")
    return found


def _not_blank(path) -> None:
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 10, f"screenshot {path} looks blank (std {img.std():.1f})"
    assert len(np.unique(img)) > 20


def test_page_scores_two_images(trained_run, tmp_path):
    executable = _browser()
    from playwright.sync_api import sync_playwright  # deferred: optional dependency

    files = [
        sorted((trained_run["data"] / "test" / label).glob("*.jpg"))[0]
        for label in ("FAKE", "REAL")
    ]
    run_dir = tmp_path / "service"
    with (
        running_service(trained_run["ckpt"], run_dir, "device=cpu", key=KEY, env={}) as service,
        sync_playwright() as pw,
    ):
        api = {}
        for f in files:
            status, data = service.predict([(f.name, f.read_bytes())])
            assert status == 200
            api[f.name] = data["predictions"][0]["label"]
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        # The key as a user gives it: the answer to the browser's Basic-auth prompt on "/",
        # which the browser then sends with the page's own requests.
        context = browser.new_context(
            viewport={"width": 390, "height": 844},  # a phone
            http_credentials={"username": "user", "password": KEY},
        )
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{service.port}/")
        page.get_by_label("Choose images").set_input_files([str(f) for f in files])
        page.wait_for_selector("#results li[data-state=done] >> nth=1", timeout=30_000)
        cards = page.locator("#results li")
        assert cards.count() == 2
        shown = {
            cards.nth(i).locator(".name").inner_text(): cards.nth(i)
            .locator(".verdict")
            .get_attribute("data-label")
            for i in range(2)
        }
        assert shown == api
        assert page.get_by_role("meter").count() == 2
        page.locator("#card summary").click()
        assert "test_resnet" in page.locator("#card-fields").inner_text()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    _not_blank(shot)
