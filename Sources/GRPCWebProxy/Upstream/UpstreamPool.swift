import GRPCWebCore
import Logging
import NIOCore
import NIOHTTP2
import NIOPosix
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
      connection.drain()
    }
  }

  func endpoints(ofCluster name: String) -> [HostAndPort] {
    self.clusters[name]?.endpoints ?? []
  }

  /// Opens an HTTP/2 stream for one call on the next endpoint of the cluster, round-robin per
  /// call: one client connection's calls spread over every endpoint.
  func openStream(
    cluster name: String,
    initializer: @escaping (any Channel) throws -> Void,
    completion: @escaping (Result<any Channel, UpstreamUnavailable>) -> Void
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
    connection.openStream(initializer: initializer, completion: completion)
  }

  func closeAll() {
    for state in self.clusters.values {
      for connection in state.connections.values { connection.drain() }
      state.connections.removeAll()
    }
  }
}

/// One HTTP/2 connection to one upstream endpoint.
///
/// States: `idle → connecting(waiters) → ready(channel, multiplexer) → closed`. Calls that
/// arrive while connecting wait in order; a failed connect fails them all with Envoy's
/// "connection failure" reason, and the pool forgets the connection so the next call dials again.
final class UpstreamConnection {
  typealias Waiter = (initializer: (any Channel) throws -> Void, completion: (Result<any Channel, UpstreamUnavailable>) -> Void)

  private enum State {
    case idle
    case connecting([Waiter])
    case ready(any Channel, NIOHTTP2Handler.StreamMultiplexer)
    case closed
  }

  let endpoint: HostAndPort
  private let eventLoop: any EventLoop
  private let connectTimeout: ProxyDuration
  private let logger: Logger
  private let onClose: (UpstreamConnection) -> Void
  private var state: State = .idle
  private var activeStreams = 0
  private var draining = false

  init(
    endpoint: HostAndPort,
    eventLoop: any EventLoop,
    connectTimeout: ProxyDuration,
    logger: Logger,
    onClose: @escaping (UpstreamConnection) -> Void
  ) {
    self.endpoint = endpoint
    self.eventLoop = eventLoop
    self.connectTimeout = connectTimeout
    self.logger = logger
    self.onClose = onClose
  }

  /// Dials the endpoint; called once, on the first call, with the state already `connecting`.
  private func startConnecting() {
    let address: SocketAddress
    do {
      address = try SocketAddress(ipAddress: self.endpoint.host, port: self.endpoint.port)
    } catch {
      self.failed(reason: "connection failure, transport failure reason: bad address \(self.endpoint)")
      return
    }
    let timeout = TimeAmount.nanoseconds(max(self.connectTimeout.nanoseconds, 1_000_000))
    let future = ClientBootstrap(group: self.eventLoop)
      .connectTimeout(timeout)
      .channelOption(.socketOption(.tcp_nodelay), value: 1)
      .channelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
          var connection = NIOHTTP2Handler.ConnectionConfiguration()
          connection.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: 1000),
            HTTP2Setting(parameter: .initialWindowSize, value: 1 << 20),
            HTTP2Setting(parameter: .maxHeaderListSize, value: 1 << 16),
          ]
          connection.targetWindowSize = 8 << 20
          var stream = NIOHTTP2Handler.StreamConfiguration()
          stream.targetWindowSize = 1 << 20
          _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
            mode: .client,
            connectionConfiguration: connection,
            streamConfiguration: stream
          ) { inbound in
            // Servers do not open streams toward a client here (no push).
            inbound.close(promise: nil)
            return inbound.eventLoop.makeSucceededVoidFuture()
          }
        }
      }
      .connect(to: address)
    future.assumeIsolated().whenComplete { result in
      switch result {
      case .success(let channel):
        self.connected(channel)
      case .failure(let error):
        self.failed(reason: "connection failure, transport failure reason: \(Self.describe(error))")
      }
    }
  }

  private func connected(_ channel: any Channel) {
    let multiplexer: NIOHTTP2Handler.StreamMultiplexer
    do {
      multiplexer = try channel.pipeline.syncOperations.handler(type: NIOHTTP2Handler.self).syncMultiplexer()
    } catch {
      channel.close(promise: nil)
      self.failed(reason: "connection failure")
      return
    }
    guard case .connecting(let waiters) = self.state else {
      channel.close(promise: nil)
      return
    }
    self.logger.debug("upstream connected", metadata: ["endpoint": "\(self.endpoint)"])
    self.state = .ready(channel, multiplexer)
    channel.closeFuture.assumeIsolated().whenComplete { _ in
      self.state = .closed
      self.onClose(self)
    }
    for waiter in waiters {
      self.createStream(multiplexer, waiter.initializer, waiter.completion)
    }
  }

  private func failed(reason: String) {
    guard case .connecting(let waiters) = self.state else { return }
    self.logger.info("upstream connect failed", metadata: ["endpoint": "\(self.endpoint)", "reason": "\(reason)"])
    self.state = .closed
    self.onClose(self)
    for waiter in waiters {
      waiter.completion(.failure(UpstreamUnavailable(reason: reason)))
    }
  }

  func openStream(
    initializer: @escaping (any Channel) throws -> Void,
    completion: @escaping (Result<any Channel, UpstreamUnavailable>) -> Void
  ) {
    switch self.state {
    case .idle:
      self.state = .connecting([(initializer, completion)])
      self.startConnecting()
    case .connecting(var waiters):
      self.state = .closed  // avoid a copy of the array while appending
      waiters.append((initializer, completion))
      self.state = .connecting(waiters)
    case .ready(_, let multiplexer):
      self.createStream(multiplexer, initializer, completion)
    case .closed:
      completion(.failure(UpstreamUnavailable(reason: "connection termination")))
    }
  }

  private func createStream(
    _ multiplexer: NIOHTTP2Handler.StreamMultiplexer,
    _ initializer: @escaping (any Channel) throws -> Void,
    _ completion: @escaping (Result<any Channel, UpstreamUnavailable>) -> Void
  ) {
    let bound = NIOLoopBound(initializer, eventLoop: self.eventLoop)
    let future = multiplexer.createStreamChannel { channel in
      channel.eventLoop.makeCompletedFuture { try bound.value(channel) }
    }
    future.assumeIsolated().whenComplete { result in
      switch result {
      case .success(let channel):
        self.activeStreams += 1
        channel.closeFuture.assumeIsolated().whenComplete { _ in
          self.activeStreams -= 1
          if self.draining && self.activeStreams == 0 { self.closeNow() }
        }
        completion(.success(channel))
      case .failure: completion(.failure(UpstreamUnavailable(reason: "connection termination")))
      }
    }
  }

  /// Stops new calls; the connection closes when its streams are done.
  func drain() {
    switch self.state {
    case .ready(let channel, _):
      // The pool has forgotten this connection, so no new call comes; the calls in flight finish.
      self.draining = true
      if self.activeStreams == 0 { channel.close(promise: nil) }
    case .connecting(let waiters):
      self.state = .closed
      for waiter in waiters { waiter.completion(.failure(UpstreamUnavailable(reason: "connection termination"))) }
    case .idle, .closed:
      self.state = .closed
    }
  }

  private func closeNow() {
    if case .ready(let channel, _) = self.state { channel.close(promise: nil) }
  }

  private static func describe(_ error: any Error) -> String {
    if let io = error as? IOError { return "delayed connect error: \(io.errnoCode)" }
    if error is ChannelError { return "\(error)" }
    return "\(error)"
  }
}
