import Testing

@testable import GRPCWebProxy

/// `connection_limit` per listener and the overload manager's global limit, counted together.
@Suite struct ConnectionLimitsTests {
  @Test func eachListenerHasItsLimitAndAllShareTheGlobalOne() {
    let limits = ConnectionLimits(global: 3)
    #expect(limits.admit(listener: 0, limit: 2))
    #expect(limits.admit(listener: 0, limit: 2))
    #expect(!limits.admit(listener: 0, limit: 2), "listener 0 is at its limit")
    #expect(limits.admit(listener: 1, limit: nil))
    #expect(!limits.admit(listener: 1, limit: nil), "3 in all: the global limit")
    limits.release(listener: 0)
    #expect(!limits.admit(listener: 0, limit: 1), "one left open on listener 0, its limit is 1")
    #expect(limits.admit(listener: 1, limit: nil), "a closed connection frees its place")
  }
}
