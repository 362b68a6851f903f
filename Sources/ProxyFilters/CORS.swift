import NIOHPACK
import ProxyConfig

/// Envoy's cors filter as a pure function of the request and the effective policy
/// (protocol doc section 6).
public enum CORS {
  public enum Decision: Sendable {
    /// No CORS processing: no policy, no `Origin`, or the filter is off for this request.
    case none
    /// A preflight answered by the proxy: 200 with these headers, not forwarded (C5, C6).
    case preflight(HPACKHeaders)
    /// Forward the request; add these headers to whatever response the client gets, upstream's
    /// or the proxy's own (C7, L7).
    case forward(responseHeaders: HPACKHeaders)
  }

  public static func evaluate(policy: CORSPolicy?, method: String, headers: HPACKHeaders) -> Decision {
    Self.evaluate(policy: policy, method: method, headers: headers, originRegexes: [])
  }

  /// - Parameter originRegexes: the policy's `allow_origin_string_match` regexes compiled once
  ///   (RouteTable.Entry), index for index; a missing one is compiled for this call.
  static func evaluate(policy: CORSPolicy?, method: String, headers: HPACKHeaders, originRegexes: [CompiledRegex?]) -> Decision {
    guard let policy else { return .none }
    if let percent = policy.enabledPercent, percent < 100 {
      guard percent > 0, Double.random(in: 0..<100) < percent else { return .none }
    }
    guard let origin = headers.first(name: "origin"), !origin.isEmpty else { return .none }
    let matchers = policy.allowOrigins ?? []
    var allowed = false
    for (i, matcher) in matchers.enumerated() {
      let regex = i < originRegexes.count ? originRegexes[i] : nil
      if matcher.matches(origin, regex: regex) || matcher.matches("*", regex: regex) {
        allowed = true
        break
      }
    }
    let requestMethod = headers.first(name: "access-control-request-method") ?? ""
    let isPreflight = method == "OPTIONS" && !requestMethod.isEmpty

    if isPreflight {
      if !allowed && (policy.forwardNotMatchingPreflights ?? true) {
        return .forward(responseHeaders: [:])
      }
      var out = HPACKHeaders()
      if allowed {
        out.add(name: "access-control-allow-origin", value: origin)
        if policy.allowCredentials == true { out.add(name: "access-control-allow-credentials", value: "true") }
      }
      if let methods = policy.allowMethods, !methods.isEmpty {
        out.add(name: "access-control-allow-methods", value: methods == "*" ? requestMethod : methods)
      }
      if let allowHeaders = policy.allowHeaders, !allowHeaders.isEmpty {
        let requested = headers.first(name: "access-control-request-headers") ?? ""
        out.add(name: "access-control-allow-headers", value: allowHeaders == "*" ? requested : allowHeaders)
      }
      if let maxAge = policy.maxAge, !maxAge.isEmpty { out.add(name: "access-control-max-age", value: maxAge) }
      if allowed, let expose = policy.exposeHeaders, !expose.isEmpty {
        // Envoy's cors filter also encodes its own preflight reply, which adds these.
        out.add(name: "access-control-expose-headers", value: expose)
      }
      if policy.allowPrivateNetworkAccess == true,
        headers.first(name: "access-control-request-private-network") == "true"
      {
        out.add(name: "access-control-allow-private-network", value: "true")
      }
      return .preflight(out)
    }

    guard allowed else { return .none }
    var out = HPACKHeaders()
    out.add(name: "access-control-allow-origin", value: origin)
    if policy.allowCredentials == true { out.add(name: "access-control-allow-credentials", value: "true") }
    if let expose = policy.exposeHeaders, !expose.isEmpty { out.add(name: "access-control-expose-headers", value: expose) }
    return .forward(responseHeaders: out)
  }
}
