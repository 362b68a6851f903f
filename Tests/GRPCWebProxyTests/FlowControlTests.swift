import Testing

@testable import GRPCWebProxy

/// The flow-control rules both sides of the proxy share, as plain values.
@Suite struct FlowControlTests {
  @Test func windowGoesBackInUpdatesOfAtLeastHalfTheWindow() {
    var window = StreamReceiveWindow(size: 1000)
    let r1 = window.received(300, endStream: false)
    #expect(r1 == nil)
    let r2 = window.received(199, endStream: false)
    #expect(r2 == nil)
    let r3 = window.received(1, endStream: false)
    #expect(r3 == 500, "half the window owed: all of it goes back")
    #expect(window.owed == 0)
    let r4 = window.received(10, endStream: false)
    #expect(r4 == nil)
  }

  @Test func aPausedStreamHoldsItsWindowAndGivesItAllBackWhenItResumes() {
    var window = StreamReceiveWindow(size: 1000)
    let r5 = window.setPaused(true)
    #expect(r5 == nil)
    let r6 = window.received(600, endStream: false)
    #expect(r6 == nil, "the sender stops when the window is spent")
    let r7 = window.received(400, endStream: false)
    #expect(r7 == nil)
    let r8 = window.setPaused(false)
    #expect(r8 == 1000)
    let r9 = window.received(10, endStream: false)
    #expect(r9 == nil)
    let r10 = window.setPaused(false)
    #expect(r10 == 10, "resuming gives back even less than half")
    let r11 = window.setPaused(false)
    #expect(r11 == nil, "nothing owed, no empty update")
  }

  @Test func noWindowGoesBackOnceTheSenderEnded() {
    var window = StreamReceiveWindow(size: 1000)
    let r12 = window.received(400, endStream: false)
    #expect(r12 == nil)
    let r13 = window.received(400, endStream: true)
    #expect(r13 == nil)
    #expect(window.senderEnded)
    let r14 = window.setPaused(false)
    #expect(r14 == nil)
    var trailers = StreamReceiveWindow(size: 1000)
    _ = trailers.received(400, endStream: false)
    trailers.senderEnd()
    let r15 = trailers.received(400, endStream: false)
    #expect(r15 == nil)
  }

  @Test func theConnectionWindowIsToppedUpFromItsSizeOnceHalfIsSpent() {
    #expect(ConnectionReceiveWindow.topUp(size: 1000, inbound: 501) == nil)
    #expect(ConnectionReceiveWindow.topUp(size: 1000, inbound: 500) == 500)
    #expect(ConnectionReceiveWindow.topUp(size: 1000, inbound: 0) == 1000)
    #expect(ConnectionReceiveWindow.topUp(size: 0, inbound: 0) == nil)
  }

  @Test func oneFlushIsScheduledPerTick() {
    var flushes = FlushCoalescer()
    let r16 = flushes.request()
    #expect(r16)
    let r17 = flushes.request()
    #expect(!r17)
    let r18 = flushes.request()
    #expect(!r18)
    flushes.flushing()
    let r19 = flushes.request()
    #expect(r19, "after the flush ran, the next write schedules another")
  }
}
