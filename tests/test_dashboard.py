"""The dashboard in a real headless Chromium (Debian's chromium and chromedriver, driven by
Selenium), against the session's stack: a job's page (empty state, live charts, spec, duration,
rate, why it ended, log scale, smoothing, zoom, hover, a picker beyond ten series, a diverged
job's numbers kept short), the jobs list (status filter, cancel, delete), the compare view and
the workers page; the browser logs no error. One browser for the module. With
GRADSTREAM_SCREENSHOT_DIR set, the README's screenshots are written there (docs/dashboard-job.png,
-compare.png, -jobs.png and -workers.png)."""

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import HTTPException
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from api.client import Client
from api.routes import dashboard
from cli.stack import Stack
from tests.conftest import SEED_EXAMPLE
from tests.faults import long_spec

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1440,1000",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(browser: webdriver.Chrome, timeout: float = 60) -> WebDriverWait[webdriver.Chrome]:
    # Elements a page redraws may go stale between finding and reading them: try again.
    return WebDriverWait(
        browser, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
    )


def _until(browser: webdriver.Chrome, condition: Callable[[webdriver.Chrome], Any]) -> Any:
    return _wait(browser).until(condition)


def _attr(browser: webdriver.Chrome, element_id: str, name: str) -> int:
    return int(browser.find_element(By.ID, element_id).get_attribute(name) or 0)


def _drawn(browser: webdriver.Chrome, element_id: str, points: int, scale: str) -> bool:
    """Whether the chart shows `points` points on a `scale` y axis (it redraws a moment after
    its data or a control changes)."""
    chart = browser.find_element(By.ID, element_id)
    return (
        chart.get_attribute("data-drawn") == str(points)
        and chart.get_attribute("data-scale") == scale
    )


def _text(browser: webdriver.Chrome, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def _severe(browser: webdriver.Chrome) -> list[dict[str, Any]]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def _screenshot(browser: webdriver.Chrome, name: str) -> None:
    if target := os.environ.get("GRADSTREAM_SCREENSHOT_DIR"):
        browser.save_screenshot(str(Path(target) / name))


def _row(browser: webdriver.Chrome, job_id: str) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]')


def _row_status(browser: webdriver.Chrome, job_id: str) -> str:
    rows = _row(browser, job_id)
    return rows[0].find_element(By.CSS_SELECTOR, ".badge").text if rows else ""


def test_the_chart_library_is_served_from_node_modules(stack: Stack) -> None:
    response = httpx.get(f"{stack.api_url}/static/vendor/echarts.min.js", timeout=10)
    assert response.status_code == 200, "run make setup (npm ci)"
    assert response.headers["content-type"].startswith("text/javascript")
    assert "Apache" in response.text[:2000]
    assert httpx.get(f"{stack.api_url}/static/..%2Fmain.py", timeout=10).status_code == 404


def test_a_missing_chart_library_is_a_503_that_says_run_make_setup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(dashboard, "ECHARTS", (tmp_path / "echarts.min.js",))
    with pytest.raises(HTTPException) as raised:
        dashboard.echarts()
    assert raised.value.status_code == 503 and "make setup" in raised.value.detail


def test_job_page_jobs_list_and_compare(
    stack: Stack, client: Client, browser: webdriver.Chrome
) -> None:
    browser.get(f"{stack.api_url}/#key={stack.api_key}")
    _until(browser, lambda b: b.find_element(By.ID, "jobs"))
    assert "key=" not in browser.current_url  # the key is kept in the browser, not the URL
    # One worker process runs one job at a time: `later` waits while `live` runs.
    live = client.submit(long_spec(steps=20_000, seed=2))
    later = client.submit(
        {**long_spec(steps=2_000, seed=3), "optimizer": {"name": "adam", "lr": 0.05}}
    )

    # Before its first step a job's page says so, and shows its spec.
    browser.get(f"{stack.api_url}/#/jobs/{later['id']}")
    _until(browser, lambda b: b.find_element(By.ID, "loss-chart-empty").is_displayed())
    assert _text(browser, "loss-chart-empty") == "Waiting for the first step…"
    assert _text(browser, "spec-optimizer") == "adam lr 0.05"
    assert _text(browser, "spec-data") == "synthetic 64\u00d74 + bias, full batch"
    assert _text(browser, "spec-steps").endswith("/ 2,000")
    assert not browser.find_element(By.ID, "result-card").is_displayed()

    # The running job's charts grow live from its event stream.
    browser.get(f"{stack.api_url}/#/")
    _until(browser, lambda b: _row(b, live["id"]))
    _row(browser, live["id"])[0].find_element(By.CSS_SELECTOR, "a").click()
    _until(browser, lambda b: _attr(b, "loss-chart", "data-points") > 0)
    first = _attr(browser, "loss-chart", "data-points")
    assert first < 20_000  # drawn mid-job: what follows arrives live
    _until(browser, lambda b: _attr(b, "loss-chart", "data-points") > first)
    _until(browser, lambda b: _text(b, "status") == "succeeded")
    _until(browser, lambda b: _attr(b, "loss-chart", "data-points") == 20_000)
    assert _attr(browser, "params-chart", "data-points") == 5 * 20_000  # w[0..3] and b
    assert _attr(browser, "grads-chart", "data-series") == 5
    assert "R²" in _text(browser, "result")
    assert _text(browser, "why-ended").startswith("succeeded: ")
    assert re.fullmatch(r"[\d.e+]+ steps/s", _text(browser, "rate"))
    assert re.fullmatch(r"[\d.]+ (ms|s)|\d+ min \d+ s", _text(browser, "duration"))
    assert _text(browser, "worker").startswith("cpu-")

    # Log scale, smoothing, zoom (mouse wheel) and hover draw without a browser error.
    chart = browser.find_element(By.ID, "loss-chart")
    browser.find_element(By.ID, "loss-chart-log").click()
    browser.find_element(By.ID, "loss-chart-smooth").click()
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(chart), 0, -400).perform()
    zoomed = "return echarts.getInstanceByDom(arguments[0]).getOption().dataZoom[0].start"
    _until(browser, lambda b: b.execute_script(zoomed, chart) > 0)
    _until(browser, lambda b: _drawn(b, "loss-chart", 20_000, "log"))
    reset = "echarts.getInstanceByDom(arguments[0]).dispatchAction(arguments[1])"
    browser.execute_script(reset, chart, {"type": "dataZoom", "start": 0, "end": 100})
    ActionChains(browser).move_to_element_with_offset(chart, -200, 0).perform()
    tip = _until(browser, lambda b: b.find_element(By.CSS_SELECTOR, "#loss-chart .tip-head"))
    assert tip.text.startswith("step ")
    _screenshot(browser, "dashboard-job.png")
    assert _severe(browser) == []

    # The jobs list: cancel a running job, filter by status, delete an ended job.
    doomed = client.submit(long_spec(steps=1_000_000, seed=4))
    browser.get(f"{stack.api_url}/#/")
    _until(browser, lambda b: _row_status(b, doomed["id"]) == "running")
    _row(browser, doomed["id"])[0].find_element(By.CSS_SELECTOR, "button.cancel").click()
    _until(browser, lambda b: _row_status(b, doomed["id"]) == "cancelled")
    assert "cancel" in _row(browser, doomed["id"])[0].find_element(By.CSS_SELECTOR, ".why").text
    assert client.get(later["id"])["status"] == "succeeded"

    status_filter = Select(browser.find_element(By.ID, "status-filter"))
    status_filter.select_by_value("cancelled")
    _until(browser, lambda b: not _row(b, live["id"]))
    assert _row(browser, doomed["id"])
    assert {badge.text for badge in browser.find_elements(By.CSS_SELECTOR, "#jobs .badge")} == {
        "cancelled"
    }
    delete = _row(browser, doomed["id"])[0].find_element(By.CSS_SELECTOR, "button.delete")
    delete.click()  # arms it
    _until(browser, lambda _: delete.text == "Sure?")
    delete.click()
    _until(browser, lambda b: not _row(b, doomed["id"]))
    assert client.http.get(f"/v1/jobs/{doomed['id']}").status_code == 404

    # Compare: two ticked jobs, two loss curves on one chart.
    status_filter.select_by_value("succeeded")
    _until(browser, lambda b: _row(b, live["id"]) and _row(b, later["id"]))
    compare = browser.find_element(By.ID, "compare")
    assert not compare.is_enabled()
    for job in (live, later):
        _row(browser, job["id"])[0].find_element(By.CSS_SELECTOR, "input.pick").click()
    _until(browser, lambda _: compare.is_enabled())
    compare.click()
    _until(browser, lambda b: _attr(b, "compare-chart", "data-points") == 22_000)
    assert _attr(browser, "compare-chart", "data-series") == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#compare-jobs tbody tr")) == 2
    browser.find_element(By.ID, "compare-chart-log").click()
    _until(browser, lambda b: _drawn(b, "compare-chart", 22_000, "log"))
    _screenshot(browser, "dashboard-compare.png")
    browser.get(f"{stack.api_url}/#/")
    _until(browser, lambda b: _row(b, live["id"]))
    _screenshot(browser, "dashboard-jobs.png")
    assert _severe(browser) == []


def test_workers_page_shows_heartbeat_age_and_queue_depth(
    stack: Stack, browser: webdriver.Chrome
) -> None:
    browser.get(f"{stack.api_url}/#key={stack.api_key}&/workers")
    row = _until(browser, lambda b: b.find_element(By.CSS_SELECTOR, "#workers tbody tr"))
    assert row.get_attribute("data-worker").startswith("cpu-")
    assert re.fullmatch(r"\d+ s ago", row.find_element(By.CSS_SELECTOR, ".age").text)
    cpu_queue = 'tr[data-queue="cpu"] .depth'
    depth = _until(browser, lambda b: b.find_element(By.CSS_SELECTOR, cpu_queue))
    assert depth.text.isdigit()
    assert browser.find_element(By.CSS_SELECTOR, 'tr[data-queue="gpu"]')
    _screenshot(browser, "dashboard-workers.png")
    assert _severe(browser) == []


def test_more_than_ten_series_get_a_picker_and_huge_numbers_stay_short(
    stack: Stack, client: Client, browser: webdriver.Chrome
) -> None:
    # Twelve features and a learning rate that diverges: 12 weights, a loss past 1e30.
    spec = {
        "data": {"synthetic": {"n": 16, "d": 12, "seed": 5}},
        "optimizer": {"name": "sgd", "lr": 50.0},
        "steps": 40,
        "device": "cpu",
    }
    job = client.wait(client.submit(spec)["id"])
    browser.get(f"{stack.api_url}/#key={stack.api_key}&/jobs/{job['id']}")
    picker = _until(browser, lambda b: b.find_element(By.ID, "params-chart-picker"))
    _until(browser, lambda _: picker.is_displayed())
    assert picker.find_element(By.TAG_NAME, "summary").text == "10 of 12 series"
    picker.click()
    boxes = picker.find_elements(By.CSS_SELECTOR, "input[type=checkbox]")
    assert [box.is_selected() for box in boxes] == [True] * 10 + [False] * 2
    boxes[11].click()
    _until(browser, lambda _: picker.find_element(By.TAG_NAME, "summary").text == "11 of 12 series")
    assert job["status"] == "diverged" and _text(browser, "status") == "diverged"
    labels = browser.execute_script(
        "return echarts.getInstanceByDom(arguments[0]).getModel().getComponent('yAxis')"
        ".axis.getViewLabels().map(l => l.formattedLabel)",
        browser.find_element(By.ID, "loss-chart"),
    )
    assert max(len(label) for label in labels) <= 8, labels
    assert _severe(browser) == []


def test_the_job_page_draws_the_explain_view(
    stack: Stack, client: Client, browser: webdriver.Chrome
) -> None:
    job = client.submit({**SEED_EXAMPLE, "record": {"explain": True}})
    client.wait(job["id"])
    browser.get(f"{stack.api_url}/#key={stack.api_key}&/jobs/{job['id']}")
    _until(browser, lambda b: b.find_elements(By.ID, "explain-table"))
    rows = [
        [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        for row in browser.find_elements(By.CSS_SELECTOR, "#explain-table tbody tr")
    ]
    assert rows[0][:4] == ["y_hat", "x @ w", "[1]", "[-2]"] and "dy_hat/dw = [[1]]" in rows[0][4]
    assert rows[1][:4] == ["s", "y_hat - y", "[-1]", "[-2]"] and "ds/dy_hat = [1]" in rows[1][4]
    assert rows[2][:4] == ["loss", "s ** 2", "1", "1"] and "dloss/ds = [-2]" in rows[2][4]
    assert "dLoss/dw = [-2]" in _text(browser, "explain-chain")
    assert _severe(browser) == []
