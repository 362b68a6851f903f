import NIOConcurrencyHelpers
import ProxyConfig
import Testing

@testable import GRPCWebProxy

/// A cluster's endpoints as health checks, failed connects and ejections change them, on a clock
/// the tests move.
@Suite struct ClusterMembershipTests {
  let a = HostAndPort(host: "10.0.0.1", port: 50051)
  let b = HostAndPort(host: "10.0.0.2", port: 50051)
  let c = HostAndPort(host: "10.0.0.3", port: 50051)
  let time = NIOLockedValueBox(ContinuousClock.now)

  func membership() -> ClusterMembership {
    let time = self.time
    return ClusterMembership(cluster: Cluster(name: "users", type: .strictDNS, endpoints: [])) { time.withLockedValue { $0 } }
  }

  func advance(_ duration: Duration) { self.time.withLockedValue { $0 = $0.advanced(by: duration) } }

  @Test func aRefusedEndpointIsSetAsideForATimeThatDoublesUpToTheMaximum() {
    let m = self.membership()
    _ = m.setDiscovered([self.a, self.b])
    var aside: [Duration] = []
    for _ in 0..<4 {
      let snapshot = m.setAside(self.a, base: .seconds(1), maximum: .seconds(3))
      #expect(snapshot?.usable == [self.b])
      // How long until it is back, to the second.
      var waited = Duration.zero
      while m.readmit() == nil {
        self.advance(.milliseconds(500))
        waited += .milliseconds(500)
      }
      aside.append(waited)
    }
    #expect(aside == [.seconds(1), .seconds(2), .seconds(3), .seconds(3)])
    m.connected(self.a)
    _ = m.setAside(self.a, base: .seconds(1), maximum: .seconds(3))
    self.advance(.seconds(1))
    #expect(m.readmit()?.usable == [self.a, self.b], "a connection made starts the doubling over")
  }

  @Test func theLastUsableEndpointIsNeverSetAside() {
    let m = self.membership()
    _ = m.setDiscovered([self.a, self.b])
    _ = m.setAside(self.a, base: .seconds(1), maximum: .seconds(1))
    #expect(m.setAside(self.b, base: .seconds(1), maximum: .seconds(1)) == nil)
    #expect(m.snapshot.usable == [self.b], "the cluster reports the failure itself rather than going empty")
  }

  @Test func ejectionsStopAtTheMaximumPercentButOneMayAlwaysGo() {
    let m = self.membership()
    _ = m.setDiscovered([self.a, self.b, self.c])
    #expect(m.setAside(self.a, base: .seconds(30), maximum: .seconds(300), maxPercent: 10) != nil, "one, whatever the percentage")
    #expect(m.setAside(self.b, base: .seconds(30), maximum: .seconds(300), maxPercent: 10) == nil)
    #expect(m.snapshot.usable == [self.b, self.c])
  }

  @Test func healthFollowsTheThresholdsAndAPassingCheckEndsAnEjection() {
    let m = self.membership()
    _ = m.setDiscovered([self.a, self.b])
    let thresholds = (healthy: 2, unhealthy: 2)
    #expect(m.healthCheck(self.a, passed: false, threshold: thresholds) == nil, "one failure of two")
    #expect(m.healthCheck(self.a, passed: false, threshold: thresholds)?.usable == [self.b])
    #expect(m.healthCheck(self.a, passed: true, threshold: thresholds) == nil, "one success of two")
    #expect(m.healthCheck(self.a, passed: true, threshold: thresholds)?.usable == [self.a, self.b])
    _ = m.setAside(self.b, base: .seconds(30), maximum: .seconds(300), maxPercent: 50)
    #expect(m.snapshot.usable == [self.a])
    _ = m.healthCheck(self.b, passed: true, threshold: thresholds)
    #expect(m.snapshot.usable == [self.a, self.b], "a passing active check unejects at once")
  }

  @Test func rediscoveryKeepsWhatIsKnownOfAnEndpointThatStays() {
    let m = self.membership()
    _ = m.setDiscovered([self.a, self.b])
    _ = m.healthCheck(self.a, passed: false, threshold: (1, 1))
    let next = m.setDiscovered([self.a, self.c])
    #expect(next.all == [self.a, self.c])
    #expect(next.usable == [self.c], "a is still unhealthy; c is new and counts as healthy")
  }
}
