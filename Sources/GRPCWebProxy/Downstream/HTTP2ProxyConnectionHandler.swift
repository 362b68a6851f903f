import GRPCWebCore
import NIOCore
import NIOHPACK
import NIOHTTP2
import ProxyConfig

/// Serves a downstream HTTP/2 connection: each stream is one call, kept in a table on the
/// connection channel rather than in a channel of its own.
///
/// NIOHTTP2's handler keeps the protocol state, the peer's flow control and the concurrency
/// limit; this handler returns receive window as calls consume request bodies, and writes all
/// streams' responses with one flush per event-loop tick.
final class HTTP2ProxyConnectionHandler: ChannelInboundHandler, DrainableConnection {
  typealias InboundIn = HTTP2Frame
  typealias OutboundOut = HTTP2Frame

  /// The receive windows granted to the client (the connection manager's
  /// `http2_protocol_options`).
  private var streamWindow: Int { self.runtime.listener.http2.initialStreamWindow }
  private var connectionWindow: Int { self.runtime.listener.http2.initialConnectionWindow }

  private let runtime: ListenerRuntime
  private var streams: [HTTP2StreamID: HTTP2DownstreamStream] = [:]
  private var context: ChannelHandlerContext?
  private var flushes = FlushCoalescer()
  /// The highest stream the client opened: what GOAWAY names as the last one processed.
  private var lastStreamID = HTTP2StreamID(0)
  private var draining = false
  /// Since when no stream has been open, on the loop's clock (`EventLoop.now`).
  private var lastActivity = NIODeadline.uptimeNanoseconds(0)
  private var idleTask: Scheduled<Void>?

  /// `https` behind TLS (see ProxyCall.connectionScheme).
  private var scheme: String { self.tls == nil ? "http" : "https" }

  private let tls: TLSSessionInfo?

  init(runtime: ListenerRuntime, tls: TLSSessionInfo? = nil) {
    self.tls = tls
    self.runtime = runtime
  }

  func handlerAdded(context: ChannelHandlerContext) {
    self.context = context
    self.runtime.connections.add(self)
    self.lastActivity = context.eventLoop.now
    if let idle = self.runtime.listener.idleTimeout { self.scheduleIdleCheck(in: .nanoseconds(idle.nanoseconds)) }
    // Added after protocol detection, the channel is already active (and NIOHTTP2 has sent
    // its preface): channelActive will not come.
    if context.channel.isActive { self.raiseConnectionWindow(context: context, from: ConnectionReceiveWindow.initial) }
  }

  func handlerRemoved(context: ChannelHandlerContext) {
    self.context = nil
    self.runtime.connections.remove(self)
    self.idleTask?.cancel()
  }

  /// `idle_timeout`: with no stream open for that long, the connection ends as in a drain
  /// (GOAWAY, then close).
  private func scheduleIdleCheck(in delay: TimeAmount) {
    guard let context = self.context else { return }
    self.idleTask = context.eventLoop.assumeIsolated().scheduleTask(in: delay) {
      guard let idle = self.runtime.listener.idleTimeout, self.context != nil, !self.draining else { return }
      let limit = TimeAmount.nanoseconds(idle.nanoseconds)
      let quiet = context.eventLoop.now - self.lastActivity
      if self.streams.isEmpty && quiet >= limit {
        self.startDrain()
      } else {
        self.scheduleIdleCheck(in: self.streams.isEmpty ? limit - quiet : limit)
      }
    }
  }

  func channelActive(context: ChannelHandlerContext) {
    self.raiseConnectionWindow(context: context, from: ConnectionReceiveWindow.initial)
    context.fireChannelActive()
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    let frame = self.unwrapInboundIn(data)
    let id = frame.streamID
    switch frame.payload {
    case .headers(let headers):
      if let stream = self.streams[id] {
        stream.window.senderEnd()
        stream.call?.receiveEnd(trailers: headers.headers)
      } else {
        if id > self.lastStreamID { self.lastStreamID = id }
        let stream = HTTP2DownstreamStream(
          id: id, connection: self, bufferLimit: self.runtime.listener.bufferLimit, window: self.streamWindow)
        if headers.endStream { stream.window.senderEnd() }
        let call = ProxyCall(
          runtime: self.runtime, eventLoop: context.eventLoop, allocator: context.channel.allocator, downstream: stream,
          connectionScheme: self.scheme)
        stream.call = call
        self.streams[id] = stream
        call.receiveHead(headers.headers, endStream: headers.endStream)
      }
    case .data(let data):
      guard let stream = self.streams[id] else { return }
      // Ended before the call hears of it: its reply decides whether the stream must be reset.
      if data.endStream { stream.window.senderEnd() }
      if case .byteBuffer(let buffer) = data.data, buffer.readableBytes > 0 {
        stream.call?.receiveBody(buffer, endStream: data.endStream)
      } else if data.endStream {
        stream.call?.receiveEnd(trailers: nil)
      }
      // Window goes back as the body is passed on, unless the backend is not taking it
      // (HTTP2DownstreamStream.setReadingPaused): then the client stops at the stream window.
      if !data.endStream, let increment = stream.window.received(data.data.readableBytes + (data.paddingBytes ?? 0), endStream: false) {
        self.returnWindow(stream, increment)
      }
    case .rstStream:
      self.streams.removeValue(forKey: id)?.clientWentAway()
    default:
      break
    }
  }

  func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
    // Window changes first: NIOHTTP2 reports one for nearly every DATA frame.
    if let window = event as? NIOHTTP2WindowUpdatedEvent {
      if window.streamID == .rootStream, let inbound = window.inboundWindowSize,
        let increment = ConnectionReceiveWindow.topUp(size: self.connectionWindow, inbound: inbound)
      {
        context.write(self.wrapOutboundOut(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: increment))), promise: nil)
        self.scheduleFlush()
      }
    } else if let closed = event as? StreamClosedEvent {
      // Both ends done, or reset: a call still running has lost its client.
      self.streams.removeValue(forKey: closed.streamID)?.clientWentAway()
    }
    context.fireUserInboundEventTriggered(event)
  }

  func channelWritabilityChanged(context: ChannelHandlerContext) {
    for stream in self.streams.values { stream.call?.downstreamWritabilityChanged(stream.isWritable) }
    context.fireChannelWritabilityChanged()
  }

  func channelInactive(context: ChannelHandlerContext) {
    let streams = self.streams
    self.streams.removeAll()
    for stream in streams.values { stream.clientWentAway() }
    self.runtime.connections.remove(self)
    context.fireChannelInactive()
  }

  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    // Stream-level errors (a frame written after the client reset its stream) concern a call
    // that has already been told; a connection error means the connection is done.
    if error is NIOHTTP2Errors.StreamClosed || error is NIOHTTP2Errors.StreamError || error is NIOHTTP2Errors.NoSuchStream {
      return
    }
    context.close(promise: nil)
  }

  // MARK: - DrainableConnection

  func startDrain() {
    guard !self.draining, let context = self.context else { return }
    self.draining = true
    // Streams after the last one seen are refused, so the client may safely retry them
    // elsewhere; those already open go on.
    context.write(self.wrapOutboundOut(HTTP2Frame(streamID: .rootStream,
      payload: .goAway(lastStreamID: self.lastStreamID, errorCode: .noError, opaqueData: nil))), promise: nil)
    self.scheduleFlush()
    self.closeIfDrained()
  }

  func endCalls(_ failure: CallFailure) {
    self.startDrain()
    for stream in Array(self.streams.values) { stream.call?.shutDown(failure) }
    self.closeIfDrained()
  }

  private func closeIfDrained() {
    guard self.draining, self.streams.isEmpty, let context = self.context else { return }
    // After the flush, so the last responses and the GOAWAY go out first.
    context.eventLoop.assumeIsolated().execute {
      guard let context = self.context else { return }
      context.flush()
      context.close(promise: nil)
    }
  }

  // MARK: - For the streams

  fileprivate var isWritable: Bool { self.context?.channel.isWritable ?? false }

  fileprivate var connectionInfo: DownstreamConnectionInfo {
    DownstreamConnectionInfo(
      protocolName: "HTTP/2", remote: self.context?.channel.remoteAddress, local: self.context?.channel.localAddress, tls: self.tls)
  }

  fileprivate func returnWindow(_ stream: HTTP2DownstreamStream, _ increment: Int) {
    self.write(HTTP2Frame(streamID: stream.id, payload: .windowUpdate(windowSizeIncrement: increment)))
    self.scheduleFlush()
  }

  fileprivate func write(_ frame: HTTP2Frame, promise: EventLoopPromise<Void>? = nil) {
    guard let context = self.context else {
      promise?.fail(ChannelError.ioOnClosedChannel)
      return
    }
    context.write(self.wrapOutboundOut(frame), promise: promise)
  }

  fileprivate var eventLoop: (any EventLoop)? { self.context?.eventLoop }

  /// The stream's response has ended; forget it (a late reset by the client finds nothing).
  fileprivate func finished(_ id: HTTP2StreamID) {
    self.streams.removeValue(forKey: id)
    if self.streams.isEmpty && self.runtime.listener.idleTimeout != nil, let loop = self.context?.eventLoop { self.lastActivity = loop.now }
    if self.draining { self.closeIfDrained() }
  }

  fileprivate func scheduleFlush() {
    guard let context = self.context, self.flushes.request() else { return }
    context.eventLoop.assumeIsolated().execute {
      self.flushes.flushing()
      self.writeCoalescedData()
      self.context?.flush()
    }
  }

  /// Streams holding response bytes to be written as one DATA frame at this tick's flush.
  private var coalescing: [HTTP2DownstreamStream] = []

  fileprivate func coalesce(_ stream: HTTP2DownstreamStream) {
    self.coalescing.append(stream)
    self.scheduleFlush()
  }

  private func writeCoalescedData() {
    guard !self.coalescing.isEmpty else { return }
    let streams = self.coalescing
    self.coalescing.removeAll(keepingCapacity: true)
    for stream in streams { stream.writeCoalesced() }
  }

  /// With swift-nio-http2 as the codec: nghttp2 opens and tops up the connection's window itself
  /// (Pipelines.http2ServerCodec gives it the size).
  private func raiseConnectionWindow(context: ChannelHandlerContext, from current: Int) {
    let increment = self.connectionWindow - current
    guard increment > 0, !Pipelines.downstreamUsesNGHTTP2 else { return }
    context.write(self.wrapOutboundOut(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: increment))), promise: nil)
    self.scheduleFlush()
  }
}

/// One downstream HTTP/2 stream: the call's way to write its response.
final class HTTP2DownstreamStream: DownstreamStream {
  let id: HTTP2StreamID
  private unowned let connection: HTTP2ProxyConnectionHandler
  var call: ProxyCall?
  /// The request's receive window: given back as the body is passed on, held while the
  /// backend is not taking it, and no more once the client ended the request.
  var window: StreamReceiveWindow
  /// Response body bytes written to NIOHTTP2 and not yet sent: it holds DATA back while the
  /// client's window is shut. Above the listener's buffer limit the stream counts as not
  /// writable, and the call stops giving the backend window (ProxyCall.upstreamData), so a
  /// client that withholds WINDOW_UPDATE costs at most that and the upstream stream window.
  private var unsent = 0
  private let bufferLimit: Int
  /// `unsent` went above the limit, so the call may have paused the backend: it is told when
  /// `unsent` is down to half the limit, however many writes that took to complete.
  private var overLimit = false

  init(id: HTTP2StreamID, connection: HTTP2ProxyConnectionHandler, bufferLimit: Int, window: Int) {
    self.id = id
    self.connection = connection
    self.bufferLimit = bufferLimit
    self.window = StreamReceiveWindow(size: window)
  }

  func clientWentAway() {
    _ = self.takeHeld()
    let call = self.call
    self.call = nil
    if let call, !call.isFinished { call.downstreamClosed() }
  }

  func write(head: ResponseHead, endStream: Bool) {
    var headers = HPACKHeaders()
    headers.reserveCapacity(head.headers.count + 1)
    headers.add(name: ":status", value: String(head.status))
    headers.add(contentsOf: head.headers)
    self.write(HTTP2Frame(streamID: self.id, payload: .headers(.init(headers: headers, endStream: endStream))), last: endStream)
  }

  /// Response body not yet handed to NIOHTTP2: everything a stream receives from its backend in
  /// one event-loop tick goes out as one DATA frame at the tick's flush. A server stream of small
  /// messages (grpc-go sends a DATA frame per message) otherwise cost a frame, a promise and a
  /// pass through NIOHTTP2's flow-control queue per message on the way out; Envoy coalesces the
  /// same way. The copy is of small messages only: a large piece with nothing held is passed on.
  private var held: ByteBuffer?
  private var heldIsOwn = false
  private static let coalesceBelow = 16 * 1024

  func write(body: ByteBuffer, endStream: Bool) {
    if endStream {
      var last = body
      if var held = self.takeHeld() {
        held.writeImmutableBuffer(body)
        last = held
      }
      self.write(HTTP2Frame(streamID: self.id, payload: .data(.init(data: .byteBuffer(last), endStream: true))), last: true)
      return
    }
    self.unsent += body.readableBytes
    if self.unsent > self.bufferLimit { self.overLimit = true }
    if body.readableBytes >= Self.coalesceBelow {
      // A large piece is never copied: what is held goes first, then the piece as it came.
      self.writeCoalesced()
      self.writeData(body)
    } else if var held = self.held {
      self.held = nil
      if !self.heldIsOwn {
        // The first piece is a slice of the backend connection's read buffer; the rest go into
        // a buffer of our own, big enough for all of them (each piece is below the threshold).
        var own = ByteBufferAllocator().buffer(capacity: 2 * Self.coalesceBelow)
        own.writeImmutableBuffer(held)
        held = own
        self.heldIsOwn = true
      }
      held.writeImmutableBuffer(body)
      self.held = held
      if held.readableBytes >= Self.coalesceBelow { self.writeCoalesced() }
    } else {
      self.held = body
      self.connection.coalesce(self)
    }
  }

  /// Writes what the stream holds, if anything (the connection's flush, or a full buffer).
  fileprivate func writeCoalesced() {
    guard let held = self.takeHeld() else { return }
    self.writeData(held)
  }

  private func takeHeld() -> ByteBuffer? {
    let held = self.held
    self.held = nil
    self.heldIsOwn = false
    return held
  }

  private func writeData(_ body: ByteBuffer) {
    let frame = HTTP2Frame(streamID: self.id, payload: .data(.init(data: .byteBuffer(body), endStream: false)))
    guard let loop = self.connection.eventLoop else { return }
    let bytes = body.readableBytes
    let sent = loop.makePromise(of: Void.self)
    sent.futureResult.assumeIsolated().whenComplete { _ in self.dataSent(bytes) }
    self.connection.write(frame, promise: sent)
  }

  private func dataSent(_ bytes: Int) {
    self.unsent -= bytes
    if self.overLimit && self.unsent <= self.bufferLimit / 2 && self.connection.isWritable {
      self.overLimit = false
      self.call?.downstreamWritabilityChanged(true)
    }
  }

  func setReadingPaused(_ paused: Bool) {
    if let increment = self.window.setPaused(paused) { self.connection.returnWindow(self, increment) }
  }

  func writeEnd(trailers: HPACKHeaders?) {
    if let trailers, !trailers.isEmpty {
      self.writeCoalesced()
      self.write(HTTP2Frame(streamID: self.id, payload: .headers(.init(headers: trailers, endStream: true))), last: true)
    } else {
      // A DATA frame, never an empty HEADERS frame: the latter broke Safari and IE (E16).
      let last = self.takeHeld() ?? ByteBuffer()
      self.write(HTTP2Frame(streamID: self.id, payload: .data(.init(data: .byteBuffer(last), endStream: true))), last: true)
    }
  }

  /// Writes a frame of the response. After the last one, if the client is still sending, the
  /// stream is reset with NO_ERROR (RFC 9113 section 8.1) so that it stops, but only once that
  /// frame is out: NIOHTTP2 drops what a stream still holds back for flow control when it is reset.
  private func write(_ frame: HTTP2Frame, last: Bool) {
    guard last else {
      self.connection.write(frame)
      return
    }
    self.call = nil
    self.connection.finished(self.id)
    guard !self.window.senderEnded, let loop = self.connection.eventLoop else {
      self.connection.write(frame)
      return
    }
    self.window.senderEnd()
    let written = loop.makePromise(of: Void.self)
    self.connection.write(frame, promise: written)
    let id = self.id
    let connection = self.connection
    written.futureResult.assumeIsolated().whenSuccess {
      connection.write(HTTP2Frame(streamID: id, payload: .rstStream(.noError)))
      connection.scheduleFlush()
    }
  }

  func abort() {
    _ = self.takeHeld()
    self.connection.write(HTTP2Frame(streamID: self.id, payload: .rstStream(.cancel)))
    self.call = nil
    self.connection.finished(self.id)
    self.connection.scheduleFlush()
  }

  func flush() {
    self.connection.scheduleFlush()
  }

  var isWritable: Bool { self.unsent <= self.bufferLimit && self.connection.isWritable }

  var connectionInfo: DownstreamConnectionInfo { self.connection.connectionInfo }
}
