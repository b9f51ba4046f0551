"""The dashboard in a real headless Chromium (Debian's chromium and chromedriver, driven by
Selenium): the page loads, a job submitted through the API appears, its loss chart grows while
it runs, and the browser logs no error. The screenshot in the README comes from this test
(GRADSTREAM_SCREENSHOT=docs/dashboard.png)."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from api.client import Client
from cli.stack import Stack
from tests.conftest import SEED_EXAMPLE
from tests.faults import long_spec

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _points(browser: webdriver.Chrome) -> int:
    return int(browser.find_element(By.ID, "loss-chart").get_attribute("data-points") or 0)


def test_dashboard_lists_the_job_and_its_chart_grows_live(
    stack: Stack, client: Client, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    browser.get(f"{stack.api_url}/#key={stack.api_key}")
    wait.until(lambda b: b.find_element(By.ID, "jobs"))
    assert "key=" not in browser.current_url  # the key is kept in the browser, not the URL
    job = client.submit(long_spec(steps=20_000, seed=2))
    row = f'tr[data-job="{job["id"]}"]'
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, row))
    browser.find_element(By.CSS_SELECTOR, f"{row} a").click()
    wait.until(lambda b: _points(b) > 0)
    first = _points(browser)
    assert first < 20_000  # drawn mid-job: what follows arrives live
    wait.until(lambda b: _points(b) > first)
    wait.until(lambda b: b.find_element(By.ID, "status").text == "succeeded")
    wait.until(lambda b: _points(b) == 20_000)
    assert '"r2"' in browser.find_element(By.ID, "result").text
    assert (
        int(browser.find_element(By.ID, "params-chart").get_attribute("data-points") or 0)
        == 5 * 20_000
    )
    log_scale = browser.find_element(By.ID, "loss-chart-log")
    log_scale.click()  # redraws (in the change handler) without errors
    wait.until(lambda _: log_scale.is_selected())
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    if target := os.environ.get("GRADSTREAM_SCREENSHOT"):
        shutil.copy(tmp_path / "dashboard.png", target)
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def test_the_job_page_draws_the_explain_view(
    stack: Stack, client: Client, browser: webdriver.Chrome
) -> None:
    job = client.submit({**SEED_EXAMPLE, "record": {"explain": True}})
    client.wait(job["id"])
    browser.get(f"{stack.api_url}/#key={stack.api_key}&/jobs/{job['id']}")
    wait = WebDriverWait(browser, 30, poll_frequency=0.05)
    wait.until(lambda b: b.find_elements(By.ID, "explain-table"))
    rows = [
        [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        for row in browser.find_elements(By.CSS_SELECTOR, "#explain-table tbody tr")
    ]
    assert rows[0][:4] == ["y_hat", "x @ w", "[1]", "[-2]"] and "dy_hat/dw = [[1]]" in rows[0][4]
    assert rows[1][:4] == ["s", "y_hat - y", "[-1]", "[-2]"] and "ds/dy_hat = [1]" in rows[1][4]
    assert rows[2][:4] == ["loss", "s ** 2", "1", "1"] and "dloss/ds = [-2]" in rows[2][4]
    assert "dLoss/dw = [-2]" in browser.find_element(By.ID, "explain-chain").text
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
