"""A minimal OpenTelemetry OTLP/gRPC trace receiver for the tests.

It implements `opentelemetry.proto.collector.trace.v1.TraceService/Export` and keeps every span
it is sent, flattened to a plain dict, so a test can point a proxy's (or Envoy's)
`envoy.tracers.opentelemetry` tracer at it and check what was exported:

    receiver = OTLPReceiver()
    receiver.start()            # listens on 127.0.0.1:receiver.port
    ...                         # traffic
    spans = receiver.wait_for(1, timeout=10)
    receiver.stop()

Run standalone (`python3 otlp_receiver.py PORT`) it prints each span as one JSON line.
Needs `pip install grpcio opentelemetry-proto`.
"""

import json
import sys
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


def any_value(v):
    """An OTLP AnyValue as a plain Python value."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if kind is None:
        return None
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def span_dict(span, resource):
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "name": span.name,
        "kind": trace_pb2.Span.SpanKind.Name(span.kind),
        "attributes": attributes(span.attributes),
        "status_code": trace_pb2.Status.StatusCode.Name(span.status.code),
        "status_message": span.status.message,
        "resource": resource,
        "start_ns": span.start_time_unix_nano,
        "end_ns": span.end_time_unix_nano,
    }


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, on_span):
        self.on_span = on_span

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.on_span(span_dict(span, resource))
        return trace_service_pb2.ExportTraceServiceResponse()


class OTLPReceiver:
    """Collects the spans exported to it; `on_span` (optional) is also called with each one."""

    def __init__(self, port=0, on_span=None):
        self._wanted_port = port
        self._on_span = on_span
        self._spans = []
        self._cond = threading.Condition()
        self._server = None
        self.port = None

    def _add(self, span):
        with self._cond:
            self._spans.append(span)
            self._cond.notify_all()
        if self._on_span:
            self._on_span(span)

    def start(self):
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self._add), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self._wanted_port}")
        self._server.start()
        return self

    def stop(self):
        if self._server:
            self._server.stop(grace=None)
            self._server = None

    def spans(self):
        with self._cond:
            return list(self._spans)

    def clear(self):
        with self._cond:
            self._spans.clear()

    def wait_for(self, count, timeout=10.0):
        """Waits until at least `count` spans have arrived; returns spans() (raises on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._spans) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._spans)} of {count} spans after {timeout}s: {self._spans}")
                self._cond.wait(left)
            return list(self._spans)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    receiver = OTLPReceiver(int(sys.argv[1]), on_span=lambda s: print(json.dumps(s), flush=True))
    receiver.start()
    print(f"OTLP receiver on 127.0.0.1:{receiver.port}", file=sys.stderr, flush=True)
    try:
        receiver._server.wait_for_termination()
    except KeyboardInterrupt:
        receiver.stop()
