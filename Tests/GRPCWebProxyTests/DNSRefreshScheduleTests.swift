import ProxyConfig
import Testing

@testable import GRPCWebProxy

/// A DNS cluster's refresh rules, answer by answer, with no resolver and no clock.
@Suite struct DNSRefreshScheduleTests {
  let a = HostAndPort(host: "10.0.0.1", port: 50051)
  let b = HostAndPort(host: "10.0.0.2", port: 50051)

  func cluster(refresh: Int64 = 5000, ttl: Bool = false, failure: (Int64, Int64)? = nil) -> Cluster {
    var cluster = Cluster(name: "user", type: .strictDNS, endpoints: [], dnsRefreshRate: .milliseconds(refresh))
    cluster.respectDNSTTL = ttl
    cluster.dnsFailureRefreshRate = failure.map { (.milliseconds($0.0), .milliseconds($0.1)) }
    return cluster
  }

  @Test func aNewAnswerIsPublishedAndTheSameOneIsNot() {
    var schedule = DNSRefreshSchedule(cluster: self.cluster(), initial: [self.a])
    #expect(schedule.wait == .seconds(5))
    let same = schedule.answer(.endpoints([self.a], ttl: nil))
    #expect(same == .unchanged)
    let more = schedule.answer(.endpoints([self.b, self.a], ttl: nil))
    #expect(more == .changed(EndpointSetChange(from: [self.a], to: [self.b, self.a])!))
    #expect(schedule.endpoints == [self.b, self.a])
  }

  @Test func anEmptyAnswerEmptiesTheClusterOnlyWhenTheNextSaysTheSame() {
    var schedule = DNSRefreshSchedule(cluster: self.cluster(), initial: [self.a, self.b])
    let first = schedule.answer(.empty)
    #expect(first == .emptyOnce(kept: 2))
    #expect(schedule.endpoints == [self.a, self.b], "a Swarm service between tasks keeps its calls")
    let back = schedule.answer(.endpoints([self.a, self.b], ttl: nil))
    #expect(back == .unchanged)
    _ = schedule.answer(.empty)
    let second = schedule.answer(.empty)
    #expect(second == .emptied)
    #expect(schedule.endpoints.isEmpty)
    let again = schedule.answer(.empty)
    #expect(again == .unchanged, "already empty")
  }

  @Test func failuresKeepTheEndpointsAndBackOffDoublingUpToTheMaximum() {
    var schedule = DNSRefreshSchedule(cluster: self.cluster(failure: (1000, 3000)), initial: [self.a])
    var waits: [Duration] = []
    for _ in 0..<4 {
      let step = schedule.answer(.failure("SERVFAIL"))
      #expect(step == .failed(reason: "SERVFAIL", kept: 1))
      waits.append(schedule.wait)
    }
    #expect(waits == [.seconds(1), .seconds(2), .seconds(3), .seconds(3)])
    _ = schedule.answer(.endpoints([self.a], ttl: nil))
    #expect(schedule.wait == .seconds(5), "a success goes back to the refresh rate")
    _ = schedule.answer(.failure("timeout"))
    #expect(schedule.wait == .seconds(1), "and the back-off starts over")
  }

  @Test func withoutAFailureRateAFailedLookupIsRetriedAtTheRefreshRate() {
    var schedule = DNSRefreshSchedule(cluster: self.cluster(refresh: 2000), initial: [])
    _ = schedule.answer(.failure("NXDOMAIN"))
    #expect(schedule.wait == .seconds(2))
  }

  @Test func theTTLRulesWhenRespectedButNeverBelow100ms() {
    var schedule = DNSRefreshSchedule(cluster: self.cluster(ttl: true), initial: [])
    _ = schedule.answer(.endpoints([self.a], ttl: .seconds(30)))
    #expect(schedule.wait == .seconds(30))
    _ = schedule.answer(.endpoints([self.a], ttl: .zero))
    #expect(schedule.wait == .milliseconds(100))
    _ = schedule.answer(.endpoints([self.a], ttl: nil))
    #expect(schedule.wait == .seconds(5), "no TTL known: the refresh rate")
    var ignoring = DNSRefreshSchedule(cluster: self.cluster(), initial: [])
    _ = ignoring.answer(.endpoints([self.a], ttl: .seconds(30)))
    #expect(ignoring.wait == .seconds(5))
  }

  @Test func theRefreshRateIsNeverBelow100ms() {
    let schedule = DNSRefreshSchedule(cluster: self.cluster(refresh: 1), initial: [])
    #expect(schedule.wait == .milliseconds(100))
  }
}
