import GRPCWebCore
import Logging
import NIOCore
import ProxyConfig
import Synchronization

/// Why an upstream stream could not be had.
struct UpstreamUnavailable: Error {
  /// The text that follows Envoy's "reset reason:" (`connection failure`, …) or a full message.
  var reason: String
  /// Whether there was no endpoint at all (Envoy's "no healthy upstream", not a reset).
  var noHealthyUpstream: Bool = false
  /// The connection could not be made: nothing of the call reached the endpoint, which is to blame.
  var connectFailure: Bool = false
  /// Nothing of the call was sent (its connection was given up before it was made): it can go
  /// to another endpoint.
  var notSent: Bool = false
}

/// What the event loops tell the rest of the proxy about endpoints.
struct UpstreamEvents: Sendable {
  var connectFailed: @Sendable (_ cluster: String, _ endpoint: HostAndPort) -> Void
  var connected: @Sendable (_ cluster: String, _ endpoint: HostAndPort) -> Void
  /// Outlier detection: the endpoint failed too many calls in a row.
  var eject: @Sendable (_ cluster: String, _ endpoint: HostAndPort, _ why: String) -> Void

  init(
    connectFailed: @escaping @Sendable (String, HostAndPort) -> Void = { _, _ in },
    connected: @escaping @Sendable (String, HostAndPort) -> Void = { _, _ in },
    eject: @escaping @Sendable (String, HostAndPort, String) -> Void = { _, _, _ in }
  ) {
    self.connectFailed = connectFailed
    self.connected = connected
    self.eject = eject
  }
}

/// A cluster's calls in flight, across every event loop, for `circuit_breakers`. One atomic
/// add and one subtract per call; no lock.
final class ClusterCounters: Sendable {
  let activeRequests = Atomic<Int>(0)
  /// Calls waiting for a connection to be made.
  let pendingRequests = Atomic<Int>(0)
  let connections = Atomic<Int>(0)
  /// Calls being sent again because the server never processed them.
  let activeRetries = Atomic<Int>(0)
  init() {}
}

/// The upstream side of one event loop: every cluster's endpoints and the HTTP/2 connections to
/// them. Each event loop has its own, so a call and its upstream stream never change thread and
/// nothing here needs a lock. The server publishes endpoint snapshots to every loop's copy.
final class LoopUpstreams {
  let eventLoop: any EventLoop
  let logger: Logger
  private let events: UpstreamEvents
  private var clusters: [String: ClusterState] = [:]
  /// For RANDOM and LEAST_REQUEST: a cheap generator per loop (no system call per pick).
  private var random = Xorshift(seed: UInt64.random(in: 1...UInt64.max))

  final class ClusterState {
    let config: Cluster
    let counters: ClusterCounters
    /// Where new calls may go.
    var endpoints: [HostAndPort] = []
    var version: UInt64 = 0
    var next = 0
    /// Per endpoint: one connection, more when the server's concurrent stream limit is reached.
    var connections: [HostAndPort: [UpstreamConnection]] = [:]
    /// TLS to the endpoints, when the cluster has a transport socket.
    var tls: UpstreamTLSClient?
    /// Outlier detection as this loop sees it: consecutive failures per endpoint.
    var failures: [HostAndPort: (serverErrors: Int, gatewayFailures: Int)] = [:]

    init(config: Cluster, counters: ClusterCounters) {
      self.config = config
      self.counters = counters
    }
  }

  /// The loop's stats (cluster.<name>.upstream_cx_*, upstream_rq_total, retries).
  let stats: LoopStats
  /// Makes connections' channels in place of sockets (the tests' `EmbeddedChannel`s).
  private let connector: UpstreamConnection.Connector?

  init(
    eventLoop: any EventLoop, clusters: [Cluster], logger: Logger, events: UpstreamEvents = .init(),
    counters: [String: ClusterCounters] = [:], tls: [String: UpstreamTLSClient] = [:], stats: LoopStats = LoopStats(),
    connector: UpstreamConnection.Connector? = nil
  ) {
    self.connector = connector
    self.stats = stats
    self.eventLoop = eventLoop
    self.logger = logger
    self.events = events
    for cluster in clusters {
      let state = ClusterState(config: cluster, counters: counters[cluster.name] ?? ClusterCounters())
      state.tls = tls[cluster.name]
      self.clusters[cluster.name] = state
    }
  }

  /// Replaces a cluster's endpoints. Connections to endpoints that left are closed once their
  /// calls finish (HTTP/2 GOAWAY lets in-flight streams complete); an endpoint that is only
  /// unhealthy keeps its connection for the calls it has.
  func setEndpoints(_ snapshot: ClusterMembership.Snapshot, forCluster name: String) {
    self.eventLoop.preconditionInEventLoop()
    guard let state = self.clusters[name], snapshot.version > state.version else { return }
    state.version = snapshot.version
    state.endpoints = snapshot.usable
    let keep = Set(snapshot.all)
    for (endpoint, connections) in state.connections where !keep.contains(endpoint) {
      state.connections[endpoint] = nil
      for connection in connections { connection.retire() }
    }
  }

  /// Opens an HTTP/2 stream for one call on an endpoint chosen per call by the cluster's
  /// `lb_policy`, so one client connection's calls spread over every endpoint. A connection that
  /// cannot be made carried nothing of the call: it goes to the next endpoint not yet tried.
  func openStream(
    cluster name: String,
    for delegate: any UpstreamStreamDelegate,
    completion: @escaping UpstreamConnection.Completion
  ) {
    self.eventLoop.preconditionInEventLoop()
    guard let state = self.clusters[name], !state.endpoints.isEmpty else {
      if self.clusters[name] != nil { self.stats.count("upstream_cx_none_healthy", cluster: name) }
      completion(.failure(UpstreamUnavailable(reason: "no healthy upstream", noHealthyUpstream: true)))
      return
    }
    // Circuit breaker: a call takes a slot for as long as it lasts (released by callEnded).
    let limits = state.config.circuitBreakers
    let active = state.counters.activeRequests.add(1, ordering: .relaxed).newValue
    if active > limits.maxRequests {
      state.counters.activeRequests.subtract(1, ordering: .relaxed)
      self.stats.count("upstream_rq_pending_overflow", cluster: name)
      completion(.failure(UpstreamUnavailable(
        reason: "overflow: cluster '\(name)' already has \(limits.maxRequests) calls in flight (circuit_breakers max_requests)")))
      return
    }
    let stats = self.stats
    self.attempt(state, for: delegate, tried: [], completion: { result in
      switch result {
      case .failure: state.counters.activeRequests.subtract(1, ordering: .relaxed)
      case .success: stats.names.cluster(name).requestTotal.add()
      }
      completion(result)
    })
  }

  func has(cluster name: String) -> Bool {
    self.clusters[name] != nil
  }

  /// `weighted_clusters`: one cluster, drawn in proportion to the weights.
  func pick(_ clusters: [Route.WeightedCluster]) -> Route.WeightedCluster {
    let total = clusters.reduce(0) { $0 + $1.weight }
    guard total > 0 else { return clusters[0] }
    var draw = Int(self.random.next() % UInt64(total))
    for cluster in clusters {
      if draw < cluster.weight { return cluster }
      draw -= cluster.weight
    }
    return clusters[clusters.count - 1]
  }

  /// A call the server never processed is about to be sent again: allowed while the cluster has
  /// fewer than `max_retries` such calls in progress. Each allowed one ends with `retryEnded`.
  func beginRetry(cluster name: String) -> Bool {
    guard let state = self.clusters[name] else { return false }
    if state.counters.activeRetries.add(1, ordering: .relaxed).newValue > state.config.circuitBreakers.maxRetries {
      state.counters.activeRetries.subtract(1, ordering: .relaxed)
      self.stats.count("upstream_rq_retry_overflow", cluster: name)
      return false
    }
    self.stats.count("upstream_rq_retry", cluster: name)
    return true
  }

  func retryEnded(cluster name: String) {
    self.clusters[name]?.counters.activeRetries.subtract(1, ordering: .relaxed)
  }

  /// A call that got a stream has ended. `status` is what the endpoint answered, as an HTTP
  /// status (gRPC statuses mapped as Envoy maps them), or 503 for a reset or lost connection;
  /// nil when the client went away first, which says nothing of the endpoint.
  func callEnded(cluster name: String, endpoint: HostAndPort, status: Int?) {
    guard let state = self.clusters[name] else { return }
    state.counters.activeRequests.subtract(1, ordering: .relaxed)
    guard let od = state.config.outlierDetection, let status else { return }
    var count = state.failures[endpoint] ?? (0, 0)
    if status >= 500 {
      count.serverErrors += 1
      count.gatewayFailures = (502...504).contains(status) ? count.gatewayFailures + 1 : 0
    } else {
      count = (0, 0)
    }
    if od.consecutive5xx > 0 && count.serverErrors >= od.consecutive5xx {
      self.events.eject(name, endpoint, "\(count.serverErrors) consecutive 5xx (consecutive_5xx)")
      count = (0, 0)
    } else if od.consecutiveGatewayFailure > 0 && count.gatewayFailures >= od.consecutiveGatewayFailure {
      self.events.eject(name, endpoint, "\(count.gatewayFailures) consecutive gateway failures (consecutive_gateway_failure)")
      count = (0, 0)
    }
    state.failures[endpoint] = count == (0, 0) ? nil : count
  }

  private func attempt(
    _ state: ClusterState,
    for delegate: any UpstreamStreamDelegate,
    tried: [HostAndPort],
    completion: @escaping UpstreamConnection.Completion
  ) {
    guard let endpoint = self.pick(state, excluding: tried) else {
      completion(.failure(UpstreamUnavailable(reason: "no healthy upstream", noHealthyUpstream: true)))
      return
    }
    guard let connection = self.connection(to: endpoint, in: state) else {
      completion(.failure(UpstreamUnavailable(reason:
        "overflow: cluster '\(state.config.name)' has its \(state.config.circuitBreakers.maxConnections) connections (circuit_breakers max_connections)")))
      return
    }
    // A call waiting for its connection to be made is pending (circuit_breakers max_pending_requests).
    let pending = !connection.isReady
    if pending {
      let waiting = state.counters.pendingRequests.add(1, ordering: .relaxed).newValue
      if waiting > state.config.circuitBreakers.maxPendingRequests {
        state.counters.pendingRequests.subtract(1, ordering: .relaxed)
        completion(.failure(UpstreamUnavailable(reason:
          "overflow: cluster '\(state.config.name)' already has \(state.config.circuitBreakers.maxPendingRequests) calls waiting for a connection (circuit_breakers max_pending_requests)")))
        return
      }
    }
    connection.openStream(for: delegate) { result in
      if pending { state.counters.pendingRequests.subtract(1, ordering: .relaxed) }
      guard case .failure(let error) = result, error.connectFailure || error.notSent else {
        completion(result)
        return
      }
      if error.connectFailure {
        self.stats.count("upstream_cx_connect_fail", cluster: state.config.name)
        self.events.connectFailed(state.config.name, endpoint)
      }
      let tried = tried + [endpoint]
      if state.endpoints.contains(where: { !tried.contains($0) }) {
        self.attempt(state, for: delegate, tried: tried, completion: completion)
      } else if state.endpoints.isEmpty {
        // The endpoint left while its connection was being made, and no other is left.
        completion(.failure(UpstreamUnavailable(reason: "no healthy upstream", noHealthyUpstream: true)))
      } else {
        completion(result)
      }
    }
  }

  private func pick(_ state: ClusterState, excluding tried: [HostAndPort]) -> HostAndPort? {
    let endpoints = tried.isEmpty ? state.endpoints : state.endpoints.filter { !tried.contains($0) }
    guard !endpoints.isEmpty else { return nil }
    if endpoints.count == 1 { return endpoints[0] }
    switch state.config.loadBalancing {
    case .roundRobin:
      let endpoint = endpoints[state.next % endpoints.count]
      state.next &+= 1
      return endpoint
    case .random:
      return endpoints[Int(self.random.next() % UInt64(endpoints.count))]
    case .leastRequest:
      // Power of two choices: two distinct endpoints at random, the one with fewer calls.
      let count = UInt64(endpoints.count)
      let a = Int(self.random.next() % count)
      let b = (a + 1 + Int(self.random.next() % (count - 1))) % endpoints.count
      let loadA = state.connections[endpoints[a]]?.reduce(0) { $0 + $1.activeStreams } ?? 0
      let loadB = state.connections[endpoints[b]]?.reduce(0) { $0 + $1.activeStreams } ?? 0
      return loadB < loadA ? endpoints[b] : endpoints[a]
    }
  }

  /// A connection to the endpoint with room for one more call: an existing one, else a new one
  /// (the server's SETTINGS_MAX_CONCURRENT_STREAMS reached on all), unless the cluster is at
  /// `max_connections`, where the least busy existing one takes it (NIOHTTP2 holds the stream
  /// until one ends). Nil when there is none and none may be made.
  private func connection(to endpoint: HostAndPort, in state: ClusterState) -> UpstreamConnection? {
    let existing = state.connections[endpoint] ?? []
    if let free = existing.first(where: \.hasCapacity) { return free }
    let limit = state.config.circuitBreakers.maxConnections
    guard state.counters.connections.add(1, ordering: .relaxed).newValue <= limit else {
      state.counters.connections.subtract(1, ordering: .relaxed)
      return existing.filter { !$0.draining }.min { $0.activeStreams < $1.activeStreams }
    }
    let cluster = state.config.name
    let events = self.events
    let counters = state.counters
    let stats = self.stats
    let statPrefix = stats.names.cluster(cluster).prefix
    stats.count(statPrefix + "upstream_cx_total")
    stats.gauge(statPrefix + "upstream_cx_active", by: 1)
    let connection = UpstreamConnection(
      endpoint: endpoint,
      eventLoop: self.eventLoop,
      connectTimeout: state.config.connectTimeout,
      logger: self.logger,
      keepalive: state.config.keepalive,
      tls: state.tls,
      connector: self.connector,
      onConnected: { events.connected(cluster, endpoint) }
    ) { [weak state] closed in
      counters.connections.subtract(1, ordering: .relaxed)
      stats.gauge(statPrefix + "upstream_cx_active", by: -1)
      state?.connections[endpoint]?.removeAll { $0 === closed }
      if state?.connections[endpoint]?.isEmpty == true { state?.connections[endpoint] = nil }
    }
    state.connections[endpoint, default: []].append(connection)
    return connection
  }

  func closeAll() {
    for state in self.clusters.values {
      for connection in state.connections.values.joined() { connection.retire() }
      state.connections.removeAll()
    }
  }
}

/// xorshift64*: fast and good enough to spread calls; not for anything secret.
struct Xorshift {
  private var state: UInt64

  init(seed: UInt64) {
    self.state = seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed
  }

  mutating func next() -> UInt64 {
    self.state ^= self.state >> 12
    self.state ^= self.state << 25
    self.state ^= self.state >> 27
    return self.state &* 0x2545_F491_4F6C_DD1D
  }
}
