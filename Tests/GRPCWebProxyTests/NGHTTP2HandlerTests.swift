import CNGHTTP2
import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import Testing

@testable import GRPCWebProxy

/// Two EmbeddedChannels joined in memory: a client codec and a server codec, each with a
/// recorder above it; bytes cross only when `shuttle` carries them.
class InMemoryHTTP2Link {
  let client = EmbeddedChannel()
  let server = EmbeddedChannel()
  let clientFrames = NGHTTP2HandlerTests.Recorder()
  let serverFrames = NGHTTP2HandlerTests.Recorder()

  init(client clientCodec: any ChannelHandler, server serverCodec: any ChannelHandler) throws {
    try self.server.pipeline.syncOperations.addHandler(serverCodec)
    try self.server.pipeline.syncOperations.addHandler(self.serverFrames)
    try self.client.pipeline.syncOperations.addHandler(clientCodec)
    try self.client.pipeline.syncOperations.addHandler(self.clientFrames)
    try self.server.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
    try self.client.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
    try self.shuttle()
  }

  /// Carries bytes both ways until neither side has anything more to say.
  func shuttle() throws {
    var moved = true
    while moved {
      moved = false
      while let bytes = try self.client.readOutbound(as: ByteBuffer.self) {
        try self.server.writeInbound(bytes)
        moved = true
      }
      while let bytes = try self.server.readOutbound(as: ByteBuffer.self) {
        try self.client.writeInbound(bytes)
        moved = true
      }
    }
  }
}

/// The nghttp2 client codec against NIOHTTP2's server, in memory: bytes are carried between two
/// EmbeddedChannels, so every frame crosses a real encoder and a real decoder, with no socket.
@Suite struct NGHTTP2HandlerTests {
  /// What reaches the handler above a codec: frames and user events.
  final class Recorder: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    var frames: [HTTP2Frame] = []
    var closed: [StreamClosedEvent] = []
    var errors: [any Error] = []

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
      self.frames.append(self.unwrapInboundIn(data))
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
      if let event = event as? StreamClosedEvent { self.closed.append(event) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
      self.errors.append(error)
    }
  }

  final class Pair: InMemoryHTTP2Link {
    init(serverSettings: HTTP2Settings = nghttp2DefaultServerSettings) throws {
      try super.init(
        client: NGHTTP2Handler(initialSettings: Pipelines.upstreamSettings, connectionWindow: 16 << 20, allocator: ByteBufferAllocator()),
        server: NIOHTTP2Handler(mode: .server, initialSettings: serverSettings))
    }

    func request(_ id: HTTP2StreamID, headers extra: [(String, String)] = [], body: ByteBuffer?) {
      var headers: HPACKHeaders = [":method": "POST", ":scheme": "http", ":path": "/bench.Echo/Unary", ":authority": "backend", "content-type": "application/grpc", "te": "trailers"]
      for (name, value) in extra { headers.add(name: name, value: value) }
      self.client.write(HTTP2Frame(streamID: id, payload: .headers(.init(headers: headers, endStream: body == nil))), promise: nil)
      if let body {
        self.client.write(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(body), endStream: true))), promise: nil)
      }
      self.client.flush()
    }

    func respond(_ id: HTTP2StreamID, body: ByteBuffer) {
      self.server.write(HTTP2Frame(streamID: id, payload: .headers(.init(headers: [":status": "200", "content-type": "application/grpc"]))), promise: nil)
      self.server.write(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(body)))), promise: nil)
      self.server.write(HTTP2Frame(streamID: id, payload: .headers(.init(headers: ["grpc-status": "0"], endStream: true))), promise: nil)
      self.server.flush()
    }

    func body(_ frames: [HTTP2Frame], stream: HTTP2StreamID) -> ByteBuffer {
      var all = ByteBuffer()
      for frame in frames where frame.streamID == stream {
        if case .data(let data) = frame.payload, case .byteBuffer(var bytes) = data.data { all.writeBuffer(&bytes) }
      }
      return all
    }
  }

  static let nghttp2DefaultServerSettings: HTTP2Settings = [HTTP2Setting(parameter: .maxConcurrentStreams, value: 100)]

  @Test func aCallGoesThroughBothWays() throws {
    let pair = try Pair()
    let body = ByteBuffer(bytes: [0, 0, 0, 0, 4, 0x0a, 0x02, 0x68, 0x69])
    pair.request(1, body: body)
    try pair.shuttle()
    #expect(pair.body(pair.serverFrames.frames, stream: 1) == body)
    let ended = pair.serverFrames.frames.contains { if case .data(let d) = $0.payload { return d.endStream } else { return false } }
    #expect(ended, "the request's last DATA frame carries END_STREAM")

    let reply = ByteBuffer(repeating: 7, count: 100_000)
    pair.respond(1, body: reply)
    try pair.shuttle()
    let headers = pair.clientFrames.frames.compactMap { frame -> HPACKHeaders? in
      if case .headers(let h) = frame.payload { return h.headers } else { return nil }
    }
    #expect(headers.count == 2)
    #expect(headers.first?[":status"] == ["200"])
    #expect(headers.last?["grpc-status"] == ["0"])
    #expect(pair.body(pair.clientFrames.frames, stream: 1) == reply)
  }

  /// NIOHTTP2 cannot send these; a 40 KiB header block needs three CONTINUATION frames after its
  /// HEADERS at the default 16 KiB frame size.
  @Test func aHeaderBlockLargerThanAFrameGoesOutWithContinuation() throws {
    let pair = try Pair(serverSettings: [HTTP2Setting(parameter: .maxHeaderListSize, value: 1 << 20)])
    let big = String(repeating: "a", count: 40_000)
    pair.request(1, headers: [("x-big", big)], body: ByteBuffer(bytes: [0, 0, 0, 0, 0]))
    try pair.shuttle()
    let received = pair.serverFrames.frames.compactMap { frame -> HPACKHeaders? in
      if case .headers(let h) = frame.payload { return h.headers } else { return nil }
    }
    #expect(received.first?["x-big"] == [big])
    #expect(pair.clientFrames.errors.isEmpty)
  }

  @Test func aResetReachesTheCallAndClosesTheStream() throws {
    let pair = try Pair()
    pair.request(1, body: ByteBuffer(bytes: [0, 0, 0, 0, 0]))
    try pair.shuttle()
    pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .rstStream(.noError)), promise: nil)
    try pair.shuttle()
    let resets = pair.clientFrames.frames.filter { if case .rstStream(.noError) = $0.payload { return true } else { return false } }
    #expect(resets.count == 1)
    #expect(pair.clientFrames.closed.map(\.streamID) == [1])
  }

  @Test func aStreamIDBelowOneAlreadyUsedIsRefused() throws {
    let pair = try Pair()
    pair.request(5, body: ByteBuffer(bytes: [0, 0, 0, 0, 0]))
    let promise = pair.client.eventLoop.makePromise(of: Void.self)
    pair.client.write(HTTP2Frame(streamID: 3, payload: .headers(.init(headers: [":method": "POST", ":path": "/", ":scheme": "http", ":authority": "a"]))), promise: promise)
    pair.client.flush()
    #expect(throws: (any Error).self) { try promise.futureResult.wait() }
  }

  @Test func aGoAwayIsSurfacedWithItsLastStream() throws {
    let pair = try Pair()
    pair.request(1, body: ByteBuffer(bytes: [0, 0, 0, 0, 0]))
    try pair.shuttle()
    pair.server.writeAndFlush(HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: 1, errorCode: .noError, opaqueData: nil)), promise: nil)
    try pair.shuttle()
    let goaways = pair.clientFrames.frames.compactMap { frame -> HTTP2StreamID? in
      if case .goAway(let last, _, _) = frame.payload { return last } else { return nil }
    }
    #expect(goaways == [1])
  }

  /// The stream's window comes back only when the connection says so (a paused call's client is
  /// not reading): the backend can send 1 MiB, then no more until the WINDOW_UPDATE.
  @Test func aStreamsWindowIsReturnedOnlyWhenAsked() throws {
    let pair = try Pair()
    pair.request(1, body: ByteBuffer(bytes: [0, 0, 0, 0, 0]))
    try pair.shuttle()
    pair.server.write(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [":status": "200"]))), promise: nil)
    let chunk = ByteBuffer(repeating: 1, count: 16_384)
    for _ in 0..<80 {
      pair.server.write(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(chunk)))), promise: nil)
    }
    pair.server.flush()
    try pair.shuttle()
    #expect(pair.body(pair.clientFrames.frames, stream: 1).readableBytes == UpstreamConnection.streamWindow)
    pair.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .windowUpdate(windowSizeIncrement: UpstreamConnection.streamWindow)), promise: nil)
    try pair.shuttle()
    #expect(pair.body(pair.clientFrames.frames, stream: 1).readableBytes == 80 * 16_384)
  }
}

/// The nghttp2 server codec (clients' connections) against NIOHTTP2's client, in memory.
@Suite struct NGHTTP2ServerHandlerTests {
  typealias Recorder = NGHTTP2HandlerTests.Recorder

  final class Pair: InMemoryHTTP2Link {
    init(maxHeaderBlock: Int = 1 << 20, clientWindow: Int = 65_535) throws {
      let settings = [
        nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS.rawValue), value: 100),
        nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue), value: 1 << 20),
      ]
      try super.init(
        client: NIOHTTP2Handler(mode: .client, initialSettings: [HTTP2Setting(parameter: .initialWindowSize, value: clientWindow)]),
        server: NGHTTP2Handler(mode: .server, initialSettings: settings, connectionWindow: 8 << 20, maxHeaderBlock: maxHeaderBlock,
          allocator: ByteBufferAllocator()))
    }

    func request(_ id: HTTP2StreamID, extra: [(String, String)] = [], endStream: Bool) {
      var headers: HPACKHeaders = [":method": "POST", ":scheme": "http", ":path": "/demo.User/login", ":authority": "proxy", "content-type": "application/grpc-web+proto"]
      for (name, value) in extra { headers.add(name: name, value: value) }
      self.client.writeAndFlush(HTTP2Frame(streamID: id, payload: .headers(.init(headers: headers, endStream: endStream))), promise: nil)
    }

    /// The frames of streams (not the connection's), as short names.
    func payloads(_ frames: [HTTP2Frame]) -> [String] {
      frames.filter { $0.streamID != .rootStream }.map { frame in
        switch frame.payload {
        case .headers(let h): return "headers\(h.endStream ? " end" : "")"
        case .data(let d): return "data \(d.data.readableBytes)\(d.endStream ? " end" : "")"
        case .rstStream(let code): return "reset \(code.networkCode)"
        default: return "other"
        }
      }
    }
  }

  @Test func aResponseWithTrailersEndsOnTheTrailers() throws {
    let pair = try Pair()
    pair.request(1, endStream: false)
    pair.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(bytes: [0, 0, 0, 0, 0])), endStream: true))), promise: nil)
    try pair.shuttle()
    #expect(pair.payloads(pair.serverFrames.frames) == ["headers", "data 5 end"])
    pair.server.write(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [":status": "200"]))), promise: nil)
    pair.server.write(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(repeating: 1, count: 40_000))))), promise: nil)
    pair.server.write(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: ["grpc-status": "0"], endStream: true))), promise: nil)
    pair.server.flush()
    try pair.shuttle()
    let frames = pair.payloads(pair.clientFrames.frames.filter { $0.streamID == 1 })
    #expect(frames.first == "headers")
    #expect(frames.last == "headers end")
    #expect(!frames.contains("data 0"), "no empty DATA frame before the trailers")
    #expect(pair.serverFrames.closed.map(\.streamID) == [1])
  }

  /// A local reply before the request has ended, then RST_STREAM(NO_ERROR) so the client stops
  /// sending: the client must see the reply first (RFC 9113 section 8.1).
  @Test func aResetAfterAnEarlyReplyFollowsIt() throws {
    let pair = try Pair()
    pair.request(1, endStream: false)
    try pair.shuttle()
    let written = pair.server.eventLoop.makePromise(of: Void.self)
    pair.server.write(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [":status": "400", "grpc-status": "13"], endStream: true))), promise: written)
    pair.server.flush()
    written.futureResult.whenSuccess {
      pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .rstStream(.noError)), promise: nil)
    }
    try pair.shuttle()
    #expect(pair.payloads(pair.clientFrames.frames.filter { $0.streamID == 1 }) == ["headers end", "reset 0"])
  }

  @Test func aHeaderBlockOverTheLimitResetsItsStreamOnly() throws {
    let pair = try Pair(maxHeaderBlock: 4096)
    pair.request(1, extra: [("x-big", String(repeating: "a", count: 8000))], endStream: true)
    pair.request(3, endStream: true)
    try pair.shuttle()
    #expect(pair.payloads(pair.serverFrames.frames).filter { $0.hasPrefix("headers") } == ["headers end"], "only stream 3's head arrives")
    #expect(pair.serverFrames.frames.first { $0.streamID != .rootStream }?.streamID == 3)
    let resets = pair.clientFrames.frames.filter { if case .rstStream = $0.payload { return $0.streamID == 1 } else { return false } }
    #expect(resets.count == 1)
  }
}

extension NGHTTP2ServerHandlerTests {
  /// A response held back by the client's window when the connection goes: the streams nghttp2
  /// still has point at their data queues, so it must never run again (it did, on the next
  /// read or write, and crashed the proxy at the end of a benchmark run).
  @Test func nothingRunsAfterTheConnectionIsGone() throws {
    let pair = try Pair(clientWindow: 0)
    pair.request(1, endStream: true)
    try pair.shuttle()
    pair.server.write(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [":status": "200"]))), promise: nil)
    let held = pair.server.eventLoop.makePromise(of: Void.self)
    pair.server.write(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(repeating: 1, count: 1000))))), promise: held)
    pair.server.flush()
    try pair.shuttle()
    pair.server.pipeline.fireChannelInactive()
    #expect(throws: (any Error).self) { try held.futureResult.wait() }
    // The client opens its window: before, nghttp2 resumed the stream, read its freed queue and
    // wrote a DATA frame.
    pair.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .windowUpdate(windowSizeIncrement: 1 << 20)), promise: nil)
    pair.client.writeAndFlush(HTTP2Frame(streamID: .rootStream, payload: .ping(HTTP2PingData(withInteger: 7), ack: false)), promise: nil)
    while let bytes = try pair.client.readOutbound(as: ByteBuffer.self) { try pair.server.writeInbound(bytes) }
    #expect(try pair.server.readOutbound(as: ByteBuffer.self) == nil, "nothing is written after the connection has gone")
    let late = pair.server.eventLoop.makePromise(of: Void.self)
    pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(repeating: 1, count: 10))))), promise: late)
    #expect(throws: (any Error).self) { try late.futureResult.wait() }
  }
}
