"""Helpers for the browser tests of web-demo/: the page object, the CORS proxy config, and the
process helpers of tests/integration/conftest.py (imported from there, not copied).

A module of its own, not conftest.py, so the test modules can import it too.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WEB_DEMO = ROOT / "web-demo"
ARTIFACTS = ROOT / "test-artifacts"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The integration tests' process helpers (Replica, start_proxy, free_port, wait_for_port), loaded
# under a name of their own: both directories have a module called conftest.
integration = _load("integration_helpers", ROOT / "tests" / "integration" / "conftest.py")
sys.path.insert(0, str(ROOT / "tests" / "support"))
import envoy_yaml  # noqa: E402

free_port = integration.free_port
Replica = integration.Replica

# How long a page may take to show a call's outcome (debug builds, a cold browser).
WAIT_S = 10


def find_chromium():
    for candidate in (os.environ.get("CHROME_BIN"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def find_chromedriver():
    for candidate in (os.environ.get("CHROMEDRIVER"), "chromedriver", "/usr/lib/chromium/chromedriver"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def cors_config(port, origin, clusters):
    """A listener on `port` whose CORS policy allows exactly `origin`, routing /demo.* to `users`."""
    virtual_hosts = f"""
            - name: web
              domains: ["*"]
              routes:
              - match: {{ prefix: "/demo." }}
                route:
                  cluster: users
                  timeout: 0s
                  max_stream_duration: {{ grpc_timeout_header_max: 0s }}
              cors:
                allow_origin_string_match:
                - exact: "{origin}"
                allow_methods: POST, OPTIONS
                allow_headers: content-type,x-grpc-web,x-user-agent,grpc-timeout
                expose_headers: grpc-status,grpc-message,x-replica
                max_age: '600'"""
    return envoy_yaml.config(
        [envoy_yaml.listener("web", port, virtual_hosts)],
        [envoy_yaml.cluster(name, ports, connect_timeout="0.5s") for name, ports in clusters.items()],
    )


def start_cors_proxy(origin, user_ports):
    port = free_port()
    proxy = integration.start_proxy(cors_config(port, origin, {"users": user_ports}), port)
    proxy.port = port
    proxy.url = f"http://127.0.0.1:{port}"
    return proxy


class DemoPage:
    """The demo page in the browser, by the element ids it promises (see web-demo/app.js)."""

    def __init__(self, driver, url):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.By = driver, By
        self.wait = WebDriverWait(driver, WAIT_S)
        driver.get(url)
        driver.get_log("browser")  # drop what earlier pages logged
        self.wait.until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))

    def el(self, id_):
        return self.driver.find_element(self.By.ID, id_)

    def set_mode(self, mode):
        # The radio inputs are visually hidden behind their labels; click the label as a user does.
        self.driver.find_element(self.By.CSS_SELECTOR, f"label[for='mode-{mode}']").click()
        assert self.el(f"mode-{mode}").is_selected()

    def fill(self, username, password=None):
        for id_, value in (("username", username), ("password", password)):
            if value is not None:
                field = self.el(id_)
                field.clear()
                field.send_keys(value)

    def rows(self):
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#calls tbody tr')].map(r => ({...r.dataset, text: r.innerText}))")

    def _call(self, button):
        before = len(self.rows())
        self.el(button).click()
        self.wait.until(lambda d: len(self.rows()) == before + 1,
                        f"no new row in #calls after clicking #{button}; status: {self.status()}")
        self.wait.until(lambda d: self.el("status").get_attribute("data-state") != "pending")
        return self.rows()[0]  # newest first

    def login(self, username=None, password=None):
        if username is not None:
            self.fill(username, password)
        return self._call("login")

    def logout(self):
        return self._call("logout")

    def status(self):
        s = self.el("status")
        return {"state": s.get_attribute("data-state"), "code": s.get_attribute("data-code"), "text": s.text}

    def console_errors(self):
        return [e["message"] for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]


