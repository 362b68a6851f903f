import GRPCWebCore
import NIOCore
import NIOHPACK
import ProxyConfig
import Testing

@Suite struct CallKindTests {
  @Test func classifiesByExactContentType() {
    #expect(CallKind.classify(contentType: "application/grpc-web+proto", accept: nil, grpcWebEnabled: true)
      == .grpcWeb(requestText: false, responseText: false))
    #expect(CallKind.classify(contentType: "application/grpc-web", accept: "application/grpc-web-text+proto", grpcWebEnabled: true)
      == .grpcWeb(requestText: false, responseText: true))
    #expect(CallKind.classify(contentType: "application/grpc-web-text", accept: nil, grpcWebEnabled: true)
      == .grpcWeb(requestText: true, responseText: false))
    #expect(CallKind.classify(contentType: "application/grpc-web-text", accept: "application/grpc-web-text, */*", grpcWebEnabled: true)
      == .grpcWeb(requestText: true, responseText: false))
    for other in ["application/grpc-web+json", "application/grpc-web+proto; charset=utf-8", "Application/Grpc-Web"] {
      #expect(CallKind.classify(contentType: other, accept: nil, grpcWebEnabled: true) == .other, "\(other)")
    }
    #expect(CallKind.classify(contentType: "application/grpc", accept: nil, grpcWebEnabled: true) == .grpc)
    #expect(CallKind.classify(contentType: "application/grpc+proto", accept: nil, grpcWebEnabled: true) == .grpc)
    #expect(CallKind.classify(contentType: "application/grpc-web", accept: nil, grpcWebEnabled: false) == .other)
  }
}

@Suite struct ResponseTranslatorTests {
  let okHead: HPACKHeaders = [":status": "200", "content-type": "application/grpc", "content-length": "12"]

  private func message(_ text: String) -> ByteBuffer {
    var buffer = ByteBuffer()
    GRPCFrame.encode(ByteBuffer(string: text), into: &buffer)
    return buffer
  }

  @Test func binaryUnaryBecomesMessagePlusTrailerFrame() throws {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: false))
    let head = try #require(t.receiveHead(self.okHead, endStream: false).head)
    #expect(head.status == 200)
    #expect(head.headers.first(name: "content-type") == "application/grpc-web+proto")
    #expect(head.headers.first(name: "content-length") == nil)
    let body = t.receiveData(self.message("hi"), endStream: false)
    #expect(body.body.map { Array($0.readableBytesView) } == [0, 0, 0, 0, 2, 0x68, 0x69])
    #expect(body.end == nil)
    let end = t.receiveTrailers(["grpc-status": "0", "grpc-message": "ok"])
    var expected = ByteBuffer()
    TrailerFrame.encode([("grpc-status", "0"), ("grpc-message", "ok")], into: &expected)
    #expect(end.body == expected)
    guard case .clean(nil) = end.end else { Issue.record("expected a clean end without trailers"); return }
    #expect(t.isFinished)
  }

  @Test func textModeEncodesEachWholeFrameSeparately() throws {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: true, responseText: true))
    #expect(t.receiveHead(self.okHead, endStream: false).head?.headers.first(name: "content-type") == "application/grpc-web-text+proto")
    var two = self.message("grpc-web-text-data")
    var second = self.message("x")
    two.writeBuffer(&second)
    // Split in the middle of the first frame: nothing until it completes.
    let first = t.receiveData(two.getSlice(at: 0, length: 7)!, endStream: false)
    #expect(first.body == nil)
    let rest = t.receiveData(two.getSlice(at: 7, length: two.readableBytes - 7)!, endStream: false)
    #expect(rest.body.map { String(buffer: $0) } == "AAAAABJncnBjLXdlYi10ZXh0LWRhdGE=" + "AAAAAAF4")
    let end = t.receiveTrailers(["grpc-status": "0"])
    #expect(end.body.map { String(buffer: $0) } == "gAAAAA9ncnBjLXN0YXR1czowDQo=")
  }

  @Test func trailersOnlyKeepsStatusInHeaders() throws {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: false))
    let out = t.receiveHead([":status": "200", "content-type": "application/grpc", "grpc-status": "5", "grpc-message": "x"], endStream: true)
    let head = try #require(out.head)
    #expect(head.status == 200)
    #expect(head.headers.first(name: "grpc-status") == "5")
    #expect(head.headers.first(name: "content-type") == "application/grpc-web+proto")
    #expect(out.body == nil)
    #expect(t.isFinished)
  }

  @Test func nonGRPCUpstreamIsTransformedKeepingTheHTTPStatus() throws {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: false))
    #expect(t.receiveHead([":status": "503", "content-type": "text/plain"], endStream: false).head == nil)
    let out = t.receiveData(ByteBuffer(string: "overloaded"), endStream: true)
    let head = try #require(out.head)
    #expect(head.status == 503)
    #expect(head.headers.first(name: "grpc-status") == "14")
    #expect(head.headers.first(name: "grpc-message") == "overloaded")
    #expect(head.headers.first(name: "content-length") == "0")
    #expect(head.headers.first(name: "content-type") == "application/grpc-web+proto")
  }

  @Test func transformedMessageIsCutAt16KiBOnlyWhenChunked() throws {
    var chunked = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: false))
    _ = chunked.receiveHead([":status": "200", "content-type": "application/json"], endStream: false)
    _ = chunked.receiveData(ByteBuffer(repeating: UInt8(ascii: "a"), count: 16_000), endStream: false)
    let out = chunked.receiveData(ByteBuffer(repeating: UInt8(ascii: "a"), count: 16_000), endStream: true)
    #expect(out.head?.headers.first(name: "grpc-message")?.count == 16_384)
    #expect(out.head?.headers.first(name: "grpc-status") == "2")

    var whole = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: false))
    _ = whole.receiveHead([":status": "200", "content-type": "application/json"], endStream: false)
    let single = whole.receiveData(ByteBuffer(repeating: UInt8(ascii: "a"), count: 17_408), endStream: true)
    #expect(single.head?.headers.first(name: "grpc-message")?.count == 17_408)
  }

  @Test func charsetParameterIsNotGRPC() {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: false))
    #expect(t.receiveHead([":status": "200", "content-type": "application/grpc; charset=utf-8"], endStream: false).head == nil)
  }

  @Test func failureBeforeHeadIsALocalReply() throws {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: true))
    let out = t.fail(.upstreamReset(reason: "connection failure"))
    let head = try #require(out.head)
    #expect(head.status == 503)
    #expect(head.headers.first(name: "grpc-status") == "14")
    #expect(head.headers.first(name: "grpc-message")?.hasPrefix("upstream connect error or disconnect/reset before headers") == true)
    #expect(head.headers.first(name: "content-type") == "application/grpc-web-text+proto")
  }

  @Test func deadlineAfterHeadEndsWithTrailerFrameStatus4() throws {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: false))
    _ = t.receiveHead(self.okHead, endStream: false)
    _ = t.receiveData(self.message("a"), endStream: false)
    let out = t.fail(.timeout(message: "upstream request timeout", httpStatus: 504))
    let body = try #require(out.body)
    #expect(String(buffer: body.getSlice(at: 5, length: body.readableBytes - 5)!) == "grpc-status:4\r\ngrpc-message:upstream request timeout\r\n")
    guard case .clean(nil) = out.end else { Issue.record("expected a clean end"); return }
  }

  @Test func resetAfterHeadEndsWithStatus14() throws {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: true))
    _ = t.receiveHead(self.okHead, endStream: false)
    let out = t.fail(.upstreamReset(reason: "remote reset"))
    var decoder = Base64StreamDecoder()
    var decoded = ByteBuffer()
    try decoder.decode(try #require(out.body), into: &decoded)
    #expect(String(buffer: decoded.getSlice(at: 5, length: decoded.readableBytes - 5)!).hasPrefix("grpc-status:14\r\n"))
  }

  @Test func nativeGRPCPassesTrailersThrough() throws {
    var t = ResponseTranslator(kind: .grpc)
    let head = try #require(t.receiveHead(self.okHead, endStream: false).head)
    #expect(head.headers.first(name: "content-type") == "application/grpc")
    let data = t.receiveData(self.message("m"), endStream: false)
    #expect(data.body != nil)
    let end = t.receiveTrailers(["grpc-status": "0"])
    guard case .clean(let trailers?) = end.end else { Issue.record("expected trailers"); return }
    #expect(trailers.first(name: "grpc-status") == "0")
  }

  @Test func nativeGRPCLocalReplyIsTrailersOnly() throws {
    var t = ResponseTranslator(kind: .grpc)
    let out = t.localReply(httpStatus: 503, grpcStatus: .unavailable, message: "no healthy upstream")
    let head = try #require(out.head)
    #expect(head.status == 200)
    #expect(head.headers.first(name: "grpc-status") == "14")
  }

  @Test func eventsAfterTheEndAreDropped() {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: false))
    _ = t.fail(.timeout(message: "upstream request timeout", httpStatus: 504))
    #expect(t.receiveHead(self.okHead, endStream: false).head == nil)
    #expect(t.receiveData(self.message("late"), endStream: false).body == nil)
  }

  @Test func textModeDropsFramesWithUnknownFlagsAsEnvoyDoes() {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: true))
    _ = t.receiveHead(self.okHead, endStream: false)
    var data = ByteBuffer()
    data.writeBytes([0x02, 0, 0, 0, 1, 0x41])
    GRPCFrame.encode(ByteBuffer(string: "x"), into: &data)
    #expect(t.receiveData(data, endStream: false).body.map { String(buffer: $0) } == "AAAAAAF4")
  }

  @Test func headersOnlyResponseCarriesNoContentLength() throws {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: false))
    let out = t.receiveHead([":status": "200", "content-type": "application/grpc", "grpc-status": "5", "content-length": "0"], endStream: true)
    #expect(try #require(out.head).headers.first(name: "content-length") == nil)
  }

  @Test func textModeRefusesToHoldAFrameOverTheBound() throws {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: true), maxTextFrameSize: 1024)
    _ = t.receiveHead(self.okHead, endStream: false)
    var header = ByteBuffer()
    header.writeInteger(UInt8(0))
    header.writeInteger(UInt32(1 << 30))  // announces a 1 GiB message; nothing is buffered for it
    let out = t.receiveData(header, endStream: false)
    var decoder = Base64StreamDecoder()
    var decoded = ByteBuffer()
    try decoder.decode(try #require(out.body), into: &decoded)
    let trailers = String(buffer: decoded.getSlice(at: 5, length: decoded.readableBytes - 5)!)
    #expect(trailers.hasPrefix("grpc-status:8\r\ngrpc-message:response message of 1073741824 bytes exceeds"))
    #expect(t.isFinished)
  }

  @Test func headersAreHeadThenTrailersAndInformationalOnesAreSkipped() throws {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: false))
    #expect(t.receiveHeaders([":status": "100"], endStream: false).head == nil)
    #expect(try #require(t.receiveHeaders(self.okHead, endStream: false).head).status == 200)
    let end = t.receiveHeaders(["grpc-status": "0"], endStream: true)
    #expect(end.head == nil)
    #expect(end.body.map { $0.getInteger(at: $0.readerIndex, as: UInt8.self) } == 0x80)
  }

  @Test func badRequestBodyIsA400BeforeTheHeadAndATrailerFrameAfterIt() throws {
    var early = ResponseTranslator(kind: .grpcWeb(requestText: true, responseText: false))
    let reply = try #require(early.fail(.invalidRequestBody).head)
    #expect(reply.status == 400)
    #expect(reply.headers.first(name: "grpc-status") == "13")
    #expect(reply.headers.first(name: "grpc-message") == "Bad gRPC-web request, invalid base64 data.")

    // The backend may answer before the client has sent all of its body: no second head then.
    var late = ResponseTranslator(kind: .grpcWeb(requestText: true, responseText: false))
    _ = late.receiveHead(self.okHead, endStream: false)
    let out = late.fail(.invalidRequestBody)
    #expect(out.head == nil)
    let body = try #require(out.body)
    #expect(String(buffer: body.getSlice(at: 5, length: body.readableBytes - 5)!).hasPrefix("grpc-status:13\r\n"))
  }

  @Test func textResponseEndingInsideAFrameIsReported() throws {
    var t = ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: true))
    _ = t.receiveHead(self.okHead, endStream: false)
    let out = t.receiveData(self.message("truncated").getSlice(at: 0, length: 8)!, endStream: true)
    #expect(out.body != nil)
    guard case .clean = out.end else { Issue.record("expected a clean end with a status"); return }
  }
}
