import Foundation

// Reading Envoy's TLS messages: a filter chain's `transport_socket` (v3, `DownstreamTlsContext`)
// or `tls_context` (v2), its `filter_chain_match`, and a cluster's `UpstreamTlsContext`.
// Files are checked here, so a missing or unreadable certificate is reported with its line;
// their contents are parsed by the I/O layer at start-up (and again when they change).

extension Reader {
  /// `filter_chain_match`: only `server_names` (SNI) chooses a chain; `transport_protocol: tls`
  /// is what every TLS chain means anyway.
  func filterChainMatch(_ chain: YAMLMapping) throws(ConfigError) -> [String] {
    guard let node = chain.optional("filter_chain_match") else { return [] }
    let m = try node.mapping()
    var names: [String] = []
    for item in try m.optional("server_names")?.sequence() ?? [] {
      let name = try item.string().lowercased()
      if name.isEmpty || (name.contains("*") && !(name.hasPrefix("*.") && name.dropFirst(2).allSatisfy { $0 != "*" })) {
        throw item.error("'\(name)' is not a server name: write 'example.com' or '*.example.com'")
      }
      names.append(name)
    }
    if let proto = m.optional("transport_protocol") {
      let value = try proto.string()
      guard value == "tls" || value == "raw_buffer" else {
        throw proto.error("transport_protocol '\(value)' is not known; expected tls or raw_buffer")
      }
    }
    m.accept("application_protocols")
    try m.finish(known: [], warnings: self.sink)
    return names
  }

  /// Several chains on one port are told apart by SNI, so they must all be TLS and claim
  /// different names; one chain without names is the default.
  func checkChains(_ chains: [Listener], nodes: [YAMLValue]) throws(ConfigError) {
    guard chains.count > 1 else { return }
    var seen: [String: Int] = [:]
    var defaultChain: Int?
    for (index, chain) in chains.enumerated() {
      if chain.tls == nil {
        throw nodes[index].error(
          "this listener has several filter chains, chosen by TLS server name (SNI), but this one has no TLS transport_socket; a plaintext chain needs a listener of its own")
      }
      if chain.serverNames.isEmpty {
        if let first = defaultChain {
          throw nodes[index].error("filter chains \(first) and \(index) both match every server name: give one of them filter_chain_match.server_names")
        }
        defaultChain = index
      }
      for name in chain.serverNames {
        if let first = seen[name] {
          throw nodes[index].error("server name '\(name)' is already claimed by filter chain \(first)")
        }
        seen[name] = index
      }
    }
  }

  /// `listener_filters`: `tls_inspector` is what SNI chain matching needs and is built in.
  func listenerFilters(_ m: YAMLMapping) throws(ConfigError) {
    for filter in try m.optional("listener_filters")?.sequence() ?? [] {
      let fm = try filter.mapping()
      let name = try fm.optional("name")?.string() ?? ""
      let (_, type) = try filter.extensionConfig(in: fm)
      try fm.finish(known: [], warnings: self.sink)
      if name == "envoy.filters.listener.tls_inspector" || name == "envoy.listener.tls_inspector"
        || (type?.hasSuffix("TlsInspector") ?? false)
      {
        continue
      }
      self.sink.add(filter, "listener filter '\(name.isEmpty ? type ?? "" : name)' is not supported and is ignored")
    }
  }

  // MARK: - Downstream

  /// A chain's `transport_socket` (v3, or v2 with `config`) or v2 `tls_context`.
  func downstreamTLS(_ chain: YAMLMapping) throws(ConfigError) -> DownstreamTLS? {
    let timeout = try chain.optional("transport_socket_connect_timeout")?.duration()
    let context: YAMLMapping
    if let socket = chain.optional("transport_socket") {
      guard let body = try self.transportSocket(socket, expecting: "DownstreamTlsContext") else { return nil }
      context = body
      if let legacy = chain.optional("tls_context") {
        throw legacy.error("tls_context and transport_socket both configure TLS: keep one")
      }
    } else if let legacy = chain.optional("tls_context") {
      context = try legacy.mapping()
    } else {
      if let timeout = chain.optional("transport_socket_connect_timeout") {
        self.sink.add(timeout, "transport_socket_connect_timeout has no effect on a plaintext filter chain")
      }
      return nil
    }
    let origin = Self.origin(context.at)
    let common = try context.required("common_tls_context").mapping()
    let (certificate, alpn, parameters, validation) = try self.commonTLSContext(common, server: true)
    guard let certificate else {
      throw ConfigError(path: common.child("tls_certificates"), line: common.at.line,
        message: "a TLS listener needs a certificate: tls_certificates with certificate_chain and private_key")
    }
    let require = try context.optional("require_client_certificate")?.bool() ?? false
    if require && validation?.trustedCA == nil {
      throw ConfigError(path: context.child("require_client_certificate"), line: context.at.line,
        message: "require_client_certificate needs common_tls_context.validation_context.trusted_ca: the CA that signs client certificates")
    }
    context.accept("@type", "session_timeout", "disable_stateless_session_resumption", "disable_stateful_session_resumption",
      "session_ticket_keys", "full_scan_certs_on_sni_mismatch", "prefer_client_ciphers")
    context.unsupported("require_sni", "require_sni is not enforced: a client without SNI gets the default filter chain", into: self.sink)
    context.unsupported("ocsp_staple_policy", "OCSP stapling is not supported and is ignored", into: self.sink)
    try context.finish(known: [], warnings: self.sink)
    return DownstreamTLS(
      certificate: certificate, alpnProtocols: alpn, parameters: parameters, requireClientCertificate: require,
      validation: validation, handshakeTimeout: timeout ?? DownstreamTLS.defaultHandshakeTimeout, origin: origin)
  }

  // MARK: - Upstream

  /// A cluster's `transport_socket` or v2 `tls_context` (an `UpstreamTlsContext`).
  func upstreamTLS(_ cluster: YAMLMapping) throws(ConfigError) -> UpstreamTLS? {
    let context: YAMLMapping
    if let socket = cluster.optional("transport_socket") {
      guard let body = try self.transportSocket(socket, expecting: "UpstreamTlsContext") else { return nil }
      context = body
    } else if let legacy = cluster.optional("tls_context") {
      context = try legacy.mapping()
    } else {
      return nil
    }
    let sni = try context.optional("sni")?.string()
    var certificate: TLSCertificate?
    var alpn: [String] = []
    var parameters = TLSParameters()
    var validation: CertificateValidation?
    if let commonNode = context.optional("common_tls_context") {
      (certificate, alpn, parameters, validation) = try self.commonTLSContext(try commonNode.mapping(), server: false)
    }
    if let alpnNode = context.optional("alpn_protocols") {
      alpn = try self.alpnList(alpnNode)
    }
    if !alpn.isEmpty && !alpn.contains("h2") {
      self.sink.add(context.at, "alpn_protocols does not offer h2: the proxy speaks HTTP/2 to backends and offers h2 anyway")
      alpn.insert("h2", at: 0)
    }
    context.accept("@type", "allow_renegotiation", "max_session_keys", "auto_host_sni", "auto_sni_san_validation")
    try context.finish(known: [], warnings: self.sink)
    return UpstreamTLS(sni: sni, certificate: certificate, alpnProtocols: alpn.isEmpty ? ["h2"] : alpn,
      parameters: parameters, validation: validation, origin: Self.origin(context.at))
  }

  // MARK: - Shared

  /// The body of a `transport_socket`: nil for `raw_buffer` (plaintext), the TLS context for
  /// `envoy.transport_sockets.tls`.
  func transportSocket(_ node: YAMLValue, expecting: String) throws(ConfigError) -> YAMLMapping? {
    let m = try node.mapping()
    let name = try m.optional("name")?.string() ?? ""
    let (body, type) = try node.extensionConfig(in: m)
    try m.finish(known: [], warnings: self.sink)
    if name == "envoy.transport_sockets.raw_buffer" || name == "raw_buffer" || (type?.hasSuffix("RawBuffer") ?? false) {
      return nil
    }
    let isTLS = name == "envoy.transport_sockets.tls" || name == "tls" || (type?.hasSuffix("TlsContext") ?? false)
    guard isTLS else {
      throw node.error("transport socket '\(name.isEmpty ? type ?? "" : name)' is not supported; use envoy.transport_sockets.tls")
    }
    if let type, !type.hasSuffix(expecting) {
      throw node.error("expected a \(expecting) here, found '\(type)'")
    }
    guard let body else {
      throw node.error("the TLS transport socket has no typed_config (v3) or config (v2)")
    }
    return body
  }

  func commonTLSContext(_ m: YAMLMapping, server: Bool) throws(ConfigError)
    -> (TLSCertificate?, [String], TLSParameters, CertificateValidation?)
  {
    var certificate: TLSCertificate?
    var certificates: [YAMLValue] = []
    if let node = m.optional("tls_certificates") {
      if case .mapping = node.node {
        // Seen in real v2 configs: one certificate written without the list.
        self.sink.add(node, "tls_certificates should be a list; this mapping is read as a list of one certificate")
        certificates = [YAMLValue(node: node.node, path: node.path + "[0]", line: node.line)]
      } else {
        certificates = try node.sequence()
      }
    }
    for (index, item) in certificates.enumerated() {
      let cm = try item.mapping()
      let chain = try self.tlsFile(try cm.required("certificate_chain"), expecting: "CERTIFICATE")
      let key = try self.tlsFile(try cm.required("private_key"), expecting: "PRIVATE KEY")
      let password = try cm.optional("password").map { v throws(ConfigError) in try self.tlsFile(v, expecting: nil) }
      cm.unsupported("ocsp_staple", "OCSP stapling is not supported and is ignored", into: self.sink)
      try cm.finish(known: [], warnings: self.sink)
      if index == 0 {
        certificate = TLSCertificate(certificateChain: chain, privateKey: key, password: password)
      } else {
        self.sink.add(item, "only the first of tls_certificates is served; one certificate per filter chain is supported")
      }
    }
    if let sds = m.optional("tls_certificate_sds_secret_configs") {
      throw sds.error("certificates from SDS are not supported: use tls_certificates with filename; files are reloaded when they change")
    }
    let alpn = try m.optional("alpn_protocols").map { v throws(ConfigError) in try self.alpnList(v) } ?? []
    let parameters = try m.optional("tls_params").map { v throws(ConfigError) in try self.tlsParameters(v) } ?? TLSParameters()
    var validation: CertificateValidation?
    if let vc = m.optional("validation_context") {
      validation = try self.validationContext(vc)
    }
    if let combined = m.optional("combined_validation_context") {
      let cm = try combined.mapping()
      validation = try self.validationContext(try cm.required("default_validation_context"))
      cm.unsupported("validation_context_sds_secret_config", "validation contexts from SDS are not supported", into: self.sink)
      try cm.finish(known: [], warnings: self.sink)
    }
    if let sds = m.optional("validation_context_sds_secret_config") {
      throw sds.error("validation contexts from SDS are not supported: use validation_context with trusted_ca")
    }
    m.accept("key_log")
    try m.finish(known: [], warnings: self.sink)
    return (certificate, alpn, parameters, validation)
  }

  func alpnList(_ node: YAMLValue) throws(ConfigError) -> [String] {
    // Envoy takes a list; a comma-separated string is the v2 spelling.
    if case .scalar = node.node {
      return try node.string().split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
    }
    return try node.sequence().map { v throws(ConfigError) in try v.string() }
  }

  func tlsParameters(_ node: YAMLValue) throws(ConfigError) -> TLSParameters {
    let m = try node.mapping()
    var p = TLSParameters()
    p.minimumVersion = try m.optional("tls_minimum_protocol_version")?.enumeration(TLSProtocolVersion.self)
    p.maximumVersion = try m.optional("tls_maximum_protocol_version")?.enumeration(TLSProtocolVersion.self)
    if let min = p.minimumVersion, let max = p.maximumVersion, min != .auto, max != .auto,
      TLSProtocolVersion.allCases.firstIndex(of: min)! > TLSProtocolVersion.allCases.firstIndex(of: max)!
    {
      throw node.error("tls_minimum_protocol_version \(min.rawValue) is above tls_maximum_protocol_version \(max.rawValue)")
    }
    p.cipherSuites = try m.optional("cipher_suites")?.sequence().map { v throws(ConfigError) in try v.string() } ?? []
    p.ecdhCurves = try m.optional("ecdh_curves")?.sequence().map { v throws(ConfigError) in try v.string() } ?? []
    m.unsupported("signature_algorithms", "signature_algorithms is not supported; BoringSSL's defaults are used", into: self.sink)
    try m.finish(known: [], warnings: self.sink)
    return p
  }

  func validationContext(_ node: YAMLValue) throws(ConfigError) -> CertificateValidation {
    let m = try node.mapping()
    let ca = try m.optional("trusted_ca").map { v throws(ConfigError) in try self.tlsFile(v, expecting: "CERTIFICATE") }
    var matchers: [SubjectAltNameMatcher] = []
    for item in try m.optional("match_typed_subject_alt_names")?.sequence() ?? [] {
      let im = try item.mapping()
      let type = try im.required("san_type").enumeration(SubjectAltNameMatcher.NameType.self)
      let matcher = try self.stringMatcher(try im.required("matcher"))
      im.accept("oid")
      try im.finish(known: [], warnings: self.sink)
      matchers.append(SubjectAltNameMatcher(type: type, matcher: matcher))
    }
    for item in try m.optional("match_subject_alt_names")?.sequence() ?? [] {
      matchers.append(SubjectAltNameMatcher(type: .dns, matcher: try self.stringMatcher(item)))
    }
    for item in try m.optional("verify_subject_alt_name")?.sequence() ?? [] {
      matchers.append(SubjectAltNameMatcher(type: .dns, matcher: StringMatcher(.exact(try item.string()))))
    }
    for key in ["verify_certificate_spki", "verify_certificate_hash", "crl", "custom_validator_config"] {
      m.unsupported(key, "\(key) is not supported and is ignored", into: self.sink)
    }
    m.accept("trust_chain_verification", "allow_expired_certificate", "only_verify_leaf_cert_crl", "max_verify_depth")
    if let allow = m.optional("allow_expired_certificate"), try allow.bool() {
      self.sink.add(allow, "allow_expired_certificate is not supported: expired certificates are refused")
    }
    try m.finish(known: [], warnings: self.sink)
    if ca == nil && !matchers.isEmpty {
      self.sink.add(node, "subject alt name matching without trusted_ca: the peer's name is checked but not who signed its certificate")
    }
    return CertificateValidation(trustedCA: ca, subjectAltNames: matchers)
  }

  /// A certificate, key or password `DataSource`: `filename` (checked now, watched later),
  /// `inline_string` or `inline_bytes`.
  func tlsFile(_ node: YAMLValue, expecting marker: String?) throws(ConfigError) -> TLSDataSource {
    let m = try node.mapping()
    let source: TLSDataSource
    if let fileNode = m.optional("filename") {
      let name = try fileNode.string()
      var candidates = [name]
      if !name.hasPrefix("/"), let directory = self.directory, !directory.isEmpty {
        candidates.append((directory as NSString).appendingPathComponent(name))
      }
      guard let found = candidates.first(where: { FileManager.default.isReadableFile(atPath: $0) }),
        let data = FileManager.default.contents(atPath: found)
      else {
        throw fileNode.error("cannot read '\(name)'" + (candidates.count > 1 ? " (looked in the working directory and beside the configuration)" : ""))
      }
      source = .file(found.hasPrefix("/") ? found : FileManager.default.currentDirectoryPath + "/" + found)
      let content = String(decoding: data, as: UTF8.self)
      if let marker, !(content.contains("-----BEGIN") && content.contains(marker)) {
        throw fileNode.error("'\(name)' holds no PEM \(marker.lowercased()) (a '-----BEGIN \(marker)-----' block)")
      }
    } else if let text = m.optional("inline_string") {
      let content = try text.string()
      source = .inline(content)
      if let marker, !content.contains("-----BEGIN") {
        throw text.error("inline_string holds no PEM \(marker.lowercased()) (a '-----BEGIN \(marker)-----' block)")
      }
    } else if let encoded = m.optional("inline_bytes") {
      guard let data = Data(base64Encoded: try encoded.string()) else { throw encoded.error("inline_bytes is not valid base64") }
      source = .inline(String(decoding: data, as: UTF8.self))
    } else {
      if let env = m.optional("environment_variable") {
        throw env.error("environment_variable data sources are not supported: use filename or inline_string")
      }
      throw node.error("expected filename, inline_string or inline_bytes")
    }
    m.accept("watched_directory")
    try m.finish(known: [], warnings: self.sink)
    return source
  }

  static func origin(_ node: YAMLValue) -> String {
    node.line.map { "line \($0): \(node.path)" } ?? node.path
  }
}
