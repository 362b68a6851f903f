"""Envoy-shaped YAML for the tests and the benchmark: the blocks every grpc-web config repeats.

Used by tests/integration, envoy-compat and scripts/bench, so the same file format is exercised
everywhere (and stays one piece of text to change).
"""

HTTP_FILTERS = """
          http_filters:
          - name: envoy.filters.http.grpc_web
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb
          - name: envoy.filters.http.cors
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"""


def listener(name, port, virtual_hosts, codec="AUTO", host="127.0.0.1", filters=HTTP_FILTERS, hcm_extra=""):
    """One listener with an http_connection_manager; `virtual_hosts` is YAML indented for
    `route_config.virtual_hosts` (items starting with 12 spaces and a dash); `hcm_extra` is more
    of the connection manager's fields, indented by 10 spaces."""
    return f"""
  - name: {name}
    address:
      socket_address: {{ address: {host}, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          codec_type: {codec}
          stat_prefix: {name}{hcm_extra}
          route_config:
            name: local_route
            virtual_hosts:{virtual_hosts}{filters}"""


def cluster(name, ports, host="127.0.0.1", kind="STATIC", connect_timeout="0.25s", extra=""):
    """An HTTP/2 cluster with one endpoint per port (none: a cluster with no endpoints)."""
    endpoints = "".join(f"""
        - endpoint:
            address:
              socket_address: {{ address: {host}, port_value: {p} }}""" for p in ports)
    assignment = f"""
      endpoints:
      - lb_endpoints:{endpoints}""" if ports else ""
    return f"""
  - name: {name}
    connect_timeout: {connect_timeout}
    type: {kind}
    lb_policy: ROUND_ROBIN{extra}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: {name}{assignment}"""


def config(listeners, clusters, admin_port=None, header=""):
    admin = f"""
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}""" if admin_port else ""
    return f"""{header}{admin}
static_resources:
  listeners:{"".join(listeners)}
  clusters:{"".join(clusters)}
"""
