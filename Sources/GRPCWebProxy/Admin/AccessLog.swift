import Foundation
import GRPCWebCore
import NIOCore
import NIOHPACK
import NIOPosix
import ProxyConfig
import ProxyFilters

/// What one call's access log line can say, gathered by the call as it goes (only when the
/// connection manager has an access log: a call without one keeps none of this).
final class CallLogRecord {
  var startWall = Date()
  var start = NIODeadline.now()
  var requestHeaders = HPACKHeaders()
  var responseHeaders: HPACKHeaders?
  var trailers: HPACKHeaders?
  var responseCode: Int?
  var grpcStatus: GRPCStatus?
  var flags: [String] = []
  var bytesReceived = 0
  var bytesSent = 0
  var requestEnd: NIODeadline?
  var firstByte: NIODeadline?
  var end: NIODeadline?
  var upstreamHost: String?
  var cluster: String?
  var routeName: String?
  /// The path sent upstream (after a route's rewrite).
  var upstreamPath: String?
  var connection: DownstreamConnectionInfo?

  func flag(_ flag: String) {
    if !self.flags.contains(flag) { self.flags.append(flag) }
  }
}

/// The client connection, as the access log names it.
struct DownstreamConnectionInfo {
  var protocolName: String
  var remote: SocketAddress?
  var local: SocketAddress?
  var tls: TLSSessionInfo?
}

/// One access log entry compiled: its filter and its format, ready to render a record. Format
/// strings are cut into operators once, here, not per line.
struct AccessLogFormatter: Sendable {
  /// A `json_format` template with its format strings already cut.
  private indirect enum CompiledJSON: Sendable {
    /// A constant (null, a boolean, a number), as JSON text.
    case constant(String)
    case format([AccessLogTemplate.Token])
    case object([(key: String, value: CompiledJSON)])
    case list([CompiledJSON])
  }

  let config: AccessLogConfig
  private let tokens: [AccessLogTemplate.Token]
  private let json: CompiledJSON?

  init(_ config: AccessLogConfig) {
    self.config = config
    switch config.format {
    case .text(let text):
      self.tokens = AccessLogTemplate.parse(text)
      self.json = nil
    case .json(let template):
      self.tokens = []
      self.json = Self.compile(template)
    }
  }

  private static func compile(_ t: AccessLogConfig.JSONTemplate) -> CompiledJSON {
    switch t {
    case .null: return .constant("null")
    case .bool(let b): return .constant(b ? "true" : "false")
    case .number(let n): return .constant(n == n.rounded() && abs(n) < 1e15 ? String(Int(n)) : String(n))
    case .format(let format): return .format(AccessLogTemplate.parse(format))
    case .list(let items): return .list(items.map(Self.compile))
    case .object(let fields): return .object(fields.map { (JSONText.quoted($0.key), Self.compile($0.value)) })
    }
  }

  func accepts(_ r: CallLogRecord) -> Bool {
    guard let filter = self.config.filter else { return true }
    return Self.evaluate(filter, r)
  }

  private static func evaluate(_ filter: AccessLogFilter, _ r: CallLogRecord) -> Bool {
    func compare(_ op: AccessLogFilter.Comparison, _ a: Int, _ b: Int) -> Bool {
      switch op {
      case .EQ: return a == b
      case .GE: return a >= b
      case .LE: return a <= b
      }
    }
    switch filter {
    case .statusCode(let op, let value):
      return compare(op, r.responseCode ?? 0, value)
    case .duration(let op, let ms):
      return compare(op, Int(((r.end ?? .now()) - r.start).nanoseconds / 1_000_000), ms)
    case .grpcStatus(let statuses, let exclude):
      // Envoy: a call with no status is UNKNOWN (2).
      return statuses.contains(r.grpcStatus ?? .unknown) != exclude
    case .notHealthCheck:
      return true
    case .and(let filters):
      return filters.allSatisfy { Self.evaluate($0, r) }
    case .or(let filters):
      return filters.contains { Self.evaluate($0, r) }
    case .header(let matcher):
      return matcher.matchesHeaders(r.requestHeaders)
    }
  }

  /// The line, with its newline for JSON (a text format says where its lines end).
  func render(_ r: CallLogRecord) -> String {
    guard let json = self.json else {
      return Self.text(self.tokens, r, empty: self.config.omitEmptyValues ? "" : "-")
    }
    return Self.render(json, r, omitEmpty: self.config.omitEmptyValues) + "\n"
  }

  /// Literal text and operators' values; a missing value is `empty`.
  private static func text(_ tokens: [AccessLogTemplate.Token], _ r: CallLogRecord, empty: String) -> String {
    var out = ""
    for token in tokens {
      switch token {
      case .literal(let text): out += text
      case .op(let name, let argument, let max): out += Self.truncated(Self.value(name, argument, r), max) ?? empty
      }
    }
    return out
  }

  private static func truncated(_ value: String?, _ max: Int?) -> String? {
    guard let value, let max, value.count > max else { return value }
    return String(value.prefix(max))
  }

  private static func render(_ t: CompiledJSON, _ r: CallLogRecord, omitEmpty: Bool) -> String {
    switch t {
    case .constant(let text): return text
    case .list(let items): return "[" + items.map { Self.render($0, r, omitEmpty: omitEmpty) }.joined(separator: ",") + "]"
    case .format(let tokens): return Self.formatValue(tokens, r) ?? "null"
    case .object(let fields):
      var parts: [String] = []
      for field in fields {
        let value: String
        if case .format(let tokens) = field.value {
          // omit_empty_values leaves a missing field out; otherwise it is null.
          guard let present = Self.formatValue(tokens, r) else {
            if !omitEmpty { parts.append(field.key + ":null") }
            continue
          }
          value = present
        } else {
          value = Self.render(field.value, r, omitEmpty: omitEmpty)
        }
        parts.append(field.key + ":" + value)
      }
      return "{" + parts.joined(separator: ",") + "}"
    }
  }

  private static let numericOperators: Set<String> = [
    "RESPONSE_CODE", "BYTES_RECEIVED", "BYTES_SENT", "DURATION", "REQUEST_DURATION", "RESPONSE_DURATION",
    "RESPONSE_TX_DURATION", "GRPC_STATUS_NUMBER",
  ]

  /// A JSON field's value as JSON text, nil when it is missing. A lone numeric operator keeps
  /// its type, as in Envoy; anything else is a string.
  private static func formatValue(_ tokens: [AccessLogTemplate.Token], _ r: CallLogRecord) -> String? {
    if tokens.count == 1, case .op(let name, let argument, let max) = tokens[0] {
      guard let value = Self.truncated(Self.value(name, argument, r), max) else { return nil }
      let isNumber = Self.numericOperators.contains(name) || (name == "GRPC_STATUS" && argument == "NUMBER")
      return isNumber && Int(value) != nil ? value : JSONText.quoted(value)
    }
    return JSONText.quoted(Self.text(tokens, r, empty: "-"))
  }


  /// Envoy's default START_TIME, `2026-12-06T20:58:08.360Z`, made with no shared formatter:
  /// every event loop writes lines at once.
  static func iso8601(_ date: Date) -> String {
    let seconds = date.timeIntervalSince1970
    let whole = seconds.rounded(.down)
    var t = time_t(whole)
    var parts = tm()
    gmtime_r(&t, &parts)
    return String(
      format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", Int(parts.tm_year) + 1900, Int(parts.tm_mon) + 1, Int(parts.tm_mday),
      // The thousandth of a millisecond keeps .360 from printing as .359 (binary fractions).
      Int(parts.tm_hour), Int(parts.tm_min), Int(parts.tm_sec), min(999, Int((seconds - whole) * 1000 + 1e-3)))
  }

  /// One operator's value, or nil for Envoy's "-".
  static func value(_ name: String, _ argument: String?, _ r: CallLogRecord) -> String? {
    func ms(_ from: NIODeadline, _ to: NIODeadline?) -> String? {
      guard let to else { return nil }
      return String((to - from).nanoseconds / 1_000_000)
    }
    func header(_ headers: HPACKHeaders?) -> String? {
      guard let headers, let argument else { return nil }
      for name in argument.split(separator: "?").map({ $0.lowercased() }) {
        if let value = headers.first(name: name) { return value }
      }
      return nil
    }
    switch name {
    case "START_TIME":
      if let argument, !argument.isEmpty { return Self.strftime(argument, r.startWall) }
      return Self.iso8601(r.startWall)
    case "REQ": return header(r.requestHeaders)
    case "RESP": return header(r.responseHeaders)
    case "TRAILER": return header(r.trailers)
    case "RESPONSE_CODE": return String(r.responseCode ?? 0)
    // Envoy writes "-" for no flags, in JSON too.
    case "RESPONSE_FLAGS": return r.flags.isEmpty ? "-" : r.flags.joined(separator: ",")
    case "GRPC_STATUS", "GRPC_STATUS_NUMBER":
      guard let status = r.grpcStatus else { return nil }
      let style = name == "GRPC_STATUS_NUMBER" ? "NUMBER" : (argument ?? "CAMEL_STRING")
      switch style {
      case "NUMBER": return status.headerValue
      case "SNAKE_STRING": return status.snakeName
      default: return status.camelName
      }
    case "DURATION": return ms(r.start, r.end)
    case "REQUEST_DURATION": return ms(r.start, r.requestEnd)
    case "RESPONSE_DURATION": return ms(r.start, r.firstByte)
    case "RESPONSE_TX_DURATION":
      guard let first = r.firstByte else { return nil }
      return ms(first, r.end)
    case "BYTES_RECEIVED": return String(r.bytesReceived)
    case "BYTES_SENT": return String(r.bytesSent)
    case "PROTOCOL": return r.connection?.protocolName
    case "UPSTREAM_HOST": return r.upstreamHost
    case "UPSTREAM_CLUSTER": return r.cluster
    case "ROUTE_NAME": return r.routeName
    // Not known to the call yet: "-", as Envoy writes for a connection without them.
    case "REQUESTED_SERVER_NAME": return r.connection?.tls?.serverName
    case "DOWNSTREAM_PEER_SUBJECT": return r.connection?.tls?.peerSubject
    case "DOWNSTREAM_REMOTE_ADDRESS", "DOWNSTREAM_DIRECT_REMOTE_ADDRESS":
      return r.connection?.remote.map(Self.address)
    case "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": return r.connection?.remote?.ipAddress
    case "DOWNSTREAM_LOCAL_ADDRESS": return r.connection?.local.map(Self.address)
    case "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": return r.connection?.local?.ipAddress
    case "HOSTNAME": return Self.hostName
    default: return nil
    }
  }

  /// Asked once: the host's name does not change under a running proxy.
  private static let hostName = ProcessInfo.processInfo.hostName

  private static func address(_ a: SocketAddress) -> String {
    guard let ip = a.ipAddress, let port = a.port else { return a.pathname ?? "\(a)" }
    if case .v6 = a { return "[\(ip)]:\(port)" }
    return "\(ip):\(port)"
  }

  /// START_TIME(format): strftime, with Envoy's %f (fraction, %3f for milliseconds).
  private static func strftime(_ format: String, _ date: Date) -> String {
    let seconds = date.timeIntervalSince1970
    var fmt = format
    for digits in (1...9).reversed() {
      let token = "%\(digits)f"
      if fmt.contains(token) {
        let fraction = seconds - seconds.rounded(.down)
        let value = Int(fraction * pow(10, Double(digits)))
        fmt = fmt.replacingOccurrences(of: token, with: String(format: "%0\(digits)d", value))
      }
    }
    if fmt.contains("%f") {
      let fraction = seconds - seconds.rounded(.down)
      fmt = fmt.replacingOccurrences(of: "%f", with: String(format: "%09d", Int(fraction * 1e9)))
    }
    var t = time_t(seconds)
    var parts = tm()
    gmtime_r(&t, &parts)
    var buffer = [CChar](repeating: 0, count: 256)
    let n = Foundation.strftime(&buffer, buffer.count, fmt, &parts)
    return String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }
}

/// The files access logs go to, shared by every loop: each loop hands its lines over in batches,
/// and one thread writes them, so a slow disk never holds up an event loop.
final class AccessLogFiles: Sendable {
  private let descriptors: [AccessLogConfig.Sink: Int32]
  private let pool: NIOThreadPool

  /// Opens every file now: a log that cannot be written is a start-up error.
  init(sinks: Set<AccessLogConfig.Sink>) throws {
    var descriptors: [AccessLogConfig.Sink: Int32] = [:]
    for sink in sinks {
      switch sink {
      case .stdout: descriptors[sink] = 1
      case .stderr: descriptors[sink] = 2
      case .file(let path):
        let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
          let why = String(cString: strerror(errno))
          for (_, open) in descriptors where open > 2 { close(open) }
          throw ProxyError(message: "access log '\(path)' cannot be opened for writing: \(why.lowercased())")
        }
        descriptors[sink] = fd
      }
    }
    self.descriptors = descriptors
    self.pool = NIOThreadPool(numberOfThreads: 1)
    self.pool.start()
  }

  func write(_ bytes: ByteBuffer, to sink: AccessLogConfig.Sink) {
    guard let fd = self.descriptors[sink] else { return }
    // Written even when the pool is stopping: the last lines at shutdown are not dropped.
    self.pool.submit { _ in
      bytes.withUnsafeReadableBytes { raw in
        var offset = 0
        while offset < raw.count {
          let n = Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset)
          if n < 0 {
            if errno == EINTR { continue }
            return
          }
          offset += n
        }
      }
    }
  }

  func shutdown() {
    try? self.pool.syncShutdownGracefully()
    for (_, fd) in self.descriptors where fd > 2 { close(fd) }
  }
}

/// One loop's access logs: lines are kept in a buffer per sink and handed to the writer thread
/// at most every 100 ms (or at 64 KiB), so a call's line costs no system call and no lock.
final class LoopAccessLog {
  private let formatters: [AccessLogFormatter]
  private let files: AccessLogFiles
  private let eventLoop: any EventLoop
  private var buffers: [AccessLogConfig.Sink: ByteBuffer] = [:]
  private var flushScheduled = false

  init(configs: [AccessLogConfig], files: AccessLogFiles, eventLoop: any EventLoop) {
    self.formatters = configs.map(AccessLogFormatter.init)
    self.files = files
    self.eventLoop = eventLoop
  }

  func log(_ record: CallLogRecord) {
    for formatter in self.formatters where formatter.accepts(record) {
      let line = formatter.render(record)
      let sink = formatter.config.sink
      self.buffers[sink, default: ByteBuffer()].writeString(line)
      if self.buffers[sink]!.readableBytes >= 64 * 1024 {
        self.flush(sink)
      } else if !self.flushScheduled {
        self.flushScheduled = true
        self.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(100)) {
          self.flushScheduled = false
          for sink in Array(self.buffers.keys) { self.flush(sink) }
        }
      }
    }
  }

  private func flush(_ sink: AccessLogConfig.Sink) {
    guard let buffer = self.buffers.removeValue(forKey: sink), buffer.readableBytes > 0 else { return }
    self.files.write(buffer, to: sink)
  }

  /// Everything held now (at shutdown).
  func flushAll() {
    for sink in Array(self.buffers.keys) { self.flush(sink) }
  }
}

/// The admin port's access log: its requests are few, so each line goes to the writer thread
/// as it is made.
struct AdminAccessLog: Sendable {
  let formatters: [AccessLogFormatter]
  let files: AccessLogFiles

  func log(_ record: CallLogRecord) {
    for formatter in self.formatters where formatter.accepts(record) {
      self.files.write(ByteBuffer(string: formatter.render(record)), to: formatter.config.sink)
    }
  }
}
