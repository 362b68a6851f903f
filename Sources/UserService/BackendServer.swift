import GRPCCore
import GRPCNIOTransportHTTP2

/// The example backend: `demo.User`, `demo.Echo` and `grpc.health.v1` on one HTTP/2 port,
/// plaintext or TLS.
public final class BackendServer: Sendable {
  public let health = HealthState()
  private let server: GRPCServer<HTTP2ServerTransport.Posix>
  private let transport: HTTP2ServerTransport.Posix

  /// - Parameter maxConcurrentStreams: the HTTP/2 limit the server announces (nil: the
  ///   transport's default), to try clients' handling of it.
  /// TLS for the port: PEM files; with `clientCA`, clients must show a certificate it signed.
  public struct TLSFiles: Sendable {
    public var certificateChain: String
    public var privateKey: String
    public var clientCA: String?

    public init(certificateChain: String, privateKey: String, clientCA: String? = nil) {
      self.certificateChain = certificateChain
      self.privateKey = privateKey
      self.clientCA = clientCA
    }
  }

  /// - Parameter unixSocket: listen on this unix socket path instead of `host:port`.
  public init(
    host: String, port: Int, replica: String?, maxConcurrentStreams: Int? = nil, tls: TLSFiles? = nil, unixSocket: String? = nil
  ) {
    var config = HTTP2ServerTransport.Posix.Config.defaults
    if let maxConcurrentStreams { config.http2.maxConcurrentStreams = maxConcurrentStreams }
    self.transport = HTTP2ServerTransport.Posix(
      address: unixSocket.map { .unixDomainSocket(path: $0) } ?? .ipv4(host: host, port: port),
      transportSecurity: Self.transportSecurity(tls),
      config: config
    )
    let name = replica ?? "\(host):\(port)"
    self.server = GRPCServer(
      transport: self.transport,
      services: [UserService(replica: name), EchoService(replica: name), HealthService(health: self.health)]
    )
  }

  private static func transportSecurity(_ tls: TLSFiles?) -> HTTP2ServerTransport.Posix.TransportSecurity {
    guard let tls else { return .plaintext }
    return .tls(
      certificateChain: [.file(path: tls.certificateChain, format: .pem)],
      privateKey: .file(path: tls.privateKey, format: .pem)
    ) { config in
      if let ca = tls.clientCA {
        config.clientCertificateVerification = .noHostnameVerification
        config.trustRoots = .certificates([.file(path: ca, format: .pem)])
      }
    }
  }

  /// Serves until shut down or cancelled. `onListening` gets the bound port (useful with port 0).
  public func run(onListening: @Sendable (Int) async -> Void = { _ in }) async throws {
    try await withThrowingDiscardingTaskGroup { group in
      group.addTask { try await self.server.serve() }
      let address = try await self.transport.listeningAddress
      if address.unixDomainSocket != nil {
        await onListening(0)
        return
      }
      guard let ipv4 = address.ipv4 else {
        self.server.beginGracefulShutdown()
        return
      }
      await onListening(ipv4.port)
    }
  }

  /// Reports NOT_SERVING, stops taking calls and lets the running ones finish; `run` then returns.
  public func beginGracefulShutdown() {
    self.health.set(serving: false)
    self.server.beginGracefulShutdown()
  }

  /// Serves until the task is cancelled.
  public static func run(
    host: String,
    port: Int,
    replica: String?,
    onListening: @Sendable (Int) async -> Void = { _ in }
  ) async throws {
    try await BackendServer(host: host, port: port, replica: replica).run(onListening: onListening)
  }
}
