"""The dashboard in a real headless Chromium (Debian's chromium and chromedriver, driven by
Selenium), against the session's stack: a job's page (empty state, live charts, spec, duration,
rate, why it ended, log scale, smoothing, zoom, hover, a picker beyond ten series, a diverged
job's numbers kept short; with eval, loss and val_loss on one chart and the result's metrics),
the jobs list (status filter, cancel, delete, val loss), the compare view, the workers page,
the sweeps list and a sweep's page (curves growing live from the sweep's one event stream, the
leaderboard, the parallel plot; ranked and coloured by the sweep's metric); the browser logs
no error. One browser for the module. With GRADSTREAM_SCREENSHOT_DIR set, the README's
screenshots are written there (docs/dashboard-job.png, -job-eval.png, -compare.png,
-jobs.png, -workers.png and -sweep.png)."""

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
from tests.conftest import HELD_OUT_SWEEP, SEED_EXAMPLE
from tests.faults import endless_spec, long_spec, running_blocker

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


def _full_page_screenshot(
    browser: webdriver.Chrome, name: str, chart: WebElement, hover_x: int
) -> None:
    """The whole page, with the pointer `hover_x` px right of `chart`'s centre (its tooltip)."""
    # The window's height is its viewport's plus the window's frame.
    height = browser.execute_script(
        "return document.documentElement.scrollHeight + outerHeight - innerHeight"
    )
    browser.set_window_size(1440, height)
    ActionChains(browser).move_to_element_with_offset(chart, hover_x, 0).perform()
    chart_id = chart.get_attribute("id")
    _until(browser, lambda b: b.find_element(By.CSS_SELECTOR, f"#{chart_id} .tip-head"))
    _screenshot(browser, name)
    browser.set_window_size(1440, 1000)


def _y_labels(browser: webdriver.Chrome, element_id: str) -> list[str]:
    """The labels a chart's y axis shows now."""
    labels: list[str] = browser.execute_script(
        "return echarts.getInstanceByDom(arguments[0]).getModel().getComponent('yAxis')"
        ".axis.getViewLabels().map(l => l.formattedLabel)",
        browser.find_element(By.ID, element_id),
    )
    return labels


def _sweep_counts(browser: webdriver.Chrome) -> dict[str, int]:
    """A sweep page's members per status."""
    return {
        c.get_attribute("data-status") or "": int(c.get_attribute("data-count") or 0)
        for c in browser.find_elements(By.CSS_SELECTOR, "#sweep-counts .count")
    }


def _row(browser: webdriver.Chrome, job_id: str) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]')


def _row_status(browser: webdriver.Chrome, job_id: str) -> str:
    rows = _row(browser, job_id)
    return rows[0].find_element(By.CSS_SELECTOR, ".badge").text if rows else ""


def _sweep_row(browser: webdriver.Chrome, sweep_id: str) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, f'#sweeps tr[data-sweep="{sweep_id}"]')


def _sweep_row_status(browser: webdriver.Chrome, sweep_id: str) -> str:
    rows = _sweep_row(browser, sweep_id)
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
    # One worker process runs one job at a time, and an endless job holds it: `live` and
    # `later` wait behind it until it is cancelled, so both pages below are drawn before their
    # job's first step, however fast the machine.
    blocker = running_blocker(client)
    live = client.submit(long_spec(steps=20_000, seed=2))
    later = client.submit(
        {**long_spec(steps=2_000, seed=3), "optimizer": {"name": "adam", "lr": 0.05}}
    )

    # Before its first step a job's page says so, and shows its spec.
    browser.get(f"{stack.api_url}/#/jobs/{later['id']}")
    _until(browser, lambda b: b.find_element(By.ID, "loss-chart-empty").is_displayed())
    assert _text(browser, "loss-chart-empty") == "Waiting for the first step…"
    # The spec's facts are filled in by the same view, not necessarily in the same frame.
    _until(browser, lambda b: _text(b, "spec-optimizer"))
    assert _text(browser, "spec-optimizer") == "adam lr 0.05"
    assert _text(browser, "spec-data") == "synthetic 64\u00d74 + bias, full batch"
    assert _text(browser, "spec-steps").endswith("/ 2,000")
    assert not browser.find_element(By.ID, "result-card").is_displayed()

    # A job's charts grow live from its event stream: its page is up before its first step,
    # and every step it then draws came on that page's stream.
    browser.get(f"{stack.api_url}/#/")
    _until(browser, lambda b: _row(b, live["id"]))
    _row(browser, live["id"])[0].find_element(By.CSS_SELECTOR, "a").click()
    _until(browser, lambda b: _text(b, "spec-steps").endswith("/ 20,000"))
    assert browser.find_element(By.ID, "loss-chart-empty").is_displayed()
    client.cancel(blocker)
    _until(browser, lambda b: _attr(b, "loss-chart", "data-points") > 0)
    _until(browser, lambda b: _text(b, "status") == "succeeded")
    _until(browser, lambda b: _attr(b, "loss-chart", "data-points") == 20_000)
    assert _attr(browser, "params-chart", "data-points") == 5 * 20_000  # w[0..3] and b
    assert _attr(browser, "grads-chart", "data-series") == 5
    assert "R²" in _text(browser, "result")
    assert _text(browser, "why-ended").startswith("succeeded: ")
    assert re.fullmatch(r"[\d.e+]+ steps/s", _text(browser, "rate"))
    assert re.fullmatch(r"[\d.]+ (ms|s)|\d+ min \d+ s", _text(browser, "duration"))
    assert _text(browser, "worker").startswith("cpu-")

    # Log scale (on from the start), smoothing, zoom (mouse wheel) and hover draw without a
    # browser error.
    chart = browser.find_element(By.ID, "loss-chart")
    assert browser.find_element(By.ID, "loss-chart-log").is_selected()
    assert _attr(browser, "loss-chart", "data-series") == 1  # no eval: no val_loss
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

    # The jobs list: cancel a running job (one that cannot end first), filter by status,
    # delete an ended job.
    doomed = client.submit(endless_spec(seed=4))
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
    # On the log scale the loss chart starts with, and on the linear one.
    stored = job["steps_done"]
    _until(browser, lambda b: _drawn(b, "loss-chart", stored, "log"))
    assert max(len(label) for label in _y_labels(browser, "loss-chart")) <= 8
    browser.find_element(By.ID, "loss-chart-log").click()
    _until(browser, lambda b: _drawn(b, "loss-chart", stored, "linear"))
    assert max(len(label) for label in _y_labels(browser, "loss-chart")) <= 8
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


def test_a_sparse_jobs_page_draws_every_loss_and_the_kept_parameters(
    stack: Stack, client: Client, browser: webdriver.Chrome
) -> None:
    # record.every 10 over 95 steps: the loss at every step, w (2 values) and b, and their
    # gradients, at steps 0, 10, ..., 90 and the last, 94.
    spec = {**long_spec(95), "data": {"synthetic": {"n": 64, "d": 2, "seed": 3}}}
    job = client.wait(client.submit({**spec, "record": {"every": 10}})["id"], timeout=60)
    assert job["status"] == "succeeded"
    browser.get(f"{stack.api_url}/#key={stack.api_key}&/jobs/{job['id']}")
    _until(browser, lambda b: _drawn(b, "loss-chart", 95, "log"))
    kept = 11 * 3  # steps kept x (w[0], w[1], b)
    _until(browser, lambda b: _drawn(b, "params-chart", kept, "linear"))
    _until(browser, lambda b: _drawn(b, "grads-chart", kept, "linear"))
    chart = browser.find_element(By.ID, "params-chart")
    series = {s["id"]: s for s in browser.execute_script(SERIES, chart)}
    assert set(series) == {"w[0]", "w[1]", "b"}
    assert [x for x, _ in series["b"]["data"]] == [*range(0, 95, 10), 94]
    assert _severe(browser) == []


# 32 rows for training, 8 held out; val_loss at steps 0, 10, …, 290 and the last, 299.
EVAL_JOB = {
    "data": {"synthetic": {"n": 40, "d": 10, "noise": 0.5, "seed": 6}},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "steps": 300,
    "eval": {"holdout": 0.2, "every": 10},
    "device": "cpu",
}
SERIES = "return echarts.getInstanceByDom(arguments[0]).getOption().series"


def test_a_job_with_eval_draws_loss_and_val_loss_on_one_chart_and_shows_its_metrics(
    stack: Stack, client: Client, browser: webdriver.Chrome
) -> None:
    job = client.wait(client.submit(EVAL_JOB)["id"], timeout=60)
    plain = client.wait(client.submit(SEED_EXAMPLE)["id"], timeout=60)
    assert job["status"] == plain["status"] == "succeeded"
    evaluated = [[r["step"], r["val_loss"]] for r in client.steps(job["id"]) if "val_loss" in r]
    assert [step for step, _ in evaluated] == [*range(0, 300, 10), 299]

    browser.get(f"{stack.api_url}/#key={stack.api_key}&/jobs/{job['id']}")
    # Both series on one chart, log scale from the start; val_loss only where evaluated, its
    # points joined (no zeros or gaps between evaluated steps).
    _until(browser, lambda b: _drawn(b, "loss-chart", 300 + len(evaluated), "log"))
    assert _attr(browser, "loss-chart", "data-series") == 2
    chart = browser.find_element(By.ID, "loss-chart")
    series = {s["id"]: s for s in browser.execute_script(SERIES, chart)}
    assert set(series) == {"loss", "val_loss"}
    assert series["val_loss"]["data"] == evaluated and not series["val_loss"]["connectNulls"]
    assert len(series["loss"]["data"]) == 300
    assert _text(browser, "spec-eval") == "holdout 20% (seed 0), every 10 steps"

    # The result: the validation loss, and the metrics of both sides of the split.
    _until(browser, lambda b: b.find_element(By.ID, "result-card").is_displayed())
    metrics = job["result"]["metrics"]
    cells = {
        (row.get_attribute("data-split"), cell.get_attribute("data-metric")): cell.text
        for row in browser.find_elements(By.CSS_SELECTOR, "#result-metrics tbody tr")
        for cell in row.find_elements(By.TAG_NAME, "td")
    }
    assert set(cells) == {(split, m) for split in ("train", "val") for m in metrics["train"]}
    for (split, name), text in cells.items():
        assert float(text) == pytest.approx(metrics[split][name], rel=1e-3), (split, name)
    assert metrics["val"]["mse"] == job["result"]["val_loss"]
    assert _text(browser, "result-val-loss") == cells[("val", "mse")]

    # Hover anywhere: the tooltip has val_loss too (between evaluated steps, the last one
    # before the pointer, with its step). Linear scale on request.
    ActionChains(browser).move_to_element_with_offset(chart, -150, 0).perform()
    tip = _until(browser, lambda b: b.find_element(By.CSS_SELECTOR, "#loss-chart .tip-head"))
    assert "val_loss" in tip.find_element(By.XPATH, "..").text
    if os.environ.get("GRADSTREAM_SCREENSHOT_DIR"):
        _full_page_screenshot(browser, "dashboard-job-eval.png", chart, -150)
    browser.find_element(By.ID, "loss-chart-log").click()
    _until(browser, lambda b: _drawn(b, "loss-chart", 300 + len(evaluated), "linear"))

    # The jobs list shows each finished job's final loss, and val loss where it has one.
    browser.get(f"{stack.api_url}/#/")
    Select(_until(browser, lambda b: b.find_element(By.ID, "status-filter"))).select_by_value("")
    _until(browser, lambda b: _row(b, job["id"]) and _row(b, plain["id"]))
    val_loss = cells[("val", "mse")]
    assert _row(browser, job["id"])[0].find_element(By.CSS_SELECTOR, ".val-loss").text == val_loss
    assert _row(browser, plain["id"])[0].find_element(By.CSS_SELECTOR, ".val-loss").text == ""
    for shown in (job, plain):
        final = _row(browser, shown["id"])[0].find_element(By.CSS_SELECTOR, ".final-loss").text
        assert float(final) == pytest.approx(shown["result"]["full_loss"], rel=1e-3, abs=1e-12)

    # Compare: the eval job's val_loss dashed in its loss's colour; its row shows it.
    browser.get(f"{stack.api_url}/#/compare/{job['id']},{plain['id']}")
    _until(browser, lambda b: _drawn(b, "compare-chart", 300 + len(evaluated) + 10, "log"))
    assert _attr(browser, "compare-chart", "data-series") == 3
    drawn = browser.execute_script(SERIES, browser.find_element(By.ID, "compare-chart"))
    loss_line, val_line, plain_line = drawn
    assert val_line["name"].endswith(" val_loss") and val_line["data"] == evaluated
    assert val_line["lineStyle"]["type"] == "dashed" and val_line["color"] == loss_line["color"]
    assert plain_line["color"] != loss_line["color"]
    compared = browser.find_element(By.CSS_SELECTOR, f'#compare-jobs tr[data-job="{job["id"]}"]')
    _until(browser, lambda _: compared.find_element(By.CSS_SELECTOR, ".val-loss").text == val_loss)
    assert _severe(browser) == []


# A few seconds of sweep on one worker: 8 members trained together, successive halving at
# 600 and 1 800 steps (8 -> 3 -> 1), the last one alone to 6 000 steps; the lr axis spans 300x
# (a log axis in the parallel plot), momentum does not. Small learning rates on 40 000 rows
# keep the curves apart.
LIVE_SWEEP = {
    "name": "lr x momentum",
    "base": {
        "data": {"synthetic": {"n": 40_000, "d": 10, "noise": 0.3, "seed": 1}},
        "optimizer": {"name": "sgd"},
        "steps": 6_000,
        "device": "cpu",
    },
    "grid": {"optimizer.lr": [1e-6, 1e-5, 1e-4, 3e-4], "optimizer.momentum": [0.0, 0.9]},
    "early_stop": {"name": "successive_halving", "min_steps": 600, "eta": 3},
}


def test_sweeps_list_and_a_sweep_page_fed_by_its_one_stream(
    stack: Stack, client: Client, browser: webdriver.Chrome
) -> None:
    # The sweep waits behind an endless job on the one worker process, so its page is up
    # before its first step, however fast the machine: every point it then draws came on the
    # page's one stream.
    blocker = running_blocker(client)
    sweep = client.submit_sweep(LIVE_SWEEP)
    browser.get(f"{stack.api_url}/#key={stack.api_key}&/sweeps")
    _until(browser, lambda b: _sweep_row(b, sweep["id"]))
    assert "lr x momentum" in _sweep_row(browser, sweep["id"])[0].text
    _sweep_row(browser, sweep["id"])[0].find_element(By.CSS_SELECTOR, "a").click()
    _until(browser, lambda b: _text(b, "sweep-status") == "queued")
    assert _attr(browser, "sweep-curves", "data-points") == 0
    client.cancel(blocker)

    # The curves grow while the sweep runs, until it has ended.
    _until(browser, lambda b: _attr(b, "sweep-curves", "data-points") > 0)
    _until(browser, lambda b: _text(b, "sweep-status") == "succeeded")
    view = client.sweep(sweep["id"])
    assert view["status"] == "succeeded" and view["counts"] == {"pruned": 7, "succeeded": 1}

    # Every progress event's points exactly once, one curve per member.
    events = list(client.sweep_events(sweep["id"]))
    points = sum(len(e.data["members"]) for e in events if e.event == "progress")
    _until(browser, lambda b: _drawn(b, "sweep-curves", points, "log"))
    assert _attr(browser, "sweep-curves", "data-series") == 8
    assert (
        browser.find_element(By.ID, "sweep-curves").get_attribute("data-best")
        == (view["best"]["id"])
    )
    # Pruned members' lines end at their last step; all seven are drawn as pruned.
    assert _attr(browser, "sweep-curves", "data-pruned") == 7
    last_steps = browser.execute_script(
        "return Object.fromEntries(echarts.getInstanceByDom(arguments[0]).getOption().series"
        ".filter(s => s.type === 'line').map(s => [s.id, s.data[s.data.length - 1][0]]))",
        browser.find_element(By.ID, "sweep-curves"),
    )
    assert last_steps == {m["id"]: m["steps_done"] - 1 for m in view["members"]}

    # Counts as the API gives them (each redraw replaces them: read them until they hold
    # still); the leaderboard's first row is the API's best.
    _until(browser, lambda b: _sweep_counts(b) == view["counts"])
    _until(
        browser,
        lambda b: (
            b.find_element(By.CSS_SELECTOR, "#leaderboard tbody tr").get_attribute("data-job")
            == view["best"]["id"]
        ),
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")) == 8
    assert _text(browser, "sweep-best").startswith("#")

    # The parallel plot: one line per member; lr on a log axis, momentum linear, loss log.
    _until(browser, lambda b: _attr(b, "sweep-parallel", "data-lines") == 8)
    axes = browser.find_element(By.ID, "sweep-parallel").get_attribute("data-axes")
    assert axes == "log,value,log"
    # The curves' log axis keeps its short labels (0.01, 1e-5: not 0.00001).
    assert max(len(label) for label in _y_labels(browser, "sweep-curves")) <= 6

    # Zoom (mouse wheel) and hover: the members nearest the step, with their values.
    chart = browser.find_element(By.ID, "sweep-curves")
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(chart), 0, -400).perform()
    zoomed = "return echarts.getInstanceByDom(arguments[0]).getOption().dataZoom[0].start"
    _until(browser, lambda b: b.execute_script(zoomed, chart) > 0)
    reset = "echarts.getInstanceByDom(arguments[0]).dispatchAction(arguments[1])"
    browser.execute_script(reset, chart, {"type": "dataZoom", "start": 0, "end": 100})
    # Early in the sweep, where all eight members still ran.
    early = -int(chart.size["width"] * 0.38)
    ActionChains(browser).move_to_element_with_offset(chart, early, 0).perform()
    tip = _until(browser, lambda b: b.find_element(By.CSS_SELECTOR, "#sweep-curves .tip-head"))
    assert tip.text.startswith("step ")
    rows = browser.find_elements(By.CSS_SELECTOR, "#sweep-curves .tip-row")
    assert len(rows) == 8 and all("lr " in row.text for row in rows)
    # A leaderboard row under the pointer brings its member's line forward.
    second = browser.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")[1]
    ActionChains(browser).move_to_element(second).perform()
    focus = second.get_attribute("data-job")
    _until(
        browser,
        lambda b: b.find_element(By.ID, "sweep-curves").get_attribute("data-focus") == focus,
    )
    if os.environ.get("GRADSTREAM_SCREENSHOT_DIR"):
        _full_page_screenshot(browser, "dashboard-sweep.png", chart, early)
    assert _severe(browser) == []

    # The members in the jobs list link back to their sweep. (Status filters read the tenant's
    # status indexes, which keep sweep members out: all statuses.)
    browser.get(f"{stack.api_url}/#/")
    Select(_until(browser, lambda b: b.find_element(By.ID, "status-filter"))).select_by_value("")
    best = view["best"]["id"]
    tag = _until(
        browser,
        lambda b: _row(b, best) and _row(b, best)[0].find_element(By.CSS_SELECTOR, "a.sweep-tag"),
    )
    assert tag.get_attribute("href").endswith(f"#/sweeps/{sweep['id']}")

    # The list: cancel a running sweep, then delete it (a second click).
    doomed = client.submit_sweep(
        {
            **LIVE_SWEEP,
            "name": "doomed",
            "early_stop": None,
            "base": {**LIVE_SWEEP["base"], "steps": 1_000_000},
        }
    )
    browser.get(f"{stack.api_url}/#/sweeps")
    _until(browser, lambda b: _sweep_row_status(b, doomed["id"]) == "running")
    _sweep_row(browser, doomed["id"])[0].find_element(By.CSS_SELECTOR, "button.cancel").click()
    _until(browser, lambda b: _sweep_row_status(b, doomed["id"]) == "cancelled")
    assert client.sweep(doomed["id"])["counts"] == {"cancelled": 8}
    delete = _sweep_row(browser, doomed["id"])[0].find_element(By.CSS_SELECTOR, "button.delete")
    delete.click()
    _until(browser, lambda _: delete.text == "Sure?")
    delete.click()
    _until(browser, lambda b: not _sweep_row(b, doomed["id"]))
    assert client.http.get(f"/v1/sweeps/{doomed['id']}").status_code == 404
    assert _sweep_row_status(browser, sweep["id"]) == "succeeded"
    assert _severe(browser) == []


def test_a_sweep_page_ranks_and_colours_by_the_sweeps_metric(
    stack: Stack, client: Client, browser: webdriver.Chrome
) -> None:
    view = client.wait_sweep(client.submit_sweep(HELD_OUT_SWEEP)["id"], timeout=60)
    assert view["status"] == "succeeded" and view["spec"]["metric"] == "val_loss"
    lr_01, lr_0001, lr_001 = view["members"]
    by_val = [lr_0001["id"], lr_001["id"], lr_01["id"]]
    assert sorted(view["members"], key=lambda m: m["final_val_loss"]) == [lr_0001, lr_001, lr_01]
    assert sorted(view["members"], key=lambda m: m["final_loss"]) == [lr_01, lr_001, lr_0001]
    assert view["best"]["id"] == lr_0001["id"]

    browser.get(f"{stack.api_url}/#key={stack.api_key}&/sweeps/{view['id']}")
    rows = "#leaderboard tbody tr"
    _until(
        browser,
        lambda b: (
            [r.get_attribute("data-job") for r in b.find_elements(By.CSS_SELECTOR, rows)] == by_val
        ),
    )
    assert browser.find_element(By.ID, "sweep-metric").get_attribute("data-metric") == "val_loss"
    assert _text(browser, "sweep-metric").startswith("val_loss: the validation loss (")
    best_value = browser.find_element(By.CSS_SELECTOR, f"{rows} td.final-val").text
    assert _text(browser, "sweep-best").endswith(f" → val_loss {best_value}")
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#leaderboard th")]
    assert headers[-5:] == ["LOSS", "VAL LOSS", "FINAL LOSS", "FINAL VAL LOSS", "JOB"]
    ranked = browser.find_elements(By.CSS_SELECTOR, "#leaderboard th.ranked")
    assert [th.text for th in ranked] == ["FINAL VAL LOSS"]
    assert browser.find_element(By.CSS_SELECTOR, rows).get_attribute("class") == "best"

    # The parallel plot: the metric's final value last, and each line coloured by it.
    _until(browser, lambda b: _attr(b, "sweep-parallel", "data-lines") == 3)
    plot = browser.find_element(By.ID, "sweep-parallel")
    assert plot.get_attribute("data-metric") == "val_loss"
    option = browser.execute_script(
        "return echarts.getInstanceByDom(arguments[0]).getOption()", plot
    )
    assert option["parallelAxis"][-1]["name"] == "final val_loss"
    (colours,) = option["visualMap"]
    assert colours["dimension"] == 2  # lr, the metric, then the colour's (log) value
    # The curves' log axis keeps its short labels (1e-5, not 0.00001).
    _until(browser, lambda b: _attr(b, "sweep-curves", "data-drawn") == 3)
    assert max(len(label) for label in _y_labels(browser, "sweep-curves")) <= 6

    # The list names each sweep's best by its metric.
    browser.get(f"{stack.api_url}/#/sweeps")
    _until(browser, lambda b: _sweep_row(b, view["id"]))
    best = _sweep_row(browser, view["id"])[0].find_elements(By.TAG_NAME, "td")[4].text
    assert best.startswith("val_loss ")
    assert _severe(browser) == []


# The page's event-stream reader, with fetch() cut short: each of the first three connections
# breaks after 1500 bytes (mid-event), as a dropped network would.
READ_WITH_DROPS = """
const [path, finish] = arguments;
const { followEvents } = await import("/static/sse.js");
const realFetch = window.fetch;
const cursors = [];
window.fetch = async (url, options) => {
  if (url !== path) return realFetch(url, options);  // the page's own calls
  cursors.push(options.headers["Last-Event-ID"] ?? null);
  const response = await realFetch(url, options);
  if (cursors.length > 3) return response;
  const reader = response.body.getReader();
  let left = 1500;
  const cut = new ReadableStream({ async pull(controller) {
    const { value, done } = await reader.read();
    if (done) { controller.close(); return; }
    if (value.length >= left) {
      controller.enqueue(value.slice(0, left));
      reader.cancel();
      controller.error(new TypeError("network error"));
      return;
    }
    left -= value.length;
    controller.enqueue(value);
  } });
  return new Response(cut, { status: response.status, headers: response.headers });
};
const ids = [], errors = [];
followEvents(path, {
  progress: (data, id) => ids.push(Number(id)),
  done: (view, id) => {
    window.fetch = realFetch;
    finish({ ids, cursors, errors, done: Number(id) });
  },
}, (error, retrying) => errors.push([String(error.message), retrying]));
"""


def test_the_sweep_stream_resumes_by_last_event_id_after_a_dropped_connection(
    stack: Stack, client: Client, browser: webdriver.Chrome
) -> None:
    spec = {
        "base": {
            "data": {"synthetic": {"n": 1000, "d": 10, "seed": 2}},
            "optimizer": {"name": "sgd"},
            "steps": 3000,
            "device": "cpu",
        },
        "grid": {"optimizer.lr": [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1]},
        "early_stop": {"name": "successive_halving", "min_steps": 300, "eta": 2},
    }
    sweep = client.wait_sweep(client.submit_sweep(spec)["id"], timeout=60)
    events = list(client.sweep_events(sweep["id"]))
    expected = [int(e.id or 0) for e in events if e.event == "progress"]
    browser.get(f"{stack.api_url}/#key={stack.api_key}&/sweeps")
    _until(browser, lambda b: b.find_element(By.ID, "sweeps"))
    browser.set_script_timeout(30)
    got = browser.execute_async_script(READ_WITH_DROPS, f"/v1/sweeps/{sweep['id']}/events")
    # Every progress event once, in order, across four connections; each reconnection sent
    # the id of the last event it had seen (none before the first).
    assert got["ids"] == expected and got["done"] > expected[-1]
    assert len(got["cursors"]) == 4 and got["cursors"][0] is None
    resumed = [int(cursor) for cursor in got["cursors"][1:] if cursor is not None]
    # A drop may come right after a status event: its id (a sequence number too) is a cursor.
    every_id = {int(e.id) for e in events if e.id is not None}
    assert resumed and resumed == sorted(resumed) and set(resumed) <= every_id
    assert [retrying for _, retrying in got["errors"]] == [True] * 3, got
    assert _severe(browser) == []
