import NIOHPACK
import ProxyConfig

extension Route.RetryPolicy {
  /// The answer as an HTTP status when the policy says to try again on it: a 5xx head (`5xx`,
  /// `gateway-error`), a status in `retriable_status_codes`, or a trailers-only gRPC status named
  /// in `retry_on`. Nil when the answer stands.
  public func retriable(_ headers: HPACKHeaders, endStream: Bool) -> Int? {
    let status = headers.first(name: ":status").flatMap { Int($0) } ?? 200
    if status >= 500 {
      if self.retryOn.contains(.serverError) { return status }
      if self.retryOn.contains(.gatewayError) && (502...504).contains(status) { return status }
    }
    if self.retryOn.contains(.retriableStatusCodes) && self.retriableStatusCodes.contains(status) { return status }
    guard endStream, let grpc = headers.first(name: "grpc-status").flatMap({ GRPCStatus(headerValue: $0) }) else { return nil }
    let condition: Condition?
    switch grpc {
    case .cancelled: condition = .cancelled
    case .deadlineExceeded: condition = .deadlineExceeded
    case .resourceExhausted: condition = .resourceExhausted
    case .internalError: condition = .internalError
    case .unavailable: condition = .unavailable
    default: condition = nil
    }
    guard let condition, self.retryOn.contains(condition) else { return nil }
    return UpstreamOutcome.httpStatus(headers)
  }

  /// Whether a connect failure is tried again (`connect-failure`, and what implies it).
  public var retriesConnectFailures: Bool {
    !self.retryOn.isDisjoint(with: [.connectFailure, .serverError, .gatewayError, .reset])
  }

  /// Whether a reset stream is tried again (`reset`, and what implies it).
  public var retriesResets: Bool {
    !self.retryOn.isDisjoint(with: [.reset, .serverError, .gatewayError])
  }
}

/// What an endpoint answered, as the HTTP status Envoy's outlier detection counts.
public enum UpstreamOutcome {
  /// An answer's trailers (or trailers-only headers): grpc-status mapped to HTTP, or the
  /// `:status` of a non-gRPC answer.
  public static func httpStatus(_ headers: HPACKHeaders) -> Int? {
    if let grpc = headers.first(name: "grpc-status") {
      switch Int(grpc) ?? 2 {
      case 0: return 200
      case 1: return 499
      case 3, 9, 11: return 400
      case 4: return 504
      case 5: return 404
      case 6, 10: return 409
      case 7: return 403
      case 8: return 429
      case 12: return 501
      case 14: return 503
      case 16: return 401
      default: return 500
      }
    }
    return headers.first(name: ":status").flatMap { Int($0) }
  }
}
