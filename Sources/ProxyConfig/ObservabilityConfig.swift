/// The `envoy.filters.http.grpc_stats` filter: per-method call and message counters under
/// `cluster.<name>.grpc.`.
public struct GRPCStatsConfig: Sendable, Hashable {
  /// `stats_for_all_methods`: every method gets `grpc.<service>.<method>.*`. Envoy's default is
  /// false: without it or an allowlist, calls are counted under `grpc.*` with no method.
  public var statsForAllMethods = false
  /// `individual_method_stats_allowlist`: service → methods counted by name; the rest go
  /// under `grpc.*`.
  public var allowlist: [String: Set<String>] = [:]
  /// `enable_upstream_stats`: a `upstream_rq_time` histogram per method.
  public var upstreamStats = false
  /// `replace_dots_in_grpc_service_name`: `pkg.Service` is named `pkg_Service` in the stats.
  public var replaceDotsInServiceName = false

  public init() {}

  /// The `<service>.<method>` part of a call's stat names, or nil to count it under `grpc.*`.
  public func statName(service: Substring, method: Substring) -> String? {
    guard self.statsForAllMethods || self.allowlist[String(service)]?.contains(String(method)) == true else { return nil }
    let shownService = self.replaceDotsInServiceName ? service.replacingOccurrences(of: ".", with: "_") : String(service)
    return "\(shownService).\(method)"
  }
}

/// The connection manager's `tracing` with the `envoy.tracers.opentelemetry` provider.
public struct TracingConfig: Sendable, Hashable {
  /// Where the OTLP/gRPC exporter sends spans.
  public struct Collector: Sendable, Hashable {
    public var host: String
    public var port: Int
    public var tls: Bool
    /// The cluster it came from, for messages.
    public var cluster: String?

    public init(host: String, port: Int, tls: Bool, cluster: String?) {
      self.host = host
      self.port = port
      self.tls = tls
      self.cluster = cluster
    }

    public var endpoint: String { "\(self.tls ? "https" : "http")://\(self.host):\(self.port)" }
  }

  /// A `custom_tags` entry: an attribute added to every span.
  public enum CustomTag: Sendable, Hashable {
    case literal(tag: String, value: String)
    case requestHeader(tag: String, header: String, defaultValue: String?)
    case environment(tag: String, name: String, defaultValue: String?)
  }

  public var collector: Collector
  /// `service_name`, the spans' `service.name` resource attribute.
  public var serviceName: String
  /// Percentages, as Envoy's `random_sampling`, `client_sampling` and `overall_sampling`.
  public var randomSampling = 100.0
  public var clientSampling = 100.0
  public var overallSampling = 100.0
  /// `operation_name: EGRESS` makes the span a client span; INGRESS (the default) a server span.
  public var egress = false
  public var customTags: [CustomTag] = []
  /// `max_path_tag_length`: Envoy cuts the `http.url` attribute to this (256 by default).
  public var maxPathTagLength = 256

  public init(collector: Collector, serviceName: String) {
    self.collector = collector
    self.serviceName = serviceName
  }
}
