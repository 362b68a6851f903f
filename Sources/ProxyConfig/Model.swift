// The validated configuration: what the proxy runs on. Built from Envoy-shaped YAML by
// `ConfigLoader`, or in code (the embedded default, tests). Plain values: no NIO, no sockets.

/// A span of time, in nanoseconds, as Envoy's `google.protobuf.Duration` fields carry it.
public struct ProxyDuration: Sendable, Hashable, Comparable, CustomStringConvertible {
  public var nanoseconds: Int64

  public init(nanoseconds: Int64) { self.nanoseconds = nanoseconds }
  public static func seconds(_ s: Int64) -> ProxyDuration { .init(nanoseconds: s * 1_000_000_000) }
  public static func milliseconds(_ ms: Int64) -> ProxyDuration { .init(nanoseconds: ms * 1_000_000) }
  public static let zero = ProxyDuration(nanoseconds: 0)

  public var milliseconds: Int64 { self.nanoseconds / 1_000_000 }
  public var isZero: Bool { self.nanoseconds == 0 }

  public static func < (lhs: ProxyDuration, rhs: ProxyDuration) -> Bool {
    lhs.nanoseconds < rhs.nanoseconds
  }

  public var description: String {
    if self.nanoseconds % 1_000_000_000 == 0 { return "\(self.nanoseconds / 1_000_000_000)s" }
    return "\(Double(self.nanoseconds) / 1e9)s"
  }
}

public struct ProxyConfiguration: Sendable, Hashable {
  public var listeners: [Listener]
  public var clusters: [Cluster]
  public var admin: Admin?
  /// The overload manager's `envoy.resource_monitors.global_downstream_max_connections`
  /// (`max_active_downstream_connections`): client connections beyond it, over all listeners,
  /// are closed as they arrive.
  public var maxDownstreamConnections: Int?
  /// The configuration as read (the YAML), for the admin port's /config_dump.
  public var source: String?

  public init(listeners: [Listener], clusters: [Cluster], admin: Admin? = nil) {
    self.listeners = listeners
    self.clusters = clusters
    self.admin = admin
  }

  public func cluster(named name: String) -> Cluster? {
    self.clusters.first { $0.name == name }
  }
}

public struct HostAndPort: Sendable, Hashable, CustomStringConvertible {
  public var host: String
  public var port: Int

  public init(host: String, port: Int) {
    self.host = host
    self.port = port
  }

  /// A unix socket endpoint, kept as host `unix:<path>` and port 0.
  public init(unixSocket path: String) {
    self.host = Self.unixPrefix + path
    self.port = 0
  }

  static let unixPrefix = "unix:"

  /// The socket path of a unix socket endpoint.
  public var unixSocketPath: String? {
    self.host.hasPrefix(Self.unixPrefix) ? String(self.host.dropFirst(Self.unixPrefix.count)) : nil
  }

  public var description: String {
    if self.unixSocketPath != nil { return self.host }
    return self.host.contains(":") ? "[\(self.host)]:\(self.port)" : "\(self.host):\(self.port)"
  }
}

public struct Admin: Sendable, Hashable {
  public var address: HostAndPort?
  /// `access_log_path` (Envoy's default line) and `access_log`: the admin port's own requests.
  public var accessLogs: [AccessLogConfig] = []
  public init(address: HostAndPort?) { self.address = address }
}

public enum CodecType: String, Sendable, Hashable, CaseIterable {
  case auto = "AUTO"
  case http1 = "HTTP1"
  case http2 = "HTTP2"
}

public struct Listener: Sendable, Hashable {
  public var name: String
  public var address: HostAndPort
  public var codec: CodecType
  public var routeConfig: RouteConfiguration
  /// `stream_idle_timeout` of the http_connection_manager, when set (Envoy's default of 5 minutes
  /// is not applied: it cuts quiet server streams).
  public var streamIdleTimeout: ProxyDuration?
  /// Whether the http_filters chain holds a grpc_web filter. Without it, gRPC-Web requests are
  /// routed untouched, as Envoy does.
  public var grpcWebEnabled: Bool
  /// Whether the chain holds a cors filter; without one, `cors` policies have no effect.
  public var corsEnabled: Bool
  /// TLS of this filter chain (a `DownstreamTlsContext` transport socket); nil is plaintext.
  public var tls: DownstreamTLS? = nil
  /// The chain's `filter_chain_match.server_names`: the TLS server names (SNI) it serves, exact
  /// or `*.suffix`; empty serves any name no other chain claims.
  public var serverNames: [String] = []
  /// The listener's other filter chains, each with its own names, TLS and HTTP settings (their
  /// name and address are the listener's).
  public var otherChains: [Listener] = []
  /// The request header limits (Envoy's `max_request_headers_kb`, 60 KiB by default, and
  /// `common_http_protocol_options.max_headers_count`, 100 by default): above either a request
  /// gets 431, on HTTP/1.1 and HTTP/2.
  public var headerLimits = HeaderLimits()
  /// The listener's `per_connection_buffer_limit_bytes` (1 MiB by default, as Envoy): how much of
  /// a call's request or response the proxy holds for a side that is not reading before it stops
  /// reading the other side.
  public var bufferLimit = 1 << 20
  /// The connection manager's `http2_protocol_options`: the receive windows the proxy grants an
  /// HTTP/2 client (`initial_stream_window_size`, `initial_connection_window_size`) and the
  /// streams it may open at once (`max_concurrent_streams`). A client may send a stream's window
  /// of request body before the proxy has passed any of it on, so the window is memory the
  /// proxy may have to hold per stream: 1 MiB by default here (Envoy's default is 256 MiB,
  /// which is what let its clients send 40 MiB to a backend that was not reading).
  public var http2 = HTTP2Options()
  /// `common_http_protocol_options.idle_timeout`: a client connection with no call in progress
  /// for this long is closed (HTTP/2 with a GOAWAY first). Envoy's default is 1 hour; nil is
  /// never (a zero in the config).
  public var idleTimeout: ProxyDuration? = .seconds(3600)
  /// `request_headers_timeout`: a request whose head has begun must be complete within this, or
  /// the connection gets 408 and is closed. nil (Envoy's default) is no limit.
  public var requestHeadersTimeout: ProxyDuration?
  /// The `envoy.filters.network.connection_limit` filter's `max_connections`: connections
  /// beyond it are closed as they arrive.
  public var maxConnections: Int?
  /// The connection manager's `stat_prefix`: its stats are `http.<stat_prefix>.…`.
  public var statPrefix: String
  /// The connection manager's `access_log` entries.
  public var accessLogs: [AccessLogConfig] = []
  /// The chain's `envoy.filters.http.grpc_stats` filter, if any.
  public var grpcStats: GRPCStatsConfig?
  /// The connection manager's `tracing`, when it has an OpenTelemetry provider.
  public var tracing: TracingConfig?

  public init(
    name: String,
    address: HostAndPort,
    codec: CodecType,
    routeConfig: RouteConfiguration,
    grpcWebEnabled: Bool,
    corsEnabled: Bool
  ) {
    self.name = name
    self.address = address
    self.codec = codec
    self.routeConfig = routeConfig
    self.grpcWebEnabled = grpcWebEnabled
    self.corsEnabled = corsEnabled
    self.statPrefix = name
  }
}

public struct HTTP2Options: Sendable, Hashable {
  public var initialStreamWindow = 1 << 20
  public var initialConnectionWindow = 8 << 20
  public var maxConcurrentStreams = 1000

  public init() {}
}

public struct HeaderLimits: Sendable, Hashable {
  /// Bytes of header names and values together.
  public var maxBytes: Int
  public var maxCount: Int

  public init(maxBytes: Int = 60 * 1024, maxCount: Int = 100) {
    self.maxBytes = maxBytes
    self.maxCount = maxCount
  }

  /// Whether `headers` (name and value bytes, pseudo-headers excluded) fit.
  public func admits(byteCount: Int, count: Int) -> Bool {
    byteCount <= self.maxBytes && count <= self.maxCount
  }
}

public struct RouteConfiguration: Sendable, Hashable {
  public var virtualHosts: [VirtualHost]
  public var requestHeaders: HeaderMutations
  public var responseHeaders: HeaderMutations
  /// Envoy applies header mutations route first, then virtual host, then this level, so the
  /// widest level wins a clash; this flag reverses the order.
  public var mostSpecificHeaderMutationsWins: Bool

  public init(
    virtualHosts: [VirtualHost], requestHeaders: HeaderMutations = .init(), responseHeaders: HeaderMutations = .init(),
    mostSpecificHeaderMutationsWins: Bool = false
  ) {
    self.virtualHosts = virtualHosts
    self.requestHeaders = requestHeaders
    self.responseHeaders = responseHeaders
    self.mostSpecificHeaderMutationsWins = mostSpecificHeaderMutationsWins
  }
}

/// One level's `request_headers_to_add`/`_remove` or `response_headers_to_add`/`_remove`.
public struct HeaderMutations: Sendable, Hashable {
  public enum Action: String, Sendable, Hashable, CaseIterable {
    case APPEND_IF_EXISTS_OR_ADD, ADD_IF_ABSENT, OVERWRITE_IF_EXISTS_OR_ADD, OVERWRITE_IF_EXISTS
  }

  /// A header value with Envoy's `%REQ(name)%` substitutions resolved per request.
  public enum ValuePart: Sendable, Hashable {
    case text(String)
    case requestHeader(String)
  }

  public struct Add: Sendable, Hashable {
    public var name: String
    public var value: [ValuePart]
    public var action: Action
    public var keepEmptyValue: Bool

    public init(name: String, value: [ValuePart], action: Action = .APPEND_IF_EXISTS_OR_ADD, keepEmptyValue: Bool = false) {
      self.name = name
      self.value = value
      self.action = action
      self.keepEmptyValue = keepEmptyValue
    }
  }

  public var add: [Add]
  public var remove: [String]

  public init(add: [Add] = [], remove: [String] = []) {
    self.add = add
    self.remove = remove
  }

  public var isEmpty: Bool { self.add.isEmpty && self.remove.isEmpty }
}

public struct VirtualHost: Sendable, Hashable {
  public var name: String
  public var domains: [String]
  public var routes: [Route]
  public var cors: CORSPolicy?
  public var requestHeaders: HeaderMutations
  public var responseHeaders: HeaderMutations

  public init(
    name: String, domains: [String], routes: [Route], cors: CORSPolicy?,
    requestHeaders: HeaderMutations = .init(), responseHeaders: HeaderMutations = .init()
  ) {
    self.name = name
    self.domains = domains
    self.routes = routes
    self.cors = cors
    self.requestHeaders = requestHeaders
    self.responseHeaders = responseHeaders
  }
}

public struct StringMatcher: Sendable, Hashable {
  public enum Kind: Sendable, Hashable {
    case exact(String)
    case prefix(String)
    case suffix(String)
    case contains(String)
    case regex(String)
  }

  public var kind: Kind
  public var ignoreCase: Bool

  public init(_ kind: Kind, ignoreCase: Bool = false) {
    self.kind = kind
    self.ignoreCase = ignoreCase
  }
}

public struct HeaderMatcher: Sendable, Hashable {
  public enum Kind: Sendable, Hashable {
    case present(Bool)
    case string(StringMatcher)
  }

  public var name: String
  public var kind: Kind
  public var invert: Bool

  public init(name: String, kind: Kind, invert: Bool = false) {
    self.name = name
    self.kind = kind
    self.invert = invert
  }
}

public struct RouteMatch: Sendable, Hashable {
  public enum PathMatch: Sendable, Hashable {
    case prefix(String)
    case path(String)
    case regex(String)
  }

  public var path: PathMatch
  public var caseSensitive: Bool
  public var headers: [HeaderMatcher]
  /// `query_parameters`: matchers on the query string's parameters, by name.
  public var queryParameters: [HeaderMatcher]
  /// `grpc: {}`: only requests with a gRPC content-type match.
  public var grpcOnly: Bool

  public init(
    path: PathMatch, caseSensitive: Bool = true, headers: [HeaderMatcher] = [], queryParameters: [HeaderMatcher] = [],
    grpcOnly: Bool = false
  ) {
    self.path = path
    self.caseSensitive = caseSensitive
    self.headers = headers
    self.queryParameters = queryParameters
    self.grpcOnly = grpcOnly
  }
}

/// The timeouts of a route, kept as Envoy spells them because their interplay is Envoy's
/// (protocol doc section 5).
public struct RouteTimeouts: Sendable, Hashable {
  /// `route.timeout`; nil means Envoy's default of 15 s; zero disables it.
  public var timeout: ProxyDuration?
  public var maxGrpcTimeout: ProxyDuration?
  public var grpcTimeoutOffset: ProxyDuration?
  public var maxStreamDuration: ProxyDuration?
  public var grpcTimeoutHeaderMax: ProxyDuration?
  public var grpcTimeoutHeaderOffset: ProxyDuration?
  /// `idle_timeout`: a call with no bytes either way for this long ends; nil falls back to the
  /// listener's `stream_idle_timeout`; zero disables it.
  public var idleTimeout: ProxyDuration?

  public init(
    timeout: ProxyDuration? = nil,
    maxGrpcTimeout: ProxyDuration? = nil,
    grpcTimeoutOffset: ProxyDuration? = nil,
    maxStreamDuration: ProxyDuration? = nil,
    grpcTimeoutHeaderMax: ProxyDuration? = nil,
    grpcTimeoutHeaderOffset: ProxyDuration? = nil
  ) {
    self.timeout = timeout
    self.maxGrpcTimeout = maxGrpcTimeout
    self.grpcTimeoutOffset = grpcTimeoutOffset
    self.maxStreamDuration = maxStreamDuration
    self.grpcTimeoutHeaderMax = grpcTimeoutHeaderMax
    self.grpcTimeoutHeaderOffset = grpcTimeoutHeaderOffset
  }

  public static let envoyDefaultTimeout = ProxyDuration.seconds(15)
}

public struct Route: Sendable, Hashable {
  public enum Action: Sendable, Hashable {
    case cluster(String)
    /// The body as bytes: from `inline_string`, `inline_bytes` or `filename`.
    case directResponse(status: Int, body: [UInt8]?)
    /// `weighted_clusters`: each call to one of them, in proportion to the weights.
    case weightedClusters([WeightedCluster])
    /// `cluster_header`: the cluster named by this request header.
    case clusterHeader(String)
  }

  public struct WeightedCluster: Sendable, Hashable {
    public var name: String
    public var weight: Int
    /// Applied before the route's own, when this cluster is the one drawn.
    public var requestHeaders = HeaderMutations()
    public var responseHeaders = HeaderMutations()
    public init(name: String, weight: Int) {
      self.name = name
      self.weight = weight
    }
  }

  /// `regex_rewrite`: the path's matches of `pattern` replaced (`\1` refers to a group).
  public struct RegexRewrite: Sendable, Hashable {
    public var pattern: String
    public var substitution: String
    public init(pattern: String, substitution: String) {
      self.pattern = pattern
      self.substitution = substitution
    }
  }

  /// `retry_policy`: a call is sent again, before its response has started, when its answer or
  /// failure is one of `retryOn`.
  public struct RetryPolicy: Sendable, Hashable {
    public enum Condition: String, Sendable, Hashable, CaseIterable {
      case serverError = "5xx"
      case gatewayError = "gateway-error"
      case reset = "reset"
      case connectFailure = "connect-failure"
      case refusedStream = "refused-stream"
      case retriableStatusCodes = "retriable-status-codes"
      case cancelled = "cancelled"
      case deadlineExceeded = "deadline-exceeded"
      case internalError = "internal"
      case resourceExhausted = "resource-exhausted"
      case unavailable = "unavailable"
    }

    public var retryOn: Set<Condition>
    public var numRetries: Int
    public var perTryTimeout: ProxyDuration?
    public var retriableStatusCodes: Set<Int>

    public init(retryOn: Set<Condition>, numRetries: Int = 1, perTryTimeout: ProxyDuration? = nil, retriableStatusCodes: Set<Int> = []) {
      self.retryOn = retryOn
      self.numRetries = numRetries
      self.perTryTimeout = perTryTimeout
      self.retriableStatusCodes = retriableStatusCodes
    }
  }

  public var name: String?
  public var match: RouteMatch
  public var action: Action
  public var timeouts: RouteTimeouts
  public var prefixRewrite: String?
  public var cors: CORSPolicy?
  public var requestHeaders: HeaderMutations
  public var responseHeaders: HeaderMutations
  public var regexRewrite: RegexRewrite?
  /// `host_rewrite_literal`: the `:authority` sent upstream.
  public var hostRewrite: String?
  public var retryPolicy: RetryPolicy?

  public init(
    name: String? = nil,
    match: RouteMatch,
    action: Action,
    timeouts: RouteTimeouts = .init(),
    prefixRewrite: String? = nil,
    cors: CORSPolicy? = nil,
    requestHeaders: HeaderMutations = .init(),
    responseHeaders: HeaderMutations = .init()
  ) {
    self.name = name
    self.match = match
    self.action = action
    self.timeouts = timeouts
    self.prefixRewrite = prefixRewrite
    self.cors = cors
    self.requestHeaders = requestHeaders
    self.responseHeaders = responseHeaders
  }
}

/// Envoy's `CorsPolicy`. Each field is optional so that a route's policy can be layered over its
/// virtual host's, field by field, as Envoy does (protocol doc C1).
public struct CORSPolicy: Sendable, Hashable {
  public var allowOrigins: [StringMatcher]?
  public var allowMethods: String?
  public var allowHeaders: String?
  public var exposeHeaders: String?
  public var maxAge: String?
  public var allowCredentials: Bool?
  public var allowPrivateNetworkAccess: Bool?
  /// `filter_enabled` as a percentage; nil means enabled.
  public var enabledPercent: Double?
  public var forwardNotMatchingPreflights: Bool?

  public init(
    allowOrigins: [StringMatcher]? = nil,
    allowMethods: String? = nil,
    allowHeaders: String? = nil,
    exposeHeaders: String? = nil,
    maxAge: String? = nil,
    allowCredentials: Bool? = nil,
    allowPrivateNetworkAccess: Bool? = nil,
    enabledPercent: Double? = nil,
    forwardNotMatchingPreflights: Bool? = nil
  ) {
    self.allowOrigins = allowOrigins
    self.allowMethods = allowMethods
    self.allowHeaders = allowHeaders
    self.exposeHeaders = exposeHeaders
    self.maxAge = maxAge
    self.allowCredentials = allowCredentials
    self.allowPrivateNetworkAccess = allowPrivateNetworkAccess
    self.enabledPercent = enabledPercent
    self.forwardNotMatchingPreflights = forwardNotMatchingPreflights
  }

  /// This policy with every unset field taken from `fallback` (the less specific policy).
  public func layered(over fallback: CORSPolicy?) -> CORSPolicy {
    guard let fallback else { return self }
    var merged = self
    merged.allowOrigins = self.allowOrigins ?? fallback.allowOrigins
    merged.allowMethods = self.allowMethods ?? fallback.allowMethods
    merged.allowHeaders = self.allowHeaders ?? fallback.allowHeaders
    merged.exposeHeaders = self.exposeHeaders ?? fallback.exposeHeaders
    merged.maxAge = self.maxAge ?? fallback.maxAge
    merged.allowCredentials = self.allowCredentials ?? fallback.allowCredentials
    merged.allowPrivateNetworkAccess = self.allowPrivateNetworkAccess ?? fallback.allowPrivateNetworkAccess
    merged.enabledPercent = self.enabledPercent ?? fallback.enabledPercent
    merged.forwardNotMatchingPreflights = self.forwardNotMatchingPreflights ?? fallback.forwardNotMatchingPreflights
    return merged
  }
}

public struct Cluster: Sendable, Hashable {
  public enum DiscoveryType: String, Sendable, Hashable, CaseIterable {
    case staticAddresses = "STATIC"
    case strictDNS = "STRICT_DNS"
    case logicalDNS = "LOGICAL_DNS"
  }

  public enum LoadBalancing: String, Sendable, Hashable, CaseIterable {
    case roundRobin = "ROUND_ROBIN"
    case leastRequest = "LEAST_REQUEST"
    case random = "RANDOM"
  }

  /// Which DNS answers a cluster uses (Envoy's `dns_lookup_family`).
  public enum DNSLookupFamily: String, Sendable, Hashable, CaseIterable {
    case v4Only = "V4_ONLY"
    case v6Only = "V6_ONLY"
    /// IPv6 addresses if there are any, else IPv4.
    case auto = "AUTO"
    /// IPv4 addresses if there are any, else IPv6 (Envoy's default).
    case v4Preferred = "V4_PREFERRED"
    case all = "ALL"
  }

  public var name: String
  public var type: DiscoveryType
  public var endpoints: [HostAndPort]
  public var connectTimeout: ProxyDuration
  public var loadBalancing: LoadBalancing
  /// Whether the upstream speaks HTTP/2. gRPC needs it; without it the cluster is HTTP/1.1 in
  /// Envoy, which no gRPC server accepts.
  public var http2: Bool
  public var dnsRefreshRate: ProxyDuration
  public var dnsLookupFamily: DNSLookupFamily = .v4Preferred
  /// `dns_failure_refresh_rate`: the retry interval after a failed lookup (base, growing to max).
  public var dnsFailureRefreshRate: (base: ProxyDuration, max: ProxyDuration)? {
    get { self.dnsFailureRefresh.map { ($0[0], $0[1]) } }
    set { self.dnsFailureRefresh = newValue.map { [$0.base, $0.max] } }
  }
  private var dnsFailureRefresh: [ProxyDuration]?
  /// `respect_dns_ttl`: refresh when the records' TTL runs out rather than every refresh rate.
  public var respectDNSTTL = false
  /// DNS servers from `dns_resolvers` or `typed_dns_resolver_config`; empty means the system's.
  public var dnsResolvers: [HostAndPort] = []
  /// HTTP/2 PINGs on idle and busy upstream connections, so a peer that vanished without a FIN
  /// (a killed VM, a dropped overlay route) is noticed. `connection_keepalive` when set;
  /// otherwise every 30 s with 10 s to answer (Envoy sends none by default).
  public var keepalive: (interval: ProxyDuration, timeout: ProxyDuration) {
    get { (self.keepaliveTimes[0], self.keepaliveTimes[1]) }
    set { self.keepaliveTimes = [newValue.interval, newValue.timeout] }
  }
  private var keepaliveTimes: [ProxyDuration] = [.seconds(30), .seconds(10)]
  public var healthCheck: HealthCheck?
  public var outlierDetection: OutlierDetection?
  public var circuitBreakers = CircuitBreakers()
  /// TLS to the endpoints (a `UpstreamTlsContext` transport socket); nil is plaintext.
  public var tls: UpstreamTLS?

  /// Envoy's `health_checks` entry with `grpc_health_check` (the grpc.health.v1 protocol).
  public struct HealthCheck: Sendable, Hashable {
    public var interval: ProxyDuration
    public var timeout: ProxyDuration
    public var unhealthyThreshold: Int
    public var healthyThreshold: Int
    /// Checked name; "" asks about the whole server.
    public var serviceName: String
    public var authority: String?

    public init(interval: ProxyDuration, timeout: ProxyDuration, unhealthyThreshold: Int = 1, healthyThreshold: Int = 1,
      serviceName: String = "", authority: String? = nil) {
      self.interval = interval
      self.timeout = timeout
      self.unhealthyThreshold = unhealthyThreshold
      self.healthyThreshold = healthyThreshold
      self.serviceName = serviceName
      self.authority = authority
    }
  }

  /// Envoy's `outlier_detection`, with Envoy's defaults.
  public struct OutlierDetection: Sendable, Hashable {
    public var consecutive5xx = 5
    public var consecutiveGatewayFailure = 5
    public var baseEjectionTime = ProxyDuration.seconds(30)
    public var maxEjectionTime = ProxyDuration.seconds(300)
    public var maxEjectionPercent = 10
    public init() {}
  }

  /// The default-priority thresholds of `circuit_breakers`, with Envoy's defaults.
  public struct CircuitBreakers: Sendable, Hashable {
    public var maxConnections = 1024
    public var maxPendingRequests = 1024
    public var maxRequests = 1024
    public var maxRetries = 3
    public init() {}
  }

  public init(
    name: String,
    type: DiscoveryType,
    endpoints: [HostAndPort],
    connectTimeout: ProxyDuration = .seconds(5),
    loadBalancing: LoadBalancing = .roundRobin,
    http2: Bool = true,
    dnsRefreshRate: ProxyDuration = .seconds(5)
  ) {
    self.name = name
    self.type = type
    self.endpoints = endpoints
    self.connectTimeout = connectTimeout
    self.loadBalancing = loadBalancing
    self.http2 = http2
    self.dnsRefreshRate = dnsRefreshRate
  }
}
