"""A scripted HTTP/2 cleartext gRPC backend for tests that need to see or shape what the proxy
sends upstream."""

import socket
import threading

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from grpcweb import frame


class EarlyAnswerBackend:
    """HTTP/2 cleartext gRPC backend that echoes the first request message back as soon as it has
    it, then resets the stream with NO_ERROR if the request has not ended. It records how each
    request ended and what it sent."""

    def __init__(self, read_body=True):
        # read_body=False: a backend that never takes the request body (no WINDOW_UPDATE), so
        # the proxy can send it 64 KiB and no more.
        self.read_body = read_body
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.connections = 0
        self.goaways = []          # error codes of GOAWAY frames the proxy sent
        self.end_with_data = 0     # requests whose END_STREAM came on the DATA frame with the message
        self.end_separate = 0      # requests ended by an empty DATA frame (or trailers) after it
        self.resets_sent = 0
        self.answered = 0
        self.requests = []         # the request headers of every stream, as dicts
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        bodies, ended, answered = {}, set(), set()
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    return
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        with self.lock:
                            self.requests.append(dict(event.headers))
                        bodies[event.stream_id] = bytearray()
                        if event.stream_ended:
                            ended.add(event.stream_id)
                    elif isinstance(event, h2.events.DataReceived):
                        sid = event.stream_id
                        if self.read_body:
                            conn.acknowledge_received_data(event.flow_controlled_length, sid)
                        bodies.setdefault(sid, bytearray()).extend(event.data)
                        if event.stream_ended:
                            ended.add(sid)
                            with self.lock:
                                if event.data:
                                    self.end_with_data += 1
                                else:
                                    self.end_separate += 1
                        body = bodies[sid]
                        if sid not in answered and len(body) >= 5 and len(body) >= 5 + int.from_bytes(body[1:5], "big"):
                            answered.add(sid)
                            self._answer(conn, sid, bytes(body[5:5 + int.from_bytes(body[1:5], "big")]), sid not in ended)
                    elif isinstance(event, h2.events.TrailersReceived):
                        ended.add(event.stream_id)
                        with self.lock:
                            self.end_separate += 1
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        with self.lock:
                            self.goaways.append(event.error_code)
                sock.sendall(conn.data_to_send())
        except OSError:
            return
        finally:
            sock.close()

    def _answer(self, conn, sid, message, reset):
        conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        conn.send_data(sid, frame(message))
        conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
        with self.lock:
            self.answered += 1
        if reset:
            try:
                conn.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.StreamClosedError:
                # The request's END_STREAM came in the same read as its message (h2 has already
                # closed the stream): there is nothing left to reset.
                return
            with self.lock:
                self.resets_sent += 1

    def close(self):
        self.listener.close()
