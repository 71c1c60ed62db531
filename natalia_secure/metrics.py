"""What `GET /metrics` exposes (Prometheus text format, prometheus_client): counts, latencies and store health.

One registry per daemon (never the process-global one), so tests can run many daemons in one process. No label
ever holds personal data: labels are outcomes, message kinds and delivery statuses only, from small fixed sets
(a label value an attacker can choose would let them grow the registry without bound).

The metrics counted per webhook, message, reply and group commit are `LoopCounter`s and `LoopHistogram`s: plain
numbers, exposed through a collector of their own. They are changed, and read when /metrics is rendered, only on
the event loop's thread, so they need none of the lock prometheus_client's own take on each change (with its
histogram's Python bucket search, ~2% of the daemon's instructions per webhook: bench/README.md). Their exposition
is prometheus_client's but for the histograms' `_created` sample, which they do not have.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# Meta asks for a webhook answer well under its timeout (median <= 250 ms); ours is an fsync away (~0.2 ms, DESIGN.md)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

WEBHOOK_OUTCOMES = ("ok", "bad_signature", "bad_request", "too_large", "unavailable", "stopping", "ignored")
# What WhatsApp sends (developers.facebook.com, webhooks "messages" reference); anything else is counted as "other".
MESSAGE_KINDS = frozenset(
    "text image audio video document sticker location contacts interactive button reaction order system unsupported".split()
)
STATUSES = frozenset(("sent", "delivered", "read", "failed", "deleted", "warning"))


class LoopCounter:
    """A counter with one label from a fixed set, changed on the event loop's thread only (the module docstring says
    why). Each value is listed at 0 from the start (rate() and alerts need the series), or, `listed=False`, from
    its first count on; a value outside the set is refused (KeyError): a bug, never a new series."""

    def __init__(self, name: str, doc: str, label: str, values: Iterable[str], listed: bool = True) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.values = tuple(values)
        now = time.time()
        self.counts = dict.fromkeys(self.values if listed else (), 0.0)
        self.created = dict.fromkeys(self.counts, now)  # per value, as prometheus_client's children have it

    def inc(self, value: str) -> None:
        count = self.counts.get(value)
        if count is None:
            if value not in self.values:
                raise KeyError(f"{self.name}: {value!r} is not one of its {self.label}s")
            self.created[value] = time.time()
            count = 0.0
        self.counts[value] = count + 1.0

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for value, count in self.counts.items():
            family.add_metric([value], count, created=self.created[value])
        return family


class LoopHistogram:
    """A histogram without labels, changed on the event loop's thread only (the module docstring says why)."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, buckets
        self.labels = [floatToGoString(b) for b in (*buckets, float("inf"))]  # type: ignore[no-untyped-call]  # as prometheus_client writes "le"
        self.counts = [0] * (len(buckets) + 1)  # per bucket (the last: above every bound), not yet cumulative
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # the first bound >= amount: Prometheus' "le"
        self.sum += amount

    def family(self) -> Metric:
        cumulative, buckets = 0, []
        for label, count in zip(self.labels, self.counts, strict=True):
            cumulative += count
            buckets.append((label, float(cumulative)))
        family = HistogramMetricFamily(self.name, self.doc)
        family.add_metric([], buckets, self.sum)
        return family


class LoopMetrics:
    """The collector the registry reads LoopCounters and LoopHistograms through."""

    def __init__(self, *metrics: LoopCounter | LoopHistogram) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.family()


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.webhooks = LoopCounter("natalia_webhooks", "Webhook POSTs by outcome", "outcome", WEBHOOK_OUTCOMES)
        self.messages_in = LoopCounter(
            "natalia_messages_received",
            "New customer messages made durable, by kind",
            "kind",
            MESSAGE_KINDS | {"other"},
            listed=False,
        )
        self.statuses = Counter("natalia_statuses", "Delivery statuses received, by status", ["status"], registry=r)
        self.dedup_hits = Counter(
            "natalia_dedup_hits", "Redelivered messages (already claimed) answered without work", registry=r
        )
        self.signature_failures = Counter(
            "natalia_signature_failures", "Webhook POSTs with a missing or wrong signature", registry=r
        )
        self.replies = LoopCounter("natalia_replies", "Replies by outcome", "outcome", ("sent", "failed", "none"))
        self.ack_latency = LoopHistogram(
            "natalia_ack_latency_seconds", "From a webhook's full body to its durable 200", LATENCY_BUCKETS
        )
        self.journal_write = LoopHistogram(
            "natalia_journal_fsync_seconds", "One group commit: write + fsync of a batch", LATENCY_BUCKETS
        )
        r.register(LoopMetrics(self.webhooks, self.messages_in, self.replies, self.ack_latency, self.journal_write))
        self.snapshot_duration = Histogram(
            "natalia_snapshot_duration_seconds", "Periodic snapshots, start to durable", buckets=SNAPSHOT_BUCKETS, registry=r
        )
        self.backup_duration = Histogram(
            "natalia_backup_duration_seconds", "Backups, start to durable", buckets=SNAPSHOT_BUCKETS, registry=r
        )
        # the outbound side (claude.py, graph.py, replies.py)
        self.claude_requests = Counter(
            "natalia_claude_requests", "Messages API calls by outcome (ok, error, fallback)", ["outcome"], registry=r
        )
        self.claude_tokens = Counter(
            "natalia_claude_tokens", "Tokens by type: input, output, cache_read, cache_write", ["type"], registry=r
        )
        self.whatsapp_sends = Counter(
            "natalia_whatsapp_sends", "Graph API sends by kind (text, image, read) and outcome", ["kind", "outcome"], registry=r
        )
        self.whatsapp_errors = Counter(
            "natalia_whatsapp_errors", "Graph API errors by code (a fixed set; others: other)", ["code"], registry=r
        )
        self.window_closed = Counter(
            "natalia_window_closed", "Replies not sent: the 24-hour customer service window had closed", registry=r
        )
        self.resumed = Counter("natalia_replies_resumed", "Replies finished or made at start after a crash or stop", registry=r)
        self.unsure_parts = Counter(
            "natalia_reply_parts_unsure",
            "After a start, reply parts maybe sent before it: confirmed by WhatsApp's status, or sent (again) unconfirmed",
            ["outcome"],
            registry=r,
        )
        for outcome in ("confirmed", "unconfirmed"):
            self.unsure_parts.labels(outcome)
        self._gauges: dict[str, Gauge] = {}

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge computed when scraped (sessions, snapshot age, degraded...)."""
        g = Gauge(name, doc, registry=self.registry)
        g.set_function(read)
        self._gauges[name] = g

    def webhook(self, outcome: str) -> None:
        """Count a webhook POST; `outcome` is one of WEBHOOK_OUTCOMES."""
        self.webhooks.inc(outcome)

    def reply(self, outcome: str) -> None:
        """Count a reply: "sent", "failed" or "none"."""
        self.replies.inc(outcome)

    def message(self, kind: str) -> None:
        self.messages_in.inc(kind if kind in MESSAGE_KINDS else "other")

    def status(self, status: str) -> None:
        self.statuses.labels(status if status in STATUSES else "other").inc()

    def observe(self, what: str, seconds: float) -> None:
        """Maintenance durations ("snapshot" | "backup")."""
        (self.snapshot_duration if what == "snapshot" else self.backup_duration).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
