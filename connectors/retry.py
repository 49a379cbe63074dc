"""When to try an upstream again, as pure functions of the failure and the attempt number."""

from __future__ import annotations

from dataclasses import dataclass

from connectors import errors


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    timeout: float = 10.0  # seconds per attempt
    base_delay: float = 0.5
    max_delay: float = 8.0
    # A Retry-After longer than this ends the fetch instead of sleeping through it: the caller
    # gets 503 with the Retry-After at once, and the token cache holds off the upstream.
    max_retry_after: float = 2.0
    # No retry starts later than this many seconds after the first attempt did.
    deadline: float = 30.0


def retry_delay(
    policy: RetryPolicy, attempt: int, error: errors.ConnectorError, jitter: float, elapsed: float = 0.0
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``, or None to give up.

    ``attempt`` counts from 1; ``elapsed`` is the time since the first attempt started;
    ``jitter`` is a random number in [0, 1) (the wait is spread over half to all of the backoff,
    so retries of many brokers do not synchronise).
    """
    delay = _delay(policy, attempt, error, jitter)
    if delay is None or elapsed + delay > policy.deadline:
        return None
    return delay


def _delay(policy: RetryPolicy, attempt: int, error: errors.ConnectorError, jitter: float) -> float | None:
    if attempt >= policy.attempts:
        return None
    if isinstance(error, errors.Throttled):
        wait = error.retry_after
        if wait is not None:
            return float(wait) if wait <= policy.max_retry_after else None
    elif isinstance(error, errors.Rejected):
        # 410 is IMDS saying "updating, come back": the one 4xx worth another try.
        if error.status != 410:
            return None
    elif not isinstance(error, errors.TRANSIENT):
        return None
    backoff = min(policy.max_delay, policy.base_delay * 2.0 ** (attempt - 1))
    return backoff * (0.5 + jitter / 2)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds; HTTP-dates are rare from Azure token endpoints and read as 'unknown'."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return max(0.0, min(seconds, 3600.0))
