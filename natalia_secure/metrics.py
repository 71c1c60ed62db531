"""What `GET /metrics` exposes (Prometheus text format, prometheus_client): counts, latencies and store health.

One registry per daemon (never the process-global one), so tests can run many daemons in one process. No label
ever holds personal data: labels are outcomes, message kinds and delivery statuses only, from small fixed sets
(a label value an attacker can choose would let them grow the registry without bound).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Meta asks for a webhook answer well under its timeout (median <= 250 ms); ours is an fsync away (~0.2 ms, DESIGN.md)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

WEBHOOK_OUTCOMES = ("ok", "bad_signature", "bad_request", "too_large", "unavailable", "stopping", "ignored")
# What WhatsApp sends (developers.facebook.com, webhooks "messages" reference); anything else is counted as "other".
MESSAGE_KINDS = frozenset(
    "text image audio video document sticker location contacts interactive button reaction order system unsupported".split()
)
STATUSES = frozenset(("sent", "delivered", "read", "failed", "deleted", "warning"))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.webhooks = Counter("natalia_webhooks", "Webhook POSTs by outcome", ["outcome"], registry=r)
        self.messages_in = Counter(
            "natalia_messages_received", "New customer messages made durable, by kind", ["kind"], registry=r
        )
        self.statuses = Counter("natalia_statuses", "Delivery statuses received, by status", ["status"], registry=r)
        self.dedup_hits = Counter(
            "natalia_dedup_hits", "Redelivered messages (already claimed) answered without work", registry=r
        )
        self.signature_failures = Counter(
            "natalia_signature_failures", "Webhook POSTs with a missing or wrong signature", registry=r
        )
        self.replies = Counter("natalia_replies", "Replies by outcome", ["outcome"], registry=r)
        self.ack_latency = Histogram(
            "natalia_ack_latency_seconds", "From a webhook's full body to its durable 200", buckets=LATENCY_BUCKETS, registry=r
        )
        self.journal_write = Histogram(
            "natalia_journal_fsync_seconds", "One group commit: write + fsync of a batch", buckets=LATENCY_BUCKETS, registry=r
        )
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
        # Present at 0 from the start (rate() and alerts need the series to exist), and kept: labels() costs ~1.5 us
        # a call (a lock and a lookup), which counting each webhook, message and reply paid (bench/webhook.py).
        self._webhooks = {outcome: self.webhooks.labels(outcome) for outcome in WEBHOOK_OUTCOMES}
        self._replies = {outcome: self.replies.labels(outcome) for outcome in ("sent", "failed", "none")}
        self._kinds: dict[str, Counter] = {}

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge computed when scraped (sessions, snapshot age, degraded...)."""
        g = Gauge(name, doc, registry=self.registry)
        g.set_function(read)
        self._gauges[name] = g

    def webhook(self, outcome: str) -> None:
        """Count a webhook POST; `outcome` is one of WEBHOOK_OUTCOMES."""
        self._webhooks[outcome].inc()

    def reply(self, outcome: str) -> None:
        """Count a reply: "sent", "failed" or "none"."""
        self._replies[outcome].inc()

    def message(self, kind: str) -> None:
        label = kind if kind in MESSAGE_KINDS else "other"
        child = self._kinds.get(label)
        if child is None:  # created at the first message of its kind, so /metrics lists only kinds seen
            child = self._kinds[label] = self.messages_in.labels(label)
        child.inc()

    def status(self, status: str) -> None:
        self.statuses.labels(status if status in STATUSES else "other").inc()

    def observe(self, what: str, seconds: float) -> None:
        """Maintenance durations ("snapshot" | "backup")."""
        (self.snapshot_duration if what == "snapshot" else self.backup_duration).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
