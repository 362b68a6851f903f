import Foundation
import GRPCCore

/// `demo.Echo`: a test service with every shape of call and knobs for errors, delays and
/// metadata. Request metadata named `x-echo-*` comes back as response headers and `x-trailer-*`
/// as trailers, so tests can check metadata (including `-bin`) both ways through the proxy.
public struct EchoService: Demo_Echo.ServiceProtocol {
  public let replica: String

  public init(replica: String) {
    self.replica = replica
  }

  public func unary(
    request: ServerRequest<Demo_EchoRequest>,
    context: ServerContext
  ) async throws -> ServerResponse<Demo_EchoResponse> {
    let message = request.message
    if message.delayMs > 0 { try await Task.sleep(for: .milliseconds(Int(message.delayMs))) }
    let (headers, trailers) = Self.echoedMetadata(request.metadata)
    // A sick replica, for tests of outlier detection: only the named one fails.
    if request.metadata[stringValues: "x-fail-replica"].contains(where: { $0 == self.replica }) {
      throw RPCError(code: .unavailable, message: "replica \(self.replica) is failing on purpose", metadata: ["x-replica": "\(self.replica)"])
    }
    if message.failCode != 0 {
      throw RPCError(code: Self.code(message.failCode), message: message.failMessage, metadata: trailers)
    }
    return ServerResponse(message: self.reply(message, index: 0), metadata: headers, trailingMetadata: trailers)
  }

  public func serverStream(
    request: ServerRequest<Demo_EchoRequest>,
    context: ServerContext
  ) async throws -> StreamingServerResponse<Demo_EchoResponse> {
    let message = request.message
    let (headers, trailers) = Self.echoedMetadata(request.metadata)
    return StreamingServerResponse(metadata: headers) { writer in
      for i in 0..<Int(message.count) {
        if message.delayMs > 0 { try await Task.sleep(for: .milliseconds(Int(message.delayMs))) }
        try await writer.write(self.reply(message, index: i))
      }
      if message.failCode != 0 {
        throw RPCError(code: Self.code(message.failCode), message: message.failMessage, metadata: trailers)
      }
      return trailers
    }
  }

  public func clientStream(
    request: StreamingServerRequest<Demo_EchoRequest>,
    context: ServerContext
  ) async throws -> ServerResponse<Demo_EchoResponse> {
    var parts: [String] = []
    for try await message in request.messages { parts.append(message.message) }
    var reply = Demo_EchoResponse()
    reply.message = parts.joined(separator: ",")
    reply.replica = self.replica
    reply.index = Int32(parts.count)
    return ServerResponse(message: reply)
  }

  public func bidiStream(
    request: StreamingServerRequest<Demo_EchoRequest>,
    context: ServerContext
  ) async throws -> StreamingServerResponse<Demo_EchoResponse> {
    StreamingServerResponse { writer in
      var i = 0
      for try await message in request.messages {
        try await writer.write(self.reply(message, index: i))
        i += 1
      }
      return [:]
    }
  }

  private func reply(_ request: Demo_EchoRequest, index: Int) -> Demo_EchoResponse {
    var reply = Demo_EchoResponse()
    reply.message = request.message
    reply.replica = self.replica
    reply.index = Int32(index)
    if request.padBytes > 0 { reply.padding = Data(repeating: 0x61, count: Int(request.padBytes)) }
    return reply
  }

  private static func code(_ raw: Int32) -> RPCError.Code {
    Status.Code(rawValue: Int(raw)).flatMap { RPCError.Code($0) } ?? .unknown
  }

  private static func echoedMetadata(_ metadata: Metadata) -> (Metadata, Metadata) {
    var headers: Metadata = [:]
    var trailers: Metadata = [:]
    for (key, value) in metadata {
      if key.hasPrefix("x-echo-") {
        headers.add(contentsOf: [(key, value)])
      } else if key.hasPrefix("x-trailer-") {
        trailers.add(contentsOf: [(key, value)])
      }
    }
    return (headers, trailers)
  }
}
