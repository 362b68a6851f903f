import Logging
import NIOCore
import ProxyConfig
import Synchronization

/// Every cluster's membership, and the way changes reach the event loops and the admin port.
/// Discovery, health checks and the loops' reports of failed connections all come here; each
/// change is published to every loop's `LoopUpstreams` as a snapshot.
final class UpstreamDirectory: Sendable {
  let memberships: [String: ClusterMembership]
  let counters: [String: ClusterCounters]
  private let status: ProxyStatus
  private let logger: Logger
  private let loops = Mutex<[NIOLoopBound<LoopUpstreams>]>([])
  /// Clusters whose DNS should be asked again now: a connection to one of their endpoints failed.
  private let resolveRequests = Mutex<Set<String>>([])

  /// How long an endpoint that refused a connection is set aside (doubling on repeats).
  static let setAsideBase = Duration.seconds(1)
  static let setAsideMaximum = Duration.seconds(30)

  init(clusters: [Cluster], status: ProxyStatus, logger: Logger) {
    self.memberships = Dictionary(uniqueKeysWithValues: clusters.map { ($0.name, ClusterMembership(cluster: $0)) })
    self.counters = Dictionary(uniqueKeysWithValues: clusters.map { ($0.name, ClusterCounters()) })
    self.status = status
    self.logger = logger
  }

  func register(_ upstreams: NIOLoopBound<LoopUpstreams>) {
    self.loops.withLock { $0.append(upstreams) }
  }

  var events: UpstreamEvents {
    UpstreamEvents(
      connectFailed: { [weak self] cluster, endpoint in self?.connectFailed(cluster: cluster, endpoint: endpoint) },
      connected: { [weak self] cluster, endpoint in self?.memberships[cluster]?.connected(endpoint) },
      eject: { [weak self] cluster, endpoint, why in self?.eject(endpoint, cluster: cluster, why: why) }
    )
  }

  /// `/stats` counters, by Envoy's names where Envoy has one.
  func count(_ counter: String, cluster: String) {
    self.status.count("cluster.\(cluster).\(counter)")
  }

  func discovered(_ endpoints: [HostAndPort], cluster: String) {
    guard let membership = self.memberships[cluster] else { return }
    self.publish(membership.setDiscovered(endpoints), cluster: cluster)
  }

  func healthCheck(_ endpoint: HostAndPort, cluster: String, passed: Bool, detail: String) {
    guard let membership = self.memberships[cluster], let check = membership.cluster.healthCheck else { return }
    self.count(passed ? "health_check.success" : "health_check.failure", cluster: cluster)
    if let snapshot = membership.healthCheck(endpoint, passed: passed, threshold: (check.healthyThreshold, check.unhealthyThreshold)) {
      if passed {
        self.logger.info("cluster '\(cluster)': \(endpoint) is healthy again")
      } else {
        self.logger.warning("cluster '\(cluster)': \(endpoint) failed its health check (\(detail)): no new calls go to it")
      }
      self.publish(snapshot, cluster: cluster)
    }
  }

  /// Envoy's outlier detection: consecutive failures seen by one event loop eject the endpoint.
  func eject(_ endpoint: HostAndPort, cluster: String, why: String) {
    guard let membership = self.memberships[cluster], let od = membership.cluster.outlierDetection else { return }
    let base = Duration.nanoseconds(od.baseEjectionTime.nanoseconds)
    let maximum = Duration.nanoseconds(max(od.maxEjectionTime.nanoseconds, od.baseEjectionTime.nanoseconds))
    if let snapshot = membership.setAside(endpoint, base: base, maximum: maximum, maxPercent: od.maxEjectionPercent) {
      self.logger.warning("cluster '\(cluster)': \(endpoint) ejected after \(why)")
      self.count("outlier_detection.ejections_total", cluster: cluster)
      self.publish(snapshot, cluster: cluster)
    }
  }

  private func connectFailed(cluster: String, endpoint: HostAndPort) {
    guard let membership = self.memberships[cluster] else { return }
    if let snapshot = membership.setAside(endpoint, base: Self.setAsideBase, maximum: Self.setAsideMaximum) {
      self.logger.info("cluster '\(cluster)': cannot connect to \(endpoint); it gets no calls for a while")
      self.count("upstream_cx_connect_fail_set_aside", cluster: cluster)
      self.publish(snapshot, cluster: cluster)
    }
    if membership.cluster.type != .staticAddresses {
      _ = self.resolveRequests.withLock { $0.insert(cluster) }
    }
  }

  /// Whether a connection failure asked for the cluster's DNS to be looked up again.
  func takeResolveRequest(_ cluster: String) -> Bool {
    self.resolveRequests.withLock { $0.remove(cluster) != nil }
  }

  /// Endpoints set aside after a refused connection or an ejection come back on time: looked at
  /// every `period` of `clock` until cancelled.
  func keepReadmitting<C: Clock>(clock: C, every period: Duration = .milliseconds(100)) async where C.Duration == Duration {
    while !Task.isCancelled {
      do { try await clock.sleep(for: period) } catch { return }
      self.readmitExpired()
    }
  }

  /// Endpoints whose time aside is over take calls again.
  func readmitExpired() {
    for (name, membership) in self.memberships {
      if let snapshot = membership.readmit() { self.publish(snapshot, cluster: name) }
    }
  }

  private func publish(_ snapshot: ClusterMembership.Snapshot, cluster: String) {
    if let membership = self.memberships[cluster] {
      self.status.setEndpoints(membership.statusEndpoints, cluster: cluster)
    }
    for loop in self.loops.withLock({ $0 }) {
      loop.eventLoop.execute { loop.value.setEndpoints(snapshot, forCluster: cluster) }
    }
  }
}
