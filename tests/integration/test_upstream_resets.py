"""A backend that answers before the request has ended, as grpc-go does, against the proxy.

grpc-go answers a unary call as soon as it has the request message and, if the request's
END_STREAM has not arrived by then, resets the stream with NO_ERROR. That is ordinary HTTP/2
(RFC 9113 section 8.1), not abuse: the proxy must neither count those resets against the backend
(swift-nio-http2's defaults give up on a peer after 200 resets in 30 s) nor cause them when the
client's request has ended: END_STREAM goes upstream with the last piece of the body.
"""

import h2.exceptions
import pytest

from conftest import config, free_port, start_proxy
from grpcweb import HTTP1, HTTP2, Reply, grpc_web_body, grpc_web_headers
from scripted_backend import EarlyAnswerBackend


@pytest.fixture
def early():
    backend = EarlyAnswerBackend()
    port = free_port()
    p = start_proxy(config(port, {"users": [backend.port]}, """
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 0s }""", cors=False), port)
    yield backend, port, p
    p.stop()
    backend.close()


MESSAGE = b"\x0a\x02hi"


def test_hundreds_of_no_error_resets_keep_the_upstream_connection(early):
    """The issue's reproduction: on one h2c connection, 300 calls whose request ends with an empty
    DATA frame after the answer came. The backend resets each one with NO_ERROR; every call must be
    answered, on one upstream connection, and the proxy must never GOAWAY its backend."""
    backend, port, proxy = early
    c = HTTP2(port, timeout=10)
    failures = []
    try:
        for i in range(300):
            sid = c.start("/bench.Echo/Unary", grpc_web_headers(False), grpc_web_body(MESSAGE, False), end=False)
            try:
                c.pump(lambda: c.streams[sid]["ended"])
            except TimeoutError:
                failures.append(f"call {i}: no answer")
                break
            st = c.streams.pop(sid)
            r = Reply(int(st["headers"][":status"]), st["headers"], st["data"], text=False)
            if r.grpc_status != 0 or r.messages != [MESSAGE]:
                failures.append(f"call {i}: {r.grpc_status} {r.grpc_message}")
            try:
                c.send(sid, b"", end=True)
            except h2.exceptions.StreamClosedError:
                pass
    finally:
        c.close()
    assert failures == [], proxy.output()[-3000:]
    assert backend.resets_sent >= 290
    assert backend.connections == 1 and backend.goaways == [], (backend.connections, backend.goaways)


@pytest.mark.parametrize("protocol", ["http1", "h2c"])
def test_a_request_body_ends_with_its_last_data_frame(early, protocol):
    """A request whose body arrives with its end (an HTTP/1.1 Content-Length body, an HTTP/2 DATA
    frame with END_STREAM) goes upstream the same way: no empty DATA frame after it, so the
    backend has no reason to reset the stream."""
    backend, port, proxy = early
    c = HTTP1(port) if protocol == "http1" else HTTP2(port)
    try:
        for _ in range(20):
            r = c.call("/bench.Echo/Unary", MESSAGE)
            assert r.grpc_status == 0 and r.messages == [MESSAGE]
    finally:
        c.close()
    assert (backend.end_with_data, backend.end_separate, backend.resets_sent) == (20, 0, 0)
