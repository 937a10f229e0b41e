"""The dashboard in a real browser: sign in, start a job from the form, watch the loss chart, stop it.

Debian's chromium (/usr/bin/chromium, installed by .ci/run) driven by Python playwright. The screenshot the
README shows is refreshed in docs/dashboard.png when NL_UPDATE_SCREENSHOTS=1 (else it goes to a temp dir).
"""

from __future__ import annotations

import os
import sys
from urllib.parse import parse_qs, urlsplit

import pytest

from servicekit import REPO, Server, kill_workers, write_data

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-token"
SCREENSHOT = REPO / "docs" / "dashboard.png"

# How many blue (train loss) pixels the loss chart's canvas holds: proof the line is drawn, not just the data set.
COUNT_TRAIN_PIXELS = """() => {
  const c = document.querySelector('#chart-loss canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    const near = Math.abs(d[i] - 47) < 40 && Math.abs(d[i + 1] - 111) < 40 && Math.abs(d[i + 2] - 222) < 40;
    if (near && d[i + 3] > 100) n++;
  }
  return n;
}"""


def test_dashboard_start_watch_stop(tmp_path):
    if not os.path.exists(CHROMIUM):
        print(f"skipping: {CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")

    work = tmp_path / "work"
    write_data(work, n_train=96)
    srv = Server(work, token=TOKEN, env={"NL_WORKER_STEP_DELAY": "0.15"}).start()
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.set_default_timeout(60_000)

            # Sign in with the token; the cookie it sets carries the API calls and the event stream.
            page.goto(srv.url + "/")
            page.fill("input[name=token]", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector("#view-list:not([hidden])")
            page.wait_for_selector("#no-jobs:not([hidden])")

            form = "#start-form"
            page.fill(f"{form} input[name=name]", "browser-demo")
            page.fill(f"{form} input[name=model]", "embedded:micro-llama")
            page.fill(f"{form} input[name=train]", "data/train.jsonl")
            page.fill(f"{form} input[name=valid]", "data/valid.jsonl")
            page.fill(f"{form} input[name=steps]", "400")
            page.fill(f"{form} input[name=lr]", "3e-3")
            page.fill(f"{form} input[name=max_length]", "64")
            page.fill(f"{form} input[name=periods]", "1, 2, 4")
            page.fill(f"{form} input[name=eval_every]", "4")
            page.fill(f"{form} input[name=rank]", "4")
            # The GPUs field reaches the API as ?devices=N: more than the server has is refused, naming it.
            page.fill(f"{form} input[name=devices]", "1024")
            with page.expect_request(lambda r: r.method == "POST" and "/v1/jobs?" in r.url) as refused:
                page.click("#start-btn")
            assert parse_qs(urlsplit(refused.value.url).query)["devices"] == ["1024"]
            page.wait_for_selector("#form-error:not([hidden])")
            assert "devices: 1024" in page.text_content("#form-error")
            page.fill(f"{form} input[name=devices]", "1")
            with page.expect_request(lambda r: r.method == "POST" and "/v1/jobs?" in r.url) as started:
                page.click("#start-btn")
            query = parse_qs(urlsplit(started.value.url).query)
            assert query["devices"] == ["1"] and query["name"] == ["browser-demo"]

            page.wait_for_url("**/#/jobs/*")
            job_id = page.url.rsplit("/", 1)[-1]
            page.wait_for_function("document.querySelector('#job-status').textContent === 'running'")
            # Live points: at least 16 train steps and 3 evaluations arrive through the event stream.
            page.wait_for_function(
                "window.nl.charts.loss && window.nl.charts.loss.data[0].length >= 24 && "
                "window.nl.charts.loss.data[2].filter(v => v !== null).length >= 3 && "
                "window.nl.charts.tiers.data[1].filter(v => v !== null).length >= 24"
            )
            page.wait_for_timeout(300)  # one animation frame for the last points
            assert page.evaluate(COUNT_TRAIN_PIXELS) > 50
            steps = page.evaluate("window.nl.charts.loss.data[0]")
            assert steps == sorted(steps) and steps[0] == 1
            assert page.text_content("#s-tps") not in ("", "–") and page.text_content("#s-eta") not in ("", "–")
            assert page.text_content("#s-devices") == "1"  # one device: a server without GPUs names none
            shot = SCREENSHOT if os.environ.get("NL_UPDATE_SCREENSHOTS") == "1" else tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            page.click("#stop-btn")
            page.wait_for_function("document.querySelector('#job-status').textContent === 'stopped'", timeout=30_000)
            assert page.is_enabled("#resume-btn") and not page.is_enabled("#stop-btn")
            # The checkpoint the stop wrote appears in the list.
            page.wait_for_function("document.querySelector('#checkpoints').textContent.includes('last')")

            # The list shows the job stopped, and so does the API.
            page.click("a[href='#/']")
            page.wait_for_selector(f"#jobs tr[data-id='{job_id}'] .badge.stopped")
            browser.close()
        job = srv.client().get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "stopped" and job["name"] == "browser-demo" and 24 <= job["step"] < 400
        assert job["devices"] == 1
    finally:
        srv.stop()
        kill_workers(work)
