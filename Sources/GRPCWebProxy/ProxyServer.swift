import GRPCWebCore
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOPosix
import ProxyConfig
import ProxyFilters
import ServiceLifecycle

/// A listener as bound: with port 0 in the configuration, `port` is the one the system chose.
public struct BoundListener: Sendable, Hashable {
  public var name: String
  public var host: String
  public var port: Int
}

/// Errors at a scope wider than one call: binding listeners.
public struct ProxyError: Error, CustomStringConvertible {
  public var message: String
  public var description: String { self.message }
}

/// The proxy as a service: binds every listener and the admin port, keeps cluster endpoints
/// fresh, and on graceful shutdown drains:
///
/// ```
///   serving ──SIGTERM──▶ draining: /ready 503, listeners closed, GOAWAY / `connection: close`,
///                        calls in progress go on
///           ──all calls ended, or drain time over──▶ calls still open end with grpc-status 14
///           ──▶ connections and upstreams closed, run() returns
/// ```
public final class ProxyServer: Service {
  /// The most a text-mode response frame may hold while it is base64-encoded (Envoy holds any
  /// size; a bound keeps one call from taking the proxy's memory).
  public static let defaultMaxTextFrameSize = 16 * 1024 * 1024

  private let configuration: ProxyConfiguration
  private let group: MultiThreadedEventLoopGroup
  private let logger: Logger
  private let onListening: @Sendable ([BoundListener]) async -> Void
  private let drainTime: Duration
  private let tracing: ProxyTracing
  /// Draining and endpoint health, as the admin port reports them.
  public let status = ProxyStatus()

  /// - Parameters:
  ///   - drainTime: on graceful shutdown, how long calls in progress may go on before those still
  ///     open are ended with `grpc-status: 14`.
  ///   - onListening: called with the bound listeners (the admin port last, named "admin").
  public init(
    configuration: ProxyConfiguration,
    group: MultiThreadedEventLoopGroup,
    logger: Logger,
    drainTime: Duration = .seconds(5),
    tracing: ProxyTracing = .none,
    onListening: @escaping @Sendable ([BoundListener]) async -> Void = { _ in }
  ) {
    self.configuration = configuration
    self.tracing = tracing
    self.group = group
    self.logger = logger
    self.drainTime = drainTime
    self.onListening = onListening
    if let source = configuration.source { self.status.setConfigSource(source) }
  }

  /// Per event loop: the upstream pools, the downstream connections and one runtime per listener.
  private struct LoopState {
    let upstreams: LoopUpstreams
    let connections: LoopConnections
    let stats: LoopStats
    /// Per listener, one runtime per filter chain.
    let listeners: [[ListenerRuntime]]
  }

  public func run() async throws {
    let config = self.configuration
    let logger = self.logger
    var registry: [ObjectIdentifier: NIOLoopBound<LoopState>] = [:]
    let routeTables = config.listeners.map { ([$0] + $0.otherChains).map { RouteTable($0.routeConfig) } }
    let tls = try TLSRuntime(configuration: config, status: self.status, logger: logger)
    let directory = UpstreamDirectory(clusters: config.clusters, status: self.status, logger: logger)
    let events = directory.events
    let counters = directory.counters
    // Access log files are opened before anything listens: one that cannot be written stops
    // the start with its path and the reason.
    let logSinks = Set(config.listeners.flatMap { ([$0] + $0.otherChains).flatMap { $0.accessLogs.map(\.sink) } }
      + (config.admin?.accessLogs.map(\.sink) ?? []))
    let logFiles = logSinks.isEmpty ? nil : try AccessLogFiles(sinks: logSinks)
    let tracing = self.tracing
    defer { logFiles?.shutdown() }
    for loop in self.group.makeIterator() {
      let status = self.status
      let state = try await loop.submit {
        let stats = LoopStats()
        status.register(NIOLoopBound(stats, eventLoop: loop))
        let upstreams = LoopUpstreams(eventLoop: loop, clusters: config.clusters, logger: logger, events: events, counters: counters,
          tls: tls.upstream, stats: stats)
        directory.register(NIOLoopBound(upstreams, eventLoop: loop))
        let connections = LoopConnections(eventLoop: loop)
        let listeners = zip(config.listeners, routeTables).map { listener, tables in
          zip([listener] + listener.otherChains, tables).map {
            let runtime = ListenerRuntime(listener: $0, routes: $1, upstreams: upstreams, connections: connections, logger: logger,
              maxTextFrameSize: Self.defaultMaxTextFrameSize, stats: stats)
            if let logFiles, !$0.accessLogs.isEmpty {
              runtime.accessLog = LoopAccessLog(configs: $0.accessLogs, files: logFiles, eventLoop: loop)
            }
            runtime.tracer = tracing.tracer(for: $0)
            return runtime
          }
        }
        return NIOLoopBound(LoopState(upstreams: upstreams, connections: connections, stats: stats, listeners: listeners), eventLoop: loop)
      }.get()
      registry[ObjectIdentifier(loop)] = state
    }
    let loops = registry
    let limits = ConnectionLimits(global: config.maxDownstreamConnections)

    let threadPool = NIOThreadPool(numberOfThreads: 1)
    threadPool.start()
    defer { threadPool.shutdownGracefully { _ in } }
    let discovery = Discovery(clusters: config.clusters, threadPool: threadPool, logger: logger)
    let firstLoop = self.group.next()
    let initial = await discovery.resolveAll(on: firstLoop)
    for cluster in config.clusters {
      let endpoints = initial[cluster.name] ?? []
      logger.info("cluster '\(cluster.name)': \(endpoints.isEmpty ? "no endpoints yet" : endpoints.map(\.description).joined(separator: ", "))")
      directory.discovered(endpoints, cluster: cluster.name)
    }

    var channels: [any Channel] = []
    var bound: [BoundListener] = []
    do {
      for (index, listener) in config.listeners.enumerated() {
        let channel = try await self.bind(listener, index: index, loops: loops, tls: tls.listeners[index], limits: limits)
        channels.append(channel)
        let port = channel.localAddress?.port ?? listener.address.port
        bound.append(BoundListener(name: listener.name, host: listener.address.host, port: port))
        logger.info("listener '\(listener.name)' on \(listener.address.host):\(port) (\(listener.codec.rawValue.lowercased())\(listener.tls == nil ? "" : ", TLS"))")
      }
      if let address = config.admin?.address {
        let channel = try await self.bindAdmin(address, accessLogs: config.admin?.accessLogs ?? [], files: logFiles)
        channels.append(channel)
        let port = channel.localAddress?.port ?? address.port
        bound.append(BoundListener(name: "admin", host: address.host, port: port))
        logger.info("admin on \(address.host):\(port) (GET /ready, /clusters, /stats, /stats/prometheus)")
      }
    } catch {
      for channel in channels { try? await channel.close() }
      throw error
    }
    // The admin port's /drain_listeners: stop accepting (and, graceful, drain the connections:
    // GOAWAY, `connection: close`); the process and its admin port carry on.
    let listenerChannels = Array(channels.dropLast(config.admin?.address == nil ? 0 : 1))
    let status = self.status
    self.status.setDrainListeners { graceful in
      status.setDraining()
      logger.info("admin /drain_listeners\(graceful ? "?graceful" : ""): listeners closed")
      for channel in listenerChannels { channel.close(promise: nil) }
      guard graceful else { return }
      for (_, state) in loops {
        state.eventLoop.execute { state.value.connections.startDrain() }
      }
    }
    await self.onListening(bound)

    try? await withThrowingDiscardingTaskGroup { group in
      for cluster in config.clusters where cluster.type != .staticAddresses {
        group.addTask {
          await Self.keepResolving(cluster, initial: initial[cluster.name] ?? [], discovery: discovery, directory: directory,
            on: firstLoop, logger: logger, clock: ContinuousClock())
        }
      }
      for cluster in config.clusters {
        guard let check = cluster.healthCheck, let membership = directory.memberships[cluster.name] else { continue }
        let checker = HealthChecker(cluster: cluster, check: check, eventLoop: firstLoop, logger: logger, tls: tls.upstream[cluster.name])
        group.addTask {
          await checker.run(clock: ContinuousClock(), endpoints: { membership.snapshot.all }) { endpoint, passed, detail in
            directory.healthCheck(endpoint, cluster: cluster.name, passed: passed, detail: detail)
          }
        }
      }
      if !tls.contexts.isEmpty {
        group.addTask { await tls.watchFiles(clock: ContinuousClock()) }
      }
      group.addTask { await directory.keepReadmitting(clock: ContinuousClock()) }
      try await gracefulShutdown()
      group.cancelAll()
    }

    // Draining. The admin port stays open (it is the last channel) so /ready can say so.
    self.status.setDraining()
    logger.info("draining: /ready is 503, listeners closed; calls in progress get up to \(self.drainTime)")
    for channel in channels.dropLast(config.admin?.address == nil ? 0 : 1) { try? await channel.close() }
    // Each loop drains its connections and, at the drain time on its own clock, ends the calls
    // still open with a status the client can read (LoopConnections.drain). This waits until
    // the connections are gone, one second longer at most for those last statuses.
    let drainTime = TimeAmount.nanoseconds(
      self.drainTime.components.seconds * 1_000_000_000 + self.drainTime.components.attoseconds / 1_000_000_000)
    for (_, state) in loops {
      try? await state.eventLoop.submit {
        state.value.connections.drain(within: drainTime, failure: .shuttingDown) { open in
          logger.info("drain time over: ending the calls still open on \(open) connections with grpc-status 14")
        }
      }.get()
    }
    let clock = ContinuousClock()
    var deadline = clock.now.advanced(by: self.drainTime + .seconds(1))
    var open = await Self.openConnections(loops)
    var endedEarly = false
    while open > 0, clock.now < deadline {
      if Task.isCancelled && !endedEarly {
        // A second signal: skip the wait, but still end each call with a status.
        endedEarly = true
        for (_, state) in loops {
          try? await state.eventLoop.submit { state.value.connections.endCalls(.shuttingDown) }.get()
        }
        deadline = min(deadline, clock.now.advanced(by: .seconds(1)))
      }
      try? await Task.sleep(for: .milliseconds(20))
      open = await Self.openConnections(loops)
    }
    logger.info("stopped")
    for channel in channels { try? await channel.close() }
    for (_, state) in loops {
      try? await state.eventLoop.submit { for runtimes in state.value.listeners { for r in runtimes { r.accessLog?.flushAll() } } }.get()
    }
    for (_, state) in loops {
      try? await state.eventLoop.submit { state.value.upstreams.closeAll() }.get()
    }
  }

  private static func openConnections(_ loops: [ObjectIdentifier: NIOLoopBound<LoopState>]) async -> Int {
    var total = 0
    for (_, state) in loops {
      total += (try? await state.eventLoop.submit { state.value.connections.count }.get()) ?? 0
    }
    return total
  }

  /// A DNS cluster's refresh loop, on `clock`: looks up when `DNSRefreshSchedule` says, or at
  /// once when a connection to one of its endpoints failed, and publishes what it decides.
  static func keepResolving<C: Clock>(
    _ cluster: Cluster, initial: [HostAndPort], discovery: Discovery, directory: UpstreamDirectory,
    on loop: any EventLoop, logger: Logger, clock: C
  ) async where C.Duration == Duration {
    var schedule = DNSRefreshSchedule(cluster: cluster, initial: initial)
    while !Task.isCancelled {
      let due = clock.now.advanced(by: schedule.wait)
      while clock.now < due, !directory.takeResolveRequest(cluster.name) {
        do { try await clock.sleep(for: .milliseconds(50)) } catch { return }
      }
      let outcome = await discovery.resolve(cluster, on: loop)
      switch outcome {
      case .endpoints: directory.count("update_success", cluster: cluster.name)
      case .empty: directory.count("update_empty", cluster: cluster.name)
      case .failure: directory.count("update_failure", cluster: cluster.name)
      }
      switch schedule.answer(outcome) {
      case .changed(let change):
        logger.info("cluster '\(cluster.name)': \(change)")
        directory.discovered(schedule.endpoints, cluster: cluster.name)
      case .unchanged:
        break
      case .emptyOnce(let kept):
        logger.warning("cluster '\(cluster.name)': DNS returned no addresses; keeping \(kept) known endpoints until the next lookup says the same")
      case .emptied:
        logger.warning("cluster '\(cluster.name)': DNS has no addresses, twice in a row: the cluster is empty")
        directory.discovered([], cluster: cluster.name)
      case .failed(let reason, let kept):
        logger.warning("cluster '\(cluster.name)': DNS lookup failed (\(reason)); keeping \(kept) known endpoints")
      }
    }
  }

  private func bind(
    _ listener: Listener, index: Int, loops: [ObjectIdentifier: NIOLoopBound<LoopState>], tls: TLSListener?,
    limits: ConnectionLimits
  ) async throws -> any Channel {
    let maxConnections = listener.maxConnections
    let status = self.status
    let bootstrap = ServerBootstrap(group: self.group)
      .serverChannelOption(.backlog, value: 1024)
      .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
      .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
      // One read per wake-up, then the writes it caused are flushed before the next: NIOHTTP2
      // appends each read to what is left of the previous one, and while that read's DATA is
      // still queued for the other side, the shared buffer is copied whole before the append
      // (measured: 41 % of the instructions of a 1 MiB call, down to 28 %; `scripts/count-per-call`).
      .childChannelOption(.maxMessagesPerRead, value: 1)
      // per_connection_buffer_limit_bytes is also Envoy's high watermark of a connection's write
      // buffer. NIO's default (64 KiB) made a streamed response flip the socket's writability,
      // and NIOHTTP2 re-run its queues, several times per read.
      .childChannelOption(.writeBufferWaterMark, value: .init(low: listener.bufferLimit / 2, high: max(1, listener.bufferLimit)))
      .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 16 * 1024, maximum: 256 * 1024))
      .childChannelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
          guard let state = loops[ObjectIdentifier(channel.eventLoop)] else {
            throw ProxyError(message: "connection on an unknown event loop")
          }
          let runtimes = state.value.listeners[index]
          guard limits.admit(listener: index, limit: maxConnections) else {
            // Closed as it arrives, before a byte is read: the limit bounds what clients can hold.
            status.count("listener.\(listener.name).downstream_cx_overflow")
            throw ProxyError(message: "listener '\(listener.name)': connection limit reached")
          }
          channel.closeFuture.whenComplete { _ in limits.release(listener: index) }
          let stats = state.value.stats
          let names = runtimes[0].statNames
          stats.connectionOpened(names)
          channel.closeFuture.assumeIsolated().whenComplete { _ in stats.connectionClosed(names) }
          try Pipelines.downstream(channel, runtimes: runtimes, tls: tls, stats: stats)
        }
      }
    do {
      return try await bootstrap.bind(host: listener.address.host, port: listener.address.port).get()
    } catch {
      throw ProxyError(message: "listener '\(listener.name)': cannot listen on \(listener.address): \(error)")
    }
  }

  private func bindAdmin(_ address: HostAndPort, accessLogs: [AccessLogConfig], files: AccessLogFiles?) async throws -> any Channel {
    let status = self.status
    let log = files.map { AdminAccessLog(formatters: accessLogs.map(AccessLogFormatter.init), files: $0) }
    let bootstrap = ServerBootstrap(group: self.group)
      .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
      .childChannelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
          try Pipelines.admin(channel, status: status, accessLog: log)
        }
      }
    do {
      return try await bootstrap.bind(host: address.host, port: address.port).get()
    } catch {
      throw ProxyError(message: "admin: cannot listen on \(address): \(error)")
    }
  }
}
