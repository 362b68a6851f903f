"""The proxy's default number of event loops follows the CPUs it may use: pinned to one CPU
(taskset, a container's cpuset) it runs one loop, not one per machine core time-sharing it."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PROXY_BIN, config, free_port, share, unprivileged, wait_for_port


def event_loops(pid):
    names = [Path(f"/proc/{pid}/task/{t}/comm").read_text().strip() for t in os.listdir(f"/proc/{pid}/task")]
    return sum(1 for n in names if n.startswith("NIO-ELT-"))


def run_and_count(tmp_path, prefix, args=()):
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(config(port, {"users": [free_port()]}, """
              - match: { prefix: "/" }
                route: { cluster: users }"""))
    share(tmp_path)
    proc = subprocess.Popen([*prefix, *unprivileged([PROXY_BIN, "-c", cfg, *args])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        time.sleep(0.2)
        return event_loops(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a machine with two CPUs or more")
def test_one_loop_per_cpu_the_process_may_use(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    assert run_and_count(tmp_path, []) == cpus
    assert run_and_count(tmp_path, ["taskset", "-c", str(min(os.sched_getaffinity(0)))]) == 1
    # --concurrency still says exactly how many.
    assert run_and_count(tmp_path, ["taskset", "-c", str(min(os.sched_getaffinity(0)))], ["--concurrency", "2"]) == 2
