import Foundation
import NIOHPACK
import ProxyConfig

/// A listener's routes, prepared once so that matching a request allocates nothing but the
/// lower-cased authority.
public struct RouteTable: Sendable {
  public struct Entry: Sendable {
    public var route: Route
    /// The route's CORS policy layered over its virtual host's (C1), or nil for none.
    public var cors: CORSPolicy?
    /// The header mutations of the route, its virtual host and the route configuration, in the
    /// order they apply; empty levels left out.
    public var requestHeaders: [HeaderMutations]
    public var responseHeaders: [HeaderMutations]
    fileprivate var regex: CompiledRegex?
    fileprivate var headerRegexes: [CompiledRegex?]
    fileprivate var queryRegexes: [CompiledRegex?] = []
    fileprivate var rewriteRegex: CompiledRegex?
    /// The CORS policy's origin regexes, compiled once: compiling one per request cost more
    /// than the rest of the filter.
    fileprivate var corsOriginRegexes: [CompiledRegex?] = []

    /// Envoy's cors filter for a request on this route.
    public func evaluateCORS(method: String, headers: HPACKHeaders) -> CORS.Decision {
      CORS.evaluate(policy: self.cors, method: method, headers: headers, originRegexes: self.corsOriginRegexes)
    }

    /// The path sent upstream: `prefix_rewrite` or `regex_rewrite` applied, the query kept.
    public func upstreamPath(_ path: String) -> String {
      if let rewrite = self.route.prefixRewrite, case .prefix(let prefix) = self.route.match.path {
        return rewrite + path.dropFirst(prefix.count)
      }
      guard let rewrite = self.route.regexRewrite, let regex = self.rewriteRegex?.regex else { return path }
      let query = path.firstIndex(of: "?")
      let pathOnly = query.map { String(path[..<$0]) } ?? path
      // Envoy's substitution names groups `\1`; NSRegularExpression's templates say `$1`.
      var template = ""
      var chars = rewrite.substitution.makeIterator()
      while let c = chars.next() {
        if c == "\\", let next = chars.next() {
          template += next.isNumber ? "$\(next)" : (next == "$" ? "\\$" : String(next))
        } else {
          template += c == "$" ? "\\$" : String(c)
        }
      }
      let rewritten = regex.stringByReplacingMatches(
        in: pathOnly, range: NSRange(pathOnly.startIndex..., in: pathOnly), withTemplate: template)
      return rewritten + (query.map { String(path[$0...]) } ?? "")
    }
  }

  fileprivate struct Host: Sendable {
    var virtualHost: VirtualHost
    var entries: [Entry]
  }

  private var exact: [String: Int] = [:]
  private var suffixes: [(String, Int)] = []
  private var prefixes: [(String, Int)] = []
  private var wildcard: Int?
  private var hosts: [Host] = []

  public init(_ config: RouteConfiguration) {
    for (index, vh) in config.virtualHosts.enumerated() {
      let entries = vh.routes.map { route -> Entry in
        var regex: CompiledRegex?
        if case .regex(let pattern) = route.match.path {
          regex = CompiledRegex(pattern, caseInsensitive: !route.match.caseSensitive)
        }
        let headerRegexes = route.match.headers.map { matcher -> CompiledRegex? in
          if case .string(let sm) = matcher.kind, case .regex(let pattern) = sm.kind {
            return CompiledRegex(pattern, caseInsensitive: sm.ignoreCase)
          }
          return nil
        }
        let cors = route.cors.map { $0.layered(over: vh.cors) } ?? vh.cors
        func levels(_ levels: [HeaderMutations]) -> [HeaderMutations] {
          let ordered = config.mostSpecificHeaderMutationsWins ? levels.reversed() : levels
          return ordered.filter { !$0.isEmpty }
        }
        let queryRegexes = route.match.queryParameters.map { matcher -> CompiledRegex? in
          if case .string(let sm) = matcher.kind, case .regex(let pattern) = sm.kind {
            return CompiledRegex(pattern, caseInsensitive: sm.ignoreCase)
          }
          return nil
        }
        let corsOriginRegexes = (cors?.allowOrigins ?? []).map { sm -> CompiledRegex? in
          if case .regex(let pattern) = sm.kind { return CompiledRegex(pattern, caseInsensitive: sm.ignoreCase) }
          return nil
        }
        return Entry(
          route: route, cors: cors,
          requestHeaders: levels([route.requestHeaders, vh.requestHeaders, config.requestHeaders]),
          responseHeaders: levels([route.responseHeaders, vh.responseHeaders, config.responseHeaders]),
          regex: regex, headerRegexes: headerRegexes, queryRegexes: queryRegexes,
          rewriteRegex: route.regexRewrite.map { CompiledRegex($0.pattern, caseInsensitive: false) },
          corsOriginRegexes: corsOriginRegexes)
      }
      self.hosts.append(Host(virtualHost: vh, entries: entries))
      for domain in vh.domains.map({ $0.lowercased() }) {
        if domain == "*" {
          if self.wildcard == nil { self.wildcard = index }
        } else if domain.hasPrefix("*") {
          self.suffixes.append((String(domain.dropFirst()), index))
        } else if domain.hasSuffix("*") {
          self.prefixes.append((String(domain.dropLast()), index))
        } else if self.exact[domain] == nil {
          self.exact[domain] = index
        }
      }
    }
    // Longest wildcard first, as Envoy picks the most specific domain.
    self.suffixes.sort { $0.0.count > $1.0.count }
    self.prefixes.sort { $0.0.count > $1.0.count }
  }

  /// The virtual host for an authority: exact, then `*.suffix`, then `prefix*`, then `*`; with
  /// the port, then without it.
  public func virtualHost(forAuthority authority: String) -> Int? {
    let host = authority.utf8.contains(where: { $0 >= 65 && $0 <= 90 }) ? authority.lowercased() : authority
    if let i = self.lookup(host) { return i }
    if let colon = host.lastIndex(of: ":"), !host.hasSuffix("]"), let i = self.lookup(String(host[..<colon])) {
      return i
    }
    return self.wildcard
  }

  private func lookup(_ host: String) -> Int? {
    if let i = self.exact[host] { return i }
    for (suffix, i) in self.suffixes where host.hasSuffix(suffix) && host.count > suffix.count { return i }
    for (prefix, i) in self.prefixes where host.hasPrefix(prefix) && host.count > prefix.count { return i }
    return nil
  }

  /// The first route of the matching virtual host that matches the request.
  public func match(authority: String, path: String, headers: HPACKHeaders, isGRPC: Bool) -> Entry? {
    guard let hostIndex = self.virtualHost(forAuthority: authority) else { return nil }
    let query = path.firstIndex(of: "?")
    let pathOnly = query.map { String(path[..<$0]) } ?? path
    for entry in self.hosts[hostIndex].entries where Self.matches(entry, path: pathOnly, headers: headers, isGRPC: isGRPC) {
      if entry.route.match.queryParameters.isEmpty { return entry }
      let parameters = Self.queryParameters(query.map { path[path.index(after: $0)...] } ?? "")
      if Self.matchesQuery(entry, parameters) { return entry }
    }
    return nil
  }

  /// Name to first value, percent-decoded, as Envoy reads them for `query_parameters`.
  static func queryParameters(_ query: Substring) -> [String: String] {
    var result: [String: String] = [:]
    for pair in query.split(separator: "&") {
      let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
      let name = String(parts[0]).removingPercentEncoding ?? String(parts[0])
      let value = parts.count > 1 ? (String(parts[1]).removingPercentEncoding ?? String(parts[1])) : ""
      if result[name] == nil { result[name] = value }
    }
    return result
  }

  private static func matchesQuery(_ entry: Entry, _ parameters: [String: String]) -> Bool {
    for (index, matcher) in entry.route.match.queryParameters.enumerated() {
      let value = parameters[matcher.name]
      switch matcher.kind {
      case .present(let present):
        if (value != nil) != present { return false }
      case .string(let sm):
        guard let value, sm.matches(value, regex: entry.queryRegexes[index]) else { return false }
      }
    }
    return true
  }

  private static func matches(_ entry: Entry, path: String, headers: HPACKHeaders, isGRPC: Bool) -> Bool {
    let match = entry.route.match
    if match.grpcOnly && !isGRPC { return false }
    switch match.path {
    case .prefix(let prefix):
      if match.caseSensitive {
        guard path.hasPrefix(prefix) else { return false }
      } else {
        guard path.lowercased().hasPrefix(prefix.lowercased()) else { return false }
      }
    case .path(let exact):
      if match.caseSensitive {
        guard path == exact else { return false }
      } else {
        guard path.lowercased() == exact.lowercased() else { return false }
      }
    case .regex:
      guard entry.regex?.wholeMatch(path) ?? false else { return false }
    }
    for (index, matcher) in match.headers.enumerated() {
      if !matcher.matchesHeaders(headers, regex: entry.headerRegexes[index]) { return false }
    }
    return true
  }
}

/// A regular expression compiled once at start-up.
struct CompiledRegex: @unchecked Sendable {
  // NSRegularExpression is immutable once made, and safe to use from any thread.
  let regex: NSRegularExpression?
  /// `.*`, the usual "any origin" of CORS policies: it matches any text without a line break,
  /// and header values have none (both codecs reject CR and LF in them), so no engine is run.
  private let matchesAnyLine: Bool

  init(_ pattern: String, caseInsensitive: Bool) {
    self.regex = try? NSRegularExpression(pattern: pattern, options: caseInsensitive ? [.caseInsensitive] : [])
    self.matchesAnyLine = pattern == ".*"
  }

  /// ICU's `.` stops at \n, \r, U+0085, U+2028 and U+2029.
  private static func hasLineTerminator(_ text: String) -> Bool {
    var previous: (UInt8, UInt8) = (0, 0)
    for byte in text.utf8 {
      if byte == 0x0A || byte == 0x0D { return true }
      if previous.1 == 0xC2 && byte == 0x85 { return true }
      if previous == (0xE2, 0x80) && (byte == 0xA8 || byte == 0xA9) { return true }
      previous = (previous.1, byte)
    }
    return false
  }

  func wholeMatch(_ text: String) -> Bool {
    if self.matchesAnyLine { return !Self.hasLineTerminator(text) }
    guard let regex else { return false }
    let range = NSRange(text.startIndex..., in: text)
    guard let m = regex.firstMatch(in: text, options: [.anchored], range: range) else { return false }
    return m.range == range
  }
}

extension StringMatcher {
  func matches(_ value: String, regex: CompiledRegex? = nil) -> Bool {
    let subject = self.ignoreCase ? value.lowercased() : value
    func fold(_ s: String) -> String { self.ignoreCase ? s.lowercased() : s }
    switch self.kind {
    case .exact(let s): return subject == fold(s)
    case .prefix(let s): return subject.hasPrefix(fold(s))
    case .suffix(let s): return subject.hasSuffix(fold(s))
    case .contains(let s): return subject.contains(fold(s))
    case .regex(let pattern):
      return (regex ?? CompiledRegex(pattern, caseInsensitive: self.ignoreCase)).wholeMatch(value)
    }
  }
}

extension HeaderMatcher {
  /// Whether a request's headers satisfy this matcher (a regex is compiled per use: for the
  /// access log's header_filter, not for routing).
  public func matchesHeaders(_ headers: HPACKHeaders) -> Bool {
    self.matchesHeaders(headers, regex: nil)
  }

  /// Several values of one header are matched joined with commas, as Envoy joins them.
  func matchesHeaders(_ headers: HPACKHeaders, regex: CompiledRegex?) -> Bool {
    let values = headers[canonicalForm: self.name]
    var result: Bool
    switch self.kind {
    case .present(let present):
      result = values.isEmpty != present
    case .string(let sm):
      result = values.isEmpty ? false : sm.matches(values.joined(separator: ","), regex: regex)
    }
    return self.invert ? !result : result
  }
}
