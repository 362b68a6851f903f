import NIOCore
import NIOHPACK
import ProxyConfig

/// A response status and headers, without pseudo-headers.
public struct ResponseHead: Sendable {
  public var status: Int
  public var headers: HPACKHeaders

  public init(status: Int, headers: HPACKHeaders) {
    self.status = status
    self.headers = headers
  }
}

/// What kind of call a downstream request is, decided once from its headers.
public enum CallKind: Sendable, Hashable {
  /// gRPC-Web: the request body is base64 when `requestText`; the response is base64 when
  /// `responseText` (chosen by `Accept` alone, as in Envoy: the two are independent).
  case grpcWeb(requestText: Bool, responseText: Bool)
  /// Native gRPC (`application/grpc`, `application/grpc+…`): passed through untouched.
  case grpc
  /// Anything else: routed and passed through as plain HTTP.
  case other

  /// Classifies a request as Envoy's grpc_web filter does: the content-type must be exactly one
  /// of four values (no parameters, case-sensitive); anything else is not gRPC-Web.
  public static func classify(contentType: String?, accept: String?, grpcWebEnabled: Bool) -> CallKind {
    guard let contentType else { return .other }
    if grpcWebEnabled {
      switch contentType {
      case "application/grpc-web", "application/grpc-web+proto":
        return .grpcWeb(requestText: false, responseText: Self.wantsText(accept))
      case "application/grpc-web-text", "application/grpc-web-text+proto":
        return .grpcWeb(requestText: true, responseText: Self.wantsText(accept))
      default:
        break
      }
    }
    if Self.isGRPCContentType(contentType) { return .grpc }
    return .other
  }

  private static func wantsText(_ accept: String?) -> Bool {
    accept == "application/grpc-web-text" || accept == "application/grpc-web-text+proto"
  }

  /// Exactly `application/grpc`, or `application/grpc+…` (Envoy's `hasGrpcContentType`).
  public static func isGRPCContentType(_ value: String) -> Bool {
    guard value.hasPrefix("application/grpc") else { return false }
    let rest = value.utf8.dropFirst(16)
    return rest.isEmpty || rest.first == UInt8(ascii: "+")
  }

  public var isGRPCWeb: Bool {
    if case .grpcWeb = self { return true }
    return false
  }

  /// Whether the router treats the call as gRPC (gRPC-Web counts, protocol doc T1).
  public var isGRPC: Bool { self != .other }

  /// The content-type of every gRPC-Web response (E11).
  public var responseContentType: String? {
    switch self {
    case .grpcWeb(_, let text): return text ? "application/grpc-web-text+proto" : "application/grpc-web+proto"
    case .grpc: return "application/grpc"
    case .other: return nil
    }
  }
}

/// Why a call ended before its upstream answered in full.
public enum CallFailure: Sendable, Hashable {
  /// The upstream connection could not be made, or the stream was reset or lost.
  case upstreamReset(reason: String)
  /// A deadline (route timeout, `grpc-timeout`, stream duration) fired.
  case timeout(message: String, httpStatus: Int)
  /// A text-mode response frame larger than the proxy holds.
  case responseFrameTooLarge(length: Int, limit: Int)
  /// A truncated frame at the end of a text-mode response.
  case truncatedResponse
  /// The cluster has no endpoint to send the call to.
  case noHealthyUpstream
  /// A `grpc-web-text` request body that is not valid base64.
  case invalidRequestBody
  /// The proxy is stopping and its drain time is over.
  case shuttingDown
}

/// Translates one upstream (native gRPC over HTTP/2) response into what the downstream client
/// gets, following Envoy's grpc_web filter (protocol doc sections 3 and 4) where it is sound.
///
/// States:
/// ```
///   awaitingHead ──head(gRPC)──────────▶ streaming ──data/trailers/fail──▶ finished
///        │      ──head(not gRPC)────────▶ transforming ──end/trailers/fail──▶ finished
///        └───── head(end) / fail ──────────────────────────────────────────▶ finished
/// ```
/// Events in `finished` are dropped: they can only be late frames of a call that already
/// ended (after a deadline, say), which the client must not see.
public struct ResponseTranslator: Sendable {
  /// The first 16 KiB of a non-gRPC error body become `grpc-message` (E19).
  public static let transformedBodyLimit = 16_384

  public let kind: CallKind
  private var state: State
  private let allocator: ByteBufferAllocator

  private enum State: Sendable {
    case awaitingHead
    case streaming(textFrames: GRPCFrameSplitter?)
    case transforming(status: Int, headers: HPACKHeaders, body: ByteBuffer?, chunks: Int)
    case finished
  }

  /// What the handler writes downstream, in order: head, body, end.
  public struct Output: Sendable {
    public enum End: Sendable {
      /// End the response cleanly, with HTTP trailers only for native gRPC.
      case clean(trailers: HPACKHeaders?)
      /// Abort the response: the client sees a reset stream or a cut connection.
      case reset
    }

    public var head: ResponseHead?
    public var body: ByteBuffer?
    public var end: End?

    public init(head: ResponseHead? = nil, body: ByteBuffer? = nil, end: End? = nil) {
      self.head = head
      self.body = body
      self.end = end
    }

    public static let nothing = Output()
  }

  public init(kind: CallKind, maxTextFrameSize: Int = 4 * 1024 * 1024, allocator: ByteBufferAllocator = .init()) {
    self.kind = kind
    self.state = .awaitingHead
    self.allocator = allocator
    self.maxTextFrameSize = maxTextFrameSize
  }

  private let maxTextFrameSize: Int

  /// The grpc-status the client reads from a trailer frame this translator wrote into a
  /// gRPC-Web body (the backend's trailers, or a failure's); statuses in headers or HTTP
  /// trailers are in the output itself.
  public private(set) var bodyTrailerStatus: GRPCStatus?

  /// Whether the downstream response head has been written.
  public var headSent: Bool {
    switch self.state {
    case .awaitingHead, .transforming: return false
    case .streaming: return true
    case .finished: return true
    }
  }

  public var isFinished: Bool {
    if case .finished = self.state { return true }
    return false
  }

  /// Ends the translation without output, for a response the proxy makes by itself.
  public mutating func markFinished() {
    self.state = .finished
  }

  // MARK: - Events

  /// An upstream HEADERS frame: the response head, a 1xx to skip, or the trailers.
  public mutating func receiveHeaders(_ headers: HPACKHeaders, endStream: Bool) -> Output {
    guard case .awaitingHead = self.state else { return self.receiveTrailers(headers) }
    if !endStream, headers.first(name: ":status")?.hasPrefix("1") ?? false { return .nothing }
    return self.receiveHead(headers, endStream: endStream)
  }

  public mutating func receiveHead(_ headers: HPACKHeaders, endStream: Bool) -> Output {
    guard case .awaitingHead = self.state else { return .nothing }
    let status = headers.first(name: ":status").flatMap { Int($0) } ?? 502
    var downstream = Self.downstreamHeaders(headers)
    guard case .grpcWeb(_, let text) = self.kind else {
      self.state = endStream ? .finished : .streaming(textFrames: nil)
      return Output(head: ResponseHead(status: status, headers: downstream),
        end: endStream ? .clean(trailers: nil) : nil)
    }
    downstream.replaceOrAdd(name: "content-type", value: self.kind.responseContentType!)
    if endStream {
      // Trailers-only, or headers-only: grpc-status (if any) stays in the headers (E18, E20).
      // No body follows; HTTP/1.1 writers say so with content-length: 0.
      downstream.remove(name: "content-length")
      self.state = .finished
      return Output(head: ResponseHead(status: status, headers: downstream), end: .clean(trailers: nil))
    }
    let upstreamType = headers.first(name: "content-type") ?? ""
    let isGRPC = status == 200 && (CallKind.isGRPCContentType(upstreamType) || Self.isGRPCWebContentType(upstreamType))
    if isGRPC {
      downstream.remove(name: "content-length")
      self.state = .streaming(textFrames: text ? GRPCFrameSplitter(maxFrameSize: self.maxTextFrameSize) : nil)
      return Output(head: ResponseHead(status: status, headers: downstream))
    }
    self.state = .transforming(status: status, headers: downstream, body: nil, chunks: 0)
    return .nothing
  }

  public mutating func receiveData(_ data: ByteBuffer, endStream: Bool) -> Output {
    switch self.state {
    case .awaitingHead, .finished:
      return .nothing
    case .streaming(var splitter):
      guard var frames = splitter else {
        if endStream { self.state = .finished }
        // Binary mode: bytes pass through as they come (E12); a missing trailer frame is the
        // upstream's (E17).
        return Output(body: data, end: endStream ? .clean(trailers: nil) : nil)
      }
      splitter = nil
      frames.append(data)
      var out: ByteBuffer?
      do {
        while let frame = try frames.next() {
          // Envoy's frame decoder drops frames with unknown flag bits; later frames still pass.
          let flag = frame.getInteger(at: frame.readerIndex, as: UInt8.self) ?? 0
          if flag & 0x7E != 0 { continue }
          if out == nil { out = self.allocator.buffer(capacity: (frame.readableBytes + 2) / 3 * 4) }
          Base64.encode(frame, into: &out!)
        }
      } catch {
        self.state = .streaming(textFrames: frames)
        var output = self.fail(.responseFrameTooLarge(length: error.length, limit: error.limit))
        if let out { output.body = Self.concat(out, output.body) }
        return output
      }
      if endStream {
        self.state = .streaming(textFrames: frames)
        if frames.hasPartialFrame {
          var output = self.fail(.truncatedResponse)
          if let out { output.body = Self.concat(out, output.body) }
          return output
        }
        self.state = .finished
        return Output(body: out, end: .clean(trailers: nil))
      }
      self.state = .streaming(textFrames: frames)
      return Output(body: out)
    case .transforming(let status, let headers, var body, let chunks):
      self.state = .finished
      if body == nil { body = data } else { body!.writeImmutableBuffer(data) }
      if endStream {
        // A body that arrives as one final chunk is used whole; otherwise it is cut (E19).
        let limit = chunks == 0 ? Int.max : Self.transformedBodyLimit
        return self.transformed(status: status, headers: headers, body: body, limit: limit, trailers: nil)
      }
      if body!.readableBytes > Self.transformedBodyLimit {
        body!.moveWriterIndex(to: body!.readerIndex + Self.transformedBodyLimit)
      }
      self.state = .transforming(status: status, headers: headers, body: body, chunks: chunks + 1)
      return .nothing
    }
  }

  public mutating func receiveTrailers(_ trailers: HPACKHeaders) -> Output {
    switch self.state {
    case .awaitingHead:
      // Trailers without a head: the upstream sent a lone HEADERS with END_STREAM.
      return self.receiveHead(trailers, endStream: true)
    case .finished:
      return .nothing
    case .streaming(let splitter):
      guard case .grpcWeb(_, let text) = self.kind else {
        self.state = .finished
        return Output(end: .clean(trailers: Self.downstreamHeaders(trailers)))
      }
      self.state = .finished
      if let splitter, splitter.hasPartialFrame {
        self.state = .streaming(textFrames: splitter)
        return self.fail(.truncatedResponse)
      }
      // The trailers become the body's last frame, and the response ends with no HTTP
      // trailers (E14, E16).
      var frame = self.allocator.buffer(capacity: 64)
      self.bodyTrailerStatus = trailers.first(name: "grpc-status").flatMap { GRPCStatus(headerValue: $0) }
      TrailerFrame.encode(trailers.lazy.filter { !$0.name.hasPrefix(":") }.map { ($0.name, $0.value) }, into: &frame)
      return Output(body: text ? Base64.encode(frame, allocator: self.allocator) : frame, end: .clean(trailers: nil))
    case .transforming(let status, let headers, let body, _):
      self.state = .finished
      return self.transformed(status: status, headers: headers, body: body, limit: Self.transformedBodyLimit,
        trailers: Self.downstreamHeaders(trailers))
    }
  }

  /// The call failed: before the head, a local reply; after it, a status the client can read.
  public mutating func fail(_ failure: CallFailure) -> Output {
    let (httpStatus, grpcStatus, message) = Self.describe(failure)
    // Once the response has started, a deadline is reported as DEADLINE_EXCEEDED: the client
    // reads it from the trailers, not from an HTTP status mapped to UNAVAILABLE.
    let midStreamStatus: GRPCStatus
    if case .timeout = failure { midStreamStatus = .deadlineExceeded } else { midStreamStatus = grpcStatus }
    switch self.state {
    case .finished:
      return .nothing
    case .awaitingHead, .transforming:
      self.state = .finished
      return self.localReply(httpStatus: httpStatus, grpcStatus: grpcStatus, message: message)
    case .streaming:
      self.state = .finished
      switch self.kind {
      case .grpcWeb(_, let text):
        // Envoy resets the stream here and the browser sees a broken call with no status. A
        // trailer frame tells it what happened.
        var frame = self.allocator.buffer(capacity: 64)
        self.bodyTrailerStatus = midStreamStatus
        TrailerFrame.encode([("grpc-status", midStreamStatus.headerValue), ("grpc-message", GRPCProtocol.percentEncode(message))], into: &frame)
        return Output(body: text ? Base64.encode(frame, allocator: self.allocator) : frame, end: .clean(trailers: nil))
      case .grpc:
        var trailers = HPACKHeaders()
        trailers.add(name: "grpc-status", value: midStreamStatus.headerValue)
        trailers.add(name: "grpc-message", value: GRPCProtocol.percentEncode(message))
        return Output(end: .clean(trailers: trailers))
      case .other:
        return Output(end: .reset)
      }
    }
  }

  /// A reply made by the proxy itself (no route, bad request, upstream failure), shaped for the
  /// kind of call: for gRPC-Web an HTTP status with `grpc-status`/`grpc-message` headers and an
  /// empty body (L1, L5); for native gRPC a trailers-only 200 (L2).
  public mutating func localReply(httpStatus: Int, grpcStatus: GRPCStatus?, message: String?) -> Output {
    self.state = .finished
    var headers = HPACKHeaders()
    switch self.kind {
    case .grpcWeb:
      headers.add(name: "content-type", value: self.kind.responseContentType!)
      if let grpcStatus {
        // The reply went through the grpc_web filter's transformation, which sets the length.
        headers.add(name: "grpc-status", value: grpcStatus.headerValue)
        if let message, !message.isEmpty { headers.add(name: "grpc-message", value: GRPCProtocol.percentEncode(message)) }
        headers.add(name: "content-length", value: "0")
      }
      return Output(head: ResponseHead(status: httpStatus, headers: headers), end: .clean(trailers: nil))
    case .grpc:
      headers.add(name: "content-type", value: "application/grpc")
      headers.add(name: "grpc-status", value: (grpcStatus ?? GRPCStatus(httpStatus: httpStatus)).headerValue)
      if let message, !message.isEmpty { headers.add(name: "grpc-message", value: GRPCProtocol.percentEncode(message)) }
      return Output(head: ResponseHead(status: 200, headers: headers), end: .clean(trailers: nil))
    case .other:
      let text = message ?? ""
      headers.add(name: "content-length", value: String(text.utf8.count))
      if !text.isEmpty { headers.add(name: "content-type", value: "text/plain") }
      var body: ByteBuffer?
      if !text.isEmpty { body = self.allocator.buffer(string: text) }
      return Output(head: ResponseHead(status: httpStatus, headers: headers), body: body,
        end: .clean(trailers: nil))
    }
  }

  // MARK: - Helpers

  private func transformed(status: Int, headers: HPACKHeaders, body: ByteBuffer?, limit: Int, trailers: HPACKHeaders?) -> Output {
    var headers = headers
    headers.replaceOrAdd(name: "grpc-status", value: GRPCStatus(httpStatus: status).headerValue)
    if let body, body.readableBytes > 0 {
      let message = body.readableBytesView.prefix(limit)
      headers.replaceOrAdd(name: "grpc-message", value: GRPCProtocol.percentEncode(message))
    }
    headers.replaceOrAdd(name: "content-length", value: "0")
    return Output(head: ResponseHead(status: status, headers: headers), end: .clean(trailers: trailers))
  }

  private static func describe(_ failure: CallFailure) -> (Int, GRPCStatus, String) {
    switch failure {
    case .upstreamReset(let reason):
      return (503, .unavailable, "upstream connect error or disconnect/reset before headers. reset reason: \(reason)")
    case .timeout(let message, let httpStatus):
      // 504 for a deadline (UNAVAILABLE, as Envoy maps it), 408 for an idle stream (UNKNOWN).
      return (httpStatus, GRPCStatus(httpStatus: httpStatus), message)
    case .responseFrameTooLarge(let length, let limit):
      return (502, .resourceExhausted, "response message of \(length) bytes exceeds the proxy's text-mode limit of \(limit) bytes")
    case .truncatedResponse:
      return (502, .internalError, "upstream response ended inside a message")
    case .noHealthyUpstream:
      return (503, .unavailable, "no healthy upstream")
    case .invalidRequestBody:
      // Envoy's grpc_web local reply, shaped for gRPC-Web (protocol doc L5).
      return (400, .internalError, "Bad gRPC-web request, invalid base64 data.")
    case .shuttingDown:
      return (503, .unavailable, "proxy shutting down")
    }
  }

  /// Upstream response headers minus pseudo-headers and hop-by-hop headers.
  static func downstreamHeaders(_ headers: HPACKHeaders) -> HPACKHeaders {
    var out = HPACKHeaders()
    out.reserveCapacity(headers.count)
    for (name, value, _) in headers {
      if name.hasPrefix(":") { continue }
      switch name {
      case "connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection": continue
      default: out.add(name: name, value: value)
      }
    }
    return out
  }

  /// `application/grpc-web` or `application/grpc-web+proto`, any case, parameters allowed.
  private static func isGRPCWebContentType(_ value: String) -> Bool {
    let base = value.utf8.prefix { $0 != UInt8(ascii: ";") }.filter { $0 != UInt8(ascii: " ") && $0 != UInt8(ascii: "\t") }
    let lower = base.map { $0 >= 65 && $0 <= 90 ? $0 + 32 : $0 }
    return lower.elementsEqual("application/grpc-web".utf8) || lower.elementsEqual("application/grpc-web+proto".utf8)
  }

  private static func concat(_ a: ByteBuffer, _ b: ByteBuffer?) -> ByteBuffer {
    guard let b else { return a }
    var a = a
    a.writeImmutableBuffer(b)
    return a
  }
}
