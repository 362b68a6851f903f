import Logging
import NIOCore
import NIOHPACK
import NIOHTTP2
import ProxyConfig
import NIOConcurrencyHelpers

/// Active `grpc.health.v1` checks of one cluster's endpoints (Envoy's `grpc_health_check`): each
/// endpoint every `interval`, a new one at once, over a connection of the checker's own that is
/// kept between checks, as Envoy's is.
final class HealthChecker: Sendable {
  private let cluster: Cluster
  private let tls: UpstreamTLSClient?
  private let check: Cluster.HealthCheck
  private let eventLoop: any EventLoop
  private let logger: Logger
  /// Made off the loop, filled on it.
  private let box: NIOLoopBoundBox<Connections?>

  private final class Connections {
    var byEndpoint: [HostAndPort: UpstreamConnection] = [:]
  }

  init(cluster: Cluster, check: Cluster.HealthCheck, eventLoop: any EventLoop, logger: Logger, tls: UpstreamTLSClient? = nil) {
    self.tls = tls
    self.cluster = cluster
    self.check = check
    self.eventLoop = eventLoop
    self.logger = logger
    self.box = .makeEmptyBox(valueType: Connections.self, eventLoop: eventLoop)
  }

  /// Checks until cancelled, on `clock` (`HealthCheckSchedule` says when). `report` gets each
  /// result: endpoint, passed, and what was wrong. Endpoints are read again every `poll`, so a
  /// new one is checked within that time.
  func run<C: Clock>(
    clock: C, poll: Duration = .milliseconds(50),
    endpoints: @escaping @Sendable () -> [HostAndPort],
    report: @escaping @Sendable (HostAndPort, Bool, String) -> Void
  ) async where C.Duration == Duration {
    let interval = Duration.nanoseconds(max(self.check.interval.nanoseconds, 10_000_000))
    let schedule = NIOLockedValueBox(HealthCheckSchedule<C.Instant>(interval: interval))
    await withDiscardingTaskGroup { group in
      while !Task.isCancelled {
        let now = clock.now
        let step = schedule.withLockedValue { $0.endpoints(endpoints(), now: now) }
        for endpoint in step.check {
          group.addTask {
            let (passed, detail) = await self.checkOnce(endpoint)
            if schedule.withLockedValue({ $0.checked(endpoint, now: clock.now) }) { report(endpoint, passed, detail) }
          }
        }
        if !step.forget.isEmpty {
          self.eventLoop.execute { self.forget(step.forget) }
        }
        let polled = now.advanced(by: poll)
        let wake = min(schedule.withLockedValue { $0.nextDue } ?? polled, polled)
        do { try await clock.sleep(until: wake, tolerance: nil) } catch { break }
      }
      self.eventLoop.execute { self.forget(Set(self.connections.byEndpoint.keys)) }
    }
  }

  func checkOnce(_ endpoint: HostAndPort) async -> (Bool, String) {
    let promise = self.eventLoop.makePromise(of: (Bool, String).self)
    self.eventLoop.execute { self.start(endpoint, promise: promise) }
    return (try? await promise.futureResult.get()) ?? (false, "no result")
  }

  /// On the loop.
  private var connections: Connections {
    if let connections = self.box.value { return connections }
    let connections = Connections()
    self.box.value = connections
    return connections
  }

  private func forget(_ endpoints: Set<HostAndPort>) {
    for endpoint in endpoints {
      self.connections.byEndpoint.removeValue(forKey: endpoint)?.retire()
    }
  }

  private func start(_ endpoint: HostAndPort, promise: EventLoopPromise<(Bool, String)>) {
    let connections = self.connections
    let connection: UpstreamConnection
    if let existing = connections.byEndpoint[endpoint] {
      connection = existing
    } else {
      connection = UpstreamConnection(
        endpoint: endpoint, eventLoop: self.eventLoop, connectTimeout: self.check.timeout, logger: self.logger, tls: self.tls
      ) { closed in
        if connections.byEndpoint[endpoint] === closed { connections.byEndpoint[endpoint] = nil }
      }
      connections.byEndpoint[endpoint] = connection
    }
    let call = HealthCheckCall(promise: promise)
    let timeout = TimeAmount.nanoseconds(max(self.check.timeout.nanoseconds, 1_000_000))
    let timer = self.eventLoop.assumeIsolated().scheduleTask(in: timeout) {
      call.stream?.cancel()
      call.finish(false, "no answer within \(self.check.timeout)")
    }
    promise.futureResult.assumeIsolated().whenComplete { _ in timer.cancel() }
    connection.openStream(for: call) { result in
      switch result {
      case .failure(let error):
        call.finish(false, error.reason)
      case .success(let stream):
        call.stream = stream
        var headers = HPACKHeaders()
        headers.add(name: ":method", value: "POST")
        headers.add(name: ":scheme", value: "http")
        headers.add(name: ":path", value: "/grpc.health.v1.Health/Check")
        headers.add(name: ":authority", value: self.check.authority ?? self.cluster.name)
        headers.add(name: "content-type", value: "application/grpc")
        headers.add(name: "te", value: "trailers")
        headers.add(name: "grpc-timeout", value: "\(max(self.check.timeout.milliseconds, 1))m")
        stream.write(.headers(.init(headers: headers)))
        stream.write(.data(.init(data: .byteBuffer(Self.request(service: self.check.serviceName)), endStream: true)))
      }
    }
  }

  /// A length-prefixed `HealthCheckRequest { string service = 1; }`.
  static func request(service: String) -> ByteBuffer {
    let name = Array(service.utf8)
    var message: [UInt8] = []
    if !name.isEmpty {
      message.append(0x0A)
      var length = name.count
      while length >= 0x80 {
        message.append(UInt8(length & 0x7F) | 0x80)
        length >>= 7
      }
      message.append(UInt8(length))
      message += name
    }
    var buffer = ByteBuffer()
    buffer.writeInteger(UInt8(0))
    buffer.writeInteger(UInt32(message.count))
    buffer.writeBytes(message)
    return buffer
  }
}

/// One check's stream: passes when grpc-status is 0 and the answer says SERVING.
final class HealthCheckCall: UpstreamStreamDelegate {
  var stream: UpstreamStream?
  private let promise: EventLoopPromise<(Bool, String)>
  private var body = ByteBuffer()
  private var done = false

  init(promise: EventLoopPromise<(Bool, String)>) {
    self.promise = promise
  }

  func finish(_ passed: Bool, _ detail: String) {
    guard !self.done else { return }
    self.done = true
    self.promise.succeed((passed, detail))
  }

  func upstreamHeaders(_ headers: HPACKHeaders, endStream: Bool) {
    if let status = headers.first(name: "grpc-status") {
      guard status == "0" else {
        self.finish(false, "grpc-status \(status)" + (headers.first(name: "grpc-message").map { ": \($0)" } ?? ""))
        self.stream?.release()
        return
      }
      self.evaluate()
    } else if let code = headers.first(name: ":status"), code != "200" {
      self.finish(false, "HTTP status \(code)")
    } else if endStream {
      self.finish(false, "no grpc-status")
    }
    if endStream { self.stream?.release() }
  }

  func upstreamData(_ data: ByteBuffer, endStream: Bool) {
    var data = data
    self.body.writeBuffer(&data)
    if endStream {
      self.finish(false, "no grpc-status")
      self.stream?.release()
    }
  }

  func upstreamClosed(reason: String, unprocessed: Bool) {
    self.finish(false, reason)
  }

  private func evaluate() {
    // The message after its 5-byte prefix; status is field 1, a varint (SERVING = 1).
    var body = self.body
    guard body.readableBytes >= 5, body.readInteger(as: UInt8.self) == 0, let length = body.readInteger(as: UInt32.self),
      let message = body.readBytes(length: Int(length))
    else {
      self.finish(false, "no health check response")
      return
    }
    var status: UInt64 = 0
    var i = 0
    while i < message.count {
      let tag = message[i]
      i += 1
      guard tag & 0x07 == 0 else { break }
      var value: UInt64 = 0
      var shift: UInt64 = 0
      while i < message.count {
        let byte = message[i]
        i += 1
        value |= UInt64(byte & 0x7F) << shift
        shift += 7
        if byte & 0x80 == 0 { break }
      }
      if tag >> 3 == 1 { status = value }
    }
    switch status {
    case 1: self.finish(true, "SERVING")
    case 2: self.finish(false, "NOT_SERVING")
    case 3: self.finish(false, "SERVICE_UNKNOWN")
    default: self.finish(false, "status \(status)")
    }
  }
}
