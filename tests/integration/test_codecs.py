"""The HTTP/2 codec on each side: nghttp2 by default, swift-nio-http2 when
GRPC_WEB_PROXY_UPSTREAM_CODEC / GRPC_WEB_PROXY_DOWNSTREAM_CODEC say `niohttp2`. Both carry calls;
only nghttp2 can send a backend a header block larger than one frame (CONTINUATION), which is how
this test knows which one ran."""

import pytest

from conftest import config, free_port, start_proxy
from grpcweb import HTTP1, HTTP2
from scripted_backend import EarlyAnswerBackend

ROUTES = """
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 5s }"""


@pytest.mark.parametrize("codec", ["nghttp2", "niohttp2"])
def test_each_codec_carries_calls(monkeypatch, codec):
    monkeypatch.setenv("GRPC_WEB_PROXY_UPSTREAM_CODEC", codec)
    monkeypatch.setenv("GRPC_WEB_PROXY_DOWNSTREAM_CODEC", codec)
    backend = EarlyAnswerBackend()
    port = free_port()
    p = start_proxy(config(port, {"users": [backend.port]}, ROUTES, cors=False), port)
    try:
        for client in (HTTP1, HTTP2):
            c = client(port)
            try:
                for _ in range(3):
                    assert c.call("/bench.Echo/Unary", b"\x0a\x02hi").grpc_status == 0
                big = c.call("/bench.Echo/Unary", b"\x0a\x02hi", headers={"x-big": "a" * 20_000})
            finally:
                c.close()
            if codec == "nghttp2":
                assert big.grpc_status == 0, (big.status, big.grpc_message)
            else:
                assert big.status == 431 and "frame size" in big.grpc_message, (big.status, big.grpc_message)
    finally:
        p.stop()
        backend.close()
