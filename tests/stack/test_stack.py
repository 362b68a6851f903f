"""docker-compose.yml on a real single-node Docker Swarm: the stack converges, every User replica
gets calls over every kind of connection, and scaling, rolling updates and a killed replica cost
no call, under a steady load of logins. The page logs in through the stack in Chromium.

Every figure is printed and kept in test-artifacts/stack-figures.txt. How the stack is built and
reached: conftest.py.
"""

import collections
import importlib.util
import time

import pytest

import stack_support as s

LOGINS = 300
RATE = 20.0  # calls per second, over the three transports
USERS = 3


def names_of(calls):
    return {c.replica for c in calls if c.ok}


def check_no_failures(load, what, calls=None):
    summary = load.summary(calls)
    s.figure(f"{what}: {s.describe(summary)}")
    assert not summary["failed"], f"{what}: {len(summary['failed'])} failed calls: {summary['failed'][:10]}"
    return summary


def test_stack_converges_healthy_and_unprivileged(stack):
    assert s.converged({"proxy": 1, "user": USERS, "web": 1})
    for cid, name, status in s.containers():
        user = s.docker("inspect", "--format", "{{.Config.User}}", cid).strip()
        if name in ("proxy", "user"):
            # The images' user: the proxy's sockets must work without root (the SO_DEBUG bug).
            assert user == "10001:10001", (name, user)
    s.figure(f"containers: {', '.join(sorted(f'{name} {status}' for _, name, status in s.containers()))}")


def test_tasks_user_lists_every_replica_with_the_projects_image(stack):
    """The README's DNS check, with no image from Docker Hub: getent in the proxy's image, on
    the stack's attachable network, lists one address per User task."""
    out = s.docker("run", "--rm", "--network", s.NETWORK, "--entrypoint", "getent", s.PROXY_IMAGE,
                   "ahostsv4", "tasks.user")
    addresses = {line.split()[0] for line in out.splitlines() if line.strip()}
    s.figure(f"getent ahostsv4 tasks.user on {s.NETWORK}: {sorted(addresses)}")
    assert len(addresses) == USERS, out


@pytest.mark.parametrize("kind", s.TRANSPORTS, ids=["http1-keepalive", "h2c", "new-connection"])
def test_logins_reach_every_replica(stack, kind):
    transport = kind(stack.proxy_port)
    t0 = time.monotonic()
    calls = [s.one_call(transport) for _ in range(LOGINS)]
    took = time.monotonic() - t0
    transport.close()
    counts = collections.Counter(c.replica for c in calls if c.ok)
    failed = [c for c in calls if not c.ok]
    resent = sum(c.resent for c in calls)
    s.figure(f"{LOGINS} logins, {kind.name}: {took:.1f} s, {len(failed)} failed, {resent} resent, "
             f"per replica {dict(sorted(counts.items()))}")
    assert not failed, failed[:10]
    assert resent == 0
    assert set(counts) == set(s.replica_names()), "every running User replica, and only those"
    share = LOGINS / USERS
    assert all(abs(n - share) <= 15 for n in counts.values()), counts


def _demo_page_module():
    path = s.ROOT / "tests" / "browser" / "demo_page.py"
    spec = importlib.util.spec_from_file_location("stack_demo_page", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def driver():
    demo_page = _demo_page_module()
    chromium, chromedriver = demo_page.find_chromium(), demo_page.find_chromedriver()
    if not chromium or not chromedriver:
        message = "Chromium and chromedriver are needed (apt-get install -y chromium chromium-driver)"
        pytest.fail(message) if s.IN_CI else pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # The options of tests/browser/conftest.py.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    d.set_page_load_timeout(demo_page.WAIT_S * 2)
    yield demo_page, d
    d.quit()


def test_demo_page_logs_in_through_the_stack(stack, driver):
    """The page from the `web` service (nginx, port 8000) calls the proxy on another origin: CORS
    preflight, then gRPC-Web, in both modes, answered by one of the stack's User replicas."""
    demo_page, d = driver
    url = f"{stack.web_url}/?proxy={stack.proxy_url}"
    page = demo_page.DemoPage(d, url)
    replicas = set(s.replica_names())
    seen = []
    for mode in ("binary", "text"):
        page.set_mode(mode)
        row = page.login("demo", "demo123")
        assert row["method"] == "login" and row["mode"] == mode
        assert row["code"] == "0" and row["ok"] == "true", row
        assert row["replica"] in replicas, (row, replicas)
        assert page.status()["text"] == f"OK — welcome, demo (replica {row['replica']})"
        seen.append(row["replica"])
    row = page.login("demo", "wrong")
    assert row["code"] == "16" and row["replica"] in replicas
    assert page.console_errors() == []
    s.ARTIFACTS.mkdir(exist_ok=True)
    d.save_screenshot(str(s.ARTIFACTS / "stack-demo-page.png"))
    s.figure(f"demo page {url}: logged in (binary, text) through replicas {seen}")


def test_scale_up_and_down_under_load(stack):
    with s.Load(stack.proxy_port, RATE) as load:
        time.sleep(2)
        before = set(s.replica_names())
        t0 = time.monotonic()
        s.docker("service", "scale", "--detach", f"{s.service('user')}=5")
        converged = s.wait_converged({"proxy": 1, "user": 5, "web": 1}, 120, "scale to 5")
        added = set(s.replica_names()) - before
        assert len(added) == 2, added
        answered = load.wait_for(lambda calls: added <= names_of(calls), 30, f"calls answered by {added}", since=t0)
        s.figure(f"scale user 3 -> 5: 5/5 healthy after {converged:.1f} s, both new replicas answer "
                 f"{answered - t0:.1f} s after the command")

        s.docker("service", "scale", "--detach", f"{s.service('user')}=2")
        converged = s.wait_converged({"proxy": 1, "user": 2, "web": 1}, 120, "scale to 2")
        left = set(s.replica_names())
        t2 = time.monotonic()
        time.sleep(4)
        late = names_of(load.snapshot(since=t2))
        s.figure(f"scale user 5 -> 2: the 3 removed tasks gone after {converged:.1f} s; "
                 f"calls afterwards reach {len(late)} replicas")
        assert late == left, (late, left)
        time.sleep(1)
    check_no_failures(load, "scale 3 -> 5 -> 2 under load", load.snapshot(since=t0))
    # Back to the stack's own 3 for the next tests (no load: not measured).
    s.docker("service", "scale", "--detach", f"{s.service('user')}={USERS}")
    s.wait_converged({"proxy": 1, "user": USERS, "web": 1}, 120, "scale back to 3")


def _rolling_update(stack, name, timeout):
    with s.Load(stack.proxy_port, RATE) as load:
        time.sleep(2)
        before = {cid for cid, _, _ in s.containers(name)}
        t0 = time.monotonic()
        s.docker("service", "update", "--force", "--detach", s.service(name))
        took = s.wait_update(name, timeout)
        s.wait_converged({"proxy": 1, "user": USERS, "web": 1}, 60, f"after the update of {name}")
        after = {cid for cid, _, _ in s.containers(name)}
        assert not before & after, f"{name}: some tasks were not replaced"
        if name == "user":
            done = time.monotonic()
            load.wait_for(lambda calls: set(s.replica_names()) <= names_of(calls), 30,
                          "calls answered by every new replica", since=done)
        time.sleep(3)
    summary = check_no_failures(load, f"docker service update --force {s.service(name)} under load",
                                load.snapshot(since=t0 - 2))
    s.figure(f"update --force {name}: completed after {took:.1f} s, every task replaced; "
             f"resent (never processed by the proxy): {summary['resent']}")


def test_rolling_update_of_user_costs_no_call(stack):
    _rolling_update(stack, "user", 300)


def test_rolling_update_of_proxy_costs_no_call(stack):
    """Start-first: the new proxy is healthy before the old one drains (SIGTERM: /ready 503,
    keep-alive connections closed, GOAWAY on HTTP/2). The forwarder sends new connections to the
    ready one; a client resends a call that a GOAWAY or a closing idle connection says the proxy
    never processed, as browsers do."""
    _rolling_update(stack, "proxy", 180)


def test_killed_user_container_is_replaced(stack):
    with s.Load(stack.proxy_port, RATE) as load:
        time.sleep(2)
        names = s.replica_names()
        victim_name, victim = sorted(names.items())[0]
        t_kill = time.monotonic()
        s.docker("kill", victim)
        t_killed = time.monotonic()
        answered = load.wait_for(lambda calls: bool(names_of(calls) - set(names)), 90,
                                 "a call answered by the replacement", since=t_kill)
        back = s.wait_converged({"proxy": 1, "user": USERS, "web": 1}, 90, "after docker kill")
        time.sleep(2)
    calls = load.snapshot()
    failed = [c for c in calls if not c.ok]
    in_flight = [c for c in failed if c.start <= t_killed and c.end >= t_kill]
    s.figure(f"docker kill of User replica {victim_name}: the replacement answers "
             f"{answered - t_kill:.1f} s later ({back:.1f} s to 3/3 healthy); "
             f"{len(failed)} failed calls, of which {len(in_flight)} in flight at the kill")
    s.figure(f"docker kill under load: {s.describe(load.summary(calls))}")
    assert not [c for c in failed if c not in in_flight], failed[:10]
