"""End-to-end: browsers' gRPC-Web through the proxy to real User service replicas."""

import base64
import collections
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import PROXY_BIN, ROOT, ROUTES, Replica, config, free_port, start_proxy, unprivileged, wait_for_port
from grpcweb import HTTP1, HTTP2, Reply, echo_req, frame, login_req, pb_decode

TRANSPORTS = ["http1", "http2"]
MODES = ["binary", "text"]


def client(kind, port):
    return HTTP1(port) if kind == "http1" else HTTP2(port)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", MODES)
def test_login_succeeds_and_names_the_replica(proxy, transport, mode):
    c = client(transport, proxy.port)
    try:
        r = c.call("/demo.User/login", login_req("demo", "demo123"), text=(mode == "text"))
    finally:
        c.close()
    assert r.status == 200, r
    assert r.headers["content-type"] == ("application/grpc-web-text+proto" if mode == "text" else "application/grpc-web+proto")
    assert len(r.messages) == 1
    reply = pb_decode(r.messages[0])
    assert reply[1] == b"0" and reply[2] == b"welcome, demo"
    assert reply[3] in (b"r1", b"r2", b"r3")
    assert r.headers["x-replica"] == reply[3].decode()
    assert r.trailers == {"grpc-status": "0"} or r.trailers.get("grpc-status") == "0"
    assert r.leftover == b""


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", MODES)
def test_wrong_password_is_a_real_grpc_error(proxy, transport, mode):
    c = client(transport, proxy.port)
    try:
        r = c.call("/demo.User/login", login_req("demo", "nope"), text=(mode == "text"))
    finally:
        c.close()
    assert r.status == 200
    assert r.grpc_status == 16, r
    assert r.grpc_message == "wrong username or password"
    assert r.messages == []


def test_logout(proxy):
    c = HTTP1(proxy.port)
    r = c.call("/demo.User/logout", login_req("demo", ""))
    c.close()
    assert r.grpc_status == 0
    assert pb_decode(r.messages[0])[2] == b"goodbye, demo"


def test_300_calls_on_one_http2_connection_reach_every_replica(proxy, replicas):
    c = HTTP2(proxy.port)
    seen = collections.Counter()
    try:
        for _ in range(300):
            r = c.call("/demo.User/login", login_req("demo", "demo123"))
            assert r.grpc_status == 0
            seen[pb_decode(r.messages[0])[3].decode()] += 1
    finally:
        c.close()
    assert set(seen) == {"r1", "r2", "r3"}, seen
    for name, count in seen.items():
        assert 85 <= count <= 115, seen


def test_calls_on_one_http1_connection_are_balanced_per_call(proxy):
    c = HTTP1(proxy.port)
    seen = collections.Counter()
    for _ in range(30):
        r = c.call("/demo.User/login", login_req("demo", "demo123"), text=True)
        seen[pb_decode(r.messages[0])[3].decode()] += 1
    c.close()
    assert sorted(seen.values()) == [10, 10, 10], seen


def test_concurrent_streams_on_one_http2_connection(proxy):
    c = HTTP2(proxy.port)
    try:
        sids = [c.start("/demo.Echo/Unary", {"content-type": "application/grpc-web+proto"}, frame(echo_req(f"m{i}", delay_ms=200)))
                for i in range(50)]
        started = time.monotonic()
        c.pump(lambda: all(c.streams[s]["ended"] for s in sids))
        elapsed = time.monotonic() - started
    finally:
        c.close()
    # 50 calls of 200 ms each, concurrently: far less than 50 × 200 ms.
    assert elapsed < 3, elapsed
    for i, sid in enumerate(sids):
        r = Reply(200, c.streams[sid]["headers"], c.streams[sid]["data"], text=False)
        assert pb_decode(r.messages[0])[1] == f"m{i}".encode()
        assert r.grpc_status == 0


@pytest.mark.parametrize("mode", MODES)
def test_server_stream_is_forwarded_as_it_arrives_over_http1(proxy, mode):
    c = HTTP1(proxy.port)
    start = time.monotonic()
    status, headers, chunks = c.stream("/demo.Echo/ServerStream", echo_req("tick", count=4, delay_ms=300), text=(mode == "text"))
    c.close()
    assert status == 200
    assert headers.get("transfer-encoding") == "chunked"
    first_at = chunks[0][0] - start
    last_at = chunks[-1][0] - start
    assert first_at < 0.9, f"first message after {first_at:.2f}s: buffered"
    assert last_at >= 1.1
    r = Reply(200, headers, b"".join(d for _, d in chunks), text=(mode == "text"))
    assert [pb_decode(m)[3] if 3 in pb_decode(m) else 0 for m in r.messages] == [0, 1, 2, 3]
    assert r.grpc_status == 0


def test_server_stream_over_http2_ends_without_trailers_frame(proxy):
    c = HTTP2(proxy.port)
    try:
        start = time.monotonic()
        sid = c.start("/demo.Echo/ServerStream", {"content-type": "application/grpc-web+proto"}, frame(echo_req("s", count=3, delay_ms=300)))
        s = c.finish(sid)
    finally:
        c.close()
    assert s["times"][0][0] - start < 0.8
    assert s["trailers"] is None, "no HTTP/2 trailers go to a gRPC-Web client"
    assert s["reset"] is None
    r = Reply(200, s["headers"], s["data"], text=False)
    assert len(r.messages) == 3 and r.grpc_status == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_metadata_round_trips_including_bin(proxy, transport):
    c = client(transport, proxy.port)
    raw = bytes(range(0, 256, 7))
    b64 = base64.b64encode(raw).decode()
    try:
        r = c.call("/demo.Echo/Unary", echo_req("m"), headers={"x-echo-name": "value", "x-echo-data-bin": b64, "x-trailer-t": "tv"})
    finally:
        c.close()
    assert r.grpc_status == 0
    assert r.headers["x-echo-name"] == "value"
    assert base64.b64decode(r.headers["x-echo-data-bin"] + "==") == raw
    assert r.trailers["x-trailer-t"] == "tv"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_error_with_trailing_metadata_after_messages(proxy, transport):
    c = client(transport, proxy.port)
    try:
        r = c.call("/demo.Echo/ServerStream", echo_req("x", count=2, fail_code=9, fail_message="100% broken: é"), text=True)
    finally:
        c.close()
    assert len(r.messages) == 2
    assert r.grpc_status == 9
    assert r.grpc_message == "100%25 broken: %C3%A9"


def test_deadline_before_response_is_504_unavailable(proxy):
    c = HTTP1(proxy.port)
    start = time.monotonic()
    r = c.call("/demo.Echo/Unary", echo_req("slow", delay_ms=3000), headers={"grpc-timeout": "300m"})
    c.close()
    assert time.monotonic() - start < 2
    assert r.status == 504
    assert r.grpc_status == 14


def test_deadline_after_stream_started_ends_with_deadline_exceeded(proxy):
    c = HTTP2(proxy.port)
    try:
        start = time.monotonic()
        sid = c.start("/demo.Echo/ServerStream", {"content-type": "application/grpc-web+proto", "grpc-timeout": "700m"},
                      frame(echo_req("s", count=10, delay_ms=250)))
        s = c.finish(sid)
    finally:
        c.close()
    assert time.monotonic() - start < 2
    assert s["reset"] is None
    r = Reply(200, s["headers"], s["data"], text=False)
    assert 1 <= len(r.messages) < 10
    assert r.grpc_status == 4, r


def test_route_timeout_applies_and_legacy_max_grpc_timeout_rewrites_header(proxy):
    c = HTTP1(proxy.port)
    r = c.call("/routetimeout/demo.Echo/Unary", echo_req("slow", delay_ms=2000))
    assert r.status == 504 and r.grpc_status == 14 and r.grpc_message == "upstream request timeout"
    r = c.call("/legacy/demo.Echo/Unary", echo_req("slow", delay_ms=2000), headers={"grpc-timeout": "1S"})
    assert r.status == 504
    r = c.call("/legacy/demo.Echo/Unary", echo_req("quick", delay_ms=50), headers={"grpc-timeout": "1S"})
    assert r.grpc_status == 0
    c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dead_backend_is_unavailable_with_a_reason(proxy, transport):
    c = client(transport, proxy.port)
    try:
        r = c.call("/dead/demo.User/login", login_req("demo", "demo123"), headers={"origin": "http://app.example"})
    finally:
        c.close()
    assert r.status == 503
    assert r.grpc_status == 14
    # Envoy 1.40's words, then the cause in words (never an errno).
    assert r.grpc_message == ("upstream connect error or disconnect/reset before headers. reset reason: "
                              "remote connection failure, connection refused"), r.grpc_message
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    assert "grpc-status" in r.headers["access-control-expose-headers"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_backend_that_never_accepts_is_a_connection_timeout(transport):
    """A listener whose accept queue is full (backlog 0, one connection waiting) drops the next
    SYNs, so the proxy's connect times out at the cluster's connect_timeout (0.5 s): Envoy 1.40
    names that reset reason `connection timeout`."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    filler = socket.create_connection(silent.getsockname())
    port = free_port()
    p = start_proxy(config(port, {"users": [silent.getsockname()[1]], "dead": [free_port()]}, ROUTES), port)
    c = client(transport, port)
    try:
        started = time.monotonic()
        r = c.call("/demo.User/login", login_req("demo", "demo123"))
        took = time.monotonic() - started
    finally:
        c.close()
        p.stop()
        filler.close()
        silent.close()
    assert (r.status, r.grpc_status) == (503, 14)
    assert r.grpc_message == ("upstream connect error or disconnect/reset before headers. reset reason: "
                              "connection timeout"), r.grpc_message
    assert 0.4 < took < 3, f"answered after {took:.2f} s, not at the 0.5 s connect_timeout"


def test_no_route_is_404_and_direct_response(proxy):
    c = HTTP1(proxy.port)
    r = c.call("/nowhere.Service/Method", b"")
    assert r.status == 404 and r.grpc_status is None
    status, headers, body = c.request("GET", "/grpc.reflection.v1/x")
    assert status == 403 and body == b"reflection is off"
    c.close()


def test_bad_base64_is_400_and_the_connection_keeps_serving(proxy):
    c = HTTP1(proxy.port)
    r = c.call("/demo.User/login", b"", text=True, raw_body=b"AAAA*AAA")
    assert r.status == 400 and r.grpc_status == 13
    assert r.grpc_message == "Bad gRPC-web request, invalid base64 data."
    r = c.call("/demo.User/login", b"", text=True, raw_body=b"AAAAA")
    assert r.status == 400 and r.grpc_status == 13
    r = c.call("/demo.User/login", login_req("demo", "demo123"), text=True)
    assert r.grpc_status == 0
    c.close()


def test_padded_segments_and_byte_by_byte_text_request_over_http2(proxy):
    payload = frame(login_req("demo", "demo123"))
    # Two separately padded segments: the frame header, then the message.
    body = base64.b64encode(payload[:5]) + base64.b64encode(payload[5:])
    c = HTTP2(proxy.port)
    try:
        sid = c.start("/demo.User/login", {"content-type": "application/grpc-web-text"}, end=False)
        for i in range(len(body)):
            c.send(sid, body[i:i + 1])
        c.send(sid, b"", end=True)
        s = c.finish(sid)
    finally:
        c.close()
    r = Reply(200, s["headers"], s["data"], text=False)
    assert r.grpc_status == 0 and pb_decode(r.messages[0])[2] == b"welcome, demo"


def test_truncated_binary_frame_gets_a_clear_error(proxy):
    c = HTTP1(proxy.port)
    r = c.call("/demo.User/login", b"", raw_body=frame(login_req("demo", "demo123"))[:-3])
    c.close()
    assert r.grpc_status not in (None, 0)


def test_cors_preflight_is_answered_locally(proxy):
    c = HTTP1(proxy.port)
    status, headers, body = c.request("OPTIONS", "/demo.User/login", headers={
        "origin": "http://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-grpc-web"})
    assert status == 200 and body == b""
    assert headers["access-control-allow-origin"] == "http://app.example"
    assert headers["access-control-allow-methods"] == "POST, OPTIONS"
    assert "x-grpc-web" in headers["access-control-allow-headers"]
    assert headers["access-control-max-age"] == "600"
    r = c.call("/demo.User/login", login_req("demo", "demo123"), headers={"origin": "http://app.example"})
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    assert r.headers["access-control-expose-headers"] == "grpc-status,grpc-message,x-replica"
    r = c.call("/demo.User/login", login_req("demo", "demo123"), headers={"origin": "http://other.example"})
    assert "access-control-allow-origin" not in r.headers
    c.close()


# --- native gRPC through the same listener ----------------------------------------------------------


def native(c, path, messages, end=True):
    sid = c.start(path, {"content-type": "application/grpc", "te": "trailers"}, b"".join(frame(m) for m in messages), end=end)
    return sid


def test_native_grpc_unary_and_trailers_only(proxy):
    c = HTTP2(proxy.port)
    try:
        s = c.finish(native(c, "/demo.User/login", [login_req("demo", "demo123")]))
        assert s["headers"]["content-type"] == "application/grpc"
        assert s["trailers"]["grpc-status"] == "0"
        s = c.finish(native(c, "/demo.User/login", [login_req("demo", "bad")]))
        # Trailers-only: the status is in the one HEADERS frame, and no DATA follows.
        assert s["headers"]["grpc-status"] == "16" and s["trailers"] is None and s["data"] == b""
    finally:
        c.close()


def test_native_grpc_client_server_and_bidi_streaming(proxy):
    c = HTTP2(proxy.port)
    try:
        sid = native(c, "/demo.Echo/ClientStream", [echo_req("a")], end=False)
        c.send(sid, frame(echo_req("b")))
        c.send(sid, frame(echo_req("c")), end=True)
        s = c.finish(sid)
        r = Reply(200, {}, s["data"], text=False)
        assert pb_decode(r.messages[0])[1] == b"a,b,c" and s["trailers"]["grpc-status"] == "0"

        sid = native(c, "/demo.Echo/ServerStream", [echo_req("s", count=3, delay_ms=50)])
        s = c.finish(sid)
        r = Reply(200, {}, s["data"], text=False)
        assert len(r.messages) == 3 and s["trailers"]["grpc-status"] == "0"

        sid = native(c, "/demo.Echo/BidiStream", [echo_req("x")], end=False)
        c.pump(lambda: len(c.streams[sid]["data"]) > 5)
        c.send(sid, frame(echo_req("y")), end=True)
        s = c.finish(sid)
        r = Reply(200, {}, s["data"], text=False)
        assert [pb_decode(m)[1] for m in r.messages] == [b"x", b"y"]
    finally:
        c.close()


def test_native_grpc_to_dead_backend_is_trailers_only_unavailable(proxy):
    c = HTTP2(proxy.port)
    try:
        s = c.finish(native(c, "/dead/demo.User/login", [login_req("demo", "demo123")]))
    finally:
        c.close()
    assert s["headers"][":status"] == "200"
    assert s["headers"]["grpc-status"] == "14"


# --- failures of the backend itself ---------------------------------------------------------------


def test_backend_killed_mid_stream_ends_the_call_with_unavailable():
    replica = Replica("doomed", free_port())
    port = free_port()
    p = start_proxy(config(port, {"users": [replica.port], "dead": [free_port()]}, ROUTES), port)
    try:
        c = HTTP2(port)
        sid = c.start("/demo.Echo/ServerStream", {"content-type": "application/grpc-web+proto"}, frame(echo_req("s", count=100, delay_ms=100)))
        c.pump(lambda: len(c.streams[sid]["data"]) > 0)
        replica.stop(kill=True)
        start = time.monotonic()
        s = c.finish(sid)
        assert time.monotonic() - start < 2
        r = Reply(200, s["headers"], s["data"], text=False)
        assert r.grpc_status == 14, r
        # And the next call fails fast, not after a hang.
        r = c.call("/demo.User/login", login_req("demo", "demo123"))
        assert r.grpc_status == 14 and r.status == 503
        c.close()
    finally:
        p.stop()
        replica.stop()


def test_backend_started_after_the_proxy_is_picked_up():
    backend_port = free_port()
    port = free_port()
    p = start_proxy(config(port, {"users": [backend_port], "dead": [free_port()]}, ROUTES), port)
    try:
        c = HTTP1(port)
        assert c.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 14
        replica = Replica("late", backend_port)
        try:
            assert c.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0
        finally:
            replica.stop()
        c.close()
    finally:
        p.stop()


# --- the command line -------------------------------------------------------------------------------


def test_validate_mode(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(config(8080, {"users": [50051], "dead": [1]}, ROUTES))
    out = subprocess.run([str(PROXY_BIN), "--mode", "validate", "-c", str(good)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(config(8080, {"users": [50051], "dead": [1]}, ROUTES).replace("connect_timeout: 0.5s", "connect_timeout: 500ms", 1))
    out = subprocess.run([str(PROXY_BIN), "--mode", "validate", "-c", str(bad)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "bad.yaml:" in out.stderr and "static_resources.clusters[0].connect_timeout" in out.stderr
    assert "'500ms' is not a duration" in out.stderr


def test_embedded_default_serves_the_user_service():
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(unprivileged([PROXY_BIN, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc)
        c = HTTP1(port)
        r = c.call("/demo.User/login", login_req("admin", "123456"), text=True, headers={"origin": "http://localhost:3000"})
        assert r.grpc_status == 0
        assert pb_decode(r.messages[0])[3] == b"embedded"
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        # The demo page, on the same origin, with the types a browser needs for ES modules.
        status, headers, body = c.request("GET", "/")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert body == (ROOT / "web-demo" / "index.html").read_bytes()
        status, headers, body = c.request("GET", "/grpc-web.js")
        assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
        assert body == (ROOT / "web-demo" / "grpc-web.js").read_bytes()
        assert c.request("GET", "/favicon.ico")[0] == 204
        c.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5) as ready:
            assert ready.status == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "curl" in out and f"open http://127.0.0.1:{port}/ in a browser" in out
    assert proc.returncode == 0, out


def test_strict_dns_cluster_resolves_and_balances(replicas):
    port = free_port()
    text = config(port, {"users": [r.port for r in replicas], "dead": [free_port()]}, ROUTES)
    listeners, clusters = text.split("  clusters:")
    clusters = clusters.replace("type: STATIC", "type: STRICT_DNS\n    dns_refresh_rate: 0.2s\n    dns_lookup_family: V4_ONLY")
    clusters = clusters.replace("address: 127.0.0.1", "address: localhost")
    p = start_proxy(listeners + "  clusters:" + clusters, port)
    try:
        time.sleep(0.5)  # a few refreshes: the endpoint set must stay the same
        c = HTTP2(port)
        seen = collections.Counter()
        for _ in range(30):
            r = c.call("/demo.User/login", login_req("demo", "demo123"))
            assert r.grpc_status == 0, r
            seen[pb_decode(r.messages[0])[3].decode()] += 1
        c.close()
        assert sorted(seen.values()) == [10, 10, 10], seen
    finally:
        p.stop()


class LateBackend:
    """An HTTP/2 backend written frame by frame: it holds its answers until told, then sends
    them even for streams the proxy has reset meanwhile (as a busy server does when the reset
    crosses its response on the wire), and from then on answers at once."""

    def __init__(self):
        import threading
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.held, self.resets = [], 0
        self.released = False
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        import threading
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        import hpack
        from hyperframe.frame import Frame
        encoder = hpack.Encoder()
        data = b""
        while len(data) < 24:
            data += conn.recv(65536)
        data = data[24:]
        conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # empty SETTINGS
        while True:
            while len(data) >= 9:
                f, length = Frame.parse_frame_header(memoryview(data[:9]))
                if len(data) < 9 + length:
                    break
                f.parse_body(memoryview(data[9:9 + length]))
                data = data[9 + length:]
                kind = type(f).__name__
                with self.lock:
                    if kind == "SettingsFrame" and "ACK" not in f.flags:
                        conn.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
                    elif kind == "RstStreamFrame":
                        self.resets += 1
                    elif kind == "DataFrame" and "END_STREAM" in f.flags:
                        if self.released:
                            self.answer(conn, encoder, f.stream_id)
                        else:
                            self.held.append((conn, encoder, f.stream_id))
            more = conn.recv(65536)
            if not more:
                return
            data += more

    @staticmethod
    def answer(conn, encoder, stream_id):
        from hyperframe.frame import DataFrame, HeadersFrame
        h = HeadersFrame(stream_id, encoder.encode([(":status", "200"), ("content-type", "application/grpc")]))
        h.flags.add("END_HEADERS")
        d = DataFrame(stream_id, frame(b"\x0a\x02ok"))
        t = HeadersFrame(stream_id, encoder.encode([("grpc-status", "0")]))
        t.flags.add("END_HEADERS")
        t.flags.add("END_STREAM")
        conn.sendall(h.serialize() + d.serialize() + t.serialize())

    def send_held(self):
        with self.lock:
            for held in self.held:
                self.answer(*held)
            self.held.clear()
            self.released = True


def test_answers_for_calls_whose_clients_vanished_do_not_wedge_the_upstream():
    backend = LateBackend()
    port = free_port()
    p = start_proxy(config(port, {"users": [backend.port], "dead": [free_port()]}, ROUTES), port)
    try:
        body = frame(b"\x0a\x03abc")
        request = (f"POST /demo.Echo/Unary HTTP/1.1\r\nhost: x\r\ncontent-type: application/grpc-web+proto\r\n"
                   f"content-length: {len(body)}\r\n\r\n").encode() + body
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        for s in socks:
            s.sendall(request)
        deadline = time.monotonic() + 10
        while len(backend.held) < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(backend.held) == 100
        for s in socks:
            s.close()
        while backend.resets < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.resets == 100, "the proxy resets the streams of calls whose clients left"
        backend.send_held()
        c = HTTP2(port, timeout=5)
        for _ in range(5):
            r = c.call("/demo.Echo/Unary", b"\x0a\x01x")
            assert r.status == 200 and r.grpc_status == 0, r
        c.close()
    finally:
        p.stop()


def test_early_reply_on_http2_stops_the_client_sending_and_the_connection_serves_on(proxy):
    c = HTTP2(proxy.port)
    try:
        sid = c.start("/demo.User/login", {"content-type": "application/grpc-web-text"}, b"AA*A", end=False)
        s = c.finish(sid)
        assert s["headers"][":status"] == "400" and s["headers"]["grpc-status"] == "13"
        # The client had not finished its body: the proxy tells it to stop (RST_STREAM NO_ERROR).
        c.pump(lambda: c.streams[sid]["reset"] is not None, deadline=time.monotonic() + 2)
        assert c.streams[sid]["reset"] == 0
        r = c.call("/demo.User/login", login_req("demo", "demo123"))
        assert r.grpc_status == 0
    finally:
        c.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_slow_client_gets_every_byte_of_a_large_stream(proxy, mode):
    """20 messages of 512 KiB, far more than socket buffers hold: while the client does not
    read, the proxy stops giving the backend window; when it reads again, the stream resumes."""
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
    text = mode == "text"
    body = base64.b64encode(frame(echo_req("big", count=20, pad_bytes=512 * 1024))) if text else frame(echo_req("big", count=20, pad_bytes=512 * 1024))
    ctype = "application/grpc-web-text" if text else "application/grpc-web+proto"
    accept = "accept: application/grpc-web-text\r\n" if text else ""
    s.sendall(f"POST /demo.Echo/ServerStream HTTP/1.1\r\nhost: x\r\ncontent-type: {ctype}\r\n{accept}"
              f"content-length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(2)
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):
        chunk = s.recv(1 << 20)
        assert chunk, "connection closed before the stream ended"
        data += chunk
    s.close()
    head, _, chunked = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    payload, rest = b"", chunked
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        payload, rest = payload + rest[:size], rest[size + 2:]
    r = Reply(200, {}, payload, text=text)
    assert len(r.messages) == 20
    assert all(len(pb_decode(m)[4]) == 512 * 1024 for m in r.messages)
    assert r.grpc_status == 0
