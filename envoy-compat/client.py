"""Raw gRPC-Web clients that record exactly what a browser-side client would observe.

Two transports:

* :func:`h1_request` -- HTTP/1.1 over a plain socket.  The request is sent byte for byte as given
  (so a case controls chunking and timing), and the response is parsed by hand so that a clean
  terminating ``0\\r\\n\\r\\n`` chunk can be told apart from a connection that was cut.
* :func:`h2_request` -- HTTP/2 cleartext with prior knowledge, using ``h2``.  The request body is
  sent as exactly the DATA frames a case lists, optionally followed by request trailers, and the
  way the response ends is recorded: END_STREAM on a DATA frame (empty or not), on a trailers
  HEADERS frame, on the response HEADERS, or RST_STREAM / GOAWAY / connection close.

Both return a :class:`Response`; :func:`decode_grpc_web` turns its body into frames.
Every socket operation has a deadline, so nothing hangs.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import socket
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

DEFAULT_TIMEOUT = 5.0


# --------------------------------------------------------------------------- gRPC-Web framing


def grpc_frame(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@dataclasses.dataclass
class GrpcWebBody:
    frames: list[tuple[int, bytes]]  # every frame, trailer frame included, in order
    partial: bytes  # bytes after the last complete frame (a cut frame)
    segments: int | None  # text mode: number of separately padded base64 segments
    error: str | None  # text mode: not decodable

    @property
    def messages(self) -> list[tuple[int, bytes]]:
        return [(f, p) for f, p in self.frames if not f & 0x80]

    @property
    def trailer_frames(self) -> list[tuple[int, bytes]]:
        return [(f, p) for f, p in self.frames if f & 0x80]

    @property
    def trailer_raw(self) -> bytes | None:
        tf = self.trailer_frames
        return tf[-1][1] if tf else None

    @property
    def trailer(self) -> list[tuple[str, str]] | None:
        raw = self.trailer_raw
        if raw is None:
            return None
        return parse_trailer_block(raw)


def parse_trailer_block(raw: bytes) -> list[tuple[str, str]]:
    out = []
    for line in raw.decode("latin-1").split("\r\n"):
        if not line:
            continue
        k, _, v = line.partition(":")
        out.append((k, v))
    return out


def split_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    frames = []
    i = 0
    while len(data) - i >= 5:
        flag = data[i]
        n = int.from_bytes(data[i + 1 : i + 5], "big")
        if len(data) - i - 5 < n:
            break
        frames.append((flag, data[i + 5 : i + 5 + n]))
        i += 5 + n
    return frames, data[i:]


def decode_text_segments(body: bytes) -> tuple[list[bytes], str | None]:
    """Split a grpc-web-text body into separately padded base64 segments and decode each.

    A segment ends after a 4-char group that contains '=' or at the end of the body.
    """
    segs: list[bytes] = []
    if len(body) % 4:
        return segs, f"text body length {len(body)} is not a multiple of 4"
    start = 0
    for i in range(0, len(body), 4):
        group = body[i : i + 4]
        if b"=" in group or i + 4 == len(body):
            try:
                segs.append(base64.b64decode(body[start : i + 4], validate=True))
            except binascii.Error as e:
                return segs, f"bad base64 segment at {start}: {e}"
            start = i + 4
    return segs, None


def decode_grpc_web(body: bytes, content_type: str | None) -> GrpcWebBody:
    ct = (content_type or "").lower()
    if ct.startswith("application/grpc-web-text"):
        segs, err = decode_text_segments(body)
        frames, partial = split_frames(b"".join(segs))
        return GrpcWebBody(frames, partial, len(segs), err)
    frames, partial = split_frames(body)
    return GrpcWebBody(frames, partial, None, None)


# --------------------------------------------------------------------------- response record


@dataclasses.dataclass
class Response:
    transport: str
    status: int | None = None
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    # How the response ended, as the client saw it:
    #   "clean"   -- body complete (terminating chunk / content-length / END_STREAM)
    #   "reset"   -- connection cut mid-body (HTTP/1.1) or RST_STREAM / GOAWAY / close (HTTP/2)
    #   "timeout" -- nothing more arrived before the deadline
    #   "eof"     -- HTTP/1.1 body delimited by connection close (no length, not chunked)
    end: str = "timeout"
    http_trailers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    chunked: bool = False
    # HTTP/2 only: which frame carried END_STREAM ("headers", "data", "empty-data", "trailers")
    # or "rst:<code>", "goaway", "closed".
    h2_end: str | None = None
    h2_data_frames: list[int] = dataclasses.field(default_factory=list)  # sizes of DATA frames
    error: str | None = None
    graceful_goaway: bool = False  # HTTP/2: a GOAWAY(NO_ERROR) that still covered the stream arrived
    elapsed: float = 0.0  # seconds from sending the request headers to the end
    first_byte: float | None = None  # seconds until the response headers arrived

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def has(self, name: str) -> bool:
        return self.header(name) is not None

    @property
    def grpc(self) -> GrpcWebBody:
        return decode_grpc_web(self.body, self.header("content-type"))


# --------------------------------------------------------------------------- HTTP/1.1


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()
        self.eof = False
        self.consumed_body = bytearray()  # raw body bytes already taken out of buf
        self.in_body = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_until(self, sep: bytes) -> bytes | None:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                if self.in_body:
                    self.consumed_body += out
                return out
            if not self._fill():
                return None

    def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        if self.in_body:
            self.consumed_body += out
        return out

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out


def _parse_header_block(block: bytes) -> list[tuple[str, str]]:
    out = []
    for line in block.decode("latin-1").split("\r\n"):
        if not line:
            continue
        k, _, v = line.partition(":")
        out.append((k.strip().lower(), v.strip()))
    return out


def h1_request(
    port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes | list[bytes] = b"",
    *,
    host: str = "localhost",
    chunked: bool = False,
    content_length: bool = True,
    delay: float = 0.0,
    timeout: float = DEFAULT_TIMEOUT,
) -> Response:
    """Send one HTTP/1.1 request on a fresh connection and read one response.

    ``body`` may be a list of pieces; with ``chunked`` each piece becomes one chunk, otherwise the
    pieces are written separately (``delay`` seconds apart) under one content-length.
    """
    pieces = body if isinstance(body, list) else ([body] if body else [])
    total = b"".join(pieces)
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    head += [f"{k}: {v}" for k, v in headers]
    if chunked:
        head.append("Transfer-Encoding: chunked")
    elif content_length and (total or method not in ("GET", "HEAD", "OPTIONS")):
        head.append(f"Content-Length: {len(total)}")
    raw_head = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

    resp = Response(transport="h1")
    start = time.monotonic()
    deadline = start + timeout
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as e:
        resp.error = f"connect: {e}"
        resp.end = "reset"
        return resp
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(raw_head)
        for i, p in enumerate(pieces):
            if delay and i:
                time.sleep(delay)
            if chunked:
                sock.sendall(b"%x\r\n" % len(p) + p + b"\r\n")
            else:
                sock.sendall(p)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        _read_h1_response(sock, resp, method, deadline, start)
    except TimeoutError:
        resp.end = "timeout"
    except OSError as e:
        resp.error = f"{type(e).__name__}: {e}"
        resp.end = "reset"
    finally:
        resp.elapsed = time.monotonic() - start
        sock.close()
    return resp


def _dechunk_partial(raw: bytes) -> bytes:
    """Best-effort body from an incomplete chunked stream (used when the read timed out)."""
    out = bytearray()
    i = 0
    while True:
        j = raw.find(b"\r\n", i)
        if j < 0:
            break
        try:
            size = int(raw[i:j].split(b";")[0].strip() or b"0", 16)
        except ValueError:
            break
        if size == 0:
            break
        out += raw[j + 2 : j + 2 + size]
        i = j + 2 + size + 2
        if i > len(raw):
            break
    return bytes(out)


def _read_h1_response(sock, resp: Response, method: str, deadline: float, start: float):
    r = _Reader(sock, deadline)
    try:
        _read_h1_response_inner(r, resp, method, start)
    except TimeoutError:
        # Keep what arrived so a case can see e.g. the messages before a hang.
        if resp.status is not None and not resp.body:
            body_so_far = bytes(r.consumed_body) + bytes(r.buf)
            resp.body = _dechunk_partial(body_so_far) if resp.chunked else body_so_far
        raise


def _read_h1_response_inner(r: "_Reader", resp: Response, method: str, start: float):
    while True:
        block = r.read_until(b"\r\n\r\n")
        if block is None:
            resp.end = "reset"
            resp.error = "connection closed before response headers"
            return
        status_line, _, rest = block.partition(b"\r\n")
        parts = status_line.decode("latin-1").split(" ", 2)
        resp.status = int(parts[1])
        resp.headers = _parse_header_block(rest)
        if resp.first_byte is None:
            resp.first_byte = time.monotonic() - start
        if 100 <= resp.status < 200:
            continue
        break
    te = (resp.header("transfer-encoding") or "").lower()
    cl = resp.header("content-length")
    r.in_body = True
    resp.chunked = "chunked" in te
    if method == "HEAD" or resp.status in (204, 304):
        resp.end = "clean"
        return
    if "chunked" in te:
        resp.chunked = True
        body = bytearray()
        while True:
            line = r.read_until(b"\r\n")
            if line is None:
                resp.body = bytes(body)
                resp.end = "reset"
                return
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                # Trailer section: header lines until an empty line.
                trailers = bytearray()
                while True:
                    tline = r.read_until(b"\r\n")
                    if tline is None or tline == b"\r\n":
                        break
                    trailers += tline
                resp.body = bytes(body)
                resp.http_trailers = _parse_header_block(bytes(trailers))
                resp.end = "clean" if tline is not None else "reset"
                return
            chunk = r.read_exact(size + 2)
            if chunk is None:
                body += r.buf
                resp.body = bytes(body)
                resp.end = "reset"
                return
            body += chunk[:-2]
    elif cl is not None:
        n = int(cl)
        data = r.read_exact(n)
        if data is None:
            resp.body = bytes(r.buf)
            resp.end = "reset"
        else:
            resp.body = data
            resp.end = "clean"
    else:
        resp.body = r.read_to_eof()
        resp.end = "eof"


# --------------------------------------------------------------------------- HTTP/2


class _H2Connection(h2.connection.H2Connection):
    """h2's connection, except that a graceful GOAWAY (NO_ERROR) covering our streams does not end
    it: the server is closing the connection after those streams (Envoy with
    max_requests_per_connection, say), and h2 would refuse their frames that still arrive."""

    def _receive_goaway_frame(self, frame):
        state = self.state_machine.state
        frames, events = super()._receive_goaway_frame(frame)
        if frame.error_code == 0 and frame.last_stream_id >= self.highest_outbound_stream_id:
            self.state_machine.state = state
        return frames, events


def h2_request(
    port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    data: list[bytes] | None = None,
    *,
    authority: str = "localhost",
    trailers: list[tuple[str, str]] | None = None,
    end_on_headers: bool = False,
    delay: float = 0.0,
    timeout: float = DEFAULT_TIMEOUT,
) -> Response:
    """One request on a fresh HTTP/2 prior-knowledge connection.

    ``data`` is the exact list of DATA frames to send (``b""`` sends an empty DATA frame).  The
    stream is ended by END_STREAM on the last DATA frame, or by ``trailers`` if given, or on the
    HEADERS frame when ``end_on_headers`` (or when there is no data and no trailers).
    """
    data = list(data or [])
    resp = Response(transport="h2")
    start = time.monotonic()
    deadline = start + timeout
    cfg = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
    )
    conn = _H2Connection(config=cfg)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as e:
        resp.error = f"connect: {e}"
        resp.end = "reset"
        resp.h2_end = "closed"
        return resp
    body = bytearray()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.initiate_connection()
        # A roomy connection window so large responses are never blocked on us.
        conn.increment_flow_control_window(2**24)
        sid = conn.get_next_available_stream_id()
        req_headers = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ] + [(k.lower().encode(), v.encode()) for k, v in headers]
        only_headers = end_on_headers or (not data and trailers is None)
        conn.send_headers(sid, req_headers, end_stream=only_headers)
        sock.sendall(conn.data_to_send())
        if not only_headers:
            for i, chunk in enumerate(data):
                if delay and i:
                    time.sleep(delay)
                last = i == len(data) - 1 and trailers is None
                conn.send_data(sid, chunk, end_stream=last)
                sock.sendall(conn.data_to_send())
            if trailers is not None:
                if delay and data:
                    time.sleep(delay)
                conn.send_headers(
                    sid, [(k.lower().encode(), v.encode()) for k, v in trailers], end_stream=True
                )
                sock.sendall(conn.data_to_send())

        done = False
        while not done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                resp.end = "timeout"
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                resp.end = "timeout"
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                resp.end = "reset"
                resp.h2_end = "closed"
                break
            try:
                events = conn.receive_data(chunk)
            except h2.exceptions.ProtocolError as e:
                resp.error = f"h2 protocol error: {e!r}"
                resp.end = "reset"
                resp.h2_end = "protocol-error"
                break
            for ev in events:
                if getattr(ev, "stream_id", sid) not in (sid, 0):
                    continue
                if isinstance(ev, h2.events.ResponseReceived):
                    hdrs = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in ev.headers]
                    resp.status = int(dict(hdrs)[":status"])
                    resp.headers = [(k, v) for k, v in hdrs if not k.startswith(":")]
                    resp.first_byte = time.monotonic() - start
                    if ev.stream_ended:
                        resp.h2_end = "headers"
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    resp.h2_data_frames.append(len(ev.data))
                    if ev.flow_controlled_length:
                        conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    if ev.stream_ended:
                        resp.h2_end = "data" if ev.data else "empty-data"
                elif isinstance(ev, h2.events.TrailersReceived):
                    resp.http_trailers = [
                        (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in ev.headers
                    ]
                    resp.h2_end = "trailers"
                elif isinstance(ev, h2.events.StreamEnded):
                    resp.end = "clean"
                    done = True
                elif isinstance(ev, h2.events.StreamReset):
                    resp.end = "reset"
                    resp.h2_end = f"rst:{int(ev.error_code)}"
                    done = True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    if (ev.error_code == 0 and ev.last_stream_id is not None
                            and ev.last_stream_id >= sid):
                        # A graceful GOAWAY that still covers our stream (a server closing the
                        # connection after this request): the stream goes on; keep reading.
                        resp.graceful_goaway = True
                        continue
                    resp.end = "reset"
                    resp.h2_end = "goaway"
                    done = True
            out = conn.data_to_send()
            if out:
                try:
                    sock.sendall(out)
                except OSError:
                    pass
    except OSError as e:
        resp.error = f"{type(e).__name__}: {e}"
        resp.end = "reset"
        resp.h2_end = resp.h2_end or "closed"
    finally:
        resp.body = bytes(body)
        resp.elapsed = time.monotonic() - start
        sock.close()
    return resp
