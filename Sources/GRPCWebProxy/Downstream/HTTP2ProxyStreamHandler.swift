import NIOCore
import NIOHPACK
import NIOHTTP2
import GRPCWebCore

/// Serves one downstream HTTP/2 stream: one call. Frames go straight to and from the call, with
/// no HTTP/1-style conversion, so a trailers-only response stays one HEADERS frame.
final class HTTP2ProxyStreamHandler: ChannelInboundHandler, DownstreamStream {
  typealias InboundIn = HTTP2Frame.FramePayload
  typealias OutboundOut = HTTP2Frame.FramePayload

  private let runtime: ListenerRuntime
  private var call: ProxyCall?
  private var flushScheduled = false
  private var context: ChannelHandlerContext?

  init(runtime: ListenerRuntime) {
    self.runtime = runtime
  }

  func handlerAdded(context: ChannelHandlerContext) {
    self.context = context
  }

  func handlerRemoved(context: ChannelHandlerContext) {
    self.context = nil
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    switch self.unwrapInboundIn(data) {
    case .headers(let headers):
      if let call = self.call {
        call.receiveEnd(trailers: headers.headers)
      } else {
        let call = ProxyCall(runtime: self.runtime, eventLoop: context.eventLoop, allocator: context.channel.allocator, downstream: self)
        self.call = call
        call.receiveHead(headers.headers, endStream: headers.endStream)
      }
    case .data(let data):
      if case .byteBuffer(let buffer) = data.data, buffer.readableBytes > 0 {
        self.call?.receiveBody(buffer)
      }
      if data.endStream { self.call?.receiveEnd(trailers: nil) }
    case .rstStream:
      self.call?.downstreamClosed()
    default:
      break
    }
  }

  func channelInactive(context: ChannelHandlerContext) {
    if let call = self.call, !call.isFinished { call.downstreamClosed() }
    self.call = nil
    context.fireChannelInactive()
  }

  func channelWritabilityChanged(context: ChannelHandlerContext) {
    self.call?.downstreamWritabilityChanged(context.channel.isWritable)
    context.fireChannelWritabilityChanged()
  }

  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    context.close(promise: nil)
  }

  // MARK: - DownstreamStream

  func write(head: ResponseHead, endStream: Bool) {
    guard let context = self.context else { return }
    var headers = HPACKHeaders()
    headers.reserveCapacity(head.headers.count + 1)
    headers.add(name: ":status", value: String(head.status))
    headers.add(contentsOf: head.headers)
    context.write(self.wrapOutboundOut(.headers(.init(headers: headers, endStream: endStream))), promise: nil)
  }

  func write(body: ByteBuffer, endStream: Bool) {
    guard let context = self.context else { return }
    context.write(self.wrapOutboundOut(.data(.init(data: .byteBuffer(body), endStream: endStream))), promise: nil)
  }

  func writeEnd(trailers: HPACKHeaders?) {
    guard let context = self.context else { return }
    if let trailers, !trailers.isEmpty {
      context.write(self.wrapOutboundOut(.headers(.init(headers: trailers, endStream: true))), promise: nil)
    } else {
      // An empty DATA frame, never an empty HEADERS frame: the latter broke Safari and IE (E16).
      let empty = context.channel.allocator.buffer(capacity: 0)
      context.write(self.wrapOutboundOut(.data(.init(data: .byteBuffer(empty), endStream: true))), promise: nil)
    }
  }

  func abort() {
    self.context?.close(promise: nil)
  }

  /// One flush per event-loop tick: a response's head, messages and end, written as separate
  /// upstream frames arrive in one read, go out in one write.
  func flush() {
    guard !self.flushScheduled, let context = self.context else { return }
    self.flushScheduled = true
    context.eventLoop.assumeIsolated().execute {
      self.flushScheduled = false
      self.context?.flush()
    }
  }

  var isWritable: Bool { self.context?.channel.isWritable ?? false }
}
