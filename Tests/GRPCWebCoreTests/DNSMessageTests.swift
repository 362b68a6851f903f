#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import GRPCWebCore
import NIOCore
import Testing

/// A DNS message written byte by byte, so that tests say exactly what is on the wire.
private struct Wire {
  var bytes: [UInt8] = []

  /// A response header: QR set, RD and RA set, the given rcode and counts.
  static func response(
    id: UInt16 = 0x1234,
    rcode: UInt16 = 0,
    truncated: Bool = false,
    questions: UInt16 = 1,
    answers: UInt16
  ) -> Wire {
    var wire = Wire()
    wire.u16(id)
    wire.u16(0x8180 | (truncated ? 0x0200 : 0) | rcode)
    wire.u16(questions)
    wire.u16(answers)
    wire.u16(0)
    wire.u16(0)
    return wire
  }

  mutating func u16(_ value: UInt16) { self.bytes += [UInt8(value >> 8), UInt8(value & 0xFF)] }
  mutating func u32(_ value: UInt32) { self.u16(UInt16(value >> 16)); self.u16(UInt16(value & 0xFFFF)) }

  mutating func labels(_ name: String) {
    for label in name.split(separator: ".") {
      self.bytes.append(UInt8(label.utf8.count))
      self.bytes += Array(label.utf8)
    }
  }

  mutating func name(_ name: String) {
    self.labels(name)
    self.bytes.append(0)
  }

  mutating func pointer(_ offset: Int) { self.u16(0xC000 | UInt16(offset)) }

  mutating func question(_ name: String, type: UInt16 = 1) {
    self.name(name)
    self.u16(type)
    self.u16(1)
  }

  /// The fixed part of a record after its owner name, then its data.
  mutating func record(type: UInt16, ttl: UInt32, data: [UInt8], class recordClass: UInt16 = 1) {
    self.u16(type)
    self.u16(recordClass)
    self.u32(ttl)
    self.u16(UInt16(data.count))
    self.bytes += data
  }

  var buffer: ByteBuffer { ByteBuffer(bytes: self.bytes) }
}

private func parse(_ wire: Wire, name: String = "tasks.user", type: DNSRecordType = .a) throws -> DNSResponse {
  try DNSMessage.parseResponse(wire.buffer, expectedID: 0x1234, name: name, type: type)
}

@Suite struct DNSQueryTests {
  @Test func encodesARecursiveQuery() throws {
    let query = try DNSMessage.query(id: 0xBEEF, name: "tasks.user", type: .a)
    let expected: [UInt8] = [
      0xBE, 0xEF, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
      5, 0x74, 0x61, 0x73, 0x6B, 0x73, 4, 0x75, 0x73, 0x65, 0x72, 0,
      0x00, 0x01, 0x00, 0x01,
    ]
    #expect(Array(query.readableBytesView) == expected)
  }

  @Test func encodesAAAAAndIgnoresOneTrailingDot() throws {
    let query = try DNSMessage.query(id: 7, name: "db.internal.", type: .aaaa)
    #expect(Array(query.readableBytesView.suffix(17)) == [2, 0x64, 0x62, 8] + Array("internal".utf8) + [0, 0x00, 0x1C, 0x00, 0x01])
    #expect(query.readableBytes == 12 + 13 + 4)
  }

  @Test func acceptsNamesAtTheLimits() throws {
    let label63 = String(repeating: "a", count: 63)
    _ = try DNSMessage.query(id: 1, name: "\(label63).x", type: .a)
    // 63+1+63+1+63+1+61 = 253 characters, 255 bytes on the wire.
    let name253 = [label63, label63, label63, String(repeating: "b", count: 61)].joined(separator: ".")
    let query = try DNSMessage.query(id: 1, name: name253, type: .a)
    #expect(query.readableBytes == 12 + 255 + 4)
  }

  @Test func rejectsNamesDNSCannotCarry() {
    #expect(throws: DNSMessageError.emptyName) { try DNSMessage.query(id: 1, name: "", type: .a) }
    #expect(throws: DNSMessageError.emptyName) { try DNSMessage.query(id: 1, name: ".", type: .a) }
    #expect(throws: DNSMessageError.emptyLabel(name: "a..b")) { try DNSMessage.query(id: 1, name: "a..b", type: .a) }
    #expect(throws: DNSMessageError.emptyLabel(name: ".a")) { try DNSMessage.query(id: 1, name: ".a", type: .a) }
    let label64 = String(repeating: "x", count: 64)
    #expect(throws: DNSMessageError.labelTooLong(label: label64, bytes: 64)) {
      try DNSMessage.query(id: 1, name: "svc.\(label64).local", type: .a)
    }
    let name254 = Array(repeating: String(repeating: "c", count: 50), count: 5).joined(separator: ".")
    #expect(name254.utf8.count == 254)
    #expect(throws: DNSMessageError.nameTooLong(bytes: 256)) { try DNSMessage.query(id: 1, name: name254, type: .a) }
  }

  @Test func errorsSayWhatIsWrong() {
    let error = DNSMessageError.labelTooLong(label: "abc", bytes: 64)
    #expect(error.description == "the label 'abc' is 64 bytes long; DNS allows 63")
  }
}

@Suite struct DNSResponseTests {
  @Test func readsARecordsWithTheirTTLs() throws {
    var wire = Wire.response(answers: 2)
    wire.question("tasks.user")
    wire.pointer(12)
    wire.record(type: 1, ttl: 1, data: [127, 0, 0, 21])
    wire.pointer(12)
    wire.record(type: 1, ttl: 300, data: [127, 0, 0, 22])
    let response = try parse(wire)
    #expect(response.rcode == .noError)
    #expect(!response.truncated)
    #expect(response.records == [DNSRecord(address: "127.0.0.21", ttl: 1), DNSRecord(address: "127.0.0.22", ttl: 300)])
  }

  @Test func readsAAAARecordsInCompressedText() throws {
    var wire = Wire.response(answers: 3)
    wire.question("tasks.user", type: 28)
    wire.pointer(12)
    wire.record(type: 28, ttl: 60, data: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    wire.pointer(12)
    wire.record(type: 28, ttl: 60, data: [0xFD, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5])
    wire.pointer(12)
    wire.record(type: 28, ttl: 60, data: [0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1])
    let response = try parse(wire, type: .aaaa)
    #expect(response.records.map(\.address) == ["::1", "fd00::5", "2001:db8::1:0:0:1"])
  }

  @Test func followsACNAMEChainAndTakesTheSmallestTTL() throws {
    // www.example -> web.example (ttl 30) -> host.example (ttl 600) -> A 10.0.0.1 (ttl 300),
    // plus records that do not belong to the question.
    var wire = Wire.response(answers: 6)
    wire.question("www.example")
    wire.pointer(12)
    wire.record(type: 5, ttl: 30, data: [3] + Array("web".utf8) + [0xC0, 16])  // web + "example" of the question
    wire.labels("web")
    wire.pointer(16)
    wire.record(type: 5, ttl: 600, data: [4] + Array("host".utf8) + [0xC0, 16])
    wire.name("host.example")
    wire.record(type: 1, ttl: 300, data: [10, 0, 0, 1])
    wire.name("other.example")
    wire.record(type: 1, ttl: 300, data: [10, 9, 9, 9])
    wire.name("host.example")
    wire.record(type: 28, ttl: 300, data: Array(repeating: 0, count: 15) + [1])
    wire.pointer(12)
    wire.record(type: 16, ttl: 300, data: [4] + Array("text".utf8))
    let response = try parse(wire, name: "www.example")
    #expect(response.records == [DNSRecord(address: "10.0.0.1", ttl: 30)])
  }

  @Test func followsCNAMEsInAnyOrderAndStopsAtALoop() throws {
    var wire = Wire.response(answers: 4)
    wire.question("a.test")
    wire.name("b.test")
    wire.record(type: 1, ttl: 50, data: [10, 0, 0, 2])
    wire.name("b.test")
    wire.record(type: 5, ttl: 70, data: [1, 0x61, 4] + Array("test".utf8) + [0])
    wire.name("a.test")
    wire.record(type: 5, ttl: 90, data: [1, 0x62, 4] + Array("test".utf8) + [0])
    wire.name("a.test")
    wire.record(type: 1, ttl: 40, data: [10, 0, 0, 1])
    let response = try parse(wire, name: "a.test")
    #expect(response.records == [DNSRecord(address: "10.0.0.2", ttl: 50), DNSRecord(address: "10.0.0.1", ttl: 40)])
  }

  @Test func matchesNamesWithoutRegardToCase() throws {
    var wire = Wire.response(answers: 1)
    wire.question("Tasks.USER")
    wire.name("TASKS.user")
    wire.record(type: 1, ttl: 5, data: [127, 0, 0, 21])
    #expect(try parse(wire, name: "tasks.User.").records == [DNSRecord(address: "127.0.0.21", ttl: 5)])
  }

  @Test func mergesDuplicateAddressesAndReadsAHugeTTLAsZero() throws {
    var wire = Wire.response(answers: 3)
    wire.question("tasks.user")
    wire.pointer(12)
    wire.record(type: 1, ttl: 20, data: [127, 0, 0, 21])
    wire.pointer(12)
    wire.record(type: 1, ttl: 10, data: [127, 0, 0, 21])
    wire.pointer(12)
    wire.record(type: 1, ttl: 0x8000_0000, data: [127, 0, 0, 22])
    #expect(try parse(wire).records == [DNSRecord(address: "127.0.0.21", ttl: 10), DNSRecord(address: "127.0.0.22", ttl: 0)])
  }

  @Test func skipsOtherClasses() throws {
    var wire = Wire.response(answers: 2)
    wire.question("tasks.user")
    wire.pointer(12)
    wire.record(type: 1, ttl: 20, data: [1, 2, 3, 4], class: 3)
    wire.pointer(12)
    wire.record(type: 1, ttl: 20, data: [127, 0, 0, 21])
    #expect(try parse(wire).records.map(\.address) == ["127.0.0.21"])
  }

  @Test(arguments: [(UInt16(3), DNSResponseCode.nxDomain), (2, .servFail), (5, .refused), (4, .notImp), (1, .formErr), (9, .other(9))])
  func reportsTheResponseCode(rcode: UInt16, expected: DNSResponseCode) throws {
    var wire = Wire.response(rcode: rcode, answers: 0)
    wire.question("tasks.user")
    let response = try parse(wire)
    #expect(response.rcode == expected)
    #expect(response.records.isEmpty)
    // Some servers leave the question out of an error.
    #expect(try parse(Wire.response(rcode: rcode, questions: 0, answers: 0)).rcode == expected)
  }

  @Test func anEmptyNoErrorIsNotAnError() throws {
    var wire = Wire.response(answers: 0)
    wire.question("tasks.user", type: 28)
    let response = try parse(wire, type: .aaaa)
    #expect(response == DNSResponse(rcode: .noError, truncated: false, records: []))
  }

  @Test func flagsATruncatedAnswerAndKeepsTheWholeRecords() throws {
    var wire = Wire.response(truncated: true, answers: 3)
    wire.question("tasks.user")
    wire.pointer(12)
    wire.record(type: 1, ttl: 9, data: [127, 0, 0, 21])
    wire.pointer(12)
    wire.u16(1)  // the rest of the second record and the third were cut
    let response = try parse(wire)
    #expect(response.truncated)
    #expect(response.records == [DNSRecord(address: "127.0.0.21", ttl: 9)])

    var empty = Wire.response(truncated: true, answers: 0)
    empty.question("tasks.user")
    #expect(try parse(empty) == DNSResponse(rcode: .noError, truncated: true, records: []))
  }

  @Test func refusesAnswersToAnotherQuestion() throws {
    var wire = Wire.response(answers: 0)
    wire.question("tasks.user")
    #expect(throws: DNSMessageError.idMismatch(expected: 0x1235, received: 0x1234)) {
      try DNSMessage.parseResponse(wire.buffer, expectedID: 0x1235, name: "tasks.user", type: .a)
    }
    #expect(throws: DNSMessageError.self) { try parse(wire, name: "tasks.admin") }
    #expect(throws: DNSMessageError.self) { try parse(wire, type: .aaaa) }
    #expect(throws: DNSMessageError.self) { try parse(Wire.response(questions: 0, answers: 0)) }

    var query = wire
    query.bytes[2] &= 0x7F
    #expect(throws: DNSMessageError.notAResponse) { try parse(query) }
    var notify = wire
    notify.bytes[2] |= 0x20
    #expect(throws: DNSMessageError.unexpectedOpcode(4)) { try parse(notify) }
  }

  @Test func refusesAddressesOfTheWrongSize() {
    var wire = Wire.response(answers: 1)
    wire.question("tasks.user")
    wire.pointer(12)
    wire.record(type: 1, ttl: 9, data: [127, 0, 0, 21, 0])
    #expect(throws: DNSMessageError.badRecordLength(type: 1, length: 5)) { try parse(wire) }
  }

  @Test func refusesPointerLoopsAndPointersOutside() {
    var selfLoop = Wire.response(answers: 1)
    selfLoop.question("tasks.user")
    selfLoop.pointer(selfLoop.bytes.count)
    selfLoop.record(type: 1, ttl: 9, data: [127, 0, 0, 21])
    #expect(throws: DNSMessageError.pointerLoop(offset: 28)) { try parse(selfLoop) }

    // A label, then a pointer back to that label: "x.x.x...." for ever.
    var labelLoop = Wire.response(answers: 1)
    labelLoop.question("tasks.user")
    let start = labelLoop.bytes.count
    labelLoop.bytes += [1, 0x78]
    labelLoop.pointer(start)
    labelLoop.record(type: 1, ttl: 9, data: [127, 0, 0, 21])
    #expect(throws: DNSMessageError.pointerLoop(offset: start + 2)) { try parse(labelLoop) }

    // Two pointers to each other.
    var pingPong = Wire.response(answers: 2)
    pingPong.question("tasks.user")
    pingPong.pointer(30)
    pingPong.pointer(28)
    #expect(throws: DNSMessageError.self) { try parse(pingPong) }

    var outside = Wire.response(answers: 1)
    outside.question("tasks.user")
    outside.pointer(0x3FFF)
    outside.record(type: 1, ttl: 9, data: [127, 0, 0, 21])
    #expect(throws: DNSMessageError.pointerOutOfBounds(offset: 28, target: 0x3FFF)) { try parse(outside) }

    var reserved = Wire.response(answers: 1)
    reserved.question("tasks.user")
    reserved.bytes += [0x41, 0x00]
    #expect(throws: DNSMessageError.badLabelType(offset: 28, byte: 0x41)) { try parse(reserved) }
  }

  @Test func refusesAnOverlongCompressedName() {
    // 5 labels of 63 bytes reached through pointers: 321 bytes, over the 255 limit.
    // The labels sit in the data of a TXT record that is skipped; the A record's name points in.
    var wire = Wire.response(answers: 2)
    wire.question("tasks.user")
    wire.pointer(12)
    wire.record(type: 16, ttl: 9, data: [])
    let dataStart = wire.bytes.count
    var previous: Int? = nil
    for _ in 0..<5 {
      let here = wire.bytes.count
      wire.bytes += [63] + Array(repeating: 0x61, count: 63)
      if let previous { wire.pointer(previous) } else { wire.bytes.append(0) }
      previous = here
    }
    let length = wire.bytes.count - dataStart
    wire.bytes[dataStart - 2] = UInt8(length >> 8)
    wire.bytes[dataStart - 1] = UInt8(length & 0xFF)
    wire.pointer(previous!)
    wire.record(type: 1, ttl: 9, data: [127, 0, 0, 21])
    #expect(throws: DNSMessageError.nameTooLong(bytes: 257)) { try parse(wire) }
  }

  /// A response that uses every feature, for the malformed-input tests.
  private var rich: Wire {
    var wire = Wire.response(answers: 4)
    wire.question("www.example")
    wire.pointer(12)
    wire.record(type: 5, ttl: 30, data: [4] + Array("host".utf8) + [0xC0, 16])
    wire.bytes += [4] + Array("host".utf8) + [0xC0, 16]
    wire.record(type: 1, ttl: 300, data: [10, 0, 0, 1])
    wire.pointer(12)
    wire.record(type: 28, ttl: 300, data: Array(repeating: 0, count: 15) + [1])
    wire.pointer(41)
    wire.record(type: 1, ttl: 300, data: [10, 0, 0, 2])
    return wire
  }

  @Test func everyTruncationThrowsOrParses() throws {
    let whole = self.rich
    #expect(try parse(whole, name: "www.example").records.map(\.address) == ["10.0.0.1", "10.0.0.2"])
    for length in 0..<whole.bytes.count {
      var cut = whole
      cut.bytes.removeLast(whole.bytes.count - length)
      #expect(throws: DNSMessageError.self, "cut at \(length)") { try parse(cut, name: "www.example") }
      if length >= 29 {
        cut.bytes[2] |= 0x02  // the same bytes with TC set: the records that are whole
        #expect(throws: Never.self, "cut at \(length) with TC") { try parse(cut, name: "www.example") }
      }
    }
  }

  @Test func randomCorruptionNeverCrashes() {
    var generator = SplitMix64(seed: 0xD15EA5E)
    let whole = self.rich
    for _ in 0..<20_000 {
      var wire = whole
      for _ in 0..<Int.random(in: 1...4, using: &generator) {
        let index = Int.random(in: 0..<wire.bytes.count, using: &generator)
        wire.bytes[index] = UInt8.random(in: 0...255, using: &generator)
      }
      if Bool.random(using: &generator) {
        wire.bytes.removeLast(Int.random(in: 0..<wire.bytes.count, using: &generator))
      }
      _ = try? parse(wire, name: "www.example")
    }
  }
}

@Suite struct IPv6TextTests {
  @Test(arguments: [
    ("0:0:0:0:0:0:0:0", "::"),
    ("0:0:0:0:0:0:0:1", "::1"),
    ("1:0:0:0:0:0:0:0", "1::"),
    ("fd00:0:0:0:0:0:0:5", "fd00::5"),
    ("2001:db8:0:1:0:0:0:1", "2001:db8:0:1::1"),
    ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
    ("2001:db8:1:2:3:4:5:0", "2001:db8:1:2:3:4:5:0"),
    ("2001:0:1:2:3:4:5:6", "2001:0:1:2:3:4:5:6"),
    ("0:0:0:0:0:ffff:c000:201", "::ffff:192.0.2.1"),
    ("0:0:0:0:0:0:c000:201", "::192.0.2.1"),
    ("FE80:0:0:0:ABCD:0:0:0", "fe80::abcd:0:0:0"),
  ])
  func writesTheCompressedForm(groups: String, expected: String) {
    let bytes = groups.split(separator: ":").flatMap { group -> [UInt8] in
      let value = UInt16(group, radix: 16)!
      return [UInt8(value >> 8), UInt8(value & 0xFF)]
    }
    #expect(DNSMessage.ipv6Text(bytes) == expected)
  }

  #if canImport(Glibc)
  @Test func agreesWithInetNtop() {
    var generator = SplitMix64(seed: 6)
    for _ in 0..<5_000 {
      // Mostly zero groups, so that runs of every length and position come up.
      var bytes = [UInt8](repeating: 0, count: 16)
      for group in 0..<8 where Int.random(in: 0..<3, using: &generator) == 0 {
        bytes[2 * group] = UInt8.random(in: 0...255, using: &generator) & (Bool.random(using: &generator) ? 0xFF : 0)
        bytes[2 * group + 1] = UInt8.random(in: 0...255, using: &generator)
      }
      if Int.random(in: 0..<8, using: &generator) == 0 { bytes[10] = 0xFF; bytes[11] = 0xFF }
      var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
      bytes.withUnsafeBytes { _ = inet_ntop(AF_INET6, $0.baseAddress, &text, socklen_t(text.count)) }
      let expected = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
      #expect(DNSMessage.ipv6Text(bytes) == expected, "\(bytes)")
    }
  }
  #endif
}

/// A fixed-seed generator, so that a failing random case comes back on the next run.
private struct SplitMix64: RandomNumberGenerator {
  var state: UInt64
  init(seed: UInt64) { self.state = seed }
  mutating func next() -> UInt64 {
    self.state &+= 0x9E37_79B9_7F4A_7C15
    var z = self.state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
}
