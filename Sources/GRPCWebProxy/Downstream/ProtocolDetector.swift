import NIOCore

/// Chooses HTTP/1.1 or HTTP/2 for a cleartext connection (Envoy's `codec_type: AUTO`) by the
/// first bytes: HTTP/2 with prior knowledge starts with the fixed connection preface.
final class ProtocolDetector: ChannelInboundHandler, RemovableChannelHandler {
  typealias InboundIn = ByteBuffer
  typealias InboundOut = ByteBuffer

  enum Detected { case http1, http2 }

  private static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
  private var buffered: ByteBuffer?
  private let configure: (ChannelHandlerContext, Detected) throws -> Void
  /// The listener's `idle_timeout`: a connection that never sends enough to be told apart (a
  /// silent one, or a few bytes of the preface) holds no request, so it is idle and closes then.
  private let idleTimeout: TimeAmount?
  private var idleTask: Scheduled<Void>?

  init(idleTimeout: TimeAmount? = nil, configure: @escaping (ChannelHandlerContext, Detected) throws -> Void) {
    self.idleTimeout = idleTimeout
    self.configure = configure
  }

  func handlerAdded(context: ChannelHandlerContext) {
    guard let idleTimeout else { return }
    self.idleTask = context.eventLoop.assumeIsolated().scheduleTask(in: idleTimeout) {
      context.close(promise: nil)
    }
  }

  func handlerRemoved(context: ChannelHandlerContext) {
    self.idleTask?.cancel()
    self.idleTask = nil
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    var incoming = self.unwrapInboundIn(data)
    if var buffered = self.buffered {
      self.buffered = nil
      buffered.writeBuffer(&incoming)
      incoming = buffered
    }
    let seen = incoming.readableBytesView.prefix(Self.preface.count)
    let decided: Detected?
    if !seen.elementsEqual(Self.preface.prefix(seen.count)) {
      decided = .http1
    } else if seen.count == Self.preface.count {
      decided = .http2
    } else {
      decided = nil
    }
    guard let decided else {
      self.buffered = incoming
      return
    }
    do {
      try self.configure(context, decided)
    } catch {
      context.close(promise: nil)
      return
    }
    context.fireChannelRead(self.wrapInboundOut(incoming))
    context.fireChannelReadComplete()
    context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
  }
}
