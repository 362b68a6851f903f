"""The README's first command, `scripts/run`, as a newcomer types it: it checks for the one
system library the build links (nghttp2's headers), builds, and starts the proxy. Here it prints
the embedded default instead of serving, so the test needs no port."""

import subprocess

from conftest import ROOT


def test_scripts_run_builds_and_starts_the_proxy():
    out = subprocess.run([str(ROOT / "scripts" / "run"), "--print-default-config"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "static_resources" in out.stdout and "envoy.filters.http.grpc_web" in out.stdout, out.stdout[:2000]


def test_system_deps_finds_nghttp2_when_it_is_there():
    # scripts/test has run it already, so the headers are there and it must not try apt-get.
    out = subprocess.run([str(ROOT / "scripts" / "system-deps")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "", (out.returncode, out.stdout, out.stderr)
