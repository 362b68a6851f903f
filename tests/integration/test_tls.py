"""TLS end to end: HTTPS listeners (ALPN h2 and http/1.1 on one port, SNI filter chains, mutual
TLS and every kind of bad peer), TLS to the backend (with and without a client certificate, and
one that does not verify), certificate files reloaded while serving.

Certificates are made at run time with scripts/gen-certs.sh; no key is kept in the repository.
"""

import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import PROXY_BIN, ROOT, USER_SERVICE_BIN, free_port, needs_envoy, serving, share, start_proxy, unprivileged, wait_for_port
from grpcweb import HTTP1, HTTP2, frame, login_req, pb_decode
import envoy_yaml

GEN_CERTS = ROOT / "scripts" / "gen-certs.sh"


def gen(out, *args):
    subprocess.run([str(GEN_CERTS), "-o", str(out), *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    gen(d)  # ca, server (localhost, 127.0.0.1), client
    gen(d, "--server", "api.example.com", "--server-out", "api", "--client", "none")
    gen(d, "--server", "none", "--client-out", "expired", "--expired")
    gen(d, "--server", "none", "--client", "intruder", "--client-out", "intruder")
    other = d / "other"
    gen(other, "--server", "localhost,127.0.0.1", "--client-out", "client")
    return share(d)


# --- clients ---------------------------------------------------------------------------------------


def client_context(certs, cert=None, alpn=("h2", "http/1.1"), ca=None):
    ctx = ssl.create_default_context(cafile=str(ca or certs / "ca.crt"))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if cert:
        ctx.load_cert_chain(str(Path(cert).with_suffix(".crt")), str(Path(cert).with_suffix(".key")))
    return ctx


class HTTPS1(HTTP1):
    def __init__(self, port, ctx, server_name="localhost", timeout=10):
        import http.client
        self.conn = http.client.HTTPSConnection(server_name, port, context=ctx, timeout=timeout)
        # Resolve the name to loopback whatever it is, so SNI can carry any name.
        self.conn._create_connection = lambda address, timeout, source_address=None: socket.create_connection(
            ("127.0.0.1", port), timeout)


class HTTPS2(HTTP2):
    """The h2 test client over TLS; ALPN must choose h2."""

    def __init__(self, port, ctx, server_name="localhost", timeout=10):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        tls = ctx.wrap_socket(raw, server_hostname=server_name)
        self.alpn = tls.selected_alpn_protocol()
        assert self.alpn == "h2", self.alpn
        import h2.config, h2.connection, h2.settings
        self.sock = tls
        self.conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
        self.conn.increment_flow_control_window(1 << 24)
        self.sock.sendall(self.conn.data_to_send())
        self.streams = {}
        self.timeout = timeout
        self.goaway = None


def handshake(port, ctx, server_name="localhost"):
    """A TLS connection and one HTTP/1.1 request on it: the status, or the exception."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                tls.sendall(b"GET /nothing HTTP/1.1\r\nhost: x\r\n\r\n")
                data = tls.recv(100)
                if not data:
                    raise ConnectionError("closed after the handshake")
                return data.split(b" ")[1].decode()
    except (ssl.SSLError, OSError) as e:
        return e


def stats(admin_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=5) as r:
        text = r.read().decode()
    return {k: int(v) for k, v in re.findall(r"^(\S+): (\d+)$", text, re.M)}


def wait_for(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- configuration -------------------------------------------------------------------------------


def tls_socket(kind, body, indent):
    """A `transport_socket` with an Envoy TLS context; `body` is the context's fields at column 0."""
    text = f"""transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}
{textwrap.indent(body.strip(chr(10)), "    ")}"""
    return textwrap.indent(text, " " * indent)


def downstream(cert, key, alpn='["h2", "http/1.1"]', extra="", validation="", match="", timeout=""):
    """The filter chain fields before `filters:` (column 6), for `with_chain`."""
    body = f"""
common_tls_context:
  alpn_protocols: {alpn}
  tls_certificates:
  - certificate_chain: {{ filename: {cert} }}
    private_key: {{ filename: {key} }}{validation}{extra}"""
    out = tls_socket("DownstreamTlsContext", body, 6)
    if match:
        out = f"      filter_chain_match:\n        server_names: [{match}]\n" + out
    if timeout:
        out = f"      transport_socket_connect_timeout: {timeout}\n" + out
    return out


def upstream_cluster(name, port, ca, cert=None, sni="localhost"):
    client = f"""
  tls_certificates:
  - certificate_chain: {{ filename: {cert}.crt }}
    private_key: {{ filename: {cert}.key }}""" if cert else ""
    body = f"""
sni: {sni}
common_tls_context:{client}
  validation_context:
    trusted_ca: {{ filename: {ca} }}"""
    return envoy_yaml.cluster(name, [port], connect_timeout="1s") + "\n" + tls_socket("UpstreamTlsContext", body, 4)


VHOSTS = """
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/bad/" }
                route: { cluster: badca, prefix_rewrite: "/", timeout: 5s }
              - match: { prefix: "/nocert/" }
                route: { cluster: nocert, prefix_rewrite: "/", timeout: 5s }
              - match: { prefix: "/demo." }
                route: { cluster: users, timeout: 5s }
              - match: { prefix: "/" }
                direct_response: { status: 200, body: { inline_string: "default chain" } }"""

API_VHOSTS = """
            - name: api
              domains: ["*"]
              routes:
              - match: { prefix: "/demo." }
                route: { cluster: users, timeout: 5s }
              - match: { prefix: "/" }
                direct_response: { status: 200, body: { inline_string: "api chain" } }"""


def with_chain(listener_yaml, *chains):
    """A listener made by envoy_yaml with TLS filter chains: each chain is the text from
    `downstream` and repeats the listener's filters."""
    head, chain = listener_yaml.split("\n    filter_chains:\n    - filters:", 1)
    out = head + "\n    filter_chains:"
    for transport in chains:
        out += "\n    - " + transport[6:] + "\n      filters:" + chain
    return out


def two_chain_listener(name, port, certs):
    """The default chain (localhost) and one for api.example.com with other routes."""
    base = with_chain(envoy_yaml.listener(name, port, VHOSTS), downstream(certs / "server.crt", certs / "server.key"))
    api = with_chain(envoy_yaml.listener(name, port, API_VHOSTS),
                     downstream(certs / "api.crt", certs / "api.key", match="api.example.com"))
    return base + "\n    -" + api.split("\n    filter_chains:\n    -", 1)[1]


class TLSBackend:
    """A user-service replica serving TLS, requiring client certificates from the test CA."""

    def __init__(self, certs, name="tls-r1"):
        self.port = free_port()
        self.proc = subprocess.Popen(
            unprivileged([USER_SERVICE_BIN, "--host", "127.0.0.1", "--port", self.port, "--replica", name,
                          "--tls-cert", certs / "server.crt", "--tls-key", certs / "server.key", "--tls-ca", certs / "ca.crt"]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_port(self.port, self.proc)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def backend(certs):
    b = TLSBackend(certs)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def tls_proxy(certs, backend):
    https, mtls, plain, admin = free_port(), free_port(), free_port(), free_port()
    mtls_listener = with_chain(envoy_yaml.listener("mtls", mtls, VHOSTS), downstream(
        certs / "server.crt", certs / "server.key", timeout="1s",
        extra="\nrequire_client_certificate: true",
        validation=f"""
  validation_context:
    trusted_ca: {{ filename: {certs / 'ca.crt'} }}
    match_typed_subject_alt_names:
    - san_type: DNS
      matcher: {{ exact: client }}"""))
    text = envoy_yaml.config(
        [two_chain_listener("https", https, certs), mtls_listener, envoy_yaml.listener("plain", plain, VHOSTS)],
        [upstream_cluster("users", backend.port, certs / "ca.crt", cert=certs / "client"),
         upstream_cluster("badca", backend.port, certs / "other" / "ca.crt", cert=certs / "client"),
         upstream_cluster("nocert", backend.port, certs / "ca.crt")],
        admin_port=admin)
    p = start_proxy(text, plain)
    p.https, p.mtls, p.plain, p.admin = https, mtls, plain, admin
    p.text = text
    yield p
    p.stop()


def login_ok(reply, replica="tls-r1"):
    assert reply.status == 200, reply
    assert reply.grpc_status == 0, reply
    fields = pb_decode(reply.messages[0])
    assert fields[2] == b"welcome, demo" and fields[3] == replica.encode()


# --- downstream ----------------------------------------------------------------------------------


def test_config_is_valid_for_the_proxy(tls_proxy):
    out = subprocess.run([str(PROXY_BIN), "--mode", "validate", "-c", str(tls_proxy.config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TLS is not supported" not in out.stdout + out.stderr


@pytest.mark.parametrize("text", [False, True])
def test_grpc_web_over_https_http1(tls_proxy, certs, text):
    c = HTTPS1(tls_proxy.https, client_context(certs, alpn=("http/1.1",)))
    try:
        login_ok(c.call("/demo.User/login", login_req("demo", "demo123"), text=text))
        assert c.conn.sock.selected_alpn_protocol() == "http/1.1"
    finally:
        c.close()


@pytest.mark.parametrize("text", [False, True])
def test_grpc_web_over_https_http2_by_alpn(tls_proxy, certs, text):
    c = HTTPS2(tls_proxy.https, client_context(certs))
    try:
        for _ in range(3):
            login_ok(c.call("/demo.User/login", login_req("demo", "demo123"), text=text))
    finally:
        c.close()


def test_native_grpc_over_tls_with_grpcio(tls_proxy, certs):
    grpc = pytest.importorskip("grpc")
    creds = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.crt").read_bytes())
    with grpc.secure_channel(f"localhost:{tls_proxy.https}", creds) as channel:
        login = channel.unary_unary("/demo.User/login")
        reply, call = login.with_call(login_req("demo", "demo123"), timeout=5)
        assert pb_decode(reply)[2] == b"welcome, demo"
        assert dict(call.initial_metadata())["x-replica"] == "tls-r1"
        with pytest.raises(grpc.RpcError) as e:
            login(login_req("demo", "wrong"), timeout=5)
        # The User service's answer to a wrong password, through the proxy unchanged.
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
        assert e.value.details() == "wrong username or password"


def test_native_grpc_over_tls_with_h2(tls_proxy, certs):
    c = HTTPS2(tls_proxy.https, client_context(certs, alpn=("h2",)))
    try:
        sid = c.start("/demo.User/login", {"content-type": "application/grpc", "te": "trailers"}, frame(login_req("demo", "demo123")))
        s = c.finish(sid)
        assert s["headers"][":status"] == "200" and s["trailers"]["grpc-status"] == "0"
        assert pb_decode(s["data"][5:])[3] == b"tls-r1"
    finally:
        c.close()


@pytest.mark.parametrize("flag,expected", [("--http2", "2"), ("--http1.1", "1.1")])
def test_curl_negotiates_by_alpn(tls_proxy, certs, flag, expected):
    out = subprocess.run(
        ["curl", "-sS", flag, "--cacert", str(certs / "ca.crt"), "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
         f"https://localhost:{tls_proxy.https}/"], capture_output=True, text=True, timeout=20)
    assert out.stdout == f"{expected} 200", out


def s_client(port, *args):
    # Bytes, not text: after an h2 handshake the server's SETTINGS frame is printed too.
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args], input=b"", capture_output=True,
                         timeout=20)
    return (out.stdout + out.stderr).decode("utf-8", errors="replace")


@pytest.mark.parametrize("alpn", ["h2", "http/1.1"])
def test_openssl_s_client_sees_alpn(tls_proxy, certs, alpn):
    out = s_client(tls_proxy.https, "-servername", "localhost", "-alpn", alpn, "-CAfile", str(certs / "ca.crt"))
    assert f"ALPN protocol: {alpn}" in out, out
    assert "Verify return code: 0 (ok)" in out


def test_sni_chooses_the_filter_chain_and_its_certificate(tls_proxy, certs):
    out = s_client(tls_proxy.https, "-servername", "api.example.com", "-CAfile", str(certs / "ca.crt"), "-verify_hostname", "api.example.com")
    assert "CN = api.example.com" in out and "Verify return code: 0 (ok)" in out, out
    out = s_client(tls_proxy.https, "-servername", "localhost", "-CAfile", str(certs / "ca.crt"))
    assert "CN = localhost" in out and "Verify return code: 0 (ok)" in out, out
    for name, body in [("api.example.com", b"api chain"), ("localhost", b"default chain")]:
        c = HTTPS1(tls_proxy.https, client_context(certs, alpn=("http/1.1",)), server_name=name)
        try:
            status, _, data = c.request("GET", "/")
            assert (status, data) == (200, body)
        finally:
            c.close()
    # The api chain routes to the same backend through its own route table.
    c = HTTPS2(tls_proxy.https, client_context(certs), server_name="api.example.com")
    try:
        login_ok(c.call("/demo.User/login", login_req("demo", "demo123")))
    finally:
        c.close()


def test_plaintext_and_tls_listeners_in_one_config(tls_proxy):
    c = HTTP1(tls_proxy.plain)
    try:
        login_ok(c.call("/demo.User/login", login_req("demo", "demo123")))
    finally:
        c.close()


def test_plain_http_to_a_tls_port_is_told_and_counted(tls_proxy):
    before = stats(tls_proxy.admin).get("listener.https.ssl.not_tls", 0)
    with socket.create_connection(("127.0.0.1", tls_proxy.https), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400") and b"use https://" in data
    assert wait_for(lambda: stats(tls_proxy.admin).get("listener.https.ssl.not_tls", 0) == before + 1)
    assert "spoke plaintext to a TLS port" in tls_proxy.output()


# --- mutual TLS ----------------------------------------------------------------------------------


def test_mtls_with_the_right_client_certificate(tls_proxy, certs):
    c = HTTPS2(tls_proxy.mtls, client_context(certs, cert=certs / "client"))
    try:
        login_ok(c.call("/demo.User/login", login_req("demo", "demo123")))
    finally:
        c.close()
    assert handshake(tls_proxy.mtls, client_context(certs, cert=certs / "client", alpn=("http/1.1",))) == "200"


@pytest.mark.parametrize("cert,counter,log", [
    (None, "ssl.no_certificate", "sent no certificate"),
    ("other/client", "ssl.fail_verify_error", "not signed by validation_context.trusted_ca"),
    ("expired", "ssl.fail_verify_error", "expired on"),
    ("intruder", "ssl.fail_verify_san", "no subject alternative name matches"),
])
def test_mtls_bad_client_certificates_are_refused_logged_and_counted(tls_proxy, certs, cert, counter, log):
    before = stats(tls_proxy.admin)
    result = handshake(tls_proxy.mtls, client_context(certs, cert=certs / cert if cert else None, alpn=("http/1.1",)))
    assert isinstance(result, Exception), result
    name = f"listener.mtls.{counter}"
    assert wait_for(lambda: stats(tls_proxy.admin).get(name, 0) == before.get(name, 0) + 1), stats(tls_proxy.admin)
    after = stats(tls_proxy.admin)
    assert after["listener.mtls.ssl.connection_error"] == before.get("listener.mtls.ssl.connection_error", 0) + 1
    assert re.search(r"listener 'mtls': TLS connection from 127\.0\.0\.1:\d+ refused: .*" + re.escape(log), tls_proxy.output())
    # The listener goes on serving good clients.
    assert handshake(tls_proxy.mtls, client_context(certs, cert=certs / "client", alpn=("http/1.1",))) == "200"


def test_a_handshake_that_never_finishes_is_cut(tls_proxy, certs):
    before = stats(tls_proxy.admin).get("listener.mtls.ssl.handshake_timeout", 0)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", tls_proxy.mtls), timeout=10) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then silence
        assert s.recv(100) == b""
    assert 0.8 < time.monotonic() - started < 5
    assert stats(tls_proxy.admin)["listener.mtls.ssl.handshake_timeout"] == before + 1
    assert "did not finish in time" in tls_proxy.output()
    assert handshake(tls_proxy.mtls, client_context(certs, cert=certs / "client", alpn=("http/1.1",))) == "200"


def test_a_client_that_does_not_trust_the_server_is_counted(tls_proxy, certs):
    before = stats(tls_proxy.admin).get("listener.https.ssl.handshake_error", 0)
    result = handshake(tls_proxy.https, client_context(certs, ca=certs / "other" / "ca.crt"))
    assert isinstance(result, ssl.SSLCertVerificationError), result
    assert wait_for(lambda: stats(tls_proxy.admin).get("listener.https.ssl.handshake_error", 0) == before + 1)


# --- upstream ------------------------------------------------------------------------------------


def test_upstream_mtls_backend_is_reached(tls_proxy, certs):
    # The backend requires a client certificate: the 'users' cluster presents the test client's.
    c = HTTP1(tls_proxy.plain)
    try:
        login_ok(c.call("/demo.User/login", login_req("demo", "demo123")))
    finally:
        c.close()


@pytest.mark.parametrize("prefix,reason", [
    ("/bad/", "CERTIFICATE_VERIFY_FAILED"),
    ("/nocert/", "TLS error"),
])
def test_upstream_tls_failure_is_status_14_naming_the_tls_error(tls_proxy, prefix, reason):
    c = HTTP1(tls_proxy.plain)
    try:
        r = c.call(prefix + "demo.User/login", login_req("demo", "demo123"))
    finally:
        c.close()
    assert r.grpc_status == 14, r
    assert "TLS error" in r.grpc_message and reason in r.grpc_message, r.grpc_message


# --- reloading -----------------------------------------------------------------------------------


def peer_common_name(port, certs):
    ctx = client_context(certs, alpn=("http/1.1",))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            subject = dict(x[0] for x in tls.getpeercert()["subject"])
            return subject["commonName"], tls.getpeercert()["serialNumber"]


def test_certificates_are_reloaded_without_a_restart(certs, backend, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(certs / "server.crt", live / "tls.crt")
    shutil.copy(certs / "server.key", live / "tls.key")
    share(live)
    port, admin = free_port(), free_port()
    listener = with_chain(envoy_yaml.listener("rot", port, VHOSTS), downstream(live / "tls.crt", live / "tls.key"))
    p = start_proxy(envoy_yaml.config([listener], [upstream_cluster("users", backend.port, certs / "ca.crt", cert=certs / "client"),
                                                   upstream_cluster("badca", backend.port, certs / "ca.crt"),
                                                   upstream_cluster("nocert", backend.port, certs / "ca.crt")],
                                      admin_port=admin), port)
    try:
        _, serial_before = peer_common_name(port, certs)
        open_conn = HTTPS2(port, client_context(certs))
        login_ok(open_conn.call("/demo.User/login", login_req("demo", "demo123")))

        # A half-written rotation (a new certificate with the old key) is not taken.
        gen(tmp_path / "new", "--client", "none")
        shutil.copy(certs / "ca.crt", tmp_path / "new" / "ca.crt")
        new_dir = tmp_path / "rotated"
        new_dir.mkdir()
        shutil.copy(certs / "ca.crt", new_dir / "ca.crt")
        shutil.copy(certs / "ca.key", new_dir / "ca.key")
        gen(new_dir, "--client", "none")
        share(new_dir)
        shutil.copy(new_dir / "server.crt", live / "tls.crt.tmp")
        (live / "tls.crt.tmp").rename(live / "tls.crt")
        assert wait_for(lambda: stats(admin).get("listener.rot.ssl.context_reload_error", 0) >= 1, timeout=5)
        assert peer_common_name(port, certs)[1] == serial_before
        assert "keeping the previous certificates" in p.output()

        shutil.copy(new_dir / "server.key", live / "tls.key.tmp")
        (live / "tls.key.tmp").rename(live / "tls.key")
        assert wait_for(lambda: stats(admin).get("listener.rot.ssl.context_reload", 0) >= 1, timeout=5), p.output()
        name, serial_after = peer_common_name(port, certs)
        assert name == "localhost" and serial_after != serial_before
        # The connection opened before the rotation still carries calls.
        login_ok(open_conn.call("/demo.User/login", login_req("demo", "demo123")))
        open_conn.close()
    finally:
        p.stop()


# --- configuration errors ------------------------------------------------------------------------


def validate(text, tmp_path):
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    return subprocess.run([str(PROXY_BIN), "--mode", "validate", "-c", str(path)], capture_output=True, text=True)


def test_a_missing_certificate_file_names_path_and_line(certs, tmp_path):
    listener = with_chain(envoy_yaml.listener("https", free_port(), VHOSTS), downstream(tmp_path / "nope.crt", certs / "server.key"))
    out = validate(envoy_yaml.config([listener], [envoy_yaml.cluster(n, [1]) for n in ("users", "badca", "nocert")]), tmp_path)
    assert out.returncode == 1
    assert re.search(r"envoy\.yaml:\d+: static_resources\.listeners\[0\]\.filter_chains\[0\]\.transport_socket\.typed_config"
                     r"\.common_tls_context\.tls_certificates\[0\]\.certificate_chain\.filename: cannot read '.*nope\.crt'",
                     out.stdout + out.stderr), out.stdout + out.stderr


def test_a_key_that_does_not_match_stops_the_start(certs, tmp_path):
    port = free_port()
    listener = with_chain(envoy_yaml.listener("https", port, VHOSTS), downstream(certs / "server.crt", certs / "api.key"))
    path = tmp_path / "envoy.yaml"
    path.write_text(envoy_yaml.config([listener], [envoy_yaml.cluster(n, [1]) for n in ("users", "badca", "nocert")]))
    out = subprocess.run([str(PROXY_BIN), "-c", str(path)], capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    assert "listener 'https'" in out.stdout + out.stderr and "cannot set up TLS" in out.stdout + out.stderr, out.stdout + out.stderr


@pytest.mark.parametrize("transport", ["https-http1", "https-h2", "plain-http1"])
def test_the_backend_hears_how_the_client_connected(certs, transport):
    """x-forwarded-proto upstream is `https` for every call that came over TLS, HTTP/1.1 included
    (its requests carry no scheme of their own) and HTTP/2 whatever `:scheme` the client wrote, and
    `http` for cleartext, as Envoy sets it. The upstream `:scheme` is the request's, as Envoy 1.40
    keeps it (seen side by side): an HTTP/1.1 request's comes from its connection (`https` over
    TLS), an HTTP/2 client's is its own (this client writes `http` over TLS)."""
    from scripted_backend import EarlyAnswerBackend

    backend = EarlyAnswerBackend()
    https, plain = free_port(), free_port()
    vhosts = """
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 5s }"""
    text = envoy_yaml.config(
        [with_chain(envoy_yaml.listener("https", https, vhosts), downstream(certs / "server.crt", certs / "server.key")),
         envoy_yaml.listener("plain", plain, vhosts)],
        [envoy_yaml.cluster("users", [backend.port])])
    p = start_proxy(text, https)
    try:
        if transport == "https-http1":
            c = HTTPS1(https, client_context(certs, alpn=("http/1.1",)))
        elif transport == "https-h2":
            c = HTTPS2(https, client_context(certs))
        else:
            from grpcweb import HTTP1
            c = HTTP1(plain)
        # A client's own claim is not believed (Envoy with xff_num_trusted_hops 0 replaces it).
        r = c.call("/bench.Echo/Unary", b"\x0a\x02hi", headers={"x-forwarded-proto": "https" if transport == "plain-http1" else "http"})
        c.close()
        assert r.grpc_status == 0, (r.status, r.grpc_message)
    finally:
        p.stop()
        backend.close()
    expected = "http" if transport == "plain-http1" else "https"
    assert [h.get("x-forwarded-proto") for h in backend.requests] == [expected]
    scheme = "https" if transport == "https-http1" else "http"
    assert [h.get(":scheme") for h in backend.requests] == [scheme]


def test_a_silent_client_without_alpn_is_closed_after_idle_timeout(certs):
    """With no ALPN the protocol is told from the first bytes after the handshake; a client that
    sends none is closed after common_http_protocol_options.idle_timeout, as in cleartext."""
    port = free_port()
    listener = with_chain(envoy_yaml.listener("tls", port, VHOSTS), downstream(certs / "server.crt", certs / "server.key"))
    listener = listener.replace("stat_prefix: tls", "stat_prefix: tls\n          common_http_protocol_options: { idle_timeout: 1s }")
    p = start_proxy(envoy_yaml.config([listener], [envoy_yaml.cluster("users", [free_port()]),
                                                   envoy_yaml.cluster("badca", [free_port()]),
                                                   envoy_yaml.cluster("nocert", [free_port()])]), port)
    try:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() is None
                t0 = time.monotonic()
                try:
                    data = tls.recv(100)
                except (ssl.SSLError, ConnectionResetError):
                    data = b""
                waited = time.monotonic() - t0
        assert data == b"", data
        assert 0.8 <= waited < 5, f"closed after {waited:.1f} s"
    finally:
        p.stop()


# --- what the access log and the stats say of TLS connections ------------------------------------


@needs_envoy
def test_server_name_peer_subject_and_per_chain_stats_match_envoys(certs, tmp_path):
    """%REQUESTED_SERVER_NAME% and %DOWNSTREAM_PEER_SUBJECT% (RFC 2253, as Envoy writes it), and
    each filter chain's connections counted under its own stat_prefix, side by side with Envoy."""
    def listener(port, log):
        access_log = f"""
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format: {{ text_format_source: {{ inline_string: "%REQUESTED_SERVER_NAME% [%DOWNSTREAM_PEER_SUBJECT%] %RESPONSE_CODE%\\n" }} }}"""
        default = with_chain(envoy_yaml.listener("https", port, VHOSTS, hcm_extra=access_log), downstream(
            certs / "server.crt", certs / "server.key", validation=f"""
  validation_context:
    trusted_ca: {{ filename: {certs / 'ca.crt'} }}"""))
        api = with_chain(envoy_yaml.listener("api", port, API_VHOSTS, hcm_extra=access_log),
                         downstream(certs / "api.crt", certs / "api.key", match="api.example.com"))
        both = default + "\n    -" + api.split("\n    filter_chains:\n    -", 1)[1]
        # Envoy matches server_names only with the TLS inspector; the proxy reads SNI anyway.
        inspector = """
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }"""
        return both.replace("\n    filter_chains:", inspector + "\n    filter_chains:", 1)

    results = {}
    logs = tempfile.TemporaryDirectory()
    share(logs.name, writable=True)  # the unprivileged proxy writes its log there
    for who in ("envoy", "ours"):
        port, admin, log = free_port(), free_port(), Path(logs.name) / f"{who}.log"
        text = envoy_yaml.config([listener(port, log)], [envoy_yaml.cluster("users", [free_port()]),
                                                         envoy_yaml.cluster("badca", []), envoy_yaml.cluster("nocert", [])],
                                 admin_port=admin)
        with serving(who, text, port, tmp_path):
            for name, cert in [("localhost", certs / "client"), ("api.example.com", None), ("localhost", None)]:
                c = HTTPS1(port, client_context(certs, cert=cert, alpn=("http/1.1",)), server_name=name)
                try:
                    assert c.request("GET", "/")[0] == 200
                finally:
                    c.close()
            assert wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 3, timeout=10)
            counted = stats(admin)
            results[who] = (sorted(log.read_text().splitlines()),
                            {k: counted.get(k) for k in ("http.https.downstream_cx_total", "http.api.downstream_cx_total")})
    assert results["ours"] == results["envoy"]
    lines, counts = results["ours"]
    assert "localhost [CN=client,O=grpc-web-proxy,L=shanghai,ST=shanghai,C=CN] 200" in lines
    assert counts == {"http.https.downstream_cx_total": 2, "http.api.downstream_cx_total": 1}
