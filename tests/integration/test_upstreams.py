"""Upstream endpoints: health checks, balancing policies, sick and killed replicas."""

import collections
import signal
import threading
import time
import urllib.request

import pytest

from conftest import Replica, free_port, start_proxy, wait_until
from grpcweb import HTTP2, login_req, pb_decode

import envoy_yaml


def cluster_config(port, admin, ports, extra="", lb="ROUND_ROBIN"):
    routes = """
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: users, timeout: 0s }"""
    text = envoy_yaml.config([envoy_yaml.listener("test", port, routes)],
                             [envoy_yaml.cluster("users", ports, connect_timeout="0.5s", extra=extra)], admin_port=admin)
    return text.replace("lb_policy: ROUND_ROBIN", f"lb_policy: {lb}")


HEALTH_CHECKS = """
    health_checks:
    - timeout: 0.5s
      interval: 0.2s
      unhealthy_threshold: 1
      healthy_threshold: 1
      grpc_health_check: {}"""


def admin_text(admin, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()




def logins(port, n):
    """n logins on one HTTP/2 connection: replica name (or None) -> count, and the failures."""
    seen = collections.Counter()
    failures = []
    c = HTTP2(port)
    try:
        for _ in range(n):
            r = c.call("/demo.User/login", login_req("demo", "demo123"))
            if r.grpc_status == 0:
                seen[pb_decode(r.messages[0])[3].decode()] += 1
            else:
                failures.append((r.status, r.grpc_status, r.grpc_message))
    finally:
        c.close()
    return seen, failures


@pytest.fixture
def own_replicas():
    rs = [Replica(f"h{i}", free_port()) for i in (1, 2, 3)]
    yield rs
    for r in rs:
        r.stop()


def test_not_serving_replica_gets_no_calls_until_it_recovers(own_replicas):
    port, admin = free_port(), free_port()
    p = start_proxy(cluster_config(port, admin, [r.port for r in own_replicas], HEALTH_CHECKS), port)
    try:
        sick = own_replicas[1]
        wait_until(lambda: admin_text(admin, "/clusters")[1].count("::healthy") == 3, what="three healthy endpoints")
        sick.proc.send_signal(signal.SIGUSR1)  # the replica's grpc.health.v1 answers NOT_SERVING
        wait_until(lambda: f"127.0.0.1:{sick.port}::health_flags::/failed_active_hc" in admin_text(admin, "/clusters")[1],
                   what="the health check to fail")
        seen, failures = logins(port, 60)
        assert failures == []
        assert sick.name not in seen and sum(seen.values()) == 60, seen
        assert "h2" not in seen

        sick.proc.send_signal(signal.SIGUSR2)  # SERVING again
        wait_until(lambda: admin_text(admin, "/clusters")[1].count("::healthy") == 3, what="the replica to recover")
        seen, failures = logins(port, 60)
        assert failures == [] and seen[sick.name] == 20, seen
        assert "is healthy again" in p.output()
    finally:
        p.stop()


def test_no_healthy_endpoint_fails_at_once_and_ready_says_so(own_replicas):
    port, admin = free_port(), free_port()
    p = start_proxy(cluster_config(port, admin, [r.port for r in own_replicas], HEALTH_CHECKS), port)
    try:
        wait_until(lambda: admin_text(admin, "/ready")[0] == 200, what="ready")
        for r in own_replicas:
            r.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: admin_text(admin, "/ready") == (503, "NO HEALTHY UPSTREAM\n"), what="/ready to turn 503")
        c = HTTP2(port)
        start = time.monotonic()
        r = c.call("/demo.User/login", login_req("demo", "demo123"))
        elapsed = time.monotonic() - start
        c.close()
        assert (r.status, r.grpc_status, r.grpc_message) == (503, 14, "no healthy upstream")
        assert elapsed < 0.5, f"took {elapsed:.3f}s"
    finally:
        p.stop()


@pytest.mark.parametrize("lb", ["LEAST_REQUEST", "RANDOM"])
def test_other_balancing_policies_use_every_endpoint(replicas, lb):
    port, admin = free_port(), free_port()
    p = start_proxy(cluster_config(port, admin, [r.port for r in replicas], lb=lb), port)
    try:
        seen, failures = logins(port, 300)
        assert failures == []
        assert set(seen) == {"r1", "r2", "r3"}
        assert min(seen.values()) >= 50, seen
    finally:
        p.stop()


def test_replica_killed_without_warning(own_replicas):
    """Only calls in flight on the killed replica may fail, with status 14 and never a hang;
    then no call goes to it (a refused connection moves the call to another endpoint)."""
    port, admin = free_port(), free_port()
    p = start_proxy(cluster_config(port, admin, [r.port for r in own_replicas]), port)
    results = []
    stop = threading.Event()

    def load():
        c = HTTP2(port, timeout=5)
        try:
            while not stop.is_set():
                start = time.monotonic()
                r = c.call("/demo.User/login", login_req("demo", "demo123"))
                replica = pb_decode(r.messages[0])[3].decode() if r.grpc_status == 0 else None
                results.append((time.monotonic(), time.monotonic() - start, r.grpc_status, replica))
        finally:
            c.close()

    workers = [threading.Thread(target=load) for _ in range(4)]
    try:
        for w in workers:
            w.start()
        time.sleep(1.0)
        victim = own_replicas[0]
        killed_at = time.monotonic()
        victim.stop(kill=True)
        time.sleep(1.5)
        stop.set()
        for w in workers:
            w.join(timeout=10)
            assert not w.is_alive(), "a call hung"
    finally:
        stop.set()
        p.stop()
    failed = [r for r in results if r[2] != 0]
    assert all(status == 14 for _, _, status, _ in failed), failed
    assert len(failed) <= 4, f"{len(failed)} failed calls; at most the 4 in flight may"
    after = [r for r in results if r[0] > killed_at + 0.2]
    assert len(after) > 100
    assert all(r[3] != victim.name for r in after), "a call went to the killed replica"
    assert max(r[1] for r in results) < 2.0


OUTLIER = """
    outlier_detection:
      consecutive_5xx: 3
      base_ejection_time: 2s
      max_ejection_percent: 50"""


def test_outlier_detection_ejects_a_failing_replica_then_lets_it_back(own_replicas):
    from grpcweb import echo_req

    port, admin = free_port(), free_port()
    p = start_proxy(cluster_config(port, admin, [r.port for r in own_replicas], OUTLIER), port)
    sick = own_replicas[1].name
    try:
        c = HTTP2(port)
        failures = 0
        answered = collections.Counter()
        for _ in range(60):
            r = c.call("/demo.Echo/Unary", echo_req("x"), headers={"x-fail-replica": sick})
            if r.grpc_status == 0:
                answered[pb_decode(r.messages[0])[2].decode()] += 1
            else:
                assert r.grpc_status == 14 and "failing on purpose" in r.grpc_message
                failures += 1
        assert failures == 3, "three failures in a row eject the replica; no call goes to it after"
        assert sick not in answered and sum(answered.values()) == 57
        assert "ejected after 3 consecutive 5xx" in p.output()
        status, text = admin_text(admin, "/clusters")
        assert text.count("::healthy") == 2

        time.sleep(2.3)  # base_ejection_time: it takes calls again
        seen, _ = logins(port, 30)
        assert seen[sick] == 10, seen
        c.close()
    finally:
        p.stop()


def test_circuit_breaker_max_requests_fails_the_extra_call_fast(replicas):
    from grpcweb import echo_req

    port, admin = free_port(), free_port()
    breakers = """
    circuit_breakers:
      thresholds:
      - max_requests: 2"""
    p = start_proxy(cluster_config(port, admin, [r.port for r in replicas], breakers), port)
    try:
        c = HTTP2(port)
        slow = [c.start("/demo.Echo/Unary", {"content-type": "application/grpc-web+proto"},
                        __import__("grpcweb").frame(echo_req("slow", delay_ms=1500))) for _ in range(2)]
        time.sleep(0.3)
        start = time.monotonic()
        r = c.call("/demo.Echo/Unary", echo_req("third"))
        assert time.monotonic() - start < 0.5
        assert (r.status, r.grpc_status) == (503, 14)
        assert "max_requests" in r.grpc_message and "overflow" in r.grpc_message
        for sid in slow:
            assert c.finish(sid)["ended"]
        # The slots are given back: calls go through again.
        assert c.call("/demo.Echo/Unary", echo_req("later")).grpc_status == 0
        c.close()
    finally:
        p.stop()


class RefusingBackend:
    """An HTTP/2 server that processes no call: it answers each stream with RST_STREAM
    REFUSED_STREAM, or the first one with GOAWAY (last stream 0) and closes."""

    def __init__(self, mode):
        import socket as socketlib

        import h2.config
        import h2.connection
        import h2.events

        self.mode, self.port = mode, free_port()
        self.listener = socketlib.create_server(("127.0.0.1", self.port))
        self.streams_seen = 0
        self.h2 = (h2.config, h2.connection, h2.events)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, sock):
        import socket as socketlib

        config, connection, events = self.h2
        c = connection.H2Connection(config=config.H2Configuration(client_side=False))
        c.initiate_connection()
        sock.sendall(c.data_to_send())
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                for event in c.receive_data(data):
                    if isinstance(event, events.RequestReceived):
                        self.streams_seen += 1
                        if self.mode == "goaway":
                            c.close_connection(last_stream_id=0)
                            sock.sendall(c.data_to_send())
                            # Closed as servers close after GOAWAY: what the proxy sends
                            # meanwhile is read, so the kernel does not answer it with a
                            # reset that may discard the GOAWAY before the proxy reads it.
                            sock.shutdown(socketlib.SHUT_WR)
                            while sock.recv(65536):
                                pass
                            sock.close()
                            return
                        c.reset_stream(event.stream_id, error_code=7)  # REFUSED_STREAM
                sock.sendall(c.data_to_send())
        except OSError:
            pass

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("mode", ["refuse", "goaway"])
def test_calls_the_server_never_processed_go_to_another_endpoint(replicas, mode):
    backend = RefusingBackend(mode)
    port, admin = free_port(), free_port()
    p = start_proxy(cluster_config(port, admin, [backend.port, replicas[0].port]), port)
    try:
        seen, failures = logins(port, 20)
        assert failures == []
        assert seen == {"r1": 20}
        assert backend.streams_seen >= 5, "about half the calls went to the refusing endpoint first"
    finally:
        p.stop()
        backend.close()


def test_more_connections_when_the_server_limits_concurrent_streams():
    from conftest import USER_SERVICE_BIN, unprivileged, wait_for_port
    import subprocess
    from grpcweb import echo_req, frame

    backend_port = free_port()
    backend = subprocess.Popen(unprivileged([USER_SERVICE_BIN, "--host", "127.0.0.1", "--port", backend_port, "--replica", "narrow",
                                             "--max-concurrent-streams", "2"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port, admin = free_port(), free_port()
    p = None
    try:
        wait_for_port(backend_port, backend)
        p = start_proxy(cluster_config(port, admin, [backend_port]), port)
        c = HTTP2(port, timeout=10)
        assert c.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0  # learns the limit
        start = time.monotonic()
        sids = [c.start("/demo.Echo/Unary", {"content-type": "application/grpc-web+proto"}, frame(echo_req("x", delay_ms=600)))
                for _ in range(6)]
        c.pump(lambda: all(c.streams[s]["ended"] for s in sids))
        elapsed = time.monotonic() - start
        c.close()
        assert all(c.streams[s]["reset"] is None for s in sids)
        # Two streams per connection: six calls on one connection would take three rounds (1.8 s).
        assert elapsed < 1.3, f"six 600 ms calls took {elapsed:.2f}s: they waited for stream slots"
    finally:
        if p:
            p.stop()
        backend.kill()
        backend.wait()


def test_keepalive_notices_a_frozen_backend(own_replicas):
    """A backend that stops answering (SIGSTOP: its TCP stays up) is found out by PINGs; the
    call in flight ends with status 14 instead of hanging."""
    from grpcweb import echo_req

    frozen = own_replicas[0]
    keepalive = """
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options:
            connection_keepalive: { interval: 0.3s, timeout: 0.3s }"""
    port, admin = free_port(), free_port()
    text = cluster_config(port, admin, [frozen.port])
    # The keepalive goes into the cluster's own protocol options block.
    text = text.replace("""          http2_protocol_options: {}""", """          http2_protocol_options:
            connection_keepalive: { interval: 0.3s, timeout: 0.3s }""")
    assert "connection_keepalive" in text
    p = start_proxy(text, port)
    try:
        c = HTTP2(port, timeout=10)
        assert c.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0
        frozen.proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        r = c.call("/demo.Echo/Unary", echo_req("x"))
        elapsed = time.monotonic() - start
        c.close()
        assert r.grpc_status == 14
        assert elapsed < 2.0, f"took {elapsed:.2f}s"
        assert "did not answer a PING" in p.output()
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
        p.stop()


def test_circuit_breaker_max_pending_requests():
    """Calls waiting for a connection that is slow to be made: beyond max_pending_requests they
    fail at once."""
    import socket as socketlib

    # A listener whose accept queue is full: the proxy's SYN is dropped and its connect waits.
    listener = socketlib.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    backend_port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socketlib.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", backend_port))
        fillers.append(s)
    time.sleep(0.2)
    breakers = """
    circuit_breakers:
      thresholds:
      - max_pending_requests: 1"""
    port, admin = free_port(), free_port()
    p = start_proxy(cluster_config(port, admin, [backend_port], breakers).replace("connect_timeout: 0.5s", "connect_timeout: 2s"), port)
    try:
        c = HTTP2(port, timeout=10)
        first = c.start("/demo.User/login", {"content-type": "application/grpc-web+proto"}, b"\x00\x00\x00\x00\x00")
        time.sleep(0.3)
        start = time.monotonic()
        r = c.call("/demo.User/login", login_req("demo", "demo123"))
        assert time.monotonic() - start < 0.5
        assert r.grpc_status == 14 and "max_pending_requests" in r.grpc_message, r
        s = c.finish(first)
        assert s["headers"] is not None
        c.close()
    finally:
        p.stop()
        for s in fillers:
            s.close()
        listener.close()
