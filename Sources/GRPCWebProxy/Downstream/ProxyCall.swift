import GRPCWebCore
import Logging
import NIOCore
import NIOHPACK
import NIOHTTP2
import ProxyConfig
import ProxyFilters

/// The client side of one call: an HTTP/1.1 connection's current request, or one HTTP/2
/// stream. The call writes its response through this, whatever the protocol.
protocol DownstreamStream: AnyObject {
  /// Stops (or starts again) taking the request body from the client: the backend is not
  /// taking it as fast as it comes. HTTP/1.1 stops reading the socket, HTTP/2 the stream's window.
  func setReadingPaused(_ paused: Bool)
  func write(head: ResponseHead, endStream: Bool)
  func write(body: ByteBuffer, endStream: Bool)
  func writeEnd(trailers: HPACKHeaders?)
  /// Ends the response abruptly: RST_STREAM on HTTP/2, a closed connection on HTTP/1.1.
  func abort()
  func flush()
  var isWritable: Bool { get }
  /// The client connection, for the access log.
  var connectionInfo: DownstreamConnectionInfo { get }
}

/// What a call needs from its listener, shared by the listener's connections on one event loop.
final class ListenerRuntime {
  let listener: Listener
  let routes: RouteTable
  let upstreams: LoopUpstreams
  let connections: LoopConnections
  let logger: Logger
  let maxTextFrameSize: Int
  let stats: LoopStats
  let statNames: HTTPStatNames
  /// The connection manager's access logs on this loop, nil without any.
  var accessLog: LoopAccessLog?
  /// The connection manager's tracing, nil without it.
  var tracer: ListenerTracer?

  init(
    listener: Listener, routes: RouteTable, upstreams: LoopUpstreams, connections: LoopConnections,
    logger: Logger, maxTextFrameSize: Int, stats: LoopStats = LoopStats()
  ) {
    self.listener = listener
    self.routes = routes
    self.upstreams = upstreams
    self.connections = connections
    self.logger = logger
    self.maxTextFrameSize = maxTextFrameSize
    self.stats = stats
    // Envoy names a listener's stats by its address: listener.0.0.0.0_8080.…
    let address = listener.address.unixSocketPath ?? "\(listener.address.host)_\(listener.address.port)"
    self.statNames = HTTPStatNames(stats: stats, statPrefix: listener.statPrefix, listenerAddress: address)
  }
}

/// One call through the proxy, from request head to the end of the response.
///
/// This class routes the request and does what the call's `CallStateMachine` decides: it
/// writes to the client and the upstream stream, asks the cluster for streams, runs the
/// timers (deadline, per-try, idle) on the event loop, and records the stats, the access log
/// and the span. Everything runs on the downstream channel's event loop, which is also the
/// upstream stream's, and the loop is the call's clock.
final class ProxyCall: UpstreamStreamDelegate {
  private let runtime: ListenerRuntime
  private let eventLoop: any EventLoop
  private let allocator: ByteBufferAllocator
  private weak var downstream: (any DownstreamStream)?
  private var machine: CallStateMachine
  private var corsHeaders: HPACKHeaders?
  /// The route's `response_headers_to_add/remove`, with the request they may quote.
  private var responseMutations: (levels: [HeaderMutations], request: HPACKHeaders)?
  private var deadline: DeadlinePlan?
  private var deadlineTask: Scheduled<Void>?
  /// The route's `retry_policy.per_try_timeout`.
  private var perTryTimeout: ProxyDuration?
  private var perTryTask: Scheduled<Void>?
  /// `idle_timeout` / `stream_idle_timeout`: the last time bytes moved, checked by a timer
  /// rather than a timer rescheduled per frame.
  private var idleTimeout: TimeAmount?
  private var lastActivity = NIODeadline.uptimeNanoseconds(0)
  private var idleTask: Scheduled<Void>?
  private var clusterName = ""
  /// For the stats: when the call and its last upstream attempt began, what the backend and the
  /// client were answered, and the gRPC method (gRPC and gRPC-Web calls).
  private var callStart = NIODeadline.uptimeNanoseconds(0)
  private var upstreamStart: NIODeadline?
  private var upstreamHTTPStatus: Int?
  private var responseStatus: Int?
  private var clientGRPCStatus: GRPCStatus?
  /// gRPC and gRPC-Web calls: the stats' bridge name ("grpc", "grpc-web") and the path.
  private var grpcMethod: (bridge: String, path: String)?
  /// The grpc_stats filter's stats for this call and its message counts, when the chain has the
  /// filter and the call is gRPC (or gRPC-Web, which the filter sees as gRPC after translation).
  private var grpcStatsNames: MethodStatNames?
  private var requestMessages = GRPCMessageCounter()
  private var responseMessages = GRPCMessageCounter()
  private var recorded = false
  /// The access log's record, kept only when the connection manager has an access log.
  private var log: CallLogRecord?
  /// The call's tracing, when the connection manager traces.
  private var trace: CallTrace?

  /// `https` when the client's connection is TLS.
  private let connectionScheme: String

  init(
    runtime: ListenerRuntime, eventLoop: any EventLoop, allocator: ByteBufferAllocator, downstream: any DownstreamStream,
    connectionScheme: String = "http"
  ) {
    self.runtime = runtime
    self.connectionScheme = connectionScheme
    self.eventLoop = eventLoop
    self.allocator = allocator
    self.downstream = downstream
    self.machine = CallStateMachine(translator: ResponseTranslator(kind: .other, allocator: allocator))
  }

  var isFinished: Bool { self.machine.isFinished }

  // MARK: - Downstream events

  /// - Parameter headers: the request headers with `:method`, `:path`, `:authority`, `:scheme`.
  func receiveHead(_ headers: HPACKHeaders, endStream: Bool) {
    guard self.machine.isAwaitingHead else { return }
    self.callStart = .now()
    if let tracer = self.runtime.tracer { self.trace = tracer.begin(request: headers) }
    // The span's attributes are the access log's fields: a sampled call keeps the record too.
    if self.runtime.accessLog != nil || self.trace?.span != nil, let downstream = self.downstream {
      let log = CallLogRecord()
      log.start = self.callStart
      log.requestHeaders = headers
      log.connection = downstream.connectionInfo
      if endStream { log.requestEnd = self.callStart }
      self.log = log
    }
    let method = headers.first(name: ":method") ?? "GET"
    let path = headers.first(name: ":path") ?? "/"
    let authority = headers.first(name: ":authority") ?? ""
    let kind = CallKind.classify(
      contentType: headers.first(name: "content-type"),
      accept: headers.first(name: "accept"),
      grpcWebEnabled: self.runtime.listener.grpcWebEnabled
    )
    self.machine = CallStateMachine(
      translator: ResponseTranslator(kind: kind, maxTextFrameSize: self.runtime.maxTextFrameSize, allocator: self.allocator))
    switch kind {
    case .grpcWeb: self.grpcMethod = ("grpc-web", path)
    // With a grpc_stats filter, native gRPC calls are counted by it (under the same names).
    case .grpc: if self.runtime.listener.grpcStats == nil { self.grpcMethod = ("grpc", path) }
    case .other: break
    }

    // HTTP/1.1 requests over the limits never get here (NIO's decoder stops them); HTTP/2 ones
    // are decoded up to twice the limit and answered here, on their own stream.
    var headerBytes = 0
    var headerCount = 0
    for (name, value, _) in headers where !name.hasPrefix(":") {
      headerBytes += name.utf8.count + value.utf8.count
      headerCount += 1
    }
    guard self.runtime.listener.headerLimits.admits(byteCount: headerBytes, count: headerCount) else {
      self.runtime.logger.debug("request headers over the limits", metadata: ["bytes": "\(headerBytes)", "count": "\(headerCount)"])
      var head = HPACKHeaders()
      head.add(name: "content-length", value: "0")
      self.finish(self.machine.answerLocally(.init(head: ResponseHead(status: 431, headers: head), end: .clean(trailers: nil))))
      return
    }

    guard let entry = self.runtime.routes.match(authority: authority, path: path, headers: headers, isGRPC: kind.isGRPC) else {
      // Envoy's no-route reply: 404 with an empty body and so no grpc-status (L4).
      self.runtime.logger.debug("no route", metadata: ["authority": "\(authority)", "path": "\(path)"])
      self.log?.flag("NR")
      self.finish(self.machine.answerLocally(httpStatus: 404, grpcStatus: nil, message: nil))
      return
    }

    // A direct response has no route entry in Envoy, so its CORS filter leaves it alone.
    var isDirect = false
    if case .directResponse = entry.route.action { isDirect = true }
    if self.runtime.listener.corsEnabled && !isDirect {
      switch entry.evaluateCORS(method: method, headers: headers) {
      case .none:
        break
      case .preflight(let cors):
        self.finish(self.machine.answerLocally(.init(head: ResponseHead(status: 200, headers: cors), end: .clean(trailers: nil))))
        return
      case .forward(let responseHeaders):
        if !responseHeaders.isEmpty { self.corsHeaders = responseHeaders }
      }
    }

    if !entry.responseHeaders.isEmpty { self.responseMutations = (entry.responseHeaders, headers) }
    let clusterName: String
    var clusterMutations: Route.WeightedCluster?
    switch entry.route.action {
    case .directResponse(let status, let body) where kind.isGRPC && status != 200:
      // Envoy's grpc_web filter turns the reply into a gRPC status; the body becomes its message.
      let message = body.map { String(decoding: $0, as: UTF8.self) }
      self.finish(self.machine.answerLocally(httpStatus: status, grpcStatus: GRPCStatus(httpStatus: status), message: message))
      return
    case .directResponse(let status, let body):
      var head = HPACKHeaders()
      head.add(name: "content-length", value: String(body?.count ?? 0))
      var buffer: ByteBuffer?
      if let body, !body.isEmpty {
        // text/plain as in Envoy; response_headers_to_add may say otherwise (a page, a script).
        head.add(name: "content-type", value: "text/plain")
        buffer = self.allocator.buffer(bytes: body)
      }
      let output = ResponseTranslator.Output(head: ResponseHead(status: status, headers: head), body: buffer, end: .clean(trailers: nil))
      self.finish(self.machine.answerLocally(method == "HEAD" ? .init(head: output.head, end: output.end) : output))
      return
    case .cluster(let name):
      clusterName = name
    case .weightedClusters(let clusters):
      let picked = self.runtime.upstreams.pick(clusters)
      clusterName = picked.name
      clusterMutations = picked
      if !picked.responseHeaders.isEmpty {
        self.responseMutations = ([picked.responseHeaders] + entry.responseHeaders, headers)
      }
    case .clusterHeader(let header):
      guard let name = headers.first(name: header), self.runtime.upstreams.has(cluster: name) else {
        // Envoy's cluster_not_found_response_code: 503.
        self.runtime.logger.debug("cluster_header names no cluster", metadata: ["header": "\(header)"])
        self.log?.flag("NC")
        self.finish(self.machine.answerLocally(httpStatus: 503, grpcStatus: .unavailable, message: "cluster not found"))
        return
      }
      clusterName = name
    }

    let plan = DeadlinePlan.make(timeouts: entry.route.timeouts, grpcTimeoutHeader: headers.first(name: "grpc-timeout"), isGRPC: kind.isGRPC)
    self.deadline = plan
    if plan.start == .requestStart { self.startDeadline() }

    let upstreamPath = entry.upstreamPath(path)
    self.log?.upstreamPath = upstreamPath
    var upstreamHeaders = RequestTranslator.upstreamHeaders(
      headers, kind: kind, path: upstreamPath, grpcTimeout: plan.upstreamGRPCTimeout, forwardedProto: self.connectionScheme)
    if let host = entry.route.hostRewrite {
      // In place: pseudo-headers must stay ahead of the others (replaceOrAdd would append it).
      var rewritten = HPACKHeaders()
      rewritten.reserveCapacity(upstreamHeaders.count)
      for (name, value, indexable) in upstreamHeaders {
        rewritten.add(name: name, value: name == ":authority" ? host : value, indexing: indexable)
      }
      upstreamHeaders = rewritten
    }
    if let cluster = clusterMutations, !cluster.requestHeaders.isEmpty {
      cluster.requestHeaders.apply(to: &upstreamHeaders, request: headers)
    }
    if !entry.requestHeaders.isEmpty { HeaderMutations.apply(entry.requestHeaders, to: &upstreamHeaders, request: headers) }
    if let trace = self.trace { self.runtime.tracer?.inject(trace, into: &upstreamHeaders) }
    var requestText = false
    if case .grpcWeb(let text, _) = kind { requestText = text }
    if endStream, plan.start == .requestEnd { self.startDeadline() }
    self.machine.routed(
      headers: upstreamHeaders, endStream: endStream, textRequest: requestText, retryPolicy: entry.route.retryPolicy,
      bufferLimit: self.runtime.listener.bufferLimit)
    self.perTryTimeout = entry.route.retryPolicy?.perTryTimeout

    self.clusterName = clusterName
    if let config = self.runtime.listener.grpcStats, kind.isGRPC {
      self.grpcStatsNames = self.runtime.stats.names.grpcStats(cluster: clusterName, path: path, config: config)
    }
    if let log = self.log {
      log.cluster = clusterName
      log.routeName = entry.route.name
    }
    if let idle = entry.route.timeouts.idleTimeout ?? self.runtime.listener.streamIdleTimeout, !idle.isZero {
      self.idleTimeout = .nanoseconds(idle.nanoseconds)
      self.lastActivity = self.eventLoop.now
      self.scheduleIdleCheck(in: .nanoseconds(idle.nanoseconds))
    }
    self.openUpstreamStream()
  }

  /// A piece of the request body; `endStream` when the client said it is the last (an HTTP/2
  /// DATA frame with END_STREAM, or the last byte of an HTTP/1.1 Content-Length body).
  func receiveBody(_ buffer: ByteBuffer, endStream: Bool = false) {
    let action = self.machine.receiveBody(buffer, endStream: endStream, allocator: self.allocator)
    if case .drop = action { return }
    if self.idleTimeout != nil { self.lastActivity = self.eventLoop.now }
    if let log = self.log {
      log.bytesReceived += buffer.readableBytes
      if endStream { log.requestEnd = .now() }
    }
    self.forward(action)
    if endStream, self.deadline?.start == .requestEnd { self.startDeadline() }
  }

  func receiveEnd(trailers: HPACKHeaders?) {
    if let log = self.log, log.requestEnd == nil { log.requestEnd = .now() }
    let action = self.machine.receiveEnd(trailers: trailers, allocator: self.allocator)
    if case .drop = action { return }
    self.forward(action)
    if self.deadline?.start == .requestEnd { self.startDeadline() }
  }

  /// The client went away (connection closed or stream reset): cancel the upstream call.
  func downstreamClosed() {
    self.log?.flag("DC")
    self.downstream = nil
    let cleanup = self.machine.downstreamClosed()
    self.cleanUp(cleanup ?? .init())
  }

  /// The proxy is stopping and the call outlived the drain time: end it with a status the
  /// client can read (a trailer frame once the response has started), never a bare cut.
  func shutDown(_ failure: CallFailure) {
    if let finish = self.machine.fail(failure) { self.finish(finish) }
  }

  func downstreamWritabilityChanged(_ writable: Bool) {
    guard writable, let stream = self.machine.openStream else { return }
    stream.setPaused(false)
  }

  // MARK: - Upstream events

  private func openUpstreamStream() {
    self.runtime.upstreams.openStream(cluster: self.clusterName, for: self) { result in
      self.upstreamOpened(result)
    }
  }

  private func upstreamOpened(_ result: Result<UpstreamStream, UpstreamUnavailable>) {
    switch result {
    case .success(let stream):
      switch self.machine.upstreamOpened(stream) {
      case .discard(let stream):
        // The call ended while its connection was being made; the stream was never started.
        stream.release()
        self.runtime.upstreams.callEnded(cluster: self.clusterName, endpoint: stream.connection.endpoint, status: nil)
      case .write(let frames, let stream):
        self.upstreamStart = .now()
        self.upstreamHTTPStatus = nil
        if let log = self.log { log.upstreamHost = stream.connection.endpoint.description }
        for frame in frames { stream.write(frame) }
        self.startPerTryTimer()
      }
    case .failure(let error):
      let failure: CallFailure = error.noHealthyUpstream ? .noHealthyUpstream : .upstreamReset(reason: error.reason)
      let action = self.machine.upstreamFailed(failure, connectFailure: !error.noHealthyUpstream, beginRetry: self.beginRetry)
      if case .finish = action {
        self.runtime.logger.debug("no upstream stream", metadata: ["reason": "\(error.reason)"])
        self.log?.flag(error.noHealthyUpstream ? "UH" : error.reason.hasPrefix("overflow") ? "UO" : "UF")
      }
      self.perform(action)
    }
  }

  func upstreamHeaders(_ headers: HPACKHeaders, endStream: Bool) {
    let action = self.machine.upstreamHeaders(headers, endStream: endStream, beginRetry: self.beginRetry)
    switch action {
    case .retry, .replay, .none:
      break
    case .write, .finish:
      self.perTryTask?.cancel()
      self.perTryTask = nil
      if self.idleTimeout != nil { self.lastActivity = self.eventLoop.now }
      if self.upstreamHTTPStatus == nil, let status = headers.first(name: ":status").flatMap({ Int($0) }), status >= 200 {
        self.upstreamHTTPStatus = status
      } else if endStream, let log = self.log {
        log.trailers = headers
      }
    }
    self.perform(action)
  }

  func upstreamData(_ data: ByteBuffer, endStream: Bool) {
    if self.idleTimeout != nil { self.lastActivity = self.eventLoop.now }
    if let names = self.grpcStatsNames {
      let started = self.responseMessages.inspect(data)
      if started > 0 { names.responseMessages.add(started) }
    }
    self.perform(self.machine.upstreamData(data, endStream: endStream))
    if let downstream = self.downstream, !downstream.isWritable, let stream = self.machine.openStream {
      // The client is not keeping up: stop giving the backend window for this stream.
      stream.setPaused(true)
    }
  }

  func upstreamDataSent(_ bytes: Int) {
    if self.machine.upstreamDataSent(bytes) { self.downstream?.setReadingPaused(false) }
  }

  /// The backend cannot take this request's headers: a local 431, the connection untouched.
  func upstreamRefusedHeaders(_ message: String) {
    guard let finish = self.machine.upstreamRefusedHeaders(message) else { return }
    self.runtime.logger.debug("request headers refused for the backend", metadata: ["reason": "\(message)"])
    self.finish(finish)
  }

  /// The upstream stream closed. If the response has not ended, the stream was reset or its
  /// connection lost.
  func upstreamClosed(reason: String, unprocessed: Bool) {
    let headSent = self.machine.translator.headSent
    let action = self.machine.upstreamClosed(reason: reason, unprocessed: unprocessed, beginRetry: self.beginRetry)
    switch action {
    case .replay:
      self.runtime.logger.debug("upstream did not process the call; sending it again", metadata: ["reason": "\(reason)"])
    case .finish:
      self.runtime.logger.debug("upstream stream ended early", metadata: ["reason": "\(reason)", "headSent": "\(headSent)"])
      self.log?.flag(reason.hasPrefix("connection termination") ? "UC" : "UR")
    case .none, .write, .retry:
      break
    }
    self.perform(action)
  }

  // MARK: - Performing the machine's actions

  /// Asks the cluster for one of its `max_retries`, at most once per call (the machine keeps it).
  private func beginRetry() -> Bool {
    self.runtime.upstreams.beginRetry(cluster: self.clusterName)
  }

  private func forward(_ action: CallStateMachine.BodyAction) {
    switch action {
    case .drop, .held:
      break
    case .finish(let finish):
      self.runtime.logger.debug("bad grpc-web-text request body")
      self.finish(finish)
    case .forward(let frame, let payload, let stream, let pauseReading):
      if let names = self.grpcStatsNames, payload.readableBytes > 0 {
        let started = self.requestMessages.inspect(payload)
        if started > 0 { names.requestMessages.add(started) }
      }
      if pauseReading { self.downstream?.setReadingPaused(true) }
      stream?.write(frame)
    }
  }

  @inline(__always)
  private func perform(_ action: CallStateMachine.UpstreamAction) {
    switch action {
    case .none:
      break
    case .write(let output):
      self.write(output)
    case .finish(let finish):
      self.finish(finish)
    case .retry(let retry):
      self.perTryTask?.cancel()
      self.perTryTask = nil
      if let previous = retry.previous { self.endAttempt(previous) }
      let backoff = Int64.random(in: 1...Int64(retry.backoffCeilingMilliseconds))
      self.runtime.logger.debug("retrying the call", metadata: ["attempt": "\(retry.attempt)", "backoffMs": "\(backoff)"])
      self.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(backoff)) {
        if self.machine.backoffElapsed() { self.openUpstreamStream() }
      }
    case .replay(let previous):
      self.endAttempt(previous)
      self.openUpstreamStream()
    }
  }

  /// The attempt's slot goes back to its cluster, then its stream is let go.
  private func endAttempt(_ attempt: CallStateMachine.AttemptEnd) {
    self.runtime.upstreams.callEnded(cluster: self.clusterName, endpoint: attempt.stream.connection.endpoint, status: attempt.outcome)
    switch attempt.close {
    case .release: attempt.stream.release()
    case .cancel: attempt.stream.cancel()
    case nil: break
    }
  }

  // MARK: - Timers

  private func scheduleIdleCheck(in delay: TimeAmount) {
    self.idleTask = self.eventLoop.assumeIsolated().scheduleTask(in: delay) {
      self.idleTask = nil
      guard let idle = self.idleTimeout, !self.machine.isFinished else { return }
      let quiet = self.eventLoop.now - self.lastActivity
      if quiet < idle {
        self.scheduleIdleCheck(in: idle - quiet)
        return
      }
      self.runtime.logger.debug("stream idle timeout", metadata: ["ms": "\(idle.nanoseconds / 1_000_000)"])
      self.log?.flag("SI")
      if let finish = self.machine.fail(.timeout(message: "stream timeout", httpStatus: 408)) { self.finish(finish) }
    }
  }

  private func startPerTryTimer() {
    guard let timeout = self.perTryTimeout, !timeout.isZero else { return }
    self.perTryTask?.cancel()
    self.perTryTask = self.eventLoop.assumeIsolated().scheduleTask(in: .nanoseconds(timeout.nanoseconds)) {
      self.perTryTask = nil
      let action = self.machine.perTryTimedOut(beginRetry: self.beginRetry)
      switch action {
      case .none:
        return
      case .finish:
        self.runtime.logger.debug("per-try timeout", metadata: ["ms": "\(timeout.milliseconds)"])
        self.log?.flag("UT")
      case .write, .retry, .replay:
        break
      }
      self.runtime.stats.count("upstream_rq_per_try_timeout", cluster: self.clusterName)
      self.perform(action)
    }
  }

  private func startDeadline() {
    guard self.deadlineTask == nil, let plan = self.deadline, let ms = plan.milliseconds else { return }
    self.deadlineTask = self.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(ms)) {
      self.deadlineFired()
    }
  }

  private func deadlineFired() {
    self.deadlineTask = nil
    guard let plan = self.deadline, !self.machine.isFinished else { return }
    self.runtime.logger.debug("call deadline exceeded", metadata: ["ms": "\(plan.milliseconds ?? 0)"])
    if !self.clusterName.isEmpty { self.runtime.stats.count("upstream_rq_timeout", cluster: self.clusterName) }
    self.log?.flag("UT")
    if let finish = self.machine.fail(.timeout(message: plan.timeoutMessage, httpStatus: plan.timeoutHTTPStatus)) {
      self.finish(finish)
    }
  }

  // MARK: - Writing the response

  private func finish(_ finish: CallStateMachine.Finish) {
    self.write(finish.output)
    self.cleanUp(finish.cleanup)
  }

  private func write(_ output: ResponseTranslator.Output) {
    guard let downstream = self.downstream else { return }
    if let log = self.log {
      if let body = output.body { log.bytesSent += body.readableBytes }
      if log.firstByte == nil, output.head != nil || output.body != nil { log.firstByte = .now() }
    }
    if let head = output.head {
      self.responseStatus = head.status
      if let status = head.headers.first(name: "grpc-status").flatMap({ GRPCStatus(headerValue: $0) }) { self.clientGRPCStatus = status }
    }
    if case .clean(let trailers?) = output.end, let status = trailers.first(name: "grpc-status").flatMap({ GRPCStatus(headerValue: $0) }) {
      self.clientGRPCStatus = status
    }
    if var head = output.head {
      if let cors = self.corsHeaders {
        for (name, value, _) in cors { head.headers.replaceOrAdd(name: name, value: value) }
      }
      if let (levels, request) = self.responseMutations {
        HeaderMutations.apply(levels, to: &head.headers, request: request)
      }
      self.log?.responseHeaders = head.headers
      let headOnly = output.body == nil && Self.isPlainEnd(output.end)
      downstream.write(head: head, endStream: headOnly)
      if headOnly {
        downstream.flush()
        return
      }
    }
    if let body = output.body {
      downstream.write(body: body, endStream: Self.isPlainEnd(output.end))
      if Self.isPlainEnd(output.end) {
        downstream.flush()
        return
      }
    }
    switch output.end {
    case .none:
      break
    case .clean(let trailers):
      downstream.writeEnd(trailers: trailers)
    case .reset:
      downstream.abort()
      return
    }
    downstream.flush()
  }

  private static func isPlainEnd(_ end: ResponseTranslator.Output.End?) -> Bool {
    if case .clean(nil) = end { return true }
    return false
  }

  /// The call's stats, by Envoy's names, once: the connection manager's, the cluster's, and the
  /// gRPC method's with the status the client actually read (Envoy's grpc_web filter counts
  /// the upstream's trailers, which it has already moved into the body: a gRPC-Web call that
  /// succeeded is counted as neither success nor failure there).
  private func recordStats() {
    guard !self.recorded, self.callStart.uptimeNanoseconds > 0 else { return }
    self.recorded = true
    if let log = self.log {
      log.end = .now()
      log.responseCode = self.responseStatus
      // With no grpc-status anywhere, the one a gRPC client derives from the HTTP status (as
      // Envoy's %GRPC_STATUS% does: 404 is UNIMPLEMENTED).
      log.grpcStatus = self.clientGRPCStatus ?? self.machine.translator.bodyTrailerStatus
        ?? self.responseStatus.map { GRPCStatus(httpStatus: $0) }
      self.runtime.accessLog?.log(log)
      if let span = self.trace?.span, let tracer = self.runtime.tracer {
        let message = log.responseHeaders?.first(name: "grpc-message") ?? log.trailers?.first(name: "grpc-message")
        tracer.finish(span, record: log, grpcMessage: message)
      }
      self.trace = nil
      self.log = nil
    }
    let stats = self.runtime.stats
    let names = self.runtime.statNames
    names.requestTotal.add()
    if let status = self.responseStatus, (100...599).contains(status) { names.requestClass[status / 100].add() }
    names.requestTime.record(since: self.callStart)
    guard !self.clusterName.isEmpty else { return }
    if let start = self.upstreamStart {
      let cluster = stats.names.cluster(self.clusterName)
      if let status = self.upstreamHTTPStatus, (100...599).contains(status) {
        cluster.requestClass[status / 100].add()
        cluster.status(status).add()
      }
      cluster.requestTime.record(since: start)
    }
    if let (bridge, path) = self.grpcMethod, let status = self.clientGRPCStatus ?? self.machine.translator.bodyTrailerStatus {
      let method = stats.names.method(cluster: self.clusterName, path: path, bridge: bridge)
      method.total.add()
      (status == .ok ? method.success : method.failure).add()
      method.status(status).add()
    }
    if let names = self.grpcStatsNames {
      if let status = self.clientGRPCStatus ?? self.machine.translator.bodyTrailerStatus {
        names.total.add()
        (status == .ok ? names.success : names.failure).add()
        names.status(status).add()
      }
      if let start = self.upstreamStart, self.runtime.listener.grpcStats?.upstreamStats == true {
        names.upstreamTime.record(since: start)
      }
    }
  }

  /// The call has ended: record it, stop the timers, and give back what it holds (its slot on
  /// the cluster, its upstream stream, a retry slot), reading the client again if it was paused.
  private func cleanUp(_ cleanup: CallStateMachine.Cleanup) {
    self.recordStats()
    // The rest of the request is read and dropped (or, on HTTP/1.1, the next one read).
    if cleanup.resumeReading { self.downstream?.setReadingPaused(false) }
    self.deadlineTask?.cancel()
    self.deadlineTask = nil
    self.perTryTask?.cancel()
    self.perTryTask = nil
    self.idleTask?.cancel()
    self.idleTask = nil
    if let attempt = cleanup.attempt { self.endAttempt(attempt) }
    if cleanup.endRetry { self.runtime.upstreams.retryEnded(cluster: self.clusterName) }
  }
}
