"""Failures of outside systems, in families the broker maps to HTTP statuses.

Messages are built by us from status codes and upstream error codes, never from response
bodies wholesale, so a token or secret value cannot ride along.
"""

from __future__ import annotations

import re


class ConnectorError(Exception):
    """Base of every failure talking to an outside system."""

    def __init__(self, upstream: str, message: str) -> None:
        super().__init__(f"{upstream}: {message}")
        self.upstream = upstream
        self.message = message


class Unreachable(ConnectorError):
    """Could not connect, or the connection dropped before an answer."""


class TimedOut(ConnectorError):
    """The upstream did not answer within the timeout."""


class Throttled(ConnectorError):
    """The upstream answered 429; ``retry_after`` is its Retry-After in seconds, if given."""

    def __init__(self, upstream: str, message: str, retry_after: float | None) -> None:
        super().__init__(upstream, message)
        self.retry_after = retry_after


class UpstreamStatus(ConnectorError):
    """The upstream answered with an error status (or an unusable body)."""

    def __init__(self, upstream: str, message: str, status: int, code: str = "") -> None:
        super().__init__(upstream, message)
        self.status = status
        self.code = code


class ServerError(UpstreamStatus):
    """5xx or a malformed answer: transient from the caller's point of view."""


class Rejected(UpstreamStatus):
    """A 4xx other than 429: the request itself was refused; retrying will not help."""


class NotFound(Rejected):
    """404 from a data store (a secret that does not exist)."""


class Forbidden(Rejected):
    """403 from a data store (no access, or a disabled secret)."""


TRANSIENT: tuple[type[ConnectorError], ...] = (Unreachable, TimedOut, Throttled, ServerError)


_JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}(?:\.[A-Za-z0-9_-]*)?")


def safe_text(text: str, limit: int = 200) -> str:
    """Upstream-provided text made fit for an error message: JWT-shaped runs masked, length capped."""
    text = _JWT_LIKE.sub("[redacted]", " ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"
