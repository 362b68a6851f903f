import NIOCore
import NIOHTTP1
import NIOPosix

/// `GET /ready` against an admin port: the container health check, so that an image needs no
/// curl.
public enum ReadyProbe {
  /// - Returns: whether the answer was 200, and a line saying what came back.
  public static func get(host: String, port: Int, timeout: TimeAmount = .seconds(2)) async -> (Bool, String) {
    let group = MultiThreadedEventLoopGroup.singleton
    let promise = group.next().makePromise(of: (Int, String).self)
    let bootstrap = ClientBootstrap(group: group)
      .connectTimeout(timeout)
      .channelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
          try channel.pipeline.syncOperations.addHTTPClientHandlers()
          try channel.pipeline.syncOperations.addHandler(ResponseReader(promise: promise))
        }
      }
    do {
      let channel = try await bootstrap.connect(host: host, port: port).get()
      var headers = HTTPHeaders()
      headers.add(name: "host", value: "\(host):\(port)")
      headers.add(name: "connection", value: "close")
      channel.write(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/ready", headers: headers)), promise: nil)
      channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
      let timer = channel.eventLoop.scheduleTask(in: timeout) {
        promise.fail(ChannelError.connectTimeout(timeout))
        channel.close(promise: nil)
      }
      defer { timer.cancel() }
      let (status, body) = try await promise.futureResult.get()
      channel.close(promise: nil)
      let text = body.trimmingCharacters(in: .whitespacesAndNewlines)
      return (status == 200, "\(status) \(text)")
    } catch {
      promise.fail(error)
      return (false, "no answer from http://\(host):\(port)/ready: \(error)")
    }
  }

  private final class ResponseReader: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart

    private let promise: EventLoopPromise<(Int, String)>
    private var status = 0
    private var body = ""

    init(promise: EventLoopPromise<(Int, String)>) {
      self.promise = promise
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
      switch self.unwrapInboundIn(data) {
      case .head(let head): self.status = Int(head.status.code)
      case .body(let buffer): self.body += String(buffer: buffer)
      case .end: self.promise.succeed((self.status, self.body))
      }
    }

    func channelInactive(context: ChannelHandlerContext) {
      self.promise.fail(ChannelError.eof)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
      self.promise.fail(error)
      context.close(promise: nil)
    }
  }
}
