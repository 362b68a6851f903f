import GRPCWebCore
import NIOCore
import NIOHPACK
import NIOHTTP1

/// Serves an HTTP/1.1 connection: one call at a time (NIO's pipelining handler holds the next
/// request until the current response has ended), with keep-alive.
final class HTTP1ProxyHandler: ChannelInboundHandler, DownstreamStream, DrainableConnection {
  typealias InboundIn = HTTPServerRequestPart
  typealias OutboundOut = HTTPServerResponsePart

  private let runtime: ListenerRuntime
  private var call: ProxyCall?
  private var flushes = FlushCoalescer()
  private var context: ChannelHandlerContext?
  private var keepAlive = true
  private var responseEnded = true
  /// The proxy is stopping: the current response is the connection's last.
  private var draining = false
  /// Bytes of a Content-Length request body still to come: its last piece ends the request
  /// upstream in the same frame (see ProxyCall.receiveBody). Nil for a chunked body.
  private var bodyRemaining: Int?
  /// From a request's head to its end: its body may still be arriving after an early answer.
  private var requestOpen = false
  /// A bad request was answered: what else arrives is dropped until the connection closes.
  private var lingering = false
  /// `idle_timeout`: the connection closes after this long with no request in progress.
  /// On the loop's clock (`EventLoop.now`), so that tests move it.
  private var lastActivity = NIODeadline.uptimeNanoseconds(0)
  private var idleTask: Scheduled<Void>?
  /// Set with a `request_headers_timeout`: times each request head from its first byte.
  weak var headWatcher: RequestBytesWatcher?

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
  }

  func handlerRemoved(context: ChannelHandlerContext) {
    self.context = nil
    self.runtime.connections.remove(self)
    self.idleTask?.cancel()
  }

  private func scheduleIdleCheck(in delay: TimeAmount) {
    guard let context = self.context else { return }
    self.idleTask = context.eventLoop.assumeIsolated().scheduleTask(in: delay) {
      guard let idle = self.runtime.listener.idleTimeout, let context = self.context else { return }
      let quiet = context.eventLoop.now - self.lastActivity
      let limit = TimeAmount.nanoseconds(idle.nanoseconds)
      // A head in progress is a request (request_headers_timeout answers it), not idleness.
      let quietNow = self.responseEnded && !(self.headWatcher?.timing ?? false)
      if quietNow && quiet >= limit {
        context.close(promise: nil)
      } else {
        self.scheduleIdleCheck(in: quietNow ? limit - quiet : limit)
      }
    }
  }

  /// Whether a request head may begin now (RequestBytesWatcher times it): no request is in
  /// progress and the connection is not answering a bad one.
  var awaitingRequest: Bool { self.responseEnded && !self.requestOpen && !self.lingering && self.context != nil }

  /// The head did not arrive within `request_headers_timeout`: the watcher answered 408 below
  /// the HTTP codec (whose pipelining state has no request to answer) and closes.
  func requestHeadTimedOut() {
    self.responseEnded = false
    self.lingering = true
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    switch self.unwrapInboundIn(data) {
    case .head(let head):
      self.headWatcher?.headArrived()
      self.requestOpen = true
      self.keepAlive = head.isKeepAlive && !self.draining
      self.responseEnded = false
      self.version = head.version
      var headers = HPACKHeaders()
      headers.reserveCapacity(head.headers.count + 4)
      headers.add(name: ":method", value: head.method.rawValue)
      headers.add(name: ":path", value: head.uri)
      headers.add(name: ":authority", value: head.headers.first(name: "host") ?? "")
      headers.add(name: ":scheme", value: self.scheme)
      for (name, value) in head.headers {
        // HTTP/2 and HPACK want lower-case names; most clients already send them.
        headers.add(name: name.utf8.contains(where: { $0 >= 65 && $0 <= 90 }) ? name.lowercased() : name, value: value)
      }
      let call = ProxyCall(
        runtime: self.runtime, eventLoop: context.eventLoop, allocator: context.channel.allocator, downstream: self,
        connectionScheme: self.scheme)
      self.call = call
      // NIO's decoder has checked the framing: a request with neither Content-Length nor chunked
      // Transfer-Encoding has no body (RFC 9112 section 6.3).
      let chunked = head.headers[canonicalForm: "transfer-encoding"].contains { $0.lowercased() == "chunked" }
      let length = chunked ? nil : head.headers.first(name: "content-length").flatMap { Int($0) }
      self.bodyRemaining = chunked ? nil : (length ?? 0)
      call.receiveHead(headers, endStream: self.bodyRemaining == 0)
    case .body(let buffer):
      if let remaining = self.bodyRemaining {
        self.bodyRemaining = remaining - buffer.readableBytes
        self.call?.receiveBody(buffer, endStream: remaining - buffer.readableBytes <= 0)
      } else {
        self.call?.receiveBody(buffer)
      }
    case .end(let trailers):
      self.requestOpen = false
      var hpack: HPACKHeaders?
      if let trailers, !trailers.isEmpty {
        hpack = HPACKHeaders(trailers.map { ($0.name.lowercased(), $0.value) })
      }
      self.call?.receiveEnd(trailers: hpack)
    }
  }

  func channelInactive(context: ChannelHandlerContext) {
    if let call = self.call, !call.isFinished { call.downstreamClosed() }
    self.call = nil
    self.runtime.connections.remove(self)
    context.fireChannelInactive()
  }

  func channelWritabilityChanged(context: ChannelHandlerContext) {
    self.call?.downstreamWritabilityChanged(context.channel.isWritable)
    context.fireChannelWritabilityChanged()
  }

  /// A request NIO's decoder could not read: 431 when its headers are over the listener's
  /// limits (as Envoy), 400 for any other malformed request, then the connection closes. A
  /// response already under way is just cut.
  ///
  /// The client is usually still sending the request it cannot finish: closing at once would
  /// reset the connection (unread bytes) and lose the answer before the client reads it. So,
  /// as Envoy's delayed close: send the answer, shut the sending side, drop what still arrives,
  /// and close for good when the client does or a second later.
  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    if self.lingering { return }  // the rest of a request already answered
    guard let parserError = error as? HTTPParserError, self.responseEnded else {
      context.close(promise: nil)
      return
    }
    self.responseEnded = false
    self.lingering = true
    let status: HTTPResponseStatus = parserError == .headerOverflow ? .requestHeaderFieldsTooLarge : .badRequest
    let headers = HTTPHeaders([("connection", "close"), ("content-length", "0")])
    context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
    context.writeAndFlush(self.wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
      context.close(mode: .output, promise: nil)
      context.eventLoop.assumeIsolated().scheduleTask(in: Self.lingerTime) { context.close(promise: nil) }
    }
  }

  static let lingerTime = TimeAmount.seconds(1)

  // MARK: - DrainableConnection

  func startDrain() {
    self.draining = true
    self.keepAlive = false
    // Idle between requests: nothing to wait for. Otherwise the response in progress ends the
    // connection (end(context:) closes it) and says so with `connection: close` if its head has
    // not gone out yet.
    if self.responseEnded { self.context?.close(promise: nil) }
  }

  func endCalls(_ failure: CallFailure) {
    self.startDrain()
    self.call?.shutDown(failure)
  }

  // MARK: - DownstreamStream

  func write(head: ResponseHead, endStream: Bool) {
    guard let context = self.context else { return }
    var headers = HTTPHeaders()
    headers.reserveCapacity(head.headers.count + 1)
    for (name, value, _) in head.headers { headers.add(name: name, value: value) }
    if !self.keepAlive { headers.replaceOrAdd(name: "connection", value: "close") }
    if endStream && !headers.contains(name: "content-length") { headers.add(name: "content-length", value: "0") }
    let responseHead = HTTPResponseHead(version: .http1_1, status: .init(statusCode: head.status), headers: headers)
    context.write(self.wrapOutboundOut(.head(responseHead)), promise: nil)
    if endStream { self.end(context: context, trailers: nil) }
  }

  func write(body: ByteBuffer, endStream: Bool) {
    guard let context = self.context else { return }
    context.write(self.wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
    if endStream { self.end(context: context, trailers: nil) }
  }

  func writeEnd(trailers: HPACKHeaders?) {
    guard let context = self.context else { return }
    // HTTP/1.1 clients (browsers above all) do not read trailers; Envoy drops them here too.
    self.end(context: context, trailers: nil)
  }

  private func end(context: ChannelHandlerContext, trailers: HTTPHeaders?) {
    guard !self.responseEnded else { return }
    self.responseEnded = true
    if self.runtime.listener.idleTimeout != nil { self.lastActivity = context.eventLoop.now }
    if self.keepAlive {
      context.write(self.wrapOutboundOut(.end(trailers)), promise: nil)
    } else {
      context.writeAndFlush(self.wrapOutboundOut(.end(trailers))).assumeIsolated().whenComplete { _ in
        context.close(promise: nil)
      }
    }
  }

  func abort() {
    // HTTP/1.1 has no way to end one response abruptly but to cut the connection.
    self.context?.close(promise: nil)
  }

  /// One flush per event-loop tick: a response's head, messages and end, written as separate
  /// upstream frames arrive in one read, go out in one write.
  func flush() {
    guard let context = self.context, self.flushes.request() else { return }
    context.eventLoop.assumeIsolated().execute {
      self.flushes.flushing()
      self.context?.flush()
    }
  }

  var isWritable: Bool { self.context?.channel.isWritable ?? false }

  private var version = HTTPVersion.http1_1

  var connectionInfo: DownstreamConnectionInfo {
    DownstreamConnectionInfo(
      protocolName: "HTTP/\(self.version.major).\(self.version.minor)",
      remote: self.context?.channel.remoteAddress, local: self.context?.channel.localAddress, tls: self.tls)
  }

  /// One call at a time: the connection's reading is the call's request body.
  func setReadingPaused(_ paused: Bool) {
    guard let context = self.context else { return }
    context.channel.setOption(ChannelOptions.autoRead, value: !paused).whenFailure { _ in }
    if !paused { context.read() }
  }
}

/// Ahead of NIO's HTTP/1.1 decoder when the listener has a `request_headers_timeout`: times a
/// request head from its first byte (before the decoder has a whole head) and, if it is late,
/// answers Envoy's 408 itself. The answer cannot go through the HTTP codec: its pipelining
/// handler has no request yet to answer and would trap.
final class RequestBytesWatcher: ChannelDuplexHandler {
  typealias InboundIn = ByteBuffer
  typealias InboundOut = ByteBuffer
  typealias OutboundIn = ByteBuffer
  typealias OutboundOut = ByteBuffer

  private weak var handler: HTTP1ProxyHandler?
  private let timeout: TimeAmount
  private var timer: Scheduled<Void>?
  private var context: ChannelHandlerContext?

  /// A head has begun and not yet arrived whole.
  var timing: Bool { self.timer != nil }

  init(_ handler: HTTP1ProxyHandler, timeout: TimeAmount) {
    self.handler = handler
    self.timeout = timeout
    handler.headWatcher = self
  }

  func handlerAdded(context: ChannelHandlerContext) {
    self.context = context
  }

  func handlerRemoved(context: ChannelHandlerContext) {
    self.timer?.cancel()
    self.timer = nil
    self.context = nil
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    if self.timer == nil, self.handler?.awaitingRequest ?? false {
      self.timer = context.eventLoop.assumeIsolated().scheduleTask(in: self.timeout) { self.timedOut() }
    }
    context.fireChannelRead(data)
  }

  func headArrived() {
    self.timer?.cancel()
    self.timer = nil
  }

  private func timedOut() {
    self.timer = nil
    guard let context = self.context, let handler = self.handler, handler.awaitingRequest else { return }
    handler.requestHeadTimedOut()
    let body = "request header timeout"
    var answer = context.channel.allocator.buffer(capacity: 128)
    answer.writeString(
      "HTTP/1.1 408 Request Timeout\r\ncontent-length: \(body.utf8.count)\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n\(body)")
    context.writeAndFlush(self.wrapOutboundOut(answer)).assumeIsolated().whenComplete { _ in
      context.close(promise: nil)
    }
  }
}
