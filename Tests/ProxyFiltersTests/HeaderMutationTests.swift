import GRPCWebCore
import ProxyFilters
import NIOHPACK
import ProxyConfig
import Testing

@Suite struct HeaderMutationTests {
  @Test func removesThenAddsWithEachAction() {
    var headers: HPACKHeaders = ["cookie": "a", "x-a": "1", "x-b": "1", "x-c": "1"]
    let mutations = HeaderMutations(
      add: [
        .init(name: "x-a", value: [.text("2")]),
        .init(name: "x-b", value: [.text("2")], action: .OVERWRITE_IF_EXISTS_OR_ADD),
        .init(name: "x-c", value: [.text("2")], action: .ADD_IF_ABSENT),
        .init(name: "x-d", value: [.text("2")], action: .OVERWRITE_IF_EXISTS),
        .init(name: "cookie", value: [.text("new")], action: .ADD_IF_ABSENT),
      ],
      remove: ["cookie"]
    )
    mutations.apply(to: &headers, request: [:])
    #expect(headers[canonicalForm: "x-a"] == ["1", "2"])
    #expect(headers[canonicalForm: "x-b"] == ["2"])
    #expect(headers[canonicalForm: "x-c"] == ["1"])
    #expect(!headers.contains(name: "x-d"))
    #expect(headers[canonicalForm: "cookie"] == ["new"])
  }

  @Test func requestHeaderSubstitutionAndEmptyValues() {
    var headers = HPACKHeaders()
    let request: HPACKHeaders = ["x-user": "ann"]
    let mutations = HeaderMutations(add: [
      .init(name: "x-tenant", value: [.text("t-"), .requestHeader("x-user")]),
      .init(name: "x-missing", value: [.requestHeader("x-none")]),
      .init(name: "x-kept", value: [.requestHeader("x-none")], keepEmptyValue: true),
    ])
    mutations.apply(to: &headers, request: request)
    #expect(headers.first(name: "x-tenant") == "t-ann")
    #expect(!headers.contains(name: "x-missing"))
    #expect(headers.first(name: "x-kept") == "")
  }

  @Test func widestLevelWinsUnlessMostSpecificWins() {
    func route(_ mostSpecificWins: Bool) -> String? {
      let level = { (value: String) in HeaderMutations(add: [.init(name: "x-level", value: [.text(value)], action: .OVERWRITE_IF_EXISTS_OR_ADD)]) }
      let routeEntry = Route(match: RouteMatch(path: .prefix("/")), action: .cluster("c"), responseHeaders: level("route"))
      let config = RouteConfiguration(
        virtualHosts: [VirtualHost(name: "v", domains: ["*"], routes: [routeEntry], cors: nil, responseHeaders: level("vhost"))],
        responseHeaders: level("global"), mostSpecificHeaderMutationsWins: mostSpecificWins)
      guard let entry = RouteTable(config).match(authority: "x", path: "/", headers: [:], isGRPC: true) else { return nil }
      var headers = HPACKHeaders()
      HeaderMutations.apply(entry.responseHeaders, to: &headers, request: [:])
      return headers.first(name: "x-level")
    }
    #expect(route(false) == "global")
    #expect(route(true) == "route")
  }
}
