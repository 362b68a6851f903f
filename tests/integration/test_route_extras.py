"""Route features beyond the basic cluster route: header mutations at each level, and
direct_response bodies read from files."""

import collections

from conftest import config, free_port, share, start_proxy
from grpcweb import HTTP1, HTTP2, echo_req, pb_decode


def test_request_and_response_header_mutations(replicas, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<h1>hello</h1>\n")
    share(page)
    routes = f"""
              - match: {{ path: "/page" }}
                direct_response: {{ status: 200, body: {{ filename: "{page}" }} }}
                response_headers_to_add:
                - header: {{ key: content-type, value: "text/html; charset=utf-8" }}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
              - match: {{ prefix: "/demo." }}
                route: {{ cluster: users, timeout: 0s }}
                request_headers_to_add:
                - header: {{ key: x-echo-tenant, value: "t-%REQ(x-user)%" }}
                - header: {{ key: x-echo-set, value: "proxy" }}
                  append: false
                request_headers_to_remove: [x-echo-secret]
                response_headers_to_add:
                - header: {{ key: x-route, value: "echo" }}
                response_headers_to_remove: [x-echo-dropped]"""
    port = free_port()
    p = start_proxy(config(port, {"users": [r.port for r in replicas]}, routes, cors=False), port)
    try:
        c = HTTP2(port)
        r = c.call("/demo.Echo/Unary", echo_req("m"), headers={
            "x-user": "ann", "x-echo-set": "client", "x-echo-secret": "s", "x-echo-dropped": "d"})
        c.close()
        assert r.grpc_status == 0
        # The Echo service returns x-echo-* request headers as response headers: what it got.
        assert r.headers["x-echo-tenant"] == "t-ann"
        assert r.headers["x-echo-set"] == "proxy"
        assert "x-echo-secret" not in r.headers
        assert "x-echo-dropped" not in r.headers
        assert r.headers["x-route"] == "echo"

        h1 = HTTP1(port)
        status, headers, body = h1.request("GET", "/page")
        status_head, headers_head, body_head = h1.request("HEAD", "/page")
        h1.close()
        assert (status, headers["content-type"], body) == (200, "text/html; charset=utf-8", b"<h1>hello</h1>\n")
        assert status_head == 200 and headers_head["content-length"] == str(len(body)) and body_head == b""
    finally:
        p.stop()


def test_unix_socket_endpoint(tmp_path):
    import subprocess
    import time

    from conftest import USER_SERVICE_BIN, share, unprivileged
    from grpcweb import login_req

    sock = share(tmp_path, writable=True) / "user.sock"
    backend = subprocess.Popen(unprivileged([USER_SERVICE_BIN, "--unix-socket", sock, "--replica", "unix"]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    p = None
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = config(port, {"users": [1]}, """
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 0s }""", cors=False)
        text = text.replace("socket_address: { address: 127.0.0.1, port_value: 1 }", f"pipe: {{ path: {sock} }}")
        assert "pipe:" in text
        p = start_proxy(text, port)
        c = HTTP2(port)
        r = c.call("/demo.User/login", login_req("demo", "demo123"))
        c.close()
        assert r.grpc_status == 0 and pb_decode(r.messages[0])[3] == b"unix"
    finally:
        if p:
            p.stop()
        backend.kill()
        backend.wait()


def _replica(r):
    return pb_decode(r.messages[0])[3].decode() if r.grpc_status == 0 else None


def _echo_replica(r):
    return pb_decode(r.messages[0])[2].decode() if r.grpc_status == 0 else None


def test_branch_header_routing_seed_004(replicas):
    """Seed 004: a request with `branch: feature-x` goes to that branch's cluster, anything
    else to the default `test` cluster; the same with cluster_header naming the cluster."""
    from grpcweb import login_req

    routes = """
              - match:
                  prefix: "/"
                  headers:
                  - name: branch
                    string_match: { exact: feature-x }
                route: { cluster: feature-x, timeout: 0s }
              - match: { prefix: "/by-header/" }
                route: { cluster_header: x-cluster, prefix_rewrite: "/", timeout: 0s }
              - match: { prefix: "/" }
                route: { cluster: test, timeout: 0s }"""
    port = free_port()
    p = start_proxy(config(port, {"test": [replicas[0].port], "feature-x": [replicas[1].port]}, routes, cors=False), port)
    try:
        c = HTTP2(port)
        assert _replica(c.call("/demo.User/login", login_req("demo", "demo123"), headers={"branch": "feature-x"})) == "r2"
        assert _replica(c.call("/demo.User/login", login_req("demo", "demo123"), headers={"branch": "feature-y"})) == "r1"
        assert _replica(c.call("/demo.User/login", login_req("demo", "demo123"))) == "r1"
        assert _replica(c.call("/by-header/demo.User/login", login_req("demo", "demo123"), headers={"x-cluster": "feature-x"})) == "r2"
        missing = c.call("/by-header/demo.User/login", login_req("demo", "demo123"), headers={"x-cluster": "nope"})
        assert (missing.status, missing.grpc_status, missing.grpc_message) == (503, 14, "cluster not found")
        c.close()
    finally:
        p.stop()


def test_weighted_clusters_query_parameters_and_regex_rewrite(replicas):
    from grpcweb import login_req

    routes = """
              - match:
                  prefix: "/"
                  query_parameters:
                  - name: v
                    string_match: { exact: "2" }
                direct_response: { status: 200, body: { inline_string: "version 2" } }
              - match: { prefix: "/api/" }
                route:
                  cluster: b
                  timeout: 0s
                  regex_rewrite: { pattern: { regex: "^/api/v[0-9]+/(.*)$" }, substitution: "/\\\\1" }
              - match: { prefix: "/" }
                route:
                  timeout: 0s
                  weighted_clusters:
                    clusters:
                    - { name: a, weight: 3 }
                    - { name: b, weight: 1 }"""
    port = free_port()
    p = start_proxy(config(port, {"a": [replicas[0].port], "b": [replicas[1].port]}, routes, cors=False), port)
    try:
        c = HTTP2(port)
        seen = collections.Counter(_replica(c.call("/demo.User/login", login_req("demo", "demo123"))) for _ in range(400))
        assert 250 <= seen["r1"] <= 350 and seen["r1"] + seen["r2"] == 400, seen
        assert c.call("/demo.User/login?w=1&v=2", login_req("demo", "demo123")).raw == b"version 2"
        assert c.call("/demo.User/login?v=3", login_req("demo", "demo123")).raw != b"version 2"
        assert _replica(c.call("/api/v1/demo.User/login", login_req("demo", "demo123"))) == "r2"
        c.close()
    finally:
        p.stop()


def test_retry_policy_retries_unavailable_and_per_try_timeout(replicas):
    import time

    from grpcweb import echo_req

    routes = """
              - match: { prefix: "/slow/" }
                route:
                  cluster: users
                  prefix_rewrite: "/"
                  timeout: 0s
                  retry_policy: { retry_on: "deadline-exceeded", num_retries: 1, per_try_timeout: 0.2s }
              - match: { prefix: "/retried/" }
                route:
                  cluster: users
                  prefix_rewrite: "/"
                  timeout: 0s
                  retry_policy: { retry_on: "unavailable,reset,connect-failure", num_retries: 2 }
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 0s }"""
    port = free_port()
    p = start_proxy(config(port, {"users": [r.port for r in replicas]}, routes, cors=False), port)
    try:
        c = HTTP2(port)
        # r1 fails every call with UNAVAILABLE (a trailers-only answer): retried elsewhere.
        retried = [c.call("/retried/demo.Echo/Unary", echo_req("x"), headers={"x-fail-replica": "r1"}) for _ in range(30)]
        assert all(r.grpc_status == 0 for r in retried), [r.grpc_message for r in retried if r.grpc_status]
        assert "r1" not in {_echo_replica(r) for r in retried}
        # Without a retry policy a third of them fail.
        plain = [c.call("/demo.Echo/Unary", echo_req("x"), headers={"x-fail-replica": "r1"}) for _ in range(30)]
        assert sum(1 for r in plain if r.grpc_status == 14) == 10
        # Each try gets 0.2 s; two tries of an 800 ms call: 504, upstream request timeout.
        start = time.monotonic()
        slow = c.call("/slow/demo.Echo/Unary", echo_req("x", delay_ms=800))
        elapsed = time.monotonic() - start
        assert (slow.status, slow.grpc_status, slow.grpc_message) == (504, 14, "upstream request timeout")
        assert 0.35 < elapsed < 0.75, elapsed
        c.close()
    finally:
        p.stop()


def test_route_idle_timeout_ends_quiet_calls_only(replicas):
    from grpcweb import Reply, frame

    routes = """
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 0s, idle_timeout: 0.5s }"""
    port = free_port()
    p = start_proxy(config(port, {"users": [r.port for r in replicas]}, routes, cors=False), port)
    try:
        c = HTTP2(port)
        busy = c.call("/demo.Echo/ServerStream", echo_req("s", count=6, delay_ms=200))
        assert busy.grpc_status == 0 and len(busy.messages) == 6, "messages every 200 ms keep the call alive"
        quiet = c.call("/demo.Echo/ServerStream", echo_req("s", count=3, delay_ms=900))
        assert quiet.status == 200 and quiet.grpc_status == 4 and quiet.grpc_message == "stream timeout"
        before = c.call("/demo.Echo/Unary", echo_req("u", delay_ms=900))
        assert (before.status, before.grpc_status, before.grpc_message) == (408, 2, "stream timeout")
        c.close()
    finally:
        p.stop()
