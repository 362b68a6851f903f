import Foundation
import NIOCore
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
  /// Every event loop's call statistics; only the admin port reads the list.
  private let loopStats = Mutex<[NIOLoopBound<LoopStats>]>([])
  private let started = NIODeadline.now()
  private let startedAt = Date()

  public init() {}

  private let configSource = Mutex<String?>(nil)

  func setConfigSource(_ yaml: String) { self.configSource.withLock { $0 = yaml } }

  /// `/config_dump`: the configuration as JSON, secrets redacted.
  func configDump() -> String {
    guard let yaml = self.configSource.withLock({ $0 }) else { return "{\"configs\": []}\n" }
    return ConfigLoader.configDump(yaml: yaml)
  }

  private let drainListeners = Mutex<(@Sendable (Bool) -> Void)?>(nil)

  func setDrainListeners(_ action: @escaping @Sendable (Bool) -> Void) {
    self.drainListeners.withLock { $0 = action }
  }

  /// `/drain_listeners`: false when the server has no listeners to drain yet.
  func drainListeners(graceful: Bool) -> Bool {
    guard let action = self.drainListeners.withLock({ $0 }) else { return false }
    action(graceful)
    return true
  }

  func register(_ stats: NIOLoopBound<LoopStats>) {
    self.loopStats.withLock { $0.append(stats) }
  }

  /// Every stat: each loop's, read on that loop, added to the process-wide ones.
  func collectStats(on eventLoop: any EventLoop) -> EventLoopFuture<StatsSnapshot> {
    let loops = self.loopStats.withLock { $0 }
    let parts = loops.map { bound in bound.eventLoop.submit { bound.value.snapshot } }
    return EventLoopFuture.whenAllSucceed(parts, on: eventLoop).map { snapshots in
      var total = StatsSnapshot()
      for snapshot in snapshots { total.merge(snapshot) }
      self.state.withLock { state in
        for (name, value) in state.counters { total.counters[name, default: 0] += UInt64(max(0, value)) }
        for name in state.clusterOrder {
          let endpoints = state.clusters[name] ?? []
          total.gauges["cluster.\(name).membership_total"] = Int64(endpoints.count)
          total.gauges["cluster.\(name).membership_healthy"] = Int64(endpoints.filter(\.healthy).count)
        }
        total.gauges["server.live"] = state.draining ? 0 : 1
        total.gauges["server.state"] = state.draining ? 1 : 0
      }
      total.gauges["server.uptime"] = Int64((NIODeadline.now() - self.started).nanoseconds / 1_000_000_000)
      total.gauges["server.memory_allocated"] = Int64(Self.residentBytes())
      total.gauges["server.concurrency"] = Int64(loops.count)
      return total
    }
  }

  var clusterNames: [String] { self.state.withLock { $0.clusterOrder } }

  /// `/server_info`, the fields of Envoy's that scripts read.
  func serverInfo() -> String {
    let uptime = (NIODeadline.now() - self.started).nanoseconds / 1_000_000_000
    let state = self.state.withLock { $0.draining ? "DRAINING" : "LIVE" }
    let formatter = ISO8601DateFormatter()
    let info: [String: Any] = [
      "version": "grpc-web-proxy", "state": state,
      "uptime_current_epoch": "\(uptime)s", "uptime_all_epochs": "\(uptime)s",
      "hot_restart_version": "disabled", "command_line_options": ["concurrency": self.loopStats.withLock { $0.count }],
      "node": [:] as [String: Any], "started": formatter.string(from: self.startedAt),
    ]
    let data = (try? JSONSerialization.data(withJSONObject: info, options: [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes])) ?? Data()
    return String(decoding: data, as: UTF8.self) + "\n"
  }

  /// The process's resident memory (Envoy reports its allocator's; this is the closest figure
  /// without one).
  private static func residentBytes() -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
    let fields = text.split(separator: " ")
    guard fields.count > 1, let pages = Int(fields[1]) else { return 0 }
    return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
  }

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
  /// `/clusters?format=json`, in Envoy's shape.
  func clustersJSON() -> String {
    let statuses: [[String: Any]] = self.state.withLock { state in
      state.clusterOrder.map { name in
        let hosts: [[String: Any]] = (state.clusters[name] ?? []).map { endpoint in
          var health: [String: Any] = ["eds_health_status": "HEALTHY"]
          if !endpoint.healthy { health["failed_active_health_check"] = true }
          let address: [String: Any] = endpoint.address.unixSocketPath.map { ["pipe": ["path": $0]] }
            ?? ["socket_address": ["address": endpoint.address.host, "port_value": endpoint.address.port]]
          return ["address": address, "health_status": health, "stats": [] as [Any], "weight": 1]
        }
        return ["name": name, "host_statuses": hosts]
      }
    }
    let data = (try? JSONSerialization.data(withJSONObject: ["cluster_statuses": statuses], options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data()
    return String(decoding: data, as: UTF8.self) + "\n"
  }

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
