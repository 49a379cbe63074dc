"""The token cache: one entry per (identity, resource), refreshed in the background.

Each entry holds the last good token and at most one in-flight fetch Task. Concurrent callers
of a missing token await the same Task (one upstream request however many callers); a failed
refresh leaves the last good token in place, served until it gets too close to expiry, and an
expired token is never served. The timing rules are pure functions of ``now`` at the top.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

from cachetools import LRUCache

from connectors import errors
from connectors.identity import UPSTREAM, Identity, Token

log = logging.getLogger(__name__)

MAX_MARGIN = 600.0
MAX_RETRY_DELAY = 60.0


def margin(token: Token) -> float:
    """How much life a token must have left to be handed out: min(600 s, 10 % of its lifetime)."""
    return min(MAX_MARGIN, 0.1 * max(token.lifetime, 0.0))


def servable(token: Token, now: float) -> bool:
    return token.expires_on - now >= margin(token)


def refresh_at(token: Token) -> float:
    """When to fetch a successor: the upstream's refresh_in, else half-life, never past servability."""
    due = token.refresh_on if token.refresh_on else token.obtained_at + token.lifetime / 2
    return min(due, token.expires_on - margin(token))


def refresh_backoff(failures: int) -> float:
    """Seconds between background refresh attempts after ``failures`` failed ones in a row."""
    return min(MAX_RETRY_DELAY, 2.0 ** max(failures - 1, 0))


@dataclass(frozen=True)
class TokenKey:
    identity: Identity
    resource: str


@dataclass(frozen=True)
class TokenState:
    """What ``status`` and the metrics show of one entry: times, never the token."""

    identity: str
    resource: str
    expires_on: float | None
    refresh_at: float | None
    refreshing: bool
    failures: int
    last_error: str


@dataclass
class _Entry:
    token: Token | None = None
    inflight: asyncio.Task[Token] | None = None
    timer: asyncio.TimerHandle | None = None
    failures: int = 0
    last_error: str = ""


class _Entries(LRUCache[TokenKey, _Entry]):
    def popitem(self) -> tuple[TokenKey, _Entry]:
        key, entry = super().popitem()
        if entry.timer is not None:
            entry.timer.cancel()
        return key, entry


Fetch = Callable[[TokenKey], Coroutine[object, object, Token]]


@dataclass
class TokenCache:
    fetch: Fetch
    maxsize: int = 256
    clock: Callable[[], float] = time.time
    obtained: int = 0  # tokens fetched successfully since start (readiness, tests)
    _entries: _Entries = field(init=False)
    _tasks: set[asyncio.Task[Token]] = field(init=False, default_factory=set)
    _hold_until: float = field(init=False, default=0.0)
    _closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._entries = _Entries(maxsize=self.maxsize)

    async def get(self, key: TokenKey) -> tuple[Token, bool]:
        """A servable token for ``key`` and whether it came from the cache."""
        if self._closed:
            raise errors.Unreachable(UPSTREAM, "the broker is shutting down")
        entry = self._entries.get(key)
        token = entry.token if entry is not None else None
        if token is not None and servable(token, self.clock()):
            return token, True
        task = entry.inflight if entry is not None else None
        if task is None:
            held = self._hold_until - self.clock()
            if held > 0:
                raise errors.Throttled(UPSTREAM, "holding off after the endpoint answered 429", held)
            if entry is None:
                entry = self._entries[key] = _Entry()
            task = self._start(key, entry)
        # shield: a caller that gives up must not cancel the fetch other callers share.
        return await asyncio.shield(task), False

    def states(self) -> list[TokenState]:
        return [
            TokenState(
                identity=str(key.identity),
                resource=key.resource,
                expires_on=entry.token.expires_on if entry.token else None,
                refresh_at=refresh_at(entry.token) if entry.token else None,
                refreshing=entry.inflight is not None,
                failures=entry.failures,
                last_error=entry.last_error,
            )
            for key, entry in list(self._entries.items())
        ]

    async def close(self) -> None:
        self._closed = True
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # wait() never raises the tasks' own cancellation; a cancellation of ours still propagates.
            await asyncio.shield(asyncio.wait(tasks))

    async def _fetch_servable(self, key: TokenKey) -> Token:
        token = await self.fetch(key)
        left = token.expires_on - self.clock()
        if left < margin(token):
            # Clock skew or a broken upstream: never hand it out, and never refetch it in a loop.
            raise errors.ServerError(UPSTREAM, f"answered with a token that expires in {left:.0f}s", 200)
        return token

    def _start(self, key: TokenKey, entry: _Entry) -> asyncio.Task[Token]:
        task = asyncio.create_task(self._fetch_servable(key), name=f"token-fetch {key.resource}")
        entry.inflight = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._settle(key, entry, t))
        return task

    def _settle(self, key: TokenKey, entry: _Entry, task: asyncio.Task[Token]) -> None:
        self._tasks.discard(task)
        entry.inflight = None
        if task.cancelled() or self._closed:
            return
        now = self.clock()
        exc = task.exception()
        if exc is None:
            token = task.result()
            entry.token, entry.failures, entry.last_error = token, 0, ""
            self.obtained += 1
            self._schedule(key, entry, refresh_at(token) - now)
            return
        entry.failures += 1
        entry.last_error = str(exc)
        if isinstance(exc, errors.Throttled) and exc.retry_after:
            self._hold_until = max(self._hold_until, now + exc.retry_after)
        if entry.token is not None and servable(entry.token, now):
            log.warning(
                "refresh of %s failed (%s); serving the cached token, %.0fs left",
                key.resource, exc, entry.token.expires_on - now,
            )
            delay = max(refresh_backoff(entry.failures), self._hold_until - now)
            self._schedule(key, entry, delay)
        else:
            # Nothing servable to keep: a failed lookup must not take an LRU place from a warm entry.
            if entry.timer is not None:
                entry.timer.cancel()
            current = self._entries.pop(key, None)
            if current is not None and current is not entry:
                self._entries[key] = current

    def _schedule(self, key: TokenKey, entry: _Entry, delay: float) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(max(delay, 0.0), self._refresh, key, entry)

    def _refresh(self, key: TokenKey, entry: _Entry) -> None:
        entry.timer = None
        if self._closed or entry.inflight is not None or self._entries.get(key) is not entry:
            return
        held = self._hold_until - self.clock()
        if held > 0:
            self._schedule(key, entry, held)
            return
        self._start(key, entry)

