/// An access log of the connection manager (Envoy's `access_log` entries): where lines go, what
/// they say, and which calls get one.
public struct AccessLogConfig: Sendable, Hashable {
  public enum Sink: Sendable, Hashable {
    case file(path: String)
    case stdout
    case stderr
  }

  /// A JSON line's template: each string value is a format (`%RESPONSE_CODE%`), kept in order.
  public indirect enum JSONTemplate: Sendable, Hashable {
    case format(String)
    case number(Double)
    case bool(Bool)
    case null
    case object([Field])
    case list([JSONTemplate])

    public struct Field: Sendable, Hashable {
      public var key: String
      public var value: JSONTemplate

      public init(key: String, value: JSONTemplate) {
        self.key = key
        self.value = value
      }
    }
  }

  public enum Format: Sendable, Hashable {
    case text(String)
    case json(JSONTemplate)
  }

  /// Envoy's default line.
  public static let defaultFormat =
    "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% "
    + "%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" "
    + "\"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n"

  public var sink: Sink
  public var format: Format
  /// `omit_empty_values`: in text, an empty field is "" instead of "-"; in JSON it is left out.
  public var omitEmptyValues: Bool
  public var filter: AccessLogFilter?

  public init(sink: Sink, format: Format = .text(Self.defaultFormat), omitEmptyValues: Bool = false, filter: AccessLogFilter? = nil) {
    self.sink = sink
    self.format = format
    self.omitEmptyValues = omitEmptyValues
    self.filter = filter
  }
}

/// Envoy's access log filters.
public indirect enum AccessLogFilter: Sendable, Hashable {
  public enum Comparison: String, Sendable, Hashable, CaseIterable {
    case EQ, GE, LE
  }

  case statusCode(Comparison, Int)
  case duration(Comparison, Int)
  /// The listed gRPC statuses (numbers), or all others with `exclude`.
  case grpcStatus(Set<GRPCStatus>, exclude: Bool)
  case notHealthCheck
  case and([AccessLogFilter])
  case or([AccessLogFilter])
  case header(HeaderMatcher)
}

extension Reader {
  /// The `access_log` list of a connection manager, or of the admin block.
  func accessLogs(_ node: YAMLValue) throws(ConfigError) -> [AccessLogConfig] {
    var logs: [AccessLogConfig] = []
    // One entry given as a mapping rather than a list of one: Envoy takes it too.
    let entries: [YAMLValue]
    if case .mapping = node.node { entries = [node] } else { entries = try node.sequence() }
    for entry in entries {
      let m = try entry.mapping()
      let name = try m.optional("name")?.string() ?? ""
      let filter = try m.optional("filter").map { v throws(ConfigError) in try self.accessLogFilter(v) }
      let body = m.optional("typed_config") ?? m.optional("config")
      try m.finish(known: [], warnings: self.sink)
      guard let body else { throw entry.error("access_log entry '\(name)' has no typed_config (v3) or config (v2)") }
      let b = try body.mapping()
      let type = try b.optional("@type")?.string() ?? ""
      let kind = type.split(separator: ".").last.map(String.init) ?? ""
      var sink: AccessLogConfig.Sink
      switch (kind, name) {
      case ("FileAccessLog", _), ("", "envoy.file_access_log"), ("", "envoy.access_loggers.file"):
        let path = try b.required("path").string()
        sink = path == "/dev/stdout" ? .stdout : path == "/dev/stderr" ? .stderr : .file(path: path)
      case ("StdoutAccessLog", _), ("", "envoy.access_loggers.stdout"):
        sink = .stdout
      case ("StderrAccessLog", _), ("", "envoy.access_loggers.stderr"):
        sink = .stderr
      default:
        self.sink.add(entry, "access logger '\(type.isEmpty ? name : type)' is not supported (file, stdout and stderr are) and is ignored")
        continue
      }
      var log = AccessLogConfig(sink: sink, filter: filter)
      if let format = b.optional("log_format") {
        let f = try format.mapping()
        log.omitEmptyValues = try f.optional("omit_empty_values")?.bool() ?? false
        if let source = f.optional("text_format_source") {
          let s = try source.mapping()
          guard let inline = s.optional("inline_string") else {
            throw source.error("text_format_source: only inline_string is supported")
          }
          log.format = .text(try self.checkedFormat(inline))
          try s.finish(known: [], warnings: self.sink)
        } else if let text = f.optional("text_format") {
          log.format = .text(try self.checkedFormat(text))
        } else if let json = f.optional("json_format") {
          log.format = .json(try self.jsonTemplate(json))
        }
        f.accept("content_type", "formatters")
        try f.finish(known: [], warnings: self.sink)
      } else if let text = b.optional("format") {
        // The v2 and pre-1.18 fields.
        log.format = .text(try self.checkedFormat(text))
      } else if let json = b.optional("json_format") {
        log.format = .json(try self.jsonTemplate(json))
      }
      b.accept("@type", "typed_json_format")
      try b.finish(known: [], warnings: self.sink)
      logs.append(log)
    }
    return logs
  }

  private func checkedFormat(_ node: YAMLValue) throws(ConfigError) -> String {
    let text = try node.string()
    if let problem = AccessLogFormatCheck.problem(in: text) { throw node.error(problem) }
    return text
  }

  private func jsonTemplate(_ node: YAMLValue) throws(ConfigError) -> AccessLogConfig.JSONTemplate {
    switch node.node {
    case .mapping(let mapping):
      var fields: [AccessLogConfig.JSONTemplate.Field] = []
      for (key, value) in mapping {
        let child = YAMLValue(node: value, path: "\(node.path).\(key.string ?? "")")
        fields.append(.init(key: key.string ?? "", value: try self.jsonTemplate(child)))
      }
      return .object(fields)
    case .sequence(let items):
      var out: [AccessLogConfig.JSONTemplate] = []
      for (i, item) in items.enumerated() { out.append(try self.jsonTemplate(YAMLValue(node: item, path: "\(node.path)[\(i)]"))) }
      return .list(out)
    case .scalar(let s):
      if s.style == .plain {
        if let n = Double(s.string) { return .number(n) }
        if s.string == "true" || s.string == "false" { return .bool(s.string == "true") }
        if node.isNull { return .null }
      }
      if let problem = AccessLogFormatCheck.problem(in: s.string) { throw node.error(problem) }
      return .format(s.string)
    default:
      throw node.error("json_format values must be strings, numbers, booleans, lists or mappings")
    }
  }

  func accessLogFilter(_ node: YAMLValue) throws(ConfigError) -> AccessLogFilter {
    let m = try node.mapping()
    defer { try? m.finish(known: [], warnings: self.sink) }
    func comparison(_ v: YAMLValue) throws(ConfigError) -> (AccessLogFilter.Comparison, Int) {
      let cm = try v.mapping()
      let c = try cm.required("comparison").mapping()
      let op = try c.optional("op")?.enumeration(AccessLogFilter.Comparison.self) ?? .EQ
      let valueNode = try c.required("value")
      let value: Int
      if case .mapping = valueNode.node {
        let vm = try valueNode.mapping()
        value = try vm.required("default_value").int()
        vm.accept("runtime_key")
        try vm.finish(known: [], warnings: self.sink)
      } else {
        value = try valueNode.int()
      }
      try c.finish(known: [], warnings: self.sink)
      try cm.finish(known: [], warnings: self.sink)
      return (op, value)
    }
    if let v = m.optional("status_code_filter") {
      let (op, value) = try comparison(v)
      return .statusCode(op, value)
    }
    if let v = m.optional("duration_filter") {
      let (op, value) = try comparison(v)
      return .duration(op, value)
    }
    if let v = m.optional("grpc_status_filter") {
      let gm = try v.mapping()
      var statuses = Set<GRPCStatus>()
      for s in try gm.optional("statuses")?.sequence() ?? [] {
        let text = try s.string()
        guard let code = GRPCStatus(name: text) else {
          throw s.error("unknown gRPC status '\(text)': OK, CANCELED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS or UNAUTHENTICATED")
        }
        statuses.insert(code)
      }
      let exclude = try gm.optional("exclude")?.bool() ?? false
      try gm.finish(known: [], warnings: self.sink)
      return .grpcStatus(statuses, exclude: exclude)
    }
    if m.optional("not_health_check_filter") != nil { return .notHealthCheck }
    for (key, isAnd) in [("and_filter", true), ("or_filter", false)] {
      guard let v = m.optional(key) else { continue }
      let lm = try v.mapping()
      var filters: [AccessLogFilter] = []
      for f in try lm.required("filters").sequence() { filters.append(try self.accessLogFilter(f)) }
      try lm.finish(known: [], warnings: self.sink)
      return isAnd ? .and(filters) : .or(filters)
    }
    if let v = m.optional("header_filter") {
      let hm = try v.mapping()
      let matcher = try self.headerMatcher(try hm.required("header"))
      try hm.finish(known: [], warnings: self.sink)
      return .header(matcher)
    }
    throw node.error("access log filter: one of status_code_filter, duration_filter, grpc_status_filter, not_health_check_filter, and_filter, or_filter, header_filter is needed")
  }
}

/// What the formatter understands, checked when the configuration is read: an operator it does
/// not know is a start-up error naming it, as in Envoy ("Not supported field in StreamInfo").
public enum AccessLogFormatCheck {
  public static let operators: Set<String> = [
    "START_TIME", "REQ", "RESP", "TRAILER", "RESPONSE_CODE", "RESPONSE_FLAGS", "GRPC_STATUS", "GRPC_STATUS_NUMBER",
    "DURATION", "REQUEST_DURATION", "RESPONSE_DURATION", "RESPONSE_TX_DURATION", "BYTES_RECEIVED", "BYTES_SENT", "PROTOCOL",
    "UPSTREAM_HOST", "UPSTREAM_CLUSTER", "DOWNSTREAM_REMOTE_ADDRESS", "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_LOCAL_ADDRESS", "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_DIRECT_REMOTE_ADDRESS",
    "ROUTE_NAME", "REQUESTED_SERVER_NAME", "DOWNSTREAM_PEER_SUBJECT", "UPSTREAM_TRANSPORT_FAILURE_REASON",
    "RESPONSE_CODE_DETAILS", "HOSTNAME", "REQUEST_HEADERS_BYTES", "RESPONSE_HEADERS_BYTES", "UPSTREAM_LOCAL_ADDRESS",
  ]

  /// Nil when every `%OPERATOR%` in `text` is known; otherwise what is wrong.
  public static func problem(in text: String) -> String? {
    for token in AccessLogTemplate.parse(text) {
      if case .op(let name, _, _) = token, !Self.operators.contains(name) {
        return "access log format: unknown operator %\(name)% (Envoy: \"Not supported field in StreamInfo: \(name)\")"
      }
    }
    return nil
  }
}

/// A format string cut into literal text and `%OPERATOR(arg):max%` pieces, as Envoy cuts it.
public enum AccessLogTemplate {
  public enum Token: Sendable, Hashable {
    case literal(String)
    case op(String, argument: String?, maxLength: Int?)
  }

  public static func parse(_ text: String) -> [Token] {
    var tokens: [Token] = []
    var literal = ""
    var chars = Array(text)
    var i = 0
    // Envoy's escapes: %% is a percent sign.
    while i < chars.count {
      let c = chars[i]
      guard c == "%" else {
        literal.append(c)
        i += 1
        continue
      }
      if i + 1 < chars.count, chars[i + 1] == "%" {
        literal.append("%")
        i += 2
        continue
      }
      // An operator: NAME, optional (arg), optional :N, then %.
      var j = i + 1
      var name = ""
      while j < chars.count, chars[j].isUppercase || chars[j].isNumber || chars[j] == "_" {
        name.append(chars[j])
        j += 1
      }
      var argument: String?
      if j < chars.count, chars[j] == "(" {
        guard let close = chars[j...].firstIndex(of: ")") else { literal.append(c); i += 1; continue }
        argument = String(chars[(j + 1)..<close])
        j = close + 1
      }
      var maxLength: Int?
      if j < chars.count, chars[j] == ":" {
        var digits = ""
        var k = j + 1
        while k < chars.count, chars[k].isNumber { digits.append(chars[k]); k += 1 }
        if let n = Int(digits) { maxLength = n; j = k }
      }
      guard !name.isEmpty, j < chars.count, chars[j] == "%" else {
        literal.append(c)
        i += 1
        continue
      }
      if !literal.isEmpty { tokens.append(.literal(literal)); literal = "" }
      tokens.append(.op(name, argument: argument, maxLength: maxLength))
      i = j + 1
    }
    if !literal.isEmpty { tokens.append(.literal(literal)) }
    chars.removeAll()
    return tokens
  }
}
