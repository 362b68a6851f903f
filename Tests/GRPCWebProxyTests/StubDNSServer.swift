#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import GRPCWebCore
import NIOCore
import NIOPosix
import ProxyConfig
import Synchronization

/// A DNS server on loopback (UDP and TCP on one port) that answers from a table the test sets,
/// written byte by byte here so that the resolver is checked against messages it did not make.
final class StubDNSServer: Sendable {
  enum Reply: Sendable {
    case records([String], ttl: UInt32)
    /// An error response: 1 FORMERR, 2 SERVFAIL, 3 NXDOMAIN, 5 REFUSED.
    case rcode(UInt16)
    /// No answer at all.
    case silence
    /// Over UDP: TC set and no records. Over TCP: the records.
    case truncatedOverUDP([String], ttl: UInt32)
    /// First an answer with another ID and other addresses, then the real one.
    case strayFirst([String], ttl: UInt32)
  }

  private struct Key: Hashable {
    var name: String
    var type: UInt16
  }

  private struct State {
    var replies: [Key: Reply] = [:]
    var udpQueries: [Key: Int] = [:]
    var tcpQueries: [Key: Int] = [:]
  }

  private let state = Mutex(State())
  private let channels = Mutex<[any Channel]>([])
  private let boundPort = Mutex(0)

  var port: Int { self.boundPort.withLock { $0 } }
  var address: HostAndPort { HostAndPort(host: "127.0.0.1", port: self.port) }

  /// UDP and TCP on one port: the UDP port the system picks may be taken for TCP by another
  /// process, so a few ports are tried.
  static func start(group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> StubDNSServer {
    var attempt = 0
    while true {
      do {
        return try await Self.startOnce(group: group)
      } catch where attempt < 10 {
        attempt += 1
      }
    }
  }

  private static func startOnce(group: any EventLoopGroup) async throws -> StubDNSServer {
    let server = StubDNSServer()
    let udp = try await DatagramBootstrap(group: group)
      .channelInitializer { channel in
        channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(UDPHandler(server: server)) }
      }
      .bind(host: "127.0.0.1", port: 0).get()
    let port = udp.localAddress!.port!
    let tcp: any Channel
    do {
      tcp = try await ServerBootstrap(group: group)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .childChannelInitializer { channel in
          channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(TCPHandler(server: server)) }
        }
        .bind(host: "127.0.0.1", port: port).get()
    } catch {
      try? await udp.close()
      throw error
    }
    server.boundPort.withLock { $0 = port }
    server.channels.withLock { $0 = [udp, tcp] }
    return server
  }

  func stop() async {
    for channel in self.channels.withLock({ $0 }) {
      try? await channel.close()
    }
  }

  func set(_ name: String, _ type: DNSRecordType, _ reply: Reply) {
    self.state.withLock { $0.replies[Key(name: name.lowercased(), type: type.rawValue)] = reply }
  }

  func queries(_ name: String, _ type: DNSRecordType, overTCP: Bool = false) -> Int {
    let key = Key(name: name.lowercased(), type: type.rawValue)
    return self.state.withLock { overTCP ? $0.tcpQueries[key, default: 0] : $0.udpQueries[key, default: 0] }
  }

  /// The messages to send back for a query. Unknown names get NXDOMAIN.
  fileprivate func answer(_ query: ByteBuffer, overTCP: Bool) -> [ByteBuffer] {
    let bytes = Array(query.readableBytesView)
    var end = 12
    var labels: [String] = []
    while end < bytes.count, bytes[end] != 0 {
      let length = Int(bytes[end])
      labels.append(String(decoding: bytes[(end + 1)..<(end + 1 + length)], as: UTF8.self))
      end += 1 + length
    }
    let question = Array(bytes[12..<(end + 5)])
    let key = Key(name: labels.joined(separator: ".").lowercased(), type: UInt16(bytes[end + 1]) << 8 | UInt16(bytes[end + 2]))
    let id = UInt16(bytes[0]) << 8 | UInt16(bytes[1])
    let reply = self.state.withLock { state in
      if overTCP { state.tcpQueries[key, default: 0] += 1 } else { state.udpQueries[key, default: 0] += 1 }
      return state.replies[key] ?? .rcode(3)
    }
    switch reply {
    case .records(let addresses, let ttl):
      return [Self.message(id: id, question: question, addresses: addresses, ttl: ttl)]
    case .rcode(let rcode):
      return [Self.message(id: id, rcode: rcode, question: question)]
    case .silence:
      return []
    case .truncatedOverUDP(let addresses, let ttl):
      if overTCP { return [Self.message(id: id, question: question, addresses: addresses, ttl: ttl)] }
      return [Self.message(id: id, truncated: true, question: question)]
    case .strayFirst(let addresses, let ttl):
      return [
        Self.message(id: id &+ 1, question: question, addresses: ["10.66.66.66"], ttl: ttl),
        Self.message(id: id, question: question, addresses: addresses, ttl: ttl),
      ]
    }
  }

  private static func message(
    id: UInt16,
    rcode: UInt16 = 0,
    truncated: Bool = false,
    question: [UInt8],
    addresses: [String] = [],
    ttl: UInt32 = 0
  ) -> ByteBuffer {
    let rdata = addresses.map(Self.bytes)
    var buffer = ByteBuffer()
    buffer.writeInteger(id)
    buffer.writeInteger(UInt16(0x8180) | (truncated ? 0x0200 : 0) | rcode)
    buffer.writeInteger(UInt16(1))
    buffer.writeInteger(UInt16(rdata.count))
    buffer.writeInteger(UInt32(0))
    buffer.writeBytes(question)
    for data in rdata {
      buffer.writeInteger(UInt16(0xC00C))  // the question's name
      buffer.writeInteger(UInt16(data.count == 4 ? 1 : 28))
      buffer.writeInteger(UInt16(1))
      buffer.writeInteger(ttl)
      buffer.writeInteger(UInt16(data.count))
      buffer.writeBytes(data)
    }
    return buffer
  }

  private static func bytes(_ address: String) -> [UInt8] {
    var v4 = in_addr()
    if inet_pton(AF_INET, address, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
    var v6 = in6_addr()
    precondition(inet_pton(AF_INET6, address, &v6) == 1, "\(address) is not an IP address")
    return withUnsafeBytes(of: &v6) { Array($0) }
  }
}

private final class UDPHandler: ChannelInboundHandler {
  typealias InboundIn = AddressedEnvelope<ByteBuffer>
  typealias OutboundOut = AddressedEnvelope<ByteBuffer>
  let server: StubDNSServer
  init(server: StubDNSServer) { self.server = server }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    let envelope = self.unwrapInboundIn(data)
    for message in self.server.answer(envelope.data, overTCP: false) {
      context.write(self.wrapOutboundOut(AddressedEnvelope(remoteAddress: envelope.remoteAddress, data: message)), promise: nil)
    }
    context.flush()
  }
}

private final class TCPHandler: ChannelInboundHandler {
  typealias InboundIn = ByteBuffer
  typealias OutboundOut = ByteBuffer
  let server: StubDNSServer
  var received = ByteBuffer()
  init(server: StubDNSServer) { self.server = server }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    var chunk = self.unwrapInboundIn(data)
    self.received.writeBuffer(&chunk)
    while let length = self.received.getInteger(at: self.received.readerIndex, as: UInt16.self),
      self.received.readableBytes >= 2 + Int(length)
    {
      self.received.moveReaderIndex(forwardBy: 2)
      let query = self.received.readSlice(length: Int(length))!
      for message in self.server.answer(query, overTCP: true) {
        var framed = ByteBuffer()
        framed.writeInteger(UInt16(message.readableBytes))
        framed.writeImmutableBuffer(message)
        context.write(self.wrapOutboundOut(framed), promise: nil)
      }
      context.flush()
    }
  }
}
