import NIOCore

/// The record types a stub resolver asks for when it looks up a host.
public enum DNSRecordType: UInt16, Sendable, Hashable, CaseIterable, CustomStringConvertible {
  case a = 1
  case aaaa = 28

  public var description: String {
    switch self {
    case .a: "A"
    case .aaaa: "AAAA"
    }
  }
}

/// One address from an answer, in the text form `SocketAddress(ipAddress:port:)` and
/// `inet_pton` accept.
public struct DNSRecord: Sendable, Hashable, CustomStringConvertible {
  public var address: String
  /// Seconds. For an address reached through CNAMEs, the smallest TTL along the chain: the
  /// address is only as fresh as the aliases that lead to it.
  public var ttl: UInt32

  public init(address: String, ttl: UInt32) {
    self.address = address
    self.ttl = ttl
  }

  public var description: String { "\(self.address) (ttl \(self.ttl))" }
}

public enum DNSResponseCode: Sendable, Hashable, CustomStringConvertible {
  case noError
  case formErr
  case servFail
  case nxDomain
  case notImp
  case refused
  case other(Int)

  public init(_ value: Int) {
    switch value {
    case 0: self = .noError
    case 1: self = .formErr
    case 2: self = .servFail
    case 3: self = .nxDomain
    case 4: self = .notImp
    case 5: self = .refused
    default: self = .other(value)
    }
  }

  /// The mnemonic `dig` prints.
  public var description: String {
    switch self {
    case .noError: "NOERROR"
    case .formErr: "FORMERR"
    case .servFail: "SERVFAIL"
    case .nxDomain: "NXDOMAIN"
    case .notImp: "NOTIMP"
    case .refused: "REFUSED"
    case .other(let value): "RCODE \(value)"
    }
  }
}

public struct DNSResponse: Sendable, Hashable {
  public var rcode: DNSResponseCode
  /// The server set TC: the answer did not fit in the datagram. `records` then holds what
  /// could be read and may be incomplete; ask again over TCP.
  public var truncated: Bool
  /// The addresses of the asked type for the asked name or an alias of it, in answer order,
  /// without duplicates.
  public var records: [DNSRecord]

  public init(rcode: DNSResponseCode, truncated: Bool, records: [DNSRecord]) {
    self.rcode = rcode
    self.truncated = truncated
    self.records = records
  }
}

public enum DNSMessageError: Error, Sendable, Hashable, CustomStringConvertible {
  case emptyName
  case emptyLabel(name: String)
  case labelTooLong(label: String, bytes: Int)
  case nameTooLong(bytes: Int)
  /// The message ends inside the header, a question, a record or a name.
  case truncated(offset: Int)
  case badLabelType(offset: Int, byte: UInt8)
  case pointerOutOfBounds(offset: Int, target: Int)
  case pointerLoop(offset: Int)
  case idMismatch(expected: UInt16, received: UInt16)
  case notAResponse
  case unexpectedOpcode(Int)
  case questionMismatch(String)
  case badRecordLength(type: UInt16, length: Int)

  public var description: String {
    switch self {
    case .emptyName: "the host name is empty"
    case .emptyLabel(let name): "'\(name)' has an empty label (two dots in a row or a leading dot)"
    case .labelTooLong(let label, let bytes): "the label '\(label)' is \(bytes) bytes long; DNS allows 63"
    case .nameTooLong(let bytes): "the name is \(bytes) bytes long in DNS form; DNS allows 255 (253 characters)"
    case .truncated(let offset): "the message ends early, at byte \(offset)"
    case .badLabelType(let offset, let byte):
      "byte \(offset) starts a label of reserved type 0x\(String(byte, radix: 16))"
    case .pointerOutOfBounds(let offset, let target):
      "the compression pointer at byte \(offset) points to \(target), past the end of the message"
    case .pointerLoop(let offset): "the compression pointer at byte \(offset) makes a loop"
    case .idMismatch(let expected, let received): "the response has ID \(received), the query had \(expected)"
    case .notAResponse: "the message is a query, not a response"
    case .unexpectedOpcode(let opcode): "the response has opcode \(opcode), not QUERY"
    case .questionMismatch(let detail): "the response answers another question: \(detail)"
    case .badRecordLength(let type, let length): "a record of type \(type) has \(length) bytes of data"
    }
  }
}

/// DNS messages as RFC 1035 and RFC 3596 lay them out: just what a stub resolver needs to ask
/// one question and read the addresses in the answer.
public enum DNSMessage {
  private static let classIN: UInt16 = 1
  private static let typeCNAME: UInt16 = 5
  /// RFC 1035 4.1.4: the two top bits of a length byte set mean the next 14 bits are an offset.
  private static let pointerBits: UInt8 = 0xC0

  /// A standard query with recursion desired (a stub has no way to follow referrals).
  /// `name` may end with a dot; it is asked as given, with no search domains.
  public static func query(id: UInt16, name: String, type: DNSRecordType) throws(DNSMessageError) -> ByteBuffer {
    let labels = try self.labels(of: name)
    var buffer = ByteBuffer()
    buffer.reserveCapacity(12 + labels.reduce(1) { $0 + 1 + $1.count } + 4)
    buffer.writeInteger(id)
    buffer.writeInteger(UInt16(0x0100))  // QR=0, opcode QUERY, RD=1
    buffer.writeInteger(UInt16(1))  // QDCOUNT
    buffer.writeInteger(UInt16(0))  // ANCOUNT
    buffer.writeInteger(UInt16(0))  // NSCOUNT
    buffer.writeInteger(UInt16(0))  // ARCOUNT
    for label in labels {
      buffer.writeInteger(UInt8(label.count))
      buffer.writeBytes(label)
    }
    buffer.writeInteger(UInt8(0))
    buffer.writeInteger(type.rawValue)
    buffer.writeInteger(self.classIN)
    return buffer
  }

  /// Reads the answer to a query made by `query(id:name:type:)`.
  ///
  /// Throws when the message is malformed or is not the answer to that question (another ID,
  /// another name or type), so that a stray or forged datagram can be told apart and ignored.
  /// Only the answer section is read: the authority and additional sections may carry
  /// addresses for other names and are not trusted.
  public static func parseResponse(
    _ buffer: ByteBuffer,
    expectedID: UInt16,
    name: String,
    type: DNSRecordType
  ) throws(DNSMessageError) -> DNSResponse {
    let question = try self.labels(of: name).map(Self.lowercased)
    var reader = Reader(bytes: Array(buffer.readableBytesView))

    let id = try reader.u16()
    guard id == expectedID else { throw .idMismatch(expected: expectedID, received: id) }
    let flags = try reader.u16()
    guard flags & 0x8000 != 0 else { throw .notAResponse }
    let opcode = Int(flags >> 11) & 0xF
    guard opcode == 0 else { throw .unexpectedOpcode(opcode) }
    let truncated = flags & 0x0200 != 0
    let rcode = DNSResponseCode(Int(flags & 0x000F))
    let questionCount = try reader.u16()
    let answerCount = try reader.u16()
    _ = try reader.u16()  // NSCOUNT
    _ = try reader.u16()  // ARCOUNT

    switch questionCount {
    case 0:
      // Servers may drop the question from an error response; a success must echo it, or it
      // could be the answer to anything.
      guard rcode != .noError else { throw .questionMismatch("no question in the response") }
    case 1:
      let asked = try reader.name()
      let askedType = try reader.u16()
      let askedClass = try reader.u16()
      guard asked == question else {
        throw .questionMismatch("name '\(Self.text(asked))' instead of '\(Self.text(question))'")
      }
      guard askedType == type.rawValue, askedClass == Self.classIN else {
        throw .questionMismatch("type \(askedType) class \(askedClass) instead of \(type) IN")
      }
    default:
      throw .questionMismatch("\(questionCount) questions")
    }

    var aliases: [[[UInt8]]: (target: [[UInt8]], ttl: UInt32)] = [:]
    var addresses: [(owner: [[UInt8]], record: DNSRecord)] = []
    do throws(DNSMessageError) {
      for _ in 0..<answerCount {
        let owner = try reader.name()
        let recordType = try reader.u16()
        let recordClass = try reader.u16()
        // RFC 2181 8: a TTL with the top bit set is read as zero.
        let rawTTL = try reader.u32()
        let ttl = rawTTL > UInt32(Int32.max) ? 0 : rawTTL
        let length = Int(try reader.u16())
        let data = try reader.skip(length)
        guard recordClass == Self.classIN else { continue }
        switch recordType {
        case type.rawValue:
          let expected = type == .a ? 4 : 16
          guard length == expected else { throw .badRecordLength(type: recordType, length: length) }
          let bytes = reader.bytes[data]
          let address = type == .a ? bytes.map { String($0) }.joined(separator: ".") : Self.ipv6Text(bytes)
          addresses.append((owner, DNSRecord(address: address, ttl: ttl)))
        case Self.typeCNAME:
          var rdata = reader
          rdata.offset = data.lowerBound
          let target = try rdata.name()
          guard rdata.offset == data.upperBound else {
            throw .badRecordLength(type: recordType, length: length)
          }
          // Two CNAMEs for one name is illegal (RFC 1034 3.6.2); the first one wins.
          if aliases[owner] == nil { aliases[owner] = (target, ttl) }
        default:
          continue
        }
      }
    } catch {
      // Past TC a server may have cut the message anywhere; keep what was whole.
      guard truncated else { throw error }
    }

    // The names that stand for the question, each with the TTL of the alias chain leading to it.
    var chainTTL: [[[UInt8]]: UInt32] = [question: .max]
    var current = question
    while let alias = aliases[current], chainTTL[alias.target] == nil {
      chainTTL[alias.target] = min(chainTTL[current]!, alias.ttl)
      current = alias.target
    }
    var records: [DNSRecord] = []
    for (owner, record) in addresses {
      guard let cap = chainTTL[owner] else { continue }
      let ttl = min(record.ttl, cap)
      if let index = records.firstIndex(where: { $0.address == record.address }) {
        records[index].ttl = min(records[index].ttl, ttl)
      } else {
        records.append(DNSRecord(address: record.address, ttl: ttl))
      }
    }
    return DNSResponse(rcode: rcode, truncated: truncated, records: records)
  }

  /// An IPv6 address in the text form glibc's `inet_ntop` writes (RFC 5952 compression: the
  /// longest run of two or more zero groups, the first if tied, becomes `::`; lowercase hex;
  /// `::ffff:a.b.c.d` and `::a.b.c.d` with the last 32 bits as a dotted quad), so that an
  /// address reads the same whether it came from here or from `getaddrinfo`.
  public static func ipv6Text<Bytes: Collection<UInt8>>(_ bytes: Bytes) -> String {
    precondition(bytes.count == 16, "an IPv6 address is 16 bytes")
    let octets = Array(bytes)
    let groups = (0..<8).map { UInt16(octets[2 * $0]) << 8 | UInt16(octets[2 * $0 + 1]) }

    var best: (start: Int, count: Int)? = nil
    var run: (start: Int, count: Int)? = nil
    for (index, group) in groups.enumerated() {
      if group == 0 {
        run = run.map { ($0.start, $0.count + 1) } ?? (index, 1)
        if let current = run, current.count > (best?.count ?? 1) { best = current }
      } else {
        run = nil
      }
    }

    var text = ""
    var index = 0
    while index < 8 {
      if let best, index == best.start {
        // With the separator before the next group (or the one closing the text) this makes "::".
        text += ":"
        index += best.count
        if index == 8 { text += ":" }
        continue
      }
      if index != 0 { text += ":" }
      if index == 6, let best, best.start == 0, best.count == 6 || (best.count == 5 && groups[5] == 0xFFFF) {
        text += octets[12...].map { String($0) }.joined(separator: ".")
        break
      }
      text += String(groups[index], radix: 16)
      index += 1
    }
    return text
  }

  /// The labels of a host name, checked against RFC 1035's limits.
  private static func labels(of name: String) throws(DNSMessageError) -> [[UInt8]] {
    var bytes = Array(name.utf8)
    if bytes.last == UInt8(ascii: ".") { bytes.removeLast() }
    guard !bytes.isEmpty else { throw .emptyName }
    let labels = bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false).map(Array.init)
    var wireLength = 1
    for label in labels {
      guard !label.isEmpty else { throw .emptyLabel(name: name) }
      guard label.count <= 63 else {
        throw .labelTooLong(label: String(decoding: label, as: UTF8.self), bytes: label.count)
      }
      wireLength += 1 + label.count
    }
    guard wireLength <= 255 else { throw .nameTooLong(bytes: wireLength) }
    return labels
  }

  /// DNS compares names without regard to ASCII case (RFC 4343).
  private static func lowercased(_ label: [UInt8]) -> [UInt8] {
    label.map { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") ? $0 | 0x20 : $0 }
  }

  private static func text(_ labels: [[UInt8]]) -> String {
    labels.map { String(decoding: $0, as: UTF8.self) }.joined(separator: ".")
  }

  /// Reads a message from its first byte, where compression pointers count from.
  private struct Reader {
    let bytes: [UInt8]
    var offset = 0

    mutating func skip(_ count: Int) throws(DNSMessageError) -> Range<Int> {
      guard count <= self.bytes.count - self.offset else { throw .truncated(offset: self.bytes.count) }
      defer { self.offset += count }
      return self.offset..<(self.offset + count)
    }

    mutating func u16() throws(DNSMessageError) -> UInt16 {
      let range = try self.skip(2)
      return UInt16(self.bytes[range.lowerBound]) << 8 | UInt16(self.bytes[range.lowerBound + 1])
    }

    mutating func u32() throws(DNSMessageError) -> UInt32 {
      UInt32(try self.u16()) << 16 | UInt32(try self.u16())
    }

    /// A name, lowercased, following compression pointers; leaves `offset` just past the part
    /// written in place. Every pointer target may be visited once, so a loop throws instead of
    /// spinning, and the 255-byte limit bounds the work on any input.
    mutating func name() throws(DNSMessageError) -> [[UInt8]] {
      var labels: [[UInt8]] = []
      var position = self.offset
      var end: Int? = nil
      var visited: [Int] = []
      var wireLength = 1
      while true {
        guard position < self.bytes.count else { throw .truncated(offset: self.bytes.count) }
        let length = self.bytes[position]
        switch length & DNSMessage.pointerBits {
        case 0:
          if length == 0 {
            self.offset = end ?? position + 1
            return labels
          }
          let start = position + 1
          guard Int(length) <= self.bytes.count - start else { throw .truncated(offset: self.bytes.count) }
          wireLength += 1 + Int(length)
          guard wireLength <= 255 else { throw .nameTooLong(bytes: wireLength) }
          labels.append(DNSMessage.lowercased(Array(self.bytes[start..<(start + Int(length))])))
          position = start + Int(length)
        case DNSMessage.pointerBits:
          guard position + 1 < self.bytes.count else { throw .truncated(offset: self.bytes.count) }
          let target = Int(length & ~DNSMessage.pointerBits) << 8 | Int(self.bytes[position + 1])
          guard target < self.bytes.count else { throw .pointerOutOfBounds(offset: position, target: target) }
          guard !visited.contains(target) else { throw .pointerLoop(offset: position) }
          visited.append(target)
          if end == nil { end = position + 2 }
          position = target
        default:
          // 0x40 and 0x80 are reserved (RFC 6891 retired the extended label types).
          throw .badLabelType(offset: position, byte: length)
        }
      }
    }
  }
}
