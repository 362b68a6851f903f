import GRPCWebCore
import Logging
import NIOCore
import NIOHPACK
import NIOHTTP2
import ProxyConfig

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
/// Request side: `awaitingHead → forwarding → complete`, or `rejected` once the proxy has
/// answered by itself (then the rest of the request body is read and dropped).
/// Upstream side: `none → opening(buffered parts) → open(stream) → closed`.
/// Response side: the `ResponseTranslator` state machine.
/// Everything runs on the downstream channel's event loop, which is also the upstream stream's.
final class ProxyCall: UpstreamStreamDelegate {
  private enum RequestState {
    case awaitingHead
    case forwarding(decoder: Base64StreamDecoder?)
    case complete
    case rejected
  }

  private enum UpstreamState {
    case none
    case opening(pending: [HTTP2Frame.FramePayload])
    case open(UpstreamStream)
    case closed
  }

  private let runtime: ListenerRuntime
  private let eventLoop: any EventLoop
  private let allocator: ByteBufferAllocator
  private weak var downstream: (any DownstreamStream)?
  private var request: RequestState = .awaitingHead
  private var upstream: UpstreamState = .none
  private var translator: ResponseTranslator
  private var corsHeaders: HPACKHeaders?
  /// The route's `response_headers_to_add/remove`, with the request they may quote.
  private var responseMutations: (levels: [HeaderMutations], request: HPACKHeaders)?
  private var deadline: DeadlinePlan?
  private var deadlineTask: Scheduled<Void>?
  /// The upstream sent END_STREAM. With the request also ended, the stream is closed and must
  /// not be reset: servers count resets of finished streams as an attack (rapid reset) and drop
  /// the connection.
  private var upstreamEnded = false
  private var requestSentEnd = false
  /// The cluster and endpoint the call holds a slot on, from its stream until it ends.
  private var upstreamSlot: (cluster: String, endpoint: HostAndPort)?
  /// What the endpoint answered, as an HTTP status, for outlier detection.
  private var upstreamOutcome: Int?
  /// The request frames sent so far, kept until the response starts so that a call the server
  /// never processed (GOAWAY, REFUSED_STREAM) can go to another endpoint. Buffers are shared,
  /// not copied; nil once the response started or the request grew past the bound.
  private var sentFrames: [HTTP2Frame.FramePayload]? = []
  private var sentBytes = 0
  private var replays = 0
  /// Holds one of the cluster's `max_retries` until the call ends.
  private var retrying = false
  /// The route's `retry_policy`, and what is left of its `num_retries`.
  private var retryPolicy: Route.RetryPolicy?
  private var retriesLeft = 0
  private var attempts = 1
  private var perTryTask: Scheduled<Void>?
  /// `idle_timeout` / `stream_idle_timeout`: the last time bytes moved, checked by a timer
  /// rather than a timer rescheduled per frame.
  private var idleTimeout: TimeAmount?
  private var lastActivity = NIODeadline.uptimeNanoseconds(0)
  private var idleTask: Scheduled<Void>?
  /// Request body bytes handed to the upstream (or held until its stream opens) and not yet
  /// sent: above the listener's buffer limit the client is not read until half of it has gone.
  private var upstreamUnsent = 0
  private var readingPaused = false
  static let replayableBytes = 64 * 1024
  static let maxReplays = 3
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
    self.translator = ResponseTranslator(kind: .other, allocator: allocator)
  }

  var isFinished: Bool { self.translator.isFinished }

  // MARK: - Downstream events

  /// - Parameter headers: the request headers with `:method`, `:path`, `:authority`, `:scheme`.
  func receiveHead(_ headers: HPACKHeaders, endStream: Bool) {
    guard case .awaitingHead = self.request else { return }
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
    self.translator = ResponseTranslator(kind: kind, maxTextFrameSize: self.runtime.maxTextFrameSize, allocator: self.allocator)
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
      self.translator.markFinished()
      var head = HPACKHeaders()
      head.add(name: "content-length", value: "0")
      self.reject(ResponseTranslator.Output(head: ResponseHead(status: 431, headers: head), end: .clean(trailers: nil)), endStream: endStream)
      return
    }

    guard let entry = self.runtime.routes.match(authority: authority, path: path, headers: headers, isGRPC: kind.isGRPC) else {
      // Envoy's no-route reply: 404 with an empty body and so no grpc-status (L4).
      self.runtime.logger.debug("no route", metadata: ["authority": "\(authority)", "path": "\(path)"])
      self.log?.flag("NR")
      self.reject(self.translator.localReply(httpStatus: 404, grpcStatus: nil, message: nil), endStream: endStream)
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
        self.translator.markFinished()
        self.reject(ResponseTranslator.Output(head: ResponseHead(status: 200, headers: cors), end: .clean(trailers: nil)), endStream: endStream)
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
      self.reject(self.translator.localReply(httpStatus: status, grpcStatus: GRPCStatus(httpStatus: status), message: message),
        endStream: endStream)
      return
    case .directResponse(let status, let body):
      self.translator.markFinished()
      var head = HPACKHeaders()
      head.add(name: "content-length", value: String(body?.count ?? 0))
      var buffer: ByteBuffer?
      if let body, !body.isEmpty {
        // text/plain as in Envoy; response_headers_to_add may say otherwise (a page, a script).
        head.add(name: "content-type", value: "text/plain")
        buffer = self.allocator.buffer(bytes: body)
      }
      let output = ResponseTranslator.Output(head: ResponseHead(status: status, headers: head), body: buffer, end: .clean(trailers: nil))
      self.reject(method == "HEAD" ? .init(head: output.head, end: output.end) : output, endStream: endStream)
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
        self.reject(self.translator.localReply(httpStatus: 503, grpcStatus: .unavailable, message: "cluster not found"), endStream: endStream)
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
    self.request = endStream ? .complete : .forwarding(decoder: requestText ? Base64StreamDecoder() : nil)
    if endStream, plan.start == .requestEnd { self.startDeadline() }
    self.upstream = .opening(pending: [.headers(.init(headers: upstreamHeaders, endStream: endStream))])

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
      self.lastActivity = .now()
      self.scheduleIdleCheck(in: .nanoseconds(idle.nanoseconds))
    }
    if let policy = entry.route.retryPolicy {
      self.retryPolicy = policy
      self.retriesLeft = policy.numRetries
    }
    self.runtime.upstreams.openStream(cluster: clusterName, for: self) { result in
      self.upstreamOpened(result)
    }
  }

  /// A piece of the request body; `endStream` when the client said it is the last (an HTTP/2
  /// DATA frame with END_STREAM, or the last byte of an HTTP/1.1 Content-Length body).
  ///
  /// The last piece goes upstream as one DATA frame with END_STREAM, not as data and then an
  /// empty frame: a server that answers a unary call as soon as it has the message (grpc-go)
  /// resets a stream whose request has not ended, and a flood of such resets is what HTTP/2
  /// implementations count as an attack.
  func receiveBody(_ buffer: ByteBuffer, endStream: Bool = false) {
    guard case .forwarding(let decoder) = self.request else {
      if endStream { self.receiveEnd(trailers: nil) }
      return
    }
    if self.idleTimeout != nil { self.lastActivity = .now() }
    if let log = self.log {
      log.bytesReceived += buffer.readableBytes
      if endStream { log.requestEnd = .now() }
    }
    var payload = buffer
    if var text = decoder {
      var decoded = self.allocator.buffer(capacity: buffer.readableBytes / 4 * 3 + 3)
      do {
        try text.decode(buffer, into: &decoded)
        if endStream { try text.finish() }
      } catch {
        self.badBase64(error)
        return
      }
      self.request = .forwarding(decoder: text)
      guard decoded.readableBytes > 0 || endStream else { return }
      payload = decoded
    }
    if let names = self.grpcStatsNames {
      let started = self.requestMessages.inspect(payload)
      if started > 0 { names.requestMessages.add(started) }
    }
    if endStream {
      self.request = .complete
      self.sendUpstream(.data(.init(data: .byteBuffer(payload), endStream: true)))
      if self.deadline?.start == .requestEnd { self.startDeadline() }
    } else {
      self.sendUpstream(.data(.init(data: .byteBuffer(payload), endStream: false)))
    }
  }

  func receiveEnd(trailers: HPACKHeaders?) {
    if let log = self.log, log.requestEnd == nil { log.requestEnd = .now() }
    switch self.request {
    case .forwarding(let decoder):
      if let decoder {
        do {
          try decoder.finish()
        } catch {
          // Envoy drops leftover characters when a text request ends with trailers; nothing
          // the client sent is silently lost here.
          self.badBase64(error)
          return
        }
      }
      self.request = .complete
      if let trailers, !trailers.isEmpty {
        self.sendUpstream(.headers(.init(headers: trailers, endStream: true)))
      } else {
        self.sendUpstream(.data(.init(data: .byteBuffer(self.allocator.buffer(capacity: 0)), endStream: true)))
      }
      if self.deadline?.start == .requestEnd { self.startDeadline() }
    case .rejected:
      self.request = .complete
    case .awaitingHead, .complete:
      break
    }
  }

  /// The client went away (connection closed or stream reset): cancel the upstream call.
  func downstreamClosed() {
    self.log?.flag("DC")
    self.downstream = nil
    self.request = .complete
    self.translator.markFinished()
    self.cleanUp()
  }

  /// The proxy is stopping and the call outlived the drain time: end it with a status the
  /// client can read (a trailer frame once the response has started), never a bare cut.
  func shutDown(_ failure: CallFailure) {
    guard !self.translator.isFinished else { return }
    if case .forwarding = self.request { self.request = .rejected }
    self.apply(self.translator.fail(failure))
  }

  func downstreamWritabilityChanged(_ writable: Bool) {
    guard writable, case .open(let stream) = self.upstream else { return }
    stream.setPaused(false)
  }

  // MARK: - Upstream events

  private func upstreamOpened(_ result: Result<UpstreamStream, UpstreamUnavailable>) {
    guard case .opening(let pending) = self.upstream else {
      // The call ended while its connection was being made; the stream was never started.
      if case .success(let stream) = result {
        stream.release()
        self.runtime.upstreams.callEnded(cluster: self.clusterName, endpoint: stream.connection.endpoint, status: nil)
      }
      return
    }
    switch result {
    case .success(let stream):
      self.upstreamSlot = (self.clusterName, stream.connection.endpoint)
      self.upstream = .open(stream)
      self.upstreamStart = .now()
      self.upstreamHTTPStatus = nil
      if let log = self.log { log.upstreamHost = stream.connection.endpoint.description }
      // What this attempt has yet to send is what it writes now (a retry sends it again).
      self.upstreamUnsent = 0
      for case .data(let d) in pending { self.upstreamUnsent += d.data.readableBytes }
      for frame in pending {
        self.remember(frame)
        stream.write(frame)
      }
      self.startPerTryTimer()
    case .failure(let error):
      if !error.noHealthyUpstream, let policy = self.retryPolicy,
        policy.retryOn.contains(.connectFailure) || policy.retryOn.contains(.serverError)
          || policy.retryOn.contains(.gatewayError) || policy.retryOn.contains(.reset)
      {
        // Nothing was sent: all of the request so far is in `pending`.
        self.sentFrames = pending
        if self.retry(outcome: nil) { return }
      }
      self.upstream = .closed
      self.runtime.logger.debug("no upstream stream", metadata: ["reason": "\(error.reason)"])
      self.log?.flag(error.noHealthyUpstream ? "UH" : error.reason.hasPrefix("overflow") ? "UO" : "UF")
      self.apply(self.translator.fail(error.noHealthyUpstream ? .noHealthyUpstream : .upstreamReset(reason: error.reason)))
    }
  }

  func upstreamHeaders(_ headers: HPACKHeaders, endStream: Bool) {
    if self.sentFrames != nil, let policy = self.retryPolicy, self.retriesLeft > 0,
      let outcome = Self.retriable(headers, endStream: endStream, policy: policy)
    {
      if endStream { self.upstreamEnded = true }
      if self.retry(outcome: outcome) { return }
    }
    self.perTryTask?.cancel()
    self.perTryTask = nil
    self.sentFrames = nil
    if self.idleTimeout != nil { self.lastActivity = .now() }
    if self.upstreamHTTPStatus == nil, let status = headers.first(name: ":status").flatMap({ Int($0) }), status >= 200 {
      self.upstreamHTTPStatus = status
    } else if endStream, let log = self.log {
      log.trailers = headers
    }
    if endStream {
      self.upstreamEnded = true
      self.upstreamOutcome = Self.outcome(headers)
    } else if let status = headers.first(name: ":status"), status != "200" {
      self.upstreamOutcome = Int(status)
    }
    self.apply(self.translator.receiveHeaders(headers, endStream: endStream))
  }

  func upstreamData(_ data: ByteBuffer, endStream: Bool) {
    self.sentFrames = nil
    if self.idleTimeout != nil { self.lastActivity = .now() }
    if endStream { self.upstreamEnded = true }
    if let names = self.grpcStatsNames {
      let started = self.responseMessages.inspect(data)
      if started > 0 { names.responseMessages.add(started) }
    }
    self.apply(self.translator.receiveData(data, endStream: endStream))
    if let downstream = self.downstream, !downstream.isWritable, case .open(let stream) = self.upstream {
      // The client is not keeping up: stop giving the backend window for this stream.
      stream.setPaused(true)
    }
  }

  func upstreamDataSent(_ bytes: Int) {
    self.upstreamUnsent = max(0, self.upstreamUnsent - bytes)
    if self.readingPaused && self.upstreamUnsent <= self.runtime.listener.bufferLimit / 2 {
      self.readingPaused = false
      self.downstream?.setReadingPaused(false)
    }
  }

  /// The backend cannot take this request's headers: a local 431, the connection untouched.
  func upstreamRefusedHeaders(_ message: String) {
    if case .open = self.upstream { self.upstream = .closed }
    self.sentFrames = nil
    guard !self.translator.isFinished else { return }
    self.runtime.logger.debug("request headers refused for the backend", metadata: ["reason": "\(message)"])
    self.apply(self.translator.localReply(httpStatus: 431, grpcStatus: .resourceExhausted, message: message))
  }

  /// The upstream stream closed. If the response has not ended, the stream was reset or its
  /// connection lost.
  func upstreamClosed(reason: String, unprocessed: Bool) {
    if case .open = self.upstream { self.upstream = .closed }
    guard !self.translator.isFinished else { return }
    if !unprocessed, self.sentFrames != nil, let policy = self.retryPolicy,
      policy.retryOn.contains(.reset) || policy.retryOn.contains(.serverError) || policy.retryOn.contains(.gatewayError)
    {
      if self.retry(outcome: 503) { return }
    }
    if unprocessed, let frames = self.sentFrames, self.replays < Self.maxReplays,
      self.retrying || self.runtime.upstreams.beginRetry(cluster: self.clusterName)
    {
      // The server never saw this call: send it again, to whichever endpoint is next.
      self.retrying = true
      self.replays += 1
      if let slot = self.upstreamSlot {
        self.upstreamSlot = nil
        self.runtime.upstreams.callEnded(cluster: slot.cluster, endpoint: slot.endpoint, status: nil)
      }
      self.runtime.logger.debug("upstream did not process the call; sending it again", metadata: ["reason": "\(reason)"])
      self.sentFrames = []
      self.sentBytes = 0
      self.upstream = .opening(pending: frames)
      self.runtime.upstreams.openStream(cluster: self.clusterName, for: self) { result in
        self.upstreamOpened(result)
      }
      return
    }
    if !self.upstreamEnded { self.upstreamOutcome = 503 }
    self.runtime.logger.debug("upstream stream ended early", metadata: ["reason": "\(reason)", "headSent": "\(self.translator.headSent)"])
    self.log?.flag(reason.hasPrefix("connection termination") ? "UC" : "UR")
    self.apply(self.translator.fail(.upstreamReset(reason: reason)))
  }

  // MARK: - Helpers

  private func sendUpstream(_ frame: HTTP2Frame.FramePayload) {
    switch frame {
    case .headers(let h) where h.endStream: self.requestSentEnd = true
    case .data(let d) where d.endStream: self.requestSentEnd = true
    default: break
    }
    if case .data(let d) = frame {
      switch self.upstream {
      case .opening, .open:
        self.upstreamUnsent += d.data.readableBytes
        if !self.readingPaused && self.upstreamUnsent > self.runtime.listener.bufferLimit {
          self.readingPaused = true
          self.downstream?.setReadingPaused(true)
        }
      case .none, .closed:
        break
      }
    }
    switch self.upstream {
    case .opening(var pending):
      self.upstream = .none
      pending.append(frame)
      self.upstream = .opening(pending: pending)
    case .open(let stream):
      self.remember(frame)
      stream.write(frame)
    case .none, .closed:
      break
    }
  }

  // MARK: - Retries (retry_policy)

  /// The answer as an HTTP status when `policy` says to try again on it: a 5xx head, or a
  /// trailers-only gRPC status named in `retry_on`. Nil when the answer stands.
  private static func retriable(_ headers: HPACKHeaders, endStream: Bool, policy: Route.RetryPolicy) -> Int? {
    let status = headers.first(name: ":status").flatMap { Int($0) } ?? 200
    if status >= 500 {
      if policy.retryOn.contains(.serverError) { return status }
      if policy.retryOn.contains(.gatewayError) && (502...504).contains(status) { return status }
    }
    if policy.retryOn.contains(.retriableStatusCodes) && policy.retriableStatusCodes.contains(status) { return status }
    guard endStream, let grpc = headers.first(name: "grpc-status").flatMap({ GRPCStatus(headerValue: $0) }) else { return nil }
    let condition: Route.RetryPolicy.Condition?
    switch grpc {
    case .cancelled: condition = .cancelled
    case .deadlineExceeded: condition = .deadlineExceeded
    case .resourceExhausted: condition = .resourceExhausted
    case .internalError: condition = .internalError
    case .unavailable: condition = .unavailable
    default: condition = nil
    }
    guard let condition, policy.retryOn.contains(condition) else { return nil }
    return Self.outcome(headers)
  }

  /// Lets go of this attempt and sends the call again after a jittered back-off (Envoy's: 25 ms
  /// doubling, at most 250 ms), if the policy has retries left, the request is still held, and
  /// the cluster's `max_retries` allows. The response has not started, so the client sees only
  /// the last attempt.
  private func retry(outcome: Int?) -> Bool {
    guard self.retriesLeft > 0, let frames = self.sentFrames, !self.translator.isFinished,
      self.retrying || self.runtime.upstreams.beginRetry(cluster: self.clusterName)
    else { return false }
    self.retrying = true
    self.retriesLeft -= 1
    self.attempts += 1
    self.perTryTask?.cancel()
    self.perTryTask = nil
    if case .open(let stream) = self.upstream {
      if self.upstreamEnded && self.requestSentEnd { stream.release() } else { stream.cancel() }
    }
    if let slot = self.upstreamSlot {
      self.upstreamSlot = nil
      self.runtime.upstreams.callEnded(cluster: slot.cluster, endpoint: slot.endpoint, status: outcome)
    }
    self.upstreamEnded = false
    self.upstreamOutcome = nil
    self.sentFrames = []
    self.sentBytes = 0
    self.upstream = .opening(pending: frames)
    let ceiling = min(25 << min(self.attempts - 2, 4), 250)
    let backoff = Int64.random(in: 1...Int64(ceiling))
    self.runtime.logger.debug("retrying the call", metadata: ["attempt": "\(self.attempts)", "backoffMs": "\(backoff)"])
    self.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(backoff)) {
      guard case .opening = self.upstream, !self.translator.isFinished else { return }
      self.runtime.upstreams.openStream(cluster: self.clusterName, for: self) { result in
        self.upstreamOpened(result)
      }
    }
    return true
  }

  private func scheduleIdleCheck(in delay: TimeAmount) {
    self.idleTask = self.eventLoop.assumeIsolated().scheduleTask(in: delay) {
      self.idleTask = nil
      guard let idle = self.idleTimeout, !self.translator.isFinished else { return }
      let quiet = NIODeadline.now() - self.lastActivity
      if quiet < idle {
        self.scheduleIdleCheck(in: idle - quiet)
        return
      }
      self.runtime.logger.debug("stream idle timeout", metadata: ["ms": "\(idle.nanoseconds / 1_000_000)"])
      self.log?.flag("SI")
      self.apply(self.translator.fail(.timeout(message: "stream timeout", httpStatus: 408)))
    }
  }

  private func startPerTryTimer() {
    guard let timeout = self.retryPolicy?.perTryTimeout, !timeout.isZero else { return }
    self.perTryTask?.cancel()
    self.perTryTask = self.eventLoop.assumeIsolated().scheduleTask(in: .nanoseconds(timeout.nanoseconds)) {
      self.perTryTask = nil
      guard !self.translator.isFinished, self.sentFrames != nil else { return }
      self.runtime.stats.count("upstream_rq_per_try_timeout", cluster: self.clusterName)
      if self.retry(outcome: 504) { return }
      self.runtime.logger.debug("per-try timeout", metadata: ["ms": "\(timeout.milliseconds)"])
      self.log?.flag("UT")
      self.apply(self.translator.fail(.timeout(message: "upstream request timeout", httpStatus: 504)))
    }
  }

  private func remember(_ frame: HTTP2Frame.FramePayload) {
    guard self.sentFrames != nil else { return }
    if case .data(let data) = frame { self.sentBytes += data.data.readableBytes }
    if self.sentBytes > Self.replayableBytes {
      self.sentFrames = nil
    } else {
      self.sentFrames!.append(frame)
    }
  }

  private func badBase64(_ error: Base64DecodeError) {
    self.runtime.logger.debug("bad grpc-web-text request body", metadata: ["detail": "\(error.detail)"])
    self.request = .rejected
    self.apply(self.translator.fail(.invalidRequestBody))
  }

  private func reject(_ output: ResponseTranslator.Output, endStream: Bool) {
    self.request = endStream ? .complete : .rejected
    self.apply(output)
  }

  private func startDeadline() {
    guard self.deadlineTask == nil, let plan = self.deadline, let ms = plan.milliseconds else { return }
    self.deadlineTask = self.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(ms)) {
      self.deadlineFired()
    }
  }

  private func deadlineFired() {
    self.deadlineTask = nil
    guard let plan = self.deadline, !self.translator.isFinished else { return }
    self.runtime.logger.debug("call deadline exceeded", metadata: ["ms": "\(plan.milliseconds ?? 0)"])
    if !self.clusterName.isEmpty { self.runtime.stats.count("upstream_rq_timeout", cluster: self.clusterName) }
    self.log?.flag("UT")
    self.apply(self.translator.fail(.timeout(message: plan.timeoutMessage, httpStatus: plan.timeoutHTTPStatus)))
  }

  private func apply(_ output: ResponseTranslator.Output) {
    self.write(output)
    if output.end != nil { self.cleanUp() }
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

  /// An answer's trailers (or trailers-only headers) as the HTTP status Envoy's outlier detection
  /// counts: grpc-status mapped to HTTP, or the `:status` of a non-gRPC answer.
  private static func outcome(_ headers: HPACKHeaders) -> Int? {
    if let grpc = headers.first(name: "grpc-status") {
      switch Int(grpc) ?? 2 {
      case 0: return 200
      case 1: return 499
      case 3, 9, 11: return 400
      case 4: return 504
      case 5: return 404
      case 6, 10: return 409
      case 7: return 403
      case 8: return 429
      case 12: return 501
      case 14: return 503
      case 16: return 401
      default: return 500
      }
    }
    return headers.first(name: ":status").flatMap { Int($0) }
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
      log.grpcStatus = self.clientGRPCStatus ?? self.translator.bodyTrailerStatus
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
    if let (bridge, path) = self.grpcMethod, let status = self.clientGRPCStatus ?? self.translator.bodyTrailerStatus {
      let method = stats.names.method(cluster: self.clusterName, path: path, bridge: bridge)
      method.total.add()
      (status == .ok ? method.success : method.failure).add()
      method.status(status).add()
    }
    if let names = self.grpcStatsNames {
      if let status = self.clientGRPCStatus ?? self.translator.bodyTrailerStatus {
        names.total.add()
        (status == .ok ? names.success : names.failure).add()
        names.status(status).add()
      }
      if let start = self.upstreamStart, self.runtime.listener.grpcStats?.upstreamStats == true {
        names.upstreamTime.record(since: start)
      }
    }
  }

  /// The response has ended: record it, stop the timer, cancel the upstream stream if it is
  /// still open, and give back the call's slot on its cluster.
  private func cleanUp() {
    self.recordStats()
    if self.readingPaused {
      // The rest of the request is read and dropped (or, on HTTP/1.1, the next one read).
      self.readingPaused = false
      self.downstream?.setReadingPaused(false)
    }
    self.deadlineTask?.cancel()
    self.deadlineTask = nil
    self.perTryTask?.cancel()
    self.perTryTask = nil
    self.idleTask?.cancel()
    self.idleTask = nil
    if let slot = self.upstreamSlot {
      self.upstreamSlot = nil
      self.runtime.upstreams.callEnded(cluster: slot.cluster, endpoint: slot.endpoint, status: self.upstreamOutcome)
    }
    if self.retrying {
      self.retrying = false
      self.runtime.upstreams.retryEnded(cluster: self.clusterName)
    }
    switch self.upstream {
    case .open(let stream):
      self.upstream = .closed
      // RST_STREAM(CANCEL) only for a stream still open.
      if self.upstreamEnded && self.requestSentEnd { stream.release() } else { stream.cancel() }
    case .opening:
      self.upstream = .closed
    case .none, .closed:
      break
    }
  }
}

