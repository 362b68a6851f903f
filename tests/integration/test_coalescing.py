"""Response DATA is coalesced per stream and event-loop tick on the way to an HTTP/2 client: small
messages share a frame, a large one goes as it came. Whatever the mix, the client gets every
byte, in order, then the status."""

import socket
import threading

import h2.config
import h2.connection
import h2.events

from conftest import config, free_port, start_proxy
from grpcweb import HTTP1, HTTP2, frame, grpc_web_body, grpc_web_headers, parse_frames

# Sizes straddling the 16 KiB threshold, small and large interleaved.
SIZES = [100, 40_000, 10, 20_000, 50, 16_383, 16_384, 3, 70_000, 1]


def message(i, size):
    return bytes([65 + i % 26]) * size


class BurstBackend:
    """Answers every call with SIZES messages as separate DATA frames, all in one write, then
    grpc-status 0."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 17})
        sock.sendall(conn.data_to_send())
        with sock:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded):
                        sid = event.stream_id
                        conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
                        for i, size in enumerate(SIZES):
                            body = frame(message(i, size))
                            for start in range(0, len(body), 16_384):
                                conn.send_data(sid, body[start:start + 16_384])
                        conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
                sock.sendall(conn.data_to_send())


def test_mixed_message_sizes_arrive_whole_and_in_order():
    backend = BurstBackend()
    port = free_port()
    routes = """
              - match: { prefix: "/" }
                route: { cluster: burst, timeout: 0s }"""
    proxy = start_proxy(config(port, {"burst": [backend.port]}, routes), port)
    try:
        expected = [message(i, size) for i, size in enumerate(SIZES)]
        h2 = HTTP2(port)
        for _ in range(3):
            sid = h2.start("/x.Y/Z", grpc_web_headers(False), grpc_web_body(b"", False))
            h2.pump(lambda: h2.streams[sid]["ended"])
            messages, trailers, leftover = parse_frames(h2.streams[sid]["data"])
            assert [len(m) for m in messages] == SIZES
            assert messages == expected and trailers == {"grpc-status": "0"} and leftover == b""
        h2.close()
        # The same over HTTP/1.1, which writes as it comes.
        reply = HTTP1(port).call("/x.Y/Z", b"")
        assert reply.messages == expected and reply.grpc_status == 0
    finally:
        proxy.stop()
