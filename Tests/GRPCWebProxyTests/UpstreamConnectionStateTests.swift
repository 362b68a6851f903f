import Testing

@testable import GRPCWebProxy

/// The upstream connection's lifecycle, driven event by event with plain values for the calls.
@Suite struct UpstreamConnectionStateTests {
  typealias Machine = UpstreamConnectionState<String>

  @Test func theFirstCallConnectsAndTheOthersWaitThenAllGetStreams() {
    var m = Machine()
    guard case .connect = m.open("a") else { Issue.record("the first call starts the connect"); return }
    guard case .wait = m.open("b") else { Issue.record("the second waits"); return }
    #expect(m.waiting == 2)
    #expect(m.hasCapacity(active: 2, peerMaxStreams: 3))
    #expect(!m.hasCapacity(active: 3, peerMaxStreams: 3))
    guard case .register(let waiters) = m.connected() else { Issue.record("connected registers the waiters"); return }
    #expect(waiters == ["a", "b"])
    #expect(m.isReady)
    guard case .register("c") = m.open("c") else { Issue.record("a ready connection registers at once"); return }
  }

  @Test func aFailedConnectFailsItsWaitersAndIsForgottenOnce() {
    var m = Machine()
    _ = m.open("a")
    _ = m.open("b")
    let failed = m.connectFailed()
    #expect(failed?.waiters == ["a", "b"])
    #expect(failed?.forget == true)
    #expect(m.connectFailed() == nil, "a second report finds nothing")
    guard case .refuse("c") = m.open("c") else { Issue.record("a closed connection refuses"); return }
    #expect(!m.hasCapacity(active: 0, peerMaxStreams: 100))
    guard case .endStreams(forget: false) = m.channelClosed() else { Issue.record("the pool was told already"); return }
  }

  @Test func retiredWhileConnectingItFailsTheWaitersAsNotSentAndClosesWhenItConnects() {
    var m = Machine()
    _ = m.open("a")
    guard case .failWaiters(let waiters, forget: true) = m.retire() else { Issue.record("waiters fail"); return }
    #expect(waiters == ["a"])
    guard case .close = m.connected() else { Issue.record("connected too late: close it"); return }
  }

  @Test func aDrainingConnectionRefusesNewCallsAndClosesWithItsLastStream() {
    var m = Machine()
    _ = m.open("a")
    _ = m.connected()
    guard case .drain(forget: true) = m.retire() else { Issue.record("ready → draining"); return }
    guard case .none(forget: false) = m.retire() else { Issue.record("retired once"); return }
    guard case .refuse = m.open("b") else { Issue.record("no new call on a draining connection"); return }
    #expect(!m.hasCapacity(active: 0, peerMaxStreams: 100))
    #expect(m.isOpen, "streams in flight still write")
    #expect(!m.shouldClose(streamsLeft: 1))
    #expect(m.shouldClose(streamsLeft: 0))
  }

  @Test func aReadyConnectionNeverClosesForLackOfStreams() {
    var m = Machine()
    _ = m.open("a")
    _ = m.connected()
    #expect(!m.shouldClose(streamsLeft: 0))
    guard case .none = m.connected() else { Issue.record("a second connected event changes nothing"); return }
  }

  @Test func aChannelLostWhileConnectingIsAConnectFailure() {
    var m = Machine()
    _ = m.open("a")
    guard case .connectFailed(let failed) = m.channelClosed() else { Issue.record("lost while connecting"); return }
    #expect(failed.waiters == ["a"])
    #expect(failed.forget)
  }

  @Test func aChannelLostWhenReadyEndsItsStreamsAndIsForgotten() {
    var m = Machine()
    _ = m.open("a")
    _ = m.connected()
    guard case .endStreams(forget: true) = m.channelClosed() else { Issue.record("lost when ready"); return }
    #expect(!m.isOpen)
    #expect(m.isDraining)
  }
}
