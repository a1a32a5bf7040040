"""Prometheus metrics of one :class:`~geotarget.alerts.engine.AlertEngine` (optional extra).

Install with ``pip install "geotarget[metrics]"`` (``prometheus-client``).  The
engine never imports this module unless it is given ``metrics=``; without it
the engine keeps no metrics and needs no ``prometheus-client``.

Each :class:`EngineMetrics` owns its own ``CollectorRegistry``, not the
process-wide default one, so two engines in one process (two logs, or a test
next to a service) never register the same series twice.  Serve it with the
client's own HTTP server, bound to the loopback interface (a reverse proxy or
the node's Prometheus agent reaches it there)::

    from prometheus_client import start_http_server
    from geotarget.alerts.metrics import EngineMetrics

    metrics = EngineMetrics()
    engine = AlertEngine(index, log, authority, metrics=metrics)
    start_http_server(9464, addr="127.0.0.1", registry=metrics.registry)

``examples/serve_metrics.py`` runs this end to end.  The series (all prefixed
``geotarget_``; ``docs/operations.md``, "Metrics", says what to watch):

============================================  =========  ========================================
name                                          type       labels
============================================  =========  ========================================
``geotarget_pushes_total``                    counter    ``kind``, ``status`` (Actual / Exercise)
``geotarget_recipients_total``                counter    ``kind``, ``status``
``geotarget_stage_seconds``                   histogram  ``stage`` (query, log, batches)
``geotarget_outbox_depth``                    gauge      -
``geotarget_quarantined_alerts``              gauge      -
``geotarget_verification_failures_total``     counter    ``check`` (index, log, verify)
============================================  =========  ========================================

Pushes and recipients are counted once, when the push is logged (a push
offered again from the outbox after a restart is not a new push).  A drill's
pushes carry ``status="Exercise"``, as their CAP does, so a dashboard summing
``status="Actual"`` never counts one.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Stage latency buckets (seconds): a log commit takes about a millisecond, a
#: ring query at national scale tens to hundreds of milliseconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: What a verification failure was found in: the index bound to the log (its
#: lineage, generation or bytes), the log's records read for a push, or a full
#: ``AlertEngine.verify``.
CHECKS = ("index", "log", "verify")
STAGES = ("query", "log", "batches")


class EngineMetrics:
    """The series of one engine, in a registry of their own (``registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        if registry is not None and not isinstance(registry, CollectorRegistry):
            from ..errors import InvalidInputError
            raise InvalidInputError(f"registry must be a prometheus_client.CollectorRegistry or None, "
                                    f"got {type(registry).__name__}")
        #: Where the series live; give it to ``start_http_server`` or ``generate_latest``.
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.pushes = Counter("geotarget_pushes", "Pushes logged, by kind and CAP status",
                              ["kind", "status"], registry=r)
        self.recipients = Counter("geotarget_recipients", "Devices in the pushes logged, by kind and CAP "
                                  "status", ["kind", "status"], registry=r)
        self.stage = Histogram("geotarget_stage_seconds", "Wall time of one push's stage: the ring query, "
                               "the durable log write, building the per-app batches", ["stage"],
                               registry=r, buckets=LATENCY_BUCKETS)
        self.outbox = Gauge("geotarget_outbox_depth", "Pushes logged but not acknowledged by a dispatcher",
                            registry=r)
        self.quarantined = Gauge("geotarget_quarantined_alerts", "Open alerts the engine skips until an "
                                 "officer updates or retracts them", registry=r)
        self.verification_failures = Counter(
            "geotarget_verification_failures", "Integrity checks that refused a file or a record "
            "(CorruptFileError, LineageError)", ["check"], registry=r)
        # every labelled series exists from the start, at zero, so a rate() has a baseline
        for c in CHECKS:
            self.verification_failures.labels(check=c)
        for s in STAGES:
            self.stage.labels(stage=s)

    def observe_push(self, push) -> None:
        """A push was logged: count it and its recipients, and its stage timings."""
        status = "Exercise" if push.drill else "Actual"
        self.pushes.labels(kind=push.kind, status=status).inc()
        self.recipients.labels(kind=push.kind, status=status).inc(len(push))
        for stage in ("query", "log"):
            ms = push.timings.get(f"{stage}_ms")
            if ms is not None:
                self.stage.labels(stage=stage).observe(ms / 1e3)
        self.outbox.inc()

    def batches(self, push):
        """``push.batches``, timed into ``geotarget_stage_seconds{stage="batches"}``.

        The engine never builds the per-app batches (the dispatcher does, when it
        sends), so a dispatcher that wants the stage measured calls this.
        """
        t0 = time.perf_counter()
        out = push.batches
        self.stage.labels(stage="batches").observe(time.perf_counter() - t0)
        return out

    def verification_failed(self, exc: BaseException, check: str) -> None:
        """Count ``exc`` once, however many layers it is seen in on its way out."""
        if getattr(exc, "_geotarget_counted", False):
            return
        try:
            exc._geotarget_counted = True
        except AttributeError:  # pragma: no cover - every GeotargetError takes attributes
            pass
        self.verification_failures.labels(check=check).inc()

    def value(self, name: str, **labels) -> float:
        """One sample's value (0.0 if absent): ``value("geotarget_pushes_total", kind="alert", status="Actual")``."""
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else v
