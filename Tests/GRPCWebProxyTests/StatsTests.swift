import Foundation
import Testing

@testable import GRPCWebProxy
import ProxyConfig
import NIOHPACK

@Suite struct StatsTests {
  @Test func prometheusNamesAndTagsAreEnvoys() {
    let clusters = ["user", "user.v2"]
    func split(_ name: String) -> String {
      let (metric, tags) = PrometheusName.split(name, clusters: clusters)
      return metric + "{" + tags.map { "\($0.0)=\($0.1)" }.joined(separator: ",") + "}"
    }
    #expect(split("cluster.user.upstream_rq_total") == "envoy_cluster_upstream_rq_total{envoy_cluster_name=user}")
    #expect(split("cluster.user.v2.upstream_cx_active") == "envoy_cluster_upstream_cx_active{envoy_cluster_name=user.v2}")
    #expect(split("cluster.user.upstream_rq_503") == "envoy_cluster_upstream_rq{envoy_cluster_name=user,envoy_response_code=503}")
    #expect(split("cluster.user.upstream_rq_5xx") == "envoy_cluster_upstream_rq_xx{envoy_cluster_name=user,envoy_response_code_class=5}")
    #expect(split("http.ingress_http.downstream_rq_2xx")
      == "envoy_http_downstream_rq_xx{envoy_http_conn_manager_prefix=ingress_http,envoy_response_code_class=2}")
    #expect(split("listener.0.0.0.0_8080.downstream_cx_total") == "envoy_listener_downstream_cx_total{envoy_listener_address=0.0.0.0_8080}")
    #expect(split("cluster.user.grpc-web.demo.User.login.success")
      == "envoy_cluster_grpc_web_success{envoy_cluster_name=user,envoy_grpc_bridge_service=demo.User,envoy_grpc_bridge_method=login}")
    #expect(split("server.live") == "envoy_server_live{}")
  }

  @Test func methodsInventedByClientsAreCappedPerLoop() {
    let stats = LoopStats()
    for i in 0..<(LoopStats.maxMethods + 50) {
      stats.names.method(cluster: "c", path: "/svc\(i)/m", bridge: "grpc-web").total.add()
    }
    stats.names.method(cluster: "c", path: "not-a-method", bridge: "grpc-web").total.add()
    let counters = stats.snapshot.counters
    #expect(counters["cluster.c.grpc-web.svc0.m.total"] == 1)
    #expect(counters["cluster.c.grpc-web.unknown.unknown.total"] == 51)
    #expect(counters.keys.filter { $0.hasSuffix(".total") }.count == LoopStats.maxMethods + 1)
  }

  @Test func histogramQuantilesComeFromTheBuckets() {
    var h = LatencyHistogram()
    #expect(h.quantile(0.5) == nil)
    for ms in [0.2, 0.7, 3, 3, 40] { h.record(milliseconds: ms) }
    #expect(h.count == 5)
    #expect(h.buckets[0] == 1 && h.buckets[1] == 1 && h.buckets[2] == 2 && h.buckets[5] == 1)
    let p50 = h.quantile(0.5)!
    #expect(p50 > 1 && p50 <= 5)
    #expect(h.quantile(1)! <= 50 && h.quantile(1)! > 25)
  }
}

@Suite struct AccessLogFormatTests {
  @Test func startTimeIsEnvoysISO8601InUTC() {
    let date = Date(timeIntervalSince1970: 1_796_590_688.36)  // 2026-12-06T20:58:08.360Z
    #expect(AccessLogFormatter.iso8601(date) == "2026-12-06T20:58:08.360Z")
    #expect(AccessLogFormatter.iso8601(Date(timeIntervalSince1970: 0)) == "1970-01-01T00:00:00.000Z")
  }

  func record() -> CallLogRecord {
    let r = CallLogRecord()
    r.requestHeaders = [":method": "POST", "user-agent": "abcdefgh"]
    r.responseCode = 200
    r.bytesSent = 12
    return r
  }

  @Test func jsonKeepsNumbersTypedAndOmitsEmptyValuesWhenAsked() {
    let template = AccessLogConfig.JSONTemplate.object([
      .init(key: "code", value: .format("%RESPONSE_CODE%")),
      .init(key: "ua", value: .format("%REQ(USER-AGENT):3%")),
      .init(key: "host", value: .format("%UPSTREAM_HOST%")),
      .init(key: "mixed", value: .format("sent %BYTES_SENT% to %UPSTREAM_HOST%")),
      .init(key: "fixed", value: .list([.number(1), .bool(true), .null])),
    ])
    let full = AccessLogFormatter(AccessLogConfig(sink: .stdout, format: .json(template)))
    #expect(full.render(record()) == #"{"code":200,"ua":"abc","host":null,"mixed":"sent 12 to -","fixed":[1,true,null]}"# + "\n")
    let omitting = AccessLogFormatter(AccessLogConfig(sink: .stdout, format: .json(template), omitEmptyValues: true))
    #expect(omitting.render(record()) == #"{"code":200,"ua":"abc","mixed":"sent 12 to -","fixed":[1,true,null]}"# + "\n")
  }

  @Test func textWritesADashOrNothingForAMissingValue() {
    let format = AccessLogConfig.Format.text("%RESPONSE_CODE% [%UPSTREAM_HOST%] %REQ(:METHOD)%\n")
    #expect(AccessLogFormatter(AccessLogConfig(sink: .stdout, format: format)).render(record()) == "200 [-] POST\n")
    #expect(AccessLogFormatter(AccessLogConfig(sink: .stdout, format: format, omitEmptyValues: true)).render(record()) == "200 [] POST\n")
  }
}

@Suite struct TracingDecisionTests {
  private func config(random: Double = 100, client: Double = 100, overall: Double = 100) -> TracingConfig {
    var c = TracingConfig(collector: .init(host: "h", port: 1, tls: false, cluster: nil), serviceName: "s")
    c.randomSampling = random
    c.clientSampling = client
    c.overallSampling = overall
    return c
  }

  @Test func samplingFollowsEnvoysOrder() {
    // A client's "not sampled" wins; x-client-trace-id picks client_sampling; overall applies last.
    #expect(!ListenerTracer.sampled(config(), clientTraceID: false, parentSampled: false, roll: { 0 }))
    #expect(ListenerTracer.sampled(config(), clientTraceID: false, parentSampled: true, roll: { 99.9 }))
    #expect(!ListenerTracer.sampled(config(random: 0), clientTraceID: false, parentSampled: true, roll: { 0 }))
    #expect(ListenerTracer.sampled(config(random: 0), clientTraceID: true, parentSampled: nil, roll: { 0 }))
    #expect(!ListenerTracer.sampled(config(client: 10), clientTraceID: true, parentSampled: nil, roll: { 10 }))
    #expect(ListenerTracer.sampled(config(random: 50), clientTraceID: false, parentSampled: nil, roll: { 49.9 }))
    #expect(!ListenerTracer.sampled(config(overall: 0), clientTraceID: false, parentSampled: nil, roll: { 0 }))
  }

  @Test func anUnsampledTraceParentKeepsTheTrace() {
    let parent = ListenerTracer.unsampledTraceParent(traceID: "0af7651916cd43dd8448eb211c80319c")
    #expect(parent.hasPrefix("00-0af7651916cd43dd8448eb211c80319c-") && parent.hasSuffix("-00"))
    #expect(parent.count == 55)
    let fresh = ListenerTracer.unsampledTraceParent(traceID: nil)
    #expect(fresh.count == 55 && fresh.hasSuffix("-00"))
  }
}
