"""IdentityClient's own bookkeeping: one protocol client per identity, bounded."""

from __future__ import annotations

import asyncio

from broker.emulator import Emulator
from connectors.identity import MAX_IDENTITIES, Identity, IdentityClient, Source


async def test_per_identity_clients_are_bounded_and_closed(emulator: Emulator) -> None:
    client = IdentityClient(Source("app_service", endpoint=emulator.identity_url, header=emulator.identity_header))
    ids = [f"00000000-0000-0000-0000-{n:012d}" for n in range(MAX_IDENTITIES + 8)]
    tokens = await asyncio.gather(*(client.fetch("https://vault.azure.net", Identity("client_id", i)) for i in ids))
    for identity, token in zip(ids, tokens, strict=True):
        assert emulator.verify_token(token.value, "https://vault.azure.net")["appid"] == identity
    assert len(client._clients) == MAX_IDENTITIES
    # the most recently used survive eviction
    assert Identity("client_id", ids[-1]) in client._clients
    await client.close()
    assert not client._clients and not client._closing
