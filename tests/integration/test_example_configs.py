"""The grpc-web project's echo example configs and the seed's stack config run unchanged.

The files are read in place from ../shared (never copied into the repository); only what cannot
be the same on a test machine is rewritten: the listener and admin ports, and the backend's host
name and port, pointed at a User service replica on loopback through the name `localhost`, so the
cluster's DNS resolution is exercised too.
"""

import re
from pathlib import Path

import pytest

from conftest import ROOT, Replica, free_port, start_proxy
from grpcweb import HTTP1, HTTP2, login_req, pb_decode

SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "envoy-corpus" / "configs"
SEED = SHARED / "seeds" / "003_980161b6ddcd4b93.txt"

ECHO_CONFIGS = [
    "01-grpc-grpc-web-echo-v3.yaml",
    "02-grpc-grpc-web-echo-v2-hosts.yaml",
    "03-grpc-grpc-web-echo-v2-typed.yaml",
    "04-grpc-grpc-web-helloworld-v2.yaml",
]


@pytest.fixture(scope="module")
def replica():
    r = Replica("example", free_port())
    yield r
    r.stop()


def point_at_loopback(text, listen_port, listen_default, backend_host, backend_port):
    text = text.replace(f"port_value: {listen_default}", f"port_value: {listen_port}")
    text = text.replace("port_value: 9901", f"port_value: {free_port()}")
    # The admin access log: /tmp/admin_access.log may already be there, made by a process of
    # another user (Envoy run as root by envoy-compat); the unprivileged proxy could not open it.
    text = text.replace("/tmp/admin_access.log", "/dev/null")
    text = text.replace(f"address: {backend_host}", "address: localhost")
    return re.sub(r"port_value: (9090|50051)\b", f"port_value: {backend_port}", text)


def check_login(port):
    for client in (HTTP1(port), HTTP2(port)):
        try:
            r = client.call("/demo.User/login", login_req("demo", "demo123"), text=True,
                            headers={"origin": "http://localhost:8081"})
        finally:
            client.close()
        assert r.grpc_status == 0, r
        assert pb_decode(r.messages[0])[3] == b"example"
        assert r.headers["access-control-allow-origin"] == "http://localhost:8081"
        assert "grpc-status" in r.headers["access-control-expose-headers"]


@pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/envoy-corpus is not beside the checkout")
@pytest.mark.parametrize("name", ECHO_CONFIGS)
def test_echo_example_config_runs_unchanged(name, replica):
    port = free_port()
    text = point_at_loopback((CORPUS / name).read_text(), port, 8080, "node-server", replica.port)
    proxy = start_proxy(text, port)
    try:
        check_login(port)
    finally:
        proxy.stop()


@pytest.mark.skipif(not SEED.exists(), reason="../shared/seeds is not beside the checkout")
def test_seed_stack_config_runs_with_its_placeholder_filled(replica):
    lines = SEED.read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("static_resources:"))
    end = next(i for i in range(start, len(lines)) if "hosts: [{ socket_address" in lines[i])
    yaml = "\n".join(lines[start:end + 1]).replace("{stack名称}", "demo")
    port = free_port()
    proxy = start_proxy(point_at_loopback(yaml, port, 10000, "demo_x-grpc", replica.port), port)
    try:
        check_login(port)
        # The seed sets max_grpc_timeout: 0s, so the client's grpc-timeout is the deadline.
        c = HTTP1(port)
        r = c.call("/demo.Echo/Unary", b"\x20\xd0\x0f", headers={"grpc-timeout": "200m"})  # delay_ms: 2000
        c.close()
        assert r.status == 504 and r.grpc_status == 14
    finally:
        proxy.stop()


@pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/envoy-corpus is not beside the checkout")
def test_validate_mode_passes_the_echo_config_and_names_its_traps():
    import subprocess
    from conftest import PROXY_BIN
    path = CORPUS / "01-grpc-grpc-web-echo-v3.yaml"
    out = subprocess.run([str(PROXY_BIN), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "configuration" in out.stdout and "OK" in out.stdout
    # The echo example resolves its backend with LOGICAL_DNS: one replica per connection.
    assert "static_resources.clusters[0].type" in out.stderr and "STRICT_DNS on tasks.<service>" in out.stderr
    assert "line 50" in out.stderr
