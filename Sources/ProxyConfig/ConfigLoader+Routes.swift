import Foundation
import Yams

// Reading a connection manager's route_config: virtual hosts, routes and their matches,
// header mutations, retry policies and CORS.

extension Reader {
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
}
