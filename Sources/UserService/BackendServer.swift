import GRPCCore
import GRPCNIOTransportHTTP2

/// Runs the example backend: `demo.User` and `demo.Echo` on one plaintext HTTP/2 port.
public enum BackendServer {
  /// Serves until the task is cancelled. `onListening` gets the bound port (useful with port 0).
  public static func run(
    host: String,
    port: Int,
    replica: String?,
    onListening: @Sendable (Int) async -> Void = { _ in }
  ) async throws {
    let transport = HTTP2ServerTransport.Posix(
      address: .ipv4(host: host, port: port),
      transportSecurity: .plaintext
    )
    let server = GRPCServer(
      transport: transport,
      services: [
        UserService(replica: replica ?? "\(host):\(port)"),
        EchoService(replica: replica ?? "\(host):\(port)"),
      ]
    )
    try await withThrowingDiscardingTaskGroup { group in
      group.addTask { try await server.serve() }
      guard let address = try await transport.listeningAddress.ipv4 else {
        server.beginGracefulShutdown()
        return
      }
      await onListening(address.port)
    }
  }
}
