import NIOCore
import NIOHTTP2

/// Sits on one upstream HTTP/2 stream channel and hands its frames to the call.
final class UpstreamStreamHandler: ChannelInboundHandler {
  typealias InboundIn = HTTP2Frame.FramePayload
  typealias OutboundOut = HTTP2Frame.FramePayload

  private var call: ProxyCall?
  private var resetReason: String?

  init(call: ProxyCall) {
    self.call = call
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    switch self.unwrapInboundIn(data) {
    case .headers(let headers):
      self.call?.upstreamHeaders(headers.headers, endStream: headers.endStream)
    case .data(let data):
      if case .byteBuffer(let buffer) = data.data {
        self.call?.upstreamData(buffer, endStream: data.endStream)
      }
    case .rstStream(let code):
      // Envoy reports an upstream reset as "remote reset" (the code mapping of gRPC's
      // PROTOCOL-HTTP2 applies to native clients).
      self.resetReason = code == .refusedStream ? "remote refused stream reset" : "remote reset"
    default:
      break
    }
  }

  func channelWritabilityChanged(context: ChannelHandlerContext) {
    self.call?.upstreamWritabilityChanged(context.channel.isWritable)
    context.fireChannelWritabilityChanged()
  }

  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    if self.resetReason == nil { self.resetReason = "connection termination (\(error))" }
    context.close(promise: nil)
  }

  func channelInactive(context: ChannelHandlerContext) {
    let call = self.call
    self.call = nil
    call?.upstreamClosed(reason: self.resetReason ?? "connection termination")
    context.fireChannelInactive()
  }
}
