"""The daemon's own counters and histograms (metrics.py): the same exposition as prometheus_client's for the same
changes, but for the histograms' `_created` sample."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.utils import floatToGoString

from natalia_secure.metrics import LATENCY_BUCKETS, LoopCounter, LoopHistogram, LoopMetrics, Metrics


def exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False) | st.sampled_from(LATENCY_BUCKETS), max_size=40))
def test_a_loop_histogram_exposes_what_a_prometheus_histogram_would(amounts: list[float]) -> None:
    """Bucket edges included: an amount equal to a bound counts in that bound's bucket ("le")."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = LoopHistogram("natalia_x_seconds", "help", LATENCY_BUCKETS)
    ours.register(LoopMetrics(histogram))
    reference = Histogram("natalia_x_seconds", "help", buckets=LATENCY_BUCKETS, registry=theirs)
    for amount in amounts:
        histogram.observe(amount)
        reference.observe(amount)
    assert exposition(ours) == exposition(theirs)


def test_a_loop_counter_exposes_what_a_prometheus_counter_would_created_sample_included() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = LoopCounter("natalia_x", "help", "outcome", ("ok", "failed", "other"))
    ours.register(LoopMetrics(counter))
    reference = Counter("natalia_x", "help", ["outcome"], registry=theirs)
    for outcome in ("ok", "failed", "other"):
        reference.labels(outcome)
    for outcome in ("ok", "ok", "other", "failed", "ok"):
        counter.inc(outcome)
        reference.labels(outcome).inc()
    assert exposition(ours) == exposition(theirs)
    created = floatToGoString(counter.created["ok"])  # type: ignore[no-untyped-call]
    assert f'natalia_x_created{{outcome="ok"}} {created}' in generate_latest(ours).decode()


def test_a_value_listed_from_its_first_count_is_created_then() -> None:
    """As prometheus_client creates a child at its first labels() call: its _created is then, not the start's."""
    counter = LoopCounter("natalia_x", "help", "kind", ("text", "image"), listed=False)
    time.sleep(0.01)
    first = time.time()
    counter.inc("text")
    counter.inc("text")
    text = generate_latest(_registry(counter)).decode()
    assert 'natalia_x_total{kind="text"} 2.0' in text and "image" not in text
    assert set(counter.created) == {"text"} and first <= counter.created["text"] <= time.time()


def _registry(*metrics: LoopCounter | LoopHistogram) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(LoopMetrics(*metrics))
    return registry


def test_the_daemon_metrics_list_each_series_from_the_start_and_message_kinds_once_seen() -> None:
    metrics = Metrics()
    text = metrics.render()[0].decode()
    assert 'natalia_webhooks_total{outcome="unavailable"} 0.0' in text and 'natalia_replies_total{outcome="none"} 0.0' in text
    assert "natalia_messages_received_total{" not in text and "natalia_ack_latency_seconds_count 0.0" in text
    metrics.message("text")
    metrics.message("a kind nobody sends")
    metrics.webhook("ok")
    metrics.ack_latency.observe(0.003)
    text = metrics.render()[0].decode()
    assert 'natalia_messages_received_total{kind="text"} 1.0' in text and 'kind="other"} 1.0' in text
    assert 'natalia_webhooks_total{outcome="ok"} 1.0' in text and 'natalia_ack_latency_seconds_bucket{le="0.005"} 1.0' in text


def test_an_unknown_webhook_outcome_is_a_bug_not_a_new_series() -> None:
    """Outcomes are a fixed set (a label an attacker could choose would grow the registry): counting another is
    refused by the caller's method, as prometheus_client's labels() would have accepted it."""
    metrics = Metrics()
    with pytest.raises(KeyError):
        metrics.webhook("made up")
