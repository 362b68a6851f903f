import GRPCWebCore
import NIOCore
import ProxyConfig
import Testing

@Suite struct Base64StreamDecoderTests {
  /// Decodes `text` fed in the given chunk sizes (cycling), then finishes.
  private func decode(_ text: String, chunks: [Int]) throws(Base64DecodeError) -> [UInt8] {
    var decoder = Base64StreamDecoder()
    var out = ByteBuffer()
    let bytes = Array(text.utf8)
    var i = 0
    var c = 0
    while i < bytes.count {
      let n = min(chunks[c % chunks.count], bytes.count - i)
      try decoder.decode(ByteBuffer(bytes: bytes[i..<(i + n)]), into: &out)
      i += n
      c += 1
    }
    try decoder.finish()
    return Array(out.readableBytesView)
  }

  @Test func decodesWhatFoundationEncodesInEverySplit() throws {
    for length in 0..<40 {
      let raw = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
      var encoded = ByteBuffer()
      Base64.encode(ByteBuffer(bytes: raw), into: &encoded)
      let text = String(buffer: encoded)
      for chunk in 1...9 {
        #expect(try self.decode(text, chunks: [chunk]) == raw, "length \(length) chunk \(chunk)")
      }
      #expect(try self.decode(text, chunks: [6, 26]) == raw)
    }
  }

  @Test func emitsOnlyWholeGroupsWhileStreaming() throws {
    var decoder = Base64StreamDecoder()
    var out = ByteBuffer()
    for (i, ch) in "AAAAABJncnBj".utf8.enumerated() {
      try decoder.decode(ByteBuffer(bytes: [ch]), into: &out)
      #expect(out.readableBytes == (i + 1) / 4 * 3, "after \(i + 1) characters")
    }
    try decoder.finish()
  }

  @Test func acceptsSeparatelyPaddedSegmentsInOneChunk() throws {
    // "a" and "bc" encoded separately: "YQ==" + "YmM="; Envoy rejects this in one write.
    #expect(try self.decode("YQ==YmM=", chunks: [100]) == Array("abc".utf8))
    #expect(try self.decode("YQ==YmM=", chunks: [3]) == Array("abc".utf8))
  }

  @Test func rejectsAnUnfinishedGroupAtTheEnd() {
    #expect(throws: Base64DecodeError.badSize) { try self.decode("AAAAA", chunks: [100]) }
    #expect(throws: Base64DecodeError.badSize) { try self.decode("YQ", chunks: [1]) }
  }

  @Test(arguments: ["****", "YQ=\n", "YW J", "-_AA", "Y===", "=AAA", "A=AA", "QR==", "QUJ="])
  func rejectsInvalidInput(_ text: String) {
    // Non-alphabet characters, misplaced padding, non-canonical trailing bits ("QR==", "QUJ=").
    #expect(throws: Base64DecodeError.invalidCharacter) { try self.decode(text, chunks: [100]) }
  }

  @Test func emptyBodyIsFine() throws {
    #expect(try self.decode("", chunks: [1]).isEmpty)
  }
}

@Suite struct FramingTests {
  @Test func splitterReturnsWholeFramesWhateverTheChunking() throws {
    var stream = ByteBuffer()
    for payload in ["hello", "", String(repeating: "x", count: 300)] {
      GRPCFrame.encode(ByteBuffer(string: payload), into: &stream)
    }
    let bytes = Array(stream.readableBytesView)
    for chunk in [1, 2, 5, 7, 64, bytes.count] {
      var splitter = GRPCFrameSplitter(maxFrameSize: 1024)
      var frames: [[UInt8]] = []
      var i = 0
      while i < bytes.count {
        let n = min(chunk, bytes.count - i)
        splitter.append(ByteBuffer(bytes: bytes[i..<(i + n)]))
        while let frame = try splitter.next() { frames.append(Array(frame.readableBytesView)) }
        i += n
      }
      #expect(frames.map(\.count) == [10, 5, 305], "chunk \(chunk)")
      #expect(!splitter.hasPartialFrame)
    }
  }

  @Test func splitterRefusesFramesOverTheLimit() {
    var buffer = ByteBuffer()
    GRPCFrame.encode(ByteBuffer(repeating: 0, count: 100), into: &buffer)
    var splitter = GRPCFrameSplitter(maxFrameSize: 99)
    splitter.append(buffer)
    #expect(throws: GRPCFrameSplitter.FrameTooLarge.self) { try splitter.next() }
  }

  @Test func trailerFrameIsByteForByteEnvoys() {
    var buffer = ByteBuffer()
    TrailerFrame.encode([("grpc-status", "0"), ("grpc-message", "ok")], into: &buffer)
    let expected: [UInt8] = [0x80, 0, 0, 0, 0x20] + Array("grpc-status:0\r\ngrpc-message:ok\r\n".utf8)
    #expect(Array(buffer.readableBytesView) == expected)
    var empty = ByteBuffer()
    TrailerFrame.encode([(String, String)](), into: &empty)
    #expect(Array(empty.readableBytesView) == [0x80, 0, 0, 0, 0])
  }

  @Test func textEncodingOfOneFrameMatchesEnvoysTest() {
    var frame = ByteBuffer()
    GRPCFrame.encode(ByteBuffer(string: "grpc-web-text-data"), into: &frame)
    let encoded = Base64.encode(frame, allocator: ByteBufferAllocator())
    #expect(String(buffer: encoded) == "AAAAABJncnBjLXdlYi10ZXh0LWRhdGE=")
  }
}

@Suite struct GRPCProtocolTests {
  @Test func parsesTimeoutsAsEnvoyDoes() {
    #expect(GRPCProtocol.parseTimeout("1S") == 1000)
    #expect(GRPCProtocol.parseTimeout("1H") == 3_600_000)
    #expect(GRPCProtocol.parseTimeout("2M") == 120_000)
    #expect(GRPCProtocol.parseTimeout("50m") == 50)
    #expect(GRPCProtocol.parseTimeout("5n") == 1)
    #expect(GRPCProtocol.parseTimeout("1500u") == 2)
    #expect(GRPCProtocol.parseTimeout("0m") == 0)
    #expect(GRPCProtocol.parseTimeout("99999999m") == 99_999_999)
    for bad in ["100000000m", "5X", "", "m", "-1m", "1.5S", " 1S"] {
      #expect(GRPCProtocol.parseTimeout(bad) == nil, "\(bad)")
    }
  }

  @Test func formatsTimeouts() {
    #expect(GRPCProtocol.formatTimeout(milliseconds: 1000) == "1000m")
    #expect(GRPCProtocol.formatTimeout(milliseconds: 100_000_000) == "100000S")
  }

  @Test func mapsHTTPStatusLikeEnvoy() {
    let table = [400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14, 500: 2, 431: 2, 418: 2, 200: 2]
    for (http, grpc) in table { #expect(GRPCStatus(httpStatus: http).rawValue == grpc, "\(http)") }
  }

  @Test func percentEncodesOnlyWhatItMust() {
    #expect(GRPCProtocol.percentEncode("{\"percentage\": \"100%\"}") == "{\"percentage\": \"100%25\"}")
    #expect(GRPCProtocol.percentEncode("café\n") == "caf%C3%A9%0A")
  }
}
