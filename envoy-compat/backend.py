"""Scripted HTTP/2 cleartext (prior knowledge) gRPC backend for the differential suite.

The backend is deliberately dumb and deterministic: it picks a behaviour from the *method* part of
the request ``:path`` (the last path segment), so ``/scenario.Test/Unary`` and
``/short.Test/Unary`` behave the same.  The service part only selects an Envoy route (timeouts,
clusters) in the config the suite writes.

Every request is recorded in :attr:`Backend.log` (headers, body, trailers, whether it was reset)
so a test can check what the proxy sent upstream, or that a request never reached the upstream.

Run standalone::

    python3 envoy-compat/backend.py 50051

or in-process::

    b = Backend(); b.start(); ...; b.stop()
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sys
import threading
import time
from typing import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.stream
import hyperframe.frame


def grpc_frame(payload: bytes, flag: int = 0) -> bytes:
    """One length-prefixed gRPC message."""
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


GRPC_CT = (b"content-type", b"application/grpc")
OK_TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]

# Fixed payloads the tests know about.
UNARY_PAYLOAD = b"hello from backend"
MSG1 = b"first message"
MSG2 = b"second message!"


@dataclasses.dataclass
class RequestRecord:
    """What the backend received on one stream."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytearray = dataclasses.field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    data_frames: int = 0
    ended: bool = False
    reset: bool = False
    received_at: float = dataclasses.field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def case_id(self) -> str | None:
        return self.header("x-case-id")


class _Stream:
    def __init__(self, stream_id: int, record: RequestRecord):
        self.stream_id = stream_id
        self.record = record
        self.task: asyncio.Task | None = None
        self.window_open = asyncio.Event()
        self.closed = False


class StreamContext:
    """Helpers a scenario coroutine uses to answer one stream."""

    def __init__(self, conn: "_Connection", stream: _Stream):
        self._conn = conn
        self._stream = stream
        self.request = stream.record

    @property
    def listener(self) -> str:
        """Where the request came in: the backend's port, or its unix socket path."""
        t = self._conn.transport
        name = t.get_extra_info("sockname") if t is not None else None
        if isinstance(name, tuple):
            return str(name[1])
        return str(name or "")

    @property
    def alive(self) -> bool:
        return not self._stream.closed and not self._conn.closed

    def headers(self, status: int | str, extra: list[tuple[bytes, bytes]] = (), end: bool = False):
        hdrs = [(b":status", str(status).encode())] + list(extra)
        self._conn.send(lambda h2c: h2c.send_headers(self._stream.stream_id, hdrs, end_stream=end))

    def trailers(self, trailers: list[tuple[bytes, bytes]]):
        if trailers:
            self._conn.send(
                lambda h2c: h2c.send_headers(self._stream.stream_id, list(trailers), end_stream=True)
            )
        else:
            self._conn.send_empty_trailers(self._stream.stream_id)

    async def data(self, payload: bytes, end: bool = False):
        """Send payload, split only as flow control / max frame size require."""
        sid = self._stream.stream_id
        view = memoryview(payload)
        if not view:
            self._conn.send(lambda h2c: h2c.send_data(sid, b"", end_stream=end))
            return
        while view:
            if not self.alive:
                return
            h2c = self._conn.h2
            window = h2c.local_flow_control_window(sid)
            size = min(window, h2c.max_outbound_frame_size, len(view))
            if size <= 0:
                self._stream.window_open.clear()
                await self._stream.window_open.wait()
                continue
            chunk, view = bytes(view[:size]), view[size:]
            last = end and not view
            self._conn.send(lambda c, chunk=chunk, last=last: c.send_data(sid, chunk, end_stream=last))

    def rst(self, code: int = h2.errors.ErrorCodes.INTERNAL_ERROR):
        self._conn.send(lambda h2c: h2c.reset_stream(self._stream.stream_id, error_code=code))
        self._stream.closed = True

    def close_connection(self):
        self._conn.abort()

    async def sleep(self, seconds: float):
        await asyncio.sleep(seconds)


Scenario = Callable[[StreamContext], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str):
    def deco(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------- scenarios


@scenario("Unary")
async def _unary(ctx: StreamContext):
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(UNARY_PAYLOAD))
    ctx.trailers(OK_TRAILERS)


@scenario("TwoMessages")
async def _two_messages(ctx: StreamContext):
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(MSG1) + grpc_frame(MSG2))  # both in one DATA frame
    ctx.trailers([(b"grpc-status", b"0")])


@scenario("SplitMessage")
async def _split_message(ctx: StreamContext):
    """One message spread over three DATA frames (header split too)."""
    frame = grpc_frame(UNARY_PAYLOAD)
    ctx.headers(200, [GRPC_CT])
    for part in (frame[:3], frame[3:9], frame[9:]):
        await ctx.data(part)
        await ctx.sleep(0.03)
    ctx.trailers([(b"grpc-status", b"0")])


@scenario("TrailersOnly")
async def _trailers_only(ctx: StreamContext):
    ctx.headers(200, [GRPC_CT, (b"grpc-status", b"5"), (b"grpc-message", b"x")], end=True)


@scenario("CustomTrailers")
async def _custom_trailers(ctx: StreamContext):
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(UNARY_PAYLOAD))
    ctx.trailers([(b"grpc-status", b"0"), (b"x-foo", b"bar"), (b"trace-bin", b"AAEC")])


@scenario("DupTrailers")
async def _dup_trailers(ctx: StreamContext):
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(UNARY_PAYLOAD))
    ctx.trailers(
        [(b"grpc-status", b"0"), (b"grpc-message", b"caf%C3%A9"), (b"x-k", b"a"), (b"x-k", b"b")]
    )


@scenario("EmptyTrailers")
async def _empty_trailers(ctx: StreamContext):
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(UNARY_PAYLOAD))
    ctx.trailers([])  # a HEADERS frame with END_STREAM and an empty header block


@scenario("HeadersOnly200")
async def _headers_only_200(ctx: StreamContext):
    ctx.headers(200, [GRPC_CT], end=True)


@scenario("NoTrailers")
async def _no_trailers(ctx: StreamContext):
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(UNARY_PAYLOAD), end=True)


@scenario("Gzip")
async def _gzip(ctx: StreamContext):
    # The payload need not be real gzip: nobody on the path decompresses it.
    frame = grpc_frame(b"\x1f\x8b pretend-gzip", flag=1)
    ctx.headers(
        200,
        [
            GRPC_CT,
            (b"grpc-encoding", b"gzip"),
            (b"grpc-accept-encoding", b"gzip,identity"),
            (b"content-length", str(len(frame)).encode()),
        ],
    )
    await ctx.data(frame)
    ctx.trailers([(b"grpc-status", b"0")])


@scenario("NonGrpc503")
async def _non_grpc_503(ctx: StreamContext):
    ctx.headers(503, [(b"content-type", b"text/plain")])
    await ctx.data(b"overloaded", end=True)


JSON_BODY = b'{"percentage": "100%"}'


@scenario("Json200TwoChunks")
async def _json_two_chunks(ctx: StreamContext):
    ctx.headers(200, [(b"content-type", b"application/json")])
    await ctx.data(JSON_BODY[:10])
    await ctx.sleep(0.03)
    await ctx.data(JSON_BODY[10:], end=True)


@scenario("NoCt200TwoChunks")
async def _noct_two_chunks(ctx: StreamContext):
    ctx.headers(200, [])
    await ctx.data(JSON_BODY[:10])
    await ctx.sleep(0.03)
    await ctx.data(JSON_BODY[10:], end=True)


def big_body(n: int) -> bytes:
    """Printable ASCII (no '%'), so percent-encoding leaves it unchanged."""
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789"
    return bytes(alphabet[i % len(alphabet)] for i in range(n))


@scenario("Big32k")
async def _big32k(ctx: StreamContext):
    ctx.headers(503, [(b"content-type", b"text/plain")])
    body = big_body(32 * 1024)
    for i in range(0, len(body), 8192):
        await ctx.data(body[i : i + 8192])
        await ctx.sleep(0.01)
    await ctx.data(b"", end=True)


@scenario("Big17k")
async def _big17k(ctx: StreamContext):
    # 17 KiB sent in one go: HTTP/2's default 16 KiB max frame size still splits it.
    ctx.headers(503, [(b"content-type", b"text/plain")])
    await ctx.data(big_body(17 * 1024), end=True)


@scenario("HeadersOnly503")
async def _headers_only_503(ctx: StreamContext):
    ctx.headers(503, [(b"content-type", b"text/plain")], end=True)


@scenario("GrpcCharset")
async def _grpc_charset(ctx: StreamContext):
    ctx.headers(200, [(b"content-type", b"application/grpc; charset=utf-8")])
    await ctx.data(grpc_frame(b"hi"), end=True)


@scenario("GrpcCharsetTrailers")
async def _grpc_charset_trailers(ctx: StreamContext):
    ctx.headers(200, [(b"content-type", b"application/grpc; charset=utf-8")])
    await ctx.data(grpc_frame(b"hi"))
    ctx.trailers([(b"grpc-status", b"0")])


@scenario("Status400Trailers")
async def _status400_trailers(ctx: StreamContext):
    ctx.headers(400, [(b"content-type", b"text/plain")])
    await ctx.data(b"bad request body")
    ctx.trailers([(b"grpc-status", b"3"), (b"grpc-message", b"from-trailers")])


@scenario("CloseBeforeHeaders")
async def _close_before_headers(ctx: StreamContext):
    ctx.close_connection()


@scenario("RstBeforeHeaders")
async def _rst_before_headers(ctx: StreamContext):
    ctx.rst(h2.errors.ErrorCodes.INTERNAL_ERROR)


@scenario("Silent")
async def _silent(ctx: StreamContext):
    # Never answers; ends when the proxy resets the stream or the backend stops.
    while ctx.alive:
        await ctx.sleep(0.1)


@scenario("SlowStream")
async def _slow_stream(ctx: StreamContext):
    """Server stream: headers and a message at once, then one message every 300 ms for 6 s."""
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(b"tick0"))
    for i in range(1, 20):
        await ctx.sleep(0.3)
        if not ctx.alive:
            return
        await ctx.data(grpc_frame(b"tick%d" % i))
    ctx.trailers([(b"grpc-status", b"0")])


@scenario("Rst")
async def _rst(ctx: StreamContext):
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(MSG1))
    await ctx.sleep(0.03)
    await ctx.data(grpc_frame(MSG2))
    await ctx.sleep(0.1)
    ctx.rst(h2.errors.ErrorCodes.INTERNAL_ERROR)


@scenario("ConnLossAfterHeaders")
async def _conn_loss(ctx: StreamContext):
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(MSG1))
    await ctx.sleep(0.1)
    ctx.close_connection()


@scenario("TruncatedFrame")
async def _truncated_frame(ctx: StreamContext):
    """Upstream ends (DATA+END_STREAM) in the middle of a frame (doc D5)."""
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(MSG1))
    await ctx.sleep(0.02)
    await ctx.data(grpc_frame(MSG2)[:8], end=True)


@scenario("TruncatedFrameTrailers")
async def _truncated_frame_trailers(ctx: StreamContext):
    """A cut frame followed by normal trailers."""
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(MSG1) + grpc_frame(MSG2)[:8])
    ctx.trailers([(b"grpc-status", b"0")])


@scenario("BadFlag")
async def _bad_flag(ctx: StreamContext):
    """A frame whose flag byte is neither 0 nor 1 (E13: decoder errors are ignored)."""
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(MSG1, flag=0x02))
    await ctx.sleep(0.02)
    await ctx.data(grpc_frame(MSG2))
    ctx.trailers([(b"grpc-status", b"0")])


@scenario("Echo")
async def _echo(ctx: StreamContext):
    """Echo the request body as one message; request headers come back as x-seen-<name>, and
    x-backend-listener names the port (or unix socket) the request came in on."""
    req = ctx.request
    extra: list[tuple[bytes, bytes]] = [GRPC_CT]
    for k, v in req.headers:
        name = k[1:] if k.startswith(":") else k
        extra.append((b"x-seen-" + name.encode(), v.encode()))
    for k, v in req.trailers:
        extra.append((b"x-seen-trailer-" + k.encode(), v.encode()))
    extra.append((b"x-seen-body-length", str(len(req.body)).encode()))
    extra.append((b"x-backend-listener", ctx.listener.encode()))
    ctx.headers(200, extra)
    await ctx.data(grpc_frame(bytes(req.body)))
    ctx.trailers([(b"grpc-status", b"0")])


@scenario("Check")
async def _health_check(ctx: StreamContext):
    """grpc.health.v1.Health/Check: SERVING, whatever the service (for configs with health_checks)."""
    ctx.headers(200, [GRPC_CT])
    await ctx.data(grpc_frame(b"\x08\x01"))  # HealthCheckResponse{status: SERVING}
    ctx.trailers([(b"grpc-status", b"0")])


@scenario("FlakyOnce")
async def _flaky_once(ctx: StreamContext):
    """The first request of an x-case-id gets a trailers-only UNAVAILABLE, later ones an Echo
    (a retry_policy with retry_on: unavailable turns the call into a success)."""
    case_id = ctx.request.case_id
    earlier = [r for r in ctx._conn.backend.records(case_id) if r is not ctx.request] if case_id else []
    if not earlier:
        ctx.headers(
            200, [GRPC_CT, (b"grpc-status", b"14"), (b"grpc-message", b"flaky: try again")], end=True
        )
        return
    await _echo(ctx)


_STATUS_RE = re.compile(r"^Status(\d{3})$")


async def _status_n(ctx: StreamContext, code: int):
    ctx.headers(code, [(b"content-type", b"text/plain")])
    await ctx.data(b"status %d body" % code, end=True)


async def _options(ctx: StreamContext):
    ctx.headers(204, [(b"x-backend-saw-options", b"1")], end=True)


async def _unknown(ctx: StreamContext):
    ctx.headers(
        200, [GRPC_CT, (b"grpc-status", b"12"), (b"grpc-message", b"unknown scenario")], end=True
    )


def pick_scenario(method: str, path: str) -> Scenario:
    if method == "OPTIONS":
        return _options
    name = path.split("?", 1)[0].rsplit("/", 1)[-1]
    if name in SCENARIOS:
        return SCENARIOS[name]
    m = _STATUS_RE.match(name)
    if m:
        code = int(m.group(1))
        return lambda ctx: _status_n(ctx, code)
    return _unknown


# --------------------------------------------------------------------------- server


class _Connection(asyncio.Protocol):
    def __init__(self, backend: "Backend"):
        self.backend = backend
        cfg = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport
        self.backend._conns.add(self)
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc):
        self.closed = True
        self.backend._conns.discard(self)
        for st in self.streams.values():
            st.closed = True
            st.window_open.set()
            if st.task and not st.task.done():
                st.task.cancel()

    def data_received(self, data: bytes):
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            self.abort()
            return
        for ev in events:
            self.handle(ev)
        self.flush()

    # helpers
    def flush(self):
        if self.transport is not None and not self.closed:
            out = self.h2.data_to_send()
            if out:
                self.transport.write(out)

    def send(self, fn):
        if self.closed:
            return
        try:
            fn(self.h2)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            pass
        self.flush()

    def send_empty_trailers(self, stream_id: int):
        """HEADERS(END_STREAM) with an empty header block; h2 cannot build one itself."""
        if self.closed:
            return
        self.flush()
        try:
            stream = self.h2._get_stream_by_id(stream_id)
            stream.state_machine.process_input(h2.stream.StreamInputs.SEND_HEADERS)
            stream.state_machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
        except Exception:
            return
        frame = hyperframe.frame.HeadersFrame(stream_id)
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        frame.data = b""
        self.transport.write(frame.serialize())

    def abort(self):
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def handle(self, ev):
        if isinstance(ev, h2.events.RequestReceived):
            hdrs = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in ev.headers]
            d = dict(hdrs)
            rec = RequestRecord(method=d.get(":method", ""), path=d.get(":path", ""), headers=hdrs)
            self.backend._record(rec)
            st = _Stream(ev.stream_id, rec)
            self.streams[ev.stream_id] = st
            if ev.stream_ended:
                self._dispatch(st)
        elif isinstance(ev, h2.events.DataReceived):
            st = self.streams.get(ev.stream_id)
            if ev.flow_controlled_length:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if st is not None:
                st.record.body += ev.data
                st.record.data_frames += 1
        elif isinstance(ev, h2.events.TrailersReceived):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.record.trailers = [
                    (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in ev.headers
                ]
        elif isinstance(ev, h2.events.StreamEnded):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                self._dispatch(st)
        elif isinstance(ev, h2.events.StreamReset):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.record.reset = True
                st.closed = True
                st.window_open.set()
                if st.task and not st.task.done():
                    st.task.cancel()
        elif isinstance(ev, h2.events.WindowUpdated):
            targets = self.streams.values() if ev.stream_id == 0 else [self.streams.get(ev.stream_id)]
            for st in targets:
                if st is not None:
                    st.window_open.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.abort()

    def _dispatch(self, st: _Stream):
        st.record.ended = True
        fn = pick_scenario(st.record.method, st.record.path)
        st.task = asyncio.get_running_loop().create_task(self._run(fn, st))

    async def _run(self, fn: Scenario, st: _Stream):
        try:
            await fn(StreamContext(self, st))
        except asyncio.CancelledError:
            pass
        except Exception as e:  # keep serving other streams
            print(f"backend: scenario error on {st.record.path}: {e!r}", file=sys.stderr)
            StreamContext(self, st).rst()


class Backend:
    """The scripted backend, run on its own event loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self.log: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._extra_servers: list = []
        self._thread: threading.Thread | None = None

    def _record(self, rec: RequestRecord):
        with self._lock:
            self.log.append(rec)

    def records(self, case_id: str) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.log if r.case_id == case_id]

    def start(self) -> "Backend":
        ready = threading.Event()
        err: list[BaseException] = []

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(lambda: _Connection(self), self.host, self.port, backlog=512)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:
                err.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="h2-backend", daemon=True)
        self._thread.start()
        ready.wait(10)
        if err:
            raise err[0]
        return self

    def add_tcp_listener(self) -> int:
        """Also serve on another loopback port (so a test can tell clusters apart); returns it."""
        loop = self._loop
        assert loop is not None, "start() first"

        async def listen():
            srv = await loop.create_server(lambda: _Connection(self), self.host, 0, backlog=512)
            self._extra_servers.append(srv)
            return srv.sockets[0].getsockname()[1]

        return asyncio.run_coroutine_threadsafe(listen(), loop).result(10)

    def add_unix_listener(self, path: str) -> str:
        """Also serve on a unix socket (for `pipe` endpoints); returns the path."""
        loop = self._loop
        assert loop is not None, "start() first"

        async def listen():
            srv = await loop.create_unix_server(lambda: _Connection(self), path, backlog=512)
            self._extra_servers.append(srv)

        asyncio.run_coroutine_threadsafe(listen(), loop).result(10)
        return path

    def stop(self):
        loop = self._loop
        if loop is None:
            return

        async def shutdown():
            self._server.close()
            for srv in self._extra_servers:
                srv.close()
            for c in list(self._conns):
                c.abort()

        fut = asyncio.run_coroutine_threadsafe(shutdown(), loop)
        try:
            fut.result(5)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(5)
        self._loop = None


def main(argv: list[str]) -> int:
    port = int(argv[1]) if len(argv) > 1 else 50051
    b = Backend(port=port).start()
    print(f"backend listening on 127.0.0.1:{b.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        b.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
