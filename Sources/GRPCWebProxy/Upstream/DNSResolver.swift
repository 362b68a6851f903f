#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import GRPCWebCore
import NIOCore
import NIOPosix
import ProxyConfig

/// A stub resolver that asks given DNS servers (a cluster's `dns_resolvers`) directly, so that
/// discovery learns what `getaddrinfo` hides: each record's TTL, and whether a name does not
/// exist (NXDOMAIN), exists without addresses (an empty NOERROR), or could not be resolved at
/// all (SERVFAIL, REFUSED, no answer), which call for different reactions.
///
/// Each try uses a fresh connected UDP socket on an ephemeral port and a random ID, so an answer
/// has to come from the server's address and port and echo the ID and the question. A truncated
/// answer (TC) is asked again of the same server over TCP. Names are asked as given: no search
/// domains, no /etc/hosts.
public struct DNSResolver: Sendable {
  public enum Outcome: Sendable, Equatable, CustomStringConvertible {
    /// NOERROR: the addresses, possibly none (the name exists but has no record of that type).
    case addresses([DNSRecord])
    case nxDomain
    /// Nothing is known: SERVFAIL, REFUSED, no answer in time, a socket error. A readable reason.
    case failure(String)

    public var description: String {
      switch self {
      case .addresses(let records): records.isEmpty ? "no addresses" : records.map(\.description).joined(separator: ", ")
      case .nxDomain: "NXDOMAIN"
      case .failure(let reason): reason
      }
    }
  }

  public let servers: [HostAndPort]
  public let timeout: TimeAmount
  /// Rounds over the servers, as c-ares' `tries`: every server is asked once per round, so a
  /// name that gets no answer fails after `timeout × attempts × servers.count`.
  public let attempts: Int
  private let group: any EventLoopGroup
  private let addresses: Result<[SocketAddress], ResolverError>

  public init(servers: [HostAndPort], timeout: TimeAmount = .seconds(1), attempts: Int = 2, group: any EventLoopGroup) {
    self.servers = servers
    self.timeout = timeout
    self.attempts = max(1, attempts)
    self.group = group
    // The configuration checks the servers; an address that slips through fails each lookup
    // with its reason rather than taking the process down.
    self.addresses = Result { () throws(ResolverError) -> [SocketAddress] in
      guard !servers.isEmpty else { throw ResolverError("no DNS servers are configured") }
      return try servers.map { server throws(ResolverError) in
        do {
          return try SocketAddress(ipAddress: server.host, port: server.port)
        } catch {
          throw ResolverError("the DNS server '\(server.host)' is not an IP address")
        }
      }
    }
  }

  /// The records of one type for `name`. An IP address as the name is its own answer (for the
  /// type of its family), with no query and a TTL that never runs out.
  public func lookup(_ name: String, type: DNSRecordType) async -> Outcome {
    if let literal = Self.literal(name) {
      return .addresses(literal.type == type ? [DNSRecord(address: literal.address, ttl: .max)] : [])
    }
    do {
      _ = try DNSMessage.query(id: 0, name: name, type: type)
    } catch {
      return .failure("'\(name)' is not a name DNS can look up: \(error)")
    }
    let servers: [SocketAddress]
    switch self.addresses {
    case .success(let addresses): servers = addresses
    case .failure(let error): return .failure("\(name) \(type): \(error.reason)")
    }

    var reason = ""
    var tries = 0
    for _ in 0..<self.attempts {
      for server in servers {
        if Task.isCancelled { return .failure("\(name) \(type): cancelled") }
        tries += 1
        switch await self.ask(name, type: type, server: server) {
        case .success(let response):
          switch response.rcode {
          case .noError: return .addresses(response.records)
          case .nxDomain: return .nxDomain
          default:
            // Like c-ares, SERVFAIL, REFUSED and the rest mean "ask someone else".
            reason = "\(response.rcode) from \(Self.text(server))"
          }
        case .failure(let error):
          reason = error.reason
        }
      }
    }
    return .failure("\(name) \(type): \(reason)" + (tries > 1 ? " (\(tries) tries)" : ""))
  }

  /// A and AAAA lookups combined as Envoy's `dns_lookup_family` says. AUTO and V4_PREFERRED
  /// ask the second family whenever the first gives no address, whatever the reason, and
  /// return what the second gives.
  public func resolve(_ name: String, family: Cluster.DNSLookupFamily) async -> Outcome {
    switch family {
    case .v4Only:
      return await self.lookup(name, type: .a)
    case .v6Only:
      return await self.lookup(name, type: .aaaa)
    case .auto:
      return await self.lookup(name, preferring: .aaaa, then: .a)
    case .v4Preferred:
      return await self.lookup(name, preferring: .a, then: .aaaa)
    case .all:
      async let v4 = self.lookup(name, type: .a)
      async let v6 = self.lookup(name, type: .aaaa)
      return Self.combine(await v4, await v6)
    }
  }

  private func lookup(_ name: String, preferring first: DNSRecordType, then second: DNSRecordType) async -> Outcome {
    let outcome = await self.lookup(name, type: first)
    if case .addresses(let records) = outcome, !records.isEmpty { return outcome }
    return await self.lookup(name, type: second)
  }

  /// Both families' addresses, IPv4 first. Without any address, a failure wins over an empty
  /// answer (one family's records are unknown, so the set may not really be empty), and
  /// NXDOMAIN needs both to say so.
  public static func combine(_ v4: Outcome, _ v6: Outcome) -> Outcome {
    var records: [DNSRecord] = []
    if case .addresses(let found) = v4 { records += found }
    if case .addresses(let found) = v6 { records += found }
    if !records.isEmpty { return .addresses(records) }
    switch (v4, v6) {
    case (.failure(let a), .failure(let b)): return .failure(a == b ? a : "\(a); \(b)")
    case (.failure, _): return v4
    case (_, .failure): return v6
    case (.nxDomain, .nxDomain): return .nxDomain
    default: return .addresses([])
    }
  }

  // MARK: - One try

  struct ResolverError: Error {
    var reason: String
    init(_ reason: String) { self.reason = reason }
  }

  /// One question to one server: over UDP, then over TCP if the answer was truncated.
  private func ask(_ name: String, type: DNSRecordType, server: SocketAddress) async -> Result<DNSResponse, ResolverError> {
    let udp = await self.exchange(name, type: type, server: server, overTCP: false)
    guard case .success(let response) = udp, response.truncated else { return udp }
    switch await self.exchange(name, type: type, server: server, overTCP: true) {
    case .success(let whole): return .success(whole)
    case .failure(let error): return .failure(ResolverError("the UDP answer was truncated and TCP failed: \(error.reason)"))
    }
  }

  private func exchange(
    _ name: String,
    type: DNSRecordType,
    server: SocketAddress,
    overTCP: Bool
  ) async -> Result<DNSResponse, ResolverError> {
    let id = UInt16.random(in: .min ... .max)
    let query: ByteBuffer
    do {
      query = try DNSMessage.query(id: id, name: name, type: type)
    } catch {
      return .failure(ResolverError("\(error)"))
    }
    let loop = self.group.next()
    let promise = loop.makePromise(of: DNSResponse.self)
    let reader = AnswerReader(id: id, name: name, type: type, promise: promise)
    // One deadline covers connecting, sending and waiting; it and the end of the channel
    // both hang off the promise, whoever settles it.
    let timeout = self.timeout
    let deadline = loop.scheduleTask(in: timeout) { promise.fail(TimedOut()) }

    let connected: EventLoopFuture<any Channel>
    if overTCP {
      connected = ClientBootstrap(group: loop)
        .connectTimeout(timeout)
        .channelInitializer { channel in
          channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(TCPAnswerHandler(reader: reader))
          }
        }
        .connect(to: server)
    } else {
      connected = DatagramBootstrap(group: loop)
        // Without EDNS a server should keep to 512 bytes, but a datagram cut short by a small
        // buffer would read as garbage; this one is only held for one lookup.
        .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 65_536))
        .channelInitializer { channel in
          channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(UDPAnswerHandler(server: server, reader: reader))
          }
        }
        .connect(to: server)
    }
    connected.whenComplete { result in
      switch result {
      case .success(let channel):
        promise.futureResult.whenComplete { _ in channel.close(promise: nil) }
        var message = channel.allocator.buffer(capacity: query.readableBytes + 2)
        if overTCP { message.writeInteger(UInt16(query.readableBytes)) }
        message.writeImmutableBuffer(query)
        channel.writeAndFlush(message).whenFailure { promise.fail($0) }
      case .failure(let error):
        promise.fail(error)
      }
    }
    promise.futureResult.whenComplete { _ in deadline.cancel() }

    let transport = overTCP ? " over TCP" : ""
    do {
      let response = try await withTaskCancellationHandler {
        try await promise.futureResult.get()
      } onCancel: {
        promise.fail(CancellationError())
      }
      return .success(response)
    } catch is TimedOut {
      return .failure(ResolverError("no answer from \(Self.text(server))\(transport) within \(Self.text(timeout))"))
    } catch let error as DNSMessageError {
      return .failure(ResolverError("bad answer from \(Self.text(server))\(transport): \(error)"))
    } catch is CancellationError {
      return .failure(ResolverError("cancelled"))
    } catch let error as IOError where error.errnoCode == ECONNREFUSED {
      return .failure(ResolverError("nothing answers DNS on \(Self.text(server))\(transport) (connection refused)"))
    } catch {
      return .failure(ResolverError("\(Self.text(server))\(transport): \(error)"))
    }
  }

  private struct TimedOut: Error {}

  // MARK: - Text

  private static func literal(_ name: String) -> (address: String, type: DNSRecordType)? {
    guard let address = try? SocketAddress(ipAddress: name, port: 0), let text = address.ipAddress else { return nil }
    switch address {
    case .v4: return (text, .a)
    case .v6: return (text, .aaaa)
    case .unixDomainSocket: return nil
    }
  }

  private static func text(_ address: SocketAddress) -> String {
    guard let ip = address.ipAddress, let port = address.port else { return "\(address)" }
    return HostAndPort(host: ip, port: port).description
  }

  private static func text(_ amount: TimeAmount) -> String {
    let nanoseconds = amount.nanoseconds
    if nanoseconds % 1_000_000_000 == 0 { return "\(nanoseconds / 1_000_000_000) s" }
    return "\(nanoseconds / 1_000_000) ms"
  }
}

/// What both transports do with the bytes of an answer. Lives on the channel's event loop.
private struct AnswerReader: Sendable {
  let id: UInt16
  let name: String
  let type: DNSRecordType
  let promise: EventLoopPromise<DNSResponse>

  /// Settles the try unless the message is an answer to some other query (another ID, or
  /// another question), which is dropped as RFC 5452 says, so that a stray or forged datagram
  /// cannot end the wait.
  func read(_ message: ByteBuffer) {
    do throws(DNSMessageError) {
      self.promise.succeed(try DNSMessage.parseResponse(message, expectedID: self.id, name: self.name, type: self.type))
    } catch .idMismatch, .questionMismatch {
      return
    } catch {
      self.promise.fail(error)
    }
  }
}

private final class UDPAnswerHandler: ChannelInboundHandler {
  typealias InboundIn = AddressedEnvelope<ByteBuffer>

  private let server: SocketAddress
  private let reader: AnswerReader

  init(server: SocketAddress, reader: AnswerReader) {
    self.server = server
    self.reader = reader
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    let envelope = self.unwrapInboundIn(data)
    // The socket is connected, so the kernel already drops datagrams from elsewhere.
    guard envelope.remoteAddress == self.server else { return }
    self.reader.read(envelope.data)
  }

  /// An ICMP port unreachable for the query shows up here as ECONNREFUSED: no server there.
  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    self.reader.promise.fail(error)
  }

  func channelInactive(context: ChannelHandlerContext) {
    self.reader.promise.fail(ChannelError.ioOnClosedChannel)
  }
}

/// RFC 1035 4.2.2: over TCP each message is preceded by its length in two bytes.
private final class TCPAnswerHandler: ChannelInboundHandler {
  typealias InboundIn = ByteBuffer

  private let reader: AnswerReader
  private var received: ByteBuffer?

  init(reader: AnswerReader) {
    self.reader = reader
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    var chunk = self.unwrapInboundIn(data)
    if self.received == nil {
      self.received = chunk
    } else {
      self.received!.writeBuffer(&chunk)
    }
    while var buffer = self.received, let length = buffer.getInteger(at: buffer.readerIndex, as: UInt16.self),
      buffer.readableBytes >= 2 + Int(length)
    {
      buffer.moveReaderIndex(forwardBy: 2)
      let message = buffer.readSlice(length: Int(length))!
      self.received = buffer
      // A server may send other messages first; only the answer to this query settles it.
      self.reader.read(message)
    }
  }

  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    self.reader.promise.fail(error)
  }

  func channelInactive(context: ChannelHandlerContext) {
    self.reader.promise.fail(ResolverClosedEarly())
  }
}

private struct ResolverClosedEarly: Error, CustomStringConvertible {
  var description: String { "the server closed the connection before the whole answer" }
}
