import GRPCWebCore
import ProxyConfig

/// When a call times out and what the upstream is told, following Envoy's router and
/// connection manager (protocol doc section 5).
public struct DeadlinePlan: Sendable, Hashable {
  public enum Start: Sendable, Hashable {
    /// The route timeout counts from the end of the request (Envoy's router).
    case requestEnd
    /// A stream-duration limit counts from the start of the request (Envoy's HCM).
    case requestStart
  }

  /// Milliseconds until the call is ended, or nil for no deadline.
  public var milliseconds: Int64?
  public var start: Start
  /// A new `grpc-timeout` value for the upstream, or nil to forward the client's unchanged.
  public var upstreamGRPCTimeout: String?
  /// The local reply when the deadline fires before the response started.
  public var timeoutMessage: String
  public var timeoutHTTPStatus: Int

  public static func make(timeouts: RouteTimeouts, grpcTimeoutHeader: String?, isGRPC: Bool) -> DeadlinePlan {
    let headerMillis = isGRPC ? grpcTimeoutHeader.flatMap(GRPCProtocol.parseTimeout) : nil

    // The newer settings: `max_stream_duration` on the route.
    if timeouts.maxStreamDuration != nil || timeouts.grpcTimeoutHeaderMax != nil {
      var deadline: Int64?
      var upstream: String?
      if let max = timeouts.grpcTimeoutHeaderMax, let header = headerMillis {
        var value = header
        let maxMillis = max.milliseconds
        if maxMillis > 0 && (value == 0 || value > maxMillis) { value = maxMillis }
        if let offset = timeouts.grpcTimeoutHeaderOffset?.milliseconds, offset < value { value -= offset }
        deadline = value > 0 ? value : nil
        // The backend is told the deadline the proxy keeps, as Envoy does (a client's `10S`
        // capped at 0.4 s with a 0.1 s offset goes upstream as `300m`): otherwise it works on
        // long after the proxy has given up on the call.
        if value > 0 { upstream = GRPCProtocol.formatTimeout(milliseconds: value) }
      } else if let msd = timeouts.maxStreamDuration, !msd.isZero {
        deadline = msd.milliseconds
      }
      return DeadlinePlan(milliseconds: deadline, start: .requestStart, upstreamGRPCTimeout: upstream,
        timeoutMessage: "downstream duration timeout", timeoutHTTPStatus: 504)
    }

    // The legacy settings: `max_grpc_timeout` makes the router honour `grpc-timeout`.
    if let max = timeouts.maxGrpcTimeout, isGRPC {
      var value = headerMillis ?? 0
      if let offset = timeouts.grpcTimeoutOffset?.milliseconds, offset < value { value -= offset }
      let maxMillis = max.milliseconds
      if maxMillis > 0 && (value == 0 || value > maxMillis) { value = maxMillis }
      return DeadlinePlan(milliseconds: value > 0 ? value : nil, start: .requestEnd,
        upstreamGRPCTimeout: value > 0 ? GRPCProtocol.formatTimeout(milliseconds: value) : nil,
        timeoutMessage: "upstream request timeout", timeoutHTTPStatus: 504)
    }

    // The route timeout, 15 s unless set; `grpc-timeout` is forwarded but not enforced.
    let timeout = timeouts.timeout ?? RouteTimeouts.envoyDefaultTimeout
    return DeadlinePlan(milliseconds: timeout.isZero ? nil : timeout.milliseconds, start: .requestEnd,
      upstreamGRPCTimeout: nil, timeoutMessage: "upstream request timeout", timeoutHTTPStatus: 504)
  }
}
