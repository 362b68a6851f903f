import ProxyConfig
import Testing

@Suite struct ObservabilityConfigTests {
  func load(hcm: String = "", filters: String = "", bootstrap: String = "") throws -> Listener {
    let yaml = """
      \(bootstrap)
      static_resources:
        listeners:
        - name: l
          address: { socket_address: { address: 127.0.0.1, port_value: 8080 } }
          filter_chains:
          - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: x
      \(hcm)
                route_config:
                  virtual_hosts:
                  - name: a
                    domains: ["*"]
                    routes: [{ match: { prefix: "/" }, route: { cluster: c } }]
                http_filters:
      \(filters)
                - name: envoy.filters.http.router
        clusters:
        - name: c
          connect_timeout: 1s
          http2_protocol_options: {}
          load_assignment: { cluster_name: c, endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 1 } } } }] }] }
        - name: otel
          connect_timeout: 1s
          http2_protocol_options: {}
          load_assignment: { cluster_name: otel, endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 10.0.0.7, port_value: 4317 } } } }] }] }
      """
    return try ConfigLoader.load(yaml: yaml).configuration.listeners[0]
  }

  @Test func grpcStatsAllowlistAndOptions() throws {
    let listener = try load(filters: """
                - name: envoy.filters.http.grpc_stats
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
                    enable_upstream_stats: true
                    replace_dots_in_grpc_service_name: true
                    individual_method_stats_allowlist:
                      services: [{ name: demo.User, method_names: [login] }]
      """)
    let stats = try #require(listener.grpcStats)
    #expect(stats.upstreamStats)
    #expect(stats.statName(service: "demo.User", method: "login") == "demo_User.login")
    #expect(stats.statName(service: "demo.User", method: "logout") == nil)
    #expect(!stats.statsForAllMethods)
  }

  @Test func grpcStatsDefaultCountsWithoutMethodNames() throws {
    let listener = try load(filters: "          - name: envoy.filters.http.grpc_stats")
    #expect(listener.grpcStats?.statName(service: "a.B", method: "c") == nil)
  }

  @Test func theOpenTelemetryProviderWithSampling() throws {
    let listener = try load(hcm: """
                tracing:
                  random_sampling: { value: 25 }
                  client_sampling: { value: 50.5 }
                  max_path_tag_length: 64
                  custom_tags:
                  - { tag: team, literal: { value: web } }
                  - { tag: tenant, request_header: { name: X-Tenant, default_value: none } }
                  provider:
                    name: envoy.tracers.opentelemetry
                    typed_config:
                      "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                      grpc_service: { envoy_grpc: { cluster_name: otel }, timeout: 0.25s }
                      service_name: edge
      """)
    let tracing = try #require(listener.tracing)
    #expect(tracing.collector.endpoint == "http://10.0.0.7:4317")
    #expect(tracing.serviceName == "edge")
    #expect(tracing.randomSampling == 25 && tracing.clientSampling == 50.5 && tracing.overallSampling == 100)
    #expect(tracing.maxPathTagLength == 64)
    #expect(tracing.customTags == [.literal(tag: "team", value: "web"), .requestHeader(tag: "tenant", header: "x-tenant", defaultValue: "none")])
  }

  @Test func theBootstrapProviderServesATracingBlockWithoutOne() throws {
    let listener = try load(hcm: "          tracing: {}", bootstrap: """
      tracing:
        http:
          name: envoy.tracers.opentelemetry
          typed_config:
            "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
            grpc_service: { google_grpc: { target_uri: "collector:4317", stat_prefix: otel } }
      """)
    #expect(listener.tracing?.collector.endpoint == "http://collector:4317")
  }

  @Test func aSamplingPercentOver100NamesItsLine() throws {
    do {
      _ = try load(hcm: """
                  tracing:
                    random_sampling: { value: 150 }
                    provider: { name: envoy.tracers.opentelemetry, typed_config: { grpc_service: { envoy_grpc: { cluster_name: otel } } } }
        """)
      Issue.record("expected an error")
    } catch let error as ConfigError {
      #expect(error.message.contains("from 0 to 100"))
      #expect(error.path.hasSuffix("tracing.random_sampling"))
      #expect(error.line == 13)  // the random_sampling line (the YAML starts with an empty line)
    }
  }
}

@Suite struct OutlierDetectionConfigTests {
  @Test func splitLocalOriginErrorsIsSaidNotToBeSupported() throws {
    let yaml = """
      static_resources:
        listeners: []
        clusters:
        - name: c
          connect_timeout: 1s
          http2_protocol_options: {}
          outlier_detection: { consecutive_5xx: 3, split_external_local_origin_errors: true, consecutive_local_origin_failure: 2 }
          load_assignment: { cluster_name: c, endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 1 } } } }] }] }
      """
    let loaded = try ConfigLoader.load(yaml: yaml)
    #expect(loaded.configuration.clusters[0].outlierDetection?.consecutive5xx == 3)
    let warning = try #require(loaded.warnings.first { $0.message.hasPrefix("split_external_local_origin_errors is not supported") })
    #expect(warning.path.hasSuffix("outlier_detection.split_external_local_origin_errors"))
    #expect(warning.line == 7)
  }
}
