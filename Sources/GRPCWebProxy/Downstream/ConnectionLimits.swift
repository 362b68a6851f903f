import NIOConcurrencyHelpers
import NIOCore

/// Client connections counted per listener and over all of them, for the `connection_limit`
/// filter's `max_connections` and the overload manager's `global_downstream_max_connections`.
///
/// Taken once when a connection arrives and once when it closes, never per request: the lock
/// is off the call path.
final class ConnectionLimits: Sendable {
  private let global: Int?
  private let counts: NIOLockedValueBox<(total: Int, perListener: [Int: Int])>

  init(global: Int?) {
    self.global = global
    self.counts = NIOLockedValueBox((0, [:]))
  }

  /// Whether a new connection on `listener` may stay; if so it is counted until `release`.
  func admit(listener: Int, limit: Int?) -> Bool {
    self.counts.withLockedValue { counts in
      let current = counts.perListener[listener, default: 0]
      if let global = self.global, counts.total >= global { return false }
      if let limit, current >= limit { return false }
      counts.total += 1
      counts.perListener[listener] = current + 1
      return true
    }
  }

  func release(listener: Int) {
    self.counts.withLockedValue { counts in
      counts.total -= 1
      counts.perListener[listener, default: 1] -= 1
    }
  }
}
