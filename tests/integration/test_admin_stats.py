"""The operator's view on the admin port: Envoy's stats by Envoy's names after known traffic, in
text, JSON and Prometheus form, with the gRPC status the client actually received; /server_info
and /clusters?format=json in Envoy's shapes."""

import json
import re
import time
import urllib.request

import pytest

from conftest import free_port, start_proxy
from grpcweb import HTTP1, HTTP2, grpc_web_body, grpc_web_headers, login_req

import envoy_yaml


def admin_get(admin, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5) as r:
        return r.status, r.headers.get("content-type"), r.read().decode()


def text_stats(admin, query=""):
    status, _, body = admin_get(admin, "/stats" + query)
    assert status == 200
    stats = {}
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        stats[name] = value
    return stats


@pytest.fixture
def proxied(replicas):
    port, admin = free_port(), free_port()
    routes = """
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 0s }"""
    text = envoy_yaml.config([envoy_yaml.listener("web", port, routes)],
                             [envoy_yaml.cluster("users", [r.port for r in replicas], connect_timeout="0.5s")],
                             admin_port=admin)
    p = start_proxy(text, port)
    p.admin = admin
    proxies.append(p)
    yield port, admin
    proxies.remove(p)
    p.stop()


proxies = []


def test_stats_after_known_traffic(proxied):
    port, admin = proxied
    # Connections already made (the test's wait for the port) are not the traffic's.
    before = text_stats(admin)
    cx_before = int(before.get("http.web.downstream_cx_total", 0))
    h1 = HTTP1(port)
    for _ in range(5):
        assert h1.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0
    for _ in range(2):
        assert h1.call("/demo.User/login", login_req("demo", "wrong")).grpc_status == 16
    assert h1.call("/demo.User/nosuch", b"").grpc_status == 12
    h1.close()
    text = HTTP1(port)
    assert text.call("/demo.User/login", login_req("demo", "demo123"), text=True).grpc_status == 0
    text.close()
    h2 = HTTP2(port)
    sid = h2.start("/demo.User/login", grpc_web_headers(False), grpc_web_body(login_req("demo", "demo123"), False))
    h2.pump(lambda: h2.streams[sid]["ended"])
    h2.close()

    s = text_stats(admin)
    calls = 5 + 2 + 1 + 1 + 1
    assert s["http.web.downstream_rq_total"] == str(calls)
    assert s["http.web.downstream_rq_2xx"] == str(calls)
    assert int(s["http.web.downstream_cx_total"]) - cx_before == 3
    assert s["http.web.downstream_cx_active"] == "0"
    assert s[f"listener.127.0.0.1_{port}.downstream_cx_total"] == s["http.web.downstream_cx_total"]
    assert s["cluster.users.upstream_rq_total"] == str(calls)
    assert s["cluster.users.upstream_rq_2xx"] == str(calls)
    assert s["cluster.users.upstream_rq_200"] == str(calls)
    assert int(s["cluster.users.upstream_cx_total"]) >= 1
    assert s["cluster.users.membership_total"] == "3"
    assert s["cluster.users.membership_healthy"] == "3"
    # Per method, with the status the client read from the body's trailer frame (Envoy's
    # grpc_web filter counts a successful gRPC-Web call as neither success nor failure).
    assert s["cluster.users.grpc-web.demo.User.login.total"] == "9"
    assert s["cluster.users.grpc-web.demo.User.login.success"] == "7"
    assert s["cluster.users.grpc-web.demo.User.login.failure"] == "2"
    assert s["cluster.users.grpc-web.demo.User.login.0"] == "7"
    assert s["cluster.users.grpc-web.demo.User.login.16"] == "2"
    assert s["cluster.users.grpc-web.demo.User.nosuch.12"] == "1"
    for histogram in ("http.web.downstream_rq_time", "cluster.users.upstream_rq_time"):
        assert re.match(r"P0\(nan,[0-9.]+\) P25\(", s[histogram]), s[histogram]
    assert s["server.live"] == "1"
    assert int(s["server.memory_allocated"]) > 1 << 20
    assert int(s["server.uptime"]) >= 0

    # ?filter= keeps the names the regex finds.
    filtered = text_stats(admin, "?filter=downstream_rq_total")
    assert list(filtered) == ["http.web.downstream_rq_total"]

    # JSON, in Envoy's shape.
    status, ctype, body = admin_get(admin, "/stats?format=json")
    assert ctype.startswith("application/json")
    doc = json.loads(body)
    values = {e["name"]: e["value"] for e in doc["stats"] if "name" in e}
    assert values["http.web.downstream_rq_total"] == calls
    histograms = next(e["histograms"] for e in doc["stats"] if "histograms" in e)
    names = {h["name"] for h in histograms["computed_quantiles"]}
    assert {"http.web.downstream_rq_time", "cluster.users.upstream_rq_time"} <= names

    # Prometheus, with Envoy's metric names and tags.
    status, ctype, prom = admin_get(admin, "/stats/prometheus")
    assert status == 200 and ctype.startswith("text/plain")
    lines = prom.splitlines()
    assert f'envoy_http_downstream_rq_total{{envoy_http_conn_manager_prefix="web"}} {calls}' in lines
    assert f'envoy_cluster_upstream_rq_total{{envoy_cluster_name="users"}} {calls}' in lines
    assert f'envoy_cluster_upstream_rq_xx{{envoy_cluster_name="users",envoy_response_code_class="2"}} {calls}' in lines
    assert f'envoy_cluster_upstream_rq{{envoy_cluster_name="users",envoy_response_code="200"}} {calls}' in lines
    assert ('envoy_cluster_grpc_web_success{envoy_cluster_name="users",envoy_grpc_bridge_service="demo.User",'
            'envoy_grpc_bridge_method="login"} 7') in lines
    assert "# TYPE envoy_http_downstream_rq_time histogram" in lines
    assert f'envoy_http_downstream_rq_time_count{{envoy_http_conn_manager_prefix="web"}} {calls}' in lines
    buckets = [float(m.group(1)) for m in re.finditer(r'envoy_http_downstream_rq_time_bucket\{[^}]*le="([0-9.]+)"\}', prom)]
    assert buckets == sorted(buckets) and buckets[0] == 0.5
    for line in lines:
        assert line.startswith("#") or re.match(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [0-9.e+-]+$', line), line


def test_server_info_and_clusters_json(proxied):
    port, admin = proxied
    status, _, body = admin_get(admin, "/server_info")
    info = json.loads(body)
    assert info["state"] == "LIVE" and info["uptime_current_epoch"].endswith("s")
    status, _, body = admin_get(admin, "/clusters?format=json")
    doc = json.loads(body)
    (cluster,) = doc["cluster_statuses"]
    assert cluster["name"] == "users"
    assert len(cluster["host_statuses"]) == 3
    for host in cluster["host_statuses"]:
        assert host["address"]["socket_address"]["address"] == "127.0.0.1"
        assert host["health_status"]["eds_health_status"] == "HEALTHY"


def test_a_bad_filter_and_unknown_paths_say_why(proxied):
    _, admin = proxied
    with pytest.raises(urllib.error.HTTPError) as e:
        admin_get(admin, "/stats?filter=(")
    assert e.value.code == 400
    assert e.value.read().decode() == "Invalid re2 regex: (\n"
    # A percent-encoded filter is decoded, as Envoy decodes it.
    assert list(text_stats(admin, "?filter=server%2Elive")) == ["server.live"]
    with pytest.raises(urllib.error.HTTPError) as e:
        admin_get(admin, "/nosuch")
    assert e.value.code == 404
    assert "/stats/prometheus" in e.value.read().decode()


def admin_post(admin, path):
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_log_level_changes_at_run_time(proxied):
    port, admin = proxied
    proxy = proxies[-1]
    assert admin_get(admin, "/logging")[2] == "active loggers:\n  grpc-web-proxy: info\n"
    # A change is a POST, as in Envoy; a bad level says which ones there are.
    with pytest.raises(urllib.error.HTTPError) as e:
        admin_get(admin, "/logging?level=debug")
    assert e.value.code == 405
    assert admin_post(admin, "/logging?level=loud")[0] == 404
    h1 = HTTP1(port)
    h1.call("/demo.User/login", login_req("demo", "demo123"))
    assert " debug " not in proxy.output()
    assert admin_post(admin, "/logging?level=debug") == (200, "active loggers:\n  grpc-web-proxy: debug\n")
    h1.call("/demo.User/nosuch", b"")
    h1.close()
    assert " debug " in proxy.output()
    assert admin_post(admin, "/logging?level=warn")[1].endswith("warning\n")


def test_drain_listeners_stops_accepting_and_the_admin_port_stays(proxied):
    port, admin = proxied
    h1 = HTTP1(port)
    assert h1.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0
    assert admin_post(admin, "/drain_listeners?graceful") == (200, "OK\n")
    # The idle keep-alive connection is closed (a busy one would finish its call first, as on
    # SIGTERM: tests/integration/test_drain.py); new ones are refused.
    h1.conn.sock.settimeout(5)
    assert h1.conn.sock.recv(1) == b""
    with pytest.raises(ConnectionRefusedError):
        for _ in range(50):
            HTTP1(port).call("/demo.User/login", login_req("demo", "demo123"))
            time.sleep(0.05)
    with pytest.raises(urllib.error.HTTPError) as e:
        admin_get(admin, "/ready")
    assert e.value.code == 503
    assert text_stats(admin)["server.live"] == "0"


def test_config_dump_is_the_running_configuration(proxied):
    _, admin = proxied
    status, ctype, body = admin_get(admin, "/config_dump")
    assert status == 200 and ctype.startswith("application/json")
    (config,) = json.loads(body)["configs"]
    assert config["@type"] == "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"
    resources = config["bootstrap"]["static_resources"]
    assert [c["name"] for c in resources["clusters"]] == ["users"]
    assert resources["listeners"][0]["name"] == "web"
