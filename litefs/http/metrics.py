"""Prometheus metrics of one node, in a registry of its own."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from litefs.store import Store


class _PositionCollector(Collector):
    """Reads positions from the store at scrape time rather than tracking them."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self):  # type: ignore[no-untyped-def]
        txid = GaugeMetricFamily("litefs_db_txid", "Last TXID of each database", labels=["db"])
        for name, position in self.store.positions().items():
            txid.add_metric([name], position.txid)
        yield txid
        primary = GaugeMetricFamily("litefs_is_primary", "1 when this node is the primary")
        primary.add_metric([], 1 if self.store.is_primary else 0)
        yield primary


class Metrics:
    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.transactions = Counter(
            "litefs_transactions",
            "Transactions captured (primary) or applied (replica)",
            ["db"],
            registry=self.registry,
        )
        self.ltx_bytes = Counter(
            "litefs_ltx_bytes",
            "LTX bytes sent to replicas (primary) or received (replica)",
            registry=self.registry,
        )
        self.replica_lag = Gauge(
            "litefs_replica_lag_seconds",
            "Age of the newest applied transaction when it was applied (replica)",
            registry=self.registry,
        )
        self.connected_replicas = Gauge(
            "litefs_connected_replicas",
            "Replicas streaming from this node (primary)",
            registry=self.registry,
        )
        self.snapshots = Counter(
            "litefs_snapshots",
            "Snapshots sent (primary) or applied (replica)",
            registry=self.registry,
        )
        self.registry.register(_PositionCollector(store))

    def applied(self, db: str, timestamp_ms: int) -> None:
        self.transactions.labels(db).inc()
        self.replica_lag.set(max(0.0, time.time() - timestamp_ms / 1000))

    def render(self) -> bytes:
        return generate_latest(self.registry)
