import Foundation
import NIOCore
import ProxyConfig

/// Envoy's latency histogram buckets, in milliseconds (its default `histogram_bucket_settings`).
struct LatencyHistogram: Sendable {
  static let bounds: [Double] = [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000]
  /// Counts per bucket (not cumulative); the last one is above every bound.
  var buckets = [UInt64](repeating: 0, count: LatencyHistogram.bounds.count + 1)
  var count: UInt64 = 0
  var sum: Double = 0

  mutating func record(milliseconds: Double) {
    var i = 0
    while i < Self.bounds.count && milliseconds > Self.bounds[i] { i += 1 }
    self.buckets[i] += 1
    self.count += 1
    self.sum += milliseconds
  }

  mutating func merge(_ other: LatencyHistogram) {
    for i in self.buckets.indices { self.buckets[i] += other.buckets[i] }
    self.count += other.count
    self.sum += other.sum
  }

  /// The value at quantile `q` (0...1), interpolated within its bucket as Envoy's histograms do
  /// roughly; nil with no sample.
  func quantile(_ q: Double) -> Double? {
    guard self.count > 0 else { return nil }
    let rank = q * Double(self.count)
    var seen: Double = 0
    for (i, n) in self.buckets.enumerated() where n > 0 {
      let lower = i == 0 ? 0 : Self.bounds[i - 1]
      let upper = i < Self.bounds.count ? Self.bounds[i] : lower * 2
      if seen + Double(n) >= rank {
        return lower + (upper - lower) * max(0, min(1, (rank - seen) / Double(n)))
      }
      seen += Double(n)
    }
    return Self.bounds.last
  }
}

/// A counter, gauge or histogram of one event loop, resolved once by name and then bumped
/// through the reference: no hashing on the call path, as Envoy's stat handles.
final class StatCounter {
  var value: UInt64 = 0
  @inline(__always) func add(_ n: UInt64 = 1) { self.value &+= n }
}

final class StatGauge {
  var value: Int64 = 0
}

final class StatHistogram {
  var histogram = LatencyHistogram()

  func record(since start: NIODeadline) {
    self.histogram.record(milliseconds: Double((NIODeadline.now() - start).nanoseconds) / 1_000_000)
  }
}

/// One event loop's statistics, by Envoy's names. Only that loop writes them, with no lock and
/// no atomic on the call path; the admin port reads every loop's copy by running a task on each
/// loop (`ProxyStatus.collectStats`).
final class LoopStats {
  let names = CallStatNames()
  private var counters: [String: StatCounter] = [:]
  private var gauges: [String: StatGauge] = [:]
  private var histograms: [String: StatHistogram] = [:]

  init() {
    self.names.stats = self
  }

  func counter(_ name: String) -> StatCounter {
    if let counter = self.counters[name] { return counter }
    let counter = StatCounter()
    self.counters[name] = counter
    return counter
  }

  func gauge(_ name: String) -> StatGauge {
    if let gauge = self.gauges[name] { return gauge }
    let gauge = StatGauge()
    self.gauges[name] = gauge
    return gauge
  }

  func histogram(_ name: String) -> StatHistogram {
    if let histogram = self.histograms[name] { return histogram }
    let histogram = StatHistogram()
    self.histograms[name] = histogram
    return histogram
  }

  /// For the rarer events (connections, retries, timeouts): by name.
  func count(_ name: String, by amount: UInt64 = 1) {
    self.counter(name).add(amount)
  }

  func gauge(_ name: String, by delta: Int64) {
    self.gauge(name).value += delta
  }

  /// `cluster.<cluster>.<stat>`, for the rarer events.
  func count(_ stat: String, cluster: String) {
    self.count(self.names.cluster(cluster).prefix + stat)
  }

  var snapshot: StatsSnapshot {
    StatsSnapshot(
      counters: self.counters.mapValues(\.value), gauges: self.gauges.mapValues(\.value),
      histograms: self.histograms.mapValues(\.histogram))
  }

  // MARK: - Client connections

  /// A client connection accepted on a listener (its address in Envoy's form, `0.0.0.0_8080`)
  /// whose connection manager has `stat_prefix`.
  func connectionOpened(_ names: HTTPStatNames) {
    names.listenerConnections.add()
    names.listenerActive.value += 1
  }

  func connectionClosed(_ names: HTTPStatNames) {
    names.listenerActive.value -= 1
  }

  /// The connection reached a connection manager: on a TLS listener, the filter chain the
  /// client's server name chose, so each chain's `stat_prefix` counts its own connections.
  func managerConnectionOpened(_ names: HTTPStatNames) {
    names.connections.add()
    names.active.value += 1
  }

  func managerConnectionClosed(_ names: HTTPStatNames) {
    names.active.value -= 1
  }
}

/// Every loop's statistics added up, with the process-wide ones.
struct StatsSnapshot: Sendable {
  var counters: [String: UInt64] = [:]
  var gauges: [String: Int64] = [:]
  var histograms: [String: LatencyHistogram] = [:]

  mutating func merge(_ other: StatsSnapshot) {
    for (k, v) in other.counters { self.counters[k, default: 0] &+= v }
    for (k, v) in other.gauges { self.gauges[k, default: 0] += v }
    for (k, v) in other.histograms { self.histograms[k, default: LatencyHistogram()].merge(v) }
  }

  /// Every stat's name, for `?filter=`.
  func filtered(_ regex: NSRegularExpression?) -> StatsSnapshot {
    guard let regex else { return self }
    func keep(_ name: String) -> Bool {
      regex.firstMatch(in: name, range: NSRange(name.startIndex..., in: name)) != nil
    }
    return StatsSnapshot(
      counters: self.counters.filter { keep($0.key) }, gauges: self.gauges.filter { keep($0.key) },
      histograms: self.histograms.filter { keep($0.key) })
  }

  static let quantiles: [Double] = [0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1]

  private static func format(_ value: Double?) -> String {
    guard let value else { return "nan" }
    return value == value.rounded() ? String(Int(value)) : String(format: "%.3g", value)
  }

  /// `/stats`: `name: value` a line, sorted, histograms with their quantiles as Envoy prints
  /// them (`P50(nan,2.05)`: this interval's, then the cumulative value; only the latter is kept).
  var text: String {
    var lines: [String] = []
    for (k, v) in self.counters { lines.append("\(k): \(v)") }
    for (k, v) in self.gauges { lines.append("\(k): \(v)") }
    for (k, h) in self.histograms {
      let parts = Self.quantiles.map { q -> String in
        let label = q == 0.995 ? "P99.5" : q == 0.999 ? "P99.9" : "P\(Int(q * 100))"
        return "\(label)(nan,\(Self.format(h.quantile(q))))"
      }
      lines.append("\(k): " + parts.joined(separator: " "))
    }
    return lines.sorted().joined(separator: "\n") + "\n"
  }

  /// `/stats?format=json`, in Envoy's shape: `{"stats": [{"name", "value"}…, {"histograms": …}]}`.
  var json: String {
    var stats: [[String: Any]] = []
    for (k, v) in self.counters.sorted(by: { $0.key < $1.key }) { stats.append(["name": k, "value": v]) }
    for (k, v) in self.gauges.sorted(by: { $0.key < $1.key }) { stats.append(["name": k, "value": v]) }
    let computed = self.histograms.sorted(by: { $0.key < $1.key }).map { (k, h) -> [String: Any] in
      ["name": k, "values": Self.quantiles.map { q -> [String: Any] in
        ["interval": NSNull(), "cumulative": h.quantile(q).map { $0 as Any } ?? NSNull()]
      }]
    }
    stats.append(["histograms": ["supported_quantiles": Self.quantiles.map { $0 * 100 }, "computed_quantiles": computed]])
    let data = (try? JSONSerialization.data(withJSONObject: ["stats": stats], options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data("{}".utf8)
    return String(decoding: data, as: UTF8.self) + "\n"
  }

  /// `/stats/prometheus`: Prometheus' text format with Envoy's names and tags
  /// (`envoy_cluster_upstream_rq_total{envoy_cluster_name="user"}`).
  func prometheus(clusters: [String]) -> String {
    struct Family { var type: String; var lines: [String] = [] }
    var families: [String: Family] = [:]
    func add(_ name: String, _ type: String, _ value: String, suffix: String = "", extra: [(String, String)] = []) {
      let (metric, tags) = PrometheusName.split(name, clusters: clusters)
      let labels = (tags + extra).map { "\($0.0)=\"\(PrometheusName.escape($0.1))\"" }.joined(separator: ",")
      families[metric, default: Family(type: type)].lines.append("\(metric)\(suffix)\(labels.isEmpty ? "" : "{\(labels)}") \(value)")
    }
    // Sorted by name; a histogram's buckets stay in increasing `le`, as the format requires.
    for (k, v) in self.counters.sorted(by: { $0.key < $1.key }) { add(k, "counter", String(v)) }
    for (k, v) in self.gauges.sorted(by: { $0.key < $1.key }) { add(k, "gauge", String(v)) }
    for (k, h) in self.histograms.sorted(by: { $0.key < $1.key }) {
      var cumulative: UInt64 = 0
      for (i, bound) in LatencyHistogram.bounds.enumerated() {
        cumulative += h.buckets[i]
        add(k, "histogram", String(cumulative), suffix: "_bucket", extra: [("le", Self.format(bound))])
      }
      add(k, "histogram", String(h.count), suffix: "_bucket", extra: [("le", "+Inf")])
      add(k, "histogram", String(format: "%.6g", h.sum), suffix: "_sum")
      add(k, "histogram", String(h.count), suffix: "_count")
    }
    var out = ""
    for (metric, family) in families.sorted(by: { $0.key < $1.key }) {
      out += "# TYPE \(metric) \(family.type)\n"
      for line in family.lines { out += line + "\n" }
    }
    return out
  }
}

/// Envoy's tag extraction for the names this proxy keeps: the variable parts of a stat's name
/// become labels, the rest the metric's name.
enum PrometheusName {
  static func split(_ name: String, clusters: [String]) -> (String, [(String, String)]) {
    var tags: [(String, String)] = []
    var rest = name
    var family = ""
    if name.hasPrefix("cluster.") {
      let tail = String(name.dropFirst("cluster.".count))
      // Cluster names may hold dots: the longest configured name that fits.
      let cluster = clusters.filter { tail.hasPrefix($0 + ".") }.max(by: { $0.count < $1.count })
        ?? String(tail.prefix(while: { $0 != "." }))
      tags.append(("envoy_cluster_name", cluster))
      rest = String(tail.dropFirst(cluster.count + 1))
      family = "cluster"
      for bridge in ["grpc-web.", "grpc."] where rest.hasPrefix(bridge) {
        // grpc-web.<service>.<method>.<stat>: the service may hold dots, the method not.
        let parts = rest.dropFirst(bridge.count).split(separator: ".", omittingEmptySubsequences: false)
        if parts.count >= 3 {
          tags.append(("envoy_grpc_bridge_service", parts.dropLast(2).joined(separator: ".")))
          tags.append(("envoy_grpc_bridge_method", String(parts[parts.count - 2])))
          rest = String(bridge.dropLast()) + "." + parts[parts.count - 1]
        }
      }
    } else if name.hasPrefix("http.") {
      let tail = name.dropFirst("http.".count)
      let prefix = String(tail.prefix(while: { $0 != "." }))
      tags.append(("envoy_http_conn_manager_prefix", prefix))
      rest = String(tail.dropFirst(prefix.count + 1))
      family = "http"
    } else if name.hasPrefix("listener.") {
      let tail = name.dropFirst("listener.".count)
      // listener.<address>_<port>.<stat>: the address holds dots, the port ends at the next one.
      if let underscore = tail.firstIndex(of: "_"), let dot = tail[underscore...].firstIndex(of: ".") {
        tags.append(("envoy_listener_address", String(tail[..<dot])))
        rest = String(tail[tail.index(after: dot)...])
      } else {
        rest = String(tail)
      }
      family = "listener"
    }
    // upstream_rq_200 → upstream_rq{envoy_response_code="200"}; upstream_rq_2xx →
    // upstream_rq_xx{envoy_response_code_class="2"}.
    for stem in ["upstream_rq_", "downstream_rq_"] where rest.hasPrefix(stem) {
      let code = rest.dropFirst(stem.count)
      if code.count == 3, let first = code.first, first.isNumber {
        if code.dropFirst() == "xx" {
          tags.append(("envoy_response_code_class", String(first)))
          rest = stem + "xx"
        } else if code.allSatisfy(\.isNumber) {
          tags.append(("envoy_response_code", String(code)))
          rest = String(stem.dropLast())
        }
      }
    }
    let metric = "envoy_" + (family.isEmpty ? "" : family + "_") + rest
    return (Self.sanitize(metric), tags)
  }

  static func sanitize(_ name: String) -> String {
    String(name.map { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") ? $0 : "_" })
  }

  static func escape(_ value: String) -> String {
    value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
      .replacingOccurrences(of: "\n", with: "\\n")
  }
}

/// A connection manager's stats on one loop, resolved once rather than per call.
final class HTTPStatNames {
  let requestTotal: StatCounter
  let requestTime: StatHistogram
  /// `downstream_rq_1xx` … `downstream_rq_5xx`, by the status's first digit.
  let requestClass: [StatCounter]
  let connections: StatCounter
  let active: StatGauge
  let listenerConnections: StatCounter
  let listenerActive: StatGauge

  init(stats: LoopStats, statPrefix: String, listenerAddress: String) {
    let base = "http.\(statPrefix)."
    self.requestTotal = stats.counter(base + "downstream_rq_total")
    self.requestTime = stats.histogram(base + "downstream_rq_time")
    self.requestClass = (0...5).map { stats.counter(base + "downstream_rq_\($0)xx") }
    self.connections = stats.counter(base + "downstream_cx_total")
    self.active = stats.gauge(base + "downstream_cx_active")
    self.listenerConnections = stats.counter("listener.\(listenerAddress).downstream_cx_total")
    self.listenerActive = stats.gauge("listener.\(listenerAddress).downstream_cx_active")
  }
}

/// A cluster's per-call stats on one loop.
final class ClusterStatNames {
  let requestTotal: StatCounter
  let requestTime: StatHistogram
  let requestClass: [StatCounter]
  let prefix: String
  private unowned let stats: LoopStats
  private var byStatus: [Int: StatCounter] = [:]

  init(stats: LoopStats, cluster: String) {
    self.stats = stats
    self.prefix = "cluster.\(cluster)."
    self.requestTotal = stats.counter(self.prefix + "upstream_rq_total")
    self.requestTime = stats.histogram(self.prefix + "upstream_rq_time")
    self.requestClass = (0...5).map { stats.counter("cluster.\(cluster).upstream_rq_\($0)xx") }
  }

  /// Per gRPC bridge ("grpc-web", "grpc"), per path: the method's stats, found with no key
  /// built per call.
  var methods: [String: [String: MethodStatNames]] = [:]
  /// The grpc_stats filter's, per path, and per stat name (`<service>.<method>.`, or "" for
  /// calls counted under `grpc.*`): many paths may share one.
  var grpcStatsByPath: [String: MethodStatNames] = [:]
  var grpcStatsByName: [String: MethodStatNames] = [:]

  /// `upstream_rq_<code>`.
  func status(_ code: Int) -> StatCounter {
    if let counter = self.byStatus[code] { return counter }
    let counter = self.stats.counter(self.prefix + "upstream_rq_\(code)")
    self.byStatus[code] = counter
    return counter
  }
}

extension LoopStats {
  /// The stats of gRPC methods, per cluster and path, kept for at most this many methods per
  /// loop: the path comes from the client, and a client inventing paths must not grow the table
  /// without end. Methods beyond it are counted as `unknown.unknown`.
  static let maxMethods = 1000
}

/// A gRPC method's stats on one loop: `cluster.<name>.grpc-web.<service>.<method>.*`.
final class MethodStatNames {
  // Made on first use, as Envoy makes them: a method that never failed has no `failure`.
  private(set) lazy var total = self.stats.counter(self.prefix + "total")
  private(set) lazy var success = self.stats.counter(self.prefix + "success")
  private(set) lazy var failure = self.stats.counter(self.prefix + "failure")
  private let prefix: String
  private unowned let stats: LoopStats
  private var byStatus: [GRPCStatus: StatCounter] = [:]

  init(stats: LoopStats, prefix: String) {
    self.stats = stats
    self.prefix = prefix
  }

  /// `<prefix><number>`, as Envoy names a gRPC status's counter.
  func status(_ code: GRPCStatus) -> StatCounter {
    if let counter = self.byStatus[code] { return counter }
    let counter = self.stats.counter(self.prefix + code.headerValue)
    self.byStatus[code] = counter
    return counter
  }

  /// The grpc_stats filter's, made on first use as Envoy makes them.
  private(set) lazy var requestMessages = self.stats.counter(self.prefix + "request_message_count")
  private(set) lazy var responseMessages = self.stats.counter(self.prefix + "response_message_count")
  private(set) lazy var upstreamTime = self.stats.histogram(self.prefix + "upstream_rq_time")
}

/// The per-call stats of one loop's clusters and methods, resolved on first use.
final class CallStatNames {
  unowned(unsafe) var stats: LoopStats!
  private var clusters: [String: ClusterStatNames] = [:]
  private var methodCount = 0

  func cluster(_ name: String) -> ClusterStatNames {
    if let names = self.clusters[name] { return names }
    let names = ClusterStatNames(stats: self.stats, cluster: name)
    self.clusters[name] = names
    return names
  }

  /// Envoy's `cluster.<name>.<bridge>.<service>.<method>.*` for a path `/service/method`.
  func method(cluster name: String, path: String, bridge: String) -> MethodStatNames {
    let cluster = self.cluster(name)
    if let names = cluster.methods[bridge]?[path] { return names }
    let parts = path.split(separator: "/", omittingEmptySubsequences: false)
    let known = parts.count == 3 && parts[0].isEmpty && !parts[1].isEmpty && !parts[2].isEmpty
    let full = self.methodCount >= LoopStats.maxMethods
    let key = known && !full ? path : ""
    if let names = cluster.methods[bridge]?[key] { return names }
    let method = known && !full ? "\(parts[1]).\(parts[2].prefix(while: { $0 != "?" }))" : "unknown.unknown"
    let names = MethodStatNames(stats: self.stats, prefix: "\(cluster.prefix)\(bridge).\(method).")
    cluster.methods[bridge, default: [:]][key] = names
    if !key.isEmpty { self.methodCount += 1 }
    return names
  }

  /// The grpc_stats filter's `cluster.<name>.grpc.[<service>.<method>.]*` for a path, or nil
  /// for a path that is not `/service/method` (Envoy does not count those).
  func grpcStats(cluster name: String, path: String, config: GRPCStatsConfig) -> MethodStatNames? {
    let cluster = self.cluster(name)
    if let names = cluster.grpcStatsByPath[path] { return names }
    let parts = path.split(separator: "/", omittingEmptySubsequences: false)
    guard parts.count == 3, parts[0].isEmpty, !parts[1].isEmpty, !parts[2].isEmpty else { return nil }
    // Paths come from clients: past the bound, a path is neither remembered nor named.
    let full = self.methodCount >= LoopStats.maxMethods
    let statName = full ? "" : config.statName(service: parts[1], method: parts[2]).map { $0 + "." } ?? ""
    let names = cluster.grpcStatsByName[statName] ?? MethodStatNames(stats: self.stats, prefix: "\(cluster.prefix)grpc.\(statName)")
    cluster.grpcStatsByName[statName] = names
    if !full {
      cluster.grpcStatsByPath[path] = names
      self.methodCount += 1
    }
    return names
  }
}
