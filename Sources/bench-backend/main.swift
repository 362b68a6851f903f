// A gRPC backend for benchmarks, made to be fast rather than general: it answers every call on
// its HTTP/2 connection with one fixed message and `grpc-status: 0`, handling frames on the
// connection channel (no per-stream channels) and flushing once per read cycle. The proxy under
// test, not the backend, must be the bottleneck.
import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix

final class FixedReplyHandler: ChannelInboundHandler {
  typealias InboundIn = HTTP2Frame
  typealias OutboundOut = HTTP2Frame

  private let headers: HPACKHeaders = [":status": "200", "content-type": "application/grpc"]
  private let trailers: HPACKHeaders = ["grpc-status": "0"]
  private let message: ByteBuffer
  private var pendingFlush = false
  /// Window to give back to the client this cycle. Without a stream multiplexer nothing else
  /// does; it is topped up from the window's size, so DATA dropped for reset streams is counted.
  private var windowIncrement = 0

  init(payloadSize: Int) {
    var buffer = ByteBuffer()
    buffer.writeInteger(UInt8(0))
    buffer.writeInteger(UInt32(payloadSize + 2))
    // A protobuf with one bytes field (number 1) of `payloadSize` bytes.
    buffer.writeInteger(UInt8(0x0A))
    buffer.writeInteger(UInt8(payloadSize))
    buffer.writeRepeatingByte(0x61, count: payloadSize)
    self.message = buffer
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    let frame = self.unwrapInboundIn(data)
    let ended: Bool
    switch frame.payload {
    case .headers(let h): ended = h.endStream
    case .data(let d):
      ended = d.endStream
    default: ended = false
    }
    guard ended else { return }
    let id = frame.streamID
    context.write(self.wrapOutboundOut(HTTP2Frame(streamID: id, payload: .headers(.init(headers: self.headers)))), promise: nil)
    context.write(self.wrapOutboundOut(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(self.message))))), promise: nil)
    context.write(self.wrapOutboundOut(HTTP2Frame(streamID: id, payload: .headers(.init(headers: self.trailers, endStream: true)))), promise: nil)
    self.pendingFlush = true
  }

  func channelReadComplete(context: ChannelHandlerContext) {
    if self.windowIncrement > 0 {
      let update = HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: self.windowIncrement))
      context.write(self.wrapOutboundOut(update), promise: nil)
      self.windowIncrement = 0
      self.pendingFlush = true
    }
    if self.pendingFlush {
      self.pendingFlush = false
      context.flush()
    }
    context.fireChannelReadComplete()
  }

  func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
    if let window = event as? NIOHTTP2WindowUpdatedEvent, window.streamID == .rootStream,
      let inbound = window.inboundWindowSize, inbound < 32_768
    {
      self.windowIncrement = 65_535 - inbound
    }
    context.fireUserInboundEventTriggered(event)
  }

  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    // A stream-level error (a reset stream, say) is not a reason to drop the connection.
    if error is NIOHTTP2Errors.StreamClosed || error is NIOHTTP2Errors.NoSuchStream { return }
    print("bench-backend: closing connection: \(error)")
    context.close(promise: nil)
  }
}

let arguments = CommandLine.arguments
let port = arguments.count > 1 ? Int(arguments[1]) ?? 50061 : 50061
let payloadSize = arguments.count > 2 ? Int(arguments[2]) ?? 100 : 100
let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
let channel = try await ServerBootstrap(group: group)
  .serverChannelOption(.backlog, value: 256)
  .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
  .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
  .childChannelInitializer { channel in
    channel.eventLoop.makeCompletedFuture {
      let settings = [HTTP2Setting(parameter: .maxConcurrentStreams, value: 10_000), HTTP2Setting(parameter: .initialWindowSize, value: 1 << 20)]
      try channel.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .server, initialSettings: settings))
      try channel.pipeline.syncOperations.addHandler(FixedReplyHandler(payloadSize: payloadSize))
    }
  }
  .bind(host: "127.0.0.1", port: port)
  .get()
print("bench-backend listening on 127.0.0.1:\(channel.localAddress?.port ?? port), \(payloadSize)-byte replies")
try await channel.closeFuture.get()
