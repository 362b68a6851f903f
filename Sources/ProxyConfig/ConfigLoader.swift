import Foundation
import Yams

/// A configuration read from a file, with what the reader has to say about it.
public struct LoadedConfiguration: Sendable {
  public var configuration: ProxyConfiguration
  public var warnings: [ConfigWarning]
}

/// Reads Envoy-shaped YAML (v3 `typed_config` with `@type`, and the v2 `config:` forms with the
/// `envoy.*` filter names) into a `ProxyConfiguration`.
public enum ConfigLoader {
  public static func load(file: String) throws(ConfigError) -> LoadedConfiguration {
    let text: String
    do {
      text = try String(contentsOfFile: file, encoding: .utf8)
    } catch {
      throw ConfigError(file: file, path: "", line: nil, message: "cannot read the file: \(error.localizedDescription)")
    }
    do {
      return try self.load(yaml: text, directory: (file as NSString).deletingLastPathComponent)
    } catch {
      var error = error
      error.file = file
      throw error
    }
  }

  /// - Parameter directory: where the YAML came from; a relative `filename` not found in the
  ///   working directory (where Envoy looks) is looked for there.
  public static func load(yaml: String, directory: String? = nil) throws(ConfigError) -> LoadedConfiguration {
    let root: Node
    let sink = WarningSink()
    var text = yaml
    var dropped: [ConfigWarning] = []
    while true {
      do {
        guard let node = try Yams.compose(yaml: text) else {
          throw ConfigError(path: "", line: nil, message: "the file is empty")
        }
        root = node
        break
      } catch let error as ConfigError {
        throw error
      } catch let error as YamlError {
        // A key given twice in one mapping: Envoy's reader keeps the last; so does this one, and says so.
        if case .duplicatedKeysInMapping(let keys, let context) = error, dropped.count < 32,
          let key = keys.first, let shorter = Self.droppingBlock(key: key, line: context.mark.line, in: text)
        {
          dropped.append(ConfigWarning(path: key, line: context.mark.line,
            message: "duplicate key '\(key)': this first one is ignored and the later one used, as Envoy does"))
          text = shorter
          continue
        }
        throw Self.describe(error)
      } catch {
        throw ConfigError(path: "", line: nil, message: "not valid YAML: \(error)")
      }
    }
    sink.warnings.append(contentsOf: dropped)
    var configuration = try Reader(sink: sink, directory: directory).configuration(YAMLValue(node: root, path: ""))
    configuration.source = text
    return LoadedConfiguration(configuration: configuration, warnings: sink.warnings)
  }

  static let sensitiveFields: Set<String> = [
    "private_key", "password", "pkcs12", "session_ticket_keys", "api_key", "secret", "hmac_secret",
  ]

  /// The admin port's `/config_dump`: the configuration as JSON in Envoy's envelope
  /// (`configs[].bootstrap`), with private keys, passwords and secrets shown as "[redacted]".
  public static func configDump(yaml: String) -> String {
    func convert(_ node: Node, redact: Bool) -> Any {
      if redact { return "[redacted]" }
      switch node {
      case .mapping(let m):
        var out: [String: Any] = [:]
        for (k, v) in m {
          let key = k.string ?? ""
          // The fields Envoy's config_dump marks sensitive, by name (a substring test would hide
          // `token_bucket` and its like).
          let sensitive = Self.sensitiveFields.contains(key) || key.hasSuffix("_secret")
          out[key] = convert(v, redact: sensitive)
        }
        return out
      case .sequence(let s):
        return s.map { convert($0, redact: false) }
      case .scalar(let scalar):
        if scalar.style == .plain {
          if let i = Int(scalar.string) { return i }
          if let d = Double(scalar.string) { return d }
          if scalar.string == "true" || scalar.string == "false" { return scalar.string == "true" }
          if ["", "~", "null"].contains(scalar.string) { return NSNull() }
        }
        return scalar.string
      default:
        return NSNull()
      }
    }
    let bootstrap = (try? Yams.compose(yaml: yaml)).flatMap { $0 }.map { convert($0, redact: false) } ?? [:] as [String: Any]
    let dump: [String: Any] = ["configs": [["@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": bootstrap]]]
    let data = (try? JSONSerialization.data(withJSONObject: dump, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])) ?? Data("{}".utf8)
    return String(decoding: data, as: UTF8.self) + "\n"
  }

  /// The text with the block of `key` that starts on `line` (1-based) blanked out, keeping the
  /// line count so later lines keep their numbers; nil when the layout is not a plain block.
  public static func droppingBlock(key: String, line: Int, in text: String) -> String? {
    var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    let index = line - 1
    guard lines.indices.contains(index) else { return nil }
    let first = lines[index]
    let indent = first.prefix { $0 == " " }.count
    let rest = first.dropFirst(indent)
    guard rest.hasPrefix(key + ":") || rest.hasPrefix("\"\(key)\":") || rest.hasPrefix("'\(key)':") else { return nil }
    lines[index] = ""
    var i = index + 1
    while i < lines.count {
      let current = lines[i]
      let trimmed = current.drop { $0 == " " }
      if !trimmed.isEmpty && !trimmed.hasPrefix("#") && current.prefix(while: { $0 == " " }).count <= indent {
        // A sibling, or a list item at the same indentation that belongs to the key itself.
        if !(trimmed.hasPrefix("- ") && current.prefix(while: { $0 == " " }).count == indent) { break }
      }
      lines[i] = ""
      i += 1
    }
    return lines.joined(separator: "\n")
  }

  private static func describe(_ error: YamlError) -> ConfigError {
    switch error {
    case .duplicatedKeysInMapping(let duplicates, let context):
      return ConfigError(
        path: "",
        line: context.mark.line,
        message: "duplicate key \(duplicates.map { "'\($0)'" }.joined(separator: ", ")) in one mapping"
      )
    case .scanner(let context, let problem, let mark, _), .parser(let context, let problem, let mark, _):
      let what = [context?.text, problem].compactMap { $0 }.filter { !$0.isEmpty }.joined(separator: ": ")
      return ConfigError(path: "", line: mark.line, message: "not valid YAML: \(what)")
    default:
      return ConfigError(path: "", line: nil, message: "not valid YAML: \(error)")
    }
  }
}

/// Walks the YAML tree. Each function reads one Envoy message and says, through `finish`, which
/// of its fields were not understood.
struct Reader {
  let sink: WarningSink
  let directory: String?
  /// What the connection manager being read says that its routes need to know.
  let scope = Scope()

  final class Scope {
    /// The names the chain's CORS filter goes by: a `typed_per_filter_config` key must be one.
    var corsFilterNames: Set<String> = []
    /// The bootstrap's `tracing.http` provider (Envoy's older place for it), used by a
    /// connection manager whose `tracing` names no provider of its own.
    var bootstrapTracingProvider: YAMLValue?
  }

  func configuration(_ root: YAMLValue) throws(ConfigError) -> ProxyConfiguration {
    let top = try root.mapping()
    if top.has("listeners") && !top.has("static_resources") {
      throw root.error(
        "this is Envoy's v1 configuration format (top-level 'listeners'), which Envoy itself removed; write it as v3 'static_resources'"
      )
    }
    let resources = try top.required("static_resources").mapping()
    var admin: Admin?
    if let adminNode = top.optional("admin") {
      admin = try self.admin(adminNode)
    }
    top.unsupported("layered_runtime", "runtime layers are not supported and are ignored", into: self.sink)
    top.unsupported("node", "the node identity is only used by Envoy's xDS and is ignored", into: self.sink)
    if let dynamic = top.optional("dynamic_resources") {
      throw dynamic.error("dynamic_resources (xDS) is not supported: configure listeners and clusters in static_resources")
    }
    let maxDownstream = try self.globalConnectionLimit(top.optional("overload_manager"))
    top.accept("stats_sinks", "stats_config", "watchdog")
    if let tracing = top.optional("tracing") {
      let tm = try tracing.mapping()
      self.scope.bootstrapTracingProvider = tm.optional("http")
      try tm.finish(known: [], warnings: self.sink)
    }
    try top.finish(known: [], warnings: self.sink)

    var clusters: [Cluster] = []
    for node in try resources.optional("clusters")?.sequence() ?? [] {
      let cluster = try self.cluster(node)
      if clusters.contains(where: { $0.name == cluster.name }) {
        throw node.error("a cluster named '\(cluster.name)' is already defined")
      }
      clusters.append(cluster)
    }
    var listeners: [Listener] = []
    for node in try resources.required("listeners").sequence() {
      let listener = try self.listener(node, clusters: clusters)
      if listeners.contains(where: { $0.name == listener.name }) {
        // Envoy keeps the first listener of a name and ignores the rest.
        self.sink.add(node, "a second listener named '\(listener.name)' is ignored, as Envoy ignores it: give each listener its own name")
        continue
      }
      if listener.address.port != 0, let other = listeners.first(where: { $0.address == listener.address }) {
        throw node.error("listener '\(listener.name)' wants \(listener.address), which listener '\(other.name)' already has")
      }
      listeners.append(listener)
    }
    try resources.finish(known: [], warnings: self.sink)
    var configuration = ProxyConfiguration(listeners: listeners, clusters: clusters, admin: admin)
    configuration.maxDownstreamConnections = maxDownstream
    return configuration
  }

  func admin(_ node: YAMLValue) throws(ConfigError) -> Admin {
    let m = try node.mapping()
    let address = try m.optional("address").map { v throws(ConfigError) in try self.address(v) }
    m.accept("profile_path")
    var admin = Admin(address: address)
    if let path = try m.optional("access_log_path")?.string() {
      let sink: AccessLogConfig.Sink = path == "/dev/stdout" ? .stdout : path == "/dev/stderr" ? .stderr : .file(path: path)
      admin.accessLogs.append(AccessLogConfig(sink: sink))
    }
    if let logs = m.optional("access_log") { admin.accessLogs += try self.accessLogs(logs) }
    try m.finish(known: [], warnings: self.sink)
    return admin
  }

  /// - Parameter allowPipe: an upstream endpoint may be a unix socket (`pipe: {path}`).
  func address(_ node: YAMLValue, allowPipe: Bool = false) throws(ConfigError) -> HostAndPort {
    let m = try node.mapping()
    if let pipe = m.optional("pipe") {
      guard allowPipe else { throw pipe.error("listening on a unix socket is not supported; use socket_address") }
      let pm = try pipe.mapping()
      let path = try pm.required("path").string()
      pm.accept("mode")
      try pm.finish(known: [], warnings: self.sink)
      return HostAndPort(unixSocket: path)
    }
    let socket = try m.required("socket_address").mapping()
    let host = try socket.required("address").string()
    let portNode = try socket.required("port_value")
    let port = try portNode.int()
    guard (0...65535).contains(port) else { throw portNode.error("port \(port) is out of range 0-65535") }
    socket.accept("protocol", "ipv4_compat")
    try socket.finish(known: [], warnings: self.sink)
    try m.finish(known: [], warnings: self.sink)
    return HostAndPort(host: host, port: port)
  }

  // MARK: - Listeners

  func listener(_ node: YAMLValue, clusters: [Cluster]) throws(ConfigError) -> Listener {
    let m = try node.mapping()
    let name = try m.optional("name")?.string() ?? node.path
    let address = try self.address(try m.required("address"))
    let chains = try m.required("filter_chains").sequence()
    guard !chains.isEmpty else {
      throw ConfigError(path: m.child("filter_chains"), line: node.line, message: "a listener needs at least one filter chain")
    }
    var read: [Listener] = []
    for chainNode in chains {
      read.append(try self.filterChain(chainNode, name: name, address: address, clusters: clusters))
    }
    try self.checkChains(read, nodes: chains)
    var listener = read[0]
    listener.otherChains = Array(read.dropFirst())
    if let limit = m.optional("per_connection_buffer_limit_bytes") {
      let value = try limit.int()
      guard value >= 1024 else { throw limit.error("per_connection_buffer_limit_bytes below 1024 would stall every call; found \(value)") }
      listener.bufferLimit = value
      for i in listener.otherChains.indices { listener.otherChains[i].bufferLimit = value }
    }
    m.accept("traffic_direction", "stat_prefix")
    try self.listenerFilters(m)
    try m.finish(known: [], warnings: self.sink)
    return listener
  }

  /// One filter chain: its match, its transport socket and its http_connection_manager.
  /// The overload manager's global connection limit; its other monitors and actions are taken
  /// as written and not acted on.
  func globalConnectionLimit(_ node: YAMLValue?) throws(ConfigError) -> Int? {
    guard let node else { return nil }
    let m = try node.mapping()
    var limit: Int?
    for monitor in (try m.optional("resource_monitors")?.sequence()) ?? [] {
      let mm = try monitor.mapping()
      let name = try mm.optional("name")?.string() ?? ""
      let (body, type) = try monitor.extensionConfig(in: mm)
      guard name.contains("global_downstream_max_connections") || (type?.contains("DownstreamConnectionsConfig") ?? false),
        let body
      else { continue }
      let value = try body.required("max_active_downstream_connections")
      limit = try value.int()
      guard limit! >= 1 else { throw value.error("max_active_downstream_connections must be at least 1") }
    }
    for key in m.keys { m.accept(key) }
    return limit
  }

  func filterChain(_ node: YAMLValue, name: String, address: HostAndPort, clusters: [Cluster]) throws(ConfigError) -> Listener {
    let chain = try node.mapping()
    let filtersNode = try chain.required("filters")
    var filters: [YAMLValue]
    if case .mapping = filtersNode.node {
      // Envoy's own reader refuses this; the intent is plain, so read it as a list of one.
      self.sink.add(filtersNode, "'filters' should be a list of filters (each item starting with '- name:'); this mapping is read as a list of one filter (Envoy refuses it)")
      filters = [YAMLValue(node: filtersNode.node, path: filtersNode.path + "[0]", line: filtersNode.line)]
    } else {
      filters = try filtersNode.sequence()
    }
    var hcm: Listener?
    var maxConnections: Int?
    for filter in filters {
      let fm = try filter.mapping()
      let filterName = try fm.optional("name")?.string() ?? ""
      let (body, type) = try filter.extensionConfig(in: fm)
      try fm.finish(known: [], warnings: self.sink)
      let isHCM =
        filterName == "envoy.filters.network.http_connection_manager" || filterName == "envoy.http_connection_manager"
        || (type?.hasSuffix("HttpConnectionManager") ?? false)
      if filterName == "envoy.filters.network.connection_limit" || (type?.hasSuffix("connection_limit.v3.ConnectionLimit") ?? false),
        let body
      {
        let cm = body
        let limit = try cm.required("max_connections")
        maxConnections = try limit.int()
        guard maxConnections! >= 1 else { throw limit.error("max_connections must be at least 1") }
        cm.accept("stat_prefix", "@type")
        cm.unsupported("delay", "connection_limit's delay is not applied: connections over the limit are closed at once", into: self.sink)
        cm.unsupported("runtime_enabled", "connection_limit's runtime_enabled is ignored: the limit is always on", into: self.sink)
        try cm.finish(known: [], warnings: self.sink)
        continue
      }
      guard isHCM else {
        self.sink.add(filter, "network filter '\(filterName)' is not supported and is ignored")
        continue
      }
      guard let body else {
        throw filter.error("the http_connection_manager filter has no typed_config (v3) or config (v2)")
      }
      hcm = try self.httpConnectionManager(body, name: name, address: address, clusters: clusters)
    }
    guard var listener = hcm else {
      throw filtersNode.error("no http_connection_manager filter in this filter chain: nothing to serve")
    }
    listener.maxConnections = maxConnections
    listener.serverNames = try self.filterChainMatch(chain)
    listener.tls = try self.downstreamTLS(chain)
    try chain.finish(known: ["name"], warnings: self.sink)
    return listener
  }

  func httpConnectionManager(
    _ m: YAMLMapping,
    name: String,
    address: HostAndPort,
    clusters: [Cluster]
  ) throws(ConfigError) -> Listener {
    let accessLogs = try m.optional("access_log").map { v throws(ConfigError) in try self.accessLogs(v) } ?? []
    m.accept("@type", "stat_prefix", "use_remote_address", "xff_num_trusted_hops", "generate_request_id",
      "server_name", "http_protocol_options", "http2_protocol_options",
      "request_timeout", "upgrade_configs", "normalize_path", "merge_slashes",
      "skip_xff_append", "via", "forward_client_cert_details", "set_current_client_cert_details")
    let tracing = try m.optional("tracing").flatMap { v throws(ConfigError) in try self.tracing(v, clusters: clusters) }
    let codec = try m.optional("codec_type")?.enumeration(CodecType.self) ?? .auto
    let streamIdle = try m.optional("stream_idle_timeout")?.duration()
    let headersTimeout = try m.optional("request_headers_timeout")?.duration()
    var idleTimeout: ProxyDuration? = .seconds(3600)
    var limits = HeaderLimits()
    if let kb = m.optional("max_request_headers_kb") {
      let value = try kb.int()
      // Envoy's bounds for the field: more than 0, at most 8192.
      guard value > 0 && value <= 8192 else { throw kb.error("max_request_headers_kb must be from 1 to 8192, found \(value)") }
      limits.maxBytes = value * 1024
    }
    if let common = m.optional("common_http_protocol_options") {
      let cm = try common.mapping()
      if let count = cm.optional("max_headers_count") {
        let value = try count.int()
        guard value >= 1 else { throw count.error("max_headers_count must be at least 1, found \(value)") }
        limits.maxCount = value
      }
      if let idle = try cm.optional("idle_timeout")?.duration() {
        idleTimeout = idle.isZero ? nil : idle
      }
      // The rest of these options (idle_timeout, max_stream_duration, ...) are taken as Envoy's
      // users write them and not acted on here.
      for key in cm.keys { cm.accept(key) }
    }
    if let rds = m.optional("rds") {
      throw rds.error("rds (routes from xDS) is not supported: put the routes in route_config")
    }
    // The per-filter configs in the routes are looked up by the filter's name in the chain.
    self.scope.corsFilterNames = ["envoy.filters.http.cors", "envoy.cors"]
    for filter in (try? m.required("http_filters").sequence()) ?? [] {
      guard let fm = try? filter.mapping(), let name = try? fm.optional("name")?.string() else { continue }
      let type = (try? filter.extensionConfig(in: fm))?.1 ?? ""
      if name.contains("cors") || type.contains("filters.http.cors") { self.scope.corsFilterNames.insert(name) }
    }
    let routeConfig = try self.routeConfiguration(try m.required("route_config"), clusters: clusters)
    var grpcWeb = false
    var cors = false
    var router = false
    var grpcStats: GRPCStatsConfig?
    for filter in try m.required("http_filters").sequence() {
      let fm = try filter.mapping()
      let filterName = try fm.optional("name")?.string() ?? ""
      let (body, type) = try filter.extensionConfig(in: fm)
      fm.accept("disabled", "is_optional")
      try fm.finish(known: [], warnings: self.sink)
      let type_ = type ?? ""
      if filterName == "envoy.filters.http.grpc_web" || filterName == "envoy.grpc_web" || type_.contains("grpc_web") {
        grpcWeb = true
      } else if filterName == "envoy.filters.http.cors" || filterName == "envoy.cors" || type_.contains("filters.http.cors") {
        cors = true
      } else if filterName == "envoy.filters.http.router" || filterName == "envoy.router" || type_.contains("router") {
        router = true
      } else if filterName == "envoy.filters.http.grpc_stats" || type_.contains("grpc_stats") {
        grpcStats = try self.grpcStats(body, at: filter)
      } else {
        let shown = filterName.isEmpty ? type_ : filterName
        let guards = ["ext_authz", "ext_proc", "jwt_authn", "rbac", "oauth2", "basic_auth", "local_ratelimit", "ratelimit", "csrf"]
        if guards.contains(where: { shown.contains($0) || type_.contains($0) }) {
          // Requests go through unchecked: say it so that no one mistakes it for protection.
          self.sink.add(filter, "http filter '\(shown)' is not supported and is skipped: requests are NOT checked or limited by it. Put that check in front of the proxy or in the backend")
        } else {
          self.sink.add(filter, "http filter '\(shown)' is not supported and is skipped")
        }
      }
    }
    if !router {
      self.sink.add(m.at, "no router filter in http_filters: Envoy would answer every request with 404; grpc-web-proxy routes anyway")
    }
    try m.finish(known: [], warnings: self.sink)
    var listener = Listener(
      name: name,
      address: address,
      codec: codec,
      routeConfig: routeConfig,
      grpcWebEnabled: grpcWeb,
      corsEnabled: cors
    )
    if let streamIdle, !streamIdle.isZero { listener.streamIdleTimeout = streamIdle }
    listener.headerLimits = limits
    listener.idleTimeout = idleTimeout
    if let headersTimeout, !headersTimeout.isZero { listener.requestHeadersTimeout = headersTimeout }
    // Required by Envoy; without one the stats are named after the listener.
    if let prefix = try m.optional("stat_prefix")?.string(), !prefix.isEmpty { listener.statPrefix = prefix }
    listener.accessLogs = accessLogs
    listener.grpcStats = grpcStats
    listener.tracing = tracing
    return listener
  }

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

  // MARK: - Routes

  func routeConfiguration(_ node: YAMLValue, clusters: [Cluster]) throws(ConfigError) -> RouteConfiguration {
    let m = try node.mapping()
    m.accept("name", "validate_clusters")
    // Envoy refuses a direct_response body over this size; so does the proxy, with the line.
    let maxBody = try m.optional("max_direct_response_body_size_bytes")?.int() ?? 4096
    var hosts: [VirtualHost] = []
    for vh in try m.optional("virtual_hosts")?.sequence() ?? [] {
      hosts.append(try self.virtualHost(vh, clusters: clusters, maxBody: maxBody))
    }
    let request = try self.headerMutations(m, "request")
    let response = try self.headerMutations(m, "response")
    let mostSpecificWins = try m.optional("most_specific_header_mutations_wins")?.bool() ?? false
    try m.finish(known: [], warnings: self.sink)
    return RouteConfiguration(virtualHosts: hosts, requestHeaders: request, responseHeaders: response,
      mostSpecificHeaderMutationsWins: mostSpecificWins)
  }

  /// `<side>_headers_to_add` and `<side>_headers_to_remove` of one level.
  func headerMutations(_ m: YAMLMapping, _ side: String) throws(ConfigError) -> HeaderMutations {
    var mutations = HeaderMutations()
    for item in try m.optional("\(side)_headers_to_add")?.sequence() ?? [] {
      let option = try item.mapping()
      let headerNode = try option.required("header")
      let header = try headerNode.mapping()
      let keyNode = try header.required("key")
      let name = try keyNode.string().lowercased()
      guard !name.isEmpty, !name.hasPrefix(":") else {
        throw keyNode.error("'\(name)' cannot be set: pseudo-headers are the proxy's to write")
      }
      let valueNode = header.optional("value") ?? header.optional("raw_value")
      let text = try valueNode?.string() ?? ""
      try header.finish(known: [])
      var action = HeaderMutations.Action.APPEND_IF_EXISTS_OR_ADD
      if let appendNode = option.optional("append") {
        action = try appendNode.bool() ? .APPEND_IF_EXISTS_OR_ADD : .OVERWRITE_IF_EXISTS_OR_ADD
      }
      if let actionNode = option.optional("append_action") {
        action = try actionNode.enumeration(HeaderMutations.Action.self)
      }
      let keepEmpty = try option.optional("keep_empty_value")?.bool() ?? false
      try option.finish(known: [])
      mutations.add.append(.init(name: name, value: self.headerValue(text, at: valueNode ?? headerNode), action: action, keepEmptyValue: keepEmpty))
    }
    for item in try m.optional("\(side)_headers_to_remove")?.sequence() ?? [] {
      let name = try item.string().lowercased()
      guard !name.hasPrefix(":"), name != "host" else {
        throw item.error("'\(name)' cannot be removed: the request needs it")
      }
      mutations.remove.append(name)
    }
    return mutations
  }

  /// Envoy's header value: text with `%REQ(name)%` (a request header) and `%%` (a percent sign).
  /// Other `%...%` commands are sent as written, with a warning.
  func headerValue(_ text: String, at node: YAMLValue) -> [HeaderMutations.ValuePart] {
    var parts: [HeaderMutations.ValuePart] = []
    var literal = ""
    var rest = Substring(text)
    while let start = rest.firstIndex(of: "%") {
      literal += rest[..<start]
      let afterStart = rest.index(after: start)
      guard let end = rest[afterStart...].firstIndex(of: "%") else {
        literal += rest[start...]
        rest = ""
        break
      }
      let command = rest[afterStart..<end]
      if command.isEmpty {
        literal += "%"
      } else if command.hasPrefix("REQ("), command.hasSuffix(")") {
        if !literal.isEmpty { parts.append(.text(literal)) }
        literal = ""
        parts.append(.requestHeader(command.dropFirst(4).dropLast().lowercased()))
      } else {
        self.sink.add(node, "'%\(command)%' is not supported in header values; it is sent as written")
        literal += rest[start...end]
      }
      rest = rest[rest.index(after: end)...]
    }
    literal += rest
    if !literal.isEmpty || parts.isEmpty { parts.append(.text(literal)) }
    return parts
  }

  func virtualHost(_ node: YAMLValue, clusters: [Cluster], maxBody: Int) throws(ConfigError) -> VirtualHost {
    let m = try node.mapping()
    let name = try m.optional("name")?.string() ?? ""
    let domainsNode = try m.required("domains")
    let domains = try domainsNode.sequence().map { v throws(ConfigError) in try v.string() }
    if domains.isEmpty { throw domainsNode.error("a virtual host needs at least one domain (\"*\" matches all)") }
    var cors = try m.optional("cors").map { v throws(ConfigError) in try self.corsPolicy(v) }
    if let perFilter = try self.perFilterCORS(m) { cors = perFilter.layered(over: cors) }
    var routes: [Route] = []
    for route in try m.optional("routes")?.sequence() ?? [] {
      routes.append(try self.route(route, clusters: clusters, maxBody: maxBody))
    }
    let request = try self.headerMutations(m, "request")
    let response = try self.headerMutations(m, "response")
    m.unsupported("require_tls", "require_tls is not supported yet and is ignored", into: self.sink)
    m.unsupported("retry_policy", "virtual host retry_policy is not supported yet and is ignored", into: self.sink)
    try m.finish(known: [], warnings: self.sink)
    return VirtualHost(name: name, domains: domains, routes: routes, cors: cors, requestHeaders: request, responseHeaders: response)
  }

  func perFilterCORS(_ m: YAMLMapping) throws(ConfigError) -> CORSPolicy? {
    guard let tpfc = m.optional("typed_per_filter_config") else { return nil }
    let filters = try tpfc.mapping()
    var policy: CORSPolicy?
    for key in filters.keys {
      guard let value = filters.optional(key) else { continue }
      let body = try value.mapping()
      let type = try body.optional("@type")?.string() ?? ""
      if self.scope.corsFilterNames.contains(key) {
        policy = try self.corsPolicy(body)
      } else if key.contains("cors") || type.contains("CorsPolicy") {
        // Envoy finds a per-filter config by the filter's name; this one reaches no filter.
        let names = self.scope.corsFilterNames.sorted().map { "'\($0)'" }.joined(separator: " or ")
        self.sink.add(value, "per-filter config key '\(key)' names no filter of the chain, so this CORS policy is ignored, as Envoy ignores it: write \(names)")
      } else {
        self.sink.add(value, "per-filter config for '\(key)' is not supported and is ignored")
      }
    }
    return policy
  }

  func route(_ node: YAMLValue, clusters: [Cluster], maxBody: Int) throws(ConfigError) -> Route {
    let m = try node.mapping()
    let name = try m.optional("name")?.string()
    let match = try self.routeMatch(try m.required("match"))
    var timeouts = RouteTimeouts()
    var prefixRewrite: String?
    var cors: CORSPolicy?
    var regexRewrite: Route.RegexRewrite?
    var hostRewrite: String?
    var retryPolicy: Route.RetryPolicy?
    let action: Route.Action
    if let routeNode = m.optional("route") {
      let r = try routeNode.mapping()
      func known(_ node: YAMLValue) throws(ConfigError) -> String {
        let name = try node.string()
        if !clusters.contains(where: { $0.name == name }) {
          throw node.error("no cluster named '\(name)' in static_resources.clusters")
        }
        return name
      }
      if let clusterNode = r.optional("cluster") {
        action = .cluster(try known(clusterNode))
      } else if let weighted = r.optional("weighted_clusters") {
        let wm = try weighted.mapping()
        var list: [Route.WeightedCluster] = []
        for item in try wm.required("clusters").sequence() {
          let im = try item.mapping()
          let name = try known(try im.required("name"))
          let weight = try im.optional("weight")?.int() ?? 0
          var cluster = Route.WeightedCluster(name: name, weight: max(0, weight))
          cluster.requestHeaders = try self.headerMutations(im, "request")
          cluster.responseHeaders = try self.headerMutations(im, "response")
          im.accept("metadata_match", "typed_per_filter_config", "host_rewrite_literal")
          try im.finish(known: [], warnings: self.sink)
          list.append(cluster)
        }
        wm.accept("total_weight", "runtime_key_prefix", "header_name")
        try wm.finish(known: [], warnings: self.sink)
        guard list.contains(where: { $0.weight > 0 }) else { throw weighted.error("weighted_clusters needs a cluster with a weight above 0") }
        action = .weightedClusters(list)
      } else if let header = r.optional("cluster_header") {
        let name = try header.string().lowercased()
        guard !name.isEmpty, !name.hasPrefix(":") else { throw header.error("cluster_header must name a request header") }
        action = .clusterHeader(name)
      } else {
        throw routeNode.error("the route names no 'cluster', 'weighted_clusters' or 'cluster_header'")
      }
      timeouts.timeout = try r.optional("timeout")?.duration()
      timeouts.maxGrpcTimeout = try r.optional("max_grpc_timeout")?.duration()
      timeouts.grpcTimeoutOffset = try r.optional("grpc_timeout_offset")?.duration()
      if let msd = r.optional("max_stream_duration") {
        let mm = try msd.mapping()
        timeouts.maxStreamDuration = try mm.optional("max_stream_duration")?.duration()
        timeouts.grpcTimeoutHeaderMax = try mm.optional("grpc_timeout_header_max")?.duration()
        timeouts.grpcTimeoutHeaderOffset = try mm.optional("grpc_timeout_header_offset")?.duration()
        try mm.finish(known: [])
      }
      prefixRewrite = try r.optional("prefix_rewrite")?.string()
      cors = try r.optional("cors").map { v throws(ConfigError) in try self.corsPolicy(v) }
      timeouts.idleTimeout = try r.optional("idle_timeout")?.duration()
      if let rr = r.optional("regex_rewrite") {
        let rm = try rr.mapping()
        let patternNode = try rm.required("pattern")
        let pm = try patternNode.mapping()
        let pattern = try pm.required("regex").string()
        pm.accept("google_re2")
        try pm.finish(known: [])
        guard (try? NSRegularExpression(pattern: pattern)) != nil else { throw patternNode.error("'\(pattern)' is not a valid regular expression") }
        regexRewrite = .init(pattern: pattern, substitution: try rm.required("substitution").string())
        try rm.finish(known: [])
      }
      hostRewrite = try r.optional("host_rewrite_literal")?.string()
      if let rp = r.optional("retry_policy") { retryPolicy = try self.retryPolicy(rp) }
      r.accept("auto_host_rewrite", "cluster_not_found_response_code")
      try r.finish(known: [], warnings: self.sink)
      self.lintTimeouts(timeouts, at: routeNode)
    } else if let direct = m.optional("direct_response") {
      let d = try direct.mapping()
      let statusNode = try d.required("status")
      let status = try statusNode.int()
      guard (200...599).contains(status) else { throw statusNode.error("status \(status) is not an HTTP status (200-599)") }
      var body: [UInt8]?
      if let b = d.optional("body") {
        body = try self.dataSource(b)
        if let body, body.count > maxBody {
          throw b.error("the body is \(body.count) bytes, more than max_direct_response_body_size_bytes (\(maxBody)) of the route_config allows")
        }
      }
      try d.finish(known: [], warnings: self.sink)
      action = .directResponse(status: status, body: body)
    } else if let redirect = m.optional("redirect") {
      throw redirect.error("redirect routes are not supported yet")
    } else {
      throw node.error("a route needs 'route' (with a cluster) or 'direct_response'")
    }
    if let perFilter = try self.perFilterCORS(m) { cors = perFilter.layered(over: cors) }
    let request = try self.headerMutations(m, "request")
    let response = try self.headerMutations(m, "response")
    m.accept("decorator", "metadata")
    try m.finish(known: [], warnings: self.sink)
    var route = Route(name: name, match: match, action: action, timeouts: timeouts, prefixRewrite: prefixRewrite, cors: cors,
      requestHeaders: request, responseHeaders: response)
    route.regexRewrite = regexRewrite
    route.hostRewrite = hostRewrite
    route.retryPolicy = retryPolicy
    return route
  }

  func retryPolicy(_ node: YAMLValue) throws(ConfigError) -> Route.RetryPolicy {
    let m = try node.mapping()
    var conditions = Set<Route.RetryPolicy.Condition>()
    if let on = m.optional("retry_on") {
      for word in try on.string().split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces).lowercased() }) where !word.isEmpty {
        if let condition = Route.RetryPolicy.Condition(rawValue: word) {
          conditions.insert(condition)
        } else {
          self.sink.add(on, "retry_on '\(word)' is not supported and is ignored")
        }
      }
    }
    let retries = try m.optional("num_retries")?.int() ?? 1
    let perTry = try m.optional("per_try_timeout")?.duration()
    var codes = Set<Int>()
    for code in try m.optional("retriable_status_codes")?.sequence() ?? [] { codes.insert(try code.int()) }
    m.accept("retry_back_off", "retry_host_predicate", "host_selection_retry_max_attempts", "retriable_headers",
      "retriable_request_headers", "per_try_idle_timeout", "retry_priority", "rate_limited_retry_back_off")
    try m.finish(known: [], warnings: self.sink)
    return .init(retryOn: conditions, numRetries: max(0, retries), perTryTimeout: perTry, retriableStatusCodes: codes)
  }

  /// Envoy's `DataSource`: `inline_string`, `inline_bytes` (base64) or `filename`, read now.
  func dataSource(_ node: YAMLValue) throws(ConfigError) -> [UInt8] {
    let m = try node.mapping()
    defer { try? m.finish(known: [], warnings: self.sink) }
    if let text = m.optional("inline_string") {
      return Array(try text.string().utf8)
    }
    if let encoded = m.optional("inline_bytes") {
      guard let data = Data(base64Encoded: try encoded.string()) else { throw encoded.error("inline_bytes is not valid base64") }
      return Array(data)
    }
    if let fileNode = m.optional("filename") {
      let name = try fileNode.string()
      var candidates = [name]
      if !name.hasPrefix("/"), let directory = self.directory, !directory.isEmpty {
        candidates.append((directory as NSString).appendingPathComponent(name))
      }
      for candidate in candidates {
        if let data = FileManager.default.contents(atPath: candidate) { return Array(data) }
      }
      throw fileNode.error("cannot read '\(name)'" + (candidates.count > 1 ? " (looked in the working directory and beside the configuration)" : ""))
    }
    throw node.error("a body needs inline_string, inline_bytes or filename")
  }

  /// The two timeout traps of gRPC routes (protocol doc T2, issues envoy#17697 and #10184).
  func lintTimeouts(_ t: RouteTimeouts, at node: YAMLValue) {
    let usesStreamDuration = t.maxStreamDuration != nil || t.grpcTimeoutHeaderMax != nil
    if t.timeout == nil && !usesStreamDuration {
      self.sink.add(node,
        "this route keeps Envoy's default 15 s timeout: a server stream is cut off after 15 s and the browser sees a broken call. For gRPC set 'timeout: 0s' and bound calls with the client's grpc-timeout ('max_stream_duration: {grpc_timeout_header_max: 0s}')")
    }
    if t.maxGrpcTimeout == nil && t.grpcTimeoutHeaderMax == nil {
      self.sink.add(node,
        "clients' grpc-timeout deadlines are not enforced on this route: without max_grpc_timeout or max_stream_duration.grpc_timeout_header_max they are ignored, as in Envoy. Add 'max_stream_duration: {grpc_timeout_header_max: 0s}'")
    }
  }

  /// CORS settings that make every gRPC-Web call fail in a browser, or its errors unreadable.
  func lintCORS(_ policy: CORSPolicy, at m: YAMLMapping) {
    func tokens(_ list: String?) -> Set<String> {
      Set((list ?? "").lowercased().split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
    }
    let allow = tokens(policy.allowHeaders)
    if policy.allowHeaders != nil, !allow.contains("*") {
      let missing = ["x-grpc-web", "x-user-agent", "content-type"].filter { !allow.contains($0) }
      if !missing.isEmpty {
        self.sink.add(m.optional("allow_headers") ?? m.at,
          "allow_headers lacks \(missing.joined(separator: ", ")): gRPC-Web clients send them, so the browser's preflight is refused and every call fails with a CORS error. Add them to allow_headers")
      }
    }
    let expose = tokens(policy.exposeHeaders)
    if !expose.contains("*") {
      let missing = ["grpc-status", "grpc-message"].filter { !expose.contains($0) }
      if !missing.isEmpty {
        self.sink.add(m.optional("expose_headers") ?? m.at,
          "expose_headers lacks \(missing.joined(separator: ", ")): browsers hide them from JavaScript, so errors sent as headers (trailers-only) reach the client without their status. Add them to expose_headers")
      }
    }
  }

  func routeMatch(_ node: YAMLValue) throws(ConfigError) -> RouteMatch {
    let m = try node.mapping()
    let path: RouteMatch.PathMatch
    if let p = m.optional("prefix") {
      path = .prefix(try p.string())
    } else if let p = m.optional("path") {
      path = .path(try p.string())
    } else if let r = m.optional("safe_regex") {
      let rm = try r.mapping()
      let regex = try rm.required("regex").string()
      rm.accept("google_re2")
      try rm.finish(known: [])
      guard (try? NSRegularExpression(pattern: regex)) != nil else { throw r.error("'\(regex)' is not a valid regular expression") }
      path = .regex(regex)
    } else {
      throw node.error("a route match needs 'prefix', 'path' or 'safe_regex'")
    }
    let caseSensitive = try m.optional("case_sensitive")?.bool() ?? true
    var headers: [HeaderMatcher] = []
    for h in try m.optional("headers")?.sequence() ?? [] {
      headers.append(try self.headerMatcher(h))
    }
    var query: [HeaderMatcher] = []
    for q in try m.optional("query_parameters")?.sequence() ?? [] {
      let qm = try q.mapping()
      let name = try qm.required("name").string()
      if let present = qm.optional("present_match") {
        query.append(HeaderMatcher(name: name, kind: .present(try present.bool())))
      } else if let sm = qm.optional("string_match") {
        query.append(HeaderMatcher(name: name, kind: .string(try self.stringMatcher(sm))))
      } else if let value = qm.optional("value") {
        // v2: `value`, a regex when `regex: true`.
        let text = try value.string()
        let isRegex = try qm.optional("regex")?.bool() ?? false
        query.append(HeaderMatcher(name: name, kind: .string(.init(isRegex ? .regex(text) : .exact(text)))))
      } else {
        query.append(HeaderMatcher(name: name, kind: .present(true)))
      }
      try qm.finish(known: [])
    }
    let grpcOnly = m.optional("grpc") != nil
    try m.finish(known: [], warnings: self.sink)
    return RouteMatch(path: path, caseSensitive: caseSensitive, headers: headers, queryParameters: query, grpcOnly: grpcOnly)
  }

  func headerMatcher(_ node: YAMLValue) throws(ConfigError) -> HeaderMatcher {
    let m = try node.mapping()
    let name = try m.required("name").string().lowercased()
    let invert = try m.optional("invert_match")?.bool() ?? false
    let kind: HeaderMatcher.Kind
    if let v = m.optional("exact_match") {
      kind = .string(.init(.exact(try v.string())))
    } else if let v = m.optional("prefix_match") {
      kind = .string(.init(.prefix(try v.string())))
    } else if let v = m.optional("suffix_match") {
      kind = .string(.init(.suffix(try v.string())))
    } else if let v = m.optional("contains_match") {
      kind = .string(.init(.contains(try v.string())))
    } else if let v = m.optional("present_match") {
      kind = .present(try v.bool())
    } else if let v = m.optional("string_match") {
      kind = .string(try self.stringMatcher(v))
    } else if let v = m.optional("safe_regex_match") {
      let rm = try v.mapping()
      let regex = try rm.required("regex").string()
      rm.accept("google_re2")
      try rm.finish(known: [])
      kind = .string(.init(.regex(regex)))
    } else {
      kind = .present(true)
    }
    try m.finish(known: [], warnings: self.sink)
    return HeaderMatcher(name: name, kind: kind, invert: invert)
  }

  func stringMatcher(_ node: YAMLValue) throws(ConfigError) -> StringMatcher {
    let m = try node.mapping()
    let ignoreCase = try m.optional("ignore_case")?.bool() ?? false
    let kind: StringMatcher.Kind
    if let v = m.optional("exact") {
      kind = .exact(try v.string())
    } else if let v = m.optional("prefix") {
      kind = .prefix(try v.string())
    } else if let v = m.optional("suffix") {
      kind = .suffix(try v.string())
    } else if let v = m.optional("contains") {
      kind = .contains(try v.string())
    } else if let v = m.optional("safe_regex") {
      let rm = try v.mapping()
      let regex = try rm.required("regex").string()
      rm.accept("google_re2")
      try rm.finish(known: [])
      guard (try? NSRegularExpression(pattern: regex)) != nil else { throw v.error("'\(regex)' is not a valid regular expression") }
      kind = .regex(regex)
    } else {
      throw node.error("a string matcher needs one of exact, prefix, suffix, contains or safe_regex")
    }
    try m.finish(known: [])
    return StringMatcher(kind, ignoreCase: ignoreCase)
  }

  // MARK: - CORS

  func corsPolicy(_ node: YAMLValue) throws(ConfigError) -> CORSPolicy {
    try self.corsPolicy(try node.mapping())
  }

  func corsPolicy(_ m: YAMLMapping) throws(ConfigError) -> CORSPolicy {
    m.accept("@type")
    var policy = CORSPolicy()
    var origins: [StringMatcher]?
    if let list = m.optional("allow_origin_string_match") {
      origins = try list.sequence().map { v throws(ConfigError) in try self.stringMatcher(v) }
    }
    if let list = m.optional("allow_origin") {
      // v2: a list of exact origins, where "*" allows any.
      let legacy = try list.sequence().map { v throws(ConfigError) in StringMatcher(.exact(try v.string())) }
      origins = (origins ?? []) + legacy
    }
    if let list = m.optional("allow_origin_regex") {
      let legacy = try list.sequence().map { v throws(ConfigError) in StringMatcher(.regex(try v.string())) }
      origins = (origins ?? []) + legacy
    }
    policy.allowOrigins = origins
    // A folded YAML scalar ends in a line break, which no header value may hold.
    func headerValue(_ key: String) throws(ConfigError) -> String? {
      try m.optional(key)?.string().split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }
        .filter { !$0.isEmpty }.joined(separator: " ")
    }
    policy.allowMethods = try headerValue("allow_methods")
    policy.allowHeaders = try headerValue("allow_headers")
    policy.exposeHeaders = try headerValue("expose_headers")
    policy.maxAge = try m.optional("max_age")?.string()
    policy.allowCredentials = try m.optional("allow_credentials")?.bool()
    policy.allowPrivateNetworkAccess = try m.optional("allow_private_network_access")?.bool()
    policy.forwardNotMatchingPreflights = try m.optional("forward_not_matching_preflights")?.bool()
    if let enabled = m.optional("enabled") {
      policy.enabledPercent = try enabled.bool() ? 100 : 0
    }
    if let fe = m.optional("filter_enabled") {
      policy.enabledPercent = try self.fractionalPercent(fe)
    }
    m.unsupported("shadow_enabled", "shadow_enabled is not supported yet and is ignored", into: self.sink)
    try m.finish(known: [], warnings: self.sink)
    self.lintCORS(policy, at: m)
    return policy
  }

  func fractionalPercent(_ node: YAMLValue) throws(ConfigError) -> Double {
    let m = try node.mapping()
    m.accept("runtime_key")
    guard let value = m.optional("default_value") else { try m.finish(known: []); return 100 }
    let v = try value.mapping()
    let numerator = Double(try v.optional("numerator")?.int() ?? 0)
    let denominator: Double
    switch try v.optional("denominator")?.string().uppercased() ?? "HUNDRED" {
    case "HUNDRED": denominator = 100
    case "TEN_THOUSAND": denominator = 10_000
    case "MILLION": denominator = 1_000_000
    case let other: throw value.error("unknown denominator '\(other)'")
    }
    try v.finish(known: [])
    try m.finish(known: [])
    return numerator / denominator * 100
  }

  // MARK: - Clusters

  func cluster(_ node: YAMLValue) throws(ConfigError) -> Cluster {
    let m = try node.mapping()
    let name = try m.required("name").string()
    var type = Cluster.DiscoveryType.staticAddresses
    if let t = m.optional("type") {
      type = try t.enumeration(Cluster.DiscoveryType.self)
      if type == .logicalDNS {
        self.sink.add(t,
          "LOGICAL_DNS uses one address of the name at a time: behind a Swarm service VIP or a Kubernetes Service every call goes to the replica that address reaches. To spread calls over every replica use STRICT_DNS on tasks.<service> (Swarm) or a headless Service (Kubernetes)")
      }
    }
    if let t = m.optional("cluster_type") {
      throw t.error("custom cluster types are not supported; use STATIC, STRICT_DNS or LOGICAL_DNS")
    }
    let connectTimeout = try m.optional("connect_timeout")?.duration() ?? .seconds(5)
    let lb = try m.optional("lb_policy")?.enumeration(Cluster.LoadBalancing.self) ?? .roundRobin
    let refresh = try m.optional("dns_refresh_rate")?.duration() ?? .seconds(5)
    let family = try m.optional("dns_lookup_family")?.enumeration(Cluster.DNSLookupFamily.self) ?? .v4Preferred
    var http2 = m.optional("http2_protocol_options") != nil
    if let features = m.optional("features"), (try features.string()).uppercased().contains("HTTP2") { http2 = true }
    if let tepo = m.optional("typed_extension_protocol_options") {
      let options = try tepo.mapping()
      for key in options.keys {
        guard let value = options.optional(key) else { continue }
        if Self.mentionsHTTP2(value.node) { http2 = true }
      }
    }
    var keepalive: (interval: ProxyDuration, timeout: ProxyDuration)?
    for container in [m.optional("http2_protocol_options"), m.optional("typed_extension_protocol_options")].compactMap({ $0 }) {
      if let ka = Self.find("connection_keepalive", in: container.node) {
        let kv = YAMLValue(node: ka, path: container.path + ".…connection_keepalive")
        let km = try kv.mapping()
        let interval = try km.optional("interval")?.duration()
        let timeout = try km.optional("timeout")?.duration() ?? .seconds(20)
        km.accept("interval_jitter", "connection_idle_interval")
        try km.finish(known: [], warnings: self.sink)
        if let interval, !interval.isZero { keepalive = (interval, timeout) }
      }
    }
    if !http2 {
      self.sink.add(node,
        "cluster '\(name)' has no HTTP/2 settings: Envoy would speak HTTP/1.1 to it and every gRPC call would fail. grpc-web-proxy uses HTTP/2 anyway; add 'http2_protocol_options: {}' so Envoy reads the file the same way")
    }
    var endpoints: [HostAndPort] = []
    for host in try m.optional("hosts")?.sequence() ?? [] {
      endpoints.append(try self.address(host, allowPipe: true))
    }
    if let la = m.optional("load_assignment") {
      let lam = try la.mapping()
      lam.accept("cluster_name", "policy")
      for group in try lam.optional("endpoints")?.sequence() ?? [] {
        let gm = try group.mapping()
        gm.accept("locality", "priority", "load_balancing_weight")
        for lbe in try gm.optional("lb_endpoints")?.sequence() ?? [] {
          let lm = try lbe.mapping()
          lm.accept("load_balancing_weight", "health_status", "metadata")
          let em = try lm.required("endpoint").mapping()
          endpoints.append(try self.address(try em.required("address"), allowPipe: true))
          em.accept("hostname", "health_check_config")
          try em.finish(known: [], warnings: self.sink)
          try lm.finish(known: [], warnings: self.sink)
        }
        try gm.finish(known: [], warnings: self.sink)
      }
      try lam.finish(known: [], warnings: self.sink)
    }
    if endpoints.isEmpty {
      self.sink.add(node, "cluster '\(name)' has no endpoints: its calls get 503 'no healthy upstream'")
    }
    let tls = try self.upstreamTLS(m)
    let healthCheck = try self.healthChecks(m, cluster: name)
    let outlier = try m.optional("outlier_detection").map { v throws(ConfigError) in try self.outlierDetection(v) }
    let breakers = try m.optional("circuit_breakers").map { v throws(ConfigError) in try self.circuitBreakers(v) }
    let respectTTL = try m.optional("respect_dns_ttl")?.bool() ?? false
    var failureRefresh: (base: ProxyDuration, max: ProxyDuration)?
    if let frr = m.optional("dns_failure_refresh_rate") {
      let fm = try frr.mapping()
      let base = try fm.required("base_interval").duration()
      let max = try fm.optional("max_interval")?.duration() ?? ProxyDuration(nanoseconds: base.nanoseconds * 10)
      try fm.finish(known: [])
      failureRefresh = (base, max)
    }
    let resolvers = try self.dnsResolvers(m)
    m.accept("upstream_connection_options",
      "common_http_protocol_options", "per_connection_buffer_limit_bytes", "max_requests_per_connection",
      "common_lb_config", "close_connections_on_host_health_failure", "ignore_health_on_host_removal",
      "use_tcp_for_dns_lookups", "alt_stat_name", "dns_jitter")
    try m.finish(known: [], warnings: self.sink)
    var cluster = Cluster(
      name: name,
      type: type,
      endpoints: endpoints,
      connectTimeout: connectTimeout,
      loadBalancing: lb,
      http2: http2,
      dnsRefreshRate: refresh
    )
    cluster.dnsLookupFamily = family
    cluster.healthCheck = healthCheck
    cluster.outlierDetection = outlier
    if let breakers { cluster.circuitBreakers = breakers }
    cluster.respectDNSTTL = respectTTL
    cluster.dnsFailureRefreshRate = failureRefresh
    cluster.dnsResolvers = resolvers
    if let keepalive { cluster.keepalive = keepalive }
    cluster.tls = tls
    return cluster
  }

  /// The first value under `key` anywhere in a tree (options nested in typed extensions).
  static func find(_ key: String, in node: Node) -> Node? {
    switch node {
    case .mapping(let m):
      for (k, v) in m {
        if k.string == key { return v }
        if let found = Self.find(key, in: v) { return found }
      }
      return nil
    case .sequence(let s):
      for v in s { if let found = Self.find(key, in: v) { return found } }
      return nil
    default:
      return nil
    }
  }

  /// The legacy `dns_resolvers`, `dns_resolution_config.resolvers` and the c-ares
  /// `typed_dns_resolver_config`: where a test or a deployment points the cluster's DNS.
  func dnsResolvers(_ m: YAMLMapping) throws(ConfigError) -> [HostAndPort] {
    var nodes: [YAMLValue] = []
    nodes += try m.optional("dns_resolvers")?.sequence() ?? []
    if let drc = m.optional("dns_resolution_config") {
      let dm = try drc.mapping()
      nodes += try dm.optional("resolvers")?.sequence() ?? []
      dm.accept("dns_resolver_options")
      try dm.finish(known: [], warnings: self.sink)
    }
    if let typed = m.optional("typed_dns_resolver_config") {
      let tm = try typed.mapping()
      tm.accept("name")
      if let (body, type) = try Optional(typed.extensionConfig(in: tm)), let body {
        if let type, !type.hasSuffix("CaresDnsResolverConfig") {
          self.sink.add(typed, "DNS resolver '\(type)' is not supported; the system resolver (or c-ares 'resolvers') is used")
        }
        nodes += try body.optional("resolvers")?.sequence() ?? []
        body.accept("@type", "dns_resolver_options", "use_resolvers_as_fallback", "filter_unroutable_families", "udp_max_queries")
        try body.finish(known: [], warnings: self.sink)
      }
      try tm.finish(known: ["typed_config", "config"], warnings: self.sink)
    }
    var resolvers: [HostAndPort] = []
    for node in nodes {
      let address = try self.address(node)
      resolvers.append(HostAndPort(host: address.host, port: address.port == 0 ? 53 : address.port))
    }
    return resolvers
  }

  /// `health_checks`: the first entry with `grpc_health_check`. Other kinds are reported.
  func healthChecks(_ m: YAMLMapping, cluster: String) throws(ConfigError) -> Cluster.HealthCheck? {
    var result: Cluster.HealthCheck?
    for item in try m.optional("health_checks")?.sequence() ?? [] {
      let hm = try item.mapping()
      let timeout = try hm.required("timeout").duration()
      let interval = try hm.required("interval").duration()
      let unhealthy = try hm.optional("unhealthy_threshold")?.int() ?? 1
      let healthy = try hm.optional("healthy_threshold")?.int() ?? 1
      hm.accept("no_traffic_interval", "unhealthy_interval", "unhealthy_edge_interval", "healthy_edge_interval",
        "interval_jitter", "initial_jitter", "event_log_path", "always_log_health_check_failures", "reuse_connection")
      if let grpc = hm.optional("grpc_health_check") {
        let gm = try grpc.mapping()
        let service = try gm.optional("service_name")?.string() ?? ""
        let authority = try gm.optional("authority")?.string()
        try gm.finish(known: [], warnings: self.sink)
        if result == nil {
          result = .init(interval: interval, timeout: timeout, unhealthyThreshold: max(1, unhealthy), healthyThreshold: max(1, healthy),
            serviceName: service, authority: authority)
        }
      } else {
        for kind in ["http_health_check", "tcp_health_check", "custom_health_check"] {
          hm.unsupported(kind, "only grpc_health_check is supported: this health check of cluster '\(cluster)' is ignored", into: self.sink)
        }
      }
      try hm.finish(known: [], warnings: self.sink)
    }
    return result
  }

  func outlierDetection(_ node: YAMLValue) throws(ConfigError) -> Cluster.OutlierDetection {
    let m = try node.mapping()
    var od = Cluster.OutlierDetection()
    od.consecutive5xx = try m.optional("consecutive_5xx")?.int() ?? od.consecutive5xx
    od.consecutiveGatewayFailure = try m.optional("consecutive_gateway_failure")?.int() ?? od.consecutiveGatewayFailure
    od.consecutiveLocalOriginFailure = try m.optional("consecutive_local_origin_failure")?.int() ?? od.consecutiveLocalOriginFailure
    od.baseEjectionTime = try m.optional("base_ejection_time")?.duration() ?? od.baseEjectionTime
    od.maxEjectionTime = try m.optional("max_ejection_time")?.duration() ?? od.maxEjectionTime
    od.maxEjectionPercent = try m.optional("max_ejection_percent")?.int() ?? od.maxEjectionPercent
    m.accept("interval", "enforcing_consecutive_5xx", "enforcing_consecutive_gateway_failure", "enforcing_success_rate",
      "success_rate_minimum_hosts", "success_rate_request_volume", "success_rate_stdev_factor",
      "split_external_local_origin_errors", "enforcing_consecutive_local_origin_failure",
      "failure_percentage_threshold", "enforcing_failure_percentage", "failure_percentage_minimum_hosts",
      "failure_percentage_request_volume", "max_ejection_time_jitter", "successful_active_health_check_uneject_host")
    try m.finish(known: [], warnings: self.sink)
    return od
  }

  func circuitBreakers(_ node: YAMLValue) throws(ConfigError) -> Cluster.CircuitBreakers {
    let m = try node.mapping()
    var breakers = Cluster.CircuitBreakers()
    for threshold in try m.optional("thresholds")?.sequence() ?? [] {
      let tm = try threshold.mapping()
      let priority = try tm.optional("priority")?.string().uppercased() ?? "DEFAULT"
      guard priority == "DEFAULT" else {
        tm.accept("max_connections", "max_pending_requests", "max_requests", "max_retries", "retry_budget", "track_remaining", "max_connection_pools")
        continue
      }
      breakers.maxConnections = try tm.optional("max_connections")?.int() ?? breakers.maxConnections
      breakers.maxPendingRequests = try tm.optional("max_pending_requests")?.int() ?? breakers.maxPendingRequests
      breakers.maxRequests = try tm.optional("max_requests")?.int() ?? breakers.maxRequests
      breakers.maxRetries = try tm.optional("max_retries")?.int() ?? breakers.maxRetries
      tm.accept("retry_budget", "track_remaining", "max_connection_pools", "priority")
      try tm.finish(known: [], warnings: self.sink)
    }
    m.accept("per_host_thresholds")
    try m.finish(known: [], warnings: self.sink)
    return breakers
  }

  static func mentionsHTTP2(_ node: Node) -> Bool {
    switch node {
    case .mapping(let m):
      return m.contains { ($0.key.string ?? "").contains("http2_protocol_options") || Self.mentionsHTTP2($0.value) }
    case .sequence(let s):
      return s.contains { Self.mentionsHTTP2($0) }
    default:
      return false
    }
  }
}
