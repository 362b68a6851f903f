"""The web demo (web-demo/) in a real browser: headless Chromium driven by selenium.

The page is served from one origin (python3 -m http.server on 127.0.0.1) and talks to the proxy on
another port, so every call goes through a real CORS preflight. The proxy runs in front of three
user-service replicas (r1, r2, r3). Processes are started with the helpers of
tests/integration/conftest.py; the YAML comes from tests/support/envoy_yaml.py.

Needs: apt-get install -y chromium chromium-driver; pip install selenium pytest.
Skipped (saying so) only when no Chromium binary is found.
"""

import subprocess
import sys

import pytest

from .demo_page import (  # noqa: F401  (the helpers live there so test modules can import them too)
    WAIT_S, WEB_DEMO, DemoPage, Replica, find_chromedriver, find_chromium, free_port, integration,
    start_cors_proxy,
)


@pytest.fixture(scope="session")
def chromium():
    path = find_chromium()
    if not path:
        pytest.skip("Chromium not found (apt-get install -y chromium chromium-driver): browser tests skipped")
    return path


@pytest.fixture(scope="session")
def page_origin():
    """web-demo/ served as static files from its own origin."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(WEB_DEMO)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        integration.wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def replicas():
    started = []
    try:
        for name in ("r1", "r2", "r3"):
            started.append(Replica(name, free_port()))
        yield started
    finally:
        for r in started:
            r.stop()


@pytest.fixture(scope="session")
def proxy(replicas, page_origin):
    p = start_cors_proxy(page_origin, [r.port for r in replicas])
    yield p
    p.stop()


@pytest.fixture(scope="session")
def driver(chromium):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install selenium")
    chromedriver = find_chromedriver()
    if not chromedriver:
        pytest.fail(f"Chromium is at {chromium} but chromedriver is not: apt-get install -y chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    d.set_page_load_timeout(WAIT_S * 2)
    yield d
    d.quit()


@pytest.fixture
def open_page(driver, page_origin):
    def open_(proxy_url):
        return DemoPage(driver, f"{page_origin}/index.html?proxy={proxy_url}")
    return open_
