import ProxyConfig
import Synchronization

/// What the admin port reports: whether the proxy is draining and which endpoints each cluster
/// has. Written when discovery or health changes and read by admin requests, never by calls, so
/// a mutex costs nothing that matters.
public final class ProxyStatus: Sendable {
  public struct Endpoint: Sendable, Hashable {
    public var address: HostAndPort
    public var healthy: Bool
  }

  private struct State {
    var draining = false
    var failingHealthChecks = false
    var clusters: [String: [Endpoint]] = [:]
    var clusterOrder: [String] = []
    var counters: [String: Int] = [:]
  }

  private let state = Mutex(State())

  public init() {}

  public var isDraining: Bool { self.state.withLock { $0.draining } }

  func setDraining() { self.state.withLock { $0.draining = true } }

  /// Envoy's `/healthcheck/fail` and `/healthcheck/ok`: an operator takes the proxy out of its
  /// load balancer's rotation before stopping it.
  func setFailingHealthChecks(_ failing: Bool) { self.state.withLock { $0.failingHealthChecks = failing } }

  func setEndpoints(_ endpoints: [Endpoint], cluster: String) {
    self.state.withLock { state in
      if state.clusters[cluster] == nil { state.clusterOrder.append(cluster) }
      state.clusters[cluster] = endpoints
    }
  }

  func setHealth(_ healthy: Bool, of address: HostAndPort, cluster: String) {
    self.state.withLock { state in
      guard let index = state.clusters[cluster]?.firstIndex(where: { $0.address == address }) else { return }
      state.clusters[cluster]![index].healthy = healthy
    }
  }

  /// Adds to a counter of `/stats`, named as Envoy names it (`cluster.<name>.update_failure`).
  func count(_ name: String, by amount: Int = 1) {
    self.state.withLock { $0.counters[name, default: 0] += amount }
  }

  /// `/stats`: the counters, and each cluster's membership, one `name: value` a line.
  public func statsText() -> String {
    self.state.withLock { state in
      var lines = state.counters.map { "\($0.key): \($0.value)" }
      for name in state.clusterOrder {
        let endpoints = state.clusters[name] ?? []
        lines.append("cluster.\(name).membership_total: \(endpoints.count)")
        lines.append("cluster.\(name).membership_healthy: \(endpoints.filter(\.healthy).count)")
      }
      return lines.sorted().joined(separator: "\n") + "\n"
    }
  }

  /// `/ready`: ready while not draining and some cluster has a healthy endpoint.
  public func readiness() -> (ready: Bool, reason: String) {
    self.state.withLock { state in
      if state.draining { return (false, "DRAINING") }
      if state.failingHealthChecks { return (false, "FAILING (healthcheck/fail)") }
      let healthy = state.clusters.values.contains { $0.contains(where: \.healthy) }
      return healthy || state.clusters.isEmpty ? (true, "LIVE") : (false, "NO HEALTHY UPSTREAM")
    }
  }

  /// `/clusters`, in Envoy's text form: `cluster::address::health_flags::value`.
  public func clustersText() -> String {
    self.state.withLock { state in
      var out = ""
      for name in state.clusterOrder {
        for endpoint in state.clusters[name] ?? [] {
          out += "\(name)::\(endpoint.address)::health_flags::\(endpoint.healthy ? "healthy" : "/failed_active_hc")\n"
        }
      }
      return out
    }
  }
}
