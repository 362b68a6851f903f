import GRPCWebCore
import NIOCore

/// A downstream connection that can be drained when the proxy stops.
protocol DrainableConnection: AnyObject {
  /// Take no new calls; close once the calls in progress have ended.
  func startDrain()
  /// The drain time is over: end every call still open with `failure`, then close.
  func endCalls(_ failure: CallFailure)
}

/// The downstream connections of one event loop, all listeners together. Only touched on that
/// loop, so it needs no lock; the server asks each loop in turn when it drains.
final class LoopConnections {
  private var connections: [ObjectIdentifier: any DrainableConnection] = [:]
  private(set) var draining = false
  /// The loop, whose clock times the drain (virtual time in the tests).
  private let eventLoop: any EventLoop
  private var drainDeadline: Scheduled<Void>?

  init(eventLoop: any EventLoop) {
    self.eventLoop = eventLoop
  }

  var count: Int { self.connections.count }

  func add(_ connection: any DrainableConnection) {
    self.connections[ObjectIdentifier(connection)] = connection
    // Accepted just before the listener closed: drain it like the others.
    if self.draining { connection.startDrain() }
  }

  func remove(_ connection: any DrainableConnection) {
    self.connections.removeValue(forKey: ObjectIdentifier(connection))
  }

  func startDrain() {
    guard !self.draining else { return }
    self.draining = true
    for connection in Array(self.connections.values) { connection.startDrain() }
  }

  /// The proxy is stopping: drain every connection, and once `drainTime` has passed on the
  /// loop's clock, end the calls still open with `failure` (a status the client can read).
  /// Returns how many connections were open when the time ran out, through `onDeadline`.
  func drain(within drainTime: TimeAmount, failure: CallFailure, onDeadline: @escaping (Int) -> Void = { _ in }) {
    self.startDrain()
    guard self.drainDeadline == nil else { return }
    self.drainDeadline = self.eventLoop.assumeIsolated().scheduleTask(in: drainTime) {
      let open = self.count
      if open > 0 { onDeadline(open) }
      self.endCalls(failure)
    }
  }

  func endCalls(_ failure: CallFailure) {
    for connection in Array(self.connections.values) { connection.endCalls(failure) }
  }
}
