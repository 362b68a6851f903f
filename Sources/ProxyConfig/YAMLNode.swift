import Foundation
import Yams

/// A problem in a configuration file. It always names where: the file, the YAML path
/// (`static_resources.clusters[0].connect_timeout`) and the line.
public struct ConfigError: Error, Sendable, Hashable, CustomStringConvertible {
  public var file: String?
  public var path: String
  public var line: Int?
  public var message: String

  public init(file: String? = nil, path: String, line: Int?, message: String) {
    self.file = file
    self.path = path
    self.line = line
    self.message = message
  }

  public var description: String {
    var location = self.file ?? "config"
    if let line = self.line { location += ":\(line)" }
    if self.path.isEmpty { return "\(location): \(self.message)" }
    return "\(location): \(self.path): \(self.message)"
  }
}

/// Something in a configuration that loads but will not act as the user may expect: a field the
/// proxy understands but does not support yet, or a known trap.
public struct ConfigWarning: Sendable, Hashable, CustomStringConvertible {
  public var path: String
  public var line: Int?
  public var message: String

  public var description: String {
    let location = self.line.map { "line \($0): " } ?? ""
    return "\(location)\(self.path): \(self.message)"
  }
}

/// Collects warnings while a configuration is read.
final class WarningSink {
  var warnings: [ConfigWarning] = []

  func add(_ node: YAMLValue, _ message: String) {
    self.warnings.append(ConfigWarning(path: node.path, line: node.line, message: message))
  }
}

/// A YAML node together with where it is, so every error can say so.
struct YAMLValue {
  let node: Node
  let path: String
  let line: Int?

  init(node: Node, path: String, line: Int? = nil) {
    self.node = node
    self.path = path
    self.line = line ?? node.mark?.line
  }

  func error(_ message: String) -> ConfigError {
    ConfigError(path: self.path, line: self.line, message: message)
  }

  var isNull: Bool {
    if case .scalar(let s) = self.node, s.style == .plain, ["", "~", "null", "Null", "NULL"].contains(s.string) {
      return true
    }
    return false
  }

  func mapping() throws(ConfigError) -> YAMLMapping {
    switch self.node {
    case .mapping(let m):
      return YAMLMapping(mapping: m, at: self)
    default:
      // `key:` with nothing after it is an empty message in Envoy's YAML (e.g. `http2_protocol_options:`).
      if self.isNull { return YAMLMapping(mapping: Node.Mapping([]), at: self) }
      throw self.error("expected a mapping (key: value pairs), found \(self.kindName)")
    }
  }

  func sequence() throws(ConfigError) -> [YAMLValue] {
    switch self.node {
    case .sequence(let s):
      return s.enumerated().map { YAMLValue(node: $1, path: "\(self.path)[\($0)]") }
    default:
      if self.isNull { return [] }
      throw self.error("expected a list, found \(self.kindName)")
    }
  }

  func string() throws(ConfigError) -> String {
    guard case .scalar(let s) = self.node else {
      throw self.error("expected a single value, found \(self.kindName)")
    }
    if s.style == .plain, let name = Self.placeholder(s.string) {
      // A template's `$name` or `${name}` (filled by envsubst in many images): taken from the
      // environment, or a clear error rather than "not a number".
      guard let value = ProcessInfo.processInfo.environment[name] else {
        throw self.error("'\(s.string)' is a template placeholder and \(name) is not set in the environment: set it, or fill the template")
      }
      return value
    }
    return s.string
  }

  /// The variable name of a value that is nothing but `$name` or `${name}`.
  static func placeholder(_ text: String) -> String? {
    guard text.hasPrefix("$") else { return nil }
    var name = text.dropFirst()
    if name.hasPrefix("{") {
      guard name.hasSuffix("}") else { return nil }
      name = name.dropFirst().dropLast()
    }
    guard let first = name.first, first == "_" || first.isLetter,
      name.allSatisfy({ $0 == "_" || ($0.isASCII && ($0.isLetter || $0.isNumber)) })
    else { return nil }
    return String(name)
  }

  func int() throws(ConfigError) -> Int {
    let text = try self.string()
    guard let value = Int(text) else { throw self.error("expected a whole number, found '\(text)'") }
    return value
  }

  func bool() throws(ConfigError) -> Bool {
    let text = try self.string()
    switch text.lowercased() {
    case "true", "yes", "on": return true
    case "false", "no", "off": return false
    default: throw self.error("expected true or false, found '\(text)'")
    }
  }

  /// An enum value, in any letter case (Envoy's YAML accepts `auto` and `AUTO`).
  func enumeration<E: RawRepresentable & CaseIterable>(_ type: E.Type) throws(ConfigError) -> E
  where E.RawValue == String {
    let text = try self.string()
    if let value = E(rawValue: text.uppercased()) { return value }
    let allowed = E.allCases.map(\.rawValue).joined(separator: ", ")
    throw self.error("unknown value '\(text)'; expected one of \(allowed)")
  }

  /// A `google.protobuf.Duration`: `'0.25s'`, `30.000s`, `0s`, or `{seconds: 60, nanos: 0}`.
  func duration() throws(ConfigError) -> ProxyDuration {
    if case .mapping = self.node {
      let m = try self.mapping()
      let seconds = try m.optional("seconds")?.int() ?? 0
      let nanos = try m.optional("nanos")?.int() ?? 0
      try m.finish(known: [])
      return ProxyDuration(nanoseconds: Int64(seconds) * 1_000_000_000 + Int64(nanos))
    }
    let text = try self.string().trimmingCharacters(in: .whitespaces)
    guard let d = Self.parseDuration(text) else {
      throw self.error("'\(text)' is not a duration: write seconds with an 's', like '0.25s', '15s' or '0s'")
    }
    return d
  }

  static func parseDuration(_ text: String) -> ProxyDuration? {
    guard text.hasSuffix("s") else { return nil }
    let number = text.dropLast()
    guard !number.isEmpty, number.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }),
      number.filter({ $0 == "." }).count <= 1
    else { return nil }
    let parts = number.split(separator: ".", omittingEmptySubsequences: false)
    guard let whole = Int64(parts[0].isEmpty ? "0" : String(parts[0])) else { return nil }
    var nanos: Int64 = 0
    if parts.count == 2 {
      let fraction = parts[1].prefix(9)
      guard fraction.count == parts[1].count || parts[1].dropFirst(9).allSatisfy({ $0 == "0" }) else { return nil }
      let padded = fraction + String(repeating: "0", count: 9 - fraction.count)
      guard let n = Int64(padded) else { return nil }
      nanos = n
    }
    return ProxyDuration(nanoseconds: whole * 1_000_000_000 + nanos)
  }

  var kindName: String {
    switch self.node {
    case .scalar(let s): return "'\(s.string)'"
    case .mapping: return "a mapping"
    case .sequence: return "a list"
    case .alias: return "an alias"
    }
  }
}

/// A YAML mapping being read. Every key that is read is remembered, so `finish` can report each
/// key the proxy did not read: nothing in a user's file is silently ignored.
final class YAMLMapping {
  private let pairs: [(key: String, keyLine: Int?, value: Node)]
  let at: YAMLValue
  private var used: Set<String> = []

  init(mapping: Node.Mapping, at: YAMLValue) {
    self.pairs = mapping.map { (key: $0.key.string ?? "", keyLine: $0.key.mark?.line, value: $0.value) }
    self.at = at
  }

  var keys: [String] { self.pairs.map(\.key) }

  func child(_ key: String) -> String {
    self.at.path.isEmpty ? key : "\(self.at.path).\(key)"
  }

  func optional(_ key: String) -> YAMLValue? {
    guard let pair = self.pairs.first(where: { $0.key == key }) else { return nil }
    self.used.insert(key)
    let value = YAMLValue(node: pair.value, path: self.child(key), line: pair.value.mark?.line ?? pair.keyLine)
    return value.isNull && !Self.nullMeansEmpty(key) ? nil : value
  }

  /// Keys whose presence matters even when empty (`http2_protocol_options: {}` or a bare
  /// `http2_protocol_options:`; `grpc: {}`).
  private static func nullMeansEmpty(_ key: String) -> Bool {
    key == "http2_protocol_options" || key == "grpc" || key.hasSuffix("_options") || key == "typed_config"
  }

  func required(_ key: String) throws(ConfigError) -> YAMLValue {
    guard let value = self.optional(key) else {
      throw ConfigError(path: self.child(key), line: self.at.line, message: "required field '\(key)' is missing")
    }
    return value
  }

  func has(_ key: String) -> Bool { self.pairs.contains { $0.key == key } }

  /// Marks keys that are read but change nothing the proxy does (names, stat prefixes).
  func accept(_ keys: String...) {
    for key in keys { self.used.insert(key) }
  }

  /// Warns about keys the proxy understands but does not act on yet.
  func unsupported(_ key: String, _ why: String, into sink: WarningSink) {
    guard let value = self.optional(key) else { return }
    sink.add(value, why)
  }

  /// Reports every key that was not read: with a sink, as a warning; without, as an error.
  func finish(known: [String], warnings sink: WarningSink? = nil) throws(ConfigError) {
    for pair in self.pairs where !self.used.contains(pair.key) && !known.contains(pair.key) {
      let value = YAMLValue(node: pair.value, path: self.child(pair.key), line: pair.keyLine)
      if let sink {
        sink.add(value, "field '\(pair.key)' is not supported by grpc-web-proxy and is ignored")
      } else {
        throw value.error("unknown field '\(pair.key)'")
      }
    }
  }
}

extension YAMLValue {
  /// The body of an Envoy extension: v3 `typed_config` (with its `@type`) or v2 `config`.
  /// Returns the mapping and the `@type`, if any.
  func extensionConfig(in mapping: YAMLMapping) throws(ConfigError) -> (YAMLMapping?, String?) {
    if let typed = mapping.optional("typed_config") {
      let m = try typed.mapping()
      let type = try m.optional("@type")?.string()
      return (m, type)
    }
    if let config = mapping.optional("config") {
      return (try config.mapping(), nil)
    }
    return (nil, nil)
  }
}
