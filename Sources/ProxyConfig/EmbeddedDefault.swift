/// The configuration the proxy runs with when no file is given: a grpc-web listener in front of
/// the in-process User service, written as the Envoy YAML a user would write, so that
/// `grpc-web-proxy --print-default-config` is a starting point for their own file.
public enum EmbeddedDefault {
  /// A file of the demo page, served at `path` by a `direct_response` route.
  public struct PageFile: Sendable {
    public var path: String
    public var file: String
    public var contentType: String

    public init(path: String, file: String, contentType: String) {
      self.path = path
      self.file = file
      self.contentType = contentType
    }
  }

  /// The content type a browser needs for a page file (ES modules load only as JavaScript).
  public static func contentType(forFileName name: String) -> String? {
    switch name.split(separator: ".").last.map({ $0.lowercased() }) {
    case "html": return "text/html; charset=utf-8"
    case "js", "mjs": return "text/javascript; charset=utf-8"
    case "css": return "text/css; charset=utf-8"
    case "json": return "application/json"
    case "svg": return "image/svg+xml"
    case "png": return "image/png"
    case "ico": return "image/x-icon"
    default: return nil
    }
  }

  public static func yaml(
    listenHost: String, listenPort: Int, backendPort: Int, adminHost: String = "127.0.0.1", adminPort: Int = 9901,
    page: [PageFile] = []
  ) -> String {
    """
    # grpc-web-proxy's embedded default: browsers on \(listenHost):\(listenPort), the User service behind it.
    admin:
      address:
        socket_address: { address: \(adminHost), port_value: \(adminPort) }
    static_resources:
      listeners:
      - name: grpc_web
        address:
          socket_address: { address: \(listenHost), port_value: \(listenPort) }
        filter_chains:
        - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
              codec_type: AUTO
              stat_prefix: ingress_http
              route_config:
                name: local_route
                # The demo page's files are served whole, so allow more than Envoy's 4 KiB.
                max_direct_response_body_size_bytes: 1048576
                virtual_hosts:
                - name: user_service
                  domains: ["*"]
                  routes:\(self.pageRoutes(page))
                  - match: { prefix: "/" }
                    route:
                      cluster: user_service
                      # No 15 s cut-off for streams; the client's grpc-timeout is the deadline.
                      timeout: 0s
                      max_stream_duration:
                        grpc_timeout_header_max: 0s
                  cors:
                    allow_origin_string_match:
                    - prefix: "*"
                    allow_methods: GET, PUT, DELETE, POST, OPTIONS
                    allow_headers: keep-alive,user-agent,cache-control,content-type,content-transfer-encoding,x-accept-content-transfer-encoding,x-accept-response-streaming,x-user-agent,x-grpc-web,grpc-timeout,grpc-accept-encoding,authorization
                    max_age: "1728000"
                    expose_headers: grpc-status,grpc-message,x-replica
              http_filters:
              - name: envoy.filters.http.grpc_web
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb
              - name: envoy.filters.http.cors
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors
              - name: envoy.filters.http.router
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
      clusters:
      - name: user_service
        connect_timeout: 0.25s
        type: STATIC
        lb_policy: ROUND_ROBIN
        typed_extension_protocol_options:
          envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
            "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
            explicit_http_config:
              http2_protocol_options: {}
        load_assignment:
          cluster_name: user_service
          endpoints:
          - lb_endpoints:
            - endpoint:
                address:
                  socket_address: { address: 127.0.0.1, port_value: \(backendPort) }

    """
  }

  private static func pageRoutes(_ page: [PageFile]) -> String {
    // Browsers ask for an icon; without this route the request would go to the gRPC service.
    var out = page.isEmpty ? "" : """

                  - match: { path: "/favicon.ico" }
                    direct_response: { status: 204 }
    """
    for file in page {
      out += """

                  - match: { path: \(JSONText.quoted(file.path)) }
                    direct_response: { status: 200, body: { filename: \(JSONText.quoted(file.file)) } }
                    response_headers_to_add:
                    - header: { key: content-type, value: \(JSONText.quoted(file.contentType)) }
                      append_action: OVERWRITE_IF_EXISTS_OR_ADD
                    - header: { key: cache-control, value: no-cache }
                      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    """
    }
    return out
  }

}
