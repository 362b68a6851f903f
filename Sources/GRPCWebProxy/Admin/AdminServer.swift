import Foundation
import NIOCore
import NIOHPACK
import NIOHTTP1

/// The admin port (Envoy's `admin.address`): what orchestrators and operators ask of a running
/// proxy. Plain HTTP/1.1, a handful of Envoy's endpoints with Envoy's meanings.
final class AdminHandler: ChannelInboundHandler {
  typealias InboundIn = HTTPServerRequestPart
  typealias OutboundOut = HTTPServerResponsePart

  static let index = """
    grpc-web-proxy admin
      GET  /ready              200 LIVE while serving; 503 when draining, failed by hand, or no backend is healthy
      GET  /clusters           every endpoint of every cluster, with its health (?format=json: Envoy's JSON)
      GET  /stats              Envoy's stats by Envoy's names (?format=json, ?filter=REGEX)
      GET  /stats/prometheus   the same in Prometheus' text format, with Envoy's metric names and tags
      GET  /server_info        state, uptime and concurrency, as JSON
      GET  /config_dump        the configuration the proxy runs, as JSON, secrets redacted
      GET  /logging            the log level; POST /logging?level=LEVEL changes it (trace … critical, off)
      POST /drain_listeners    stop accepting connections (?graceful: and drain those open)
      POST /healthcheck/fail   make /ready answer 503 (take the proxy out of rotation)
      POST /healthcheck/ok     undo /healthcheck/fail

    """

  private let status: ProxyStatus
  private var request: HTTPRequestHead?
  private let accessLog: AdminAccessLog?
  private var requestStart = NIODeadline.now()
  private var requestStartWall = Date()

  init(status: ProxyStatus, accessLog: AdminAccessLog? = nil) {
    self.status = status
    self.accessLog = accessLog
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    switch self.unwrapInboundIn(data) {
    case .head(let head):
      self.request = head
      if self.accessLog != nil {
        self.requestStart = .now()
        self.requestStartWall = Date()
      }
    case .body:
      break
    case .end:
      guard let head = self.request else { return }
      self.request = nil
      let target = Target(head.uri)
      if let stats = self.statsRequest(head, target, on: context.eventLoop) {
        // Every event loop's stats are read on that loop, then answered from this one.
        let allocator = context.channel.allocator
        stats.assumeIsolated().whenComplete { result in
          switch result {
          case .success(let (status, type, body)):
            self.send(context: context, head: head, status: status, type: type, body: body, allocator: allocator)
          case .failure(let error):
            self.send(context: context, head: head, status: .internalServerError, type: "text/plain; charset=utf-8", body: "\(error)\n", allocator: allocator)
          }
        }
        return
      }
      let (status, body) = self.respond(to: head, target)
      let type = body.hasPrefix("{") ? "application/json" : "text/plain; charset=utf-8"
      self.send(context: context, head: head, status: status, type: type, body: body, allocator: context.channel.allocator)
    }
  }

  /// A request target: its path and its query's parameters, percent-decoded.
  private struct Target {
    var path: String
    var query: [String: String] = [:]

    init(_ uri: String) {
      let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
      self.path = String(parts[0])
      guard parts.count > 1 else { return }
      for item in parts[1].split(separator: "&") {
        let kv = item.split(separator: "=", maxSplits: 1)
        let value = kv.count > 1 ? String(kv[1]).replacingOccurrences(of: "+", with: " ") : ""
        self.query[String(kv[0])] = value.removingPercentEncoding ?? value
      }
    }
  }

  /// `/stats` and `/stats/prometheus` (GET), answered once every loop has reported.
  private func statsRequest(
    _ head: HTTPRequestHead, _ target: Target, on loop: any EventLoop
  ) -> EventLoopFuture<(HTTPResponseStatus, String, String)>? {
    guard target.path == "/stats" || target.path == "/stats/prometheus", head.method == .GET || head.method == .HEAD else {
      return nil
    }
    var regex: NSRegularExpression?
    if let filter = target.query["filter"], !filter.isEmpty {
      do {
        regex = try NSRegularExpression(pattern: filter)
      } catch {
        return loop.makeSucceededFuture((.badRequest, "text/plain; charset=utf-8", "Invalid re2 regex: \(filter)\n"))
      }
    }
    let clusters = self.status.clusterNames
    let prometheus = target.path == "/stats/prometheus" || target.query["format"] == "prometheus"
    let json = target.query["format"] == "json"
    return self.status.collectStats(on: loop).map { snapshot in
      let stats = snapshot.filtered(regex)
      if prometheus { return (.ok, "text/plain; version=0.0.4; charset=utf-8", stats.prometheus(clusters: clusters)) }
      if json { return (.ok, "application/json", stats.json) }
      return (.ok, "text/plain; charset=utf-8", stats.text)
    }
  }

  private func send(
    context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus, type: String, body: String,
    allocator: ByteBufferAllocator
  ) {
    var headers = HTTPHeaders()
    headers.add(name: "content-type", value: type)
    headers.add(name: "content-length", value: String(body.utf8.count))
    headers.add(name: "cache-control", value: "no-cache, max-age=0")
    if !head.isKeepAlive { headers.add(name: "connection", value: "close") }
    context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
    if head.method != .HEAD {
      context.write(self.wrapOutboundOut(.body(.byteBuffer(allocator.buffer(string: body)))), promise: nil)
    }
    if let accessLog = self.accessLog {
      let record = CallLogRecord()
      record.start = self.requestStart
      record.startWall = self.requestStartWall
      var request = HPACKHeaders()
      request.add(name: ":method", value: head.method.rawValue)
      request.add(name: ":path", value: head.uri)
      request.add(name: ":authority", value: head.headers.first(name: "host") ?? "")
      for (name, value) in head.headers { request.add(name: name.lowercased(), value: value) }
      record.requestHeaders = request
      record.responseHeaders = HPACKHeaders(headers.map { ($0.name, $0.value) })
      record.responseCode = Int(status.code)
      record.bytesSent = head.method == .HEAD ? 0 : body.utf8.count
      record.end = .now()
      record.firstByte = record.end
      record.requestEnd = record.end
      record.connection = DownstreamConnectionInfo(
        protocolName: "HTTP/\(head.version.major).\(head.version.minor)",
        remote: context.channel.remoteAddress, local: context.channel.localAddress)
      accessLog.log(record)
    }
    let done = context.writeAndFlush(self.wrapOutboundOut(.end(nil)))
    if !head.isKeepAlive { done.assumeIsolated().whenComplete { _ in context.close(promise: nil) } }
  }

  private func respond(to head: HTTPRequestHead, _ target: Target) -> (HTTPResponseStatus, String) {
    let path = target.path
    let isRead = head.method == .GET || head.method == .HEAD
    switch path {
    case "/ready":
      guard isRead else { return (.methodNotAllowed, "use GET\n") }
      let (ready, reason) = self.status.readiness()
      return (ready ? .ok : .serviceUnavailable, reason + "\n")
    case "/clusters":
      guard isRead else { return (.methodNotAllowed, "use GET\n") }
      if target.query["format"] == "json" { return (.ok, self.status.clustersJSON()) }
      return (.ok, self.status.clustersText())
    case "/stats", "/stats/prometheus":
      return (.methodNotAllowed, "use GET\n")
    case "/logging":
      if let level = target.query["level"] {
        // Changes state, so POST only, as in Envoy.
        guard head.method == .POST else { return (.methodNotAllowed, "use POST\n") }
        guard let parsed = RuntimeLogLevel.parse(level) else {
          return (.notFound, "unknown level \(level): trace, debug, info, warning, error, critical or off\n")
        }
        RuntimeLogLevel.current = parsed
      } else if !target.query.isEmpty {
        return (.notFound, "usage: /logging?level=LEVEL\n")
      }
      return (.ok, "active loggers:\n  grpc-web-proxy: \(RuntimeLogLevel.current)\n")
    case "/drain_listeners":
      guard head.method == .POST else { return (.methodNotAllowed, "use POST\n") }
      guard self.status.drainListeners(graceful: target.query["graceful"] != nil) else {
        return (.serviceUnavailable, "no listeners yet\n")
      }
      return (.ok, "OK\n")
    case "/config_dump":
      guard isRead else { return (.methodNotAllowed, "use GET\n") }
      return (.ok, self.status.configDump())
    case "/server_info":
      guard isRead else { return (.methodNotAllowed, "use GET\n") }
      return (.ok, self.status.serverInfo())
    case "/healthcheck/fail", "/healthcheck/ok":
      // Changes state, so POST only, as in Envoy: a stray GET from a browser must not do it.
      guard head.method == .POST else { return (.methodNotAllowed, "use POST\n") }
      self.status.setFailingHealthChecks(path == "/healthcheck/fail")
      return (.ok, "OK\n")
    case "/":
      return (.ok, Self.index)
    default:
      return (.notFound, "no admin endpoint \(path)\n\n" + Self.index)
    }
  }

  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    context.close(promise: nil)
  }
}
