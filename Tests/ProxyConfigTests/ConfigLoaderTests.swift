import Foundation
import ProxyConfig
import Testing

/// `../shared` beside the checkout, where the public corpus and the seeds are read in place.
let sharedDirectory: URL = {
  URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("shared")
}()

let sharedAvailable = FileManager.default.fileExists(atPath: sharedDirectory.appendingPathComponent("envoy-corpus").path)

@Suite struct ConfigLoaderTests {
  @Test(.enabled(if: sharedAvailable, "../shared/envoy-corpus is not beside the checkout"), arguments: [
    "01-grpc-grpc-web-echo-v3.yaml", "02-grpc-grpc-web-echo-v2-hosts.yaml",
    "03-grpc-grpc-web-echo-v2-typed.yaml", "04-grpc-grpc-web-helloworld-v2.yaml",
  ])
  func loadsTheGrpcWebEchoExamples(_ name: String) throws {
    let path = sharedDirectory.appendingPathComponent("envoy-corpus/configs/\(name)").path
    try #require(FileManager.default.fileExists(atPath: path), "the corpus is not beside the checkout at \(path)")
    let loaded = try ConfigLoader.load(file: path)
    let config = loaded.configuration
    #expect(config.listeners.count == 1)
    let listener = try #require(config.listeners.first)
    #expect(listener.address.port == 8080)
    #expect(listener.grpcWebEnabled)
    #expect(listener.corsEnabled)
    #expect(listener.codec == .auto)
    let cluster = try #require(config.clusters.first)
    #expect(cluster.http2)
    #expect(cluster.connectTimeout == .milliseconds(250))
    #expect(cluster.type == .logicalDNS || cluster.type == .strictDNS)
    let vh = try #require(listener.routeConfig.virtualHosts.first)
    #expect(vh.domains == ["*"])
    #expect(vh.cors?.allowOrigins?.isEmpty == false)
    #expect(vh.cors?.exposeHeaders?.contains("grpc-status") == true)
  }

  @Test(.enabled(if: sharedAvailable, "../shared/seeds is not beside the checkout"))
  func loadsTheSeedStackConfigWithItsPlaceholderFilled() throws {
    let seed = sharedDirectory.appendingPathComponent("seeds/003_980161b6ddcd4b93.txt").path
    try #require(FileManager.default.fileExists(atPath: seed), "seed 003 is not beside the checkout")
    let text = try String(contentsOfFile: seed, encoding: .utf8)
    // The YAML runs from "static_resources:" to the cluster's hosts line.
    let lines = text.components(separatedBy: "\n")
    let start = try #require(lines.firstIndex { $0.hasPrefix("static_resources:") })
    let end = try #require(lines[start...].firstIndex { $0.contains("hosts: [{ socket_address") })
    let yaml = lines[start...end].joined(separator: "\n").replacingOccurrences(of: "{stack名称}", with: "demo")
    let config = try ConfigLoader.load(yaml: yaml).configuration
    let route = try #require(config.listeners.first?.routeConfig.virtualHosts.first?.routes.first)
    #expect(route.timeouts.maxGrpcTimeout == .zero)
    #expect(config.clusters.first?.endpoints == [HostAndPort(host: "demo_x-grpc", port: 50051)])
    #expect(config.clusters.first?.type == .logicalDNS)
    #expect(config.listeners.first?.routeConfig.virtualHosts.first?.cors?.allowOrigins?.first == StringMatcher(.exact("*")))
  }

  @Test(arguments: [
    ("0s", Int64(0)), ("'0.25s'", 250_000_000), ("30.000s", 30_000_000_000), ("{seconds: 60}", 60_000_000_000),
    ("1.5s", 1_500_000_000), ("{seconds: 1, nanos: 500}", 1_000_000_500),
  ])
  func readsDurationsInEveryForm(_ text: String, _ nanos: Int64) throws {
    let config = try ConfigLoader.load(yaml: Self.minimal(connectTimeout: text)).configuration
    #expect(config.clusters[0].connectTimeout.nanoseconds == nanos)
  }

  @Test func badDurationNamesPathAndLine() {
    do {
      _ = try ConfigLoader.load(yaml: Self.minimal(connectTimeout: "5"))
      Issue.record("expected an error")
    } catch {
      #expect(error.path == "static_resources.clusters[0].connect_timeout")
      #expect(error.line == 27)
      #expect(error.description.contains("is not a duration"))
    }
  }

  @Test func headerLimitsDefaultToEnvoysAndAreRead() throws {
    let plain = try ConfigLoader.load(yaml: Self.minimal(connectTimeout: "1s")).configuration
    #expect(plain.listeners[0].headerLimits == HeaderLimits(maxBytes: 60 * 1024, maxCount: 100))
    let yaml = Self.minimal(connectTimeout: "1s").replacingOccurrences(
      of: "          stat_prefix: x\n",
      with: "          stat_prefix: x\n          max_request_headers_kb: 96\n          common_http_protocol_options: { max_headers_count: 40, idle_timeout: 60s }\n")
    let set = try ConfigLoader.load(yaml: yaml).configuration
    #expect(set.listeners[0].headerLimits == HeaderLimits(maxBytes: 96 * 1024, maxCount: 40))
  }

  @Test func aHeaderLimitOutOfEnvoysBoundsNamesPathAndLine() {
    let yaml = Self.minimal(connectTimeout: "1s").replacingOccurrences(
      of: "          stat_prefix: x\n", with: "          stat_prefix: x\n          max_request_headers_kb: 9000\n")
    do {
      _ = try ConfigLoader.load(yaml: yaml)
      Issue.record("expected an error")
    } catch {
      #expect(error.path.hasSuffix("max_request_headers_kb"))
      #expect(error.line == 12)
      #expect(error.description.contains("from 1 to 8192"))
    }
  }

  @Test func theClientsHTTP2WindowsAreReadWithinEnvoysBounds() throws {
    let plain = try ConfigLoader.load(yaml: Self.minimal(connectTimeout: "1s")).configuration
    #expect(plain.listeners[0].http2 == HTTP2Options())
    let yaml = Self.minimal(connectTimeout: "1s").replacingOccurrences(
      of: "          stat_prefix: x\n",
      with: "          stat_prefix: x\n          http2_protocol_options: { initial_stream_window_size: 16777216, initial_connection_window_size: 33554432, max_concurrent_streams: 50, hpack_table_size: 4096 }\n")
    let set = try ConfigLoader.load(yaml: yaml).configuration
    #expect(set.listeners[0].http2.initialStreamWindow == 16 << 20)
    #expect(set.listeners[0].http2.initialConnectionWindow == 32 << 20)
    #expect(set.listeners[0].http2.maxConcurrentStreams == 50)
    let small = Self.minimal(connectTimeout: "1s").replacingOccurrences(
      of: "          stat_prefix: x\n",
      with: "          stat_prefix: x\n          http2_protocol_options:\n            initial_stream_window_size: 1000\n")
    do {
      _ = try ConfigLoader.load(yaml: small)
      Issue.record("expected an error")
    } catch {
      #expect(error.path.hasSuffix("initial_stream_window_size"))
      #expect(error.line == 13)
      #expect(error.description.contains("from 65535 to 2147483647"))
    }
  }

  @Test func connectionTimersAndLimitsDefaultToEnvoysAndAreRead() throws {
    let plain = try ConfigLoader.load(yaml: Self.minimal(connectTimeout: "1s")).configuration
    #expect(plain.listeners[0].idleTimeout == .seconds(3600))
    #expect(plain.listeners[0].requestHeadersTimeout == nil)
    #expect(plain.listeners[0].maxConnections == nil)
    #expect(plain.maxDownstreamConnections == nil)
    let yaml = Self.minimal(connectTimeout: "1s")
      .replacingOccurrences(
        of: "          stat_prefix: x\n",
        with: "          stat_prefix: x\n          request_headers_timeout: 2s\n          common_http_protocol_options: { idle_timeout: 0s }\n")
      .replacingOccurrences(
        of: "    - filters:\n",
        with: "    - filters:\n      - name: envoy.filters.network.connection_limit\n        typed_config: { stat_prefix: c, max_connections: 7 }\n")
      + """

      overload_manager:
        resource_monitors:
        - name: envoy.resource_monitors.global_downstream_max_connections
          typed_config: { max_active_downstream_connections: 9 }

      """
    let set = try ConfigLoader.load(yaml: yaml).configuration
    #expect(set.listeners[0].idleTimeout == nil)  // 0s: never, as in Envoy
    #expect(set.listeners[0].requestHeadersTimeout == .seconds(2))
    #expect(set.listeners[0].maxConnections == 7)
    #expect(set.maxDownstreamConnections == 9)
  }

  @Test func aZeroConnectionLimitNamesPathAndLine() {
    let yaml = Self.minimal(connectTimeout: "1s").replacingOccurrences(
      of: "    - filters:\n",
      with: "    - filters:\n      - name: envoy.filters.network.connection_limit\n        typed_config:\n          max_connections: 0\n")
    do {
      _ = try ConfigLoader.load(yaml: yaml)
      Issue.record("expected an error")
    } catch {
      #expect(error.path.hasSuffix("max_connections"))
      #expect(error.line == 10)
      #expect(error.description.contains("at least 1"))
    }
  }

  @Test func unknownClusterInRouteIsAnError() {
    let yaml = Self.minimal(connectTimeout: "1s").replacingOccurrences(of: "cluster: backend", with: "cluster: nowhere")
    #expect(throws: ConfigError.self) { try ConfigLoader.load(yaml: yaml) }
  }

  @Test func unsupportedFieldsAreWarnedAboutByName() throws {
    let yaml = Self.minimal(connectTimeout: "1s").replacingOccurrences(of: "    type: STATIC\n", with: "    type: STATIC\n    lb_subset_config: {}\n    frobnicate: 1\n")
    let loaded = try ConfigLoader.load(yaml: yaml)
    let paths = loaded.warnings.map(\.path)
    #expect(paths.contains("static_resources.clusters[0].frobnicate"))
    #expect(loaded.warnings.contains { $0.message.contains("'lb_subset_config' is not supported") })
  }

  @Test func lowerCaseEnumsAndV2Names() throws {
    let yaml = Self.minimal(connectTimeout: "1s").replacingOccurrences(of: "type: STATIC", with: "type: strict_dns\n    dns_lookup_family: v4_only")
      .replacingOccurrences(of: "codec_type: AUTO", with: "codec_type: http2")
    let config = try ConfigLoader.load(yaml: yaml).configuration
    #expect(config.clusters[0].type == .strictDNS)
    #expect(config.clusters[0].dnsLookupFamily == .v4Only)
    #expect(config.listeners[0].codec == .http2)
  }

  @Test func clusterWithoutEndpointsLoadsWithAWarning() throws {
    let full = Self.minimal(connectTimeout: "1s")
    let yaml = String(full[..<full.range(of: "    load_assignment:")!.lowerBound])
    let loaded = try ConfigLoader.load(yaml: yaml)
    #expect(loaded.configuration.clusters[0].endpoints.isEmpty)
    #expect(loaded.warnings.contains { $0.message.contains("no healthy upstream") })
  }

  @Test func warnsAboutTheTrapsUsersFallInto() throws {
    let yaml = """
      static_resources:
        listeners:
        - address:
            socket_address: { address: 127.0.0.1, port_value: 8080 }
          filter_chains:
          - filters:
            - name: envoy.http_connection_manager
              config:
                route_config:
                  virtual_hosts:
                  - name: v
                    domains: ["*"]
                    routes:
                    - match: { prefix: "/" }
                      route: { cluster: backend }
                    cors:
                      allow_origin_string_match: [{ prefix: "*" }]
                      allow_headers: content-type
                      expose_headers: custom-header-1
                http_filters:
                - name: envoy.grpc_web
                - name: envoy.cors
                - name: envoy.router
        clusters:
        - name: backend
          type: LOGICAL_DNS
          hosts: [{ socket_address: { address: backend, port_value: 9000 } }]
      """
    let warnings = try ConfigLoader.load(yaml: yaml).warnings
    func warning(_ path: String, _ text: String) -> ConfigWarning? {
      warnings.first { $0.path == path && $0.message.contains(text) }
    }
    let route = "static_resources.listeners[0].filter_chains[0].filters[0].config.route_config.virtual_hosts[0].routes[0].route"
    let cors = "static_resources.listeners[0].filter_chains[0].filters[0].config.route_config.virtual_hosts[0].cors"
    #expect(warning(route, "default 15 s timeout")?.line == 15)
    #expect(warning(route, "grpc-timeout deadlines are not enforced") != nil)
    #expect(warning("\(cors).allow_headers", "x-grpc-web, x-user-agent")?.line == 18)
    #expect(warning("\(cors).expose_headers", "grpc-status, grpc-message")?.line == 19)
    #expect(warning("static_resources.clusters[0].type", "STRICT_DNS on tasks.<service>")?.line == 26)
    #expect(warning("static_resources.clusters[0]", "no HTTP/2 settings") != nil)
  }

  @Test func aWellWrittenConfigGetsNoTrapWarnings() throws {
    let warnings = try ConfigLoader.load(yaml: EmbeddedDefault.yaml(listenHost: "127.0.0.1", listenPort: 8080, backendPort: 1)).warnings
    #expect(warnings.isEmpty, "\(warnings)")
  }

  @Test func embeddedDefaultLoads() throws {
    let config = try ConfigLoader.load(yaml: EmbeddedDefault.yaml(listenHost: "127.0.0.1", listenPort: 8080, backendPort: 1234)).configuration
    #expect(config.clusters[0].endpoints == [HostAndPort(host: "127.0.0.1", port: 1234)])
    #expect(config.listeners[0].routeConfig.virtualHosts[0].routes[0].timeouts.timeout == .zero)
  }

  static func minimal(connectTimeout: String) -> String {
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
              codec_type: AUTO
              stat_prefix: x
              route_config:
                virtual_hosts:
                - name: v
                  domains: ["*"]
                  routes:
                  - match: { prefix: "/" }
                    route: { cluster: backend }
              http_filters:
              - name: envoy.grpc_web
              - name: envoy.cors
              - name: envoy.router
      clusters:
      - name: backend
        type: STATIC
        http2_protocol_options: {}
        connect_timeout: \(connectTimeout)
        load_assignment:
          cluster_name: backend
          endpoints:
          - lb_endpoints:
            - endpoint:
                address:
                  socket_address: { address: 127.0.0.1, port_value: 9000 }
    """
  }
}
