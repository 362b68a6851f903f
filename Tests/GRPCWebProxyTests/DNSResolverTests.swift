import Foundation
import GRPCWebCore
import GRPCWebProxy
import NIOCore
import NIOPosix
import ProxyConfig
import Testing

@Suite struct DNSResolverTests {
  private func withServer(_ body: (StubDNSServer) async throws -> Void) async throws {
    let server = try await StubDNSServer.start()
    do {
      try await body(server)
    } catch {
      await server.stop()
      throw error
    }
    await server.stop()
  }

  private func resolver(_ servers: [HostAndPort], timeout: TimeAmount = .seconds(1), attempts: Int = 2) -> DNSResolver {
    DNSResolver(servers: servers, timeout: timeout, attempts: attempts, group: MultiThreadedEventLoopGroup.singleton)
  }

  @Test func readsARecordsWithTheirTTLs() async throws {
    try await self.withServer { dns in
      dns.set("tasks.user", .a, .records(["127.0.0.21", "127.0.0.22"], ttl: 1))
      let outcome = await self.resolver([dns.address]).lookup("tasks.user", type: .a)
      #expect(outcome == .addresses([DNSRecord(address: "127.0.0.21", ttl: 1), DNSRecord(address: "127.0.0.22", ttl: 1)]))
      #expect(dns.queries("tasks.user", .a) == 1)
    }
  }

  @Test func readsAAAARecords() async throws {
    try await self.withServer { dns in
      dns.set("tasks.user", .aaaa, .records(["::1", "fd00::5"], ttl: 60))
      let outcome = await self.resolver([dns.address]).lookup("tasks.user.", type: .aaaa)
      #expect(outcome == .addresses([DNSRecord(address: "::1", ttl: 60), DNSRecord(address: "fd00::5", ttl: 60)]))
    }
  }

  @Test func anEmptyAnswerIsNoAddresses() async throws {
    try await self.withServer { dns in
      dns.set("tasks.user", .aaaa, .records([], ttl: 60))
      #expect(await self.resolver([dns.address]).lookup("tasks.user", type: .aaaa) == .addresses([]))
    }
  }

  @Test func nxDomainIsFinal() async throws {
    try await self.withServer { dns in
      #expect(await self.resolver([dns.address]).lookup("missing.user", type: .a) == .nxDomain)
      #expect(dns.queries("missing.user", .a) == 1)
    }
  }

  @Test func servFailIsAFailureWithAReason() async throws {
    try await self.withServer { dns in
      dns.set("tasks.user", .a, .rcode(2))
      let outcome = await self.resolver([dns.address]).lookup("tasks.user", type: .a)
      #expect(outcome == .failure("tasks.user A: SERVFAIL from \(dns.address) (2 tries)"))
      #expect(dns.queries("tasks.user", .a) == 2)

      dns.set("tasks.user", .a, .rcode(5))
      let refused = await self.resolver([dns.address], attempts: 1).lookup("tasks.user", type: .a)
      #expect(refused == .failure("tasks.user A: REFUSED from \(dns.address)"))
    }
  }

  @Test func silenceFailsAfterTimeoutTimesAttempts() async throws {
    try await self.withServer { dns in
      dns.set("tasks.user", .a, .silence)
      let clock = ContinuousClock()
      let start = clock.now
      let outcome = await self.resolver([dns.address], timeout: .milliseconds(200), attempts: 3).lookup("tasks.user", type: .a)
      let elapsed = clock.now - start
      #expect(outcome == .failure("tasks.user A: no answer from \(dns.address) within 200 ms (3 tries)"))
      #expect(elapsed >= .milliseconds(590) && elapsed < .milliseconds(1500), "\(elapsed)")
      #expect(dns.queries("tasks.user", .a) == 3)
    }
  }

  @Test func aTruncatedAnswerIsAskedAgainOverTCP() async throws {
    try await self.withServer { dns in
      dns.set("tasks.user", .a, .truncatedOverUDP(["127.0.0.21", "127.0.0.22", "127.0.0.23"], ttl: 7))
      let outcome = await self.resolver([dns.address]).lookup("tasks.user", type: .a)
      #expect(outcome == .addresses(["127.0.0.21", "127.0.0.22", "127.0.0.23"].map { DNSRecord(address: $0, ttl: 7) }))
      #expect(dns.queries("tasks.user", .a) == 1)
      #expect(dns.queries("tasks.user", .a, overTCP: true) == 1)
    }
  }

  @Test func anAnswerWithAnotherIDIsIgnored() async throws {
    try await self.withServer { dns in
      dns.set("tasks.user", .a, .strayFirst(["127.0.0.21"], ttl: 3))
      #expect(await self.resolver([dns.address]).lookup("tasks.user", type: .a) == .addresses([DNSRecord(address: "127.0.0.21", ttl: 3)]))
    }
  }

  @Test func aServerThatIsNotThereIsSkippedAtOnce() async throws {
    // A UDP port that was just closed: the kernel answers the query with port unreachable.
    let closed = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: 0).get()
    let deadPort = closed.localAddress!.port!
    try await closed.close()
    let dead = HostAndPort(host: "127.0.0.1", port: deadPort)

    try await self.withServer { dns in
      dns.set("tasks.user", .a, .records(["127.0.0.21"], ttl: 3))
      let clock = ContinuousClock()
      let start = clock.now
      let outcome = await self.resolver([dead, dns.address], timeout: .seconds(5)).lookup("tasks.user", type: .a)
      #expect(outcome == .addresses([DNSRecord(address: "127.0.0.21", ttl: 3)]))
      #expect(clock.now - start < .seconds(2))

      let alone = await self.resolver([dead], timeout: .seconds(5), attempts: 1).lookup("tasks.user", type: .a)
      #expect(alone == .failure("tasks.user A: nothing answers DNS on \(dead) (connection refused)"))
    }
  }

  @Test func serversAreTakenInTurn() async throws {
    try await self.withServer { first in
      try await self.withServer { second in
        first.set("tasks.user", .a, .rcode(2))
        second.set("tasks.user", .a, .records(["127.0.0.22"], ttl: 4))
        let outcome = await self.resolver([first.address, second.address]).lookup("tasks.user", type: .a)
        #expect(outcome == .addresses([DNSRecord(address: "127.0.0.22", ttl: 4)]))
        #expect(first.queries("tasks.user", .a) == 1)
        #expect(second.queries("tasks.user", .a) == 1)
      }
    }
  }

  @Test func anIPAddressIsItsOwnAnswer() async {
    let resolver = self.resolver([HostAndPort(host: "127.0.0.1", port: 9)])
    #expect(await resolver.lookup("10.1.2.3", type: .a) == .addresses([DNSRecord(address: "10.1.2.3", ttl: .max)]))
    #expect(await resolver.lookup("10.1.2.3", type: .aaaa) == .addresses([]))
    #expect(await resolver.resolve("fd00:0::5", family: .v4Preferred) == .addresses([DNSRecord(address: "fd00::5", ttl: .max)]))
    #expect(await resolver.resolve("::1", family: .v4Only) == .addresses([]))
  }

  @Test func badNamesAndServersFailWithAReason() async {
    let resolver = self.resolver([HostAndPort(host: "127.0.0.1", port: 9)])
    let long = String(repeating: "x", count: 64)
    #expect(await resolver.lookup("a.\(long)", type: .a) == .failure("'a.\(long)' is not a name DNS can look up: the label '\(long)' is 64 bytes long; DNS allows 63"))
    let named = self.resolver([HostAndPort(host: "dns.local", port: 53)])
    #expect(await named.lookup("tasks.user", type: .a) == .failure("tasks.user A: the DNS server 'dns.local' is not an IP address"))
    #expect(await self.resolver([]).lookup("tasks.user", type: .a) == .failure("tasks.user A: no DNS servers are configured"))
  }

  // MARK: - dns_lookup_family

  private static let v4 = DNSRecord(address: "127.0.0.21", ttl: 5)
  private static let v6 = DNSRecord(address: "fd00::21", ttl: 6)

  @Test func familiesWhenTheNameHasBoth() async throws {
    try await self.withServer { dns in
      dns.set("both", .a, .records(["127.0.0.21"], ttl: 5))
      dns.set("both", .aaaa, .records(["fd00::21"], ttl: 6))
      let resolver = self.resolver([dns.address])
      #expect(await resolver.resolve("both", family: .v4Only) == .addresses([Self.v4]))
      #expect(await resolver.resolve("both", family: .v6Only) == .addresses([Self.v6]))
      #expect(await resolver.resolve("both", family: .auto) == .addresses([Self.v6]))
      #expect(await resolver.resolve("both", family: .v4Preferred) == .addresses([Self.v4]))
      #expect(await resolver.resolve("both", family: .all) == .addresses([Self.v4, Self.v6]))
      // Only ALL and the *_ONLY of the other family asked the second type.
      #expect(dns.queries("both", .a) == 3)
      #expect(dns.queries("both", .aaaa) == 3)
    }
  }

  @Test func familiesFallBackWhenTheFirstHasNone() async throws {
    try await self.withServer { dns in
      dns.set("v4", .a, .records(["127.0.0.21"], ttl: 5))
      dns.set("v4", .aaaa, .records([], ttl: 5))
      dns.set("v6", .a, .rcode(2))  // even a failure of the first family falls back
      dns.set("v6", .aaaa, .records(["fd00::21"], ttl: 6))
      let resolver = self.resolver([dns.address], attempts: 1)
      #expect(await resolver.resolve("v4", family: .auto) == .addresses([Self.v4]))
      #expect(await resolver.resolve("v4", family: .v6Only) == .addresses([]))
      #expect(await resolver.resolve("v4", family: .all) == .addresses([Self.v4]))
      #expect(await resolver.resolve("v6", family: .v4Preferred) == .addresses([Self.v6]))
      #expect(await resolver.resolve("v6", family: .all) == .addresses([Self.v6]))
      #expect(await resolver.resolve("missing", family: .all) == .nxDomain)
      #expect(await resolver.resolve("missing", family: .auto) == .nxDomain)
    }
  }

  @Test func allCombinesOutcomes() {
    let failed = DNSResolver.Outcome.failure("x A: SERVFAIL")
    #expect(DNSResolver.combine(.addresses([Self.v4]), failed) == .addresses([Self.v4]))
    #expect(DNSResolver.combine(failed, .addresses([])) == failed)
    #expect(DNSResolver.combine(.addresses([]), .nxDomain) == .addresses([]))
    #expect(DNSResolver.combine(.nxDomain, .nxDomain) == .nxDomain)
    #expect(DNSResolver.combine(failed, .failure("x AAAA: SERVFAIL")) == .failure("x A: SERVFAIL; x AAAA: SERVFAIL"))
  }

  // MARK: - Against tests/support/dns_server.py (dnslib), when it can run

  private static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

  private static let pythonWithDNSLib: Bool = {
    let probe = Process()
    probe.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    probe.arguments = ["python3", "-c", "import dnslib"]
    probe.standardOutput = FileHandle.nullDevice
    probe.standardError = FileHandle.nullDevice
    guard (try? probe.run()) != nil else { return false }
    probe.waitUntilExit()
    return probe.terminationStatus == 0
  }()

  @Test(.enabled(if: Self.pythonWithDNSLib, "needs python3 with dnslib (pip install dnslib)"))
  func agreesWithTheDNSLibTestServer() async throws {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = [
      "python3", Self.repository.appendingPathComponent("tests/support/dns_server.py").path, "--port", "0",
      "--record", "tasks.user=127.0.0.21,127.0.0.22,fd00::5", "--ttl", "9",
      "--servfail", "broken.user", "--truncate", "tasks.user",
    ]
    let output = Pipe()
    process.standardOutput = output
    try process.run()
    defer { process.terminate(); process.waitUntilExit() }

    var line = Data()
    while !line.contains(UInt8(ascii: "\n")) {
      let chunk = output.fileHandleForReading.availableData
      try #require(!chunk.isEmpty, "dns_server.py exited before it listened")
      line += chunk
    }
    let address = String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    let port = try #require(Int(address.split(separator: ":").last ?? ""))
    let resolver = self.resolver([HostAndPort(host: "127.0.0.1", port: port)])

    #expect(await resolver.resolve("tasks.user", family: .all) == .addresses([
      DNSRecord(address: "127.0.0.21", ttl: 9), DNSRecord(address: "127.0.0.22", ttl: 9), DNSRecord(address: "fd00::5", ttl: 9),
    ]))
    #expect(await resolver.lookup("nobody.user", type: .a) == .nxDomain)
    #expect(await resolver.lookup("broken.user", type: .a) == .failure("broken.user A: SERVFAIL from 127.0.0.1:\(port) (2 tries)"))
  }
}
