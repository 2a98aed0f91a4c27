"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from edge_tl.core.importer import require

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5,
                   1.0, 2.5, 5.0)


class Metrics:
    """``requests`` and ``errors`` by endpoint and status code, queue depth, in-flight requests, request and
    inference latency histograms, batch sizes, model version info and reloads."""

    def __init__(self) -> None:
        prom = require("prometheus_client", "the /metrics endpoint")
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("edge_tl_requests", "HTTP requests handled", ["endpoint", "code"], registry=r)
        self.errors = prom.Counter("edge_tl_request_errors", "HTTP requests answered with a 4xx/5xx status",
                                   ["endpoint", "code"], registry=r)
        self.request_latency = prom.Histogram("edge_tl_request_latency_seconds", "Time from request to response",
                                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_latency = prom.Histogram("edge_tl_inference_latency_seconds",
                                                "Time in the runner for one (possibly batched) call",
                                                buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = prom.Histogram("edge_tl_queue_wait_seconds", "Time a request waited for an inference worker",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = prom.Histogram("edge_tl_batch_size", "Images per runner call",
                                         buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_depth = prom.Gauge("edge_tl_queue_depth", "Requests waiting for an inference worker", registry=r)
        self.in_flight = prom.Gauge("edge_tl_requests_in_flight", "Requests being handled", registry=r)
        self.model_info = prom.Gauge("edge_tl_model_info", "The model being served (value 1)",
                                     ["name", "version", "backend", "precision"], registry=r)
        self.reloads = prom.Counter("edge_tl_model_reloads", "Hot reloads of the active model", ["result"], registry=r)
        self.captured = prom.Counter("edge_tl_captured", "Pictures kept by --capture (edge_tl.device.capture)",
                                     ["reason"], registry=r)
        self.drift_psi = prom.Gauge("edge_tl_drift_psi", "Population stability index of the last window of requests "
                                    "against the build's validation reference (edge_tl.core.drift); NaN until the "
                                    "window is full", ["signal"], registry=r)
        self.drift = prom.Gauge("edge_tl_drift", "1 when the signal's PSI is above the bundle's drift threshold",
                                ["signal"], registry=r)
        self.drift_threshold = prom.Gauge("edge_tl_drift_threshold", "The PSI above which the bundle calls the signal "
                                          "drifted (fitted by the build, one per signal)", ["signal"], registry=r)
        self.answers = prom.Counter("edge_tl_classify_answers", "/classify answers, by whether the bundle's OOD rule "
                                    "called the picture unknown (none: the bundle has no rule)", ["unknown"],
                                    registry=r)

    def set_model(self, name: str, version: str, backend: str, precision: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, backend, precision).set(1)

    def set_drift(self, status: dict | None) -> None:
        """The served model's drift status (DriftMonitor.status()), or None: no reference in its bundle."""
        self.drift_psi.clear()
        self.drift.clear()
        self.drift_threshold.clear()
        for signal, st in (status or {}).items():
            self.drift_psi.labels(signal).set(float("nan") if st["psi"] is None else st["psi"])
            self.drift.labels(signal).set(1 if st["drifted"] else 0)
            self.drift_threshold.labels(signal).set(st["threshold"])

    def render(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
