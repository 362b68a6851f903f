import Logging
import NIOCore
import NIOSSL
import NIOTLS
import ProxyConfig

/// A cluster's TLS: its (reloadable) client context, the SNI it sends and the names the
/// backend's certificate must carry.
final class UpstreamTLSClient: Sendable {
  let cluster: String
  let settings: UpstreamTLS
  let context: ReloadableTLSContext

  init(cluster: Cluster, settings: UpstreamTLS) throws {
    self.cluster = cluster.name
    self.settings = settings
    self.context = try ReloadableTLSContext(
      name: "cluster '\(cluster.name)'", statPrefix: "cluster.\(cluster.name)", origin: settings.origin, files: settings.files
    ) { try TLSContextFactory.clientContext(settings) }
  }
}

/// Reports a failed handshake to the connection as a connect failure that names the TLS error
/// (the call then ends with `grpc-status: 14` and that message, as in Envoy), and checks the
/// backend certificate's names against `match_typed_subject_alt_names`.
final class UpstreamTLSHandshakeHandler: ChannelInboundHandler {
  typealias InboundIn = ByteBuffer
  typealias InboundOut = ByteBuffer

  private enum State { case handshaking, established, failed }

  private let settings: UpstreamTLS
  private let connection: UpstreamConnection
  private let sslHandler: NIOSSLClientHandler
  private var state = State.handshaking

  init(settings: UpstreamTLS, connection: UpstreamConnection, sslHandler: NIOSSLClientHandler) {
    self.settings = settings
    self.connection = connection
    self.sslHandler = sslHandler
  }

  func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
    guard case .handshaking = self.state, case .handshakeCompleted = event as? TLSUserEvent else {
      context.fireUserInboundEventTriggered(event)
      return
    }
    if let matchers = self.settings.validation?.subjectAltNames, !matchers.isEmpty {
      let mismatch: String?
      if let peer = self.sslHandler.peerCertificate {
        mismatch = SubjectAltNames.mismatch(peer, matchers)
      } else {
        mismatch = "the backend sent no certificate"
      }
      if let mismatch {
        self.fail(context, "the backend's certificate was refused: \(mismatch)")
        return
      }
    }
    self.state = .established
    context.fireUserInboundEventTriggered(event)
  }

  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    switch self.state {
    case .established:
      context.fireErrorCaught(error)
    case .failed:
      break
    case .handshaking:
      let reasons = TLSErrorText.reasons(error)
      var text = TLSErrorText.describe(error)
      if reasons.contains("CERTIFICATE_VERIFY_FAILED") {
        text += " (the backend's certificate is not signed by validation_context.trusted_ca, or is expired)"
      }
      self.fail(context, text)
    }
  }

  private func fail(_ context: ChannelHandlerContext, _ why: String) {
    self.state = .failed
    self.connection.connectFailed(reason: "remote connection failure, TLS error: \(why)")
    context.close(promise: nil)
  }
}

/// Every TLS context of the configuration, built at start-up (a certificate that cannot be used
/// stops the start with the listener or cluster named), and rebuilt when its files change.
final class TLSRuntime: Sendable {
  /// By listener index: the listeners that serve TLS.
  let listeners: [Int: TLSListener]
  /// By cluster name.
  let upstream: [String: UpstreamTLSClient]
  private let status: ProxyStatus
  private let logger: Logger

  init(configuration: ProxyConfiguration, status: ProxyStatus, logger: Logger) throws {
    var listeners: [Int: TLSListener] = [:]
    for (index, listener) in configuration.listeners.enumerated() where listener.tls != nil {
      listeners[index] = try TLSListener(listener, status: status, logger: logger)
    }
    var upstream: [String: UpstreamTLSClient] = [:]
    for cluster in configuration.clusters {
      guard let settings = cluster.tls else { continue }
      upstream[cluster.name] = try UpstreamTLSClient(cluster: cluster, settings: settings)
    }
    self.listeners = listeners
    self.upstream = upstream
    self.status = status
    self.logger = logger
  }

  var contexts: [ReloadableTLSContext] {
    self.listeners.values.flatMap(\.contexts) + self.upstream.values.map(\.context)
  }

  /// Checks the certificate files every `period` of `clock`; a change reaches new connections.
  func watchFiles<C: Clock>(clock: C, every period: Duration = .seconds(1)) async where C.Duration == Duration {
    let contexts = self.contexts
    while !Task.isCancelled {
      do { try await clock.sleep(for: period) } catch { return }
      for context in contexts {
        context.reloadIfChanged(status: self.status, logger: self.logger)
      }
    }
  }
}
