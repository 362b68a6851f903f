"""The web demo over HTTPS: the proxy serves the page and the gRPC-Web calls on one TLS listener
(ALPN h2 and http/1.1), with certificates made by scripts/gen-certs.sh. Chromium trusts the test
server certificate by its public key (--ignore-certificate-errors-spki-list), so the page is a real
secure origin, and its gRPC-Web calls must go over HTTP/2."""

import base64
import hashlib
import subprocess
import tempfile
from pathlib import Path

import pytest

from .demo_page import ROOT, WAIT_S, WEB_DEMO, DemoPage, envoy_yaml, find_chromedriver, free_port, integration

PAGE = [("/index.html", "index.html", "text/html; charset=utf-8"), ("/app.js", "app.js", "text/javascript"),
        ("/demo-user.js", "demo-user.js", "text/javascript"), ("/grpc-web.js", "grpc-web.js", "text/javascript"),
        ("/style.css", "style.css", "text/css")]


def https_config(port, certs, user_ports):
    page_routes = "".join(f"""
              - match: {{ path: "{path}" }}
                direct_response: {{ status: 200, body: {{ filename: "{WEB_DEMO / name}" }} }}
                response_headers_to_add:
                - header: {{ key: content-type, value: "{kind}" }}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD""" for path, name, kind in PAGE)
    virtual_hosts = f"""
            - name: web
              domains: ["*"]
              routes:
              - match: {{ path: "/favicon.ico" }}
                direct_response: {{ status: 204 }}{page_routes}
              - match: {{ prefix: "/demo." }}
                route:
                  cluster: users
                  timeout: 0s
                  max_stream_duration: {{ grpc_timeout_header_max: 0s }}"""
    listener = envoy_yaml.listener("https", port, virtual_hosts).replace(
        "            name: local_route\n", "            name: local_route\n            max_direct_response_body_size_bytes: 1048576\n")
    head, rest = listener.split("\n    filter_chains:\n    - filters:", 1)
    tls = f"""
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: ["h2", "http/1.1"]
            tls_certificates:
            - certificate_chain: {{ filename: {certs / 'server.crt'} }}
              private_key: {{ filename: {certs / 'server.key'} }}
      filters:"""
    return envoy_yaml.config([head + tls + rest], [envoy_yaml.cluster("users", user_ports, connect_timeout="0.5s")])


def spki_hash(cert):
    der_key = subprocess.run(
        f"openssl x509 -in {cert} -pubkey -noout | openssl pkey -pubin -outform der", shell=True, check=True,
        capture_output=True).stdout
    return base64.b64encode(hashlib.sha256(der_key).digest()).decode()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    subprocess.run([str(ROOT / "scripts" / "gen-certs.sh"), "-o", str(d), "--client", "none"], check=True, capture_output=True)
    return integration.share(d)


@pytest.fixture(scope="module")
def https_proxy(certs, replicas):
    port = free_port()
    p = integration.start_proxy(https_config(port, certs, [r.port for r in replicas]), port)
    p.url = f"https://localhost:{port}"
    yield p
    p.stop()


@pytest.fixture(scope="module")
def tls_driver(chromium, certs):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.TemporaryDirectory()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--disable-gpu", "--no-first-run", "--disable-extensions", f"--user-data-dir={profile.name}",
                 f"--ignore-certificate-errors-spki-list={spki_hash(certs / 'server.crt')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=find_chromedriver()), options=options)
    d.set_page_load_timeout(WAIT_S * 2)
    yield d
    d.quit()
    profile.cleanup()


@pytest.mark.parametrize("mode", ["binary", "text"])
def test_the_page_over_https_calls_grpc_web_over_http2(tls_driver, https_proxy, mode):
    page = DemoPage(tls_driver, f"{https_proxy.url}/index.html?proxy={https_proxy.url}")
    assert tls_driver.execute_script("return window.isSecureContext && location.protocol") == "https:"
    page.set_mode(mode)
    row = page.login("demo", "demo123")
    assert row["code"] == "0" and row["ok"] == "true" and row["replica"] in {"r1", "r2", "r3"}
    entries = tls_driver.execute_script(
        "return performance.getEntries().map(e => ({name: e.name, protocol: e.nextHopProtocol}))")
    calls = [e for e in entries if e["name"].endswith("/demo.User/login")]
    assert calls and all(e["protocol"] == "h2" for e in calls), entries
    page_entry = [e for e in entries if e["name"].endswith("/index.html?proxy=" + https_proxy.url)]
    assert page_entry and page_entry[0]["protocol"] == "h2", entries
    assert page.console_errors() == []
