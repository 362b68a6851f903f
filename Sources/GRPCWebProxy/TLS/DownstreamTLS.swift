import Foundation
import Logging
import NIOCore
import NIOSSL
import NIOTLS
import ProxyConfig

/// A TLS listener's filter chains: their server names and their (reloadable) contexts.
/// Shared by every event loop; a connection takes the current context of its chain when its
/// ClientHello arrives.
final class TLSListener: Sendable {
  struct Chain: Sendable {
    let serverNames: [String]
    let tls: DownstreamTLS
    let context: ReloadableTLSContext
  }

  let name: String
  let chains: [Chain]
  let status: ProxyStatus
  let logger: Logger

  /// - Throws: `ProxyError` when a chain's certificate, key or CA cannot be used.
  init(_ listener: Listener, status: ProxyStatus, logger: Logger) throws {
    self.name = listener.name
    self.status = status
    self.logger = logger
    var chains: [Chain] = []
    for (index, chain) in ([listener] + listener.otherChains).enumerated() {
      guard let tls = chain.tls else {
        throw ProxyError(message: "listener '\(listener.name)': filter chain \(index) has no TLS but others do")
      }
      let label = listener.otherChains.isEmpty ? "listener '\(listener.name)'" : "listener '\(listener.name)' filter chain \(index)"
      let context = try ReloadableTLSContext(
        name: label, statPrefix: "listener.\(listener.name)", origin: tls.origin, files: tls.files
      ) { try TLSContextFactory.serverContext(tls) }
      chains.append(Chain(serverNames: chain.serverNames, tls: tls, context: context))
    }
    self.chains = chains
  }

  var contexts: [ReloadableTLSContext] { self.chains.map(\.context) }

  /// The chain for a ClientHello's server name, as Envoy picks it: an exact name, else the
  /// longest `*.suffix` that matches, else the chain without names. Nil: no chain serves it.
  func chainIndex(serverName: String?) -> Int? {
    if let name = serverName?.lowercased() {
      if let exact = self.chains.firstIndex(where: { $0.serverNames.contains(name) }) { return exact }
      var best: (index: Int, length: Int)?
      for (index, chain) in self.chains.enumerated() {
        for pattern in chain.serverNames where pattern.hasPrefix("*.") {
          let suffix = pattern.dropFirst(1)
          if name.hasSuffix(suffix), name.count > suffix.count, suffix.count > (best?.length ?? 0) {
            best = (index, suffix.count)
          }
        }
      }
      if let best { return best.index }
    }
    return self.chains.firstIndex { $0.serverNames.isEmpty }
  }

  func count(_ stat: String) {
    self.status.count("listener.\(self.name).\(stat)")
  }
}

/// Why a connection to a TLS listener was refused before it could carry a request. Each has its
/// counter under `listener.<name>.`; every one also counts `ssl.connection_error`.
enum TLSRefusal {
  case notTLS
  case noFilterChain(serverName: String?)
  case noCertificate
  case verifyFailed(String)
  case subjectAltName(String)
  case handshakeTimeout
  case handshake(String)

  var counter: String {
    switch self {
    case .notTLS: return "ssl.not_tls"
    case .noFilterChain: return "no_filter_chain_match"
    case .noCertificate: return "ssl.no_certificate"
    case .verifyFailed: return "ssl.fail_verify_error"
    case .subjectAltName: return "ssl.fail_verify_san"
    case .handshakeTimeout: return "ssl.handshake_timeout"
    case .handshake: return "ssl.handshake_error"
    }
  }

  var explanation: String {
    switch self {
    case .notTLS: return "the client spoke plaintext to a TLS port (use https://)"
    case .noFilterChain(let name): return "no filter chain serves server name '\(name ?? "(none sent)")'"
    case .noCertificate: return "the client sent no certificate, and this listener requires one (require_client_certificate)"
    case .verifyFailed(let why): return "the client certificate was refused: \(why)"
    case .subjectAltName(let why): return "the client certificate was refused: \(why)"
    case .handshakeTimeout: return "the handshake did not finish in time (transport_socket_connect_timeout)"
    case .handshake(let why): return "handshake failed: \(why)"
    }
  }
}

/// One connection's way through the handshake:
///
/// ```
///   awaitingHello ──ClientHello (SNI)──▶ handshaking(chain) ──handshakeCompleted──▶ done
///         │                                   │
///         └──── plaintext, no chain, timeout, handshake error ──▶ done (refused, counted, closed)
/// ```
///
/// The timer runs from the first byte of the connection to the end of the handshake. Events after
/// `done` are dropped: a refusal is counted once.
final class TLSHandshakeTracker {
  private enum State {
    case awaitingHello(timer: Scheduled<Void>?)
    case handshaking(chain: Int, timer: Scheduled<Void>?)
    case done
  }

  let listener: TLSListener
  private var state: State = .awaitingHello(timer: nil)
  private let channel: any Channel

  init(listener: TLSListener, channel: any Channel) {
    self.listener = listener
    self.channel = channel
  }

  func start(timeout: ProxyDuration) {
    let timer = self.channel.eventLoop.assumeIsolated().scheduleTask(in: .nanoseconds(max(timeout.nanoseconds, 1_000_000))) {
      self.refuse(.handshakeTimeout)
    }
    self.state = .awaitingHello(timer: timer)
  }

  func choseChain(_ index: Int) {
    guard case .awaitingHello(let timer) = self.state else { return }
    self.state = .handshaking(chain: index, timer: timer)
  }

  var chain: Int? {
    if case .handshaking(let chain, _) = self.state { return chain }
    return nil
  }

  var isDone: Bool {
    if case .done = self.state { return true }
    return false
  }

  func completed() {
    self.cancelTimer()
    self.state = .done
    self.listener.count("ssl.handshake")
  }

  /// Counts and logs the refusal once, and closes the connection.
  func refuse(_ refusal: TLSRefusal) {
    guard !self.isDone else { return }
    self.cancelTimer()
    self.state = .done
    self.listener.count("ssl.connection_error")
    self.listener.count(refusal.counter)
    let peer = self.channel.remoteAddress.map { "\($0.ipAddress ?? "?"):\($0.port ?? 0)" } ?? "?"
    self.listener.logger.info("listener '\(self.listener.name)': TLS connection from \(peer) refused: \(refusal.explanation)")
    self.channel.close(promise: nil)
  }

  private func cancelTimer() {
    switch self.state {
    case .awaitingHello(let timer), .handshaking(_, let timer): timer?.cancel()
    case .done: break
    }
  }
}

/// The first handler of a TLS connection: a TLS connection starts with a handshake record
/// (0x16). Anything else (a browser or curl sent to `http://` on a TLS port) gets a plain 400
/// saying so, where the client can read it, and the connection is closed.
final class PlaintextGuard: ChannelInboundHandler, RemovableChannelHandler {
  typealias InboundIn = ByteBuffer
  typealias InboundOut = ByteBuffer
  typealias OutboundOut = ByteBuffer

  private let tracker: TLSHandshakeTracker

  init(tracker: TLSHandshakeTracker) {
    self.tracker = tracker
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    let buffer = self.unwrapInboundIn(data)
    guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return }
    if first == 0x16 {
      context.fireChannelRead(data)
      context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
      return
    }
    if (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(first) {
      let body = "This port speaks TLS: use https://\n"
      let response =
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: \(body.utf8.count)\r\nconnection: close\r\n\r\n\(body)"
      context.writeAndFlush(self.wrapOutboundOut(context.channel.allocator.buffer(string: response)), promise: nil)
    }
    self.tracker.refuse(.notTLS)
  }
}

/// After the TLS handler: waits for the end of the handshake, then checks the client
/// certificate's names, builds the HTTP pipeline for the negotiated protocol and leaves.
/// A handshake error is classified, counted and logged before the connection closes.
final class TLSServerHandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
  typealias InboundIn = ByteBuffer
  typealias InboundOut = ByteBuffer

  private let tracker: TLSHandshakeTracker
  private let chain: TLSListener.Chain
  private let codec: CodecType
  /// `idle_timeout`: a client that completes the handshake and then says nothing is closed
  /// after it, as on a cleartext connection.
  private let idleTimeout: TimeAmount?
  private let sslHandler: NIOSSLServerHandler
  private let configureHTTP: (ChannelHandlerContext, ProtocolDetector.Detected, String?) throws -> Void

  init(
    tracker: TLSHandshakeTracker, chain: TLSListener.Chain, codec: CodecType, idleTimeout: TimeAmount? = nil,
    sslHandler: NIOSSLServerHandler,
    configureHTTP: @escaping (ChannelHandlerContext, ProtocolDetector.Detected, String?) throws -> Void
  ) {
    self.tracker = tracker
    self.chain = chain
    self.codec = codec
    self.idleTimeout = idleTimeout
    self.sslHandler = sslHandler
    self.configureHTTP = configureHTTP
  }

  func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
    guard case .handshakeCompleted(let negotiated) = event as? TLSUserEvent else {
      context.fireUserInboundEventTriggered(event)
      return
    }
    if let validation = self.chain.tls.validation, !validation.subjectAltNames.isEmpty,
      let peer = self.sslHandler.peerCertificate
    {
      if let mismatch = SubjectAltNames.mismatch(peer, validation.subjectAltNames) {
        self.tracker.refuse(.subjectAltName(mismatch))
        return
      }
    }
    self.tracker.completed()
    let subject = self.sslHandler.peerCertificate.map { TLSSessionInfo.subject(of: $0) }
    do {
      switch negotiated {
      case "h2":
        try self.configureHTTP(context, .http2, subject)
      case "http/1.1", "http/1.0":
        try self.configureHTTP(context, .http1, subject)
      default:
        switch self.codec {
        case .http1: try self.configureHTTP(context, .http1, subject)
        case .http2: try self.configureHTTP(context, .http2, subject)
        case .auto:
          // No ALPN: tell HTTP/2 (prior knowledge) from HTTP/1.1 by the first bytes, as in cleartext.
          let configure = self.configureHTTP
          try context.pipeline.syncOperations.addHandler(
            ProtocolDetector(idleTimeout: self.idleTimeout) { context, proto in try configure(context, proto, subject) })
        }
      }
    } catch {
      context.close(promise: nil)
      return
    }
    context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
  }

  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    guard !self.tracker.isDone else {
      context.fireErrorCaught(error)
      return
    }
    let reasons = TLSErrorText.reasons(error)
    if reasons.contains("PEER_DID_NOT_RETURN_A_CERTIFICATE") {
      self.tracker.refuse(.noCertificate)
    } else if reasons.contains("CERTIFICATE_VERIFY_FAILED") {
      self.tracker.refuse(.verifyFailed(self.whyUnverified()))
    } else if reasons.contains("HTTP_REQUEST") || reasons.contains("WRONG_VERSION_NUMBER") {
      self.tracker.refuse(.notTLS)
    } else {
      self.tracker.refuse(.handshake(TLSErrorText.describe(error)))
    }
  }

  func channelInactive(context: ChannelHandlerContext) {
    if !self.tracker.isDone {
      self.tracker.refuse(.handshake("the client closed the connection during the handshake"))
    }
    context.fireChannelInactive()
  }

  /// BoringSSL says only CERTIFICATE_VERIFY_FAILED; the certificate itself tells an expired one
  /// from one signed by another CA.
  private func whyUnverified() -> String {
    guard let peer = self.sslHandler.peerCertificate else {
      return "it is expired or not signed by validation_context.trusted_ca"
    }
    let now = time(nil)
    if peer.notValidAfter < now {
      return "it expired on \(Self.format(peer.notValidAfter))"
    }
    if peer.notValidBefore > now {
      return "it is not valid before \(Self.format(peer.notValidBefore))"
    }
    return "it is not signed by validation_context.trusted_ca"
  }

  private static func format(_ time: time_t) -> String {
    ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: TimeInterval(time)))
  }
}

/// `match_typed_subject_alt_names`, checked against a peer certificate.
enum SubjectAltNames {
  /// Nil when a name of the certificate matches; else what was wrong, for the log and the call.
  static func mismatch(_ certificate: NIOSSLCertificate, _ matchers: [SubjectAltNameMatcher]) -> String? {
    var names: [(SubjectAltNameMatcher.NameType, String)] = []
    for name in certificate._subjectAlternativeNames() {
      let bytes = name.contents.withUnsafeBufferPointer { Array($0) }
      switch name.nameType {
      case .dnsName: names.append((.dns, String(decoding: bytes, as: UTF8.self)))
      case .uri: names.append((.uri, String(decoding: bytes, as: UTF8.self)))
      case .email: names.append((.email, String(decoding: bytes, as: UTF8.self)))
      case .ipAddress: names.append((.ipAddress, Self.ipAddress(bytes)))
      default: continue
      }
    }
    for matcher in matchers {
      for (type, value) in names where type == matcher.type && Self.matches(matcher.matcher, value) {
        return nil
      }
    }
    let have = names.isEmpty ? "none" : names.map { "\($0.0.rawValue):\($0.1)" }.joined(separator: ", ")
    return "no subject alternative name matches match_typed_subject_alt_names (the certificate has \(have))"
  }

  private static func ipAddress(_ bytes: [UInt8]) -> String {
    if bytes.count == 4 { return bytes.map(String.init).joined(separator: ".") }
    var groups: [String] = []
    var i = 0
    while i + 1 < bytes.count {
      groups.append(String(UInt16(bytes[i]) << 8 | UInt16(bytes[i + 1]), radix: 16))
      i += 2
    }
    return groups.joined(separator: ":")
  }

  static func matches(_ matcher: StringMatcher, _ value: String) -> Bool {
    let subject = matcher.ignoreCase ? value.lowercased() : value
    func fold(_ s: String) -> String { matcher.ignoreCase ? s.lowercased() : s }
    switch matcher.kind {
    case .exact(let s): return subject == fold(s)
    case .prefix(let s): return subject.hasPrefix(fold(s))
    case .suffix(let s): return subject.hasSuffix(fold(s))
    case .contains(let s): return subject.contains(fold(s))
    case .regex(let pattern):
      guard let regex = try? NSRegularExpression(pattern: pattern, options: matcher.ignoreCase ? [.caseInsensitive] : []) else {
        return false
      }
      let range = NSRange(value.startIndex..., in: value)
      return regex.firstMatch(in: value, options: [.anchored], range: range)?.range == range
    }
  }
}

/// What a call may say about the TLS session under its connection: the server name the client
/// asked for (SNI) and the subject of its certificate (mTLS), as Envoy's
/// %REQUESTED_SERVER_NAME% and %DOWNSTREAM_PEER_SUBJECT% give them.
struct TLSSessionInfo: Sendable {
  var serverName: String?
  var peerSubject: String?

  /// The subject as RFC 2253 writes it (Envoy's form): the last name first, `CN=…,O=…,C=…`,
  /// with `,+"\<>;` escaped. Attributes with no short name here are left out.
  static func subject(of certificate: NIOSSLCertificate) -> String {
    let short: [(SSLCertificateNameType, String)] = [
      (.commonName, "CN"), (.organization, "O"), (.organizationalUnit, "OU"), (.city, "L"), (.state, "ST"),
      (.country, "C"), (.emailAddress, "emailAddress"), (.userId, "UID"),
    ]
    return certificate.subjectName.reversed().compactMap { name in
      guard let key = short.first(where: { $0.0 == name.type })?.1 else { return nil }
      return "\(key)=\(Self.escape(name.value))"
    }.joined(separator: ",")
  }

  static func escape(_ value: String) -> String {
    var out = ""
    for (i, c) in value.enumerated() {
      if ",+\"\\<>;".contains(c) || (i == 0 && (c == "#" || c == " ")) || (i == value.count - 1 && c == " ") {
        out.append("\\")
      }
      out.append(c)
    }
    return out
  }
}
