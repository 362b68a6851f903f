import Foundation
import Instrumentation
import Logging
import NIOCore
import NIOHPACK
import OTel
import ProxyConfig
import ProxyFilters
import ServiceLifecycle
import Tracing

/// The configuration's tracers: one OTLP/gRPC exporter per collector and service name, shared by
/// the connection managers that name them. Its services export in the background and are shut
/// down after the proxy has drained, so the spans of the last calls are sent.
public struct ProxyTracing: Sendable {
  private struct Key: Hashable {
    var endpoint: String
    var serviceName: String
  }

  /// The exporters' background services, to run beside the proxy (before it in a ServiceGroup,
  /// so that they stop after it).
  public let services: [any Service]
  private let tracers: [Key: any Tracer]

  public init(configuration: ProxyConfiguration, logger: Logger) throws {
    var tracers: [Key: any Tracer] = [:]
    var services: [any Service] = []
    for listener in configuration.listeners {
      for chain in [listener] + listener.otherChains {
        guard let tracing = chain.tracing else { continue }
        let key = Key(endpoint: tracing.collector.endpoint, serviceName: tracing.serviceName)
        guard tracers[key] == nil else { continue }
        var otel = OTel.Configuration.default
        otel.serviceName = tracing.serviceName
        otel.diagnosticLogger = .custom(logger)
        otel.diagnosticLogLevel = .warning
        otel.propagators = [.traceContext]
        otel.metrics.enabled = false
        otel.logs.enabled = false
        otel.traces.enabled = true
        otel.traces.exporter = .otlp
        // The proxy decides which calls are traced (random_sampling, client_sampling, the
        // client's sampled flag) before it starts a span: every span it starts is kept.
        otel.traces.sampler = .parentBasedAlwaysOn
        otel.traces.otlpExporter.protocol = .grpc
        otel.traces.otlpExporter.endpoint = tracing.collector.endpoint
        otel.traces.otlpExporter.timeout = .seconds(1)
        do {
          let backend = try OTel.makeTracingBackend(configuration: otel)
          tracers[key] = backend.factory
          services.append(backend.service)
        } catch {
          throw TracingSetupError(message: "tracing to \(tracing.collector.endpoint): \(error)")
        }
        logger.info("tracing: spans of service '\(tracing.serviceName)' go to \(tracing.collector.endpoint) (OTLP/gRPC)")
      }
    }
    self.tracers = tracers
    self.services = services
  }

  /// No tracing at all.
  public static let none = ProxyTracing()

  private init() {
    self.tracers = [:]
    self.services = []
  }

  func tracer(for listener: Listener) -> ListenerTracer? {
    guard let config = listener.tracing,
      let tracer = self.tracers[Key(endpoint: config.collector.endpoint, serviceName: config.serviceName)]
    else { return nil }
    return ListenerTracer(config: config, tracer: tracer)
  }
}

struct TracingSetupError: Error, CustomStringConvertible {
  var message: String
  var description: String { self.message }
}

/// A connection manager's tracing: its sampling and tags, and the tracer it exports with.
final class ListenerTracer: Sendable {
  let config: TracingConfig
  let tracer: any Tracer
  /// `custom_tags`, with environment variables read once here (as Envoy reads them at start)
  /// rather than per call.
  private let tags: [TracingConfig.CustomTag]

  init(config: TracingConfig, tracer: any Tracer) {
    self.config = config
    self.tracer = tracer
    let environment = ProcessInfo.processInfo.environment
    self.tags = config.customTags.compactMap { tag in
      guard case .environment(let name, let variable, let fallback) = tag else { return tag }
      return (environment[variable] ?? fallback).map { .literal(tag: name, value: $0) }
    }
  }

  /// Envoy's decision: `client_sampling` for a request with `x-client-trace-id`, otherwise
  /// `random_sampling`, then `overall_sampling`; and a client's trace context that says "not
  /// sampled" is not sampled here either. `roll` is a number from 0 up to 100.
  static func sampled(_ config: TracingConfig, clientTraceID: Bool, parentSampled: Bool?, roll: () -> Double) -> Bool {
    if parentSampled == false { return false }
    let first = clientTraceID ? config.clientSampling : config.randomSampling
    guard first >= 100 || roll() < first else { return false }
    return config.overallSampling >= 100 || roll() < config.overallSampling
  }

  /// Starts the call's span when it is sampled, continuing the client's `traceparent`.
  func begin(request: HPACKHeaders) -> CallTrace {
    var context = InstrumentationContext.topLevel
    self.tracer.extract(request, into: &context, using: HPACKExtractor())
    let parentTraceID = context.otelTraceID
    let sampled = Self.sampled(
      self.config, clientTraceID: request.contains(name: "x-client-trace-id"),
      parentSampled: parentTraceID == nil ? nil : context.otelIsSampled, roll: { Double.random(in: 0..<100) })
    guard sampled else { return CallTrace(span: nil, unsampledTraceParent: Self.unsampledTraceParent(traceID: parentTraceID)) }
    let span = self.tracer.startSpan(self.config.egress ? "egress" : "ingress", context: context, ofKind: self.config.egress ? .client : .server)
    return CallTrace(span: span, unsampledTraceParent: nil)
  }

  /// Writes the trace context the backend gets: the span's own, or for a call not sampled the
  /// same trace with a new span id and the sampled flag off (as Envoy sends it).
  func inject(_ trace: CallTrace, into upstream: inout HPACKHeaders) {
    if let span = trace.span {
      self.tracer.inject(span.context, into: &upstream, using: HPACKInjector())
    } else if let parent = trace.unsampledTraceParent {
      upstream.replaceOrAdd(name: "traceparent", value: parent)
    }
  }

  static func unsampledTraceParent(traceID: String?) -> String {
    var generator = SystemRandomNumberGenerator()
    func hex(_ value: UInt64) -> String {
      let digits = String(value, radix: 16)
      return String(repeating: "0", count: 16 - digits.count) + digits
    }
    let trace = traceID ?? hex(generator.next() | 1) + hex(generator.next())
    return "00-\(trace)-\(hex(generator.next() | 1))-00"
  }

  /// The call's attributes, Envoy's names and values (strings, as Envoy sends them) with the
  /// OpenTelemetry `rpc.*` and `http.*` ones beside them, and its status; then the span ends.
  ///
  /// Beyond Envoy: the gRPC status is the one the client received, for gRPC-Web calls too
  /// (Envoy's span has none when the status came in trailers, which its grpc_web filter moved
  /// into the body, so a failed gRPC-Web call is not marked as an error there).
  /// Envoy's rule: an error is a 5xx, or a gRPC status that stands for one (UNKNOWN, DEADLINE_
  /// EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS); NOT_FOUND or UNAUTHENTICATED are
  /// answers, not failures of the call path.
  static let errorStatuses: Set<GRPCStatus> = [.unknown, .deadlineExceeded, .unimplemented, .internalError, .unavailable, .dataLoss]

  func finish(_ span: any Span, record: CallLogRecord, grpcMessage: String?) {
    let request = record.requestHeaders
    let path = request.first(name: ":path") ?? "/"
    let authority = request.first(name: ":authority") ?? ""
    let scheme = request.first(name: ":scheme") ?? "http"
    var url = "\(scheme)://\(authority)\(path)"
    if url.count > self.config.maxPathTagLength { url = String(url.prefix(self.config.maxPathTagLength)) }
    let code = record.responseCode
    let grpcStatus = record.grpcStatus
    let isGRPC = (request.first(name: "content-type") ?? "").hasPrefix("application/grpc")
    let error = code == nil || code! >= 500 || (isGRPC && grpcStatus.map { Self.errorStatuses.contains($0) } == true)
    let protocolName = record.connection?.protocolName ?? "HTTP/1.1"
    span.updateAttributes { attributes in
      attributes["component"] = "proxy"
      attributes["node_id"] = ""
      attributes["zone"] = ""
      if let id = request.first(name: "x-request-id") { attributes["guid:x-request-id"] = id }
      if let id = request.first(name: "x-client-trace-id") { attributes["guid:x-client-trace-id"] = id }
      attributes["http.url"] = url
      attributes["http.method"] = request.first(name: ":method") ?? "GET"
      attributes["http.protocol"] = protocolName
      attributes["http.status_code"] = code.map(String.init) ?? "0"
      attributes["downstream_cluster"] = request.first(name: "x-envoy-downstream-service-cluster") ?? "-"
      attributes["user_agent"] = request.first(name: "user-agent") ?? "-"
      if let ip = record.connection?.remote?.ipAddress { attributes["peer.address"] = ip }
      attributes["request_size"] = String(record.bytesReceived)
      attributes["response_size"] = String(record.bytesSent)
      attributes["response_flags"] = record.flags.isEmpty ? "-" : record.flags.joined(separator: ",")
      if let cluster = record.cluster, !cluster.isEmpty {
        attributes["upstream_cluster"] = cluster
        attributes["upstream_cluster.name"] = cluster
      }
      if let host = record.upstreamHost { attributes["upstream_address"] = host }
      // OpenTelemetry's semantic conventions.
      attributes["http.request.method"] = request.first(name: ":method") ?? "GET"
      if let code { attributes["http.response.status_code"] = code }
      attributes["network.protocol.version"] = protocolName == "HTTP/2" ? "2" : "1.1"
      if isGRPC {
        // The path the backend was asked for, as Envoy tags it (after a prefix rewrite).
        let path = record.upstreamPath ?? path
        attributes["grpc.path"] = path
        attributes["grpc.authority"] = authority
        attributes["grpc.content_type"] = "application/grpc"
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        attributes["rpc.system"] = "grpc"
        if parts.count == 3 {
          attributes["rpc.service"] = String(parts[1])
          attributes["rpc.method"] = String(parts[2])
        }
        if let grpcStatus {
          attributes["grpc.status_code"] = grpcStatus.headerValue
          attributes["rpc.grpc.status_code"] = grpcStatus.rawValue
          attributes["grpc.message"] = grpcMessage ?? ""
        }
      }
      for tag in self.tags {
        switch tag {
        case .literal(let name, let value):
          attributes[name] = value
        case .requestHeader(let name, let header, let fallback):
          if let value = request.first(name: header) ?? fallback { attributes[name] = value }
        case .environment:
          break  // resolved to literals in init
        }
      }
      if error { attributes["error"] = "true" }
    }
    if error { span.setStatus(SpanStatus(code: .error)) }
    span.end()
  }
}

/// One call's tracing: its span when sampled, else the trace context to pass on.
struct CallTrace {
  var span: (any Span)?
  var unsampledTraceParent: String?
}

struct HPACKExtractor: Extractor {
  func extract(key: String, from carrier: HPACKHeaders) -> String? {
    carrier.first(name: key)
  }
}

struct HPACKInjector: Injector {
  func inject(_ value: String, forKey key: String, into carrier: inout HPACKHeaders) {
    carrier.replaceOrAdd(name: key, value: value)
  }
}
