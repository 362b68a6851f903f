import NIOHPACK

/// Builds the upstream (native gRPC over HTTP/2) request headers from a downstream request.
public enum RequestTranslator {
  /// - Parameters:
  ///   - headers: the downstream request's headers, with `:method`, `:path`, `:authority` and
  ///     `:scheme` pseudo-headers (HTTP/1.1 requests are given them by the caller, `:scheme`
  ///     from the connection: `https` over TLS).
  ///   - path: the path to send upstream (after any prefix rewrite).
  ///   - forwardedProto: `https` when the client's connection is TLS, else `http`: the
  ///     `x-forwarded-proto` the backend hears. As Envoy with no trusted hops
  ///     (`xff_num_trusted_hops: 0`), a client's own value is replaced, not believed, and the
  ///     request's `:scheme` (which an HTTP/2 client may set to anything) does not count.
  public static func upstreamHeaders(
    _ headers: HPACKHeaders,
    kind: CallKind,
    path: String,
    grpcTimeout: String?,
    forwardedProto: String = "http"
  ) -> HPACKHeaders {
    var out = HPACKHeaders()
    out.reserveCapacity(headers.count + 3)
    out.add(name: ":method", value: headers.first(name: ":method") ?? "POST")
    // The request's scheme, as Envoy keeps it (HCM `scheme_header_transformation` unset): an
    // HTTP/1.1 request's is its connection's (the caller sets it), an HTTP/2 client's is its
    // own when it is http or https; anything else is replaced by the connection's.
    let scheme = headers.first(name: ":scheme").flatMap { $0 == "https" || $0 == "http" ? $0 : nil }
    out.add(name: ":scheme", value: scheme ?? forwardedProto)
    out.add(name: ":path", value: path)
    out.add(name: ":authority", value: headers.first(name: ":authority") ?? "")
    let grpcWeb = kind.isGRPCWeb
    var sawAcceptEncoding = false
    for (name, value, indexing) in headers {
      if name.hasPrefix(":") { continue }
      switch name {
      // Connection-specific headers are not allowed in HTTP/2.
      case "connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection", "host":
        continue
      case "te":
        if kind.isGRPC { continue }
        if value.lowercased() != "trailers" { continue }
      case "content-length" where grpcWeb:
        // The body is re-encoded in text mode; Envoy drops it in binary mode too (E4).
        continue
      case "content-type" where grpcWeb:
        continue
      case "grpc-timeout" where grpcTimeout != nil:
        continue
      case "grpc-accept-encoding":
        sawAcceptEncoding = true
      case "x-forwarded-proto":
        continue
      default:
        break
      }
      out.add(name: name, value: value, indexing: indexing)
    }
    if grpcWeb {
      out.add(name: "content-type", value: "application/grpc")
      if !sawAcceptEncoding { out.add(name: "grpc-accept-encoding", value: "identity") }
    }
    if kind.isGRPC { out.add(name: "te", value: "trailers") }
    if let grpcTimeout { out.add(name: "grpc-timeout", value: grpcTimeout) }
    out.add(name: "x-forwarded-proto", value: forwardedProto)
    return out
  }
}
