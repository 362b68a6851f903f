import Foundation
import ProxyConfig
import Testing

/// Header mutations and direct_response bodies, as Envoy reads them.
@Suite struct RouteExtrasTests {
  static func config(route: String, routeConfigExtra: String = "") -> String {
    """
    static_resources:
      listeners:
      - name: l
        address:
          socket_address: { address: 127.0.0.1, port_value: 8080 }
        filter_chains:
        - filters:
          - name: envoy.http_connection_manager
            config:
              route_config:\(routeConfigExtra)
                virtual_hosts:
                - name: v
                  domains: ["*"]
                  response_headers_to_add:
                  - header: { key: x-level, value: vhost }
                  routes:
    \(route)
              http_filters:
              - name: envoy.router
      clusters:
      - name: backend
        type: STATIC
        http2_protocol_options: {}
        load_assignment:
          cluster_name: backend
          endpoints:
          - lb_endpoints:
            - endpoint:
                address:
                  socket_address: { address: 127.0.0.1, port_value: 9000 }
    """
  }

  @Test func headerMutationsInEverySpelling() throws {
    let route = """
                      - match: { prefix: "/" }
                        route: { cluster: backend }
                        request_headers_to_add:
                        - header: { key: X-Tenant, value: "%REQ(x-user)%-%%-end" }
                        - header: { key: x-fixed, value: "1" }
                          append: false
                        - header: { key: x-only-if-absent, value: "2" }
                          append_action: add_if_absent
                        request_headers_to_remove: [cookie]
                        response_headers_to_add:
                        - header: { key: x-level, value: route }
                          append_action: OVERWRITE_IF_EXISTS_OR_ADD
                        response_headers_to_remove: [server]
    """
    let loaded = try ConfigLoader.load(yaml: Self.config(route: route))
    let vh = loaded.configuration.listeners[0].routeConfig.virtualHosts[0]
    let r = vh.routes[0]
    #expect(r.requestHeaders.add.map(\.name) == ["x-tenant", "x-fixed", "x-only-if-absent"])
    #expect(r.requestHeaders.add[0].value == [.requestHeader("x-user"), .text("-%-end")])
    #expect(r.requestHeaders.add[0].action == .APPEND_IF_EXISTS_OR_ADD)
    #expect(r.requestHeaders.add[1].action == .OVERWRITE_IF_EXISTS_OR_ADD)
    #expect(r.requestHeaders.add[2].action == .ADD_IF_ABSENT)
    #expect(r.requestHeaders.remove == ["cookie"])
    #expect(r.responseHeaders.remove == ["server"])
    #expect(vh.responseHeaders.add.map(\.name) == ["x-level"])
    #expect(!loaded.warnings.contains { $0.path.contains("headers_to") }, "\(loaded.warnings)")
  }

  @Test func unsupportedFormatterIsWarnedAboutAndSentAsWritten() throws {
    let route = """
                      - match: { prefix: "/" }
                        route: { cluster: backend }
                        request_headers_to_add:
                        - header: { key: x-peer, value: "%DOWNSTREAM_REMOTE_ADDRESS%" }
    """
    let loaded = try ConfigLoader.load(yaml: Self.config(route: route))
    let add = loaded.configuration.listeners[0].routeConfig.virtualHosts[0].routes[0].requestHeaders.add[0]
    #expect(add.value == [.text("%DOWNSTREAM_REMOTE_ADDRESS%")])
    #expect(loaded.warnings.contains { $0.message.contains("DOWNSTREAM_REMOTE_ADDRESS") && $0.path.hasSuffix("value") })
  }

  @Test func removingHostOrAPseudoHeaderIsAnErrorWithTheLine() {
    let route = """
                      - match: { prefix: "/" }
                        route: { cluster: backend }
                        request_headers_to_remove: [":path"]
    """
    do {
      _ = try ConfigLoader.load(yaml: Self.config(route: route))
      Issue.record("expected an error")
    } catch {
      #expect(error.path.hasSuffix("routes[0].request_headers_to_remove[0]"))
      #expect(error.line == 19)
    }
  }

  @Test func directResponseBodyFromStringBytesAndFile() throws {
    let file = FileManager.default.temporaryDirectory.appendingPathComponent("direct-\(UUID().uuidString).html")
    try Data("<p>hi</p>".utf8).write(to: file)
    defer { try? FileManager.default.removeItem(at: file) }
    let route = """
                      - match: { path: "/a" }
                        direct_response: { status: 200, body: { inline_string: "text" } }
                      - match: { path: "/b" }
                        direct_response: { status: 200, body: { inline_bytes: "AAEC" } }
                      - match: { path: "/c" }
                        direct_response: { status: 200, body: { filename: "\(file.lastPathComponent)" } }
    """
    let config = try ConfigLoader.load(yaml: Self.config(route: route), directory: file.deletingLastPathComponent().path).configuration
    let actions = config.listeners[0].routeConfig.virtualHosts[0].routes.map(\.action)
    #expect(actions == [
      .directResponse(status: 200, body: Array("text".utf8)),
      .directResponse(status: 200, body: [0, 1, 2]),
      .directResponse(status: 200, body: Array("<p>hi</p>".utf8)),
    ])
  }

  @Test func missingBodyFileAndOversizedBodyAreErrors() {
    let missing = """
                      - match: { path: "/c" }
                        direct_response: { status: 200, body: { filename: "/nonexistent/page.html" } }
    """
    #expect { try ConfigLoader.load(yaml: Self.config(route: missing)) } throws: { error in
      let e = error as? ConfigError
      return e?.line == 18 && e?.message.contains("cannot read '/nonexistent/page.html'") == true
    }
    let big = """
                      - match: { path: "/c" }
                        direct_response: { status: 200, body: { inline_string: "\(String(repeating: "x", count: 5000))" } }
    """
    #expect { try ConfigLoader.load(yaml: Self.config(route: big)) } throws: { error in
      (error as? ConfigError)?.message.contains("max_direct_response_body_size_bytes (4096)") == true
    }
    // Raised by the route configuration, as Envoy allows.
    #expect(throws: Never.self) {
      try ConfigLoader.load(yaml: Self.config(route: big, routeConfigExtra: "\n            max_direct_response_body_size_bytes: 8192"))
    }
  }

  @Test func embeddedDefaultWithThePageLoads() throws {
    let page = [EmbeddedDefault.PageFile(path: "/", file: #filePath, contentType: "text/html; charset=utf-8")]
    let config = try ConfigLoader.load(yaml: EmbeddedDefault.yaml(listenHost: "127.0.0.1", listenPort: 8080, backendPort: 1, page: page)).configuration
    let routes = config.listeners[0].routeConfig.virtualHosts[0].routes
    #expect(routes.count == 3)
    guard case .directResponse(200, let body?) = routes[1].action else {
      Issue.record("expected the page route second, after the icon")
      return
    }
    #expect(body.count > 100)
    #expect(routes[1].responseHeaders.add.first?.action == .OVERWRITE_IF_EXISTS_OR_ADD)
  }
}
