import CNGHTTP2
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOSSL
import NIOTLS
import ProxyConfig

/// Every channel pipeline the proxy builds, in one place, and which HTTP/2 codec each uses.
///
///     listener, cleartext   [RequestBytesWatcher] → HTTP/1.1 codec → HTTP1ProxyHandler
///                           HTTP/2 codec → HTTP2ProxyConnectionHandler
///                           or ProtocolDetector, which builds one of those on the first bytes
///     listener, TLS         PlaintextGuard → SNI → NIOSSLServerHandler (the chain's) →
///                           TLSServerHandshakeHandler → one of the above, by ALPN
///     upstream connection   [NIOSSLClientHandler → UpstreamTLSHandshakeHandler] →
///                           HTTP/2 codec → UpstreamFrameHandler
///     admin listener        HTTP/1.1 server pipeline → AdminHandler
///
/// The HTTP/2 codec is nghttp2 (`NGHTTP2Handler`) on both sides, unless the environment
/// variables `GRPC_WEB_PROXY_UPSTREAM_CODEC` / `GRPC_WEB_PROXY_DOWNSTREAM_CODEC` say `niohttp2`.
/// On the reference benchmark nghttp2 upstream did 1.2 to 1.6 times the work per CPU-second of
/// swift-nio-http2, and with it on both sides the 1 MiB scenario went from 0.83 to 1.01 of
/// Envoy's and h2c unary from 2.07 to 2.55 (quick runs, same session): NIOHTTP2's decoder copies
/// every received byte once, nghttp2's hands DATA up in place. nghttp2 also sends a header block
/// larger than one frame as CONTINUATION frames.
enum Pipelines {
  static let upstreamUsesNGHTTP2 = Self.codecIsNGHTTP2("GRPC_WEB_PROXY_UPSTREAM_CODEC")
  static let downstreamUsesNGHTTP2 = Self.codecIsNGHTTP2("GRPC_WEB_PROXY_DOWNSTREAM_CODEC")

  private static func codecIsNGHTTP2(_ variable: String) -> Bool {
    guard let value = getenv(variable) else { return true }
    return String(cString: value) != "niohttp2"
  }

  // MARK: - Listeners

  /// A listener's connection, once admitted: TLS or cleartext, then HTTP/1.1 or HTTP/2 as the
  /// listener's codec (or the first bytes, or ALPN) says. `runtimes` are the listener's filter
  /// chains; a cleartext listener has one. The connection manager's connection stats follow
  /// the chain the connection ends up on.
  static func downstream(_ channel: any Channel, runtimes: [ListenerRuntime], tls: TLSListener?, stats: LoopStats) throws {
    if let tls {
      try Self.tls(
        channel, listener: tls, codec: { runtimes[$0].listener.codec },
        idleTimeout: { runtimes[$0].listener.idleTimeout.map { TimeAmount.nanoseconds($0.nanoseconds) } }
      ) { context, chain, proto, session in
        Self.countManagerConnection(context.channel, names: runtimes[chain].statNames, stats: stats)
        try Self.http(proto, context.pipeline.syncOperations, runtime: runtimes[chain], tls: session)
      }
      return
    }
    let runtime = runtimes[0]
    Self.countManagerConnection(channel, names: runtime.statNames, stats: stats)
    switch runtime.listener.codec {
    case .http1:
      try Self.http1(channel.pipeline.syncOperations, runtime: runtime)
    case .http2:
      try Self.http2(channel.pipeline.syncOperations, runtime: runtime)
    case .auto:
      let idle = runtime.listener.idleTimeout.map { TimeAmount.nanoseconds($0.nanoseconds) }
      let detector = ProtocolDetector(idleTimeout: idle) { context, proto in
        try Self.http(proto, context.pipeline.syncOperations, runtime: runtime)
      }
      try channel.pipeline.syncOperations.addHandler(detector)
    }
  }

  /// A TLS listener's connection: plaintext check, SNI, then the chain's TLS handler; once the
  /// handshake is done, HTTP/2 or HTTP/1.1 by ALPN (or by the first bytes, without ALPN).
  private static func tls(
    _ channel: any Channel, listener: TLSListener, codec: @escaping (Int) -> CodecType,
    idleTimeout: @escaping (Int) -> TimeAmount? = { _ in nil },
    configureHTTP: @escaping (ChannelHandlerContext, Int, ProtocolDetector.Detected, TLSSessionInfo) throws -> Void
  ) throws {
    let tracker = TLSHandshakeTracker(listener: listener, channel: channel)
    let timeout = listener.chains.map(\.tls.handshakeTimeout).max() ?? DownstreamTLS.defaultHandshakeTimeout
    tracker.start(timeout: timeout)
    let sync = channel.pipeline.syncOperations
    try sync.addHandler(PlaintextGuard(tracker: tracker))
    let sni = SNIHandler { result in
      let serverName: String?
      if case .hostname(let name) = result { serverName = name } else { serverName = nil }
      guard !tracker.isDone else { return channel.eventLoop.makeSucceededVoidFuture() }
      guard let index = listener.chainIndex(serverName: serverName) else {
        tracker.refuse(.noFilterChain(serverName: serverName))
        return channel.eventLoop.makeSucceededVoidFuture()
      }
      tracker.choseChain(index)
      let chain = listener.chains[index]
      let ssl = NIOSSLServerHandler(context: chain.context.current)
      let handshake = TLSServerHandshakeHandler(
        tracker: tracker, chain: chain, codec: codec(index), idleTimeout: idleTimeout(index), sslHandler: ssl
      ) {
        context, proto, peerSubject in
        try configureHTTP(context, index, proto, TLSSessionInfo(serverName: serverName, peerSubject: peerSubject))
      }
      do {
        try channel.pipeline.syncOperations.addHandlers([ssl, handshake])
      } catch {
        tracker.refuse(.handshake("\(error)"))
      }
      return channel.eventLoop.makeSucceededVoidFuture()
    }
    try sync.addHandler(ByteToMessageHandler(sni))
  }

  private static func countManagerConnection(_ channel: any Channel, names: HTTPStatNames, stats: LoopStats) {
    stats.managerConnectionOpened(names)
    channel.closeFuture.assumeIsolated().whenComplete { _ in stats.managerConnectionClosed(names) }
  }

  private static func http(
    _ proto: ProtocolDetector.Detected, _ pipeline: ChannelPipeline.SynchronousOperations, runtime: ListenerRuntime,
    tls: TLSSessionInfo? = nil
  ) throws {
    switch proto {
    case .http1: try Self.http1(pipeline, runtime: runtime, tls: tls)
    case .http2: try Self.http2(pipeline, runtime: runtime, tls: tls)
    }
  }

  /// - Parameter tls: the TLS session under the connection, nil for cleartext. Its scheme is
  ///   `https`: HTTP/1.1 requests do not say (HTTP/2 ones carry `:scheme`), and the backend hears
  ///   it as `x-forwarded-proto`.
  static func http1(_ pipeline: ChannelPipeline.SynchronousOperations, runtime: ListenerRuntime, tls: TLSSessionInfo? = nil) throws {
    // NIO's decoder enforces the listener's header limits while it parses, so an oversized
    // request is never held in full; HTTP1ProxyHandler answers its errors (431 or 400).
    var limits = NIOHTTPDecoderLimitConfiguration()
    limits.maxHeaderFieldSize = runtime.listener.headerLimits.maxBytes
    limits.maxHeaderListSize = runtime.listener.headerLimits.maxBytes
    limits.maxHeaderFieldCount = runtime.listener.headerLimits.maxCount
    let handler = HTTP1ProxyHandler(runtime: runtime, tls: tls)
    if let timeout = runtime.listener.requestHeadersTimeout {
      // Right before the decoder: after TLS and protocol detection, so it sees every byte the
      // decoder sees, and its 408 is encrypted like any answer.
      try pipeline.addHandler(RequestBytesWatcher(handler, timeout: .nanoseconds(timeout.nanoseconds)))
    }
    try pipeline.configureHTTPServerPipeline(
      withPipeliningAssistance: true, withErrorHandling: false, withOutboundHeaderValidation: true,
      withEncoderConfiguration: .init(), withDecoderLimitConfiguration: limits)
    try pipeline.addHandler(handler)
  }

  static func http2(_ pipeline: ChannelPipeline.SynchronousOperations, runtime: ListenerRuntime, tls: TLSSessionInfo? = nil) throws {
    try pipeline.addHandler(
      Self.http2ServerCodec(limits: runtime.listener.headerLimits, options: runtime.listener.http2, allocator: ByteBufferAllocator()))
    try pipeline.addHandler(HTTP2ProxyConnectionHandler(runtime: runtime, tls: tls))
  }

  /// The HTTP/2 server codec for a listener's connection.
  ///
  /// The header list size it advertises (and its decoder enforces) is twice the listener's limit
  /// and room for HPACK's 32 bytes a header: a request between the limit and that gets 431 on its
  /// own stream (ProxyCall), the connection carries on; beyond it nghttp2 resets that stream
  /// (NIOHTTP2 ends the connection), so memory stays bounded.
  static func http2ServerCodec(limits: HeaderLimits, options: HTTP2Options, allocator: ByteBufferAllocator) -> any ChannelHandler {
    let decoderLimit = min(2 * limits.maxBytes + 32 * min(limits.maxCount, 10_000), Int(UInt32.max))
    if Self.downstreamUsesNGHTTP2 {
      let settings = [
        nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS.rawValue), value: UInt32(options.maxConcurrentStreams)),
        nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue), value: UInt32(options.initialStreamWindow)),
        nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE.rawValue), value: UInt32(decoderLimit)),
      ]
      return NGHTTP2Handler(mode: .server, initialSettings: settings, connectionWindow: options.initialConnectionWindow,
        maxHeaderBlock: decoderLimit, allocator: allocator)
    }
    var configuration = NIOHTTP2Handler.ConnectionConfiguration()
    configuration.initialSettings = [
      HTTP2Setting(parameter: .maxConcurrentStreams, value: options.maxConcurrentStreams),
      HTTP2Setting(parameter: .initialWindowSize, value: options.initialStreamWindow),
      HTTP2Setting(parameter: .maxHeaderListSize, value: decoderLimit),
    ]
    // A block that size arrives as HEADERS and CONTINUATION frames of 16 KiB each.
    configuration.maximumSequentialContinuationFrames = max(5, decoderLimit / 16_384 + 1)
    // Frames a client sends on streams the proxy has reset are ignored, not a protocol error.
    configuration.maximumRecentlyResetStreams = 1000
    return NIOHTTP2Handler(mode: .server, connectionConfiguration: configuration)
  }

  static func admin(_ channel: any Channel, status: ProxyStatus, accessLog: AdminAccessLog?) throws {
    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
    try channel.pipeline.syncOperations.addHandler(AdminHandler(status: status, accessLog: accessLog))
  }

  // MARK: - Upstream

  /// A connection to one backend endpoint: TLS if its cluster says so, then HTTP/2 with the
  /// connection's frame handler above it.
  static func upstream(_ channel: any Channel, connection: UpstreamConnection, tls: UpstreamTLSClient?) throws {
    let pipeline = channel.pipeline.syncOperations
    if let tls {
      let ssl = try NIOSSLClientHandler(context: tls.context.current, serverHostname: tls.settings.sni)
      try pipeline.addHandler(ssl)
      try pipeline.addHandler(UpstreamTLSHandshakeHandler(settings: tls.settings, connection: connection, sslHandler: ssl))
    }
    if Self.upstreamUsesNGHTTP2 {
      try pipeline.addHandler(
        NGHTTP2Handler(initialSettings: Self.upstreamSettings, connectionWindow: UpstreamConnection.connectionWindow, allocator: channel.allocator))
    } else {
      try pipeline.addHandler(
        NIOHTTP2Handler(mode: .client, connectionConfiguration: Self.upstreamConfiguration, streamConfiguration: Self.upstreamStreamConfiguration))
    }
    try pipeline.addHandler(UpstreamFrameHandler(connection: connection, awaitsTLS: tls != nil))
  }

  static let upstreamSettings: [nghttp2_settings_entry] = [
    nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_ENABLE_PUSH.rawValue), value: 0),
    nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS.rawValue), value: 1000),
    nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue), value: UInt32(UpstreamConnection.streamWindow)),
    nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE.rawValue), value: 1 << 16),
  ]

  /// The same settings for swift-nio-http2.
  private static let upstreamConfiguration: NIOHTTP2Handler.ConnectionConfiguration = {
    var configuration = NIOHTTP2Handler.ConnectionConfiguration()
    configuration.initialSettings = [
      HTTP2Setting(parameter: .enablePush, value: 0),
      HTTP2Setting(parameter: .maxConcurrentStreams, value: 1000),
      HTTP2Setting(parameter: .initialWindowSize, value: UpstreamConnection.streamWindow),
      HTTP2Setting(parameter: .maxHeaderListSize, value: 1 << 16),
    ]
    // When many calls are cancelled at once (clients gone), their responses may already be
    // on the way. NIOHTTP2 ignores frames for streams it remembers resetting and treats
    // the rest as a protocol error that kills the connection: remember them all.
    configuration.maximumRecentlyResetStreams = 4096
    // As for the stream configuration below: the backend's pings and stream errors over a
    // long-lived connection are not an attack on the proxy.
    configuration.controlFrameRateLimit.maximumCount = 64
    configuration.controlFrameRateLimit.windowLength = .nanoseconds(1)
    configuration.maximumConnectionGlitches = .max
    return configuration
  }()

  /// swift-nio-http2's defences against a hostile peer (at most 200 RST_STREAM, stream errors or
  /// PING/SETTINGS frames in 30 s, then GOAWAY ENHANCE_YOUR_CALM) are meant for a server facing
  /// clients. Here the peer is the proxy's own backend, and its resets are ordinary: grpc-go sends
  /// RST_STREAM(NO_ERROR) for every call it answers before the request's END_STREAM arrives, and
  /// pings for its window estimates. Counting them would throw away a healthy connection and
  /// every call on it. The window of one nanosecond keeps the heuristics' bookkeeping (a queue of
  /// at most a few timestamps) without ever tripping them.
  private static let upstreamStreamConfiguration: NIOHTTP2Handler.StreamConfiguration = {
    var configuration = NIOHTTP2Handler.StreamConfiguration()
    configuration.streamResetFrameRateLimit.maximumCount = 64
    configuration.streamResetFrameRateLimit.windowLength = .nanoseconds(1)
    configuration.streamErrorRateLimit.maximumCount = 64
    configuration.streamErrorRateLimit.windowLength = .nanoseconds(1)
    return configuration
  }()
}
