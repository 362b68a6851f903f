"""Waiting for the processes the tests start, shared by every test folder."""

import os
import socket
import time
from pathlib import Path


_given_ports = set()


def free_port():
    """A port free now and not handed out before in this run: the kernel may offer the port it
    just released again, and two ports of one test (a listener and its admin) must differ."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _given_ports:
            _given_ports.add(port)
            return port


def wait_for_port(port, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


def wait_until(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# The proxy's users run it as an ordinary user with no capabilities: the images as uid 10001,
# Kubernetes with every capability dropped. Tests run as root on CI machines, and root can do
# things (SO_DEBUG, binding low ports, reading any file) that a user cannot, which once hid a
# socket option that failed every connection for everyone else. So every proxy and User service
# the tests start runs as `nobody` with an empty capability set and no way to regain one, unless
# a test says why it needs root (pass privileged=True).
UNPRIVILEGED_UID = 65534
_SETPRIV = ["setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def unprivileged(argv, privileged=False):
    """argv to run as an unprivileged user: unchanged when the tests already run as one."""
    argv = [str(a) for a in argv]
    if privileged or os.geteuid() != 0:
        return argv
    return [*_SETPRIV, *argv]


def share(path, writable=False):
    """Lets the unprivileged processes read `path` (a file or a folder, with what is in it), and
    create files in it when `writable` (a unix socket, say). Temporary folders are private to
    root by default (tempfile, pytest's tmp_path), and so are the folders above pytest's."""
    path = Path(path)
    if os.geteuid() != 0:
        return path
    if path.is_dir():
        os.chmod(path, 0o1777 if writable else 0o755)
        for child in path.rglob("*"):
            os.chmod(child, 0o755 if child.is_dir() else 0o644)
    else:
        os.chmod(path, 0o644)
    # Every folder above it needs search permission for others.
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, (mode & 0o7777) | 0o011)
    return path


def process_identity(pid):
    """(uid, effective capabilities, bounding set) of a running process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return int(fields["Uid"][1]), int(fields["CapEff"][0], 16), int(fields["CapBnd"][0], 16)


def assert_unprivileged(pid, what="process"):
    uid, cap_eff, cap_bnd = process_identity(pid)
    assert uid != 0 and cap_eff == 0 and cap_bnd == 0, (
        f"{what} (pid {pid}) runs as uid {uid} with capabilities {cap_eff:#x} (bounding {cap_bnd:#x}): "
        "the tests must run it as its users do, unprivileged")
