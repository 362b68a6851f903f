import ProxyConfig
import Synchronization

/// One cluster's endpoints as the whole proxy sees them: what discovery found, what active
/// health checks say, and which endpoints are set aside for a while after failing. Event loops
/// balance over snapshots of it. It changes on discovery, health transitions and failures, never
/// per call, so a mutex costs nothing that matters.
final class ClusterMembership: Sendable {
  struct Snapshot: Sendable, Equatable {
    /// Every discovered endpoint: connections to others are retired.
    var all: [HostAndPort]
    /// The endpoints new calls may go to.
    var usable: [HostAndPort]
    /// Snapshots are made under the lock but delivered without it: a loop keeps the newest.
    var version: UInt64
  }

  private struct Host {
    var address: HostAndPort
    /// From active health checks; a new endpoint counts as healthy until a check says otherwise,
    /// so it takes its share at once.
    var healthy = true
    var checkFailures = 0
    var checkSuccesses = 0
    /// Set aside (connection refused, outlier ejection) until then.
    var setAsideUntil: ContinuousClock.Instant?
    var setAsideCount = 0
    var ejected = false

    func isUsable(at now: ContinuousClock.Instant) -> Bool {
      self.healthy && (self.setAsideUntil.map { $0 <= now } ?? true)
    }
  }

  let cluster: Cluster
  private let hosts = Mutex<[Host]>([])
  private let versions = Atomic<UInt64>(0)

  /// The time the set-aside periods are measured on; tests move their own.
  private let now: @Sendable () -> ContinuousClock.Instant

  init(cluster: Cluster, now: @escaping @Sendable () -> ContinuousClock.Instant = { ContinuousClock.now }) {
    self.cluster = cluster
    self.now = now
  }

  var snapshot: Snapshot {
    let now = self.now()
    return self.hosts.withLock { self.snapshot($0, now: now) }
  }

  /// For the admin port.
  var statusEndpoints: [ProxyStatus.Endpoint] {
    let now = self.now()
    return self.hosts.withLock { hosts in hosts.map { .init(address: $0.address, healthy: $0.isUsable(at: now)) } }
  }

  /// Discovery's answer. An endpoint that stays keeps what is known of its health.
  func setDiscovered(_ addresses: [HostAndPort]) -> Snapshot {
    let now = self.now()
    return self.hosts.withLock { hosts in
      let known = Dictionary(hosts.map { ($0.address, $0) }, uniquingKeysWith: { a, _ in a })
      hosts = addresses.map { known[$0] ?? Host(address: $0) }
      return self.snapshot(hosts, now: now)
    }
  }

  /// An active health check's result. Returns the new snapshot when the endpoint's health changed.
  func healthCheck(_ address: HostAndPort, passed: Bool, threshold: (healthy: Int, unhealthy: Int)) -> Snapshot? {
    let now = self.now()
    return self.hosts.withLock { hosts in
      guard let i = hosts.firstIndex(where: { $0.address == address }) else { return nil }
      let before = hosts[i].healthy
      if passed {
        hosts[i].checkFailures = 0
        hosts[i].checkSuccesses += 1
        if !before && hosts[i].checkSuccesses >= threshold.healthy { hosts[i].healthy = true }
        // A passing check ends an outlier ejection early, as Envoy's
        // successful_active_health_check_uneject_host does by default.
        if hosts[i].ejected { hosts[i].setAsideUntil = nil; hosts[i].ejected = false }
      } else {
        hosts[i].checkSuccesses = 0
        hosts[i].checkFailures += 1
        if before && hosts[i].checkFailures >= threshold.unhealthy { hosts[i].healthy = false }
      }
      return hosts[i].healthy != before ? self.snapshot(hosts, now: now) : nil
    }
  }

  /// Sets an endpoint aside for a time that doubles with each repeat, up to `maximum`, unless it
  /// is the last usable one (a cluster of one dead endpoint then reports the connection failure
  /// itself, as Envoy does) or, for outlier ejections, more than `maxPercent` would be out.
  func setAside(_ address: HostAndPort, base: Duration, maximum: Duration, maxPercent: Int? = nil) -> Snapshot? {
    let now = self.now()
    return self.hosts.withLock { hosts in
      guard let i = hosts.firstIndex(where: { $0.address == address }), hosts[i].isUsable(at: now) else { return nil }
      let usable = hosts.filter { $0.isUsable(at: now) }.count
      guard usable > 1 else { return nil }
      if let maxPercent {
        let ejected = hosts.filter(\.ejected).count
        // At least one may be out, whatever the percentage.
        guard ejected == 0 || (ejected + 1) * 100 <= maxPercent * hosts.count else { return nil }
        hosts[i].ejected = true
      }
      hosts[i].setAsideCount += 1
      let factor = 1 << min(hosts[i].setAsideCount - 1, 16)
      hosts[i].setAsideUntil = now.advanced(by: min(base * factor, maximum))
      return self.snapshot(hosts, now: now)
    }
  }

  /// A connection to the endpoint was made: the next failure starts from the base time again.
  func connected(_ address: HostAndPort) {
    self.hosts.withLock { hosts in
      if let i = hosts.firstIndex(where: { $0.address == address }), !hosts[i].ejected { hosts[i].setAsideCount = 0 }
    }
  }

  /// Endpoints whose time aside is over come back. Returns the snapshot if any did.
  func readmit() -> Snapshot? {
    let now = self.now()
    return self.hosts.withLock { hosts in
      var changed = false
      for i in hosts.indices {
        if let until = hosts[i].setAsideUntil, until <= now {
          hosts[i].setAsideUntil = nil
          hosts[i].ejected = false
          changed = true
        }
      }
      return changed ? self.snapshot(hosts, now: now) : nil
    }
  }

  private func snapshot(_ hosts: [Host], now: ContinuousClock.Instant) -> Snapshot {
    let version = self.versions.add(1, ordering: .relaxed).newValue
    return Snapshot(all: hosts.map(\.address), usable: hosts.filter { $0.isUsable(at: now) }.map(\.address), version: version)
  }
}
