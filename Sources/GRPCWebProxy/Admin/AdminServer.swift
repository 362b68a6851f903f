import NIOCore
import NIOHTTP1

/// The admin port (Envoy's `admin.address`): what orchestrators and operators ask of a running
/// proxy. Plain HTTP/1.1, a handful of Envoy's endpoints with Envoy's meanings.
final class AdminHandler: ChannelInboundHandler {
  typealias InboundIn = HTTPServerRequestPart
  typealias OutboundOut = HTTPServerResponsePart

  static let index = """
    grpc-web-proxy admin
      GET  /ready              200 LIVE while serving; 503 when draining, failed by hand, or no backend is healthy
      GET  /clusters           every endpoint of every cluster, with its health
      GET  /stats              counters: DNS refreshes, health checks, ejections, membership
      POST /healthcheck/fail   make /ready answer 503 (take the proxy out of rotation)
      POST /healthcheck/ok     undo /healthcheck/fail

    """

  private let status: ProxyStatus
  private var request: HTTPRequestHead?

  init(status: ProxyStatus) {
    self.status = status
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    switch self.unwrapInboundIn(data) {
    case .head(let head):
      self.request = head
    case .body:
      break
    case .end:
      guard let head = self.request else { return }
      self.request = nil
      let (status, body) = self.respond(to: head)
      var headers = HTTPHeaders()
      headers.add(name: "content-type", value: "text/plain; charset=utf-8")
      headers.add(name: "content-length", value: String(body.utf8.count))
      headers.add(name: "cache-control", value: "no-cache, max-age=0")
      if !head.isKeepAlive { headers.add(name: "connection", value: "close") }
      context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
      if head.method != .HEAD {
        context.write(self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
      }
      let done = context.writeAndFlush(self.wrapOutboundOut(.end(nil)))
      if !head.isKeepAlive { done.assumeIsolated().whenComplete { _ in context.close(promise: nil) } }
    }
  }

  private func respond(to head: HTTPRequestHead) -> (HTTPResponseStatus, String) {
    let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
    let isRead = head.method == .GET || head.method == .HEAD
    switch path {
    case "/ready":
      guard isRead else { return (.methodNotAllowed, "use GET\n") }
      let (ready, reason) = self.status.readiness()
      return (ready ? .ok : .serviceUnavailable, reason + "\n")
    case "/clusters":
      guard isRead else { return (.methodNotAllowed, "use GET\n") }
      return (.ok, self.status.clustersText())
    case "/stats":
      guard isRead else { return (.methodNotAllowed, "use GET\n") }
      return (.ok, self.status.statsText())
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
