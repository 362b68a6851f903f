import ProxyConfig

/// When each endpoint of a cluster is checked (Envoy's `health_checks`), without a clock or a
/// socket: a new endpoint at once; then `interval` after its last check ended, never while one is
/// still in flight (a check slower than the interval is not piled on by the next, as Envoy arms
/// its interval timer when a check ends); an endpoint that leaves the cluster is forgotten, and a
/// check of it still in flight is ignored when it ends.
///
/// `HealthChecker.run` sleeps on the clock it is given and performs these steps.
struct HealthCheckSchedule<Instant: InstantProtocol> where Instant.Duration == Duration {
  let interval: Duration
  private enum Entry: Equatable {
    case due(Instant)
    case checking
  }
  private var entries: [HostAndPort: Entry] = [:]

  init(interval: Duration) {
    self.interval = interval
  }

  struct Step: Equatable {
    /// Start a check of each.
    var check: [HostAndPort] = []
    /// No longer in the cluster: drop what is kept for them (their connections).
    var forget: Set<HostAndPort> = []
  }

  /// The cluster's endpoints as they are `now`: what to check and what to forget.
  mutating func endpoints(_ current: [HostAndPort], now: Instant) -> Step {
    var step = Step()
    for endpoint in current {
      switch self.entries[endpoint] {
      case .none:
        step.check.append(endpoint)
        self.entries[endpoint] = .checking
      case .due(let when) where when <= now:
        step.check.append(endpoint)
        self.entries[endpoint] = .checking
      case .due, .checking:
        break
      }
    }
    let known = Set(current)
    for endpoint in self.entries.keys where !known.contains(endpoint) {
      self.entries[endpoint] = nil
      step.forget.insert(endpoint)
    }
    return step
  }

  /// A check of `endpoint` ended `now`, whatever its result: the next is due an interval later.
  /// Returns false if the endpoint has left the cluster meanwhile (its result means nothing).
  mutating func checked(_ endpoint: HostAndPort, now: Instant) -> Bool {
    guard self.entries[endpoint] == .checking else { return false }
    self.entries[endpoint] = .due(now.advanced(by: self.interval))
    return true
  }

  /// When the next check comes due, if one is waiting.
  var nextDue: Instant? {
    self.entries.values.compactMap { if case .due(let when) = $0 { return when } else { return nil } }.min()
  }
}
