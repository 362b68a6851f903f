import CNGHTTP2
import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import Testing

@testable import GRPCWebProxy

/// The nghttp2 client codec against NIOHTTP2's server, in memory: bytes are carried between two
/// EmbeddedChannels, so every frame crosses a real encoder and a real decoder, with no socket.
@Suite struct NGHTTP2ClientHandlerTests {
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

  final class Pair {
    let client = EmbeddedChannel()
    let server = EmbeddedChannel()
    let clientFrames = Recorder()
    let serverFrames = Recorder()

    init(serverSettings: HTTP2Settings = nghttp2DefaultServerSettings) throws {
      try self.server.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .server, initialSettings: serverSettings))
      try self.server.pipeline.syncOperations.addHandler(self.serverFrames)
      try self.client.pipeline.syncOperations.addHandler(
        NGHTTP2ClientHandler(initialSettings: UpstreamConnection.nghttp2Settings, connectionWindow: 16 << 20, allocator: self.client.allocator))
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
