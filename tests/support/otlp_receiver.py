"""A small OTLP/HTTP receiver for the tests: it accepts what an OpenTelemetry collector's
`otlphttp` receiver accepts on /v1/traces, /v1/logs and /v1/metrics (protobuf bodies) and
decodes them with opentelemetry-proto. No collector can run on the test machines; this is the
wire protocol, decoded by the reference message definitions."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

_MESSAGES = {
    "/v1/traces": ExportTraceServiceRequest,
    "/v1/logs": ExportLogsServiceRequest,
    "/v1/metrics": ExportMetricsServiceRequest,
}

# The startup steps whose events are exported as spans by a real `harness serve`.
STARTUP_STEPS = {
    "weight_integrity_check",
    "secret_injection",
    "privilege_drop",
    "landlock",
    "seccomp_install",
    "engine_start",
    "engine_ready",
}


def _value(any_value: dict[str, Any]) -> Any:
    if "arrayValue" in any_value:
        return [_value(v) for v in any_value["arrayValue"].get("values", [])]
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in any_value:
            return any_value[key]
    if "intValue" in any_value:
        return int(any_value["intValue"])
    return None


def attributes(items: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {item["key"]: _value(item.get("value", {})) for item in items or []}


@dataclass
class Export:
    path: str
    headers: dict[str, str]
    raw: bytes
    body: dict[str, Any]


@dataclass
class Receiver:
    """Records every export; decoded bodies as dicts (protobuf JSON mapping)."""

    exports: list[Export] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def of(self, path: str) -> list[Export]:
        with self.lock:
            return [e for e in self.exports if e.path == path]

    def resources(self) -> Iterator[dict[str, Any]]:
        for export in list(self.exports):
            for key in ("resourceSpans", "resourceLogs", "resourceMetrics"):
                for item in export.body.get(key, []):
                    yield attributes(item.get("resource", {}).get("attributes"))

    def spans(self) -> list[dict[str, Any]]:
        return [
            span
            for export in self.of("/v1/traces")
            for rs in export.body.get("resourceSpans", [])
            for ss in rs.get("scopeSpans", [])
            for span in ss.get("spans", [])
        ]

    def logs(self) -> list[dict[str, Any]]:
        return [
            record
            for export in self.of("/v1/logs")
            for rl in export.body.get("resourceLogs", [])
            for sl in rl.get("scopeLogs", [])
            for record in sl.get("logRecords", [])
        ]

    def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """Metric name -> its data points, over every export."""
        out: dict[str, list[dict[str, Any]]] = {}
        for export in self.of("/v1/metrics"):
            for rm in export.body.get("resourceMetrics", []):
                for sm in rm.get("scopeMetrics", []):
                    for metric in sm.get("metrics", []):
                        data = next(
                            v for k, v in metric.items() if k in ("sum", "gauge", "histogram")
                        )
                        out.setdefault(metric["name"], []).extend(data.get("dataPoints", []))
        return out

    def wait(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiver did not get it; paths: {self.paths()}")
            time.sleep(0.1)

    def paths(self) -> list[str]:
        with self.lock:
            return [e.path for e in self.exports]


def serve() -> tuple[ThreadingHTTPServer, Receiver]:
    """Start a receiver on a free loopback port; `server.shutdown()` stops it."""
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                raw = gzip.decompress(raw)
            message_type = _MESSAGES.get(self.path)
            if message_type is None or self.headers.get("Content-Type") != (
                "application/x-protobuf"
            ):
                self.send_response(404)
                self.end_headers()
                return
            message = message_type()
            message.ParseFromString(raw)
            export = Export(
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                raw,
                MessageToDict(message),
            )
            with receiver.lock:
                receiver.exports.append(export)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    return server, receiver
