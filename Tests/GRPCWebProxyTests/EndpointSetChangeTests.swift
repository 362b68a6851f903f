@testable import GRPCWebProxy
import ProxyConfig
import Testing

@Suite struct EndpointSetChangeTests {
  let a = HostAndPort(host: "10.0.1.3", port: 50051)
  let b = HostAndPort(host: "10.0.1.4", port: 50051)
  let c = HostAndPort(host: "10.0.1.5", port: 50051)

  @Test func theSameTasksInAnotherOrderAreNoChange() {
    // Docker's DNS shuffles tasks.<service> on every answer.
    #expect(EndpointSetChange(from: [a, b, c], to: [c, a, b]) == nil)
    #expect(EndpointSetChange(from: [a, b, c], to: [b, c, a]) == nil)
    #expect(EndpointSetChange(from: [], to: []) == nil)
  }

  @Test func aNewTaskIsNamed() throws {
    let change = try #require(EndpointSetChange(from: [b, a], to: [c, a, b]))
    #expect(change.added == [c])
    #expect(change.removed.isEmpty)
    #expect(change.description == "endpoints now 10.0.1.3:50051, 10.0.1.4:50051, 10.0.1.5:50051 (added 10.0.1.5:50051)")
  }

  @Test func aReplacedTaskIsNamedBothWays() throws {
    let change = try #require(EndpointSetChange(from: [a, b], to: [c, a]))
    #expect(change.description == "endpoints now 10.0.1.3:50051, 10.0.1.5:50051 (added 10.0.1.5:50051; removed 10.0.1.4:50051)")
  }

  @Test func anEmptiedClusterSaysNone() throws {
    let change = try #require(EndpointSetChange(from: [a], to: []))
    #expect(change.description == "endpoints now none (removed 10.0.1.3:50051)")
  }
}
