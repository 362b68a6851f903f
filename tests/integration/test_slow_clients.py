"""Slow and idle clients, and how many connections a listener keeps: what an operator can bound
with the settings Envoy reads (common_http_protocol_options.idle_timeout, request_headers_timeout,
the connection_limit filter, the overload manager's global_downstream_max_connections)."""

import socket
import time

import pytest

import envoy_yaml
from conftest import free_port, start_proxy
from grpcweb import HTTP1, HTTP2, echo_req, login_req

VHOSTS = """
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 0s }"""

HCM_LIMITS = """
          request_headers_timeout: 1s
          common_http_protocol_options: { idle_timeout: 1s }"""

CONNECTION_LIMIT = """
      - name: envoy.filters.network.connection_limit
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit
          stat_prefix: limit
          max_connections: 5"""

OVERLOAD = """
overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: 3"""


def limited_config(port, user_ports, connection_limit=True, header=""):
    listener = envoy_yaml.listener("slow", port, VHOSTS)
    listener = listener.replace("codec_type: AUTO", "codec_type: AUTO" + HCM_LIMITS, 1)
    if connection_limit:
        listener = listener.replace("    - filters:\n", "    - filters:" + CONNECTION_LIMIT + "\n", 1)
    return envoy_yaml.config([listener], [envoy_yaml.cluster("users", user_ports, connect_timeout="0.5s")], header=header)


@pytest.fixture(scope="module")
def limited(replicas):
    port = free_port()
    p = start_proxy(limited_config(port, [r.port for r in replicas]), port)
    yield port, p
    p.stop()


def closed_within(sock, seconds):
    """How long until the proxy closed `sock` (reading what it sent), or None."""
    sock.settimeout(0.2)
    start = time.monotonic()
    received = b""
    while time.monotonic() - start < seconds:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - start, received
        if not data:
            return time.monotonic() - start, received
        received += data
    return None, received


def test_an_idle_http1_connection_is_closed_after_idle_timeout(limited):
    port, _ = limited
    c = HTTP1(port)
    assert c.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0
    took, _ = closed_within(c.conn.sock, 4)
    assert took is not None and took < 3, took
    c.close()
    with socket.create_connection(("127.0.0.1", port)) as silent:  # not a byte: no protocol yet
        took, _ = closed_within(silent, 4)
    assert took is not None and took < 3, took


def test_an_idle_http2_connection_gets_goaway_then_closes(limited):
    port, _ = limited
    c = HTTP2(port)
    assert c.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0
    took, received = closed_within(c.sock, 4)
    assert took is not None and took < 3, took
    assert b"\x00\x00\x08\x07" in received or c.goaway is not None or len(received) >= 17  # a GOAWAY frame


def test_a_call_in_progress_is_not_idle(limited):
    port, _ = limited
    c = HTTP1(port, timeout=10)
    status, _, chunks = c.stream("/demo.Echo/ServerStream", echo_req("s", count=5, delay_ms=500))
    c.close()
    assert status == 200 and len(chunks) >= 5


def test_a_slowloris_request_gets_408(limited):
    port, _ = limited
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /demo.User/login HTTP/1.1\r\nhost: x\r\n")
    start = time.monotonic()
    received = b""
    s.settimeout(0.3)
    while time.monotonic() - start < 5:
        try:
            s.sendall(b"x")
        except OSError:
            break
        try:
            data = s.recv(4096)
            if not data:
                break
            received += data
        except socket.timeout:
            pass
        except ConnectionResetError:
            break
    took = time.monotonic() - start
    s.close()
    assert received.startswith(b"HTTP/1.1 408"), received
    assert took < 3, took


def test_the_connection_limit_closes_what_is_over_it(limited):
    port, _ = limited
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        took, _ = closed_within(extra, 1)
        assert took is not None and took < 0.5, "a sixth connection was kept"
        held.pop().close()
        time.sleep(0.2)
        c = HTTP1(port)
        assert c.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0
        c.close()
    finally:
        for s in held:
            s.close()


def test_the_overload_managers_global_limit(replicas):
    port = free_port()
    p = start_proxy(limited_config(port, [r.port for r in replicas], connection_limit=False, header=OVERLOAD), port)
    try:
        time.sleep(0.3)  # the start-up probe's connection is gone
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        took, _ = closed_within(extra, 1)
        assert took is not None and took < 0.5, "a fourth connection was kept"
        for s in held:
            s.close()
    finally:
        p.stop()
