import ProxyConfig
import Testing

@Suite struct AccessLogConfigTests {
  func load(_ accessLog: String) throws -> [AccessLogConfig] {
    let yaml = """
      static_resources:
        listeners:
        - name: l
          address: { socket_address: { address: 127.0.0.1, port_value: 8080 } }
          filter_chains:
          - filters:
            - name: envoy.http_connection_manager
              config:
                stat_prefix: x
                access_log:
      \(accessLog)
                route_config:
                  virtual_hosts:
                  - name: a
                    domains: ["*"]
                    routes: [{ match: { prefix: "/" }, route: { cluster: c } }]
                http_filters: [{ name: envoy.router }]
        clusters:
        - name: c
          connect_timeout: 1s
          http2_protocol_options: {}
          load_assignment: { cluster_name: c, endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 1 } } } }] }] }
      """
    return try ConfigLoader.load(yaml: yaml).configuration.listeners[0].accessLogs
  }

  @Test func theV2FileLoggerWithItsFormat() throws {
    let logs = try load("""
                - name: envoy.file_access_log
                  config: { path: /dev/stdout, format: "%RESPONSE_CODE%\\n" }
      """)
    #expect(logs == [AccessLogConfig(sink: .stdout, format: .text("%RESPONSE_CODE%\n"))])
  }

  @Test func noFormatIsEnvoysDefault() throws {
    let logs = try load("""
                - name: envoy.access_loggers.stderr
                  typed_config: { "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog }
      """)
    #expect(logs == [AccessLogConfig(sink: .stderr, format: .text(AccessLogConfig.defaultFormat))])
  }

  @Test func anUnknownGRPCStatusNamesItsPathAndLine() throws {
    do {
      _ = try load("""
                  - name: f
                    filter: { grpc_status_filter: { statuses: [NOPE] } }
                    typed_config: { "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog }
        """)
      Issue.record("expected an error")
    } catch let error as ConfigError {
      #expect(error.message.hasPrefix("unknown gRPC status 'NOPE'"))
      #expect(error.path.hasSuffix("access_log[0].filter.grpc_status_filter.statuses[0]"))
      #expect(error.line == 12)  // the filter line, where the status is
    }
  }

  @Test func operatorsAreCutAsEnvoyCutsThem() {
    #expect(AccessLogTemplate.parse("a %REQ(X?Y):5% 100%% %START_TIME(%s)% %bad") == [
      .literal("a "), .op("REQ", argument: "X?Y", maxLength: 5), .literal(" 100% "),
      .op("START_TIME", argument: "%s", maxLength: nil), .literal(" %bad"),
    ])
  }
}

@Suite struct ConfigDumpTests {
  @Test func secretsAreRedactedAndTypesKept() throws {
    let dump = ConfigLoader.configDump(yaml: """
      admin: { address: { socket_address: { address: 127.0.0.1, port_value: 9901 } } }
      tls:
        private_key: { inline_string: "-----BEGIN PRIVATE KEY-----" }
        password: hunter2
        certificate_chain: { filename: /etc/cert.pem }
        oauth: { client_secret: s3cr3t }
      limits: { token_bucket: { max_tokens: 10 } }
      """)
    #expect(!dump.contains("BEGIN PRIVATE KEY") && !dump.contains("hunter2") && !dump.contains("s3cr3t"))
    #expect(dump.contains("\"max_tokens\" : 10"))
    #expect(dump.contains("\"private_key\" : \"[redacted]\""))
    #expect(dump.contains("\"port_value\" : 9901"))
    #expect(dump.contains("/etc/cert.pem"))
  }
}

@Suite struct JSONTextTests {
  @Test func escapesAsJSONDoes() {
    #expect(JSONText.quoted("a\"b\\c\nd\u{1}é") == #""a\"b\\c\nd\u0001é""#)
  }
}
