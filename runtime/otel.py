"""OpenTelemetry export over OTLP/HTTP, from the front only (the engine has no network).

Everything exported is derived from the events of runtime.telemetry, which never carry
prompts, completions or secret values:
- every event as a log record, its fields as attributes (the same record as the JSON line);
- one span per startup step, children of a `harness.startup` span;
- the request metrics of front/metrics.py (same derivation), plus events by type and outcome.

Without `telemetry.otlp_endpoint` nothing here runs: no SDK import, no thread, no subscriber.
With one, events are held from step 1 and exported once step 3 has loaded the collector's
credentials from the secrets dir; a run that fails before step 3 still exports what it held.

Why one module of this size: the OpenTelemetry SDK is imported here only, and only when an
endpoint is configured; one file keeps that boundary visible.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from runtime import __version__, telemetry
from runtime.config import Config, TelemetrySection
from runtime.errors import HarnessError, SecretsError
from runtime.front.metrics import GAUGES, LATENCY_BUCKETS, Gauges, measurement
from runtime.secrets.tmpfs import Secret

if TYPE_CHECKING:
    from opentelemetry.trace import Span

# Launcher steps that run one after the other: without a `seconds` of their own, they start
# where the previous step ended. engine_ready's `seconds` counts from the engine's start, so
# its span is the wait for readiness after engine_start.
_SEQUENTIAL = frozenset({"weight_integrity_check", "secret_injection", "engine_ready"})
_MAX_HELD = 1000  # events held before step 3: startup produces a dozen
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_log = logging.getLogger(__name__)


class NoExport:
    """Telemetry export switched off: every method is free."""

    def start(self, loaded: dict[str, Secret]) -> None:
        """Step 3 has the secrets: start exporting."""

    def watch_gauges(self, gauges: Gauges) -> None:
        """Report the requests in the engine, the front's open connections and its handshakes
        in progress as gauges."""


def install(cfg: Config) -> NoExport:
    """Step 1: hold events from now on if an endpoint is configured."""
    if not cfg.telemetry.otlp_endpoint:
        return NoExport()
    return OtlpExport(cfg)


def describe(section: TelemetrySection) -> dict[str, Any]:
    """`harness check` evidence."""
    if not section.otlp_endpoint:
        return {"status": "off"}
    return {
        "status": "on",
        "endpoint": section.otlp_endpoint,
        "protocol": "OTLP/HTTP (protobuf)",
        "signals": ["traces", "logs", "metrics"],
        "service_name": section.service_name,
        "headers_from_secret": section.otlp_headers_file,
        "client_certificate": str(section.otlp_client_cert) if section.otlp_client_cert else None,
    }


def collector_headers(name: str, loaded: dict[str, Secret]) -> dict[str, str]:
    """Headers from the secret file `name`: a `.json`/`.env` secret's keys are header names; a
    plain file holds NAME=VALUE entries, one a line or comma-separated, values percent-encoded
    as in OTEL_EXPORTER_OTLP_HEADERS. Errors name the header, never the value."""
    fix = (
        "put the collector's headers in that file of secrets.dir "
        "(e.g. Authorization=Bearer%20TOKEN)"
    )
    if name in loaded:
        headers = {}
        text = loaded[name].value.decode("utf-8", errors="strict")
        for entry in re.split(r"[,\n]", text):
            if not entry.strip():
                continue
            key, sep, value = entry.partition("=")
            if not sep:
                raise SecretsError(f"secret {name}: an entry is not NAME=VALUE", fix=fix)
            headers[key.strip()] = unquote(value.strip())
    else:
        prefix = f"{name}:"
        headers = {
            k.removeprefix(prefix): v.value.decode()
            for k, v in loaded.items()
            if k.startswith(prefix)
        }
    if not headers:
        raise SecretsError(
            f"telemetry.otlp_headers_file: secret {name} is not in secrets.dir, or is empty",
            fix=fix,
        )
    for key, value in headers.items():
        if not _HEADER_NAME.match(key) or "\r" in value or "\n" in value:
            raise SecretsError(f"secret {name}: header {key!r} is not a valid HTTP header", fix=fix)
    return headers


class OtlpExport(NoExport):
    """The telemetry subscriber: holds events until `start`, then hands them to the SDK."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._since_ns = time.time_ns()
        self._lock = threading.Lock()
        self._held: list[dict[str, Any]] = []
        self._sdk: _Sdk | None = None
        self._gauges: Gauges | None = None
        telemetry.subscribe(self._observe)

    def start(self, loaded: dict[str, Secret]) -> None:
        sdk = _Sdk(self._cfg, self._options(loaded), self._since_ns, self._gauge)
        with self._lock:
            held, self._held = self._held, []
            self._sdk = sdk
        atexit.register(sdk.close)  # a crash (exit 1) has no shutdown event
        for record in held:
            self._record(sdk, record)

    def watch_gauges(self, gauges: Gauges) -> None:
        self._gauges = gauges

    def _gauge(self, name: str) -> float | None:
        return getattr(self._gauges, name)() if self._gauges is not None else None

    def _options(self, loaded: dict[str, Secret]) -> dict[str, Any]:
        section = self._cfg.telemetry
        options: dict[str, Any] = {"timeout": section.export_timeout_s}
        if section.otlp_headers_file:
            options["headers"] = collector_headers(section.otlp_headers_file, loaded)
        if section.otlp_ca is not None:
            options["certificate_file"] = str(section.otlp_ca)
        if section.otlp_client_cert is not None and section.otlp_client_key_file is not None:
            key = section.otlp_client_key_file
            if key not in loaded or self._cfg.secrets.dir is None:
                raise SecretsError(
                    f"telemetry.otlp_client_key_file: secret {key} is not in secrets.dir",
                    fix="put the client certificate's key in secrets.dir under that name",
                )
            options["client_certificate_file"] = str(section.otlp_client_cert)
            options["client_key_file"] = str(self._cfg.secrets.dir / key)
        return options

    def _observe(self, record: dict[str, Any]) -> None:
        # Export must never break the event path (requests emit from the event loop).
        try:
            with self._lock:
                sdk = self._sdk
                if sdk is None:
                    if len(self._held) < _MAX_HELD:
                        self._held.append(record)
                    if record["event_type"] != "shutdown":
                        return
            if sdk is None:
                self._start_late()
            else:
                self._record(sdk, record)
        except Exception:
            _log.exception("telemetry export: event %s not exported", record.get("event_type"))

    def _record(self, sdk: _Sdk, record: dict[str, Any]) -> None:
        sdk.record(record)
        if record["event_type"] == "shutdown":
            sdk.close()

    def _start_late(self) -> None:
        """Startup failed before step 3 (weights refused, say): load the collector's
        credentials now, so that the security team still sees why."""
        loaded: dict[str, Secret] = {}
        section = self._cfg.telemetry
        try:
            if section.otlp_headers_file or section.otlp_client_key_file:
                from runtime.secrets import tmpfs

                loaded = tmpfs.load(self._cfg.secrets) if self._cfg.secrets.dir else {}
            self.start(loaded)
        except HarnessError as exc:
            _log.warning("telemetry export: not started: %s", exc.message)


def _ns(timestamp_utc: str) -> int:
    moment = _dt.datetime.fromisoformat(timestamp_utc)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def _attributes(record: dict[str, Any]) -> dict[str, Any]:
    """OTel attribute values are scalars or lists of one scalar type: anything else as JSON."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if value is None:
            continue
        if isinstance(value, str | bool | int | float):
            out[key] = value
        elif isinstance(value, list | tuple) and _homogeneous(value):
            out[key] = list(value)
        else:
            out[key] = json.dumps(value, default=str, separators=(",", ":"))
    return out


def _homogeneous(values: list[Any] | tuple[Any, ...]) -> bool:
    kinds = {type(v) for v in values}
    return len(kinds) <= 1 and kinds <= {str, int, float}


class _Sdk:
    """The OpenTelemetry SDK objects: providers with batch exporters (their own threads)."""

    def __init__(
        self,
        cfg: Config,
        options: dict[str, Any],
        since_ns: int,
        gauge: Callable[[str], float | None],
    ) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.metrics import CallbackOptions, Observation
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import Status, StatusCode

        section = cfg.telemetry
        who = telemetry.identity()
        resource = Resource.create(
            {
                "service.name": section.service_name,
                "service.version": __version__,
                "k8s.pod.name": who["pod_name"],
                "k8s.namespace.name": who["namespace"],
            }
        )
        base = section.otlp_endpoint.rstrip("/")
        delay_ms = int(section.export_interval_s * 1000)
        # Providers are local, never global: nothing else in the process exports through them.
        self._tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self._tracer_provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=f"{base}/v1/traces", **options),
                schedule_delay_millis=delay_ms,
            )
        )
        self._logger_provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        self._logger_provider.add_log_record_processor(
            BatchLogRecordProcessor(
                OTLPLogExporter(endpoint=f"{base}/v1/logs", **options),
                schedule_delay_millis=delay_ms,
            )
        )
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics", **options),
            export_interval_millis=delay_ms,
            export_timeout_millis=int(section.export_timeout_s * 1000),
        )
        self._meter_provider = MeterProvider(
            resource=resource, metric_readers=[reader], shutdown_on_exit=False
        )
        self._tracer = self._tracer_provider.get_tracer("harness", __version__)
        self._logger = self._logger_provider.get_logger("harness", __version__)
        meter = self._meter_provider.get_meter("harness", __version__)

        def observe(name: str) -> Callable[[CallbackOptions], list[Observation]]:
            def callback(_options: CallbackOptions) -> list[Observation]:
                value = gauge(name)
                return [] if value is None else [Observation(value)]

            return callback

        self._counters = {
            "requests": meter.create_counter(
                "harness.requests", "{request}", "Requests by route, status, outcome and reason"
            ),
            "connections_refused": meter.create_counter(
                "harness.connections.refused",
                "{connection}",
                "Connections closed before HTTP (failed or timed-out handshake, handshake cap, "
                "identity, connection cap, header timeout)",
            ),
            "tls_reloads": meter.create_counter("harness.tls.reloads", "{reload}"),
            "events": meter.create_counter(
                "harness.events", "{event}", "Security events by type and outcome"
            ),
        }
        self._duration = meter.create_histogram(
            "harness.request.duration",
            "s",
            "Request latency at the front",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS),
        )
        for field, _prometheus, name, unit, text in GAUGES:
            meter.create_observable_gauge(name, [observe(field)], unit, text)
        self._trace = trace
        self._status = (Status, StatusCode)
        self._root: Span | None = self._tracer.start_span("harness.startup", start_time=since_ns)
        self._step_end = since_ns
        self._closed = False

    def record(self, record: dict[str, Any]) -> None:
        kind = record["event_type"]
        at = _ns(record["timestamp_utc"])
        attributes = _attributes(record)
        failed = record["outcome"] in ("blocked", "failed")
        context = None
        if kind in telemetry.STARTUP_STEPS and self._root is not None:
            context = self._step(record, at, attributes, failed)
        elif kind in ("front_listen", "shutdown") and self._root is not None:
            status, code = self._status
            if kind == "shutdown":
                self._root.set_status(status(code.ERROR, "stopped before serving"))
            self._root.end(end_time=at)
            self._root = None
        self._logger.emit(
            timestamp=at,
            observed_timestamp=time.time_ns(),
            context=context,
            severity_number=_severity(record["outcome"]),
            severity_text=record["outcome"],
            body=kind,
            attributes=attributes,
            event_name=kind,
        )
        self._counters["events"].add(1, {"event_type": kind, "outcome": record["outcome"]})
        found = measurement(record)
        if found is not None:
            metric, labels, latency, count = found
            self._counters[metric].add(count, labels)
            if latency is not None:
                self._duration.record(latency, {"route": labels["route"]})

    def _step(
        self, record: dict[str, Any], at: int, attributes: dict[str, Any], failed: bool
    ) -> Any:
        kind = record["event_type"]
        seconds = record.get("seconds")
        if isinstance(seconds, int | float) and kind != "engine_ready":
            start = at - int(seconds * 1e9)
        elif kind in _SEQUENTIAL:
            start = self._step_end
        else:
            start = at  # reported without a duration
        context = self._trace.set_span_in_context(self._root)
        span = self._tracer.start_span(
            kind, context=context, start_time=min(start, at), attributes=attributes
        )
        if failed:
            status, code = self._status
            span.set_status(status(code.ERROR, str(record.get("error", record["outcome"]))))
        span.end(end_time=at)
        self._step_end = max(self._step_end, at)
        return self._trace.set_span_in_context(span)

    def close(self) -> None:
        """Export what is left and stop the exporters' threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._root is not None:
            self._root.end()
            self._root = None
        for provider in (self._tracer_provider, self._logger_provider, self._meter_provider):
            try:
                provider.shutdown()  # flushes first
            except Exception:
                _log.exception("telemetry export: shutdown failed")


def _severity(outcome: str) -> Any:
    from opentelemetry._logs import SeverityNumber

    return {"failed": SeverityNumber.ERROR, "blocked": SeverityNumber.WARN}.get(
        outcome, SeverityNumber.INFO
    )
