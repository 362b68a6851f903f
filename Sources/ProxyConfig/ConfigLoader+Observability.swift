import Foundation
import Yams

// Reading what an operator sees: the grpc_stats filter and the connection manager's tracing.

extension Reader {
  /// The `envoy.filters.http.grpc_stats` filter's config (v3 `FilterConfig`).
  func grpcStats(_ body: YAMLMapping?, at filter: YAMLValue) throws(ConfigError) -> GRPCStatsConfig {
    var config = GRPCStatsConfig()
    guard let body else { return config }
    body.accept("@type")
    // The filter state object only feeds %FILTER_STATE% in logs, which the proxy does not have.
    body.accept("emit_filter_state")
    let all = body.optional("stats_for_all_methods")
    let list = body.optional("individual_method_stats_allowlist")
    if let all, list != nil {
      throw all.error("stats_for_all_methods and individual_method_stats_allowlist are one choice (a oneof in Envoy): set one of them")
    }
    if let all { config.statsForAllMethods = try Self.wrappedBool(all) }
    if let list {
      let lm = try list.mapping()
      for service in try lm.optional("services")?.sequence() ?? [] {
        let sm = try service.mapping()
        let name = try sm.required("name").string()
        var methods = config.allowlist[name] ?? []
        for method in try sm.optional("method_names")?.sequence() ?? [] { methods.insert(try method.string()) }
        config.allowlist[name] = methods
        try sm.finish(known: [], warnings: self.sink)
      }
      try lm.finish(known: [], warnings: self.sink)
    }
    config.upstreamStats = try body.optional("enable_upstream_stats")?.bool() ?? false
    config.replaceDotsInServiceName = try body.optional("replace_dots_in_grpc_service_name")?.bool() ?? false
    try body.finish(known: [], warnings: self.sink)
    return config
  }

  /// A `google.protobuf.BoolValue`: `true`, or `{value: true}`.
  static func wrappedBool(_ node: YAMLValue) throws(ConfigError) -> Bool {
    if case .mapping = node.node {
      let m = try node.mapping()
      let value = try m.optional("value")?.bool() ?? false
      try m.finish(known: [])
      return value
    }
    return try node.bool()
  }

  /// A `type.v3.Percent` (`{value: 25.5}`), 0 to 100.
  static func percent(_ node: YAMLValue) throws(ConfigError) -> Double {
    let m = try node.mapping()
    let text = try m.optional("value")?.string() ?? "0"
    try m.finish(known: [])
    guard let value = Double(text), value >= 0, value <= 100 else {
      throw node.error("a percentage from 0 to 100, found '\(text)'")
    }
    return value
  }

  /// The connection manager's `tracing`. Only the OpenTelemetry provider is supported: with any
  /// other, calls go untraced and the start-up says so.
  func tracing(_ node: YAMLValue, clusters: [Cluster]) throws(ConfigError) -> TracingConfig? {
    let m = try node.mapping()
    guard let providerNode = m.optional("provider") ?? self.scope.bootstrapTracingProvider else {
      // Envoy traces nothing without a provider either.
      m.accept("random_sampling", "client_sampling", "overall_sampling", "verbose", "custom_tags",
        "max_path_tag_length", "operation_name", "spawn_upstream_span")
      try m.finish(known: [], warnings: self.sink)
      return nil
    }
    let pm = try providerNode.mapping()
    let name = try pm.optional("name")?.string() ?? ""
    let (body, type) = try providerNode.extensionConfig(in: pm)
    try pm.finish(known: [], warnings: self.sink)
    guard name == "envoy.tracers.opentelemetry" || (type ?? "").hasSuffix("OpenTelemetryConfig") else {
      self.sink.add(providerNode, "tracing provider '\(name.isEmpty ? type ?? "" : name)' is not supported: calls are not traced. grpc-web-proxy traces with envoy.tracers.opentelemetry (OTLP/gRPC)")
      m.accept("random_sampling", "client_sampling", "overall_sampling", "verbose", "custom_tags",
        "max_path_tag_length", "operation_name", "spawn_upstream_span")
      try m.finish(known: [], warnings: self.sink)
      return nil
    }
    guard let body else { throw providerNode.error("the OpenTelemetry tracer needs a typed_config with a grpc_service") }
    body.accept("@type")
    if let http = body.optional("http_service") {
      throw http.error("http_service (OTLP over HTTP) is not supported: use grpc_service (OTLP/gRPC) to the collector")
    }
    let service = try body.required("grpc_service")
    let collector = try self.collector(service, clusters: clusters)
    let serviceName = try body.optional("service_name")?.string() ?? "unknown_service:envoy"
    body.accept("resource_detectors", "sampler")
    try body.finish(known: [], warnings: self.sink)
    var config = TracingConfig(collector: collector, serviceName: serviceName)
    if let v = m.optional("random_sampling") { config.randomSampling = try Self.percent(v) }
    if let v = m.optional("client_sampling") { config.clientSampling = try Self.percent(v) }
    if let v = m.optional("overall_sampling") { config.overallSampling = try Self.percent(v) }
    if let v = m.optional("operation_name") { config.egress = try v.string().uppercased() == "EGRESS" }
    if let v = m.optional("max_path_tag_length") { config.maxPathTagLength = max(1, try Self.wrappedInt(v)) }
    for tag in try m.optional("custom_tags")?.sequence() ?? [] {
      config.customTags.append(try self.customTag(tag))
    }
    m.accept("verbose", "spawn_upstream_span")
    try m.finish(known: [], warnings: self.sink)
    return config
  }

  static func wrappedInt(_ node: YAMLValue) throws(ConfigError) -> Int {
    if case .mapping = node.node {
      let m = try node.mapping()
      let value = try m.required("value").int()
      try m.finish(known: [])
      return value
    }
    return try node.int()
  }

  /// The collector a `grpc_service` points at: an `envoy_grpc` cluster (its first endpoint, TLS
  /// if the cluster has it) or a `google_grpc` target `host:port`.
  func collector(_ node: YAMLValue, clusters: [Cluster]) throws(ConfigError) -> TracingConfig.Collector {
    let m = try node.mapping()
    m.accept("timeout", "initial_metadata", "retry_policy")
    defer { try? m.finish(known: [], warnings: self.sink) }
    if let envoy = m.optional("envoy_grpc") {
      let em = try envoy.mapping()
      let clusterNode = try em.required("cluster_name")
      let name = try clusterNode.string()
      em.accept("authority", "retry_policy", "max_receive_message_length", "skip_envoy_headers")
      try em.finish(known: [], warnings: self.sink)
      guard let cluster = clusters.first(where: { $0.name == name }) else {
        throw clusterNode.error("the tracing collector cluster '\(name)' is not defined in static_resources.clusters")
      }
      guard let endpoint = cluster.endpoints.first, endpoint.unixSocketPath == nil else {
        throw clusterNode.error("the tracing collector cluster '\(name)' has no host:port endpoint")
      }
      return .init(host: endpoint.host, port: endpoint.port, tls: cluster.tls != nil, cluster: name)
    }
    if let google = m.optional("google_grpc") {
      let gm = try google.mapping()
      let targetNode = try gm.required("target_uri")
      let target = try targetNode.string()
      gm.accept("stat_prefix", "channel_credentials", "call_credentials", "credentials_factory_name", "config", "channel_args")
      let tls = gm.has("channel_credentials")
      try gm.finish(known: [], warnings: self.sink)
      var hostPort = Substring(target)
      for scheme in ["dns:///", "dns:", "ipv4:", "http://", "https://"] where hostPort.hasPrefix(scheme) {
        hostPort = hostPort.dropFirst(scheme.count)
      }
      guard let colon = hostPort.lastIndex(of: ":"), let port = Int(hostPort[hostPort.index(after: colon)...]) else {
        throw targetNode.error("target_uri '\(target)' needs host:port")
      }
      return .init(host: String(hostPort[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]")), port: port, tls: tls, cluster: nil)
    }
    throw node.error("grpc_service needs envoy_grpc (a cluster_name) or google_grpc (a target_uri)")
  }

  func customTag(_ node: YAMLValue) throws(ConfigError) -> TracingConfig.CustomTag {
    let m = try node.mapping()
    let tag = try m.required("tag").string()
    defer { try? m.finish(known: [], warnings: self.sink) }
    if let literal = m.optional("literal") {
      let lm = try literal.mapping()
      let value = try lm.required("value").string()
      try lm.finish(known: [])
      return .literal(tag: tag, value: value)
    }
    if let header = m.optional("request_header") {
      let hm = try header.mapping()
      let name = try hm.required("name").string().lowercased()
      let value = try hm.optional("default_value")?.string()
      try hm.finish(known: [])
      return .requestHeader(tag: tag, header: name, defaultValue: value)
    }
    if let environment = m.optional("environment") {
      let em = try environment.mapping()
      let name = try em.required("name").string()
      let value = try em.optional("default_value")?.string()
      try em.finish(known: [])
      return .environment(tag: tag, name: name, defaultValue: value)
    }
    throw node.error("custom tag '\(tag)' needs literal, request_header or environment (metadata tags are not supported)")
  }
}
