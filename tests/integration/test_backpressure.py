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


def test_a_client_that_withheld_window_gets_the_whole_response_when_it_reads_again(replicas):
    """The other half of the test above: the proxy stopped giving the backend window while the
    client took nothing; once the client reads, the proxy must give it back, however many
    writes the held response takes to go out, or the call hangs with the backend waiting for
    window. 64 messages of 64 KiB (4 MiB, four times the buffer limit), read after 2 s."""
    port = free_port()
    p = start_proxy(config(port, {"users": [r.port for r in replicas]}, ROUTES, cors=False), port)
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(0.2)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                                (":path", "/demo.Echo/ServerStream")] + list(grpc_web_headers(False).items()))
        conn.send_data(sid, frame(echo_req("m", count=64, pad_bytes=65536)), end_stream=True)
        sock.sendall(conn.data_to_send())
        held = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # only HTTP/2's first 64 KiB of window
            events = pump(sock, conn)
            assert events is not None, "the proxy closed the connection"
            held += [e for e in events if isinstance(e, h2.events.DataReceived)]
        # Then it reads as an ordinary client does: window back for what it took, 64 KiB at most
        # in flight, so the held response goes out frame by frame.
        body = bytearray(b"".join(e.data for e in held))
        for e in held:
            conn.acknowledge_received_data(e.flow_controlled_length, sid)
        sock.sendall(conn.data_to_send())
        deadline, ended = time.monotonic() + 20, False
        while not ended and time.monotonic() < deadline:
            events = pump(sock, conn)
            assert events is not None, "the proxy closed the connection"
            for e in events:
                if isinstance(e, h2.events.DataReceived):
                    body += e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, sid)
                ended = ended or isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
            sock.sendall(conn.data_to_send())
        sock.close()
        messages, i = 0, 0
        while i + 5 <= len(body) and body[i] == 0:
            i += 5 + int.from_bytes(body[i + 1:i + 5], "big")
            messages += 1
        assert "grpc-status:0" in body[i:].decode("latin-1"), f"no OK status after {messages} messages ({len(body)} bytes)"
        assert messages == 64, messages
    finally:
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


def pump(sock, conn):
    """One read from the socket through the client's state machine (whose answers, such as
    SETTINGS acknowledgements, go back at once): its events, [] on a timeout, None at EOF."""
    try:
        data = sock.recv(1 << 20)
    except socket.timeout:
        return []
    if not data:
        return None
    events = conn.receive_data(data)
    sock.sendall(conn.data_to_send())
    return events


def send_before_reading(port, messages, seconds):
    """A native gRPC bidi stream whose client sends its whole body before it reads any of the
    echoes: it gives the response no window beyond HTTP/2's first 64 KiB. Returns the
    connection, the bytes sent and the bytes there were to send."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(0.2)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                            (":path", "/demo.Echo/BidiStream"), ("content-type", "application/grpc"), ("te", "trailers")])
    body = b"".join(frame(echo_req("m" * 32768)) for _ in range(messages))
    sent, held = 0, []
    deadline = time.monotonic() + seconds
    while sent < len(body) and time.monotonic() < deadline:
        window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if window > 0:
            chunk = body[sent:sent + window]
            sent += len(chunk)
            conn.send_data(sid, chunk, end_stream=sent == len(body))
            sock.sendall(conn.data_to_send())
            continue
        events = pump(sock, conn)  # window updates; response data is not acknowledged
        if events is None:
            break
        held += [e for e in events if isinstance(e, h2.events.DataReceived)]
    return sock, conn, sid, sent, len(body), held


def read_all(sock, conn, held, seconds=30):
    """Reads the response, now giving it all the window it can use; returns (body, trailers)."""
    body, trailers = bytearray(), {}
    for event in held:
        body += event.data
    sid = held[0].stream_id if held else 1
    conn.increment_flow_control_window(1 << 30)
    conn.increment_flow_control_window(1 << 30, sid)
    sock.sendall(conn.data_to_send())
    sock.settimeout(0.5)
    deadline = time.monotonic() + seconds
    ended = False
    while not ended and time.monotonic() < deadline:
        events = pump(sock, conn)
        if events is None:
            break
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                body += event.data
            elif isinstance(event, h2.events.TrailersReceived):
                trailers = dict(event.headers)
            if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                ended = True
    return bytes(body), trailers


def test_a_client_that_sends_its_whole_body_before_reading(replicas):
    """An HTTP/2 client may send a stream's whole window of request body before the proxy has
    passed any of it on: that window is what the proxy may have to hold for it. By default it is
    1 MiB (Envoy's is 256 MiB), so a client that sends 8 MiB before reading a bidi stream's echoes
    stalls, with the proxy's memory bounded; an operator who wants Envoy's behaviour sets
    `http2_protocol_options.initial_stream_window_size`, and then the same client completes with
    every echo."""
    messages = 256  # 8 MiB of request in 32 KiB messages, each echoed back
    bounded = free_port()
    p = start_proxy(config(bounded, {"users": [r.port for r in replicas]}, ROUTES, cors=False), bounded)
    try:
        sock, _, _, sent, total, _ = send_before_reading(bounded, messages, seconds=4)
        sock.close()
        print(f"default window: the client sent {sent / MIB:.1f} MiB of {total / MIB:.1f} before stalling")
        assert sent < total, "with the default 1 MiB window the proxy does not take 8 MiB it cannot pass on"
    finally:
        p.stop()

    wide = free_port()
    text = config(wide, {"users": [r.port for r in replicas]}, ROUTES, cors=False)
    extra = "\n          http2_protocol_options: { initial_stream_window_size: 16777216, initial_connection_window_size: 33554432 }"
    text = text.replace("codec_type: AUTO", "codec_type: AUTO" + extra, 1)
    assert extra in text
    p = start_proxy(text, wide)
    try:
        sock, conn, _, sent, total, held = send_before_reading(wide, messages, seconds=10)
        assert sent == total, f"the client could send only {sent / MIB:.1f} MiB of {total / MIB:.1f}"
        body, trailers = read_all(sock, conn, held)
        sock.close()
        echoes = 0
        i = 0
        while i + 5 <= len(body):
            length = int.from_bytes(body[i + 1:i + 5], "big")
            i += 5 + length
            echoes += 1
        assert (echoes, trailers.get("grpc-status")) == (messages, "0"), (echoes, trailers)
    finally:
        p.stop()
