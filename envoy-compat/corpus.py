"""Real-world envoy.yaml files run side by side by Envoy and the proxy (the corpus half of the suite).

The configs come from two places:

* the corpus, read IN PLACE from ``../shared/envoy-corpus/configs`` (``ENVOY_CORPUS_DIR`` overrides it).
  Its files are never copied into this repository: their licences vary. When the directory is absent
  the corpus tests skip with a message.
* our own configs in ``envoy-compat/configs/`` (``own-*.yaml``), written for this suite to cover
  route features the corpus does not use (weighted clusters, ``cluster_header``, ``regex_rewrite``,
  ``retry_policy``, ``query_parameters``).

Each config is loaded with PyYAML and rewritten in memory, and the result is written to a temporary
directory (never into the repository):

* every listener -> 127.0.0.1 and a free port (one set for Envoy, one for the proxy; listeners that
  share an address in the file keep sharing one), ``admin`` -> a free loopback port, admin access
  logs -> /dev/null;
* every cluster endpoint (``load_assignment``, the legacy ``hosts``, unix ``pipe``) -> the suite's
  loopback backend (``backend.py``, which answers any path: ``/<anything>/Echo`` echoes the request;
  cluster i gets backend port i, so the echo names the cluster), a ``pipe`` -> the same backend on a
  unix socket; DNS cluster types are kept;
* TLS (``transport_socket``/``tls_context`` on listeners and clusters, static ``secrets``) is removed
  for the run ("TLS removed for the run" in the matrix);
* ``$var`` placeholders are filled.

The proxy runs that copy as it stands (v2 forms and all: it reads them). Envoy 1.40 refuses the v2
forms, so Envoy runs a v3 translation of the same copy (``config:`` -> ``typed_config``, ``hosts`` ->
``load_assignment``, ``allow_origin`` -> ``allow_origin_string_match``, ...); every change is listed
in the matrix. Requests are derived from each config's routes (see :func:`derive`), sent to both, and
compared with the observation logic of ``test_differential.py``.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import datetime
import itertools
import os
import random
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml

import backend as B
import client as C
import harness as H
import test_differential as td

try:  # Python 3.11+
    import re._parser as sre_parse  # type: ignore[import-not-found]
    import re._constants as sre_c  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    import sre_constants as sre_c  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CORPUS_DIR = Path(os.environ.get("ENVOY_CORPUS_DIR") or (REPO.parent / "shared" / "envoy-corpus" / "configs"))
OWN_DIR = HERE / "configs"
OUTPUT = HERE / "CORPUS.md"

REQUEST_TIMEOUT = 4.0
ECHO = "Echo"

HCM_V3 = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
HCM_V2 = "type.googleapis.com/envoy.config.filter.network.http_connection_manager.v2.HttpConnectionManager"
HTTP_FILTER_TYPES = {
    "grpc_web": "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb",
    "cors": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors",
    "router": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
}
# HTTP filters that call out to a server of their own: dropped from Envoy's copy (the proxy skips them).
EXTERNAL_FILTERS = ("ext_proc", "ext_authz")

BIN_CT = td.BIN_CT
TEXT_CT = td.TEXT_CT
GENERIC_ORIGIN = "http://client.example"
OTHER_ORIGINS = ("http://disallowed.invalid", "https://other.example.org", "null")
PREFLIGHT_HEADERS = "content-type,x-grpc-web,x-user-agent"

VARIANTS = ("h1-bin", "h1-text", "h2-bin", "h2-text", "preflight", "preflight-denied",
            "cors-allowed", "cors-denied")


# =========================================================================== loading


@dataclasses.dataclass
class Source:
    name: str  # the file name: the pytest id
    path: Path
    kind: str  # "corpus" or "own"


def sources() -> tuple[list[Source], str | None]:
    """Every config to run, and a message when the corpus is absent."""
    out: list[Source] = []
    missing = None
    if CORPUS_DIR.is_dir():
        out += [Source(p.name, p, "corpus") for p in sorted(CORPUS_DIR.glob("*.yaml"))]
    else:
        missing = (f"corpus not found at {CORPUS_DIR} (expected ../shared/envoy-corpus next to the "
                   "repository, or set ENVOY_CORPUS_DIR): corpus configs skipped")
    if OWN_DIR.is_dir():
        out += [Source(p.name, p, "own") for p in sorted(OWN_DIR.glob("*.yaml"))]
    return out, missing


def duplicate_keys(text: str) -> list[tuple[str, int]]:
    """Keys repeated in one mapping (PyYAML keeps the last one, as the proxy does)."""
    dups: list[tuple[str, int]] = []

    def walk(node):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        dups.append((k.value, k.start_mark.line + 1))
                    seen.add(k.value)
                walk(v)
        elif isinstance(node, yaml.SequenceNode):
            for v in node.value:
                walk(v)

    for doc in yaml.compose_all(text, Loader=yaml.SafeLoader):
        walk(doc)
    return dups


PLACEHOLDER_RE = re.compile(r"^\$\{?\w+\}?$|^<\w+>$")


def _walk(obj, fn, path=""):
    """Call fn(container, key, value, path) on every mapping entry and list item."""
    if isinstance(obj, dict):
        for k in list(obj):
            fn(obj, k, obj[k], f"{path}.{k}" if path else str(k))
            if k in obj:
                _walk(obj[k], fn, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            fn(obj, i, v, f"{path}[{i}]")
            _walk(v, fn, f"{path}[{i}]")


def placeholders(data) -> list[str]:
    found: list[str] = []

    def fn(c, k, v, p):
        if isinstance(v, str) and PLACEHOLDER_RE.match(v.strip()):
            found.append(f"{p}: {v}")

    _walk(data, fn)
    return found


def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, list):
        return x
    return [x]  # a mapping written where a list belongs (corpus 28): read as a one-item list


def listeners_of(data) -> list[dict]:
    sr = data.get("static_resources") if isinstance(data, dict) else None
    if not isinstance(sr, dict):
        return []
    return [x for x in _as_list(sr.get("listeners")) if isinstance(x, dict)]


def clusters_of(data) -> list[dict]:
    sr = data.get("static_resources") if isinstance(data, dict) else None
    if not isinstance(sr, dict):
        return []
    return [x for x in _as_list(sr.get("clusters")) if isinstance(x, dict)]


def _is_hcm(nf: dict) -> bool:
    return isinstance(nf, dict) and str(nf.get("name", "")).endswith("http_connection_manager")


def hcm_of(listener: dict) -> dict | None:
    for fc in _as_list(listener.get("filter_chains")):
        if not isinstance(fc, dict):
            continue
        for nf in _as_list(fc.get("filters")):
            if _is_hcm(nf):
                cfg = nf.get("typed_config") if isinstance(nf.get("typed_config"), dict) else nf.get("config")
                if isinstance(cfg, dict):
                    return cfg
    return None


def cluster_speaks_h2(c: dict) -> bool:
    if "http2_protocol_options" in c or c.get("features") == "http2":
        return True
    for v in (c.get("typed_extension_protocol_options") or {}).values():
        if isinstance(v, dict):
            explicit = v.get("explicit_http_config") or {}
            if "http2_protocol_options" in explicit:
                return True
    return False


# =========================================================================== rewriting


class PortPool:
    """Free loopback ports, never the same one twice in a session."""

    def __init__(self):
        self._lock = threading.Lock()
        self._given: set[int] = set()
        # Below the kernel's ephemeral range: the thousands of client and upstream connections of a
        # run take their local ports from that range, and one of them could take a port picked here.
        low = 32768
        try:
            low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        self._range = (10000, max(10000 + 2000, low - 1))

    def get(self) -> int:
        with self._lock:
            for _ in range(200):
                p = random.randint(*self._range)
                if p in self._given:
                    continue
                with socket.socket() as sk:
                    try:
                        sk.bind(("127.0.0.1", p))
                    except OSError:
                        continue
                self._given.add(p)
                return p
            raise RuntimeError("no free port")


PORTS = PortPool()


@dataclasses.dataclass
class Rewritten:
    data: dict
    listener_ports: list[int | None]  # per listener index (None: not rewritable, v1 string address)
    admin_port: int | None


def rewrite(data: dict, backend_ports: list[int], unix_path: str, closed_port: int,
            notes: list[str] | None) -> Rewritten:
    """The loopback copy shared by Envoy and the proxy (ports differ): addresses, TLS, placeholders.
    Cluster i gets backend_ports[i] (the backend listens on all of them, so an echo tells which
    cluster a call went to)."""
    data = copy.deepcopy(data)
    note = (lambda s: notes.append(s) if s not in notes else None) if notes is not None else (lambda s: None)
    port_map: dict[tuple, tuple] = {}  # (address, port) in the file -> (new port, first listener)
    ports: list[int | None] = []
    tls_places: list[str] = []
    for i, L in enumerate(listeners_of(data)):
        sa = (L.get("address") or {}).get("socket_address") if isinstance(L.get("address"), dict) else None
        if not isinstance(sa, dict):
            ports.append(None)
            continue
        key = (str(sa.get("address")), str(sa.get("port_value")))
        if key in port_map:
            note(f"listener {L.get('name', i)!r} has the address of listener {port_map[key][1]!r} "
                 "in the file: they keep sharing one port")
        else:
            port_map[key] = (PORTS.get(), L.get("name", i))
        port = port_map[key][0]
        orig = sa.get("port_value")
        sa["address"] = "127.0.0.1"
        sa["port_value"] = str(port) if isinstance(orig, str) and not orig.startswith("$") else port
        ports.append(port)
        for j, fc in enumerate(_as_list(L.get("filter_chains"))):
            if isinstance(fc, dict):
                for k in ("transport_socket", "tls_context"):
                    if k in fc:
                        fc.pop(k)
                        tls_places.append(f"listener {L.get('name', i)} ({k})")

    # Clusters used only by filters (ext_proc's grpc_service, ...) get a closed port: the run has no
    # such server, so the filter fails fast and deterministically.
    filter_clusters = _filter_only_clusters(data)
    for ci, c in enumerate(clusters_of(data)):
        name = c.get("name")
        target_port = closed_port if name in filter_clusters else backend_ports[ci % len(backend_ports)]
        if name in filter_clusters:
            note(f"cluster {name!r} (used by a filter, not a route) points at a closed port: no such server in the run")

        def fix_address(addr):
            if not isinstance(addr, dict):
                return
            if isinstance(addr.get("socket_address"), dict):
                sa = addr["socket_address"]
                orig = sa.get("port_value")
                sa["address"] = "127.0.0.1"
                sa["port_value"] = (str(target_port) if isinstance(orig, str) and not orig.startswith("$")
                                    else target_port)
            elif isinstance(addr.get("pipe"), dict):
                addr["pipe"] = {"path": unix_path}
                note("unix pipe endpoint -> the backend on a unix socket")

        la = c.get("load_assignment")
        if isinstance(la, dict):
            for ep in _as_list(la.get("endpoints")):
                for lbe in _as_list((ep or {}).get("lb_endpoints")):
                    fix_address(((lbe or {}).get("endpoint") or {}).get("address"))
        for h in _as_list(c.get("hosts")):
            fix_address(h)
        for k in ("transport_socket", "tls_context", "transport_socket_matches"):
            if k in c:
                c.pop(k)
                tls_places.append(f"cluster {name} ({k})")
    sr = data.get("static_resources")
    if isinstance(sr, dict) and "secrets" in sr:
        sr.pop("secrets")
        tls_places.append("static secrets")
    if tls_places:
        note("TLS removed for the run: " + ", ".join(tls_places))

    admin_port = None
    admin = data.get("admin")
    if isinstance(admin, dict):
        if "access_log_path" in admin:
            admin["access_log_path"] = "/dev/null"
        for al in _as_list(admin.get("access_log")):
            tc = (al or {}).get("typed_config")
            if isinstance(tc, dict) and "path" in tc:
                tc["path"] = "/dev/null"
        addr = admin.get("address")
        if isinstance(addr, dict) and isinstance(addr.get("socket_address"), dict):
            admin_port = PORTS.get()
            orig = addr["socket_address"].get("port_value")
            addr["socket_address"]["address"] = "127.0.0.1"
            addr["socket_address"]["port_value"] = str(admin_port) if isinstance(orig, str) else admin_port
            note("admin -> a free loopback port")
    ph = placeholders(data)
    if ph:
        note("placeholders left unfilled: " + ", ".join(ph))
    return Rewritten(data, ports, admin_port)


def _filter_only_clusters(data) -> set[str]:
    routed: set[str] = set()
    in_filters: set[str] = set()

    def fn(c, k, v, p):
        if k == "cluster" and isinstance(v, str):
            routed.add(v)
        if k == "weighted_clusters" and isinstance(v, dict):
            routed.update(x.get("name") for x in _as_list(v.get("clusters")) if isinstance(x, dict))
        if k == "cluster_name" and isinstance(v, str) and "http_filters" in p:
            in_filters.add(v)

    for L in listeners_of(data):
        _walk(L, fn)
    if any("cluster_header" in str(L) for L in listeners_of(data)):
        return set()
    return in_filters - routed


def _duration(v):
    if isinstance(v, dict) and v and set(v) <= {"seconds", "nanos"}:
        s = int(v.get("seconds", 0))
        n = int(v.get("nanos", 0))
        return f"{s}.{n:09d}s" if n else f"{s}s"
    return v


def _http_filter_base(name: str) -> str | None:
    n = name
    for pre in ("envoy.filters.http.", "envoy."):
        if n.startswith(pre):
            n = n[len(pre):]
            break
    return n if n in HTTP_FILTER_TYPES else None


def _v3_cors(policy: dict, where: str, note) -> None:
    """v2 CORS fields -> their v3 forms, in place."""
    matchers = list(policy.get("allow_origin_string_match") or [])
    if "allow_origin" in policy:
        matchers += [{"exact": str(o)} for o in _as_list(policy.pop("allow_origin"))]
        note(f"{where}: allow_origin -> allow_origin_string_match exact")
    if "allow_origin_regex" in policy:
        matchers += [{"safe_regex": {"regex": str(o)}} for o in _as_list(policy.pop("allow_origin_regex"))]
        note(f"{where}: allow_origin_regex -> allow_origin_string_match safe_regex")
    if matchers:
        policy["allow_origin_string_match"] = matchers
    for m in matchers:
        sr = m.get("safe_regex") if isinstance(m, dict) else None
        if isinstance(sr, dict) and "google_re2" in sr:
            sr.pop("google_re2")
    if "enabled" in policy:
        enabled = policy.pop("enabled")
        note(f"{where}: enabled -> filter_enabled")
        if not enabled:
            policy["filter_enabled"] = {"default_value": {"numerator": 0, "denominator": "HUNDRED"}}
    for k in ("default_value", "runtime_key"):
        if k in policy:
            policy.pop(k)
            note(f"{where}: misplaced cors.{k} dropped (Envoy refuses it; the proxy ignores it with a warning)")


def envoy_copy(data: dict, notes: list[str]) -> dict:
    """The v3 translation Envoy 1.40 accepts, of the rewritten copy. Every change is noted."""
    data = copy.deepcopy(data)
    note = lambda s: notes.append(s) if s not in notes else None  # noqa: E731
    for i, L in enumerate(listeners_of(data)):
        for fc in _as_list(L.get("filter_chains")):
            if not isinstance(fc, dict):
                continue
            if isinstance(fc.get("filters"), dict):
                fc["filters"] = [fc["filters"]]
                note("filter_chains[].filters written as a mapping -> a one-item list for Envoy")
            for nf in _as_list(fc.get("filters")):
                if not _is_hcm(nf):
                    continue
                if "config" in nf:
                    nf["typed_config"] = {"@type": HCM_V3, **(nf.pop("config") or {})}
                    note("v2 HCM `config:` -> v3 typed_config")
                tc = nf.get("typed_config") or {}
                if tc.get("@type") == HCM_V2:
                    tc["@type"] = HCM_V3
                    note("v2 HCM @type -> v3")
                _v3_hcm(tc, note)
    for c in clusters_of(data):
        if "hosts" in c:
            hosts = _as_list(c.pop("hosts"))
            c["load_assignment"] = {
                "cluster_name": c.get("name"),
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": h}} for h in hosts]}],
            }
            note("cluster hosts -> load_assignment")

    def fix_durations(cont, k, v, p):
        nv = _duration(v)
        if nv is not v:
            cont[k] = nv
            note(f"duration object at {p} -> string")

    _walk(data, fix_durations)
    return data


def _v3_hcm(hcm: dict, note) -> None:
    if "access_log" in hcm:
        if any(isinstance(a, dict) and "config" in a for a in _as_list(hcm["access_log"])):
            hcm.pop("access_log")
            note("v2 access_log dropped for Envoy")
    filters = []
    for hf in _as_list(hcm.get("http_filters")):
        if not isinstance(hf, dict):
            continue
        name = str(hf.get("name", ""))
        base = _http_filter_base(name)
        if base and "typed_config" not in hf:
            hf = {"name": name, "typed_config": {"@type": HTTP_FILTER_TYPES[base]}}
            note(f"http filter {name!r}: typed_config added for Envoy")
        elif not base and "typed_config" not in hf:
            note(f"http filter {name!r} (v2 `config:`, not a grpc-web filter) dropped for Envoy; the proxy skips it")
            continue
        elif any(x in name or x in str((hf.get("typed_config") or {}).get("@type", ""))
                 for x in EXTERNAL_FILTERS):
            note(f"http filter {name!r} dropped for Envoy: it needs its own server, which the run does not "
                 "have (Envoy would fail every call closed); the proxy skips the filter with a start-up warning")
            continue
        filters.append(hf)
    if "http_filters" in hcm:
        hcm["http_filters"] = filters
    rc = hcm.get("route_config") or {}
    for vh in _as_list(rc.get("virtual_hosts")):
        if not isinstance(vh, dict):
            continue
        if isinstance(vh.get("cors"), dict):
            _v3_cors(vh["cors"], f"vhost {vh.get('name')} cors", note)
        for k, pfc in (vh.get("typed_per_filter_config") or {}).items():
            if isinstance(pfc, dict) and "cors" in str(pfc.get("@type", "")).lower():
                _v3_cors(pfc, f"vhost {vh.get('name')} typed_per_filter_config", note)
        for r in _as_list(vh.get("routes")):
            if not isinstance(r, dict):
                continue
            ra = r.get("route")
            if isinstance(ra, dict) and isinstance(ra.get("cors"), dict):
                _v3_cors(ra["cors"], "route cors", note)
            for k, pfc in (r.get("typed_per_filter_config") or {}).items():
                if isinstance(pfc, dict) and "cors" in str(pfc.get("@type", "")).lower():
                    _v3_cors(pfc, "route typed_per_filter_config", note)
            m = r.get("match") or {}
            sr = m.get("safe_regex")
            if isinstance(sr, dict) and "google_re2" in sr:
                sr.pop("google_re2")
            for hm in _as_list(m.get("headers")):
                sr = (hm or {}).get("safe_regex_match")
                if isinstance(sr, dict) and "google_re2" in sr:
                    sr.pop("google_re2")


def add_h2(data: dict, names: set[str]) -> dict:
    """A copy where the named clusters speak HTTP/2 (what the proxy does with every cluster)."""
    data = copy.deepcopy(data)
    for c in clusters_of(data):
        if c.get("name") in names:
            c["http2_protocol_options"] = {}
    return data


# =========================================================================== request derivation


def _sample_regex(regex: str, fill: str) -> str | None:
    """One string the regex matches; `.*`/`.+`-like repeats are filled with `fill`."""
    try:
        parsed = sre_parse.parse(regex)
    except Exception:
        return None

    def first_char(items) -> str:
        negate = False
        for op, av in items:
            if op is sre_c.NEGATE:
                negate = True
        if negate:
            banned = set()
            for op, av in items:
                if op is sre_c.LITERAL:
                    banned.add(chr(av))
            for ch in "xyzab":
                if ch not in banned:
                    return ch
            return "q"
        for op, av in items:
            if op is sre_c.LITERAL:
                return chr(av)
            if op is sre_c.RANGE:
                return chr(av[0])
            if op is sre_c.CATEGORY:
                return {"CATEGORY_DIGIT": "0", "CATEGORY_SPACE": " "}.get(str(av), "a")
        return "x"

    def gen(items) -> str:
        out = []
        for op, av in items:
            if op is sre_c.LITERAL:
                out.append(chr(av))
            elif op is sre_c.NOT_LITERAL:
                out.append("x" if chr(av) != "x" else "y")
            elif op is sre_c.ANY:
                out.append("x")
            elif op is sre_c.IN:
                out.append(first_char(av))
            elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT) or str(op) == "POSSESSIVE_REPEAT":
                lo, hi, item = av
                if len(item) == 1 and item[0][0] in (sre_c.ANY,) and fill:
                    out.append(fill)
                else:
                    out.append(gen(item) * max(lo, 0))
            elif op is sre_c.SUBPATTERN:
                out.append(gen(av[-1]))
            elif op is sre_c.BRANCH:
                out.append(gen(av[1][0]))
            elif op is sre_c.CATEGORY:
                out.append("a")
            # AT (anchors), GROUPREF, assertions: nothing
        return "".join(out)

    try:
        return gen(parsed)
    except Exception:
        return None


def regex_candidates(regex: str, extra: tuple[str, ...] = ()) -> list[str]:
    cands = list(extra)
    for fill in ("Test/" + ECHO, "corpus.Test/" + ECHO, "/corpus.Test/" + ECHO, ""):
        s = _sample_regex(regex, fill)
        if s is not None:
            cands.append(s)
    return cands


def regex_full(regex: str, s: str) -> bool:
    try:
        return re.fullmatch(regex, s) is not None
    except re.error:
        return False


def _string_match(m: dict, value: str | None) -> bool:
    """Envoy's StringMatcher (and the v2 header matcher forms) against a value."""
    if value is None:
        return False
    ic = bool(m.get("ignore_case"))
    v = value.lower() if ic else value
    f = (lambda s: str(s).lower()) if ic else str
    if "exact" in m:
        return v == f(m["exact"])
    if "prefix" in m:
        return v.startswith(f(m["prefix"]))
    if "suffix" in m:
        return v.endswith(f(m["suffix"]))
    if "contains" in m:
        return f(m["contains"]) in v
    if "safe_regex" in m:
        return regex_full((m["safe_regex"] or {}).get("regex", ""), value)
    return False


def header_matcher_ok(hm: dict, headers: dict[str, str]) -> bool:
    name = str(hm.get("name", "")).lower()
    val = headers.get(name)
    if "present_match" in hm:
        ok = (val is not None) == bool(hm["present_match"])
    elif "exact_match" in hm:
        ok = val == str(hm["exact_match"])
    elif "prefix_match" in hm:
        ok = val is not None and val.startswith(str(hm["prefix_match"]))
    elif "suffix_match" in hm:
        ok = val is not None and val.endswith(str(hm["suffix_match"]))
    elif "contains_match" in hm:
        ok = val is not None and str(hm["contains_match"]) in val
    elif "safe_regex_match" in hm:
        ok = val is not None and regex_full((hm["safe_regex_match"] or {}).get("regex", ""), val)
    elif "string_match" in hm:
        ok = _string_match(hm["string_match"] or {}, val)
    else:
        ok = val is not None
    return ok != bool(hm.get("invert_match"))


def satisfy_header(hm: dict) -> str | None:
    """A value that satisfies a header matcher (None: leave the header out)."""
    if hm.get("invert_match"):
        return None
    if "present_match" in hm:
        return "1" if hm["present_match"] else None
    if "exact_match" in hm:
        return str(hm["exact_match"])
    if "prefix_match" in hm:
        return str(hm["prefix_match"]) + "x"
    if "suffix_match" in hm:
        return "x" + str(hm["suffix_match"])
    if "contains_match" in hm:
        return "x" + str(hm["contains_match"]) + "x"
    if "safe_regex_match" in hm:
        rx = (hm["safe_regex_match"] or {}).get("regex", "")
        for c in regex_candidates(rx):
            if regex_full(rx, c):
                return c
        return None
    if "string_match" in hm:
        sm = hm["string_match"] or {}
        for c in _string_candidates(sm):
            if _string_match(sm, c):
                return c
    return "1"


def _string_candidates(sm: dict, base: str = "x") -> list[str]:
    if "exact" in sm:
        return [str(sm["exact"])]
    if "prefix" in sm:
        return [str(sm["prefix"]) + base]
    if "suffix" in sm:
        return [base + str(sm["suffix"])]
    if "contains" in sm:
        return [base + str(sm["contains"]) + base]
    if "safe_regex" in sm:
        return regex_candidates((sm["safe_regex"] or {}).get("regex", ""))
    return []


def path_matches(match: dict, path: str) -> bool:
    pth = path.split("?", 1)[0]
    cs = match.get("case_sensitive", True)
    f = (lambda s: s) if cs in (True, None) else (lambda s: s.lower())
    if "prefix" in match:
        return f(pth).startswith(f(str(match["prefix"])))
    if "path" in match:
        return f(pth) == f(str(match["path"]))
    if "safe_regex" in match:
        return regex_full((match["safe_regex"] or {}).get("regex", ""), pth)
    if "regex" in match:
        return regex_full(str(match["regex"]), pth)
    if "path_separated_prefix" in match:
        p = str(match["path_separated_prefix"])
        return pth == p or pth.startswith(p + "/")
    return False


def query_matches(match: dict, path: str) -> bool:
    qs = path.split("?", 1)[1] if "?" in path else ""
    params = {}
    for part in qs.split("&"):
        if part:
            k, _, v = part.partition("=")
            params.setdefault(k, v)
    for qm in _as_list(match.get("query_parameters")):
        name = qm.get("name")
        if "present_match" in qm:
            if (name in params) != bool(qm["present_match"]):
                return False
        elif "string_match" in qm:
            if not _string_match(qm["string_match"] or {}, params.get(name)):
                return False
        elif name not in params:
            return False
    return True


def route_matches(route: dict, path: str, headers: dict[str, str]) -> bool:
    m = route.get("match")
    if not isinstance(m, dict):
        return False
    return (path_matches(m, path) and query_matches(m, path)
            and all(header_matcher_ok(hm, headers) for hm in _as_list(m.get("headers"))))


def path_candidates(match: dict) -> list[str]:
    """Concrete paths for a route matcher, best first (ending in /Echo where we can)."""
    if "prefix" in match:
        p = str(match["prefix"])
        if p == "":
            return ["/corpus.Test/" + ECHO]
        if p.endswith("/"):
            last = p.rstrip("/").rsplit("/", 1)[-1]
            return ([p + ECHO] if "." in last else []) + [p + "corpus.Test/" + ECHO, p + ECHO]
        last = p.rsplit("/", 1)[-1]
        if last in B.SCENARIOS:
            return [p]
        return [p + "/" + ECHO, p, p + "x"]
    if "path_separated_prefix" in match:
        p = str(match["path_separated_prefix"])
        return [p + "/" + ECHO, p]
    if "path" in match:
        return [str(match["path"])]
    rx = None
    if "safe_regex" in match:
        rx = (match["safe_regex"] or {}).get("regex", "")
    elif "regex" in match:
        rx = str(match["regex"])
    if rx is not None:
        cands = regex_candidates(rx, ("/corpus.Test/" + ECHO, "/pkg.Service/" + ECHO))
        cands += [c.rsplit("/", 1)[0] + "/" + ECHO for c in cands if "/" in c]  # last segment -> Echo
        good = [c for c in dict.fromkeys(cands) if regex_full(rx, c)]
        return sorted(good, key=lambda c: not c.endswith("/" + ECHO))  # echoing paths first
    return []


def _query_for(match: dict) -> str:
    parts = []
    for qm in _as_list(match.get("query_parameters")):
        name = qm.get("name")
        if "present_match" in qm:
            if qm["present_match"]:
                parts.append(f"{name}=1")
        elif "string_match" in qm:
            cands = _string_candidates(qm["string_match"] or {})
            parts.append(f"{name}={cands[0] if cands else '1'}")
        else:
            parts.append(f"{name}=1")
    return ("?" + "&".join(parts)) if parts else ""


def select_vhost(vhosts: list[dict], host: str) -> int | None:
    """Envoy's virtual host selection: exact, then longest *suffix, then longest prefix*, then *."""
    host = host.lower()
    doms = [(i, str(d).lower()) for i, vh in enumerate(vhosts) for d in _as_list(vh.get("domains"))]
    for i, d in doms:
        if d == host:
            return i
    best = None
    for i, d in doms:
        if d.startswith("*") and d != "*" and host.endswith(d[1:]) and len(host) > len(d) - 1:
            if best is None or len(d) > best[1]:
                best = (i, len(d))
    if best:
        return best[0]
    for i, d in doms:
        if d.endswith("*") and d != "*" and host.startswith(d[:-1]) and len(host) > len(d) - 1:
            if best is None or len(d) > best[1]:
                best = (i, len(d))
    if best:
        return best[0]
    for i, d in doms:
        if d == "*":
            return i
    return None


def authority_for(vhosts: list[dict], vi: int) -> str | None:
    cands = []
    for d in _as_list(vhosts[vi].get("domains")):
        d = str(d)
        if d == "*":
            cands += ["localhost", "corpus-host.invalid"]
        elif d.startswith("*"):
            cands.append("x" + d[1:] if d[1:2] in (".", "-") else "x." + d[1:].lstrip("."))
            cands.append("x" + d[1:])
        elif d.endswith("*"):
            cands.append(d[:-1] + "x")
        else:
            cands.append(d)
    for c in cands:
        if select_vhost(vhosts, c) == vi:
            return c
    return None


def _policies(vh: dict, route: dict) -> list[dict]:
    """The CORS policies that may apply to a route, most specific first."""
    out = []
    ra = route.get("route") if isinstance(route.get("route"), dict) else {}
    for holder in (ra, route):
        if isinstance(holder.get("cors"), dict):
            out.append(holder["cors"])
    for holder in (route, vh):
        for pfc in (holder.get("typed_per_filter_config") or {}).values():
            if isinstance(pfc, dict) and "corspolicy" in str(pfc.get("@type", "")).lower():
                out.append(pfc)
        if holder is vh and isinstance(vh.get("cors"), dict):
            out.append(vh["cors"])
    return out


def _origin_matchers(policy: dict) -> list:
    ms = []
    for m in _as_list(policy.get("allow_origin_string_match")):
        if isinstance(m, dict):
            ms.append(("sm", m))
    for o in _as_list(policy.get("allow_origin")):
        ms.append(("sm", {"exact": str(o)}))
    for o in _as_list(policy.get("allow_origin_regex")):
        ms.append(("sm", {"safe_regex": {"regex": str(o)}}))
    return ms


def origin_allowed(matchers, origin: str) -> bool:
    # Envoy: an origin is allowed when a matcher matches it, or matches "*" (the "allow all" idiom).
    return any(_string_match(m, origin) or _string_match(m, "*") for _, m in matchers)


def choose_origins(vh: dict, route: dict) -> tuple[str, str, str]:
    """(allowed origin, disallowed origin, note)."""
    pols = _policies(vh, route)
    if not pols:
        return GENERIC_ORIGIN, OTHER_ORIGINS[0], "no CORS policy"
    matchers = _origin_matchers(pols[0])
    if not matchers:
        return GENERIC_ORIGIN, OTHER_ORIGINS[0], "CORS policy without origin matchers"
    cands = []
    for _, m in matchers:  # origin-shaped candidates first, regex samples last
        if "exact" in m and m["exact"] != "*":
            cands.append(str(m["exact"]))
        elif "prefix" in m and m["prefix"] != "*":
            cands.append(str(m["prefix"]) + ("x" if "://" in str(m["prefix"]) else ""))
        elif "suffix" in m:
            cands.append("http://x" + str(m["suffix"]))
        elif "contains" in m:
            cands.append("http://x" + str(m["contains"]) + "x")
    cands += [GENERIC_ORIGIN, "http://localhost:3000", "https://localhost", "https://example.com"]
    for _, m in matchers:
        cands += _string_candidates(m, "http://x")
    allowed = next((c for c in cands if origin_allowed(matchers, c)), None)
    denied = next((c for c in OTHER_ORIGINS if not origin_allowed(matchers, c)), None)
    note = ""
    if allowed is None:
        allowed, note = GENERIC_ORIGIN, "no allowed origin found"
    if denied is None:
        denied, note = OTHER_ORIGINS[0], "every origin is allowed"
    return allowed, denied, note


@dataclasses.dataclass
class Request:
    rid: str  # "l1.v0.r2:h1-bin"
    route_id: str  # "l1.v0.r2"
    variant: str
    listener: int
    transport: str
    method: str
    path: str
    authority: str
    headers: list[tuple[str, str]]
    body: bytes
    target_clusters: list[str]
    seen: tuple[str, ...]
    resp_headers: tuple[str, ...]


@dataclasses.dataclass
class RouteInfo:
    route_id: str
    desc: str
    path: str | None
    authority: str | None
    skipped: str | None
    notes: list[str]


def _route_desc(route: dict) -> str:
    m = route.get("match") or {}
    parts = []
    for k in ("prefix", "path", "path_separated_prefix"):
        if k in m:
            parts.append(f"{k} {m[k]!r}")
    if "safe_regex" in m:
        parts.append(f"safe_regex {(m['safe_regex'] or {}).get('regex')!r}")
    if m.get("headers"):
        parts.append("headers " + ",".join(str((h or {}).get("name")) for h in _as_list(m["headers"])))
    if m.get("query_parameters"):
        parts.append("query " + ",".join(str((q or {}).get("name")) for q in _as_list(m["query_parameters"])))
    if m.get("grpc") is not None and "grpc" in m:
        parts.append("grpc")
    ra = route.get("route")
    if isinstance(ra, dict):
        if "cluster" in ra:
            parts.append(f"-> {ra['cluster']}")
        elif "weighted_clusters" in ra:
            parts.append("-> weighted_clusters")
        elif "cluster_header" in ra:
            parts.append(f"-> cluster_header {ra['cluster_header']}")
    elif "direct_response" in route:
        parts.append(f"-> direct_response {(route['direct_response'] or {}).get('status')}")
    elif "redirect" in route:
        parts.append("-> redirect")
    return " ".join(parts) or "?"


def _route_clusters(route: dict, data: dict) -> list[str]:
    ra = route.get("route")
    if not isinstance(ra, dict):
        return []
    if "cluster" in ra:
        return [str(ra["cluster"])]
    if "weighted_clusters" in ra:
        return [str(c.get("name")) for c in _as_list((ra["weighted_clusters"] or {}).get("clusters"))
                if isinstance(c, dict)]
    if "cluster_header" in ra:
        return [str(c.get("name")) for c in clusters_of(data)][:1]
    return []


def _mutation_keys(obj, key: str) -> set[str]:
    out: set[str] = set()
    for item in _as_list(obj.get(key)) if isinstance(obj, dict) else []:
        h = (item or {}).get("header") if isinstance(item, dict) else None
        if isinstance(h, dict) and h.get("key"):
            out.add(str(h["key"]).lower())
    return out


def derive(data: dict) -> tuple[list[Request], list[RouteInfo], list[str]]:
    """The requests for a config, the routes they come from (or why a route was skipped), notes."""
    reqs: list[Request] = []
    infos: list[RouteInfo] = []
    notes: list[str] = []
    listeners = listeners_of(data)
    clusters = {str(c.get("name")): c for c in clusters_of(data)}
    multi_l = len(listeners) > 1
    for li, L in enumerate(listeners):
        hcm = hcm_of(L)
        if hcm is None:
            notes.append(f"listener {li}: no http_connection_manager, nothing sent")
            continue
        codec = str(hcm.get("codec_type", "AUTO")).upper()
        transports = {"HTTP1": ("h1",), "HTTP2": ("h2",)}.get(codec, ("h1", "h2"))
        rc = hcm.get("route_config")
        if not isinstance(rc, dict):
            notes.append(f"listener {li}: no inline route_config (rds?), nothing sent")
            continue
        vhosts = [v for v in _as_list(rc.get("virtual_hosts")) if isinstance(v, dict)]
        multi_v = len(vhosts) > 1
        resp_keys = _mutation_keys(rc, "response_headers_to_add")
        req_keys = _mutation_keys(rc, "request_headers_to_add") | set(
            str(x).lower() for x in _as_list(rc.get("request_headers_to_remove")))
        for vi, vh in enumerate(vhosts):
            routes = [r for r in _as_list(vh.get("routes")) if isinstance(r, dict)]
            authority = authority_for(vhosts, vi)
            vresp = resp_keys | _mutation_keys(vh, "response_headers_to_add")
            vreq = req_keys | _mutation_keys(vh, "request_headers_to_add") | set(
                str(x).lower() for x in _as_list(vh.get("request_headers_to_remove")))
            for ri, route in enumerate(routes):
                rid = ".".join(x for x in ((f"l{li}" if multi_l else ""), (f"v{vi}" if multi_v else ""),
                                           f"r{ri}") if x)
                info = RouteInfo(rid, _route_desc(route), None, authority, None, [])
                infos.append(info)
                if authority is None:
                    info.skipped = f"no :authority selects virtual host {vh.get('name')!r}"
                    continue
                match = route.get("match") if isinstance(route.get("match"), dict) else {}
                extra: list[tuple[str, str]] = []
                base_headers = {"content-type": BIN_CT, "x-grpc-web": "1",
                                "x-user-agent": "grpc-web-javascript/0.1", ":authority": authority,
                                "host": authority}
                for hm in _as_list(match.get("headers")):
                    name = str((hm or {}).get("name", "")).lower()
                    if name in base_headers or name.startswith(":"):
                        if name == "content-type":
                            info.notes.append("content-type matcher: reached or not by each variant's content-type")
                        continue
                    v = satisfy_header(hm)
                    if v is not None:
                        extra.append((name, v))
                        base_headers[name] = v
                ra = route.get("route") if isinstance(route.get("route"), dict) else {}
                if ra.get("cluster_header"):
                    hname = str(ra["cluster_header"]).lower()
                    cname = next(iter(clusters), "")
                    extra.append((hname, cname))
                    base_headers[hname] = cname
                query = _query_for(match)
                chosen = None
                shadow = None
                # A content-type matcher is met by some variants only: the route counts as reached when
                # one of the content-types the variants send (or the one upstream) meets it.
                cts = (BIN_CT, TEXT_CT, "application/grpc") if any(
                    str((hm or {}).get("name", "")).lower() == "content-type"
                    for hm in _as_list(match.get("headers"))) else (BIN_CT,)
                for cand in path_candidates(match):
                    p = cand + query
                    for ct in cts:
                        hdrs = dict(base_headers, **{"content-type": ct})
                        first = next((j for j, r in enumerate(routes) if route_matches(r, p, hdrs)), None)
                        if first == ri:
                            chosen = p
                            break
                        if first is not None and shadow is None:
                            shadow = first
                    if chosen:
                        break
                if chosen is None:
                    if not path_candidates(match):
                        info.skipped = "no concrete path found for this matcher"
                    elif shadow is not None:
                        info.skipped = f"every candidate path is taken by route r{shadow}"
                    else:
                        info.skipped = "no candidate path satisfies the route's matchers"
                    continue
                info.path = chosen
                rresp = vresp | _mutation_keys(route, "response_headers_to_add")
                rreq = vreq | _mutation_keys(route, "request_headers_to_add") | set(
                    str(x).lower() for x in _as_list(route.get("request_headers_to_remove")))
                for wc in _as_list((ra.get("weighted_clusters") or {}).get("clusters")):
                    rreq |= _mutation_keys(wc, "request_headers_to_add")
                seen = ("path", "authority", "content-type", "te", "accept") + tuple(sorted(rreq - {
                    "path", "authority", "content-type", "te", "accept"}))
                allowed, denied, onote = choose_origins(vh, route)
                if onote:
                    info.notes.append(onote)
                targets = _route_clusters(route, data)
                for variant in VARIANTS:
                    t = variant.split("-")[0] if variant.startswith(("h1", "h2")) else "h1"
                    if t not in transports:
                        if variant.startswith("h"):
                            continue
                        t = transports[0]
                    mode = "text" if variant.endswith("text") else "bin"
                    hdrs = td.web_headers(mode) + list(extra)
                    method, body = "POST", td.req_body(mode)
                    if variant.startswith("preflight"):
                        method, body = "OPTIONS", b""
                        hdrs = [("origin", allowed if variant == "preflight" else denied),
                                ("access-control-request-method", "POST"),
                                ("access-control-request-headers", PREFLIGHT_HEADERS)] + list(extra)
                    elif variant.startswith("cors"):
                        hdrs.append(("origin", allowed if variant == "cors-allowed" else denied))
                    reqs.append(Request(
                        rid=f"{rid}:{variant}", route_id=rid, variant=variant, listener=li, transport=t,
                        method=method, path=chosen, authority=authority, headers=hdrs, body=body,
                        target_clusters=targets, seen=seen,
                        resp_headers=tuple(sorted(rresp)) + ("vary", "x-backend-saw-options"),
                    ))
                h1_targets = [c for c in targets if c in clusters and not cluster_speaks_h2(clusters[c])]
                if h1_targets:
                    info.notes.append("cluster without HTTP/2: " + ", ".join(h1_targets))
    return reqs, infos, notes


# =========================================================================== one config


@dataclasses.dataclass
class Prepared:
    source: Source
    data: Any  # the parsed YAML (None when it did not parse)
    parse_error: str | None
    duplicates: list[tuple[str, int]]
    v1: bool
    requests: list[Request]
    routes: list[RouteInfo]
    notes: list[str]
    filters_mappings: list[str] = dataclasses.field(default_factory=list)  # listener names


def prepare(src: Source) -> Prepared:
    text = src.path.read_text()
    try:
        data = yaml.safe_load(text)
        dups = duplicate_keys(text)
    except yaml.YAMLError as e:
        return Prepared(src, None, " ".join(str(e).split()), [], False, [], [], [])
    v1 = isinstance(data, dict) and "static_resources" not in data and (
        "listeners" in data or "cluster_manager" in data)
    notes = []
    if dups:
        notes.append("duplicate keys (last wins): " + ", ".join(f"{k} (line {n})" for k, n in dups))
    ph = placeholders(data)
    if ph:
        notes.append("placeholders filled by the rewrite: " + ", ".join(v.split(": ", 1)[1] for v in ph))
    if v1:
        return Prepared(src, data, None, dups, True, [], [], notes)
    mappings = [str(L.get("name", i)) for i, L in enumerate(listeners_of(data))
                if any(isinstance(fc, dict) and isinstance(fc.get("filters"), dict)
                       for fc in _as_list(L.get("filter_chains")))]
    if mappings:
        notes.append("filter_chains[].filters written as a mapping (listener " + ", ".join(mappings) + ")")
    reqs, routes, dnotes = derive(data)
    return Prepared(src, data, None, dups, False, reqs, routes, notes + dnotes, mappings)


@dataclasses.dataclass
class Impl:
    name: str  # "envoy", "envoy-h2", "proxy"
    config_path: Path
    log_path: Path
    ports: list[int | None]
    proc: subprocess.Popen | None = None
    error: str | None = None
    obs: dict[str, dict] = dataclasses.field(default_factory=dict)

    def log_tail(self, n=1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self):
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@dataclasses.dataclass
class Result:
    prepared: Prepared
    impls: dict[str, Impl]
    adaptations: list[str]  # shared rewrite notes
    envoy_translation: list[str]  # v3 translation notes
    envoy_as_is: str | None  # Envoy --mode validate on the rewritten copy before translation
    h1_clusters: set[str]
    elapsed: float = 0.0
    error: str | None = None


def _wait_ports(proc: subprocess.Popen, ports: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pending = [p for p in ports if p is not None]
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.2):
                pending.pop(0)
        except OSError:
            time.sleep(0.05)
    return not pending


_RETRY_ERRNOS = (14, 26, 2)  # EFAULT (a rare vfork race), ETXTBSY / ENOENT (the binary being rebuilt)


def _spawn(fn, *args, **kw):
    """subprocess.Popen / run, tried again when starting the program fails transiently."""
    for attempt in range(6):
        try:
            return fn(*args, **kw)
        except OSError as e:
            if e.errno not in _RETRY_ERRNOS or attempt == 5:
                raise
            time.sleep(0.2 * (attempt + 1))


def envoy_argv(cfg: Path, mode: str | None = None) -> list[str]:
    argv = [H.envoy_binary() or "envoy", "-c", str(cfg), "--concurrency", "1", "-l", "error",
            "--disable-hot-restart"]
    if mode:
        argv += ["--mode", mode]
    return argv


def proxy_argv(cfg: Path) -> list[str]:
    # Root, unlike everywhere else in the tests: the corpus configs are read where they lie and
    # reach the test backend over unix sockets that this (root) harness creates; the same
    # listeners, codecs, TLS and upstream paths run unprivileged in test_differential,
    # test_tls and tests/integration.
    return [str(H.proxy_binary()), "-c", str(cfg), "--concurrency", "1", "-l", "warning",
            "--drain-time-s", "0.5"]


def _send(impl: Impl, req: Request, case_id: str) -> C.Response:
    port = impl.ports[req.listener]
    hdrs = list(req.headers) + [("x-case-id", case_id)]
    if req.transport == "h1":
        return C.h1_request(port, req.method, req.path, hdrs, req.body, host=req.authority,
                            timeout=REQUEST_TIMEOUT)
    return C.h2_request(port, req.method, req.path, hdrs, [req.body] if req.body else [],
                        authority=req.authority, timeout=REQUEST_TIMEOUT)


def _observe(r: C.Response, req: Request, where: dict[str, str]) -> dict:
    o = td.observe(r, headers=req.resp_headers, seen=req.seen)
    listener = r.header("x-backend-listener")
    o["upstream cluster"] = where.get(listener, listener) if listener else None
    td.norm_connect_message(o)
    if req.method == "OPTIONS":
        o["body"] = r.body
    if r.error and r.status is None:
        o["_client-error"] = r.error
    return o


_ATTEMPTS = itertools.count(1)


def run(prep: Prepared, backend: B.Backend, workdir: Path, unix_path: str, backend_ports: list[int]) -> Result:
    """Start Envoy (and, when needed, Envoy with HTTP/2 everywhere) and the proxy on the config,
    send every request to each, stop them."""
    t0 = time.monotonic()
    name = prep.source.name
    attempt = next(_ATTEMPTS)  # case ids stay unique when a config is run again
    wd = workdir / Path(name).stem
    wd.mkdir(parents=True, exist_ok=True)
    adaptations: list[str] = list(prep.notes)
    closed = PORTS.get()
    env_rw = rewrite(prep.data, backend_ports, unix_path, closed, adaptations)
    prx_rw = rewrite(prep.data, backend_ports, unix_path, closed, None)
    where = {unix_path: "(pipe)"}
    for ci, c in enumerate(clusters_of(prep.data)):
        where.setdefault(str(backend_ports[ci % len(backend_ports)]), str(c.get("name")))
        if any("pipe" in str(x) for x in [c.get("load_assignment"), c.get("hosts")]):
            where[unix_path] = str(c.get("name"))
    translation: list[str] = []
    env_data = envoy_copy(env_rw.data, translation)
    clusters = {str(c.get("name")): c for c in clusters_of(prep.data)}
    h1 = {c for r in prep.requests for c in r.target_clusters
          if c in clusters and not cluster_speaks_h2(clusters[c])}
    impls: dict[str, Impl] = {}

    def write(n: str, d: dict, ports) -> Impl:
        p = wd / f"{n}.yaml"
        p.write_text(f"# {name}, rewritten for the corpus run ({n}); generated, not a copy to keep\n"
                     + yaml.safe_dump(d, sort_keys=False, default_flow_style=False))
        return Impl(n, p, wd / f"{n}.log", ports)

    impls["envoy"] = write("envoy", env_data, env_rw.listener_ports)
    if h1:
        h2_rw = rewrite(prep.data, backend_ports, unix_path, closed, None)
        impls["envoy-h2"] = write("envoy-h2", add_h2(envoy_copy(h2_rw.data, []), h1), h2_rw.listener_ports)
    impls["proxy"] = write("proxy", prx_rw.data, prx_rw.listener_ports)
    res = Result(prep, impls, adaptations, translation, None, h1)

    # Does Envoy take the rewritten copy without the v3 translation? (informational)
    if translation:
        raw = write("envoy-untranslated", env_rw.data, [])
        try:
            out = _spawn(subprocess.run, envoy_argv(raw.config_path, "validate"), capture_output=True, text=True,
                                 timeout=60)
            msg = (out.stdout + out.stderr).strip().splitlines()
            res.envoy_as_is = "accepts it" if out.returncode == 0 else "refuses it: " + _envoy_error(msg)
        except subprocess.TimeoutExpired:
            res.envoy_as_is = "validate timed out"

    binary = H.proxy_binary()

    def start(impl: Impl):
        if impl.name == "proxy":
            if not binary.exists():
                impl.error = f"proxy binary not found at {binary}"
                return
            argv = proxy_argv(impl.config_path)
        else:
            argv = envoy_argv(impl.config_path)
        impl.error = None
        with open(impl.log_path, "wb") as logf:
            impl.proc = _spawn(subprocess.Popen, argv, stdout=logf, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)

    def wait(impl: Impl):
        if impl.proc is not None and not _wait_ports(impl.proc, impl.ports, 30 if impl.name.startswith("envoy") else 20):
            impl.stop()
            impl.error = f"{impl.name} did not start listening (exit={impl.proc.poll()}): " + _log_error(impl)

    try:  # every process started here is stopped in `finally`, whatever fails
        for impl in impls.values():
            start(impl)
        for impl in impls.values():
            wait(impl)
        prx = impls["proxy"]
        if prx.error and prx.proc is not None and not _log_error(prx).startswith("error:"):
            # Not a configuration error: maybe the binary was being rebuilt. Once more.
            time.sleep(1.0)
            start(prx)
            wait(prx)
        for req in prep.requests:
            for impl in impls.values():
                if impl.error or impl.proc is None:
                    continue
                case_id = f"corpus:{name}:{attempt}:{req.rid}@{impl.name}"
                r = _send(impl, req, case_id)
                if r.status is None and impl.proc.poll() is not None:
                    impl.error = (f"{impl.name} exited with {impl.proc.poll()} during the run: "
                                  + " ".join(impl.log_tail(800).split())[-600:])
                impl.obs[req.rid] = _observe(r, req, where)
                impl.obs[req.rid]["_case-id"] = case_id
        time.sleep(0.05)
        for impl in impls.values():
            for rid, o in impl.obs.items():
                o["upstream-requests"] = len(backend.records(o.pop("_case-id")))
    finally:
        for impl in impls.values():
            impl.stop()
    res.elapsed = time.monotonic() - t0
    return res


def _log_error(impl: Impl) -> str:
    """The error lines of a start-up log (the proxy's `error:` line, Envoy's critical one), else its tail."""
    text = impl.log_tail(20000)
    errs = [ln for ln in text.splitlines() if ln.startswith("error") or "[critical]" in ln or "[error]" in ln]
    return " ".join(" ".join(errs[-3:]).split())[:900] if errs else " ".join(text.split())[-600:]


def _envoy_error(lines: list[str]) -> str:
    for ln in lines:
        if "error initializing configuration" in ln or "critical" in ln:
            msg = ln.split("':", 1)[-1].strip() if "':" in ln else ln
            return " ".join(msg.split())[:240]
    return " ".join(" ".join(lines).split())[:240]


PLACEHOLDER_VALUES = {"port": "8080", "address": "127.0.0.1"}


def placeholder_env(data) -> dict[str, str]:
    """Values for the $VAR placeholders of a template (as its own render script would set them)."""
    env = {}
    for item in placeholders(data):
        var = item.split(": ", 1)[1].strip("${}<>")
        env[var] = PLACEHOLDER_VALUES["port"] if "port" in var.lower() else PLACEHOLDER_VALUES["address"]
    return env


@dataclasses.dataclass
class Validation:
    proxy_rc: int
    proxy_out: str
    envoy_rc: int
    envoy_out: str
    env: dict[str, str]  # the template variables set for the run (empty: none)
    proxy_rc_bare: int | None = None  # without them
    proxy_out_bare: str = ""


def validate_in_place(prep: Prepared) -> Validation:
    """`grpc-web-proxy --mode validate` and `envoy --mode validate` on the file as written, in place.
    A template ($VAR placeholders) is validated with its variables set, and once without."""
    path = prep.source.path
    env = placeholder_env(prep.data) if prep.data is not None else {}
    argv = [str(H.proxy_binary()), "--mode", "validate", "-c", str(path)]
    p = _spawn(subprocess.run, argv, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    e = _spawn(subprocess.run, envoy_argv(path, "validate"), capture_output=True, text=True, timeout=60)
    v = Validation(p.returncode, p.stdout + p.stderr, e.returncode, e.stdout + e.stderr, env)
    if env:
        bare_env = {k: v for k, v in os.environ.items() if k not in env}
        b = _spawn(subprocess.run, argv, capture_output=True, text=True, timeout=60, env=bare_env)
        v.proxy_rc_bare, v.proxy_out_bare = b.returncode, b.stdout + b.stderr
    return v


class Runner:
    """Runs configs on a small thread pool; results are waited for one config at a time."""

    def __init__(self, backend: B.Backend, workdir: Path, workers: int = 3):
        self.backend = backend
        self.workdir = workdir
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="corpus")
        self.futures: dict[str, concurrent.futures.Future] = {}
        self.unix_path = str(workdir / "backend.sock")
        self.backend_ports: list[int] = []
        self._unix_ready = False
        self._lock = threading.Lock()

    def _ensure_unix(self):
        with self._lock:
            if not self._unix_ready:
                self.backend.add_unix_listener(self.unix_path)
                # One backend port per cluster position (corpus configs have at most 8 clusters).
                self.backend_ports = [self.backend.port] + [self.backend.add_tcp_listener() for _ in range(9)]
                self._unix_ready = True

    def submit(self, prep: Prepared):
        if prep.source.name not in self.futures and prep.data is not None and not prep.v1:
            self._ensure_unix()
            self.futures[prep.source.name] = self.pool.submit(self._run, prep)

    def _run(self, prep: Prepared) -> Result:
        res = run(prep, self.backend, self.workdir, self.unix_path, self.backend_ports)
        if any("in use" in (i.error or "") for i in res.impls.values()):
            # A port taken between picking and binding (or a config whose listeners share one):
            # once more, on new ports.
            res = run(prep, self.backend, self.workdir, self.unix_path, self.backend_ports)
        return res

    def submit_validate(self, prep: Prepared):
        key = "validate:" + prep.source.name
        if key not in self.futures:
            self.futures[key] = self.pool.submit(validate_in_place, prep)

    def validate_result(self, prep: Prepared) -> Validation:
        self.submit_validate(prep)
        return self.futures["validate:" + prep.source.name].result()

    def result(self, prep: Prepared) -> Result:
        self.submit(prep)
        return self.futures[prep.source.name].result()

    def shutdown(self):
        for f in self.futures.values():
            f.cancel()
        self.pool.shutdown(wait=True)


# =========================================================================== the matrix (CORPUS.md)

_lock = threading.Lock()
SESSION: dict[str, Any] = {}
# config name -> {"loads": str, "envoy-loads": str, "runs": str, "variants": {rid: (verdict, detail)}, ...}
CONFIGS: dict[str, dict] = {}


def record(name: str, **kw):
    with _lock:
        CONFIGS.setdefault(name, {"variants": {}})
        CONFIGS[name].update(kw)


def record_variant(name: str, rid: str, verdict: str, detail: str = ""):
    with _lock:
        CONFIGS.setdefault(name, {"variants": {}})["variants"][rid] = (verdict, detail)


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_matrix(preps: list[Prepared], deviations: dict[str, str], known: dict[tuple[str, str], str],
                 path: Path = OUTPUT) -> Path | None:
    if not CONFIGS:
        return None

    def kind(v: str) -> str:
        k = v.split(" ")[0]
        return k if k in ("same", "deviation", "known") else "differs"

    totals = {"configs": 0, "run": 0, "clean": 0, "requests": 0, "same": 0, "deviation": 0, "known": 0,
              "differs": 0}
    for p in preps:
        c = CONFIGS.get(p.source.name)
        if not c:
            continue
        totals["configs"] += 1
        vs = c["variants"]
        if vs and c.get("runs") == "both":
            totals["run"] += 1
            if all(kind(v) in ("same", "deviation") for v, _ in vs.values()):
                totals["clean"] += 1
        for v, _ in vs.values():
            totals["requests"] += 1
            totals[kind(v)] += 1
    lines = [
        "# Real-world configs: Envoy vs grpc-web-proxy, config by config",
        "",
        "Generated by `python3 -m pytest envoy-compat -q` (`envoy-compat/test_corpus.py`, see "
        "`envoy-compat/README.md`). Do not edit by hand. The matrix of the protocol cases is "
        "[`CONFORMANCE.md`](CONFORMANCE.md).",
        "",
        f"- Generated: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- Envoy: {SESSION.get('envoy', 'unknown')}",
        f"- Proxy: {SESSION.get('proxy', 'unknown')}",
        f"- Corpus: {SESSION.get('corpus', CORPUS_DIR)} (read in place, never copied into the repository), "
        f"and our own configs in `envoy-compat/configs/`",
        f"- Configs: {totals['configs']}; run side by side by both: {totals['run']}; of those with every "
        f"request the same or an intended deviation: {totals['clean']}",
        f"- Requests compared: {totals['requests']}: same {totals['same']}, intended deviation "
        f"{totals['deviation']}, known difference (xfail) {totals['known']}, undeclared difference "
        f"{totals['differs']}",
        "",
        "How to read it. Each config is rewritten for the run: loopback listeners and admin, every cluster "
        "endpoint at the suite's echo backend (one backend port per cluster, so the echo tells which "
        "cluster a call reached), TLS removed, template placeholders filled. The proxy runs that copy as "
        "written; Envoy 1.40 runs a v3 translation of it where Envoy refuses the v2 forms (every change is "
        "listed). Requests are derived from the routes: for each route a path that reaches it and an "
        ":authority that selects its virtual host, sent as `h1-bin`, `h1-text`, `h2-bin`, `h2-text` "
        "(gRPC-Web unary calls, binary or text, HTTP/1.1 or HTTP/2 prior knowledge), `preflight` / "
        "`preflight-denied` (CORS preflights from an origin the policy allows / does not allow) and "
        "`cors-allowed` / `cors-denied` (the call with such an Origin). Compared: status, content-type, "
        "grpc-status, grpc-message, content-length presence, every access-control-* header, vary, the "
        "decoded frames and trailer frame, how the body ended, HTTP trailers, what reached the backend "
        "(cluster, path, authority, content-type, te, accept, the headers the route adds or removes) and "
        "how many requests reached it.",
        "",
        "Verdicts: `same`; `deviation (...)`: an intended difference, declared below, and the proxy did "
        "what we intend; `known`: a difference listed under \"Known differences\", marked `xfail(strict=True)` in `test_corpus.py` "
        "until the proxy is fixed or the feature lands; `differs`: an undeclared difference (the test "
        "fails).",
        "",
        "## Intended deviations",
        "",
    ]
    lines += [f"- `{k}`: {v}" for k, v in deviations.items()]
    lines += ["", "## Known differences (xfail, strict)", ""]
    lines += [f"- `{cfg}` `{pat}`: {why}" for (cfg, pat), why in known.items()] or ["- none"]
    undeclared = [(p.source.name, rid, d) for p in preps for rid, (v, d) in
                  (CONFIGS.get(p.source.name) or {"variants": {}})["variants"].items() if kind(v) == "differs"]
    lines += ["", "## Undeclared differences", ""]
    lines += [f"- `{n}` `{rid}`: {_cell(d)}" for n, rid, d in undeclared] or ["- none"]
    lines += ["", "## Summary", "",
              "| config | loads as written: proxy | Envoy 1.40 | runs | requests | same | deviation | known | differs |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in preps:
        c = CONFIGS.get(p.source.name)
        if not c:
            continue
        cnt = {"same": 0, "deviation": 0, "known": 0, "differs": 0}
        for v, _ in c["variants"].values():
            cnt[kind(v)] += 1
        lines.append("| " + " | ".join(_cell(x) for x in (
            f"`{p.source.name}`", _short(c.get("loads", "-")), _short(c.get("envoy-loads", "-")),
            _short(c.get("runs", "-")), str(len(c["variants"])), str(cnt["same"]), str(cnt["deviation"]),
            str(cnt["known"]), str(cnt["differs"]))) + " |")
    lines += ["", "## Config by config", ""]
    for p in preps:
        c = CONFIGS.get(p.source.name)
        if not c:
            continue
        lines.append(f"### `{p.source.name}`" + (" (own)" if p.source.kind == "own" else ""))
        lines.append("")
        lines.append(f"- Loads as written: proxy {c.get('loads', '-')}; Envoy 1.40 {c.get('envoy-loads', '-')}")
        if c.get("template"):
            lines.append(f"- Template: {c['template']}")
        if c.get("runs"):
            lines.append(f"- Runs: {c['runs']}")
        for k, title in (("adaptations", "Rewritten for the run"), ("translation", "Envoy's v3 translation"),
                         ("envoy-as-is", "Envoy on the rewritten copy without the translation")):
            v = c.get(k)
            if v:
                lines.append(f"- {title}: " + ("; ".join(v) if isinstance(v, list) else v))
        routes = c.get("routes") or []
        if routes:
            lines.append("- Routes:")
            for ri in routes:
                if ri.skipped:
                    lines.append(f"  - `{ri.route_id}` {ri.desc}: **skipped**: {ri.skipped}")
                else:
                    extra = ("; " + "; ".join(ri.notes)) if ri.notes else ""
                    lines.append(f"  - `{ri.route_id}` {ri.desc}: sent to `{ri.authority}` `{ri.path}`{extra}")
        vs = c["variants"]
        if vs:
            others = [(rid, v, d) for rid, (v, d) in vs.items() if v != "same"]
            lines.append(f"- Requests: {len(vs)}; same: {len(vs) - len(others)}"
                         + (f"; other: {len(others)}" if others else ""))
            for rid, v, d in others:
                lines.append(f"  - `{rid}`: {_cell(v)}" + (f": {_cell(d)}" if d else ""))
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def _short(s: str, n: int = 90) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 3] + "..."
