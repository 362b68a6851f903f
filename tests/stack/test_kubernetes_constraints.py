"""deploy/kubernetes under the constraints its manifests set, on this machine's Docker engine: the
proxy and User images run as 10001:10001 with every capability dropped, no privilege escalation, a
read-only root filesystem and the runtime's default seccomp profile (Docker's default is the one
Kubernetes' RuntimeDefault names), with the proxy reading the ConfigMap's envoy.yaml as the pod
mounts it. Three User containers answer to the name `user`, as the headless Service makes them.

What is checked only on paper (tests/deploy/test_deploy_files.py, kubernetes-validate): the
manifests' schema, probes, resources and the Service wiring; no Kubernetes runs here.
"""

import collections
import time

import pytest
import yaml

import stack_support as s

K8S = s.ROOT / "deploy" / "kubernetes"
NETWORK = "grpcwebtest-k8s"


def pod_security(manifest, name):
    """The securityContext of container `name` in a Deployment of `manifest`, merged with its pod's,
    as `docker run` flags."""
    for doc in yaml.safe_load_all((K8S / manifest).read_text()):
        if not doc or doc.get("kind") != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        for c in spec["containers"]:
            if c["name"] != name:
                continue
            pod, own = spec.get("securityContext", {}), c.get("securityContext", {})
            flags = ["--user", f"{pod['runAsUser']}:{pod['runAsGroup']}"]
            assert pod.get("runAsNonRoot") is True and pod["runAsUser"] != 0
            assert own["capabilities"]["drop"] == ["ALL"] and not own["capabilities"].get("add")
            flags += ["--cap-drop", "ALL"]
            assert own["allowPrivilegeEscalation"] is False
            flags += ["--security-opt", "no-new-privileges"]
            if own.get("readOnlyRootFilesystem"):
                flags.append("--read-only")
            assert pod["seccompProfile"]["type"] == "RuntimeDefault"  # Docker's default profile
            return flags, c
    raise AssertionError(f"no container {name} in {manifest}")


def configmap_envoy_yaml():
    for doc in yaml.safe_load_all((K8S / "proxy-config.yaml").read_text()):
        if doc and doc.get("kind") == "ConfigMap":
            return doc["data"]["envoy.yaml"]
    raise AssertionError("no ConfigMap in proxy-config.yaml")


@pytest.fixture
def k8s_like(images, tmp_path):
    started = []
    s.docker("network", "rm", NETWORK, check=False, quiet=True)
    s.docker("network", "create", NETWORK)
    try:
        user_flags, user = pod_security("user.yaml", "user")
        for i in range(3):
            name = f"grpcwebtest-k8s-user-{i}"
            s.docker("rm", "-f", name, check=False, quiet=True)
            s.docker("run", "-d", "--name", name, "--hostname", f"user-{i}", "--network", NETWORK,
                     "--network-alias", "user", *user_flags,
                     # REPLICA: the pod's name, which the manifest takes from the downward API.
                     "-e", f"REPLICA={name}", s.USER_IMAGE, *user["args"])
            started.append(name)
        proxy_flags, proxy = pod_security("proxy.yaml", "proxy")
        config = tmp_path / "envoy.yaml"
        config.write_text(configmap_envoy_yaml())
        config.chmod(0o644)
        tmp_path.chmod(0o755)
        s.docker("rm", "-f", "grpcwebtest-k8s-proxy", check=False, quiet=True)
        s.docker("run", "-d", "--name", "grpcwebtest-k8s-proxy", "--network", NETWORK, *proxy_flags,
                 "-v", f"{tmp_path}:/etc/grpc-web-proxy:ro", "-p", "127.0.0.1::8080",
                 s.PROXY_IMAGE, *proxy["args"])
        started.append("grpcwebtest-k8s-proxy")
        port = int(s.docker("port", "grpcwebtest-k8s-proxy", "8080/tcp").split(":")[-1])
        yield port
    finally:
        for name in started:
            if name.endswith("proxy"):
                print(s.docker("logs", "--tail", "30", name, check=False, quiet=True))
            s.docker("rm", "-f", name, check=False, quiet=True)
        s.docker("network", "rm", NETWORK, check=False, quiet=True)


def test_the_proxy_serves_under_the_kubernetes_constraints(k8s_like):
    port = k8s_like
    deadline = time.monotonic() + 60
    while True:
        call = s.one_call(s.NewConnection(port))
        if call.ok or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert call.ok, f"no login through the proxy run as deploy/kubernetes runs it: {call}"
    transport = s.TRANSPORTS[0](port)
    calls = [s.one_call(transport) for _ in range(60)]
    transport.close()
    counts = collections.Counter(c.replica for c in calls if c.ok)
    failed = [c for c in calls if not c.ok]
    s.figure(f"kubernetes constraints (uid 10001, no capabilities, read-only root, no-new-privileges): "
             f"60 logins, {len(failed)} failed, per replica {dict(sorted(counts.items()))}")
    assert not failed, failed[:5]
    assert len(counts) == 3, counts
