"""OpenTelemetry tracing from the connection manager's `tracing` block (the
`envoy.tracers.opentelemetry` provider), checked against a real OTLP/gRPC receiver: a span per
call with Envoy's attributes and the rpc.* / http.* ones, the client's W3C trace context
continued and passed upstream, `random_sampling` / `client_sampling` and the client's sampled flag
honoured, and the gRPC status the client received (Envoy loses a gRPC-Web call's status in
trailers; the proxy does not). Side by side with real Envoy 1.40 on the same config and traffic."""

import re
import subprocess
import time

import pytest

from conftest import PROXY_BIN, free_port, needs_envoy, serving, start_proxy
from grpcweb import HTTP1, HTTP2, echo_req, login_req
from otlp_receiver import OTLPReceiver
from scripted_backend import EarlyAnswerBackend

import envoy_yaml

ROUTES = """
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/dead/" }
                route: { cluster: dead, prefix_rewrite: "/" }
              - match: { prefix: "/demo.Echo/" }
                route: { cluster: users, timeout: 5s }
              - match: { prefix: "/" }
                route: { cluster: scripted, timeout: 5s }"""

PARENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])$")


def tracing(sampling=""):
    return f"""
          tracing:{sampling}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {{ envoy_grpc: {{ cluster_name: otel }}, timeout: 1s }}
                service_name: my-proxy"""


def config(port, receiver, backend, replicas, sampling=""):
    return envoy_yaml.config(
        [envoy_yaml.listener("web", port, ROUTES, hcm_extra=tracing(sampling))],
        [envoy_yaml.cluster("scripted", [backend.port]), envoy_yaml.cluster("users", [r.port for r in replicas]),
         envoy_yaml.cluster("dead", [free_port()]), envoy_yaml.cluster("otel", [receiver.port])])


@pytest.fixture
def receiver():
    r = OTLPReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def backend():
    b = EarlyAnswerBackend()
    yield b
    b.close()


def traffic(port):
    """Six calls, five of them traced: root, continued, not sampled, failed upstream, failed in
    the headers (trailers-only), failed in the trailers after two messages."""
    c = HTTP1(port)
    assert c.call("/demo.User/login", login_req("root", "x"), headers={"user-agent": "root-call"}).grpc_status == 0
    c.close()
    h2 = HTTP2(port)
    assert h2.call("/demo.User/login", login_req("continued", "x"), headers={
        "traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01", "tracestate": "foo=bar", "user-agent": "continued"}).grpc_status == 0
    assert h2.call("/demo.User/login", login_req("unsampled", "x"), headers={
        "traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-00", "user-agent": "unsampled"}).grpc_status == 0
    assert h2.call("/dead/demo.User/login", login_req("dead", "x"), headers={"user-agent": "dead"}).grpc_status == 14
    assert h2.call("/demo.Echo/Unary", echo_req("x", fail_code=5), headers={"user-agent": "trailers-only"}).grpc_status == 5
    assert h2.call("/demo.Echo/ServerStream", echo_req("x", count=2, fail_code=5), headers={"user-agent": "failed"}).grpc_status == 5
    h2.close()


def by_agent(spans):
    return {s["attributes"].get("user_agent"): s for s in spans}


TRAFFIC_AGENTS = {"root-call", "continued", "dead", "trailers-only", "failed"}


def spans_of(receiver, agents, timeout=15):
    """The spans of the calls made by `agents`, by agent, once all have arrived."""
    deadline = time.monotonic() + timeout
    while True:
        spans = {agent: span for agent, span in by_agent(receiver.spans()).items() if agent in agents}
        if set(spans) == agents:
            return spans
        assert time.monotonic() < deadline, f"spans of {sorted(agents - set(spans))} did not arrive"
        time.sleep(0.1)


CUSTOM_TAGS = """
            custom_tags:
            - { tag: team, literal: { value: web } }
            - { tag: tenant, request_header: { name: x-tenant, default_value: none } }
            - { tag: zone.name, environment: { name: TRACING_TEST_ZONE } }
            - { tag: missing, environment: { name: TRACING_TEST_UNSET } }"""


def test_spans_and_the_trace_context_sent_upstream(receiver, backend, replicas, monkeypatch):
    monkeypatch.setenv("TRACING_TEST_ZONE", "eu-1")
    monkeypatch.delenv("TRACING_TEST_UNSET", raising=False)
    port = free_port()
    proxy = start_proxy(config(port, receiver, backend, replicas, sampling=CUSTOM_TAGS), port)
    try:
        traffic(port)
        # The batch goes out within the exporter's 5 s schedule.
        spans = by_agent(receiver.wait_for(5, timeout=15))
        time.sleep(0.5)
        assert len(receiver.spans()) == 5, "the unsampled call must not be exported"
    finally:
        proxy.stop()
    upstream = {r["user-agent"]: r for r in backend.requests}

    root = spans["root-call"]
    assert (root["name"], root["kind"], root["parent_span_id"]) == ("ingress", "SPAN_KIND_SERVER", "")
    assert root["resource"]["service.name"] == "my-proxy"
    a = root["attributes"]
    assert a["http.method"] == "POST" and a["http.protocol"] == "HTTP/1.1" and a["http.status_code"] == "200"
    assert a["grpc.path"] == "/demo.User/login" and a["grpc.content_type"] == "application/grpc"
    assert a["upstream_cluster"] == "scripted" and a["response_flags"] == "-" and a["component"] == "proxy"
    assert a["rpc.system"] == "grpc" and a["rpc.service"] == "demo.User" and a["rpc.method"] == "login"
    assert a["grpc.status_code"] == "0" and a["rpc.grpc.status_code"] == 0 and "error" not in a
    assert root["status_code"] == "STATUS_CODE_UNSET"
    assert (a["team"], a["tenant"], a["zone.name"]) == ("web", "none", "eu-1") and "missing" not in a
    assert upstream["root-call"]["traceparent"] == f"00-{root['trace_id']}-{root['span_id']}-01"

    continued = spans["continued"]
    assert continued["trace_id"] == PARENT_TRACE and continued["parent_span_id"] == PARENT_SPAN
    assert continued["attributes"]["http.protocol"] == "HTTP/2"
    assert upstream["continued"]["traceparent"] == f"00-{PARENT_TRACE}-{continued['span_id']}-01"
    assert upstream["continued"]["tracestate"] == "foo=bar"

    # Not sampled: the same trace goes on upstream under a new span id, flagged not sampled.
    m = TRACEPARENT.match(upstream["unsampled"]["traceparent"])
    assert m and m.group(1) == PARENT_TRACE and m.group(2) != PARENT_SPAN and m.group(3) == "00"

    dead = spans["dead"]["attributes"]
    assert dead["error"] == "true" and dead["grpc.status_code"] == "14" and dead["response_flags"] == "UF"
    assert dead["upstream_cluster"] == "dead" and spans["dead"]["status_code"] == "STATUS_CODE_ERROR"

    assert spans["trailers-only"]["attributes"]["grpc.status_code"] == "5"
    # Beyond Envoy: the status came in the gRPC-Web body's trailer frame, and the span has it.
    failed = spans["failed"]["attributes"]
    assert failed["grpc.status_code"] == "5" and failed["rpc.grpc.status_code"] == 5
    # NOT_FOUND is an answer, not an error of the call (Envoy's rule: statuses that stand for 5xx).
    assert "error" not in failed and spans["failed"]["status_code"] == "STATUS_CODE_UNSET"


def test_random_and_client_sampling(receiver, backend, replicas):
    port = free_port()
    proxy = start_proxy(config(port, receiver, backend, replicas, sampling="\n            random_sampling: { value: 0 }"), port)
    try:
        c = HTTP1(port)
        for _ in range(5):
            assert c.call("/demo.User/login", login_req("a", "x"), headers={"user-agent": "random"}).grpc_status == 0
        # A sampled parent does not override random_sampling 0 (nor does it in Envoy).
        assert c.call("/demo.User/login", login_req("a", "x"), headers={
            "user-agent": "parent", "traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"}).grpc_status == 0
        assert c.call("/demo.User/login", login_req("a", "x"), headers={
            "user-agent": "client", "x-client-trace-id": "abc"}).grpc_status == 0
        c.close()
        spans = receiver.wait_for(1, timeout=15)
        time.sleep(0.5)
        spans = receiver.spans()
    finally:
        proxy.stop()
    assert [s["attributes"]["user_agent"] for s in spans] == ["client"]
    assert spans[0]["attributes"]["guid:x-client-trace-id"] == "abc"
    for r in backend.requests:
        flags = TRACEPARENT.match(r["traceparent"]).group(3)
        assert flags == ("01" if r["user-agent"] == "client" else "00"), r


@pytest.mark.parametrize("provider, message", [
    ("grpc_service: { envoy_grpc: { cluster_name: nowhere } }", "tracing collector cluster 'nowhere' is not defined"),
    ("http_service: { http_uri: { uri: 'http://x/v1/traces', cluster: otel, timeout: 1s } }", "http_service (OTLP over HTTP) is not supported"),
])
def test_a_tracing_block_that_cannot_work_stops_the_start(tmp_path, provider, message, receiver, backend, replicas):
    text = config(free_port(), receiver, backend, replicas).replace(
        "grpc_service: { envoy_grpc: { cluster_name: otel }, timeout: 1s }", provider)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = subprocess.run([PROXY_BIN, "--mode", "validate", "-c", path], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert message in out.stderr and f"{path}:" in out.stderr, out.stderr


ENVOY_SAME = ["component", "http.method", "http.protocol", "grpc.path", "grpc.content_type", "upstream_cluster",
              "upstream_cluster.name", "response_flags", "user_agent", "downstream_cluster", "request_size", "peer.address"]


@needs_envoy
def test_spans_match_envoys(tmp_path, backend, replicas):
    """The same calls through Envoy and the proxy give the same spans: names, kinds, parents,
    and Envoy's attributes, but for the declared difference (the gRPC-Web status in trailers)."""
    results = {}
    for who in ("envoy", "ours"):
        with OTLPReceiver() as receiver:
            port = free_port()
            with serving(who, config(port, receiver, backend, replicas), port, tmp_path):
                traffic(port)
                results[who] = spans_of(receiver, TRAFFIC_AGENTS)
    envoy, ours = results["envoy"], results["ours"]
    assert sorted(envoy) == sorted(ours) == ["continued", "dead", "failed", "root-call", "trailers-only"]
    for agent in envoy:
        e, o = envoy[agent], ours[agent]
        assert (e["name"], e["kind"]) == (o["name"], o["kind"]), agent
        assert (e["parent_span_id"] == "") == (o["parent_span_id"] == ""), agent
        for key in ENVOY_SAME:
            assert e["attributes"].get(key) == o["attributes"].get(key), f"{agent}: {key}"
        if agent in ("root-call", "continued", "failed"):
            # Declared: the status came in trailers, which Envoy's grpc_web filter moved into the
            # body before its span was finished, so its span has no status; ours has the one the
            # client read.
            assert "grpc.status_code" not in e["attributes"]
            assert o["attributes"]["grpc.status_code"] == ("5" if agent == "failed" else "0")
        else:
            assert e["attributes"].get("grpc.status_code") == o["attributes"].get("grpc.status_code"), agent
        assert e["status_code"] == o["status_code"], agent
        assert e["attributes"].get("error") == o["attributes"].get("error"), agent
    assert envoy["continued"]["trace_id"] == ours["continued"]["trace_id"] == PARENT_TRACE
