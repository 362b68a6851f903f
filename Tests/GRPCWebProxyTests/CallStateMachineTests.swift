import GRPCWebCore
import Logging
import NIOEmbedded
import NIOCore
import NIOHPACK
import NIOHTTP2
import ProxyConfig
import Testing

@testable import GRPCWebProxy

/// One call's lifecycle, driven event by event: no channel, no cluster, no clock. Streams are
/// written as strings ("s1" is stream 1 of a connection that is never opened).
@Suite struct CallStateMachineTests {
  typealias Machine = CallStateMachine
  let allocator = ByteBufferAllocator()

  func machine(
    kind: CallKind = .grpcWeb(requestText: false, responseText: false), endStream: Bool = false,
    retry: Route.RetryPolicy? = nil, bufferLimit: Int = 1 << 20
  ) -> Machine {
    var m = Machine(translator: ResponseTranslator(kind: kind))
    var headers = HPACKHeaders()
    headers.add(name: ":path", value: "/demo.User/login")
    var text = false
    if case .grpcWeb(let requestText, _) = kind { text = requestText }
    m.routed(headers: headers, endStream: endStream, textRequest: text, retryPolicy: retry, bufferLimit: bufferLimit)
    return m
  }

  func body(_ bytes: [UInt8]) -> ByteBuffer { self.allocator.buffer(bytes: bytes) }

  static let message: [UInt8] = [0, 0, 0, 0, 4, 0x0A, 0x02, 0x68, 0x69]

  static func head(_ status: String = "200") -> HPACKHeaders {
    [":status": status, "content-type": "application/grpc"]
  }

  static func trailers(_ status: String = "0") -> HPACKHeaders { ["grpc-status": status] }

  /// The frames a write action carries, as (kind, endStream, body bytes).
  static func describe(_ frames: [HTTP2Frame.FramePayload]) -> [String] {
    frames.map { frame in
      switch frame {
      case .headers(let h): return "HEADERS\(h.endStream ? " END" : "")"
      case .data(let d): return "DATA \(d.data.readableBytes)\(d.endStream ? " END" : "")"
      default: return "other"
      }
    }
  }

  @Test func aUnaryCallWaitsForItsStreamThenEndsWithTheBackendsTrailersAndReleasesTheStream() {
    var m = self.machine()
    // The whole request arrives before the stream: it waits, the last piece carrying END_STREAM.
    guard case .forward(_, _, nil, false) = m.receiveBody(self.body(Self.message), endStream: true, allocator: self.allocator)
    else { Issue.record("held for the stream"); return }
    guard case .write(let frames, "s1") = m.upstreamOpened("s1") else { Issue.record("the request is written"); return }
    #expect(Self.describe(frames) == ["HEADERS", "DATA 9 END"], "one DATA frame with END_STREAM, no empty frame after it")
    #expect(m.openStream == "s1")
    guard case .write(let head) = m.upstreamHeaders(Self.head(), endStream: false, beginRetry: { true }) else {
      Issue.record("the head goes to the client"); return
    }
    #expect(head.head?.status == 200)
    guard case .write = m.upstreamData(self.body(Self.message), endStream: false) else { Issue.record("data"); return }
    guard case .finish(let finish) = m.upstreamHeaders(Self.trailers(), endStream: true, beginRetry: { true }) else {
      Issue.record("the trailers end the call"); return
    }
    #expect(m.isFinished)
    #expect(finish.cleanup.attempt?.stream == "s1")
    #expect(finish.cleanup.attempt?.close == .release, "both sides ended: a reset would look like an attack")
    #expect(finish.cleanup.attempt?.outcome == 200)
    #expect(!finish.cleanup.endRetry)
    guard case .drop = m.receiveBody(self.body([1]), endStream: false, allocator: self.allocator) else {
      Issue.record("nothing is forwarded after the end"); return
    }
  }

  @Test func aReplyBeforeTheRequestEndedResetsTheStream() {
    var m = self.machine()
    _ = m.upstreamOpened("s1")
    guard case .forward(_, _, "s1", false) = m.receiveBody(self.body(Self.message), endStream: false, allocator: self.allocator)
    else { Issue.record("written to the open stream"); return }
    guard case .finish(let finish) = m.upstreamHeaders(Self.trailers("7").adding(":status", "200"), endStream: true, beginRetry: { true })
    else { Issue.record("trailers-only ends the call"); return }
    #expect(finish.cleanup.attempt?.close == .cancel, "the request is still open: RST_STREAM(CANCEL)")
    #expect(finish.cleanup.attempt?.outcome == 403)
  }

  @Test func aTextRequestIsDecodedAndABadOneFailsTheCall() {
    var m = self.machine(kind: .grpcWeb(requestText: true, responseText: true))
    _ = m.upstreamOpened("s1")
    // "AAAAAAQKAmhp" is the message in base64; sent in two pieces that split a quad.
    guard case .forward(_, let first, "s1", _) = m.receiveBody(ByteBuffer(string: "AAAAAAQKA"), endStream: false, allocator: self.allocator),
      case .forward(_, let second, "s1", _) = m.receiveBody(ByteBuffer(string: "mhp"), endStream: false, allocator: self.allocator)
    else { Issue.record("decoded pieces go upstream"); return }
    #expect(Array(first.readableBytesView) + Array(second.readableBytesView) == Self.message)
    guard case .held = m.receiveBody(ByteBuffer(string: "AA"), endStream: false, allocator: self.allocator) else {
      Issue.record("part of a quad is held until the rest comes"); return
    }
    guard case .finish(let finish) = m.receiveBody(ByteBuffer(string: "!!!!"), endStream: false, allocator: self.allocator) else {
      Issue.record("bad base64 ends the call"); return
    }
    #expect(finish.output.head?.headers.first(name: "grpc-status") != nil)
    #expect(finish.cleanup.attempt?.close == .cancel)
    #expect(m.isFinished)
  }

  @Test func requestTrailersEndTheRequestAsHeadersAndAnEmptyEndIsOneEmptyDataFrame() {
    var m = self.machine(kind: .grpc)
    _ = m.upstreamOpened("s1")
    guard case .forward(.headers(let trailers), _, "s1", _) = m.receiveEnd(trailers: ["x-end": "1"], allocator: self.allocator) else {
      Issue.record("trailers go as HEADERS"); return
    }
    #expect(trailers.endStream)
    var plain = self.machine(kind: .grpc)
    _ = plain.upstreamOpened("s1")
    guard case .forward(.data(let data), _, "s1", _) = plain.receiveEnd(trailers: nil, allocator: self.allocator) else {
      Issue.record("an empty DATA frame ends it"); return
    }
    #expect(data.endStream && data.data.readableBytes == 0)
    guard case .drop = plain.receiveEnd(trailers: nil, allocator: self.allocator) else { Issue.record("ended once"); return }
  }

  @Test func a5xxHeadIsRetriedAfterABackOffWithTheSameRequestAndTheClientSeesOnlyTheLastAttempt() {
    var m = self.machine(endStream: true, retry: .init(retryOn: [.serverError], numRetries: 1))
    _ = m.upstreamOpened("s1")
    var asked = 0
    guard case .retry(let retry) = m.upstreamHeaders(Self.head("503"), endStream: true, beginRetry: { asked += 1; return true }) else {
      Issue.record("503 is retried"); return
    }
    #expect(asked == 1)
    #expect(retry.attempt == 2)
    #expect(retry.backoffCeilingMilliseconds == 25)
    #expect(retry.previous?.stream == "s1")
    #expect(retry.previous?.outcome == 503)
    #expect(retry.previous?.close == .release, "the 503 ended the stream and the request had ended")
    #expect(m.openStream == nil)
    guard case .discard("early") = m.upstreamOpened("early") else { Issue.record("no stream during the back-off"); return }
    let elapsed = m.backoffElapsed()
    #expect(elapsed)
    let again = m.backoffElapsed()
    #expect(!again, "once")
    guard case .write(let frames, "s2") = m.upstreamOpened("s2") else { Issue.record("sent again"); return }
    #expect(Self.describe(frames) == ["HEADERS END"])
    // No retry left: the second 503 is the answer.
    guard case .finish(let finish) = m.upstreamHeaders(Self.head("503"), endStream: true, beginRetry: { asked += 1; return true }) else {
      Issue.record("the last attempt's answer stands"); return
    }
    #expect(asked == 1)
    #expect(finish.output.head?.status == 503)
    #expect(finish.cleanup.endRetry, "the cluster's retry slot goes back")
    #expect(finish.cleanup.attempt?.stream == "s2")
  }

  @Test func aRetryTheClusterCannotAffordLetsTheAnswerStand() {
    var m = self.machine(endStream: true, retry: .init(retryOn: [.serverError], numRetries: 3))
    _ = m.upstreamOpened("s1")
    guard case .write(let output) = m.upstreamHeaders(Self.head("500"), endStream: false, beginRetry: { false }) else {
      Issue.record("no budget: the 500 goes to the client"); return
    }
    #expect(output.head != nil || output.body == nil)
  }

  @Test func aCallTheServerNeverProcessedIsReplayedAtMostThreeTimes() {
    var m = self.machine()
    _ = m.upstreamOpened("s1")
    _ = m.receiveBody(self.body(Self.message), endStream: true, allocator: self.allocator)
    for n in 1...3 {
      guard case .replay(let previous) = m.upstreamClosed(reason: "connection termination", unprocessed: true, beginRetry: { true }) else {
        Issue.record("replay \(n)"); return
      }
      #expect(previous.stream == UpstreamStream(stringLiteral: "s\(n)"))
      #expect(previous.close == nil, "the stream is gone already")
      #expect(previous.outcome == nil, "the endpoint is not to blame")
      guard case .write(let frames, _) = m.upstreamOpened(UpstreamStream(stringLiteral: "s\(n + 1)")) else { Issue.record("sent again"); return }
      #expect(Self.describe(frames) == ["HEADERS", "DATA 9 END"])
    }
    guard case .finish(let finish) = m.upstreamClosed(reason: "connection termination", unprocessed: true, beginRetry: { true }) else {
      Issue.record("the fourth loss fails the call"); return
    }
    #expect(finish.output.head?.status == 503)
    #expect(finish.output.head?.headers.first(name: "grpc-status") == "14")
    #expect(finish.cleanup.attempt?.outcome == 503)
    #expect(finish.cleanup.endRetry)
  }

  @Test func aRequestLargerThanTheReplayBoundIsNotReplayed() {
    var m = self.machine()
    _ = m.upstreamOpened("s1")
    let big = self.allocator.buffer(repeating: 1, count: Machine.replayableBytes + 1)
    _ = m.receiveBody(big, endStream: false, allocator: self.allocator)
    guard case .finish = m.upstreamClosed(reason: "connection termination", unprocessed: true, beginRetry: { true }) else {
      Issue.record("the request is no longer held: the call fails"); return
    }
  }

  @Test func theClientIsNotReadWhileTheBackendHoldsMoreThanTheBufferLimit() {
    var m = self.machine(bufferLimit: 100)
    // Held for the stream: counted too.
    guard case .forward(_, _, nil, false) = m.receiveBody(self.body(Array(repeating: 0, count: 80)), endStream: false, allocator: self.allocator),
      case .forward(_, _, nil, true) = m.receiveBody(self.body(Array(repeating: 0, count: 80)), endStream: false, allocator: self.allocator),
      case .forward(_, _, nil, false) = m.receiveBody(self.body(Array(repeating: 0, count: 10)), endStream: false, allocator: self.allocator)
    else { Issue.record("paused once, above 100 bytes"); return }
    _ = m.upstreamOpened("s1")
    let above = m.upstreamDataSent(80)
    #expect(!above, "110 left: still above half")
    let resumed = m.upstreamDataSent(80)
    #expect(resumed, "at or below half: read again")
    let later = m.upstreamDataSent(10)
    #expect(!later)
    _ = m.receiveBody(self.body(Array(repeating: 0, count: 101)), endStream: false, allocator: self.allocator)
    let cleanup = m.downstreamClosed()
    #expect(cleanup?.resumeReading == true, "a call that ends paused reads its client again")
    #expect(cleanup?.attempt?.close == .cancel)
    #expect(cleanup?.attempt?.outcome == nil, "the client left: nothing said of the endpoint")
  }

  @Test func aClientThatLeavesWhileTheStreamIsOpeningLeavesNothingBehind() {
    var m = self.machine()
    let cleanup = m.downstreamClosed()
    #expect(cleanup?.attempt == nil)
    guard case .discard("s1") = m.upstreamOpened("s1") else { Issue.record("a late stream is let go"); return }
    let closedAgain = m.downstreamClosed()
    #expect(closedAgain == nil)
    let failed = m.fail(.shuttingDown)
    #expect(failed == nil)
  }

  @Test func aConnectFailureIsRetriedOnlyWhenThePolicySaysSo() {
    var plain = self.machine()
    guard case .finish(let finish) = plain.upstreamFailed(.upstreamReset(reason: "connection failure"), connectFailure: true, beginRetry: { true })
    else { Issue.record("no policy: the call fails"); return }
    #expect(finish.output.head?.headers.first(name: "grpc-status") == "14")
    #expect(finish.cleanup.attempt == nil)

    var m = self.machine(retry: .init(retryOn: [.connectFailure], numRetries: 1))
    _ = m.receiveBody(self.body(Self.message), endStream: false, allocator: self.allocator)
    guard case .retry(let retry) = m.upstreamFailed(.upstreamReset(reason: "connection failure"), connectFailure: true, beginRetry: { true })
    else { Issue.record("connect-failure is retried"); return }
    #expect(retry.previous == nil, "no attempt held a slot")
    let elapsed = m.backoffElapsed()
    #expect(elapsed)
    guard case .write(let frames, "s2") = m.upstreamOpened("s2") else { Issue.record("sent"); return }
    #expect(Self.describe(frames) == ["HEADERS", "DATA 9"])

    var noHealthy = self.machine(retry: .init(retryOn: [.connectFailure], numRetries: 1))
    guard case .finish = noHealthy.upstreamFailed(.noHealthyUpstream, connectFailure: false, beginRetry: { true }) else {
      Issue.record("no endpoint at all is not retried"); return
    }
  }

  @Test func aPerTryTimeoutRetriesUntilTheResponseStarts() {
    var m = self.machine(endStream: true, retry: .init(retryOn: [.serverError], numRetries: 2))
    _ = m.upstreamOpened("s1")
    guard case .retry(let retry) = m.perTryTimedOut(beginRetry: { true }) else { Issue.record("timed out: retried"); return }
    #expect(retry.previous?.outcome == 504)
    #expect(retry.previous?.close == .cancel)
    _ = m.backoffElapsed()
    _ = m.upstreamOpened("s2")
    _ = m.upstreamHeaders(Self.head(), endStream: false, beginRetry: { true })
    guard case .none = m.perTryTimedOut(beginRetry: { true }) else { Issue.record("the response started: too late"); return }
  }

  @Test func aHeaderBlockTheBackendRefusesIsALocal431() {
    var m = self.machine()
    _ = m.upstreamOpened("s1")
    guard let finish = m.upstreamRefusedHeaders("too big") else { Issue.record("431"); return }
    #expect(finish.output.head?.status == 431)
    #expect(finish.output.head?.headers.first(name: "grpc-status") == "8")
    #expect(finish.cleanup.attempt?.stream == "s1")
    #expect(finish.cleanup.attempt?.close == nil, "the connection already dropped the stream")
  }

  @Test func aDeadlineAfterTheHeadEndsTheCallWithATrailerFrame() {
    var m = self.machine()
    _ = m.upstreamOpened("s1")
    _ = m.upstreamHeaders(Self.head(), endStream: false, beginRetry: { true })
    guard let finish = m.fail(.timeout(message: "upstream request timeout", httpStatus: 504)) else { Issue.record("fails"); return }
    #expect(finish.output.head == nil, "the head went already")
    #expect(finish.output.body != nil, "the status is a gRPC-Web trailer frame")
    #expect(m.translator.bodyTrailerStatus == .deadlineExceeded)
    #expect(finish.cleanup.attempt?.close == .cancel)
    let again = m.fail(.shuttingDown)
    #expect(again == nil, "once")
  }

  @Test func answeredByTheProxyTheCallHoldsNothing() {
    var m = Machine(translator: ResponseTranslator(kind: .grpcWeb(requestText: false, responseText: false)))
    #expect(m.isAwaitingHead)
    let finish = m.answerLocally(httpStatus: 404, grpcStatus: nil, message: nil)
    #expect(finish.output.head?.status == 404)
    #expect(finish.cleanup.attempt == nil && !finish.cleanup.resumeReading && !finish.cleanup.endRetry)
    #expect(m.isFinished)
    guard case .drop = m.receiveBody(self.body([1]), endStream: true, allocator: self.allocator) else { Issue.record("dropped"); return }
  }
}

extension HPACKHeaders {
  fileprivate func adding(_ name: String, _ value: String) -> HPACKHeaders {
    var copy = HPACKHeaders([(name, value)])
    copy.add(contentsOf: self)
    return copy
  }
}

/// A connection for the streams the tests name; it is never opened.
nonisolated(unsafe) private let testConnection = UpstreamConnection(
  endpoint: HostAndPort(host: "127.0.0.1", port: 1), eventLoop: EmbeddedEventLoop(), connectTimeout: .seconds(1),
  logger: Logger(label: "test"), onClose: { _ in })

extension UpstreamStream: ExpressibleByStringLiteral {
  /// "s3" is stream 3; any other name is stream 99.
  public init(stringLiteral name: String) {
    self.init(connection: testConnection, id: HTTP2StreamID(Int(name.dropFirst()) ?? 99))
  }
}
