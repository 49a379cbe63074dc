"""The broker's errors, and the one place they (and connector errors) become HTTP statuses."""

from __future__ import annotations

from dataclasses import dataclass

from connectors import errors as upstream


class BrokerError(Exception):
    """Base of every error the broker reports to a caller."""

    code = "internal_error"

    def __init__(self, description: str, *, retry_after: float | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.retry_after = retry_after


class ConfigError(BrokerError):
    """Invalid configuration; ``problems`` holds one ``key: message`` line each."""

    code = "bad_config"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


class BadRequest(BrokerError):
    code = "invalid_request"


class Unauthorized(BrokerError):
    code = "unauthorized"


class Forbidden(BrokerError):
    code = "forbidden"


class NotFound(BrokerError):
    code = "not_found"


class PayloadTooLarge(BrokerError):
    code = "payload_too_large"


class RateLimited(BrokerError):
    code = "rate_limited"


class UpstreamFailed(BrokerError):
    code = "upstream_error"


class Unavailable(BrokerError):
    code = "unavailable"


class UpstreamTimeout(BrokerError):
    code = "upstream_timeout"


_STATUS: dict[type[BrokerError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    PayloadTooLarge: 413,
    RateLimited: 429,
    UpstreamFailed: 502,
    Unavailable: 503,
    UpstreamTimeout: 504,
}


@dataclass(frozen=True)
class ErrorReply:
    status: int
    code: str
    description: str
    retry_after: float | None = None


def from_upstream(exc: upstream.ConnectorError) -> BrokerError:
    """Translate a connector failure into the broker error a caller sees."""
    what = f"{exc.upstream}: {exc.message}"
    if isinstance(exc, upstream.Throttled):
        return Unavailable(f"{what} (throttled)", retry_after=exc.retry_after or 1.0)
    if isinstance(exc, upstream.Unreachable):
        return Unavailable(what, retry_after=1.0)
    if isinstance(exc, upstream.TimedOut):
        return UpstreamTimeout(what)
    if isinstance(exc, upstream.NotFound):
        return NotFound(what)
    if isinstance(exc, upstream.Forbidden):
        return Forbidden(what)
    return UpstreamFailed(what)


def reply_for(exc: BaseException) -> ErrorReply:
    """The status, code and text for any exception reaching the HTTP layer."""
    if isinstance(exc, upstream.ConnectorError):
        exc = from_upstream(exc)
    if isinstance(exc, BrokerError):
        for cls in type(exc).__mro__:
            if cls in _STATUS:
                return ErrorReply(_STATUS[cls], exc.code, exc.description, exc.retry_after)
    return ErrorReply(500, "internal_error", "internal error; see the broker's log")
