import GRPCWebCore
import Logging
import NIOCore
import ProxyConfig

/// Why an upstream stream could not be had.
struct UpstreamUnavailable: Error {
  /// The text that follows Envoy's "reset reason:" (`connection failure`, …) or a full message.
  var reason: String
  /// Whether there was no endpoint at all (Envoy's "no healthy upstream", not a reset).
  var noHealthyUpstream: Bool = false
}

/// The upstream side of one event loop: every cluster's endpoints and the HTTP/2 connections to
/// them. Each event loop has its own, so a call and its upstream stream never change thread and
/// nothing here needs a lock. Discovery publishes endpoint sets to every loop's copy.
final class LoopUpstreams {
  let eventLoop: any EventLoop
  let logger: Logger
  private var clusters: [String: ClusterState] = [:]

  final class ClusterState {
    let config: Cluster
    var endpoints: [HostAndPort] = []
    var next = 0
    var connections: [HostAndPort: UpstreamConnection] = [:]

    init(config: Cluster) {
      self.config = config
    }
  }

  init(eventLoop: any EventLoop, clusters: [Cluster], logger: Logger) {
    self.eventLoop = eventLoop
    self.logger = logger
    for cluster in clusters {
      self.clusters[cluster.name] = ClusterState(config: cluster)
    }
  }

  /// Replaces a cluster's endpoints. Connections to endpoints that left are closed once their
  /// calls finish (HTTP/2 GOAWAY lets in-flight streams complete).
  func setEndpoints(_ endpoints: [HostAndPort], forCluster name: String) {
    self.eventLoop.preconditionInEventLoop()
    guard let state = self.clusters[name] else { return }
    state.endpoints = endpoints
    let keep = Set(endpoints)
    for (endpoint, connection) in state.connections where !keep.contains(endpoint) {
      state.connections[endpoint] = nil
      connection.retire()
    }
  }

  /// Opens an HTTP/2 stream for one call on the next endpoint of the cluster, round-robin per
  /// call: one client connection's calls spread over every endpoint.
  func openStream(
    cluster name: String,
    for delegate: any UpstreamStreamDelegate,
    completion: @escaping UpstreamConnection.Completion
  ) {
    self.eventLoop.preconditionInEventLoop()
    guard let state = self.clusters[name], !state.endpoints.isEmpty else {
      completion(.failure(UpstreamUnavailable(reason: "no healthy upstream", noHealthyUpstream: true)))
      return
    }
    let endpoint = state.endpoints[state.next % state.endpoints.count]
    state.next &+= 1
    let connection: UpstreamConnection
    if let existing = state.connections[endpoint] {
      connection = existing
    } else {
      connection = UpstreamConnection(
        endpoint: endpoint,
        eventLoop: self.eventLoop,
        connectTimeout: state.config.connectTimeout,
        logger: self.logger
      ) { [weak state] closed in
        if state?.connections[endpoint] === closed { state?.connections[endpoint] = nil }
      }
      state.connections[endpoint] = connection
    }
    connection.openStream(for: delegate, completion: completion)
  }

  func closeAll() {
    for state in self.clusters.values {
      for connection in state.connections.values { connection.retire() }
      state.connections.removeAll()
    }
  }
}

