"""Prometheus metrics for the front, derived from its audit events, scraped from a separate
loopback-only port (never the mTLS listener, never the engine)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from runtime import telemetry
from runtime.config import split_listen
from runtime.errors import ConfigError

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class Gauges:
    """What the front's gauges read at each scrape or export (Prometheus and OTel alike)."""

    in_flight: Callable[[], float]  # requests in the engine
    connections: Callable[[], float]  # connections past their TLS handshake
    handshakes: Callable[[], float]  # connections accepted, their TLS handshake not yet done


# Each gauge once, for both exporters: (Gauges field, Prometheus name, OTel name, unit, help).
GAUGES = (
    (
        "in_flight",
        "harness_requests_in_flight",
        "harness.requests.in_flight",
        "{request}",
        "Requests in the engine",
    ),
    (
        "connections",
        "harness_connections_open",
        "harness.connections.open",
        "{connection}",
        "The front's connections past their TLS handshake (front.max_connections caps them)",
    ),
    (
        "handshakes",
        "harness_handshakes_in_progress",
        "harness.handshakes.in_progress",
        "{connection}",
        "Connections accepted whose TLS handshake is not done (front.max_handshakes caps "
        "them, front.handshake_timeout_s bounds each)",
    ),
)


def measurement(event: dict[str, Any]) -> tuple[str, dict[str, str], float | None, int] | None:
    """What one event counts, as (metric, labels, latency in seconds, how many); shared by
    these Prometheus metrics and the OTel export. Refused request targets are counted as route
    `other`, never as a label value (unbounded cardinality). An event that stands for several
    (failed handshakes, limited to one event a second) carries `count`."""
    kind = event["event_type"]
    if kind in ("request", "request_rejected") and event.get("route") is not None:
        route = event["route"] if event.get("reason") != "route_not_allowed" else "other"
        labels = {
            "route": route,
            "status": str(event.get("status")),
            "outcome": event["outcome"],
            "reason": event.get("reason", ""),
        }
        latency = event["latency_ms"] / 1000 if "latency_ms" in event else None
        return "requests", labels, latency, 1
    if kind in ("request_rejected", "tls_handshake_rejected"):
        return (
            "connections_refused",
            {"reason": event.get("reason", "")},
            None,
            event.get("count", 1),
        )
    if kind == "tls_reload":
        return "tls_reloads", {"outcome": event["outcome"]}, None, 1
    return None


class FrontMetrics:
    def __init__(self, gauges: Gauges) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "harness_requests",
            "Requests by route, status, outcome and reason",
            ["route", "status", "outcome", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "harness_request_duration_seconds",
            "Request latency at the front",
            ["route"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        for field, name, _otel, _unit, text in GAUGES:
            Gauge(name, text, registry=self.registry).set_function(getattr(gauges, field))
        self.connections_refused = Counter(
            "harness_connections_refused",
            "Connections closed before a request reached the app (failed or timed-out "
            "handshake, handshake cap, identity, connection cap, header timeout, and requests "
            "refused for their framing: malformed, oversized head, absolute-form target...)",
            ["reason"],
            registry=self.registry,
        )
        # Each label set's children of the requests' counter and histogram. Bounded as the
        # label values are (routes, statuses, outcomes and reasons: small fixed sets).
        self._children: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self.tls_reloads = Counter(
            "harness_tls_reloads", "TLS material reloads", ["outcome"], registry=self.registry
        )

    def observe(self, event: dict[str, Any]) -> None:
        found = measurement(event)
        if found is None:
            return
        metric, labels, latency, count = found
        if metric == "requests":
            key = tuple(labels.values())
            children = self._children.get(key)
            if children is None:  # labels() costs microseconds on every request: once each
                children = self._children[key] = (
                    self.requests.labels(**labels),
                    self.latency.labels(labels["route"]),
                )
            children[0].inc()
            if latency is not None:
                children[1].observe(latency)
        elif metric == "connections_refused":
            self.connections_refused.labels(**labels).inc(count)
        else:
            self.tls_reloads.labels(**labels).inc()


def serve(listen: str, gauges: Gauges) -> FrontMetrics:
    """Start the scrape endpoint on `listen` (loopback, validated by the config)."""
    metrics = FrontMetrics(gauges)
    telemetry.subscribe(metrics.observe)
    host, port = split_listen(listen)
    try:
        start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(
            f"front.metrics_listen {listen}: cannot bind: {exc.strerror}",
            fix="choose a free loopback port, or leave metrics_listen empty",
        ) from exc
    return metrics
