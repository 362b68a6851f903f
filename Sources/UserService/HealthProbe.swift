import GRPCCore
import GRPCNIOTransportHTTP2

/// A `grpc.health.v1` Check against a server: what container and orchestrator health checks run.
public enum HealthProbe {
  public enum Outcome: Sendable, Equatable {
    case serving
    case notServing(String)
  }

  public static func check(host: String, port: Int, service: String = "", timeout: Duration = .seconds(2)) async -> Outcome {
    do {
      let transport = try HTTP2ClientTransport.Posix(target: .ipv4(address: host, port: port), transportSecurity: .plaintext)
      return try await withGRPCClient(transport: transport) { client in
        var request = Grpc_Health_V1_HealthCheckRequest()
        request.service = service
        var options = CallOptions.defaults
        options.timeout = timeout
        let reply = try await Grpc_Health_V1_Health.Client(wrapping: client).check(request, options: options)
        return reply.status == .serving ? .serving : .notServing("status \(reply.status)")
      }
    } catch let error as RPCError {
      return .notServing("\(error.code): \(error.message)")
    } catch {
      return .notServing("\(error)")
    }
  }
}
