"""The admin port and the drain on SIGTERM: /ready, the probe, and no call cut without a status."""

import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import PROXY_BIN, config, free_port, start_proxy
from grpcweb import HTTP1, HTTP2, Reply, echo_req, frame, grpc_web_body, grpc_web_headers


def admin_get(port, path, method="GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def with_admin(text, admin_port):
    return f"admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}\n" + text


ROUTES = """
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 0s }"""


def probe(admin_port):
    return subprocess.run([str(PROXY_BIN), "--probe-ready", f"127.0.0.1:{admin_port}"], capture_output=True, text=True, timeout=10)


def test_admin_ready_clusters_and_healthcheck_fail(replicas):
    port, admin = free_port(), free_port()
    p = start_proxy(with_admin(config(port, {"users": [r.port for r in replicas]}, ROUTES), admin), port)
    try:
        assert admin_get(admin, "/ready") == (200, "LIVE\n")
        assert probe(admin).returncode == 0
        status, text = admin_get(admin, "/clusters")
        assert status == 200
        for r in replicas:
            assert f"users::127.0.0.1:{r.port}::health_flags::healthy" in text
        # Taken out of rotation by hand: a GET must not do it, a POST does.
        assert admin_get(admin, "/healthcheck/fail")[0] == 405
        assert admin_get(admin, "/healthcheck/fail", "POST") == (200, "OK\n")
        status, text = admin_get(admin, "/ready")
        assert status == 503 and "FAILING" in text
        failed = probe(admin)
        assert failed.returncode == 1 and "503" in failed.stdout
        assert admin_get(admin, "/healthcheck/ok", "POST")[0] == 200
        assert admin_get(admin, "/ready")[0] == 200
        assert admin_get(admin, "/nope")[0] == 404
    finally:
        p.stop()
    # Nothing listening: the probe says so and fails.
    gone = probe(admin)
    assert gone.returncode == 1 and "no answer" in gone.stdout


def test_probe_ready_rejects_a_bad_address():
    r = subprocess.run([str(PROXY_BIN), "--probe-ready", "localhost"], capture_output=True, text=True, timeout=10)
    assert r.returncode != 0 and "HOST:PORT" in r.stderr


def test_sigterm_drains_unary_calls_finish_streams_end_with_status_14(replicas, tmp_path):
    port, admin = free_port(), free_port()
    p = start_proxy(with_admin(config(port, {"users": [r.port for r in replicas]}, ROUTES), admin), port,
                    args=("--drain-time-s", "2"))
    try:
        # An open server stream on HTTP/2 (nghttp: python's h2 stops reading a connection at
        # GOAWAY), another on HTTP/1.1 in text mode, a slow unary call, and an idle HTTP/2
        # connection that must be told to go away.
        body = tmp_path / "stream.bin"
        body.write_bytes(frame(echo_req("tick", count=1000, delay_ms=100)))
        nghttp = subprocess.Popen(["nghttp", "-H", ":method: POST", "-H", "content-type: application/grpc-web+proto",
                                   "-H", "x-grpc-web: 1", "-d", str(body), f"http://127.0.0.1:{port}/demo.Echo/ServerStream"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        idle = HTTP2(port, timeout=15)

        h1_result = {}

        def http1_stream():
            c = HTTP1(port, timeout=15)
            h1_result["reply"] = c.stream("/demo.Echo/ServerStream", echo_req("t", count=1000, delay_ms=100), text=True)
            c.close()

        h1 = threading.Thread(target=http1_stream)
        h1.start()

        unary_result = {}

        def slow_unary():
            c = HTTP1(port, timeout=15)
            unary_result["reply"] = c.call("/demo.Echo/Unary", echo_req("slow", delay_ms=1000))
            c.close()

        unary = threading.Thread(target=slow_unary)
        unary.start()
        time.sleep(0.6)

        sent = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, text = admin_get(admin, "/ready")
        assert (status, text) == (503, "DRAINING\n")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

        unary.join(timeout=10)
        r = unary_result["reply"]
        assert r.grpc_status == 0, r
        assert time.monotonic() - sent < 1.9, "the unary call finished well inside the drain time"

        out, err = nghttp.communicate(timeout=10)
        ended_after = time.monotonic() - sent
        assert nghttp.returncode == 0, err
        streamed = Reply(200, {"content-type": "application/grpc-web+proto"}, out, text=False)
        assert len(streamed.messages) >= 5
        assert streamed.grpc_status == 14
        assert streamed.grpc_message == "proxy shutting down"
        assert 1.5 <= ended_after <= 3.5, f"the stream ended {ended_after:.2f}s after SIGTERM (drain time 2s)"

        with pytest.raises(ConnectionError):
            idle.pump(lambda: False)
        assert idle.goaway is not None and idle.goaway.error_code == 0

        h1.join(timeout=10)
        status, headers, chunks = h1_result["reply"]
        text_reply = Reply(status, headers, b"".join(d for _, d in chunks), text=True)
        assert text_reply.grpc_status == 14 and text_reply.grpc_message == "proxy shutting down"
        assert len(text_reply.messages) >= 5

        assert p.proc.wait(timeout=10) == 0
        assert "drain time over" in p.output()
    finally:
        p.stop()


def test_sigterm_with_no_calls_exits_at_once(replicas):
    port, admin = free_port(), free_port()
    p = start_proxy(with_admin(config(port, {"users": [r.port for r in replicas]}, ROUTES), admin), port,
                    args=("--drain-time-s", "30"))
    try:
        idle = HTTP1(port)
        assert idle.call("/demo.User/login", b"").status == 200
        start = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=10) == 0
        assert time.monotonic() - start < 3, "an idle keep-alive connection does not hold up the exit"
    finally:
        p.stop()
