import Logging
import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix
import NIOTLS
import ProxyConfig

/// What a call hears from its upstream stream.
protocol UpstreamStreamDelegate: AnyObject {
  func upstreamHeaders(_ headers: HPACKHeaders, endStream: Bool)
  func upstreamData(_ data: ByteBuffer, endStream: Bool)
  /// The stream closed before the call saw its end: reset, refused, or the connection was lost.
  /// `unprocessed`: the server said it never processed the stream (REFUSED_STREAM, or above the
  /// last stream of its GOAWAY), or its HEADERS were never sent; the call may go elsewhere.
  func upstreamClosed(reason: String, unprocessed: Bool)
  /// The request's header block cannot go to this backend (over its
  /// SETTINGS_MAX_HEADER_LIST_SIZE, or too big for one frame); nothing was sent and the
  /// connection carries on.
  func upstreamRefusedHeaders(_ message: String)
  /// `bytes` of request body written earlier have left for the backend (NIOHTTP2 holds DATA
  /// back while the backend's window is shut, and completes the write when it goes out).
  func upstreamDataSent(_ bytes: Int)
}

extension UpstreamStreamDelegate {
  func upstreamRefusedHeaders(_ message: String) {
    self.upstreamClosed(reason: message, unprocessed: false)
  }

  func upstreamDataSent(_ bytes: Int) {}
}

/// A call's stream on an upstream connection: the handle the call writes through.
struct UpstreamStream: Equatable {
  let connection: UpstreamConnection
  let id: HTTP2StreamID

  static func == (a: UpstreamStream, b: UpstreamStream) -> Bool {
    a.connection === b.connection && a.id == b.id
  }

  func write(_ payload: HTTP2Frame.FramePayload) {
    self.connection.write(payload, on: self.id)
  }

  /// Resets the stream (RST_STREAM CANCEL) if it is still open.
  func cancel() {
    self.connection.cancel(self.id)
  }

  /// Forgets a stream that ended normally.
  func release() {
    self.connection.release(self.id)
  }

  /// Gives back receive window for data the call has passed on, or holds it while the call's
  /// client is not reading: that is the backpressure from a slow browser to the backend.
  func setPaused(_ paused: Bool) {
    self.connection.setPaused(paused, stream: self.id)
  }
}

/// One HTTP/2 connection to one upstream endpoint, with its calls' streams in a table.
///
/// Frames are handled on the connection channel itself, with no channel per stream: a stream is
/// an entry in `streams`, opened by writing HEADERS with the next odd stream ID. NIOHTTP2's
/// handler still keeps the protocol state, outbound flow control and the peer's concurrency
/// limit; this class returns receive window as calls consume data, and coalesces flushes into
/// one per event-loop tick.
///
/// Its lifecycle (`idle → connecting → ready → draining → closed`) is the pure
/// `UpstreamConnectionState`; this class performs what it decides, and holds the channel's
/// context while it is open.
final class UpstreamConnection {
  typealias Completion = (Result<UpstreamStream, UpstreamUnavailable>) -> Void
  typealias Waiter = (delegate: any UpstreamStreamDelegate, completion: Completion)

  /// A class, so that a frame costs one table lookup and no write-back.
  private final class StreamEntry {
    let delegate: any UpstreamStreamDelegate
    var window = StreamReceiveWindow(size: UpstreamConnection.streamWindow)

    init(delegate: any UpstreamStreamDelegate) { self.delegate = delegate }
  }

  /// Receive window per stream (our SETTINGS_INITIAL_WINDOW_SIZE) and for the connection.
  static let streamWindow = 1 << 20
  static let connectionWindow = 16 << 20

  let endpoint: HostAndPort
  private let eventLoop: any EventLoop
  private let connectTimeout: ProxyDuration
  private let tls: UpstreamTLSClient?
  private let logger: Logger
  private let onClose: (UpstreamConnection) -> Void
  private let onConnected: () -> Void
  private var lifecycle = UpstreamConnectionState<Waiter>()
  /// The frame handler's context, from connected to closed.
  private var context: ChannelHandlerContext?
  /// The server's SETTINGS_MAX_CONCURRENT_STREAMS (no limit until it says).
  private var peerMaxStreams = Int.max
  /// The backend's SETTINGS_MAX_HEADER_LIST_SIZE (unlimited until it says) and
  /// SETTINGS_MAX_FRAME_SIZE (16 KiB until it says).
  private var peerMaxHeaderListSize = Int.max
  private var peerMaxFrameSize = 16_384
  private let keepalive: (interval: TimeAmount, timeout: TimeAmount)?
  private var keepaliveTask: Scheduled<Void>?
  private var pingTimeout: Scheduled<Void>?
  private var streams: [HTTP2StreamID: StreamEntry] = [:]
  private var nextStreamID: Int32 = 1
  private var flushes = FlushCoalescer()

  /// Makes a connection's channel, in place of a socket: the tests put connections on
  /// `EmbeddedChannel`s. The channel must end in `UpstreamFrameHandler`, whose activation reports
  /// the connection ready; a connector that cannot make one calls `connectFailed`.
  typealias Connector = (UpstreamConnection) -> Void

  private let connector: Connector?

  init(
    endpoint: HostAndPort,
    eventLoop: any EventLoop,
    connectTimeout: ProxyDuration,
    logger: Logger,
    keepalive: (interval: ProxyDuration, timeout: ProxyDuration)? = nil,
    tls: UpstreamTLSClient? = nil,
    connector: Connector? = nil,
    onConnected: @escaping () -> Void = {},
    onClose: @escaping (UpstreamConnection) -> Void
  ) {
    self.connector = connector
    self.endpoint = endpoint
    self.eventLoop = eventLoop
    self.connectTimeout = connectTimeout
    self.tls = tls
    self.logger = logger
    self.keepalive = keepalive.map {
      (.nanoseconds(max($0.interval.nanoseconds, 10_000_000)), .nanoseconds(max($0.timeout.nanoseconds, 10_000_000)))
    }
    self.onConnected = onConnected
    self.onClose = onClose
  }

  /// Whether the pool has let go of it (draining or closed).
  var draining: Bool { self.lifecycle.isDraining }

  /// Ready or draining: the context to write through.
  private var openContext: ChannelHandlerContext? {
    self.lifecycle.isOpen ? self.context : nil
  }

  /// Calls in flight on this connection (LEAST_REQUEST compares them).
  var activeStreams: Int {
    self.lifecycle.isConnecting ? self.lifecycle.waiting : self.streams.count
  }

  /// Whether another call fits under the server's concurrent stream limit.
  var hasCapacity: Bool {
    self.lifecycle.hasCapacity(active: self.activeStreams, peerMaxStreams: self.peerMaxStreams)
  }

  var isReady: Bool { self.lifecycle.isReady }

  // MARK: - Opening streams

  func openStream(for delegate: any UpstreamStreamDelegate, completion: @escaping Completion) {
    switch self.lifecycle.open((delegate, completion)) {
    case .connect:
      self.startConnecting()
    case .wait:
      break
    case .register(let waiter):
      waiter.completion(self.register(waiter.delegate))
    case .refuse(let waiter):
      waiter.completion(.failure(UpstreamUnavailable(reason: "connection termination", notSent: true)))
    }
  }

  private func register(_ delegate: any UpstreamStreamDelegate) -> Result<UpstreamStream, UpstreamUnavailable> {
    guard self.nextStreamID < Int32.max - 2 else {
      // Stream IDs are spent: this connection takes no more calls; a new one will.
      self.retire()
      return .failure(UpstreamUnavailable(reason: "connection termination", notSent: true))
    }
    let id = HTTP2StreamID(self.nextStreamID)
    self.nextStreamID += 2
    self.streams[id] = StreamEntry(delegate: delegate)
    return .success(UpstreamStream(connection: self, id: id))
  }

  private func startConnecting() {
    if let connector = self.connector {
      connector(self)
      return
    }
    let address: SocketAddress
    do {
      if let path = self.endpoint.unixSocketPath {
        address = try SocketAddress(unixDomainSocketPath: path)
      } else {
        address = try SocketAddress(ipAddress: self.endpoint.host, port: self.endpoint.port)
      }
    } catch {
      self.connectFailed(reason: "local connection failure, bad address \(self.endpoint)")
      return
    }
    let timeout = TimeAmount.nanoseconds(max(self.connectTimeout.nanoseconds, 1_000_000))
    let bound = NIOLoopBound(self, eventLoop: self.eventLoop)
    let tls = self.tls
    var bootstrap = ClientBootstrap(group: self.eventLoop).connectTimeout(timeout)
      // Envoy's default per_connection_buffer_limit_bytes for a cluster, as the write buffer's
      // high watermark; NIO's 64 KiB flipped writability several times per large request.
      .channelOption(.writeBufferWaterMark, value: .init(low: 512 * 1024, high: 1024 * 1024))
      .channelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 16 * 1024, maximum: 256 * 1024))
      // One read per wake-up (see ProxyServer's listener options): NIOHTTP2 appends each read to
      // what is left of the previous one, and while that read's DATA is still queued for the
      // other side the append copies the whole previous buffer first.
      .channelOption(.maxMessagesPerRead, value: 1)
    if self.endpoint.unixSocketPath == nil {
      bootstrap = bootstrap.channelOption(.tcpOption(.tcp_nodelay), value: 1)
    }
    let future = bootstrap
      .channelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
          try Pipelines.upstream(channel, connection: bound.value, tls: tls)
        }
      }
      .connect(to: address)
    future.assumeIsolated().whenFailure { error in
      self.connectFailed(reason: Self.describe(error))
    }
  }

  /// The frame handler is active: streams can be opened.
  fileprivate func connected(_ context: ChannelHandlerContext) {
    let waiters: [Waiter]
    switch self.lifecycle.connected() {
    case .register(let list): waiters = list
    case .none: return
    case .close:
      context.close(promise: nil)
      return
    }
    self.logger.debug("upstream connected", metadata: ["endpoint": "\(self.endpoint)"])
    self.context = context
    self.onConnected()
    self.startKeepalive(context)
    if !Pipelines.upstreamUsesNGHTTP2 {
      // The connection's receive window starts at 64 KiB whatever the settings say; nghttp2
      // opens and tops up its own (Pipelines.upstream gives it the size).
      let raise = Self.connectionWindow - ConnectionReceiveWindow.initial
      context.write(NIOAny(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: raise))), promise: nil)
    }
    for (delegate, completion) in waiters {
      completion(self.register(delegate))
    }
    self.scheduleFlush()
  }

  func connectFailed(reason: String) {
    guard let failed = self.lifecycle.connectFailed() else { return }
    self.reportConnectFailure(failed, reason: reason)
  }

  private func reportConnectFailure(_ failed: UpstreamConnectionState<Waiter>.FailedAction, reason: String) {
    self.logger.info("upstream connect failed", metadata: ["endpoint": "\(self.endpoint)", "reason": "\(reason)"])
    if failed.forget { self.onClose(self) }
    for waiter in failed.waiters {
      waiter.completion(.failure(UpstreamUnavailable(reason: reason, connectFailure: true)))
    }
  }

  // MARK: - Writing

  fileprivate func write(_ payload: HTTP2Frame.FramePayload, on id: HTTP2StreamID) {
    guard let context = self.openContext, self.streams[id] != nil else { return }
    var promise: EventLoopPromise<Void>?
    if case .headers(let headers) = payload, let problem = self.headerBlockProblem(headers.headers) {
      // Sent, it would cost the connection (NIOHTTP2 cannot split a block into CONTINUATION
      // frames and fails the whole connection; a backend over its list size may do the same),
      // and every other call on it with this one. Refuse this call only.
      guard let entry = self.streams.removeValue(forKey: id) else { return }
      self.logger.debug("request headers refused", metadata: ["endpoint": "\(self.endpoint)", "problem": "\(problem)"])
      entry.delegate.upstreamRefusedHeaders(problem)
      self.closeIfDrained()
      return
    }
    if case .data(let data) = payload, data.data.readableBytes > 0 {
      // Told when it is out, so that the call reads its client no faster than the backend takes
      // the body (ProxyCall.sendUpstream).
      let bytes = data.data.readableBytes
      let p = context.eventLoop.makePromise(of: Void.self)
      p.futureResult.assumeIsolated().whenComplete { _ in self.streams[id]?.delegate.upstreamDataSent(bytes) }
      promise = p
    } else if case .headers = payload {
      // The stream starts with this frame; if NIOHTTP2 refuses it (after a GOAWAY, say), the
      // call must hear so rather than wait for a response that cannot come.
      let p = context.eventLoop.makePromise(of: Void.self)
      p.futureResult.assumeIsolated().whenFailure { _ in self.streamFailed(id) }
      promise = p
    }
    context.write(NIOAny(HTTP2Frame(streamID: id, payload: payload)), promise: promise)
    self.scheduleFlush()
  }

  /// Why a header block cannot be sent to this backend, or nil. The list size is counted as
  /// HTTP/2 counts it (name, value and 32 bytes a header); the frame size against an upper
  /// bound of the HPACK encoding (a literal with both lengths), since the block must fit in
  /// one HEADERS frame.
  private func headerBlockProblem(_ headers: HPACKHeaders) -> String? {
    var listSize = 0
    var encodedBound = 0
    for (name, value, _) in headers {
      listSize += name.utf8.count + value.utf8.count + 32
      encodedBound += name.utf8.count + value.utf8.count + 11
    }
    if listSize > self.peerMaxHeaderListSize {
      return "request headers of \(listSize) bytes are more than the backend accepts (its SETTINGS_MAX_HEADER_LIST_SIZE is \(self.peerMaxHeaderListSize))"
    }
    if encodedBound > self.peerMaxFrameSize && !Pipelines.upstreamUsesNGHTTP2 {
      return "request headers of up to \(encodedBound) bytes encoded do not fit the backend's HTTP/2 frame size (\(self.peerMaxFrameSize))"
    }
    return nil
  }

  private func streamFailed(_ id: HTTP2StreamID) {
    guard let entry = self.streams.removeValue(forKey: id) else { return }
    entry.delegate.upstreamClosed(reason: "connection termination", unprocessed: true)
    self.retire()
    self.closeIfDrained()
  }

  fileprivate func cancel(_ id: HTTP2StreamID) {
    guard self.streams.removeValue(forKey: id) != nil, let context = self.openContext else { return }
    context.write(NIOAny(HTTP2Frame(streamID: id, payload: .rstStream(.cancel))), promise: nil)
    self.scheduleFlush()
    self.closeIfDrained()
  }

  fileprivate func release(_ id: HTTP2StreamID) {
    self.streams.removeValue(forKey: id)
    self.closeIfDrained()
  }

  fileprivate func setPaused(_ paused: Bool, stream id: HTTP2StreamID) {
    guard let entry = self.streams[id], let increment = entry.window.setPaused(paused) else { return }
    self.returnWindow(id, increment)
  }

  /// One flush per event-loop tick, however many calls wrote in it.
  private func scheduleFlush() {
    guard self.flushes.request() else { return }
    self.eventLoop.assumeIsolated().execute {
      self.flushes.flushing()
      self.openContext?.flush()
    }
  }

  private func returnWindow(_ id: HTTP2StreamID, _ increment: Int) {
    guard let context = self.openContext else { return }
    context.write(NIOAny(HTTP2Frame(streamID: id, payload: .windowUpdate(windowSizeIncrement: increment))), promise: nil)
    self.scheduleFlush()
  }

  // MARK: - Reading

  fileprivate func received(_ frame: HTTP2Frame, context: ChannelHandlerContext) {
    switch frame.payload {
    case .headers(let headers):
      guard let entry = self.streams[frame.streamID] else { return }
      if headers.endStream { entry.window.senderEnd() }
      entry.delegate.upstreamHeaders(headers.headers, endStream: headers.endStream)
    case .data(let data):
      let length = data.data.readableBytes + (data.paddingBytes ?? 0)
      guard let entry = self.streams[frame.streamID] else { return }
      if case .byteBuffer(let buffer) = data.data {
        entry.delegate.upstreamData(buffer, endStream: data.endStream)
      }
      // After the call had the data: it may have paused the stream, or ended and let it go.
      if let increment = entry.window.received(length, endStream: data.endStream), self.streams[frame.streamID] === entry {
        self.returnWindow(frame.streamID, increment)
      }
    case .rstStream(let code):
      guard let entry = self.streams.removeValue(forKey: frame.streamID) else { return }
      entry.delegate.upstreamClosed(reason: code == .refusedStream ? "remote refused stream reset" : "remote reset",
        unprocessed: code == .refusedStream)
      self.closeIfDrained()
    case .settings(.settings(let settings)):
      for setting in settings {
        switch setting.parameter {
        case .maxConcurrentStreams: self.peerMaxStreams = max(1, setting.value)
        case .maxHeaderListSize: self.peerMaxHeaderListSize = setting.value
        case .maxFrameSize: self.peerMaxFrameSize = setting.value
        default: break
        }
      }
    case .ping(_, ack: true):
      self.pingTimeout?.cancel()
      self.pingTimeout = nil
    case .goAway(let lastStreamID, _, _):
      // New calls go to a new connection; calls above lastStreamID were never processed and go
      // elsewhere (NIOHTTP2 closes their streams right after this frame); the rest finish here.
      self.logger.debug("upstream GOAWAY", metadata: ["endpoint": "\(self.endpoint)", "lastStreamID": "\(lastStreamID)"])
      self.retire()
      let unprocessed = self.streams.keys.filter { $0 > lastStreamID }.sorted()
      for id in unprocessed {
        guard let entry = self.streams.removeValue(forKey: id) else { continue }
        entry.delegate.upstreamClosed(reason: "connection termination", unprocessed: true)
      }
      self.closeIfDrained()
    default:
      break
    }
  }

  /// The connection's receive window changed. It is topped up from its size, not from what calls
  /// consumed: DATA for a stream already reset never reaches a call, and counting consumption
  /// would leak that window until the backend could send nothing at all.
  fileprivate func connectionWindowChanged(inbound: Int) {
    guard let increment = ConnectionReceiveWindow.topUp(size: Self.connectionWindow, inbound: inbound),
      let context = self.openContext
    else { return }
    context.write(NIOAny(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: increment))), promise: nil)
    self.scheduleFlush()
  }

  /// NIOHTTP2 closed a stream: both ends done, or reset (by either side or by GOAWAY).
  fileprivate func streamClosed(_ event: StreamClosedEvent) {
    guard let entry = self.streams.removeValue(forKey: event.streamID) else { return }
    if let reason = event.reason {
      entry.delegate.upstreamClosed(reason: reason == .refusedStream ? "remote refused stream reset" : "remote reset",
        unprocessed: reason == .refusedStream)
    } else {
      entry.delegate.upstreamClosed(reason: "connection termination", unprocessed: false)
    }
    self.closeIfDrained()
  }

  /// PINGs every interval; no answer within the timeout means the peer is gone: close, so its
  /// calls end with a status now rather than hang until TCP gives up, minutes later.
  private func startKeepalive(_ context: ChannelHandlerContext) {
    guard let (interval, timeout) = self.keepalive else { return }
    self.keepaliveTask = self.eventLoop.assumeIsolated().scheduleTask(in: interval) {
      guard let context = self.openContext else { return }
      if self.pingTimeout == nil {
        context.write(NIOAny(HTTP2Frame(streamID: .rootStream, payload: .ping(HTTP2PingData(withInteger: 0x6b65_6570_616c_6976), ack: false))), promise: nil)
        self.scheduleFlush()
        self.pingTimeout = self.eventLoop.assumeIsolated().scheduleTask(in: timeout) {
          self.logger.warning("upstream \(self.endpoint) did not answer a PING within \(timeout.nanoseconds / 1_000_000) ms: closing its connection")
          self.openContext?.close(promise: nil)
        }
      }
      self.startKeepalive(context)
    }
  }

  private func stopKeepalive() {
    self.keepaliveTask?.cancel()
    self.keepaliveTask = nil
    self.pingTimeout?.cancel()
    self.pingTimeout = nil
  }

  fileprivate func channelClosed() {
    self.stopKeepalive()
    let streams = self.streams
    self.streams.removeAll()
    self.context = nil
    let forget: Bool
    switch self.lifecycle.channelClosed() {
    case .connectFailed(let failed):
      self.reportConnectFailure(failed, reason: "remote connection failure")
      return
    case .endStreams(let forgetNow):
      forget = forgetNow
    }
    if forget { self.onClose(self) }
    for entry in streams.values {
      entry.delegate.upstreamClosed(reason: "connection termination", unprocessed: false)
    }
  }

  fileprivate func connectionError(_ error: any Error) {
    self.logger.debug("upstream connection error", metadata: ["endpoint": "\(self.endpoint)", "error": "\(error)"])
    self.retire()
  }

  // MARK: - Draining

  /// Takes no new calls; closes once the calls in flight are done.
  func retire() {
    switch self.lifecycle.retire() {
    case .failWaiters(let waiters, let forget):
      if forget { self.onClose(self) }
      for waiter in waiters {
        waiter.completion(.failure(UpstreamUnavailable(reason: "connection termination", notSent: true)))
      }
    case .drain(let forget):
      if forget { self.onClose(self) }
      self.closeIfDrained()
    case .none(let forget):
      if forget { self.onClose(self) }
    }
  }

  private func closeIfDrained() {
    guard self.lifecycle.shouldClose(streamsLeft: self.streams.count), let context = self.context else { return }
    context.close(promise: nil)
  }

  /// A failed connect as Envoy 1.40 names it in the reset reason ("remote connection failure",
  /// "connection timeout"), then the cause in words for whoever reads the message: never an
  /// errno.
  static func describe(_ error: any Error) -> String {
    if case ChannelError.connectTimeout = error { return "connection timeout" }
    if let io = error as? IOError {
      if io.errnoCode == ECONNREFUSED { return "remote connection failure, connection refused" }
      return "remote connection failure, " + String(cString: strerror(io.errnoCode)).lowercased()
    }
    if let multiple = error as? NIOConnectionError, let first = multiple.connectionErrors.first {
      return Self.describe(first.error)
    }
    return "remote connection failure, \(error)"
  }
}

/// The last handler of an upstream connection's pipeline: hands frames and events to the
/// connection object.
final class UpstreamFrameHandler: ChannelInboundHandler {
  typealias InboundIn = HTTP2Frame
  typealias OutboundOut = HTTP2Frame

  private let connection: UpstreamConnection
  /// Over TLS the connection is usable once the handshake is done, not when TCP connects.
  private let awaitsTLS: Bool

  init(connection: UpstreamConnection, awaitsTLS: Bool = false) {
    self.connection = connection
    self.awaitsTLS = awaitsTLS
  }

  func channelActive(context: ChannelHandlerContext) {
    if !self.awaitsTLS { self.connection.connected(context) }
    context.fireChannelActive()
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    self.connection.received(self.unwrapInboundIn(data), context: context)
  }

  func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
    // Most frequent first: NIOHTTP2 reports a window change for nearly every DATA frame, and a
    // cast from Any costs a runtime lookup each time.
    if let window = event as? NIOHTTP2WindowUpdatedEvent {
      if window.streamID == .rootStream, let inbound = window.inboundWindowSize {
        self.connection.connectionWindowChanged(inbound: inbound)
      }
    } else if let closed = event as? StreamClosedEvent {
      self.connection.streamClosed(closed)
    } else if self.awaitsTLS, case .handshakeCompleted = event as? TLSUserEvent {
      self.connection.connected(context)
    }
    context.fireUserInboundEventTriggered(event)
  }

  func channelInactive(context: ChannelHandlerContext) {
    self.connection.channelClosed()
    context.fireChannelInactive()
  }

  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    // A frame for a stream already closed concerns that stream only. Anything else may have
    // made NIOHTTP2 send GOAWAY, after which the connection takes no new streams: new calls go
    // to a new connection, and this one closes when its calls are done.
    if error is NIOHTTP2Errors.StreamClosed || error is NIOHTTP2Errors.StreamError { return }
    self.connection.connectionError(error)
  }
}
