import GRPCWebCore
import Logging
import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import ProxyConfig
import ProxyFilters
import Testing

@testable import GRPCWebProxy

/// The whole call path without a socket or the wall clock: a client's HTTP/2 frames into
/// `HTTP2ProxyConnectionHandler` on one `EmbeddedChannel`, the calls through `ProxyCall`, the
/// backend's frames in and out of `UpstreamConnection` on others, all on one
/// `EmbeddedEventLoop` whose time the tests move (deadlines, retry back-offs).
@Suite struct CallPathTests {
  static let yaml = """
    static_resources:
      listeners:
      - name: test
        address: { socket_address: { address: 127.0.0.1, port_value: 8080 } }
        filter_chains:
        - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
              codec_type: HTTP2
              stat_prefix: test
              route_config:
                virtual_hosts:
                - name: all
                  domains: ["*"]
                  routes:
                  - match: { prefix: "/demo.User/retried" }
                    route: { cluster: backend, retry_policy: { retry_on: 5xx, num_retries: 1 } }
                  - match: { prefix: "/demo.User/slow" }
                    route: { cluster: backend, timeout: 0.2s }
                  - match: { prefix: "/demo.User/capped" }
                    route: { cluster: backend, max_stream_duration: { grpc_timeout_header_max: 0.4s, grpc_timeout_header_offset: 0.1s } }
                  - match: { prefix: "/demo.User/idle" }
                    route: { cluster: backend, idle_timeout: 0.3s }
                  - match: { prefix: "/" }
                    route: { cluster: backend }
              http_filters:
              - name: envoy.filters.http.grpc_web
                typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb }
              - name: envoy.filters.http.router
                typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
      clusters:
      - name: backend
        connect_timeout: 1s
        type: STATIC
        typed_extension_protocol_options:
          envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
            "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
            explicit_http_config: { http2_protocol_options: {} }
        load_assignment:
          cluster_name: backend
          endpoints:
          - lb_endpoints:
            - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 50051 } } }
    """

  /// The proxy's side of one client connection, and the backend connections it makes.
  final class Rig {
    let loop = EmbeddedEventLoop()
    let client: EmbeddedChannel
    /// One per upstream connection, in the order the proxy made them.
    var backends: [EmbeddedChannel] = []
    /// The loop's downstream connections, as the server drains them.
    let connections: LoopConnections

    /// Holds the proxy's writes to the backend, as a backend that stops reading would.
    let stalledBackend = WriteHolder()
    /// Holds the proxy's writes to the client.
    let stalledClient = WriteHolder()

    /// - Parameters:
    ///   - http1: the client speaks HTTP/1.1 (the listener's HTTP/1.1 pipeline, bytes in and out)
    ///     rather than HTTP/2 (frames straight into the connection handler).
    ///   - connectionOptions: added to the connection manager (`common_http_protocol_options`...).
    ///   - backendReads: false for a backend whose socket takes nothing until `stalledBackend`
    ///     lets it.
    ///   - clientReads: false for a client whose socket takes nothing until `stalledClient` lets
    ///     it (an HTTP/2 client that withholds WINDOW_UPDATE, seen from the proxy's writes).
    ///   - listenerOptions: added to the listener (`per_connection_buffer_limit_bytes`...).
    init(
      http1: Bool = false, connectionOptions: String? = nil, listenerOptions: String? = nil, backendReads: Bool = true,
      clientReads: Bool = true
    ) throws {
      var yaml = CallPathTests.yaml
      if let options = connectionOptions {
        yaml = yaml.replacingOccurrences(of: "stat_prefix: test\n", with: "stat_prefix: test\n          \(options)\n")
      }
      if let options = listenerOptions {
        yaml = yaml.replacingOccurrences(of: "port_value: 8080 } }\n", with: "port_value: 8080 } }\n    \(options)\n")
      }
      let config = try ConfigLoader.load(yaml: yaml).configuration
      let logger = Logger(label: "test")
      let loop = self.loop
      var made: [EmbeddedChannel] = []
      let holder = self.stalledBackend
      let upstreams = LoopUpstreams(eventLoop: loop, clusters: config.clusters, logger: logger) { connection in
        let channel = EmbeddedChannel(loop: loop)
        if !backendReads { try! channel.pipeline.syncOperations.addHandler(holder) }
        try! channel.pipeline.syncOperations.addHandler(UpstreamFrameHandler(connection: connection))
        made.append(channel)
        _ = channel.connect(to: try! SocketAddress(ipAddress: "127.0.0.1", port: 50051))
      }
      self.connections = LoopConnections(eventLoop: loop)
      let endpoint = HostAndPort(host: "127.0.0.1", port: 50051)
      upstreams.setEndpoints(.init(all: [endpoint], usable: [endpoint], version: 1), forCluster: "backend")
      let listener = config.listeners[0]
      let runtime = ListenerRuntime(
        listener: listener, routes: RouteTable(listener.routeConfig), upstreams: upstreams, connections: self.connections,
        logger: logger, maxTextFrameSize: 4 << 20)
      self.client = EmbeddedChannel(loop: loop)
      if !clientReads { try self.client.pipeline.syncOperations.addHandler(self.stalledClient) }
      if http1 {
        try Pipelines.http1(self.client.pipeline.syncOperations, runtime: runtime)
      } else {
        try self.client.pipeline.syncOperations.addHandler(HTTP2ProxyConnectionHandler(runtime: runtime))
      }
      try self.client.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 8080)).wait()
      self.madeBackends = { made }
      self.settle()
      _ = self.clientFrames()  // the connection window's raise
    }

    private var madeBackends: () -> [EmbeddedChannel] = { [] }

    /// Runs what the loop has queued (the coalesced flushes), then returns the backend
    /// connections made so far.
    func settle() {
      self.loop.run()
      self.backends = self.madeBackends()
    }

    /// A whole unary request on stream 1: its headers, then its one message with END_STREAM.
    func clientSendsUnary(_ path: String) throws {
      try self.clientSends(CallPathTests.request(path), stream: 1)
      try self.clientSends(CallPathTests.data(CallPathTests.message, end: true), stream: 1)
    }

    /// Moves the loop's clock on, and runs what comes due.
    func advance(_ time: TimeAmount) {
      self.loop.advanceTime(by: time)
      self.settle()
    }

    func clientSends(_ payload: HTTP2Frame.FramePayload, stream: Int) throws {
      try self.client.writeInbound(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: payload))
      self.settle()
    }

    func backendSends(_ payload: HTTP2Frame.FramePayload, stream: Int, on connection: Int = 0) throws {
      try self.backends[connection].writeInbound(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: payload))
      self.settle()
    }

    func clientFrames() -> [HTTP2Frame] { Self.drain(self.client) }

    /// An HTTP/1.1 client's bytes in.
    func clientSends(_ text: String, _ bytes: [UInt8] = []) throws {
      var buffer = ByteBuffer(string: text)
      buffer.writeBytes(bytes)
      try self.client.writeInbound(buffer)
      self.settle()
    }

    /// What an HTTP/1.1 client has been sent, as bytes.
    func clientBytes() -> [UInt8] {
      var bytes: [UInt8] = []
      while let out = try? self.client.readOutbound(as: IOData.self) {
        if case .byteBuffer(let buffer) = out { bytes += buffer.readableBytesView }
      }
      return bytes
    }

    /// What the proxy wrote to a backend connection, without the connection's window raise.
    func backendFrames(_ connection: Int = 0) -> [HTTP2Frame] {
      Self.drain(self.backends[connection]).filter { !($0.streamID == .rootStream && $0.isWindowUpdate) }
    }

    private static func drain(_ channel: EmbeddedChannel) -> [HTTP2Frame] {
      var frames: [HTTP2Frame] = []
      while let frame = try? channel.readOutbound(as: HTTP2Frame.self) { frames.append(frame) }
      return frames
    }
  }

  static func request(_ path: String, headers extra: [(String, String)] = []) -> HTTP2Frame.FramePayload {
    var headers: HPACKHeaders = [
      ":method": "POST", ":scheme": "http", ":authority": "proxy", ":path": path,
      "content-type": "application/grpc-web+proto", "x-grpc-web": "1",
    ]
    for (name, value) in extra { headers.add(name: name, value: value) }
    return .headers(.init(headers: headers))
  }

  static let message: [UInt8] = [0, 0, 0, 0, 4, 0x0A, 0x02, 0x68, 0x69]

  static func data(_ bytes: [UInt8], end: Bool) -> HTTP2Frame.FramePayload {
    .data(.init(data: .byteBuffer(ByteBuffer(bytes: bytes)), endStream: end))
  }

  static let responseHead: HTTP2Frame.FramePayload = .headers(.init(headers: [":status": "200", "content-type": "application/grpc"]))
  static func trailers(_ status: String) -> HTTP2Frame.FramePayload { .headers(.init(headers: ["grpc-status": status], endStream: true)) }

  @Test func aUnaryCallGoesUpstreamWithItsLastMessageCarryingEndStreamAndComesBackAsGRPCWeb() throws {
    let rig = try Rig()
    try rig.clientSendsUnary("/demo.User/login")
    #expect(rig.backends.count == 1)
    let sent = rig.backendFrames()
    #expect(sent.map(\.summary) == ["HEADERS 1", "DATA 1 9 END"], "one DATA frame with END_STREAM: no empty frame after it")
    if case .headers(let head) = sent.first?.payload {
      #expect(head.headers.first(name: "content-type") == "application/grpc")
      #expect(head.headers.first(name: "te") == "trailers")
    }
    try rig.backendSends(Self.responseHead, stream: 1)
    try rig.backendSends(Self.data(Self.message, end: false), stream: 1)
    try rig.backendSends(Self.trailers("0"), stream: 1)
    let answer = rig.clientFrames()
    // The message, then the trailers as a gRPC-Web trailer frame (5 + "grpc-status:0\r\n").
    #expect(answer.map(\.summary) == ["HEADERS 1", "DATA 1 9", "DATA 1 20 END"])
    if case .headers(let head) = answer.first?.payload {
      #expect(head.headers.first(name: "content-type") == "application/grpc-web+proto")
    }
    #expect(rig.backendFrames().isEmpty, "both sides ended: the stream is not reset")
  }

  @Test func theRouteTimeoutEndsACallOnVirtualTimeAndResetsItsUpstreamStream() throws {
    let rig = try Rig()
    try rig.clientSendsUnary("/demo.User/slow")
    _ = rig.backendFrames()
    rig.advance(.milliseconds(199))
    #expect(rig.clientFrames().isEmpty, "not yet")
    rig.advance(.milliseconds(1))
    let answer = rig.clientFrames()
    guard case .headers(let head) = answer.first?.payload else { Issue.record("a local reply: \(answer.map(\.summary))"); return }
    #expect(head.headers.first(name: ":status") == "504")
    #expect(head.headers.first(name: "grpc-message") == "upstream request timeout")
    #expect(head.endStream)
    #expect(rig.backendFrames().map(\.summary) == ["RST_STREAM 1 CANCEL"])
  }

  @Test func aStreamIdleTimeoutCountsFromTheLastFrameOnTheLoopsClock() throws {
    let rig = try Rig()
    try rig.clientSendsUnary("/demo.User/idle")
    _ = rig.backendFrames()
    rig.loop.advanceTime(by: .milliseconds(200))
    try rig.backendSends(Self.responseHead, stream: 1)
    _ = rig.clientFrames()
    rig.advance(.milliseconds(250))
    #expect(rig.clientFrames().isEmpty, "250 ms since the head: not idle for 300 ms yet")
    rig.advance(.milliseconds(50))
    let frames = rig.clientFrames()
    guard case .data(let data) = frames.first?.payload, case .byteBuffer(let body) = data.data else {
      Issue.record("a trailer frame: \(frames.map(\.summary))"); return
    }
    #expect(data.endStream)
    #expect(String(decoding: body.readableBytesView.dropFirst(5), as: UTF8.self).contains("grpc-status:4"), "after the head: DEADLINE_EXCEEDED")
    #expect(rig.backendFrames().map(\.summary) == ["RST_STREAM 1 CANCEL"])
  }

  @Test func a503IsRetriedAfterTheBackOffOnANewStreamAndTheClientSeesOnlyTheSecondAnswer() throws {
    let rig = try Rig()
    try rig.clientSendsUnary("/demo.User/retried")
    _ = rig.backendFrames()
    try rig.backendSends(.headers(.init(headers: [":status": "503"], endStream: true)), stream: 1)
    #expect(rig.clientFrames().isEmpty, "the client does not see the first attempt")
    #expect(rig.backendFrames().isEmpty, "nothing is sent again before the back-off")
    rig.loop.advanceTime(by: .milliseconds(25))  // the first back-off is at most 25 ms
    rig.settle()
    #expect(rig.backendFrames().map(\.summary) == ["HEADERS 3", "DATA 3 9 END"], "the same request on the next stream")
    try rig.backendSends(Self.responseHead, stream: 3)
    try rig.backendSends(Self.trailers("0"), stream: 3)
    let answer = rig.clientFrames()
    #expect(answer.first?.summary == "HEADERS 1")
    if case .headers(let head) = answer.first?.payload { #expect(head.headers.first(name: ":status") == "200") }
  }

  @Test func anEarlyReplyResetsTheUpstreamStreamAndStopsTheClientOnceTheLastFrameIsOut() throws {
    let rig = try Rig()
    try rig.clientSends(Self.request("/demo.User/login"), stream: 1)
    try rig.clientSends(Self.data(Self.message, end: false), stream: 1)
    _ = rig.backendFrames()
    try rig.backendSends(.headers(.init(headers: [":status": "200", "content-type": "application/grpc", "grpc-status": "7"], endStream: true)), stream: 1)
    #expect(rig.backendFrames().map(\.summary) == ["RST_STREAM 1 CANCEL"], "the request had not ended")
    let answer = rig.clientFrames()
    #expect(answer.map(\.summary) == ["HEADERS 1 END", "RST_STREAM 1 NO_ERROR"], "RFC 9113 8.1: the client stops sending")
  }

  @Test func aCallAboveTheBackendsGoAwayGoesToANewConnection() throws {
    let rig = try Rig()
    try rig.clientSendsUnary("/demo.User/login")
    _ = rig.backendFrames()
    try rig.backendSends(.goAway(lastStreamID: 0, errorCode: .noError, opaqueData: nil), stream: 0)
    #expect(rig.backends.count == 2, "a new connection for the call the server never processed")
    #expect(rig.backendFrames(1).map(\.summary) == ["HEADERS 1", "DATA 1 9 END"])
    try rig.backendSends(Self.responseHead, stream: 1, on: 1)
    try rig.backendSends(Self.trailers("0"), stream: 1, on: 1)
    #expect(rig.clientFrames().first?.summary == "HEADERS 1")
  }

  @Test func requestWindowGoesBackInUpdatesOfHalfTheStreamWindow() throws {
    let rig = try Rig()
    try rig.clientSends(Self.request("/demo.User/login"), stream: 1)
    let half = 512 * 1024  // the listener's default stream window is 1 MiB
    try rig.clientSends(Self.data(Array(repeating: 0, count: half - 1), end: false), stream: 1)
    #expect(rig.clientFrames().isEmpty, "less than half the window used")
    try rig.clientSends(Self.data([0], end: false), stream: 1)
    #expect(rig.clientFrames().map(\.summary) == ["WINDOW_UPDATE 1 524288"])
  }

  @Test func anHTTP2RequestsWindowIsHeldWhileTheBackendTakesNothingAndGivenBackWhenItDoes() throws {
    let rig = try Rig(backendReads: false)
    try rig.clientSends(Self.request("/demo.User/login"), stream: 1)
    /// The window the proxy gives the client back on stream 1 as `frames` of 16 KiB arrive.
    func granted(frames: Int) throws -> Int {
      for _ in 0..<frames { try rig.clientSends(Self.data(Array(repeating: 0, count: 16 * 1024), end: false), stream: 1) }
      return rig.clientFrames().windowGiven(on: 1)
    }
    // 3 MiB sent, as a client that ignored its window would: the proxy gives window back until
    // it holds the buffer limit (1 MiB) for the backend, then none.
    let held = try granted(frames: 192)
    #expect(held <= 1 << 20, "window given back while the backend takes nothing: \(held)")
    rig.stalledBackend.release()
    rig.settle()
    let resumed = try granted(frames: 0)
    #expect(resumed >= 1 << 20, "the backend took it: the window owed goes back at once: \(resumed)")
    rig.stalledBackend.release()
    let bytes = rig.backendFrames().dataBytes
    #expect(bytes == 3 << 20, "and nothing was lost")
  }

  @Test func aDrainLetsTheCallInFlightFinishThenClosesTheConnection() throws {
    let rig = try Rig()
    try rig.clientSendsUnary("/demo.User/login")
    rig.connections.startDrain()
    rig.settle()
    guard case .goAway(let last, let code, _) = rig.clientFrames().first?.payload else { Issue.record("GOAWAY first"); return }
    #expect(last == 1 && code == .noError, "stream 1 will be answered; later ones are refused")
    #expect(rig.client.isActive)
    try rig.backendSends(Self.responseHead, stream: 1)
    try rig.backendSends(Self.trailers("0"), stream: 1)
    #expect(rig.clientFrames().map(\.summary) == ["HEADERS 1", "DATA 1 20 END"])
    #expect(!rig.client.isActive, "closed once its last call ended")
  }

  @Test func aCallThatOutlivesTheDrainTimeEndsWithAStatusTheClientCanRead() throws {
    let rig = try Rig()
    try rig.clientSendsUnary("/demo.User/login")
    try rig.backendSends(Self.responseHead, stream: 1)
    _ = rig.clientFrames()
    _ = rig.backendFrames()
    var openAtDeadline: Int?
    rig.connections.drain(within: .seconds(5), failure: .shuttingDown) { openAtDeadline = $0 }
    rig.settle()
    #expect(rig.clientFrames().map(\.summary) == ["GOAWAY"])
    rig.advance(.milliseconds(4999))
    #expect(rig.clientFrames().isEmpty, "the call has until the drain time")
    rig.advance(.milliseconds(1))
    #expect(openAtDeadline == 1)
    let frames = rig.clientFrames()
    guard let last = frames.last(where: { if case .data = $0.payload { return true } else { return false } }),
      case .data(let data) = last.payload, case .byteBuffer(let body) = data.data
    else { Issue.record("a trailer frame: \(frames.map(\.summary))"); return }
    #expect(data.endStream)
    #expect(String(decoding: body.readableBytesView.dropFirst(5), as: UTF8.self).contains("grpc-status:14"))
    #expect(rig.backendFrames().map(\.summary) == ["RST_STREAM 1 CANCEL"])
  }

  @Test func anHTTP1CallIsAnsweredWithItsTrailersInTheChunkedBody() throws {
    let rig = try Rig(http1: true)
    try rig.clientSends(
      "POST /demo.User/login HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\ncontent-length: 9\r\n\r\n",
      Self.message)
    #expect(rig.backendFrames().map(\.summary) == ["HEADERS 1", "DATA 1 9 END"], "the body's last byte ends the request")
    try rig.backendSends(Self.responseHead, stream: 1)
    try rig.backendSends(Self.data(Self.message, end: false), stream: 1)
    try rig.backendSends(Self.trailers("0"), stream: 1)
    let text = String(decoding: rig.clientBytes(), as: UTF8.self)
    #expect(text.hasPrefix("HTTP/1.1 200 OK\r\n"))
    #expect(text.contains("content-type: application/grpc-web+proto\r\n"))
    #expect(text.contains("transfer-encoding: chunked\r\n"))
    #expect(text.contains("grpc-status:0\r\n"), "the trailers as a trailer frame in the body")
    #expect(text.hasSuffix("0\r\n\r\n"), "and the response ends, the connection kept")
    #expect(rig.client.isActive)
  }

  @Test func anHTTP1BodyOfSeveralBufferLimitsReachesTheBackendWholeWithEndStreamOnItsLastByte() throws {
    let rig = try Rig(http1: true)
    let size = 3 << 20  // three times the listener's default per_connection_buffer_limit_bytes
    try rig.clientSends(
      "POST /demo.User/login HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/grpc-web+proto\r\ncontent-length: \(size)\r\n\r\n")
    // The stream is open; what the proxy writes to it completes at once in memory, so the body
    // flows: a slow backend is the socket tests' (test_backpressure); here, the bytes arrive whole.
    var sent = 0
    while sent < size {
      let piece = min(64 * 1024, size - sent)
      try rig.clientSends("", Array(repeating: 0, count: piece))
      sent += piece
    }
    let frames = rig.backendFrames()
    let bytes = frames.dataBytes
    #expect(bytes == size, "every byte of the body reaches the backend")
    #expect(frames.last?.summary.hasSuffix("END") == true)
  }

  @Test(arguments: [nil, 256 * 1024])
  func anHTTP1BodyStopsBeingReadWhileTheBackendTakesNothingAndIsReadAgainWhenItDoes(configuredLimit: Int?) throws {
    let rig = try Rig(
      http1: true, listenerOptions: configuredLimit.map { "per_connection_buffer_limit_bytes: \($0)" }, backendReads: false)
    let limit = configuredLimit ?? 1 << 20  // Envoy's default
    let size = 4 << 20
    try rig.clientSends(
      "POST /demo.User/login HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/grpc-web+proto\r\ncontent-length: \(size)\r\n\r\n")
    var sent = 0
    while sent < size, rig.client.autoRead {
      try rig.clientSends("", Array(repeating: 0, count: 64 * 1024))
      sent += 64 * 1024
    }
    // per_connection_buffer_limit_bytes: held for the backend, no more.
    #expect(!rig.client.autoRead, "the socket is no longer read")
    #expect(sent > limit && sent <= limit + 64 * 1024, "stopped just past the limit, after \(sent) bytes")
    rig.stalledBackend.release()
    rig.settle()
    #expect(rig.client.autoRead, "the backend took it: the client is read again")
    while sent < size {
      try rig.clientSends("", Array(repeating: 0, count: 64 * 1024))
      sent += 64 * 1024
      rig.stalledBackend.release()
      rig.settle()
    }
    let bytes = rig.backendFrames().dataBytes
    #expect(bytes == size, "and nothing was lost")
  }

  @Test func aClientThatTakesNoResponseStopsTheBackendsWindowForThatStreamOnly() throws {
    let rig = try Rig(clientReads: false)
    try rig.clientSendsUnary("/bench.Echo/ServerStream")
    try rig.clientSends(Self.request("/demo.User/login"), stream: 3)
    try rig.clientSends(Self.data(Self.message, end: true), stream: 3)
    _ = rig.backendFrames()
    try rig.backendSends(Self.responseHead, stream: 1)
    try rig.backendSends(Self.responseHead, stream: 3)
    /// The window the proxy gives the backend back on `stream`, as `frames` of 16 KiB arrive.
    func granted(_ stream: Int, frames: Int) throws -> Int {
      for _ in 0..<frames { try rig.backendSends(Self.data(Array(repeating: 0, count: 16 * 1024), end: false), stream: stream) }
      return rig.backendFrames().windowGiven(on: stream)
    }
    // 4 MiB of response the client does not take: the window goes back until the stream holds
    // the listener's buffer limit (1 MiB) for the client, then no more, so the backend stops
    // once its stream window (1 MiB) is spent: memory bounded at about 2 MiB, not the response.
    let held = try granted(1, frames: 256)
    #expect(held >= 1 << 20 && held < 2 << 20, "window given back while the client takes nothing: \(held)")
    // Another stream on the same connections is not held back by it.
    let other = try granted(3, frames: 64)
    #expect(other >= 512 * 1024, "the other stream's window still goes back: \(other)")
    // The client reads: what was held goes out and the stream's window comes back.
    rig.stalledClient.release()
    rig.settle()
    let resumed = try granted(1, frames: 0)
    #expect(resumed >= 1 << 20, "the window owed is given back at once: \(resumed)")
  }

  @Test func aNativeGRPCDeadlineIsCappedAndShortenedForTheBackendAsTheRouteSays() throws {
    let rig = try Rig()
    var native = HPACKHeaders([
      (":method", "POST"), (":scheme", "http"), (":authority", "proxy"), (":path", "/demo.User/capped"),
      ("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "10S"),
    ])
    try rig.clientSends(.headers(.init(headers: native)), stream: 1)
    try rig.clientSends(Self.data(Self.message, end: true), stream: 1)
    guard case .headers(let head) = rig.backendFrames().first?.payload else {
      Issue.record("no request head upstream")
      return
    }
    // grpc_timeout_header_max 0.4 s caps the client's 10 s; the offset 0.1 s leaves the proxy
    // time to answer: the backend is told 300 ms, as Envoy tells it.
    #expect(head.headers[canonicalForm: "grpc-timeout"] == ["300m"])
    native.replaceOrAdd(name: "grpc-timeout", value: "200m")
    try rig.clientSends(.headers(.init(headers: native)), stream: 3)
    try rig.clientSends(Self.data(Self.message, end: true), stream: 3)
    guard case .headers(let second) = rig.backendFrames().first?.payload else {
      Issue.record("no second request head upstream")
      return
    }
    #expect(second.headers[canonicalForm: "grpc-timeout"] == ["100m"], "below the cap: only the offset comes off")
  }

  @Test func anHTTP2ConnectionWithNoStreamForTheIdleTimeoutIsDrainedOnTheLoopsClock() throws {
    let rig = try Rig(connectionOptions: "common_http_protocol_options: { idle_timeout: 1s }")
    try rig.clientSendsUnary("/demo.User/login")
    rig.advance(.milliseconds(800))
    try rig.backendSends(Self.responseHead, stream: 1)
    try rig.backendSends(Self.trailers("0"), stream: 1)
    _ = rig.clientFrames()
    rig.advance(.milliseconds(900))
    #expect(rig.clientFrames().isEmpty && rig.client.isActive, "1.7 s open, but a stream was open until 0.9 s ago")
    rig.advance(.milliseconds(100))
    #expect(rig.clientFrames().map(\.summary) == ["GOAWAY"], "1 s with no stream")
    #expect(!rig.client.isActive, "and closed")
  }

  @Test func anHTTP1ConnectionWithNoRequestForTheIdleTimeoutIsClosedOnTheLoopsClock() throws {
    let rig = try Rig(http1: true, connectionOptions: "common_http_protocol_options: { idle_timeout: 1s }")
    rig.advance(.milliseconds(600))
    try rig.clientSends(
      "POST /demo.User/login HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/grpc-web+proto\r\ncontent-length: 9\r\n\r\n",
      Self.message)
    rig.advance(.milliseconds(600))
    #expect(rig.client.isActive, "a request is in progress")
    try rig.backendSends(Self.responseHead, stream: 1)
    try rig.backendSends(Self.trailers("0"), stream: 1)
    _ = rig.clientBytes()
    rig.advance(.milliseconds(999))
    #expect(rig.client.isActive, "999 ms since the response ended")
    rig.advance(.milliseconds(1))
    #expect(!rig.client.isActive, "1 s: closed")
  }

  @Test func aClientThatResetsItsStreamCancelsTheUpstreamStream() throws {
    let rig = try Rig()
    try rig.clientSendsUnary("/demo.User/login")
    _ = rig.backendFrames()
    try rig.clientSends(.rstStream(.cancel), stream: 1)
    #expect(rig.backendFrames().map(\.summary) == ["RST_STREAM 1 CANCEL"])
    try rig.backendSends(Self.responseHead, stream: 1)
    #expect(rig.clientFrames().isEmpty, "a late answer goes nowhere")
  }
}

/// Keeps the writes that reach it, promises and all, until `release`: a socket whose peer has
/// stopped reading.
final class WriteHolder: ChannelOutboundHandler {
  typealias OutboundIn = Any
  private var held: [(NIOAny, EventLoopPromise<Void>?)] = []
  private var context: ChannelHandlerContext?

  func handlerAdded(context: ChannelHandlerContext) { self.context = context }

  func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
    self.held.append((data, promise))
  }

  func flush(context: ChannelHandlerContext) {}

  /// The peer reads again: everything held goes out.
  func release() {
    guard let context = self.context else { return }
    let held = self.held
    self.held = []
    for (data, promise) in held { context.write(data, promise: promise) }
    context.flush()
  }
}

extension EmbeddedChannel {
  /// The last `autoRead` the handlers set: false while they keep the client from sending more.
  var autoRead: Bool {
    for (option, value) in self.options.reversed() where option is ChannelOptions.Types.AutoReadOption {
      return value as! Bool
    }
    return true
  }
}

extension [HTTP2Frame] {
  /// The bytes of DATA among these frames.
  var dataBytes: Int {
    self.reduce(0) { total, frame in
      if case .data(let data) = frame.payload { return total + data.data.readableBytes }
      return total
    }
  }

  /// The window these frames give back on `stream`.
  func windowGiven(on stream: Int) -> Int {
    self.reduce(0) { total, frame in
      if case .windowUpdate(let increment) = frame.payload, Int(frame.streamID) == stream { return total + increment }
      return total
    }
  }
}

extension HTTP2Frame {
  var isWindowUpdate: Bool {
    if case .windowUpdate = self.payload { return true }
    return false
  }

  /// The frame's type, stream and what matters of it, for comparing sequences.
  var summary: String {
    let id = "\(Int(self.streamID))"
    switch self.payload {
    case .headers(let h): return "HEADERS \(id)\(h.endStream ? " END" : "")"
    case .data(let d): return "DATA \(id) \(d.data.readableBytes)\(d.endStream ? " END" : "")"
    case .rstStream(let code): return "RST_STREAM \(id) \(code == .cancel ? "CANCEL" : code == .noError ? "NO_ERROR" : "\(code)")"
    case .windowUpdate(let increment): return "WINDOW_UPDATE \(id) \(increment)"
    case .goAway: return "GOAWAY"
    case .settings: return "SETTINGS"
    case .ping: return "PING"
    default: return "other \(id)"
    }
  }
}
