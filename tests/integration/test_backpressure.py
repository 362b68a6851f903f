"""Backpressure end to end: a side that does not read costs the proxy a bounded amount of memory,
whatever the other side sends, on HTTP/1.1 and HTTP/2 (the listener's
per_connection_buffer_limit_bytes, 1 MiB by default, plus one HTTP/2 stream window)."""

import socket
import time

import h2.config
import h2.connection
import h2.events

from conftest import config, free_port, start_proxy
from grpcweb import echo_req, frame, grpc_web_headers
from scripted_backend import EarlyAnswerBackend

ROUTES = """
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 0s }"""
MIB = 1 << 20


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_http2_clients_that_withhold_window_do_not_make_the_proxy_hold_the_response(replicas):
    """Five h2c clients each ask for 1000 messages of 64 KiB (the issue's StreamRequest) and
    never send WINDOW_UPDATE. The proxy stops taking the response from the backend instead of
    holding it: at most its buffer limit and an upstream stream window each."""
    port = free_port()
    p = start_proxy(config(port, {"users": [r.port for r in replicas]}, ROUTES, cors=False), port)
    socks = []
    try:
        before = rss(p.proc.pid)
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", port))
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            headers = [(":method", "POST"), (":scheme", "http"), (":authority", "x"), (":path", "/demo.Echo/ServerStream")]
            conn.send_headers(sid, headers + list(grpc_web_headers(False).items()))
            conn.send_data(sid, frame(echo_req("m", count=1000, pad_bytes=65536)), end_stream=True)
            sock.sendall(conn.data_to_send())
            socks.append(sock)
        time.sleep(4)
        grown = rss(p.proc.pid) - before
        print(f"proxy RSS grew {grown / MIB:.1f} MiB for 5 clients withholding window")
        assert grown < 40 * MIB, f"the proxy grew {grown / MIB:.1f} MiB"
    finally:
        for s in socks:
            s.close()
        p.stop()


def test_an_http1_upload_stops_being_read_when_the_backend_does_not_take_it():
    """A client uploads 100 MiB (Content-Length) to a backend that reads none of it. The proxy
    stops reading the socket once it holds its buffer limit; the client can only fill the
    kernel's buffers."""
    backend = EarlyAnswerBackend(read_body=False)
    port = free_port()
    p = start_proxy(config(port, {"users": [backend.port]}, ROUTES, cors=False), port)
    try:
        before = rss(p.proc.pid)
        total = 100 * MIB
        sock = socket.create_connection(("127.0.0.1", port))
        head = (f"POST /bench.Echo/Unary HTTP/1.1\r\nhost: x\r\ncontent-type: application/grpc-web+proto\r\n"
                f"x-grpc-web: 1\r\ncontent-length: {total}\r\n\r\n").encode()
        sock.sendall(head + frame(b"")[:1] + (total - 5).to_bytes(4, "big"))
        sock.settimeout(0.5)
        chunk = b"\0" * 65536
        sent = 5
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and sent < total:
            try:
                sent += sock.send(chunk)
            except socket.timeout:
                pass
        grown = rss(p.proc.pid) - before
        print(f"client sent {sent / MIB:.1f} MiB of 100; proxy RSS grew {grown / MIB:.1f} MiB")
        sock.close()
        assert sent < 32 * MIB, f"the proxy took {sent / MIB:.1f} MiB from a client whose backend reads nothing"
        assert grown < 16 * MIB, f"the proxy grew {grown / MIB:.1f} MiB"
    finally:
        p.stop()
        backend.close()
