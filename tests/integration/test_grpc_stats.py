"""The `envoy.filters.http.grpc_stats` filter's counters, side by side with real Envoy 1.40 on the
same config and traffic: `cluster.<name>.grpc.[<service>.<method>.]{total,success,failure,<status>,
request_message_count,response_message_count}` for gRPC-Web (binary and text) and native gRPC
calls, with `stats_for_all_methods`, an allowlist, and neither (Envoy's default: no method in the
name). Envoy's filter sees a gRPC-Web call after the grpc_web filter made it gRPC, so it counts
the status the backend sent; so does the proxy."""

import subprocess
import time
import urllib.request

import pytest

from conftest import free_port, needs_envoy, serving, start_proxy
from grpcweb import HTTP1, HTTP2, echo_req, frame, login_req

import envoy_yaml

ROUTES = """
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 5s }"""

GRPC_STATS = {
    "all": "stats_for_all_methods: true\n              enable_upstream_stats: true",
    "default": "",
    "allowlist": "individual_method_stats_allowlist:\n                services:\n                - name: demo.Echo\n"
                 "                  method_names: [ServerStream, Unary]",
}


def filters(stats_config):
    grpc_stats = f"""
          - name: envoy.filters.http.grpc_stats
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
              {stats_config}"""
    head, sep, rest = envoy_yaml.HTTP_FILTERS.partition("\n          - name: envoy.filters.http.cors")
    return head + grpc_stats + sep + rest


def config(port, admin, replicas, stats_config):
    return envoy_yaml.config([envoy_yaml.listener("web", port, ROUTES, filters=filters(stats_config))],
                             [envoy_yaml.cluster("users", [r.port for r in replicas], connect_timeout="0.5s")],
                             admin_port=admin)


def traffic(port):
    c = HTTP1(port)
    for _ in range(3):
        assert c.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0
    assert c.call("/demo.User/login", login_req("demo", "wrong"), text=True).grpc_status != 0
    assert c.call("/demo.Echo/Unary", echo_req("x", fail_code=5)).grpc_status == 5
    # Not a /service/method path: neither counts it.
    c.call("/nothing", login_req("a", "b"))
    c.close()
    h2 = HTTP2(port)
    assert h2.call("/demo.Echo/ServerStream", echo_req("s", count=7), text=True).grpc_status == 0
    # Native gRPC, two request messages on a unary method (the backend answers an error).
    sid = h2.start("/demo.User/login", {"content-type": "application/grpc", "te": "trailers"},
                   frame(login_req("demo", "demo123")) + frame(login_req("demo", "demo123")))
    h2.finish(sid)
    sid = h2.start("/demo.Echo/Unary", {"content-type": "application/grpc", "te": "trailers"}, frame(echo_req("n")))
    assert h2.finish(sid)["trailers"]["grpc-status"] == "0"
    h2.close()


def grpc_stats(admin):
    """The filter's stats: counters with their values, histograms by name only."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=^cluster\\.users\\.grpc\\.", timeout=5) as r:
        body = r.read().decode()
    stats = {}
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        stats[name] = value if value.isdigit() else "histogram"
    return stats


@needs_envoy
@pytest.mark.parametrize("mode", sorted(GRPC_STATS))
def test_grpc_stats_match_envoys(replicas, tmp_path, mode):
    counted = {}
    for who in ("envoy", "ours"):
        port, admin = free_port(), free_port()
        with serving(who, config(port, admin, replicas, GRPC_STATS[mode]), port, tmp_path):
            traffic(port)
            time.sleep(0.3)  # Envoy charges the last call's stats as its stream is torn down
            counted[who] = grpc_stats(admin)
    theirs, ours = counted["envoy"], counted["ours"]
    assert theirs, "Envoy counted nothing: the test's traffic is wrong"
    assert ours == theirs


def test_grpc_stats_counts_each_message_of_a_stream(replicas):
    port, admin = free_port(), free_port()
    proxy = start_proxy(config(port, admin, replicas, GRPC_STATS["all"]), port)
    try:
        h2 = HTTP2(port)
        assert h2.call("/demo.Echo/ServerStream", echo_req("s", count=25)).grpc_status == 0
        h2.close()
        stats = grpc_stats(admin)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=5) as r:
            prometheus = r.read().decode()
    finally:
        proxy.stop()
    # Per-method p99 for a dashboard: Envoy's tags on the filter's histogram.
    assert ('envoy_cluster_grpc_upstream_rq_time_count{envoy_cluster_name="users",envoy_grpc_bridge_service="demo.Echo",'
            'envoy_grpc_bridge_method="ServerStream"} 1') in prometheus.splitlines()
    assert stats["cluster.users.grpc.demo.Echo.ServerStream.response_message_count"] == "25"
    assert stats["cluster.users.grpc.demo.Echo.ServerStream.request_message_count"] == "1"
    assert stats["cluster.users.grpc.demo.Echo.ServerStream.success"] == "1"
    assert stats["cluster.users.grpc.demo.Echo.ServerStream.upstream_rq_time"] == "histogram"


def test_both_method_choices_are_a_config_error(replicas, tmp_path):
    from conftest import PROXY_BIN
    path = tmp_path / "both.yaml"
    path.write_text(config(free_port(), free_port(), replicas, "stats_for_all_methods: true\n              "
                           "individual_method_stats_allowlist: { services: [] }"))
    out = subprocess.run([PROXY_BIN, "--mode", "validate", "-c", path], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "stats_for_all_methods and individual_method_stats_allowlist" in out.stderr
    assert "http_filters[1].typed_config.stats_for_all_methods" in out.stderr
