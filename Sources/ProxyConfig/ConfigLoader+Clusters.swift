import Foundation
import Yams

// Reading clusters: discovery, endpoints, load balancing, health checks, outlier detection
// and circuit breakers.

extension Reader {
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
    od.baseEjectionTime = try m.optional("base_ejection_time")?.duration() ?? od.baseEjectionTime
    od.maxEjectionTime = try m.optional("max_ejection_time")?.duration() ?? od.maxEjectionTime
    od.maxEjectionPercent = try m.optional("max_ejection_percent")?.int() ?? od.maxEjectionPercent
    m.accept("interval", "enforcing_consecutive_5xx", "enforcing_consecutive_gateway_failure", "enforcing_success_rate",
      "success_rate_minimum_hosts", "success_rate_request_volume", "success_rate_stdev_factor",
      "consecutive_local_origin_failure", "enforcing_consecutive_local_origin_failure",
      "failure_percentage_threshold", "enforcing_failure_percentage", "failure_percentage_minimum_hosts",
      "failure_percentage_request_volume", "max_ejection_time_jitter", "successful_active_health_check_uneject_host")
    // Without the split (Envoy's default) a reset or a failed connection counts as a 503, as here;
    // with it, Envoy counts them apart under consecutive_local_origin_failure, which the proxy
    // does not: say so rather than take the field and do nothing.
    if let split = m.optional("split_external_local_origin_errors"), try split.bool() {
      self.sink.add(split, "split_external_local_origin_errors is not supported: resets and connect failures count as 503s toward consecutive_5xx and consecutive_gateway_failure, and consecutive_local_origin_failure is not applied")
    }
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
