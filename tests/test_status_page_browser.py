"""The status page in a real headless browser (Debian's chromium and chromium-driver, via selenium).

Executors appear on the page when they start and disappear when they stop, without a reload;
a model named like markup shows as text. Waits are WebDriverWait on DOM conditions.
Without chromium the test skips, naming the install command; with CI=true it fails instead.
With LLOOM_UPDATE_SCREENSHOTS=1 its screenshot replaces docs/images/status-page.png.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from executor.gateway import status_page
from executor.process.embedded_nats import EmbeddedNats
from tests.helpers.gateway import Network, offer

INSTALL = "apt-get install -y chromium chromium-driver"
XSS = "<img src=x onerror=alert(1)>"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "status-page.png"
WAIT_S = 20

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser() -> Iterator[object]:
    found = _chromium()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium and chromium-driver are needed in CI: {INSTALL}")
        pytest.skip(f"needs chromium and chromium-driver: {INSTALL}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()


async def wait_for(driver: object, condition: Callable[[object], object], what: str) -> object:
    """WebDriverWait (polling the DOM) in a thread, so the loop keeps serving the page meanwhile."""
    from selenium.webdriver.support.ui import WebDriverWait

    def run() -> object:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, what)  # type: ignore[arg-type]

    return await asyncio.to_thread(run)


def executor_ids(driver: object) -> list[str]:
    from selenium.webdriver.common.by import By

    return [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#executors td.executor-id")]  # type: ignore[attr-defined]


async def test_the_page_shows_executors_start_and_stop_live_and_names_as_text(
    browser: object, js_server: EmbeddedNats, tmp_path: Path) -> None:  # fmt: skip
    from selenium.webdriver.common.by import By

    net = Network(js_server.url, tmp_path / "a")
    other = Network(js_server.url, tmp_path / "b")
    try:
        # Fast heartbeats: a full announcement (with measured performance) every 2 s instead of 10 s.
        await net.executor("exe-a", offer("smollm2-135m", "0.10", "0.30", context=8192),
                           offer("qwen2.5:7b", "0.40", "1.20"), heartbeat_interval_secs=0.1)  # fmt: skip
        gw = await net.gateway(extra_routes=[status_page.register])
        async with aiohttp.ClientSession() as http:
            for _ in range(3):  # served jobs give exe-a throughput and latency figures to show
                body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
                async with http.post(f"{gw.url}/v1/chat/completions", json=body) as r:
                    assert r.status == 200
        await asyncio.to_thread(browser.get, f"{gw.url}/")  # type: ignore[attr-defined]
        await wait_for(browser, lambda d: executor_ids(d) == ["exe-a"], "exe-a on the page")
        await wait_for(browser, lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "live",
                       "the live badge")  # fmt: skip
        marker = browser.execute_script("window.__notReloaded = true; return window.__notReloaded")  # type: ignore[attr-defined]
        assert marker is True

        await other.executor("exe-b", offer(XSS, "0", "0"), offer("smollm2-135m", "0.05", "0.25"))
        await wait_for(browser, lambda d: executor_ids(d) == ["exe-a", "exe-b"], "exe-b appearing live")
        await wait_for(browser, lambda d: any(td.text.endswith("tok/s") for td in d.find_elements(
            By.CSS_SELECTOR, "#executors td")), "exe-a's measured throughput")  # fmt: skip
        # The attacker-named model is text in a cell, not an element.
        names = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#models td.model-name")]  # type: ignore[attr-defined]
        assert XSS in names
        assert browser.find_elements(By.CSS_SELECTOR, "main img") == []  # type: ignore[attr-defined]
        assert browser.execute_script("return window.__notReloaded") is True  # type: ignore[attr-defined]
        shot = tmp_path / "status-page.png"
        assert await asyncio.to_thread(browser.save_screenshot, str(shot))  # type: ignore[attr-defined]
        assert shot.read_bytes().startswith(b"\x89PNG")
        if os.environ.get("LLOOM_UPDATE_SCREENSHOTS") == "1":  # not on every run: the docs' copy is checked in
            shutil.copyfile(shot, SCREENSHOT)

        await other.aclose()
        await wait_for(browser, lambda d: executor_ids(d) == ["exe-a"], "exe-b disappearing live")
        assert XSS not in [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#models td.model-name")]  # type: ignore[attr-defined]
        assert browser.execute_script("return window.__notReloaded") is True  # type: ignore[attr-defined]
        # No script ran from the markup-shaped name: its alert() would be open now.
        from selenium.common.exceptions import NoAlertPresentException

        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # type: ignore[attr-defined]  # noqa: B018
    finally:
        await other.aclose()
        await net.aclose()
