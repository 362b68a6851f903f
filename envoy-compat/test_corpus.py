"""Real-world configs, run by Envoy and by the proxy side by side (see ``corpus.py``).

One test item per config and request, named ``<config file>:<route>:<variant>`` (``r0`` is the first
route of the config; ``l1.`` and ``v1.`` name the listener and virtual host when there are several),
plus ``<config file>:loads``: the file as written, in place, through ``grpc-web-proxy --mode validate``.

* A request where the proxy's observation differs from Envoy's FAILS, unless the difference is one
  of the intended deviations in :data:`DEVIATIONS` (then the proxy's intended behaviour is asserted),
  or it is listed in :data:`KNOWN`: a feature the proxy does not have yet, marked
  ``xfail(strict=True)``. When the feature lands the item passes, strict xfail turns that into a
  failure, and the entry must be removed.
* The corpus is read in place from ``../shared/envoy-corpus/configs``; without it the corpus items
  skip with a message and only our own configs (``configs/own-*.yaml``) run.

``CORPUS.md`` (the per-config matrix) is written at the end of a session that ran every item.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

import corpus
import harness as H
import test_differential as td

SOURCES, MISSING = corpus.sources()
PREPARED = [corpus.prepare(s) for s in SOURCES]
WORKERS = 3

# ---------------------------------------------------------------------------------------------
# Intended deviations the corpus meets (asserted as our behaviour, never as "same").

H2_UPSTREAM = "h2-upstream"
DEVIATIONS = {
    H2_UPSTREAM: (
        "a cluster without any HTTP/2 option: Envoy speaks HTTP/1.1 to it (so every gRPC call through it "
        "fails: here the h2c backend drops the connection and Envoy answers 503); the proxy speaks HTTP/2 "
        "to every cluster (it says so at start-up). Asserted: the proxy behaves exactly like Envoy "
        "running the same config with `http2_protocol_options: {}` added to those clusters."
    ),
    "connect-message": (
        "a connect failure's grpc-message: only the prefix 'upstream connect error or disconnect/reset "
        "before headers' is compared (as in CONFORMANCE.md, cases 41, 42, 57)."
    ),
}

# ---------------------------------------------------------------------------------------------
# Known differences: features the proxy does not have yet. (config, item pattern) -> reason.
# The pattern is matched (fnmatch) against "<route>:<variant>", or "loads" for the load check.
# Each entry is an xfail(strict=True): when the feature lands, the item passes, the run fails, and
# the entry must go.

_LOCAL_RATELIMIT = ("local_ratelimit is not supported (the proxy skips the filter with a start-up warning): "
                    "Envoy's per-route bucket (1 call per 60 s) answers 429 'local_rate_limited'")

KNOWN: dict[tuple[str, str], str] = {
    ("35-fonoster-fonoster-tls.yaml", "r1:h2-text"): _LOCAL_RATELIMIT,
}


def _known(name: str, rid: str) -> str | None:
    for (cfg, pat), reason in KNOWN.items():
        if cfg == name and fnmatch.fnmatchcase(rid, pat):
            return reason
    return None


def _items():
    out = []
    for prep in PREPARED:
        name = prep.source.name
        reason = _known(name, "loads")
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(prep, None, reason, id=f"{name}:loads", marks=marks))
        for req in prep.requests:
            reason = _known(name, req.rid)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(prep, req, reason, id=f"{name}:{req.rid}", marks=marks))
    if MISSING:
        out.append(pytest.param(None, None, None, id="corpus-missing"))
    return out


ITEMS = _items()


@pytest.fixture(scope="session")
def corpus_runner(request, backend, tmp_path_factory):
    try:
        out = subprocess.run([H.envoy_binary() or "envoy", "--version"], capture_output=True, text=True,
                             timeout=20).stdout
        corpus.SESSION["envoy"] = out.strip().split("version:")[-1].strip()
    except Exception as e:  # pragma: no cover - informational
        corpus.SESSION["envoy"] = f"unknown ({e})"
    binary = H.proxy_binary()
    try:
        corpus.SESSION["proxy"] = str(Path(binary).resolve().relative_to(corpus.REPO))
    except ValueError:
        corpus.SESSION["proxy"] = str(binary)
    corpus.SESSION["corpus"] = str(corpus.CORPUS_DIR) if not MISSING else MISSING
    runner = corpus.Runner(backend, tmp_path_factory.mktemp("corpus"), workers=WORKERS)
    # Queue the selected work in test order, so the pool stays ahead of the tests.
    for it in request.session.items:
        if it.originalname == "test_corpus" and hasattr(it, "callspec"):
            prep, req = it.callspec.params.get("prep"), it.callspec.params.get("req")
            if prep is not None:
                if req is None:
                    runner.submit_validate(prep)
                else:
                    runner.submit(prep)
    yield runner
    runner.shutdown()


def _proxy_available():
    if not H.proxy_binary().exists():
        pytest.skip(f"proxy binary not found at {H.proxy_binary()} (build it with `swift build` or set PROXY_BIN)")


V1_MESSAGE = re.compile(r"(?P<file>[^\s:]+\.ya?ml):(?P<line>\d+): (?P<rest>.*)")


def _first_error(out: str) -> str:
    return next((ln for ln in out.splitlines() if ln.startswith("error")), out.strip()[-300:])


def _certificate_not_here(output: str) -> bool:
    error = _first_error(output)
    return ("transport_socket" in error or "tls_context" in error) and "cannot read" in error


def _check_loads(prep: corpus.Prepared, runner: corpus.Runner, known: str | None):
    name = prep.source.name
    v = runner.validate_result(prep)
    loads = "yes" if v.proxy_rc == 0 else f"refuses: {_first_error(v.proxy_out)[:200]}"
    if v.env:
        loads += f" (with {', '.join(f'{k}={x}' for k, x in v.env.items())} set)"
    corpus.record(
        name, loads=loads,
        **{"envoy-loads": "yes" if v.envoy_rc == 0 else "refuses: " + corpus._envoy_error(v.envoy_out.splitlines())},
    )
    if prep.v1:
        # The pre-v2 (v1) API: the proxy must refuse it, naming the file, the line and the YAML
        # path; Envoy 1.40 refuses it too.
        assert v.proxy_rc == 1, f"the proxy accepted a v1 (pre-v2) config: {v.proxy_out}"
        m = V1_MESSAGE.search(v.proxy_out)
        assert m and Path(m["file"]).name == name, f"the refusal does not name the file and line: {v.proxy_out!r}"
        assert "listeners" in m["rest"] or "cluster_manager" in m["rest"], (
            f"the refusal does not name the YAML path: {v.proxy_out!r}")
        assert v.envoy_rc != 0, "Envoy 1.40 accepted a v1 config?"
        corpus.record(name, runs="not run: the v1 API, refused by both (as required)")
        return
    if v.env:
        # A template: without its variables the proxy must refuse it and name the placeholder.
        bare = _first_error(v.proxy_out_bare)
        corpus.record(name, **{"template": f"without the variables: {bare[:240]}"})
        assert v.proxy_rc_bare == 1, f"the proxy accepted {name} with its $VAR placeholders unset"
        assert name in bare and any(var in bare for var in v.env), (
            f"the refusal of the unrendered template does not name the file and the placeholder: {bare!r}")
    if v.proxy_rc != 0 and _certificate_not_here(v.proxy_out):
        # Its certificates live in its own repository: both refuse it as written, naming the file;
        # the side-by-side run uses the copy with TLS left out.
        assert v.envoy_rc != 0, f"Envoy loads {name} without its certificate files?"
        corpus.record(name, loads="refuses as written, as Envoy does: " + _first_error(v.proxy_out)[:200])
        return
    if v.proxy_rc != 0:
        pytest.fail(f"the proxy refuses {name} as written: {_first_error(v.proxy_out)}", pytrace=False)
    # Real-world oddities Envoy refuses or silently resolves: accepted, with a warning that says so.
    warnings = [ln for ln in v.proxy_out.splitlines() if "warning" in ln]
    for key, _line in prep.duplicates:
        assert any("duplicate key" in w and repr(key) in w and name in w for w in warnings), (
            f"no start-up warning names the duplicate key {key!r}: {warnings}")
    if prep.filters_mappings:
        assert any("'filters'" in w and "mapping" in w and name in w for w in warnings), (
            f"no start-up warning about 'filters' written as a mapping: {warnings}")


def _check_request(prep: corpus.Prepared, req: corpus.Request, runner: corpus.Runner, known: str | None):
    name = prep.source.name
    res = runner.result(prep)
    env, prx = res.impls["envoy"], res.impls["proxy"]
    corpus.record(
        name,
        adaptations=res.adaptations,
        translation=res.envoy_translation,
        **{"envoy-as-is": res.envoy_as_is},
        routes=prep.routes,
        runs=("both" if not env.error and not prx.error else
              "; ".join(f"{i.name}: {i.error[:300]}" for i in (env, prx) if i.error)),
    )

    def verdict(v: str, detail: str = ""):
        if known and not v.startswith(("same", "deviation")):
            v = "known"  # the reason is in the "Known differences" list
        corpus.record_variant(name, req.rid, v, detail)

    if env.error:
        verdict("error", f"Envoy did not run the rewritten config: {env.error[:300]}")
        pytest.fail(f"Envoy did not run the rewritten config (a harness problem): {env.error}", pytrace=False)
    if prx.error:
        verdict("differs", f"the proxy did not run: {prx.error[:300]}")
        pytest.fail(f"the proxy did not run {name}: {prx.error}", pytrace=False)
    e, p = env.obs[req.rid], prx.obs[req.rid]
    diffs = td._diff(e, p)
    if diffs and "envoy-h2" in res.impls:
        # The config has clusters without HTTP/2: the reference for the proxy is Envoy with HTTP/2
        # on those clusters (DEVIATIONS[H2_UPSTREAM]).
        eh2 = res.impls["envoy-h2"]
        ref = eh2.obs.get(req.rid)
        if eh2.error or ref is None:
            verdict("error", f"Envoy with HTTP/2 clusters did not run: {eh2.error}")
            pytest.fail(f"Envoy with HTTP/2 clusters did not run: {eh2.error}", pytrace=False)
        d2 = td._diff(ref, p)
        if not d2:
            text = "; ".join(td._fmt_diff(k, a, b) for k, (a, b) in diffs.items())
            verdict(f"deviation ({H2_UPSTREAM})", f"Envoy as written: {text[:300]}")
            return
        diffs = d2
        note = " (compared with Envoy running the clusters over HTTP/2)"
    else:
        note = ""
    if diffs:
        text = "; ".join(td._fmt_diff(k, a, b) for k, (a, b) in diffs.items())
        verdict("differs", text[:600])
        pytest.fail(f"{name} {req.rid}: {req.method} {req.path} (:authority {req.authority}): proxy differs "
                    f"from Envoy{note}: {text}", pytrace=False)
    info = td._diff(e, p, informational=True)
    full = info.pop("_grpc-message-full", None)
    if full:
        verdict("deviation (connect-message)", f"envoy: {full[0]!r}; proxy: {full[1]!r}")
    else:
        verdict("same")


@pytest.mark.parametrize("prep,req,known", ITEMS, ids=[p.id for p in ITEMS])
def test_corpus(prep, req, known, request):
    if prep is None:
        pytest.skip(MISSING)
    _proxy_available()
    runner = request.getfixturevalue("corpus_runner")
    if req is None:
        _check_loads(prep, runner, known)
    else:
        _check_request(prep, req, runner, known)
