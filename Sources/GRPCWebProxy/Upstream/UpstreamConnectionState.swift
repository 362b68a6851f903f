/// The lifecycle of one upstream connection, without its channel or clock: which call may open a
/// stream now, which must wait for the connection, which go elsewhere, and when the connection
/// connects, closes or leaves its pool. `UpstreamConnection` feeds it events and performs the
/// actions it returns; the tests drive it with plain values.
///
///     idle ─open─▶ connecting(waiters) ─connected─▶ ready ─retire / GOAWAY─▶ draining ─▶ closed
///                      │ failed, retired, or lost                      (no stream left: close)
///                      └──────────────────────────────▶ closed ◀── channel lost, from any state
///
/// `Waiter` is what a call leaves while the connection is being made (the connection's is the
/// call's delegate and completion).
struct UpstreamConnectionState<Waiter> {
  enum State {
    case idle
    case connecting([Waiter])
    case ready
    /// Takes no new stream; closes once the streams in flight are done.
    case draining
    case closed
  }

  private(set) var state: State = .idle
  /// Whether the pool has been told to forget this connection (once, whatever the cause).
  private var forgotten = false

  enum OpenAction {
    /// The first call: start connecting; the call waits.
    case connect
    /// Connecting already: the call waits.
    case wait
    /// Ready: give the call a stream now.
    case register(Waiter)
    /// Draining or closed: the call must go to another connection (nothing was sent).
    case refuse(Waiter)
  }

  mutating func open(_ waiter: Waiter) -> OpenAction {
    switch self.state {
    case .idle:
      self.state = .connecting([waiter])
      return .connect
    case .connecting(var waiters):
      self.state = .closed  // not to copy the array while appending
      waiters.append(waiter)
      self.state = .connecting(waiters)
      return .wait
    case .ready:
      return .register(waiter)
    case .draining, .closed:
      return .refuse(waiter)
    }
  }

  enum ConnectedAction {
    /// Give each waiting call its stream.
    case register([Waiter])
    /// The connection was given up while it was being made: close it.
    case close
    case none
  }

  mutating func connected() -> ConnectedAction {
    switch self.state {
    case .connecting(let waiters):
      self.state = .ready
      return .register(waiters)
    case .ready, .draining:
      return .none
    case .idle, .closed:
      return .close
    }
  }

  /// The connection could not be made, or was lost before it was ready.
  struct FailedAction {
    /// Tell the pool to forget this connection.
    var forget: Bool
    /// Calls that waited for it: they fail as connect failures.
    var waiters: [Waiter]
  }

  mutating func connectFailed() -> FailedAction? {
    guard case .connecting(let waiters) = self.state else { return nil }
    self.state = .closed
    return FailedAction(forget: self.forget(), waiters: waiters)
  }

  enum RetireAction {
    /// Now in `draining`; close the channel if no stream is left.
    case drain(forget: Bool)
    /// It was being made: fail its waiters (nothing was sent), and close when it connects.
    case failWaiters([Waiter], forget: Bool)
    case none(forget: Bool)
  }

  /// No new calls from now on (endpoint removed, GOAWAY, stream IDs spent, a connection error).
  mutating func retire() -> RetireAction {
    let forget = self.forget()
    switch self.state {
    case .connecting(let waiters):
      self.state = .closed
      return .failWaiters(waiters, forget: forget)
    case .ready:
      self.state = .draining
      return .drain(forget: forget)
    case .idle:
      self.state = .closed
      return .none(forget: forget)
    case .draining, .closed:
      return .none(forget: forget)
    }
  }

  /// The last stream ended: whether to close the channel now.
  func shouldClose(streamsLeft: Int) -> Bool {
    if case .draining = self.state { return streamsLeft == 0 }
    return false
  }

  enum ClosedAction {
    /// Lost while connecting: as a failed connect.
    case connectFailed(FailedAction)
    /// Lost when ready or draining: the streams in flight end, and the pool forgets it.
    case endStreams(forget: Bool)
  }

  mutating func channelClosed() -> ClosedAction {
    if let failed = self.connectFailed() { return .connectFailed(failed) }
    self.state = .closed
    return .endStreams(forget: self.forget())
  }

  /// Whether another call fits, with `active` streams open or waiting and the server's limit.
  func hasCapacity(active: Int, peerMaxStreams: Int) -> Bool {
    switch self.state {
    case .idle: return true
    case .connecting, .ready: return active < peerMaxStreams
    case .draining, .closed: return false
    }
  }

  var waiting: Int {
    if case .connecting(let waiters) = self.state { return waiters.count }
    return 0
  }

  var isConnecting: Bool {
    if case .connecting = self.state { return true }
    return false
  }

  var isReady: Bool {
    if case .ready = self.state { return true }
    return false
  }

  /// Ready or draining: frames may still be written.
  var isOpen: Bool {
    switch self.state {
    case .ready, .draining: return true
    default: return false
    }
  }

  var isDraining: Bool {
    switch self.state {
    case .draining: return true
    case .closed: return self.forgotten
    default: return false
    }
  }

  private mutating func forget() -> Bool {
    defer { self.forgotten = true }
    return !self.forgotten
  }
}
