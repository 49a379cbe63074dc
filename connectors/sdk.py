"""Calls into Azure SDK clients, the same way for every connector: each attempt under a
timeout, every failure put into a ``connectors.errors`` family, retried per ``connectors.retry``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
from azure.core.exceptions import (
    ClientAuthenticationError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.transport import AioHttpTransport

from connectors import errors
from connectors.retry import RetryPolicy, parse_retry_after, retry_delay

log = logging.getLogger(__name__)

T = TypeVar("T")
Observe = Callable[[str, float], None]
StatusFamilies = Mapping[int, type[errors.UpstreamStatus]]


def tls_transport(ca_file: str, timeout: float) -> Any:
    """An azure-core transport whose TLS context, with the extra CA, is built once.

    Given ``connection_verify=<file>``, azure-core parses the file into a new SSLContext for
    every request, on the event loop, and as aiohttp pools connections by context, opens a new
    connection each time. A session whose connector holds one context avoids both.
    """
    context = ssl.create_default_context(cafile=ca_file)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context), trust_env=True)
    return AioHttpTransport(session=session, session_owner=True, connection_timeout=timeout, read_timeout=timeout)


def classify(
    exc: BaseException, upstream: str, timeout: float, statuses: StatusFamilies | None = None
) -> errors.ConnectorError:
    """Put any failure of an SDK call into one of the connector error families.

    ``statuses`` picks the family of particular 4xx answers (a vault's 404 is "no such secret",
    an identity endpoint's 404 is just a refusal).
    """
    if isinstance(exc, (TimeoutError, ServiceRequestTimeoutError, ServiceResponseTimeoutError)):
        return errors.TimedOut(upstream, f"no answer within {timeout:g}s")
    response: Any = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if response is None or not isinstance(status, int):
        if isinstance(exc, ServiceRequestError):
            return errors.Unreachable(upstream, "cannot connect")
        if isinstance(exc, OSError) and exc.filename:
            # A local file the SDK needs (a federated token, Arc's challenge key): not the network,
            # and asking again will not help.
            return errors.Rejected(upstream, f"cannot read {exc.filename}: {exc.strerror}", 0)
        if isinstance(exc, (ServiceResponseError, OSError)):
            return errors.Unreachable(upstream, "connection dropped before an answer")
        if isinstance(exc, (ValueError, ClientAuthenticationError)):
            # The SDK refusing its own inputs or the answer (an http:// authority, a challenge for
            # a resource outside the vault's domain): a mistake that retrying does not mend.
            return errors.Rejected(upstream, f"refused by the client library: {errors.safe_text(str(exc))}", 0)
        return errors.ServerError(upstream, f"unusable answer ({type(exc).__name__})", 0)
    code, description = error_fields(response)
    what = f"answered {status}" + (f" {code}" if code else "") + (f": {description}" if description else "")
    if status == 429:
        return errors.Throttled(upstream, what, parse_retry_after(response.headers.get("Retry-After")))
    if status >= 500 or 200 <= status < 300:
        return errors.ServerError(upstream, what, status, code)
    family = (statuses or {}).get(status, errors.Rejected)
    return family(upstream, what, status, code)


def error_fields(response: Any) -> tuple[str, str]:
    """An error body's code and message, made safe to show.

    OAuth endpoints answer ``{"error": code, "error_description": text}``; Azure data planes
    ``{"error": {"code", "message", "innererror": {"code"}}}``, where the inner code says *why*.
    """
    try:
        body = json.loads(response.text())
    except Exception:  # a non-JSON body has nothing we want to repeat
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    error = body.get("error")
    if isinstance(error, dict):
        code, description = error.get("code") or "", error.get("message") or ""
        inner = error.get("innererror")
        if isinstance(inner, dict) and inner.get("code"):
            code = inner["code"]
    else:
        code, description = error or "", body.get("error_description") or ""
    return errors.safe_text(str(code), 60), errors.safe_text(str(description))


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    upstream: str,
    what: str,
    policy: RetryPolicy,
    classify_failure: Callable[[BaseException], errors.ConnectorError],
    observe: Observe | None = None,
    rand: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run ``attempt`` until it succeeds or ``policy`` says to give up.

    A ``ConnectorError`` raised inside an attempt passes through untried again: it comes from
    a layer that has done its own retrying (the token source behind a vault) or is a refusal.
    """

    def note(outcome: str, started: float) -> None:
        if observe is not None:
            observe(outcome, time.monotonic() - started)

    number = 0
    first = time.monotonic()
    while True:
        number += 1
        started = time.monotonic()
        try:
            async with asyncio.timeout(policy.timeout):
                result = await attempt()
        except errors.ConnectorError as exc:
            note(type(exc).__name__, started)
            raise
        except Exception as exc:  # every SDK failure is classified, none escapes raw
            error = classify_failure(exc)
            note(type(error).__name__, started)
            delay = retry_delay(policy, number, error, rand(), time.monotonic() - first)
            if delay is None:
                raise error from None
            log.info(
                "%s attempt %d for %s failed (%s); retrying in %.1fs", upstream, number, what, error.message, delay
            )
            await sleep(delay)
            continue
        note("ok", started)
        return result
