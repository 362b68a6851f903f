import Foundation
import ProxyConfig
import Testing

/// Envoy's TLS messages: v3 `transport_socket`, v2 `tls_context`, SNI filter chains, clusters.
@Suite struct TLSConfigTests {
  static let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
  static let key = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"

  static func listener(chains: String, extra: String = "") -> String {
    """
    static_resources:
      listeners:
      - name: https
        address: { socket_address: { address: 127.0.0.1, port_value: 8443 } }\(extra)
        filter_chains:\(chains)
      clusters:
      - name: users
        http2_protocol_options: {}
        load_assignment:
          cluster_name: users
          endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 50051 } } } }] }]
    """
  }

  /// One filter chain; `tls` holds its fields before `filters`, written at column 0.
  static func chain(_ tls: String) -> String {
    let lines = tls.split(separator: "\n", omittingEmptySubsequences: false).map { "      " + $0 }
    return "\n    - " + lines.joined(separator: "\n").dropFirst(6) + """

          filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
              stat_prefix: x
              route_config:
                virtual_hosts: [{ name: all, domains: ["*"], routes: [{ match: { prefix: "/" }, route: { cluster: users, timeout: 0s } }] }]
              http_filters:
              - name: envoy.filters.http.router
                typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
    """
  }

  static func inline(_ text: String) -> String { "{ inline_string: \"\(text.replacingOccurrences(of: "\n", with: "\\n"))\" }" }

  /// `tls_certificates` as a flow sequence, on one line.
  static let certificates = "tls_certificates: [{ certificate_chain: \(inline(pem)), private_key: \(inline(key)) }]"

  @Test func readsADownstreamTlsContext() throws {
    let yaml = Self.listener(chains: Self.chain("""
      transport_socket_connect_timeout: 2s
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: ["h2", "http/1.1"]
            tls_params: { tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3, cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256] }
            \(Self.certificates)
            validation_context:
              trusted_ca: \(Self.inline(Self.pem))
              match_typed_subject_alt_names: [{ san_type: DNS, matcher: { exact: client } }]
      """))
    let loaded = try ConfigLoader.load(yaml: yaml)
    let tls = try #require(loaded.configuration.listeners[0].tls)
    #expect(tls.alpnProtocols == ["h2", "http/1.1"])
    #expect(tls.requireClientCertificate)
    #expect(tls.handshakeTimeout == .seconds(2))
    #expect(tls.parameters.minimumVersion == .v1_2 && tls.parameters.maximumVersion == .v1_3)
    #expect(tls.parameters.cipherSuites == ["ECDHE-RSA-AES128-GCM-SHA256"])
    #expect(tls.validation?.subjectAltNames == [SubjectAltNameMatcher(type: .dns, matcher: StringMatcher(.exact("client")))])
    #expect(!loaded.warnings.contains { $0.message.contains("TLS") })
  }

  @Test func readsTheV2TlsContextAndSNIChains() throws {
    let yaml = Self.listener(chains: Self.chain("""
      filter_chain_match: { server_names: [api.example.com, "*.example.org"] }
      tls_context: { common_tls_context: { \(Self.certificates) } }
      """) + Self.chain("""
      tls_context: { common_tls_context: { \(Self.certificates) } }
      """), extra: "\n    listener_filters: [{ name: envoy.filters.listener.tls_inspector }]")
    let loaded = try ConfigLoader.load(yaml: yaml)
    let listener = loaded.configuration.listeners[0]
    #expect(listener.serverNames == ["api.example.com", "*.example.org"])
    #expect(listener.tls != nil)
    #expect(listener.otherChains.count == 1 && listener.otherChains[0].tls != nil && listener.otherChains[0].serverNames.isEmpty)
    #expect(!loaded.warnings.contains { $0.message.contains("filter chain") || $0.message.contains("listener filter") }, "\(loaded.warnings)")
  }

  @Test func aPlaintextChainBesideTLSChainsIsAnError() throws {
    let yaml = Self.listener(chains: Self.chain("""
      filter_chain_match: { server_names: [api.example.com] }
      tls_context: { common_tls_context: { \(Self.certificates) } }
      """) + Self.chain("name: plain"))
    #expect(throws: ConfigError.self) { try ConfigLoader.load(yaml: yaml) }
  }

  @Test func aMissingCertificateFileNamesItsPathAndLine() throws {
    let yaml = Self.listener(chains: Self.chain("""
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: { filename: /nonexistent/server.crt }
              private_key: { filename: /nonexistent/server.key }
      """))
    do {
      _ = try ConfigLoader.load(yaml: yaml)
      Issue.record("loaded a configuration whose certificate does not exist")
    } catch {
      #expect(error.path.hasSuffix("tls_certificates[0].certificate_chain.filename"))
      #expect(error.line != nil)
      #expect(error.message.contains("cannot read '/nonexistent/server.crt'"))
    }
  }

  @Test func requireClientCertificateNeedsATrustedCA() throws {
    let yaml = Self.listener(chains: Self.chain("""
      tls_context: { require_client_certificate: true, common_tls_context: { \(Self.certificates) } }
      """))
    #expect(throws: ConfigError.self) { try ConfigLoader.load(yaml: yaml) }
  }

  @Test func readsAnUpstreamTlsContext() throws {
    let yaml = Self.listener(chains: Self.chain("name: plain")) + """

        transport_socket:
          name: envoy.transport_sockets.tls
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
            sni: backend.internal
            common_tls_context:
              validation_context:
                trusted_ca: \(Self.inline(Self.pem))
    """
    let cluster = try ConfigLoader.load(yaml: yaml).configuration.clusters[0]
    let tls = try #require(cluster.tls)
    #expect(tls.sni == "backend.internal")
    #expect(tls.alpnProtocols == ["h2"])
    #expect(tls.validation?.trustedCA != nil)
    #expect(tls.certificate == nil)
  }
}
