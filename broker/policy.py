"""Who may call, and what each caller may have."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from connectors.identity import Identity

WILDCARD = "*"


@dataclass(frozen=True)
class Client:
    name: str
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    key: str = field(default="", repr=False)
    resources: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()
    databases: tuple[str, ...] = ()
    identities: tuple[str, ...] = ()
    admin: bool = False
    rate_limit: float = 0.0


def owner_client(uid: int) -> Client:
    """The implicit client when none is configured: the broker's own user and root, full rights."""
    return Client(
        name="local-owner",
        uids=frozenset({uid, 0}),
        resources=(WILDCARD,),
        secrets=("*/*",),
        databases=(WILDCARD,),
        identities=(WILDCARD,),
        admin=True,
    )


def _same_resource(a: str, b: str) -> bool:
    # "https://database.windows.net/" and "https://database.windows.net" name one audience.
    return a.rstrip("/") == b.rstrip("/")


@dataclass(frozen=True)
class Policy:
    clients: tuple[Client, ...]
    _keys: tuple[tuple[bytes, Client], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Encoded once: by_key runs on every TCP request.
        keys = tuple((c.key.encode(), c) for c in self.clients if c.key)
        object.__setattr__(self, "_keys", keys)

    @classmethod
    def build(cls, clients: Sequence[Client], owner_uid: int) -> Policy:
        return cls(tuple(clients) or (owner_client(owner_uid),))

    def by_peer(self, uid: int, gids: Iterable[int]) -> Client | None:
        groups = set(gids)
        for client in self.clients:
            if uid in client.uids or groups & client.gids:
                return client
        return None

    def by_key(self, presented: str) -> Client | None:
        # Compare against every key, without stopping at a match, so timing says nothing.
        found = None
        given = presented.encode()
        for key, client in self._keys:
            if hmac.compare_digest(key, given):
                found = found or client
        return found

    def by_name(self, name: str) -> Client | None:
        return next((c for c in self.clients if c.name == name), None)

    @staticmethod
    def allows_resource(client: Client, resource: str) -> bool:
        return any(r == WILDCARD or _same_resource(r, resource) for r in client.resources)

    @staticmethod
    def allows_identity(client: Client, identity: Identity) -> bool:
        if identity.kind == "default":
            return True
        wanted = identity.value.lower()
        return any(i == WILDCARD or i.lower() == wanted for i in client.identities)

    @staticmethod
    def allows_secret(client: Client, vault: str, name: str) -> bool:
        path = f"{vault}/{name}"
        return any(fnmatchcase(path, pattern) for pattern in client.secrets)

