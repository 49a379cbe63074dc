"""Per-client token buckets: ``rate`` requests per second with a burst of twice that (at least one)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Bucket:
    rate: float
    tokens: float
    updated: float

    @property
    def burst(self) -> float:
        # Below 0.5 requests/s twice the rate is under one request: the bucket would never allow any.
        return max(1.0, 2 * self.rate)

    @classmethod
    def full(cls, rate: float, now: float) -> Bucket:
        return cls(rate=rate, tokens=max(1.0, 2 * rate), updated=now)

    def take(self, now: float) -> float:
        """Spend one request; 0 if allowed, else the seconds until one is."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class RateLimiter:
    buckets: dict[str, Bucket]

    @classmethod
    def empty(cls) -> RateLimiter:
        return cls({})

    def check(self, client: str, rate: float, now: float) -> float:
        if rate <= 0:
            return 0.0
        bucket = self.buckets.get(client)
        if bucket is None:
            bucket = self.buckets[client] = Bucket.full(rate, now)
        return bucket.take(now)
