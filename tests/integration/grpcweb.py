"""Small gRPC-Web and gRPC clients for the integration tests.

Everything is written out by hand on purpose (protobuf fields, frames, base64 segments) so the
tests check the bytes on the wire rather than trust a library that would hide them.
"""

import base64
import http.client
import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

# --- protobuf (only what demo.User and demo.Echo use: strings, bytes, int32) -------------------


def _varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_encode(fields):
    """fields: list of (number, value) with str, bytes or int values."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, int):
            if value:
                out += _varint(number << 3) + _varint(value)
        else:
            data = value.encode() if isinstance(value, str) else value
            if data:
                out += _varint(number << 3 | 2) + _varint(len(data)) + data
    return bytes(out)


def pb_decode(data):
    """Returns {field number: value}, with length-delimited values as bytes."""
    fields = {}
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 2:
            length, i = _read_varint(data, i)
            value, i = data[i:i + length], i + length
        else:
            raise ValueError(f"wire type {wire}")
        fields[number] = value
    return fields


def _read_varint(data, i):
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def login_req(username, password):
    return pb_encode([(1, username), (2, password)])


def echo_req(message="", fail_code=0, fail_message="", delay_ms=0, count=0, pad_bytes=0):
    return pb_encode([(1, message), (2, fail_code), (3, fail_message), (4, delay_ms), (5, count), (6, pad_bytes)])


# --- gRPC-Web framing ----------------------------------------------------------------------------


def frame(payload, flag=0):
    return struct.pack(">BI", flag, len(payload)) + payload


def decode_text_body(body):
    """A grpc-web-text body is a concatenation of separately padded base64 segments."""
    out = bytearray()
    text = body.decode("ascii")
    start = 0
    for i, ch in enumerate(text):
        if ch == "=" and (i + 1 == len(text) or text[i + 1] != "="):
            out += base64.b64decode(text[start:i + 1])
            start = i + 1
    if start < len(text):
        out += base64.b64decode(text[start:])
    return bytes(out)


def parse_frames(data):
    """Returns (messages, trailers or None, leftover bytes)."""
    messages, trailers = [], None
    i = 0
    while i + 5 <= len(data):
        flag, length = struct.unpack(">BI", data[i:i + 5])
        if i + 5 + length > len(data):
            break
        payload = data[i + 5:i + 5 + length]
        if flag & 0x80:
            trailers = {}
            for line in payload.decode().split("\r\n"):
                if line:
                    k, v = line.split(":", 1)
                    trailers[k.strip().lower()] = v.strip()
        else:
            messages.append(payload)
        i += 5 + length
    return messages, trailers, data[i:]


class Reply:
    def __init__(self, status, headers, body, text):
        self.status = status
        self.headers = headers
        self.raw = body
        data = decode_text_body(body) if text and body else body
        self.messages, self.trailers, self.leftover = parse_frames(data)

    @property
    def grpc_status(self):
        if self.trailers and "grpc-status" in self.trailers:
            return int(self.trailers["grpc-status"])
        if "grpc-status" in self.headers:
            return int(self.headers["grpc-status"])
        return None

    @property
    def grpc_message(self):
        if self.trailers and "grpc-message" in self.trailers:
            return self.trailers["grpc-message"]
        return self.headers.get("grpc-message")

    def __repr__(self):
        return f"Reply({self.status}, {self.headers}, messages={self.messages}, trailers={self.trailers})"


def grpc_web_headers(text, extra=None):
    headers = {
        "content-type": "application/grpc-web-text" if text else "application/grpc-web+proto",
        "x-grpc-web": "1",
        "x-user-agent": "grpc-web-javascript/0.1",
    }
    if text:
        headers["accept"] = "application/grpc-web-text"
    headers.update(extra or {})
    return headers


def grpc_web_body(payload, text):
    body = frame(payload)
    return base64.b64encode(body) if text else body


# --- HTTP/1.1 -------------------------------------------------------------------------------------


class HTTP1:
    def __init__(self, port, host="127.0.0.1", timeout=10):
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def call(self, path, payload, text=False, headers=None, raw_body=None):
        body = raw_body if raw_body is not None else grpc_web_body(payload, text)
        self.conn.request("POST", path, body=body, headers=grpc_web_headers(text, headers))
        resp = self.conn.getresponse()
        data = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        return Reply(resp.status, hdrs, data, text=hdrs.get("content-type", "").startswith("application/grpc-web-text"))

    def request(self, method, path, headers=None, body=None):
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def stream(self, path, payload, text=False, headers=None):
        """Yields (arrival time, bytes) as the response body arrives."""
        self.conn.request("POST", path, body=grpc_web_body(payload, text), headers=grpc_web_headers(text, headers))
        resp = self.conn.getresponse()
        chunks = []
        while True:
            data = resp.read1(65536)
            if not data:
                break
            chunks.append((time.monotonic(), data))
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, chunks

    def close(self):
        self.conn.close()


# --- HTTP/2 (prior knowledge) ---------------------------------------------------------------------


class HTTP2:
    """A minimal HTTP/2 client: many streams on one connection, events recorded per stream."""

    def __init__(self, port, host="127.0.0.1", timeout=10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
        self.conn.increment_flow_control_window(1 << 24)
        self.sock.sendall(self.conn.data_to_send())
        self.streams = {}
        self.timeout = timeout
        self.goaway = None

    def start(self, path, headers, body=b"", end=True, method="POST"):
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":scheme", "http"), (":authority", "localhost"), (":path", path)]
        hdrs += list(headers.items())
        self.conn.send_headers(sid, hdrs, end_stream=end and not body)
        if body:
            self.conn.send_data(sid, body, end_stream=end)
        self.sock.sendall(self.conn.data_to_send())
        self.streams[sid] = {"headers": None, "data": b"", "trailers": None, "ended": False, "reset": None, "times": []}
        return sid

    def send(self, sid, data, end=False):
        self.conn.send_data(sid, data, end_stream=end)
        self.sock.sendall(self.conn.data_to_send())

    def pump(self, until, deadline=None):
        deadline = deadline or time.monotonic() + self.timeout
        while not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("HTTP/2 response did not complete in time")
            self.sock.settimeout(remaining)
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("connection closed")
            for event in self.conn.receive_data(data):
                s = self.streams.get(getattr(event, "stream_id", None))
                if isinstance(event, h2.events.ResponseReceived):
                    s["headers"] = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    s["data"] += event.data
                    s["times"].append((time.monotonic(), event.data))
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    s["trailers"] = dict(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    s["ended"] = True
                elif isinstance(event, h2.events.StreamReset):
                    s["reset"] = event.error_code
                    s["ended"] = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.goaway = event
                    if event.error_code == 0:
                        # A graceful GOAWAY: streams up to its last stream id still get their
                        # responses (RFC 9113, 6.8), as browsers read them. h2 closes its
                        # connection state on any GOAWAY and would refuse those frames.
                        self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
            self.sock.sendall(self.conn.data_to_send())

    def finish(self, sid):
        self.pump(lambda: self.streams[sid]["ended"])
        return self.streams[sid]

    def call(self, path, payload, text=False, headers=None):
        sid = self.start(path, grpc_web_headers(text, headers), grpc_web_body(payload, text))
        s = self.finish(sid)
        hdrs = dict(s["headers"] or {})
        status = int(hdrs.pop(":status", 0))
        reply = Reply(status, hdrs, s["data"], text=hdrs.get("content-type", "").startswith("application/grpc-web-text"))
        reply.http2_trailers = s["trailers"]
        reply.reset = s["reset"]
        return reply

    def close(self):
        try:
            self.conn.close_connection()
            self.sock.sendall(self.conn.data_to_send())
        except Exception:
            pass
        self.sock.close()
