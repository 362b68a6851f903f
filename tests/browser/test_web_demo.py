"""The web demo in headless Chromium: log in and out through the proxy, from another origin."""

import http.client

import pytest

from .demo_page import ARTIFACTS, Replica, free_port, start_cors_proxy

MODES = ["binary", "text"]


@pytest.mark.parametrize("mode", MODES)
def test_login_right_password(open_page, proxy, mode):
    page = open_page(proxy.url)
    page.set_mode(mode)
    row = page.login("demo", "demo123")
    assert row["method"] == "login"
    assert row["mode"] == mode
    assert row["code"] == "0" and row["codeName"] == "OK" and row["ok"] == "true"
    assert row["replica"] in {"r1", "r2", "r3"}
    status = page.status()
    assert status["state"] == "ok" and status["code"] == "0"
    assert status["text"] == f"OK — welcome, demo (replica {row['replica']})"
    assert "welcome, demo" in row["text"]
    assert page.console_errors() == []


@pytest.mark.parametrize("mode", MODES)
def test_login_wrong_password(open_page, proxy, mode):
    page = open_page(proxy.url)
    page.set_mode(mode)
    row = page.login("demo", "not-the-password")
    assert row["code"] == "16" and row["codeName"] == "UNAUTHENTICATED" and row["ok"] == "false"
    assert row["mode"] == mode
    # trailers-only reply: the replica comes from the exposed x-replica header
    assert row["replica"] in {"r1", "r2", "r3"}
    status = page.status()
    assert status["state"] == "error" and status["code"] == "16"
    assert status["text"] == "UNAUTHENTICATED (16): wrong username or password"


@pytest.mark.parametrize("mode", MODES)
def test_logout(open_page, proxy, mode):
    page = open_page(proxy.url)
    page.set_mode(mode)
    page.login("admin", "123456")
    assert page.status()["text"].startswith("OK — welcome, admin (replica r")
    row = page.logout()
    assert row["method"] == "logout" and row["mode"] == mode
    assert row["code"] == "0"
    assert row["replica"] in {"r1", "r2", "r3"}
    assert page.status()["text"] == f"OK — goodbye, admin (replica {row['replica']})"
    assert [r["method"] for r in page.rows()] == ["logout", "login"]


def test_thirty_logins_reach_every_replica(open_page, proxy):
    page = open_page(proxy.url)
    page.fill("demo", "demo123")
    for _ in range(30):
        page.login()
    rows = page.rows()
    assert len(rows) == 30
    assert all(r["code"] == "0" for r in rows)
    counts = {name: sum(r["replica"] == name for r in rows) for name in ("r1", "r2", "r3")}
    assert all(counts.values()), f"replicas reached: {counts}"
    assert sum(counts.values()) == 30


def test_screenshot_after_login(open_page, proxy, driver):
    page = open_page(proxy.url)
    page.login("demo", "demo123")
    page.set_mode("text")
    page.login("demo", "wrong")
    page.logout()
    page.set_mode("binary")
    page.login("admin", "123456")
    assert page.status()["state"] == "ok"
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "web-demo-login.png"
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


@pytest.fixture
def proxy_without_replicas(page_origin):
    """A proxy of its own in front of three replicas that are then all stopped."""
    own = [Replica(f"down{i}", free_port()) for i in (1, 2, 3)]
    p = start_cors_proxy(page_origin, [r.port for r in own])
    for r in own:
        r.stop()
    yield p
    p.stop()


def test_every_replica_down_shows_unavailable(open_page, proxy_without_replicas, page_origin):
    # What the browser will get: the proxy's local 503 must carry CORS headers, or the page can
    # only see an opaque network error.
    conn = http.client.HTTPConnection("127.0.0.1", proxy_without_replicas.port, timeout=10)
    conn.request("POST", "/demo.User/login", body=b"\x00\x00\x00\x00\x00",
                 headers={"origin": page_origin, "content-type": "application/grpc-web+proto", "x-grpc-web": "1"})
    reply = conn.getresponse()
    reply.read()
    conn.close()
    assert reply.status == 503
    assert reply.getheader("grpc-status") == "14"
    assert reply.getheader("access-control-allow-origin") == page_origin, \
        f"the 503 local reply has no access-control-allow-origin: {reply.getheaders()}"
    assert "grpc-message" in (reply.getheader("access-control-expose-headers") or ""), reply.getheaders()

    for mode in MODES:
        page = open_page(proxy_without_replicas.url)
        page.set_mode(mode)
        row = page.login("demo", "demo123")
        assert row["code"] == "14" and row["codeName"] == "UNAVAILABLE"
        status = page.status()
        assert status["state"] == "error" and status["code"] == "14"
        assert status["text"].startswith("UNAVAILABLE (14): ")
        assert "upstream connect error" in status["text"] or "no healthy upstream" in status["text"], status["text"]
        assert "(HTTP 503)" in status["text"]
        assert "Failed to fetch" not in status["text"]
        # The browser read the 503: no CORS complaint in the console (a failed request is logged
        # as an error by Chromium, but never as blocked by CORS policy).
        assert not [m for m in page.console_errors() if "CORS" in m]
    ARTIFACTS.mkdir(exist_ok=True)
    page.driver.save_screenshot(str(ARTIFACTS / "web-demo-unavailable.png"))


def test_proxy_not_listening_shows_unavailable(open_page):
    page = open_page(f"http://127.0.0.1:{free_port()}")
    row = page.login("demo", "demo123")
    assert row["code"] == "14"
    text = page.status()["text"]
    assert text.startswith("UNAVAILABLE (14): cannot reach http://127.0.0.1:")
    assert "Failed to fetch" in text  # the browser's own words, inside a readable gRPC error


@pytest.fixture
def proxy_for_another_origin(replicas):
    p = start_cors_proxy("http://other.example", [r.port for r in replicas])
    yield p
    p.stop()


def test_origin_not_allowed_is_refused_by_the_browser(open_page, proxy_for_another_origin):
    # The page's origin is not in this proxy's CORS policy: Chromium refuses the preflight, which
    # shows the calls really are cross-origin; the page still reports a gRPC error.
    page = open_page(proxy_for_another_origin.url)
    row = page.login("demo", "demo123")
    assert row["code"] == "14"
    assert page.status()["text"].startswith("UNAVAILABLE (14): cannot reach")
    assert any("CORS" in m for m in page.console_errors())


def test_embedded_default_serves_a_working_page_on_its_own_origin(driver):
    """The README's first command: the proxy alone, its page at the address it prints."""
    import subprocess

    from .demo_page import DemoPage, integration

    port, admin = free_port(), free_port()
    proc = subprocess.Popen(integration.unprivileged([integration.PROXY_BIN, "--listen", f"127.0.0.1:{port}",
                                                      "--admin-listen", f"127.0.0.1:{admin}"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        integration.wait_for_port(port, proc)
        page = DemoPage(driver, f"http://127.0.0.1:{port}/")
        for mode in MODES:
            page.set_mode(mode)
            row = page.login("demo", "demo123")
            assert row["code"] == "0" and row["replica"] == "embedded", row
        assert page.console_errors() == []
    finally:
        proc.terminate()
        proc.wait(timeout=10)
