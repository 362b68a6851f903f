import GRPCCore
import Synchronization

/// The serving status a replica reports through `grpc.health.v1`. Shared by the health service
/// and whatever decides the status (signals, shutdown), so it is guarded by a mutex: it changes
/// rarely and is read once per health check, never on the proxy's path.
public final class HealthState: Sendable {
  private struct State {
    var serving = true
    var watchers: [Int: AsyncStream<Bool>.Continuation] = [:]
    var nextID = 0
  }

  private let state = Mutex(State())

  public init() {}

  public var isServing: Bool { self.state.withLock { $0.serving } }

  public func set(serving: Bool) {
    let watchers = self.state.withLock { state -> [AsyncStream<Bool>.Continuation] in
      guard state.serving != serving else { return [] }
      state.serving = serving
      return Array(state.watchers.values)
    }
    for watcher in watchers { watcher.yield(serving) }
  }

  /// The current status first, then every change, until the caller stops iterating.
  func changes() -> AsyncStream<Bool> {
    let (stream, continuation) = AsyncStream<Bool>.makeStream(bufferingPolicy: .bufferingNewest(1))
    let id = self.state.withLock { state -> Int in
      let id = state.nextID
      state.nextID += 1
      state.watchers[id] = continuation
      continuation.yield(state.serving)
      return id
    }
    continuation.onTermination = { [weak self] _ in
      _ = self?.state.withLock { $0.watchers.removeValue(forKey: id) }
    }
    return stream
  }
}

/// `grpc.health.v1.Health` for the replica: the whole server ("") and each of its services.
public struct HealthService: Grpc_Health_V1_Health.SimpleServiceProtocol {
  public static let services: Set<String> = ["", "demo.User", "demo.Echo", "grpc.health.v1.Health"]

  private let health: HealthState

  public init(health: HealthState) {
    self.health = health
  }

  public func check(
    request: Grpc_Health_V1_HealthCheckRequest,
    context: ServerContext
  ) async throws -> Grpc_Health_V1_HealthCheckResponse {
    guard Self.services.contains(request.service) else {
      // The protocol's answer for a service this server does not have.
      throw RPCError(code: .notFound, message: "unknown service '\(request.service)'")
    }
    return Self.response(serving: self.health.isServing)
  }

  public func watch(
    request: Grpc_Health_V1_HealthCheckRequest,
    response: RPCWriter<Grpc_Health_V1_HealthCheckResponse>,
    context: ServerContext
  ) async throws {
    guard Self.services.contains(request.service) else {
      var unknown = Grpc_Health_V1_HealthCheckResponse()
      unknown.status = .serviceUnknown
      try await response.write(unknown)
      return
    }
    for await serving in self.health.changes() {
      try await response.write(Self.response(serving: serving))
    }
  }

  private static func response(serving: Bool) -> Grpc_Health_V1_HealthCheckResponse {
    var reply = Grpc_Health_V1_HealthCheckResponse()
    reply.status = serving ? .serving : .notServing
    return reply
  }
}
