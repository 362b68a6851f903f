import GRPCWebCore
@testable import ProxyFilters
import NIOHPACK
import ProxyConfig
import Testing

@Suite struct DeadlinePlanTests {
  @Test func routeTimeoutDefaultsTo15sAndIgnoresTheHeader() {
    let plan = DeadlinePlan.make(timeouts: .init(), grpcTimeoutHeader: "1S", isGRPC: true)
    #expect(plan.milliseconds == 15_000)
    #expect(plan.upstreamGRPCTimeout == nil)
    #expect(plan.start == .requestEnd)
  }

  @Test func zeroRouteTimeoutDisablesIt() {
    #expect(DeadlinePlan.make(timeouts: .init(timeout: .zero), grpcTimeoutHeader: nil, isGRPC: true).milliseconds == nil)
  }

  @Test func maxGrpcTimeoutHonoursTheHeader() {
    let zeroMax = RouteTimeouts(maxGrpcTimeout: .zero)
    let plan = DeadlinePlan.make(timeouts: zeroMax, grpcTimeoutHeader: "1S", isGRPC: true)
    #expect(plan.milliseconds == 1000)
    #expect(plan.upstreamGRPCTimeout == "1000m")
    #expect(DeadlinePlan.make(timeouts: .init(maxGrpcTimeout: .seconds(10)), grpcTimeoutHeader: "1H", isGRPC: true).milliseconds == 10_000)
    let offset = RouteTimeouts(maxGrpcTimeout: .zero, grpcTimeoutOffset: .milliseconds(100))
    #expect(DeadlinePlan.make(timeouts: offset, grpcTimeoutHeader: "50m", isGRPC: true).milliseconds == 50)
    for ignored in ["100000000m", "5X", ""] {
      #expect(DeadlinePlan.make(timeouts: zeroMax, grpcTimeoutHeader: ignored, isGRPC: true).milliseconds == nil)
    }
    #expect(DeadlinePlan.make(timeouts: zeroMax, grpcTimeoutHeader: "5n", isGRPC: true).milliseconds == 1)
    #expect(DeadlinePlan.make(timeouts: zeroMax, grpcTimeoutHeader: "0m", isGRPC: true).milliseconds == nil)
  }

  @Test func streamDurationSettingsUseTheHeaderFromTheStart() {
    let t = RouteTimeouts(timeout: .zero, grpcTimeoutHeaderMax: .zero)
    let plan = DeadlinePlan.make(timeouts: t, grpcTimeoutHeader: "300m", isGRPC: true)
    #expect(plan.milliseconds == 300)
    #expect(plan.start == .requestStart)
    #expect(DeadlinePlan.make(timeouts: t, grpcTimeoutHeader: nil, isGRPC: true).milliseconds == nil)
    let capped = RouteTimeouts(grpcTimeoutHeaderMax: .seconds(1))
    #expect(DeadlinePlan.make(timeouts: capped, grpcTimeoutHeader: "1H", isGRPC: true).milliseconds == 1000)
  }

  @Test func theBackendIsToldTheCappedDeadline() {
    // Seen side by side with Envoy 1.40: grpc_timeout_header_max 0.4s, offset 0.1s, client 10S.
    let t = RouteTimeouts(grpcTimeoutHeaderMax: .milliseconds(400), grpcTimeoutHeaderOffset: .milliseconds(100))
    let plan = DeadlinePlan.make(timeouts: t, grpcTimeoutHeader: "10S", isGRPC: true)
    #expect(plan.milliseconds == 300)
    #expect(plan.upstreamGRPCTimeout == "300m")
    #expect(DeadlinePlan.make(timeouts: t, grpcTimeoutHeader: nil, isGRPC: true).upstreamGRPCTimeout == nil)
  }
}

@Suite struct CORSTests {
  let policy = CORSPolicy(
    allowOrigins: [StringMatcher(.exact("http://allowed.example"))],
    allowMethods: "POST, OPTIONS",
    allowHeaders: "content-type,x-grpc-web",
    exposeHeaders: "grpc-status,grpc-message",
    maxAge: "600"
  )

  @Test func preflightFromAnAllowedOriginIsAnsweredLocally() throws {
    let headers: HPACKHeaders = ["origin": "http://allowed.example", "access-control-request-method": "POST"]
    guard case .preflight(let out) = CORS.evaluate(policy: self.policy, method: "OPTIONS", headers: headers) else {
      Issue.record("expected a local preflight reply"); return
    }
    #expect(out.first(name: "access-control-allow-origin") == "http://allowed.example")
    #expect(out.first(name: "access-control-allow-methods") == "POST, OPTIONS")
    #expect(out.first(name: "access-control-max-age") == "600")
    #expect(out.first(name: "access-control-expose-headers") == "grpc-status,grpc-message")
  }

  @Test func preflightFromAnotherOriginIsForwardedByDefault() {
    let headers: HPACKHeaders = ["origin": "http://evil.example", "access-control-request-method": "POST"]
    guard case .forward(let out) = CORS.evaluate(policy: self.policy, method: "OPTIONS", headers: headers) else {
      Issue.record("expected forwarding"); return
    }
    #expect(out.isEmpty)
    var strict = self.policy
    strict.forwardNotMatchingPreflights = false
    guard case .preflight(let local) = CORS.evaluate(policy: strict, method: "OPTIONS", headers: headers) else {
      Issue.record("expected a local reply"); return
    }
    #expect(local.first(name: "access-control-allow-origin") == nil)
  }

  @Test func actualRequestGetsOriginEchoedAndExposeHeaders() {
    let headers: HPACKHeaders = ["origin": "http://allowed.example"]
    guard case .forward(let out) = CORS.evaluate(policy: self.policy, method: "POST", headers: headers) else {
      Issue.record("expected forwarding"); return
    }
    #expect(out.first(name: "access-control-allow-origin") == "http://allowed.example")
    #expect(out.first(name: "access-control-expose-headers") == "grpc-status,grpc-message")
  }

  @Test func wildcardMatcherEchoesTheOriginNeverAStar() {
    let any = CORSPolicy(allowOrigins: [StringMatcher(.exact("*"))], allowMethods: "*", allowHeaders: "*")
    let headers: HPACKHeaders = [
      "origin": "http://x.example", "access-control-request-method": "PUT", "access-control-request-headers": "a,b",
    ]
    guard case .preflight(let out) = CORS.evaluate(policy: any, method: "OPTIONS", headers: headers) else {
      Issue.record("expected a local preflight reply"); return
    }
    #expect(out.first(name: "access-control-allow-origin") == "http://x.example")
    #expect(out.first(name: "access-control-allow-methods") == "PUT")
    #expect(out.first(name: "access-control-allow-headers") == "a,b")
  }

  @Test func originRegexesAreMatchedWholeOnTheRouteTable() {
    func decision(_ pattern: String, origin: String, ignoreCase: Bool = false) -> Bool {
      let policy = CORSPolicy(allowOrigins: [StringMatcher(.regex(pattern), ignoreCase: ignoreCase)])
      let table = RouteTable(RouteConfiguration(virtualHosts: [
        VirtualHost(name: "any", domains: ["*"], routes: [Route(match: RouteMatch(path: .prefix("/")), action: .cluster("c"))], cors: policy)
      ]))
      guard let entry = table.match(authority: "x", path: "/a", headers: [:], isGRPC: true) else { return false }
      if case .forward(let out) = entry.evaluateCORS(method: "POST", headers: ["origin": origin]) {
        return out.first(name: "access-control-allow-origin") == origin
      }
      return false
    }
    #expect(decision(".*", origin: "http://bench.local"))
    // `.*` is matched without the regex engine, with ICU's meaning: any text without a line break.
    let any = CompiledRegex(".*", caseInsensitive: false)
    #expect(any.wholeMatch("http://bench.local") && any.wholeMatch(""))
    for broken in ["a\nb", "a\rb", "a\u{2028}b", "a\u{2029}b", "a\u{85}b"] {
      #expect(!any.wholeMatch(broken))
      #expect(any.wholeMatch(broken) == CompiledRegex(".*?", caseInsensitive: false).wholeMatch(broken))
    }
    #expect(decision("https?://.*\\.example\\.com", origin: "https://app.example.com"))
    #expect(!decision("https?://.*\\.example\\.com", origin: "https://app.example.com.evil"))
    #expect(decision("HTTP://APP\\.EXAMPLE\\.COM", origin: "http://app.example.com", ignoreCase: true))
  }

  @Test func noOriginNoCORS() {
    guard case .none = CORS.evaluate(policy: self.policy, method: "POST", headers: ["origin": ""]) else {
      Issue.record("expected no processing"); return
    }
  }
}

@Suite struct RouteTableTests {
  func table() -> RouteTable {
    RouteTable(RouteConfiguration(virtualHosts: [
      VirtualHost(name: "api", domains: ["api.example.com", "*.api.example.com"], routes: [
        Route(match: RouteMatch(path: .prefix("/demo.User/"), headers: [HeaderMatcher(name: "branch", kind: .string(.init(.exact("feature-x"))))]),
          action: .cluster("feature")),
        Route(match: RouteMatch(path: .prefix("/")), action: .cluster("test")),
      ], cors: nil),
      VirtualHost(name: "rest", domains: ["*"], routes: [
        Route(match: RouteMatch(path: .path("/exact")), action: .cluster("exact"))
      ], cors: nil),
    ]))
  }

  private func cluster(_ e: RouteTable.Entry?) -> String? {
    guard case .cluster(let c) = e?.route.action else { return nil }
    return c
  }

  @Test func picksVirtualHostByAuthority() {
    let t = self.table()
    #expect(self.cluster(t.match(authority: "api.example.com:443", path: "/x", headers: [:], isGRPC: true)) == "test")
    #expect(self.cluster(t.match(authority: "eu.api.example.com", path: "/x", headers: [:], isGRPC: true)) == "test")
    #expect(self.cluster(t.match(authority: "other", path: "/exact", headers: [:], isGRPC: true)) == "exact")
    #expect(t.match(authority: "other", path: "/exact/no", headers: [:], isGRPC: true) == nil)
  }

  @Test func headerMatchSelectsTheBranchCluster() {
    let t = self.table()
    #expect(self.cluster(t.match(authority: "api.example.com", path: "/demo.User/login", headers: ["branch": "feature-x"], isGRPC: true)) == "feature")
    #expect(self.cluster(t.match(authority: "api.example.com", path: "/demo.User/login", headers: ["branch": "main"], isGRPC: true)) == "test")
  }
}
