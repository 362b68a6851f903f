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

  /// The connection manager's `http2_protocol_options`, within Envoy's bounds for each field.
  func http2Options(_ value: YAMLValue) throws(ConfigError) -> HTTP2Options {
    var options = HTTP2Options()
    let m = try value.mapping()
    func read(_ key: String, from low: Int, _ what: String) throws(ConfigError) -> Int? {
      guard let v = m.optional(key) else { return nil }
      let n = try v.int()
      guard n >= low && n <= 2_147_483_647 else { throw v.error("\(key) must be from \(low) to 2147483647 (\(what)), found \(n)") }
      return n
    }
    if let n = try read("initial_stream_window_size", from: 65_535, "bytes") { options.initialStreamWindow = n }
    if let n = try read("initial_connection_window_size", from: 65_535, "bytes") { options.initialConnectionWindow = n }
    if let n = try read("max_concurrent_streams", from: 1, "streams") { options.maxConcurrentStreams = n }
    // What Envoy's codec tunes beyond these has no counterpart here that changes behaviour.
    try m.finish(known: ["hpack_table_size", "allow_connect", "allow_metadata", "max_outbound_frames",
      "max_outbound_control_frames", "max_consecutive_inbound_frames_with_empty_payload",
      "max_inbound_priority_frames_per_stream", "max_inbound_window_update_frames_per_data_frame_sent",
      "stream_error_on_invalid_http_messaging", "override_stream_error_on_invalid_http_message",
      "connection_keepalive", "custom_settings_parameters", "use_oghttp2_codec", "max_metadata_size"],
      warnings: self.sink)
    return options
  }

  func httpConnectionManager(
    _ m: YAMLMapping,
    name: String,
    address: HostAndPort,
    clusters: [Cluster]
  ) throws(ConfigError) -> Listener {
    let accessLogs = try m.optional("access_log").map { v throws(ConfigError) in try self.accessLogs(v) } ?? []
    m.accept("@type", "stat_prefix", "use_remote_address", "xff_num_trusted_hops", "generate_request_id",
      "server_name", "http_protocol_options",
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
    if let h2 = m.optional("http2_protocol_options") { listener.http2 = try self.http2Options(h2) }
    listener.idleTimeout = idleTimeout
    if let headersTimeout, !headersTimeout.isZero { listener.requestHeadersTimeout = headersTimeout }
    // Required by Envoy; without one the stats are named after the listener.
    if let prefix = try m.optional("stat_prefix")?.string(), !prefix.isEmpty { listener.statPrefix = prefix }
    listener.accessLogs = accessLogs
    listener.grpcStats = grpcStats
    listener.tracing = tracing
    return listener
  }
}
