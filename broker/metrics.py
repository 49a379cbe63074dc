"""Prometheus metrics. Labels carry resource, vault and outcome names, never a token or value."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.tokens import TokenState

OTHER = "other"
MAX_LABEL_VALUES = 64


class _Bounded:
    """Label values as asked until ``limit`` distinct ones are seen, then ``other``.

    Callers choose resource strings; without a bound a client with ``resources = ["*"]`` could
    grow the metrics without end.
    """

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


class _TokenExpiry(Collector):
    def __init__(self, states: Callable[[], list[TokenState]], label: _Bounded) -> None:
        self._states = states
        self._label = label

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "tokenbroker_token_expires_in_seconds",
            "Seconds until each cached token expires",
            labels=["resource", "identity"],
        )
        now = time.time()
        for state in self._states():
            if state.expires_on is not None:
                gauge.add_metric([self._label(state.resource), state.identity], state.expires_on - now)
        yield gauge


def _observer(histogram: Histogram, label: str) -> Callable[[str, float], None]:
    def observe(outcome: str, seconds: float) -> None:
        histogram.labels(label, outcome).observe(seconds)

    return observe


class Metrics:
    def __init__(self, resources: Iterable[str] = (), vaults: Iterable[str] = ()) -> None:
        """``resources`` and ``vaults``: the configured ones, labelled whatever their outcome."""
        self.registry = CollectorRegistry()
        self.resource_label = _Bounded()
        self._known_resources = frozenset(resources)
        self._known_vaults = frozenset(vaults)
        self.token_requests = Counter(
            "tokenbroker_token_requests",
            "Token requests by resource and outcome (hit, miss, denied, error)",
            ["resource", "outcome"],
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "tokenbroker_upstream_request_seconds",
            "Time of each upstream attempt, by upstream and outcome",
            ["upstream", "outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.http_requests = Counter(
            "tokenbroker_http_requests",
            "HTTP requests served, by route and status",
            ["route", "status"],
            registry=self.registry,
        )

        self.secret_requests = Counter(
            "tokenbroker_secret_requests",
            "Secret requests by vault and outcome (hit, miss, stale, error, denied, unknown)",
            ["vault", "outcome"],
            registry=self.registry,
        )
        self.vault_seconds = Histogram(
            "tokenbroker_vault_request_seconds",
            "Time of each Key Vault attempt, by vault and outcome",
            ["vault", "outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

    def watch_secrets(self, size: Callable[[], int]) -> None:
        gauge = Gauge("tokenbroker_secret_cache_entries", "Secrets held in the cache", registry=self.registry)
        gauge.set_function(lambda: float(size()))

    def secret_request(self, vault: str, outcome: str) -> None:
        self.secret_requests.labels(vault if vault in self._known_vaults else OTHER, outcome).inc()

    def vault(self, alias: str) -> Callable[[str, float], None]:
        """The per-attempt latency hook for a vault client."""
        return _observer(self.vault_seconds, alias)

    def watch_tokens(self, states: Callable[[], list[TokenState]]) -> None:
        self.registry.register(_TokenExpiry(states, self.resource_label))

    def token_request(self, resource: str, outcome: str) -> None:
        # Only what is configured, or what a caller really obtained, may take a label: denied or
        # failed requests for made-up resources must not use up the slots real ones need.
        if resource in self._known_resources or outcome in ("hit", "miss"):
            label = self.resource_label(resource)
        else:
            label = OTHER
        self.token_requests.labels(label, outcome).inc()

    def upstream(self, upstream: str) -> Callable[[str, float], None]:
        """The per-attempt latency hook for an upstream client."""
        return _observer(self.upstream_seconds, upstream)

    def render(self) -> bytes:
        return generate_latest(self.registry)
