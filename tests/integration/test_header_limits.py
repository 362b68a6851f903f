"""Request header limits, as Envoy enforces them, and header blocks a backend cannot take.

Envoy answers 431 above `max_request_headers_kb` (60 KiB by default) and above
`common_http_protocol_options.max_headers_count` (100 by default), on HTTP/1.1 and HTTP/2. A header
block larger than one HTTP/2 frame goes to the backend with CONTINUATION frames; one the backend
cannot take (over its SETTINGS_MAX_HEADER_LIST_SIZE) fails that call alone, with a message saying why, and never the upstream connection.
"""

import pytest

from conftest import config, free_port, start_proxy
from grpcweb import HTTP1, HTTP2, login_req
from scripted_backend import EarlyAnswerBackend

ROUTES = """
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 5s }"""


def proxy_for(backend_port, hcm_extra=""):
    port, admin = free_port(), free_port()
    text = config(port, {"users": [backend_port]}, ROUTES, cors=False)
    if hcm_extra:
        text = text.replace("codec_type: AUTO", "codec_type: AUTO" + hcm_extra, 1)
        assert hcm_extra in text
    return start_proxy(text, port), port


def settled_h2(port):
    """An h2c connection that has acknowledged the proxy's SETTINGS before its first request.
    swift-nio-http2 applies the header list size the proxy advertises only from that
    acknowledgement on: before it, a client's first requests are held to 16 KiB of headers and
    more fails the connection. Browsers do not wait; that gap is swift-nio-http2's."""
    import h2.events

    c = HTTP2(port)
    seen = []
    while not seen:
        for event in c.conn.receive_data(c.sock.recv(65536)):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                seen.append(event)
    c.sock.sendall(c.conn.data_to_send())
    return c


CLIENTS = {"http1": HTTP1, "h2c": settled_h2}


def call(client, port, headers):
    c = CLIENTS[client](port)
    try:
        return c.call("/bench.Echo/Unary", b"\x0a\x02hi", headers=headers)
    finally:
        c.close()


@pytest.fixture(scope="module")
def backend():
    b = EarlyAnswerBackend()
    yield b
    b.close()


@pytest.fixture(scope="module")
def default_proxy(backend):
    p, port = proxy_for(backend.port)
    yield port
    p.stop()


@pytest.fixture(scope="module")
def small_proxy(backend):
    p, port = proxy_for(backend.port, """
          max_request_headers_kb: 8
          common_http_protocol_options: { max_headers_count: 20 }""")
    yield port
    p.stop()


@pytest.mark.parametrize("client", ["http1", "h2c"])
def test_envoy_default_limits(default_proxy, client):
    # Under the limit, and more than one HTTP/2 frame (16 KiB) to the backend: the block goes
    # out as HEADERS and CONTINUATION frames, as Envoy sends a 32 KiB header.
    assert call(client, default_proxy, {"x-big": "a" * 12_000}).grpc_status == 0
    assert call(client, default_proxy, {"x-big": "a" * 32_768}).grpc_status == 0
    assert call(client, default_proxy, {"x-big": "a" * 58_000}).grpc_status == 0
    assert call(client, default_proxy, {"x-big": "a" * 100_000}).status == 431
    assert call(client, default_proxy, {f"x-h{i}": "v" for i in range(90)}).grpc_status == 0
    assert call(client, default_proxy, {f"x-h{i}": "v" for i in range(101)}).status == 431


@pytest.mark.parametrize("client", ["http1", "h2c"])
def test_configured_limits(small_proxy, client):
    assert call(client, small_proxy, {"x-big": "a" * 7_000}).grpc_status == 0
    assert call(client, small_proxy, {"x-big": "a" * 9_000}).status == 431
    assert call(client, small_proxy, {f"x-h{i}": "v" for i in range(21)}).status == 431


def test_an_http2_client_keeps_its_connection_after_a_431(small_proxy):
    c = settled_h2(small_proxy)
    try:
        assert c.call("/bench.Echo/Unary", b"\x0a\x02hi", headers={"x-big": "a" * 9_000}).status == 431
        assert c.call("/bench.Echo/Unary", b"\x0a\x02hi").grpc_status == 0
    finally:
        c.close()


@pytest.mark.parametrize("client", ["http1", "h2c"])
def test_a_header_block_the_backend_cannot_take_fails_that_call_only(replicas, client):
    """The demo User service (swift-nio-http2) takes 16 KiB of headers. A 26 KiB header (within
    the proxy's own 60 KiB) gets a local 431 naming the backend's limit; the upstream connection
    stays, and calls on it go on."""
    port = free_port()
    p = start_proxy(config(port, {"users": [replicas[0].port]}, ROUTES, cors=False), port, args=("-l", "debug"))
    try:
        c = CLIENTS[client](port)
        try:
            for _ in range(3):
                assert c.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0
                r = c.call("/demo.User/login", login_req("demo", "demo123"), headers={"x-big": "a" * 26_000})
                assert (r.status, r.grpc_status) == (431, 8), (r.status, r.grpc_status, r.grpc_message)
                assert "backend" in r.grpc_message, r.grpc_message
            assert c.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0
        finally:
            c.close()
        assert p.output().count("upstream connected") == 1, p.output()[-3000:]
    finally:
        p.stop()
