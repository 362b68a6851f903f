"""A Docker Swarm played on loopback: a DNS server answers `tasks.user` with the addresses of User
service replicas on 127.0.0.21-25 (every replica on the same port, as tasks are), and the test
changes the answer as replicas come and go, under a steady load of unary calls on one client
connection and of server streams. Figures go to test-artifacts/swarm-figures.txt.
"""

import collections
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, USER_SERVICE_BIN, unprivileged, free_port, start_proxy, wait_for_port, wait_until
from grpcweb import HTTP1, HTTP2, Reply, echo_req, frame, grpc_web_body, grpc_web_headers, login_req, pb_decode

import envoy_yaml

dns_server = pytest.importorskip("dns_server", reason="dnslib is needed: pip install dnslib")

ADDRESSES = [f"127.0.0.{i}" for i in range(21, 26)]
REFRESH_S = 0.5
FIGURES = ROOT / "test-artifacts" / "swarm-figures.txt"


def shared_port():
    """A port free on every replica address."""
    for _ in range(50):
        port = free_port()
        try:
            for address in ADDRESSES:
                with socket.socket() as s:
                    s.bind((address, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every replica address")


class Task:
    """One replica: a user-service on its own loopback address."""

    def __init__(self, address, port):
        self.address, self.port = address, port
        self.name = f"task-{address.rsplit('.', 1)[1]}"
        self.proc = subprocess.Popen(unprivileged([USER_SERVICE_BIN, "--host", address, "--port", port, "--replica", self.name]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((address, port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"replica {self.name} did not start")
                time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)


def swarm_config(port, admin, dns_port, task_port):
    routes = """
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: user, timeout: 0s }"""
    extra = f"""
    dns_refresh_rate: {REFRESH_S}s
    dns_lookup_family: V4_ONLY
    dns_resolvers:
    - socket_address: {{ address: 127.0.0.1, port_value: {dns_port} }}
    health_checks:
    - timeout: 0.5s
      interval: 0.5s
      unhealthy_threshold: 1
      healthy_threshold: 1
      grpc_health_check: {{}}"""
    return envoy_yaml.config([envoy_yaml.listener("browsers", port, routes)],
                             [envoy_yaml.cluster("user", [task_port], host="tasks.user", kind="STRICT_DNS",
                                                 connect_timeout="0.5s", extra=extra)], admin_port=admin)


class Load:
    """Unary logins on one HTTP/2 connection (a few streams at a time) and server streams on
    HTTP/1.1, recorded with the time they ended and who answered."""

    def __init__(self, port, unary_streams=4, stream_clients=2):
        self.port = port
        self.unary = []      # (end time, grpc status, replica or message)
        self.streams = []    # (end time, grpc status, messages)
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._unary, args=(unary_streams,), daemon=True)]
        self.threads += [threading.Thread(target=self._stream, daemon=True) for _ in range(stream_clients)]
        for t in self.threads:
            t.start()

    def _unary(self, width):
        c = HTTP2(self.port, timeout=10)
        try:
            while not self.stop_flag.is_set():
                sids = [c.start("/demo.User/login", grpc_web_headers(False), grpc_web_body(login_req("demo", "demo123"), False))
                        for _ in range(width)]
                c.pump(lambda: all(c.streams[s]["ended"] for s in sids))
                for s in sids:
                    st = c.streams.pop(s)
                    r = Reply(int(st["headers"].get(":status", 0)) if st["headers"] else 0, st["headers"] or {}, st["data"], text=False)
                    who = pb_decode(r.messages[0])[3].decode() if r.grpc_status == 0 and r.messages else r.grpc_message
                    self.unary.append((time.monotonic(), r.grpc_status, who))
        finally:
            c.close()

    def _stream(self):
        while not self.stop_flag.is_set():
            c = HTTP1(self.port, timeout=10)
            try:
                status, headers, chunks = c.stream("/demo.Echo/ServerStream", echo_req("s", count=8, delay_ms=50))
                r = Reply(status, headers, b"".join(d for _, d in chunks), text=False)
                self.streams.append((time.monotonic(), r.grpc_status, len(r.messages)))
            finally:
                c.close()

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=15)
            assert not t.is_alive(), "a call hung"

    def since(self, t0, until=None):
        return [u for u in self.unary if u[0] >= t0 and (until is None or u[0] < until)]

    def streams_since(self, t0, until=None):
        return [s for s in self.streams if s[0] >= t0 and (until is None or s[0] < until)]


def admin(admin_port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=5) as r:
        return r.read().decode()




@pytest.fixture
def swarm():
    dns = dns_server.TestDNS()
    task_port = shared_port()
    tasks = {}
    port, admin_port = free_port(), free_port()
    proxy = None
    try:
        for address in ADDRESSES[:3]:
            tasks[address] = Task(address, task_port)
        dns.set("tasks.user", ADDRESSES[:3], ttl=1)
        proxy = start_proxy(swarm_config(port, admin_port, dns.port, task_port), port, args=("-l", os.environ.get("SWARM_LOG_LEVEL", "info")))
        wait_until(lambda: admin(admin_port, "/clusters").count("::healthy") == 3, 15, "three healthy tasks")
        yield dns, tasks, task_port, port, admin_port, proxy
    finally:
        if proxy:
            proxy.stop()
        for t in tasks.values():
            t.stop(signal.SIGKILL)
        dns.close()


def record(lines):
    FIGURES.parent.mkdir(exist_ok=True)
    with FIGURES.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def test_swarm_scale_up_down_and_kill(swarm):
    dns, tasks, task_port, port, admin_port, proxy = swarm
    figures = [f"== {time.strftime('%Y-%m-%d %H:%M:%S')} tests/integration/test_swarm.py::test_swarm_scale_up_down_and_kill"]

    # 3 replicas, 3,000 calls from one client connection.
    c = HTTP2(port, timeout=10)
    seen = collections.Counter()
    for _ in range(3000 // 50):
        sids = [c.start("/demo.User/login", grpc_web_headers(False), grpc_web_body(login_req("demo", "demo123"), False)) for _ in range(50)]
        c.pump(lambda: all(c.streams[s]["ended"] for s in sids))
        for s in sids:
            st = c.streams.pop(s)
            r = Reply(200, st["headers"], st["data"], text=False)
            assert r.grpc_status == 0, r
            seen[pb_decode(r.messages[0])[3].decode()] += 1
    c.close()
    figures.append(f"3 replicas, 3000 calls on one connection: {dict(sorted(seen.items()))}")
    assert set(seen) == {"task-21", "task-22", "task-23"}
    assert all(900 <= n <= 1100 for n in seen.values()), seen

    load = Load(port)
    try:
        time.sleep(1.0)

        # Scale 3 -> 5: the new tasks take calls within one refresh interval.
        for address in ADDRESSES[3:]:
            tasks[address] = Task(address, task_port)
        scaled_up = time.monotonic()
        dns.set("tasks.user", ADDRESSES, ttl=1)
        wait_until(lambda: {"task-24", "task-25"} <= {u[2] for u in load.since(scaled_up)}, 5, "the new tasks to get calls")
        first = {name: min(u[0] for u in load.since(scaled_up) if u[2] == name) - scaled_up for name in ("task-24", "task-25")}
        figures.append(f"scale 3->5: new tasks' first call {first['task-24']:.3f}s and {first['task-25']:.3f}s after DNS changed "
                       f"(refresh interval {REFRESH_S}s)")
        assert max(first.values()) <= REFRESH_S + 0.5
        time.sleep(1.0)
        spread = collections.Counter(u[2] for u in load.since(time.monotonic() - 1.0))
        figures.append(f"with 5 tasks, calls in the last second: {dict(sorted(spread.items()))}")
        assert len(spread) == 5

        # Scale 5 -> 2: addresses leave DNS; the processes stop after a grace period.
        scaled_down = time.monotonic()
        dns.set("tasks.user", ADDRESSES[:2], ttl=1)
        time.sleep(REFRESH_S + 1.5)  # the grace period: calls and streams in flight finish
        for address in ADDRESSES[2:]:
            tasks.pop(address).stop(signal.SIGTERM)
        time.sleep(1.0)
        window = load.since(scaled_down)
        failed = [u for u in window if u[1] != 0]
        streams = load.streams_since(scaled_down)
        late = collections.Counter(u[2] for u in load.since(scaled_down + REFRESH_S + 0.5))
        figures.append(f"scale 5->2: {len(window)} unary calls, {len(failed)} failed; {len(streams)} server streams, "
                       f"{sum(1 for s in streams if s[1] != 0)} failed; afterwards calls went to {dict(sorted(late.items()))}")
        assert failed == []
        assert streams and all(s[1] == 0 and s[2] == 8 for s in streams), streams
        assert set(late) == {"task-21", "task-22"}

        # A task killed without warning (still in DNS): only calls in flight on it may fail, with
        # status 14; then no call goes to it.
        victim = tasks[ADDRESSES[1]]
        killed = time.monotonic()
        victim.stop(signal.SIGKILL)
        time.sleep(2.0)
        window = load.since(killed)
        failed = [u for u in window if u[1] != 0]
        after = [u for u in load.since(killed + 0.3)]
        figures.append(f"task killed: {len(window)} unary calls in the next 2 s, {len(failed)} failed "
                       f"(statuses {sorted({u[1] for u in failed})}); calls to it after 0.3 s: "
                       f"{sum(1 for u in after if u[2] == victim.name)}")
        assert all(u[1] == 14 for u in failed), failed
        assert len(failed) <= 4 + 2, "at most the calls in flight on it (4 unary streams, 2 server streams)"
        assert all(u[2] != victim.name for u in after)
        stream_failures = [s for s in load.streams_since(killed) if s[1] != 0]
        assert all(s[1] == 14 for s in stream_failures)
        assert len(stream_failures) <= 2
    finally:
        load.stop()
    record(figures)


def test_dns_down_for_30_seconds_keeps_traffic_on_the_last_known_tasks(swarm):
    dns, tasks, task_port, port, admin_port, proxy = swarm
    load = Load(port, unary_streams=2, stream_clients=1)
    try:
        time.sleep(1.0)
        down = time.monotonic()
        dns.drop("tasks.user")          # the DNS server stops answering
        time.sleep(30)
        window = load.since(down)
        failed = [u for u in window if u[1] != 0]
        spread = collections.Counter(u[2] for u in window)
        stats = admin(admin_port, "/stats")
        failures = int(next(l.split(": ")[1] for l in stats.splitlines() if l.startswith("cluster.user.update_failure:")))
        record([f"== {time.strftime('%Y-%m-%d %H:%M:%S')} tests/integration/test_swarm.py::test_dns_down_for_30_seconds",
                f"DNS down 30 s: {len(window)} unary calls, {len(failed)} failed, spread {dict(sorted(spread.items()))}; "
                f"{failures} failed DNS refreshes counted in /stats"])
        assert failed == []
        assert set(spread) == {"task-21", "task-22", "task-23"}
        assert failures >= 5
        assert "DNS lookup failed" in proxy.output() and "keeping 3 known endpoints" in proxy.output()
        assert admin(admin_port, "/clusters").count("::healthy") == 3
        # Back: a change is picked up again.
        dns.set("tasks.user", ADDRESSES[:2], ttl=1)
        wait_until(lambda: admin(admin_port, "/clusters").count("::healthy") == 2, 5, "DNS to be heard again")
    finally:
        load.stop()


def test_empty_answer_empties_the_cluster_only_when_it_repeats(swarm):
    dns, tasks, task_port, port, admin_port, proxy = swarm
    dns.empty("tasks.user")
    time.sleep(REFRESH_S * 0.8)
    wait_until(lambda: "DNS returned no addresses" in proxy.output(), 5, "the first empty answer")
    # Still serving from the known tasks after the first empty answer.
    c = HTTP2(port)
    assert c.call("/demo.User/login", login_req("demo", "demo123")).grpc_status == 0
    wait_until(lambda: "twice in a row" in proxy.output(), 5, "the second empty answer")
    r = c.call("/demo.User/login", login_req("demo", "demo123"))
    c.close()
    assert (r.grpc_status, r.grpc_message) == (14, "no healthy upstream"), proxy.output()[-4000:]


def test_nxdomain_and_servfail_keep_the_last_tasks(swarm):
    dns, tasks, task_port, port, admin_port, proxy = swarm
    c = HTTP2(port)
    try:
        for mode in (dns.nxdomain, dns.servfail):
            before = admin(admin_port, "/stats")
            mode("tasks.user")
            time.sleep(REFRESH_S * 3)
            assert admin(admin_port, "/clusters").count("::healthy") == 3
            seen, failed = collections.Counter(), 0
            for _ in range(30):
                r = c.call("/demo.User/login", login_req("demo", "demo123"))
                if r.grpc_status == 0:
                    seen[pb_decode(r.messages[0])[3].decode()] += 1
                else:
                    failed += 1
            assert failed == 0 and len(seen) == 3
            assert before != admin(admin_port, "/stats")
        assert "NXDOMAIN" in proxy.output() and "SERVFAIL" in proxy.output()
    finally:
        c.close()


def test_a_reordered_answer_is_not_a_membership_change(swarm):
    """Docker's DNS lists tasks.<service> in a new order on each lookup. The log names a change of
    membership once, and says nothing while the set of tasks stays the same."""
    dns, tasks, task_port, port, admin_port, proxy = swarm
    dns.set("tasks.user", ADDRESSES[:3], ttl=1, shuffle=True)
    before = proxy.output().count("endpoints now")
    dns.reset_counts()
    wait_until(lambda: dns.queries("tasks.user") >= 8, 10, "eight lookups")
    assert proxy.output().count("endpoints now") == before, proxy.output()[-3000:]

    tasks[ADDRESSES[3]] = Task(ADDRESSES[3], task_port)
    dns.set("tasks.user", ADDRESSES[:4], ttl=1, shuffle=True)
    wait_until(lambda: f"added {ADDRESSES[3]}:{task_port}" in proxy.output(), 5, "the new task in the log")
    dns.reset_counts()
    wait_until(lambda: dns.queries("tasks.user") >= 8, 10, "eight more lookups")
    lines = [line for line in proxy.output().splitlines() if "endpoints now" in line]
    assert len(lines) == before + 1, "\n".join(lines)
    record([f"reordered DNS answers: {len(lines) - before} membership line for one added task over 16+ lookups"])
