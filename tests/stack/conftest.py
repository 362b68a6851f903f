"""The Docker Swarm stack test: docker-compose.yml deployed as it is with `docker stack deploy` on
a single-node Swarm, the images built from the Dockerfile.

Needs a Docker engine that is a Swarm manager (tests/stack/docker-up.sh installs Debian's docker.io,
starts dockerd and runs `docker swarm init`; scripts/test calls it). In CI (CI=true) a missing
engine fails the test; elsewhere the test is skipped, saying why.

The machines this runs on reach no Docker Hub and no GitHub, so:
- the images' base is Debian bookworm from debootstrap, imported once per machine
  (grpcweb-test/debian:bookworm), passed as RUNTIME_IMAGE; nginx for the `web` target is Debian's
  nginx-light on that base (web-base.Dockerfile), passed as WEB_IMAGE;
- the binaries are built on the host (`swift build -c release --static-swift-stdlib`) and
  packaged by the Dockerfile's prebuilt path (BINARIES=prebuilt, BuildKit), with the same runtime
  stages as the default build.

Their kernel has no IPVS, so Swarm's routing mesh does not serve the ports the stack publishes
(8080, 8000): the test reaches the stack through a forwarder, HAProxy on the stack's own overlay
network (forwarder.Dockerfile, haproxy.cfg), published on 127.0.0.1 only. It finds the proxy's
tasks through tasks.proxy and sends new connections only to a task whose /ready answers 200, as
a load balancer in front of a real cluster would. That keeps the proxy's start-first rolling
update possible: with `mode: host` ports on a single node, the new task could not bind 8080
while the old one holds it.

    python3 -m pytest tests/stack -q -s -p no:cacheprovider
"""

import time

import pytest

import stack_support as s


def pytest_configure(config):
    config.addinivalue_line("markers", "stack: needs the deployed Docker stack")


@pytest.fixture(scope="session")
def docker_ready():
    problem = s.docker_problem()
    if problem:
        if s.IN_CI:
            pytest.fail(f"CI needs a Docker engine for the stack test, and {problem}. "
                        "tests/stack/docker-up.sh should have started one: see its output above.")
        pytest.skip(f"no usable Docker engine: {problem} (run tests/stack/docker-up.sh as root)")
    s.figure(f"docker: client {s.DOCKER}, {s.docker('version', '--format', 'engine {{.Server.Version}}').strip()}")


@pytest.fixture(scope="session")
def images(docker_ready):
    """Every image, built once per run (the base images once per machine)."""
    t0 = time.monotonic()
    s.build_images()
    s.figure(f"images in all: {time.monotonic() - t0:.1f} s")


_deployed = {"stack": False}


class Stack:
    def __init__(self, proxy_port, web_port):
        self.proxy_port, self.web_port = proxy_port, web_port
        self.proxy_url = f"http://127.0.0.1:{proxy_port}"
        self.web_url = f"http://127.0.0.1:{web_port}"


EXPECTED = {"proxy": 1, "user": 3, "web": 1}


@pytest.fixture(scope="session")
def stack(images):
    """docker-compose.yml deployed unchanged as the stack STACK, every service converged and
    every container healthy; the forwarder in front. Removed at the end."""
    if not s.stack_gone():
        s.figure(f"an earlier {s.STACK} stack removed first: {s.remove_stack():.1f} s")
    t0 = time.monotonic()
    _deployed["stack"] = True
    s.docker("stack", "deploy", "-c", s.ROOT / "docker-compose.yml", s.STACK, cwd=s.ROOT)
    try:
        s.wait_converged(EXPECTED, 180, "the stack after `docker stack deploy`")
        s.figure(f"converged after deploy (proxy 1/1, user 3/3, web 1/1, every container healthy): "
                 f"{time.monotonic() - t0:.1f} s")
        proxy_port, web_port = s.start_forwarder()
        stack = Stack(proxy_port, web_port)
        wait_answers(stack)
    except BaseException:
        print(s.diagnostics())
        cleanup()
        raise
    yield stack
    cleanup()


def wait_answers(stack, timeout=60):
    """The forwarder has found the proxy and the proxy every replica: a login answers."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        call = s.one_call(s.NewConnection(stack.proxy_port))
        if call.ok:
            return
        last = call
        time.sleep(0.5)
    raise AssertionError(f"no login through the forwarder after {timeout}s: {last}")


def cleanup():
    if _deployed["stack"]:
        _deployed["stack"] = False
        try:
            s.figure(f"stack removed (docker stack rm, until its containers and network are gone): {s.remove_stack():.1f} s")
        except AssertionError as e:
            print(f"[stack] {e}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _deployed["stack"] and report.when in ("setup", "call"):
        text = s.diagnostics()
        s.ARTIFACTS.mkdir(exist_ok=True)
        (s.ARTIFACTS / f"stack-diagnostics-{item.name}.txt").write_text(text)
        report.sections.append(("docker service ps and logs", text))
