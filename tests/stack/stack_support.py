"""Helpers for the Docker Swarm stack test (tests/stack): the docker client, the images, the
stack's state, the figures the test prints, and a steady load of gRPC-Web logins.

A module of its own, not conftest.py, so the test modules can import it.
"""

import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ARTIFACTS = ROOT / "test-artifacts"
FIGURES = ARTIFACTS / "stack-figures.txt"
PREBUILT = ROOT / "deploy" / "prebuilt"

sys.path.insert(0, str(ROOT / "tests" / "integration"))
import grpcweb  # noqa: E402  (the integration tests' hand-written gRPC-Web client)

import h2.exceptions  # noqa: E402

# The stack under test: docker-compose.yml deployed as it is, under a name of its own so that a
# developer's `grpcweb` stack is left alone.
STACK = os.environ.get("STACK_NAME", "grpcwebtest")
NETWORK = f"{STACK}_grpcweb"
FORWARDER = f"{STACK}-forwarder"

# Images. The three the stack runs are named as docker-compose.yml names them (REGISTRY and TAG
# unset); the others exist only for the test and are built from Debian's packages, because these
# machines reach no Docker Hub.
PROXY_IMAGE = "grpc-web-proxy:latest"
USER_IMAGE = "grpc-web-user-service:latest"
WEB_IMAGE = "grpc-web-demo:latest"
BASE_IMAGE = "grpcweb-test/debian:bookworm"
NGINX_IMAGE = "grpcweb-test/nginx:bookworm"
FORWARDER_IMAGE = "grpcweb-test/forwarder:latest"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")

LOGIN = "/demo.User/login"
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


# ---------------------------------------------------------------------------------------------
# figures: printed as they come, and kept in test-artifacts/stack-figures.txt

class Figures:
    def __init__(self, path=FIGURES):
        self.path = path
        self.started = False

    def __call__(self, line):
        print(f"[stack] {line}", flush=True)
        self.path.parent.mkdir(exist_ok=True)
        with open(self.path, "w" if not self.started else "a") as f:
            if not self.started:
                f.write(f"# tests/stack, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, stack {STACK}\n")
            f.write(line + "\n")
        self.started = True


figure = Figures()


# ---------------------------------------------------------------------------------------------
# the docker client

class DockerError(AssertionError):
    pass


def _client_version(path):
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_docker():
    """The docker client to use, and whether it builds with BuildKit, which the Dockerfile's
    prebuilt path needs (see the Dockerfile): a client with the buildx plugin, or one older than
    23.0, which has BuildKit built in. Debian's docker.io (20.10) is the second kind; a newer
    client without buildx falls back to the legacy builder, which builds every stage."""
    found = []
    for candidate in (os.environ.get("DOCKER"), shutil.which("docker"), "/usr/bin/docker", "/usr/local/bin/docker"):
        if candidate and os.path.exists(candidate) and candidate not in found:
            found.append(candidate)
    for path in found:
        if subprocess.run([path, "buildx", "version"], capture_output=True).returncode == 0:
            return path, True
        version = _client_version(path)
        if version and version < (23, 0):
            return path, True
    return (found[0], False) if found else (None, False)


DOCKER, BUILDKIT = find_docker()


def _env():
    env = dict(os.environ, DOCKER_BUILDKIT="1")
    # docker-compose.yml reads these; the test deploys it with their defaults.
    for name in ("REGISTRY", "TAG", "PROXY_CONFIG_VERSION"):
        env.pop(name, None)
    return env


def docker(*args, check=True, timeout=120, quiet=False, **kw):
    """Runs `docker ARGS`; returns stdout. Raises DockerError with the output when it fails."""
    cmd = [DOCKER, *[str(a) for a in args]]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), **kw)
    except subprocess.TimeoutExpired as e:
        raise DockerError(f"`docker {' '.join(cmd[1:])}` took more than {timeout}s") from e
    if check and p.returncode != 0:
        raise DockerError(f"`docker {' '.join(cmd[1:])}` exited with {p.returncode}:\n{p.stdout}\n{p.stderr}")
    if not quiet and p.stderr.strip() and p.returncode == 0 and os.environ.get("STACK_VERBOSE"):
        print(p.stderr, file=sys.stderr)
    return p.stdout if check else p


def docker_problem():
    """None when a Docker engine answers and this node manages an active Swarm; else why not."""
    if not DOCKER:
        return "no docker client (tests/stack/docker-up.sh installs Debian's docker.io)"
    p = docker("info", "--format", "{{.ServerVersion}} {{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}",
               check=False, timeout=30)
    if p.returncode != 0:
        return f"the Docker engine does not answer ({DOCKER} info: {(p.stderr or p.stdout).strip()})"
    version, state, manager = (p.stdout.split() + ["", "", ""])[:3]
    if state != "active" or manager != "true":
        return f"Docker {version} is not a Swarm manager (swarm: {state}; run `docker swarm init --advertise-addr 127.0.0.1`)"
    if not BUILDKIT:
        return (f"{DOCKER} cannot build with BuildKit (no buildx plugin, and the client is 23.0 or later): "
                "the Dockerfile's prebuilt path needs it")
    return None


def image_exists(name):
    return docker("image", "inspect", name, check=False, timeout=30).returncode == 0


# ---------------------------------------------------------------------------------------------
# images

def timed(what, fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    dt = time.monotonic() - t0
    figure(f"{what}: {dt:.1f} s")
    return out


def swift_release_binaries():
    """grpc-web-proxy and user-service in release mode with the Swift runtime linked in, as the
    Dockerfile's build stage makes them, copied into deploy/prebuilt/ and stripped."""
    for product in ("grpc-web-proxy", "user-service"):
        p = subprocess.run(["swift", "build", "-c", "release", "--static-swift-stdlib", "--product", product],
                           cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise AssertionError(f"swift build -c release --product {product} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    bin_dir = subprocess.run(["swift", "build", "-c", "release", "--static-swift-stdlib", "--show-bin-path"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    for product in ("grpc-web-proxy", "user-service"):
        target = PREBUILT / product
        shutil.copy2(Path(bin_dir) / product, target)
        subprocess.run(["strip", str(target)], check=True)


def base_image():
    """A Debian bookworm minbase root file system from Debian's mirror (debootstrap), imported as
    an image. Built once per machine: skipped when the image exists."""
    if image_exists(BASE_IMAGE):
        figure(f"base image {BASE_IMAGE}: already there")
        return
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.path.exists(debootstrap):
        raise AssertionError("debootstrap is not installed (tests/stack/docker-up.sh installs it)")
    work = Path("/var/tmp") / f"{STACK}-rootfs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        p = subprocess.run([debootstrap, "--variant=minbase", "bookworm", str(work / "root"), DEBIAN_MIRROR],
                           capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise AssertionError(f"debootstrap failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        root = work / "root"
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (root / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        for f in (root / "var/cache/apt").glob("*.bin"):
            f.unlink()
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        p = subprocess.run([DOCKER, "import", "-c", 'CMD ["/bin/bash"]', "-", BASE_IMAGE],
                           stdin=tar.stdout, capture_output=True, text=True, timeout=600, env=_env())
        tar.stdout.close()
        tar.wait()
        if p.returncode != 0 or tar.returncode != 0:
            raise AssertionError(f"docker import failed: {p.stderr}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build(*args, timeout=900):
    """`docker build` with BuildKit; the output is kept for the failure message only."""
    return docker("build", "--progress=plain", *args, timeout=timeout)


def build_images():
    """The base images (once per machine), then the three images of the stack from the Dockerfile
    with the binaries built on this machine (BINARIES=prebuilt) on the Debian base, and the
    forwarder."""
    timed("base image (debootstrap, docker import)", base_image)
    timed("test-only images (nginx, forwarder; Debian packages)", lambda: (
        build("-f", HERE / "web-base.Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", NGINX_IMAGE, HERE),
        build("-f", HERE / "forwarder.Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", FORWARDER_IMAGE, HERE),
    ))
    timed("release binaries (swift build -c release --static-swift-stdlib)", swift_release_binaries)
    common = ["--build-arg", "BINARIES=prebuilt", "--build-arg", f"RUNTIME_IMAGE={BASE_IMAGE}",
              "--build-arg", f"WEB_IMAGE={NGINX_IMAGE}"]
    timed("stack images (Dockerfile targets proxy, user-service, web)", lambda: [
        build(*common, "--target", target, "-t", image, ROOT)
        for target, image in (("proxy", PROXY_IMAGE), ("user-service", USER_IMAGE), ("web", WEB_IMAGE))])


# ---------------------------------------------------------------------------------------------
# the stack

def service(name):
    return f"{STACK}_{name}"


def services():
    """{service: (running, desired)} from `docker service ls`."""
    out = docker("service", "ls", "--filter", f"label=com.docker.stack.namespace={STACK}",
                 "--format", "{{.Name}} {{.Replicas}}")
    result = {}
    for line in out.splitlines():
        name, replicas = line.split()[:2]
        running, desired = replicas.split("/")[:2]
        result[name[len(STACK) + 1:]] = (int(running), int(re.match(r"\d+", desired).group()))
    return result


def containers(name=None):
    """[(container id, service, status)] of the stack's containers on this node."""
    label = f"com.docker.swarm.service.name={service(name)}" if name else f"com.docker.stack.namespace={STACK}"
    out = docker("ps", "--no-trunc", "--filter", f"label={label}",
                 "--format", '{{.ID}}\t{{.Label "com.docker.swarm.service.name"}}\t{{.Status}}')
    rows = []
    for line in out.splitlines():
        cid, svc, status = line.split("\t")
        rows.append((cid, svc[len(STACK) + 1:], status))
    return rows


def replica_names(name="user"):
    """{x-replica name: container id} of the User containers running now. A replica names itself
    after its host name, which Swarm sets to the container's short id, and its port."""
    return {f"{cid[:12]}:50051": cid for cid, _, _ in containers(name)}


def converged(expected):
    """True when every service runs the number of tasks it should, every one of its containers is
    healthy, and no other container of it is left (an old task still stopping)."""
    have = services()
    if set(have) != set(expected):
        return False
    for name, want in expected.items():
        if have[name] != (want, want):
            return False
        rows = containers(name)
        if len(rows) != want or not all("(healthy)" in status for _, _, status in rows):
            return False
    return True


def wait_converged(expected, timeout, what):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if converged(expected):
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"{what}: not converged after {timeout:.0f}s to {expected}: services {services()}, "
                         f"containers {[(svc, status) for _, svc, status in containers()]}")


def wait_update(name, timeout):
    """Waits for `docker service update` of a service to finish; returns the seconds it took."""
    t0 = time.monotonic()
    state = ""
    while time.monotonic() - t0 < timeout:
        state = docker("service", "inspect", "--format",
                       "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}", service(name)).strip()
        if state == "completed":
            return time.monotonic() - t0
        if state in ("paused", "rollback_started", "rollback_completed", "rollback_paused"):
            msg = docker("service", "inspect", "--format", "{{.UpdateStatus.Message}}", service(name)).strip()
            raise AssertionError(f"the update of {service(name)} did not complete: {state}: {msg}")
        time.sleep(0.5)
    raise AssertionError(f"the update of {service(name)} is still {state!r} after {timeout}s")


def stack_gone():
    return (not docker("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={STACK}").strip()
            and not docker("network", "ls", "-q", "--filter", f"name={NETWORK}").strip()
            and not docker("service", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}").strip())


def remove_stack(timeout=120):
    """Removes the forwarder and the stack, and waits until its containers and network are gone
    (the next deploy would otherwise find the network still in use)."""
    docker("rm", "-f", FORWARDER, check=False)
    if docker("stack", "ls", "--format", "{{.Name}}", check=False, timeout=30).stdout.split().count(STACK):
        docker("stack", "rm", STACK)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if stack_gone():
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"stack {STACK} still has containers or its network after {timeout}s")


def start_forwarder():
    """HAProxy on the stack's network (tests/stack/forwarder.Dockerfile), its ports published on
    127.0.0.1 only. Returns (proxy port, web port) on the host."""
    docker("rm", "-f", FORWARDER, check=False)
    docker("run", "-d", "--name", FORWARDER, "--network", NETWORK,
           "-p", "127.0.0.1::8080", "-p", "127.0.0.1::8000", FORWARDER_IMAGE)

    def host_port(port):
        out = docker("port", FORWARDER, f"{port}/tcp").split()[0]
        return int(out.rsplit(":", 1)[1])

    return host_port(8080), host_port(8000)


def diagnostics():
    """What a failed CI run needs to see: every task with its error, and each service's logs."""
    parts = []

    def add(*args, timeout=60):
        p = docker(*args, check=False, timeout=timeout)
        parts.append(f"$ docker {' '.join(map(str, args))}\n{p.stdout}{p.stderr}")

    add("stack", "ps", "--no-trunc", STACK)
    for name in ("proxy", "user", "web"):
        add("service", "ps", "--no-trunc", service(name))
    add("ps", "-a", "--filter", f"label=com.docker.stack.namespace={STACK}")
    for name in ("proxy", "user", "web"):
        add("service", "logs", "--timestamps", "--tail", "150", service(name))
    add("logs", "--tail", "100", FORWARDER)
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# calls

class Call:
    """One login as a client saw it."""
    __slots__ = ("transport", "start", "end", "ok", "replica", "resent", "error")

    def __init__(self, transport, start):
        self.transport, self.start = transport, start
        self.end, self.ok, self.replica, self.resent, self.error = None, False, None, 0, None

    def __repr__(self):
        state = f"ok from {self.replica}" if self.ok else f"FAILED: {self.error}"
        return f"<{self.transport} call at {self.start:.3f}+{(self.end or self.start) - self.start:.3f}s, resent {self.resent}: {state}>"


def _judge(call, status, headers, data):
    """A login succeeded when it came back as HTTP 200, grpc-status 0, with a LoginRes whose code
    is "0" and whose replica is the one x-replica names."""
    content_type = headers.get("content-type", "")
    reply = grpcweb.Reply(status, headers, data, text=content_type.startswith("application/grpc-web-text"))
    replica = headers.get("x-replica")
    try:
        message = grpcweb.pb_decode(reply.messages[0]) if reply.messages else {}
    except Exception as e:  # noqa: BLE001  (a bad message is a failed call, reported as such)
        message = {"error": str(e)}
    if status == 200 and reply.grpc_status == 0 and message.get(1) == b"0" and message.get(3, b"").decode() == replica:
        call.ok, call.replica = True, replica
    else:
        call.error = f"HTTP {status}, grpc-status {reply.grpc_status} {reply.grpc_message!r}, replica {replica}, message {message}"


BODY = grpcweb.grpc_web_body(grpcweb.login_req("demo", "demo123"), False)
HEADERS = grpcweb.grpc_web_headers(False)
TIMEOUT = 10


class KeepAliveHTTP1:
    """Every call on one HTTP/1.1 keep-alive connection, a new one when the proxy closes it. Like a
    browser, a call sent on a reused connection that closes before any byte of the response is
    sent once more on a new connection (the proxy never processed it): counted as a resend."""
    name = "HTTP/1.1 keep-alive"

    def __init__(self, port):
        self.port, self.conn = port, None

    def call(self, call):
        while True:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
            reused = self.conn.sock is not None
            try:
                self.conn.request("POST", LOGIN, body=BODY, headers=HEADERS)
                resp = self.conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                self.close()
                if reused and call.resent == 0 and not isinstance(e, (socket.timeout, TimeoutError)):
                    call.resent += 1
                    continue
                call.error = f"{type(e).__name__}: {e} ({'reused' if reused else 'new'} connection)"
                return
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                self.close()
                call.error = f"{type(e).__name__} while reading the response: {e}"
                return
            _judge(call, resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
            return

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class KeepAliveH2C:
    """Every call on one HTTP/2 connection (prior knowledge), a new one after a GOAWAY or a close.
    Like a browser, a call the server's GOAWAY says it never processed (stream id above the
    GOAWAY's last stream id) or refused (REFUSED_STREAM) is sent once more: a resend."""
    name = "h2c"

    def __init__(self, port):
        self.port, self.client = port, None

    def call(self, call):
        while True:
            try:
                if self.client is None or self.client.goaway is not None:
                    self.close()
                    self.client = grpcweb.HTTP2(self.port, timeout=TIMEOUT)
            except OSError as e:
                self.close()
                call.error = f"connect: {type(e).__name__}: {e}"
                return
            c, sid = self.client, None

            def unprocessed():
                return sid is not None and c.goaway is not None and c.goaway.last_stream_id < sid

            try:
                sid = c.start(LOGIN, HEADERS, BODY)
                c.pump(lambda: c.streams[sid]["ended"] or unprocessed())
            except (OSError, ConnectionError, TimeoutError, h2.exceptions.H2Error) as e:
                self.close()
                if unprocessed() and call.resent == 0:
                    call.resent += 1
                    continue
                goaway = f", GOAWAY last stream {c.goaway.last_stream_id} code {c.goaway.error_code}" if c.goaway else ""
                call.error = f"{type(e).__name__}: {e} (stream {sid}{goaway})"
                return
            s = c.streams[sid]
            refused = s["reset"] == 7  # REFUSED_STREAM: not processed (RFC 9113, 8.7)
            if (unprocessed() and not s["ended"]) or refused:
                self.close()
                if call.resent == 0:
                    call.resent += 1
                    continue
                call.error = "refused again after a resend"
                return
            if s["reset"] is not None:
                call.error = f"stream reset with code {s['reset']}"
                return
            headers = dict(s["headers"] or {})
            status = int(headers.pop(":status", 0))
            if s["trailers"]:
                headers.update(s["trailers"])
            _judge(call, status, headers, s["data"])
            return

    def close(self):
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001  (closing a broken connection)
                pass
            self.client = None


class NewConnection:
    """A new HTTP/1.1 connection for every call, closed after it: no call is ever resent."""
    name = "new connection per call"

    def __init__(self, port):
        self.port = port

    def call(self, call):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request("POST", LOGIN, body=BODY, headers={**HEADERS, "connection": "close"})
            resp = conn.getresponse()
            data = resp.read()
            _judge(call, resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        except (OSError, http.client.HTTPException) as e:
            call.error = f"{type(e).__name__}: {e}"
        finally:
            conn.close()

    def close(self):
        pass


TRANSPORTS = (KeepAliveHTTP1, KeepAliveH2C, NewConnection)


def one_call(transport):
    call = Call(transport.name, time.monotonic())
    try:
        transport.call(call)
    except Exception as e:  # noqa: BLE001  (anything unexpected is a failed call, with its reason)
        transport.close()
        call.error = f"{type(e).__name__}: {e}"
    call.end = time.monotonic()
    return call


class Load:
    """A steady load of logins, `rate` calls per second in all, spread evenly over the three
    transports, each on a thread of its own. Bounded: it stops by itself after `limit` seconds."""

    def __init__(self, port, rate=20.0, limit=600.0):
        self.port, self.rate, self.limit = port, rate, limit
        self.calls, self.lock, self.stopping = [], threading.Lock(), threading.Event()
        self.threads = []

    def __enter__(self):
        self.t0 = time.monotonic()
        period = len(TRANSPORTS) / self.rate
        for i, kind in enumerate(TRANSPORTS):
            t = threading.Thread(target=self._run, args=(kind(self.port), period, i * period / len(TRANSPORTS)),
                                 daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _run(self, transport, period, offset):
        next_at = self.t0 + offset
        while not self.stopping.is_set() and time.monotonic() - self.t0 < self.limit:
            delay = next_at - time.monotonic()
            if delay > 0 and self.stopping.wait(delay):
                break
            call = one_call(transport)
            with self.lock:
                self.calls.append(call)
            next_at = max(next_at + period, time.monotonic() - period)
        transport.close()

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=TIMEOUT * 3)

    def snapshot(self, since=None):
        with self.lock:
            return [c for c in self.calls if since is None or c.start >= since]

    def wait_for(self, predicate, timeout, what, since=None):
        """Waits until predicate(calls since `since`) is true; returns the time it became so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = predicate(self.snapshot(since))
            if hit:
                return hit if isinstance(hit, float) else time.monotonic()
            time.sleep(0.1)
        raise AssertionError(f"{what}: not seen within {timeout}s")

    def summary(self, calls=None):
        calls = self.snapshot() if calls is None else calls
        failed = [c for c in calls if not c.ok]
        by_transport = {}
        for c in calls:
            n = by_transport.setdefault(c.transport, [0, 0, 0])
            n[0] += 1
            n[1] += not c.ok
            n[2] += c.resent
        return {
            "calls": len(calls), "failed": failed, "resent": sum(c.resent for c in calls),
            "by_transport": by_transport,
            "seconds": (calls[-1].end - calls[0].start) if calls else 0.0,
        }


def describe(summary):
    parts = "; ".join(f"{name}: {n} calls, {f} failed, {r} resent" for name, (n, f, r) in summary["by_transport"].items())
    return (f"{summary['calls']} calls in {summary['seconds']:.1f} s, {len(summary['failed'])} failed, "
            f"{summary['resent']} resent ({parts})")
