import GRPCWebCore

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

  func endCalls(_ failure: CallFailure) {
    for connection in Array(self.connections.values) { connection.endCalls(failure) }
  }
}
