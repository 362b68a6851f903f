"""Route features beyond the basic cluster route: header mutations at each level, and
direct_response bodies read from files."""

from conftest import config, free_port, start_proxy
from grpcweb import HTTP1, HTTP2, echo_req, pb_decode


def test_request_and_response_header_mutations(replicas, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<h1>hello</h1>\n")
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

    from conftest import USER_SERVICE_BIN
    from grpcweb import login_req

    sock = tmp_path / "user.sock"
    backend = subprocess.Popen([str(USER_SERVICE_BIN), "--unix-socket", str(sock), "--replica", "unix"],
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
