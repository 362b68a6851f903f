import ProxyConfig

/// A DNS cluster's refresh rules, without a clock or a resolver: how long to wait before the
/// next lookup, and what each answer does to the cluster's endpoints.
/// - Every `dns_refresh_rate`, or when the records' TTL runs out with `respect_dns_ttl` (never
///   sooner than 100 ms).
/// - After a failed lookup, every `dns_failure_refresh_rate`, doubling up to its maximum; the
///   last endpoints are kept.
/// - An empty answer empties the cluster only when the next lookup says the same, so a Swarm
///   service whose tasks are being replaced keeps its calls.
///
/// `ProxyServer.keepResolving` sleeps on the clock it is given and performs these steps.
struct DNSRefreshSchedule {
  private let refresh: Duration
  private let respectTTL: Bool
  private let failureRate: (base: Duration, max: Duration)?
  /// The endpoints the cluster has now.
  private(set) var endpoints: [HostAndPort]
  private var emptyAnswers = 0
  private var failures = 0

  /// What to wait before the first lookup after the initial one.
  private(set) var wait: Duration

  init(cluster: Cluster, initial: [HostAndPort]) {
    self.refresh = .nanoseconds(max(cluster.dnsRefreshRate.nanoseconds, 100_000_000))
    self.respectTTL = cluster.respectDNSTTL
    self.failureRate = cluster.dnsFailureRefreshRate.map {
      (.nanoseconds($0.base.nanoseconds), .nanoseconds(max($0.max.nanoseconds, $0.base.nanoseconds)))
    }
    self.endpoints = initial
    self.wait = self.refresh
  }

  enum Step: Equatable {
    /// The endpoints changed: publish them.
    case changed(EndpointSetChange)
    /// The same endpoints as before.
    case unchanged
    /// A first empty answer: the `kept` endpoints stay until the next lookup says the same.
    case emptyOnce(kept: Int)
    /// A second empty answer in a row: the cluster is now empty (publish no endpoints).
    case emptied
    /// The lookup failed: the `kept` endpoints stay.
    case failed(reason: String, kept: Int)
  }

  /// A lookup's outcome. Afterwards `wait` is the time until the next one.
  mutating func answer(_ outcome: DiscoveryOutcome) -> Step {
    switch outcome {
    case .endpoints(let endpoints, let ttl):
      self.failures = 0
      self.emptyAnswers = 0
      self.wait = self.respectTTL ? max(ttl ?? self.refresh, .milliseconds(100)) : self.refresh
      guard let change = EndpointSetChange(from: self.endpoints, to: endpoints) else { return .unchanged }
      self.endpoints = endpoints
      return .changed(change)
    case .empty:
      self.failures = 0
      self.emptyAnswers += 1
      self.wait = self.refresh
      guard !self.endpoints.isEmpty else { return .unchanged }
      guard self.emptyAnswers >= 2 else { return .emptyOnce(kept: self.endpoints.count) }
      self.endpoints = []
      return .emptied
    case .failure(let reason):
      self.failures += 1
      self.emptyAnswers = 0
      if let rate = self.failureRate {
        self.wait = min(rate.base * (1 << min(self.failures - 1, 16)), rate.max)
      } else {
        self.wait = self.refresh
      }
      return .failed(reason: reason, kept: self.endpoints.count)
    }
  }
}
