import ProxyConfig
import Testing

@testable import GRPCWebProxy

/// When a cluster's endpoints are health-checked, step by step, with no clock and no socket.
@Suite struct HealthCheckScheduleTests {
  typealias Schedule = HealthCheckSchedule<ContinuousClock.Instant>
  let a = HostAndPort(host: "10.0.0.1", port: 50051)
  let b = HostAndPort(host: "10.0.0.2", port: 50051)
  let t0 = ContinuousClock.now

  func at(_ milliseconds: Int) -> ContinuousClock.Instant { self.t0.advanced(by: .milliseconds(milliseconds)) }

  @Test func aNewEndpointIsCheckedAtOnceThenAnIntervalAfterItsCheckEnded() {
    var schedule = Schedule(interval: .seconds(1))
    let first = schedule.endpoints([self.a], now: self.at(0))
    #expect(first.check == [self.a])
    #expect(schedule.nextDue == nil, "in flight: nothing is due")
    let counted = schedule.checked(self.a, now: self.at(30))
    #expect(counted)
    #expect(schedule.nextDue == self.at(1030), "the interval counts from the check's end")
    let early = schedule.endpoints([self.a], now: self.at(1029))
    #expect(early.check.isEmpty)
    let due = schedule.endpoints([self.a], now: self.at(1030))
    #expect(due.check == [self.a])
  }

  @Test func aCheckSlowerThanTheIntervalIsNotPiledOnByTheNext() {
    var schedule = Schedule(interval: .milliseconds(100))
    _ = schedule.endpoints([self.a], now: self.at(0))
    for ms in stride(from: 50, through: 2000, by: 50) {
      let step = schedule.endpoints([self.a], now: self.at(ms))
      #expect(step.check.isEmpty, "still in flight at \(ms) ms")
    }
    _ = schedule.checked(self.a, now: self.at(2000))
    let next = schedule.endpoints([self.a], now: self.at(2100))
    #expect(next.check == [self.a])
  }

  @Test func anEndpointThatLeavesIsForgottenAndItsLateResultIgnored() {
    var schedule = Schedule(interval: .seconds(1))
    _ = schedule.endpoints([self.a, self.b], now: self.at(0))
    _ = schedule.checked(self.b, now: self.at(10))
    let step = schedule.endpoints([self.b], now: self.at(20))
    #expect(step.forget == [self.a])
    #expect(step.check.isEmpty)
    let late = schedule.checked(self.a, now: self.at(40))
    #expect(!late, "a's check ended after it left: its result is dropped")
    let kept = schedule.endpoints([self.b], now: self.at(45))
    #expect(kept == .init(), "b is still known, and not due")
    let back = schedule.endpoints([self.a, self.b], now: self.at(50))
    #expect(back.check == [self.a], "back: checked at once, as new")
  }

  @Test func theNextDueIsTheEarliestOfThoseWaiting() {
    var schedule = Schedule(interval: .seconds(1))
    _ = schedule.endpoints([self.a, self.b], now: self.at(0))
    _ = schedule.checked(self.b, now: self.at(300))
    _ = schedule.checked(self.a, now: self.at(500))
    #expect(schedule.nextDue == self.at(1300))
  }
}
