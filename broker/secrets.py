"""The secret cache: one entry per (vault, name, version), bounded, single-flight.

The latest version of a secret is fresh for its vault's ``cache_ttl``; a named version never
changes and is kept until evicted. Each entry holds the last good value and at most one
in-flight fetch Task that concurrent callers share. When the vault fails transiently, a value
up to ``stale_if_error`` past its TTL is served as "stale"; a 403 or 404 is passed on and
drops the cached copies, so the cache never hides a revoked or deleted secret. A 429 with
Retry-After holds off the whole vault. A disabled, expired or not-yet-valid secret is never
served, cached or not. The timing rules are pure functions of ``now`` at the top.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Literal

from cachetools import LRUCache

from broker.errors import Forbidden, NotFound, Unavailable
from connectors import errors
from connectors.keyvault import Secret

log = logging.getLogger(__name__)

Outcome = Literal["hit", "miss", "stale"]

REFRESH_AHEAD_AT = 0.75  # share of the TTL after which an often-read latest entry is refetched
REFRESH_AHEAD_READS = 2  # "often": reads since the fetch
UNAVAILABLE_RETRY_AFTER = 1.0


@dataclass(frozen=True)
class SecretKey:
    vault: str
    name: str
    version: str  # "" = the latest


@dataclass(frozen=True)
class VaultRules:
    cache_ttl: float
    stale_if_error: float


@dataclass(frozen=True)
class SecretState:
    """What ``status`` shows of one entry: never the value."""

    vault: str
    name: str
    version: str
    age: float
    stale: bool
    reads: int  # hits since the value was fetched


def fresh(key: SecretKey, fetched_at: float, rules: VaultRules, now: float) -> bool:
    # A named version is immutable: only eviction ends its stay.
    return bool(key.version) or now - fetched_at < rules.cache_ttl


def stale_servable(fetched_at: float, rules: VaultRules, now: float) -> bool:
    """Whether a value may stand in for the vault while it fails transiently."""
    return now - fetched_at <= rules.cache_ttl + rules.stale_if_error


def refresh_due(key: SecretKey, fetched_at: float, reads: int, rules: VaultRules, now: float) -> bool:
    """Refresh-ahead, so a secret read often never makes a caller wait for the vault."""
    return (
        not key.version
        and reads >= REFRESH_AHEAD_READS
        and now - fetched_at >= REFRESH_AHEAD_AT * rules.cache_ttl
    )


def refusal(secret: Secret, now: float) -> str | None:
    """Why ``secret`` must not be handed out at ``now``, or None if it may."""
    if not secret.enabled:
        return "disabled"
    if secret.expires_on is not None and secret.expires_on.timestamp() <= now:
        return "expired"
    if secret.not_before is not None and secret.not_before.timestamp() > now:
        return "not yet valid"
    return None


@dataclass
class _Entry:
    secret: Secret | None = None
    fetched_at: float = 0.0  # when the request for ``secret`` was sent
    reads: int = 0
    inflight: asyncio.Task[Secret] | None = None


Fetch = Callable[[SecretKey], Coroutine[object, object, Secret]]


class SecretCache:
    def __init__(
        self,
        rules: Mapping[str, VaultRules],
        fetch: Fetch,
        *,
        maxsize: int = 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rules = rules
        self._fetch = fetch
        self._clock = clock
        self._entries: LRUCache[SecretKey, _Entry] = LRUCache(maxsize=maxsize)
        self._tasks: set[asyncio.Task[Secret]] = set()
        self._hold_until: dict[str, float] = {}  # vault alias -> end of its 429 back-off
        self._closed = False

    async def get(self, key: SecretKey) -> tuple[Secret, Outcome]:
        """A servable secret for ``key``, and whether it was a cache hit, a fetch or a stale copy."""
        if self._closed:
            raise errors.Unreachable(f"vault {key.vault}", "the broker is shutting down")
        rules = self._rules.get(key.vault)
        if rules is None:
            raise NotFound(f"no vault named {key.vault!r}")
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry()  # enters the LRU only with its first fetch, so failed misses leave no trace
        if entry.secret is not None and fresh(key, entry.fetched_at, rules, now):
            entry.reads += 1
            if (
                entry.inflight is None
                and refresh_due(key, entry.fetched_at, entry.reads, rules, now)
                and self._held(key.vault, now) <= 0
            ):
                self._start(key, entry)
            return _checked(key, entry.secret, now), "hit"
        try:
            task = entry.inflight
            if task is None:
                held = self._held(key.vault, now)
                if held > 0:
                    raise errors.Throttled(
                        f"vault {key.vault}", "holding off after the vault answered 429", held
                    )
                task = self._start(key, entry)
            # shield: a caller that gives up must not cancel the fetch other callers share.
            secret = await asyncio.shield(task)
        except errors.TRANSIENT as exc:
            return self._stale(key, entry, rules, exc), "stale"
        return _checked(key, secret, self._clock()), "miss"

    def drop(self, vault: str | None = None, name: str | None = None) -> int:
        """Forget the entries of ``vault`` (all if None) and ``name`` (all if None); how many went."""
        doomed = [
            key
            for key in list(self._entries.keys())
            if (vault is None or key.vault == vault)
            # Key Vault's names are case-insensitive: "DB-Pass" and "db-pass" are one secret.
            and (name is None or key.name.lower() == name.lower())
        ]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def states(self) -> list[SecretState]:
        now = self._clock()
        states = []
        for key, entry in list(self._entries.items()):
            rules = self._rules.get(key.vault)
            if entry.secret is None or rules is None:
                continue
            states.append(
                SecretState(
                    vault=key.vault,
                    name=key.name,
                    version=key.version,
                    age=now - entry.fetched_at,
                    stale=not fresh(key, entry.fetched_at, rules, now),
                    reads=entry.reads,
                )
            )
        return states

    def __len__(self) -> int:
        return len(self._entries)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # wait() never raises the tasks' own cancellation; a cancellation of ours still propagates.
            await asyncio.shield(asyncio.wait(tasks))

    def _held(self, vault: str, now: float) -> float:
        return self._hold_until.get(vault, 0.0) - now

    def _stale(self, key: SecretKey, entry: _Entry, rules: VaultRules, exc: errors.ConnectorError) -> Secret:
        """The cached copy to serve while the vault fails transiently, or the error to raise."""
        now = self._clock()
        if entry.secret is None:
            raise exc
        if not stale_servable(entry.fetched_at, rules, now):
            retry_after = exc.retry_after if isinstance(exc, errors.Throttled) else None
            raise Unavailable(
                f"{exc.upstream}: {exc.message}; the cached copy of {key.vault}/{key.name} "
                "is past stale_if_error",
                retry_after=retry_after or UNAVAILABLE_RETRY_AFTER,
            ) from None
        return _checked(key, entry.secret, now)

    def _start(self, key: SecretKey, entry: _Entry) -> asyncio.Task[Secret]:
        started = self._clock()
        task = asyncio.create_task(self._fetch(key), name=f"secret-fetch {key.vault}/{key.name}")
        entry.inflight = task
        self._entries[key] = entry
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._settle(key, entry, t, started))
        return task

    def _settle(self, key: SecretKey, entry: _Entry, task: asyncio.Task[Secret], started: float) -> None:
        self._tasks.discard(task)
        entry.inflight = None
        if task.cancelled() or self._closed:
            return
        exc = task.exception()
        if exc is None:
            entry.secret, entry.fetched_at, entry.reads = task.result(), started, 0
            return
        if isinstance(exc, errors.Throttled) and exc.retry_after:
            hold = self._clock() + exc.retry_after
            self._hold_until[key.vault] = max(self._hold_until.get(key.vault, 0.0), hold)
        if isinstance(exc, errors.TRANSIENT) and entry.secret is not None:
            # Logged once per failed fetch, not once per caller served the stale copy.
            log.warning(
                "fetch of %s/%s failed (%s); its cached copy is %.0fs old",
                key.vault, key.name, exc, self._clock() - entry.fetched_at,
            )
        if isinstance(exc, (errors.NotFound, errors.Forbidden)):
            # Every version goes: a revoked or deleted secret must not live on in the cache.
            self.drop(key.vault, key.name)
        elif entry.secret is None and self._entries.get(key) is entry:
            del self._entries[key]


def _checked(key: SecretKey, secret: Secret, now: float) -> Secret:
    why = refusal(secret, now)
    if why is not None:
        raise Forbidden(f"secret {key.vault}/{key.name} is {why}")
    return secret
