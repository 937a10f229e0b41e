"""``/docs`` (Swagger UI) and ``/redoc`` render with no network: every script, style and font comes from the
service itself. The browser test drives Debian's chromium (/usr/bin/chromium) through playwright, refusing any
request that leaves the server, and waits until the operations of the API are drawn."""

from __future__ import annotations

import os
import sys
from urllib.parse import urlparse

import pytest

from servicekit import Server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "docs-token"
# ReDoc's attribution logo is an <img> with a fixed CDN address in its bundle; it removes itself when the image
# cannot load (ReDoc's own fallback), so it is the one request allowed to fail.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def test_docs_pages_reference_only_local_assets(tmp_path):
    from fastapi.testclient import TestClient

    from nested_learning.service.app import create_app
    from nested_learning.service.docs import assets_dir
    from nested_learning.service.jobs import Settings

    assert assets_dir() is not None, "fastapi-offline (the serve extra) ships the Swagger UI and ReDoc builds"
    settings = Settings(db=str(tmp_path / "jobs.db"), workdir=tmp_path, run_scheduler=False)
    with TestClient(create_app(settings)) as client:
        pages = {"/docs": ["swagger-ui-bundle.js", "swagger-ui.css"], "/redoc": ["redoc.standalone.js"]}
        for page, assets in pages.items():
            html = client.get(page).text
            assert "http://" not in html and "https://" not in html, page
            for name in assets:
                assert f"/docs-assets/{name}" in html
                got = client.get(f"/docs-assets/{name}")
                assert got.status_code == 200 and len(got.content) > 100_000, name


@pytest.mark.browser
@pytest.mark.slow
def test_docs_render_in_a_browser_without_network(tmp_path):
    if not os.path.exists(CHROMIUM):
        print(f"skipping: {CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")

    srv = Server(tmp_path / "work", token=TOKEN).start()
    refused: list[str] = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {TOKEN}"})
            own = urlparse(srv.url).netloc

            def only_the_server(route):
                if urlparse(route.request.url).netloc == own:
                    route.continue_()
                else:
                    refused.append(route.request.url)
                    route.abort()

            context.route("**/*", only_the_server)
            page = context.new_page()
            page.set_default_timeout(60_000)

            page.goto(srv.url + "/docs")
            page.wait_for_selector(".swagger-ui .info .title")
            assert "nested-learning" in page.inner_text(".swagger-ui .info .title")
            page.wait_for_function("document.querySelectorAll('.opblock').length >= 10")
            assert page.locator(".opblock-summary-path[data-path='/v1/jobs']").count() >= 1
            # An operation opens and shows its schema (the UI is live, not just markup).
            page.locator(".opblock-summary-path[data-path='/v1/healthz']").first.click()
            page.wait_for_selector(".opblock.is-open .responses-wrapper")

            page.goto(srv.url + "/redoc")
            page.wait_for_selector("h1")
            page.wait_for_function("document.querySelectorAll('[data-section-id^=\"operation/\"]').length >= 10")
            assert "nested-learning" in page.inner_text("h1")
            browser.close()
    finally:
        srv.stop()
    assert [url for url in refused if url != REDOC_LOGO] == []  # nothing else tried to leave the server
